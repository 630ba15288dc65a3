//! The libtorch backend of the model code.

use davi_models::{Backend, Error, Implicit, Result, UNetModel};
use ndarray::ArrayD;
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::collections::HashMap;
use tch::{Device, Kind, Tensor};

/// The precision of the matrix products (convolutions, linear layers, attention products).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in f32 (the default).
    #[default]
    F32,
    /// Autocast as the field does it on GPUs: convolutions, linear layers and matrix products
    /// take bf16 inputs and weights (f32 accumulation in the kernels) and hand back f32;
    /// normalisations, softmax, element-wise ops and the weights themselves stay f32. The same
    /// on CPU and CUDA, so it is tested on the CPU.
    Bf16,
}

/// Named weights on a device, and whether dropout is active.
pub struct TchBackend {
    /// Parameters by guided-diffusion name.
    pub params: HashMap<String, Tensor>,
    /// Device of the weights and of every constant made.
    pub device: Device,
    /// Training mode (dropout on).
    pub train: bool,
    /// Precision of the matrix products.
    pub precision: Precision,
    /// Gradient checkpointing: [`unet_forward`] keeps only block boundaries and recomputes the
    /// blocks in [`TchBackend::backward_checkpoints`] (see [`crate::recompute`]).
    pub checkpointing: bool,
    /// The tapes of the checkpointed forwards since the last backward.
    pub(crate) tapes: RefCell<Vec<crate::recompute::Tape>>,
}

impl TchBackend {
    /// A backend over `params`, in eval mode.
    pub fn new(params: HashMap<String, Tensor>, device: Device) -> Self {
        Self {
            params,
            device,
            train: false,
            precision: Precision::F32,
            checkpointing: false,
            tapes: RefCell::new(Vec::new()),
        }
    }

    /// A backend over trainable `params`: dropout on, with the memory options of the run.
    pub fn training(
        params: HashMap<String, Tensor>,
        device: Device,
        precision: Precision,
        checkpointing: bool,
    ) -> Self {
        Self {
            train: true,
            precision,
            checkpointing,
            ..Self::new(params, device)
        }
    }

    /// The same backend with matrix products in `precision`.
    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.precision = precision;
        self
    }

    /// After `loss.backward()`: the backward pass through the blocks of every checkpointed
    /// forward made on this backend since the last call (a no-op without checkpointing). The
    /// parameters' gradients are complete only after this.
    pub fn backward_checkpoints(&self) -> davi_models::Result<()> {
        let tapes: Vec<_> = self.tapes.borrow_mut().drain(..).collect();
        for tape in tapes.into_iter().rev() {
            tape.backward(self)?;
        }
        Ok(())
    }

    fn low(&self, t: &Tensor) -> Tensor {
        t.to_kind(Kind::BFloat16)
    }
}

/// The UNet's forward on `b`: block by block with a tape when `b.checkpointing`, else
/// [`UNetModel::forward`] (same values either way).
pub fn unet_forward(
    unet: &UNetModel,
    b: &TchBackend,
    x: &Tensor,
    timesteps: &[f32],
    class_emb: Option<&Tensor>,
) -> davi_models::Result<Tensor> {
    if !b.checkpointing {
        return unet.forward(b, x, timesteps, class_emb);
    }
    let (out, tape) = crate::recompute::Tape::forward(unet, b, x, timesteps, class_emb)?;
    b.tapes.borrow_mut().push(tape);
    Ok(out)
}

/// [`Implicit::output_map`] with the network run through [`unet_forward`].
pub fn output_map(
    implicit: &Implicit,
    b: &TchBackend,
    x_a: &Tensor,
    steps: &[usize],
) -> davi_models::Result<Tensor> {
    let t: Vec<f32> = steps.iter().map(|&a| a as f32).collect();
    let out = unet_forward(&implicit.unet, b, x_a, &t, None)?;
    Ok(implicit.output_from(b, x_a, steps, out))
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
        let g = groups as i64;
        match self.precision {
            Precision::F32 => x.conv2d(w, b, [s, s], [p, p], [1, 1], g),
            Precision::Bf16 => {
                let b = b.map(|b| self.low(b));
                self.low(x)
                    .conv2d(&self.low(w), b.as_ref(), [s, s], [p, p], [1, 1], g)
                    .to_kind(Kind::Float)
            }
        }
    }
    fn linear(&self, x: &Tensor, w: &Tensor, b: &Tensor) -> Tensor {
        match self.precision {
            Precision::F32 => x.linear(w, Some(b)),
            Precision::Bf16 => self
                .low(x)
                .linear(&self.low(w), Some(self.low(b)))
                .to_kind(Kind::Float),
        }
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
        match self.precision {
            Precision::F32 => a.matmul(b),
            Precision::Bf16 => self.low(a).matmul(&self.low(b)).to_kind(Kind::Float),
        }
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
