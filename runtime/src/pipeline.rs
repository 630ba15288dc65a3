//! `davi restore`: a folder of measurements through one session, in bounded batches.
//!
//! Three stages run at once: decoding on the rayon pool, the session on the calling thread
//! (ONNX Runtime's `run` takes `&mut self`), encoding and atomic writes on the rayon pool. Each
//! stage hands the next one chunks through a bounded channel, so memory does not grow with the
//! folder. Noise is seeded from (seed, relative path, sample), so outputs never depend on batch
//! size, order or sharding.

use crate::images::{self, Format};
use crate::{Model, RuntimeError};
use ndarray::{s, Array3, Array4, Axis};
use rand::SeedableRng;
use rand_distr::Distribution;
use rayon::prelude::*;
use sha2::{Digest, Sha256};
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

/// What to restore and how.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// An image file or a folder (walked recursively, sorted).
    pub input: PathBuf,
    /// Output folder; relative paths of the input are mirrored under it.
    pub output: PathBuf,
    /// Output format.
    pub format: Format,
    /// Images per session run.
    pub batch: usize,
    /// Seed of the bridge noise.
    pub seed: u64,
    /// Skip inputs whose output already exists.
    pub skip_existing: bool,
    /// Process only the inputs `k` with `k % n == i` (of the sorted list).
    pub shard: Option<(usize, usize)>,
    /// Posterior samples per image (> 1 also writes their mean and standard deviation).
    pub samples: usize,
    /// Follow symbolic links that leave the input folder.
    pub follow_symlinks: bool,
    /// Show a progress bar (on a TTY).
    pub progress: bool,
}

/// One file that could not be restored.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Failure {
    /// The input path.
    pub path: String,
    /// Why.
    pub reason: String,
}

/// What a run did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Report {
    /// Inputs found (after sharding).
    pub found: usize,
    /// Restored now.
    pub restored: usize,
    /// Skipped because their output existed.
    pub skipped: usize,
    /// Files with another extension, not read.
    pub ignored: usize,
    /// Failures, each with its path and reason.
    pub failed: Vec<Failure>,
    /// Wall time of the run.
    pub seconds: f64,
    /// Restored images per second.
    pub images_per_second: f64,
    /// Seconds spent inside the session.
    pub session_seconds: f64,
}

#[derive(Debug, Clone)]
struct Job {
    path: PathBuf,
    rel: PathBuf,
}

/// Lists the inputs: sorted, recursive, image extensions only. Unreadable entries, symlink loops
/// and links that leave the folder become failures.
fn list_inputs(opts: &RestoreOptions, report: &mut Report) -> Result<Vec<Job>, RuntimeError> {
    let input = &opts.input;
    let meta = std::fs::metadata(input).map_err(|e| RuntimeError::io(input, e))?;
    if meta.is_file() {
        let name = input
            .file_name()
            .ok_or_else(|| RuntimeError::io(input, "no file name"))?;
        return Ok(vec![Job {
            path: input.clone(),
            rel: PathBuf::from(name),
        }]);
    }
    let root = input
        .canonicalize()
        .map_err(|e| RuntimeError::io(input, e))?;
    // An output folder inside the input folder is not walked: its files are ours, not inputs.
    let out_root = opts.output.canonicalize().ok();
    let mut jobs = Vec::new();
    let walker = walkdir::WalkDir::new(input)
        .follow_links(opts.follow_symlinks)
        .sort_by_file_name()
        .into_iter()
        .filter_entry(|e| {
            // Only folders can be the output folder: files are not resolved.
            !(e.file_type().is_dir()
                && out_root
                    .as_ref()
                    .is_some_and(|o| e.path().canonicalize().is_ok_and(|p| p == *o)))
        });
    for entry in walker {
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                let path = e
                    .path()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| input.display().to_string());
                let reason = if e.loop_ancestor().is_some() {
                    "symlink loop".to_string()
                } else {
                    format!(
                        "cannot read: {}",
                        e.io_error()
                            .map(|e| e.to_string())
                            .unwrap_or_else(|| e.to_string())
                    )
                };
                report.failed.push(Failure { path, reason });
                continue;
            }
        };
        let path = entry.path();
        let ft = entry.file_type();
        if ft.is_symlink() {
            // Not followed by walkdir: resolve it ourselves and keep it only if it stays inside.
            match path.canonicalize() {
                Err(e) => {
                    report.failed.push(Failure {
                        path: path.display().to_string(),
                        reason: format!("broken symlink or symlink loop: {e}"),
                    });
                    continue;
                }
                Ok(target) if !target.starts_with(&root) => {
                    report.failed.push(Failure {
                        path: path.display().to_string(),
                        reason:
                            "symlink leaves the input folder; not followed (use --follow-symlinks)"
                                .into(),
                    });
                    continue;
                }
                Ok(target) if target.is_dir() => continue, // its files are reached inside the folder
                Ok(_) => {}
            }
        } else if !ft.is_file() {
            continue;
        }
        if !images::is_image_path(path) {
            report.ignored += 1;
            continue;
        }
        let rel = path.strip_prefix(input).unwrap_or(path).to_path_buf();
        if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
            report.failed.push(Failure {
                path: path.display().to_string(),
                reason: "path escapes the input folder".into(),
            });
            continue;
        }
        jobs.push(Job {
            path: path.to_path_buf(),
            rel,
        });
    }
    Ok(jobs)
}

/// The output path of an input's relative path.
pub fn output_path(out: &Path, rel: &Path, format: Format, suffix: &str) -> PathBuf {
    let stem = rel
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default();
    let name = format!("{stem}{suffix}.{}", format.ext());
    out.join(rel).with_file_name(name)
}

/// Standard normal noise of `n` values seeded from (seed, stream, relative path, sample).
pub fn noise(seed: u64, stream: &str, rel: &Path, sample: usize, n: usize) -> Vec<f32> {
    let mut h = Sha256::new();
    h.update(seed.to_le_bytes());
    h.update(stream.as_bytes());
    h.update((sample as u64).to_le_bytes());
    h.update(rel.to_string_lossy().as_bytes());
    let key: [u8; 32] = h.finalize().into();
    let mut rng = rand_chacha::ChaCha8Rng::from_seed(key);
    rand_distr::StandardNormal
        .sample_iter(&mut rng)
        .take(n)
        .collect()
}

/// A decoded measurement with its K noise draws (made on the decode workers, not the session's thread).
type Decoded = Vec<(Job, Result<(Array3<f32>, Vec<Vec<f32>>), String>)>;
type Restored = Vec<(Job, Vec<Array3<f32>>)>;

/// Restores every input of `opts` with `model`.
pub fn restore(model: &mut Model, opts: &RestoreOptions) -> Result<Report, RuntimeError> {
    let start = Instant::now();
    if opts.batch == 0 || opts.samples == 0 {
        return Err(RuntimeError::Usage(
            "--batch and --samples must be at least 1".into(),
        ));
    }
    let mut report = Report::default();
    std::fs::create_dir_all(&opts.output).map_err(|e| RuntimeError::io(&opts.output, e))?;
    let mut jobs = list_inputs(opts, &mut report)?;
    if let Some((i, n)) = opts.shard {
        jobs = jobs
            .into_iter()
            .enumerate()
            .filter(|(k, _)| k % n == i)
            .map(|(_, j)| j)
            .collect();
    }
    report.found = jobs.len();
    if opts.skip_existing {
        let before = jobs.len();
        jobs.retain(|j| !output_path(&opts.output, &j.rel, opts.format, "").exists());
        report.skipped = before - jobs.len();
    }
    std::fs::create_dir_all(&opts.output).map_err(|e| RuntimeError::io(&opts.output, e))?;

    let info = model.info.clone();
    let [cy, hy, wy] = info.measurement_shape();
    let [c, sz, _] = info.image_shape();
    let bar = if opts.progress {
        indicatif::ProgressBar::new(jobs.len() as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} {per_sec} eta {eta}")
            .expect("valid template"),
    );
    let failures = Mutex::new(Vec::<Failure>::new());
    let restored = std::sync::atomic::AtomicUsize::new(0);
    let mut session_seconds = 0.0;
    let (dec_tx, dec_rx) = crossbeam_channel::bounded::<Decoded>(2);
    let (enc_tx, enc_rx) = crossbeam_channel::bounded::<Restored>(2);
    let batch = opts.batch;
    let k = opts.samples;

    let run_result: Result<(), RuntimeError> = std::thread::scope(|scope| {
        // Stage 1: decode, a batch at a time, in parallel.
        let jobs_ref = &jobs;
        scope.spawn(move || {
            for chunk in jobs_ref.chunks(batch) {
                let decoded: Decoded = chunk
                    .par_iter()
                    .map(|j| {
                        let loaded = images::load(&j.path, cy, Some((hy, wy))).map(|m| {
                            let z = (0..k)
                                .map(|s| noise(opts.seed, "bridge", &j.rel, s, c * sz * sz))
                                .collect();
                            (m, z)
                        });
                        (j.clone(), loaded)
                    })
                    .collect();
                if dec_tx.send(decoded).is_err() {
                    break;
                }
            }
        });
        // Stage 3: encode and write, in parallel.
        let (failures_ref, restored_ref, bar_ref) = (&failures, &restored, &bar);
        scope.spawn(move || {
            for chunk in enc_rx {
                chunk.par_iter().for_each(|(job, samples)| {
                    match write_outputs(&opts.output, &job.rel, opts.format, samples) {
                        Ok(()) => {
                            restored_ref.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        Err(reason) => failures_ref.lock().expect("lock").push(Failure {
                            path: job.path.display().to_string(),
                            reason,
                        }),
                    }
                    bar_ref.inc(1);
                });
            }
        });
        // Stage 2: the session, on this thread.
        for chunk in dec_rx {
            let mut ok = Vec::with_capacity(chunk.len());
            for (job, res) in chunk {
                match res {
                    Ok(m) => ok.push((job, m)),
                    Err(reason) => {
                        failures.lock().expect("lock").push(Failure {
                            path: job.path.display().to_string(),
                            reason,
                        });
                        bar.inc(1);
                    }
                }
            }
            if ok.is_empty() {
                continue;
            }
            // K samples of each image go through the session together: [n*K, ...].
            let n = ok.len() * k;
            let mut meas = Array4::<f32>::zeros((n, cy, hy, wy));
            let mut z = Array4::<f32>::zeros((n, c, sz, sz));
            for (i, (_, (m, zs))) in ok.iter().enumerate() {
                for (s, v) in zs.iter().enumerate() {
                    meas.index_axis_mut(Axis(0), i * k + s).assign(m);
                    z.index_axis_mut(Axis(0), i * k + s)
                        .as_slice_mut()
                        .expect("standard layout")
                        .copy_from_slice(v);
                }
            }
            let t = Instant::now();
            let out = model.restore(&meas, &z);
            session_seconds += t.elapsed().as_secs_f64();
            let out = match out {
                Ok(o) => o,
                Err(e) => {
                    // A failed run fails its batch, with the reason; the rest go on.
                    let mut f = failures.lock().expect("lock");
                    for (job, _) in &ok {
                        f.push(Failure {
                            path: job.path.display().to_string(),
                            reason: e.to_string(),
                        });
                        bar.inc(1);
                    }
                    continue;
                }
            };
            let out =
                out.into_dimensionality::<ndarray::Ix4>()
                    .map_err(|e| RuntimeError::Model {
                        path: model.path.display().to_string(),
                        reason: format!("output shape: {e}"),
                    })?;
            let restored_chunk: Restored = ok
                .into_iter()
                .enumerate()
                .map(|(i, (job, _))| {
                    let samples = (0..k)
                        .map(|s| out.slice(s![i * k + s, .., .., ..]).to_owned())
                        .collect();
                    (job, samples)
                })
                .collect();
            if enc_tx.send(restored_chunk).is_err() {
                break;
            }
        }
        drop(enc_tx);
        Ok(())
    });
    run_result?;
    bar.finish_and_clear();
    report.restored = restored.into_inner();
    let mut f = failures.into_inner().expect("lock");
    report.failed.append(&mut f);
    report.failed.sort_by(|a, b| a.path.cmp(&b.path));
    report.seconds = start.elapsed().as_secs_f64();
    report.session_seconds = session_seconds;
    report.images_per_second = report.restored as f64 / report.seconds.max(1e-9);
    Ok(report)
}

/// Writes one image's outputs. With several samples: each sample, their per-pixel standard
/// deviation (`.std`, 255 = 0.25 on the [0, 1] scale) and, last, their mean under the plain
/// name, so the plain output exists only once everything else is written.
fn write_outputs(
    out: &Path,
    rel: &Path,
    format: Format,
    samples: &[Array3<f32>],
) -> Result<(), String> {
    if samples.len() == 1 {
        let bytes = images::encode(samples[0].view(), format)?;
        return images::write_atomic(&output_path(out, rel, format, ""), &bytes);
    }
    let k = samples.len() as f32;
    let mut mean = Array3::<f32>::zeros(samples[0].dim());
    for (i, smp) in samples.iter().enumerate() {
        let bytes = images::encode(smp.view(), format)?;
        images::write_atomic(
            &output_path(out, rel, format, &format!(".sample{i}")),
            &bytes,
        )?;
        mean += smp;
    }
    mean /= k;
    let mut var = Array3::<f32>::zeros(mean.dim());
    for smp in samples {
        var = var + (smp - &mean).mapv(|d| d * d);
    }
    // std on [0, 1] is half the std on [-1, 1]; map 0..0.25 to -1..1 for the picture.
    let std_img = (var / k).mapv(|v| (v.sqrt() * 0.5 / 0.25).min(1.0) * 2.0 - 1.0);
    let bytes = images::encode(std_img.view(), format)?;
    images::write_atomic(&output_path(out, rel, format, ".std"), &bytes)?;
    let bytes = images::encode(mean.view(), format)?;
    images::write_atomic(&output_path(out, rel, format, ""), &bytes)
}
