//! `davi-train eval`: DAVI (one evaluation) against DPS (many) and the lifted measurement on
//! held-out images: PSNR and SSIM on [0, 1] with 95% intervals, network evaluations and wall time
//! per image, a contact sheet, JSON and Markdown.

use crate::backend::{array_from_tensor, TchBackend};
use crate::config::train_config;
use crate::data::{Dataset, Split};
use crate::davi::measure;
use crate::ddrm::{self, Ddrm, Svd};
use crate::dps::{self, Dps};
use crate::{checkpoint, plot, run::write_atomic};
use anyhow::{bail, Context, Result};
use davi_models::card::{DataConfig, EvalRow, EvalTable, ModelCard, PairedTable};
use davi_models::metrics::{mean_ci95, psnr, ssim};
use davi_models::schedule::Diffusion;
use davi_models::{DaviConfig, Implicit};
use ndarray::{s, Array4};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// What `eval` was asked.
#[derive(Clone)]
pub struct EvalArgs {
    /// DAVI checkpoint (EMA weights).
    pub checkpoint: PathBuf,
    /// The model config.
    pub config: PathBuf,
    /// Test images for DAVI and the lifted measurement.
    pub n: usize,
    /// DPS steps.
    pub dps_steps: usize,
    /// Test images for DPS (the first `dps_n` of the `n`).
    pub dps_n: usize,
    /// DPS step size.
    pub dps_zeta: f64,
    /// Output folder (JSON, Markdown, contact sheet).
    pub out: PathBuf,
    /// Model card to write the `eval:` table into.
    pub card: Option<PathBuf>,
    /// DPS's prior (default: the config's `train.davi.teacher`).
    pub teacher: Option<PathBuf>,
    /// Device.
    pub device: Device,
    /// Batch size.
    pub batch: usize,
    /// Posterior samples per measurement for the spread (below 2: skip), on the first 64 images.
    pub samples: usize,
    /// The Fashion-MNIST classifier's weights: FID (full runs) and KID (paired) on its features.
    pub features: Option<PathBuf>,
    /// DDRM steps (0: skip), on all `n` images with the teacher.
    pub ddrm_steps: usize,
    /// The supervised control's checkpoint (same network, plain MSE), scored on the same
    /// measurements and noise as DAVI.
    pub supervised: Option<PathBuf>,
    /// The run folder the model trained in (its `state.json` gives the card's steps and time;
    /// default: the checkpoint's folder, when it is a run).
    pub trained_in: Option<PathBuf>,
}

/// One method's scores.
#[derive(Debug, Clone, Serialize)]
pub struct MethodScores {
    /// Images scored.
    pub n: usize,
    /// Mean PSNR (dB).
    pub psnr: f64,
    /// 95% half-interval.
    pub psnr_ci95: f64,
    /// Mean SSIM.
    pub ssim: f64,
    /// 95% half-interval.
    pub ssim_ci95: f64,
    /// Network evaluations per image.
    pub nfe: usize,
    /// Wall seconds per image.
    pub seconds_per_image: f64,
    /// FID against the truth on the classifier's features (the full runs), when measured.
    pub fid: Option<f64>,
    /// KID against the truth on the classifier's features (the paired runs), when measured.
    pub kid: Option<f64>,
}

impl MethodScores {
    /// A method that was not run (NaN scores, n = 0).
    pub fn not_run() -> Self {
        Self {
            n: 0,
            psnr: f64::NAN,
            psnr_ci95: f64::NAN,
            ssim: f64::NAN,
            ssim_ci95: f64::NAN,
            nfe: 0,
            seconds_per_image: f64::NAN,
            fid: None,
            kid: None,
        }
    }
}

pub use davi_models::card::SampleSpread;

/// The evaluation report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Model name.
    pub model: String,
    /// Task.
    pub task: String,
    /// DAVI.
    pub davi: MethodScores,
    /// The lifted measurement.
    pub lifted: MethodScores,
    /// DPS (on the first `dps.n` images, `dps.nfe` steps).
    pub dps: MethodScores,
    /// DDRM (all images, `ddrm.nfe` steps; n = 0 when not run).
    pub ddrm: MethodScores,
    /// The supervised control (n = 0 when not given).
    pub supervised: MethodScores,
    /// Posterior samples of DAVI.
    pub samples: Option<SampleSpread>,
    /// Every method on the images DPS ran on (absent without DPS).
    pub paired: Option<Paired>,
    /// DPS's step size.
    pub dps_zeta: f64,
    /// Device.
    pub device: String,
}

/// Scores of every method on the same images.
#[derive(Debug, Clone, Serialize)]
pub struct Paired {
    /// DAVI.
    pub davi: MethodScores,
    /// The lifted measurement.
    pub lifted: MethodScores,
    /// DPS.
    pub dps: MethodScores,
    /// DDRM.
    pub ddrm: MethodScores,
    /// The supervised control.
    pub supervised: MethodScores,
}

/// An error naming `what` when its outputs hold NaN or infinity: a broken model or a diverged
/// sampler is not scored (PSNR of NaN would read as anything).
pub fn check_finite(what: &str, out: &Tensor) -> Result<()> {
    let bad = out
        .isfinite()
        .logical_not()
        .sum(Kind::Int64)
        .int64_value(&[]);
    if bad > 0 {
        bail!(
            "{what}: {bad} of {} output values are NaN or infinite; not scored",
            out.numel()
        );
    }
    Ok(())
}

fn scores(pred: &Array4<f32>, truth: &Array4<f32>, nfe: usize, secs: f64) -> MethodScores {
    let n = pred.shape()[0];
    let to01 = |a: ndarray::ArrayView3<f32>| a.mapv(|v| (v.clamp(-1.0, 1.0) + 1.0) / 2.0);
    let mut p = Vec::new();
    let mut q = Vec::new();
    for i in 0..n {
        let a = to01(pred.slice(s![i, .., .., ..]));
        let b = to01(truth.slice(s![i, .., .., ..]));
        // Identical images cap at 100 dB; a NaN stays NaN (`NaN.min(100)` would be 100).
        let v = psnr(a.view(), b.view());
        p.push(if v.is_nan() { v } else { v.min(100.0) });
        q.push(ssim(a.view(), b.view()));
    }
    let (pm, pc) = mean_ci95(&p);
    let (sm, sc) = mean_ci95(&q);
    MethodScores {
        n,
        psnr: pm,
        psnr_ci95: pc,
        ssim: sm,
        ssim_ci95: sc,
        nfe,
        seconds_per_image: secs / n.max(1) as f64,
        fid: None,
        kid: None,
    }
}

/// Mean PSNR and SSIM (on [0, 1]) of images against the truth, both `[n, c, s, s]` on [-1, 1].
pub fn mean_psnr_ssim(pred: &Tensor, truth: &Tensor) -> (f64, f64) {
    let m = scores(&arr4(pred), &arr4(truth), 0, 0.0);
    (m.psnr, m.ssim)
}

fn arr4(t: &Tensor) -> Array4<f32> {
    array_from_tensor(t).into_dimensionality().expect("rank 4")
}

/// DAVI's restorations of the first `n` test images, with their measurements and lifts.
struct DaviRun {
    x: Tensor,
    y: Tensor,
    lifted: Tensor,
    restored: Tensor,
    /// The bridge noise of each restoration (reused by the supervised control).
    z: Tensor,
    seconds: f64,
}

/// Measures the first `n` images of `ds` (noise seeded once) and restores them with `I_phi`,
/// timing the restorations alone (after an untimed warm-up).
fn run_davi(
    implicit: &Implicit,
    bphi: &TchBackend,
    ds: &Dataset,
    n: usize,
    batch: usize,
    sigma_y: f64,
    device: Device,
) -> Result<DaviRun> {
    let (c, s) = (implicit.channels, implicit.size);
    tch::no_grad(|| -> Result<()> {
        let [cy, hy, wy] = implicit.operator.measurement_shape(c, s);
        let y = Tensor::zeros([1, cy as i64, hy as i64, wy as i64], (Kind::Float, device));
        let z = Tensor::zeros([1, c as i64, s as i64, s as i64], (Kind::Float, device));
        let _ = implicit.restore(bphi, &y, &z)?;
        Ok(())
    })?;
    tch::manual_seed(4321);
    let (mut xs, mut ys, mut lifts, mut outs, mut zs) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut seconds = 0.0;
    for start in (0..n).step_by(batch) {
        let m = batch.min(n - start);
        let idx: Vec<usize> = (start..start + m).collect();
        let x0 = Tensor::from_slice(&ds.batch(&idx)?)
            .reshape([m as i64, c as i64, s as i64, s as i64])
            .to_device(device);
        let (y, lifted, out, z, secs) = tch::no_grad(|| -> Result<_> {
            let y = measure(&implicit.operator, bphi, &x0, c, s, sigma_y).clamp(-1.0, 1.0);
            let lifted = implicit.operator.lift(bphi, &y, c, s).clamp(-1.0, 1.0);
            let z = Tensor::randn_like(&x0);
            let t = Instant::now();
            let out = implicit.restore(bphi, &y, &z)?;
            let _ = out.sum(Kind::Float).double_value(&[]); // synchronise before timing
            Ok((y, lifted, out, z, t.elapsed().as_secs_f64()))
        })?;
        seconds += secs;
        xs.push(x0);
        ys.push(y);
        lifts.push(lifted);
        outs.push(out);
        zs.push(z);
    }
    Ok(DaviRun {
        x: Tensor::cat(&xs, 0),
        y: Tensor::cat(&ys, 0),
        lifted: Tensor::cat(&lifts, 0),
        restored: Tensor::cat(&outs, 0),
        z: Tensor::cat(&zs, 0),
        seconds,
    })
}

/// DPS with the teacher on the first `dps_n` measurements of `run`: scores and images.
fn run_dps(
    implicit: &Implicit,
    teacher: &TchBackend,
    diff: &Diffusion,
    run: &DaviRun,
    dps_n: usize,
    args: &EvalArgs,
) -> Result<(MethodScores, Tensor)> {
    let cfg_dps = Dps {
        steps: args.dps_steps,
        zeta: args.dps_zeta,
    };
    let mut outs = Vec::new();
    let t = Instant::now();
    let mut nfe = 0;
    for start in (0..dps_n).step_by(args.batch) {
        let m = args.batch.min(dps_n - start);
        let (o, k) = dps::restore(
            &implicit.unet,
            teacher,
            diff,
            &implicit.operator,
            &run.y.narrow(0, start as i64, m as i64),
            &cfg_dps,
            99 + start as i64,
        )?;
        nfe = k;
        outs.push(o);
    }
    let secs = t.elapsed().as_secs_f64();
    let o = Tensor::cat(&outs, 0);
    check_finite(&format!("DPS (zeta {})", args.dps_zeta), &o)?;
    let truth = arr4(&run.x.narrow(0, 0, dps_n as i64));
    Ok((scores(&arr4(&o), &truth, nfe, secs), o))
}

/// DDRM with the teacher on every measurement of `run`: scores and images.
fn run_ddrm(
    implicit: &Implicit,
    teacher: &TchBackend,
    diff: &Diffusion,
    run: &DaviRun,
    sigma_y: f64,
    args: &EvalArgs,
) -> Result<(MethodScores, Tensor)> {
    let (c, s) = (implicit.channels, implicit.size);
    // The decomposition is part of DDRM's cost: timed with it (once per operator).
    let t = Instant::now();
    let svd = Svd::of(&implicit.operator, c, s, args.device)?;
    let cfg = Ddrm {
        steps: args.ddrm_steps,
        ..Default::default()
    };
    let n = run.x.size()[0] as usize;
    let (mut outs, mut nfe) = (Vec::new(), 0);
    for start in (0..n).step_by(args.batch) {
        let m = args.batch.min(n - start);
        let y = run.y.narrow(0, start as i64, m as i64);
        let (o, k) = ddrm::restore(
            &implicit.unet,
            teacher,
            diff,
            &svd,
            &y,
            sigma_y,
            &cfg,
            77 + start as i64,
        )?;
        nfe = k;
        outs.push(o);
    }
    let o = Tensor::cat(&outs, 0);
    let _ = o.sum(Kind::Float).double_value(&[]); // synchronise before timing
    let secs = t.elapsed().as_secs_f64();
    check_finite("DDRM", &o)?;
    Ok((scores(&arr4(&o), &arr4(&run.x), nfe, secs), o))
}

/// An exported model given for `cfg` must invert the same operator at the same size: its
/// metadata (`davi.operator`, `davi.image_size`, `davi.channels`) is checked.
fn check_exported(path: &Path, cfg: &DaviConfig) -> Result<()> {
    if path
        .extension()
        .is_none_or(|e| !e.eq_ignore_ascii_case("onnx"))
    {
        return Ok(());
    }
    let m = davi_export::metadata(&davi_export::read_model(path)?);
    let op: davi_models::Operator = serde_json::from_str(
        m.get("davi.operator")
            .with_context(|| format!("{}: no davi.operator metadata", path.display()))?,
    )
    .with_context(|| format!("{}: bad davi.operator metadata", path.display()))?;
    let size = m
        .get("davi.image_size")
        .and_then(|v| v.parse::<usize>().ok());
    let channels = m.get("davi.channels").and_then(|v| v.parse::<usize>().ok());
    let want = &cfg.task()?.operator;
    if &op != want || size != Some(cfg.unet.image_size) || channels != Some(cfg.unet.in_channels) {
        anyhow::bail!(
            "{}: made for {:?} at {:?} px, {:?} channels; the config {} is {:?} at {} px, {} channels",
            path.display(),
            op,
            size,
            channels,
            cfg.name,
            want,
            cfg.unet.image_size,
            cfg.unet.in_channels
        );
    }
    Ok(())
}

/// A control checkpoint in a run folder must come from this config's control: the run's
/// `state.json` records the hash of the config it trained on.
fn check_control_run(path: &Path, cfg: &DaviConfig) -> Result<()> {
    let Some(state) = path
        .parent()
        .map(|d| d.join("state.json"))
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|s| serde_json::from_str::<crate::run::RunState>(&s).ok())
    else {
        return Ok(());
    };
    let want = crate::davi::supervised_control(cfg.clone())?.hash();
    if state.config_hash != want {
        anyhow::bail!(
            "{}: its run trained on another config (hash {}) than the supervised control of {} ({want})",
            path.display(),
            state.config_hash,
            cfg.name
        );
    }
    Ok(())
}

/// The supervised control's `I_phi` on DAVI's measurements and noise: scores and images.
fn run_supervised(
    implicit: &Implicit,
    path: &Path,
    run: &DaviRun,
    args: &EvalArgs,
) -> Result<(MethodScores, Tensor)> {
    let b = checkpoint::load_backend(path, &implicit.unet, args.device)?;
    let n = run.x.size()[0] as usize;
    let mut outs = Vec::new();
    let t = Instant::now();
    for start in (0..n).step_by(args.batch) {
        let m = args.batch.min(n - start) as i64;
        let (st, y, z) = (start as i64, &run.y, &run.z);
        outs.push(tch::no_grad(|| {
            implicit.restore(&b, &y.narrow(0, st, m), &z.narrow(0, st, m))
        })?);
    }
    let o = Tensor::cat(&outs, 0);
    let _ = o.sum(Kind::Float).double_value(&[]); // synchronise before timing
    let secs = t.elapsed().as_secs_f64();
    check_finite("the supervised control", &o)?;
    Ok((scores(&arr4(&o), &arr4(&run.x), 1, secs), o))
}

/// The spread of `k` DAVI posterior samples of the first 64 measurements, and their data
/// consistency against the truth's.
fn sample_spread(
    implicit: &Implicit,
    bphi: &TchBackend,
    run: &DaviRun,
    k: usize,
) -> Result<SampleSpread> {
    let (c, s) = (implicit.channels, implicit.size);
    let m = run.x.size()[0].min(64);
    let (yk, xk) = (run.y.narrow(0, 0, m), run.x.narrow(0, 0, m));
    tch::no_grad(|| -> Result<SampleSpread> {
        let outs: Vec<Tensor> = (0..k)
            .map(|_| implicit.restore(bphi, &yk, &Tensor::randn_like(&xk)))
            .collect::<Result<_, _>>()?;
        let st = Tensor::stack(&outs, 0); // [K, m, C, S, S]
        let spread = (st.std_dim([0i64].as_slice(), true, false) / 2.0)
            .mean(Kind::Float)
            .double_value(&[]);
        let dc = |img: &Tensor| {
            (implicit.operator.forward(bphi, img, c, s) - &yk)
                .square()
                .mean(Kind::Float)
                .double_value(&[])
        };
        let consistency_samples = outs.iter().map(dc).sum::<f64>() / outs.len() as f64;
        Ok(SampleSpread {
            k,
            n: m as usize,
            spread,
            consistency_samples,
            consistency_truth: dc(&xk),
        })
    })
}

/// The contact sheet: lifted measurement | DAVI | DPS | DDRM | supervised control | truth (the
/// methods that ran), first 8 images, 3x magnified.
fn write_sheet(
    run: &DaviRun,
    others: &[Option<&Tensor>],
    c: usize,
    s: usize,
    path: &Path,
) -> Result<()> {
    let n = run.x.size()[0];
    let others: Vec<&Tensor> = others.iter().flatten().copied().collect();
    let rows = others.iter().fold(8.min(n), |r, d| r.min(d.size()[0]));
    let mut cols = vec![
        run.lifted.narrow(0, 0, rows),
        run.restored.narrow(0, 0, rows),
    ];
    for d in others {
        cols.push(d.narrow(0, 0, rows));
    }
    cols.push(run.x.narrow(0, 0, rows));
    let (k, rows) = (cols.len(), rows as usize);
    let grid = Tensor::stack(&cols, 1).reshape([(rows * k) as i64, c as i64, s as i64, s as i64]);
    let a = array_from_tensor(&grid);
    let img = plot::grid(a.as_slice().expect("contiguous"), rows * k, c, s, k);
    let img = image::imageops::resize(
        &img,
        img.width() * 3,
        img.height() * 3,
        image::imageops::FilterType::Nearest,
    );
    let mut buf = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut buf), image::ImageFormat::Png)?;
    write_atomic(path, &buf)
}

/// Runs the evaluation; writes `eval.json`, `eval.md` and `sheet.png` to `args.out`.
pub fn eval(args: &EvalArgs) -> Result<Report> {
    let cfg = DaviConfig::from_file(&args.config)?;
    let task = cfg.task()?.clone();
    let implicit = Implicit::new(&cfg)?;
    let diff = Diffusion::new(cfg.diffusion.schedule, cfg.diffusion.steps);
    let ds = crate::data::open_config(&cfg, &args.config, Split::Test, true)?;
    let n = args.n.min(ds.len);
    check_exported(&args.checkpoint, &cfg)?;
    // Runs trained with `--teacher` hold it in their config: so does the one they are checked
    // against.
    let mut run_cfg = cfg.clone();
    if let Some(t) = &args.teacher {
        crate::davi::set_teacher(&mut run_cfg, t)?;
    }
    if let Some(d) = &args.trained_in {
        check_trained_in(d, &run_cfg)?;
    }
    // The card is read now (another model's, a pipe, a broken one: refused before any work),
    // and written at the end.
    if let Some(card) = &args.card {
        card_for(card, &cfg)?;
    }
    if let Some(p) = &args.supervised {
        check_exported(p, &cfg)?;
        check_control_run(p, &run_cfg)?;
    }
    let t_max = cfg.diffusion.steps;
    if args.ddrm_steps == 1 || args.ddrm_steps > t_max {
        anyhow::bail!("--ddrm-steps {}: 0 (skip) or 2..={t_max}", args.ddrm_steps);
    }
    let bphi = checkpoint::load_backend(&args.checkpoint, &implicit.unet, args.device)?;
    let teacher_path = match &args.teacher {
        Some(t) => t.display().to_string(),
        None => train_config(&cfg)?
            .davi
            .map(|d| d.teacher)
            .unwrap_or_default(),
    };
    let run = run_davi(
        &implicit,
        &bphi,
        &ds,
        n,
        args.batch,
        task.sigma_y,
        args.device,
    )?;
    check_finite("DAVI", &run.restored)?;
    let truth = arr4(&run.x);
    let davi = scores(&arr4(&run.restored), &truth, 1, run.seconds);
    let lifted = scores(&arr4(&run.lifted), &truth, 0, 0.0);
    let dps_n = args.dps_n.min(n);
    let (c, s) = (implicit.channels, implicit.size);
    let ddrm_fits = c * s * s <= ddrm::MAX_DIM;
    if args.ddrm_steps > 0 && !ddrm_fits {
        tracing::warn!(
            "DDRM skipped: {c}x{s}x{s} images are too large for its dense decomposition"
        );
    }
    if (args.ddrm_steps > 0 || dps_n > 0) && teacher_path.is_empty() {
        tracing::warn!("DDRM and DPS skipped: no prior (give --teacher or train.davi.teacher)");
    }
    let teacher = if (dps_n > 0 || (args.ddrm_steps > 0 && ddrm_fits)) && !teacher_path.is_empty() {
        Some(checkpoint::load_backend(
            Path::new(&teacher_path),
            &implicit.unet,
            args.device,
        )?)
    } else {
        None
    };
    let (dps_scores, dps_imgs) = if let (true, Some(teacher)) = (dps_n > 0, &teacher) {
        let (sc, imgs) = run_dps(&implicit, teacher, &diff, &run, dps_n, args)?;
        (sc, Some(imgs))
    } else {
        (MethodScores::not_run(), None)
    };
    let (ddrm_scores, ddrm_imgs) =
        if let (true, Some(teacher)) = (args.ddrm_steps > 0 && ddrm_fits, &teacher) {
            let (sc, imgs) = run_ddrm(&implicit, teacher, &diff, &run, task.sigma_y, args)?;
            (sc, Some(imgs))
        } else {
            (MethodScores::not_run(), None)
        };
    let (sup_scores, sup_imgs) = match &args.supervised {
        Some(p) => {
            let (sc, imgs) = run_supervised(&implicit, p, &run, args)?;
            (sc, Some(imgs))
        }
        None => (MethodScores::not_run(), None),
    };
    // Every method on exactly the images DPS ran on.
    let paired = dps_imgs.as_ref().map(|_| {
        let first = |t: &Tensor| arr4(&t.narrow(0, 0, dps_n as i64));
        let truth = first(&run.x);
        let per = |m: &MethodScores| m.seconds_per_image * dps_n as f64;
        let per_image = run.seconds / n.max(1) as f64;
        let sub = |imgs: &Option<Tensor>, m: &MethodScores| match imgs {
            Some(t) => scores(&first(t), &truth, m.nfe, per(m)),
            None => MethodScores::not_run(),
        };
        Paired {
            davi: scores(&first(&run.restored), &truth, 1, per_image * dps_n as f64),
            lifted: scores(&first(&run.lifted), &truth, 0, 0.0),
            dps: dps_scores.clone(),
            ddrm: sub(&ddrm_imgs, &ddrm_scores),
            supervised: sub(&sup_imgs, &sup_scores),
        }
    });
    let (mut davi, mut lifted, mut paired) = (davi, lifted, paired);
    let (mut ddrm_scores, mut sup_scores) = (ddrm_scores, sup_scores);
    if let Some(path) = &args.features {
        if (implicit.channels, implicit.size) != (1, 32) {
            anyhow::bail!("--features: the classifier takes 32x32 grey images (Fashion-MNIST)");
        }
        let clf = crate::features::Classifier::load(path, args.device)?;
        let f = |t: &Tensor| clf.features(t);
        let truth = f(&run.x);
        davi.fid = Some(crate::features::fid(&f(&run.restored), &truth));
        lifted.fid = Some(crate::features::fid(&f(&run.lifted), &truth));
        if let Some(o) = &ddrm_imgs {
            ddrm_scores.fid = Some(crate::features::fid(&f(o), &truth));
        }
        if let Some(o) = &sup_imgs {
            sup_scores.fid = Some(crate::features::fid(&f(o), &truth));
        }
        if let (Some(p), Some(d)) = (paired.as_mut(), dps_imgs.as_ref()) {
            let m = dps_n as i64;
            let t = truth.narrow(0, 0, m);
            p.davi.kid = Some(crate::features::kid(&f(&run.restored.narrow(0, 0, m)), &t));
            p.lifted.kid = Some(crate::features::kid(&f(&run.lifted.narrow(0, 0, m)), &t));
            p.dps.kid = Some(crate::features::kid(&f(d), &t));
            if let Some(o) = &ddrm_imgs {
                p.ddrm.kid = Some(crate::features::kid(&f(&o.narrow(0, 0, m)), &t));
            }
            if let Some(o) = &sup_imgs {
                p.supervised.kid = Some(crate::features::kid(&f(&o.narrow(0, 0, m)), &t));
            }
        }
    }
    let samples = (args.samples > 1)
        .then(|| sample_spread(&implicit, &bphi, &run, args.samples))
        .transpose()?;
    let report = Report {
        model: cfg.name.clone(),
        task: task.operator.task().into(),
        davi,
        lifted,
        dps: dps_scores,
        ddrm: ddrm_scores,
        supervised: sup_scores,
        samples,
        paired,
        dps_zeta: args.dps_zeta,
        device: format!("{:?}", args.device),
    };
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("{}: cannot create", args.out.display()))?;
    write_atomic(
        &args.out.join("eval.json"),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    write_atomic(&args.out.join("eval.md"), markdown(&report).as_bytes())?;
    let (c, s) = (implicit.channels, implicit.size);
    write_sheet(
        &run,
        &[dps_imgs.as_ref(), ddrm_imgs.as_ref(), sup_imgs.as_ref()],
        c,
        s,
        &args.out.join("sheet.png"),
    )?;
    if let Some(card_path) = &args.card {
        let run_dir = match &args.trained_in {
            Some(d) => d.clone(),
            None => args
                .checkpoint
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_default(),
        };
        update_card(card_path, &run_dir, &cfg, &run_cfg, &report)?;
    }
    Ok(report)
}

/// The Markdown table of a report.
pub fn markdown(r: &Report) -> String {
    let opt = |v: Option<f64>| v.map_or("".to_string(), |v| format!("{v:.4}"));
    let row = |name: &str, m: &MethodScores| {
        format!(
            "| {name} | {} | {:.2} ± {:.2} | {:.4} ± {:.4} | {} | {} | {} | {:.4} |\n",
            m.n,
            m.psnr,
            m.psnr_ci95,
            m.ssim,
            m.ssim_ci95,
            opt(m.fid),
            opt(m.kid),
            m.nfe,
            m.seconds_per_image
        )
    };
    let mut s = format!(
        "{} ({}), device {}\n\n| method | images | PSNR (dB) | SSIM | FID | KID | network evaluations | seconds / image |\n|---|---:|---:|---:|---:|---:|---:|---:|\n",
        r.model, r.task, r.device
    );
    s += &row("lifted measurement", &r.lifted);
    s += &row("DAVI", &r.davi);
    if r.dps.n > 0 {
        s += &row(&format!("DPS ({} steps)", r.dps.nfe), &r.dps);
    }
    if r.ddrm.n > 0 {
        s += &row(&format!("DDRM ({} steps)", r.ddrm.nfe), &r.ddrm);
    }
    if r.supervised.n > 0 {
        s += &row("supervised control", &r.supervised);
    }
    if let Some(p) = &r.paired {
        s += &format!(
            "\nPaired, on the {} images DPS ran on:\n\n| method | images | PSNR (dB) | SSIM | FID | KID | network evaluations | seconds / image |\n|---|---:|---:|---:|---:|---:|---:|---:|\n",
            p.dps.n
        );
        s += &row("lifted measurement", &p.lifted);
        s += &row("DAVI", &p.davi);
        s += &row(&format!("DPS ({} steps)", p.dps.nfe), &p.dps);
        if p.ddrm.n > 0 {
            s += &row(&format!("DDRM ({} steps)", p.ddrm.nfe), &p.ddrm);
        }
        if p.supervised.n > 0 {
            s += &row("supervised control", &p.supervised);
        }
    }
    if let Some(k) = &r.samples {
        s += &format!(
            "\n{} DAVI samples of each of {} measurements: per-pixel spread {:.4} (std on [0, 1]); \
             data consistency mean((y - H x)^2) {:.5} for the samples, {:.5} for the truth\n",
            k.k, k.n, k.spread, k.consistency_samples, k.consistency_truth
        );
    }
    s
}

/// The card at `path` to add `cfg`'s scores to: the card as it is (its data described afresh)
/// when it describes the same task and operator, a blank one when there is none or when it is
/// this model's card of another operator (a model retrained on a changed operator: the old
/// card's scores, DPS tuning and photographs no longer apply, and keeping them would put one
/// operator's numbers beside another's). The card of another model is an error, not replaced.
pub fn card_for(path: &Path, cfg: &DaviConfig) -> Result<ModelCard> {
    if !path.exists() {
        if let Some(d) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(d)
                .with_context(|| format!("{}: cannot create its folder", path.display()))?;
        }
        return blank_card(cfg);
    }
    let bytes = davi_models::atomic::read_regular(path, 16 << 20)
        .with_context(|| format!("{}: unreadable", path.display()))?;
    let card: ModelCard = serde_yaml::from_str(
        std::str::from_utf8(&bytes)
            .with_context(|| format!("{}: not UTF-8 text", path.display()))?,
    )
    .with_context(|| format!("{}: bad card", path.display()))?;
    if card.name != cfg.name {
        anyhow::bail!(
            "{}: the card of {}, not of {}; give this model's card",
            path.display(),
            card.name,
            cfg.name
        );
    }
    if &card.task == cfg.task()? {
        let mut card = card;
        card.data = blank_card(cfg)?.data;
        return Ok(card);
    }
    tracing::warn!(
        "{}: the card describes another task or operator than {}; its scores are replaced by a blank card",
        path.display(),
        cfg.name
    );
    blank_card(cfg)
}

/// A card for `cfg` with no scores yet: name, task and operator, and its data in words.
pub fn blank_card(cfg: &DaviConfig) -> Result<ModelCard> {
    let s = cfg.unet.image_size;
    let data = match &cfg.data {
        Some(DataConfig::FashionMnist { .. }) => {
            "Fashion-MNIST (60,000 training images, 28x28 grey padded to 32x32)".into()
        }
        Some(DataConfig::Photos {
            dir,
            extra_dirs,
            test_photos,
            exclude,
            downscale,
        }) => {
            let dirs = std::iter::once(dir)
                .chain(extra_dirs)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ");
            let dirs = if exclude.is_empty() {
                dirs
            } else {
                format!("{dirs} (less {})", exclude.join(", "))
            };
            if test_photos.is_empty() {
                format!("{s}x{s} crops of the photographs in {dirs}, downscaled by {downscale} (left 80% of each; the right 20% test)")
            } else {
                format!(
                    "{s}x{s} crops of the photographs in {dirs}, downscaled by {downscale}; held out whole for test (no scene shared): {}",
                    test_photos.join(", ")
                )
            }
        }
        Some(DataConfig::Folder { dir }) => format!("images of {dir}"),
        None => "unknown".into(),
    };
    Ok(ModelCard {
        name: cfg.name.clone(),
        task: cfg.task()?.clone(),
        data,
        training_steps: 0,
        training_seconds: 0.0,
        notes: None,
        eval: None,
        dps_tuning: None,
        whole_photos: None,
    })
}

/// The state of the run folder `dir`, when it has one.
pub(crate) fn run_state(dir: &Path) -> Option<crate::run::RunState> {
    let text = std::fs::read_to_string(dir.join("state.json")).ok()?;
    serde_json::from_str(&text).ok()
}

/// `--trained-in DIR`: a run folder of this very config (its state's config hash), or an error
/// before any work; the card's steps and time are read from it.
fn check_trained_in(dir: &Path, cfg: &DaviConfig) -> Result<()> {
    let st = run_state(dir).with_context(|| {
        format!(
            "--trained-in {}: not a run folder (no readable state.json)",
            dir.display()
        )
    })?;
    if !same_config(dir, &st, cfg) {
        bail!(
            "--trained-in {}: a run of another config (hash {}, this config's is {}); give the run of this model, or evaluate with the run's config.yaml",
            dir.display(),
            st.config_hash,
            cfg.hash()
        );
    }
    Ok(())
}

/// Whether the run in `dir` (its state `st`) trained on `cfg`, up to the name: a run shipped
/// under another name (an ablation run that became the model) is the same training.
pub(crate) fn same_config(dir: &Path, st: &crate::run::RunState, cfg: &DaviConfig) -> bool {
    if st.config_hash == cfg.hash() {
        return true;
    }
    let Ok(mut ran) = DaviConfig::from_file(&dir.join("config.yaml")) else {
        return false;
    };
    if ran.hash() != st.config_hash {
        return false;
    }
    ran.name = cfg.name.clone();
    ran.hash() == cfg.hash()
}

fn update_card(
    path: &Path,
    run_dir: &Path,
    cfg: &DaviConfig,
    run_cfg: &DaviConfig,
    r: &Report,
) -> Result<()> {
    let row = |m: &MethodScores| EvalRow {
        n: Some(m.n),
        psnr: m.psnr,
        psnr_ci95: Some(m.psnr_ci95),
        ssim: m.ssim,
        ssim_ci95: Some(m.ssim_ci95),
        fid: m.fid,
        kid: m.kid,
        nfe: m.nfe,
        seconds_per_image: m.seconds_per_image,
    };
    let mut card = card_for(path, cfg)?;
    // Steps and time from the run folder, when it is a run of this very config.
    if let Some(st) = run_state(run_dir).filter(|st| same_config(run_dir, st, run_cfg)) {
        card.training_steps = st.step;
        card.training_seconds = st.seconds;
    }
    card.eval = Some(EvalTable {
        n: r.davi.n,
        davi: row(&r.davi),
        dps: (r.dps.n > 0).then(|| row(&r.dps)),
        lifted: row(&r.lifted),
        dps_zeta: (r.dps.n > 0).then_some(r.dps_zeta),
        ddrm: (r.ddrm.n > 0).then(|| row(&r.ddrm)),
        supervised: (r.supervised.n > 0).then(|| row(&r.supervised)),
        paired: r.paired.as_ref().map(|p| PairedTable {
            n: p.dps.n,
            davi: row(&p.davi),
            dps: row(&p.dps),
            lifted: row(&p.lifted),
            ddrm: (p.ddrm.n > 0).then(|| row(&p.ddrm)),
            supervised: (p.supervised.n > 0).then(|| row(&p.supervised)),
        }),
        samples: r.samples.clone(),
    });
    write_atomic(path, serde_yaml::to_string(&card)?.as_bytes())
}
