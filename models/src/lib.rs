//! The networks of DAVI (Lee, Park, Kong, Kim, ECCV 2024) written once.
//!
//! Everything here is generic over [`Backend`]: the same code trains on libtorch (`davi-train`),
//! records an ONNX graph (`davi-export`) and is checked against the reference in tests. The crate
//! depends on neither libtorch nor ONNX Runtime.
//!
//! - [`unet`]: guided-diffusion's ADM `UNetModel`, parameter names identical to its state dict.
//! - [`schedule`]: diffusion schedules (linear, cosine, i2sb) and the Perturbed Posterior Bridge.
//! - [`operators`]: the degradation operators `H` and their lift of a measurement to image space.
//! - [`implicit`]: the one-step posterior network `I_phi` built from those three.
//! - [`card`]: task configs and model cards (YAML).
//!
//! # Sizes and CPU cost
//!
//! `davi-train describe --config C --time` (one multiply-add counts two operations; random weights, batch 1, 2 CPU cores of the
//! development machine while a training job shared them):
//!
//! | config | parameters | GFLOP per image ([`flops`]) | forward, batch 1 |
//! |---|---:|---:|---:|
//! | FFHQ-256 ADM (`models/configs/adm/ffhq256.json`: 128 channels, mult 1,1,2,2,4,4, attention at 16, one res block, heads of 64, scale-shift, resblock up/down, learned sigma; DPS's `ffhq_10m.pt`) | 93,563,910 | 387.9 | 10.5 s |
//! | our 32 px (`models/configs/fmnist32-prior.yaml`: 32 channels, mult 1,2,2, attention at 8) | 1,369,953 | 0.60 | 0.029 s |

pub mod atomic;
pub mod backend;
pub mod card;
pub mod flops;
pub mod implicit;
pub mod metrics;
pub mod operators;
pub mod schedule;
pub mod unet;

pub use backend::Backend;
pub use card::{DaviConfig, ModelCard, TaskConfig};
pub use implicit::Implicit;
pub use operators::Operator;
pub use unet::{UNetConfig, UNetModel};

/// Errors of model construction and weight lookup.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A parameter the network needs is not in the weights.
    #[error("missing parameter '{0}'")]
    MissingParam(String),
    /// A config failed validation.
    #[error("invalid config: {0}")]
    Config(String),
    /// A config file could not be read or parsed.
    #[error("{path}: {reason}")]
    ConfigFile {
        /// The file.
        path: String,
        /// Why it could not be used.
        reason: String,
    },
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Compares found tensor shapes with the ones a network expects. `Err` lists every missing,
/// unexpected and mis-shaped key by name.
pub fn check_params(
    expected: &[(String, Vec<usize>)],
    found: &[(String, Vec<usize>)],
) -> std::result::Result<(), String> {
    use std::collections::HashMap;
    let found_map: HashMap<&str, &Vec<usize>> =
        found.iter().map(|(n, s)| (n.as_str(), s)).collect();
    let known: std::collections::HashSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
    let mut missing = Vec::new();
    let mut shape = Vec::new();
    for (name, s) in expected {
        match found_map.get(name.as_str()) {
            None => missing.push(name.clone()),
            Some(f) if *f != s => shape.push(format!("{name} (expected {s:?}, found {f:?})")),
            _ => {}
        }
    }
    let mut unexpected: Vec<&str> = found
        .iter()
        .map(|(n, _)| n.as_str())
        .filter(|n| !known.contains(n))
        .collect();
    unexpected.sort_unstable();
    let mut parts = Vec::new();
    if !missing.is_empty() {
        parts.push(format!("missing keys: {}", missing.join(", ")));
    }
    if !unexpected.is_empty() {
        parts.push(format!("unexpected keys: {}", unexpected.join(", ")));
    }
    if !shape.is_empty() {
        parts.push(format!("mis-shaped keys: {}", shape.join(", ")));
    }
    if parts.is_empty() {
        Ok(())
    } else {
        Err(parts.join("; "))
    }
}
