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
    let t: Vec<f32> = ts.iter().map(|&t| t as f32).collect();
    let out = unet.forward(b, x_t, &t, None)?;
    let c = unet.config.in_channels as i64;
    Ok(if out.size()[1] == c {
        out
    } else {
        out.narrow(1, 0, c)
    })
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
                    let e = eps(unet, b, &x, &ts)?;
                    let x0 = x0_from_eps(d, &x, &ts, &e).clamp(-1.0, 1.0);
                    let ab = d.alphas_cumprod[t];
                    let ab_prev = if t > 0 { d.alphas_cumprod[t - 1] } else { 1.0 };
                    let beta = d.betas[t];
                    // Posterior mean of q(x_{t-1} | x_t, x0) and its (fixed small) variance.
                    let c0 = ab_prev.sqrt() * beta / (1.0 - ab);
                    let ct = (1.0 - beta).sqrt() * (1.0 - ab_prev) / (1.0 - ab);
                    let mean = &x0 * c0 + &x * ct;
                    x = if t > 0 {
                        let var = beta * (1.0 - ab_prev) / (1.0 - ab);
                        mean + Tensor::randn_like(&x) * var.sqrt()
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
