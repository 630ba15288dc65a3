//! Picking the device: `auto`, `cpu`, `cuda`, `cuda:N`.
//!
//! The binary links libtorch's CPU library only; libtorch's CUDA library is loaded with dlopen
//! when CUDA is asked for, so the same binary runs on machines without the CUDA libraries.

use anyhow::{bail, Result};
use tch::Device;

/// Loads `libtorch_cuda.so` (from the rpath folder or the loader's path). Returns why not on failure.
fn load_torch_cuda() -> std::result::Result<(), String> {
    use std::ffi::CString;
    extern "C" {
        fn dlopen(filename: *const std::os::raw::c_char, flag: i32) -> *mut std::ffi::c_void;
        fn dlerror() -> *const std::os::raw::c_char;
    }
    const RTLD_NOW: i32 = 2;
    const RTLD_GLOBAL: i32 = 0x100;
    let mut candidates = Vec::new();
    if let Ok(dir) = std::env::var("LIBTORCH") {
        candidates.push(format!("{dir}/lib/libtorch_cuda.so"));
    }
    if let Some(dir) = option_env!("DAVI_LIBTORCH_LIB") {
        candidates.push(format!("{dir}/libtorch_cuda.so"));
    }
    candidates.push("libtorch_cuda.so".into());
    let mut last = String::new();
    for c in candidates {
        let name = CString::new(c.clone()).expect("no NUL");
        // SAFETY: dlopen with a valid C string; the handle is kept for the process lifetime.
        let h = unsafe { dlopen(name.as_ptr(), RTLD_NOW | RTLD_GLOBAL) };
        if !h.is_null() {
            return Ok(());
        }
        // SAFETY: dlerror returns a thread-local C string or NULL.
        let e = unsafe { dlerror() };
        if !e.is_null() {
            last = unsafe { std::ffi::CStr::from_ptr(e) }
                .to_string_lossy()
                .to_string();
        }
    }
    Err(last)
}

/// Resolves `--device`.
pub fn pick(spec: &str) -> Result<Device> {
    let cuda_index = |s: &str| -> Result<usize> {
        match s.strip_prefix("cuda") {
            Some("") => Ok(0),
            Some(rest) => rest
                .strip_prefix(':')
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| anyhow::anyhow!("bad device '{s}': use cpu, cuda or cuda:N")),
            None => bail!("bad device '{s}': use auto, cpu, cuda or cuda:N"),
        }
    };
    match spec {
        "cpu" => Ok(Device::Cpu),
        "auto" => match load_torch_cuda() {
            Ok(()) if tch::Cuda::is_available() => Ok(Device::Cuda(0)),
            Ok(()) => {
                tracing::info!("libtorch CUDA loaded but no GPU is visible; using the CPU");
                Ok(Device::Cpu)
            }
            Err(why) => {
                tracing::info!("CUDA unavailable ({why}); using the CPU");
                Ok(Device::Cpu)
            }
        },
        s => {
            let i = cuda_index(s)?;
            if let Err(why) = load_torch_cuda() {
                bail!("--device {s}: cannot load libtorch's CUDA library: {why}");
            }
            let n = tch::Cuda::device_count() as usize;
            if n == 0 {
                bail!("--device {s}: libtorch CUDA loaded but no CUDA device is visible (driver missing or CUDA_VISIBLE_DEVICES empty)");
            }
            if i >= n {
                bail!("--device {s}: only {n} CUDA device(s) visible");
            }
            Ok(Device::Cuda(i))
        }
    }
}
