//! Finding and loading ONNX Runtime's shared library (ort's `load-dynamic`).

use crate::RuntimeError;
use ort::environment::Environment;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const LIB: &str = "libonnxruntime.so";

/// Where the library is: `--ort-lib PATH`, else `ORT_DYLIB_PATH`, else the `.deps` copy of
/// `scripts/setup` found from the executable's location (or a copy beside the executable).
pub fn find_library(cli: Option<&Path>) -> Result<PathBuf, RuntimeError> {
    if let Some(p) = cli {
        return if p.is_file() {
            Ok(p.to_path_buf())
        } else {
            Err(RuntimeError::OrtLibrary(format!(
                "--ort-lib {}: no such file",
                p.display()
            )))
        };
    }
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(RuntimeError::OrtLibrary(format!(
                "ORT_DYLIB_PATH={}: no such file",
                p.display()
            )))
        };
    }
    let exe = std::env::current_exe().ok();
    let mut dir = exe.as_deref().and_then(Path::parent);
    if let Some(d) = dir {
        let beside = d.join(LIB);
        if beside.is_file() {
            return Ok(beside);
        }
    }
    while let Some(d) = dir {
        let p = d.join(".deps/onnxruntime").join(LIB);
        if p.is_file() {
            return Ok(p);
        }
        dir = d.parent();
    }
    Err(RuntimeError::OrtLibrary(format!(
        "ONNX Runtime's library was not found: pass --ort-lib PATH, or set ORT_DYLIB_PATH, or run \
         scripts/setup --runtime-only so that .deps/onnxruntime/{LIB} exists above the executable ({})",
        exe.map(|e| e.display().to_string()).unwrap_or_default()
    )))
}

static ENV: OnceLock<Environment> = OnceLock::new();

/// The process's ONNX Runtime environment, loading the library on first use.
pub fn environment(lib: Option<&Path>) -> Result<&'static Environment, RuntimeError> {
    static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = INIT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(env) = ENV.get() {
        return Ok(env);
    }
    let path = find_library(lib)?;
    let builder = ort::init_from(&path).map_err(|e| {
        RuntimeError::OrtLibrary(format!("{}: cannot load ONNX Runtime: {e}", path.display()))
    })?;
    let env = builder
        .with_name("davi")
        .build()
        .map_err(|e| RuntimeError::OrtLibrary(format!("{}: {e}", path.display())))?;
    Ok(ENV.get_or_init(|| env))
}
