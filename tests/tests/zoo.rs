//! The shipped models: weights stored once (inside `model.onnx`, fp16), and a re-export from that
//! file gives the same bytes.

use davi_tests::{bin, root};
use std::process::Command;

/// The task models of the zoo (folders with a `model.onnx`).
fn zoo_models() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(root().join("models/zoo"))
        .unwrap()
        .filter_map(|e| {
            let p = e.unwrap().path();
            p.join("model.onnx")
                .is_file()
                .then(|| p.file_name().unwrap().to_string_lossy().to_string())
        })
        .collect();
    v.sort();
    v
}

#[test]
fn zoo_models_hold_their_weights_once_in_fp16() {
    let models = zoo_models();
    assert!(models.len() >= 5, "{models:?}");
    for name in models {
        let dir = root().join("models/zoo").join(&name);
        assert!(
            !dir.join("ema.safetensors").exists(),
            "{name}: a second copy of the weights"
        );
        let m = davi_export::read_model(&dir.join("model.onnx")).unwrap();
        let g = m.graph.unwrap();
        let weights: Vec<_> = g
            .initializer
            .iter()
            .filter(|t| !davi_export::recorder::is_constant_name(&t.name))
            .collect();
        assert!(weights.len() > 100, "{name}: {} weights", weights.len());
        for t in weights {
            assert_eq!(
                t.data_type,
                davi_export::proto::data_type::FLOAT16,
                "{name}: {} is not fp16",
                t.name
            );
            assert!(t.name.contains('.'), "{name}: {}", t.name);
        }
    }
}

#[test]
fn re_export_from_a_zoo_model_is_byte_identical() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["fmnist32-sr4", "photo32-colorize"] {
        let zoo = root().join("models/zoo").join(name);
        let out = tmp.path().join(name).join("model.onnx");
        let st = Command::new(bin("davi-train"))
            .current_dir(root())
            .args(["export", "--half-weights", "--checkpoint"])
            .arg(zoo.join("model.onnx"))
            .arg("--config")
            .arg(root().join(format!("models/configs/{name}.yaml")))
            .arg("-o")
            .arg(&out)
            .output()
            .unwrap();
        assert!(
            st.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&st.stderr)
        );
        for f in ["model.onnx", "model.parity.safetensors"] {
            let a = std::fs::read(zoo.join(f)).unwrap();
            let b = std::fs::read(out.with_file_name(f)).unwrap();
            assert!(a == b, "{name}/{f}: the re-export differs");
        }
    }
}

/// `davi cards` prints one table from every task model's card (the README's table), skips the
/// priors' cards when searching a folder, and names a file that is not a task card.
#[test]
fn cards_table_covers_every_task_model() {
    let zoo = root().join("models/zoo");
    let (code, out, err) = davi_tests::davi(&["cards", zoo.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    for name in zoo_models() {
        assert!(
            out.contains(&format!("| {name} | **DAVI** |")),
            "{name} missing:\n{out}"
        );
    }
    assert!(!out.contains("fmnist32-prior"), "{out}");
    // A card named twice, directly and through its folder, is printed once.
    let sr4 = zoo.join("fmnist32-sr4/card.yaml");
    let sr4_again = zoo.join("fmnist32-sr4/../fmnist32-sr4/card.yaml");
    let (code, once, err) = davi_tests::davi(&["cards", sr4.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let (code, twice, err) =
        davi_tests::davi(&["cards", sr4.to_str().unwrap(), sr4_again.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(once, twice);
    assert_eq!(
        out.matches("| fmnist32-sr4 | **DAVI** |").count(),
        1,
        "{out}"
    );
    let prior = zoo.join("fmnist32-prior/card.yaml");
    let (code, _, err) = davi_tests::davi(&["cards", prior.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(
        err.contains("fmnist32-prior/card.yaml") && err.contains("not a model card"),
        "{err}"
    );
    // A broken card in a searched folder is an error naming it, not skipped.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tmp.path().join("m")).unwrap();
    std::fs::write(tmp.path().join("m/card.yaml"), "name: [unclosed\n").unwrap();
    let (code, _, err) = davi_tests::davi(&["cards", tmp.path().to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(
        err.contains("m/card.yaml") && err.contains("not YAML"),
        "{err}"
    );
}
