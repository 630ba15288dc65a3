//! Images of any size (at least the model's): tiles, blended without seams, deterministic.

use davi_tests::{random_model, restore, root, tree, write_images};
use std::path::Path;

/// A grey image of `w` x `h` with varied content.
fn grey(path: &Path, w: u32, h: u32, seed: u32) {
    image::GrayImage::from_fn(w, h, |x, y| {
        image::Luma([((x * 7 + y * 13 + seed * 31 + (x * y) % 17) % 256) as u8])
    })
    .save(path)
    .unwrap();
}

#[test]
fn an_image_of_the_model_size_is_restored_exactly_as_one_run() {
    use ndarray::Array4;
    let tmp = tempfile::tempdir().unwrap();
    let model = random_model(&tmp.path().join("m"), "denoise");
    let inp = tmp.path().join("in");
    write_images(&inp, 1, 32);
    let (code, _, err) = restore(&model, &inp, &tmp.path().join("out"), &["--seed", "5"]);
    assert_eq!(code, 0, "{err}");
    // The same through the bare session, with the bridge noise of (seed, path).
    let mut m =
        davi_runtime::Model::load(&model, &davi_runtime::SessionOptions::default()).unwrap();
    let meas = davi_runtime::images::load(&inp.join("img_000.png"), 1, None).unwrap();
    let z = davi_runtime::pipeline::noise(5, "bridge", Path::new("img_000.png"), 0, 1024);
    let out = m
        .restore(
            &meas.insert_axis(ndarray::Axis(0)).to_owned(),
            &Array4::from_shape_vec((1, 1, 32, 32), z).unwrap(),
        )
        .unwrap();
    let img = out.index_axis(ndarray::Axis(0), 0).to_owned();
    let img = img.into_dimensionality::<ndarray::Ix3>().unwrap();
    let bytes =
        davi_runtime::images::encode(img.view(), davi_runtime::images::Format::Png).unwrap();
    assert_eq!(
        std::fs::read(tmp.path().join("out/img_000.png")).unwrap(),
        bytes
    );
}

#[test]
fn tiled_outputs_have_the_input_size_and_do_not_depend_on_batch_or_shard() {
    let tmp = tempfile::tempdir().unwrap();
    let inp = tmp.path().join("in");
    std::fs::create_dir_all(&inp).unwrap();
    grey(&inp.join("a.png"), 32, 32, 1);
    grey(&inp.join("b.png"), 70, 45, 2);
    grey(&inp.join("c.png"), 100, 33, 3);
    let model = random_model(&tmp.path().join("m"), "denoise");
    let base = tmp.path().join("b16");
    let (code, _, err) = restore(&model, &inp, &base, &[]);
    assert_eq!(code, 0, "{err}");
    for (name, w, h) in [("a.png", 32, 32), ("b.png", 70, 45), ("c.png", 100, 33)] {
        let img = image::open(base.join(name)).unwrap();
        assert_eq!((img.width(), img.height()), (w, h), "{name}");
    }
    for batch in ["1", "5", "64"] {
        let out = tmp.path().join(format!("b{batch}"));
        let (code, _, err) = restore(&model, &inp, &out, &["--batch", batch]);
        assert_eq!(code, 0, "{err}");
        assert_eq!(tree(&out), tree(&base), "--batch {batch}");
    }
    let sharded = tmp.path().join("sharded");
    for shard in ["0/2", "1/2"] {
        assert_eq!(restore(&model, &inp, &sharded, &["--shard", shard]).0, 0);
    }
    assert_eq!(tree(&sharded), tree(&base));
    // Samples of tiled images too.
    let (code, _, err) = restore(&model, &inp, &tmp.path().join("k2"), &["--samples", "2"]);
    assert_eq!(code, 0, "{err}");
    let img = image::open(tmp.path().join("k2/b.std.png")).unwrap();
    assert_eq!((img.width(), img.height()), (70, 45));
}

#[test]
fn super_resolution_tiles_live_in_measurement_space() {
    let tmp = tempfile::tempdir().unwrap();
    let inp = tmp.path().join("in");
    std::fs::create_dir_all(&inp).unwrap();
    grey(&inp.join("small.png"), 20, 12, 4);
    let model = random_model(&tmp.path().join("m"), "sr");
    let out = tmp.path().join("out");
    let (code, _, err) = restore(&model, &inp, &out, &[]);
    assert_eq!(code, 0, "{err}");
    let img = image::open(out.join("small.png")).unwrap();
    assert_eq!((img.width(), img.height()), (80, 48));
}

#[test]
fn what_cannot_be_tiled_is_refused_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let inp = tmp.path().join("in");
    std::fs::create_dir_all(&inp).unwrap();
    grey(&inp.join("large.png"), 64, 48, 5);
    grey(&inp.join("tiny.png"), 20, 40, 6);
    let inpaint = random_model(&tmp.path().join("m"), "inpaint");
    let (code, _, err) = restore(&inpaint, &inp, &tmp.path().join("out"), &[]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("large.png") && err.contains("not local"),
        "{err}"
    );
    assert!(
        err.contains("tiny.png") && err.contains("smaller than"),
        "{err}"
    );
    // An output that the format cannot hold is refused before any tile runs.
    let wide = tmp.path().join("wide");
    std::fs::create_dir_all(&wide).unwrap();
    grey(&wide.join("w.png"), 17000, 32, 8);
    let denoise = random_model(&tmp.path().join("d"), "denoise");
    let t = std::time::Instant::now();
    let (code, _, err) = restore(&denoise, &wide, &tmp.path().join("ow"), &["-f", "webp"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("at most 16383"), "{err}");
    assert!(t.elapsed().as_secs() < 20, "it ran the tiles first");
}

/// Mean |I[x] - I[x-1]| over the columns in `cols` (all rows, all channels).
fn column_gradient(img: &image::RgbImage, cols: &[u32]) -> f64 {
    let mut sum = 0.0;
    let mut n = 0usize;
    for &x in cols {
        for y in 0..img.height() {
            let (a, b) = (img.get_pixel(x, y), img.get_pixel(x - 1, y));
            for k in 0..3 {
                sum += (a[k] as f64 - b[k] as f64).abs();
                n += 1;
            }
        }
    }
    sum / n as f64
}

/// Every shipped photo model (`models/zoo/photo32-*` with a `model.onnx`) on a real photograph
/// (astronaut, 512x512, which no photo model trained on) measured by its own operator: the mean
/// absolute gradient across the tile edges of the default grid (in the output's pixels: 4x the
/// measurement's for SR) is within 10% of the same measure inside tiles.
#[test]
fn real_photographs_show_no_seams() {
    let photo = root().join(".deps/data/skimage/astronaut.png");
    assert!(
        photo.is_file(),
        "scripts/setup installs the scikit-image photos"
    );
    let mut models: Vec<_> = std::fs::read_dir(root().join("models/zoo"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("photo32-")
                && p.join("model.onnx").is_file()
        })
        .collect();
    models.sort();
    assert!(!models.is_empty(), "no photo model in models/zoo");
    for dir in models {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let model = dir.join("model.onnx");
        let tmp = tempfile::tempdir().unwrap();
        let (measured, out) = (tmp.path().join("measured"), tmp.path().join("out"));
        let (code, _, err) = davi_tests::davi(&[
            "degrade",
            "-m",
            model.to_str().unwrap(),
            "-i",
            photo.to_str().unwrap(),
            "-o",
            measured.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{name}: {err}");
        let y = image::open(measured.join("astronaut.png")).unwrap();
        let (code, _, err) = restore(&model, &measured, &out, &[]);
        assert_eq!(code, 0, "{name}: {err}");
        let img = image::open(out.join("astronaut.png")).unwrap().to_rgb8();
        assert_eq!((img.width(), img.height()), (512, 512), "{name}");
        // The default grid (tiles of the model's measurement size, overlapping by the runtime's
        // default fraction, rounded as `davi restore` rounds it), its tile edges in output
        // pixels, against the other columns (rows) on the measurement's pixel lattice (for SR
        // every edge sits on a multiple of 4; the columns between would compare unlike with like).
        let (ym, scale) = (y.width() as usize, 512 / y.width() as usize);
        let tile = 32 / scale;
        let overlap = ((tile as f64 * davi_runtime::pipeline::DEFAULT_OVERLAP).round() as usize)
            .min(tile - 1);
        let grid = davi_runtime::tiles::Grid::new((ym, ym), (tile, tile), overlap, scale).unwrap();
        for (axis, img) in [
            ("columns", img.clone()),
            ("rows", image::imageops::rotate90(&img)),
        ] {
            // Rotating by 90 degrees turns row y into column 511 - y: the edge between rows
            // e - 1 and e becomes the one between columns 511 - e and 512 - e.
            let mut edges: Vec<u32> = grid
                .origins
                .iter()
                .flat_map(|&(oy, ox)| {
                    let o = if axis == "columns" { ox } else { oy };
                    [(o * scale) as u32, ((o + tile) * scale) as u32]
                })
                .filter(|&x| x > 0 && x < 512)
                .map(|x| if axis == "columns" { x } else { 512 - x })
                .collect();
            edges.sort();
            edges.dedup();
            assert!(edges.len() > 10, "{name}: {} edges", edges.len());
            let lattice = |x: u32| if axis == "columns" { x } else { 512 - x };
            let inside: Vec<u32> = (1..512)
                .filter(|&x| !edges.contains(&x) && lattice(x) % scale as u32 == 0)
                .collect();
            let (at_edges, elsewhere) = (
                column_gradient(&img, &edges),
                column_gradient(&img, &inside),
            );
            assert!(
                (at_edges - elsewhere).abs() <= 0.10 * elsewhere,
                "{name}, {axis}: mean |gradient| across tile edges {at_edges:.3}, inside tiles {elsewhere:.3}"
            );
            eprintln!("{name}, {axis}: mean |gradient| across tile edges {at_edges:.3}, inside tiles {elsewhere:.3}");
        }
    }
}

#[test]
fn degrade_restore_and_eval_work_at_any_size() {
    use davi_tests::davi;
    let tmp = tempfile::tempdir().unwrap();
    let clean = tmp.path().join("clean");
    std::fs::create_dir_all(&clean).unwrap();
    grey(&clean.join("wide.png"), 56, 40, 7);
    let model = random_model(&tmp.path().join("m"), "sr");
    let (m, r) = (tmp.path().join("meas"), tmp.path().join("rest"));
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let (code, _, err) = davi(&["degrade", "-m", &s(&model), "-i", &s(&clean), "-o", &s(&m)]);
    assert_eq!(code, 0, "{err}");
    let y = image::open(m.join("wide.png")).unwrap();
    assert_eq!((y.width(), y.height()), (14, 10));
    assert_eq!(restore(&model, &m, &r, &[]).0, 0);
    let x = image::open(r.join("wide.png")).unwrap();
    assert_eq!((x.width(), x.height()), (56, 40));
    let (code, out, err) = davi(&["eval", "--restored", &s(&r), "--reference", &s(&clean)]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("| 1 |"), "{out}");
    assert!(!err.contains("no reference"), "{err}");
    // A restored image that no reference has is named on stderr, and not scored.
    std::fs::copy(r.join("wide.png"), r.join("stray.png")).unwrap();
    let (code, out, err) = davi(&["eval", "--restored", &s(&r), "--reference", &s(&clean)]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("| 1 |"), "{out}");
    assert!(
        err.contains("1 restored image(s) have no reference") && err.contains("stray.png"),
        "{err}"
    );
    std::fs::remove_file(r.join("stray.png")).unwrap();
    // --lift: the measurement brought back to the image's size (bicubic for SR), the baseline.
    let (m2, lift) = (tmp.path().join("meas2"), tmp.path().join("lift"));
    let (code, _, err) = davi(&[
        "degrade",
        "-m",
        &s(&model),
        "-i",
        &s(&clean),
        "-o",
        &s(&m2),
        "--lift",
        &s(&lift),
    ]);
    assert_eq!(code, 0, "{err}");
    let l = image::open(lift.join("wide.png")).unwrap().to_luma8();
    assert_eq!((l.width(), l.height()), (56, 40));
    // Upsampled: each 4x4 block's mean stays near its measurement pixel.
    let y = image::open(m2.join("wide.png")).unwrap().to_luma8();
    let block = |bx: u32, by: u32| {
        (0..16)
            .map(|i| l.get_pixel(bx * 4 + i % 4, by * 4 + i / 4).0[0] as f64)
            .sum::<f64>()
            / 16.0
    };
    assert!((block(5, 5) - y.get_pixel(5, 5).0[0] as f64).abs() < 24.0);
    // Rows of a card's whole_photos table, one per method.
    let card = tmp.path().join("card.yaml");
    std::fs::write(
        &card,
        "name: t\ntask: {operator: {task: sr, scale: 4}, sigma_y: 0.05, h: 0.1}\ndata: d\ntraining_steps: 1\ntraining_seconds: 1.0\nreviewed_by: someone\n",
    )
    .unwrap();
    for (dir, method) in [(&lift, "lifted"), (&r, "davi")] {
        let (code, out, err) = davi(&[
            "eval",
            "--restored",
            &s(dir),
            "--reference",
            &s(&clean),
            "--card",
            &s(&card),
            "--method",
            method,
        ]);
        assert_eq!(code, 0, "{err}");
        assert!(out.contains("| 1 |"), "{out}");
    }
    let c: davi_models::card::ModelCard =
        serde_yaml::from_str(&std::fs::read_to_string(&card).unwrap()).unwrap();
    let w = c.whole_photos.unwrap();
    assert_eq!(w.images, vec!["wide.png".to_string()]);
    assert_eq!(w.methods.keys().collect::<Vec<_>>(), ["davi", "lifted"]);
    assert!(w.methods["lifted"].psnr.is_finite() && w.methods["davi"].n == 1);
    // A key davi does not know stays in the card.
    assert!(
        std::fs::read_to_string(&card)
            .unwrap()
            .contains("reviewed_by: someone"),
        "the card lost a key"
    );
    let (code, _, err) = davi(&[
        "eval",
        "--restored",
        &s(&r),
        "--reference",
        &s(&clean),
        "--card",
        &s(&card),
    ]);
    assert_eq!(code, 2, "--card without --method: {err}");
    let (code, _, err) = davi(&[
        "eval",
        "--restored",
        &s(&r),
        "--reference",
        &s(&clean),
        "--card",
        &s(&card),
        "--method",
        "a b",
    ]);
    assert_eq!(code, 2, "a row name with a space: {err}");
    // Concurrent writers of one card each keep their row (the card's folder is locked).
    let handles: Vec<_> = (0..4)
        .map(|k| {
            let (r, clean, card) = (s(&r), s(&clean), s(&card));
            std::thread::spawn(move || {
                davi(&[
                    "eval",
                    "--restored",
                    &r,
                    "--reference",
                    &clean,
                    "--card",
                    &card,
                    "--method",
                    &format!("m{k}"),
                ])
            })
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap().0, 0);
    }
    let c: davi_models::card::ModelCard =
        serde_yaml::from_str(&std::fs::read_to_string(&card).unwrap()).unwrap();
    assert_eq!(
        c.whole_photos.unwrap().methods.len(),
        6,
        "a concurrent row was lost"
    );
    // An incomplete evaluation (a reference without its restored image) writes no row.
    grey(&clean.join("extra.png"), 40, 40, 3);
    let before = std::fs::read_to_string(&card).unwrap();
    let (code, _, _) = davi(&[
        "eval",
        "--restored",
        &s(&r),
        "--reference",
        &s(&clean),
        "--card",
        &s(&card),
        "--method",
        "partial",
    ]);
    assert_eq!(code, 1);
    assert_eq!(
        std::fs::read_to_string(&card).unwrap(),
        before,
        "a partial score reached the card"
    );
    std::fs::remove_file(clean.join("extra.png")).unwrap();
    // A lift folder inside the output (or the input) is refused before anything is written.
    let (code, _, err) = davi(&[
        "degrade",
        "-m",
        &s(&model),
        "-i",
        &s(&clean),
        "-o",
        &s(&m2),
        "--lift",
        &s(&m2.join("l")),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("refused") && !m2.join("l").exists(), "{err}");
    // --task scales the operator to the shorter side; inpainting stays square-only.
    let (code, _, err) = davi(&[
        "degrade",
        "--task",
        "inpaint",
        "-i",
        &s(&clean),
        "-o",
        &s(&tmp.path().join("ip")),
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("square"), "{err}");
}
