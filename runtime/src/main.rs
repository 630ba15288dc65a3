//! `davi`: restore image folders with DAVI models through ONNX Runtime. No libtorch.
//! Each subcommand lives in `davi_runtime::cli`; this only parses and dispatches.

use clap::{Parser, Subcommand};
use davi_runtime::cli;
use std::io::Write;
use std::path::PathBuf;
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

#[derive(Subcommand)]
enum Cmd {
    /// Restore a file or a folder of measurements.
    Restore(cli::RestoreArgs),
    /// Make measurements y = H x + n from clean images.
    Degrade(cli::DegradeArgs),
    /// PSNR / SSIM of restored images against references.
    Eval(cli::EvalArgs),
    /// Check the ONNX output against what tch computed (`model.parity.safetensors`).
    Verify(cli::VerifyArgs),
    /// Throughput and latency of the bare session; end-to-end restore over a folder.
    Bench(cli::BenchArgs),
    /// Show a model's metadata, inputs, outputs and op counts.
    Info(cli::InfoArgs),
    /// Print the model cards' evaluation tables as Markdown (the README's table).
    Cards(cli::CardsArgs),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let Cli { ort_lib, cmd } = Cli::parse();
    if !matches!(cmd, Cmd::Restore(_) | Cmd::Degrade(_)) {
        // A reader that stops early (`davi verify | head -1`) ends a command that prints its
        // results as it ends `cat`, instead of a panic in print! (Rust starts with SIGPIPE
        // ignored). Not for restore and degrade: their report must still be written when the
        // terminal they log to goes away.
        // SAFETY: setting a signal's disposition to its default before any thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let result = match cmd {
        Cmd::Restore(a) => cli::restore(a, ort_lib),
        Cmd::Degrade(a) => cli::degrade(a, ort_lib),
        Cmd::Eval(a) => cli::eval(a),
        Cmd::Verify(a) => cli::verify(a, ort_lib),
        Cmd::Bench(a) => cli::bench(a, ort_lib),
        Cmd::Info(a) => cli::info(a),
        Cmd::Cards(a) => cli::cards(a),
    };
    result.unwrap_or_else(|e| {
        let _ = writeln!(
            std::io::stderr(),
            "davi: error: {}",
            davi_runtime::one_line_chain(&e)
        );
        ExitCode::from(2)
    })
}
