//! The guided-diffusion fixture (shared/fixtures/guided-diffusion) reproduced by our UNet on tch.

use davi_models::{UNetConfig, UNetModel};
use davi_train::{backend::array_from_tensor, checkpoint, TchBackend};
use std::path::PathBuf;
use tch::Device;

/// The fixture folder: `DAVI_FIXTURES`, else `shared/fixtures` beside the checkout.
pub fn fixtures() -> PathBuf {
    if let Some(p) = std::env::var_os("DAVI_FIXTURES") {
        return PathBuf::from(p);
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures");
    assert!(
        p.is_dir(),
        "fixtures not found at {} (set DAVI_FIXTURES)",
        p.display()
    );
    p
}

fn max_abs_diff(a: &tch::Tensor, b: &tch::Tensor) -> f64 {
    f64::try_from((a - b).abs().max()).unwrap()
}

#[test]
fn fixture_unet_reproduces_reference_from_safetensors() {
    let dir = fixtures().join("guided-diffusion");
    let cfg = UNetConfig::from_file(&dir.join("adm_rgb32.config.json")).unwrap();
    let unet = UNetModel::new(&cfg).unwrap();
    let params = checkpoint::load_params(
        &dir.join("adm_rgb32.weights.safetensors"),
        unet.param_shapes(),
        None,
        Device::Cpu,
    )
    .unwrap();
    let io = checkpoint::load_tensors(&dir.join("adm_rgb32.io.safetensors"), Device::Cpu).unwrap();
    let ts: Vec<f32> = array_from_tensor(&io["timesteps"])
        .iter()
        .copied()
        .collect();
    assert_eq!(ts, vec![999.0, 17.0]);
    let b = TchBackend::new(params, Device::Cpu);
    let out = tch::no_grad(|| unet.forward(&b, &io["x"], &ts, None)).unwrap();
    assert_eq!(out.size(), io["output"].size());
    let d = max_abs_diff(&out, &io["output"]);
    assert!(d <= 1e-4, "max |diff| = {d}");
}

#[test]
fn wrong_weights_are_named() {
    let dir = fixtures().join("guided-diffusion");
    let mut cfg = UNetConfig::from_file(&dir.join("adm_rgb32.config.json")).unwrap();
    cfg.use_scale_shift_norm = false; // emb_layers.1 is then half as wide
    cfg.channel_mult = vec![1, 1, 2];
    let unet = UNetModel::new(&cfg).unwrap();
    let err = checkpoint::load_params(
        &dir.join("adm_rgb32.weights.safetensors"),
        unet.param_shapes(),
        None,
        Device::Cpu,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("mis-shaped keys: ") && err.contains("emb_layers.1.weight"),
        "{err}"
    );
    assert!(
        err.contains("unexpected keys: ") && err.contains("input_blocks.6"),
        "{err}"
    );
}
