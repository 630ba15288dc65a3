//! Branches the guided-diffusion fixture does not take, each block checked against a direct tch
//! computation of what the reference's module does; and each operator against a naive one.

use davi_models::unet::{downsample, timestep_embedding, upsample, AttentionBlock, ResBlock};
use davi_models::{Backend, Operator, UNetConfig, UNetModel};
use davi_train::backend::{array_from_tensor, tensor_from_array};
use davi_train::TchBackend;
use std::collections::HashMap;
use tch::{Device, Kind, Tensor};

fn rnd(shape: &[i64]) -> Tensor {
    Tensor::randn(shape, (Kind::Float, Device::Cpu)) * 0.3
}

fn close(a: &Tensor, b: &Tensor) {
    assert_eq!(a.size(), b.size());
    // fp32 round-off differs between einsum and matmul orderings: relative to the magnitude.
    let d = f64::try_from((a - b).abs().max()).unwrap();
    let m = f64::try_from(b.abs().max()).unwrap().max(1.0);
    assert!(d < 1e-6 * m * 10.0, "max |diff| {d} at magnitude {m}");
}

fn gn(x: &Tensor, p: &HashMap<String, Tensor>, n: &str) -> Tensor {
    gn_groups(x, p, n, 32)
}

fn gn_groups(x: &Tensor, p: &HashMap<String, Tensor>, n: &str, groups: i64) -> Tensor {
    x.group_norm(
        groups,
        Some(&p[&format!("{n}.weight")]),
        Some(&p[&format!("{n}.bias")]),
        1e-5,
        false,
    )
}

fn conv(x: &Tensor, p: &HashMap<String, Tensor>, n: &str, stride: i64, pad: i64) -> Tensor {
    x.conv2d(
        &p[&format!("{n}.weight")],
        Some(&p[&format!("{n}.bias")]),
        [stride, stride],
        [pad, pad],
        [1, 1],
        1,
    )
}

fn attention_params(name: &str, c: i64) -> HashMap<String, Tensor> {
    let mut p = HashMap::new();
    p.insert(format!("{name}.norm.weight"), rnd(&[c]) + 1.0);
    p.insert(format!("{name}.norm.bias"), rnd(&[c]));
    p.insert(format!("{name}.qkv.weight"), rnd(&[3 * c, c, 1]));
    p.insert(format!("{name}.qkv.bias"), rnd(&[3 * c]));
    p.insert(format!("{name}.proj_out.weight"), rnd(&[c, c, 1]));
    p.insert(format!("{name}.proj_out.bias"), rnd(&[c]));
    p
}

/// The reference's AttentionBlock, written out with einsum.
fn attention_direct(
    x: &Tensor,
    p: &HashMap<String, Tensor>,
    n: &str,
    heads: i64,
    new_order: bool,
) -> Tensor {
    let (b, c, h, w) = x.size4().unwrap();
    let t = h * w;
    let xr = x.reshape([b, c, t]);
    let qkv = gn(&xr, p, &format!("{n}.norm")).conv1d(
        &p[&format!("{n}.qkv.weight")],
        Some(&p[&format!("{n}.qkv.bias")]),
        [1],
        [0],
        [1],
        1,
    );
    let ch = c / heads;
    let scale = 1.0 / (ch as f64).sqrt().sqrt();
    let (q, k, v) = if new_order {
        let parts = qkv.chunk(3, 1);
        (
            (&parts[0] * scale).reshape([b * heads, ch, t]),
            (&parts[1] * scale).reshape([b * heads, ch, t]),
            parts[2].reshape([b * heads, ch, t]),
        )
    } else {
        let parts = qkv.reshape([b * heads, 3 * ch, t]).split(ch, 1);
        (
            &parts[0] * scale,
            &parts[1] * scale,
            parts[2].shallow_clone(),
        )
    };
    let wts = Tensor::einsum("bct,bcs->bts", &[q, k], None::<i64>).softmax(-1, Kind::Float);
    let a = Tensor::einsum("bts,bcs->bct", &[wts, v], None::<i64>).reshape([b, c, t]);
    let hout = a.conv1d(
        &p[&format!("{n}.proj_out.weight")],
        Some(&p[&format!("{n}.proj_out.bias")]),
        [1],
        [0],
        [1],
        1,
    );
    (xr + hout).reshape([b, c, h, w])
}

#[test]
fn attention_new_order_and_num_heads() {
    tch::manual_seed(1);
    for new_order in [true, false] {
        let p = attention_params("a", 64);
        let x = rnd(&[2, 64, 4, 4]);
        let blk = AttentionBlock {
            name: "a".into(),
            channels: 64,
            side: 4,
            heads: 2,
            new_order,
            groups: 32,
        };
        let b = TchBackend::new(
            p.iter()
                .map(|(k, v)| (k.clone(), v.shallow_clone()))
                .collect(),
            Device::Cpu,
        );
        let ours = blk.forward(&b, &x).unwrap();
        close(&ours, &attention_direct(&x, &p, "a", 2, new_order));
    }
}

fn res_params(n: &str, ch: i64, out: i64, emb: i64, scale_shift: bool) -> HashMap<String, Tensor> {
    let mut p = HashMap::new();
    p.insert(format!("{n}.in_layers.0.weight"), rnd(&[ch]) + 1.0);
    p.insert(format!("{n}.in_layers.0.bias"), rnd(&[ch]));
    p.insert(format!("{n}.in_layers.2.weight"), rnd(&[out, ch, 3, 3]));
    p.insert(format!("{n}.in_layers.2.bias"), rnd(&[out]));
    let e = if scale_shift { 2 * out } else { out };
    p.insert(format!("{n}.emb_layers.1.weight"), rnd(&[e, emb]));
    p.insert(format!("{n}.emb_layers.1.bias"), rnd(&[e]));
    p.insert(format!("{n}.out_layers.0.weight"), rnd(&[out]) + 1.0);
    p.insert(format!("{n}.out_layers.0.bias"), rnd(&[out]));
    p.insert(format!("{n}.out_layers.3.weight"), rnd(&[out, out, 3, 3]));
    p.insert(format!("{n}.out_layers.3.bias"), rnd(&[out]));
    if ch != out {
        p.insert(format!("{n}.skip_connection.weight"), rnd(&[out, ch, 1, 1]));
        p.insert(format!("{n}.skip_connection.bias"), rnd(&[out]));
    }
    p
}

/// The reference's ResBlock.forward, written out.
fn res_direct(
    x: &Tensor,
    emb: &Tensor,
    p: &HashMap<String, Tensor>,
    n: &str,
    scale_shift: bool,
    up: bool,
    groups: i64,
) -> Tensor {
    let h = gn_groups(x, p, &format!("{n}.in_layers.0"), groups).silu();
    let (h, x) = if up {
        let s = h.size();
        (
            h.upsample_nearest2d([s[2] * 2, s[3] * 2], None, None),
            x.upsample_nearest2d([s[2] * 2, s[3] * 2], None, None),
        )
    } else {
        (h, x.shallow_clone())
    };
    let h = conv(&h, p, &format!("{n}.in_layers.2"), 1, 1);
    let e = emb.silu().linear(
        &p[&format!("{n}.emb_layers.1.weight")],
        Some(&p[&format!("{n}.emb_layers.1.bias")]),
    );
    let e = e.unsqueeze(-1).unsqueeze(-1);
    let h = if scale_shift {
        let parts = e.chunk(2, 1);
        gn_groups(&h, p, &format!("{n}.out_layers.0"), groups) * (&parts[0] + 1.0) + &parts[1]
    } else {
        gn_groups(&(h + e), p, &format!("{n}.out_layers.0"), groups)
    };
    let h = conv(&h.silu(), p, &format!("{n}.out_layers.3"), 1, 1);
    let skip = if p.contains_key(&format!("{n}.skip_connection.weight")) {
        conv(&x, p, &format!("{n}.skip_connection"), 1, 0)
    } else {
        x
    };
    skip + h
}

#[test]
fn resblock_without_scale_shift_and_with_upsampling() {
    tch::manual_seed(2);
    // The last case: `norm_groups: 8` reaches every GroupNorm of the block.
    for (scale_shift, up, ch, out, groups) in [
        (false, false, 32, 64, 32),
        (true, true, 64, 64, 32),
        (false, true, 64, 32, 32),
        (true, false, 64, 64, 8),
    ] {
        let p = res_params("r", ch, out, 128, scale_shift);
        let x = rnd(&[2, ch, 8, 8]);
        let emb = rnd(&[2, 128]);
        let blk = ResBlock {
            name: "r".into(),
            scale_shift,
            up,
            down: false,
            has_skip_conv: ch != out,
            out_channels: out as usize,
            dropout: 0.0,
            groups: groups as usize,
        };
        let b = TchBackend::new(
            p.iter()
                .map(|(k, v)| (k.clone(), v.shallow_clone()))
                .collect(),
            Device::Cpu,
        );
        let ours = blk.forward(&b, &x, &emb.silu()).unwrap();
        close(
            &ours,
            &res_direct(&x, &emb, &p, "r", scale_shift, up, groups),
        );
        if groups != 32 {
            let other = res_direct(&x, &emb, &p, "r", scale_shift, up, 32);
            let d = f64::try_from((&ours - other).abs().max()).unwrap();
            assert!(
                d > 1e-3,
                "{groups} and 32 groups agree ({d}): the setting is unused"
            );
        }
    }
}

#[test]
fn conv_samplers() {
    tch::manual_seed(3);
    let mut p = HashMap::new();
    p.insert("u.conv.weight".to_string(), rnd(&[32, 32, 3, 3]));
    p.insert("u.conv.bias".to_string(), rnd(&[32]));
    p.insert("d.op.weight".to_string(), rnd(&[32, 32, 3, 3]));
    p.insert("d.op.bias".to_string(), rnd(&[32]));
    let x = rnd(&[2, 32, 8, 8]);
    let b = TchBackend::new(
        p.iter()
            .map(|(k, v)| (k.clone(), v.shallow_clone()))
            .collect(),
        Device::Cpu,
    );
    let up = upsample(&b, Some("u.conv"), &x).unwrap();
    close(
        &up,
        &conv(
            &x.upsample_nearest2d([16, 16], None, None),
            &p,
            "u.conv",
            1,
            1,
        ),
    );
    let down = downsample(&b, Some("d.op"), &x).unwrap();
    close(&down, &conv(&x, &p, "d.op", 2, 1));
    close(
        &downsample(&b, None, &x).unwrap(),
        &x.avg_pool2d([2, 2], [2, 2], [0, 0], false, true, None),
    );
}

#[test]
fn whole_unet_with_every_other_branch_runs_and_names_its_params() {
    // conv samplers, no scale-shift, num_heads, new attention order, class embedding.
    let cfg: UNetConfig = serde_yaml::from_str(
        "image_size: 16\nin_channels: 3\nmodel_channels: 32\nout_channels: 3\nnum_res_blocks: 2\n\
         attention_resolutions: [8, 4]\nchannel_mult: [1, 2, 2]\nnum_heads: 2\nnum_heads_upsample: 4\n\
         use_new_attention_order: true\nnum_classes: 5\n",
    )
    .unwrap();
    let unet = UNetModel::new(&cfg).unwrap();
    let names: Vec<&str> = unet
        .param_shapes()
        .iter()
        .map(|(n, _)| n.as_str())
        .collect();
    for n in [
        "input_blocks.3.0.op.weight",
        "output_blocks.2.2.conv.weight",
        "label_emb.weight",
        "input_blocks.4.1.qkv.weight",
    ] {
        assert!(names.contains(&n), "{n} missing");
    }
    let params = davi_train::params::ParamSet::init(&unet, 0, Device::Cpu);
    let b = TchBackend::new(params.frozen(), Device::Cpu);
    let onehot = Tensor::eye(5, (Kind::Float, Device::Cpu)).narrow(0, 0, 2);
    let ce = unet.class_embedding(&b, &onehot).unwrap();
    let out =
        tch::no_grad(|| unet.forward(&b, &rnd(&[2, 3, 16, 16]), &[3.0, 500.0], Some(&ce))).unwrap();
    assert_eq!(out.size(), vec![2, 3, 16, 16]);
    assert!(
        unet.forward(&b, &rnd(&[2, 3, 16, 16]), &[3.0, 500.0], None)
            .is_err(),
        "class-conditional without labels"
    );
}

#[test]
fn timestep_embedding_matches_reference_formula() {
    let e = timestep_embedding(&[0.0, 10.0], 8);
    assert_eq!(e[[0, 0]], 1.0);
    assert_eq!(e[[0, 4]], 0.0);
    let f1 = (-(10000f64).ln() / 4.0).exp();
    assert!((e[[1, 1]] as f64 - (10.0 * f1).cos()).abs() < 1e-5);
    assert!((e[[1, 5]] as f64 - (10.0 * f1).sin()).abs() < 1e-5);
}

#[test]
fn operators_against_naive_computations() {
    let b = TchBackend::new(HashMap::new(), Device::Cpu);
    let x = rnd(&[1, 3, 8, 8]);
    let a = array_from_tensor(&x);
    // SR lift: bilinear with half-pixel centres.
    let y = rnd(&[1, 3, 2, 2]);
    let lifted = array_from_tensor(&Operator::SuperRes { scale: 4 }.lift(&b, &y, 3, 8));
    let ya = array_from_tensor(&y);
    // Output pixel 3 maps to source (3 + 0.5) / 4 - 0.5 = 0.375 between source 0 and 1.
    let want = ya[[0, 1, 0, 0]] * (1.0 - 0.375) + ya[[0, 1, 0, 1]] * 0.375;
    assert!(
        (lifted[[0, 1, 0, 3]] - want).abs() < 1e-5,
        "{} vs {want}",
        lifted[[0, 1, 0, 3]]
    );
    // Colorization: mean of channels, lifted by repetition.
    let g = array_from_tensor(&Operator::Colorize.forward(&b, &x, 3, 8));
    assert!(
        (g[[0, 0, 5, 2]] - (a[[0, 0, 5, 2]] + a[[0, 1, 5, 2]] + a[[0, 2, 5, 2]]) / 3.0).abs()
            < 1e-6
    );
    let gl =
        array_from_tensor(&Operator::Colorize.lift(&b, &tensor_from_array(&g, Device::Cpu), 3, 8));
    assert_eq!(gl[[0, 2, 5, 2]], g[[0, 0, 5, 2]]);
    // Deblur at a border pixel: zero padding.
    let k = Operator::gaussian_kernel(3, 0.8);
    let d = array_from_tensor(
        &Operator::Deblur {
            kernel_size: 3,
            sigma: 0.8,
        }
        .forward(&b, &x, 3, 8),
    );
    let mut want = 0.0;
    for i in 0..2 {
        for j in 0..2 {
            want += k[(i + 1) * 3 + (j + 1)] * a[[0, 2, i, j]];
        }
    }
    assert!((d[[0, 2, 0, 0]] - want).abs() < 1e-5);
    // Denoise is the identity; inpainting zero-fills the box.
    let dn = array_from_tensor(&Operator::Denoise.forward(&b, &x, 3, 8));
    assert_eq!(dn, a);
    let ip = array_from_tensor(&Operator::Inpaint { box_size: 4 }.forward(&b, &x, 3, 8));
    assert_eq!(ip[[0, 0, 2, 2]], 0.0);
    assert_eq!(ip[[0, 0, 1, 2]], a[[0, 0, 1, 2]]);
    let _ = b.identity(&x);
}
