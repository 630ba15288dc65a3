//! `davi verify`: reruns the parity fixtures beside a model and compares with what tch computed.

use crate::model::{keys, ModelInfo};
use crate::{Model, RuntimeError};
use ndarray::{Array4, ArrayD};
use std::collections::BTreeMap;
use std::path::Path;

/// Outcome of a parity check.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Parity {
    /// Number of input pairs.
    pub k: usize,
    /// Largest absolute difference.
    pub max_abs: f64,
    /// Mean absolute difference.
    pub mean_abs: f64,
    /// PSNR between the two outputs on [-1, 1] (peak-to-peak 2).
    pub psnr_db: f64,
    /// Values that are NaN or infinite, on either side (any fails the check).
    pub non_finite: usize,
    /// The criterion applied.
    pub criterion: String,
    /// Whether it holds.
    pub pass: bool,
}

/// The safetensors metadata key naming the model a parity file was computed for (written by
/// `davi-train export`).
pub const PARITY_FOR: &str = "davi.parity_for";

/// Tolerance of `docs/DESIGN.md` section 3 for fp32 execution.
pub const FP32_MAX_ABS: f64 = 1e-4;
/// Tolerance for fp16 / TensorRT.
pub const FP16_MIN_PSNR: f64 = 40.0;

fn read4(
    st: &safetensors::SafeTensors,
    name: &str,
    path: &Path,
) -> Result<Array4<f32>, RuntimeError> {
    let v = st
        .tensor(name)
        .map_err(|_| RuntimeError::file(path, format!("no tensor '{name}' in the parity file")))?;
    if v.dtype() != safetensors::Dtype::F32 || v.shape().len() != 4 {
        return Err(RuntimeError::file(
            path,
            format!(
                "tensor '{name}' must be f32 of rank 4, is {:?} {:?}",
                v.dtype(),
                v.shape()
            ),
        ));
    }
    let data: Vec<f32> = v
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let s = v.shape();
    Array4::from_shape_vec((s[0], s[1], s[2], s[3]), data).map_err(|e| RuntimeError::file(path, e))
}

/// Compares two outputs.
pub fn compare(a: &ArrayD<f32>, b: &ArrayD<f32>, fp16: bool) -> Parity {
    let n = a.len().max(1) as f64;
    let mut max_abs = 0f64;
    let mut sum_abs = 0f64;
    let mut sum_sq = 0f64;
    let non_finite = a.iter().chain(b.iter()).filter(|v| !v.is_finite()).count();
    for (x, y) in a.iter().zip(b.iter()) {
        let d = (*x as f64 - *y as f64).abs();
        max_abs = max_abs.max(d);
        sum_abs += d;
        sum_sq += d * d;
    }
    let mse = sum_sq / n;
    let psnr_db = if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (4.0 / mse).log10()
    };
    let (criterion, pass) = if non_finite > 0 {
        (
            format!("every value finite ({non_finite} are NaN or infinite)"),
            false,
        )
    } else if fp16 {
        (
            format!("PSNR >= {FP16_MIN_PSNR} dB (fp16 / TensorRT)"),
            psnr_db >= FP16_MIN_PSNR,
        )
    } else {
        (
            format!("max |diff| <= {FP32_MAX_ABS} (fp32)"),
            max_abs <= FP32_MAX_ABS,
        )
    };
    Parity {
        k: a.shape().first().copied().unwrap_or(0),
        max_abs,
        mean_abs: sum_abs / n,
        psnr_db,
        non_finite,
        criterion,
        pass,
    }
}

/// A parity file names the model it was computed for (its safetensors metadata `davi.parity_for`:
/// JSON with `davi.name` and `davi.config_hash`; older files name none): another model's
/// fixture is refused as such, where comparing would only say FAIL.
fn check_made_for(bytes: &[u8], info: &ModelInfo, parity: &Path) -> Result<(), RuntimeError> {
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| RuntimeError::file(parity, format!("not a safetensors file: {e}")))?;
    let Some(json) = meta.metadata().as_ref().and_then(|m| m.get(PARITY_FOR)) else {
        return Ok(());
    };
    let made_for: BTreeMap<String, String> = serde_json::from_str(json).map_err(|e| {
        RuntimeError::file(parity, format!("metadata '{PARITY_FOR}' is not JSON: {e}"))
    })?;
    let (name, hash) = (made_for.get(keys::NAME), made_for.get(keys::CONFIG_HASH));
    let differs = |want: Option<&String>, have: &str| {
        want.is_some_and(|w| !have.is_empty() && w.as_str() != have)
    };
    if differs(name, &info.name) || differs(hash, &info.config_hash) {
        return Err(RuntimeError::file(
            parity,
            format!(
                "parity fixture of another model: made for '{}' (config {}), this model is '{}' (config {}); pass the fixture exported beside it (--parity)",
                name.map_or("?", |s| s.as_str()),
                hash.map_or("?", |s| s.as_str()),
                info.name,
                info.config_hash
            ),
        ));
    }
    Ok(())
}

/// Runs the parity file's inputs through `model` and compares with its `image` outputs.
pub fn verify(model: &mut Model, parity: &Path, fp16: bool) -> Result<Parity, RuntimeError> {
    // A parity file holds a few images' tensors: megabytes, not gigabytes.
    let bytes = crate::paths::read_file(parity, 1 << 30)?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| RuntimeError::file(parity, format!("not a safetensors file: {e}")))?;
    check_made_for(&bytes, &model.info, parity)?;
    let meas = read4(&st, "measurement", parity)?;
    let noise = read4(&st, "noise", parity)?;
    let want = read4(&st, "image", parity)?.into_dyn();
    let got = model.restore(&meas, &noise)?;
    if got.shape() != want.shape() {
        return Err(RuntimeError::Model {
            path: model.path.display().to_string(),
            reason: format!(
                "output shape {:?} differs from the parity file's {:?}",
                got.shape(),
                want.shape()
            ),
        });
    }
    Ok(compare(&got, &want, fp16))
}
