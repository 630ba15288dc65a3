//! `davi-train export`: `I_phi` to ONNX (through `davi-export`, no second architecture) with
//! parity fixtures computed by tch from the same checkpoint.

use crate::backend::TchBackend;
use crate::data::{Dataset, Split};
use crate::{checkpoint, davi::measure};
use anyhow::{Context, Result};
use davi_export::{ExportOptions, Weights};
use davi_models::{DaviConfig, Implicit};
use std::path::{Path, PathBuf};
use tch::{Device, Tensor};

/// What `export` was asked.
pub struct ExportArgs {
    /// DAVI checkpoint (run checkpoint: its `ema.` weights; plain weights; or an exported
    /// `model.onnx`, whose re-export is byte-identical).
    pub checkpoint: PathBuf,
    /// The model config.
    pub config: PathBuf,
    /// Output `model.onnx`.
    pub output: PathBuf,
    /// Graph options.
    pub options: ExportOptions,
    /// Weights to external data.
    pub external_data: bool,
    /// Parity pairs.
    pub k: usize,
    /// Seed of the parity measurements and noise.
    pub seed: i64,
}

/// The `davi.*` metadata of a model.
pub fn metadata(cfg: &DaviConfig) -> Result<Vec<(String, String)>> {
    let task = cfg.task()?;
    Ok(vec![
        ("davi.task".into(), task.operator.task().into()),
        (
            "davi.operator".into(),
            serde_json::to_string(&task.operator)?,
        ),
        ("davi.sigma_y".into(), task.sigma_y.to_string()),
        ("davi.h".into(), task.h.to_string()),
        ("davi.image_size".into(), cfg.unet.image_size.to_string()),
        ("davi.channels".into(), cfg.unet.in_channels.to_string()),
        ("davi.config_hash".into(), cfg.hash()),
        ("davi.tool_version".into(), davi_export::TOOL_VERSION.into()),
        ("davi.name".into(), cfg.name.clone()),
    ])
}

/// Writes `model.onnx` and `model.parity.safetensors`; returns the parity file's path.
pub fn export(args: &ExportArgs) -> Result<PathBuf> {
    let cfg = DaviConfig::from_file(&args.config)?;
    let implicit = Implicit::new(&cfg)?;
    let mut weights = Weights::load(&args.checkpoint)?.strip_prefix("ema.");
    if args.options.half_weights {
        // Parity is computed with the very values the model stores.
        weights = weights.round_to_half();
    }
    weights
        .check(
            implicit.unet.param_shapes(),
            &args.checkpoint.display().to_string(),
        )
        .map_err(anyhow::Error::from)?;
    let proto = davi_export::export_implicit(&implicit, &weights, &args.options, &metadata(&cfg)?)?;
    if let Some(dir) = args.output.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create", dir.display()))?;
    }
    let hist = davi_export::op_histogram(&proto);
    davi_export::write_model(proto, &args.output, args.external_data)?;

    // Parity: K held-out measurements with fixed noise, through tch from the same weights.
    let task = cfg.task()?;
    let (c, s) = (implicit.channels, implicit.size);
    let x0 = match &cfg.data {
        Some(d) => {
            let ds = Dataset::open(d, Split::Test, c, s, true)?;
            let idx: Vec<usize> = (0..args.k).map(|i| i % ds.len).collect();
            Tensor::from_slice(&ds.batch(&idx)?).reshape([
                args.k as i64,
                c as i64,
                s as i64,
                s as i64,
            ])
        }
        None => {
            tch::manual_seed(args.seed);
            Tensor::rand(
                [args.k as i64, c as i64, s as i64, s as i64],
                (tch::Kind::Float, Device::Cpu),
            ) * 2.0
                - 1.0
        }
    };
    let b = TchBackend::new(
        checkpoint::tensors_from_weights(&weights, Device::Cpu),
        Device::Cpu,
    );
    tch::manual_seed(args.seed);
    // One thread: the fixtures' bytes then do not depend on how many cores the exporting
    // machine has (a multi-threaded convolution sums in another order), so a re-export of a
    // shipped model gives the same file anywhere.
    let threads = tch::get_num_threads();
    tch::set_num_threads(1);
    let computed = tch::no_grad(|| -> Result<(Tensor, Tensor, Tensor)> {
        let y = measure(&implicit.operator, &b, &x0, c, s, task.sigma_y).clamp(-1.0, 1.0);
        let z = Tensor::randn(
            [args.k as i64, c as i64, s as i64, s as i64],
            (tch::Kind::Float, Device::Cpu),
        );
        let out = implicit.restore(&b, &y, &z)?;
        Ok((y, z, out))
    });
    tch::set_num_threads(threads);
    let (y, z, out) = computed?;
    crate::eval::check_finite(
        &format!("{}: the exported weights", args.checkpoint.display()),
        &out,
    )?;
    let parity = parity_path(&args.output);
    write_parity(
        &parity,
        &[("measurement", &y), ("noise", &z), ("image", &out)],
        &cfg,
    )?;
    let size = std::fs::metadata(&args.output)?.len();
    println!("model: {:.2} MB", size as f64 / 1e6);
    println!(
        "ops: {}",
        hist.iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(parity)
}

/// Writes the parity tensors (f32) with the model's name and config hash as metadata, atomically:
/// one key (`davi verify`'s `PARITY_FOR`) holding sorted JSON, so that the header's bytes do not
/// depend on a hash map's order and a re-export stays byte-identical.
fn write_parity(path: &Path, tensors: &[(&str, &Tensor)], cfg: &DaviConfig) -> Result<()> {
    let raw = tensors
        .iter()
        .map(|(k, t)| Ok((k.to_string(), crate::pt::RawTensor::f32(t)?)))
        .collect::<Result<_>>()?;
    use davi_runtime::{model::keys, verify::PARITY_FOR};
    let model: std::collections::BTreeMap<&str, String> = [
        (keys::NAME, cfg.name.clone()),
        (keys::CONFIG_HASH, cfg.hash()),
    ]
    .into();
    let meta = [(PARITY_FOR.to_string(), serde_json::to_string(&model)?)].into();
    crate::pt::write_safetensors_with(&raw, Some(meta), path)
}

/// `DIR/model.parity.safetensors` beside `DIR/model.onnx`.
pub fn parity_path(model: &Path) -> PathBuf {
    let stem = model
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "model".into());
    model.with_file_name(format!("{stem}.parity.safetensors"))
}
