//! The guided-diffusion fixture (`tests/fixtures/guided-diffusion`) reproduced by our UNet on tch.

use davi_models::{UNetConfig, UNetModel};
use davi_train::{backend::array_from_tensor, checkpoint, TchBackend};
use std::path::PathBuf;
use tch::Device;

/// The repository's fixture folder.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// The fixture's weights as safetensors, converted from its `.pt` by our reader (once per
/// process); the `.pt` test below checks that reader tensor by tensor.
fn fixture_weights() -> PathBuf {
    static ONCE: std::sync::OnceLock<(tempfile::TempDir, PathBuf)> = std::sync::OnceLock::new();
    let (_, p) = ONCE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("adm_rgb32.safetensors");
        let pt =
            davi_train::pt::read_pt(&fixtures().join("guided-diffusion/adm_rgb32.pt")).unwrap();
        davi_train::pt::write_safetensors(&pt, &out).unwrap();
        (dir, out)
    });
    p.clone()
}

fn max_abs_diff(a: &tch::Tensor, b: &tch::Tensor) -> f64 {
    f64::try_from((a - b).abs().max()).unwrap()
}

#[test]
fn fixture_unet_reproduces_reference_from_safetensors() {
    let dir = fixtures().join("guided-diffusion");
    let cfg = UNetConfig::from_file(&dir.join("adm_rgb32.config.json")).unwrap();
    let unet = UNetModel::new(&cfg).unwrap();
    let params =
        checkpoint::load_params(&fixture_weights(), unet.param_shapes(), None, Device::Cpu)
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
    let err = checkpoint::load_params(&fixture_weights(), unet.param_shapes(), None, Device::Cpu)
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
fn fixture_pt_loads_without_pickle_and_round_trips_through_safetensors() {
    let dir = fixtures().join("guided-diffusion");
    let pt = davi_train::pt::read_pt(&dir.join("adm_rgb32.pt")).unwrap();
    let cfg = UNetConfig::from_file(&dir.join("adm_rgb32.config.json")).unwrap();
    assert_eq!(pt.len(), UNetModel::new(&cfg).unwrap().param_shapes().len());
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("w.safetensors");
    davi_train::pt::write_safetensors(&pt, &out).unwrap();
    let back = checkpoint::load_tensors(&out, Device::Cpu).unwrap();
    assert_eq!(back.len(), pt.len());
    for (k, raw) in &pt {
        assert_eq!(raw.dtype, safetensors::Dtype::F32, "{k}");
        let want: Vec<f32> = raw
            .data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let got: Vec<f32> = array_from_tensor(&back[k]).iter().copied().collect();
        assert_eq!(got, want, "{k}");
        assert!(want.iter().any(|&v| v != 0.0), "{k} is all zero");
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
