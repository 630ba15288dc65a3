//! No input is ever lost, and no broken model or bad number passes as success: each class of
//! the reliability issue, as a hostile user meets it.

use davi_tests::{
    bin, davi, random_model, random_model_with, restore, toy_model, tree, walk, write_images,
};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

/// The `davi: restored R of F (S skipped, X failed, ...)` line's numbers.
fn counts(stderr: &str) -> (usize, usize, usize, usize) {
    let line = stderr
        .lines()
        .find(|l| l.contains(" of ") && l.contains("skipped"))
        .unwrap_or_else(|| panic!("no summary line in {stderr}"));
    let nums: Vec<usize> = line
        .split(|c: char| !c.is_ascii_digit() && c != '.')
        .filter_map(|w| w.parse().ok())
        .collect();
    (nums[0], nums[1], nums[2], nums[3])
}

#[test]
fn an_output_never_replaces_an_input() {
    let tmp = tempfile::tempdir().unwrap();
    let model = random_model(&tmp.path().join("m"), "denoise");
    let x = tmp.path().join("x");
    let files = write_images(&x, 3, 32);
    let before = tree(&x);
    let refused = |args: (i32, String, String), what: &str| {
        let (code, _, err) = args;
        assert_eq!(code, 2, "{what}: {err}");
        assert!(err.contains("refused"), "{what}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{what}: one line: {err}");
    };
    // A single file restored into its own folder.
    refused(restore(&model, &files[0], &x, &[]), "file into its folder");
    // -o equal to -i, directly and through a symlink.
    refused(restore(&model, &x, &x, &[]), "-o = -i");
    let link = tmp.path().join("link");
    std::os::unix::fs::symlink(&x, &link).unwrap();
    refused(restore(&model, &x, &link, &[]), "-o a symlink to -i");
    // The input folder inside the output folder, where a mirrored path lands on an input
    // (in/img_000.png -> out/in/img_000.png), or into the input folder (read back next time).
    let out = tmp.path().join("out");
    write_images(&out.join("in/in"), 1, 32);
    refused(
        restore(&model, &out.join("in"), &out, &[]),
        "outputs into the input folder",
    );
    write_images(&out.join("in"), 1, 32);
    let before_out = tree(&out);
    refused(
        restore(&model, &out.join("in"), &out, &[]),
        "overlapping trees",
    );
    assert_eq!(tree(&out), before_out);
    // --report on an input, or on an image name.
    let o2 = tmp.path().join("o2");
    refused(
        restore(&model, &x, &o2, &["--report", files[1].to_str().unwrap()]),
        "--report on an input",
    );
    refused(
        restore(
            &model,
            &x,
            &o2,
            &["--report", tmp.path().join("r.png").to_str().unwrap()],
        ),
        "--report on an image name",
    );
    // --report on the model, or on a folder.
    let model_before = std::fs::read(&model).unwrap();
    refused(
        restore(&model, &x, &o2, &["--report", model.to_str().unwrap()]),
        "--report on the model",
    );
    assert_eq!(std::fs::read(&model).unwrap(), model_before);
    std::fs::create_dir_all(&o2).unwrap();
    refused(
        restore(&model, &x, &o2, &["--report", o2.to_str().unwrap()]),
        "--report on a folder",
    );
    // --report through a link to an input (reports are written through links).
    let alias = tmp.path().join("alias.json");
    std::os::unix::fs::symlink(&files[0], &alias).unwrap();
    refused(
        restore(&model, &x, &o2, &["--report", alias.to_str().unwrap()]),
        "--report linked to an input",
    );
    // --report on the output folder that the run would create.
    let o3 = tmp.path().join("o3");
    refused(
        restore(&model, &x, &o3, &["--report", o3.to_str().unwrap()]),
        "--report on the output folder",
    );
    assert!(!o3.exists(), "the refused run made its output folder");
    // Followed symlinks: their targets are inputs too.
    let sel = tmp.path().join("sel");
    std::fs::create_dir_all(&sel).unwrap();
    std::os::unix::fs::symlink(&files[2], sel.join(files[2].file_name().unwrap())).unwrap();
    refused(
        restore(&model, &sel, &x, &["--follow-symlinks"]),
        "outputs onto the targets of followed links",
    );
    assert_eq!(tree(&x), before, "an input changed");
    assert!(tree(&o2).is_empty(), "something was written");
}

#[test]
fn eval_never_writes_into_the_folders_it_scores() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    write_images(&a, 2, 32);
    write_images(&b, 2, 32);
    let before = (tree(&a), tree(&b));
    // `davi eval --restored a --reference b ARGS` in the temporary folder: exit code, stderr.
    let eval = |args: &[&str]| {
        let out = std::process::Command::new(bin("davi"))
            .current_dir(tmp.path())
            .args(["eval", "--restored", "a", "--reference", "b"])
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for args in [
        ["--json", "b/img_000.png"],
        ["--csv", "a/scores.csv"],
        ["--sheet", "b/sheet.png"],
        ["--markdown", "table.png"],
    ] {
        let (code, err) = eval(&args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(err.contains("refused"), "{err}");
    }
    // Nor through a link that leads into them.
    std::os::unix::fs::symlink(b.join("img_000.png"), tmp.path().join("into.json")).unwrap();
    let (code, err) = eval(&["--json", "into.json"]);
    assert_eq!(code, Some(2), "{err}");
    assert_eq!((tree(&a), tree(&b)), before);
    // A sheet it cannot write is refused before any scoring or writing.
    for args in [
        &["--sheet", "sheet.gif"][..],
        &["--sheet", "s.png", "--sheet-rows", "0"],
        &["--sheet", "s.png", "--measurement", "nope"],
    ] {
        let (code, err) = eval(&[&["--json", "e.json"], args].concat());
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(
            !tmp.path().join("e.json").exists(),
            "{args:?} wrote the scores"
        );
    }
    // Scores to a device go through it; a device or a link is never replaced by a file.
    let link = tmp.path().join("scores.json");
    let target = tmp.path().join("kept/scores.json");
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    std::fs::write(&target, b"{}").unwrap();
    std::os::unix::fs::symlink(&target, &link).unwrap();
    for json in ["/dev/null", "scores.json"] {
        let (code, err) = eval(&["--json", json]);
        assert_eq!(code, Some(0), "{err}");
    }
    assert!(std::fs::symlink_metadata("/dev/null")
        .unwrap()
        .file_type()
        .is_char_device());
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(std::fs::read_to_string(&target).unwrap().contains("psnr"));
    let (code, _, err) = davi(&["eval", "--restored", "/nonexistent", "--reference", "b"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no such folder"), "{err}");
    // Two outputs naming one file (directly, or through a link) would replace each other.
    std::fs::write(tmp.path().join("e.json"), b"kept").unwrap();
    std::os::unix::fs::symlink(tmp.path().join("e.json"), tmp.path().join("same.md")).unwrap();
    for args in [
        &["--json", "e.json", "--csv", "e.json"][..],
        &["--json", "e.json", "--markdown", "same.md"],
    ] {
        let (code, err) = eval(args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(err.contains("named by two outputs"), "{err}");
    }
    assert_eq!(std::fs::read(tmp.path().join("e.json")).unwrap(), b"kept");
}

#[test]
fn two_inputs_never_become_one_output() {
    let tmp = tempfile::tempdir().unwrap();
    let model = random_model(&tmp.path().join("m"), "denoise");
    let inp = tmp.path().join("in");
    let src = write_images(&tmp.path().join("src"), 4, 32);
    std::fs::create_dir_all(&inp).unwrap();
    // a.png, a.bmp, a.tif: one stem, three images.
    for (i, ext) in ["png", "bmp", "tif"].iter().enumerate() {
        let img = image::open(&src[i]).unwrap();
        img.save(inp.join(format!("a.{ext}"))).unwrap();
    }
    // Names that differ only in bytes that are not UTF-8.
    use std::os::unix::ffi::OsStrExt;
    for b in [0xffu8, 0xfe] {
        let mut name = b"b".to_vec();
        name.push(b);
        name.extend_from_slice(b".png");
        std::fs::copy(&src[3], inp.join(std::ffi::OsStr::from_bytes(&name))).unwrap();
    }
    let out = tmp.path().join("out");
    let (code, _, err) = restore(&model, &inp, &out, &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(counts(&err), (5, 5, 0, 0), "{err}");
    // Listed as paths: the two names that are not UTF-8 would fold into one as text.
    let names: Vec<String> = walk(&out)
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().to_string())
        .collect();
    assert_eq!(names.len(), 5, "{names:?}");
    for n in ["a.png.png", "a.bmp.png", "a.tif.png"] {
        assert!(names.contains(&n.to_string()), "{n} missing: {names:?}");
    }
    // Each a.* output is the restoration of its own input: restore each alone and compare.
    for ext in ["png", "bmp", "tif"] {
        let one = tmp.path().join(format!("one-{ext}"));
        let (code, _, err) = restore(&model, &inp.join(format!("a.{ext}")), &one, &[]);
        assert_eq!(code, 0, "{err}");
        assert_eq!(
            std::fs::read(one.join("a.png")).unwrap(),
            std::fs::read(out.join(format!("a.{ext}.png"))).unwrap(),
            "a.{ext}"
        );
    }
    // --samples outputs against inputs named like them.
    let inp2 = tmp.path().join("in2");
    std::fs::create_dir_all(&inp2).unwrap();
    std::fs::copy(&src[0], inp2.join("c.png")).unwrap();
    std::fs::copy(&src[1], inp2.join("c.sample0.png")).unwrap();
    std::fs::copy(&src[2], inp2.join("c.std.png")).unwrap();
    let out2 = tmp.path().join("out2");
    let (code, _, err) = restore(&model, &inp2, &out2, &["--samples", "2"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(counts(&err), (3, 3, 0, 0), "{err}");
    // 3 inputs x (2 samples + std + mean), all distinct.
    assert_eq!(tree(&out2).len(), 12, "{:?}", tree(&out2).keys());
}

#[test]
fn a_rerun_removes_the_temporaries_of_dead_writers_only() {
    let tmp = tempfile::tempdir().unwrap();
    let model = random_model(&tmp.path().join("m"), "denoise");
    let inp = tmp.path().join("in");
    write_images(&inp.join("sub"), 3, 32);
    let full = tmp.path().join("full");
    assert_eq!(restore(&model, &inp, &full, &[]).0, 0);
    let out = tmp.path().join("out");
    std::fs::create_dir_all(out.join("sub")).unwrap();
    let host = davi_models::atomic::host();
    // A writer of this machine that ran and died.
    let dead = {
        let mut c = std::process::Command::new("true").spawn().unwrap();
        let pid = c.id();
        c.wait().unwrap();
        pid
    };
    let stale = out.join(format!("sub/.img_000.png.aB3dE9.{host}.{dead}.tmp"));
    // One being written by a live writer (this test), one by another machine, and files that
    // only look like temporaries: none of them is ours to remove.
    let me = std::process::id();
    let live = out.join(format!("sub/.img_001.png.xY7zQ2.{host}.{me}.tmp"));
    let remote = out.join(format!("sub/.img_002.png.xY7zQ2.{host}x.{dead}.tmp"));
    let user = out.join(format!("sub/.draft.png.aB3dE9.{host}.{dead}.tmp"));
    let backup = out.join(".backup.2024.tmp");
    for p in [&stale, &live, &remote, &user, &backup] {
        std::fs::write(p, b"half").unwrap();
    }
    let (code, _, err) = restore(&model, &inp, &out, &["--skip-existing"]);
    assert_eq!(code, 0, "{err}");
    assert!(!stale.exists(), "the dead writer's temporary stayed");
    for p in [&live, &remote, &user, &backup] {
        assert!(p.exists(), "{} was removed", p.display());
        std::fs::remove_file(p).unwrap();
    }
    assert_eq!(tree(&out), tree(&full));
}

#[test]
fn skip_existing_counts_only_files_a_run_could_have_written() {
    let tmp = tempfile::tempdir().unwrap();
    let model = random_model(&tmp.path().join("m"), "denoise");
    let inp = tmp.path().join("in");
    let files = write_images(&inp, 3, 32);
    let full = tmp.path().join("full");
    assert_eq!(restore(&model, &inp, &full, &[]).0, 0);
    let before = tree(&inp);
    // At the outputs' paths: an empty file, a link to an input, a folder. None is an output.
    let out = tmp.path().join("out");
    std::fs::create_dir_all(out.join("img_002.png")).unwrap();
    std::fs::write(out.join("img_000.png"), b"").unwrap();
    std::os::unix::fs::symlink(&files[1], out.join("img_001.png")).unwrap();
    let (code, _, err) = restore(&model, &inp, &out, &["--skip-existing"]);
    // The first two are redone (the link itself replaced, not the input it points to); the
    // folder is not replaced, and that input fails, saying why.
    assert_eq!(code, 1, "{err}");
    assert_eq!(counts(&err), (2, 3, 0, 1), "{err}");
    assert!(err.contains("not a regular file"), "{err}");
    assert_eq!(tree(&inp), before, "an input changed");
    assert!(std::fs::symlink_metadata(out.join("img_001.png"))
        .unwrap()
        .is_file());
    std::fs::remove_dir(out.join("img_002.png")).unwrap();
    let (code, _, err) = restore(&model, &inp, &out, &["--skip-existing"]);
    assert_eq!((code, counts(&err)), (0, (1, 3, 2, 0)), "{err}");
    assert_eq!(tree(&out), tree(&full));
    // Someone's file at an output's name, with something in it but no PNG: neither done nor
    // replaced; that input fails naming the file.
    let notes = out.join("img_002.png");
    std::fs::write(&notes, b"my notes, not an image").unwrap();
    let (code, _, err) = restore(&model, &inp, &out, &["--skip-existing"]);
    assert_eq!((code, counts(&err)), (1, (0, 3, 2, 1)), "{err}");
    assert!(
        err.contains(notes.to_str().unwrap()) && err.contains("is not a PNG image"),
        "{err}"
    );
    assert_eq!(std::fs::read(&notes).unwrap(), b"my notes, not an image");
}

/// An input named like another input's sample (`b.sample1.png` beside `b.png`) is that input's
/// output on a rerun with `--skip-existing`, not a leftover of a run with more samples.
#[test]
fn skip_existing_tells_a_sibling_input_from_a_leftover_sample() {
    let tmp = tempfile::tempdir().unwrap();
    let model = random_model(&tmp.path().join("m"), "denoise");
    let inp = tmp.path().join("in");
    let files = write_images(&inp, 2, 32);
    std::fs::rename(&files[0], inp.join("b.png")).unwrap();
    std::fs::rename(&files[1], inp.join("b.sample1.png")).unwrap();
    let out = tmp.path().join("out");
    assert_eq!(restore(&model, &inp, &out, &[]).0, 0);
    let done = tree(&out);
    let (code, _, err) = restore(&model, &inp, &out, &["--skip-existing"]);
    assert_eq!((code, counts(&err)), (0, (0, 2, 2, 0)), "{err}");
    assert_eq!(tree(&out), done);
    // A true leftover of a run with more samples still fails that input, saying why.
    let out2 = tmp.path().join("out2");
    std::fs::create_dir_all(&out2).unwrap();
    std::fs::copy(out.join("b.png"), out2.join("b.sample1.png")).unwrap();
    std::fs::remove_file(inp.join("b.sample1.png")).unwrap();
    let (code, _, err) = restore(&model, &inp, &out2, &["--skip-existing"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("more than --samples 1"), "{err}");
}

/// One folder reached by two paths that no symlink joins (a bind mount; a container given one
/// host folder as two volumes) is one folder: restore and degrade refuse to write their outputs
/// over the inputs there. Needs a mount namespace (`unshare -m`, or `-rm` without root).
#[test]
fn a_bind_mount_of_the_input_folder_is_the_input_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let model = random_model(&tmp.path().join("m"), "denoise");
    let x = tmp.path().join("x");
    write_images(&x, 2, 32);
    let v = tmp.path().join("v");
    std::fs::create_dir_all(&v).unwrap();
    let before = tree(&x);
    let ns = ["-m", "-rm"]
        .into_iter()
        .find(|f| {
            std::process::Command::new("unshare")
                .args([f, "true"])
                .status()
                .is_ok_and(|s| s.success())
        })
        .expect("unshare -m or -rm: this test needs a mount namespace");
    let (d, m, x, v) = (
        bin("davi"),
        model.display().to_string(),
        x.display().to_string(),
        v.display().to_string(),
    );
    let d = d.display();
    let script = format!(
        "mount --bind {x} {v} || exit 99
         {d} restore -m {m} -i {x} -o {v}; echo restore=$?
         {d} degrade --task denoise -i {x} -o {v}; echo degrade=$?
         {d} restore -m {m} -i {x} -o {v}/sub; echo nested=$?"
    );
    let o = std::process::Command::new("unshare")
        .args([ns, "sh", "-c", &script])
        .output()
        .unwrap();
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(
        out.contains("restore=2") && out.contains("degrade=2"),
        "{out}{err}"
    );
    assert_eq!(err.matches("refused").count(), 2, "{err}");
    // Into a new folder under the mount (inside the input folder): allowed, marked as davi's,
    // and not read back as inputs.
    assert!(out.contains("nested=0"), "{out}{err}");
    let mut after = tree(Path::new(&x));
    let sub: Vec<String> = after
        .keys()
        .filter(|k| k.starts_with("sub/"))
        .cloned()
        .collect();
    assert_eq!(
        sub,
        ["sub/.davi-output", "sub/img_000.png", "sub/img_001.png"],
        "{sub:?}"
    );
    for k in sub {
        after.remove(&k);
    }
    assert_eq!(after, before, "an input changed");
}

/// `bench --json` never replaces the model or an input, every argument is checked before the
/// first timed run, and images that fail in the end-to-end restore are named and fail the run.
#[test]
fn bench_checks_its_arguments_first_and_names_failures() {
    let tmp = tempfile::tempdir().unwrap();
    let model = random_model(&tmp.path().join("m"), "denoise");
    let inp = tmp.path().join("in");
    let files = write_images(&inp, 2, 32);
    std::fs::write(inp.join("bad.png"), b"not a png").unwrap();
    let (m, i) = (model.to_str().unwrap(), inp.to_str().unwrap());
    let model_bytes = std::fs::read(&model).unwrap();
    let input_bytes = std::fs::read(&files[0]).unwrap();
    // `davi bench -m M --batch 1 ARGS`.
    let bench = |args: &[&str]| davi(&[&["bench", "-m", m, "--batch", "1"], args].concat());
    let under_input = inp.join("figures.json").display().to_string();
    for (json, what) in [
        (m, "the model"),
        (files[0].to_str().unwrap(), "an input"),
        (under_input.as_str(), "under --input"),
    ] {
        let (code, _, err) = bench(&["--seconds", "0.1", "-i", i, "--json", json]);
        assert_eq!(code, 2, "{what}: {err}");
        assert!(err.contains("refused"), "{what}: {err}");
    }
    assert_eq!(std::fs::read(&model).unwrap(), model_bytes);
    assert_eq!(std::fs::read(&files[0]).unwrap(), input_bytes);
    for bad in [
        &["--seconds", "nan"][..],
        &["--seconds", "1e300"],
        &["--restore-batch", "0"],
        &["--overlap", "0.95"],
        &["-i", "/nonexistent/folder"],
    ] {
        let (code, out, err) = bench(bad);
        assert_eq!(code, 2, "{bad:?}: {err}");
        assert!(
            err.contains(bad[0].trim_start_matches('-')) || err.contains(bad[1]),
            "{bad:?}: {err}"
        );
        assert!(
            !out.contains("bare session"),
            "{bad:?}: ran before refusing: {out}"
        );
    }
    let json = tmp.path().join("figures.json");
    let json = json.to_str().unwrap();
    let (code, out, err) = bench(&[
        "--seconds",
        "0.1",
        "-i",
        i,
        "--restore-batch",
        "2",
        "--json",
        json,
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(out.contains("(2 images, 1 failed)"), "{out}");
    assert!(err.contains("bad.png"), "{err}");
    assert!(Path::new(json).is_file());
}

/// A device, a pipe or a folder where a card or a parity file is expected is refused by name,
/// not read until memory runs out or for ever.
#[test]
fn cards_and_parity_files_must_be_regular_files() {
    let tmp = tempfile::tempdir().unwrap();
    let fifo = tmp.path().join("card.yaml");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    for (args, path) in [
        (vec!["cards", "/dev/zero"], "/dev/zero"),
        (
            vec!["cards", fifo.to_str().unwrap()],
            fifo.to_str().unwrap(),
        ),
    ] {
        let (code, _, err) = davi(&args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(
            err.contains(path) && err.contains("not a regular file"),
            "{err}"
        );
    }
    // A card whose DAVI PSNR is not a number is an error naming the card and the row, not a
    // table without that row.
    let card = tmp.path().join("nan/card.yaml");
    std::fs::create_dir_all(card.parent().unwrap()).unwrap();
    let text = include_str!("../../models/zoo/fmnist32-deblur/card.yaml");
    let at = text.find("\n    psnr: ").expect("eval.davi.psnr") + 1;
    let end = at + text[at..].find('\n').unwrap();
    std::fs::write(
        &card,
        format!("{}    psnr: .nan{}", &text[..at], &text[end..]),
    )
    .unwrap();
    let (code, out, err) = davi(&["cards", card.to_str().unwrap()]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains(card.to_str().unwrap()) && err.contains("eval.davi: PSNR NaN"),
        "{err}"
    );
    let model = random_model(&tmp.path().join("m"), "denoise");
    let (code, _, err) = davi(&[
        "verify",
        "-m",
        model.to_str().unwrap(),
        "--parity",
        "/dev/zero",
    ]);
    assert_ne!(code, 0, "{err}");
    assert!(
        err.contains("/dev/zero") && err.contains("a device"),
        "{err}"
    );
}

#[test]
fn shards_name_and_write_exactly_what_one_run_does() {
    let tmp = tempfile::tempdir().unwrap();
    let model = random_model(&tmp.path().join("m"), "denoise");
    let inp = tmp.path().join("in");
    let src = write_images(&tmp.path().join("src"), 4, 32);
    std::fs::create_dir_all(inp.join("a.png")).unwrap();
    std::fs::copy(&src[0], inp.join("a.png/x.png")).unwrap();
    for (i, ext) in ["png", "bmp", "tif"].iter().enumerate() {
        image::open(&src[i + 1])
            .unwrap()
            .save(inp.join(format!("b.{ext}")))
            .unwrap();
    }
    // A file whose plain output would take the folder a.png's name.
    image::open(&src[3])
        .unwrap()
        .save(inp.join("a.bmp"))
        .unwrap();
    let one = tmp.path().join("one");
    let (code, _, err) = restore(&model, &inp, &one, &[]);
    assert_eq!(code, 0, "{err}");
    let sharded = tmp.path().join("sharded");
    for i in 0..3 {
        let shard = format!("{i}/3");
        let (code, _, err) = restore(&model, &inp, &sharded, &["--shard", &shard]);
        assert_eq!(code, 0, "{err}");
    }
    assert_eq!(tree(&sharded), tree(&one));
    assert!(one.join("a.bmp.png").is_file() && one.join("a.png/x.png").is_file());
}

#[test]
fn a_run_killed_at_any_moment_resumes_to_the_identical_tree() {
    let tmp = tempfile::tempdir().unwrap();
    let model = random_model(&tmp.path().join("m"), "denoise");
    let inp = tmp.path().join("in");
    write_images(&inp, 200, 32);
    let full = tmp.path().join("full");
    assert_eq!(restore(&model, &inp, &full, &["--samples", "2"]).0, 0);
    let want = tree(&full);
    // Kill at several moments; each time the rerun ends with exactly the uninterrupted tree,
    // temporaries included.
    for (k, wait_files) in [1usize, 40, 200].into_iter().enumerate() {
        let part = tmp.path().join(format!("part{k}"));
        let mut child = std::process::Command::new(bin("davi"))
            .args(["restore", "--batch", "2", "--samples", "2", "-m"])
            .arg(&model)
            .arg("-i")
            .arg(&inp)
            .arg("-o")
            .arg(&part)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let t = std::time::Instant::now();
        while walk(&part).len() < wait_files && t.elapsed().as_secs() < 60 {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        let (code, _, err) = restore(&model, &inp, &part, &["--skip-existing", "--samples", "2"]);
        assert_eq!(code, 0, "{err}");
        assert_eq!(tree(&part), want, "kill after {wait_files} files");
    }
}

/// Sends `signal` (`-TERM`, ...) to `child` once `out` holds `n` files; the process must still
/// be there to receive it.
fn signal_after_outputs(child: &std::process::Child, out: &Path, n: usize, signal: &str) {
    let t = std::time::Instant::now();
    while walk(out).len() < n && t.elapsed().as_secs() < 60 {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let st = std::process::Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success(), "kill {signal}");
}

/// Whether signal `n` is ignored in this process (its `SigIgn` mask), so in the children it
/// spawns.
fn ignored_here(n: u32) -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let mask = status
        .lines()
        .find_map(|l| l.strip_prefix("SigIgn:"))
        .map(|m| u64::from_str_radix(m.trim(), 16).unwrap())
        .expect("SigIgn in /proc/self/status");
    mask >> (n - 1) & 1 == 1
}

/// SIGTERM (a scheduler's preemption) or SIGINT stops a restore cleanly: the images in flight
/// are written, the summary and the report say what was not done, the exit code is 130, and a
/// rerun with --skip-existing ends with the uninterrupted tree.
#[test]
fn a_signal_stops_a_restore_with_a_report_and_it_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let model = random_model(&tmp.path().join("m"), "denoise");
    let inp = tmp.path().join("in");
    write_images(&inp, 400, 32);
    let full = tmp.path().join("full");
    assert_eq!(restore(&model, &inp, &full, &[]).0, 0);
    let want = tree(&full);
    for signal in ["-TERM", "-INT"] {
        let part = tmp.path().join(format!("part{signal}"));
        let report = tmp.path().join(format!("report{signal}.json"));
        let child = std::process::Command::new(bin("davi"))
            .args(["restore", "--batch", "1", "--threads", "1", "-m"])
            .arg(&model)
            .arg("-i")
            .arg(&inp)
            .arg("-o")
            .arg(&part)
            .arg("--report")
            .arg(&report)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        signal_after_outputs(&child, &part, 5, signal);
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        if signal == "-INT" && ignored_here(2) {
            // Started as a background job (`cmd &` in a script ignores SIGINT for it and its
            // children): the restore inherits the ignored SIGINT and, as under nohup, keeps it
            // ignored and runs to the end.
            assert_eq!(out.status.code(), Some(0), "{signal} ignored: {err}");
            assert_eq!(tree(&part), want, "{signal} ignored");
            continue;
        }
        assert_eq!(out.status.code(), Some(130), "{signal}: {err}");
        assert!(
            err.contains("interrupted:") && err.contains("--skip-existing"),
            "{err}"
        );
        let r: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
        let n = |k: &str| r[k].as_u64().unwrap_or_else(|| panic!("{k} in {r}"));
        assert!(r["interrupted"].as_bool().unwrap());
        assert!(n("not_done") > 0 && n("restored") > 0, "{r}");
        assert_eq!(
            n("found"),
            n("restored")
                + n("skipped")
                + n("not_done")
                + r["failed"].as_array().unwrap().len() as u64
        );
        // What was written is complete: exactly the uninterrupted run's bytes.
        let got = tree(&part);
        assert_eq!(got.len() as u64, n("restored"), "{signal}");
        for (k, v) in &got {
            assert!(want.get(k) == Some(v), "{k} differs");
        }
        let (code, _, err) = restore(&model, &inp, &part, &["--skip-existing"]);
        assert_eq!(code, 0, "{err}");
        assert_eq!(tree(&part), want, "{signal}");
    }
}

/// Under `nohup` (SIGHUP ignored), a hang-up does not stop a restore: the signal stays ignored.
#[test]
fn a_restore_under_nohup_survives_a_hangup() {
    let tmp = tempfile::tempdir().unwrap();
    let model = random_model(&tmp.path().join("m"), "denoise");
    let inp = tmp.path().join("in");
    write_images(&inp, 400, 32);
    let out = tmp.path().join("out");
    let child = std::process::Command::new("nohup")
        .arg(bin("davi"))
        .args(["restore", "--batch", "1", "--threads", "1", "-m"])
        .arg(&model)
        .arg("-i")
        .arg(&inp)
        .arg("-o")
        .arg(&out)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    signal_after_outputs(&child, &out, 5, "-HUP");
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(err.contains("restored 400 of 400"), "{err}");
}

/// A genuine parity file of `model`: K inputs and what ONNX Runtime computes for them.
fn parity_file(model: &Path, out: &Path, nan_image: bool) {
    use ndarray::Array4;
    let mut m = davi_runtime::Model::load(model, &davi_runtime::SessionOptions::default()).unwrap();
    let meas = Array4::<f32>::from_shape_fn((2, 1, 32, 32), |(n, _, i, j)| {
        ((n + i * 3 + j) % 11) as f32 / 5.5 - 1.0
    });
    let z = Array4::<f32>::from_shape_fn((2, 1, 32, 32), |(n, _, i, j)| {
        ((n * 5 + i + j * 7) % 13) as f32 / 6.5 - 1.0
    });
    let mut img = m.restore(&meas, &z).unwrap();
    if nan_image {
        img.fill(f32::NAN);
    }
    let bytes = |a: &[f32]| a.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
    let (mb, zb, ib) = (
        bytes(meas.as_slice().unwrap()),
        bytes(z.as_slice().unwrap()),
        bytes(img.as_slice().unwrap()),
    );
    fn view(b: &[u8]) -> safetensors::tensor::TensorView<'_> {
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2, 1, 32, 32], b)
            .unwrap()
    }
    let data = safetensors::serialize(
        [
            ("measurement", view(&mb)),
            ("noise", view(&zb)),
            ("image", view(&ib)),
        ],
        None,
    )
    .unwrap();
    std::fs::write(out, data).unwrap();
}

#[test]
fn verify_fails_on_any_non_finite_value() {
    let tmp = tempfile::tempdir().unwrap();
    let good = toy_model(
        &tmp.path().join("good"),
        &[
            ("measurement", [None, Some(1), Some(32), Some(32)]),
            ("noise", [None, Some(1), Some(32), Some(32)]),
        ],
        [None, Some(1), Some(32), Some(32)],
        "identity",
        32,
    );
    let nan = toy_model(
        &tmp.path().join("nan"),
        &[
            ("measurement", [None, Some(1), Some(32), Some(32)]),
            ("noise", [None, Some(1), Some(32), Some(32)]),
        ],
        [None, Some(1), Some(32), Some(32)],
        "nan",
        32,
    );
    let genuine = tmp.path().join("genuine.safetensors");
    parity_file(&good, &genuine, false);
    let nan_parity = tmp.path().join("nan.safetensors");
    parity_file(&good, &nan_parity, true);
    let verify = |m: &Path, p: &Path| {
        davi(&[
            "verify",
            "-m",
            m.to_str().unwrap(),
            "--parity",
            p.to_str().unwrap(),
        ])
    };
    let (code, out, _) = verify(&good, &genuine);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("PASS"));
    for (m, p, what) in [
        (&nan, &genuine, "a NaN model"),
        (&good, &nan_parity, "a NaN parity file"),
    ] {
        let (code, out, err) = verify(m, p);
        assert_eq!(code, 1, "{what}: {out}{err}");
        assert!(out.contains("FAIL") && out.contains("NaN"), "{what}: {out}");
    }
}

#[test]
fn verify_refuses_another_models_fixture_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let zoo = davi_tests::root().join("models/zoo/fmnist32-sr4");
    let model = zoo.join("model.onnx");
    let info = davi_runtime::Model::load(&model, &davi_runtime::SessionOptions::default())
        .unwrap()
        .info;
    assert!(!info.name.is_empty() && !info.config_hash.is_empty());
    // The shipped fixture, its tensors unchanged, its metadata naming a model.
    let bytes = std::fs::read(zoo.join("model.parity.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let named = |name: &str, hash: &str| {
        let p = tmp.path().join(format!("{name}.safetensors"));
        let made_for = serde_json::json!({"davi.name": name, "davi.config_hash": hash});
        let meta = [("davi.parity_for".to_string(), made_for.to_string())].into();
        std::fs::write(
            &p,
            safetensors::serialize(st.tensors(), Some(meta)).unwrap(),
        )
        .unwrap();
        p
    };
    let verify = |p: &Path| {
        davi(&[
            "verify",
            "-m",
            model.to_str().unwrap(),
            "--parity",
            p.to_str().unwrap(),
        ])
    };
    let (code, out, err) = verify(&named(&info.name, &info.config_hash));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("PASS"), "{out}");
    for (name, hash) in [
        ("fmnist32-deblur", info.config_hash.as_str()),
        (info.name.as_str(), "0123456789abcdef"),
    ] {
        let p = named(name, hash);
        let (code, out, err) = verify(&p);
        assert_eq!(code, 2, "{name} {hash}: {out}{err}");
        assert!(
            err.contains(p.to_str().unwrap())
                && err.contains("parity fixture of another model")
                && err.contains(&format!("made for '{name}' (config {hash})"))
                && err.contains(&format!("this model is '{}'", info.name)),
            "{err}"
        );
        assert!(!out.contains("PASS") && !out.contains("FAIL"), "{out}");
    }
}

#[test]
fn restore_checks_what_the_model_returns() {
    let tmp = tempfile::tempdir().unwrap();
    let io = [
        ("measurement", [None, Some(1), Some(32), Some(32)]),
        ("noise", [None, Some(1), Some(32), Some(32)]),
    ];
    let inp = tmp.path().join("in");
    write_images(&inp, 5, 32);
    // NaN: every file fails with the reason, nothing is written.
    let nan = toy_model(
        &tmp.path().join("nan"),
        &io,
        [None, Some(1), Some(32), Some(32)],
        "nan",
        32,
    );
    let out = tmp.path().join("out-nan");
    let (code, _, err) = restore(&nan, &inp, &out, &["--batch", "2", "--samples", "3"]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(counts(&err), (0, 5, 0, 5), "{err}");
    assert!(err.contains("NaN"), "{err}");
    assert!(tree(&out).is_empty(), "{:?}", tree(&out).keys());
    // 16x16 where the metadata says 32, the output's shape left open in the graph: the model's
    // fault, one message, exit 2, nothing written.
    let small = toy_model(
        &tmp.path().join("small"),
        &io,
        [None, Some(1), None, None],
        "halve",
        32,
    );
    let out = tmp.path().join("out-small");
    let (code, _, err) = restore(&small, &inp, &out, &[]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("[1, 1, 16, 16]") || err.contains("16, 16]"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(tree(&out).is_empty());
}

#[test]
fn model_faults_are_one_message_at_load() {
    let tmp = tempfile::tempdir().unwrap();
    let inp = tmp.path().join("in");
    write_images(&inp, 4, 32);
    let d = [None, Some(1), Some(32), Some(32)];
    let cases: Vec<(&str, PathBuf, &str)> = vec![
        (
            "renamed inputs",
            toy_model(
                &tmp.path().join("a"),
                &[("x", d), ("z", d)],
                d,
                "identity",
                32,
            ),
            "inputs",
        ),
        (
            "wrong channel count",
            toy_model(
                &tmp.path().join("b"),
                &[
                    ("measurement", d),
                    ("noise", [None, Some(3), Some(32), Some(32)]),
                ],
                [None, Some(3), Some(32), Some(32)],
                "identity",
                32,
            ),
            "'noise' has shape",
        ),
        (
            "image_size metadata against the graph",
            toy_model(
                &tmp.path().join("c"),
                &[("measurement", d), ("noise", d)],
                d,
                "identity",
                16,
            ),
            "davi.image_size 16",
        ),
    ];
    for (what, model, says) in cases {
        let (code, _, err) = restore(&model, &inp, &tmp.path().join("out"), &[]);
        assert_eq!(code, 2, "{what}: {err}");
        assert!(err.contains(says), "{what}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{what}: one message: {err}");
    }
    assert!(!tmp.path().join("out").exists() || tree(&tmp.path().join("out")).is_empty());
    // Noise levels in the metadata that are not numbers >= 0 are the model's fault, named as
    // its metadata, not as an option the user never gave.
    for (key, value) in [("davi.sigma_y", "NaN"), ("davi.h", "-1")] {
        let mut proto =
            davi_export::read_model(&random_model(&tmp.path().join("e"), "denoise")).unwrap();
        for p in proto.metadata_props.iter_mut().filter(|p| p.key == key) {
            p.value = value.into();
        }
        let model = tmp.path().join(format!("e/{key}.onnx"));
        std::fs::write(&model, davi_export::to_bytes(&proto)).unwrap();
        let out = tmp.path().join("out-md");
        let (code, _, err) = davi(&[
            "degrade",
            "-m",
            model.to_str().unwrap(),
            "-i",
            inp.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ]);
        assert_eq!(code, 2, "{key}: {err}");
        assert!(
            err.contains(&format!("'{key}' is '{value}'")) && !err.contains("--sigma-y"),
            "{key}: {err}"
        );
        let (code, _, err) = restore(&model, &inp, &out, &[]);
        assert_eq!(code, 2, "{key}: {err}");
        assert!(!out.exists(), "{key}: something was written");
    }
    // A fixed batch dimension is no fault: runs are padded to it, and the bytes are the same.
    let opts = davi_export::ExportOptions {
        static_batch: Some(3),
        ..Default::default()
    };
    let fixed = random_model_with(&tmp.path().join("fixed"), "sr", &opts);
    let dynamic = random_model(&tmp.path().join("dyn"), "sr");
    let sr_in = tmp.path().join("sr-in");
    write_images(&sr_in, 5, 8);
    let (a, b) = (tmp.path().join("o-fixed"), tmp.path().join("o-dyn"));
    let (code, _, err) = restore(&fixed, &sr_in, &a, &["--batch", "4"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(restore(&dynamic, &sr_in, &b, &[]).0, 0);
    assert_eq!(tree(&a), tree(&b));
}

#[test]
fn bad_numbers_and_empty_inputs_are_usage_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let clean = tmp.path().join("clean");
    write_images(&clean, 2, 32);
    for s in ["NaN", "inf", "-0.1"] {
        let (code, _, err) = davi(&[
            "degrade",
            "--task",
            "denoise",
            "-i",
            clean.to_str().unwrap(),
            "-o",
            tmp.path().join("deg").to_str().unwrap(),
            &format!("--sigma-y={s}"),
        ]);
        assert_eq!(code, 2, "--sigma-y {s}: {err}");
        assert!(err.contains("sigma-y"), "{err}");
    }
    assert!(!tmp.path().join("deg").exists());
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let (code, out, err) = davi(&[
        "eval",
        "--restored",
        empty.to_str().unwrap(),
        "--reference",
        clean.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(!out.contains("NaN"), "{out}");
    let model = tmp.path().join("empty.onnx");
    std::fs::write(&model, b"").unwrap();
    let (code, _, err) = davi(&["info", "-m", model.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
}

/// A PNG that declares `w` x `h` pixels and holds no pixel data: a decompression bomb's header.
fn png_header_only(path: &Path, w: u32, h: u32) {
    fn crc32(bytes: &[u8]) -> u32 {
        let mut c = !0u32;
        for &b in bytes {
            c ^= b as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xedb8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
        }
        !c
    }
    let chunk = |kind: &[u8], data: &[u8]| {
        let mut v = (data.len() as u32).to_be_bytes().to_vec();
        let mut body = kind.to_vec();
        body.extend_from_slice(data);
        v.extend_from_slice(&body);
        v.extend_from_slice(&crc32(&body).to_be_bytes());
        v
    };
    let mut ihdr = w.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 0, 0, 0, 0]); // 8-bit grey
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(chunk(b"IHDR", &ihdr));
    // One row's worth of zlib data: the rest never comes.
    png.extend(chunk(
        b"IDAT",
        &[0x78, 0x9c, 0x63, 0x00, 0x00, 0x00, 0x01, 0x00, 0x01],
    ));
    png.extend(chunk(b"IEND", &[]));
    std::fs::write(path, png).unwrap();
}

#[test]
fn limits_are_refused_with_a_message() {
    let tmp = tempfile::tempdir().unwrap();
    let model = random_model(&tmp.path().join("m"), "denoise");
    let inp = tmp.path().join("in");
    write_images(&inp, 1, 32);
    png_header_only(&inp.join("bomb.png"), 20000, 20000);
    let (code, _, err) = restore(&model, &inp, &tmp.path().join("out"), &[]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("bomb.png") && err.contains("--max-pixels") && err.contains("not decoded"),
        "{err}"
    );
    let (code, _, err) = restore(
        &model,
        &inp,
        &tmp.path().join("out2"),
        &["--max-pixels", "100"],
    );
    assert_eq!(code, 1, "{err}");
    assert_eq!(counts(&err), (0, 2, 0, 2), "{err}");
    // The limit bounds an output too: x4 super-resolution of a 40x40 image is 160x160 px.
    let sr = random_model(&tmp.path().join("sr"), "sr");
    let small = tmp.path().join("small");
    write_images(&small, 2, 8);
    let (code, _, err) = restore(&sr, &small, &tmp.path().join("o5"), &[]);
    assert_eq!(code, 0, "{err}");
    image::GrayImage::from_pixel(40, 40, image::Luma([90]))
        .save(small.join("big.png"))
        .unwrap();
    let (code, _, err) = restore(
        &sr,
        &small,
        &tmp.path().join("o6"),
        &["--max-pixels", "10000"],
    );
    assert_eq!(code, 1, "{err}");
    assert_eq!(counts(&err), (2, 3, 0, 1), "{err}");
    assert!(err.contains("big.png") && err.contains("160x160"), "{err}");
    // What the machine cannot hold.
    let (code, _, err) = restore(
        &model,
        &inp,
        &tmp.path().join("o3"),
        &["--threads", "100000"],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--threads"), "{err}");
    let (code, _, err) = davi(&[
        "bench",
        "-m",
        model.to_str().unwrap(),
        "--batch",
        "60000",
        "--seconds",
        "0.1",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("at most"), "{err}");
    let (code, _, err) = restore(
        &model,
        &inp,
        &tmp.path().join("o4"),
        &["--samples", "100000"],
    );
    assert_eq!(code, 2, "{err}");
}

#[test]
fn counts_add_up_and_every_odd_file_is_named_on_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let model = random_model(&tmp.path().join("m"), "denoise");
    let inp = tmp.path().join("in");
    write_images(&inp, 2, 32);
    std::os::unix::fs::symlink("/nonexistent/x.png", inp.join("broken.png")).unwrap();
    std::os::unix::fs::symlink("/etc", inp.join("outside")).unwrap();
    let fifo = inp.join("pipe.png");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let weird = inp.join("new\nline.png");
    std::fs::write(&weird, b"not a png").unwrap();
    let report = tmp.path().join("report.json");
    let (code, _, err) = restore(
        &model,
        &inp,
        &tmp.path().join("out"),
        &["--report", report.to_str().unwrap()],
    );
    assert_eq!(code, 1, "{err}");
    let (restored, found, skipped, failed) = counts(&err);
    assert_eq!(found, restored + skipped + failed, "{err}");
    assert_eq!((restored, failed), (2, 4), "{err}");
    assert!(err.contains("pipe.png") && err.contains("FIFO"), "{err}");
    assert!(err.contains("new\\nline.png"), "{err}");
    // One failure, one line.
    assert_eq!(
        err.lines().filter(|l| l.contains("failed:")).count(),
        4,
        "{err}"
    );
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(r["found"], 6);
    assert_eq!(r["failed"].as_array().unwrap().len(), 4);
}

/// Each failure is printed when it happens, not at the end: a run killed without a summary has
/// already said which files failed. A report that cannot be written (a full disk) loses neither
/// the failures nor the summary, and the exit code says the report failed.
#[test]
fn failures_are_printed_as_they_happen_and_survive_a_report_on_a_full_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let model = random_model(&tmp.path().join("m"), "denoise");
    let inp = tmp.path().join("in");
    write_images(&inp, 400, 32);
    // One failure of the listing (sorted first), one of the decoder (among the first hundred).
    std::fs::write(inp.join("000-empty.png"), b"").unwrap();
    std::fs::write(inp.join("img_050x.png"), b"not a png").unwrap();
    let out = tmp.path().join("out");
    let child = std::process::Command::new(bin("davi"))
        .args(["restore", "--batch", "1", "--threads", "1", "-m"])
        .arg(&model)
        .arg("-i")
        .arg(&inp)
        .arg("-o")
        .arg(&out)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    signal_after_outputs(&child, &out, 300, "-KILL");
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), None, "killed before its end: {err}");
    assert!(!err.contains(" of 402"), "no summary after a kill: {err}");
    let failed: Vec<&str> = err.lines().filter(|l| l.contains("failed:")).collect();
    assert_eq!(failed.len(), 2, "{err}");
    assert!(
        failed[0].contains("000-empty.png") && failed[0].contains("empty file"),
        "{err}"
    );
    assert!(
        failed[1].contains("img_050x.png") && failed[1].contains("cannot"),
        "{err}"
    );
    assert!(Path::new("/dev/full").exists(), "the test needs /dev/full");
    let (code, _, err) = restore(
        &model,
        &inp,
        &tmp.path().join("o2"),
        &["--report", "/dev/full"],
    );
    assert_eq!(code, 2, "{err}");
    assert_eq!(counts(&err), (400, 402, 0, 2), "{err}");
    assert_eq!(
        err.lines().filter(|l| l.contains("failed:")).count(),
        2,
        "{err}"
    );
    assert!(err.contains("/dev/full"), "{err}");
}

/// A file's shard follows its path alone: files added to the folder (sorting between the old
/// ones) move no old file to another shard, and the shards still cover every file once.
#[test]
fn files_added_later_move_no_other_file_between_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let model = random_model(&tmp.path().join("m"), "denoise");
    let inp = tmp.path().join("in");
    let src = write_images(&tmp.path().join("src"), 4, 32);
    let put = |name: &str, k: usize| {
        std::fs::copy(&src[k % src.len()], inp.join(name)).unwrap();
    };
    std::fs::create_dir_all(&inp).unwrap();
    for k in 0..12 {
        put(&format!("f{:02}.png", 2 * k), k);
    }
    let shard_files = |dir: &Path, i: usize| -> std::collections::BTreeSet<String> {
        let out = dir.join(format!("s{i}"));
        let (code, _, err) = restore(&model, &inp, &out, &["--shard", &format!("{i}/3")]);
        assert_eq!(code, 0, "{err}");
        tree(&out).into_keys().collect()
    };
    let before: Vec<_> = (0..3)
        .map(|i| shard_files(&tmp.path().join("a"), i))
        .collect();
    for k in 0..12 {
        put(&format!("f{:02}.png", 2 * k + 1), k);
    }
    let after: Vec<_> = (0..3)
        .map(|i| shard_files(&tmp.path().join("b"), i))
        .collect();
    let mut all = std::collections::BTreeSet::new();
    for i in 0..3 {
        assert!(before[i].is_subset(&after[i]), "shard {i} lost a file");
        for f in &after[i] {
            assert!(all.insert(f.clone()), "{f} in two shards");
            let k: usize = f[1..3].parse().unwrap();
            assert!(
                k % 2 == 1 || before[i].contains(f),
                "{f} moved into shard {i}"
            );
        }
    }
    assert_eq!(all.len(), 24);
}
