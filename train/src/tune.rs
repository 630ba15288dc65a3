//! `davi-train tune-dps`: DPS's step size zeta swept on validation images, never the test split
//! (the last `n` images of the training split: DPS trains nothing, so any image outside the test
//! set is fair). Every zeta restores the same measurements from the same noise; the best mean
//! PSNR wins, after a refinement around the best of the grid.

use crate::data::{open_config, Split};
use crate::dps::{self, Dps};
use crate::eval::mean_psnr_ssim;
use crate::{checkpoint, config::train_config, davi::measure, TchBackend};
use anyhow::{bail, Context, Result};
use davi_models::card::DpsTuning;
use davi_models::schedule::Diffusion;
use davi_models::{DaviConfig, Implicit};
use std::path::{Path, PathBuf};
use tch::{Device, Tensor};

/// What `tune-dps` was asked.
pub struct TuneArgs {
    /// Model config (its operator, sigma_y, data and teacher).
    pub config: PathBuf,
    /// DPS's prior (default: the config's `train.davi.teacher`).
    pub teacher: Option<PathBuf>,
    /// The zetas of the grid.
    pub zetas: Vec<f64>,
    /// Refine around the best of the grid (its geometric midpoints with the neighbours).
    pub refine: bool,
    /// Validation images.
    pub n: usize,
    /// DPS steps.
    pub steps: usize,
    /// Device.
    pub device: Device,
    /// Write the sweep and the chosen zeta into this card.
    pub card: Option<PathBuf>,
}

/// Runs the sweep; returns the tuning (also written into the card when asked).
pub fn tune(args: &TuneArgs) -> Result<DpsTuning> {
    if args.zetas.is_empty() || args.zetas.iter().any(|z| !(z.is_finite() && *z >= 0.0)) {
        bail!("--zeta: one or more finite step sizes >= 0");
    }
    if args.n == 0 || args.steps == 0 {
        bail!("-n and --dps-steps: at least 1 (a sweep on no image chooses nothing)");
    }
    let cfg = DaviConfig::from_file(&args.config)?;
    let task = cfg.task()?.clone();
    let implicit = Implicit::new(&cfg)?;
    let diff = Diffusion::new(cfg.diffusion.schedule, cfg.diffusion.steps);
    let teacher = teacher_path(&cfg, args.teacher.as_deref())?;
    let teacher_sha256 = Some(file_sha256(&teacher)?);
    let bt = checkpoint::load_backend(&teacher, &implicit.unet, args.device)?;
    let ds = open_config(&cfg, &args.config, Split::Train, true)?;
    let n = args.n.min(ds.len);
    let idx: Vec<usize> = (ds.len - n..ds.len).collect();
    let (c, s) = (implicit.channels, implicit.size);
    let x0 = Tensor::from_slice(&ds.batch(&idx)?)
        .reshape([n as i64, c as i64, s as i64, s as i64])
        .to_device(args.device);
    tch::manual_seed(2024);
    let cb = TchBackend::new(Default::default(), args.device);
    let y =
        tch::no_grad(|| measure(&implicit.operator, &cb, &x0, c, s, task.sigma_y)).clamp(-1.0, 1.0);
    let split = format!("validation: the last {n} images of the training split");
    // Zetas already measured on the same images and steps (a stopped sweep) are not rerun.
    let done: Vec<(f64, f64, f64)> = match &args.card {
        // A sweep on another operator (the card of a model since retrained) is not reused.
        Some(card) if card.is_file() => match crate::eval::card_for(card, &cfg)?.dps_tuning {
            // Nor one of another prior (since retrained).
            Some(t)
                if t.split == split
                    && t.n == n
                    && t.steps == args.steps
                    && t.teacher_sha256 == teacher_sha256 =>
            {
                t.sweep
            }
            _ => Vec::new(),
        },
        _ => Vec::new(),
    };
    let mut sweep: Vec<(f64, f64, f64)> = Vec::new();
    // Each zeta is recorded in the card as it finishes (`complete: false` until the last).
    let record = |sweep: &[(f64, f64, f64)], complete: bool| -> Result<()> {
        if let Some(card) = &args.card {
            let t = DpsTuning {
                split: split.clone(),
                n,
                steps: args.steps,
                zeta: best_of(sweep),
                sweep: sweep.to_vec(),
                complete,
                teacher_sha256: teacher_sha256.clone(),
            };
            write_card(card, &cfg, &t)?;
        }
        Ok(())
    };
    let run = |zeta: f64, sweep: &mut Vec<(f64, f64, f64)>| -> Result<()> {
        if let Some(r) = done.iter().find(|r| r.0 == zeta) {
            eprintln!("tune-dps: zeta {zeta}: PSNR {:.2} dB (recorded)", r.1);
            sweep.push(*r);
        } else {
            let cfg_dps = Dps {
                steps: args.steps,
                zeta,
            };
            let (out, _) = dps::restore(
                &implicit.unet,
                &bt,
                &diff,
                &implicit.operator,
                &y,
                &cfg_dps,
                7,
            )?;
            // A zeta whose DPS diverged is recorded as NaN, and never chosen.
            let (p, q) = match crate::eval::check_finite("DPS", &out) {
                Ok(()) => mean_psnr_ssim(&out, &x0),
                Err(e) => {
                    eprintln!("tune-dps: zeta {zeta}: diverged ({e})");
                    (f64::NAN, f64::NAN)
                }
            };
            eprintln!(
                "tune-dps: zeta {zeta}: PSNR {p:.2} dB, SSIM {q:.4} on {n} validation images"
            );
            sweep.push((zeta, p, q));
        }
        record(sweep, false)
    };
    for &z in &args.zetas {
        run(z, &mut sweep)?;
    }
    if !sweep.iter().any(|r| r.1.is_finite()) {
        bail!(
            "tune-dps: DPS diverged at every zeta of the grid; nothing chosen (try smaller ones)"
        );
    }
    if args.refine && args.zetas.len() > 1 {
        let mut grid = args.zetas.clone();
        grid.sort_by(|a, b| a.total_cmp(b));
        let best = best_of(&sweep);
        let i = grid.iter().position(|&z| z == best).unwrap_or(0);
        let mut mids: Vec<f64> = [i.checked_sub(1), (i + 1 < grid.len()).then_some(i + 1)]
            .into_iter()
            .flatten()
            .map(|j| (grid[j] * best).sqrt())
            .filter(|&z| z > 0.0)
            .collect();
        let inner = if i == 0 { grid.get(1) } else { grid.get(i - 1) };
        if (i == 0 || i + 1 == grid.len()) && best > 0.0 {
            if let Some(&j) = inner.filter(|&&j| j > 0.0) {
                mids.push(best * best / j);
            }
        }
        for z in mids {
            run(z, &mut sweep)?;
        }
    }
    if !sweep.iter().any(|r| r.1.is_finite()) {
        bail!(
            "tune-dps: DPS diverged at every zeta of the sweep; nothing chosen (try smaller ones)"
        );
    }
    record(&sweep, true)?;
    let tuning = DpsTuning {
        split,
        n,
        steps: args.steps,
        zeta: best_of(&sweep),
        sweep,
        complete: true,
        teacher_sha256,
    };
    Ok(tuning)
}

/// DPS's prior: `teacher` when given, else the config's `train.davi.teacher`.
pub fn teacher_path(cfg: &DaviConfig, teacher: Option<&Path>) -> Result<PathBuf> {
    Ok(match teacher {
        Some(t) => t.to_path_buf(),
        None => PathBuf::from(
            train_config(cfg)?
                .davi
                .map(|d| d.teacher)
                .unwrap_or_default(),
        ),
    })
}

/// Hex SHA-256 of a file.
pub fn file_sha256(path: &Path) -> Result<String> {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    let mut f =
        std::fs::File::open(path).with_context(|| format!("{}: cannot read", path.display()))?;
    std::io::copy(&mut f, &mut h).with_context(|| format!("{}: cannot read", path.display()))?;
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// The zeta of the best PSNR; a zeta whose DPS diverged (PSNR NaN) never wins.
fn best_of(sweep: &[(f64, f64, f64)]) -> f64 {
    sweep
        .iter()
        .filter(|r| r.1.is_finite())
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map_or(1.0, |r| r.0)
}

/// Writes the sweep into the card, made from the config when it does not exist yet.
fn write_card(path: &Path, cfg: &DaviConfig, tuning: &DpsTuning) -> Result<()> {
    let mut card = crate::eval::card_for(path, cfg)?;
    card.dps_tuning = Some(tuning.clone());
    crate::run::write_atomic(path, serde_yaml::to_string(&card)?.as_bytes())
}
