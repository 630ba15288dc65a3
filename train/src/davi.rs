//! `davi-train davi`: amortized variational inference of `I_phi` against a frozen diffusion
//! prior (Lee et al., ECCV 2024), as the official code (mlvlab/DAVI, `cm/train_util.py`) does it:
//! per step, one DSM update of the auxiliary score `s_psi` on fresh samples of `I_phi`, then one
//! update of `I_phi` on the IKL surrogate + data consistency + supervised term; EMA of `I_phi`.

use crate::backend::{output_map, TchBackend};
use crate::config::{train_config, DaviTrain};
use crate::data::{open_config, Split};
use crate::driver::{drive, finite, Schedule, Trainee};
use crate::gan::{adaptive_weight_clipped, AdaptiveFrom, PatchGan};
use crate::params::{AdamW, Ema, ParamSet};
use crate::prior::{step_rng, strip};
use crate::run::Run;
use crate::{checkpoint, losses};
use anyhow::{bail, Context, Result};
use davi_models::schedule::{beta31_step, Diffusion};
use davi_models::{DaviConfig, Implicit};
use rand::Rng;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// What `davi` was asked.
pub struct DaviArgs {
    /// The model config.
    pub config: PathBuf,
    /// Device.
    pub device: Device,
    /// Run folder (default `runs/<name>`); an existing run there is resumed.
    pub run: Option<PathBuf>,
    /// Override of the step count.
    pub steps: Option<usize>,
    /// Override of the teacher checkpoint.
    pub teacher: Option<PathBuf>,
    /// Train the config's supervised control ([`supervised_control`]).
    pub supervised: bool,
}

/// The supervised control of a DAVI config: the same config named `<name>-supervised`, with
/// `train.davi.supervised: true` (plain MSE to the truth; everything else identical). A config
/// that already is a control (e.g. a supervised run's own `config.yaml`) comes back unchanged.
pub fn supervised_control(mut cfg: DaviConfig) -> Result<DaviConfig> {
    if train_config(&cfg)?.davi.is_some_and(|d| d.supervised) {
        return Ok(cfg);
    }
    cfg.name = format!("{}-supervised", cfg.name);
    set_davi_field(&mut cfg, "supervised", true.into())?;
    // Plain MSE has no discriminator: the GAN settings are not the control's, and a DAVI config
    // with and without the GAN term has one control.
    if let Some(davi) = cfg
        .train
        .as_mut()
        .and_then(|t| t.get_mut("davi"))
        .and_then(|d| d.as_mapping_mut())
    {
        // In place: the other keys keep their order, so the hash is the one of the same
        // config written without the line.
        davi.shift_remove("gan");
    }
    Ok(cfg)
}

/// Sets `train.davi.teacher` of `cfg` to `--teacher`'s file, as an absolute path (`p.st` and
/// `./p.st` are one prior, and the run's config.yaml names it from anywhere).
pub fn set_teacher(cfg: &mut DaviConfig, teacher: &Path) -> Result<()> {
    let abs = std::fs::canonicalize(teacher)
        .with_context(|| format!("--teacher {}: cannot read", teacher.display()))?;
    set_davi_field(cfg, "teacher", abs.display().to_string().into())
}

/// Sets `train.davi.<key>` of `cfg`: what the command line overrides becomes part of the run's
/// config (its `config.yaml` and its hash), so a resume with another value is refused.
fn set_davi_field(cfg: &mut DaviConfig, key: &str, value: serde_yaml::Value) -> Result<()> {
    let train = cfg
        .train
        .get_or_insert_with(|| serde_yaml::Value::Mapping(Default::default()));
    let davi = train
        .as_mapping_mut()
        .ok_or_else(|| anyhow::anyhow!("train: not a mapping"))?
        .entry("davi".into())
        .or_insert_with(|| serde_yaml::Value::Mapping(Default::default()));
    davi.as_mapping_mut()
        .ok_or_else(|| anyhow::anyhow!("train.davi: not a mapping"))?
        .insert(key.into(), value);
    Ok(())
}

/// The loss terms of one `I_phi` step.
#[derive(Debug, Clone, Copy)]
pub struct Terms {
    /// IKL surrogate.
    pub ikl: f64,
    /// Data consistency `mean((y - H x_hat)^2)` (unweighted).
    pub con: f64,
    /// Supervised term (unweighted).
    pub reg: f64,
    /// Total weighted loss of `I_phi`.
    pub total: f64,
    /// DSM loss of `s_psi`.
    pub dsm: f64,
    /// Generator hinge term `-mean D(x_hat)` (0 without the GAN term).
    pub gan_g: f64,
    /// Discriminator hinge loss (0 without the GAN term).
    pub gan_d: f64,
    /// Adaptive weight put on the generator term (0 before `gan.start` or without it).
    pub gan_w: f64,
}

/// The networks and state of a DAVI run.
pub struct Trainer {
    /// `I_phi` (with operator and bridge).
    pub implicit: Implicit,
    /// The prior's diffusion.
    pub diffusion: Diffusion,
    /// The frozen teacher, as a backend built once.
    pub teacher: TchBackend,
    /// `s_psi`.
    pub aux_score: ParamSet,
    /// `phi`.
    pub phi: ParamSet,
    /// Optimizer of `s_psi`.
    pub opt_psi: AdamW,
    /// Optimizer of `phi`.
    pub opt_phi: AdamW,
    /// EMA of `phi` (what is exported).
    pub ema: Ema,
    /// The PatchGAN discriminator, when the config asks for the adversarial term.
    pub gan: Option<PatchGan>,
    /// Hyperparameters.
    pub hp: DaviTrain,
    /// Measurement noise.
    pub sigma_y: f64,
    /// Device.
    pub device: Device,
    /// Validation pairs `(y, z, x0)`, when the run validates.
    pub validation: Option<(Tensor, Tensor, Tensor)>,
    /// The IKL draws teacher steps `0..ikl_steps`: `t_ikl` on the teacher's schedule
    /// ([`crate::config::ikl_steps`]).
    pub ikl_steps: usize,
}

pub use crate::losses::measure;

/// The name of the last ResBlock's final convolution among `params` (the official code's
/// `output_blocks[-1][0].out_layers[-1].weight`), when there is one.
pub fn last_resblock_conv(params: &ParamSet) -> Option<String> {
    params
        .tensors
        .keys()
        .filter_map(|k| {
            let i = k
                .strip_prefix("output_blocks.")?
                .strip_suffix(".0.out_layers.3.weight")?;
            i.parse::<usize>().ok().map(|i| (i, k.clone()))
        })
        .max()
        .map(|(_, k)| k)
}

impl Trainer {
    /// Teacher, `s_psi` and `phi` all start from the prior's weights.
    pub fn new(
        cfg: &DaviConfig,
        hp: DaviTrain,
        teacher: std::collections::HashMap<String, Tensor>,
        device: Device,
    ) -> Result<Self> {
        let implicit = Implicit::new(cfg)?;
        let diffusion = Diffusion::new(cfg.diffusion.schedule, cfg.diffusion.steps);
        let aux_score = ParamSet::from_tensors(teacher.iter());
        let phi = ParamSet::from_tensors(teacher.iter());
        let opt_psi = AdamW::new(&aux_score, hp.lr, hp.weight_decay);
        let opt_phi = AdamW::new(&phi, hp.lr, hp.weight_decay);
        let ema = Ema::new(&phi, hp.ema);
        if let Some(g) = &hp.gan {
            if !phi.tensors.contains_key(&g.adaptive_layer) {
                bail!(
                    "gan.adaptive_layer: I_phi has no weight {:?} (the last ResBlock's final \
                     convolution of this network is {:?})",
                    g.adaptive_layer,
                    last_resblock_conv(&phi)
                );
            }
        }
        let gan = match &hp.gan {
            Some(g) => Some(PatchGan::new(
                cfg.unet.in_channels,
                cfg.unet.image_size,
                g.clone(),
                hp.lr,
                hp.seed as i64 + 1,
                device,
            )?),
            None => None,
        };
        // The frozen networks stay in f32 whatever `precision` says: the IKL gradient is the
        // difference of two close predictions, which bf16 rounding could swamp; they keep no
        // activations, so low precision would save no memory there.
        let teacher = TchBackend::new(
            teacher.into_iter().map(|(k, v)| (k, v.detach())).collect(),
            device,
        );
        if hp.t_ikl == 0 || hp.t_ikl > diffusion.steps() {
            bail!("t_ikl {} must be in 1..={}", hp.t_ikl, diffusion.steps());
        }
        let bridge_diffusion = Diffusion::new(cfg.diffusion.bridge(), cfg.diffusion.steps);
        let k =
            crate::config::ikl_steps(hp.t_ikl, hp.t_ikl_schedule, &diffusion, &bridge_diffusion);
        if k != hp.t_ikl {
            tracing::info!(
                "t_ikl {} counts bridge steps: the IKL draws teacher steps 0..{k} (same noise level)",
                hp.t_ikl
            );
        }
        Ok(Self {
            implicit,
            diffusion,
            teacher,
            aux_score,
            phi,
            opt_psi,
            opt_phi,
            ema,
            gan,
            hp,
            sigma_y: cfg.task()?.sigma_y,
            device,
            validation: None,
            ikl_steps: k,
        })
    }

    /// A training backend over `params` with the run's precision and checkpointing.
    fn trainable(&self, params: HashMap<String, Tensor>) -> TchBackend {
        TchBackend::training(
            params,
            self.device,
            self.hp.precision,
            self.hp.checkpointing,
        )
    }

    fn const_backend(&self) -> TchBackend {
        TchBackend::new(Default::default(), self.device)
    }

    /// One DAVI step on a batch of clean images; `step` seeds its randomness.
    pub fn step(&mut self, x0: &Tensor, step: usize) -> Result<Terms> {
        let hp = self.hp.clone();
        let ikl_steps = self.ikl_steps;
        let mut rng = step_rng(hp.seed, step);
        tch::manual_seed((hp.seed as i64).wrapping_add(step as i64));
        let n = x0.size()[0] as usize;
        let (c, s) = (self.implicit.channels, self.implicit.size);
        let op = self.implicit.operator.clone();
        let cb = self.const_backend();
        // Clamped to [-1, 1] as evaluation, parity fixtures and every image file see it.
        let y = measure(&op, &cb, x0, c, s, self.sigma_y).clamp(-1.0, 1.0);
        let y_lift = op.lift(&cb, &y, c, s);
        let t_bridge = self.implicit.bridge.steps();
        let draw_a = |rng: &mut rand_chacha::ChaCha8Rng| -> Vec<usize> {
            (0..n)
                .map(|_| {
                    if hp.bridge {
                        beta31_step(rng.random::<f64>(), t_bridge)
                    } else {
                        t_bridge - 1
                    }
                })
                .collect()
        };
        let draw_t = |rng: &mut rand_chacha::ChaCha8Rng| -> Vec<usize> {
            (0..n).map(|_| rng.random_range(0..ikl_steps)).collect()
        };

        if hp.supervised {
            return self.supervised_step(x0, &y, &y_lift, step, &mut rng, &draw_a);
        }
        // 1. s_psi: DSM on fresh, gradient-free samples of I_phi.
        let a = draw_a(&mut rng);
        let x_hat = tch::no_grad(|| -> Result<Tensor> {
            let b = TchBackend::new(self.phi.frozen(), self.device);
            let x_a = self
                .implicit
                .bridge_sample(&b, x0, &y_lift, &Tensor::randn_like(x0), &a);
            Ok(self.implicit.output_map(&b, &x_a, &a)?)
        })?;
        let t = draw_t(&mut rng);
        let bpsi = self.trainable(self.aux_score.handles());
        let eps = Tensor::randn_like(&x_hat);
        let dsm = losses::dsm(
            &self.implicit.unet,
            &bpsi,
            &self.diffusion,
            &x_hat,
            &t,
            &eps,
        )?;
        let dsm_v = finite("s_psi loss", dsm.double_value(&[]), step)?;
        self.aux_score.zero_grad();
        dsm.backward();
        bpsi.backward_checkpoints()?;
        self.aux_score.clip_grad_norm(hp.grad_clip);
        self.opt_psi.step(&mut self.aux_score);
        // The discriminator learns on the same gradient-free samples, before I_phi's update (as
        // the official code: its generator term below then meets this step's discriminator).
        let gan_on = self.gan.as_ref().is_some_and(|g| step >= g.cfg.start);
        let gan_d = match (&mut self.gan, gan_on) {
            (Some(gan), true) => gan.step(x0, &x_hat),
            _ => 0.0,
        };

        // 2. phi: IKL surrogate + data consistency + ground-truth term.
        let a = draw_a(&mut rng);
        let bphi = self.trainable(self.phi.handles());
        let x_a = self
            .implicit
            .bridge_sample(&bphi, x0, &y_lift, &Tensor::randn_like(x0), &a);
        let x_hat = output_map(&self.implicit, &bphi, &x_a, &a)?;
        let t = draw_t(&mut rng);
        let eps = Tensor::randn_like(&x_hat);
        let bp = TchBackend::new(self.aux_score.frozen(), self.device);
        let g = losses::ikl_gradient(
            &self.implicit.unet,
            &self.teacher,
            &bp,
            &self.diffusion,
            &x_hat,
            &t,
            &eps,
        )?;
        let ikl = losses::ikl_surrogate(&g, &x_hat);
        let con = losses::data_consistency(&op, &cb, &x_hat, &y, c, s);
        let reg = losses::ground_truth(&op, &cb, x0, &x_hat, c, s);
        let mut total = &ikl + &con * hp.weight_con + &reg * hp.reg_coeff;
        let (mut gan_g, mut gan_w) = (0.0, 0.0);
        if let (Some(gan), true) = (&self.gan, gan_on) {
            // The generator's term (hinge, plus feature matching when asked), weighted by the
            // ratio of gradient norms at the last layer against the total or the ground-truth
            // term (before reg_coeff, as the official code), clipped.
            let gen = gan.generator_term(&x_hat, x0);
            let last = &self.phi.tensors[&gan.cfg.adaptive_layer];
            let base = match gan.cfg.adaptive_from {
                AdaptiveFrom::Total => total.shallow_clone(),
                AdaptiveFrom::GroundTruth => reg.shallow_clone(),
            };
            gan_w =
                adaptive_weight_clipped(&base, &gen, last, gan.cfg.weight_clip) * gan.cfg.weight;
            gan_g = gen.double_value(&[]);
            total = &total + gen * gan_w;
        }
        let total_v = finite("I_phi loss", total.double_value(&[]), step)?;
        self.phi.zero_grad();
        total.backward();
        bphi.backward_checkpoints()?;
        self.phi.clip_grad_norm(hp.grad_clip);
        self.opt_phi.step(&mut self.phi);
        self.ema.update(&self.phi, step + 1);
        Ok(Terms {
            ikl: ikl.double_value(&[]),
            con: con.double_value(&[]),
            reg: reg.double_value(&[]),
            total: total_v,
            dsm: dsm_v,
            gan_g,
            gan_d,
            gan_w,
        })
    }

    /// The supervised control's step: `L = mean((x0 - x_hat)^2)` on a bridge sample, nothing
    /// else (the data consistency is logged, not trained on).
    fn supervised_step(
        &mut self,
        x0: &Tensor,
        y: &Tensor,
        y_lift: &Tensor,
        step: usize,
        rng: &mut rand_chacha::ChaCha8Rng,
        draw_a: &dyn Fn(&mut rand_chacha::ChaCha8Rng) -> Vec<usize>,
    ) -> Result<Terms> {
        let (c, s) = (self.implicit.channels, self.implicit.size);
        let a = draw_a(rng);
        let bphi = self.trainable(self.phi.handles());
        let x_a = self
            .implicit
            .bridge_sample(&bphi, x0, y_lift, &Tensor::randn_like(x0), &a);
        let x_hat = output_map(&self.implicit, &bphi, &x_a, &a)?;
        let mse = (x0 - &x_hat).square().mean(Kind::Float);
        let total = finite("supervised loss", mse.double_value(&[]), step)?;
        self.phi.zero_grad();
        mse.backward();
        bphi.backward_checkpoints()?;
        self.phi.clip_grad_norm(self.hp.grad_clip);
        self.opt_phi.step(&mut self.phi);
        self.ema.update(&self.phi, step + 1);
        let cb = self.const_backend();
        let con = tch::no_grad(|| {
            losses::data_consistency(&self.implicit.operator, &cb, &x_hat, y, c, s)
        });
        Ok(Terms {
            ikl: 0.0,
            con: con.double_value(&[]),
            reg: total,
            total,
            dsm: 0.0,
            gan_g: 0.0,
            gan_d: 0.0,
            gan_w: 0.0,
        })
    }

    /// Everything a checkpoint holds.
    pub fn named(&self) -> Vec<(String, Tensor)> {
        let mut all = self.phi.named("implicit.");
        all.extend(self.ema.named("ema."));
        all.extend(self.aux_score.named("aux_score."));
        all.extend(self.opt_phi.named("opt_phi."));
        all.extend(self.opt_psi.named("opt_psi."));
        if let Some(g) = &self.gan {
            all.extend(g.params.named("disc."));
            all.extend(g.opt.named("opt_disc."));
        }
        all
    }

    /// Restores a checkpoint written by [`Self::named`] at `step`.
    pub fn load(
        &mut self,
        all: &std::collections::HashMap<String, Tensor>,
        step: usize,
    ) -> Result<()> {
        self.phi.load_from(&strip(all, "implicit."))?;
        self.aux_score.load_from(&strip(all, "aux_score."))?;
        self.ema.tensors = strip(all, "ema.").into_iter().collect();
        self.opt_phi.load_from(all, "opt_phi.", step as i64)?;
        self.opt_psi.load_from(all, "opt_psi.", step as i64)?;
        if let Some(g) = &mut self.gan {
            g.params.load_from(&strip(all, "disc."))?;
            let start = g.cfg.start;
            g.opt
                .load_from(all, "opt_disc.", step.saturating_sub(start) as i64)?;
        }
        Ok(())
    }
}

impl Trainee for Trainer {
    fn columns(&self) -> Vec<&'static str> {
        let mut columns = vec!["total", "ikl", "con", "reg", "dsm", "steps_per_s"];
        if self.gan.is_some() {
            columns.extend(["gan_g", "gan_d", "gan_w"]);
        }
        columns
    }

    fn step(&mut self, x0: &Tensor, step: usize) -> Result<Vec<f64>> {
        let t = Trainer::step(self, x0, step)?;
        let mut row = vec![t.total, t.ikl, t.con, t.reg, t.dsm];
        if self.gan.is_some() {
            row.extend([t.gan_g, t.gan_d, t.gan_w]);
        }
        Ok(row)
    }

    fn named(&self) -> Vec<(String, Tensor)> {
        Trainer::named(self)
    }

    fn load(&mut self, all: &HashMap<String, Tensor>, step: usize) -> Result<()> {
        Trainer::load(self, all, step)
    }

    /// Writes the EMA weights `ema.safetensors`, what export reads.
    fn finish(&mut self, dir: &Path) -> Result<()> {
        checkpoint::save_tensors(&dir.join("ema.safetensors"), &self.ema.named(""))
    }

    /// PSNR of the EMA weights' restorations of the validation pairs.
    fn validate(&mut self) -> Result<Option<f64>> {
        let Some((y, z, x0)) = &self.validation else {
            return Ok(None);
        };
        let b = TchBackend::new(self.ema.handles(), self.device);
        // In chunks of the training batch: memory stays that of a training step (256 px
        // images at once would not fit).
        let (n, k) = (y.size()[0], self.hp.batch_size.max(1) as i64);
        let mut outs = Vec::new();
        for start in (0..n).step_by(k as usize) {
            let m = k.min(n - start);
            outs.push(tch::no_grad(|| {
                self.implicit
                    .restore(&b, &y.narrow(0, start, m), &z.narrow(0, start, m))
            })?);
        }
        let out = Tensor::cat(&outs, 0);
        crate::eval::check_finite("validation: the EMA model", &out)?;
        Ok(Some(crate::eval::mean_psnr_ssim(&out, x0).0))
    }
}

/// Validation pairs: the last `n` training images (never the test split), measured and given
/// bridge noise from a fixed seed, so every validation sees the same inputs.
fn validation_pairs(
    tr: &Trainer,
    data: &crate::data::Dataset,
    n: usize,
    device: Device,
) -> Result<(Tensor, Tensor, Tensor)> {
    let n = n.min(data.len).max(1);
    let idx: Vec<usize> = (data.len - n..data.len).collect();
    let (c, s) = (tr.implicit.channels, tr.implicit.size);
    let x0 = Tensor::from_slice(&data.batch(&idx)?)
        .reshape([n as i64, c as i64, s as i64, s as i64])
        .to_device(device);
    tch::manual_seed(777);
    let cb = TchBackend::new(Default::default(), device);
    let y = tch::no_grad(|| measure(&tr.implicit.operator, &cb, &x0, c, s, tr.sigma_y))
        .clamp(-1.0, 1.0);
    let z = Tensor::randn_like(&x0);
    Ok((y, z, x0))
}

/// Trains (or resumes) a DAVI model. Returns the run folder.
pub fn train(args: &DaviArgs) -> Result<PathBuf> {
    let mut cfg = DaviConfig::from_file(&args.config)?;
    if args.supervised {
        cfg = supervised_control(cfg)?;
    }
    if let Some(t) = &args.teacher {
        set_teacher(&mut cfg, t)?;
    }
    let mut hp = train_config(&cfg)?.davi.unwrap_or_default();
    if let Some(s) = args.steps {
        hp.steps = s;
    }
    if hp.teacher.is_empty() {
        bail!(
            "{}: train.davi.teacher (the prior's weights) is not set",
            args.config.display()
        );
    }
    let data = open_config(&cfg, &args.config, Split::Train, hp.skip_bad_files)?;
    let unet = davi_models::UNetModel::new(&cfg.unet)?;
    let teacher = checkpoint::load_params(
        Path::new(&hp.teacher),
        unet.param_shapes(),
        Some("ema."),
        args.device,
    )?;
    let dir = args
        .run
        .clone()
        .unwrap_or_else(|| PathBuf::from("runs").join(&cfg.name));
    let mut tr = Trainer::new(&cfg, hp.clone(), teacher, args.device)?;
    if hp.validate_every > 0 {
        tr.validation = Some(validation_pairs(&tr, &data, hp.validate_n, args.device)?);
    }
    let run = Run::open(&dir, &serde_yaml::to_string(&cfg)?, &tr.columns(), hp.keep)?;
    tracing::info!(
        "davi {} ({}): {} steps of {} on {}",
        cfg.name,
        tr.implicit.operator.task(),
        hp.steps,
        hp.batch_size,
        data.name
    );
    let sched = Schedule::new(hp.steps, hp.batch_size, hp.seed, hp.checkpoint_every)
        .validating(hp.validate_every);
    drive(&mut tr, &data, &run, &cfg.hash(), &sched.on(args.device))?;
    Ok(dir)
}
