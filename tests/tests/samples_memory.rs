//! `--samples K` streams: memory follows `--batch`, not K. Alone in its test binary, so that the
//! process's peak resident size is this test's.

use davi_runtime::pipeline::{restore, RestoreOptions};
use davi_tests::{random_model, write_images};

/// Peak resident bytes of this process (VmHWM).
fn peak() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

#[test]
fn a_thousand_samples_take_the_memory_of_one_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let model_path = random_model(&tmp.path().join("m"), "denoise");
    let inp = tmp.path().join("in");
    write_images(&inp, 1, 32);
    let mut model =
        davi_runtime::Model::load(&model_path, &davi_runtime::SessionOptions::default()).unwrap();
    let opts = |k: usize, out: &str| RestoreOptions {
        input: inp.clone(),
        output: tmp.path().join(out),
        format: davi_runtime::images::Format::Png,
        batch: 8,
        seed: 0,
        skip_existing: false,
        shard: None,
        samples: k,
        follow_symlinks: false,
        progress: false,
        print_failures: false,
        max_pixels: davi_runtime::images::DEFAULT_MAX_PIXELS,
        overlap: davi_runtime::pipeline::DEFAULT_OVERLAP,
        stop: None,
    };
    // Warm up at the same batch, so the session's arena is already at its size.
    let r = restore(&mut model, &opts(16, "warm"), None).unwrap();
    assert_eq!(r.restored, 1);
    let before = peak();
    let r = restore(&mut model, &opts(1000, "k1000"), None).unwrap();
    assert_eq!(r.restored, 1, "{:?}", r.failed);
    let grew = peak().saturating_sub(before);
    let files = std::fs::read_dir(tmp.path().join("k1000")).unwrap().count();
    assert_eq!(files, 1002, "1000 samples, their std and mean");
    // Holding 1000 rows at once takes about 2 GB on this model; streaming, a few MB.
    assert!(
        grew < 200 << 20,
        "peak memory grew by {} MiB for 1000 samples",
        grew >> 20
    );
}
