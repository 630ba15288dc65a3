//! The `davi` subcommands: each one's arguments as a `clap::Args` struct and the function that
//! runs it (the binary only parses and dispatches). Exit codes: 0 all done, 1 some inputs failed
//! (or a check failed), 2 could not run (an `Err`).

use crate::images::{self, Format};
use crate::model::SessionOptions;
use crate::pipeline::{self, Report, RestoreOptions};
use crate::{degrade, metrics, verify, Ep, Model, RuntimeError};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Execution-provider settings shared by the commands that run a model.
#[derive(clap::Args, Clone, Debug)]
pub struct EpArgs {
    /// Execution provider; one that cannot be registered is an error, never a silent CPU run.
    #[arg(long, value_enum, default_value = "cpu")]
    pub ep: Ep,
    /// GPU index for cuda / tensorrt.
    #[arg(long, default_value_t = 0)]
    pub device: i32,
    /// Intra-op threads (0: every core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// TensorRT: build fp16 engines from the fp32 model.
    #[arg(long)]
    pub trt_fp16: bool,
    /// TensorRT: engine cache folder (engines are built once per shape and reused).
    #[arg(long)]
    pub trt_cache: Option<PathBuf>,
    /// TensorRT: workspace size in MiB.
    #[arg(long, default_value_t = 2048)]
    pub trt_workspace_mib: usize,
}

impl EpArgs {
    /// Session options for batches of up to `max_batch`.
    pub fn session(&self, ort_lib: Option<PathBuf>, max_batch: usize) -> SessionOptions {
        SessionOptions {
            ep: self.ep,
            device: self.device,
            threads: self.threads,
            trt_fp16: self.trt_fp16,
            trt_cache: self.trt_cache.clone(),
            trt_workspace: self.trt_workspace_mib << 20,
            max_batch,
            ort_lib,
        }
    }
}

/// `--shard i/n`: the inputs whose relative path hashes to `i` mod `n`
/// ([`crate::pipeline::shard_of`]).
pub fn parse_shard(s: &str) -> Result<(usize, usize), String> {
    let bad = || format!("expected i/n with 0 <= i < n, got '{s}'");
    let (i, n) = s.split_once('/').ok_or_else(bad)?;
    // Plain decimal numbers only: `00/2` or `+1/2` would name shard 0 or 1 under another spelling.
    let number = |t: &str| -> Result<usize, String> {
        let plain = !t.is_empty()
            && t.bytes().all(|b| b.is_ascii_digit())
            && (t == "0" || !t.starts_with('0'));
        if plain {
            t.parse().map_err(|_| bad())
        } else {
            Err(bad())
        }
    };
    let (i, n) = (number(i)?, number(n)?);
    if n == 0 || i >= n {
        return Err(bad());
    }
    Ok((i, n))
}

/// Restore a file or a folder of measurements.
#[derive(clap::Args, Debug)]
pub struct RestoreArgs {
    /// The model (`model.onnx` written by davi-train export).
    #[arg(short, long)]
    pub model: PathBuf,
    /// Input image or folder (recursive).
    #[arg(short, long)]
    pub input: PathBuf,
    /// Output folder; input paths are mirrored under it.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Output format.
    #[arg(short, long, value_enum, default_value = "png")]
    pub format: Format,
    /// Rows (images, or samples of one) per session run (default: 16 on CPU, 64 on GPU).
    #[arg(long)]
    pub batch: Option<usize>,
    /// Seed of the bridge noise (with the relative path).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Skip inputs whose outputs all exist (with --samples, every sample, .std and the mean):
    /// resume an interrupted run.
    #[arg(long)]
    pub skip_existing: bool,
    /// Process only shard i of n (`i/n`, by a hash of each input's relative path), for job
    /// arrays across machines.
    #[arg(long, value_parser = parse_shard)]
    pub shard: Option<(usize, usize)>,
    /// Posterior samples per image; more than one also writes their mean and std map.
    #[arg(long, default_value_t = 1)]
    pub samples: usize,
    /// Follow symlinks that leave the input folder.
    #[arg(long)]
    pub follow_symlinks: bool,
    /// Write a JSON report (counts, failures with reasons, timings).
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Refuse images above this many pixels from their header, without decoding them, and
    /// images whose output (x4 the side for super-resolution) would be larger.
    #[arg(long, default_value_t = images::DEFAULT_MAX_PIXELS)]
    pub max_pixels: u64,
    /// Images larger than the model are restored in tiles overlapping by this fraction of a
    /// tile, blended with a raised-cosine window.
    #[arg(long, default_value_t = pipeline::DEFAULT_OVERLAP)]
    pub overlap: f64,
    #[command(flatten)]
    pub ep: EpArgs,
}

/// The tasks `davi degrade` makes measurements of.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum Task {
    /// Identity plus noise.
    Denoise,
    /// Gaussian blur.
    Deblur,
    /// Average pooling by 4.
    Sr,
    /// A centred box removed.
    Inpaint,
    /// The channel mean.
    Colorize,
}

impl Task {
    fn name(self) -> &'static str {
        match self {
            Task::Denoise => "denoise",
            Task::Deblur => "deblur",
            Task::Sr => "sr",
            Task::Inpaint => "inpaint",
            Task::Colorize => "colorize",
        }
    }
}

/// Make measurements y = H x + n from clean images.
#[derive(clap::Args, Debug)]
pub struct DegradeArgs {
    /// The task (its operator's parameters scaled to the image size).
    #[arg(
        long,
        value_enum,
        conflicts_with = "model",
        required_unless_present = "model"
    )]
    pub task: Option<Task>,
    /// Take the operator, sigma_y and channels from a model's metadata.
    #[arg(short, long)]
    pub model: Option<PathBuf>,
    /// Clean image or folder.
    #[arg(short, long)]
    pub input: PathBuf,
    /// Output folder.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Measurement noise on [-1, 1] (default: the task's or the model's).
    #[arg(long)]
    pub sigma_y: Option<f64>,
    /// Seed of the measurement noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also write the lifted measurements here (image size and channels): bicubic upsampling
    /// for SR, grey in R, G and B for colorization, the measurement itself otherwise; the
    /// baseline for `davi eval`.
    #[arg(long)]
    pub lift: Option<PathBuf>,
}

/// PSNR / SSIM of restored images against references.
#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// Restored folder.
    #[arg(long)]
    pub restored: PathBuf,
    /// Reference folder (same relative paths).
    #[arg(long)]
    pub reference: PathBuf,
    /// Write per-image scores and means as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write per-image scores as CSV.
    #[arg(long)]
    pub csv: Option<PathBuf>,
    /// Write the Markdown table to a file too.
    #[arg(long)]
    pub markdown: Option<PathBuf>,
    /// Write a contact sheet (measurement | restored | reference; PNG, or JPEG/WebP by extension).
    #[arg(long)]
    pub sheet: Option<PathBuf>,
    /// The measurements, for the sheet's first column.
    #[arg(long)]
    pub measurement: Option<PathBuf>,
    /// Rows of the sheet.
    #[arg(long, default_value_t = 8)]
    pub sheet_rows: usize,
    /// Write the means into this model card's `whole_photos` table, as the row `--method`.
    #[arg(long)]
    pub card: Option<PathBuf>,
    /// The row's name (e.g. `davi`, `lifted`).
    #[arg(long)]
    pub method: Option<String>,
}

/// Check the ONNX output against what tch computed (`model.parity.safetensors`).
#[derive(clap::Args, Debug)]
pub struct VerifyArgs {
    /// The model.
    #[arg(short, long)]
    pub model: PathBuf,
    /// Parity file (default: beside the model).
    #[arg(long)]
    pub parity: Option<PathBuf>,
    #[command(flatten)]
    pub ep: EpArgs,
}

/// Throughput and latency of the bare session; end-to-end restore over a folder.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// The model.
    #[arg(short, long)]
    pub model: PathBuf,
    /// Batch sizes of the bare session.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    pub batch: Vec<usize>,
    /// Seconds per batch size.
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// A folder of measurements to restore end to end (into a temporary folder).
    #[arg(short, long)]
    pub input: Option<PathBuf>,
    /// Batch of the end-to-end restore.
    #[arg(long, default_value_t = 32)]
    pub restore_batch: usize,
    /// Tile overlap of the end-to-end restore (images larger than the model).
    #[arg(long, default_value_t = pipeline::DEFAULT_OVERLAP)]
    pub overlap: f64,
    /// Write the figures as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    #[command(flatten)]
    pub ep: EpArgs,
}

/// Show a model's metadata, inputs, outputs and op counts.
#[derive(clap::Args, Debug)]
pub struct InfoArgs {
    /// The model.
    #[arg(short, long)]
    pub model: PathBuf,
}

/// Print the evaluation tables of model cards as Markdown (the README's table).
#[derive(clap::Args, Debug)]
pub struct CardsArgs {
    /// Cards (`card.yaml`) or folders searched for the task models' `*/card.yaml` (default:
    /// models/zoo).
    pub paths: Vec<PathBuf>,
}

fn too_large(what: &str, n: usize, most: usize) -> Result<(), RuntimeError> {
    if n > most {
        return Err(RuntimeError::Usage(format!("{what} {n}: at most {most}")));
    }
    Ok(())
}

/// Writes a run's JSON report and prints its summary (each failure was printed as it happened);
/// 1 when anything failed, 130 when a signal stopped it, and the report's error when it could
/// not be written (after the summary: a full disk loses no count).
fn finish(report: &Report, path: Option<&Path>, verb: &str) -> Result<ExitCode, RuntimeError> {
    // The report first: the terminal or pipe the summary goes to may be gone (a closed SSH
    // session, `| tee` stopped by the same Ctrl-C), and the report must not depend on it.
    let written = match path {
        Some(p) => serde_json::to_vec_pretty(report)
            .map_err(RuntimeError::from)
            .and_then(|b| images::write_named(p, &b).map_err(RuntimeError::from)),
        None => Ok(()),
    };
    let mut err = std::io::stderr().lock();
    let _ = writeln!(
        err,
        "davi: {verb} {} of {} ({} skipped, {} failed, {} other files ignored) in {:.2}s, {:.1} images/s",
        report.restored,
        report.found,
        report.skipped,
        report.failed.len(),
        report.ignored,
        report.seconds,
        report.images_per_second
    );
    if report.interrupted {
        let _ = writeln!(
            err,
            "davi: interrupted: {} input(s) not started; the images in flight were written. Rerun with --skip-existing to finish",
            report.not_done
        );
    }
    if let Some(o) = &report.output_inside_input {
        let _ = writeln!(
            err,
            "davi: note: the output folder {o} lies inside the input folder: nothing in it was read as an input"
        );
    }
    drop(err);
    written?;
    Ok(if report.interrupted {
        ExitCode::from(130)
    } else if report.failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// `davi restore`.
pub fn restore(a: RestoreArgs, ort_lib: Option<PathBuf>) -> Result<ExitCode, RuntimeError> {
    let batch = a.batch.unwrap_or(if a.ep.ep == Ep::Cpu { 16 } else { 64 });
    too_large("--batch", batch, pipeline::MAX_BATCH)?;
    too_large("--samples", a.samples, pipeline::MAX_SAMPLES)?;
    let mut m = Model::load(&a.model, &a.ep.session(ort_lib, batch))?;
    let opts = RestoreOptions {
        input: a.input,
        output: a.output,
        format: a.format,
        batch,
        seed: a.seed,
        skip_existing: a.skip_existing,
        shard: a.shard,
        samples: a.samples,
        follow_symlinks: a.follow_symlinks,
        progress: std::io::stderr().is_terminal(),
        print_failures: true,
        max_pixels: a.max_pixels,
        overlap: a.overlap,
        stop: Some(pipeline::stop_on_signals().map_err(|e| {
            RuntimeError::Usage(format!("cannot install the signal handlers: {e}"))
        })?),
    };
    let r = pipeline::restore(&mut m, &opts, a.report.as_deref())?;
    finish(&r, a.report.as_deref(), "restored")
}

/// `davi degrade`.
pub fn degrade(a: DegradeArgs, ort_lib: Option<PathBuf>) -> Result<ExitCode, RuntimeError> {
    let sess = SessionOptions {
        ort_lib,
        ..Default::default()
    };
    let (operator, channels, sigma_y) = match &a.model {
        Some(p) => {
            let m = Model::load(p, &sess)?;
            (
                Some(m.info.operator.clone()),
                Some(m.info.channels),
                a.sigma_y.or(Some(m.info.sigma_y)),
            )
        }
        None => (None, None, a.sigma_y),
    };
    let opts = degrade::DegradeOptions {
        input: a.input,
        output: a.output,
        operator,
        task: a.task.map(|t| t.name().to_string()),
        channels,
        sigma_y,
        seed: a.seed,
        lift: a.lift,
    };
    let r = degrade::degrade(&opts, &sess)?;
    finish(&r, None, "degraded")
}

/// The card `--card` names, checked before anything is scored or written: it exists, is a model
/// card, and is written through a symlink to its target.
fn card_target(card: &Path, method: &str) -> Result<PathBuf, RuntimeError> {
    let ok = !method.is_empty()
        && method
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if !ok {
        return Err(RuntimeError::Usage(format!(
            "--method {method:?}: a row name of letters, digits, '_', '-' or '.'"
        )));
    }
    let target = card
        .canonicalize()
        .map_err(|err| RuntimeError::io(card, err))?;
    read_card(&target)?;
    Ok(target)
}

fn read_card(card: &Path) -> Result<davi_models::card::ModelCard, RuntimeError> {
    let text = crate::paths::read_text(card, crate::paths::MAX_CARD_BYTES)?;
    serde_yaml::from_str(&text).map_err(|err| {
        RuntimeError::Usage(format!(
            "{}: not a model card: {err}",
            crate::paths::escape(card)
        ))
    })
}

/// Writes `e` as the row `method` of the card's `whole_photos`, under an exclusive lock of the
/// card's folder (concurrent writers each keep their row). Rows scoring other photographs are
/// dropped, and named. Only `whole_photos` is rewritten: keys davi does not know stay (comments
/// do not: the card is written back from its parsed YAML).
fn write_card_row(card: &Path, method: &str, e: &metrics::Evaluation) -> Result<(), RuntimeError> {
    use davi_models::card::PhotoRow;
    let dir = card.parent().unwrap_or(Path::new("."));
    let lock = std::fs::File::open(dir).map_err(|err| RuntimeError::io(dir, err))?;
    lock.lock().map_err(|err| RuntimeError::io(dir, err))?;
    let mut c = read_card(card)?;
    let w = c.whole_photos.get_or_insert_with(Default::default);
    let names: Vec<String> = e.images.iter().map(|s| s.path.clone()).collect();
    if !w.methods.is_empty() && w.images != names {
        let dropped: Vec<&String> = w.methods.keys().filter(|k| *k != method).collect();
        if !dropped.is_empty() {
            eprintln!(
                "davi: {}: whole_photos scored other photographs; dropped its rows {dropped:?}",
                card.display()
            );
        }
        w.methods.clear();
    }
    w.images = names;
    w.methods.insert(
        method.to_string(),
        PhotoRow {
            n: e.images.len(),
            psnr: e.psnr,
            psnr_ci95: e.psnr_ci95,
            ssim: e.ssim,
            ssim_ci95: e.ssim_ci95,
        },
    );
    let text = crate::paths::read_text(card, crate::paths::MAX_CARD_BYTES)?;
    let mut doc: serde_yaml::Value = serde_yaml::from_str(&text)
        .map_err(|err| RuntimeError::file(card, format!("not YAML: {err}")))?;
    let rows = serde_yaml::to_value(w).map_err(|err| RuntimeError::Usage(err.to_string()))?;
    doc.as_mapping_mut()
        .ok_or_else(|| RuntimeError::file(card, "not a mapping"))?
        .insert("whole_photos".into(), rows);
    let yaml = serde_yaml::to_string(&doc).map_err(|err| RuntimeError::Usage(err.to_string()))?;
    images::write_named(card, yaml.as_bytes())?;
    drop(lock);
    eprintln!("davi: wrote whole_photos.{method} into {}", card.display());
    Ok(())
}

/// `davi eval`.
pub fn eval(a: EvalArgs) -> Result<ExitCode, RuntimeError> {
    for dir in [&a.restored, &a.reference] {
        if !dir.is_dir() {
            return Err(RuntimeError::Usage(format!(
                "{}: {}",
                crate::paths::escape(dir),
                if dir.exists() {
                    "not a folder (give the folder of the images)"
                } else {
                    "no such folder"
                }
            )));
        }
    }
    // What eval writes goes outside the folders it scores.
    let scored = [&a.restored, &a.reference];
    if a.card.is_some() != a.method.is_some() {
        return Err(RuntimeError::Usage(
            "--card and --method go together (which row of the card's whole_photos to write)"
                .into(),
        ));
    }
    let card = match (&a.card, &a.method) {
        (Some(c), Some(m)) => Some(card_target(c, m)?),
        _ => None,
    };
    let texts = [&a.json, &a.csv, &a.markdown, &card].into_iter().flatten();
    let outputs = texts.clone().chain(a.sheet.as_ref());
    for p in outputs.clone() {
        // Where the write lands: a link is written through to its target.
        let dir = match p.canonicalize() {
            Ok(target) => crate::paths::canonical_dir(target.parent().unwrap_or(Path::new("/"))),
            Err(_) => crate::paths::canonical_dir(p.parent().unwrap_or(Path::new("."))),
        };
        let text_as_image = texts.clone().any(|t| t == p) && images::is_image_path(p);
        let in_scored = scored.iter().any(|s| crate::paths::dir_within(&dir, s));
        if in_scored || text_as_image || p.is_dir() {
            return Err(RuntimeError::Usage(format!(
                "refused: {} lies in a scored folder, is a folder, or names an image; nothing was written",
                crate::paths::escape(p)
            )));
        }
    }
    // No two outputs are one file (`--csv card.yaml` would replace the card it then writes).
    let mut named = crate::paths::Entries::default();
    for p in outputs {
        let target = p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
        if named.contains(&target) {
            return Err(RuntimeError::Usage(format!(
                "refused: {} is named by two outputs (--json, --csv, --markdown, --card, --sheet); nothing was written",
                crate::paths::escape(p)
            )));
        }
        named.insert(&target);
    }
    // Everything the sheet needs, checked before any scoring or writing.
    if let Some(p) = &a.sheet {
        metrics::sheet_format(p)?;
        if a.sheet_rows == 0 {
            return Err(RuntimeError::Usage("--sheet-rows: at least 1".into()));
        }
        if let Some(m) = a.measurement.as_ref().filter(|m| !m.is_dir()) {
            return Err(RuntimeError::Usage(format!(
                "--measurement {}: no such folder",
                crate::paths::escape(m)
            )));
        }
    }
    let e = metrics::evaluate(&a.restored, &a.reference, None)?;
    for f in &e.failed {
        eprintln!(
            "davi: not scored: {}: {}",
            crate::paths::escape(Path::new(&f.path)),
            crate::paths::one_line(&f.reason)
        );
    }
    if e.images.is_empty() {
        return Err(RuntimeError::Usage(format!(
            "no pair to score: {} holds no image that {} has{}",
            a.restored.display(),
            a.reference.display(),
            if e.failed.is_empty() {
                String::new()
            } else {
                format!(" and can be scored ({} failed, above)", e.failed.len())
            }
        )));
    }
    print!("{}", e.markdown());
    if !e.missing.is_empty() {
        eprintln!(
            "davi: {} reference(s) have no restored image, e.g. {}",
            e.missing.len(),
            e.missing[0]
        );
    }
    if !e.unmatched.is_empty() {
        eprintln!(
            "davi: {} restored image(s) have no reference and were not scored, e.g. {}",
            e.unmatched.len(),
            crate::paths::escape(&a.restored.join(&e.unmatched[0]))
        );
    }
    if !e.failed.is_empty() {
        eprintln!(
            "davi: {} pair(s) could not be scored (above); the scores are of the other {}",
            e.failed.len(),
            e.images.len()
        );
    }
    let complete = e.missing.is_empty() && e.failed.is_empty();
    if let Some(p) = &a.json {
        images::write_named(p, &serde_json::to_vec_pretty(&e)?)?;
    }
    if let Some(p) = &a.csv {
        images::write_named(p, e.csv().as_bytes())?;
    }
    if let Some(p) = &a.markdown {
        images::write_named(p, e.markdown().as_bytes())?;
    }
    if let (Some(card), Some(method)) = (&card, &a.method) {
        if complete {
            write_card_row(card, method, &e)?;
        } else {
            eprintln!(
                "davi: {} not written: the card's rows score every photograph",
                card.display()
            );
        }
    }
    if let Some(p) = &a.sheet {
        metrics::sheet(
            &e,
            &a.restored,
            &a.reference,
            a.measurement.as_deref(),
            a.sheet_rows,
            p,
        )?;
        eprintln!("davi: wrote {}", p.display());
    }
    Ok(if complete {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// `davi verify`.
pub fn verify(a: VerifyArgs, ort_lib: Option<PathBuf>) -> Result<ExitCode, RuntimeError> {
    let parity = a
        .parity
        .unwrap_or_else(|| a.model.with_file_name("model.parity.safetensors"));
    let fp16 = a.ep.trt_fp16 || a.ep.ep == Ep::Tensorrt;
    let mut m = Model::load(&a.model, &a.ep.session(ort_lib, 8))?;
    let p = verify::verify(&mut m, &parity, fp16)?;
    println!("{}", serde_json::to_string_pretty(&p)?);
    println!(
        "{}: max |diff| {:.3e}, mean |diff| {:.3e}, PSNR {:.1} dB over {} pairs; {}",
        if p.pass { "PASS" } else { "FAIL" },
        p.max_abs,
        p.mean_abs,
        p.psnr_db,
        p.k,
        p.criterion
    );
    Ok(if p.pass {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// `davi bench`.
pub fn bench(a: BenchArgs, ort_lib: Option<PathBuf>) -> Result<ExitCode, RuntimeError> {
    if a.batch.contains(&0) || a.restore_batch == 0 {
        return Err(RuntimeError::Usage(
            "--batch, --restore-batch: sizes must be at least 1".into(),
        ));
    }
    // Every argument checked before the first timed run, not after minutes of them.
    if !(a.seconds > 0.0 && a.seconds <= 3600.0) {
        return Err(RuntimeError::Usage(format!(
            "--seconds {}: more than 0 and at most 3600 per batch size",
            a.seconds
        )));
    }
    if !(0.0..0.9).contains(&a.overlap) {
        return Err(RuntimeError::Usage(format!(
            "--overlap {}: a fraction of the tile, at least 0 and below 0.9",
            a.overlap
        )));
    }
    if let Some(dir) = &a.input {
        if !dir.exists() {
            return Err(RuntimeError::file(dir, "no such file or folder"));
        }
    }
    if let Some(p) = &a.json {
        // The figures never replace the model, an image or anything under the restored folder.
        let target = p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
        let mut taken = crate::paths::Entries::default();
        taken.insert(&a.model.canonicalize().unwrap_or_else(|_| a.model.clone()));
        let dir = target.parent().unwrap_or(Path::new("."));
        let in_input = a.input.as_ref().is_some_and(|i| {
            (i.is_dir() && crate::paths::dir_within(dir, i)) || taken_by(i, &target)
        });
        if in_input
            || taken.contains(&target)
            || images::is_image_path(p)
            || images::is_image_path(&target)
            || p.is_dir()
        {
            return Err(RuntimeError::Usage(format!(
                "refused: --json {} names the model, an image, a folder or a file under --input; give a .json path",
                crate::paths::escape(p)
            )));
        }
    }
    let max = a
        .batch
        .iter()
        .copied()
        .max()
        .unwrap_or(1)
        .max(a.restore_batch);
    too_large("--batch", max, pipeline::MAX_BATCH)?;
    let mut m = Model::load(&a.model, &a.ep.session(ort_lib, max))?;
    m.check_memory(max)?;
    let mut figures = serde_json::Map::new();
    let mut failed = 0;
    println!("| what | batch | images/s | p50 ms | p99 ms |\n|---|---:|---:|---:|---:|");
    let mut rows = Vec::new();
    for &b in &a.batch {
        let f = crate::bench::session(&mut m, b, a.seconds)?;
        println!(
            "| bare session | {} | {:.1} | {:.2} | {:.2} |",
            f.batch, f.images_per_second, f.p50_ms, f.p99_ms
        );
        rows.push(f);
    }
    figures.insert("session".into(), serde_json::to_value(&rows)?);
    if let Some(dir) = &a.input {
        let r = crate::bench::restore(&mut m, dir, a.restore_batch, a.overlap)?;
        for f in &r.failed {
            eprintln!(
                "davi: not restored: {}: {}",
                crate::paths::escape(Path::new(&f.path)),
                crate::paths::one_line(&f.reason)
            );
        }
        println!(
            "| restore end to end ({} images{}) | {} | {:.1} | | |",
            r.restored,
            if r.failed.is_empty() {
                String::new()
            } else {
                format!(", {} failed", r.failed.len())
            },
            a.restore_batch,
            r.images_per_second
        );
        failed = r.failed.len();
        // Against the bare session at the same batch: rows (tiles) per second.
        let bare = crate::bench::session(&mut m, a.restore_batch, a.seconds)?;
        let rows_per_s = r.rows as f64 / r.seconds.max(1e-9);
        println!(
            "| restore: {} session rows (tiles), {:.2} MP out | {} | {rows_per_s:.1} rows/s, {:.3} MP/s; bare session {:.1} rows/s ({:.1}% overhead) | | |",
            r.rows,
            r.megapixels,
            a.restore_batch,
            r.megapixels / r.seconds.max(1e-9),
            bare.images_per_second,
            100.0 * (1.0 - rows_per_s / bare.images_per_second)
        );
        figures.insert("restore".into(), serde_json::to_value(&r)?);
    }
    if let Some(p) = &a.json {
        images::write_named(p, &serde_json::to_vec_pretty(&figures)?)?;
    }
    if failed > 0 {
        eprintln!("davi: {failed} input(s) of the end-to-end restore failed (above): its figures leave them out");
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

/// Whether `input` (a file) is `target`.
fn taken_by(input: &Path, target: &Path) -> bool {
    input.is_file() && input.canonicalize().is_ok_and(|i| i == target)
}

/// `davi cards`: every card's evaluation, DPS tuning and whole-photograph scores as Markdown
/// tables, cards in name order. A card that does not parse is an error naming it.
pub fn cards(a: CardsArgs) -> Result<ExitCode, RuntimeError> {
    let roots = if a.paths.is_empty() {
        vec![PathBuf::from("models/zoo")]
    } else {
        a.paths
    };
    // Each card read once. A card that is not YAML is an error, not skipped; in a searched folder
    // only task models' cards count (the priors' and the classifier's have no `task`).
    let read = |p: &Path| -> Result<serde_yaml::Value, RuntimeError> {
        let text = crate::paths::read_text(p, crate::paths::MAX_CARD_BYTES)?;
        serde_yaml::from_str(&text).map_err(|e| RuntimeError::file(p, format!("not YAML: {e}")))
    };
    let mut found: Vec<(PathBuf, serde_yaml::Value)> = Vec::new();
    for r in roots {
        if r.is_dir() {
            let before = found.len();
            for e in std::fs::read_dir(&r).map_err(|e| RuntimeError::file(&r, e))? {
                let p = e
                    .map_err(|e| RuntimeError::file(&r, e))?
                    .path()
                    .join("card.yaml");
                if p.is_file() {
                    let v = read(&p)?;
                    if v.get("task").is_some() {
                        found.push((p, v));
                    }
                }
            }
            if found.len() == before {
                return Err(RuntimeError::file(
                    &r,
                    "no task model's <model>/card.yaml in this folder",
                ));
            }
        } else {
            let v = read(&r)?;
            found.push((r, v));
        }
    }
    // A card named twice (`davi cards a/card.yaml a/card.yaml`, or a folder and a card in it)
    // is one card: printed once.
    let mut seen = std::collections::HashSet::new();
    found.retain(|(p, _)| seen.insert(p.canonicalize().unwrap_or_else(|_| p.clone())));
    let mut cards = Vec::new();
    for (f, v) in found {
        let card: davi_models::card::ModelCard = serde_yaml::from_value(v)
            .map_err(|e| RuntimeError::file(&f, format!("not a model card: {e}")))?;
        if let Some(e) = &card.eval {
            e.check().map_err(|r| RuntimeError::file(&f, r))?;
        }
        cards.push(card);
    }
    cards.sort_by(|a, b| a.name.cmp(&b.name));
    print!("{}", davi_models::card::cards_markdown(&cards));
    Ok(ExitCode::SUCCESS)
}

/// `davi info`.
pub fn info(a: InfoArgs) -> Result<ExitCode, RuntimeError> {
    use std::io::Write;
    let proto = davi_export::read_model(&a.model)?;
    let mut text = format!("model: {}\n", a.model.display());
    for line in davi_export::describe(&proto) {
        text.push_str(&line);
        text.push('\n');
    }
    // A closed pipe (`davi info | head`) is no error.
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(RuntimeError::io(Path::new("stdout"), e))
        }
        _ => Ok(ExitCode::SUCCESS),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_shard;

    /// `--shard i/n` takes plain decimal numbers with 0 <= i < n, and nothing else.
    #[test]
    fn shards_are_plain_numbers_in_range() {
        assert_eq!(parse_shard("0/1"), Ok((0, 1)));
        assert_eq!(parse_shard("3/10"), Ok((3, 10)));
        for bad in [
            "00/2", "+1/2", "1/02", "2/2", "0/0", "1", "/2", "1/", "-1/2", " 1/2", "1/2/3",
        ] {
            let e = parse_shard(bad).unwrap_err();
            assert!(e.contains(bad), "{bad}: {e}");
        }
    }
}
