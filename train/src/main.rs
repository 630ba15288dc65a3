//! `davi-train`: training, sampling, evaluation and export of DAVI models on libtorch.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use davi_models::{UNetConfig, UNetModel};
use davi_train::{backend, checkpoint, device, TchBackend};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "davi-train",
    version,
    about = "Train, sample, evaluate and export DAVI models (libtorch)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a guided-diffusion UNet on `x` and `timesteps` (f32) from a safetensors file.
    Forward {
        /// UNet config (YAML or JSON, guided-diffusion's keys).
        #[arg(long)]
        config: PathBuf,
        /// Weights (safetensors, guided-diffusion's names).
        #[arg(long)]
        weights: PathBuf,
        /// Inputs: `x` [N, C, S, S] and `timesteps` [N] (f32).
        #[arg(long)]
        inputs: PathBuf,
        /// Output safetensors file holding `output`.
        #[arg(short, long)]
        output: PathBuf,
        /// auto, cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Train (or resume) a diffusion prior: eps-prediction DDPM.
    Prior {
        /// Model config (models/configs/<name>.yaml).
        #[arg(long)]
        config: PathBuf,
        /// auto, cpu, cuda or cuda:N.
        #[arg(long, default_value = "auto")]
        device: String,
        /// Resume this run folder (its checkpoint, optimizer, EMA and step).
        #[arg(long)]
        resume: Option<PathBuf>,
        /// Run folder for a new run (default runs/<name>; resumed if it holds a run).
        #[arg(long)]
        run: Option<PathBuf>,
        /// Override the config's number of steps.
        #[arg(long)]
        steps: Option<usize>,
    },
    /// Train (or resume) I_phi by amortized variational inference against a prior.
    Davi {
        /// Model config (models/configs/<name>.yaml).
        #[arg(long)]
        config: PathBuf,
        /// auto, cpu, cuda or cuda:N.
        #[arg(long, default_value = "auto")]
        device: String,
        /// Resume this run folder.
        #[arg(long)]
        resume: Option<PathBuf>,
        /// Run folder for a new run (default runs/<name>; resumed if it holds a run).
        #[arg(long)]
        run: Option<PathBuf>,
        /// Override the config's number of steps.
        #[arg(long)]
        steps: Option<usize>,
        /// Override the teacher (prior) weights.
        #[arg(long)]
        teacher: Option<PathBuf>,
    },
    /// Export I_phi to ONNX with parity fixtures, and check them on ONNX Runtime's CPU EP.
    Export {
        /// DAVI checkpoint (its EMA weights are exported).
        #[arg(long)]
        checkpoint: PathBuf,
        /// Model config.
        #[arg(long)]
        config: PathBuf,
        /// Output ONNX file (model.parity.safetensors is written beside it).
        #[arg(short, long)]
        output: PathBuf,
        /// ONNX opset (>= 17).
        #[arg(long, default_value_t = 17)]
        opset: i64,
        /// A fixed batch size instead of a dynamic one.
        #[arg(long)]
        static_batch: Option<usize>,
        /// Half-precision weights and compute (for the CUDA EP; TensorRT builds fp16 itself).
        #[arg(long)]
        fp16: bool,
        /// Store the weights in fp16, compute in f32 (half the file; parity and evaluation use
        /// the same rounded weights). The zoo ships its models this way.
        #[arg(long)]
        half_weights: bool,
        /// Write the weights as ONNX external data (automatic above 2 GB).
        #[arg(long)]
        external_data: bool,
        /// Number of parity pairs.
        #[arg(short, default_value_t = 8)]
        k: usize,
        /// ONNX Runtime's library for the parity check.
        #[arg(long)]
        ort_lib: Option<PathBuf>,
    },
    /// Evaluate DAVI against DPS and the lifted measurement on held-out images.
    Eval {
        /// DAVI checkpoint (its EMA weights).
        #[arg(long)]
        checkpoint: PathBuf,
        /// Model config (its teacher is DPS's prior).
        #[arg(long)]
        config: PathBuf,
        /// Test images for DAVI and the lifted measurement.
        #[arg(short, default_value_t = 1000)]
        n: usize,
        /// DPS steps.
        #[arg(long, default_value_t = 1000)]
        dps_steps: usize,
        /// Test images for DPS (the first of the n; DPS costs dps-steps evaluations each).
        #[arg(long, default_value_t = 16)]
        dps_n: usize,
        /// DPS step size (zeta).
        #[arg(long, default_value_t = 1.0)]
        dps_zeta: f64,
        /// Output folder for eval.json, eval.md and sheet.png.
        #[arg(short, long)]
        output: PathBuf,
        /// Write the eval table into this model card.
        #[arg(long)]
        card: Option<PathBuf>,
        /// DPS's prior (default: the config's train.davi.teacher).
        #[arg(long)]
        teacher: Option<PathBuf>,
        /// DAVI posterior samples per measurement for the spread report (below 2: skip).
        #[arg(long, default_value_t = 8)]
        samples: usize,
        /// Batch size.
        #[arg(long, default_value_t = 64)]
        batch: usize,
        /// auto, cpu, cuda or cuda:N.
        #[arg(long, default_value = "auto")]
        device: String,
    },
    /// Throughput of tch's eager forward of I_phi (the restore graph) at several batch sizes.
    Bench {
        /// DAVI checkpoint (its EMA weights).
        #[arg(long)]
        checkpoint: PathBuf,
        /// Model config.
        #[arg(long)]
        config: PathBuf,
        /// Batch sizes, comma-separated.
        #[arg(long, default_value = "1,8,32")]
        batch: String,
        /// Seconds per batch size.
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        /// auto, cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Also print the model's GFLOP per image and the machine's convolution peak (GFLOP/s
        /// of large 3x3 convs on the same threads).
        #[arg(long)]
        peak: bool,
    },
    /// Steps/s of prior training (forward, backward, clipping, AdamW) of a config's UNet, to
    /// set against PyTorch eager (`scripts/bench/torch_train_step.py`).
    BenchTrain {
        /// Model config.
        #[arg(long)]
        config: PathBuf,
        /// Images per step.
        #[arg(long, default_value_t = 64)]
        batch: usize,
        /// Seconds to time.
        #[arg(long, default_value_t = 20.0)]
        seconds: f64,
        /// Write the initial weights and one forward here (safetensors) for the other side's
        /// check that it builds the same network.
        #[arg(long)]
        fixture: Option<PathBuf>,
        /// auto, cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Parameters of a UNet config (guided-diffusion keys, or a model config), and the time of
    /// one forward pass at batch 1 on this machine (random weights).
    Describe {
        /// UNet config (JSON/YAML with the reference's keys) or a model config with `unet:`.
        #[arg(long)]
        config: PathBuf,
        /// Also time a forward pass (median of 3 after a warm-up).
        #[arg(long)]
        time: bool,
        /// auto, cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Convert a PyTorch checkpoint (`torch.save` zip) to safetensors without running pickle code
    /// (a safetensors input is rewritten, e.g. with `--half`).
    Import {
        /// The `.pt` (or `.safetensors`) file.
        input: PathBuf,
        /// Output safetensors file.
        #[arg(short, long)]
        output: PathBuf,
        /// Check the names and shapes against a UNet config.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Store f32 tensors as fp16 (how the zoo ships its priors; loaders compute in f32).
        #[arg(long)]
        half: bool,
    },
    /// Write images of a config's data set as PNG files (e.g. held-out test images).
    Images {
        /// Model config (its data section).
        #[arg(long)]
        config: PathBuf,
        /// train or test.
        #[arg(long, default_value = "test")]
        split: String,
        /// Number of images (the first n of the split).
        #[arg(short, default_value_t = 32)]
        n: usize,
        /// Output folder.
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Sample from a prior: ancestral DDPM or DDIM.
    Sample {
        /// Prior weights (safetensors; a run checkpoint's EMA is used).
        #[arg(long)]
        checkpoint: PathBuf,
        /// Model config.
        #[arg(long)]
        config: PathBuf,
        /// Ancestral DDPM over this many steps (the schedule's own T).
        #[arg(long, conflicts_with = "ddim")]
        steps: Option<usize>,
        /// DDIM (eta 0) over this many steps.
        #[arg(long)]
        ddim: Option<usize>,
        /// Number of samples.
        #[arg(short, default_value_t = 64)]
        n: usize,
        /// Output grid PNG.
        #[arg(short, long)]
        output: PathBuf,
        /// Seed.
        #[arg(long, default_value_t = 0)]
        seed: i64,
        /// auto, cpu, cuda or cuda:N.
        #[arg(long, default_value = "auto")]
        device: String,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("davi-train: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Forward {
            config,
            weights,
            inputs,
            output,
            device,
        } => {
            let dev = device::pick(&device)?;
            let cfg = UNetConfig::from_file(&config)?;
            let unet = UNetModel::new(&cfg)?;
            let params = checkpoint::load_params(&weights, unet.param_shapes(), None, dev)?;
            let io = checkpoint::load_tensors(&inputs, dev)?;
            let x = io
                .get("x")
                .with_context(|| format!("{}: no tensor 'x'", inputs.display()))?;
            let t = io
                .get("timesteps")
                .with_context(|| format!("{}: no tensor 'timesteps'", inputs.display()))?;
            let ts: Vec<f32> = backend::array_from_tensor(t).iter().copied().collect();
            let b = TchBackend::new(params, dev);
            let out = tch::no_grad(|| unet.forward(&b, x, &ts, None))?;
            checkpoint::save_tensors(&output, &[("output".to_string(), out)])?;
            eprintln!("wrote {}", output.display());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Prior {
            config,
            device,
            resume,
            run,
            steps,
        } => {
            let dev = device::pick(&device)?;
            let dir = davi_train::prior::train(&davi_train::prior::PriorArgs {
                config,
                device: dev,
                run: resume.or(run),
                steps,
            })?;
            eprintln!("run folder: {}", dir.display());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Davi {
            config,
            device,
            resume,
            run,
            steps,
            teacher,
        } => {
            let dev = device::pick(&device)?;
            let args = davi_train::davi::DaviArgs {
                config,
                device: dev,
                run: resume.or(run),
                steps,
                teacher,
            };
            let dir = davi_train::davi::train(&args)?;
            eprintln!("run folder: {}", dir.display());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Export {
            checkpoint: ckpt,
            config,
            output,
            opset,
            static_batch,
            fp16,
            half_weights,
            external_data,
            k,
            ort_lib,
        } => {
            let args = davi_train::export::ExportArgs {
                checkpoint: ckpt,
                config,
                output: output.clone(),
                options: davi_export::ExportOptions {
                    opset,
                    static_batch,
                    fp16,
                    half_weights,
                },
                external_data,
                k,
                seed: 0,
            };
            let parity = davi_train::export::export(&args)?;
            let opts = davi_runtime::SessionOptions {
                ort_lib,
                ..Default::default()
            };
            let mut m = davi_runtime::Model::load(&output, &opts)?;
            let p = davi_runtime::verify::verify(&mut m, &parity, fp16)?;
            println!(
                "parity on the CPU EP: {} (max |diff| {:.3e}, PSNR {:.1} dB; {})",
                if p.pass { "PASS" } else { "FAIL" },
                p.max_abs,
                p.psnr_db,
                p.criterion
            );
            Ok(if p.pass {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Cmd::Eval {
            checkpoint: ckpt,
            config,
            n,
            dps_steps,
            dps_n,
            dps_zeta,
            output,
            card,
            teacher,
            samples,
            batch,
            device,
        } => {
            let dev = device::pick(&device)?;
            let args = davi_train::eval::EvalArgs {
                checkpoint: ckpt,
                config,
                n,
                dps_steps,
                dps_n,
                dps_zeta,
                out: output.clone(),
                card,
                teacher,
                device: dev,
                batch,
                samples,
            };
            let r = davi_train::eval::eval(&args)?;
            print!("{}", davi_train::eval::markdown(&r));
            eprintln!("wrote {}/eval.json, eval.md, sheet.png", output.display());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Bench {
            checkpoint: ckpt,
            config,
            batch,
            seconds,
            device,
            peak,
        } => {
            let dev = device::pick(&device)?;
            let cfg = davi_models::DaviConfig::from_file(&config)?;
            let implicit = davi_models::Implicit::new(&cfg)?;
            if peak {
                let (conv, mm) = davi_models::flops::unet_flops(&implicit.unet)?;
                println!(
                    "model: {:.4} GFLOP per image in convolutions, {:.4} in matrix products",
                    conv / 1e9,
                    mm / 1e9
                );
                for (what, g) in davi_train::bench::peak_conv(dev, seconds.min(3.0))? {
                    println!("peak: {what}: {g:.1} GFLOP/s");
                }
            }
            let params =
                checkpoint::load_params(&ckpt, implicit.unet.param_shapes(), Some("ema."), dev)?;
            let b = TchBackend::new(params, dev);
            let [cy, hy, wy] = implicit
                .operator
                .measurement_shape(implicit.channels, implicit.size);
            println!("| what | batch | images/s | p50 ms |\n|---|---:|---:|---:|");
            for bs in batch.split(',') {
                let n: i64 = bs
                    .trim()
                    .parse()
                    .with_context(|| format!("--batch {batch}"))?;
                let y = tch::Tensor::rand(
                    [n, cy as i64, hy as i64, wy as i64],
                    (tch::Kind::Float, dev),
                ) * 2.0
                    - 1.0;
                let z = tch::Tensor::zeros(
                    [
                        n,
                        implicit.channels as i64,
                        implicit.size as i64,
                        implicit.size as i64,
                    ],
                    (tch::Kind::Float, dev),
                );
                let _g = tch::no_grad_guard();
                let _ = implicit.restore(&b, &y, &z)?;
                let mut lat = Vec::new();
                let start = std::time::Instant::now();
                while start.elapsed().as_secs_f64() < seconds || lat.len() < 5 {
                    let t = std::time::Instant::now();
                    let out = implicit.restore(&b, &y, &z)?;
                    let _ = out.double_value(&[0, 0, 0, 0]); // synchronise
                    lat.push(t.elapsed().as_secs_f64());
                }
                let total: f64 = lat.iter().sum();
                lat.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
                println!(
                    "| tch eager | {n} | {:.1} | {:.2} |",
                    lat.len() as f64 * n as f64 / total,
                    lat[lat.len() / 2] * 1e3
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::BenchTrain {
            config,
            batch,
            seconds,
            fixture,
            device,
        } => {
            let dev = device::pick(&device)?;
            let cfg = davi_models::DaviConfig::from_file(&config)?;
            let sps =
                davi_train::bench::train_steps(&cfg, batch, seconds, dev, fixture.as_deref())?;
            println!(
                "davi-train (tch) prior training step, batch {batch}: {sps:.3} steps/s ({:.2} s/step)",
                1.0 / sps
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Describe {
            config,
            time,
            device,
        } => {
            let ucfg = match davi_models::DaviConfig::from_file(&config) {
                Ok(c) => c.unet,
                Err(_) => UNetConfig::from_file(&config)?,
            };
            let unet = UNetModel::new(&ucfg)?;
            let (conv, mm) = davi_models::flops::unet_flops(&unet)?;
            println!(
                "{}: {} parameters ({:.2} M), {:.2} GFLOP per image ({:.2} in convolutions)",
                config.display(),
                unet.num_params(),
                unet.num_params() as f64 / 1e6,
                (conv + mm) / 1e9,
                conv / 1e9
            );
            if time {
                let dev = device::pick(&device)?;
                let params = davi_train::params::ParamSet::init(&unet, 0, dev);
                let b = TchBackend::new(params.frozen(), dev);
                let s = ucfg.image_size as i64;
                let x =
                    tch::Tensor::randn([1, ucfg.in_channels as i64, s, s], (tch::Kind::Float, dev));
                let _g = tch::no_grad_guard();
                let mut lat = Vec::new();
                for i in 0..4 {
                    let t = std::time::Instant::now();
                    let out = unet.forward(&b, &x, &[500.0], None)?;
                    let _ = out.double_value(&[0, 0, 0, 0]);
                    if i > 0 {
                        lat.push(t.elapsed().as_secs_f64());
                    }
                }
                lat.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
                println!(
                    "forward, batch 1, {:?}, {} threads: {:.3} s (median of 3)",
                    dev,
                    tch::get_num_threads(),
                    lat[1]
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Import {
            input,
            output,
            config,
            half,
        } => {
            let mut tensors = if input
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"))
            {
                davi_train::pt::read_safetensors(&input)?
            } else {
                davi_train::pt::read_pt(&input)?
            };
            if half {
                davi_train::pt::to_half(&mut tensors);
            }
            if let Some(c) = config {
                let unet = UNetModel::new(&UNetConfig::from_file(&c)?)?;
                let found: Vec<(String, Vec<usize>)> = tensors
                    .iter()
                    .map(|(k, t)| (k.clone(), t.shape.clone()))
                    .collect();
                davi_models::check_params(unet.param_shapes(), &found).map_err(|d| {
                    anyhow::anyhow!("{}: does not match {}: {d}", input.display(), c.display())
                })?;
            }
            davi_train::pt::write_safetensors(&tensors, &output)?;
            eprintln!("wrote {} tensors to {}", tensors.len(), output.display());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Images {
            config,
            split,
            n,
            output,
        } => {
            let cfg = davi_models::DaviConfig::from_file(&config)?;
            let split = match split.as_str() {
                "train" => davi_train::data::Split::Train,
                "test" => davi_train::data::Split::Test,
                s => anyhow::bail!("--split {s}: use train or test"),
            };
            let data_cfg = cfg
                .data
                .clone()
                .with_context(|| format!("{}: no data section", config.display()))?;
            let (c, s) = (cfg.unet.in_channels, cfg.unet.image_size);
            let ds = davi_train::data::Dataset::open(&data_cfg, split, c, s, true)?;
            std::fs::create_dir_all(&output)
                .with_context(|| format!("{}: cannot create", output.display()))?;
            for i in 0..n.min(ds.len) {
                let v = ds.get(i)?;
                let img = davi_train::plot::grid(&v, 1, c, s, 1);
                let img = image::imageops::crop_imm(&img, 2, 2, s as u32, s as u32).to_image();
                let path = output.join(format!("{i:05}.png"));
                if c == 1 {
                    image::DynamicImage::ImageRgb8(img).to_luma8().save(&path)?;
                } else {
                    img.save(&path)?;
                }
            }
            eprintln!("wrote {} images to {}", n.min(ds.len), output.display());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Sample {
            checkpoint: ckpt,
            config,
            steps,
            ddim,
            n,
            output,
            seed,
            device,
        } => {
            let dev = device::pick(&device)?;
            let cfg = davi_models::DaviConfig::from_file(&config)?;
            let unet = UNetModel::new(&cfg.unet)?;
            let d =
                davi_models::schedule::Diffusion::new(cfg.diffusion.schedule, cfg.diffusion.steps);
            if let Some(s) = steps {
                if s != d.steps() {
                    anyhow::bail!("--steps {s}: ancestral sampling runs the schedule's own {} steps; use --ddim for fewer", d.steps());
                }
            }
            let params = checkpoint::load_params(&ckpt, unet.param_shapes(), Some("ema."), dev)?;
            let b = TchBackend::new(params, dev);
            let t = std::time::Instant::now();
            let x = davi_train::diffusion::sample(&unet, &b, &d, n, ddim, 64, seed)?;
            let a = backend::array_from_tensor(&x);
            let (c, s) = (cfg.unet.in_channels, cfg.unet.image_size);
            let cols = (n as f64).sqrt().ceil() as usize;
            let img = davi_train::plot::grid(a.as_slice().expect("contiguous"), n, c, s, cols);
            img.save(&output)
                .with_context(|| format!("{}: cannot write", output.display()))?;
            eprintln!(
                "wrote {} ({n} samples in {:.1}s)",
                output.display(),
                t.elapsed().as_secs_f64()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}
