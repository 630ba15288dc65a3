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

/// libtorch draws every random number (randn, dropout masks) from one process-wide generator, and
/// the unit tests run on several threads. A test that seeds the generator and relies on the
/// stream that follows holds this lock, and so does every other test that draws, so no draw on
/// another thread can shift the stream in between.
#[cfg(test)]
pub(crate) fn global_rng() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}
