//! `davi-train` as a hostile user meets it: a bad value is an error naming its field before any
//! step, nothing the command reads is replaced by what it writes, a failed export leaves the
//! existing model, NaN weights are never checkpointed, and what the command line overrides is
//! part of the run.

use std::path::{Path, PathBuf};
use std::process::Command;

const UNET: &str = "unet:\n  image_size: 16\n  in_channels: 1\n  model_channels: 32\n  out_channels: 1\n  num_res_blocks: 1\n  attention_resolutions: [8]\n  channel_mult: [1, 2]\n  num_head_channels: 32\n  use_scale_shift_norm: true\n  resblock_updown: true\n";

/// 16 grey 16 px images in `dir/imgs` and a denoising config on them with `train` appended.
fn setup(dir: &Path, train: &str) -> PathBuf {
    let imgs = dir.join("imgs");
    std::fs::create_dir_all(&imgs).unwrap();
    for i in 0..16u32 {
        image::GrayImage::from_fn(16, 16, |x, y| {
            image::Luma([((x * 13 + y * 7 + i * 5) % 256) as u8])
        })
        .save(imgs.join(format!("{i:02}.png")))
        .unwrap();
    }
    let cfg = dir.join("cfg.yaml");
    std::fs::write(
        &cfg,
        format!(
            "name: g\n{UNET}task:\n  operator: {{task: denoise}}\n  sigma_y: 0.1\ndata:\n  kind: folder\n  dir: {}\n{train}",
            imgs.display()
        ),
    )
    .unwrap();
    cfg
}

/// `davi-train ARGS`: exit code and stderr.
fn run(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_davi-train"))
        .args(args)
        .env("OMP_NUM_THREADS", "1")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `davi-train davi --config CFG --device cpu --run RUN`.
fn train_davi(cfg: &Path, run_dir: &Path) -> (i32, String) {
    train_run("davi", cfg, run_dir, &[])
}

/// `davi-train CMD --config CFG --device cpu --run RUN ARGS` (`prior` or `davi`).
fn train_run(cmd: &str, cfg: &Path, run_dir: &Path, args: &[&str]) -> (i32, String) {
    let base = [
        cmd,
        "--config",
        s(cfg),
        "--device",
        "cpu",
        "--run",
        s(run_dir),
    ];
    run(&[&base[..], args].concat())
}

/// A temporary folder with [`setup`]'s config (no `train:`) and random weights `w.safetensors`
/// of its network.
fn with_weights() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = setup(tmp.path(), "");
    let w = tmp.path().join("w.safetensors");
    weights(&cfg, &w, "1");
    (tmp, cfg, w)
}

/// Random weights of the config's network (`davi-train init`), seed `seed`.
fn weights(cfg: &Path, out: &Path, seed: &str) {
    let (code, err) = run(&["init", "--config", s(cfg), "-o", s(out), "--seed", seed]);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn bad_values_are_errors_naming_the_field_before_any_step() {
    let tmp = tempfile::tempdir().unwrap();
    let davi =
        |extra: &str| format!("train:\n  davi:\n    teacher: t.safetensors\n    steps: 2\n{extra}");
    for (train, field) in [
        (davi("    lr: .nan\n"), "train.davi.lr"),
        (davi("    lr: -1.0e-4\n"), "train.davi.lr"),
        (
            davi("    checkpoint_every: 0\n"),
            "train.davi.checkpoint_every",
        ),
        (davi("    ema: 2.0\n"), "train.davi.ema"),
        (davi("    batch_size: 0\n"), "train.davi.batch_size"),
        (davi("    weight_con: -1\n"), "train.davi.weight_con"),
        (davi("    steps: 0\n"), "train.davi.steps"),
        (
            davi("    gan: {weight_clip: [10.0, 0.01]}\n"),
            "train.davi.gan.weight_clip",
        ),
    ] {
        let dir = tmp
            .path()
            .join(field.replace('.', "_"))
            .join(train.len().to_string());
        std::fs::create_dir_all(&dir).unwrap();
        // `steps: 2` given twice is a YAML error; the case of steps itself replaces it.
        let train = if field.ends_with("steps") {
            train.replace("    steps: 2\n", "")
        } else {
            train
        };
        let cfg = setup(&dir, &train);
        let run_dir = dir.join("run");
        let (code, err) = train_davi(&cfg, &run_dir);
        assert!(code != 0 && code != 101, "{field}: exit {code}: {err}");
        assert!(err.contains(field), "{field}: {err}");
        assert!(!run_dir.exists(), "{field}: a run folder was made");
    }
    // The network's and the task's values too.
    for (find, replace, what) in [
        (
            "channel_mult: [1, 2]",
            "channel_mult: [1, 0]",
            "channel_mult",
        ),
        (
            "num_res_blocks: 1\n",
            "num_res_blocks: 1\n  dropout: 2.0\n",
            "dropout",
        ),
        ("sigma_y: 0.1", "sigma_y: 1.0e30", "sigma_y"),
        ("name: g\n", "name: ../escape\n", "name \"../escape\""),
        (
            "{task: denoise}",
            "{task: inpaint, box_size: 0}",
            "inpaint box 0",
        ),
    ] {
        let dir = tmp
            .path()
            .join(what.replace(|c: char| !c.is_ascii_alphanumeric(), "_"));
        let cfg = setup(&dir, &davi(""));
        let text = std::fs::read_to_string(&cfg)
            .unwrap()
            .replace(find, replace);
        std::fs::write(&cfg, text).unwrap();
        let (code, err) = train_davi(&cfg, &dir.join("run"));
        assert!(code != 0 && code != 101, "{what}: exit {code}: {err}");
        assert!(err.contains(what), "{what}: {err}");
    }
}

#[test]
fn outputs_never_replace_what_the_command_reads() {
    let (tmp, cfg, w) = with_weights();
    let (w_bytes, cfg_bytes) = (std::fs::read(&w).unwrap(), std::fs::read(&cfg).unwrap());
    let imgs = tmp.path().join("imgs");
    let link = tmp.path().join("link.safetensors");
    std::os::unix::fs::symlink(&w, &link).unwrap();
    // (command, -o, more arguments): each reads the weights (but init) and the config.
    let cases: [(&str, &Path, &[&str]); 7] = [
        ("export", &w, &[]),
        ("export", &cfg, &[]),
        ("export", &link, &[]),
        ("init", &cfg, &[]),
        ("sample", &w, &["-n", "1", "--ddim", "2"]),
        ("images", &imgs, &[]),
        ("eval", &imgs, &["-n", "1", "--dps-n", "0"]),
    ];
    for (cmd, out, more) in cases {
        let mut args = vec![cmd, "--config", s(&cfg), "-o", s(out)];
        if !matches!(cmd, "init" | "images") {
            args.extend(["--checkpoint", s(&w)]);
        }
        args.extend_from_slice(more);
        let (code, err) = run(&args);
        assert!(code != 0, "{args:?}: {err}");
        assert!(err.contains("refused"), "{args:?}: {err}");
    }
    assert_eq!(std::fs::read(&w).unwrap(), w_bytes);
    assert_eq!(std::fs::read(&cfg).unwrap(), cfg_bytes);
    assert_eq!(std::fs::read_dir(&imgs).unwrap().count(), 16);
    // Arguments that would score nothing, or a diverged sampler, are refused before any work.
    for bad in [
        &["-n", "0"][..],
        &["--batch", "0"],
        &["--dps-zeta", "nan"],
        &["--dps-zeta", "-1"],
    ] {
        let mut args = vec!["eval", "--checkpoint", s(&w), "--config", s(&cfg), "-o"];
        let out = tmp.path().join("ev");
        args.push(s(&out));
        args.extend_from_slice(bad);
        let (code, err) = run(&args);
        assert!(code != 0 && code != 101, "{bad:?}: exit {code}: {err}");
        assert!(!out.exists(), "{bad:?}: wrote {}", out.display());
    }
}

#[test]
fn a_failed_export_leaves_the_existing_model() {
    let (tmp, cfg, w) = with_weights();
    let out = tmp.path().join("m/model.onnx");
    // `davi-train export --checkpoint W --config CFG -o m/model.onnx ARGS`.
    let export = |w: &Path, args: &[&str]| {
        let base = [
            "export",
            "--checkpoint",
            s(w),
            "--config",
            s(&cfg),
            "-o",
            s(&out),
        ];
        run(&[&base[..], args].concat())
    };
    let (code, err) = export(&w, &["-k", "2"]);
    assert_eq!(code, 0, "{err}");
    let parity = tmp.path().join("m/model.parity.safetensors");
    let good = (
        std::fs::read(&out).unwrap(),
        std::fs::read(&parity).unwrap(),
    );
    // The fixture names the model it was computed for, so `davi verify` can refuse another's.
    let (_, meta) = safetensors::SafeTensors::read_metadata(&good.1).unwrap();
    let meta = meta.metadata().clone().expect("parity metadata");
    let made_for: std::collections::BTreeMap<String, String> =
        serde_json::from_str(&meta["davi.parity_for"]).unwrap();
    let config = davi_models::DaviConfig::from_file(&cfg).unwrap();
    assert_eq!(made_for.get("davi.name"), Some(&config.name));
    assert_eq!(made_for.get("davi.config_hash"), Some(&config.hash()));
    // Weights that restore to NaN: an error, and the good model and its fixture stay.
    let mut t = davi_train::checkpoint::load_tensors(&w, tch::Device::Cpu).unwrap();
    let key = t.keys().find(|k| k.starts_with("out.")).unwrap().clone();
    let nan = t[&key].full_like(f64::NAN);
    t.insert(key, nan);
    let bad = tmp.path().join("nan.safetensors");
    let named: Vec<(String, tch::Tensor)> = t.into_iter().collect();
    davi_train::checkpoint::save_tensors(&bad, &named).unwrap();
    let (code, err) = export(&bad, &["-k", "2"]);
    assert!(code != 0, "{err}");
    assert!(err.contains("NaN"), "{err}");
    for args in [&["-k", "0"][..], &["--static-batch", "0"]] {
        let (code, err) = export(&w, args);
        assert!(code != 0 && code != 101, "{args:?}: {err}");
    }
    assert_eq!(
        (
            std::fs::read(&out).unwrap(),
            std::fs::read(&parity).unwrap()
        ),
        good
    );
    // Re-exported in place from itself: staged, so allowed, and the same bytes.
    let (code, err) = export(&out, &["-k", "2"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(std::fs::read(&out).unwrap(), good.0);
    // Nothing of the failed attempts is left beside it.
    let names: Vec<String> = std::fs::read_dir(tmp.path().join("m"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

#[test]
fn the_teacher_given_on_the_command_line_is_part_of_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = setup(
        tmp.path(),
        "train:\n  davi:\n    teacher: none.safetensors\n    batch_size: 4\n    steps: 1\n    checkpoint_every: 1\n    validate_every: 0\n",
    );
    let (t1, t2) = (
        tmp.path().join("t1.safetensors"),
        tmp.path().join("t2.safetensors"),
    );
    weights(&cfg, &t1, "1");
    weights(&cfg, &t2, "2");
    let r = tmp.path().join("run");
    let davi = |teacher: &Path, steps: &str| {
        train_run(
            "davi",
            &cfg,
            &r,
            &["--teacher", s(teacher), "--steps", steps],
        )
    };
    let (code, err) = davi(&t1, "1");
    assert_eq!(code, 0, "{err}");
    let saved = std::fs::read_to_string(r.join("config.yaml")).unwrap();
    assert!(saved.contains(s(&t1)), "{saved}");
    // Resuming against another prior is refused.
    let (code, err) = davi(&t2, "2");
    assert!(code != 0, "{err}");
    assert!(err.contains("config hash"), "{err}");
    // Its weights export with the run's config, and not with another one.
    let out = tmp.path().join("m/model.onnx");
    let ema = r.join("ema.safetensors");
    let export = |config: &Path| {
        run(&[
            "export",
            "--checkpoint",
            s(&ema),
            "--config",
            s(config),
            "-o",
            s(&out),
            "-k",
            "1",
        ])
    };
    let other = tmp.path().join("other.yaml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &other,
        text.replace("{task: denoise}", "{task: sr, scale: 2}"),
    )
    .unwrap();
    let (code, err) = export(&other);
    assert!(
        code != 0 && err.contains("trained with another config"),
        "{err}"
    );
    assert!(!out.exists());
    let (code, err) = export(&r.join("config.yaml"));
    assert_eq!(code, 0, "{err}");
    // The same config under another name (an ablation run shipped as the model) exports too.
    let renamed = tmp.path().join("renamed.yaml");
    let text = std::fs::read_to_string(r.join("config.yaml")).unwrap();
    assert!(text.contains("name: g\n"), "{text}");
    std::fs::write(&renamed, text.replace("name: g\n", "name: shipped\n")).unwrap();
    let (code, err) = export(&renamed);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn nan_weights_are_never_checkpointed_and_a_failed_start_leaves_no_stale_config() {
    let tmp = tempfile::tempdir().unwrap();
    // A learning rate beyond f32 makes the first update infinite while its loss was finite.
    let train = |lr: &str| {
        format!("train:\n  prior:\n    batch_size: 4\n    lr: {lr}\n    steps: 2\n    checkpoint_every: 1\n    sample_every: 0\n    sample_n: 1\n")
    };
    let cfg = setup(tmp.path(), &train("1.0e39"));
    let r = tmp.path().join("run");
    let prior = || train_run("prior", &cfg, &r, &[]);
    let (code, err) = prior();
    assert!(code != 0 && code != 101, "{err}");
    assert!(
        err.contains("not checkpointed") && err.contains("no checkpoint yet"),
        "{err}"
    );
    assert!(!r.join("state.json").exists());
    assert!(std::fs::read_dir(&r).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with("ckpt-")));
    // Fixed, it trains, and the run's config.yaml is the fixed one (so a resume with it works).
    std::fs::write(
        &cfg,
        std::fs::read_to_string(&cfg)
            .unwrap()
            .replace("1.0e39", "1.0e-4"),
    )
    .unwrap();
    let (code, err) = prior();
    assert_eq!(code, 0, "{err}");
    let saved = std::fs::read_to_string(r.join("config.yaml")).unwrap();
    assert!(
        saved.contains("0.0001") && !saved.contains("e39"),
        "{saved}"
    );
    let saved_cfg = r.join("config.yaml");
    let resume = [
        "prior",
        "--config",
        s(&saved_cfg),
        "--device",
        "cpu",
        "--run",
        s(&r),
        "--steps",
        "2",
    ];
    let (code, err) = run(&resume);
    assert_eq!(code, 0, "{err}");
}

/// A device or a pipe where a config, a checkpoint or a card is expected is refused by name,
/// not read for ever (a pipe) or until memory runs out (/dev/zero); `--trained-in` must be a run
/// of this config.
#[test]
fn devices_pipes_and_other_runs_are_refused_before_any_work() {
    let (tmp, cfg, w) = with_weights();
    let fifo = tmp.path().join("fifo.yaml");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let out = tmp.path().join("ev");
    let eval = |ckpt: &Path, config: &Path, more: &[&str]| {
        let base = [
            "eval",
            "--checkpoint",
            s(ckpt),
            "--config",
            s(config),
            "-o",
            s(&out),
        ];
        run(&[
            &base[..],
            &["-n", "1", "--dps-n", "0", "--ddrm-steps", "0"],
            more,
        ]
        .concat())
    };
    for (ckpt, config, more, named) in [
        (w.as_path(), fifo.as_path(), &[][..], s(&fifo)),
        (Path::new("/dev/zero"), cfg.as_path(), &[][..], "/dev/zero"),
        (
            w.as_path(),
            cfg.as_path(),
            &["--card", s(&fifo), "--dps-zeta", "1"][..],
            s(&fifo),
        ),
    ] {
        let (code, err) = eval(ckpt, config, more);
        assert!(code != 0 && code != 101, "{named}: exit {code}: {err}");
        assert!(
            err.contains(named) && err.contains("not a regular file"),
            "{err}"
        );
    }
    let (code, err) = eval(&w, &cfg, &["--trained-in", s(tmp.path())]);
    assert!(code != 0, "{err}");
    assert!(err.contains("not a run folder"), "{err}");
    assert!(!out.exists());
}
