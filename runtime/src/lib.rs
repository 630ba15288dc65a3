//! `davi`: DAVI models in ONNX Runtime on the CPU, CUDA or TensorRT execution provider.
//!
//! Folder restoration ([`pipeline`]), measurements from clean images ([`degrade`]), the parity
//! check against tch ([`verify`]) and quality metrics ([`metrics`]). No libtorch.

pub mod bench;
pub mod degrade;
pub mod images;
pub mod metrics;
pub mod model;
pub mod ortlib;
pub mod paths;
pub mod pipeline;
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
    /// The model returned what it must not (a wrong shape): its fault, whatever the input.
    #[error("{path}: {reason}")]
    BadOutput {
        /// The model file.
        path: String,
        /// Why.
        reason: String,
    },
    /// A file or folder could not be used.
    #[error("{path}: {reason}")]
    Io {
        /// The path.
        path: String,
        /// Why.
        reason: String,
    },
    /// Bad arguments.
    #[error("{0}")]
    Usage(String),
}

impl RuntimeError {
    /// An I/O error naming its path.
    pub fn io(path: &std::path::Path, e: impl std::fmt::Display) -> Self {
        Self::Io {
            path: path.display().to_string(),
            reason: e.to_string(),
        }
    }
}
