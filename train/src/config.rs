//! The `train:` section of a model config: hyperparameters of prior and DAVI training.

use anyhow::{Context, Result};
use davi_models::DaviConfig;
use serde::{Deserialize, Serialize};

/// Prior (DDPM) training.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PriorTrain {
    /// Images per step.
    pub batch_size: usize,
    /// AdamW learning rate.
    pub lr: f64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// EMA decay (with warm-up).
    pub ema: f64,
    /// Total steps.
    pub steps: usize,
    /// Gradient norm clip (0: off).
    pub grad_clip: f64,
    /// Checkpoint every N steps.
    pub checkpoint_every: usize,
    /// Sample grid every N steps (0: only at the end).
    pub sample_every: usize,
    /// Samples in a grid (DDIM, 50 steps).
    pub sample_n: usize,
    /// Checkpoints kept.
    pub keep: usize,
    /// Seed of weights, batches and noise.
    pub seed: u64,
    /// Skip unreadable training files (counted) instead of stopping.
    pub skip_bad_files: bool,
    /// Gradient checkpointing of the UNet blocks being trained: keeps block outputs only and
    /// recomputes each block in the backward pass (less memory, about one more forward).
    pub checkpointing: bool,
    /// Precision of the matrix products of the networks being trained: `f32` (default) or
    /// `bf16` (autocast); gradient-free forwards (teacher, IKL) stay f32.
    pub precision: crate::backend::Precision,
    /// Start from these weights (a prior's EMA safetensors, guided-diffusion names) instead of
    /// guided-diffusion's initialisation: fine-tuning a prior on other data. The parameters and
    /// the EMA start there; the optimiser starts fresh. Empty: from scratch.
    pub init: String,
}

impl Default for PriorTrain {
    fn default() -> Self {
        Self {
            batch_size: 64,
            lr: 2e-4,
            weight_decay: 0.0,
            ema: 0.999,
            steps: 5000,
            grad_clip: 1.0,
            checkpoint_every: 200,
            sample_every: 1000,
            sample_n: 64,
            keep: 3,
            seed: 0,
            skip_bad_files: true,
            checkpointing: false,
            precision: Default::default(),
            init: String::new(),
        }
    }
}

/// DAVI training (defaults: the official FFHQ values where they apply).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaviTrain {
    /// The prior's weights (EMA safetensors, guided-diffusion names): teacher, and the start of
    /// `s_psi` and `I_phi`.
    pub teacher: String,
    /// Images per step.
    pub batch_size: usize,
    /// AdamW learning rate of `I_phi` and `s_psi`.
    pub lr: f64,
    /// AdamW weight decay (PyTorch's default 0.01, as the official code).
    pub weight_decay: f64,
    /// EMA decay of `I_phi` (with warm-up).
    pub ema: f64,
    /// Total steps.
    pub steps: usize,
    /// IKL timesteps are drawn from `0..t_ikl` (in steps of the schedule `t_ikl_schedule` names).
    pub t_ikl: usize,
    /// What `t_ikl` counts: `teacher` steps (the default), or `bridge` steps as in the official
    /// scripts, whose teacher is queried with the bridge's (i2sb) `alpha_bar`: the IKL then
    /// draws teacher steps up to the same noise level, `alpha_bar_teacher(t) >=
    /// alpha_bar_bridge(t_ikl - 1)` (official 400 draws linear teacher steps 0..244).
    pub t_ikl_schedule: TIklSchedule,
    /// Weight of the data-consistency term.
    pub weight_con: f64,
    /// Weight of the supervised term.
    pub reg_coeff: f64,
    /// Gradient norm clip (0: off, as the official code).
    pub grad_clip: f64,
    /// Checkpoint every N steps.
    pub checkpoint_every: usize,
    /// Checkpoints kept.
    pub keep: usize,
    /// Seed.
    pub seed: u64,
    /// Skip unreadable training files.
    pub skip_bad_files: bool,
    /// Train on the Perturbed Posterior Bridge (`a ~ Beta(3, 1)`); `false` is the ablation of the
    /// paper: `a` fixed at T-1 (set `task.h: 0` too for no perturbation).
    pub bridge: bool,
    /// The PatchGAN hinge term with VQGAN's adaptive weight (absent: off, the default).
    pub gan: Option<crate::gan::GanConfig>,
    /// Steps between validations: PSNR of the EMA weights on `validate_n` validation images
    /// (the last training images) into `validation.csv` (0: never).
    pub validate_every: usize,
    /// Validation images.
    pub validate_n: usize,
    /// The supervised control: the same `I_phi`, initialised alike, trained on the same pairs
    /// with plain MSE to the truth alone (no IKL, no `s_psi`, no data consistency term): what
    /// the diffusion prior adds beyond DAVI's ground-truth term.
    pub supervised: bool,
    /// Gradient checkpointing of the UNet blocks being trained: keeps block outputs only and
    /// recomputes each block in the backward pass (less memory, about one more forward).
    pub checkpointing: bool,
    /// Precision of the matrix products: `f32` (default) or `bf16` (autocast).
    pub precision: crate::backend::Precision,
}

impl Default for DaviTrain {
    fn default() -> Self {
        Self {
            teacher: String::new(),
            batch_size: 32,
            lr: 1e-4,
            weight_decay: 0.01,
            ema: 0.9999,
            steps: 2000,
            t_ikl: 1000,
            t_ikl_schedule: TIklSchedule::Teacher,
            weight_con: 0.5,
            reg_coeff: 1.0,
            grad_clip: 0.0,
            checkpoint_every: 100,
            keep: 3,
            seed: 0,
            skip_bad_files: true,
            bridge: true,
            gan: None,
            supervised: false,
            validate_every: 500,
            validate_n: 256,
            checkpointing: false,
            precision: Default::default(),
        }
    }
}

/// `train:` of a config.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Prior training.
    #[serde(default)]
    pub prior: Option<PriorTrain>,
    /// DAVI training.
    #[serde(default)]
    pub davi: Option<DaviTrain>,
}

/// What `train.davi.t_ikl` counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TIklSchedule {
    /// Steps of the teacher's schedule.
    #[default]
    Teacher,
    /// Steps of the bridge's schedule, mapped to the teacher's step of equal noise level.
    Bridge,
}

/// The teacher steps `0..k` the IKL draws from, for `t_ikl` counted on `counted`: with
/// `Bridge`, `k` is the number of teacher steps whose `alpha_bar` is at least the bridge's
/// `alpha_bar` at `t_ikl - 1` (at least 1).
pub fn ikl_steps(
    t_ikl: usize,
    counted: TIklSchedule,
    teacher: &davi_models::schedule::Diffusion,
    bridge: &davi_models::schedule::Diffusion,
) -> usize {
    match counted {
        TIklSchedule::Teacher => t_ikl,
        TIklSchedule::Bridge => {
            let level = bridge.alphas_cumprod[t_ikl.clamp(1, bridge.steps()) - 1];
            let k = teacher
                .alphas_cumprod
                .iter()
                .take_while(|&&ab| ab >= level)
                .count();
            k.max(1)
        }
    }
}

/// The typed `train:` section of `cfg` (defaults when absent), its values checked.
pub fn train_config(cfg: &DaviConfig) -> Result<TrainConfig> {
    let t: TrainConfig = match &cfg.train {
        None => TrainConfig::default(),
        Some(v) => serde_yaml::from_value(v.clone())
            .with_context(|| format!("config '{}': bad train section", cfg.name))?,
    };
    t.check()
        .with_context(|| format!("config '{}': bad train section", cfg.name))?;
    Ok(t)
}

/// `Err` naming `field` unless `ok`.
fn need(ok: bool, field: &str, value: impl std::fmt::Display, what: &str) -> Result<()> {
    if ok {
        Ok(())
    } else {
        anyhow::bail!("{field}: {value}: {what}")
    }
}

impl TrainConfig {
    /// Every value in its range, so that a bad one is an error before any step, not a NaN
    /// loss, a panic or a silent no-op hours later.
    pub fn check(&self) -> Result<()> {
        let finite_pos = |v: f64| v.is_finite() && v > 0.0;
        let finite_nonneg = |v: f64| v.is_finite() && v >= 0.0;
        let decay = |v: f64| (0.0..1.0).contains(&v);
        if let Some(p) = &self.prior {
            need(
                p.batch_size > 0,
                "train.prior.batch_size",
                p.batch_size,
                "at least 1",
            )?;
            need(
                finite_pos(p.lr),
                "train.prior.lr",
                p.lr,
                "a finite value above 0",
            )?;
            need(
                finite_nonneg(p.weight_decay),
                "train.prior.weight_decay",
                p.weight_decay,
                "finite, at least 0",
            )?;
            need(decay(p.ema), "train.prior.ema", p.ema, "a decay in [0, 1)")?;
            need(
                finite_nonneg(p.grad_clip),
                "train.prior.grad_clip",
                p.grad_clip,
                "finite, at least 0 (0: off)",
            )?;
            need(p.steps > 0, "train.prior.steps", p.steps, "at least 1")?;
            need(
                p.checkpoint_every > 0,
                "train.prior.checkpoint_every",
                p.checkpoint_every,
                "at least 1",
            )?;
            need(p.keep > 0, "train.prior.keep", p.keep, "at least 1")?;
        }
        if let Some(d) = &self.davi {
            need(
                d.batch_size > 0,
                "train.davi.batch_size",
                d.batch_size,
                "at least 1",
            )?;
            need(
                finite_pos(d.lr),
                "train.davi.lr",
                d.lr,
                "a finite value above 0",
            )?;
            need(
                finite_nonneg(d.weight_decay),
                "train.davi.weight_decay",
                d.weight_decay,
                "finite, at least 0",
            )?;
            need(decay(d.ema), "train.davi.ema", d.ema, "a decay in [0, 1)")?;
            need(d.steps > 0, "train.davi.steps", d.steps, "at least 1")?;
            need(
                finite_nonneg(d.weight_con),
                "train.davi.weight_con",
                d.weight_con,
                "finite, at least 0",
            )?;
            need(
                finite_nonneg(d.reg_coeff),
                "train.davi.reg_coeff",
                d.reg_coeff,
                "finite, at least 0",
            )?;
            need(
                finite_nonneg(d.grad_clip),
                "train.davi.grad_clip",
                d.grad_clip,
                "finite, at least 0 (0: off)",
            )?;
            need(
                d.checkpoint_every > 0,
                "train.davi.checkpoint_every",
                d.checkpoint_every,
                "at least 1",
            )?;
            need(d.keep > 0, "train.davi.keep", d.keep, "at least 1")?;
            need(
                d.validate_every == 0 || d.validate_n > 0,
                "train.davi.validate_n",
                d.validate_n,
                "at least 1 when validate_every is set",
            )?;
            if let Some(g) = &d.gan {
                need(
                    finite_nonneg(g.weight),
                    "train.davi.gan.weight",
                    g.weight,
                    "finite, at least 0",
                )?;
                need(
                    finite_nonneg(g.lr),
                    "train.davi.gan.lr",
                    g.lr,
                    "finite, at least 0 (0: that of I_phi)",
                )?;
                let (lo, hi) = g.weight_clip;
                need(
                    lo.is_finite() && hi.is_finite() && 0.0 <= lo && lo <= hi,
                    "train.davi.gan.weight_clip",
                    format!("[{lo}, {hi}]"),
                    "finite [low, high] with 0 <= low <= high",
                )?;
                let (b1, b2) = g.betas;
                need(
                    decay(b1) && decay(b2),
                    "train.davi.gan.betas",
                    format!("[{b1}, {b2}]"),
                    "each in [0, 1)",
                )?;
                need(
                    g.layers > 0 && g.ndf > 0,
                    "train.davi.gan.layers / ndf",
                    format!("{} / {}", g.layers, g.ndf),
                    "at least 1",
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use davi_models::schedule::{BetaSchedule, Diffusion};

    #[test]
    fn t_ikl_in_bridge_steps_keeps_its_noise_level_on_the_teacher() {
        let lin = Diffusion::new(BetaSchedule::Linear, 1000);
        let i2sb = Diffusion::new(BetaSchedule::I2sb, 1000);
        assert_eq!(ikl_steps(400, TIklSchedule::Teacher, &lin, &i2sb), 400);
        // Same schedule on both sides: nothing changes.
        for t in [1, 400, 1000] {
            assert_eq!(ikl_steps(t, TIklSchedule::Bridge, &lin, &lin), t);
        }
        for t in [100, 400, 1000] {
            let k = ikl_steps(t, TIklSchedule::Bridge, &lin, &i2sb);
            let level = i2sb.alphas_cumprod[t - 1];
            // The last teacher step drawn is no noisier than the official level, the next is.
            assert!(lin.alphas_cumprod[k - 1] >= level, "{t}: {k}");
            assert!(k == 1000 || lin.alphas_cumprod[k] < level, "{t}: {k}");
            // The i2sb betas start smaller: the same noise comes earlier on the linear schedule.
            assert!(k < t, "{t}: {k}");
        }
    }
}
