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
    }
}
