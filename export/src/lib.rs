//! ONNX export of DAVI models from the same model code that trains them.
//!
//! [`Recorder`] implements `davi_models::Backend` by recording nodes; [`export_implicit`] runs
//! `Implicit::restore` on it and writes the graph of `docs/DESIGN.md` section 3: inputs
//! `measurement` and `noise`, output `image`, dynamic batch, weights under the checkpoint's names.
//! No libtorch here.

pub mod proto;
pub mod recorder;
pub mod weights;

use davi_models::{Implicit, UNetModel};
use prost::Message;
use proto::{
    data_type, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto,
    TensorProto, ValueInfoProto,
};
pub use recorder::{Recorder, Var};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
pub use weights::{Weights, WeightsError};

/// The version of this tool, written into every model.
pub const TOOL_VERSION: &str = concat!("davi ", env!("CARGO_PKG_VERSION"));

/// Above this many bytes of weights the model is written with external data (protobuf's 2 GB limit).
pub const EXTERNAL_DATA_THRESHOLD: usize = 1_800_000_000;

/// Errors of export.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The model code failed (a missing parameter, a bad config).
    #[error("model: {0}")]
    Model(#[from] davi_models::Error),
    /// Weights unreadable or not matching.
    #[error(transparent)]
    Weights(#[from] WeightsError),
    /// Writing or reading a file failed.
    #[error("{path}: {reason}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// Options that cannot be honoured.
    #[error("{0}")]
    Options(String),
}

/// How to write the graph.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// ONNX opset (17 or later).
    pub opset: i64,
    /// A fixed batch size instead of a dynamic one.
    pub static_batch: Option<usize>,
    /// Half-precision weights and compute (inputs and output stay f32).
    pub fp16: bool,
    /// Half-precision weights, f32 compute: each weight is stored as fp16 and cast to f32 once
    /// (ONNX Runtime folds the casts at load), which halves the file. The caller rounds the
    /// weights it computes parity with the same way ([`Weights::round_to_half`]).
    pub half_weights: bool,
}

impl Default for ExportOptions {
    fn default() -> Self {
        Self {
            opset: 17,
            static_batch: None,
            fp16: false,
            half_weights: false,
        }
    }
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> ExportError {
    ExportError::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

/// The edges of a recorded graph.
struct Edges<'a> {
    /// Graph inputs with their dims (`None`: the dynamic batch).
    inputs: Vec<(String, Vec<Option<i64>>)>,
    /// Cast nodes from the f32 inputs (fp16 graphs).
    cast_inputs: Vec<NodeProto>,
    /// Name of the graph output.
    output_name: &'a str,
    /// Its dims.
    output_dims: Vec<Option<i64>>,
}

/// Wraps recorded nodes into a model: casts at the edges for fp16, initializers for the used
/// weights, the output renamed to `edges.output_name`.
fn assemble(
    rec: Recorder<'_>,
    weights: &Weights,
    out: Var,
    edges: Edges<'_>,
    opts: &ExportOptions,
    metadata: &[(String, String)],
) -> Result<ModelProto, ExportError> {
    let Edges {
        inputs,
        cast_inputs,
        output_name,
        output_dims,
    } = edges;
    if opts.opset < 17 {
        return Err(ExportError::Options(format!(
            "opset {} is too old; 17 or later is needed",
            opts.opset
        )));
    }
    let fp16 = opts.fp16;
    let half_weights = rec.weights_are_half();
    let last = if fp16 {
        rec.node(
            "Cast",
            &[&out.0],
            vec![proto::AttributeProto::int("to", data_type::FLOAT as i64)],
        )
    } else {
        out
    };
    let rec_done = rec.finish();
    let mut nodes = cast_inputs;
    nodes.extend(rec_done.nodes);
    nodes.push(NodeProto {
        input: vec![last.0.clone()],
        output: vec![output_name.into()],
        name: format!("Identity/{output_name}"),
        op_type: "Identity".into(),
        ..Default::default()
    });
    let mut initializer: Vec<TensorProto> = rec_done
        .used_params
        .iter()
        .map(|name| {
            let t = &weights.tensors[name];
            let v: Vec<f32> = t.iter().copied().collect();
            recorder::float_tensor(name, t.shape(), &v, half_weights)
        })
        .collect();
    initializer.extend(rec_done.constants);
    let graph = GraphProto {
        node: nodes,
        name: "davi".into(),
        initializer,
        input: inputs
            .iter()
            .map(|(n, d)| ValueInfoProto::tensor(n, data_type::FLOAT, d, "batch"))
            .collect(),
        output: vec![ValueInfoProto::tensor(
            output_name,
            data_type::FLOAT,
            &output_dims,
            "batch",
        )],
        ..Default::default()
    };
    Ok(ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: opts.opset,
        }],
        producer_name: "davi-export".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        graph: Some(graph),
        metadata_props: metadata
            .iter()
            .map(|(k, v)| StringStringEntryProto {
                key: k.clone(),
                value: v.clone(),
            })
            .collect(),
        ..Default::default()
    })
}

fn input_casts(names: &[&str], fp16: bool) -> (Vec<Var>, Vec<NodeProto>) {
    if !fp16 {
        return (
            names.iter().map(|n| Var(n.to_string())).collect(),
            Vec::new(),
        );
    }
    let mut vars = Vec::new();
    let mut nodes = Vec::new();
    for n in names {
        let out = format!("{n}_f16");
        nodes.push(NodeProto {
            input: vec![n.to_string()],
            output: vec![out.clone()],
            name: format!("Cast/{out}"),
            op_type: "Cast".into(),
            attribute: vec![proto::AttributeProto::int("to", data_type::FLOAT16 as i64)],
            ..Default::default()
        });
        vars.push(Var(out));
    }
    (vars, nodes)
}

/// Exports `I_phi`'s one-step restoration: `measurement`, `noise` -> `image`.
pub fn export_implicit(
    model: &Implicit,
    weights: &Weights,
    opts: &ExportOptions,
    metadata: &[(String, String)],
) -> Result<ModelProto, ExportError> {
    weights.check(model.unet.param_shapes(), "checkpoint")?;
    let rec = Recorder::new(weights, opts.fp16).with_half_weights(opts.half_weights);
    let (vars, casts) = input_casts(&["measurement", "noise"], opts.fp16);
    let out = model.restore(&rec, &vars[0], &vars[1])?;
    let n = opts.static_batch.map(|b| b as i64);
    let (c, s) = (model.channels as i64, model.size as i64);
    let [cy, hy, wy] = model.operator.measurement_shape(model.channels, model.size);
    let inputs = vec![
        (
            "measurement".to_string(),
            vec![n, Some(cy as i64), Some(hy as i64), Some(wy as i64)],
        ),
        ("noise".to_string(), vec![n, Some(c), Some(s), Some(s)]),
    ];
    assemble(
        rec,
        weights,
        out,
        Edges {
            inputs,
            cast_inputs: casts,
            output_name: "image",
            output_dims: vec![n, Some(c), Some(s), Some(s)],
        },
        opts,
        metadata,
    )
}

/// Exports the bare UNet at fixed timesteps (one per sample, or one for all): `x` -> `output`.
/// Used to check any guided-diffusion config against the reference.
pub fn export_unet(
    unet: &UNetModel,
    weights: &Weights,
    timesteps: &[f32],
    opts: &ExportOptions,
) -> Result<ModelProto, ExportError> {
    weights.check(unet.param_shapes(), "checkpoint")?;
    let rec = Recorder::new(weights, opts.fp16).with_half_weights(opts.half_weights);
    let (vars, casts) = input_casts(&["x"], opts.fp16);
    let out = unet.forward(&rec, &vars[0], timesteps, None)?;
    let c = &unet.config;
    let n = opts.static_batch.map(|b| b as i64);
    let s = c.image_size as i64;
    let inputs = vec![(
        "x".to_string(),
        vec![n, Some(c.in_channels as i64), Some(s), Some(s)],
    )];
    let out_dims = vec![n, Some(c.out_channels as i64), Some(s), Some(s)];
    assemble(
        rec,
        weights,
        out,
        Edges {
            inputs,
            cast_inputs: casts,
            output_name: "output",
            output_dims: out_dims,
        },
        opts,
        &[],
    )
}

/// Bytes of initializer data in a model.
pub fn weight_bytes(model: &ModelProto) -> usize {
    model
        .graph
        .as_ref()
        .map_or(0, |g| g.initializer.iter().map(|t| t.raw_data.len()).sum())
}

/// Writes `model` to `path` atomically. With `external_data` (forced above
/// [`EXTERNAL_DATA_THRESHOLD`]) the weights go to `<file name>.data` beside it.
pub fn write_model(
    mut model: ModelProto,
    path: &Path,
    external_data: bool,
) -> Result<(), ExportError> {
    let external = external_data || weight_bytes(&model) > EXTERNAL_DATA_THRESHOLD;
    if external {
        let file_name = path
            .file_name()
            .ok_or_else(|| io_err(path, "not a file path"))?
            .to_string_lossy()
            .to_string();
        let data_name = format!("{file_name}.data");
        let data_path = path.with_file_name(&data_name);
        let tmp = data_path.with_extension("data.tmp");
        let mut f =
            std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(|e| io_err(&tmp, e))?);
        let mut offset = 0usize;
        if let Some(g) = model.graph.as_mut() {
            for t in g.initializer.iter_mut() {
                // Small tensors (shapes, scalars) stay inline.
                if t.raw_data.len() < 1024 {
                    continue;
                }
                let pad = (64 - offset % 64) % 64; // aligned for mmap
                f.write_all(&vec![0u8; pad]).map_err(|e| io_err(&tmp, e))?;
                offset += pad;
                f.write_all(&t.raw_data).map_err(|e| io_err(&tmp, e))?;
                let entry = |k: &str, v: String| StringStringEntryProto {
                    key: k.into(),
                    value: v,
                };
                t.external_data = vec![
                    entry("location", data_name.clone()),
                    entry("offset", offset.to_string()),
                    entry("length", t.raw_data.len().to_string()),
                ];
                t.data_location = 1;
                offset += t.raw_data.len();
                t.raw_data.clear();
            }
        }
        f.into_inner()
            .map_err(|e| io_err(&tmp, e))?
            .sync_all()
            .map_err(|e| io_err(&tmp, e))?;
        std::fs::rename(&tmp, &data_path).map_err(|e| io_err(&data_path, e))?;
    }
    let bytes = model.encode_to_vec();
    let tmp = path.with_extension("onnx.tmp");
    std::fs::write(&tmp, &bytes).map_err(|e| io_err(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io_err(path, e))?;
    Ok(())
}

/// Reads a model's protobuf (not its external data).
pub fn read_model(path: &Path) -> Result<ModelProto, ExportError> {
    if !path.is_file() {
        let why = if path.exists() {
            "not a regular file"
        } else {
            "no such file"
        };
        return Err(io_err(path, why));
    }
    let bytes = std::fs::read(path).map_err(|e| io_err(path, e))?;
    let m = ModelProto::decode(bytes.as_slice())
        .map_err(|e| io_err(path, format!("not an ONNX model: {e}")))?;
    if m.graph.is_none() {
        return Err(io_err(path, "not an ONNX model: it has no graph"));
    }
    Ok(m)
}

/// Count of each op type in the graph.
pub fn op_histogram(model: &ModelProto) -> BTreeMap<String, usize> {
    let mut h = BTreeMap::new();
    if let Some(g) = &model.graph {
        for n in &g.node {
            *h.entry(n.op_type.clone()).or_insert(0) += 1;
        }
    }
    h
}

/// The model's `metadata_props` as a map.
pub fn metadata(model: &ModelProto) -> BTreeMap<String, String> {
    model
        .metadata_props
        .iter()
        .map(|e| (e.key.clone(), e.value.clone()))
        .collect()
}

/// Exports a degradation operator `H` alone: `image` [N, c, s, s] -> `measurement` (no noise).
/// `davi degrade` runs it, so measurements come from the very operator code training uses.
pub fn export_operator(
    op: &davi_models::Operator,
    c: usize,
    s: usize,
) -> Result<ModelProto, ExportError> {
    export_operator_hw(op, c, s, s)
}

/// [`export_operator`] for an `h` x `w` image: any size for the local operators (for super-
/// resolution both sides divisible by the scale); the centred box of inpainting only square.
pub fn export_operator_hw(
    op: &davi_models::Operator,
    c: usize,
    h: usize,
    w: usize,
) -> Result<ModelProto, ExportError> {
    if h != w && !op.is_local() {
        return Err(ExportError::Options(format!(
            "the {} operator takes square images ({w}x{h} given)",
            op.task()
        )));
    }
    op.validate(c, h.min(w))?;
    op.validate(c, h.max(w))?;
    let weights = Weights::default();
    let rec = Recorder::new(&weights, false);
    // Local operators do not depend on the size; inpainting is square here.
    let out = op.forward(&rec, &Var("image".into()), c, h);
    let [cy, _, _] = op.measurement_shape(c, h);
    let ratio = |n: usize| (op.measurement_shape(c, n)[1]) as i64;
    let inputs = vec![(
        "image".to_string(),
        vec![None, Some(c as i64), Some(h as i64), Some(w as i64)],
    )];
    let out_dims = vec![None, Some(cy as i64), Some(ratio(h)), Some(ratio(w))];
    assemble(
        rec,
        &weights,
        out,
        Edges {
            inputs,
            cast_inputs: Vec::new(),
            output_name: "measurement",
            output_dims: out_dims,
        },
        &ExportOptions::default(),
        &[],
    )
}

/// The serialized protobuf of a model (weights inline).
pub fn to_bytes(model: &ModelProto) -> Vec<u8> {
    model.encode_to_vec()
}

/// A model's summary, one line each: producer, opset, metadata, inputs and outputs with their
/// dims (names for dynamic ones), initializer count and values, and the op histogram.
pub fn describe(model: &ModelProto) -> Vec<String> {
    let mut lines = vec![
        format!(
            "producer: {} {}",
            model.producer_name, model.producer_version
        ),
        format!(
            "opset: {}",
            model.opset_import.first().map(|o| o.version).unwrap_or(0)
        ),
    ];
    for (k, v) in metadata(model) {
        lines.push(format!("metadata {k}: {v}"));
    }
    if let Some(g) = &model.graph {
        let fmt = |v: &ValueInfoProto| {
            let dims: Vec<String> = v
                .r#type
                .as_ref()
                .and_then(|t| t.tensor_type.as_ref())
                .and_then(|t| t.shape.as_ref())
                .map(|s| {
                    s.dim
                        .iter()
                        .map(|d| match &d.value {
                            Some(proto::DimValue::DimValue(v)) => v.to_string(),
                            Some(proto::DimValue::DimParam(p)) => p.clone(),
                            None => "?".into(),
                        })
                        .collect()
                })
                .unwrap_or_default();
            format!("{} [{}]", v.name, dims.join(", "))
        };
        lines.extend(g.input.iter().map(|i| format!("input: {}", fmt(i))));
        lines.extend(g.output.iter().map(|o| format!("output: {}", fmt(o))));
        let values: i64 = g
            .initializer
            .iter()
            .map(|t| t.dims.iter().product::<i64>())
            .sum();
        lines.push(format!(
            "initializers: {} ({values} values)",
            g.initializer.len()
        ));
    }
    for (op, n) in op_histogram(model) {
        lines.push(format!("op {op}: {n}"));
    }
    lines
}
