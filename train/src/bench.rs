//! Benchmark figures of the training side: the machine's convolution peak and a prior training
//! step, to compare with ONNX Runtime's session and with PyTorch eager (`scripts/bench.sh`).

use crate::backend::TchBackend;
use crate::params::{AdamW, ParamSet};
use crate::{checkpoint, diffusion, prior};
use anyhow::Result;
use davi_models::schedule::Diffusion;
use davi_models::{DaviConfig, UNetModel};
use std::path::Path;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// Best GFLOP/s of large 3x3 convolutions (fp32, forward) on `device` over a few shapes, each
/// timed for about `seconds`: the machine's measured peak for the layer type the UNet is made of.
pub fn peak_conv(device: Device, seconds: f64) -> Result<Vec<(String, f64)>> {
    let _g = tch::no_grad_guard();
    let mut out = Vec::new();
    for (n, c, s) in [(32i64, 128i64, 32i64), (8, 256, 32), (64, 64, 32)] {
        let x = Tensor::randn([n, c, s, s], (Kind::Float, device));
        let w = Tensor::randn([c, c, 3, 3], (Kind::Float, device)) * 0.01;
        let flops = 2.0 * (n * c * c * 9 * s * s) as f64;
        let _ = x.conv2d(&w, None::<&Tensor>, [1, 1], [1, 1], [1, 1], 1);
        let (mut k, t0) = (0usize, Instant::now());
        while t0.elapsed().as_secs_f64() < seconds || k < 3 {
            let y = x.conv2d(&w, None::<&Tensor>, [1, 1], [1, 1], [1, 1], 1);
            let _ = y.double_value(&[0, 0, 0, 0]);
            k += 1;
        }
        let gflops = flops * k as f64 / t0.elapsed().as_secs_f64() / 1e9;
        out.push((format!("conv3x3 N={n} C={c}->{c} {s}x{s}"), gflops));
    }
    Ok(out)
}

/// Times prior training steps (eps MSE forward, backward, gradient clipping at 1, AdamW) of the
/// config's UNet from its initial weights at `batch` for about `seconds`; returns steps/s. With
/// `fixture`, first writes the initial weights (`w.<name>`) and one forward (`x`, `t`, `out`) so
/// another implementation can check it builds the same network before it is timed.
pub fn train_steps(
    cfg: &DaviConfig,
    batch: usize,
    seconds: f64,
    device: Device,
    fixture: Option<&Path>,
) -> Result<f64> {
    let unet = UNetModel::new(&cfg.unet)?;
    let diff = Diffusion::new(cfg.diffusion.schedule, cfg.diffusion.steps);
    let mut params = ParamSet::init(&unet, 0, device);
    let (c, s) = (cfg.unet.in_channels as i64, cfg.unet.image_size as i64);
    if let Some(path) = fixture {
        // Random weights everywhere (the zero-initialised output convs would hide a wrong graph).
        let w: Vec<(String, Tensor)> = params
            .tensors
            .iter()
            .map(|(k, v)| (format!("w.{k}"), v.detach().randn_like() * 0.1))
            .collect();
        let b = TchBackend::new(
            w.iter()
                .map(|(k, v)| (k["w.".len()..].to_string(), v.shallow_clone()))
                .collect(),
            device,
        );
        tch::manual_seed(1);
        let x = Tensor::randn([2, c, s, s], (Kind::Float, device));
        let t = [10.0f32, 700.0];
        let out = tch::no_grad(|| unet.forward(&b, &x, &t, None))?;
        let mut all = w;
        all.push(("x".into(), x));
        all.push(("t".into(), Tensor::from_slice(&t)));
        all.push(("out".into(), out));
        checkpoint::save_tensors(path, &all)?;
    }
    let mut opt = AdamW::new(&params, 1e-4, 0.0);
    tch::manual_seed(0);
    let x0 = Tensor::rand([batch as i64, c, s, s], (Kind::Float, device)) * 2.0 - 1.0;
    let ts: Vec<usize> = (0..batch).map(|i| (i * 997) % diff.steps()).collect();
    let mut step = |params: &mut ParamSet| -> Result<()> {
        let noise = Tensor::randn_like(&x0);
        let x_t = diffusion::q_sample(&diff, &x0, &ts, &noise);
        let b = TchBackend::new(params.handles(), device);
        let (loss, _) = prior::loss(&unet, &b, &diff, &x0, &x_t, &ts, &noise)?;
        params.zero_grad();
        loss.backward();
        params.clip_grad_norm(1.0);
        opt.step(params);
        Ok(())
    };
    step(&mut params)?; // warm-up
    let (mut k, t0) = (0usize, Instant::now());
    while t0.elapsed().as_secs_f64() < seconds || k < 3 {
        step(&mut params)?;
        k += 1;
    }
    Ok(k as f64 / t0.elapsed().as_secs_f64())
}

/// Images per second and median latency (ms) of tch's eager `I_phi` restore at batch `n`, timed
/// for about `seconds` after a warm-up run.
pub fn eager_restore(
    implicit: &davi_models::Implicit,
    b: &crate::TchBackend,
    n: usize,
    seconds: f64,
) -> Result<(f64, f64)> {
    let dev = b.device;
    let [cy, hy, wy] = implicit
        .operator
        .measurement_shape(implicit.channels, implicit.size);
    let (c, s) = (implicit.channels as i64, implicit.size as i64);
    let n = n as i64;
    let y = tch::Tensor::rand(
        [n, cy as i64, hy as i64, wy as i64],
        (tch::Kind::Float, dev),
    ) * 2.0
        - 1.0;
    let z = tch::Tensor::zeros([n, c, s, s], (tch::Kind::Float, dev));
    let _g = tch::no_grad_guard();
    let _ = implicit.restore(b, &y, &z)?;
    let mut lat = Vec::new();
    let start = std::time::Instant::now();
    while start.elapsed().as_secs_f64() < seconds || lat.len() < 5 {
        let t = std::time::Instant::now();
        let out = implicit.restore(b, &y, &z)?;
        let _ = out.double_value(&[0, 0, 0, 0]); // synchronise
        lat.push(t.elapsed().as_secs_f64());
    }
    let total: f64 = lat.iter().sum();
    lat.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    Ok((
        lat.len() as f64 * n as f64 / total,
        lat[lat.len() / 2] * 1e3,
    ))
}

/// Median seconds of 3 forward passes of `unet` at batch 1 with random weights (after a warm-up).
pub fn forward_seconds(unet: &davi_models::UNetModel, device: Device) -> Result<f64> {
    let params = crate::params::ParamSet::init(unet, 0, device);
    let b = crate::TchBackend::new(params.frozen(), device);
    let (c, s) = (
        unet.config.in_channels as i64,
        unet.config.image_size as i64,
    );
    let x = tch::Tensor::randn([1, c, s, s], (tch::Kind::Float, device));
    let _g = tch::no_grad_guard();
    let mut lat = Vec::new();
    for i in 0..4 {
        let t = std::time::Instant::now();
        let out = unet.forward(&b, &x, &[500.0], None)?;
        let _ = out.double_value(&[0, 0, 0, 0]);
        if i > 0 {
            lat.push(t.elapsed().as_secs_f64());
        }
    }
    lat.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    Ok(lat[1])
}
