//! Smoke tests of the libtorch stack: a tensor op, an optimizer step, a safetensors round trip.

use tch::{Device, Kind, Tensor};

#[test]
fn tensor_op() {
    let a = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]).reshape([2, 2]);
    let b = a.matmul(&a);
    let v: Vec<f32> = Vec::try_from(b.flatten(0, -1)).unwrap();
    assert_eq!(v, vec![7.0, 10.0, 15.0, 22.0]);
}

#[test]
fn optimizer_step_lowers_loss() {
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let w = vs.root().randn("w", &[4], 0.0, 1.0);
    let mut opt = tch::nn::OptimizerConfig::build(tch::nn::Adam::default(), &vs, 0.1).unwrap();
    let loss = |w: &Tensor| (w - 3.0).square().sum(Kind::Float);
    let before = loss(&w).double_value(&[]);
    for _ in 0..10 {
        opt.backward_step(&loss(&w));
    }
    let after = loss(&w).double_value(&[]);
    assert!(after < before, "{after} !< {before}");
}

#[test]
fn safetensors_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.safetensors");
    let t = Tensor::randn([3, 5], (Kind::Float, Device::Cpu));
    davi_train::checkpoint::save_tensors(
        &p,
        &[("input_blocks.0.0.weight".into(), t.shallow_clone())],
    )
    .unwrap();
    let back = davi_train::checkpoint::load_tensors(&p, Device::Cpu).unwrap();
    let u = &back["input_blocks.0.0.weight"];
    assert_eq!(u.size(), vec![3, 5]);
    assert_eq!(f64::try_from((&t - u).abs().max()).unwrap(), 0.0);
}
