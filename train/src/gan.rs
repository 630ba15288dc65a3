//! The optional adversarial term of DAVI training: a PatchGAN discriminator (pix2pix's
//! `NLayerDiscriminator`: 4x4 convolutions, LeakyReLU 0.2, batch-statistics normalisation), hinge
//! losses, and the VQGAN-style adaptive weight that scales the generator term by the ratio of
//! gradient norms at `I_phi`'s last layer.

use crate::params::{AdamW, ParamSet};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use tch::{Device, Kind, Tensor};

/// `train.davi.gan` of a config: present turns the term on.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GanConfig {
    /// Factor on the adaptive weight (VQGAN's `disc_weight`).
    pub weight: f64,
    /// Strided layers of the discriminator (3 in pix2pix; patches of 32 px images are then 2x2).
    pub layers: usize,
    /// Channels of its first layer.
    pub ndf: usize,
    /// Step at which the discriminator and the generator term start (VQGAN's `disc_start`).
    pub start: usize,
    /// Learning rate of the discriminator's AdamW; 0: that of `I_phi`.
    pub lr: f64,
    /// Its AdamW betas: pix2pix's (0.5, 0.9) by default; the official DAVI code keeps PyTorch's
    /// (0.9, 0.999).
    pub betas: (f64, f64),
    /// Its decoupled weight decay: 0 by default; PyTorch's AdamW default 0.01 officially.
    pub weight_decay: f64,
    /// Weight of the feature-matching term added to the generator's hinge term: the L1 distance
    /// between the discriminator's intermediate activations on `x_hat` and on `x0` (0: off).
    pub feature_matching: f64,
    /// What the adaptive weight balances the generator term against: `total` (VQGAN's
    /// reconstruction, here the whole DAVI loss) or `ground_truth` (the ground-truth term before
    /// `reg_coeff`, as the official DAVI code does).
    pub adaptive_from: AdaptiveFrom,
    /// Clip of the adaptive weight's ratio before `weight` scales it (official: [0.01, 10]).
    pub weight_clip: (f64, f64),
    /// Zero padding of every 4x4 convolution: pix2pix's 1 by default; 2 in the official DAVI
    /// code (pix2pixHD's, which keeps 7x7 patches at 32 px where 1 keeps 2x2).
    pub padding: usize,
    /// The `I_phi` weight at which the adaptive weight compares gradient norms: VQGAN's last
    /// layer (`out.2.weight`) by default; the official DAVI code takes the last ResBlock's
    /// final convolution (`output_blocks.{last}.0.out_layers.3.weight`).
    pub adaptive_layer: String,
}

/// The loss the adaptive weight compares the generator term with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdaptiveFrom {
    /// The whole `I_phi` loss.
    Total,
    /// The ground-truth term before `reg_coeff` (the official code's `gt_consistency_loss`).
    GroundTruth,
}

impl Default for GanConfig {
    fn default() -> Self {
        Self {
            weight: 0.1,
            layers: 3,
            ndf: 64,
            start: 0,
            lr: 0.0,
            betas: (0.5, 0.9),
            weight_decay: 0.0,
            feature_matching: 0.0,
            adaptive_from: AdaptiveFrom::Total,
            weight_clip: (0.0, 1e4),
            padding: 1,
            adaptive_layer: "out.2.weight".into(),
        }
    }
}

/// One convolution of the discriminator: (name, in, out, stride, has_bias, normalised).
type Layer = (String, usize, usize, i64, bool, bool);

/// The discriminator, its optimizer and its layout.
pub struct PatchGan {
    /// Hyperparameters.
    pub cfg: GanConfig,
    /// Weights (`main.N.weight`, `main.N.bias`, `norm.N.weight`, `norm.N.bias`).
    pub params: ParamSet,
    /// Adam (no weight decay) with betas (0.5, 0.9).
    pub opt: AdamW,
    layers: Vec<Layer>,
}

/// The side of the discriminator's patch grid on `size` px images: `layers` stride-2 4x4
/// convolutions, then two stride-1 ones, each padded by `padding`.
fn patch_side(size: usize, layers: usize, padding: usize) -> i64 {
    let conv = |n: i64, stride: i64| (n + 2 * padding as i64 - 4).div_euclid(stride) + 1;
    let mut n = size as i64;
    for _ in 0..layers {
        n = conv(n, 2);
    }
    conv(conv(n, 1), 1)
}

fn layout(c: usize, cfg: &GanConfig) -> Vec<Layer> {
    let mut v = vec![("main.0".to_string(), c, cfg.ndf, 2, true, false)];
    let mut mult = 1;
    for n in 1..=cfg.layers {
        let prev = mult;
        mult = (1 << n).min(8);
        let stride = if n < cfg.layers { 2 } else { 1 };
        v.push((
            format!("main.{n}"),
            cfg.ndf * prev,
            cfg.ndf * mult,
            stride,
            false,
            true,
        ));
    }
    v.push((
        format!("main.{}", cfg.layers + 1),
        cfg.ndf * mult,
        1,
        1,
        true,
        false,
    ));
    v
}

impl PatchGan {
    /// A discriminator for `c`-channel images of side `size`, initialised as pix2pix does (conv
    /// weights N(0, 0.02), norm weights N(1, 0.02), biases 0). Deterministic for a given `seed`.
    pub fn new(
        c: usize,
        size: usize,
        cfg: GanConfig,
        lr: f64,
        seed: i64,
        device: Device,
    ) -> Result<Self> {
        if cfg.layers == 0 || cfg.ndf == 0 {
            bail!("gan: layers and ndf must be positive");
        }
        if patch_side(size, cfg.layers, cfg.padding) < 1 {
            let most = (1..cfg.layers)
                .rev()
                .find(|&l| patch_side(size, l, cfg.padding) >= 1)
                .unwrap_or(0);
            bail!(
                "gan: {} layers are too deep for {size} px images with padding {} (patches would vanish); use at most {most}",
                cfg.layers,
                cfg.padding
            );
        }
        tch::manual_seed(seed);
        let layers = layout(c, &cfg);
        let mut tensors = BTreeMap::new();
        let opts = (Kind::Float, device);
        for (name, cin, cout, _, bias, norm) in &layers {
            let (cin, cout) = (*cin as i64, *cout as i64);
            tensors.insert(
                format!("{name}.weight"),
                Tensor::randn([cout, cin, 4, 4], opts) * 0.02,
            );
            if *bias {
                tensors.insert(format!("{name}.bias"), Tensor::zeros([cout], opts));
            }
            if *norm {
                let n = name.replace("main.", "norm.");
                tensors.insert(
                    format!("{n}.weight"),
                    Tensor::randn([cout], opts) * 0.02 + 1.0,
                );
                tensors.insert(format!("{n}.bias"), Tensor::zeros([cout], opts));
            }
        }
        let params = ParamSet::from_tensors(tensors.iter());
        let mut opt = AdamW::new(
            &params,
            if cfg.lr > 0.0 { cfg.lr } else { lr },
            cfg.weight_decay,
        );
        opt.betas = cfg.betas;
        Ok(Self {
            cfg,
            params,
            opt,
            layers,
        })
    }

    /// Patch logits `[N, 1, P, P]` of images `x` in [-1, 1] (gradients reach the weights).
    pub fn logits(&self, x: &Tensor) -> Tensor {
        self.logits_with(&self.params.handles(), x)
    }

    /// Patch logits with the weights held fixed: the generator's term, whose gradient goes to
    /// `x` only.
    pub fn logits_frozen(&self, x: &Tensor) -> Tensor {
        self.logits_with(&self.params.frozen(), x)
    }

    /// The generator's term on `x_hat` with the discriminator's weights fixed: the hinge term
    /// `-mean D(x_hat)`, plus `feature_matching` times the L1 distance of the intermediate
    /// activations on `x_hat` and on `x0` (those of `x0` without gradient).
    pub fn generator_term(&self, x_hat: &Tensor, x0: &Tensor) -> Tensor {
        let p = self.params.frozen();
        let mut fake = Vec::new();
        let logits = self.run(&p, x_hat, Some(&mut fake));
        let hinge = -logits.mean(Kind::Float);
        if self.cfg.feature_matching <= 0.0 {
            return hinge;
        }
        let mut real = Vec::new();
        let _ = tch::no_grad(|| self.run(&p, x0, Some(&mut real)));
        let fm = fake
            .iter()
            .zip(&real)
            .map(|(a, b)| (a - b.detach()).abs().mean(Kind::Float))
            .fold(
                Tensor::zeros([], (Kind::Float, x_hat.device())),
                |acc, t| acc + t,
            );
        hinge + fm * self.cfg.feature_matching
    }

    fn logits_with(&self, p: &std::collections::HashMap<String, Tensor>, x: &Tensor) -> Tensor {
        self.run(p, x, None)
    }

    /// The discriminator on `x`; the activations after each hidden layer go to `features`.
    fn run(
        &self,
        p: &std::collections::HashMap<String, Tensor>,
        x: &Tensor,
        mut features: Option<&mut Vec<Tensor>>,
    ) -> Tensor {
        let last = self.layers.len() - 1;
        let mut h = x.shallow_clone();
        for (i, (name, _, _, stride, bias, norm)) in self.layers.iter().enumerate() {
            let b = if *bias {
                Some(&p[&format!("{name}.bias")])
            } else {
                None
            };
            h = h.conv2d(
                &p[&format!("{name}.weight")],
                b,
                [*stride, *stride],
                [self.cfg.padding as i64; 2],
                [1, 1],
                1,
            );
            if *norm {
                let n = name.replace("main.", "norm.");
                h = h.batch_norm(
                    Some(&p[&format!("{n}.weight")]),
                    Some(&p[&format!("{n}.bias")]),
                    None::<&Tensor>,
                    None::<&Tensor>,
                    true,
                    0.1,
                    1e-5,
                    false,
                );
            }
            if i != last {
                h = h.maximum(&(&h * 0.2)); // LeakyReLU(0.2)
                if let Some(f) = features.as_deref_mut() {
                    f.push(h.shallow_clone());
                }
            }
        }
        h
    }

    /// Hinge loss of the discriminator: `(mean relu(1 - D(real)) + mean relu(1 + D(fake))) / 2`.
    pub fn d_loss(&self, real: &Tensor, fake: &Tensor) -> Tensor {
        d_hinge(&self.logits(real), &self.logits(fake))
    }

    /// One discriminator update on `real` and (detached) `fake`; returns its loss.
    pub fn step(&mut self, real: &Tensor, fake: &Tensor) -> f64 {
        let loss = self.d_loss(real, &fake.detach());
        self.params.zero_grad();
        loss.backward();
        self.opt.step(&mut self.params);
        loss.double_value(&[])
    }
}

/// The discriminator's hinge loss from its logits.
pub fn d_hinge(real: &Tensor, fake: &Tensor) -> Tensor {
    ((-real + 1.0).relu().mean(Kind::Float) + (fake + 1.0).relu().mean(Kind::Float)) * 0.5
}

/// VQGAN's adaptive weight: `||d rec / d last|| / (||d gen / d last|| + 1e-4)`, clamped to
/// [0, 1e4] and detached. Both losses keep their graphs.
pub fn adaptive_weight(rec: &Tensor, gen: &Tensor, last: &Tensor) -> f64 {
    adaptive_weight_clipped(rec, gen, last, (0.0, 1e4))
}

/// [`adaptive_weight`] with the ratio clipped to `clip`.
pub fn adaptive_weight_clipped(rec: &Tensor, gen: &Tensor, last: &Tensor, clip: (f64, f64)) -> f64 {
    let g_rec = Tensor::run_backward(&[rec], &[last], true, false);
    let g_gen = Tensor::run_backward(&[gen], &[last], true, false);
    let n_rec = g_rec[0].norm().double_value(&[]);
    let n_gen = g_gen[0].norm().double_value(&[]);
    (n_rec / (n_gen + 1e-4)).clamp(clip.0, clip.1)
}
