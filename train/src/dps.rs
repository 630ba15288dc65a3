//! Diffusion Posterior Sampling (Chung et al., ICLR 2023), the iterative baseline: ancestral DDPM
//! with the prior, each step pulled toward the measurement by the gradient of `||y - H x0_hat(x_t)||`
//! through the network. One network evaluation (and one backward pass) per step.

use crate::backend::TchBackend;
use crate::diffusion::{eps, x0_from_eps};
use anyhow::Result;
use davi_models::schedule::Diffusion;
use davi_models::{Operator, UNetModel};
use tch::{Kind, Tensor};

/// DPS settings.
#[derive(Debug, Clone)]
pub struct Dps {
    /// Steps (evenly spaced over the schedule; the full schedule when equal to T).
    pub steps: usize,
    /// Step size of the measurement gradient (the paper's zeta).
    pub zeta: f64,
}

/// Restores `y` (measurements of `op`) with DPS. Returns the images and the network evaluations per image.
pub fn restore(
    unet: &UNetModel,
    b: &TchBackend,
    d: &Diffusion,
    op: &Operator,
    y: &Tensor,
    dps: &Dps,
    seed: i64,
) -> Result<(Tensor, usize)> {
    let n = y.size()[0];
    let c = unet.config.in_channels;
    let s = unet.config.image_size;
    tch::manual_seed(seed);
    let t_max = d.steps();
    let k = dps.steps.clamp(1, t_max);
    let ts: Vec<usize> = (0..k).map(|i| i * t_max / k).rev().collect();
    let mut x = Tensor::randn([n, c as i64, s as i64, s as i64], (Kind::Float, b.device));
    for (i, &t) in ts.iter().enumerate() {
        let x_in = x.detach().set_requires_grad(true);
        let tv = vec![t; n as usize];
        let e = eps(unet, b, &x_in, &tv)?;
        let x0 = x0_from_eps(d, &x_in, &tv, &e);
        // Per-image residual norm; its gradient w.r.t. x_t is the DPS correction.
        let r = (y - op.forward(b, &x0, c, s))
            .square()
            .sum_dim_intlist([1i64, 2, 3].as_slice(), false, Kind::Float)
            .sqrt();
        let grad = Tensor::run_backward(&[r.sum(Kind::Float)], &[&x_in], false, false).remove(0);
        let x0 = x0.detach().clamp(-1.0, 1.0);
        let ab = d.alphas_cumprod[t];
        let ab_prev = ts.get(i + 1).map(|&p| d.alphas_cumprod[p]).unwrap_or(1.0);
        // Ancestral step on the (possibly respaced) schedule.
        let beta = 1.0 - ab / ab_prev;
        let c0 = ab_prev.sqrt() * beta / (1.0 - ab);
        let ct = (1.0 - beta).sqrt() * (1.0 - ab_prev) / (1.0 - ab);
        let mut next = &x0 * c0 + x_in.detach() * ct;
        if i + 1 < ts.len() {
            let var = beta * (1.0 - ab_prev) / (1.0 - ab);
            next += Tensor::randn_like(&next) * var.sqrt();
        }
        x = next - grad * dps.zeta;
    }
    Ok((x.clamp(-1.0, 1.0), k))
}
