//! The loss terms of DAVI (Lee et al., ECCV 2024), each as one function with its equation; the
//! training step (`davi.rs`) only draws the randomness and adds them up. Notation as in
//! `docs/DESIGN.md` section 1: `x_t = sqrt(ab_t) x + sqrt(1 - ab_t) eps`, `x0_net(x_t) =
//! (x_t - sqrt(1 - ab_t) eps_net(x_t, t)) / sqrt(ab_t)`.

use crate::backend::TchBackend;
use crate::diffusion::{column, eps, q_sample, x0_from_eps};
use anyhow::Result;
use davi_models::schedule::Diffusion;
use davi_models::{Operator, UNetModel};
use tch::{Kind, Tensor};

/// Denoising score matching of the auxiliary score `s_psi` on samples `x_hat` of `I_phi`:
///
/// `L_DSM(psi) = E_{t, eps} || eps_psi(sqrt(ab_t) x_hat + sqrt(1 - ab_t) eps, t) - eps ||^2`
pub fn dsm(
    unet: &UNetModel,
    psi: &TchBackend,
    d: &Diffusion,
    x_hat: &Tensor,
    t: &[usize],
    noise: &Tensor,
) -> Result<Tensor> {
    let x_t = q_sample(d, x_hat, t, noise);
    Ok((eps(unet, psi, &x_t, t)? - noise)
        .square()
        .mean(Kind::Float))
}

/// The integral-KL gradient at `x_hat` (no gradient flows through it):
///
/// `g = sqrt(ab_t / (1 - ab_t)) (x0_psi(x_t) - x0_theta(x_t))`, `x_t` from `x_hat` and `noise`,
///
/// with the teacher `s_theta` (the frozen prior) and the auxiliary score `s_psi`.
pub fn ikl_gradient(
    unet: &UNetModel,
    teacher: &TchBackend,
    psi: &TchBackend,
    d: &Diffusion,
    x_hat: &Tensor,
    t: &[usize],
    noise: &Tensor,
) -> Result<Tensor> {
    tch::no_grad(|| {
        let x_t = q_sample(d, &x_hat.detach(), t, noise);
        let x0_theta = x0_from_eps(d, &x_t, t, &eps(unet, teacher, &x_t, t)?);
        let x0_psi = x0_from_eps(d, &x_t, t, &eps(unet, psi, &x_t, t)?);
        let w = column(t, |t| d.ikl_weight(t), x_hat.device());
        Ok((x0_psi - x0_theta) * w)
    })
}

/// The IKL surrogate `L_IKL = mean( sg(g) * x_hat )`: a loss whose gradient with respect to
/// `x_hat` is the IKL gradient `g` (divided by the element count), which the chain rule carries
/// into `phi`.
pub fn ikl_surrogate(g: &Tensor, x_hat: &Tensor) -> Tensor {
    (g.detach() * x_hat).mean(Kind::Float)
}

/// Data consistency `L_con = mean( (y - H x_hat)^2 )` (for inpainting both sides are the
/// zero-filled known pixels, as `H` returns them).
pub fn data_consistency(
    op: &Operator,
    b: &TchBackend,
    x_hat: &Tensor,
    y: &Tensor,
    c: usize,
    s: usize,
) -> Tensor {
    (op.forward(b, x_hat, c, s) - y).square().mean(Kind::Float)
}

/// The ground-truth term `L_gt = mean( (x0 - x_hat)^2 )`; for inpainting, as the official code,
/// `0.1 mean((x0 - x_hat)^2) + mean((H x0 - H x_hat)^2)`.
pub fn ground_truth(
    op: &Operator,
    b: &TchBackend,
    x0: &Tensor,
    x_hat: &Tensor,
    c: usize,
    s: usize,
) -> Tensor {
    let mse = (x0 - x_hat).square().mean(Kind::Float);
    match op {
        Operator::Inpaint { .. } => {
            mse * 0.1
                + (op.forward(b, x0, c, s) - op.forward(b, x_hat, c, s))
                    .square()
                    .mean(Kind::Float)
        }
        _ => mse,
    }
}

/// The measurement `y = H x0 + sigma_y n`, `n ~ N(0, I)`.
pub fn measure(
    op: &Operator,
    b: &TchBackend,
    x0: &Tensor,
    c: usize,
    s: usize,
    sigma_y: f64,
) -> Tensor {
    let hx = op.forward(b, x0, c, s);
    &hx + Tensor::randn_like(&hx) * sigma_y
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn b() -> TchBackend {
        TchBackend::new(Default::default(), Device::Cpu)
    }

    #[test]
    fn data_consistency_is_the_mean_squared_residual_of_the_measurement() {
        let _rng = crate::global_rng();
        let op = Operator::for_task("sr", 8).unwrap();
        let x0 = Tensor::rand([2, 1, 8, 8], (Kind::Float, Device::Cpu));
        let y = op.forward(&b(), &x0, 1, 8);
        assert_eq!(
            data_consistency(&op, &b(), &x0, &y, 1, 8).double_value(&[]),
            0.0
        );
        let v = data_consistency(&op, &b(), &(&x0 + 0.5), &y, 1, 8).double_value(&[]);
        assert!((v - 0.25).abs() < 1e-6, "{v}"); // average pooling moves by the same 0.5
    }

    #[test]
    fn ground_truth_term_weighs_inpainting_as_the_official_code() {
        let x0 = Tensor::zeros([1, 1, 8, 8], (Kind::Float, Device::Cpu));
        let x_hat = Tensor::ones([1, 1, 8, 8], (Kind::Float, Device::Cpu));
        let sr = Operator::for_task("sr", 8).unwrap();
        assert!((ground_truth(&sr, &b(), &x0, &x_hat, 1, 8).double_value(&[]) - 1.0).abs() < 1e-6);
        let inpaint = Operator::for_task("inpaint", 8).unwrap();
        let hx = inpaint.forward(&b(), &x_hat, 1, 8);
        let known = hx.square().mean(Kind::Float).double_value(&[]);
        let v = ground_truth(&inpaint, &b(), &x0, &x_hat, 1, 8).double_value(&[]);
        assert!((v - (0.1 + known)).abs() < 1e-6, "{v} vs {}", 0.1 + known);
    }
}
