//! `scripts/gpu/pieces.py`: files cut into pieces for the GPU machine come back identical, and a
//! missing or damaged piece is refused by name.

use davi_tests::root;
use rand::{RngCore, SeedableRng};
use std::path::Path;
use std::process::{Command, Output};

fn pieces(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    let mut c = Command::new("python3");
    c.arg(root().join("scripts/gpu/pieces.py"));
    for a in args {
        c.arg(a);
    }
    c.output().unwrap()
}

/// Two files: 3 MB of random bytes (incompressible: several parts) and a small executable one.
fn inputs(dir: &Path) -> Vec<std::path::PathBuf> {
    std::fs::create_dir_all(dir).unwrap();
    let mut big = vec![0u8; 3 << 20];
    rand_chacha::ChaCha8Rng::seed_from_u64(7).fill_bytes(&mut big);
    let a = dir.join("libbig.so");
    std::fs::write(&a, &big).unwrap();
    let b = dir.join("tool");
    std::fs::write(&b, b"#!/bin/sh\necho hi\n".repeat(100)).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&b, std::fs::Permissions::from_mode(0o755)).unwrap();
    vec![a, b]
}

fn split(tmp: &Path) -> (Vec<std::path::PathBuf>, std::path::PathBuf) {
    let files = inputs(&tmp.join("files"));
    let stage = tmp.join("stage");
    let out = pieces(&[
        &"split",
        &"--max-mib",
        &"1.5",
        &"--out",
        &stage,
        &files[0],
        &files[1],
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (files, stage)
}

#[test]
fn pieces_round_trip_and_each_fits_its_budget() {
    let tmp = tempfile::tempdir().unwrap();
    let (files, stage) = split(tmp.path());
    let mut n = 0;
    for d in std::fs::read_dir(&stage).unwrap() {
        let d = d.unwrap().path();
        let size: u64 = std::fs::read_dir(&d)
            .unwrap()
            .map(|f| f.unwrap().metadata().unwrap().len())
            .sum();
        assert!(
            size <= (1.5 * 1048576.0) as u64 + 16384,
            "{}: {size}",
            d.display()
        );
        n += 1;
    }
    assert!(
        n >= 3,
        "3 MB of random bytes in 1.5 MiB pieces gave {n} pieces"
    );
    let dest = tmp.path().join("dest");
    let out = pieces(&[&"join", &stage, &dest]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in &files {
        let back = dest.join(f.file_name().unwrap());
        assert_eq!(std::fs::read(f).unwrap(), std::fs::read(&back).unwrap());
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(f).unwrap().permissions().mode() & 0o777,
            std::fs::metadata(&back).unwrap().permissions().mode() & 0o777
        );
    }
    // Nothing temporary is left beside the results.
    let left: Vec<_> = std::fs::read_dir(&dest)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.contains("tmp"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn a_damaged_or_missing_piece_is_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let (files, stage) = split(tmp.path());
    // Flip one byte of one part.
    let part = std::fs::read_dir(stage.join("01"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().contains(".part"))
        .unwrap();
    let mut bytes = std::fs::read(&part).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&part, &bytes).unwrap();
    let dest = tmp.path().join("dest");
    let out = pieces(&[&"join", &stage, &dest]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("damaged") && err.contains(&*part.file_name().unwrap().to_string_lossy()),
        "{err}"
    );
    let big = dest.join(files[0].file_name().unwrap());
    assert!(!big.exists(), "a file was written from a damaged piece");
    // A piece that never arrived.
    std::fs::remove_dir_all(stage.join("01")).unwrap();
    let out = pieces(&[&"join", &stage, &dest]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("missing piece folders 01"), "{err}");
}
