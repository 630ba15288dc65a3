//! `davi`: DAVI models in ONNX Runtime on the CPU, CUDA or TensorRT execution provider.
//!
//! Folder restoration ([`pipeline`]), measurements from clean images ([`degrade`]), the parity
//! check against tch ([`verify`]) and quality metrics ([`metrics`]). No libtorch.

pub mod bench;
pub mod cli;
pub mod degrade;
pub mod images;
pub mod metrics;
pub mod model;
pub mod ortlib;
pub mod paths;
pub mod pipeline;
pub mod tiles;
pub mod verify;

pub use model::{Ep, Model, ModelInfo, SessionOptions};

/// Errors that stop a whole command (exit code 2). Per-file problems are not errors: they are
/// counted in a report.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// ONNX Runtime's library is missing or cannot be loaded.
    #[error("{0}")]
    OrtLibrary(String),
    /// An execution provider could not be registered.
    #[error("execution provider '{ep}' is not available: {reason}")]
    Ep {
        /// The provider.
        ep: String,
        /// Why.
        reason: String,
    },
    /// A model could not be loaded or run.
    #[error("{path}: {reason}")]
    Model {
        /// The model file.
        path: String,
        /// Why.
        reason: String,
    },
    /// ONNX Runtime refused an operation on a model.
    #[error("{path}: {what}: {source}")]
    Ort {
        /// The model file.
        path: String,
        /// What was being done.
        what: String,
        /// ONNX Runtime's error.
        #[source]
        source: ort::Error,
    },
    /// The model returned what it must not (a wrong shape): its fault, whatever the input.
    #[error("{path}: {reason}")]
    BadOutput {
        /// The model file.
        path: String,
        /// Why.
        reason: String,
    },
    /// A file or folder could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The path.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A file holds what it must not.
    #[error("{path}: {reason}")]
    File {
        /// The path.
        path: String,
        /// Why.
        reason: String,
    },
    /// A file could not be written.
    #[error(transparent)]
    Write(#[from] davi_models::atomic::WriteError),
    /// A model file could not be parsed.
    #[error(transparent)]
    Export(#[from] davi_export::ExportError),
    /// A report could not be serialised.
    #[error("cannot serialise the report: {0}")]
    Json(#[from] serde_json::Error),
    /// Bad arguments.
    #[error("{0}")]
    Usage(String),
}

impl RuntimeError {
    /// An I/O error naming its path.
    pub fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// A problem with a file's contents, naming it.
    pub fn file(path: &std::path::Path, reason: impl std::fmt::Display) -> Self {
        Self::File {
            path: path.display().to_string(),
            reason: reason.to_string(),
        }
    }
}

/// An error and its causes on one line (`a: b: c`), causes already in the message not repeated.
pub fn one_line_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let s = c.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = c.source();
    }
    paths::one_line(&out)
}
