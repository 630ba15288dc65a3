//! `davi-train prior`: eps-prediction DDPM training of the ADM UNet.

use crate::backend::{array_from_tensor, TchBackend};
use crate::config::{train_config, PriorTrain};
use crate::data::{open_config, Split};
use crate::driver::{drive, finite, Schedule, Trainee};
use crate::params::{AdamW, Ema, ParamSet};
use crate::run::{write_atomic, Run};
use crate::{checkpoint, diffusion, plot};
use anyhow::{Context, Result};
use davi_models::schedule::Diffusion;
use davi_models::{DaviConfig, UNetModel};
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
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

/// A prior in training: the UNet, its parameters, optimiser and EMA.
pub struct PriorTrainer {
    /// The network.
    pub unet: UNetModel,
    /// Its diffusion.
    pub diffusion: Diffusion,
    /// Parameters.
    pub params: ParamSet,
    /// AdamW.
    pub opt: AdamW,
    /// EMA of the parameters (what ships).
    pub ema: Ema,
    /// Hyperparameters.
    pub hp: PriorTrain,
    /// Device.
    pub device: Device,
}

impl PriorTrainer {
    /// A fresh prior of `cfg`.
    pub fn new(cfg: &DaviConfig, hp: PriorTrain, device: Device) -> Result<Self> {
        let unet = UNetModel::new(&cfg.unet)?;
        let params = ParamSet::init(&unet, hp.seed as i64, device);
        let opt = AdamW::new(&params, hp.lr, hp.weight_decay);
        let ema = Ema::new(&params, hp.ema);
        Ok(Self {
            diffusion: Diffusion::new(cfg.diffusion.schedule, cfg.diffusion.steps),
            unet,
            params,
            opt,
            ema,
            hp,
            device,
        })
    }

    /// A DDIM-50 sample grid of the EMA weights.
    fn grid(&self, path: &Path) -> Result<()> {
        let ema = &self.ema;
        sample_grid(
            &self.unet,
            ema,
            &self.diffusion,
            self.device,
            self.hp.sample_n,
            path,
        )
    }

    fn learns_sigma(&self) -> bool {
        self.unet.config.out_channels == 2 * self.unet.config.in_channels
    }
}

impl Trainee for PriorTrainer {
    fn columns(&self) -> Vec<&'static str> {
        // Learned sigma (out_channels = 2 C): the hybrid loss L_simple + L_vb of
        // improved-diffusion, with L_vb rescaled by T / 1000 (lambda = 0.001 of a sum over T terms).
        if self.learns_sigma() {
            vec!["loss", "grad_norm", "steps_per_s", "mse", "vb"]
        } else {
            vec!["loss", "grad_norm", "steps_per_s"]
        }
    }

    fn step(&mut self, x0: &Tensor, step: usize) -> Result<Vec<f64>> {
        let mut rng = step_rng(self.hp.seed, step);
        tch::manual_seed((self.hp.seed as i64).wrapping_add(step as i64));
        let n = x0.size()[0] as usize;
        let ts: Vec<usize> = (0..n)
            .map(|_| rng.random_range(0..self.diffusion.steps()))
            .collect();
        let noise = Tensor::randn_like(x0);
        let x_t = diffusion::q_sample(&self.diffusion, x0, &ts, &noise);
        let b = TchBackend::training(
            self.params.handles(),
            self.device,
            self.hp.precision,
            self.hp.checkpointing,
        );
        let (loss, extra) = loss(&self.unet, &b, &self.diffusion, x0, &x_t, &ts, &noise)?;
        let lv = finite("loss", loss.double_value(&[]), step)?;
        self.params.zero_grad();
        loss.backward();
        b.backward_checkpoints()?;
        let gn = self.params.clip_grad_norm(self.hp.grad_clip);
        self.opt.step(&mut self.params);
        self.ema.update(&self.params, step + 1);
        let mut row = vec![lv, gn];
        row.extend(extra);
        Ok(row)
    }

    fn named(&self) -> Vec<(String, Tensor)> {
        let mut all = self.params.named("model.");
        all.extend(self.ema.named("ema."));
        all.extend(self.opt.named("opt."));
        all
    }

    fn load(&mut self, all: &HashMap<String, Tensor>, step: usize) -> Result<()> {
        self.params.load_from(&strip(all, "model."))?;
        self.ema.tensors = strip(all, "ema.").into_iter().collect();
        self.opt.load_from(all, "opt.", step as i64)
    }

    fn after_step(&mut self, step: usize, total: usize, dir: &Path) -> Result<()> {
        let every = self.hp.sample_every;
        if every > 0 && step.is_multiple_of(every) && step != total {
            self.grid(&dir.join(format!("samples/step-{step:08}.png")))?;
        }
        Ok(())
    }

    /// Writes `ema.safetensors` (plain guided-diffusion names: the prior others load) and the
    /// final sample grid.
    fn finish(&mut self, dir: &Path) -> Result<()> {
        checkpoint::save_tensors(&dir.join("ema.safetensors"), &self.ema.named(""))?;
        self.grid(&dir.join("samples.png"))?;
        tracing::info!("wrote {}/ema.safetensors and samples.png", dir.display());
        Ok(())
    }
}

/// Trains (or resumes) a prior. Returns the run folder.
pub fn train(args: &PriorArgs) -> Result<PathBuf> {
    let cfg = DaviConfig::from_file(&args.config)?;
    let mut hp: PriorTrain = train_config(&cfg)?.prior.unwrap_or_default();
    if let Some(s) = args.steps {
        hp.steps = s;
    }
    let data = open_config(&cfg, &args.config, Split::Train, hp.skip_bad_files)?;
    let dir = args
        .run
        .clone()
        .unwrap_or_else(|| PathBuf::from("runs").join(&cfg.name));
    let mut t = PriorTrainer::new(&cfg, hp.clone(), args.device)?;
    if !hp.init.is_empty() {
        // A resumed run's checkpoint replaces these in `drive`.
        let w = checkpoint::load_params(
            Path::new(&hp.init),
            t.unet.param_shapes(),
            Some("ema."),
            args.device,
        )
        .with_context(|| format!("train.prior.init {}", hp.init))?;
        t.params.load_from(&w)?;
        t.ema = Ema::new(&t.params, hp.ema);
    }
    let run = Run::open(&dir, &serde_yaml::to_string(&cfg)?, &t.columns(), hp.keep)?;
    tracing::info!(
        "prior {}: {} parameters, {} on {:?}, {} steps of {}, {} loss",
        cfg.name,
        t.unet.num_params(),
        data.name,
        args.device,
        hp.steps,
        hp.batch_size,
        if t.learns_sigma() {
            "hybrid (learned sigma)"
        } else {
            "eps MSE"
        }
    );
    let sched = Schedule::new(hp.steps, hp.batch_size, hp.seed, hp.checkpoint_every);
    drive(&mut t, &data, &run, &cfg.hash(), &sched.on(args.device))?;
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
