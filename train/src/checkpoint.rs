//! Checkpoints: safetensors files whose keys are guided-diffusion's state-dict names.

use anyhow::{Context, Result};
use std::collections::HashMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// Reads every tensor of a safetensors file onto `device` as f32; an exported `.onnx` model
/// gives its weights (the zoo ships each task model's weights once, inside its ONNX file).
pub fn load_tensors(path: &Path, device: Device) -> Result<HashMap<String, Tensor>> {
    // libtorch would read a pipe for ever and a device until memory runs out.
    let m = std::fs::metadata(path).with_context(|| format!("{}: cannot read", path.display()))?;
    if !m.is_file() {
        anyhow::bail!("{}: {}", path.display(), davi_models::atomic::file_kind(&m));
    }
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("onnx"))
    {
        let w = davi_export::Weights::load(path)?;
        return Ok(tensors_from_weights(&w, device));
    }
    let list = Tensor::read_safetensors(path)
        .with_context(|| format!("{}: cannot read safetensors", path.display()))?;
    Ok(list
        .into_iter()
        .map(|(k, t)| (k, t.to_kind(Kind::Float).to_device(device)))
        .collect())
}

/// The tensors of `davi_export::Weights` on `device` (f32).
pub fn tensors_from_weights(w: &davi_export::Weights, device: Device) -> HashMap<String, Tensor> {
    w.tensors
        .iter()
        .map(|(k, v)| {
            let shape: Vec<i64> = v.shape().iter().map(|&d| d as i64).collect();
            let data: Vec<f32> = v.iter().copied().collect();
            (
                k.clone(),
                Tensor::from_slice(&data).reshape(&shape).to_device(device),
            )
        })
        .collect()
}

/// Reads the weights of a network from a checkpoint, checked against the names and shapes it
/// expects. Training checkpoints hold several networks under prefixes (`ema.`, `implicit.`...):
/// `prefix` picks one; plain state dicts (no prefix) are read as they are.
pub fn load_params(
    path: &Path,
    expected: &[(String, Vec<usize>)],
    prefix: Option<&str>,
    device: Device,
) -> Result<HashMap<String, Tensor>> {
    let all = load_tensors(path, device)?;
    let params: HashMap<String, Tensor> = match prefix {
        Some(p) if all.keys().any(|k| k.starts_with(p)) => all
            .into_iter()
            .filter_map(|(k, v)| k.strip_prefix(p).map(|s| (s.to_string(), v)))
            .collect(),
        _ => all,
    };
    let found: Vec<(String, Vec<usize>)> = params
        .iter()
        .map(|(k, v)| (k.clone(), v.size().iter().map(|&d| d as usize).collect()))
        .collect();
    davi_models::check_params(expected, &found).map_err(|d| {
        anyhow::anyhow!("{}: weights do not match the network: {d}", path.display())
    })?;
    Ok(params)
}

/// A backend over a network's weights read from `path` (a run checkpoint's `ema.` weights, plain
/// weights, or an exported model), checked against `unet`.
pub fn load_backend(
    path: &Path,
    unet: &davi_models::UNetModel,
    device: Device,
) -> Result<crate::TchBackend> {
    let params = load_params(path, unet.param_shapes(), Some("ema."), device)?;
    Ok(crate::TchBackend::new(params, device))
}

/// Writes named tensors to a safetensors file atomically (temporary file, then rename).
pub fn save_tensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let tmp = path.with_extension("safetensors.tmp");
    let cpu: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(k, t)| (k.clone(), t.detach().to_device(Device::Cpu).contiguous()))
        .collect();
    Tensor::write_safetensors(&cpu, &tmp)
        .with_context(|| format!("{}: cannot write", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("{}: cannot rename into place", path.display()))?;
    Ok(())
}
