//! One test per op of the recording backend: the op recorded to ONNX and run in ONNX Runtime
//! computes what the tch backend computes (like candle-onnx's tests/ops.rs).

use davi_export::{Recorder, Var, Weights};
use davi_models::Backend;
use davi_runtime::model::{session, ModelSource, SessionOptions};
use davi_train::backend::{array_from_tensor, tensor_from_array};
use davi_train::TchBackend;
use ndarray::{ArrayD, IxDyn};
use ort::value::TensorRef;
use std::collections::HashMap;
use tch::{Device, Kind, Tensor};

fn arr(shape: &[usize], seed: i64) -> ArrayD<f32> {
    tch::manual_seed(seed);
    let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
    array_from_tensor(&Tensor::randn(&dims, (Kind::Float, Device::Cpu)))
}

/// Records `f` over inputs `xs` (graph inputs `x0`, `x1`, ...) and params `ps`, runs it in ONNX
/// Runtime and on tch, and compares.
/// The op under test, written once over both backends: input `i` -> output.
type OpFn<'a> = &'a dyn Fn(&dyn Fn(usize) -> Op, &Ctx) -> Op;

fn check(xs: &[ArrayD<f32>], ps: &[(&str, ArrayD<f32>)], f: OpFn<'_>) {
    let mut weights = Weights::default();
    for (n, a) in ps {
        weights.tensors.insert(n.to_string(), a.clone());
    }
    // ONNX
    let rec = Recorder::new(&weights, false);
    let ctx = Ctx::Rec(&rec);
    let out = f(&|i| Op::Rec(Var(format!("x{i}"))), &ctx);
    let Op::Rec(out) = out else { unreachable!() };
    let recording = rec.finish();
    let mut graph = davi_export::proto::GraphProto {
        node: recording.nodes,
        name: "op".into(),
        ..Default::default()
    };
    graph.node.push(davi_export::proto::NodeProto {
        input: vec![out.0],
        output: vec!["y".into()],
        op_type: "Identity".into(),
        ..Default::default()
    });
    for (n, a) in ps {
        if recording.used_params.contains(*n) {
            let v: Vec<f32> = a.iter().copied().collect();
            graph
                .initializer
                .push(davi_export::recorder::float_tensor(n, a.shape(), &v, false));
        }
    }
    graph.initializer.extend(recording.constants);
    for (i, x) in xs.iter().enumerate() {
        let dims: Vec<Option<i64>> = x.shape().iter().map(|&d| Some(d as i64)).collect();
        graph.input.push(davi_export::proto::ValueInfoProto::tensor(
            &format!("x{i}"),
            1,
            &dims,
            "n",
        ));
    }
    graph.output.push(davi_export::proto::ValueInfoProto {
        name: "y".into(),
        ..Default::default()
    });
    let model = davi_export::proto::ModelProto {
        ir_version: 8,
        opset_import: vec![davi_export::proto::OperatorSetIdProto {
            domain: String::new(),
            version: 17,
        }],
        graph: Some(graph),
        ..Default::default()
    };
    let bytes = davi_export::to_bytes(&model);
    let mut s = session(ModelSource::Bytes(&bytes, "op"), &SessionOptions::default()).unwrap();
    let inputs: Vec<(String, ort::session::SessionInputValue<'_>)> = xs
        .iter()
        .enumerate()
        .map(|(i, x)| {
            (
                format!("x{i}"),
                TensorRef::from_array_view(x.view()).unwrap().into(),
            )
        })
        .collect();
    let res = s.run(inputs).unwrap();
    let got = res["y"].try_extract_array::<f32>().unwrap().to_owned();
    // tch
    let params: HashMap<String, Tensor> = ps
        .iter()
        .map(|(n, a)| (n.to_string(), tensor_from_array(a, Device::Cpu)))
        .collect();
    let tb = TchBackend::new(params, Device::Cpu);
    let tctx = Ctx::Tch(&tb);
    let ts: Vec<Tensor> = xs
        .iter()
        .map(|x| tensor_from_array(x, Device::Cpu))
        .collect();
    let Op::Tch(want) = f(&|i| Op::Tch(ts[i].shallow_clone()), &tctx) else {
        unreachable!()
    };
    let want = array_from_tensor(&want);
    assert_eq!(got.shape(), want.shape());
    let d = got
        .iter()
        .zip(want.iter())
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(d < 1e-5, "max |diff| {d}");
}

enum Op {
    Rec(Var),
    Tch(Tensor),
}

enum Ctx<'a> {
    Rec(&'a Recorder<'a>),
    Tch(&'a TchBackend),
}

/// Applies a backend op to `Op`s of the same kind.
macro_rules! apply {
    ($ctx:expr, |$b:ident, $($v:ident),*| $body:expr, $($arg:expr),*) => {
        match $ctx {
            Ctx::Rec($b) => {
                $(let Op::Rec($v) = $arg else { unreachable!() };)*
                Op::Rec($body)
            }
            Ctx::Tch($b) => {
                $(let Op::Tch($v) = $arg else { unreachable!() };)*
                Op::Tch($body)
            }
        }
    };
}

#[test]
fn conv2d() {
    check(
        &[arr(&[2, 4, 6, 6], 1)],
        &[("w", arr(&[8, 4, 3, 3], 2)), ("b", arr(&[8], 3))],
        &|x, c| {
            apply!(
                c,
                |b, v| b.conv2d(
                    &v,
                    &b.param("w").unwrap(),
                    Some(&b.param("b").unwrap()),
                    2,
                    1,
                    1
                ),
                x(0)
            )
        },
    );
    check(
        &[arr(&[1, 4, 5, 5], 4)],
        &[("w", arr(&[4, 1, 3, 3], 5))],
        &|x, c| {
            apply!(
                c,
                |b, v| b.conv2d(&v, &b.param("w").unwrap(), None, 1, 1, 4),
                x(0)
            )
        },
    );
}

#[test]
fn linear() {
    check(
        &[arr(&[3, 5], 1)],
        &[("w", arr(&[7, 5], 2)), ("b", arr(&[7], 3))],
        &|x, c| {
            apply!(
                c,
                |b, v| b.linear(&v, &b.param("w").unwrap(), &b.param("b").unwrap()),
                x(0)
            )
        },
    );
}

/// The reference's 32 groups, and the other counts `norm_groups` can set.
#[test]
fn group_norm() {
    for groups in [32, 8, 1] {
        check(
            &[arr(&[2, 64, 4, 4], 1)],
            &[("w", arr(&[64], 2)), ("b", arr(&[64], 3))],
            &|x, c| {
                apply!(
                    c,
                    |b, v| b.group_norm(
                        &v,
                        groups,
                        &b.param("w").unwrap(),
                        &b.param("b").unwrap(),
                        1e-5
                    ),
                    x(0)
                )
            },
        );
    }
}

#[test]
fn elementwise() {
    let xs = [arr(&[2, 3, 4, 4], 1), arr(&[1, 3, 1, 1], 2)];
    check(&xs, &[], &|x, c| {
        apply!(c, |b, u, v| b.add(&u, &v), x(0), x(1))
    });
    check(&xs, &[], &|x, c| {
        apply!(c, |b, u, v| b.sub(&u, &v), x(0), x(1))
    });
    check(&xs, &[], &|x, c| {
        apply!(c, |b, u, v| b.mul(&u, &v), x(0), x(1))
    });
    check(&xs[..1], &[], &|x, c| apply!(c, |b, v| b.silu(&v), x(0)));
    check(&xs[..1], &[], &|x, c| apply!(c, |b, v| b.tanh(&v), x(0)));
    check(&xs[..1], &[], &|x, c| {
        apply!(c, |b, v| b.scale(&v, -1.7), x(0))
    });
    check(&xs[..1], &[], &|x, c| {
        apply!(c, |b, v| b.add_scalar(&v, 0.3), x(0))
    });
    check(&xs[..1], &[], &|x, c| {
        apply!(c, |b, v| b.dropout(&v, 0.5), x(0))
    });
    check(&xs[..1], &[], &|x, c| {
        apply!(c, |b, v| b.identity(&v), x(0))
    });
}

#[test]
fn matmul_softmax_reshape_permute() {
    let xs = [arr(&[4, 3, 5], 1), arr(&[4, 5, 6], 2)];
    check(&xs, &[], &|x, c| {
        apply!(c, |b, u, v| b.matmul(&u, &v), x(0), x(1))
    });
    check(&xs[..1], &[], &|x, c| {
        apply!(c, |b, v| b.softmax_last(&v), x(0))
    });
    check(&xs[..1], &[], &|x, c| {
        apply!(c, |b, v| b.reshape(&v, &[-1, 15]), x(0))
    });
    check(&xs[..1], &[], &|x, c| {
        apply!(c, |b, v| b.permute(&v, &[0, 2, 1]), x(0))
    });
    check(&xs[..1], &[], &|x, c| {
        apply!(c, |b, v| b.narrow(&v, 1, 1, 2), x(0))
    });
    check(&xs[..1], &[], &|x, c| {
        apply!(c, |b, v| b.concat(&[&v, &v], 2), x(0))
    });
}

#[test]
fn resampling() {
    let xs = [arr(&[2, 3, 4, 4], 1)];
    check(&xs, &[], &|x, c| {
        apply!(c, |b, v| b.upsample_nearest2x(&v), x(0))
    });
    check(&xs, &[], &|x, c| {
        apply!(c, |b, v| b.avg_pool2d(&v, 2), x(0))
    });
    check(&xs, &[], &|x, c| {
        apply!(c, |b, v| b.resize_bilinear(&v, 16, 16), x(0))
    });
}

#[test]
fn constant() {
    let k = ArrayD::from_shape_vec(IxDyn(&[1, 3, 1, 1]), vec![0.5, -1.0, 2.0]).unwrap();
    check(&[arr(&[2, 3, 2, 2], 1)], &[], &|x, c| {
        apply!(c, |b, v| b.mul(&v, &b.constant(k.clone())), x(0))
    });
}
