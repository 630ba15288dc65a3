//! `davi` end to end on folders: messy inputs, determinism across batch sizes and shards,
//! resumption after SIGKILL, execution-provider errors, and no libtorch in the binary.

use davi_tests::{bin, davi, random_model, restore, tree, write_images};
use std::collections::BTreeMap;
use std::path::Path;

#[test]
fn davi_does_not_link_libtorch() {
    let out = std::process::Command::new("ldd")
        .arg(bin("davi"))
        .output()
        .expect("ldd runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "ldd failed: {text}");
    assert!(
        !text.contains("libtorch") && !text.contains("libc10"),
        "davi links libtorch:\n{text}"
    );
}

#[test]
fn messy_folder_restores_the_good_and_names_the_bad() {
    let tmp = tempfile::tempdir().unwrap();
    let model = random_model(&tmp.path().join("m"), "deblur");
    let inp = tmp.path().join("in");
    let good = write_images(&inp.join("sub"), 3, 32);
    // Convertible inputs: RGB, RGBA 16-bit, JPEG.
    image::RgbImage::from_pixel(32, 32, image::Rgb([200, 10, 10]))
        .save(inp.join("rgb.png"))
        .unwrap();
    image::ImageBuffer::<image::Rgba<u16>, _>::from_pixel(
        32,
        32,
        image::Rgba([60000, 1000, 30000, 65535]),
    )
    .save(inp.join("rgba16.png"))
    .unwrap();
    image::GrayImage::from_pixel(32, 32, image::Luma([90]))
        .save(inp.join("photo.jpg"))
        .unwrap();
    // Bad inputs.
    std::fs::write(
        inp.join("corrupt.png"),
        b"\x89PNG\r\n\x1a\nthis is not really a png",
    )
    .unwrap();
    let full = std::fs::read(&good[0]).unwrap();
    std::fs::write(inp.join("truncated.png"), &full[..full.len() / 2]).unwrap();
    std::fs::write(inp.join("empty.png"), b"").unwrap();
    std::fs::write(inp.join("notes.jpg"), b"plain text, not an image").unwrap();
    image::GrayImage::from_pixel(40, 30, image::Luma([1]))
        .save(inp.join("wrong_size.png"))
        .unwrap();
    std::fs::write(inp.join("readme.txt"), b"ignored: not an image extension").unwrap();
    let locked = inp.join("locked.png");
    std::fs::copy(&good[1], &locked).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o000)).unwrap();
    let root_can_read = std::fs::read(&locked).is_ok(); // root ignores mode 000
    std::os::unix::fs::symlink("loop_b", inp.join("loop_a")).unwrap();
    std::os::unix::fs::symlink("loop_a", inp.join("loop_b")).unwrap();
    std::os::unix::fs::symlink("/etc", inp.join("outside")).unwrap();
    let out = tmp.path().join("out");
    let report = tmp.path().join("report.json");
    let (code, _, err) = restore(
        &model,
        &inp,
        &out,
        &["--report", report.to_str().unwrap(), "--batch", "4"],
    );
    assert_eq!(code, 1, "{err}");
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let failed: BTreeMap<String, String> = r["failed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            let p = f["path"].as_str().unwrap();
            (
                Path::new(p)
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .to_string(),
                f["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for (name, why) in [
        ("corrupt.png", "decode"),
        ("truncated.png", "decode"),
        ("empty.png", "empty file"),
        ("notes.jpg", "decode"),
        ("wrong_size.png", "wrong size"),
        ("loop_a", "symlink"),
        ("loop_b", "symlink"),
        ("outside", "leaves the input folder"),
    ] {
        let reason = failed
            .get(name)
            .unwrap_or_else(|| panic!("{name} not reported: {failed:?}"));
        assert!(reason.contains(why), "{name}: {reason}");
        assert!(err.contains(name), "stderr does not name {name}");
    }
    if !root_can_read {
        assert!(
            failed
                .get("locked.png")
                .is_some_and(|r| r.contains("cannot read")),
            "{failed:?}"
        );
    }
    let restored = tree(&out);
    let mut want = vec![
        "photo.png",
        "rgb.png",
        "rgba16.png",
        "sub/img_000.png",
        "sub/img_001.png",
        "sub/img_002.png",
    ];
    if root_can_read {
        want.push("locked.png");
    }
    want.sort();
    let got: Vec<&str> = restored.keys().map(|s| s.as_str()).collect();
    assert_eq!(got, want, "only complete outputs, nothing else");
    assert_eq!(r["restored"].as_u64().unwrap() as usize, want.len());
    assert_eq!(r["ignored"].as_u64().unwrap(), 1);
    for bytes in restored.values() {
        let img = image::load_from_memory(bytes).unwrap();
        assert_eq!((img.width(), img.height()), (32, 32));
    }
}

#[test]
fn outputs_do_not_depend_on_batch_size_or_sharding() {
    let tmp = tempfile::tempdir().unwrap();
    let model = random_model(&tmp.path().join("m"), "sr");
    let inp = tmp.path().join("in");
    write_images(&inp.join("a"), 6, 8);
    write_images(&inp.join("b"), 5, 8);
    let run = |name: &str, extra: &[&str]| {
        let out = tmp.path().join(name);
        let (code, _, err) = restore(&model, &inp, &out, extra);
        assert_eq!(code, 0, "{err}");
        out
    };
    let b1 = tree(&run("b1", &["--batch", "1"]));
    let b7 = tree(&run("b7", &["--batch", "7"]));
    assert_eq!(b1.len(), 11);
    assert_eq!(b1, b7, "batch 1 and batch 7 differ");
    let s0 = tree(&run("s", &["--shard", "0/2"]));
    assert!(!s0.is_empty() && s0.len() < 11);
    let s01 = tree(&run("s", &["--shard", "1/2"]));
    assert_eq!(s01, b1, "shards 0/2 + 1/2 differ from no shard");
    // Another seed gives other samples.
    let other = tree(&run("seed1", &["--seed", "1"]));
    assert_ne!(other, b1);
}

#[test]
fn samples_write_mean_and_std() {
    let tmp = tempfile::tempdir().unwrap();
    let model = random_model(&tmp.path().join("m"), "inpaint");
    let inp = tmp.path().join("in");
    write_images(&inp, 2, 32);
    let out = tmp.path().join("out");
    let (code, _, err) = restore(&model, &inp, &out, &["--samples", "3"]);
    assert_eq!(code, 0, "{err}");
    let t = tree(&out);
    for k in [
        "img_000.png",
        "img_000.sample0.png",
        "img_000.sample2.png",
        "img_000.std.png",
    ] {
        assert!(t.contains_key(k), "{k} missing: {:?}", t.keys());
    }
    assert_ne!(
        t["img_000.sample0.png"], t["img_000.sample1.png"],
        "samples should differ"
    );
    // --skip-existing: an input is done only when all its outputs are there. More samples, or a
    // deleted .std, make it run again.
    let (code, _, err) = restore(&model, &inp, &out, &["--samples", "3", "--skip-existing"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("restored 0 of 2 (2 skipped"), "{err}");
    std::fs::remove_file(out.join("img_001.std.png")).unwrap();
    let (code, _, err) = restore(&model, &inp, &out, &["--samples", "3", "--skip-existing"]);
    assert!(
        code == 0 && err.contains("restored 1 of 2 (1 skipped"),
        "{err}"
    );
    let (code, _, err) = restore(&model, &inp, &out, &["--samples", "4", "--skip-existing"]);
    assert!(
        code == 0 && err.contains("restored 2 of 2 (0 skipped"),
        "{err}"
    );
    let again = tree(&out);
    assert!(again.contains_key("img_001.sample3.png"));
    // Fewer samples than the outputs hold (the mean and .std there are of 4): not this run's
    // to resume; each input fails, naming the file and the way out, and nothing is written.
    let (code, _, err) = restore(&model, &inp, &out, &["--samples", "2", "--skip-existing"]);
    assert!(code == 1 && err.contains("2 failed"), "{err}");
    assert!(
        err.contains("img_000.sample2.png exists: outputs of a run with more than --samples 2"),
        "{err}"
    );
    assert!(tree(&out) == again, "a refused resume wrote something");
    // Each sample is seeded by its own index: the first three are the same as before.
    for k in ["img_000.sample0.png", "img_001.sample2.png"] {
        assert!(again[k] == t[k], "{k} changed");
    }
}

#[test]
fn unavailable_execution_provider_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let model = random_model(&tmp.path().join("m"), "deblur");
    let inp = tmp.path().join("in");
    write_images(&inp, 1, 32);
    for ep in ["cuda", "tensorrt"] {
        let (code, _, err) = restore(&model, &inp, &tmp.path().join("o"), &["--ep", ep]);
        assert_eq!(code, 2, "--ep {ep}: {err}");
        assert!(
            err.contains(&format!("execution provider '{ep}' is not available")),
            "{err}"
        );
    }
    assert!(!tmp.path().join("o").join("img_000.png").exists());
}

#[test]
fn missing_onnx_runtime_names_all_three_places() {
    let tmp = tempfile::tempdir().unwrap();
    let exe = tmp.path().join("davi");
    std::fs::copy(bin("davi"), &exe).unwrap();
    let out = std::process::Command::new(&exe)
        .args(["verify", "-m", "/nonexistent/model.onnx"])
        .env_remove("ORT_DYLIB_PATH")
        .output()
        .unwrap();
    // No model: the model error comes first.
    assert_eq!(out.status.code(), Some(2));
    std::fs::write(tmp.path().join("model.onnx"), b"x").unwrap();
    let out = std::process::Command::new(&exe)
        .args([
            "verify",
            "-m",
            tmp.path().join("model.onnx").to_str().unwrap(),
        ])
        .env_remove("ORT_DYLIB_PATH")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--ort-lib")
            && err.contains("ORT_DYLIB_PATH")
            && err.contains(".deps/onnxruntime"),
        "{err}"
    );
}

#[test]
fn degrade_then_eval() {
    let tmp = tempfile::tempdir().unwrap();
    let clean = tmp.path().join("clean");
    write_images(&clean, 3, 32);
    let deg = tmp.path().join("deg");
    let (code, _, err) = davi(&[
        "degrade",
        "--task",
        "sr",
        "-i",
        clean.to_str().unwrap(),
        "-o",
        deg.to_str().unwrap(),
        "--seed",
        "3",
    ]);
    assert_eq!(code, 0, "{err}");
    let img = image::open(deg.join("img_000.png")).unwrap();
    assert_eq!(
        (img.width(), img.height()),
        (8, 8),
        "SR x4 measurement of a 32 px image"
    );
    // Same seed, same bytes.
    let deg2 = tmp.path().join("deg2");
    davi(&[
        "degrade",
        "--task",
        "sr",
        "-i",
        clean.to_str().unwrap(),
        "-o",
        deg2.to_str().unwrap(),
        "--seed",
        "3",
    ]);
    assert_eq!(tree(&deg), tree(&deg2));
    // Denoising measurements are noisier than their sigma_y says they should not be: PSNR ~ 20 dB at sigma 0.2 on [-1, 1].
    let deg3 = tmp.path().join("deg3");
    let (code, _, err) = davi(&[
        "degrade",
        "--task",
        "denoise",
        "-i",
        clean.to_str().unwrap(),
        "-o",
        deg3.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let json = tmp.path().join("e.json");
    let (code, out, err) = davi(&[
        "eval",
        "--restored",
        deg3.to_str().unwrap(),
        "--reference",
        clean.to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("| 3 |"), "{out}");
    let e: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let psnr = e["psnr"].as_f64().unwrap();
    // sigma 0.2 on [-1, 1] is 0.1 on [0, 1]: PSNR about 20 dB (a little more where clipping bites).
    assert!((19.0..23.0).contains(&psnr), "{psnr}");
}

#[test]
fn output_folder_inside_the_input_is_not_read_back() {
    let tmp = tempfile::tempdir().unwrap();
    let model = random_model(&tmp.path().join("m"), "denoise");
    let inp = tmp.path().join("data");
    write_images(&inp, 3, 32);
    let out = inp.join("restored");
    for run in 0..2 {
        let (code, _, err) = restore(&model, &inp, &out, &[]);
        assert_eq!(code, 0, "{err}");
        assert!(err.contains("restored 3 of 3"), "{err}");
        // Once the folder exists, said, not silent: a file a user put there is not an input.
        assert_eq!(
            err.contains("lies inside the input folder: nothing in it was read"),
            run == 1,
            "{err}"
        );
    }
    // The three outputs and the mark that says the folder is davi's.
    assert_eq!(tree(&out).len(), 4);
    assert!(out.join(".davi-output").is_file());
}

/// A folder inside the input folder that already holds someone's images is not taken as the
/// output folder: they are not read as inputs, so nothing else would keep a run from replacing
/// them (or --skip-existing from counting them as done).
#[test]
fn an_output_folder_inside_the_input_holding_images_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let model = random_model(&tmp.path().join("m"), "denoise");
    let inp = tmp.path().join("data");
    write_images(&inp, 3, 32);
    // The user's backup of the same names, inside the input folder.
    let backup = inp.join("backup");
    let mut theirs = write_images(&backup, 3, 32);
    std::fs::rename(&theirs[0], backup.join("img_000.PNG")).unwrap();
    theirs[0] = backup.join("img_000.PNG");
    let before = tree(&backup);
    for extra in [&[][..], &["--skip-existing"][..]] {
        let (code, _, err) = restore(&model, &inp, &backup, extra);
        assert_eq!(code, 2, "{err}");
        assert!(
            err.contains("refused") && err.contains("holds images davi did not write"),
            "{err}"
        );
        assert!(
            err.contains(".davi-output"),
            "says how to confirm old outputs: {err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert_eq!(tree(&backup), before, "{extra:?}");
    }
    let (code, _, err) = davi(&[
        "degrade",
        "--task",
        "denoise",
        "-i",
        inp.to_str().unwrap(),
        "-o",
        backup.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("holds images davi did not write"), "{err}");
    assert_eq!(tree(&backup), before);
    // A folder there without images is taken, and marked as davi's.
    let fresh = inp.join("fresh");
    std::fs::create_dir_all(&fresh).unwrap();
    std::fs::write(fresh.join("notes.txt"), b"keep").unwrap();
    let (code, _, err) = restore(&model, &inp, &fresh, &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("restored 6 of 6"),
        "the backup is an input here: {err}"
    );
    assert!(fresh.join(".davi-output").is_file());
    assert_eq!(std::fs::read(fresh.join("notes.txt")).unwrap(), b"keep");
    // Once the user says the images are davi's, the folder is taken.
    std::fs::write(backup.join(".davi-output"), b"").unwrap();
    let (code, _, err) = restore(&model, &inp, &backup, &[]);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn an_output_path_that_is_a_file_is_refused_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let model = random_model(&tmp.path().join("m"), "denoise");
    let inp = tmp.path().join("data");
    write_images(&inp, 2, 32);
    let out = tmp.path().join("afile");
    std::fs::write(&out, b"keep me").unwrap();
    let (code, _, err) = restore(&model, &inp, &out, &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("afile: exists and is not a folder"), "{err}");
    assert_eq!(std::fs::read(&out).unwrap(), b"keep me");
}
