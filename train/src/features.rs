//! A perceptual score for Fashion-MNIST: PSNR rewards blur, so the field reports FID and KID on
//! the features of a classifier of the data (Inception for natural images; here a small CNN
//! trained on Fashion-MNIST itself, as MNIST-like work does). `davi-train classifier` trains and
//! ships it with its test accuracy; `eval --features` reports FID (full runs) and KID (unbiased
//! at small n, paired runs) on its 128-dimensional penultimate features.

use anyhow::{bail, Context, Result};
use std::path::Path;
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

/// Width of the features.
pub const FEATURES: i64 = 128;

/// The classifier: three conv blocks (32, 64, 128 channels, 3x3, ReLU, 2x2 max-pool) on a
/// 1x32x32 image, a 128-wide ReLU layer (the features), 10 logits.
pub struct Classifier {
    vs: nn::VarStore,
    body: nn::Sequential,
    head: nn::Linear,
}

fn body(p: &nn::Path) -> nn::Sequential {
    let conv = |i, o, n: &str| {
        nn::conv2d(
            p / n,
            i,
            o,
            3,
            nn::ConvConfig {
                padding: 1,
                ..Default::default()
            },
        )
    };
    nn::seq()
        .add(conv(1, 32, "c1"))
        .add_fn(|x| x.relu().max_pool2d_default(2))
        .add(conv(32, 64, "c2"))
        .add_fn(|x| x.relu().max_pool2d_default(2))
        .add(conv(64, 128, "c3"))
        .add_fn(|x| x.relu().max_pool2d_default(2).flatten(1, -1))
        .add(nn::linear(p / "fc", 128 * 16, FEATURES, Default::default()))
        .add_fn(|x| x.relu())
}

impl Classifier {
    /// A fresh network on `device`.
    pub fn new(device: Device) -> Self {
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let body = body(&root);
        let head = nn::linear(&root / "head", FEATURES, 10, Default::default());
        Self { vs, body, head }
    }

    /// Reads weights written by [`Self::save`].
    pub fn load(path: &Path, device: Device) -> Result<Self> {
        let mut c = Self::new(device);
        c.vs.load(path)
            .with_context(|| format!("{}: not the classifier's weights", path.display()))?;
        Ok(c)
    }

    /// Writes the weights (safetensors).
    pub fn save(&self, path: &Path) -> Result<()> {
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d)?;
        }
        self.vs.save(path)?;
        Ok(())
    }

    /// The 128 features of images `[N, 1, 32, 32]` on [-1, 1].
    pub fn features(&self, x: &Tensor) -> Tensor {
        tch::no_grad(|| self.body.forward(&x.to_device(self.vs.device())))
    }

    fn logits(&self, x: &Tensor) -> Tensor {
        self.head.forward(&self.body.forward(x))
    }

    /// Trains on `(images [N,1,32,32], labels [N])` for `epochs`; returns the accuracy on
    /// `test`.
    pub fn train(
        &mut self,
        train: (&Tensor, &Tensor),
        test: (&Tensor, &Tensor),
        epochs: usize,
        seed: i64,
    ) -> Result<f64> {
        tch::manual_seed(seed);
        let mut opt = nn::Adam::default().build(&self.vs, 1e-3)?;
        let dev = self.vs.device();
        let n = train.0.size()[0];
        for _ in 0..epochs {
            let perm = Tensor::randperm(n, (Kind::Int64, Device::Cpu));
            for start in (0..n).step_by(128) {
                let idx = perm.narrow(0, start, 128.min(n - start));
                let (x, y) = (
                    train.0.index_select(0, &idx).to_device(dev),
                    train.1.index_select(0, &idx).to_device(dev),
                );
                let loss = self.logits(&x).cross_entropy_for_logits(&y);
                opt.backward_step(&loss);
            }
        }
        self.accuracy(test)
    }

    /// Share of `test` images classified right.
    pub fn accuracy(&self, test: (&Tensor, &Tensor)) -> Result<f64> {
        let dev = self.vs.device();
        let n = test.0.size()[0];
        let mut right = 0i64;
        for start in (0..n).step_by(500) {
            let m = 500.min(n - start);
            let x = test.0.narrow(0, start, m).to_device(dev);
            let y = test.1.narrow(0, start, m).to_device(dev);
            let pred = tch::no_grad(|| self.logits(&x)).argmax(-1, false);
            right += pred.eq_tensor(&y).sum(Kind::Int64).int64_value(&[]);
        }
        if n == 0 {
            bail!("no test images");
        }
        Ok(right as f64 / n as f64)
    }
}

/// Mean and covariance (f64) of features `[N, D]`.
fn moments(f: &Tensor) -> (Tensor, Tensor) {
    let f = f.to_kind(Kind::Double).to_device(Device::Cpu);
    let n = f.size()[0] as f64;
    let mu = f.mean_dim([0i64].as_slice(), true, Kind::Double);
    let c = &f - &mu;
    let cov = c.tr().matmul(&c) / (n - 1.0).max(1.0);
    (mu, cov)
}

/// The square root of a symmetric positive semi-definite matrix (through its eigenvalues).
fn sqrtm_psd(m: &Tensor) -> Tensor {
    let (w, v) = m.linalg_eigh("L");
    let s = w.clamp_min(0.0).sqrt();
    v.matmul(&s.diag_embed(0, -2, -1)).matmul(&v.tr())
}

/// Fréchet distance between two feature sets: `|mu_a - mu_b|^2 + Tr(C_a + C_b - 2 (C_a^1/2 C_b
/// C_a^1/2)^1/2)`.
pub fn fid(a: &Tensor, b: &Tensor) -> f64 {
    let (ma, ca) = moments(a);
    let (mb, cb) = moments(b);
    let ra = sqrtm_psd(&ca);
    let cross = sqrtm_psd(&ra.matmul(&cb).matmul(&ra));
    let d = (ma - mb).square().sum(Kind::Double);
    (d + ca.trace() + cb.trace() - cross.trace() * 2.0).double_value(&[])
}

/// Kernel inception distance: the unbiased squared MMD with the cubic polynomial kernel
/// `k(x, y) = (x.y / D + 1)^3`, fair at small n (FID is biased there).
pub fn kid(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_kind(Kind::Double).to_device(Device::Cpu);
    let b = b.to_kind(Kind::Double).to_device(Device::Cpu);
    let d = a.size()[1] as f64;
    let k = |x: &Tensor, y: &Tensor| (x.matmul(&y.tr()) / d + 1.0).pow_tensor_scalar(3);
    let (m, n) = (a.size()[0] as f64, b.size()[0] as f64);
    let off = |kk: Tensor, size: f64| {
        (kk.sum(Kind::Double) - kk.diagonal(0, 0, 1).sum(Kind::Double)).double_value(&[])
            / (size * (size - 1.0)).max(1.0)
    };
    off(k(&a, &a), m) + off(k(&b, &b), n) - 2.0 * k(&a, &b).mean(Kind::Double).double_value(&[])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distances_are_zero_on_equal_sets_and_grow_with_a_shift() {
        let _rng = crate::global_rng();
        tch::manual_seed(1);
        let a = Tensor::randn([400, 8], (Kind::Float, Device::Cpu));
        assert!(fid(&a, &a).abs() < 1e-6, "{}", fid(&a, &a));
        let b = Tensor::randn([400, 8], (Kind::Float, Device::Cpu));
        let shifted = &b + 1.0;
        // Same distribution: small; shifted by 1 in each of 8 dims: FID about 8.
        assert!(fid(&a, &b) < 0.5, "{}", fid(&a, &b));
        assert!(
            (fid(&a, &shifted) - 8.0).abs() < 1.0,
            "{}",
            fid(&a, &shifted)
        );
        assert!(kid(&a, &b).abs() < 0.05, "{}", kid(&a, &b));
        assert!(kid(&a, &shifted) > 0.5, "{}", kid(&a, &shifted));
    }
}
