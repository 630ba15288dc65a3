//! The recording backend's ONNX graphs run in ONNX Runtime and compute what the reference does.

use davi_export::{export_operator, export_unet, write_model, ExportOptions, Weights};
use davi_models::{Operator, UNetConfig, UNetModel};
use davi_runtime::model::{session, ModelSource, SessionOptions};
use davi_tests::{fixture_weights, fixtures};
use ndarray::{ArrayD, IxDyn};
use ort::value::TensorRef;

fn fixture() -> (UNetModel, Weights, Weights) {
    let dir = fixtures().join("guided-diffusion");
    let cfg = UNetConfig::from_file(&dir.join("adm_rgb32.config.json")).unwrap();
    let unet = UNetModel::new(&cfg).unwrap();
    let w = Weights::load(&fixture_weights()).unwrap();
    let io = Weights::load(&dir.join("adm_rgb32.io.safetensors")).unwrap();
    (unet, w, io)
}

fn run(bytes: &[u8], input: &str, x: &ArrayD<f32>, output: &str) -> ArrayD<f32> {
    let mut s = session(
        ModelSource::Bytes(bytes, "test"),
        &SessionOptions::default(),
    )
    .unwrap();
    let t = TensorRef::from_array_view(x.view()).unwrap();
    let out = s.run(ort::inputs![input => t]).unwrap();
    out[output].try_extract_array::<f32>().unwrap().to_owned()
}

fn max_abs(a: &ArrayD<f32>, b: &ArrayD<f32>) -> f32 {
    assert_eq!(a.shape(), b.shape());
    a.iter()
        .zip(b.iter())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn fixture_unet_in_onnx_runtime_matches_reference() {
    let (unet, w, io) = fixture();
    let ts: Vec<f32> = io.tensors["timesteps"].iter().copied().collect();
    let proto = export_unet(
        &unet,
        &w,
        &ts,
        &ExportOptions {
            static_batch: Some(2),
            ..Default::default()
        },
    )
    .unwrap();
    let bytes = davi_export::to_bytes(&proto);
    let out = run(&bytes, "x", &io.tensors["x"], "output");
    let d = max_abs(&out, &io.tensors["output"]);
    assert!(d <= 1e-4, "max |diff| {d}");
    // Every initializer carries a checkpoint name or is a constant the model code made.
    let g = proto.graph.unwrap();
    for t in &g.initializer {
        assert!(
            w.tensors.contains_key(&t.name) || t.name.starts_with("const"),
            "{}",
            t.name
        );
    }
}

#[test]
fn external_data_model_loads_and_matches() {
    let (unet, w, io) = fixture();
    let ts: Vec<f32> = io.tensors["timesteps"].iter().copied().collect();
    let proto = export_unet(
        &unet,
        &w,
        &ts,
        &ExportOptions {
            static_batch: Some(2),
            ..Default::default()
        },
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.onnx");
    write_model(proto, &path, true).unwrap();
    let data = dir.path().join("model.onnx.data");
    assert!(data.is_file());
    let (model_len, data_len) = (
        std::fs::metadata(&path).unwrap().len(),
        std::fs::metadata(&data).unwrap().len(),
    );
    // Tensors under 1 KiB stay inline (as onnx's own writer does); the bulk moves out.
    assert!(
        data_len > 8 * model_len,
        "model {model_len} B, data {data_len} B"
    );
    let mut s = session(ModelSource::File(&path), &SessionOptions::default()).unwrap();
    let t = TensorRef::from_array_view(io.tensors["x"].view()).unwrap();
    let out = s.run(ort::inputs!["x" => t]).unwrap();
    let out = out["output"].try_extract_array::<f32>().unwrap().to_owned();
    assert!(max_abs(&out, &io.tensors["output"]) <= 1e-4);
    // The weights read back from the model and its external data are the checkpoint's.
    let back = Weights::load(&path).unwrap();
    assert_eq!(back.tensors.len(), w.tensors.len());
    for (k, v) in &w.tensors {
        assert_eq!(&back.tensors[k], v, "{k}");
    }
}

#[test]
fn half_weights_are_stored_in_fp16_and_computed_in_f32() {
    let (unet, w, io) = fixture();
    let ts: Vec<f32> = io.tensors["timesteps"].iter().copied().collect();
    let export = |half_weights, w: &Weights| {
        let opts = ExportOptions {
            static_batch: Some(2),
            half_weights,
            ..Default::default()
        };
        davi_export::to_bytes(&export_unet(&unet, w, &ts, &opts).unwrap())
    };
    let full = export(false, &w);
    let half = export(true, &w);
    assert!(
        (half.len() as f64) < 0.55 * full.len() as f64,
        "{} vs {} bytes",
        half.len(),
        full.len()
    );
    let x = &io.tensors["x"];
    let out_half = run(&half, "x", x, "output");
    // Exactly what the f32 graph computes from the rounded weights.
    let rounded = w.clone().round_to_half();
    let out_rounded = run(&export(false, &rounded), "x", x, "output");
    assert!(max_abs(&out_half, &out_rounded) <= 1e-5);
    assert!(max_abs(&out_half, &io.tensors["output"]) <= 5e-2);
    // Reading the half model gives the rounded weights, and re-exporting them the same bytes.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("half.onnx");
    std::fs::write(&p, &half).unwrap();
    let back = Weights::load(&p).unwrap();
    for (k, v) in &rounded.tensors {
        assert_eq!(&back.tensors[k], v, "{k}");
    }
    assert!(export(true, &back) == half, "a re-export changed the bytes");
}

#[test]
fn fp16_export_stays_close() {
    let (unet, w, io) = fixture();
    let ts: Vec<f32> = io.tensors["timesteps"].iter().copied().collect();
    let proto = export_unet(
        &unet,
        &w,
        &ts,
        &ExportOptions {
            static_batch: Some(2),
            fp16: true,
            ..Default::default()
        },
    )
    .unwrap();
    let bytes = davi_export::to_bytes(&proto);
    let out = run(&bytes, "x", &io.tensors["x"], "output");
    let want = &io.tensors["output"];
    let mse: f32 = out
        .iter()
        .zip(want.iter())
        .map(|(a, b)| (a - b).powi(2))
        .sum::<f32>()
        / out.len() as f32;
    let peak = want.iter().fold(0f32, |m, v| m.max(v.abs())) * 2.0;
    let psnr = 10.0 * (peak * peak / mse).log10();
    assert!(psnr > 40.0, "fp16 PSNR {psnr}");
}

#[test]
fn operators_in_onnx_match_direct_computation() {
    let s = 8;
    let x = ArrayD::from_shape_fn(IxDyn(&[2, 3, s, s]), |ix| {
        ((ix[0] * 7 + ix[1] * 3 + ix[2] * 5 + ix[3]) % 11) as f32 / 5.5 - 1.0
    });
    // SR x2: average pooling.
    let op = Operator::SuperRes { scale: 2 };
    let y = run(
        &davi_export::to_bytes(&export_operator(&op, 3, s).unwrap()),
        "image",
        &x,
        "measurement",
    );
    assert_eq!(y.shape(), &[2, 3, 4, 4]);
    let want = (x[[1, 2, 2, 4]] + x[[1, 2, 2, 5]] + x[[1, 2, 3, 4]] + x[[1, 2, 3, 5]]) / 4.0;
    assert!((y[[1, 2, 1, 2]] - want).abs() < 1e-6);
    // Colorization: channel mean.
    let y = run(
        &davi_export::to_bytes(&export_operator(&Operator::Colorize, 3, s).unwrap()),
        "image",
        &x,
        "measurement",
    );
    assert_eq!(y.shape(), &[2, 1, s, s]);
    let want = (x[[0, 0, 3, 3]] + x[[0, 1, 3, 3]] + x[[0, 2, 3, 3]]) / 3.0;
    assert!((y[[0, 0, 3, 3]] - want).abs() < 1e-6);
    // Inpainting: the centred box is zeroed, the rest kept.
    let op = Operator::Inpaint { box_size: 4 };
    let y = run(
        &davi_export::to_bytes(&export_operator(&op, 3, s).unwrap()),
        "image",
        &x,
        "measurement",
    );
    assert_eq!(y[[0, 1, 3, 3]], 0.0);
    assert_eq!(y[[0, 1, 1, 3]], x[[0, 1, 1, 3]]);
    // Deblur: a centre pixel is the kernel-weighted sum of its neighbourhood.
    let op = Operator::Deblur {
        kernel_size: 3,
        sigma: 1.0,
    };
    let y = run(
        &davi_export::to_bytes(&export_operator(&op, 3, s).unwrap()),
        "image",
        &x,
        "measurement",
    );
    let k = Operator::gaussian_kernel(3, 1.0);
    let mut want = 0.0;
    for a in 0..3 {
        for b in 0..3 {
            want += k[a * 3 + b] * x[[1, 0, 3 + a - 1, 4 + b - 1]];
        }
    }
    assert!((y[[1, 0, 3, 4]] - want).abs() < 1e-5);
}

/// The PyPI `onnx` checker (full check, with shape inference) over exported files.
#[test]
fn exported_models_pass_the_onnx_checker() {
    let py = std::env::var_os("DAVI_ONNX_PYTHON")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| davi_tests::root().join(".deps/test-venv/bin/python"));
    assert!(
        py.is_file(),
        "{} missing: run `make test-venv` (the PyPI onnx package)",
        py.display()
    );
    let tmp = tempfile::tempdir().unwrap();
    let mut paths = Vec::new();
    for task in ["deblur", "sr", "inpaint", "colorize", "denoise"] {
        paths.push(davi_tests::random_model(&tmp.path().join(task), task));
    }
    let (unet, w, _) = fixture();
    let proto = export_unet(
        &unet,
        &w,
        &[999.0, 17.0],
        &ExportOptions {
            static_batch: Some(2),
            ..Default::default()
        },
    )
    .unwrap();
    let p = tmp.path().join("unet.onnx");
    write_model(proto, &p, false).unwrap();
    paths.push(p);
    for p in paths {
        let out = std::process::Command::new(&py)
            .args(["-c", "import onnx, sys; m = onnx.load(sys.argv[1]); onnx.checker.check_model(m, full_check=True); print('ok', m.opset_import[0].version)"])
            .arg(&p)
            .output()
            .unwrap();
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).starts_with("ok"),
            "{}: {}",
            p.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// What the TensorRT 10 ONNX parser takes (onnx-tensorrt `docs/operators.md`, support matrix and
/// restrictions): every exported graph (each task, and the shipped models) stays inside it, so
/// GroupNorm is decomposed rather than written as `GroupNormalization`.
#[test]
fn exported_graphs_use_only_what_the_tensorrt_10_parser_takes() {
    const SUPPORTED: &[&str] = &[
        "Add",
        "AveragePool",
        "Cast",
        "Concat",
        "Conv",
        "Div",
        "Gemm",
        "Identity",
        "InstanceNormalization",
        "MatMul",
        "Mul",
        "Pad",
        "Reshape",
        "Resize",
        "Shape",
        "Sigmoid",
        "Slice",
        "Softmax",
        "Sqrt",
        "Sub",
        "Tanh",
        "Transpose",
        "Unsqueeze",
        "Squeeze",
        "Gather",
        "Expand",
        "Clip",
        "ReduceMean",
    ];
    let tmp = tempfile::tempdir().unwrap();
    let mut paths = Vec::new();
    for task in ["deblur", "sr", "inpaint", "colorize", "denoise"] {
        paths.push(davi_tests::random_model(&tmp.path().join(task), task));
    }
    for entry in std::fs::read_dir(davi_tests::root().join("models/zoo")).unwrap() {
        let p = entry.unwrap().path().join("model.onnx");
        if p.is_file() {
            paths.push(p);
        }
    }
    assert!(paths.len() >= 9, "the shipped models were not found");
    for p in paths {
        let m = davi_export::read_model(&p).unwrap();
        let opset = m.opset_import[0].version;
        assert!((9..=20).contains(&opset), "{}: opset {opset}", p.display());
        let g = m.graph.as_ref().unwrap();
        let init: std::collections::HashSet<&str> =
            g.initializer.iter().map(|t| t.name.as_str()).collect();
        // Weights stored in fp16 reach their op through one Cast of the initializer, a
        // constant expression that the parsers fold.
        let cast_of_init: std::collections::HashSet<&str> = g
            .node
            .iter()
            .filter(|n| n.op_type == "Cast" && init.contains(n.input[0].as_str()))
            .map(|n| n.output[0].as_str())
            .collect();
        let must_be_init = |n: &davi_export::proto::NodeProto, i: usize| {
            if let Some(name) = n.input.get(i).filter(|s| !s.is_empty()) {
                assert!(
                    init.contains(name.as_str()) || cast_of_init.contains(name.as_str()),
                    "{}: {} input {i} '{name}' is not an initializer",
                    p.display(),
                    n.name
                );
            }
        };
        for n in &g.node {
            assert!(
                SUPPORTED.contains(&n.op_type.as_str()),
                "{}: {} is not in the TensorRT 10 parser's list",
                p.display(),
                n.op_type
            );
            let attr = |k: &str| {
                n.attribute
                    .iter()
                    .find(|a| a.name == k)
                    .map(|a| String::from_utf8_lossy(&a.s).to_string())
            };
            match n.op_type.as_str() {
                "Conv" => must_be_init(n, 1),
                "InstanceNormalization" => {
                    must_be_init(n, 1);
                    must_be_init(n, 2);
                }
                "Slice" => must_be_init(n, 3),
                "Resize" => {
                    let mode = attr("mode").unwrap_or_else(|| "nearest".into());
                    assert!(
                        ["nearest", "linear"].contains(&mode.as_str()),
                        "{}: Resize mode {mode}",
                        n.name
                    );
                    let ctm = attr("coordinate_transformation_mode")
                        .unwrap_or_else(|| "half_pixel".into());
                    assert!(
                        [
                            "half_pixel",
                            "pytorch_half_pixel",
                            "tf_half_pixel_for_nn",
                            "asymmetric",
                            "align_corners"
                        ]
                        .contains(&ctm.as_str()),
                        "{}: Resize coordinate_transformation_mode {ctm}",
                        n.name
                    );
                    let nm = attr("nearest_mode").unwrap_or_else(|| "round_prefer_floor".into());
                    assert!(
                        ["floor", "ceil", "round_prefer_floor", "round_prefer_ceil"]
                            .contains(&nm.as_str()),
                        "{}: Resize nearest_mode {nm}",
                        n.name
                    );
                }
                _ => {}
            }
        }
    }
}
