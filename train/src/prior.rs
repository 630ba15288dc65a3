//! `davi-train prior`: eps-prediction DDPM training of the ADM UNet.

use crate::backend::{array_from_tensor, TchBackend};
use crate::config::{train_config, PriorTrain};
use crate::data::{Dataset, Split};
use crate::params::{AdamW, Ema, ParamSet};
use crate::run::{write_atomic, Run};
use crate::{checkpoint, diffusion, plot};
use anyhow::{bail, Context, Result};
use davi_models::schedule::Diffusion;
use davi_models::{DaviConfig, UNetModel};
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// What `prior` was asked.
pub struct PriorArgs {
    /// The model config.
    pub config: PathBuf,
    /// Device.
    pub device: Device,
    /// Run folder (default `runs/<name>`); an existing run there is resumed.
    pub run: Option<PathBuf>,
    /// Override of the config's step count.
    pub steps: Option<usize>,
}

/// The host RNG of step `step`: batches and timesteps depend on (seed, step) only.
pub fn step_rng(seed: u64, step: usize) -> rand_chacha::ChaCha8Rng {
    rand_chacha::ChaCha8Rng::seed_from_u64(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ step as u64)
}

/// Trains (or resumes) a prior. Returns the run folder.
pub fn train(args: &PriorArgs) -> Result<PathBuf> {
    let cfg = DaviConfig::from_file(&args.config)?;
    let mut tc: PriorTrain = train_config(&cfg)?.prior.unwrap_or_default();
    if let Some(s) = args.steps {
        tc.steps = s;
    }
    let data_cfg = cfg
        .data
        .clone()
        .with_context(|| format!("{}: no data section", args.config.display()))?;
    let unet = UNetModel::new(&cfg.unet)?;
    let diff = Diffusion::new(cfg.diffusion.schedule, cfg.diffusion.steps);
    let (c, s) = (cfg.unet.in_channels, cfg.unet.image_size);
    let data = Dataset::open(&data_cfg, Split::Train, c, s, tc.skip_bad_files)?;
    let dir = args
        .run
        .clone()
        .unwrap_or_else(|| PathBuf::from("runs").join(&cfg.name));
    let hash = cfg.hash();
    // Learned sigma (out_channels = 2 C): the hybrid loss L_simple + L_vb of improved-diffusion,
    // with L_vb rescaled by T / 1000 (lambda = 0.001 of a sum over T terms).
    let learn_sigma = cfg.unet.out_channels == 2 * c;
    let columns: &[&str] = if learn_sigma {
        &["loss", "grad_norm", "steps_per_s", "mse", "vb"]
    } else {
        &["loss", "grad_norm", "steps_per_s"]
    };
    let run = Run::open(&dir, &serde_yaml::to_string(&cfg)?, columns, tc.keep)?;

    let mut params = ParamSet::init(&unet, tc.seed as i64, args.device);
    let mut opt = AdamW::new(&params, tc.lr, tc.weight_decay);
    let mut ema = Ema::new(&params, tc.ema);
    let mut start = 0;
    let mut seconds0 = 0.0;
    if let Some((st, all)) = run.resume(&hash, args.device)? {
        params.load_from(&strip(&all, "model."))?;
        ema.tensors = strip(&all, "ema.").into_iter().collect();
        opt.load_from(&all, "opt.", st.step as i64)?;
        start = st.step;
        seconds0 = st.seconds;
    }
    tracing::info!(
        "prior {}: {} parameters, {} on {}, {} steps of {}, {} loss",
        cfg.name,
        unet.num_params(),
        data.name,
        format!("{:?}", args.device),
        tc.steps,
        tc.batch_size,
        if learn_sigma {
            "hybrid (learned sigma)"
        } else {
            "eps MSE"
        }
    );
    let bar = progress(tc.steps, start);
    let t0 = Instant::now();
    let mut last_log = Instant::now();
    let mut step = start;
    let (tx, rx) = crossbeam_channel::bounded::<Result<Vec<f32>>>(2);
    std::thread::scope(|scope| -> Result<()> {
        // Prefetch: the next batches are decoded while this one trains.
        let data_ref = &data;
        let (seed, bs, total) = (tc.seed, tc.batch_size, tc.steps);
        scope.spawn(move || {
            for st in start..total {
                let idx = data_ref.batch_indices(seed, st, bs);
                if tx.send(data_ref.batch(&idx)).is_err() {
                    break;
                }
            }
        });
        while step < tc.steps {
            let batch = rx.recv().context("data loader stopped")??;
            let mut rng = step_rng(tc.seed, step);
            tch::manual_seed((tc.seed as i64).wrapping_add(step as i64));
            let x0 = Tensor::from_slice(&batch)
                .reshape([tc.batch_size as i64, c as i64, s as i64, s as i64])
                .to_device(args.device);
            let ts: Vec<usize> = (0..tc.batch_size)
                .map(|_| rng.random_range(0..diff.steps()))
                .collect();
            let noise = Tensor::randn_like(&x0);
            let x_t = diffusion::q_sample(&diff, &x0, &ts, &noise);
            let mut b = TchBackend::new(params.handles(), args.device);
            b.train = true;
            let (loss, extra) = loss(&unet, &b, &diff, &x0, &x_t, &ts, &noise)?;
            let lv = loss.double_value(&[]);
            if !lv.is_finite() {
                bail!("loss is {lv} at step {step}; stopping. The last good checkpoint in {} is kept.", dir.display());
            }
            params.zero_grad();
            loss.backward();
            let gn = params.clip_grad_norm(tc.grad_clip);
            opt.step(&mut params);
            step += 1;
            ema.update(&params, step);
            bar.set_position(step as u64);
            let sps = (step - start) as f64 / t0.elapsed().as_secs_f64();
            bar.set_message(format!("loss {lv:.4} {sps:.2} steps/s"));
            if step % 10 == 0 || step == tc.steps {
                let mut row = vec![lv, gn, sps];
                row.extend(&extra);
                run.log(step, &row)?;
            }
            let stop = run.stop_requested();
            if step % tc.checkpoint_every == 0 || step == tc.steps || stop {
                save(
                    &run,
                    step,
                    &params,
                    &ema,
                    &opt,
                    &hash,
                    seconds0 + t0.elapsed().as_secs_f64(),
                )?;
                if last_log.elapsed().as_secs() > 60 || step == tc.steps {
                    run.plot()?;
                    last_log = Instant::now();
                }
            }
            if tc.sample_every > 0 && step % tc.sample_every == 0 && step != tc.steps {
                sample_grid(
                    &unet,
                    &ema,
                    &diff,
                    args.device,
                    tc.sample_n,
                    &dir.join(format!("samples/step-{step:08}.png")),
                )?;
            }
            if stop {
                bar.abandon_with_message(format!(
                    "stopped at step {step}; resume with --resume {}",
                    dir.display()
                ));
                return Ok(());
            }
        }
        Ok(())
    })?;
    if step >= tc.steps {
        bar.finish_with_message("done");
        finish(&dir, &unet, &ema, &diff, args.device, tc.sample_n)?;
    }
    Ok(dir)
}

/// The training loss of a prior at `x_t` (made from `x0`, `ts`, `noise`): the eps MSE, plus the
/// rescaled variational term for a learned-sigma UNet (then also `[mse, vb]` for the log).
pub fn loss(
    unet: &UNetModel,
    b: &TchBackend,
    diff: &Diffusion,
    x0: &Tensor,
    x_t: &Tensor,
    ts: &[usize],
    noise: &Tensor,
) -> Result<(Tensor, Vec<f64>)> {
    let (pred, v) = diffusion::eps_and_v(unet, b, x_t, ts)?;
    let mse = (&pred - noise).square().mean(Kind::Float);
    Ok(match v {
        Some(v) => {
            let vb = diffusion::vb_term(diff, x0, x_t, ts, &pred.detach(), &v).mean(Kind::Float)
                * (diff.steps() as f64 / 1000.0);
            let extra = vec![mse.double_value(&[]), vb.double_value(&[])];
            (mse + vb, extra)
        }
        None => (mse, vec![]),
    })
}

fn progress(total: usize, start: usize) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} eta {eta}")
            .expect("template"),
    );
    bar.set_position(start as u64);
    bar
}

/// The tensors under `prefix`, with it removed.
pub fn strip(
    all: &std::collections::HashMap<String, Tensor>,
    prefix: &str,
) -> std::collections::HashMap<String, Tensor> {
    all.iter()
        .filter_map(|(k, v)| {
            k.strip_prefix(prefix)
                .map(|s| (s.to_string(), v.shallow_clone()))
        })
        .collect()
}

fn save(
    run: &Run,
    step: usize,
    params: &ParamSet,
    ema: &Ema,
    opt: &AdamW,
    hash: &str,
    seconds: f64,
) -> Result<()> {
    let mut all = params.named("model.");
    all.extend(
        ema.tensors
            .iter()
            .map(|(k, v)| (format!("ema.{k}"), v.shallow_clone())),
    );
    all.extend(opt.named("opt."));
    run.checkpoint(step, &all, hash, seconds)
}

/// Writes `ema.safetensors` (plain guided-diffusion names: the prior others load) and the final grid.
fn finish(
    dir: &Path,
    unet: &UNetModel,
    ema: &Ema,
    diff: &Diffusion,
    device: Device,
    n: usize,
) -> Result<()> {
    let named: Vec<(String, Tensor)> = ema
        .tensors
        .iter()
        .map(|(k, v)| (k.clone(), v.shallow_clone()))
        .collect();
    checkpoint::save_tensors(&dir.join("ema.safetensors"), &named)?;
    sample_grid(unet, ema, diff, device, n, &dir.join("samples.png"))?;
    tracing::info!("wrote {}/ema.safetensors and samples.png", dir.display());
    Ok(())
}

/// A grid of `n` DDIM-50 samples from the EMA weights.
pub fn sample_grid(
    unet: &UNetModel,
    ema: &Ema,
    diff: &Diffusion,
    device: Device,
    n: usize,
    path: &Path,
) -> Result<()> {
    let b = TchBackend::new(ema.handles(), device);
    let x = diffusion::sample(unet, &b, diff, n, Some(50), 64, 1234)?;
    let a = array_from_tensor(&x);
    let (c, s) = (unet.config.in_channels, unet.config.image_size);
    let cols = (n as f64).sqrt().ceil() as usize;
    let img = plot::grid(a.as_slice().expect("contiguous"), n, c, s, cols);
    let mut buf = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut buf), image::ImageFormat::Png)?;
    write_atomic(path, &buf)
}
