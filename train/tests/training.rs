//! Training: loss goes down, resume equals an uninterrupted run, killed checkpoint writes leave a
//! readable checkpoint, and DAVI's loss terms are what the method says.

use davi_models::schedule::{BetaSchedule, Bridge, Diffusion};
use davi_models::{DaviConfig, Implicit, UNetModel};
use davi_train::backend::TchBackend;
use davi_train::params::ParamSet;
use davi_train::{checkpoint, diffusion, prior};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

const UNET: &str = "unet:\n  image_size: 16\n  in_channels: 1\n  model_channels: 32\n  out_channels: 1\n  num_res_blocks: 1\n  attention_resolutions: [8]\n  channel_mult: [1, 2]\n  num_head_channels: 32\n  use_scale_shift_norm: true\n  resblock_updown: true\n";

/// 16 grey images with structure, and a config training on them.
fn setup(dir: &Path, extra: &str) -> PathBuf {
    let imgs = dir.join("imgs");
    std::fs::create_dir_all(&imgs).unwrap();
    for i in 0..16u32 {
        image::GrayImage::from_fn(16, 16, |x, y| {
            image::Luma([if (x / 4 + y / 4 + i) % 2 == 0 {
                230
            } else {
                20
            }])
        })
        .save(imgs.join(format!("{i:02}.png")))
        .unwrap();
    }
    let cfg = dir.join("cfg.yaml");
    std::fs::write(
        &cfg,
        format!(
            "name: t\n{UNET}data:\n  kind: folder\n  dir: {}\n{extra}",
            imgs.display()
        ),
    )
    .unwrap();
    cfg
}

fn prior_cfg(dir: &Path, steps: usize) -> PathBuf {
    setup(
        dir,
        &format!("train:\n  prior:\n    batch_size: 8\n    lr: 1.0e-3\n    steps: {steps}\n    checkpoint_every: 2\n    sample_every: 0\n    sample_n: 4\n    ema: 0.9\n"),
    )
}

/// libtorch's RNG is global to the process and the tests of this file seed it and compare
/// results, so they run one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Trains (or resumes) the prior of `cfg` in `run` on the CPU.
fn train_prior(cfg: &Path, run: &Path, steps: Option<usize>) {
    prior::train(&prior::PriorArgs {
        config: cfg.to_path_buf(),
        device: Device::Cpu,
        run: Some(run.to_path_buf()),
        steps,
    })
    .unwrap();
}

/// `n` grey 16x16 images of random black and white pixels, on [-1, 1].
fn binary_images(n: i64) -> Tensor {
    Tensor::rand([n, 1, 16, 16], (Kind::Float, Device::Cpu))
        .gt(0.5)
        .to_kind(Kind::Float)
        * 2.0
        - 1.0
}

/// The trained weights of the prior run in `run` at `step`.
fn trained_params(
    unet: &UNetModel,
    run: &Path,
    step: usize,
) -> std::collections::HashMap<String, Tensor> {
    checkpoint::load_params(
        &run.join(format!("ckpt-{step:08}.safetensors")),
        unet.param_shapes(),
        Some("model."),
        Device::Cpu,
    )
    .unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    f64::try_from((a - b).abs().max()).unwrap()
}

/// Mean eps-MSE of `params` on a fixed batch, fixed timesteps and noise.
fn fixed_loss(unet: &UNetModel, params: std::collections::HashMap<String, Tensor>) -> f64 {
    let d = Diffusion::new(BetaSchedule::Linear, 1000);
    tch::manual_seed(11);
    let x0 = binary_images(16);
    let ts: Vec<usize> = (0..16).map(|i| 50 + i * 60).collect();
    let eps = Tensor::randn_like(&x0);
    let x_t = diffusion::q_sample(&d, &x0, &ts, &eps);
    let b = TchBackend::new(params, Device::Cpu);
    tch::no_grad(|| {
        (diffusion::eps(unet, &b, &x_t, &ts).unwrap() - eps)
            .square()
            .mean(Kind::Float)
            .double_value(&[])
    })
}

#[test]
fn prior_steps_lower_the_loss() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = prior_cfg(tmp.path(), 30);
    let run = tmp.path().join("run");
    train_prior(&cfg, &run, None);
    let c = DaviConfig::from_file(&cfg).unwrap();
    let unet = UNetModel::new(&c.unet).unwrap();
    let init = ParamSet::init(&unet, 0, Device::Cpu).frozen();
    let trained = trained_params(&unet, &run, 30);
    let (before, after) = (fixed_loss(&unet, init), fixed_loss(&unet, trained));
    assert!(after < 0.8 * before, "loss {before} -> {after}");
    for f in [
        "metrics.csv",
        "loss.png",
        "config.yaml",
        "ema.safetensors",
        "samples.png",
        "state.json",
    ] {
        assert!(run.join(f).is_file(), "{f} missing");
    }
}

#[test]
fn resumed_run_equals_uninterrupted_run() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = prior_cfg(tmp.path(), 6);
    let a = tmp.path().join("a");
    train_prior(&cfg, &a, None);
    let b = tmp.path().join("b");
    train_prior(&cfg, &b, Some(4));
    train_prior(&cfg, &b, None);
    let ta = checkpoint::load_tensors(&a.join("ckpt-00000006.safetensors"), Device::Cpu).unwrap();
    let tb = checkpoint::load_tensors(&b.join("ckpt-00000006.safetensors"), Device::Cpu).unwrap();
    assert_eq!(ta.len(), tb.len());
    for (k, t) in &ta {
        let d = max_diff(t, &tb[k]);
        assert!(d < 1e-5, "{k} differs by {d}");
    }
    // Rows are logged every 10 steps and at the end of each invocation: steps 4 and 6, once each.
    let rows = std::fs::read_to_string(b.join("metrics.csv")).unwrap();
    let steps: Vec<&str> = rows
        .lines()
        .skip(1)
        .map(|l| l.split(',').next().unwrap())
        .collect();
    assert_eq!(steps, vec!["4", "6"], "{rows}");
}

#[test]
fn a_prior_with_init_starts_from_those_weights_and_a_wrong_init_names_itself() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    train_prior(&prior_cfg(&tmp.path().join("da"), 10), &a, None);
    // Fine-tuning at a learning rate of 1e-12: the step-1 parameters are the init's (Adam moves
    // each by about the rate), and not the fresh initialisation.
    let init = a.join("ema.safetensors");
    let cfg = setup(
        &tmp.path().join("db"),
        &format!("train:\n  prior:\n    batch_size: 8\n    lr: 1.0e-12\n    steps: 1\n    checkpoint_every: 1\n    sample_every: 0\n    sample_n: 4\n    init: {}\n", init.display()),
    );
    let b = tmp.path().join("b");
    train_prior(&cfg, &b, None);
    let c = DaviConfig::from_file(&cfg).unwrap();
    let unet = UNetModel::new(&c.unet).unwrap();
    let want = checkpoint::load_params(&init, unet.param_shapes(), None, Device::Cpu).unwrap();
    let got = trained_params(&unet, &b, 1);
    let fresh = ParamSet::init(&unet, 0, Device::Cpu).frozen();
    let mut moved = 0.0f64;
    for (k, t) in &want {
        let d = max_diff(t, &got[k]);
        assert!(d < 1e-9, "{k} is {d} from the init's");
        moved = moved.max(max_diff(t, &fresh[k]));
    }
    assert!(
        moved > 1e-3,
        "the init equals the fresh weights: the test shows nothing"
    );
    // An init of another network is refused, naming the setting and the file.
    let other = tmp.path().join("other.safetensors");
    checkpoint::save_tensors(
        &other,
        &[(
            "x".to_string(),
            Tensor::zeros([2], (Kind::Float, Device::Cpu)),
        )],
    )
    .unwrap();
    let bad = setup(
        &tmp.path().join("dc"),
        &format!(
            "train:\n  prior:\n    steps: 1\n    init: {}\n",
            other.display()
        ),
    );
    let err = prior::train(&prior::PriorArgs {
        config: bad,
        device: Device::Cpu,
        run: Some(tmp.path().join("c")),
        steps: None,
    })
    .unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("train.prior.init") && msg.contains("other.safetensors"),
        "{msg}"
    );
}

/// `davi-train prior --config cfg --run run --device cpu`, as a command to spawn.
fn prior_command(cfg: &Path, run: &Path) -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_davi-train"));
    c.args(["prior", "--config"])
        .arg(cfg)
        .arg("--run")
        .arg(run)
        .args(["--device", "cpu"]);
    c
}

#[test]
fn killed_training_keeps_a_readable_checkpoint_and_resumes() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = prior_cfg(tmp.path(), 400);
    let run = tmp.path().join("run");
    let step_of = |run: &Path| -> usize {
        std::fs::read_to_string(run.join("state.json"))
            .ok()
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
            .and_then(|v| v["step"].as_u64())
            .unwrap_or(0) as usize
    };
    for delay_ms in [0u64, 97, 211] {
        let before = step_of(&run);
        let mut child = prior_command(&cfg, &run)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Wait for a new checkpoint, then kill at some point of the next one's cycle.
        let t = std::time::Instant::now();
        while step_of(&run) <= before && t.elapsed().as_secs() < 120 {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(step_of(&run) > before, "no checkpoint within 120 s");
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        child.kill().unwrap(); // SIGKILL, possibly mid-write
        child.wait().unwrap();
        let st: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(run.join("state.json")).unwrap())
                .unwrap();
        let ck = run.join(st["checkpoint"].as_str().unwrap());
        let t = checkpoint::load_tensors(&ck, Device::Cpu).unwrap();
        assert!(t.keys().any(|k| k.starts_with("ema.")));
    }
    let out = prior_command(&cfg, &run)
        .args(["--steps", "0"])
        .output()
        .unwrap();
    // --steps 0 on a run past step 0: nothing to train, but the resume path (state, checkpoint,
    // optimizer) loads.
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Ctrl-C (SIGINT) mid-run: a checkpoint at the step reached, and the process exits (it once
/// hung after the checkpoint, its batch loader blocked on a full channel).
#[test]
fn interrupted_training_checkpoints_and_exits() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = prior_cfg(tmp.path(), 100_000);
    let run = tmp.path().join("run");
    let child = prior_command(&cfg, &run)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    while !run.join("state.json").exists() && t.elapsed().as_secs() < 120 {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    let st = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    // Exits on its own within a minute.
    let mut child = child;
    let t = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() && t.elapsed().as_secs() < 60 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let hung = child.try_wait().unwrap().is_none();
    if hung {
        child.kill().unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(!hung, "still running 60 s after SIGINT");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("interrupt: writing a checkpoint"), "{err}");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("state.json")).unwrap()).unwrap();
    let step = state["step"].as_u64().unwrap();
    assert!(step > 0 && step < 100_000, "{state}");
}

#[test]
fn ikl_surrogate_puts_the_method_gradient_on_x_hat() {
    let _serial = serial();
    // L = mean(stopgrad(g) * x_hat) => dL/dx_hat = g / D.
    let x_hat = Tensor::randn([2, 1, 4, 4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let g = Tensor::randn([2, 1, 4, 4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let loss = davi_train::losses::ikl_surrogate(&g, &x_hat);
    loss.backward();
    let want = &g.detach() / 32.0;
    assert!(max_diff(&x_hat.grad(), &want) < 1e-7);
    assert!(!g.grad().defined() || f64::try_from(g.grad().abs().max()).unwrap() == 0.0);
}

#[test]
fn ikl_gradient_is_the_weighted_difference_of_the_two_x0_estimates() {
    let _serial = serial();
    // With s_psi = s_theta the gradient vanishes; with s_psi predicting eps + delta it is
    // -sqrt(ab/(1-ab)) * sqrt((1-ab)/ab) delta = -delta, whatever t.
    let tmp = tempfile::tempdir().unwrap();
    let cfg = davi_cfg(tmp.path(), "{task: denoise}");
    let unet = davi_models::UNetModel::new(&cfg.unet).unwrap();
    let (c, sz) = (cfg.unet.in_channels as i64, cfg.unet.image_size as i64);
    let d = Diffusion::new(BetaSchedule::Linear, 1000);
    let params = davi_train::params::ParamSet::init(&unet, 3, Device::Cpu);
    let teacher = TchBackend::new(params.frozen(), Device::Cpu);
    let same = TchBackend::new(params.frozen(), Device::Cpu);
    let x_hat = Tensor::randn([2, c, sz, sz], (Kind::Float, Device::Cpu));
    let noise = Tensor::randn([2, c, sz, sz], (Kind::Float, Device::Cpu));
    let ts = [10usize, 500];
    let g =
        davi_train::losses::ikl_gradient(&unet, &teacher, &same, &d, &x_hat, &ts, &noise).unwrap();
    assert!(f64::try_from(g.abs().max()).unwrap() < 1e-6);
    // Shift the last layer's bias of s_psi by delta: its eps moves by delta everywhere.
    let mut shifted = params.frozen();
    let delta = 0.25;
    let bias = shifted["out.2.bias"].shallow_clone() + delta;
    shifted.insert("out.2.bias".into(), bias);
    let psi = TchBackend::new(shifted, Device::Cpu);
    let g =
        davi_train::losses::ikl_gradient(&unet, &teacher, &psi, &d, &x_hat, &ts, &noise).unwrap();
    let want = Tensor::full([2, c, sz, sz], -delta, (Kind::Float, Device::Cpu));
    assert!(max_diff(&g, &want) < 1e-3, "{}", max_diff(&g, &want));
}

fn davi_cfg(dir: &Path, task: &str) -> DaviConfig {
    let cfg = setup(
        dir,
        &format!("task:\n  operator: {task}\n  sigma_y: 0.05\n  h: 0.1\n"),
    );
    DaviConfig::from_file(&cfg).unwrap()
}

#[test]
fn bridge_gives_x0_at_zero_and_the_lift_at_t_minus_one() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = davi_cfg(tmp.path(), "{task: sr, scale: 4}");
    let imp = Implicit::new(&cfg).unwrap();
    let b = TchBackend::new(Default::default(), Device::Cpu);
    let x0 = Tensor::randn([2, 1, 16, 16], (Kind::Float, Device::Cpu));
    let y = Tensor::randn([2, 1, 16, 16], (Kind::Float, Device::Cpu));
    let z = Tensor::randn([2, 1, 16, 16], (Kind::Float, Device::Cpu));
    let at0 = imp.bridge_sample(&b, &x0, &y, &z, &[0, 0]);
    assert!(
        max_diff(&at0, &x0) < 1e-3,
        "a = 0 is x0 (up to mu1(0) and h(1 - ab_0) z)"
    );
    let last = imp.last_step();
    let at1 = imp.bridge_sample(&b, &x0, &y, &z, &[last, last]);
    let ab = Diffusion::new(BetaSchedule::Linear, 1000).alphas_cumprod[last];
    assert!(max_diff(&at1, &(&y + &z * (0.1 * (1.0 - ab)))) < 1e-6);
    let _ = Bridge::new(&Diffusion::new(BetaSchedule::Linear, 1000));
}

/// A DAVI trainer on a random teacher whose output conv is not zero, so `I_phi` starts away from
/// the measurement.
fn trainer(cfg: &DaviConfig, hp: davi_train::config::DaviTrain) -> davi_train::davi::Trainer {
    davi_train::davi::Trainer::new(cfg, hp, teacher_for(cfg), Device::Cpu).unwrap()
}

/// A teacher for `cfg`'s network: initial weights, the output layer randomised.
fn teacher_for(cfg: &DaviConfig) -> std::collections::HashMap<String, Tensor> {
    let unet = UNetModel::new(&cfg.unet).unwrap();
    let teacher = ParamSet::init(&unet, 3, Device::Cpu);
    // In name order, so the same global seed gives the same teacher.
    let sorted: std::collections::BTreeMap<String, Tensor> = teacher.frozen().into_iter().collect();
    let teacher: std::collections::HashMap<String, Tensor> = sorted
        .into_iter()
        .map(|(k, v)| {
            if k.starts_with("out.2.") {
                let r = v.randn_like() * 0.05;
                (k, r)
            } else {
                (k, v)
            }
        })
        .collect();
    teacher
}

#[test]
fn twenty_davi_steps_lower_the_data_consistency_loss() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = davi_cfg(tmp.path(), "{task: deblur, kernel_size: 5, sigma: 1.0}");
    let hp = davi_train::config::DaviTrain {
        batch_size: 8,
        lr: 1e-3,
        weight_con: 5.0,
        reg_coeff: 0.0,
        t_ikl: 400,
        ..Default::default()
    };
    let mut tr = trainer(&cfg, hp);
    tch::manual_seed(5);
    let x0 = binary_images(8);
    let cb = TchBackend::new(Default::default(), Device::Cpu);
    let y = davi_train::davi::measure(&tr.implicit.operator, &cb, &x0, 1, 16, 0.05);
    let z = Tensor::randn_like(&x0);
    let con = |tr: &davi_train::davi::Trainer| {
        let b = TchBackend::new(tr.phi.frozen(), Device::Cpu);
        let out = tch::no_grad(|| tr.implicit.restore(&b, &y, &z)).unwrap();
        (tr.implicit.operator.forward(&cb, &out, 1, 16) - &y)
            .square()
            .mean(Kind::Float)
            .double_value(&[])
    };
    let before = con(&tr);
    for step in 0..20 {
        let t = tr.step(&x0, step).unwrap();
        assert!(t.total.is_finite() && t.dsm.is_finite());
    }
    let after = con(&tr);
    assert!(after < before, "data consistency {before} -> {after}");
}

#[test]
fn dps_lowers_the_measurement_residual() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = davi_cfg(tmp.path(), "{task: sr, scale: 4}");
    cfg.diffusion.steps = 50;
    let unet = UNetModel::new(&cfg.unet).unwrap();
    let params = ParamSet::init(&unet, 1, Device::Cpu);
    let b = TchBackend::new(params.frozen(), Device::Cpu);
    let d = Diffusion::new(BetaSchedule::Linear, 50);
    let op = davi_models::Operator::SuperRes { scale: 4 };
    tch::manual_seed(2);
    let x0 = Tensor::rand([4, 1, 16, 16], (Kind::Float, Device::Cpu)) * 2.0 - 1.0;
    let y = op.forward(&b, &x0, 1, 16);
    let res = |x: &Tensor| {
        (&y - op.forward(&b, x, 1, 16))
            .square()
            .mean(Kind::Float)
            .double_value(&[])
    };
    let (guided, nfe) = davi_train::dps::restore(
        &unet,
        &b,
        &d,
        &op,
        &y,
        &davi_train::dps::Dps {
            steps: 50,
            zeta: 1.0,
        },
        9,
    )
    .unwrap();
    let (free, _) = davi_train::dps::restore(
        &unet,
        &b,
        &d,
        &op,
        &y,
        &davi_train::dps::Dps {
            steps: 50,
            zeta: 0.0,
        },
        9,
    )
    .unwrap();
    assert_eq!(nfe, 50);
    assert!(
        res(&guided) < 0.5 * res(&free),
        "guided {} vs unguided {}",
        res(&guided),
        res(&free)
    );
}

#[test]
fn vb_term_is_the_kl_and_decoder_nll_of_the_formulas() {
    let _serial = serial();
    let d = Diffusion::new(BetaSchedule::Linear, 1000);
    tch::manual_seed(3);
    let x0 = Tensor::rand([3, 1, 2, 2], (Kind::Float, Device::Cpu)) * 2.0 - 1.0;
    let ts = [0usize, 1, 500];
    let noise = Tensor::randn_like(&x0);
    let x_t = diffusion::q_sample(&d, &x0, &ts, &noise);
    // The true noise and v = -1 (the posterior's own variance): the model is q, KL is 0 for t > 0.
    let exact = diffusion::vb_term(&d, &x0, &x_t, &ts, &noise, &(x0.ones_like() * -1.0));
    for i in [1, 2] {
        assert!(exact.double_value(&[i]).abs() < 1e-4, "{exact}");
    }
    // Any eps and v: each element against the formulas written out in f64.
    let eps = Tensor::randn_like(&x0);
    let v = Tensor::rand_like(&x0) * 2.0 - 1.0;
    let got = diffusion::vb_term(&d, &x0, &x_t, &ts, &eps, &v);
    let f = |t: &Tensor| Vec::<f64>::try_from(t.flatten(0, -1).to_kind(Kind::Double)).unwrap();
    let (x0v, xtv, ev, vv) = (f(&x0), f(&x_t), f(&eps), f(&v));
    let cdf = |x: f64| {
        0.5 * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh())
    };
    for (n, &t) in ts.iter().enumerate() {
        let ab = d.alphas_cumprod[t];
        let (c0, ct) = d.posterior_mean_coefs(t);
        let mut acc = 0.0;
        for k in 0..4 {
            let i = n * 4 + k;
            let model_x0 = (xtv[i] - (1.0 - ab).sqrt() * ev[i]) / ab.sqrt();
            let m2 = c0 * model_x0 + ct * xtv[i];
            let lv2 = d.learned_log_variance(t, vv[i]);
            acc += if t == 0 {
                let s = (-0.5 * lv2).exp();
                let c = x0v[i] - m2;
                let p = if x0v[i] < -0.999 {
                    cdf((c + 1.0 / 255.0) * s)
                } else if x0v[i] > 0.999 {
                    1.0 - cdf((c - 1.0 / 255.0) * s)
                } else {
                    cdf((c + 1.0 / 255.0) * s) - cdf((c - 1.0 / 255.0) * s)
                };
                -p.max(1e-12).ln()
            } else {
                let m1 = c0 * x0v[i] + ct * xtv[i];
                let lv1 = d.posterior_variance(t).ln();
                0.5 * (-1.0 + lv2 - lv1 + (lv1 - lv2).exp() + (m1 - m2).powi(2) * (-lv2).exp())
            };
        }
        let want = acc / 4.0 / std::f64::consts::LN_2;
        let g = got.double_value(&[n as i64]);
        assert!(
            (g - want).abs() < 1e-3 * want.abs().max(1.0),
            "t={t}: {g} vs {want}"
        );
    }
}

#[test]
fn learned_sigma_prior_trains_with_the_hybrid_loss_and_samples() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = setup(
        tmp.path(),
        "train:\n  prior:\n    batch_size: 8\n    lr: 1.0e-3\n    steps: 30\n    checkpoint_every: 10\n    sample_every: 0\n    sample_n: 4\n    ema: 0.9\n",
    );
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("out_channels: 1", "out_channels: 2");
    std::fs::write(&cfg, text).unwrap();
    let run = tmp.path().join("run");
    train_prior(&cfg, &run, None);
    let metrics = std::fs::read_to_string(run.join("metrics.csv")).unwrap();
    assert!(
        metrics.starts_with("step,loss,grad_norm,steps_per_s,mse,vb"),
        "{metrics}"
    );
    let c = DaviConfig::from_file(&cfg).unwrap();
    let unet = UNetModel::new(&c.unet).unwrap();
    let d = Diffusion::new(BetaSchedule::Linear, 1000);
    let trained = trained_params(&unet, &run, 30);
    let b = TchBackend::new(trained, Device::Cpu);
    // On a fixed batch, the trained variance output gives a lower bound term than the initial
    // one (v = 0) with the same eps: L_vb trains the variance.
    tch::manual_seed(5);
    let x0 = binary_images(16);
    let ts: Vec<usize> = (0..16).map(|i| i * 60).collect();
    let noise = Tensor::randn_like(&x0);
    let x_t = diffusion::q_sample(&d, &x0, &ts, &noise);
    let (e, v) = tch::no_grad(|| diffusion::eps_and_v(&unet, &b, &x_t, &ts).unwrap());
    let v = v.unwrap();
    let vb = |v: &Tensor| {
        diffusion::vb_term(&d, &x0, &x_t, &ts, &e, v)
            .mean(Kind::Float)
            .double_value(&[])
    };
    let (fixed, learned) = (vb(&v.zeros_like()), vb(&v));
    assert!(
        learned < fixed,
        "vb with v = 0: {fixed}, learned: {learned}"
    );
    // Ancestral sampling draws with the learned variance: finite, in range, not constant.
    let small = Diffusion::new(BetaSchedule::Linear, 50);
    let x = diffusion::sample(&unet, &b, &small, 2, None, 2, 0).unwrap();
    assert_eq!(x.size(), [2, 1, 16, 16]);
    assert_eq!(x.isfinite().all().int64_value(&[]), 1);
    assert!(x.std(true).double_value(&[]) > 1e-3);
}

#[test]
fn gan_losses_and_adaptive_weight_are_the_formulas() {
    let _serial = serial();
    use davi_train::gan;
    let real = Tensor::from_slice(&[2.0f32, 0.5]);
    let fake = Tensor::from_slice(&[-2.0f32, 0.0]);
    // relu(1 - real) = [0, 0.5], relu(1 + fake) = [0, 1]: (0.25 + 0.5) / 2.
    assert!((gan::d_hinge(&real, &fake).double_value(&[]) - 0.375).abs() < 1e-6);
    // rec = sum(w^2) has gradient 2w, gen = sum(3w) has gradient 3: the weight is their norm ratio.
    let w = Tensor::from_slice(&[1.0f32, -2.0, 0.5]).set_requires_grad(true);
    let rec = w.square().sum(Kind::Float);
    let gen = (&w * 3.0).sum(Kind::Float);
    let want = (2.0 * (1.0f64 + 4.0 + 0.25).sqrt()) / ((9.0f64 * 3.0).sqrt() + 1e-4);
    assert!((gan::adaptive_weight(&rec, &gen, &w) - want).abs() < 1e-5);
    // A discriminator too deep for the image size is a config error, not a crash mid-run.
    let deep = gan::PatchGan::new(1, 16, gan::GanConfig::default(), 1e-4, 0, Device::Cpu);
    let msg = deep
        .err()
        .expect("3 layers at 16 px must be refused")
        .to_string();
    assert!(
        msg.contains("too deep") && msg.contains("at most 2"),
        "{msg}"
    );
}

#[test]
fn davi_steps_with_the_patchgan_term_train_the_discriminator_and_checkpoint_it() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = davi_cfg(tmp.path(), "{task: deblur, kernel_size: 5, sigma: 1.0}");
    let gan = davi_train::gan::GanConfig {
        layers: 2,
        ndf: 16,
        lr: 2e-3,
        ..Default::default()
    };
    let hp = davi_train::config::DaviTrain {
        batch_size: 8,
        lr: 1e-3,
        t_ikl: 400,
        gan: Some(gan),
        ..Default::default()
    };
    let mut tr = trainer(&cfg, hp.clone());
    assert_eq!(
        tr.gan
            .as_ref()
            .unwrap()
            .logits(&Tensor::zeros([2, 1, 16, 16], (Kind::Float, Device::Cpu)))
            .size(),
        [2, 1, 2, 2]
    );
    tch::manual_seed(5);
    let x0 = binary_images(8);
    let mut d = vec![];
    for step in 0..20 {
        let t = tr.step(&x0, step).unwrap();
        assert!(t.total.is_finite() && t.gan_g.is_finite());
        assert!(t.gan_w > 0.0, "adaptive weight {}", t.gan_w);
        d.push(t.gan_d);
    }
    // Hinge loss of an untrained discriminator is about 1; it learns to tell x0 from x_hat.
    let late = d[15..].iter().sum::<f64>() / 5.0;
    assert!(late < d[0], "discriminator loss {d:?}");
    // The discriminator and its optimizer are in the checkpoint and come back on resume.
    let all: std::collections::HashMap<String, Tensor> = tr.named().into_iter().collect();
    assert!(all.keys().any(|k| k.starts_with("disc.main.")));
    assert!(all.keys().any(|k| k.starts_with("opt_disc.m.")));
    let mut back = trainer(&cfg, hp);
    back.load(&all, 20).unwrap();
    let (a, b) = (
        &tr.gan.as_ref().unwrap().params,
        &back.gan.as_ref().unwrap().params,
    );
    for (k, v) in &a.tensors {
        assert_eq!(max_diff(v, &b.tensors[k]), 0.0, "{k}");
    }
}

#[test]
fn eval_scores_every_method_on_the_same_images_and_writes_them_to_the_card() {
    let _serial = serial();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let tmp = tempfile::tempdir().unwrap();
    let card = tmp.path().join("card.yaml");
    std::fs::copy(root.join("models/zoo/fmnist32-sr4/card.yaml"), &card).unwrap();
    let args = davi_train::eval::EvalArgs {
        checkpoint: root.join("models/zoo/fmnist32-sr4/model.onnx"),
        config: root.join("models/configs/fmnist32-sr4.yaml"),
        n: 8,
        dps_steps: 4,
        dps_n: 3,
        dps_zeta: 1.0,
        out: tmp.path().join("eval"),
        card: Some(card.clone()),
        teacher: Some(root.join("models/zoo/fmnist32-prior/ema.safetensors")),
        device: Device::Cpu,
        batch: 4,
        samples: 2,
        features: Some(root.join("models/zoo/fmnist-classifier/weights.safetensors")),
        ddrm_steps: 4,
        // The model itself as the "control": same measurements and noise give the same scores.
        supervised: Some(root.join("models/zoo/fmnist32-sr4/model.onnx")),
        trained_in: None,
    };
    // A control made for another task, or a DDRM of one step, is refused before any work.
    let wrong = davi_train::eval::EvalArgs {
        supervised: Some(root.join("models/zoo/fmnist32-denoise/model.onnx")),
        ..args.clone()
    };
    let e = format!("{:#}", davi_train::eval::eval(&wrong).err().unwrap());
    assert!(
        e.contains("fmnist32-denoise") && e.contains("made for"),
        "{e}"
    );
    // A control checkpoint from a run of another config (its state.json says which).
    let other = tmp.path().join("other-run");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(
        other.join("state.json"),
        r#"{"step": 3, "checkpoint": "ckpt-00000003.safetensors", "config_hash": "0123456789abcdef", "seconds": 1.0}"#,
    )
    .unwrap();
    let foreign = davi_train::eval::EvalArgs {
        supervised: Some(other.join("ema.safetensors")),
        ..args.clone()
    };
    let e = format!("{:#}", davi_train::eval::eval(&foreign).err().unwrap());
    assert!(e.contains("another config"), "{e}");
    let one = davi_train::eval::EvalArgs {
        ddrm_steps: 1,
        ..args.clone()
    };
    assert!(davi_train::eval::eval(&one).is_err());
    let r = davi_train::eval::eval(&args).unwrap();
    assert_eq!((r.ddrm.n, r.ddrm.nfe), (8, 4));
    assert!(r.ddrm.psnr.is_finite() && r.ddrm.fid.is_some());
    assert_eq!(r.supervised.psnr, r.davi.psnr);
    // FID on the full runs, KID on the paired ones, from the shipped classifier's features.
    assert!(r.davi.fid.is_some_and(f64::is_finite) && r.lifted.fid.is_some());
    let pk = r.paired.as_ref().unwrap();
    assert!(pk.dps.kid.is_some_and(f64::is_finite) && pk.davi.kid.is_some());
    assert_eq!((r.davi.n, r.lifted.n, r.dps.n), (8, 8, 3));
    let p = r.paired.expect("paired scores with DPS");
    assert_eq!((p.davi.n, p.lifted.n, p.dps.n, p.ddrm.n), (3, 3, 3, 3));
    assert!(p.ddrm.kid.is_some() && p.supervised.kid.is_some());
    assert_eq!(p.supervised.psnr, p.davi.psnr);
    assert_eq!(p.dps.psnr, r.dps.psnr);
    assert!(p.davi.psnr_ci95.is_finite() && p.davi.psnr_ci95 > 0.0);
    let c: davi_models::card::ModelCard =
        serde_yaml::from_str(&std::fs::read_to_string(&card).unwrap()).unwrap();
    let e = c.eval.unwrap();
    let paired = e.paired.unwrap();
    assert_eq!(paired.n, 3);
    assert_eq!(paired.davi.n, Some(3));
    assert_eq!(e.davi.psnr_ci95, Some(r.davi.psnr_ci95));
    assert_eq!(e.ddrm.as_ref().map(|d| d.nfe), Some(4));
    assert_eq!(paired.ddrm.and_then(|d| d.n), Some(3));
    assert!(e.supervised.is_some() && paired.supervised.is_some());
    // The spread of DAVI's posterior samples beside its scores: 2 samples of each of the 8.
    let k = e.samples.expect("the spread in the card");
    assert_eq!((k.k, k.n), (2, 8));
    assert!(k.spread > 0.0 && k.spread.is_finite(), "{k:?}");
}

#[test]
fn the_supervised_control_trains_on_the_truth_alone() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = davi_cfg(tmp.path(), "{task: sr, scale: 4}");
    let hp = davi_train::config::DaviTrain {
        batch_size: 8,
        lr: 1e-3,
        supervised: true,
        ..Default::default()
    };
    let mut tr = trainer(&cfg, hp);
    let psi_before = tr.aux_score.frozen();
    tch::manual_seed(6);
    let x0 = binary_images(8);
    let cb = TchBackend::new(Default::default(), Device::Cpu);
    let y = davi_train::davi::measure(&tr.implicit.operator, &cb, &x0, 1, 16, 0.05);
    let z = Tensor::randn_like(&x0);
    let mse = |tr: &davi_train::davi::Trainer| {
        let b = TchBackend::new(tr.phi.frozen(), Device::Cpu);
        let out = tch::no_grad(|| tr.implicit.restore(&b, &y, &z)).unwrap();
        (&out - &x0).square().mean(Kind::Float).double_value(&[])
    };
    let before = mse(&tr);
    for step in 0..20 {
        let t = tr.step(&x0, step).unwrap();
        assert_eq!((t.ikl, t.dsm), (0.0, 0.0));
        assert_eq!(t.total, t.reg);
    }
    let after = mse(&tr);
    assert!(after < before, "MSE to the truth {before} -> {after}");
    // s_psi is never trained.
    for (k, v) in tr.aux_score.frozen() {
        assert_eq!(max_diff(&v, &psi_before[&k]), 0.0, "{k}");
    }
}

#[test]
fn dps_tuning_sweeps_validation_images_and_records_the_choice_in_the_card() {
    let _serial = serial();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let tmp = tempfile::tempdir().unwrap();
    let card = tmp.path().join("card.yaml");
    std::fs::copy(root.join("models/zoo/fmnist32-sr4/card.yaml"), &card).unwrap();
    let t = davi_train::tune::tune(&davi_train::tune::TuneArgs {
        config: root.join("models/configs/fmnist32-sr4.yaml"),
        teacher: Some(root.join("models/zoo/fmnist32-prior/ema.safetensors")),
        zetas: vec![0.01, 1.0],
        refine: true,
        n: 2,
        steps: 4,
        device: Device::Cpu,
        card: Some(card.clone()),
    })
    .unwrap();
    // The grid, then the midpoint and one step beyond the best end.
    assert_eq!(t.sweep.len(), 4);
    let best = t.sweep.iter().max_by(|a, b| a.1.total_cmp(&b.1)).unwrap();
    assert_eq!(t.zeta, best.0);
    assert!(t.split.contains("training split"));
    let c: davi_models::card::ModelCard =
        serde_yaml::from_str(&std::fs::read_to_string(&card).unwrap()).unwrap();
    assert_eq!(c.dps_tuning.unwrap(), t);
    assert!(t.complete);
    // A stopped sweep resumes: a zeta recorded on the same images and steps is not rerun (its
    // recorded score, here a marker no DPS run gives, comes back), and the sweep completes.
    let mut c: davi_models::card::ModelCard =
        serde_yaml::from_str(&std::fs::read_to_string(&card).unwrap()).unwrap();
    let mut partial = t.clone();
    partial.sweep = vec![(0.01, 99.0, 0.5)];
    partial.complete = false;
    c.dps_tuning = Some(partial);
    std::fs::write(&card, serde_yaml::to_string(&c).unwrap()).unwrap();
    let resumed = davi_train::tune::tune(&davi_train::tune::TuneArgs {
        config: root.join("models/configs/fmnist32-sr4.yaml"),
        teacher: Some(root.join("models/zoo/fmnist32-prior/ema.safetensors")),
        zetas: vec![0.01, 1.0],
        refine: false,
        n: 2,
        steps: 4,
        device: Device::Cpu,
        card: Some(card.clone()),
    })
    .unwrap();
    assert_eq!(resumed.sweep[0], (0.01, 99.0, 0.5));
    assert_eq!(resumed.sweep[1].0, 1.0);
    let c: davi_models::card::ModelCard =
        serde_yaml::from_str(&std::fs::read_to_string(&card).unwrap()).unwrap();
    let recorded = c.dps_tuning.unwrap();
    assert!(recorded.complete);
    // The prior it ran with is recorded; a sweep of another prior (one since retrained) is not
    // resumed: the marker does not come back.
    let prior = root.join("models/zoo/fmnist32-prior/ema.safetensors");
    assert_eq!(
        recorded.teacher_sha256.as_deref(),
        Some(davi_train::tune::file_sha256(&prior).unwrap().as_str())
    );
    let mut c: davi_models::card::ModelCard =
        serde_yaml::from_str(&std::fs::read_to_string(&card).unwrap()).unwrap();
    let mut other = recorded.clone();
    other.sweep = vec![(0.01, 99.0, 0.5)];
    other.complete = false;
    other.teacher_sha256 = Some("0".repeat(64));
    c.dps_tuning = Some(other);
    std::fs::write(&card, serde_yaml::to_string(&c).unwrap()).unwrap();
    let fresh = davi_train::tune::tune(&davi_train::tune::TuneArgs {
        config: root.join("models/configs/fmnist32-sr4.yaml"),
        teacher: Some(prior),
        zetas: vec![0.01],
        refine: false,
        n: 2,
        steps: 4,
        device: Device::Cpu,
        card: Some(card.clone()),
    })
    .unwrap();
    assert_ne!(
        fresh.sweep[0].1, 99.0,
        "a sweep of another prior was resumed"
    );
    assert!(davi_train::tune::tune(&davi_train::tune::TuneArgs {
        config: root.join("models/configs/fmnist32-sr4.yaml"),
        teacher: None,
        zetas: vec![f64::NAN],
        refine: false,
        n: 1,
        steps: 1,
        device: Device::Cpu,
        card: None,
    })
    .is_err());
}

#[test]
fn davi_runs_validate_on_held_out_training_images_and_resume_keeps_the_rows() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let prior_dir = tmp.path().join("p");
    std::fs::create_dir_all(&prior_dir).unwrap();
    let pcfg = prior_cfg(&prior_dir, 2);
    train_prior(&pcfg, &tmp.path().join("prior"), None);
    let ddir = tmp.path().join("d");
    std::fs::create_dir_all(&ddir).unwrap();
    let dcfg = setup(
        &ddir,
        "task:\n  operator: {task: denoise}\n  sigma_y: 0.2\n  h: 0.1\ntrain:\n  davi:\n    batch_size: 4\n    steps: 4\n    checkpoint_every: 2\n    validate_every: 2\n    validate_n: 6\n    t_ikl: 400\n",
    );
    let run = tmp.path().join("davi");
    let args = |steps| davi_train::davi::DaviArgs {
        config: dcfg.clone(),
        device: Device::Cpu,
        run: Some(run.clone()),
        steps: Some(steps),
        teacher: Some(tmp.path().join("prior/ema.safetensors")),
        supervised: false,
    };
    davi_train::davi::train(&args(2)).unwrap();
    davi_train::davi::train(&args(4)).unwrap();
    let v = std::fs::read_to_string(run.join("validation.csv")).unwrap();
    let rows: Vec<(usize, f64)> = v
        .lines()
        .skip(1)
        .map(|l| {
            let (a, b) = l.split_once(',').unwrap();
            (a.parse().unwrap(), b.parse().unwrap())
        })
        .collect();
    assert_eq!(
        rows.iter().map(|r| r.0).collect::<Vec<_>>(),
        vec![2, 4],
        "{v}"
    );
    assert!(rows.iter().all(|r| r.1.is_finite() && r.1 > 0.0), "{v}");
    // The curve beside it: a picture with the points drawn on it.
    let img = image::open(run.join("validation.png")).unwrap().to_rgb8();
    assert!(img.pixels().any(|p| p.0 != [255, 255, 255]), "blank curve");
}

#[test]
fn the_shipped_classifier_knows_fashion_mnist() {
    let _serial = serial();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let c = davi_train::features::Classifier::load(
        &root.join("models/zoo/fmnist-classifier/weights.safetensors"),
        Device::Cpu,
    )
    .unwrap();
    let (x, y) = davi_train::data::fashion_mnist(
        Path::new("/usr/share/datasets/fashion-mnist"),
        davi_train::data::Split::Test,
    )
    .unwrap();
    let acc = c.accuracy((&x, &y)).unwrap();
    assert!(acc > 0.85, "test accuracy {acc}");
    assert_eq!(c.features(&x.narrow(0, 0, 3)).size(), [3, 128]);
}

#[test]
fn the_official_gan_form_adds_feature_matching_and_clips_the_weight_against_the_truth_term() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = davi_cfg(tmp.path(), "{task: deblur, kernel_size: 5, sigma: 1.0}");
    let official = davi_train::gan::GanConfig {
        layers: 2,
        ndf: 16,
        weight: 0.5,
        feature_matching: 1.0,
        adaptive_from: davi_train::gan::AdaptiveFrom::GroundTruth,
        weight_clip: (0.01, 10.0),
        ..Default::default()
    };
    let hp = davi_train::config::DaviTrain {
        batch_size: 8,
        lr: 1e-3,
        t_ikl: 400,
        gan: Some(official.clone()),
        ..Default::default()
    };
    let mut tr = trainer(&cfg, hp);
    tch::manual_seed(5);
    let x0 = binary_images(8);
    // Feature matching adds a positive L1 term to the hinge term.
    let gan = tr.gan.as_ref().unwrap();
    let x_hat = Tensor::zeros_like(&x0);
    let hinge = -gan
        .logits_frozen(&x_hat)
        .mean(Kind::Float)
        .double_value(&[]);
    let with_fm = gan.generator_term(&x_hat, &x0).double_value(&[]);
    assert!(with_fm > hinge + 1e-6, "{with_fm} vs {hinge}");
    for step in 0..5 {
        let t = tr.step(&x0, step).unwrap();
        assert!(t.total.is_finite());
        assert!(
            (0.01 * 0.5 - 1e-12..=10.0 * 0.5 + 1e-12).contains(&t.gan_w),
            "weight {}",
            t.gan_w
        );
    }
}

#[test]
fn the_official_adaptive_weight_ignores_reg_coeff_and_the_official_optimizer_is_read() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = davi_cfg(tmp.path(), "{task: deblur, kernel_size: 5, sigma: 1.0}");
    let gan: davi_train::gan::GanConfig = serde_yaml::from_str(
        "{weight: 1.0, layers: 2, ndf: 16, feature_matching: 1.0, adaptive_from: ground_truth, \
          weight_clip: [0.0, 10000.0], betas: [0.9, 0.999], weight_decay: 0.01}",
    )
    .unwrap();
    // The first step's weight: the same x_hat and terms whatever reg_coeff, so a weight taken
    // against the ground-truth term before reg_coeff (the official gt_consistency_loss) is the
    // same, where one against the weighted term would scale with 1 / reg_coeff.
    let first_weight = |reg_coeff: f64| {
        let hp = davi_train::config::DaviTrain {
            batch_size: 8,
            lr: 1e-3,
            t_ikl: 400,
            reg_coeff,
            gan: Some(gan.clone()),
            ..Default::default()
        };
        tch::manual_seed(3);
        let mut tr = trainer(&cfg, hp);
        let opt = &tr.gan.as_ref().unwrap().opt;
        assert_eq!((opt.betas, opt.weight_decay), ((0.9, 0.999), 0.01));
        tch::manual_seed(5);
        let x0 = binary_images(8);
        tr.step(&x0, 0).unwrap().gan_w
    };
    let (a, b) = (first_weight(0.25), first_weight(1.0));
    assert!(a > 0.0 && a < 1e4, "weight {a} at a clip bound");
    assert!((a - b).abs() <= 1e-6 * a, "{a} vs {b}");
}

#[test]
fn the_official_discriminator_pads_by_two_and_weighs_at_the_last_resblock() {
    let _serial = serial();
    use davi_train::gan::{GanConfig, PatchGan};
    // At 32 px: 7x7 patches with the official padding 2, 2x2 with pix2pix's 1.
    let side = |padding| {
        let cfg = GanConfig {
            padding,
            ..Default::default()
        };
        let d = PatchGan::new(1, 32, cfg, 1e-4, 0, Device::Cpu).unwrap();
        d.logits(&Tensor::zeros([2, 1, 32, 32], (Kind::Float, Device::Cpu)))
            .size()
    };
    assert_eq!(side(2), [2, 1, 7, 7]);
    assert_eq!(side(1), [2, 1, 2, 2]);
    let tmp = tempfile::tempdir().unwrap();
    let cfg = davi_cfg(tmp.path(), "{task: deblur, kernel_size: 5, sigma: 1.0}");
    let hp = |layer: &str| davi_train::config::DaviTrain {
        batch_size: 8,
        lr: 1e-3,
        t_ikl: 400,
        gan: Some(GanConfig {
            layers: 2,
            ndf: 16,
            padding: 2,
            adaptive_layer: layer.into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    // A weight I_phi does not have is refused up front, naming the one the official code takes.
    let e = davi_train::davi::Trainer::new(&cfg, hp("nope"), teacher_for(&cfg), Device::Cpu)
        .err()
        .expect("an unknown adaptive_layer is an error")
        .to_string();
    let last = davi_train::davi::last_resblock_conv(&trainer(&cfg, hp("out.2.weight")).phi)
        .expect("the UNet has output ResBlocks");
    assert!(e.contains("nope") && e.contains(&last), "{e}");
    assert!(last.starts_with("output_blocks.") && last.ends_with(".0.out_layers.3.weight"));
    let mut tr = trainer(&cfg, hp(&last));
    tch::manual_seed(5);
    let x0 = binary_images(8);
    let t = tr.step(&x0, 0).unwrap();
    assert!(
        t.gan_w > 0.0 && t.gan_w.is_finite() && t.gan_d > 0.0,
        "{t:?}"
    );
}

#[test]
fn the_supervised_control_of_a_config_differs_in_its_name_and_loss_alone() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let cfg = davi_models::DaviConfig::from_file(&root.join("models/configs/fmnist32-deblur.yaml"))
        .unwrap();
    let control = davi_train::davi::supervised_control(cfg.clone()).unwrap();
    assert_eq!(control.name, "fmnist32-deblur-supervised");
    let (a, b) = (
        davi_train::config::train_config(&cfg)
            .unwrap()
            .davi
            .unwrap(),
        davi_train::config::train_config(&control)
            .unwrap()
            .davi
            .unwrap(),
    );
    assert!(!a.supervised && b.supervised);
    // The shipped config trains with the GAN term; its control has none (plain MSE), and is the
    // control of the same config without it (the GAN ablation) too.
    assert!(a.gan.is_some() && b.gan.is_none());
    let nogan = davi_models::DaviConfig::from_file(
        &root.join("models/configs/ablation/fmnist32-deblur-nogan.yaml"),
    )
    .unwrap();
    let mut nogan_control = davi_train::davi::supervised_control(nogan).unwrap();
    nogan_control.name = control.name.clone();
    assert_eq!(nogan_control.hash(), control.hash());
    // Applied once: a control's own config (a run's config.yaml) stays as it is.
    let again = davi_train::davi::supervised_control(control.clone()).unwrap();
    assert_eq!(again.name, control.name);
    assert_eq!(again.hash(), control.hash());
    assert_eq!(
        (a.steps, a.batch_size, a.seed, a.lr, a.t_ikl, &a.teacher),
        (b.steps, b.batch_size, b.seed, b.lr, b.t_ikl, &b.teacher)
    );
    assert_eq!(
        serde_yaml::to_string(&cfg.unet).unwrap(),
        serde_yaml::to_string(&control.unet).unwrap()
    );
    assert_eq!(
        serde_yaml::to_string(&cfg.task).unwrap(),
        serde_yaml::to_string(&control.task).unwrap()
    );
}

#[test]
fn a_card_of_another_operator_is_replaced_not_merged() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let cfg = davi_models::DaviConfig::from_file(&root.join("models/configs/fmnist32-deblur.yaml"))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cards/card.yaml");
    // No card yet: a blank one for this task, its folder created.
    let blank = davi_train::eval::card_for(&path, &cfg).unwrap();
    assert_eq!(&blank.task, cfg.task().unwrap());
    assert!(blank.eval.is_none() && blank.dps_tuning.is_none());
    // The same task and operator: the card as it is, its DPS sweep kept.
    let mut card = blank.clone();
    card.training_steps = 1234;
    card.dps_tuning = Some(davi_models::card::DpsTuning {
        split: "validation".into(),
        n: 16,
        steps: 1000,
        zeta: 0.3,
        sweep: vec![(0.3, 20.0, 0.7)],
        complete: true,
        teacher_sha256: None,
    });
    std::fs::write(&path, serde_yaml::to_string(&card).unwrap()).unwrap();
    let kept = davi_train::eval::card_for(&path, &cfg).unwrap();
    assert_eq!(kept, card);
    // Another blur width (a model retrained on a changed operator): nothing of the old card stays.
    let mut other = card.clone();
    let mut yaml = serde_yaml::to_value(&other.task).unwrap();
    yaml["operator"]["sigma"] = serde_yaml::Value::from(0.375);
    other.task = serde_yaml::from_value(yaml).unwrap();
    assert_ne!(&other.task, cfg.task().unwrap());
    std::fs::write(&path, serde_yaml::to_string(&other).unwrap()).unwrap();
    let replaced = davi_train::eval::card_for(&path, &cfg).unwrap();
    assert_eq!(&replaced.task, cfg.task().unwrap());
    assert!(replaced.dps_tuning.is_none() && replaced.training_steps == 0);
    // Another model's card (a mistyped --card) is an error naming both, and stays as it was.
    let mut theirs = card.clone();
    theirs.name = "fmnist32-sr4".into();
    std::fs::write(&path, serde_yaml::to_string(&theirs).unwrap()).unwrap();
    let e = format!("{:#}", davi_train::eval::card_for(&path, &cfg).unwrap_err());
    assert!(
        e.contains("the card of fmnist32-sr4, not of fmnist32-deblur"),
        "{e}"
    );
    // A card that is not YAML is an error naming the file.
    std::fs::write(&path, "name: [").unwrap();
    let e = format!("{:#}", davi_train::eval::card_for(&path, &cfg).unwrap_err());
    assert!(e.contains("card.yaml"), "{e}");
}
