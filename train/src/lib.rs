//! DAVI on libtorch through `tch`: the backend of the model code, checkpoints, devices and the
//! training, sampling and evaluation jobs of `davi-train`.

pub mod backend;
pub mod checkpoint;
pub mod device;

pub use backend::TchBackend;
