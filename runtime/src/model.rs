//! A DAVI model in ONNX Runtime: its session, its execution provider and what its metadata says.

use crate::{ortlib, RuntimeError};
use davi_models::Operator;
use ndarray::{Array4, ArrayD};
use ort::ep;
use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;
use ort::value::TensorRef;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Metadata keys written by `davi-export` and read here.
pub mod keys {
    /// The task name (`deblur`, `sr`, ...).
    pub const TASK: &str = "davi.task";
    /// The operator and its parameters, as JSON.
    pub const OPERATOR: &str = "davi.operator";
    /// Measurement noise on [-1, 1].
    pub const SIGMA_Y: &str = "davi.sigma_y";
    /// Bridge perturbation.
    pub const H: &str = "davi.h";
    /// Image side.
    pub const IMAGE_SIZE: &str = "davi.image_size";
    /// Image channels.
    pub const CHANNELS: &str = "davi.channels";
    /// Hash of the training config.
    pub const CONFIG_HASH: &str = "davi.config_hash";
    /// Version of the tool that wrote the model.
    pub const TOOL_VERSION: &str = "davi.tool_version";
    /// The model's name (its config's `name`).
    pub const NAME: &str = "davi.name";
}

/// What a model's metadata says about it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelInfo {
    /// The operator it inverts.
    pub operator: Operator,
    /// Measurement noise.
    pub sigma_y: f64,
    /// Bridge perturbation.
    pub h: f64,
    /// Image side.
    pub image_size: usize,
    /// Image channels.
    pub channels: usize,
    /// Training config hash.
    pub config_hash: String,
    /// The model's name (empty if the metadata has none).
    pub name: String,
    /// Tool version.
    pub tool_version: String,
}

impl ModelInfo {
    /// Parses the `davi.*` metadata; `origin` names the model in errors.
    pub fn from_metadata(m: &BTreeMap<String, String>, origin: &str) -> Result<Self, RuntimeError> {
        let get = |k: &str| {
            m.get(k).cloned().ok_or_else(|| RuntimeError::Model {
                path: origin.into(),
                reason: format!("metadata has no '{k}' (not a model written by davi-export?)"),
            })
        };
        // sigma_y and h: noise levels, finite and >= 0 (a NaN would reach `degrade` as if the
        // user had passed it).
        let num = |k: &str| -> Result<f64, RuntimeError> {
            let v = get(k)?;
            v.parse::<f64>()
                .ok()
                .filter(|x| x.is_finite() && *x >= 0.0)
                .ok_or_else(|| RuntimeError::Model {
                    path: origin.into(),
                    reason: format!("metadata '{k}' is '{v}', not a finite number >= 0"),
                })
        };
        let count = |k: &str| -> Result<usize, RuntimeError> {
            let v = get(k)?;
            v.parse::<usize>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| RuntimeError::Model {
                    path: origin.into(),
                    reason: format!("metadata '{k}' is '{v}', not a positive whole number"),
                })
        };
        let operator: Operator =
            serde_json::from_str(&get(keys::OPERATOR)?).map_err(|e| RuntimeError::Model {
                path: origin.into(),
                reason: format!("metadata '{}': {e}", keys::OPERATOR),
            })?;
        Ok(Self {
            operator,
            sigma_y: num(keys::SIGMA_Y)?,
            h: num(keys::H)?,
            image_size: count(keys::IMAGE_SIZE)?,
            channels: count(keys::CHANNELS)?,
            config_hash: get(keys::CONFIG_HASH).unwrap_or_default(),
            name: get(keys::NAME).unwrap_or_default(),
            tool_version: get(keys::TOOL_VERSION).unwrap_or_default(),
        })
    }

    /// `[Cy, Hy, Wy]` of the measurements the model takes.
    pub fn measurement_shape(&self) -> [usize; 3] {
        self.operator
            .measurement_shape(self.channels, self.image_size)
    }

    /// `[C, S, S]` of the images it returns.
    pub fn image_shape(&self) -> [usize; 3] {
        [self.channels, self.image_size, self.image_size]
    }
}

/// An execution provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Ep {
    /// ONNX Runtime's CPU provider.
    Cpu,
    /// NVIDIA CUDA.
    Cuda,
    /// NVIDIA TensorRT (fp32 model, fp16 engine on request).
    Tensorrt,
}

/// Session settings.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    /// The execution provider; registration failure is an error, never a silent CPU run.
    pub ep: Ep,
    /// GPU index.
    pub device: i32,
    /// Intra-op threads (0: all cores).
    pub threads: usize,
    /// TensorRT: build fp16 engines.
    pub trt_fp16: bool,
    /// TensorRT: engine cache folder.
    pub trt_cache: Option<PathBuf>,
    /// TensorRT: workspace bytes.
    pub trt_workspace: usize,
    /// Largest batch (TensorRT profile shapes).
    pub max_batch: usize,
    /// ONNX Runtime's library (see [`ortlib::find_library`]).
    pub ort_lib: Option<PathBuf>,
}

impl Default for SessionOptions {
    fn default() -> Self {
        Self {
            ep: Ep::Cpu,
            device: 0,
            threads: 0,
            trt_fp16: false,
            trt_cache: None,
            trt_workspace: 2 << 30,
            max_batch: 32,
            ort_lib: None,
        }
    }
}

/// Intra-op threads beyond this many per core only cost memory.
pub const MAX_THREADS_PER_CORE: usize = 4;

fn ort_err(path: &Path, what: &str, source: impl Into<ort::Error>) -> RuntimeError {
    RuntimeError::Ort {
        path: path.display().to_string(),
        what: what.into(),
        source: source.into(),
    }
}

/// A loaded model.
pub struct Model {
    /// The session (`run` takes `&mut self`: one caller at a time).
    pub session: Session,
    /// Its metadata.
    pub info: ModelInfo,
    /// Where it came from.
    pub path: PathBuf,
    /// The batch size the graph fixes (exported with `--static-batch`); `None`: dynamic.
    pub fixed_batch: Option<usize>,
    /// The execution provider it runs on.
    pub ep: Ep,
}

/// Checks the graph's inputs and outputs against the ONNX contract and the metadata: inputs
/// `measurement` and `noise`, output `image`, all f32 of rank 4, every fixed dimension equal to
/// what the metadata implies, one batch dimension shared by all. Returns the fixed batch size, if
/// any. A model that fails here would fail on every image: it is refused once, at load.
pub fn check_graph(
    session: &Session,
    info: &ModelInfo,
    path: &Path,
) -> Result<Option<usize>, RuntimeError> {
    let fault = |reason: String| RuntimeError::Model {
        path: path.display().to_string(),
        reason,
    };
    let names = |outlets: &[ort::value::Outlet]| -> Vec<String> {
        outlets.iter().map(|o| o.name().to_string()).collect()
    };
    let (inputs, outputs) = (names(session.inputs()), names(session.outputs()));
    let mut want_in = vec!["measurement".to_string(), "noise".to_string()];
    let mut got_in = inputs.clone();
    want_in.sort();
    got_in.sort();
    if got_in != want_in {
        return Err(fault(format!(
            "the graph's inputs are {inputs:?}; a DAVI model takes exactly [\"measurement\", \"noise\"]"
        )));
    }
    if !outputs.iter().any(|o| o == "image") {
        return Err(fault(format!(
            "the graph's outputs are {outputs:?}; a DAVI model returns \"image\""
        )));
    }
    let [cy, hy, wy] = info.measurement_shape();
    let [c, sz, _] = info.image_shape();
    let expected = [
        ("measurement", [cy, hy, wy]),
        ("noise", [c, sz, sz]),
        ("image", [c, sz, sz]),
    ];
    let mut batch: Option<i64> = None;
    for (name, dims) in expected {
        let outlet = session
            .inputs()
            .iter()
            .chain(session.outputs())
            .find(|o| o.name() == name)
            .expect("checked above");
        let ty = outlet.dtype();
        if ty.tensor_type() != Some(ort::value::TensorElementType::Float32) {
            return Err(fault(format!("'{name}' is {ty:?}; f32 is expected")));
        }
        let shape: Vec<i64> = ty.tensor_shape().map(|s| s.to_vec()).unwrap_or_default();
        if shape.len() != 4 {
            return Err(fault(format!(
                "'{name}' has shape {shape:?}; rank 4 [N, C, H, W] is expected"
            )));
        }
        for (k, (&got, want)) in shape[1..].iter().zip(dims).enumerate() {
            if got >= 0 && got as usize != want {
                return Err(fault(format!(
                    "'{name}' has shape {shape:?}, but the metadata (davi.image_size {}, davi.channels {}, operator {}) implies [N, {}, {}, {}] (dimension {} differs)",
                    info.image_size,
                    info.channels,
                    info.operator.task(),
                    dims[0],
                    dims[1],
                    dims[2],
                    k + 1
                )));
            }
        }
        if shape[0] >= 0 {
            if batch.is_some_and(|b| b != shape[0]) {
                return Err(fault(format!(
                    "'{name}' fixes the batch at {} where another tensor fixes it at {}",
                    shape[0],
                    batch.unwrap_or_default()
                )));
            }
            batch = Some(shape[0]);
        }
    }
    Ok(batch.map(|b| b as usize))
}

/// Builds a session over an ONNX file or in-memory bytes with the given options.
pub fn session(source: ModelSource<'_>, opts: &SessionOptions) -> Result<Session, RuntimeError> {
    let env = ortlib::environment(opts.ort_lib.as_deref())?;
    let path = source.path();
    let mut b = Session::builder(env).map_err(|e| ort_err(&path, "session", e))?;
    b = b
        .with_optimization_level(GraphOptimizationLevel::All)
        .map_err(|e| ort_err(&path, "optimization level", e))?;
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    if opts.threads > MAX_THREADS_PER_CORE * cores {
        return Err(RuntimeError::Usage(format!(
            "--threads {}: at most {} ({MAX_THREADS_PER_CORE} per core on this machine's {cores})",
            opts.threads,
            MAX_THREADS_PER_CORE * cores
        )));
    }
    let threads = if opts.threads == 0 {
        cores
    } else {
        opts.threads
    };
    b = b
        .with_intra_threads(threads)
        .map_err(|e| ort_err(&path, "threads", e))?;
    match opts.ep {
        Ep::Cpu => {}
        Ep::Cuda => b = register_cuda(b, opts, &path)?,
        Ep::Tensorrt => b = register_tensorrt(b, opts, &path)?,
    }
    match source {
        ModelSource::File(p) => b
            .commit_from_file(p)
            .map_err(|e| ort_err(p, "cannot load the model", e)),
        ModelSource::Bytes(bytes, _) => b
            .commit_from_memory(bytes)
            .map_err(|e| ort_err(&path, "cannot load the model", e)),
    }
}

#[cfg(feature = "cuda")]
fn register_cuda(
    b: ort::session::builder::SessionBuilder,
    opts: &SessionOptions,
    path: &Path,
) -> Result<ort::session::builder::SessionBuilder, RuntimeError> {
    let cuda = ep::CUDA::default()
        .with_device_id(opts.device)
        .build()
        .error_on_failure();
    b.with_execution_providers([cuda])
        .map_err(|e| RuntimeError::Ep {
            ep: "cuda".into(),
            reason: format!("{e} (model {})", path.display()),
        })
}

#[cfg(not(feature = "cuda"))]
fn register_cuda(
    _b: ort::session::builder::SessionBuilder,
    _opts: &SessionOptions,
    _path: &Path,
) -> Result<ort::session::builder::SessionBuilder, RuntimeError> {
    Err(RuntimeError::Ep {
        ep: "cuda".into(),
        reason: "this davi was built without the `cuda` feature".into(),
    })
}

#[cfg(feature = "tensorrt")]
fn register_tensorrt(
    b: ort::session::builder::SessionBuilder,
    opts: &SessionOptions,
    path: &Path,
) -> Result<ort::session::builder::SessionBuilder, RuntimeError> {
    let mut trt = ep::TensorRT::default()
        .with_device_id(opts.device)
        .with_fp16(opts.trt_fp16)
        .with_max_workspace_size(opts.trt_workspace);
    if let Some(dir) = &opts.trt_cache {
        trt = trt
            .with_engine_cache(true)
            .with_engine_cache_path(dir.display().to_string())
            .with_timing_cache(true);
    }
    let trt = trt.build().error_on_failure();
    // CUDA after TensorRT for the nodes TensorRT does not take.
    let cuda = ep::CUDA::default()
        .with_device_id(opts.device)
        .build()
        .error_on_failure();
    b.with_execution_providers([trt, cuda])
        .map_err(|e| RuntimeError::Ep {
            ep: "tensorrt".into(),
            reason: format!("{e} (model {})", path.display()),
        })
}

#[cfg(not(feature = "tensorrt"))]
fn register_tensorrt(
    _b: ort::session::builder::SessionBuilder,
    _opts: &SessionOptions,
    _path: &Path,
) -> Result<ort::session::builder::SessionBuilder, RuntimeError> {
    Err(RuntimeError::Ep {
        ep: "tensorrt".into(),
        reason: "this davi was built without the `tensorrt` feature".into(),
    })
}

/// Where a model comes from.
pub enum ModelSource<'a> {
    /// An ONNX file.
    File(&'a Path),
    /// Serialized ONNX bytes, with a name for errors.
    Bytes(&'a [u8], &'a str),
}

impl ModelSource<'_> {
    fn path(&self) -> PathBuf {
        match self {
            ModelSource::File(p) => p.to_path_buf(),
            ModelSource::Bytes(_, n) => PathBuf::from(n),
        }
    }
}

impl Model {
    /// Loads a DAVI model and reads its metadata.
    pub fn load(path: &Path, opts: &SessionOptions) -> Result<Self, RuntimeError> {
        if !path.is_file() {
            return Err(RuntimeError::Model {
                path: path.display().to_string(),
                reason: if path.exists() {
                    "not a regular file".into()
                } else {
                    "no such file".into()
                },
            });
        }
        let session = session(ModelSource::File(path), opts)?;
        let md = session
            .metadata()
            .map_err(|e| ort_err(path, "metadata", e))?;
        let mut m = BTreeMap::new();
        for k in md.custom_keys().map_err(|e| ort_err(path, "metadata", e))? {
            if let Some(v) = md.custom(&k) {
                m.insert(k, v);
            }
        }
        drop(md);
        let info = ModelInfo::from_metadata(&m, &path.display().to_string())?;
        let fixed_batch = check_graph(&session, &info, path)?;
        Ok(Self {
            session,
            info,
            path: path.to_path_buf(),
            fixed_batch,
            ep: opts.ep,
        })
    }

    /// Refuses a batch of `rows` that the machine's memory cannot hold, with a message, instead
    /// of being killed by the kernel. The memory one row takes is measured: the process's
    /// resident size after runs of 1 and 4 rows (ONNX Runtime's CPU arena keeps its peak). Only
    /// for the CPU provider and batches above 16 (smaller ones are not worth the two runs).
    pub fn check_memory(&mut self, rows: usize) -> Result<(), RuntimeError> {
        if self.ep != Ep::Cpu || rows <= 16 {
            return Ok(());
        }
        let (Some(avail), Some(_)) = (mem_available(), resident()) else {
            return Ok(());
        };
        let [cy, hy, wy] = self.info.measurement_shape();
        let [c, s, _] = self.info.image_shape();
        let mut probe = |n: usize| -> Result<u64, RuntimeError> {
            let fixed = self.fixed_batch.unwrap_or(n);
            let m = Array4::<f32>::zeros((fixed, cy, hy, wy));
            let z = Array4::<f32>::zeros((fixed, c, s, s));
            self.restore(&m, &z)?;
            Ok(resident().unwrap_or(0))
        };
        let r1 = probe(1)?;
        let r4 = probe(4)?;
        let io = ((cy * hy * wy + 2 * c * s * s) * 4) as u64;
        let per_row = (r4.saturating_sub(r1) / 3).max(io);
        let need = r1 + per_row * rows as u64;
        let budget = (avail + r1) / 10 * 9;
        if need > budget {
            let most = (budget.saturating_sub(r1) / per_row).max(1);
            return Err(RuntimeError::Usage(format!(
                "a batch of {rows} needs about {:.1} GiB ({:.1} MiB per image, measured), more than the {:.1} GiB this machine has available; use a batch of at most {most}",
                need as f64 / (1u64 << 30) as f64,
                per_row as f64 / (1u64 << 20) as f64,
                avail as f64 / (1u64 << 30) as f64
            )));
        }
        Ok(())
    }

    /// Runs one batch.
    ///
    /// # Shapes
    /// - `measurement`: [N, Cy, Hy, Wy]; `noise`: [N, C, S, S] -> [N, C, S, S]
    pub fn restore(
        &mut self,
        measurement: &Array4<f32>,
        noise: &Array4<f32>,
    ) -> Result<ArrayD<f32>, RuntimeError> {
        let p = self.path.clone();
        let m = TensorRef::from_array_view(measurement.view())
            .map_err(|e| ort_err(&p, "measurement", e))?;
        let z = TensorRef::from_array_view(noise.view()).map_err(|e| ort_err(&p, "noise", e))?;
        let out = self
            .session
            .run(ort::inputs!["measurement" => m, "noise" => z])
            .map_err(|e| ort_err(&p, "run", e))?;
        let img = out["image"]
            .try_extract_array::<f32>()
            .map_err(|e| ort_err(&p, "output", e))?;
        // A wrong shape is the model's fault, whatever the input: an error, never written out.
        let [c, sz, _] = self.info.image_shape();
        let want = [measurement.shape()[0], c, sz, sz];
        if img.shape() != want {
            return Err(RuntimeError::BadOutput {
                path: p.display().to_string(),
                reason: format!(
                    "the output 'image' has shape {:?} where the metadata implies {want:?}",
                    img.shape()
                ),
            });
        }
        Ok(img.to_owned())
    }
}

/// Bytes of memory available (`MemAvailable` of /proc/meminfo), where the system says.
pub fn mem_available() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// This process's resident bytes (/proc/self/statm), where the system says.
pub fn resident() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = s.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}
