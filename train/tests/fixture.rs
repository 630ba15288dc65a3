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

#[test]
fn fixture_pt_loads_without_pickle_and_matches_safetensors() {
    let dir = fixtures().join("guided-diffusion");
    let pt = davi_train::pt::read_pt(&dir.join("adm_rgb32.pt")).unwrap();
    let st =
        checkpoint::load_tensors(&dir.join("adm_rgb32.weights.safetensors"), Device::Cpu).unwrap();
    assert_eq!(pt.len(), st.len());
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("w.safetensors");
    davi_train::pt::write_safetensors(&pt, &out).unwrap();
    let back = checkpoint::load_tensors(&out, Device::Cpu).unwrap();
    for (k, t) in &st {
        assert_eq!(max_abs_diff(t, &back[k]), 0.0, "{k}");
    }
    // And the UNet run from the imported weights reproduces the reference.
    let cfg = UNetConfig::from_file(&dir.join("adm_rgb32.config.json")).unwrap();
    let unet = UNetModel::new(&cfg).unwrap();
    let params = checkpoint::load_params(&out, unet.param_shapes(), None, Device::Cpu).unwrap();
    let io = checkpoint::load_tensors(&dir.join("adm_rgb32.io.safetensors"), Device::Cpu).unwrap();
    let b = TchBackend::new(params, Device::Cpu);
    let outp = tch::no_grad(|| unet.forward(&b, &io["x"], &[999.0, 17.0], None)).unwrap();
    assert!(max_abs_diff(&outp, &io["output"]) <= 1e-4);
}

fn zip_with_pickle(path: &std::path::Path, pickle: &[u8]) {
    use std::io::Write;
    let f = std::fs::File::create(path).unwrap();
    let mut z = zip::ZipWriter::new(f);
    let opts: zip::write::SimpleFileOptions =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    z.start_file("archive/data.pkl", opts).unwrap();
    z.write_all(pickle).unwrap();
    z.start_file("archive/version", opts).unwrap();
    z.write_all(b"3\n").unwrap();
    z.finish().unwrap();
}

#[test]
fn pickle_with_a_foreign_global_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let marker = tmp.path().join("pwned");
    // posix.system("touch <marker>") via GLOBAL + REDUCE, as a malicious checkpoint would.
    let cmd = format!("touch {}", marker.display());
    let mut p = vec![0x80, 2];
    p.extend_from_slice(b"cposix\nsystem\n");
    p.push(b'X');
    p.extend_from_slice(&(cmd.len() as u32).to_le_bytes());
    p.extend_from_slice(cmd.as_bytes());
    p.extend_from_slice(&[0x85, b'R', b'.']);
    let path = tmp.path().join("evil.pt");
    zip_with_pickle(&path, &p);
    let err = format!("{:#}", davi_train::pt::read_pt(&path).unwrap_err());
    assert!(
        err.contains("posix.system") && err.contains("refused"),
        "{err}"
    );
    assert!(!marker.exists(), "the pickle ran");
    // builtins.eval through STACK_GLOBAL too.
    let mut p = vec![0x80, 4, 0x8c, 8];
    p.extend_from_slice(b"builtins");
    p.extend_from_slice(&[0x8c, 4]);
    p.extend_from_slice(b"eval");
    p.extend_from_slice(&[0x93, b'.']);
    zip_with_pickle(&path, &p);
    let err = format!("{:#}", davi_train::pt::read_pt(&path).unwrap_err());
    assert!(err.contains("builtins.eval"), "{err}");
}
