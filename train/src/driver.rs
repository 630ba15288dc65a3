//! The one training loop of `davi-train`: data prefetch, resume, progress, the NaN check, the
//! CSV log, the checkpoint cadence and Ctrl-C, around a [`Trainee`]'s step. The prior and DAVI
//! differ only in their step, their checkpoint tensors and what they write at the end.

use crate::data::Dataset;
use crate::run::Run;
use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;
use tch::{Device, Tensor};

/// What the loop drives.
pub trait Trainee {
    /// The metric columns of `metrics.csv` after `step`; `steps_per_s` is filled in by the loop.
    fn columns(&self) -> Vec<&'static str>;
    /// One optimisation step on a batch of clean images. Returns the values of
    /// [`Self::columns`] without `steps_per_s`, the first being the loss. A non-finite loss must
    /// be reported with [`finite`] before any update.
    fn step(&mut self, x0: &Tensor, step: usize) -> Result<Vec<f64>>;
    /// Everything a checkpoint holds.
    fn named(&self) -> Vec<(String, Tensor)>;
    /// Restores what [`Self::named`] wrote, at `step`.
    fn load(&mut self, all: &HashMap<String, Tensor>, step: usize) -> Result<()>;
    /// After step `step` (1-based) of `total`: e.g. a sample grid now and then.
    fn after_step(&mut self, _step: usize, _total: usize, _dir: &Path) -> Result<()> {
        Ok(())
    }
    /// Once all steps are done: the exported weights (`ema.safetensors`) and the like.
    fn finish(&mut self, dir: &Path) -> Result<()>;
    /// A validation score now (e.g. PSNR of the EMA weights on held-out images), if the trainee
    /// has one; the loop calls it every `Schedule::validate_every` steps.
    fn validate(&mut self) -> Result<Option<f64>> {
        Ok(None)
    }
}

/// The loop's settings.
pub struct Schedule {
    /// Total steps.
    pub steps: usize,
    /// Images per step.
    pub batch_size: usize,
    /// Seed of the batch order.
    pub seed: u64,
    /// Steps between checkpoints.
    pub checkpoint_every: usize,
    /// Device of the batches.
    pub device: Device,
    /// Steps between validations (0: never).
    pub validate_every: usize,
}

impl Schedule {
    /// `steps` of `batch_size` images, batches ordered by `seed`, a checkpoint every
    /// `checkpoint_every` steps; on the CPU until [`Self::on`].
    pub fn new(steps: usize, batch_size: usize, seed: u64, checkpoint_every: usize) -> Self {
        Self {
            steps,
            batch_size,
            seed,
            checkpoint_every,
            device: Device::Cpu,
            validate_every: 0,
        }
    }

    /// The same schedule, validating every `every` steps.
    pub fn validating(self, every: usize) -> Self {
        Self {
            validate_every: every,
            ..self
        }
    }

    /// The same schedule with its batches on `device`.
    pub fn on(self, device: Device) -> Self {
        Self { device, ..self }
    }
}

/// Fails with the value's name and step when a loss is not finite.
pub fn finite(name: &str, value: f64, step: usize) -> Result<f64> {
    if !value.is_finite() {
        bail!("{name} is {value} at step {step}");
    }
    Ok(value)
}

/// Runs `t` from the run's last checkpoint (or from the start) to `sched.steps`, checkpointing
/// on the way; returns whether all steps are done (false: stopped by Ctrl-C, checkpointed).
pub fn drive(
    t: &mut impl Trainee,
    data: &Dataset,
    run: &Run,
    hash: &str,
    sched: &Schedule,
) -> Result<bool> {
    let dir = run.dir.clone();
    let mut start = 0;
    let mut seconds0 = 0.0;
    if let Some((st, all)) = run.resume(hash, sched.device)? {
        t.load(&all, st.step)?;
        start = st.step;
        seconds0 = st.seconds;
    }
    let columns = t.columns();
    let sps_at = columns.iter().position(|c| *c == "steps_per_s");
    let bar = indicatif::ProgressBar::new(sched.steps as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} eta {eta}")
            .expect("template"),
    );
    bar.set_position(start as u64);
    let [c, s] = [data.channels as i64, data.size as i64];
    let t0 = Instant::now();
    let mut last_plot = Instant::now();
    let (tx, rx) = crossbeam_channel::bounded::<Result<Vec<f32>>>(2);
    std::thread::scope(|scope| -> Result<bool> {
        // Owned here, so that a return (a stop, an error) drops it and the loader blocked on a
        // full channel sees the channel closed and ends; borrowed, the scope would wait on the
        // loader forever after a Ctrl-C (the checkpoint written, the process hung).
        let rx = rx;
        // Prefetch: the next batches are decoded while this one trains.
        let (seed, bs, total) = (sched.seed, sched.batch_size, sched.steps);
        scope.spawn(move || {
            for st in start..total {
                if tx
                    .send(data.batch(&data.batch_indices(seed, st, bs)))
                    .is_err()
                {
                    break;
                }
            }
        });
        let mut step = start;
        while step < sched.steps {
            let batch = rx.recv().context("data loader stopped")??;
            let x0 = Tensor::from_slice(&batch)
                .reshape([sched.batch_size as i64, c, s, s])
                .to_device(sched.device);
            let kept = || {
                if dir.join("state.json").exists() {
                    format!(
                        "stopping; the last good checkpoint in {} is kept",
                        dir.display()
                    )
                } else {
                    format!("stopping; {} has no checkpoint yet", dir.display())
                }
            };
            let mut row = t.step(&x0, step).with_context(kept)?;
            step += 1;
            let sps = (step - start) as f64 / t0.elapsed().as_secs_f64();
            bar.set_position(step as u64);
            bar.set_message(format!("loss {:.4} {sps:.2} steps/s", row[0]));
            if step % 10 == 0 || step == sched.steps {
                if let Some(i) = sps_at {
                    row.insert(i, sps);
                }
                run.log(step, &row)?;
            }
            let stop = run.stop_requested();
            if step % sched.checkpoint_every == 0 || step == sched.steps || stop {
                // A step whose loss was finite can still leave NaN weights (a NaN learning
                // rate): they are never written as a checkpoint to resume from.
                let named = t.named();
                if let Some((name, _)) = named
                    .iter()
                    .find(|(_, v)| v.isfinite().logical_not().any().int64_value(&[]) != 0)
                {
                    return Err(anyhow::anyhow!(
                        "step {step}: {name} holds NaN or infinity; not checkpointed"
                    ))
                    .with_context(kept);
                }
                run.checkpoint(step, &named, hash, seconds0 + t0.elapsed().as_secs_f64())?;
                if last_plot.elapsed().as_secs() > 60 || step == sched.steps || stop {
                    run.plot()?;
                    last_plot = Instant::now();
                }
            }
            t.after_step(step, sched.steps, &dir)?;
            let every = sched.validate_every;
            if every > 0 && (step.is_multiple_of(every) || step == sched.steps) {
                if let Some(v) = t.validate()? {
                    run.log_validation(step, v)?;
                }
            }
            if stop {
                bar.abandon_with_message(format!(
                    "stopped at step {step}; resume with --run {}",
                    dir.display()
                ));
                return Ok(false);
            }
        }
        bar.finish_with_message("done");
        t.finish(&dir)?;
        Ok(true)
    })
}
