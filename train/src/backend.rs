//! The libtorch backend of the model code.

use davi_models::{Backend, Error, Result};
use ndarray::ArrayD;
use std::collections::HashMap;
use tch::{Device, Kind, Tensor};

/// Named weights on a device, and whether dropout is active.
pub struct TchBackend {
    /// Parameters by guided-diffusion name.
    pub params: HashMap<String, Tensor>,
    /// Device of the weights and of every constant made.
    pub device: Device,
    /// Training mode (dropout on).
    pub train: bool,
}

impl TchBackend {
    /// A backend over `params`, in eval mode.
    pub fn new(params: HashMap<String, Tensor>, device: Device) -> Self {
        Self {
            params,
            device,
            train: false,
        }
    }
}

/// An ndarray as a tch tensor on `device`.
pub fn tensor_from_array(a: &ArrayD<f32>, device: Device) -> Tensor {
    let shape: Vec<i64> = a.shape().iter().map(|&d| d as i64).collect();
    let data: Vec<f32> = a.iter().copied().collect();
    Tensor::from_slice(&data).reshape(&shape).to_device(device)
}

/// A tch tensor as an f32 ndarray (copied to the CPU).
pub fn array_from_tensor(t: &Tensor) -> ArrayD<f32> {
    let t = t.to_kind(Kind::Float).to_device(Device::Cpu).contiguous();
    let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
    let n: usize = shape.iter().product();
    let mut v = vec![0f32; n];
    t.copy_data(&mut v, n);
    ArrayD::from_shape_vec(shape, v).expect("shape matches data")
}

impl Backend for TchBackend {
    type Tensor = Tensor;

    fn param(&self, name: &str) -> Result<Tensor> {
        self.params
            .get(name)
            .map(|t| t.shallow_clone())
            .ok_or_else(|| Error::MissingParam(name.to_string()))
    }
    fn constant(&self, value: ArrayD<f32>) -> Tensor {
        tensor_from_array(&value, self.device)
    }
    fn identity(&self, x: &Tensor) -> Tensor {
        x.shallow_clone()
    }
    fn conv2d(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        stride: usize,
        padding: usize,
        groups: usize,
    ) -> Tensor {
        let (s, p) = (stride as i64, padding as i64);
        x.conv2d(w, b, [s, s], [p, p], [1, 1], groups as i64)
    }
    fn linear(&self, x: &Tensor, w: &Tensor, b: &Tensor) -> Tensor {
        x.linear(w, Some(b))
    }
    fn group_norm(&self, x: &Tensor, groups: usize, w: &Tensor, b: &Tensor, eps: f64) -> Tensor {
        x.group_norm(groups as i64, Some(w), Some(b), eps, true)
    }
    fn silu(&self, x: &Tensor) -> Tensor {
        x.silu()
    }
    fn dropout(&self, x: &Tensor, p: f64) -> Tensor {
        if self.train && p > 0.0 {
            x.dropout(p, true)
        } else {
            x.shallow_clone()
        }
    }
    fn tanh(&self, x: &Tensor) -> Tensor {
        x.tanh()
    }
    fn add(&self, a: &Tensor, b: &Tensor) -> Tensor {
        a + b
    }
    fn sub(&self, a: &Tensor, b: &Tensor) -> Tensor {
        a - b
    }
    fn mul(&self, a: &Tensor, b: &Tensor) -> Tensor {
        a * b
    }
    fn scale(&self, x: &Tensor, s: f32) -> Tensor {
        x * (s as f64)
    }
    fn add_scalar(&self, x: &Tensor, s: f32) -> Tensor {
        x + (s as f64)
    }
    fn matmul(&self, a: &Tensor, b: &Tensor) -> Tensor {
        a.matmul(b)
    }
    fn softmax_last(&self, x: &Tensor) -> Tensor {
        x.softmax(-1, Kind::Float)
    }
    fn reshape(&self, x: &Tensor, shape: &[i64]) -> Tensor {
        x.reshape(shape)
    }
    fn permute(&self, x: &Tensor, perm: &[usize]) -> Tensor {
        let p: Vec<i64> = perm.iter().map(|&d| d as i64).collect();
        x.permute(&p)
    }
    fn narrow(&self, x: &Tensor, dim: usize, start: usize, len: usize) -> Tensor {
        x.narrow(dim as i64, start as i64, len as i64)
    }
    fn concat(&self, xs: &[&Tensor], dim: usize) -> Tensor {
        Tensor::cat(xs, dim as i64)
    }
    fn upsample_nearest2x(&self, x: &Tensor) -> Tensor {
        let s = x.size();
        x.upsample_nearest2d([s[2] * 2, s[3] * 2], None, None)
    }
    fn avg_pool2d(&self, x: &Tensor, k: usize) -> Tensor {
        let k = k as i64;
        x.avg_pool2d([k, k], [k, k], [0, 0], false, true, None)
    }
    fn resize_bilinear(&self, x: &Tensor, h: usize, w: usize) -> Tensor {
        x.upsample_bilinear2d([h as i64, w as i64], false, None, None)
    }
}
