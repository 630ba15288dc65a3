//! `davi bench`: throughput and latency of the bare session, and of `restore` end to end.

use crate::pipeline::{self, RestoreOptions};
use crate::{Model, RuntimeError};
use ndarray::Array4;
use std::path::Path;
use std::time::Instant;

/// Figures of the bare session at one batch size.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SessionFigures {
    /// Batch size.
    pub batch: usize,
    /// Images per second.
    pub images_per_second: f64,
    /// Median latency of one run, ms.
    pub p50_ms: f64,
    /// 99th percentile latency, ms.
    pub p99_ms: f64,
    /// Runs timed.
    pub runs: usize,
}

/// Times the bare session on random measurements for about `seconds` (after a warm-up run).
pub fn session(
    model: &mut Model,
    batch: usize,
    seconds: f64,
) -> Result<SessionFigures, RuntimeError> {
    let [cy, hy, wy] = model.info.measurement_shape();
    let [c, s, _] = model.info.image_shape();
    let m = Array4::<f32>::from_shape_fn((batch, cy, hy, wy), |(n, k, i, j)| {
        (((n * 31 + k * 7 + i * 3 + j) % 17) as f32 / 8.5) - 1.0
    });
    let z = Array4::<f32>::zeros((batch, c, s, s));
    model.restore(&m, &z)?;
    let mut lat = Vec::new();
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < seconds || lat.len() < 5 {
        let t = Instant::now();
        model.restore(&m, &z)?;
        lat.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let total: f64 = lat.iter().sum::<f64>() / 1e3;
    lat.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    let pct = |p: f64| lat[((lat.len() as f64 - 1.0) * p).round() as usize];
    Ok(SessionFigures {
        batch,
        images_per_second: (lat.len() * batch) as f64 / total,
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
        runs: lat.len(),
    })
}

/// `restore` over a folder into a temporary output folder: images per second end to end.
pub fn restore(
    model: &mut Model,
    input: &Path,
    batch: usize,
    overlap: f64,
) -> Result<pipeline::Report, RuntimeError> {
    // Removed when it goes out of scope, on errors and panics too.
    let out = tempfile::Builder::new()
        .prefix("davi-bench-")
        .tempdir()
        .map_err(|e| RuntimeError::io(&std::env::temp_dir(), e))?;
    let opts = RestoreOptions {
        input: input.to_path_buf(),
        output: out.path().to_path_buf(),
        format: crate::images::Format::Png,
        batch,
        seed: 0,
        skip_existing: false,
        shard: None,
        samples: 1,
        follow_symlinks: false,
        progress: false,
        print_failures: false,
        max_pixels: crate::images::DEFAULT_MAX_PIXELS,
        overlap,
        stop: None,
    };
    pipeline::restore(model, &opts, None)
}
