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
    /// Reads every tensor of a safetensors file as f32.
    pub fn load(path: &Path) -> Result<Self, WeightsError> {
        let p = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| WeightsError::File {
            path: p.clone(),
            reason: e.to_string(),
        })?;
        Self::from_bytes(&bytes, &p)
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
