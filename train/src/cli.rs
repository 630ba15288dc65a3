//! The `davi-train` subcommands: each one's arguments as a `clap::Args` struct and the function
//! that runs it (the binary only parses and dispatches).

use crate::data::Split;
use crate::{backend, checkpoint, device, TchBackend};
use anyhow::{bail, Context, Result};
use davi_models::{DaviConfig, Implicit, UNetConfig, UNetModel};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tch::Device;

/// `--device`: auto, cpu, cuda or cuda:N (auto: CUDA when it is there).
pub fn parse_device(s: &str) -> Result<Device, String> {
    device::pick(s).map_err(|e| format!("{e:#}"))
}

/// Run a guided-diffusion UNet on `x` and `timesteps` (f32) from a safetensors file.
#[derive(clap::Args, Debug)]
pub struct ForwardArgs {
    /// UNet config (YAML or JSON, guided-diffusion's keys).
    #[arg(long)]
    pub config: PathBuf,
    /// Weights (safetensors, guided-diffusion's names).
    #[arg(long)]
    pub weights: PathBuf,
    /// Inputs: `x` [N, C, S, S] and `timesteps` [N] (f32).
    #[arg(long)]
    pub inputs: PathBuf,
    /// Output safetensors file holding `output`.
    #[arg(short, long)]
    pub output: PathBuf,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    pub device: Device,
}

/// A training run: which config, where, how long.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Model config (models/configs/<name>.yaml).
    #[arg(long)]
    pub config: PathBuf,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto", value_parser = parse_device)]
    pub device: Device,
    /// Run folder (default runs/<name>): a new run, or the one it holds resumed (its checkpoint,
    /// optimiser, EMA and step).
    #[arg(long, visible_alias = "resume")]
    pub run: Option<PathBuf>,
    /// Override the config's number of steps.
    #[arg(long)]
    pub steps: Option<usize>,
}

/// Train (or resume) I_phi by amortized variational inference against a prior.
#[derive(clap::Args, Debug)]
pub struct DaviArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// Override the teacher (prior) weights.
    #[arg(long)]
    pub teacher: Option<PathBuf>,
    /// Train the supervised control of this config instead: the same network, initialisation,
    /// pairs, steps and seed, trained with plain MSE to the truth alone (named `<name>-supervised`,
    /// run folder runs/<name>-supervised by default).
    #[arg(long)]
    pub supervised: bool,
}

/// Export I_phi to ONNX with parity fixtures, and check them on ONNX Runtime's CPU EP.
#[derive(clap::Args, Debug)]
pub struct ExportArgs {
    /// DAVI checkpoint (its EMA weights), plain weights, or an exported `model.onnx`.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Model config.
    #[arg(long)]
    pub config: PathBuf,
    /// Output ONNX file (model.parity.safetensors is written beside it).
    #[arg(short, long)]
    pub output: PathBuf,
    /// ONNX opset (>= 17).
    #[arg(long, default_value_t = 17)]
    pub opset: i64,
    /// A fixed batch size instead of a dynamic one.
    #[arg(long)]
    pub static_batch: Option<usize>,
    /// Half-precision weights and compute (for the CUDA EP; TensorRT builds fp16 itself).
    #[arg(long)]
    pub fp16: bool,
    /// Store the weights in fp16, compute in f32 (half the file; parity and evaluation use
    /// the same rounded weights). The zoo ships its models this way.
    #[arg(long)]
    pub half_weights: bool,
    /// Write the weights as ONNX external data (automatic above 2 GB).
    #[arg(long)]
    pub external_data: bool,
    /// Number of parity pairs.
    #[arg(short, default_value_t = 8)]
    pub k: usize,
    /// ONNX Runtime's library for the parity check.
    #[arg(long)]
    pub ort_lib: Option<PathBuf>,
}

/// Evaluate DAVI against DPS and the lifted measurement on held-out images.
#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// DAVI checkpoint (its EMA weights), or an exported `model.onnx`.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Model config (its teacher is DPS's prior).
    #[arg(long)]
    pub config: PathBuf,
    /// Test images for DAVI and the lifted measurement.
    #[arg(short, default_value_t = 1000)]
    pub n: usize,
    /// DPS steps.
    #[arg(long, default_value_t = 1000)]
    pub dps_steps: usize,
    /// Test images for DPS (the first of the n; DPS costs dps-steps evaluations each).
    #[arg(long, default_value_t = 16)]
    pub dps_n: usize,
    /// DPS step size (zeta); default: the card's tuned one (`davi-train tune-dps`), else 1.
    #[arg(long)]
    pub dps_zeta: Option<f64>,
    /// Output folder for eval.json, eval.md and sheet.png.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Write the eval table into this model card.
    #[arg(long)]
    pub card: Option<PathBuf>,
    /// DPS's prior (default: the config's train.davi.teacher).
    #[arg(long)]
    pub teacher: Option<PathBuf>,
    /// DAVI posterior samples per measurement for the spread report (below 2: skip).
    #[arg(long, default_value_t = 8)]
    pub samples: usize,
    /// Batch size.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// The Fashion-MNIST classifier (`davi-train classifier`): FID and KID on its features.
    #[arg(long)]
    pub features: Option<PathBuf>,
    /// DDRM steps with the teacher on all n images (0: skip); eta 0.85, eta_b 1 as the
    /// official code.
    #[arg(long, default_value_t = 20)]
    pub ddrm_steps: usize,
    /// The supervised control's checkpoint (same config, plain MSE; `train.davi.supervised`),
    /// scored on the same measurements.
    #[arg(long)]
    pub supervised: Option<PathBuf>,
    /// The run folder the model trained in: its steps and training time go into the card
    /// (default: the checkpoint's folder, when it is a run).
    #[arg(long)]
    pub trained_in: Option<PathBuf>,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto", value_parser = parse_device)]
    pub device: Device,
}

/// Throughput of tch's eager forward of I_phi (the restore graph) at several batch sizes.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// DAVI checkpoint (its EMA weights), or an exported `model.onnx`.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Model config.
    #[arg(long)]
    pub config: PathBuf,
    /// Batch sizes.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    pub batch: Vec<usize>,
    /// Seconds per batch size.
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    pub device: Device,
    /// Also print the model's GFLOP per image and the machine's convolution peak (GFLOP/s
    /// of large 3x3 convs on the same threads).
    #[arg(long)]
    pub peak: bool,
}

/// Steps/s of prior training (forward, backward, clipping, AdamW) of a config's UNet, to
/// set against PyTorch eager (`scripts/bench/torch_train_step.py`).
#[derive(clap::Args, Debug)]
pub struct BenchTrainArgs {
    /// Model config.
    #[arg(long)]
    pub config: PathBuf,
    /// Images per step.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Seconds to time.
    #[arg(long, default_value_t = 20.0)]
    pub seconds: f64,
    /// Write the initial weights and one forward here (safetensors) for the other side's
    /// check that it builds the same network.
    #[arg(long)]
    pub fixture: Option<PathBuf>,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    pub device: Device,
}

/// Parameters and GFLOP of a UNet config, and optionally the time of one forward pass.
#[derive(clap::Args, Debug)]
pub struct DescribeArgs {
    /// UNet config (JSON/YAML with the reference's keys) or a model config with `unet:`.
    #[arg(long)]
    pub config: PathBuf,
    /// Also time a forward pass at batch 1 (median of 3 after a warm-up; random weights).
    #[arg(long)]
    pub time: bool,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    pub device: Device,
}

/// Convert a PyTorch checkpoint (`torch.save` zip) to safetensors without running pickle code.
#[derive(clap::Args, Debug)]
pub struct ImportArgs {
    /// The `.pt` (or `.safetensors`) file.
    pub input: PathBuf,
    /// Output safetensors file.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Check the names and shapes against a UNet config.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Store f32 tensors as fp16 (how the zoo ships its priors; loaders compute in f32).
    #[arg(long)]
    pub half: bool,
}

/// Write images of a config's data set as PNG files (e.g. held-out test images).
#[derive(clap::Args, Debug)]
pub struct ImagesArgs {
    /// Model config (its data section).
    #[arg(long)]
    pub config: PathBuf,
    /// Which split.
    #[arg(long, value_enum, default_value = "test")]
    pub split: Split,
    /// Number of images (the first n of the split).
    #[arg(short, default_value_t = 32)]
    pub n: usize,
    /// Output folder.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Whole photographs instead of crops (photo data sets): each photo of the split at least
    /// the model's size, downscaled as training sees it, as `<stem>.png` (the first n).
    #[arg(long)]
    pub whole: bool,
}

/// Random weights of a UNet config, as a `torch.save` checkpoint (`.pt`) or safetensors.
#[derive(clap::Args, Debug)]
pub struct InitArgs {
    /// UNet config (guided-diffusion keys) or a model config with `unet:`.
    #[arg(long)]
    pub config: PathBuf,
    /// Output `.pt` (written as `torch.save` does) or `.safetensors`.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    pub seed: i64,
}

/// Train the Fashion-MNIST classifier whose features give FID and KID.
#[derive(clap::Args, Debug)]
pub struct ClassifierArgs {
    /// Output weights (safetensors); a `card.yaml` with the test accuracy is written beside.
    #[arg(
        short,
        long,
        default_value = "models/zoo/fmnist-classifier/weights.safetensors"
    )]
    pub output: PathBuf,
    /// Fashion-MNIST's folder.
    #[arg(long, default_value = "/usr/share/datasets/fashion-mnist")]
    pub data: PathBuf,
    /// Epochs.
    #[arg(long, default_value_t = 2)]
    pub epochs: usize,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto", value_parser = parse_device)]
    pub device: Device,
}

/// Sample from a prior: ancestral DDPM or DDIM.
#[derive(clap::Args, Debug)]
pub struct SampleArgs {
    /// Prior weights (safetensors; a run checkpoint's EMA is used).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Model config.
    #[arg(long)]
    pub config: PathBuf,
    /// Ancestral DDPM over this many steps (the schedule's own T).
    #[arg(long, conflicts_with = "ddim")]
    pub steps: Option<usize>,
    /// DDIM (eta 0) over this many steps.
    #[arg(long)]
    pub ddim: Option<usize>,
    /// Number of samples.
    #[arg(short, default_value_t = 64)]
    pub n: usize,
    /// Output grid PNG.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    pub seed: i64,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto", value_parser = parse_device)]
    pub device: Device,
}

/// Refuses, before any work, an output that would replace what the command reads: `out` naming
/// one of `files` (directly, or through a link), or, for a folder output, `out` and one of
/// `dirs` (the data set's folders) lying one in the other.
fn refuse_replacing(flag: &str, out: &Path, files: &[&Path], dirs: &[PathBuf]) -> Result<()> {
    use davi_runtime::paths::{dir_within, Entries};
    let resolved = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
    let mut inputs = Entries::default();
    for f in files {
        inputs.insert(&resolved(f));
    }
    if inputs.contains(&resolved(out)) {
        bail!(
            "refused: {flag} {} is a file this command reads; nothing was written",
            out.display()
        );
    }
    for d in dirs.iter().filter(|d| d.is_dir()) {
        if dir_within(out, d) || dir_within(d, out) {
            bail!(
                "refused: {flag} {} overlaps the data set's folder {}; nothing was written",
                out.display(),
                d.display()
            );
        }
    }
    Ok(())
}

/// The folders a config's data set is read from.
fn data_dirs(cfg: &DaviConfig) -> Vec<PathBuf> {
    use davi_models::card::DataConfig;
    match &cfg.data {
        Some(DataConfig::FashionMnist { dir, .. }) | Some(DataConfig::Folder { dir, .. }) => {
            vec![PathBuf::from(dir)]
        }
        Some(DataConfig::Photos {
            dir, extra_dirs, ..
        }) => std::iter::once(dir)
            .chain(extra_dirs)
            .map(PathBuf::from)
            .collect(),
        None => Vec::new(),
    }
}

/// `davi-train forward`.
pub fn forward(a: ForwardArgs) -> Result<ExitCode> {
    refuse_replacing("-o", &a.output, &[&a.config, &a.weights, &a.inputs], &[])?;
    let unet = UNetModel::new(&UNetConfig::from_file(&a.config)?)?;
    let params = checkpoint::load_params(&a.weights, unet.param_shapes(), None, a.device)?;
    let io = checkpoint::load_tensors(&a.inputs, a.device)?;
    let get = |k: &str| {
        io.get(k)
            .with_context(|| format!("{}: no tensor '{k}'", a.inputs.display()))
    };
    let ts: Vec<f32> = backend::array_from_tensor(get("timesteps")?)
        .iter()
        .copied()
        .collect();
    let b = TchBackend::new(params, a.device);
    let out = tch::no_grad(|| {
        unet.forward(&b, get("x")?, &ts, None)
            .map_err(anyhow::Error::from)
    })?;
    checkpoint::save_tensors(&a.output, &[("output".to_string(), out)])?;
    eprintln!("wrote {}", a.output.display());
    Ok(ExitCode::SUCCESS)
}

/// `davi-train prior`.
pub fn prior(a: RunArgs) -> Result<ExitCode> {
    let dir = crate::prior::train(&crate::prior::PriorArgs {
        config: a.config,
        device: a.device,
        run: a.run,
        steps: a.steps,
    })?;
    eprintln!("run folder: {}", dir.display());
    Ok(ExitCode::SUCCESS)
}

/// `davi-train davi`.
pub fn davi(a: DaviArgs) -> Result<ExitCode> {
    let dir = crate::davi::train(&crate::davi::DaviArgs {
        config: a.run.config,
        device: a.run.device,
        run: a.run.run,
        steps: a.run.steps,
        teacher: a.teacher,
        supervised: a.supervised,
    })?;
    eprintln!("run folder: {}", dir.display());
    Ok(ExitCode::SUCCESS)
}

/// `davi-train export`: the model, its parity fixtures, and their check on ONNX Runtime.
pub fn export(a: ExportArgs) -> Result<ExitCode> {
    let inputs = [a.checkpoint.as_path(), a.config.as_path()];
    // A model re-exported in place (`--checkpoint X/model.onnx -o X/model.onnx`) is safe: its
    // weights are read first and the new one is moved over it only when parity passes. Any
    // other checkpoint (a run's weights) or the config is never replaced.
    let in_place = a
        .checkpoint
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("onnx"));
    refuse_replacing("-o", &a.output, &inputs[usize::from(in_place)..], &[])?;
    let parity_out = crate::export::parity_path(&a.output);
    refuse_replacing("-o (its parity file)", &parity_out, &inputs, &[])?;
    if a.k == 0 || a.static_batch == Some(0) {
        bail!("-k and --static-batch: at least 1");
    }
    // Weights from a run folder are exported with that run's config only (another config would
    // relabel them: an SR model shipped as deblur, a prior as a task model).
    let cfg = DaviConfig::from_file(&a.config)?;
    let run_dir = a.checkpoint.parent().unwrap_or(Path::new("."));
    if let Some(st) = crate::eval::run_state(run_dir) {
        if !crate::eval::same_config(run_dir, &st, &cfg) {
            bail!(
                "{}: trained with another config (hash {}; {} hashes to {}); export with the run's config.yaml",
                a.checkpoint.display(),
                st.config_hash,
                a.config.display(),
                cfg.hash()
            );
        }
    }
    // Written and verified in a staging folder beside the output, and moved into place only
    // when parity passes: a failed export leaves the existing model as it was.
    let name = a
        .output
        .file_name()
        .with_context(|| format!("-o {}: not a file path", a.output.display()))?;
    let parent = match a.output.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent)
        .with_context(|| format!("{}: cannot create", parent.display()))?;
    let stage = tempfile::Builder::new()
        .prefix(".davi-export-")
        .tempdir_in(&parent)
        .with_context(|| format!("{}: cannot write in it", parent.display()))?;
    let staged = stage.path().join(name);
    let args = crate::export::ExportArgs {
        checkpoint: a.checkpoint,
        config: a.config,
        output: staged.clone(),
        options: davi_export::ExportOptions {
            opset: a.opset,
            static_batch: a.static_batch,
            fp16: a.fp16,
            half_weights: a.half_weights,
        },
        external_data: a.external_data,
        k: a.k,
        seed: 0,
    };
    let parity = crate::export::export(&args)?;
    let opts = davi_runtime::SessionOptions {
        ort_lib: a.ort_lib,
        ..Default::default()
    };
    let mut m = davi_runtime::Model::load(&staged, &opts)?;
    let p = davi_runtime::verify::verify(&mut m, &parity, a.fp16)?;
    drop(m);
    println!(
        "parity on the CPU EP: {} (max |diff| {:.3e}, PSNR {:.1} dB; {})",
        if p.pass { "PASS" } else { "FAIL" },
        p.max_abs,
        p.psnr_db,
        p.criterion
    );
    if !p.pass {
        eprintln!(
            "davi-train: parity failed: {} not written (an existing one is unchanged)",
            a.output.display()
        );
        return Ok(ExitCode::from(1));
    }
    // The model (and its external data) and the parity file, each renamed into place.
    let mut staged_files: Vec<PathBuf> = std::fs::read_dir(stage.path())?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    // The model last: it names its external data, which must be in place before it.
    staged_files.sort_by_key(|f| f.file_name() == Some(name));
    for f in staged_files {
        let to = parent.join(f.file_name().expect("a staged file"));
        std::fs::rename(&f, &to).with_context(|| format!("{}: cannot write", to.display()))?;
    }
    println!(
        "wrote {} and {}",
        a.output.display(),
        crate::export::parity_path(&a.output).display()
    );
    Ok(ExitCode::SUCCESS)
}

/// `davi-train eval`.
pub fn eval(a: EvalArgs) -> Result<ExitCode> {
    // Every argument checked before minutes of sampling.
    if a.n == 0 || a.batch == 0 {
        bail!("-n and --batch: at least 1");
    }
    if a.dps_n > 0 && a.dps_steps == 0 {
        bail!("--dps-steps: at least 1 when DPS runs (--dps-n > 0)");
    }
    if let Some(z) = a.dps_zeta {
        if !(z.is_finite() && z > 0.0) {
            bail!("--dps-zeta {z}: a finite step size above 0");
        }
    }
    let cfg = DaviConfig::from_file(&a.config)?;
    let mut inputs = vec![a.checkpoint.as_path(), a.config.as_path()];
    inputs.extend(a.card.as_deref());
    inputs.extend(a.teacher.as_deref());
    inputs.extend(a.features.as_deref());
    inputs.extend(a.supervised.as_deref());
    refuse_replacing("-o", &a.output, &inputs, &data_dirs(&cfg))?;
    let teacher = crate::tune::teacher_path(&cfg, a.teacher.as_deref())?;
    let dps_zeta = match a.dps_zeta {
        Some(z) => z,
        // No DPS (or no prior to run it with): no zeta to look up.
        None if a.dps_n == 0 || teacher.as_os_str().is_empty() => 1.0,
        None => tuned_zeta(a.card.as_deref(), &crate::tune::file_sha256(&teacher)?)?.unwrap_or(1.0),
    };
    let args = crate::eval::EvalArgs {
        checkpoint: a.checkpoint,
        config: a.config,
        n: a.n,
        dps_steps: a.dps_steps,
        dps_n: a.dps_n,
        dps_zeta,
        out: a.output.clone(),
        card: a.card,
        teacher: a.teacher,
        device: a.device,
        batch: a.batch,
        samples: a.samples,
        features: a.features,
        ddrm_steps: a.ddrm_steps,
        supervised: a.supervised,
        trained_in: a.trained_in,
    };
    let r = crate::eval::eval(&args)?;
    print!("{}", crate::eval::markdown(&r));
    eprintln!("wrote {}/eval.json, eval.md, sheet.png", a.output.display());
    Ok(ExitCode::SUCCESS)
}

/// The zeta a card's `dps_tuning` chose, if it has one, for the prior of SHA-256 `teacher`.
fn tuned_zeta(card: Option<&std::path::Path>, teacher: &str) -> Result<Option<f64>> {
    let Some(p) = card.filter(|p| p.is_file()) else {
        return Ok(None);
    };
    let c: davi_models::card::ModelCard = serde_yaml::from_str(&std::fs::read_to_string(p)?)
        .with_context(|| format!("{}: bad card", p.display()))?;
    match c.dps_tuning {
        Some(t) if !t.complete => anyhow::bail!(
            "{}: its DPS sweep stopped after {} zetas; rerun `davi-train tune-dps --card` (it resumes) or give --dps-zeta",
            p.display(),
            t.sweep.len()
        ),
        Some(t) if t.teacher_sha256.as_deref().is_some_and(|s| s != teacher) => anyhow::bail!(
            "{}: its DPS sweep ran with another prior (SHA-256 {}); rerun `davi-train tune-dps --card` or give --dps-zeta",
            p.display(),
            t.teacher_sha256.unwrap_or_default()
        ),
        t => Ok(t.map(|t| t.zeta)),
    }
}

/// Sweep DPS's step size on validation images (never the test split).
#[derive(clap::Args, Debug)]
pub struct TuneDpsArgs {
    /// Model config (its operator, sigma_y, data and teacher).
    #[arg(long)]
    pub config: PathBuf,
    /// DPS's prior (default: the config's train.davi.teacher).
    #[arg(long)]
    pub teacher: Option<PathBuf>,
    /// The zetas to try.
    #[arg(long, value_delimiter = ',', default_value = "0.03,0.1,0.3,1,3")]
    pub zeta: Vec<f64>,
    /// Do not refine around the best of the grid.
    #[arg(long)]
    pub no_refine: bool,
    /// Validation images.
    #[arg(short, default_value_t = 16)]
    pub n: usize,
    /// DPS steps.
    #[arg(long, default_value_t = 1000)]
    pub dps_steps: usize,
    /// Write the sweep and the chosen zeta into this model card.
    #[arg(long)]
    pub card: Option<PathBuf>,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto", value_parser = parse_device)]
    pub device: Device,
}

/// `davi-train tune-dps`.
pub fn tune_dps(a: TuneDpsArgs) -> Result<ExitCode> {
    let t = crate::tune::tune(&crate::tune::TuneArgs {
        config: a.config,
        teacher: a.teacher,
        zetas: a.zeta,
        refine: !a.no_refine,
        n: a.n,
        steps: a.dps_steps,
        device: a.device,
        card: a.card,
    })?;
    println!("| zeta | PSNR (dB) | SSIM |\n|---:|---:|---:|");
    for (z, p, q) in &t.sweep {
        println!("| {z} | {p:.2} | {q:.4} |");
    }
    println!(
        "chosen zeta: {} ({}; {} DPS steps)",
        t.zeta, t.split, t.steps
    );
    Ok(ExitCode::SUCCESS)
}

/// `davi-train bench`.
pub fn bench(a: BenchArgs) -> Result<ExitCode> {
    let cfg = DaviConfig::from_file(&a.config)?;
    let implicit = Implicit::new(&cfg)?;
    if a.peak {
        let (conv, mm) = davi_models::flops::unet_flops(&implicit.unet)?;
        println!(
            "model: {:.4} GFLOP per image in convolutions, {:.4} in matrix products",
            conv / 1e9,
            mm / 1e9
        );
        for (what, g) in crate::bench::peak_conv(a.device, a.seconds.min(3.0))? {
            println!("peak: {what}: {g:.1} GFLOP/s");
        }
    }
    let b = checkpoint::load_backend(&a.checkpoint, &implicit.unet, a.device)?;
    println!("| what | batch | images/s | p50 ms |\n|---|---:|---:|---:|");
    for &n in &a.batch {
        let (ips, p50) = crate::bench::eager_restore(&implicit, &b, n, a.seconds)?;
        println!("| tch eager | {n} | {ips:.1} | {p50:.2} |");
    }
    Ok(ExitCode::SUCCESS)
}

/// `davi-train bench-train`.
pub fn bench_train(a: BenchTrainArgs) -> Result<ExitCode> {
    let cfg = DaviConfig::from_file(&a.config)?;
    let sps = crate::bench::train_steps(&cfg, a.batch, a.seconds, a.device, a.fixture.as_deref())?;
    println!(
        "davi-train (tch) prior training step, batch {}: {sps:.3} steps/s ({:.2} s/step)",
        a.batch,
        1.0 / sps
    );
    Ok(ExitCode::SUCCESS)
}

/// The UNet of a model config (`unet:`), or a bare UNet config with the reference's keys.
fn unet_config(path: &std::path::Path) -> Result<UNetConfig> {
    match DaviConfig::from_file(path) {
        Ok(c) => Ok(c.unet),
        Err(_) => Ok(UNetConfig::from_file(path)?),
    }
}

/// `davi-train describe`.
pub fn describe(a: DescribeArgs) -> Result<ExitCode> {
    let ucfg = unet_config(&a.config)?;
    let unet = UNetModel::new(&ucfg)?;
    let (conv, mm) = davi_models::flops::unet_flops(&unet)?;
    println!(
        "{}: {} parameters ({:.2} M), {:.2} GFLOP per image ({:.2} in convolutions)",
        a.config.display(),
        unet.num_params(),
        unet.num_params() as f64 / 1e6,
        (conv + mm) / 1e9,
        conv / 1e9
    );
    if a.time {
        let s = crate::bench::forward_seconds(&unet, a.device)?;
        println!(
            "forward, batch 1, {:?}, {} threads: {s:.3} s (median of 3)",
            a.device,
            tch::get_num_threads()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `davi-train import`.
pub fn import(a: ImportArgs) -> Result<ExitCode> {
    let mut inputs = vec![a.input.as_path()];
    inputs.extend(a.config.as_deref());
    refuse_replacing("-o", &a.output, &inputs, &[])?;
    let n = crate::pt::import(&a.input, &a.output, a.config.as_deref(), a.half)?;
    eprintln!("wrote {n} tensors to {}", a.output.display());
    Ok(ExitCode::SUCCESS)
}

/// `davi-train images`.
pub fn images(a: ImagesArgs) -> Result<ExitCode> {
    let cfg = DaviConfig::from_file(&a.config)?;
    refuse_replacing("-o", &a.output, &[&a.config], &data_dirs(&cfg))?;
    if a.whole {
        let Some(davi_models::card::DataConfig::Photos {
            dir,
            extra_dirs,
            test_photos,
            exclude,
            downscale,
        }) = &cfg.data
        else {
            anyhow::bail!("--whole: {} has no photo data set", a.config.display());
        };
        let c = cfg.unet.in_channels;
        let photos = crate::data::split_photos(
            dir,
            extra_dirs,
            test_photos,
            exclude,
            *downscale as usize,
            a.split,
            c,
        )?;
        let mut n = 0;
        // Photos smaller than the model are left out, as the crops' data set leaves them; for
        // super-resolution each is cropped to a multiple of the scale (the operator needs it).
        let s = cfg.unet.image_size as u32;
        let k = match cfg.task().map(|t| &t.operator) {
            Ok(davi_models::Operator::SuperRes { scale }) => *scale as u32,
            _ => 1,
        };
        let big = photos
            .into_iter()
            .filter(|(_, img)| img.width() >= s && img.height() >= s)
            .map(|(name, img)| {
                let (w, h) = (img.width() / k * k, img.height() / k * k);
                (name, img.crop_imm(0, 0, w, h))
            });
        std::fs::create_dir_all(&a.output)
            .with_context(|| format!("{}: cannot create the folder", a.output.display()))?;
        for (name, img) in big.take(a.n) {
            let img = if c == 1 {
                image::DynamicImage::ImageLuma8(img.to_luma8())
            } else {
                image::DynamicImage::ImageRgb8(img.to_rgb8())
            };
            let mut buf = Vec::new();
            img.write_to(&mut std::io::Cursor::new(&mut buf), image::ImageFormat::Png)?;
            let path = a.output.join(format!("{name}.png"));
            crate::run::write_atomic(&path, &buf)
                .with_context(|| format!("{}: cannot write", path.display()))?;
            n += 1;
        }
        eprintln!("wrote {n} whole photographs to {}", a.output.display());
        return Ok(ExitCode::SUCCESS);
    }
    let ds = crate::data::open_config(&cfg, &a.config, a.split, true)?;
    let n = crate::data::write_images(&ds, a.n, &a.output)?;
    eprintln!("wrote {n} images to {}", a.output.display());
    Ok(ExitCode::SUCCESS)
}

/// `davi-train init`: guided-diffusion's initialisation, with the tensors it zeroes (output
/// convolutions) filled with small random values instead, so that every parameter matters.
pub fn init(a: InitArgs) -> Result<ExitCode> {
    use rand::{Rng, SeedableRng};
    refuse_replacing("-o", &a.output, &[&a.config], &[])?;
    let ucfg = unet_config(&a.config)?;
    let unet = UNetModel::new(&ucfg)?;
    let params = crate::params::ParamSet::init(&unet, a.seed, Device::Cpu);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(a.seed as u64);
    let mut tensors = std::collections::BTreeMap::new();
    for (name, shape) in unet.param_shapes() {
        let mut v: Vec<f32> = backend::array_from_tensor(&params.tensors[name])
            .iter()
            .copied()
            .collect();
        if v.iter().all(|&x| x == 0.0) {
            v.iter_mut()
                .for_each(|x| *x = (rng.random::<f32>() - 0.5) * 0.02);
        }
        let data = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        let raw = crate::pt::RawTensor {
            dtype: safetensors::Dtype::F32,
            shape: shape.clone(),
            data,
        };
        tensors.insert(name.clone(), raw);
    }
    if a.output.extension().is_some_and(|e| e == "pt") {
        crate::pt::write_pt(&tensors, &a.output)?;
    } else {
        crate::pt::write_safetensors(&tensors, &a.output)?;
    }
    eprintln!(
        "wrote {} tensors ({} parameters) to {}",
        tensors.len(),
        unet.num_params(),
        a.output.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// `davi-train classifier`.
pub fn classifier(a: ClassifierArgs) -> Result<ExitCode> {
    let train = crate::data::fashion_mnist(&a.data, Split::Train)?;
    let test = crate::data::fashion_mnist(&a.data, Split::Test)?;
    let mut c = crate::features::Classifier::new(a.device);
    let t = std::time::Instant::now();
    let acc = c.train((&train.0, &train.1), (&test.0, &test.1), a.epochs, 0)?;
    c.save(&a.output)?;
    let card = format!(
        "# The Fashion-MNIST classifier whose 128 penultimate features give FID and KID\n\
         # (davi-train classifier; train/src/features.rs).\n\
         name: fmnist-classifier\ndata: Fashion-MNIST (60,000 training images, padded to 32x32)\n\
         epochs: {}\ntest_accuracy: {acc:.4}\ntraining_seconds: {:.1}\n",
        a.epochs,
        t.elapsed().as_secs_f64()
    );
    crate::run::write_atomic(&a.output.with_file_name("card.yaml"), card.as_bytes())?;
    println!(
        "classifier: test accuracy {:.2}% on the 10,000 test images; wrote {}",
        acc * 100.0,
        a.output.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// `davi-train sample`.
pub fn sample(a: SampleArgs) -> Result<ExitCode> {
    refuse_replacing("-o", &a.output, &[&a.config, &a.checkpoint], &[])?;
    if a.n == 0 {
        bail!("-n: at least 1 sample");
    }
    let cfg = DaviConfig::from_file(&a.config)?;
    let unet = UNetModel::new(&cfg.unet)?;
    let d = davi_models::schedule::Diffusion::new(cfg.diffusion.schedule, cfg.diffusion.steps);
    if let Some(s) = a.steps {
        if s != d.steps() {
            anyhow::bail!(
                "--steps {s}: ancestral sampling runs the schedule's own {} steps; use --ddim for fewer",
                d.steps()
            );
        }
    }
    if let Some(k) = a.ddim {
        if k == 0 || k > d.steps() {
            bail!(
                "--ddim {k}: between 1 and the schedule's {} steps",
                d.steps()
            );
        }
    }
    let params =
        checkpoint::load_params(&a.checkpoint, unet.param_shapes(), Some("ema."), a.device)?;
    let b = TchBackend::new(params, a.device);
    let t = std::time::Instant::now();
    let x = crate::diffusion::sample(&unet, &b, &d, a.n, a.ddim, 64, a.seed)?;
    let arr = backend::array_from_tensor(&x);
    let (c, s) = (cfg.unet.in_channels, cfg.unet.image_size);
    let cols = (a.n as f64).sqrt().ceil() as usize;
    let img = crate::plot::grid(arr.as_slice().expect("contiguous"), a.n, c, s, cols);
    let mut buf = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut buf), image::ImageFormat::Png)?;
    crate::run::write_atomic(&a.output, &buf)?;
    eprintln!(
        "wrote {} ({} samples in {:.1}s)",
        a.output.display(),
        a.n,
        t.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eval_takes_only_a_complete_dps_sweep() {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let tmp = tempfile::tempdir().unwrap();
        let card = tmp.path().join("card.yaml");
        let mut c: davi_models::card::ModelCard = serde_yaml::from_str(
            &std::fs::read_to_string(root.join("models/zoo/fmnist32-sr4/card.yaml")).unwrap(),
        )
        .unwrap();
        let mut t = davi_models::card::DpsTuning {
            split: "validation".into(),
            n: 2,
            steps: 4,
            sweep: vec![(0.3, 20.0, 0.5)],
            zeta: 0.3,
            complete: false,
            teacher_sha256: Some("aa".into()),
        };
        c.dps_tuning = Some(t.clone());
        std::fs::write(&card, serde_yaml::to_string(&c).unwrap()).unwrap();
        let e = tuned_zeta(Some(&card), "aa").unwrap_err().to_string();
        assert!(e.contains("stopped after 1"), "{e}");
        t.complete = true;
        c.dps_tuning = Some(t.clone());
        std::fs::write(&card, serde_yaml::to_string(&c).unwrap()).unwrap();
        assert_eq!(tuned_zeta(Some(&card), "aa").unwrap(), Some(0.3));
        // A sweep of another prior (one since retrained) is not used.
        let e = tuned_zeta(Some(&card), "bb").unwrap_err().to_string();
        assert!(e.contains("another prior"), "{e}");
        // A card of before the prior was recorded: taken as it is.
        t.teacher_sha256 = None;
        c.dps_tuning = Some(t);
        std::fs::write(&card, serde_yaml::to_string(&c).unwrap()).unwrap();
        assert_eq!(tuned_zeta(Some(&card), "bb").unwrap(), Some(0.3));
    }
}
