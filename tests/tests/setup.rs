//! `scripts/setup` installs only the files pinned in `scripts/lock/`: a changed wheel is refused.

use davi_tests::root;
use std::process::Command;

#[test]
fn a_wheel_that_differs_from_its_pinned_sha256_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    // A "registry" that serves a tampered file under the pinned name.
    let links = tmp.path().join("links");
    std::fs::create_dir(&links).unwrap();
    std::fs::write(
        links.join("onnxruntime-1.31.1-cp311-cp311-manylinux_2_28_x86_64.whl"),
        b"not the pinned wheel",
    )
    .unwrap();
    let deps = tmp.path().join("deps");
    let out = Command::new(root().join("scripts/setup"))
        .arg("--runtime-only")
        .env("DAVI_DEPS", &deps)
        .env("PIP_NO_INDEX", "1")
        .env("PIP_FIND_LINKS", &links)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "setup accepted a tampered wheel");
    assert!(
        err.contains("refused") && err.contains("scripts/lock/onnxruntime.txt"),
        "{err}"
    );
    assert!(
        !deps.join("onnxruntime/libonnxruntime.so.1.31.1").exists(),
        "something was installed"
    );
}

#[test]
fn every_lock_entry_is_pinned_by_version_and_sha256() {
    let dir = root().join("scripts/lock");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let path = e.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        if path.file_name().unwrap() == "debian.txt" {
            // Debian packages: `name version sha256-of-the-.deb`.
            for line in text
                .lines()
                .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            {
                let w: Vec<&str> = line.split_whitespace().collect();
                assert_eq!(w.len(), 3, "{line}");
                assert!(
                    w[2].len() == 64 && w[2].bytes().all(|b| b.is_ascii_hexdigit()),
                    "{line}"
                );
                n += 1;
            }
            continue;
        }
        // Requirement lines (continuations folded): `name==version --hash=sha256:<64 hex>`.
        let folded = text.replace("\\\n", " ");
        for line in folded.lines().filter(|l| !l.trim_start().starts_with('#')) {
            if line.trim().is_empty() {
                continue;
            }
            n += 1;
            let req = line.split_whitespace().next().unwrap();
            assert!(req.contains("==") && !req.contains('*'), "unpinned: {line}");
            let hashes: Vec<&str> = line
                .split_whitespace()
                .filter_map(|w| w.strip_prefix("--hash=sha256:"))
                .collect();
            assert!(!hashes.is_empty(), "no sha256: {line}");
            for h in hashes {
                assert!(
                    h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()),
                    "{h}"
                );
            }
        }
    }
    assert!(n >= 5, "only {n} pinned requirements");
}
