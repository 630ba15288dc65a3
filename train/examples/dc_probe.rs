//! How much of the noise's per-channel mean (its DC) a prior predicts, by timestep, and what
//! that does to the mean colour of its x0 estimate. A prior that cannot predict the DC of eps
//! turns the noise's mean into the image's at high t: x0_hat = (x_t - sqrt(1 - ab) eps_hat) /
//! sqrt(ab) amplifies whatever DC it misses by 1 / sqrt(ab), and its samples come out as
//! saturated colour fields.
//!
//! `cargo run --release -p davi-train --example dc_probe -- CONFIG WEIGHTS [N]`: N training
//! images of CONFIG's data (default 128), fixed noise; per t: the eps MSE, the part of it in
//! the DC (the noise's own DC variance is 1 / (S*S): predicting nothing of it scores that), the
//! RMS chroma of x0_hat's DC against the truth's (RMS over pixels for grey), and the slope of
//! x0_hat's DC on the truth's.
use anyhow::{bail, Result};
use davi_models::schedule::Diffusion;
use davi_models::{DaviConfig, UNetModel};
use davi_train::backend::TchBackend;
use davi_train::data::{open_config, Split};
use davi_train::{checkpoint, diffusion};
use std::path::Path;
use tch::{Device, Kind, Tensor};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        bail!("usage: dc_probe CONFIG WEIGHTS [N]");
    }
    let cfg_path = Path::new(&args[1]);
    let n: usize = args.get(3).map_or(Ok(128), |s| s.parse())?;
    let cfg = DaviConfig::from_file(cfg_path)?;
    let unet = UNetModel::new(&cfg.unet)?;
    let w = checkpoint::load_params(
        Path::new(&args[2]),
        unet.param_shapes(),
        Some("ema."),
        Device::Cpu,
    )?;
    let b = TchBackend::new(w, Device::Cpu);
    let ds = open_config(&cfg, cfg_path, Split::Train, true)?;
    let (c, s) = (cfg.unet.in_channels as i64, cfg.unet.image_size as i64);
    let idx: Vec<usize> = (0..n).map(|i| (i * 7919) % ds.len).collect();
    let x0 = Tensor::from_slice(&ds.batch(&idx)?).reshape([n as i64, c, s, s]);
    let d = Diffusion::new(cfg.diffusion.schedule, cfg.diffusion.steps);
    // Per-image, per-channel spatial means: [N, C].
    let dc = |t: &Tensor| t.mean_dim([2i64, 3].as_slice(), false, Kind::Float);
    // RMS distance of each mean colour from grey (its channel mean); for grey images, RMS value.
    let chroma = |v: &Tensor| {
        let v = if c == 3 {
            v - v.mean_dim([1i64].as_slice(), true, Kind::Float)
        } else {
            v.shallow_clone()
        };
        v.square().mean(Kind::Float).double_value(&[]).sqrt()
    };
    let x0_dc = dc(&x0);
    println!(
        "{} on {n} training images; noise DC variance {:.6}",
        cfg.name,
        1.0 / (s * s) as f64
    );
    println!("|    t | eps MSE | of it in the DC | x0_hat DC chroma | truth's | slope |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for t in [50usize, 200, 400, 600, 800, 900, 950, 990] {
        let t = t.min(d.steps() - 1);
        tch::manual_seed(0);
        let eps = Tensor::randn_like(&x0);
        let ts = vec![t; n];
        let x_t = diffusion::q_sample(&d, &x0, &ts, &eps);
        let pred = tch::no_grad(|| diffusion::eps(&unet, &b, &x_t, &ts))?;
        let ab = d.alphas_cumprod[t];
        let x0_hat = (&x_t - &pred * (1.0 - ab).sqrt()) / ab.sqrt();
        let err = &pred - &eps;
        let mse = err.square().mean(Kind::Float).double_value(&[]);
        let mse_dc = dc(&err).square().mean(Kind::Float).double_value(&[]);
        let h = dc(&x0_hat);
        let (xc, hc) = (&x0_dc - x0_dc.mean(Kind::Float), &h - h.mean(Kind::Float));
        let slope = (&xc * &hc).sum(Kind::Float).double_value(&[])
            / xc.square().sum(Kind::Float).double_value(&[]);
        println!(
            "| {t:4} | {mse:.5} | {mse_dc:.6} | {:.4} | {:.4} | {slope:.3} |",
            chroma(&h),
            chroma(&x0_dc)
        );
    }
    Ok(())
}
