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
    let (c, s) = (unet.config.in_channels, unet.config.image_size);
    tch::manual_seed(seed);
    let t_max = d.steps();
    let k = dps.steps.clamp(1, t_max);
    let ts: Vec<usize> = (0..k).map(|i| i * t_max / k).rev().collect();
    let mut x = Tensor::randn([n, c as i64, s as i64, s as i64], (Kind::Float, b.device));
    for (i, &t) in ts.iter().enumerate() {
        x = step(unet, b, d, op, y, &x, t, ts.get(i + 1).copied(), dps.zeta)?;
    }
    Ok((x.clamp(-1.0, 1.0), k))
}

/// One DPS step from `x_t` to the next step `prev` (`None`: the last, to `x0`):
///
/// `x_prev = c0 x0_hat + ct x_t + sigma z - zeta grad_{x_t} || y - H x0_hat(x_t) ||`,
///
/// with `x0_hat` the prior's estimate of `x0` from `x_t`, clipped to [-1, 1] (before the
/// gradient, as the official code),
/// `(c0, ct, sigma^2)` the posterior between the two steps ([`Diffusion::posterior_to`]) and
/// the norm taken per image.
#[allow(clippy::too_many_arguments)]
pub fn step(
    unet: &UNetModel,
    b: &TchBackend,
    d: &Diffusion,
    op: &Operator,
    y: &Tensor,
    x_t: &Tensor,
    t: usize,
    prev: Option<usize>,
    zeta: f64,
) -> Result<Tensor> {
    let (c, s) = (unet.config.in_channels, unet.config.image_size);
    let x_in = x_t.detach().set_requires_grad(true);
    let tv = vec![t; x_t.size()[0] as usize];
    // x0_hat clipped to [-1, 1] before the residual, as the official code does
    // (`clip_denoised`): the gradient flows through the clip.
    let x0 = x0_from_eps(d, &x_in, &tv, &eps(unet, b, &x_in, &tv)?).clamp(-1.0, 1.0);
    // Per-image residual norm; its gradient w.r.t. x_t is the DPS correction.
    let r = (y - op.forward(b, &x0, c, s))
        .square()
        .sum_dim_intlist([1i64, 2, 3].as_slice(), false, Kind::Float)
        .sqrt();
    let grad = Tensor::run_backward(&[r.sum(Kind::Float)], &[&x_in], false, false).remove(0);
    let x0 = x0.detach();
    let post = d.posterior_to(t, prev);
    let mut next = &x0 * post.c0 + x_in.detach() * post.ct;
    if prev.is_some() {
        next += Tensor::randn_like(&next) * post.variance.sqrt();
    }
    Ok(next - grad * zeta)
}
