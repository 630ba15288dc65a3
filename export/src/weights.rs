//! Named f32 weights read from safetensors, without libtorch.

use ndarray::{ArrayD, IxDyn};
use safetensors::{Dtype, SafeTensors};
use std::collections::BTreeMap;
use std::path::Path;

/// Errors reading weights.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    /// The file could not be read or parsed.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// A tensor has a dtype we cannot use.
    #[error("{path}: tensor '{name}' has dtype {dtype:?}; expected F32, F16, BF16 or F64")]
    Dtype {
        /// The file.
        path: String,
        /// The tensor.
        name: String,
        /// Its dtype.
        dtype: Dtype,
    },
    /// Weights do not fit the network.
    #[error("{path}: weights do not match the network: {details}")]
    Mismatch {
        /// The file.
        path: String,
        /// Missing, unexpected and mis-shaped keys, by name.
        details: String,
    },
}

/// Named tensors, converted to f32.
#[derive(Debug, Clone, Default)]
pub struct Weights {
    /// The tensors by name.
    pub tensors: BTreeMap<String, ArrayD<f32>>,
}

impl Weights {
    /// Reads every weight of a safetensors file, or the weight initializers of an exported
    /// ONNX model (`.onnx`, inline or external data), as f32.
    pub fn load(path: &Path) -> Result<Self, WeightsError> {
        let p = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| WeightsError::File {
            path: p.clone(),
            reason: e.to_string(),
        })?;
        if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("onnx"))
        {
            return Self::from_onnx(&bytes, path);
        }
        Self::from_bytes(&bytes, &p)
    }

    /// The weights of an ONNX model written by this crate: its float initializers (FLOAT or
    /// FLOAT16) except the constants the recorder made ([`crate::recorder::is_constant_name`]).
    /// External data is read from the files beside `path`.
    pub fn from_onnx(bytes: &[u8], path: &Path) -> Result<Self, WeightsError> {
        use crate::proto::{data_type, ModelProto};
        use prost::Message;
        let origin = path.display().to_string();
        let err = |reason: String| WeightsError::File {
            path: origin.clone(),
            reason,
        };
        let model =
            ModelProto::decode(bytes).map_err(|e| err(format!("not an ONNX model: {e}")))?;
        let graph = model
            .graph
            .ok_or_else(|| err("the model has no graph".into()))?;
        let mut tensors = BTreeMap::new();
        for t in graph.initializer {
            if crate::recorder::is_constant_name(&t.name) {
                continue;
            }
            let width = match t.data_type {
                data_type::FLOAT => 4,
                data_type::FLOAT16 => 2,
                _ => continue,
            };
            let shape = t
                .dims
                .iter()
                .map(|&d| usize::try_from(d))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| err(format!("initializer '{}' has a negative dim", t.name)))?;
            let count = shape
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .ok_or_else(|| err(format!("initializer '{}': shape overflows", t.name)))?;
            let raw = if t.data_location == 1 {
                read_external(&t.external_data, path)
                    .map_err(|e| err(format!("initializer '{}': external data: {e}", t.name)))?
            } else if !t.float_data.is_empty() && width == 4 {
                t.float_data.iter().flat_map(|x| x.to_le_bytes()).collect()
            } else {
                t.raw_data
            };
            if Some(raw.len()) != count.checked_mul(width) {
                return Err(err(format!(
                    "initializer '{}' holds {} bytes; its shape {:?} needs {}",
                    t.name,
                    raw.len(),
                    shape,
                    count * width
                )));
            }
            let v: Vec<f32> = if width == 4 {
                raw.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect()
            } else {
                raw.chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect()
            };
            let arr = ArrayD::from_shape_vec(IxDyn(&shape), v)
                .map_err(|e| err(format!("initializer '{}': {e}", t.name)))?;
            tensors.insert(t.name, arr);
        }
        Ok(Self { tensors })
    }

    /// Every weight rounded to the nearest fp16 value (and kept as f32): what a model stored
    /// with half-precision weights computes with.
    pub fn round_to_half(mut self) -> Self {
        for t in self.tensors.values_mut() {
            t.mapv_inplace(|x| half::f16::from_f32(x).to_f32());
        }
        self
    }

    /// Parses safetensors bytes (`origin` names them in errors).
    pub fn from_bytes(bytes: &[u8], origin: &str) -> Result<Self, WeightsError> {
        let st = SafeTensors::deserialize(bytes).map_err(|e| WeightsError::File {
            path: origin.to_string(),
            reason: format!("not a safetensors file: {e}"),
        })?;
        let mut tensors = BTreeMap::new();
        for (name, view) in st.tensors() {
            let data = view.data();
            let v: Vec<f32> = match view.dtype() {
                Dtype::F32 => data
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
                Dtype::F64 => data
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
                    .collect(),
                Dtype::F16 => data
                    .chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
                Dtype::BF16 => data
                    .chunks_exact(2)
                    .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
                dtype => {
                    return Err(WeightsError::Dtype {
                        path: origin.to_string(),
                        name,
                        dtype,
                    })
                }
            };
            let arr =
                ArrayD::from_shape_vec(IxDyn(view.shape()), v).map_err(|e| WeightsError::File {
                    path: origin.to_string(),
                    reason: format!("tensor '{name}': {e}"),
                })?;
            tensors.insert(name, arr);
        }
        Ok(Self { tensors })
    }

    /// Keeps the tensors under `prefix` (e.g. `ema.`), with the prefix removed. Returns `self`
    /// unchanged when no name has the prefix.
    pub fn strip_prefix(self, prefix: &str) -> Self {
        if !self.tensors.keys().any(|k| k.starts_with(prefix)) {
            return self;
        }
        let tensors = self
            .tensors
            .into_iter()
            .filter_map(|(k, v)| k.strip_prefix(prefix).map(|s| (s.to_string(), v)))
            .collect();
        Self { tensors }
    }

    /// Checks the weights against the names and shapes a network expects; reports every
    /// missing, unexpected and mis-shaped key by name.
    pub fn check(
        &self,
        expected: &[(String, Vec<usize>)],
        origin: &str,
    ) -> Result<(), WeightsError> {
        let found: Vec<(String, Vec<usize>)> = self
            .tensors
            .iter()
            .map(|(k, v)| (k.clone(), v.shape().to_vec()))
            .collect();
        davi_models::check_params(expected, &found).map_err(|details| WeightsError::Mismatch {
            path: origin.to_string(),
            details,
        })
    }
}

/// The bytes of one externally stored tensor (`location`, `offset`, `length` beside `model`).
fn read_external(
    entries: &[crate::proto::StringStringEntryProto],
    model: &Path,
) -> Result<Vec<u8>, String> {
    use std::io::{Read, Seek, SeekFrom};
    let get = |k: &str| {
        entries
            .iter()
            .find(|e| e.key == k)
            .map(|e| e.value.as_str())
    };
    let location = get("location").ok_or("no location")?;
    let rel = Path::new(location);
    if rel.is_absolute()
        || rel
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err(format!("location '{location}' leaves the model's folder"));
    }
    let file = model.with_file_name(rel);
    let parse = |k: &str| -> Result<u64, String> {
        get(k).map_or(Ok(0), |v| {
            v.parse().map_err(|_| format!("{k} '{v}' is not a number"))
        })
    };
    let (offset, length) = (parse("offset")?, parse("length")?);
    let mut f = std::fs::File::open(&file).map_err(|e| format!("{}: {e}", file.display()))?;
    let size = f.metadata().map_err(|e| e.to_string())?.len();
    if offset.checked_add(length).is_none_or(|end| end > size) {
        return Err(format!(
            "{}: bytes {offset}..+{length} lie past its end ({size} bytes)",
            file.display()
        ));
    }
    f.seek(SeekFrom::Start(offset)).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; length as usize];
    f.read_exact(&mut buf).map_err(|e| e.to_string())?;
    Ok(buf)
}
