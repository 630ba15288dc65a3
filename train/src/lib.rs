//! DAVI on libtorch through `tch`: the backend of the model code, checkpoints, devices and the
//! training, sampling and evaluation jobs of `davi-train`.

pub mod backend;
pub mod bench;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod data;
pub mod davi;
pub mod ddrm;
pub mod device;
pub mod diffusion;
pub mod dps;
pub mod driver;
pub mod eval;
pub mod export;
pub mod features;
pub mod gan;
pub mod losses;
pub mod params;
pub mod plot;
pub mod prior;
pub mod pt;
pub mod recompute;
pub mod run;
pub mod tune;

pub use backend::TchBackend;
