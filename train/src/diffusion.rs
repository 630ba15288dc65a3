//! DDPM training loss and sampling (ancestral DDPM, DDIM) on tch.

use crate::TchBackend;
use anyhow::Result;
use davi_models::schedule::Diffusion;
use davi_models::UNetModel;
use tch::{Device, Kind, Tensor};

/// Per-sample column `[n, 1, 1, 1]` of `f(t)`.
pub fn column(ts: &[usize], f: impl Fn(usize) -> f64, device: Device) -> Tensor {
    let v: Vec<f32> = ts.iter().map(|&t| f(t) as f32).collect();
    Tensor::from_slice(&v)
        .reshape([ts.len() as i64, 1, 1, 1])
        .to_device(device)
}

/// `x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps`.
pub fn q_sample(d: &Diffusion, x0: &Tensor, ts: &[usize], eps: &Tensor) -> Tensor {
    let dev = x0.device();
    let a = column(ts, |t| d.alphas_cumprod[t].sqrt(), dev);
    let s = column(ts, |t| (1.0 - d.alphas_cumprod[t]).sqrt(), dev);
    x0 * a + eps * s
}

/// The eps prediction (first C channels) of `unet` at `x_t`, `ts`.
pub fn eps(unet: &UNetModel, b: &TchBackend, x_t: &Tensor, ts: &[usize]) -> Result<Tensor> {
    Ok(eps_and_v(unet, b, x_t, ts)?.0)
}

/// The eps prediction and, for a learned-sigma UNet (`out_channels = 2 C`), its variance
/// output `v` (the last C channels; in [-1, 1] when trained, see [`Diffusion::learned_log_variance`]).
pub fn eps_and_v(
    unet: &UNetModel,
    b: &TchBackend,
    x_t: &Tensor,
    ts: &[usize],
) -> Result<(Tensor, Option<Tensor>)> {
    let t: Vec<f32> = ts.iter().map(|&t| t as f32).collect();
    let out = crate::backend::unet_forward(unet, b, x_t, &t, None)?;
    let c = unet.config.in_channels as i64;
    Ok(if out.size()[1] == c {
        (out, None)
    } else {
        (out.narrow(1, 0, c), Some(out.narrow(1, c, c)))
    })
}

/// Per-sample log variance `[n, C, H, W]` of the reverse step from the learned-sigma output `v`.
pub fn learned_log_variance(d: &Diffusion, ts: &[usize], v: &Tensor) -> Tensor {
    let dev = v.device();
    let max_log = column(ts, |t| d.betas[t].ln(), dev);
    let min_log = column(ts, |t| d.posterior_log_variance_clipped(t), dev);
    let frac = (v + 1.0) / 2.0;
    &frac * max_log + (-frac + 1.0) * min_log
}

/// Mean of `q(x_{t-1} | x_t, x0)` (or of the model's reverse step, given its `x0`).
pub fn posterior_mean(d: &Diffusion, x0: &Tensor, x_t: &Tensor, ts: &[usize]) -> Tensor {
    let dev = x_t.device();
    let c0 = column(ts, |t| d.posterior_mean_coefs(t).0, dev);
    let ct = column(ts, |t| d.posterior_mean_coefs(t).1, dev);
    x0 * c0 + x_t * ct
}

/// KL divergence of two diagonal Gaussians given means and log variances, elementwise (nats).
pub fn normal_kl(mean1: &Tensor, logvar1: &Tensor, mean2: &Tensor, logvar2: &Tensor) -> Tensor {
    ((logvar2 - logvar1) + (logvar1 - logvar2).exp() + (mean1 - mean2).square() * (-logvar2).exp()
        - 1.0)
        * 0.5
}

/// A fast approximation of the standard normal CDF (the tanh form of GELU).
fn approx_standard_normal_cdf(x: &Tensor) -> Tensor {
    let k = (2.0 / std::f64::consts::PI).sqrt();
    ((x + x.pow_tensor_scalar(3) * 0.044715) * k).tanh() * 0.5 + 0.5
}

/// Log-likelihood (nats, elementwise) of images `x` in [-1, 1] quantised to 256 levels under a
/// Gaussian of mean `means` and log standard deviation `log_scales`; the end bins take the tails.
pub fn discretized_gaussian_log_likelihood(
    x: &Tensor,
    means: &Tensor,
    log_scales: &Tensor,
) -> Tensor {
    let centered = x - means;
    let inv_std = (-log_scales).exp();
    let cdf_plus = approx_standard_normal_cdf(&((&centered + 1.0 / 255.0) * &inv_std));
    let cdf_min = approx_standard_normal_cdf(&((&centered - 1.0 / 255.0) * &inv_std));
    let log_cdf_plus = cdf_plus.clamp_min(1e-12).log();
    let log_one_minus_cdf_min = (-&cdf_min + 1.0).clamp_min(1e-12).log();
    let log_delta = (cdf_plus - cdf_min).clamp_min(1e-12).log();
    let high = log_one_minus_cdf_min.where_self(&x.gt(0.999), &log_delta);
    log_cdf_plus.where_self(&x.lt(-0.999), &high)
}

/// The variational-bound term `L_t` per sample (bits per dimension) of a learned-sigma model:
/// `KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t))` for `t > 0`, the decoder's negative
/// log-likelihood of `x0` at `t = 0`. Pass `eps` detached: the term then trains only the
/// variance, as in the hybrid objective of improved-diffusion.
pub fn vb_term(
    d: &Diffusion,
    x0: &Tensor,
    x_t: &Tensor,
    ts: &[usize],
    eps: &Tensor,
    v: &Tensor,
) -> Tensor {
    let dev = x0.device();
    let true_mean = posterior_mean(d, x0, x_t, ts);
    let true_logvar = column(ts, |t| d.posterior_log_variance_clipped(t), dev);
    let model_x0 = x0_from_eps(d, x_t, ts, eps);
    let model_mean = posterior_mean(d, &model_x0, x_t, ts);
    let model_logvar = learned_log_variance(d, ts, v);
    let ln2 = std::f64::consts::LN_2;
    let kl = normal_kl(&true_mean, &true_logvar, &model_mean, &model_logvar).mean_dim(
        &[1i64, 2, 3][..],
        false,
        Kind::Float,
    ) / ln2;
    let nll = -discretized_gaussian_log_likelihood(x0, &model_mean, &(model_logvar * 0.5))
        .mean_dim(&[1i64, 2, 3][..], false, Kind::Float)
        / ln2;
    let at_zero: Vec<bool> = ts.iter().map(|&t| t == 0).collect();
    let mask = Tensor::from_slice(&at_zero).to_device(dev);
    nll.where_self(&mask, &kl)
}

/// `x0` from an eps prediction: `(x_t - sqrt(1 - ab) eps) / sqrt(ab)`.
pub fn x0_from_eps(d: &Diffusion, x_t: &Tensor, ts: &[usize], e: &Tensor) -> Tensor {
    let dev = x_t.device();
    let a = column(ts, |t| 1.0 / d.alphas_cumprod[t].sqrt(), dev);
    let s = column(
        ts,
        |t| ((1.0 - d.alphas_cumprod[t]) / d.alphas_cumprod[t]).sqrt(),
        dev,
    );
    x_t * a - e * s
}

/// Samples `n` images: ancestral DDPM over all steps (`ddim = None`), or deterministic DDIM
/// (eta = 0) over `ddim` evenly spaced steps. Batched by `batch`.
pub fn sample(
    unet: &UNetModel,
    b: &TchBackend,
    d: &Diffusion,
    n: usize,
    ddim: Option<usize>,
    batch: usize,
    seed: i64,
) -> Result<Tensor> {
    let c = unet.config.in_channels as i64;
    let s = unet.config.image_size as i64;
    let t_max = d.steps();
    let mut outs = Vec::new();
    tch::manual_seed(seed);
    let _g = tch::no_grad_guard();
    for start in (0..n).step_by(batch.max(1)) {
        let m = batch.min(n - start);
        let mut x = Tensor::randn([m as i64, c, s, s], (Kind::Float, b.device));
        match ddim {
            None => {
                for t in (0..t_max).rev() {
                    let ts = vec![t; m];
                    let (e, v) = eps_and_v(unet, b, &x, &ts)?;
                    let x0 = x0_from_eps(d, &x, &ts, &e).clamp(-1.0, 1.0);
                    // Posterior mean of q(x_{t-1} | x_t, x0); the variance is the learned one
                    // of a learned-sigma model, else the fixed small one.
                    let mean = posterior_mean(d, &x0, &x, &ts);
                    x = if t > 0 {
                        let z = Tensor::randn_like(&x);
                        match v {
                            Some(v) => mean + z * (learned_log_variance(d, &ts, &v) * 0.5).exp(),
                            None => mean + z * d.posterior_variance(t).sqrt(),
                        }
                    } else {
                        mean
                    };
                }
            }
            Some(k) => {
                let k = k.clamp(1, t_max);
                let steps: Vec<usize> = (0..k).map(|i| i * t_max / k).rev().collect();
                for (i, &t) in steps.iter().enumerate() {
                    let ts = vec![t; m];
                    let e = eps(unet, b, &x, &ts)?;
                    let x0 = x0_from_eps(d, &x, &ts, &e).clamp(-1.0, 1.0);
                    let ab_prev = steps
                        .get(i + 1)
                        .map(|&p| d.alphas_cumprod[p])
                        .unwrap_or(1.0);
                    let e = (&x - &x0 * d.alphas_cumprod[t].sqrt())
                        / (1.0 - d.alphas_cumprod[t]).sqrt();
                    x = x0 * ab_prev.sqrt() + e * (1.0 - ab_prev).sqrt();
                }
            }
        }
        outs.push(x.clamp(-1.0, 1.0));
    }
    Ok(Tensor::cat(&outs, 0))
}
