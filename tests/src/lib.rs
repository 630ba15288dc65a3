//! Helpers of the end-to-end tests (`tests/tests/*.rs`).

use std::path::PathBuf;

/// The workspace root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .expect("workspace root")
}

/// The fixture folder: `DAVI_FIXTURES`, else `shared/fixtures` beside the checkout.
pub fn fixtures() -> PathBuf {
    if let Some(p) = std::env::var_os("DAVI_FIXTURES") {
        return PathBuf::from(p);
    }
    let p = root().join("../shared/fixtures");
    assert!(
        p.is_dir(),
        "fixtures not found at {} (set DAVI_FIXTURES)",
        p.display()
    );
    p
}

/// A release binary of the workspace (built by `make test` before the tests run).
pub fn bin(name: &str) -> PathBuf {
    let p = root().join("target/release").join(name);
    assert!(
        p.is_file(),
        "{} is not built (run `cargo build --release --workspace` first)",
        p.display()
    );
    p
}
