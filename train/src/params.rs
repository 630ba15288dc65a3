//! Trainable parameter sets: guided-diffusion's initialisation, AdamW, EMA, gradient clipping.

use davi_models::UNetModel;
use std::collections::BTreeMap;
use tch::{Device, Kind, Tensor};

/// Named trainable tensors of one network.
pub struct ParamSet {
    /// The tensors, by guided-diffusion name.
    pub tensors: BTreeMap<String, Tensor>,
}

fn is_zero_module(name: &str) -> bool {
    // guided-diffusion wraps these in zero_module(): residual branches start as identity.
    name.contains(".out_layers.3.") || name.contains(".proj_out.") || name.starts_with("out.2.")
}

fn is_norm(name: &str) -> bool {
    name.contains(".in_layers.0.")
        || name.contains(".out_layers.0.")
        || name.contains(".norm.")
        || name.starts_with("out.0.")
}

impl ParamSet {
    /// Fresh weights initialised as the reference does (PyTorch defaults, zeroed output
    /// convolutions, unit GroupNorm). Deterministic for a given `seed`.
    pub fn init(unet: &UNetModel, seed: i64, device: Device) -> Self {
        tch::manual_seed(seed);
        let mut tensors = BTreeMap::new();
        for (name, shape) in unet.param_shapes() {
            let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
            let t = if is_zero_module(name) {
                Tensor::zeros(&dims, (Kind::Float, device))
            } else if is_norm(name) {
                if name.ends_with(".weight") {
                    Tensor::ones(&dims, (Kind::Float, device))
                } else {
                    Tensor::zeros(&dims, (Kind::Float, device))
                }
            } else if name == "label_emb.weight" {
                Tensor::randn(&dims, (Kind::Float, device))
            } else {
                // kaiming_uniform(a = sqrt 5) for weights and PyTorch's bias rule: U(-1/sqrt(fan_in), +).
                let wname = name.replace(".bias", ".weight");
                let fan_in: usize = unet
                    .param_shapes()
                    .iter()
                    .find(|(n, _)| *n == wname)
                    .map(|(_, s)| s[1..].iter().product())
                    .unwrap_or(1);
                let b = 1.0 / (fan_in as f64).sqrt();
                Tensor::zeros(&dims, (Kind::Float, device)).uniform_(-b, b)
            };
            tensors.insert(name.clone(), t.set_requires_grad(true));
        }
        Self { tensors }
    }

    /// Trainable copies of `src` (e.g. the teacher's weights for `s_psi` and `I_phi`).
    pub fn from_tensors<'a>(src: impl IntoIterator<Item = (&'a String, &'a Tensor)>) -> Self {
        let tensors = src
            .into_iter()
            .map(|(k, v)| (k.clone(), v.detach().copy().set_requires_grad(true)))
            .collect();
        Self { tensors }
    }

    /// Shallow handles for a backend.
    pub fn handles(&self) -> std::collections::HashMap<String, Tensor> {
        self.tensors
            .iter()
            .map(|(k, v)| (k.clone(), v.shallow_clone()))
            .collect()
    }

    /// Detached handles (no gradient flows into this set).
    pub fn frozen(&self) -> std::collections::HashMap<String, Tensor> {
        self.tensors
            .iter()
            .map(|(k, v)| (k.clone(), v.detach()))
            .collect()
    }

    /// Zeroes every gradient.
    pub fn zero_grad(&mut self) {
        for t in self.tensors.values_mut() {
            t.zero_grad();
        }
    }

    /// Clips the global gradient norm to `max`; returns the norm before clipping.
    pub fn clip_grad_norm(&self, max: f64) -> f64 {
        let _g = tch::no_grad_guard();
        let mut sq = 0.0;
        for t in self.tensors.values() {
            let g = t.grad();
            if g.defined() {
                sq += g.square().sum(Kind::Double).double_value(&[]);
            }
        }
        let norm = sq.sqrt();
        if max > 0.0 && norm > max {
            let s = max / (norm + 1e-6);
            for t in self.tensors.values() {
                let mut g = t.grad();
                if g.defined() {
                    let _ = g.g_mul_scalar_(s);
                }
            }
        }
        norm
    }

    /// Named copies for saving, under `prefix`.
    pub fn named(&self, prefix: &str) -> Vec<(String, Tensor)> {
        self.tensors
            .iter()
            .map(|(k, v)| (format!("{prefix}{k}"), v.detach()))
            .collect()
    }

    /// Loads values from `src` (names without prefix) into this set.
    pub fn load_from(
        &mut self,
        src: &std::collections::HashMap<String, Tensor>,
    ) -> anyhow::Result<()> {
        let _g = tch::no_grad_guard();
        for (k, t) in self.tensors.iter_mut() {
            let v = src
                .get(k)
                .ok_or_else(|| anyhow::anyhow!("checkpoint lacks '{k}'"))?;
            t.copy_(v);
        }
        Ok(())
    }
}

/// AdamW (decoupled weight decay), with state that checkpoints save and resume.
pub struct AdamW {
    /// Learning rate.
    pub lr: f64,
    /// Betas.
    pub betas: (f64, f64),
    /// Epsilon.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Steps taken.
    pub step: i64,
    /// First moments.
    pub m: BTreeMap<String, Tensor>,
    /// Second moments.
    pub v: BTreeMap<String, Tensor>,
}

impl AdamW {
    /// Fresh state for `params`.
    pub fn new(params: &ParamSet, lr: f64, weight_decay: f64) -> Self {
        let z = |t: &Tensor| t.zeros_like().detach();
        Self {
            lr,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay,
            step: 0,
            m: params
                .tensors
                .iter()
                .map(|(k, t)| (k.clone(), z(t)))
                .collect(),
            v: params
                .tensors
                .iter()
                .map(|(k, t)| (k.clone(), z(t)))
                .collect(),
        }
    }

    /// One update from the current gradients.
    pub fn step(&mut self, params: &mut ParamSet) {
        let _g = tch::no_grad_guard();
        self.step += 1;
        let (b1, b2) = self.betas;
        let bc1 = 1.0 - b1.powi(self.step as i32);
        let bc2 = 1.0 - b2.powi(self.step as i32);
        for (k, p) in params.tensors.iter_mut() {
            let g = p.grad();
            if !g.defined() {
                continue;
            }
            let m = self.m.get_mut(k).expect("state for every param");
            let v = self.v.get_mut(k).expect("state for every param");
            let _ = m.g_mul_scalar_(b1).g_add_(&(&g * (1.0 - b1)));
            let _ = v.g_mul_scalar_(b2).g_add_(&(g.square() * (1.0 - b2)));
            if self.weight_decay > 0.0 {
                let _ = p.g_mul_scalar_(1.0 - self.lr * self.weight_decay);
            }
            let denom = (&*v / bc2).sqrt() + self.eps;
            let upd = (&*m / bc1) / denom * self.lr;
            let _ = p.g_sub_(&upd);
        }
    }

    /// State for saving, under `prefix`.
    pub fn named(&self, prefix: &str) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = self
            .m
            .iter()
            .map(|(k, t)| (format!("{prefix}m.{k}"), t.shallow_clone()))
            .collect();
        v.extend(
            self.v
                .iter()
                .map(|(k, t)| (format!("{prefix}v.{k}"), t.shallow_clone())),
        );
        v
    }

    /// Restores state saved by [`Self::named`].
    pub fn load_from(
        &mut self,
        all: &std::collections::HashMap<String, Tensor>,
        prefix: &str,
        step: i64,
    ) -> anyhow::Result<()> {
        let _g = tch::no_grad_guard();
        for (which, map) in [("m", &mut self.m), ("v", &mut self.v)] {
            for (k, t) in map.iter_mut() {
                let key = format!("{prefix}{which}.{k}");
                let src = all
                    .get(&key)
                    .ok_or_else(|| anyhow::anyhow!("checkpoint lacks '{key}'"))?;
                t.copy_(src);
            }
        }
        self.step = step;
        Ok(())
    }
}

/// Exponential moving average of a parameter set.
pub struct Ema {
    /// Decay per step.
    pub rate: f64,
    /// The averaged tensors.
    pub tensors: BTreeMap<String, Tensor>,
}

impl Ema {
    /// The averaged tensors under `prefix` (a checkpoint's `ema.`, or none for exported weights).
    pub fn named(&self, prefix: &str) -> Vec<(String, Tensor)> {
        self.tensors
            .iter()
            .map(|(k, v)| (format!("{prefix}{k}"), v.shallow_clone()))
            .collect()
    }

    /// Starts at the current values of `params`.
    pub fn new(params: &ParamSet, rate: f64) -> Self {
        Self {
            rate,
            tensors: params
                .tensors
                .iter()
                .map(|(k, t)| (k.clone(), t.detach().copy()))
                .collect(),
        }
    }

    /// `ema = r * ema + (1 - r) * params` at step `step`, with the warm-up of ema-pytorch
    /// (the official code's EMA): `r = min(rate, 1 - (1 + step)^(-2/3))`, so short runs still average.
    pub fn update(&mut self, params: &ParamSet, step: usize) {
        let _g = tch::no_grad_guard();
        let r = self.rate.min(1.0 - (1.0 + step as f64).powf(-2.0 / 3.0));
        for (k, e) in self.tensors.iter_mut() {
            let p = &params.tensors[k];
            let _ = e.g_mul_scalar_(r).g_add_(&(p.detach() * (1.0 - r)));
        }
    }

    /// Handles for a backend.
    pub fn handles(&self) -> std::collections::HashMap<String, Tensor> {
        self.tensors
            .iter()
            .map(|(k, v)| (k.clone(), v.shallow_clone()))
            .collect()
    }
}
