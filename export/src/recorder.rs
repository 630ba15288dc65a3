//! A backend that records operations instead of executing them (the idea of burn's
//! `burn-capture`): the model code of `davi-models` runs on it and leaves an ONNX graph.
//!
//! Every op maps to ONNX ops that TensorRT 10's parser takes. GroupNorm is written as
//! Reshape -> InstanceNormalization -> Reshape -> affine, the decomposition TensorRT fuses.

use crate::proto::{data_type, AttributeProto, NodeProto, TensorProto};
use crate::weights::Weights;
use davi_models::{Backend, Error, Result};
use ndarray::ArrayD;
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};

/// Whether an initializer name is one of the recorder's own constants (`const_N`,
/// `const_i64_N`, `const_f32_N`: [`Recorder`]'s fresh names), not a network weight (weights keep
/// guided-diffusion's dotted names).
pub fn is_constant_name(name: &str) -> bool {
    name.strip_prefix("const_").is_some_and(|rest| {
        let n = rest.rsplit('_').next().unwrap_or(rest);
        !rest.contains('.') && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())
    })
}

/// A value of the recorded graph: the name of an ONNX tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Var(pub String);

#[derive(Default)]
struct State {
    nodes: Vec<NodeProto>,
    constants: Vec<TensorProto>,
    used: BTreeSet<String>,
    /// The f32 value of each half-stored weight, once cast.
    cast: BTreeMap<String, Var>,
    counter: BTreeMap<String, usize>,
}

/// The recording backend.
pub struct Recorder<'w> {
    weights: &'w Weights,
    fp16: bool,
    /// Weights stored in half precision and cast to f32 once, where they are first used (the
    /// compute stays f32; ONNX Runtime folds the casts at load).
    half_weights: bool,
    state: RefCell<State>,
}

/// What a finished recording holds.
pub struct Recording {
    /// The nodes in topological order (the order they were recorded).
    pub nodes: Vec<NodeProto>,
    /// Constants made by the model code.
    pub constants: Vec<TensorProto>,
    /// Names of the checkpoint weights the graph reads.
    pub used_params: BTreeSet<String>,
}

impl<'w> Recorder<'w> {
    /// A recorder whose `param` reads from `weights`; with `fp16`, float constants are half.
    pub fn new(weights: &'w Weights, fp16: bool) -> Self {
        Self {
            weights,
            fp16,
            half_weights: false,
            state: RefCell::new(State::default()),
        }
    }

    /// Stores the weights in half precision and casts each to f32 where it is first used (for an
    /// f32 recording; an fp16 recording stores and computes in half anyway).
    pub fn with_half_weights(mut self, half: bool) -> Self {
        self.half_weights = half && !self.fp16;
        self
    }

    /// Whether the weights' initializers are half precision.
    pub fn weights_are_half(&self) -> bool {
        self.fp16 || self.half_weights
    }

    /// The float element type of this recording.
    pub fn float_type(&self) -> i32 {
        if self.fp16 {
            data_type::FLOAT16
        } else {
            data_type::FLOAT
        }
    }

    /// Ends the recording.
    pub fn finish(self) -> Recording {
        let s = self.state.into_inner();
        Recording {
            nodes: s.nodes,
            constants: s.constants,
            used_params: s.used,
        }
    }

    fn fresh(&self, base: &str) -> String {
        let mut s = self.state.borrow_mut();
        let n = s.counter.entry(base.to_string()).or_insert(0);
        *n += 1;
        format!("{base}_{}", *n - 1)
    }

    /// Records one node with a single output and returns that output.
    pub fn node(&self, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>) -> Var {
        let out = self.fresh(&op.to_lowercase());
        let node = NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![out.clone()],
            name: format!("{op}/{out}"),
            op_type: op.into(),
            attribute: attrs,
            ..Default::default()
        };
        self.state.borrow_mut().nodes.push(node);
        Var(out)
    }

    /// An int64 constant (shapes, axes, indices).
    pub fn ints(&self, v: &[i64]) -> Var {
        let name = self.fresh("const_i64");
        let t = TensorProto {
            dims: vec![v.len() as i64],
            data_type: data_type::INT64,
            int64_data: v.to_vec(),
            name: name.clone(),
            ..Default::default()
        };
        self.state.borrow_mut().constants.push(t);
        Var(name)
    }

    /// A float constant of this recording's element type.
    pub fn floats(&self, shape: &[usize], v: &[f32]) -> Var {
        let name = self.fresh("const");
        let t = float_tensor(&name, shape, v, self.fp16);
        self.state.borrow_mut().constants.push(t);
        Var(name)
    }

    fn scalar(&self, v: f32) -> Var {
        self.floats(&[], &[v])
    }
}

/// A float tensor proto (raw little-endian data), half precision when `fp16`.
pub fn float_tensor(name: &str, shape: &[usize], v: &[f32], fp16: bool) -> TensorProto {
    let raw: Vec<u8> = if fp16 {
        v.iter()
            .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
            .collect()
    } else {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    };
    TensorProto {
        dims: shape.iter().map(|&d| d as i64).collect(),
        data_type: if fp16 {
            data_type::FLOAT16
        } else {
            data_type::FLOAT
        },
        name: name.into(),
        raw_data: raw,
        ..Default::default()
    }
}

impl Backend for Recorder<'_> {
    type Tensor = Var;

    fn param(&self, name: &str) -> Result<Var> {
        if !self.weights.tensors.contains_key(name) {
            return Err(Error::MissingParam(name.to_string()));
        }
        self.state.borrow_mut().used.insert(name.to_string());
        if !self.half_weights {
            return Ok(Var(name.to_string()));
        }
        if let Some(v) = self.state.borrow().cast.get(name) {
            return Ok(v.clone());
        }
        let v = self.node(
            "Cast",
            &[name],
            vec![AttributeProto::int("to", data_type::FLOAT as i64)],
        );
        self.state
            .borrow_mut()
            .cast
            .insert(name.to_string(), v.clone());
        Ok(v)
    }
    fn constant(&self, value: ArrayD<f32>) -> Var {
        let v: Vec<f32> = value.iter().copied().collect();
        self.floats(value.shape(), &v)
    }
    fn identity(&self, x: &Var) -> Var {
        x.clone()
    }
    fn conv2d(
        &self,
        x: &Var,
        w: &Var,
        b: Option<&Var>,
        stride: usize,
        padding: usize,
        groups: usize,
    ) -> Var {
        let (s, p) = (stride as i64, padding as i64);
        let mut inputs = vec![x.0.as_str(), w.0.as_str()];
        if let Some(b) = b {
            inputs.push(&b.0);
        }
        self.node(
            "Conv",
            &inputs,
            vec![
                AttributeProto::ints("strides", &[s, s]),
                AttributeProto::ints("pads", &[p, p, p, p]),
                AttributeProto::ints("dilations", &[1, 1]),
                AttributeProto::int("group", groups as i64),
            ],
        )
    }
    fn linear(&self, x: &Var, w: &Var, b: &Var) -> Var {
        self.node(
            "Gemm",
            &[&x.0, &w.0, &b.0],
            vec![AttributeProto::int("transB", 1)],
        )
    }
    fn group_norm(&self, x: &Var, groups: usize, w: &Var, b: &Var, eps: f64) -> Var {
        // [N, C, ...] -> [N, G, -1]: InstanceNormalization over the last dim is GroupNorm's
        // statistics; then back to x's shape and the per-channel affine.
        let shape = self.node("Shape", &[&x.0], vec![]);
        let grouped = self.ints(&[0, groups as i64, -1]);
        let r = self.node("Reshape", &[&x.0, &grouped.0], vec![]);
        let ones = self.floats(&[groups], &vec![1.0; groups]);
        let zeros = self.floats(&[groups], &vec![0.0; groups]);
        let n = self.node(
            "InstanceNormalization",
            &[&r.0, &ones.0, &zeros.0],
            vec![AttributeProto::float("epsilon", eps as f32)],
        );
        let back = self.node("Reshape", &[&n.0, &shape.0], vec![]);
        let c = self
            .weights
            .tensors
            .get(&w.0)
            .map(|t| t.len() as i64)
            .unwrap_or(-1);
        let col = self.ints(&[c, 1, 1]);
        let wc = self.node("Reshape", &[&w.0, &col.0], vec![]);
        let bc = self.node("Reshape", &[&b.0, &col.0], vec![]);
        let m = self.node("Mul", &[&back.0, &wc.0], vec![]);
        self.node("Add", &[&m.0, &bc.0], vec![])
    }
    fn silu(&self, x: &Var) -> Var {
        let s = self.node("Sigmoid", &[&x.0], vec![]);
        self.node("Mul", &[&x.0, &s.0], vec![])
    }
    fn dropout(&self, x: &Var, _p: f64) -> Var {
        x.clone()
    }
    fn tanh(&self, x: &Var) -> Var {
        self.node("Tanh", &[&x.0], vec![])
    }
    fn add(&self, a: &Var, b: &Var) -> Var {
        self.node("Add", &[&a.0, &b.0], vec![])
    }
    fn sub(&self, a: &Var, b: &Var) -> Var {
        self.node("Sub", &[&a.0, &b.0], vec![])
    }
    fn mul(&self, a: &Var, b: &Var) -> Var {
        self.node("Mul", &[&a.0, &b.0], vec![])
    }
    fn scale(&self, x: &Var, s: f32) -> Var {
        let c = self.scalar(s);
        self.node("Mul", &[&x.0, &c.0], vec![])
    }
    fn add_scalar(&self, x: &Var, s: f32) -> Var {
        let c = self.scalar(s);
        self.node("Add", &[&x.0, &c.0], vec![])
    }
    fn matmul(&self, a: &Var, b: &Var) -> Var {
        self.node("MatMul", &[&a.0, &b.0], vec![])
    }
    fn softmax_last(&self, x: &Var) -> Var {
        self.node("Softmax", &[&x.0], vec![AttributeProto::int("axis", -1)])
    }
    fn reshape(&self, x: &Var, shape: &[i64]) -> Var {
        let s = self.ints(shape);
        self.node("Reshape", &[&x.0, &s.0], vec![])
    }
    fn permute(&self, x: &Var, perm: &[usize]) -> Var {
        let p: Vec<i64> = perm.iter().map(|&d| d as i64).collect();
        self.node("Transpose", &[&x.0], vec![AttributeProto::ints("perm", &p)])
    }
    fn narrow(&self, x: &Var, dim: usize, start: usize, len: usize) -> Var {
        let starts = self.ints(&[start as i64]);
        let ends = self.ints(&[(start + len) as i64]);
        let axes = self.ints(&[dim as i64]);
        self.node("Slice", &[&x.0, &starts.0, &ends.0, &axes.0], vec![])
    }
    fn concat(&self, xs: &[&Var], dim: usize) -> Var {
        let names: Vec<&str> = xs.iter().map(|v| v.0.as_str()).collect();
        self.node(
            "Concat",
            &names,
            vec![AttributeProto::int("axis", dim as i64)],
        )
    }
    fn upsample_nearest2x(&self, x: &Var) -> Var {
        // PyTorch's nearest: asymmetric coordinates, floor.
        let scales = self.floats_f32(&[1.0, 1.0, 2.0, 2.0]);
        self.node(
            "Resize",
            &[&x.0, "", &scales.0],
            vec![
                AttributeProto::string("mode", "nearest"),
                AttributeProto::string("coordinate_transformation_mode", "asymmetric"),
                AttributeProto::string("nearest_mode", "floor"),
            ],
        )
    }
    fn avg_pool2d(&self, x: &Var, k: usize) -> Var {
        let k = k as i64;
        self.node(
            "AveragePool",
            &[&x.0],
            vec![
                AttributeProto::ints("kernel_shape", &[k, k]),
                AttributeProto::ints("strides", &[k, k]),
            ],
        )
    }
    fn resize_bilinear(&self, x: &Var, h: usize, w: usize) -> Var {
        // sizes = concat(shape(x)[:2], [h, w]): the batch stays dynamic.
        let shape = self.node("Shape", &[&x.0], vec![]);
        let (s0, s2, ax) = (self.ints(&[0]), self.ints(&[2]), self.ints(&[0]));
        let nc = self.node("Slice", &[&shape.0, &s0.0, &s2.0, &ax.0], vec![]);
        let hw = self.ints(&[h as i64, w as i64]);
        let sizes = self.node(
            "Concat",
            &[&nc.0, &hw.0],
            vec![AttributeProto::int("axis", 0)],
        );
        self.node(
            "Resize",
            &[&x.0, "", "", &sizes.0],
            vec![
                AttributeProto::string("mode", "linear"),
                AttributeProto::string("coordinate_transformation_mode", "half_pixel"),
            ],
        )
    }
}

impl Recorder<'_> {
    /// A float32 constant whatever the element type (Resize's scales must be float32).
    fn floats_f32(&self, v: &[f32]) -> Var {
        let name = self.fresh("const_f32");
        let t = float_tensor(&name, &[v.len()], v, false);
        self.state.borrow_mut().constants.push(t);
        Var(name)
    }
}
