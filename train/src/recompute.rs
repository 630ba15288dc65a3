//! Gradient checkpointing of the UNet's blocks (Chen et al. 2016; `torch.utils.checkpoint`, which
//! guided-diffusion applies per block with `use_checkpoint`).
//!
//! libtorch has no custom autograd function through `tch`, so the backward pass is run here
//! block by block. [`Tape::forward`] runs every input, middle and output block without a graph and
//! keeps only their outputs; the head `out` runs with a graph from a leaf. After the caller's
//! `loss.backward()` has filled that leaf's gradient `g`, [`Tape::backward`] walks the blocks in
//! reverse: it recomputes block `k` with a graph from leaves of its inputs, back-propagates
//! `sum(block_k(...) * g)`, which adds the block's parameter gradients and yields the gradients of
//! its inputs, and routes those to the previous block and to the skip connection; the time
//! embedding's gradient is summed over blocks and sent through `time_embed` at the end.
//!
//! Memory then holds the block outputs plus one block's graph at a time, instead of every
//! activation of every layer; the price is a second forward of each block. With dropout active the
//! forward draws each block's mask from its own seed and the recompute replays it, so the
//! gradients are those of the forward that was run. Without dropout nothing random is drawn and a
//! checkpointed run is equal to a plain one.
//!
//! The network's input and class embedding keep their own graphs; the tape back-propagates into
//! them once, after the caller's backward, so the caller's loss must not also reach them through
//! an op that saves tensors (no training loop here does: `x_t` and `x_a` carry no graph).

use crate::backend::TchBackend;
use davi_models::{Error, Result, UNetModel};
use tch::{Device, Kind, Tensor};

/// What the backward pass of one checkpointed forward needs.
pub struct Tape {
    unet: UNetModel,
    /// The network's input, with whatever graph it has.
    x: Tensor,
    timesteps: Vec<f32>,
    class_emb: Option<Tensor>,
    /// Outputs of the input blocks (the skip connections), without graph.
    hs: Vec<Tensor>,
    /// Output of the middle block.
    mid: Tensor,
    /// Outputs of the output blocks but the last.
    outs: Vec<Tensor>,
    /// The head's input: a leaf whose gradient the caller's backward fills.
    head_in: Tensor,
    /// Per-block dropout seeds (input blocks, middle, output blocks), when dropout is active.
    seeds: Option<Vec<i64>>,
}

fn leaf(t: &Tensor) -> Tensor {
    t.detach().set_requires_grad(true)
}

fn add_grad(acc: &mut Option<Tensor>, g: Tensor) {
    if !g.defined() {
        return;
    }
    *acc = Some(match acc.take() {
        Some(a) => a + g,
        None => g,
    });
}

fn reseed(seeds: &Option<Vec<i64>>, k: usize) {
    if let Some(s) = seeds {
        tch::manual_seed(s[k]);
    }
}

/// `sum(out * g)` back-propagated: the vector-Jacobian product of `out` with `g`.
fn vjp(out: &Tensor, g: &Tensor) {
    (out * g).sum(Kind::Float).backward();
}

impl Tape {
    /// The checkpointed forward of `unet` on `b`: its output (with a graph through the head
    /// only) and the tape.
    pub fn forward(
        unet: &UNetModel,
        b: &TchBackend,
        x: &Tensor,
        timesteps: &[f32],
        class_emb: Option<&Tensor>,
    ) -> Result<(Tensor, Tape)> {
        let n_in = unet.num_input_blocks();
        let n_out = unet.num_output_blocks();
        let seeds = (b.train && unet.config.dropout > 0.0).then(|| {
            // One draw from the global generator names every block's seed; the generator is
            // then re-seeded from it, so the stream after this forward stays deterministic.
            let base = Tensor::randint(1 << 40, [1], (Kind::Int64, Device::Cpu)).int64_value(&[0]);
            let seeds: Vec<i64> = (0..=(n_in + n_out) as i64).map(|k| base + k).collect();
            seeds
        });
        let (hs, mid, mut outs) = tch::no_grad(|| -> Result<_> {
            let emb = unet.embed(b, timesteps, class_emb)?;
            let mut hs: Vec<Tensor> = Vec::with_capacity(n_in);
            for i in 0..n_in {
                reseed(&seeds, i);
                let h = unet.input_block(b, i, hs.last().unwrap_or(x), &emb)?;
                hs.push(h);
            }
            reseed(&seeds, n_in);
            let mid = unet.middle_block(b, hs.last().expect("input blocks"), &emb)?;
            let mut outs: Vec<Tensor> = Vec::with_capacity(n_out);
            for i in 0..n_out {
                reseed(&seeds, n_in + 1 + i);
                let h = outs.last().unwrap_or(&mid);
                let o = unet.output_block(b, i, h, &hs[n_in - 1 - i], &emb)?;
                outs.push(o);
            }
            Ok((hs, mid, outs))
        })?;
        if let Some(s) = &seeds {
            tch::manual_seed(s[0] ^ 0x5eed);
        }
        let head_in = leaf(&outs.pop().expect("output blocks"));
        let out = unet.out(b, &head_in)?;
        let tape = Tape {
            unet: unet.clone(),
            x: x.shallow_clone(),
            timesteps: timesteps.to_vec(),
            class_emb: class_emb.map(|t| t.shallow_clone()),
            hs,
            mid,
            outs,
            head_in,
            seeds,
        };
        Ok((out, tape))
    }

    /// The backward pass through the blocks, once the head's input has its gradient.
    pub fn backward(self, b: &TchBackend) -> Result<()> {
        let g = self.head_in.grad();
        if !g.defined() {
            return Err(Error::Config(
                "gradient checkpointing: the loss did not reach the network's output".into(),
            ));
        }
        let unet = &self.unet;
        let (n_in, n_out) = (self.hs.len(), unet.num_output_blocks());
        let emb_d = tch::no_grad(|| unet.embed(b, &self.timesteps, self.class_emb.as_ref()))?;
        let mut g_emb: Option<Tensor> = None;
        let mut g_skip: Vec<Option<Tensor>> = (0..n_in).map(|_| None).collect();
        let mut g = g.detach();
        // Output blocks, last to first.
        for i in (0..n_out).rev() {
            reseed(&self.seeds, n_in + 1 + i);
            let h = leaf(if i == 0 { &self.mid } else { &self.outs[i - 1] });
            let skip = leaf(&self.hs[n_in - 1 - i]);
            let emb = leaf(&emb_d);
            vjp(&unet.output_block(b, i, &h, &skip, &emb)?, &g);
            add_grad(&mut g_skip[n_in - 1 - i], skip.grad());
            add_grad(&mut g_emb, emb.grad());
            g = h.grad();
        }
        // Middle block.
        reseed(&self.seeds, n_in);
        let h = leaf(&self.hs[n_in - 1]);
        let emb = leaf(&emb_d);
        vjp(&unet.middle_block(b, &h, &emb)?, &g);
        add_grad(&mut g_emb, emb.grad());
        g = h.grad();
        // Input blocks, last to first: each output's gradient is its consumer's plus its skip's.
        for i in (0..n_in).rev() {
            let mut gi = Some(g.shallow_clone());
            if let Some(s) = g_skip[i].take() {
                add_grad(&mut gi, s);
            }
            let gi = gi.expect("set above");
            reseed(&self.seeds, i);
            let emb = leaf(&emb_d);
            if i == 0 {
                // The image itself: its own graph (if any) receives the gradient.
                vjp(&unet.input_block(b, 0, &self.x, &emb)?, &gi);
            } else {
                let h = leaf(&self.hs[i - 1]);
                vjp(&unet.input_block(b, i, &h, &emb)?, &gi);
                g = h.grad();
            }
            add_grad(&mut g_emb, emb.grad());
        }
        // The time embedding, through `time_embed` (and the class embedding's graph).
        if let Some(ge) = g_emb {
            let emb = unet.embed(b, &self.timesteps, self.class_emb.as_ref())?;
            vjp(&emb, &ge);
        }
        if let Some(s) = &self.seeds {
            tch::manual_seed(s[0] ^ 0xbac4);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{unet_forward, Precision};
    use crate::config::DaviTrain;
    use crate::davi::Trainer;
    use crate::gan::{AdaptiveFrom, GanConfig};
    use davi_models::{DaviConfig, UNetConfig};
    use std::collections::HashMap;

    fn config(dropout: f64, classes: Option<usize>) -> UNetConfig {
        serde_json::from_value(serde_json::json!({
            "image_size": 16, "in_channels": 2, "model_channels": 32, "out_channels": 4,
            "num_res_blocks": 1, "attention_resolutions": [2], "dropout": dropout,
            "channel_mult": [1, 2], "num_head_channels": 32, "use_scale_shift_norm": true,
            "resblock_updown": true, "num_classes": classes
        }))
        .unwrap()
    }

    /// Random weights everywhere (no zeroed modules, so every gradient is nonzero).
    fn weights(unet: &UNetModel, seed: i64) -> HashMap<String, Tensor> {
        tch::manual_seed(seed);
        unet.param_shapes()
            .iter()
            .map(|(n, s)| {
                let dims: Vec<i64> = s.iter().map(|&d| d as i64).collect();
                let mut t = Tensor::randn(&dims, (Kind::Float, Device::Cpu)) * 0.15;
                if n.ends_with(".weight") && s.len() == 1 {
                    t += 1.0; // norm scales near one
                }
                (n.clone(), t.set_requires_grad(true))
            })
            .collect()
    }

    /// Output, gradients of every weight and of the input, for `loss = mean(out * w) + mean(out^2)`.
    fn run(
        unet: &UNetModel,
        params: &HashMap<String, Tensor>,
        checkpointing: bool,
        train: bool,
        seed: i64,
    ) -> (Tensor, HashMap<String, Tensor>, Tensor) {
        for p in params.values() {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
        tch::manual_seed(7);
        let x0 = Tensor::randn([3, 2, 16, 16], (Kind::Float, Device::Cpu));
        let w = Tensor::randn([3, 4, 16, 16], (Kind::Float, Device::Cpu));
        let x = x0.set_requires_grad(true);
        let xin = &x * 1.5; // the input has a graph of its own
        let mut b = TchBackend::new(
            params
                .iter()
                .map(|(k, v)| (k.clone(), v.shallow_clone()))
                .collect(),
            Device::Cpu,
        );
        b.checkpointing = checkpointing;
        b.train = train;
        let class = unet.config.num_classes.map(|k| {
            let onehot = Tensor::eye(k as i64, (Kind::Float, Device::Cpu)).narrow(0, 0, 3);
            unet.class_embedding(&b, &onehot).unwrap()
        });
        tch::manual_seed(seed);
        let out = unet_forward(unet, &b, &xin, &[3.0, 500.0, 999.0], class.as_ref()).unwrap();
        let loss = (&out * &w).mean(Kind::Float) + out.square().mean(Kind::Float);
        loss.backward();
        b.backward_checkpoints().unwrap();
        let grads = params
            .iter()
            .map(|(k, v)| (k.clone(), v.grad().copy()))
            .collect();
        (out.detach(), grads, x.grad().copy())
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    #[test]
    fn checkpointed_gradients_equal_the_plain_ones() {
        let _one = crate::global_rng();
        let unet = UNetModel::new(&config(0.0, Some(3))).unwrap();
        let params = weights(&unet, 1);
        let (out_p, g_p, gx_p) = run(&unet, &params, false, true, 0);
        let (out_c, g_c, gx_c) = run(&unet, &params, true, true, 0);
        assert_eq!(max_diff(&out_p, &out_c), 0.0, "same forward");
        // A bias right before a GroupNorm has a true gradient of zero: rounding noise there is
        // measured against the largest gradient.
        let floor = 1e-3
            * g_p
                .values()
                .map(|g| g.abs().max().double_value(&[]))
                .fold(0.0, f64::max);
        for (k, gp) in &g_p {
            let gc = &g_c[k];
            assert!(gp.defined() && gc.defined(), "{k}: gradient missing");
            let scale = gp.abs().max().double_value(&[]);
            assert!(scale > 0.0, "{k}: zero gradient, the test would be vacuous");
            let d = max_diff(gp, gc);
            assert!(d <= 1e-4 * scale.max(floor), "{k}: {d} (scale {scale})");
        }
        let d = max_diff(&gx_p, &gx_c);
        assert!(
            d <= 1e-4 * gx_p.abs().max().double_value(&[]),
            "input gradient {d}"
        );
    }

    #[test]
    fn checkpointing_with_dropout_gives_the_gradient_of_the_forward_it_ran() {
        let _one = crate::global_rng();
        // The loss of a seeded checkpointed forward is a fixed function of the weights (the masks
        // come from the seed); its directional derivative must match the tape's gradient.
        let unet = UNetModel::new(&config(0.3, None)).unwrap();
        let params = weights(&unet, 2);
        let loss_at = |p: &HashMap<String, Tensor>| -> f64 {
            let (out, _, _) = tch::no_grad(|| {
                let mut b = TchBackend::new(
                    p.iter().map(|(k, v)| (k.clone(), v.detach())).collect(),
                    Device::Cpu,
                );
                b.train = true;
                b.checkpointing = true;
                tch::manual_seed(7);
                let x = Tensor::randn([3, 2, 16, 16], (Kind::Float, Device::Cpu)) * 1.5;
                let w = Tensor::randn([3, 4, 16, 16], (Kind::Float, Device::Cpu));
                tch::manual_seed(11);
                let out = unet_forward(&unet, &b, &x, &[3.0, 500.0, 999.0], None).unwrap();
                b.tapes.borrow_mut().clear();
                let l = (&out * &w).mean(Kind::Float) + out.square().mean(Kind::Float);
                (l, (), ())
            });
            out.double_value(&[])
        };
        let (_, g, _) = run(&unet, &params, true, true, 11);
        // The direction is the tape's gradient itself, scaled to unit size per weight: the
        // derivative along it is then as large as any (a random direction can be nearly
        // orthogonal to the gradient, and which one libtorch draws depends on its thread count,
        // so a fixed relative tolerance failed on some machines), and the finite difference
        // measures <true gradient, tape gradient> against |tape gradient|^2.
        let count: i64 = g.values().map(|t| t.numel() as i64).sum();
        let norm = g
            .values()
            .map(|t| t.square().sum(Kind::Double).double_value(&[]))
            .sum::<f64>()
            .sqrt();
        let dir: HashMap<String, Tensor> = g
            .iter()
            .map(|(k, gk)| (k.clone(), gk * ((count as f64).sqrt() / norm)))
            .collect();
        let dot = |a: &HashMap<String, Tensor>| -> f64 {
            a.iter()
                .map(|(k, ak)| (ak * &dir[k]).sum(Kind::Double).double_value(&[]))
                .sum()
        };
        let along = dot(&g);
        // Along the gradient the loss bends fast: central differences settle by eps 1e-5 (relative
        // error 6e-4 at 3e-5, 0.17 at 1e-3), while the loss still moves by 0.1, far above f32's
        // rounding.
        let eps = 1e-5;
        let shifted = |s: f64| -> HashMap<String, Tensor> {
            params
                .iter()
                .map(|(k, v)| (k.clone(), v.detach() + &dir[k] * s))
                .collect()
        };
        let fd = (loss_at(&shifted(eps)) - loss_at(&shifted(-eps))) / (2.0 * eps);
        assert!(along.abs() > 1e-3, "vacuous: {along}");
        assert!(
            (fd - along).abs() <= 0.02 * along.abs(),
            "finite difference {fd} vs tape {along}"
        );
        // A tape that replayed other masks would be caught: the gradient of the forward with
        // seed 12 misses the finite difference of the forward with seed 11 by far more.
        let (_, g2, _) = run(&unet, &params, true, true, 12);
        let other = dot(&g2);
        assert!(
            (fd - other).abs() > 0.1 * along.abs(),
            "masks did not depend on the seed: {fd} vs {other}"
        );
    }

    #[test]
    fn bf16_matrix_products_stay_close_to_f32() {
        let _one = crate::global_rng();
        let unet = UNetModel::new(&config(0.0, None)).unwrap();
        let params = weights(&unet, 3);
        let x = Tensor::randn([2, 2, 16, 16], (Kind::Float, Device::Cpu));
        let fwd = |p: Precision| {
            let b = TchBackend::new(
                params
                    .iter()
                    .map(|(k, v)| (k.clone(), v.detach()))
                    .collect(),
                Device::Cpu,
            )
            .with_precision(p);
            tch::no_grad(|| unet.forward(&b, &x, &[10.0, 700.0], None).unwrap())
        };
        let (a, b) = (fwd(Precision::F32), fwd(Precision::Bf16));
        assert_eq!(b.kind(), Kind::Float, "f32 comes back");
        let rel = (&a - &b).norm().double_value(&[]) / a.norm().double_value(&[]);
        assert!(rel > 0.0, "bf16 was not used");
        assert!(rel < 0.03, "relative error {rel}");
    }

    fn trainer(checkpointing: bool, precision: Precision) -> Trainer {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../models/configs/fmnist32-sr4.yaml");
        let cfg = DaviConfig::from_file(&path).unwrap();
        let unet = UNetModel::new(&cfg.unet).unwrap();
        let teacher = weights(&unet, 4);
        let hp = DaviTrain {
            batch_size: 2,
            gan: Some(GanConfig {
                adaptive_from: AdaptiveFrom::GroundTruth,
                feature_matching: 1.0,
                ..Default::default()
            }),
            checkpointing,
            precision,
            ..Default::default()
        };
        Trainer::new(&cfg, hp, teacher, Device::Cpu).unwrap()
    }

    fn davi_grads(t: &mut Trainer) -> Vec<(String, Tensor)> {
        let x0 = Tensor::rand([2, 1, 32, 32], (Kind::Float, Device::Cpu)) * 2.0 - 1.0;
        t.step(&x0, 0).unwrap();
        let mut g: Vec<(String, Tensor)> = Vec::new();
        for (k, v) in t.phi.tensors.iter() {
            g.push((format!("phi.{k}"), v.grad().copy()));
        }
        for (k, v) in t.aux_score.tensors.iter() {
            g.push((format!("psi.{k}"), v.grad().copy()));
        }
        g
    }

    #[test]
    fn a_davi_step_with_checkpointing_equals_one_without() {
        let _one = crate::global_rng();
        tch::manual_seed(5);
        let plain = davi_grads(&mut trainer(false, Precision::F32));
        tch::manual_seed(5);
        let ckpt = davi_grads(&mut trainer(true, Precision::F32));
        let mut nonzero = 0;
        let floor = 1e-3
            * plain
                .iter()
                .map(|(_, g)| g.abs().max().double_value(&[]))
                .fold(0.0, f64::max);
        for ((k, a), (_, b)) in plain.iter().zip(&ckpt) {
            assert!(a.defined() && b.defined(), "{k}: gradient missing");
            let scale = a.abs().max().double_value(&[]);
            nonzero += (scale > 0.0) as usize;
            let d = max_diff(a, b);
            // Summation order differs (block-wise backward): equal to float rounding.
            assert!(d <= 1e-4 * scale.max(floor), "{k}: {d} (scale {scale})");
        }
        assert!(
            nonzero > plain.len() / 2,
            "mostly zero gradients: {nonzero}"
        );
    }

    #[test]
    fn a_davi_step_in_bf16_points_the_same_way() {
        let _one = crate::global_rng();
        tch::manual_seed(5);
        let plain = davi_grads(&mut trainer(false, Precision::F32));
        tch::manual_seed(5);
        let low = davi_grads(&mut trainer(true, Precision::Bf16));
        let flat = |g: &[(String, Tensor)]| {
            Tensor::cat(
                &g.iter().map(|(_, t)| t.flatten(0, -1)).collect::<Vec<_>>(),
                0,
            )
        };
        let (a, b) = (flat(&plain), flat(&low));
        let cos = (&a * &b).sum(Kind::Double).double_value(&[])
            / (a.norm().double_value(&[]) * b.norm().double_value(&[]));
        assert!(max_diff(&a, &b) > 0.0, "bf16 was not used");
        assert!(cos > 0.95, "gradient cosine {cos}");
    }
}
