//! Helpers of the end-to-end tests (`tests/tests/*.rs`).

use std::path::PathBuf;

/// The workspace root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .expect("workspace root")
}

/// The fixture folder of the repository (`tests/fixtures`, see its README).
pub fn fixtures() -> PathBuf {
    root().join("tests/fixtures")
}

/// The guided-diffusion fixture's weights, brought in from its `torch.save` checkpoint by
/// `davi-train import` (the path a published checkpoint takes), once per test process.
pub fn fixture_weights() -> PathBuf {
    static ONCE: std::sync::OnceLock<(tempfile::TempDir, PathBuf)> = std::sync::OnceLock::new();
    let (_, p) = ONCE.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        let out = dir.path().join("adm_rgb32.safetensors");
        let fx = fixtures().join("guided-diffusion");
        let st = std::process::Command::new(bin("davi-train"))
            .arg("import")
            .arg(fx.join("adm_rgb32.pt"))
            .arg("--config")
            .arg(fx.join("adm_rgb32.config.json"))
            .arg("--output")
            .arg(&out)
            .status()
            .expect("davi-train import runs");
        assert!(st.success(), "davi-train import of the fixture failed");
        (dir, out)
    });
    p.clone()
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

/// Writes a small DAVI model with random weights (no training, no libtorch) for runtime tests:
/// a grey 32 px model of `task` (`deblur`, `sr`, `inpaint`, `denoise`) or an RGB `colorize` one.
pub fn random_model(dir: &std::path::Path, task: &str) -> PathBuf {
    random_model_with(dir, task, &Default::default())
}

/// [`random_model`] exported with `opts` (a static batch, fp16 weights, ...).
pub fn random_model_with(
    dir: &std::path::Path,
    task: &str,
    opts: &davi_export::ExportOptions,
) -> PathBuf {
    use davi_models::{card::TaskConfig, DaviConfig, Implicit, Operator, UNetConfig};
    use rand::{Rng, SeedableRng};
    let c = if task == "colorize" { 3 } else { 1 };
    let unet: UNetConfig = serde_yaml::from_str(&format!(
        "image_size: 32\nin_channels: {c}\nmodel_channels: 32\nout_channels: {c}\nnum_res_blocks: 1\n\
         attention_resolutions: [16]\nchannel_mult: [1, 2]\nnum_head_channels: 32\n\
         use_scale_shift_norm: true\nresblock_updown: true\n"
    ))
    .unwrap();
    let operator = Operator::for_task(task, 32).unwrap();
    let sigma_y = operator.default_sigma_y();
    let cfg = DaviConfig {
        name: format!("random-{task}"),
        unet,
        diffusion: Default::default(),
        task: Some(TaskConfig {
            operator,
            sigma_y,
            h: 0.1,
        }),
        data: None,
        train: None,
    };
    let implicit = Implicit::new(&cfg).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut weights = davi_export::Weights::default();
    for (name, shape) in implicit.unet.param_shapes() {
        let n: usize = shape.iter().product();
        let fan_in = if shape.len() > 1 {
            shape[1..].iter().product::<usize>()
        } else {
            1
        };
        let scale = if name.ends_with(".weight") && shape.len() == 1 {
            0.0
        } else {
            1.0 / (fan_in as f32).sqrt()
        };
        let base = if name.ends_with(".weight") && shape.len() == 1 {
            1.0
        } else {
            0.0
        };
        let v: Vec<f32> = (0..n)
            .map(|_| base + scale * (rng.random::<f32>() * 2.0 - 1.0))
            .collect();
        weights.tensors.insert(
            name.clone(),
            ndarray::ArrayD::from_shape_vec(shape.clone(), v).unwrap(),
        );
    }
    let md = vec![
        ("davi.task".to_string(), task.to_string()),
        (
            "davi.operator".into(),
            serde_json::to_string(&cfg.task.as_ref().unwrap().operator).unwrap(),
        ),
        ("davi.sigma_y".into(), sigma_y.to_string()),
        ("davi.h".into(), "0.1".into()),
        ("davi.image_size".into(), "32".into()),
        ("davi.channels".into(), c.to_string()),
        ("davi.config_hash".into(), cfg.hash()),
        ("davi.tool_version".into(), davi_export::TOOL_VERSION.into()),
    ];
    let proto = davi_export::export_implicit(&implicit, &weights, opts, &md).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("model.onnx");
    davi_export::write_model(proto, &path, false).unwrap();
    path
}

/// Writes `n` grey 32x32 PNG measurements with varied content as `dir/img_###.png`.
pub fn write_images(dir: &std::path::Path, n: usize, side: u32) -> Vec<PathBuf> {
    std::fs::create_dir_all(dir).unwrap();
    (0..n)
        .map(|i| {
            let img = image::GrayImage::from_fn(side, side, |x, y| {
                image::Luma([((x * 7 + y * 3 + i as u32 * 29) % 256) as u8])
            });
            let p = dir.join(format!("img_{i:03}.png"));
            img.save(&p).unwrap();
            p
        })
        .collect()
}

/// Runs `davi` with arguments; returns (exit code, stdout, stderr).
pub fn davi(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(bin("davi"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// A hand-made graph for the runtime's fault checks: inputs `(name, dims)` (`None`: dynamic),
/// output `image` with `out_dims`, computed as `op(noise-like input)`: `"identity"`,
/// `"nan"` (sqrt of a negative number) or `"halve"` (2x2 average pooling). Metadata of a grey
/// 32 px denoising model, with `image_size` as given.
pub fn toy_model(
    dir: &std::path::Path,
    inputs: &[(&str, [Option<i64>; 4])],
    out_dims: [Option<i64>; 4],
    op: &str,
    image_size: usize,
) -> PathBuf {
    use davi_export::proto::{
        data_type, AttributeProto, DimValue, GraphProto, ModelProto, NodeProto, OperatorSetIdProto,
        StringStringEntryProto, TensorProto, ValueInfoProto,
    };
    let value = |name: &str, dims: &[Option<i64>; 4]| {
        let mut v = ValueInfoProto::tensor(name, data_type::FLOAT, dims, "n");
        // Distinct names for the dynamic dims, so none is tied to another.
        let shape = v.r#type.as_mut().unwrap().tensor_type.as_mut().unwrap();
        for (k, d) in shape.shape.as_mut().unwrap().dim.iter_mut().enumerate() {
            if let Some(DimValue::DimParam(p)) = &mut d.value {
                *p = if k == 0 {
                    "n".into()
                } else {
                    format!("{name}_{k}")
                };
            }
        }
        v
    };
    let src = inputs.last().unwrap().0.to_string();
    let node = |op: &str, i: &[&str], o: &str, attribute: Vec<AttributeProto>| NodeProto {
        input: i.iter().map(|s| s.to_string()).collect(),
        output: vec![o.into()],
        name: o.into(),
        op_type: op.into(),
        attribute,
        ..Default::default()
    };
    let mut initializer = Vec::new();
    let nodes = match op {
        "identity" => vec![node("Identity", &[&src], "image", vec![])],
        "nan" => {
            initializer.push(TensorProto {
                dims: vec![],
                data_type: data_type::FLOAT,
                float_data: vec![1.0],
                name: "one".into(),
                ..Default::default()
            });
            vec![
                node("Abs", &[&src], "a", vec![]),
                node("Neg", &["a"], "b", vec![]),
                node("Sub", &["b", "one"], "c", vec![]),
                node("Sqrt", &["c"], "image", vec![]),
            ]
        }
        "halve" => vec![node(
            "AveragePool",
            &[&src],
            "image",
            vec![
                AttributeProto::ints("kernel_shape", &[2, 2]),
                AttributeProto::ints("strides", &[2, 2]),
            ],
        )],
        other => panic!("toy op {other}"),
    };
    let operator = davi_models::Operator::for_task("denoise", 32).unwrap();
    let md = [
        ("davi.task", "denoise".to_string()),
        ("davi.operator", serde_json::to_string(&operator).unwrap()),
        ("davi.sigma_y", "0.2".into()),
        ("davi.h", "0.1".into()),
        ("davi.image_size", image_size.to_string()),
        ("davi.channels", "1".into()),
    ];
    let model = ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: 17,
        }],
        producer_name: "toy".into(),
        graph: Some(GraphProto {
            node: nodes,
            name: "toy".into(),
            initializer,
            input: inputs.iter().map(|(n, d)| value(n, d)).collect(),
            output: vec![value("image", &out_dims)],
            ..Default::default()
        }),
        metadata_props: md
            .iter()
            .map(|(k, v)| StringStringEntryProto {
                key: k.to_string(),
                value: v.clone(),
            })
            .collect(),
        ..Default::default()
    };
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("model.onnx");
    davi_export::write_model(model, &path, false).unwrap();
    path
}

/// Every file under `dir`, sorted, hidden files included (symlinked folders not entered).
pub fn walk(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() && !p.is_symlink() {
                v.extend(walk(&p));
            } else {
                v.push(p);
            }
        }
    }
    v.sort();
    v
}

/// Every file under `dir`: relative path (lossy text) -> bytes.
pub fn tree(dir: &std::path::Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    walk(dir)
        .into_iter()
        .map(|e| {
            let bytes = std::fs::read(&e).unwrap();
            (
                e.strip_prefix(dir).unwrap().to_string_lossy().to_string(),
                bytes,
            )
        })
        .collect()
}

/// `davi restore -m model -i inp -o out` plus `extra`: (exit code, stdout, stderr).
pub fn restore(
    model: &std::path::Path,
    inp: &std::path::Path,
    out: &std::path::Path,
    extra: &[&str],
) -> (i32, String, String) {
    let mut args = vec![
        "restore".to_string(),
        "-m".into(),
        model.display().to_string(),
        "-i".into(),
        inp.display().to_string(),
        "-o".into(),
        out.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    davi(&a)
}
