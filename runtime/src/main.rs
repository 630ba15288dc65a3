//! `davi`: restore image folders with DAVI models through ONNX Runtime. No libtorch.

use anyhow::Result;
use clap::{Parser, Subcommand};
use davi_runtime::images::Format;
use davi_runtime::model::SessionOptions;
use davi_runtime::pipeline::{Report, RestoreOptions};
use davi_runtime::{degrade, metrics, pipeline, verify, Ep, Model, RuntimeError};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "davi",
    version,
    about = "One-step diffusion-prior image restoration (DAVI) through ONNX Runtime"
)]
struct Cli {
    /// ONNX Runtime's shared library (else ORT_DYLIB_PATH, else .deps/onnxruntime above the executable).
    #[arg(long, global = true)]
    ort_lib: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Clone)]
struct EpArgs {
    /// Execution provider; one that cannot be registered is an error, never a silent CPU run.
    #[arg(long, value_enum, default_value = "cpu")]
    ep: Ep,
    /// GPU index for cuda / tensorrt.
    #[arg(long, default_value_t = 0)]
    device: i32,
    /// Intra-op threads (0: every core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// TensorRT: build fp16 engines from the fp32 model.
    #[arg(long)]
    trt_fp16: bool,
    /// TensorRT: engine cache folder (engines are built once per shape and reused).
    #[arg(long)]
    trt_cache: Option<PathBuf>,
    /// TensorRT: workspace size in MiB.
    #[arg(long, default_value_t = 2048)]
    trt_workspace_mib: usize,
}

#[derive(Subcommand)]
enum Cmd {
    /// Restore a file or a folder of measurements.
    Restore {
        /// The model (`model.onnx` written by davi-train export).
        #[arg(short, long)]
        model: PathBuf,
        /// Input image or folder (recursive).
        #[arg(short, long)]
        input: PathBuf,
        /// Output folder; input paths are mirrored under it.
        #[arg(short, long)]
        output: PathBuf,
        /// Output format.
        #[arg(short, long, value_enum, default_value = "png")]
        format: Format,
        /// Images per session run (default: 16 on CPU, 64 on GPU).
        #[arg(long)]
        batch: Option<usize>,
        /// Seed of the bridge noise (with the relative path).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Skip inputs whose output exists (resume an interrupted run).
        #[arg(long)]
        skip_existing: bool,
        /// Process only shard i of n (`i/n`), for job arrays across machines.
        #[arg(long)]
        shard: Option<String>,
        /// Posterior samples per image; more than one also writes their mean and std map.
        #[arg(long, default_value_t = 1)]
        samples: usize,
        /// Follow symlinks that leave the input folder.
        #[arg(long)]
        follow_symlinks: bool,
        /// Write a JSON report (counts, failures with reasons, timings).
        #[arg(long)]
        report: Option<PathBuf>,
        /// Refuse images above this many pixels from their header, without decoding them.
        #[arg(long, default_value_t = davi_runtime::images::DEFAULT_MAX_PIXELS)]
        max_pixels: u64,
        #[command(flatten)]
        ep: EpArgs,
    },
    /// Make measurements y = H x + n from clean images.
    Degrade {
        /// Task: denoise, deblur, sr, inpaint, colorize (parameters scaled to the image size).
        #[arg(long, conflicts_with = "model")]
        task: Option<String>,
        /// Take the operator, sigma_y and channels from a model's metadata.
        #[arg(short, long)]
        model: Option<PathBuf>,
        /// Clean image or folder.
        #[arg(short, long)]
        input: PathBuf,
        /// Output folder.
        #[arg(short, long)]
        output: PathBuf,
        /// Measurement noise on [-1, 1] (default: the task's or the model's).
        #[arg(long)]
        sigma_y: Option<f64>,
        /// Seed of the measurement noise.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// PSNR / SSIM of restored images against references.
    Eval {
        /// Restored folder.
        #[arg(long)]
        restored: PathBuf,
        /// Reference folder (same relative paths).
        #[arg(long)]
        reference: PathBuf,
        /// Write per-image scores and means as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Write per-image scores as CSV.
        #[arg(long)]
        csv: Option<PathBuf>,
        /// Write the Markdown table to a file too.
        #[arg(long)]
        markdown: Option<PathBuf>,
        /// Write a contact sheet PNG (measurement | restored | reference).
        #[arg(long)]
        sheet: Option<PathBuf>,
        /// The measurements, for the sheet's first column.
        #[arg(long)]
        measurement: Option<PathBuf>,
        /// Rows of the sheet.
        #[arg(long, default_value_t = 8)]
        sheet_rows: usize,
    },
    /// Check the ONNX output against what tch computed (`model.parity.safetensors`).
    Verify {
        /// The model.
        #[arg(short, long)]
        model: PathBuf,
        /// Parity file (default: beside the model).
        #[arg(long)]
        parity: Option<PathBuf>,
        #[command(flatten)]
        ep: EpArgs,
    },
    /// Throughput and latency of the bare session; end-to-end restore over a folder.
    Bench {
        /// The model.
        #[arg(short, long)]
        model: PathBuf,
        /// Batch sizes of the bare session, comma-separated.
        #[arg(long, default_value = "1,8,32")]
        batch: String,
        /// Seconds per batch size.
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        /// A folder of measurements to restore end to end (into a temporary folder).
        #[arg(short, long)]
        input: Option<PathBuf>,
        /// Batch of the end-to-end restore.
        #[arg(long, default_value_t = 32)]
        restore_batch: usize,
        /// Write the figures as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
        #[command(flatten)]
        ep: EpArgs,
    },
    /// Show a model's metadata, inputs, outputs and op counts.
    Info {
        /// The model.
        #[arg(short, long)]
        model: PathBuf,
    },
}

fn session_options(ep: &EpArgs, ort_lib: Option<PathBuf>, max_batch: usize) -> SessionOptions {
    SessionOptions {
        ep: ep.ep,
        device: ep.device,
        threads: ep.threads,
        trt_fp16: ep.trt_fp16,
        trt_cache: ep.trt_cache.clone(),
        trt_workspace: ep.trt_workspace_mib << 20,
        max_batch,
        ort_lib,
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("davi: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn parse_shard(s: &str) -> Result<(usize, usize)> {
    let bad = || anyhow::anyhow!("--shard {s}: expected i/n with 0 <= i < n");
    let (i, n) = s.split_once('/').ok_or_else(bad)?;
    let (i, n): (usize, usize) = (i.parse().map_err(|_| bad())?, n.parse().map_err(|_| bad())?);
    if n == 0 || i >= n {
        return Err(bad());
    }
    Ok((i, n))
}

fn finish(report: &Report, path: Option<&Path>, verb: &str) -> Result<ExitCode> {
    for f in &report.failed {
        eprintln!("davi: failed: {}: {}", f.path, f.reason);
    }
    eprintln!(
        "davi: {verb} {} of {} ({} skipped, {} failed, {} other files ignored) in {:.2}s, {:.1} images/s",
        report.restored,
        report.found,
        report.skipped,
        report.failed.len(),
        report.ignored,
        report.seconds,
        report.images_per_second
    );
    if let Some(p) = path {
        let json = serde_json::to_vec_pretty(report)?;
        davi_runtime::images::write_atomic(p, &json).map_err(anyhow::Error::msg)?;
    }
    Ok(if report.failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Restore {
            model,
            input,
            output,
            format,
            batch,
            seed,
            skip_existing,
            shard,
            samples,
            follow_symlinks,
            report,
            max_pixels,
            ep,
        } => {
            let batch = batch.unwrap_or(if ep.ep == Ep::Cpu { 16 } else { 64 });
            let shard = shard.as_deref().map(parse_shard).transpose()?;
            if batch > pipeline::MAX_BATCH || samples > pipeline::MAX_SAMPLES {
                return Err(RuntimeError::Usage(format!(
                    "--batch {batch} / --samples {samples}: at most {} / {}",
                    pipeline::MAX_BATCH,
                    pipeline::MAX_SAMPLES
                ))
                .into());
            }
            let mut m = Model::load(&model, &session_options(&ep, cli.ort_lib, batch))?;
            m.check_memory(m.fixed_batch.unwrap_or(batch), ep.ep)?;
            let opts = RestoreOptions {
                input,
                output,
                format,
                batch,
                seed,
                skip_existing,
                shard,
                samples,
                follow_symlinks,
                progress: std::io::stderr().is_terminal(),
                max_pixels,
            };
            let r = pipeline::restore(&mut m, &opts, report.as_deref())?;
            finish(&r, report.as_deref(), "restored")
        }
        Cmd::Degrade {
            task,
            model,
            input,
            output,
            sigma_y,
            seed,
        } => {
            let sess = SessionOptions {
                ort_lib: cli.ort_lib,
                ..Default::default()
            };
            let (operator, channels, sigma_y) = match &model {
                Some(p) => {
                    let m = Model::load(p, &sess)?;
                    (
                        Some(m.info.operator.clone()),
                        Some(m.info.channels),
                        sigma_y.or(Some(m.info.sigma_y)),
                    )
                }
                None => (None, None, sigma_y),
            };
            if operator.is_none() && task.is_none() {
                return Err(RuntimeError::Usage("give --task T or -m MODEL".into()).into());
            }
            let opts = degrade::DegradeOptions {
                input,
                output,
                operator,
                task,
                channels,
                sigma_y,
                seed,
            };
            let r = degrade::degrade(&opts, &sess)?;
            finish(&r, None, "degraded")
        }
        Cmd::Eval {
            restored,
            reference,
            json,
            csv,
            markdown,
            sheet,
            measurement,
            sheet_rows,
        } => {
            let e = metrics::evaluate(&restored, &reference, None)?;
            if e.images.is_empty() {
                return Err(RuntimeError::Usage(format!(
                    "no pair to score: {} holds no image that {} has",
                    restored.display(),
                    reference.display()
                ))
                .into());
            }
            print!("{}", e.markdown());
            if !e.missing.is_empty() {
                eprintln!(
                    "davi: {} reference(s) have no restored image, e.g. {}",
                    e.missing.len(),
                    e.missing[0]
                );
            }
            if let Some(p) = json {
                davi_runtime::images::write_atomic(&p, &serde_json::to_vec_pretty(&e)?)
                    .map_err(anyhow::Error::msg)?;
            }
            if let Some(p) = csv {
                davi_runtime::images::write_atomic(&p, e.csv().as_bytes())
                    .map_err(anyhow::Error::msg)?;
            }
            if let Some(p) = markdown {
                davi_runtime::images::write_atomic(&p, e.markdown().as_bytes())
                    .map_err(anyhow::Error::msg)?;
            }
            if let Some(p) = sheet {
                metrics::sheet(
                    &e,
                    &restored,
                    &reference,
                    measurement.as_deref(),
                    sheet_rows,
                    &p,
                )?;
                eprintln!("davi: wrote {}", p.display());
            }
            Ok(if e.missing.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Cmd::Verify { model, parity, ep } => {
            let parity = parity.unwrap_or_else(|| model.with_file_name("model.parity.safetensors"));
            let fp16 = ep.trt_fp16 || ep.ep == Ep::Tensorrt;
            let mut m = Model::load(&model, &session_options(&ep, cli.ort_lib, 8))?;
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
        Cmd::Bench {
            model,
            batch,
            seconds,
            input,
            restore_batch,
            json,
            ep,
        } => {
            let batches: Vec<usize> = batch
                .split(',')
                .map(|b| {
                    b.trim()
                        .parse::<usize>()
                        .map_err(|_| anyhow::anyhow!("--batch {batch}: comma-separated sizes"))
                })
                .collect::<Result<_>>()?;
            let max = batches
                .iter()
                .copied()
                .max()
                .unwrap_or(1)
                .max(restore_batch);
            if max > pipeline::MAX_BATCH {
                return Err(RuntimeError::Usage(format!(
                    "--batch {max}: at most {}",
                    pipeline::MAX_BATCH
                ))
                .into());
            }
            let mut m = Model::load(&model, &session_options(&ep, cli.ort_lib, max))?;
            m.check_memory(max, ep.ep)?;
            let mut figures = serde_json::Map::new();
            println!("| what | batch | images/s | p50 ms | p99 ms |\n|---|---:|---:|---:|---:|");
            let mut rows = Vec::new();
            for b in batches {
                let f = davi_runtime::bench::session(&mut m, b, seconds)?;
                println!(
                    "| bare session | {} | {:.1} | {:.2} | {:.2} |",
                    f.batch, f.images_per_second, f.p50_ms, f.p99_ms
                );
                rows.push(f);
            }
            figures.insert("session".into(), serde_json::to_value(&rows)?);
            if let Some(dir) = input {
                let r = davi_runtime::bench::restore(&mut m, &dir, restore_batch)?;
                println!(
                    "| restore end to end ({} images) | {} | {:.1} | | |",
                    r.restored, restore_batch, r.images_per_second
                );
                figures.insert("restore".into(), serde_json::to_value(&r)?);
            }
            if let Some(p) = json {
                davi_runtime::images::write_atomic(&p, &serde_json::to_vec_pretty(&figures)?)
                    .map_err(anyhow::Error::msg)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Info { model } => {
            let proto = davi_export::read_model(&model)?;
            let md = davi_export::metadata(&proto);
            println!("model: {}", model.display());
            println!(
                "producer: {} {}",
                proto.producer_name, proto.producer_version
            );
            println!(
                "opset: {}",
                proto.opset_import.first().map(|o| o.version).unwrap_or(0)
            );
            for (k, v) in &md {
                println!("metadata {k}: {v}");
            }
            if let Some(g) = &proto.graph {
                let fmt = |v: &davi_export::proto::ValueInfoProto| {
                    let dims: Vec<String> = v
                        .r#type
                        .as_ref()
                        .and_then(|t| t.tensor_type.as_ref())
                        .and_then(|t| t.shape.as_ref())
                        .map(|s| {
                            s.dim
                                .iter()
                                .map(|d| match &d.value {
                                    Some(davi_export::proto::DimValue::DimValue(v)) => {
                                        v.to_string()
                                    }
                                    Some(davi_export::proto::DimValue::DimParam(p)) => p.clone(),
                                    None => "?".into(),
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    format!("{} [{}]", v.name, dims.join(", "))
                };
                for i in &g.input {
                    println!("input: {}", fmt(i));
                }
                for o in &g.output {
                    println!("output: {}", fmt(o));
                }
                let params: usize = g
                    .initializer
                    .iter()
                    .map(|t| t.dims.iter().product::<i64>() as usize)
                    .sum();
                println!("initializers: {} ({} values)", g.initializer.len(), params);
            }
            for (op, n) in davi_export::op_histogram(&proto) {
                println!("op {op}: {n}");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
