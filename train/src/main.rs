//! `davi-train`: training, sampling, evaluation and export of DAVI models on libtorch.
//! Each subcommand lives in `davi_train::cli`; this only parses and dispatches.

use clap::{Parser, Subcommand};
use davi_train::cli;
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
    Forward(cli::ForwardArgs),
    /// Train (or resume) a diffusion prior: eps-prediction DDPM.
    Prior(cli::RunArgs),
    /// Train (or resume) I_phi by amortized variational inference against a prior.
    Davi(cli::DaviArgs),
    /// Export I_phi to ONNX with parity fixtures, and check them on ONNX Runtime's CPU EP.
    Export(cli::ExportArgs),
    /// Evaluate DAVI against DPS and the lifted measurement on held-out images.
    Eval(cli::EvalArgs),
    /// Sweep DPS's step size on validation images (never the test split).
    TuneDps(cli::TuneDpsArgs),
    /// Throughput of tch's eager forward of I_phi (the restore graph) at several batch sizes.
    Bench(cli::BenchArgs),
    /// Steps/s of prior training of a config's UNet, to set against PyTorch eager.
    BenchTrain(cli::BenchTrainArgs),
    /// Parameters and GFLOP of a UNet config, and the time of one forward pass.
    Describe(cli::DescribeArgs),
    /// Convert a PyTorch checkpoint (`torch.save` zip) to safetensors without running pickle code
    /// (a safetensors input is rewritten, e.g. with `--half`).
    Import(cli::ImportArgs),
    /// Write images of a config's data set as PNG files (e.g. held-out test images).
    Images(cli::ImagesArgs),
    /// Random weights of a UNet config, as a `torch.save` checkpoint or safetensors.
    Init(cli::InitArgs),
    /// Train the Fashion-MNIST classifier whose features give FID and KID.
    Classifier(cli::ClassifierArgs),
    /// Sample from a prior: ancestral DDPM or DDIM.
    Sample(cli::SampleArgs),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match Cli::parse().cmd {
        Cmd::Forward(a) => cli::forward(a),
        Cmd::Prior(a) => cli::prior(a),
        Cmd::Davi(a) => cli::davi(a),
        Cmd::Export(a) => cli::export(a),
        Cmd::Eval(a) => cli::eval(a),
        Cmd::TuneDps(a) => cli::tune_dps(a),
        Cmd::Bench(a) => cli::bench(a),
        Cmd::BenchTrain(a) => cli::bench_train(a),
        Cmd::Describe(a) => cli::describe(a),
        Cmd::Import(a) => cli::import(a),
        Cmd::Images(a) => cli::images(a),
        Cmd::Init(a) => cli::init(a),
        Cmd::Classifier(a) => cli::classifier(a),
        Cmd::Sample(a) => cli::sample(a),
    };
    result.unwrap_or_else(|e| {
        eprintln!("davi-train: error: {e:#}");
        ExitCode::from(2)
    })
}
