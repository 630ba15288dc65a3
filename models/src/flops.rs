//! Shapes and floating-point operation counts of the model code, by running it on a backend whose
//! tensors are shapes. One multiply-add counts as two operations.

use crate::backend::Backend;
use crate::{Error, Result};
use ndarray::ArrayD;
use std::cell::Cell;
use std::collections::HashMap;

/// A backend whose tensors are their shapes; it adds up the work of convolutions and matrix
/// products (`linear`, `matmul`), the ops that dominate the UNet.
#[derive(Debug, Default)]
pub struct ShapeBackend {
    shapes: HashMap<String, Vec<i64>>,
    conv: Cell<f64>,
    matmul: Cell<f64>,
}

impl ShapeBackend {
    /// A backend that knows the parameter shapes (e.g. [`crate::UNetModel::param_shapes`]).
    pub fn new(params: &[(String, Vec<usize>)]) -> Self {
        Self {
            shapes: params
                .iter()
                .map(|(k, s)| (k.clone(), s.iter().map(|&d| d as i64).collect()))
                .collect(),
            ..Default::default()
        }
    }

    /// Operations in convolutions so far.
    pub fn conv_flops(&self) -> f64 {
        self.conv.get()
    }

    /// Operations in `linear` and `matmul` so far.
    pub fn matmul_flops(&self) -> f64 {
        self.matmul.get()
    }
}

fn broadcast(a: &[i64], b: &[i64]) -> Vec<i64> {
    let n = a.len().max(b.len());
    let at = |s: &[i64], i: usize| {
        let off = n - s.len();
        if i < off {
            1
        } else {
            s[i - off]
        }
    };
    (0..n).map(|i| at(a, i).max(at(b, i))).collect()
}

impl Backend for ShapeBackend {
    type Tensor = Vec<i64>;

    fn param(&self, name: &str) -> Result<Vec<i64>> {
        self.shapes
            .get(name)
            .cloned()
            .ok_or_else(|| Error::MissingParam(name.to_string()))
    }
    fn constant(&self, value: ArrayD<f32>) -> Vec<i64> {
        value.shape().iter().map(|&d| d as i64).collect()
    }
    fn identity(&self, x: &Vec<i64>) -> Vec<i64> {
        x.clone()
    }
    fn conv2d(
        &self,
        x: &Vec<i64>,
        w: &Vec<i64>,
        _b: Option<&Vec<i64>>,
        stride: usize,
        padding: usize,
        _groups: usize,
    ) -> Vec<i64> {
        let (s, p) = (stride as i64, padding as i64);
        let ho = (x[2] + 2 * p - w[2]) / s + 1;
        let wo = (x[3] + 2 * p - w[3]) / s + 1;
        let macs = x[0] * w[0] * ho * wo * w[1] * w[2] * w[3];
        self.conv.set(self.conv.get() + 2.0 * macs as f64);
        vec![x[0], w[0], ho, wo]
    }
    fn linear(&self, x: &Vec<i64>, w: &Vec<i64>, _b: &Vec<i64>) -> Vec<i64> {
        self.matmul
            .set(self.matmul.get() + 2.0 * (x[0] * w[0] * w[1]) as f64);
        vec![x[0], w[0]]
    }
    fn group_norm(
        &self,
        x: &Vec<i64>,
        _g: usize,
        _w: &Vec<i64>,
        _b: &Vec<i64>,
        _e: f64,
    ) -> Vec<i64> {
        x.clone()
    }
    fn silu(&self, x: &Vec<i64>) -> Vec<i64> {
        x.clone()
    }
    fn dropout(&self, x: &Vec<i64>, _p: f64) -> Vec<i64> {
        x.clone()
    }
    fn tanh(&self, x: &Vec<i64>) -> Vec<i64> {
        x.clone()
    }
    fn add(&self, a: &Vec<i64>, b: &Vec<i64>) -> Vec<i64> {
        broadcast(a, b)
    }
    fn sub(&self, a: &Vec<i64>, b: &Vec<i64>) -> Vec<i64> {
        broadcast(a, b)
    }
    fn mul(&self, a: &Vec<i64>, b: &Vec<i64>) -> Vec<i64> {
        broadcast(a, b)
    }
    fn scale(&self, x: &Vec<i64>, _s: f32) -> Vec<i64> {
        x.clone()
    }
    fn add_scalar(&self, x: &Vec<i64>, _s: f32) -> Vec<i64> {
        x.clone()
    }
    fn matmul(&self, a: &Vec<i64>, b: &Vec<i64>) -> Vec<i64> {
        let (n, k) = (a.len(), b.len());
        let mut out = broadcast(&a[..n - 2], &b[..k - 2]);
        out.extend([a[n - 2], b[k - 1]]);
        let batch: i64 = out[..out.len() - 2].iter().product();
        self.matmul
            .set(self.matmul.get() + 2.0 * (batch * a[n - 2] * a[n - 1] * b[k - 1]) as f64);
        out
    }
    fn softmax_last(&self, x: &Vec<i64>) -> Vec<i64> {
        x.clone()
    }
    fn reshape(&self, x: &Vec<i64>, shape: &[i64]) -> Vec<i64> {
        let total: i64 = x.iter().product();
        let known: i64 = shape.iter().filter(|&&d| d != -1).product();
        shape
            .iter()
            .map(|&d| if d == -1 { total / known } else { d })
            .collect()
    }
    fn permute(&self, x: &Vec<i64>, perm: &[usize]) -> Vec<i64> {
        perm.iter().map(|&p| x[p]).collect()
    }
    fn narrow(&self, x: &Vec<i64>, dim: usize, _start: usize, len: usize) -> Vec<i64> {
        let mut s = x.clone();
        s[dim] = len as i64;
        s
    }
    fn concat(&self, xs: &[&Vec<i64>], dim: usize) -> Vec<i64> {
        let mut s = xs[0].clone();
        s[dim] = xs.iter().map(|x| x[dim]).sum();
        s
    }
    fn upsample_nearest2x(&self, x: &Vec<i64>) -> Vec<i64> {
        let n = x.len();
        let mut s = x.clone();
        s[n - 2] *= 2;
        s[n - 1] *= 2;
        s
    }
    fn avg_pool2d(&self, x: &Vec<i64>, k: usize) -> Vec<i64> {
        let n = x.len();
        let mut s = x.clone();
        s[n - 2] /= k as i64;
        s[n - 1] /= k as i64;
        s
    }
    fn resize_bilinear(&self, x: &Vec<i64>, h: usize, w: usize) -> Vec<i64> {
        let n = x.len();
        let mut s = x.clone();
        s[n - 2] = h as i64;
        s[n - 1] = w as i64;
        s
    }
}

/// Operations of one UNet forward at batch 1: `(convolutions, matrix products)`.
pub fn unet_flops(unet: &crate::UNetModel) -> Result<(f64, f64)> {
    let b = ShapeBackend::new(unet.param_shapes());
    let c = &unet.config;
    let x = vec![
        1,
        c.in_channels as i64,
        c.image_size as i64,
        c.image_size as i64,
    ];
    let class = c.num_classes.map(|_| vec![1, 4 * c.model_channels as i64]);
    let out = unet.forward(&b, &x, &[0.0], class.as_ref())?;
    debug_assert_eq!(out[1], c.out_channels as i64);
    Ok((b.conv_flops(), b.matmul_flops()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conv_and_matmul_counts_are_the_formulas() {
        let b = ShapeBackend::new(&[("w".into(), vec![8, 4, 3, 3])]);
        let w = b.param("w").unwrap();
        let y = b.conv2d(&vec![2, 4, 16, 16], &w, None, 2, 1, 1);
        assert_eq!(y, vec![2, 8, 8, 8]);
        assert_eq!(b.conv_flops(), 2.0 * (2 * 8 * 8 * 8 * 4 * 9) as f64);
        let z = b.matmul(&vec![2, 3, 5, 7], &vec![7, 4]);
        assert_eq!(z, vec![2, 3, 5, 4]);
        assert_eq!(b.matmul_flops(), 2.0 * (6 * 5 * 7 * 4) as f64);
        assert_eq!(b.reshape(&vec![2, 3, 5, 4], &[-1, 20]), vec![6, 20]);
        assert!(b.param("nope").is_err());
    }

    #[test]
    fn unet_count_covers_every_conv_once_at_its_resolution() {
        let cfg: crate::UNetConfig = serde_yaml::from_str(
            "image_size: 16\nin_channels: 1\nmodel_channels: 32\nout_channels: 1\nnum_res_blocks: 1\nattention_resolutions: []\nchannel_mult: [1]\n",
        )
        .unwrap();
        let unet = crate::UNetModel::new(&cfg).unwrap();
        let (conv, _) = unet_flops(&unet).unwrap();
        // One level, no resampling: every 3x3 / 1x1 conv runs at 16x16, so the count is
        // 2 * 256 * (sum of conv weight sizes).
        let weights: usize = unet
            .param_shapes()
            .iter()
            .filter(|(_, s)| s.len() == 4)
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        assert_eq!(conv, 2.0 * 256.0 * weights as f64);
    }
}
