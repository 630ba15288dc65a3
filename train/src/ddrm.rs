//! Denoising Diffusion Restoration Models (Kawar et al., NeurIPS 2022), the fast zero-shot
//! baseline of the DAVI paper's table: 20 network evaluations, `eta = 0.85`, `eta_b = 1`, as the
//! official code (bahjat-kawar/ddrm, `efficient_generalized_steps`) runs it.
//!
//! DDRM works in the spectral space of `H = U diag(s) V^T`. At 32 px the matrices are small
//! (`n = C S^2` up to 3072), so [`Svd::of`] builds them densely from the operator itself: it
//! applies `H` to the standard basis and decomposes the result. The blur is decomposed as the
//! official `Deblurring` does it, through the SVD of its 1-D convolution matrix with singular
//! values below `3e-2` set to zero; inpainting keeps only the observed pixels' singular values,
//! as the official `Inpainting` does. (For colour blur the official `Deblurring` lists its
//! singular values channel by channel while its `Vt` interleaves channels per pixel; ours pairs
//! each component with its own value.) Dense matrices limit this to small images
//! ([`MAX_DIM`]); larger ones need the official structured decompositions.
//!
//! The measurement is the one every method of `davi-train eval` sees: noise of `sigma_0`, then
//! clipped to [-1, 1] as an image file is (the official DDRM does not clip).

use crate::backend::TchBackend;
use crate::diffusion::eps;
use anyhow::{bail, Result};
use davi_models::schedule::Diffusion;
use davi_models::{Operator, UNetModel};
use tch::{Device, Kind, Tensor};

/// DDRM settings (the official defaults).
#[derive(Debug, Clone)]
pub struct Ddrm {
    /// Steps, evenly spaced: `0, T/steps, ..` (the official `skip` schedule).
    pub steps: usize,
    /// `eta` (the official `etaA = etaC`).
    pub eta: f64,
    /// `eta_b`.
    pub eta_b: f64,
}

impl Default for Ddrm {
    fn default() -> Self {
        Self {
            steps: 20,
            eta: 0.85,
            eta_b: 1.0,
        }
    }
}

/// The largest image (`C S^2` values) the dense decomposition takes: 64x64 RGB.
pub const MAX_DIM: usize = 3 * 64 * 64;

/// `H = U diag(s) V^T` of an operator on [C, S, S] images, as dense matrices.
pub struct Svd {
    /// [m, m], columns the left singular vectors (over the flattened measurement).
    pub u: Tensor,
    /// [k] singular values (`k <= m`; zeros allowed, as the official blur has them).
    pub s: Tensor,
    /// [n, n], columns the right singular vectors (over the flattened image).
    pub v: Tensor,
}

impl Svd {
    /// The decomposition of `op` on [c, s, s] images.
    pub fn of(op: &Operator, c: usize, s: usize, device: Device) -> Result<Self> {
        if c * s * s > MAX_DIM {
            bail!(
                "DDRM: {c}x{s}x{s} images are too large for the dense decomposition (at most {MAX_DIM} values)"
            );
        }
        let b = TchBackend::new(Default::default(), Device::Cpu);
        let svd = match *op {
            Operator::Deblur { .. } => Self::separable_blur(op, &b, c, s)?,
            _ => Self::dense(op, c, s)?,
        };
        Ok(Self {
            u: svd.u.to_device(device),
            s: svd.s.to_device(device),
            v: svd.v.to_device(device),
        })
    }

    /// The matrix of `op`, [m, n], in f64.
    pub fn matrix(op: &Operator, c: usize, s: usize) -> Tensor {
        let b = TchBackend::new(Default::default(), Device::Cpu);
        let n = (c * s * s) as i64;
        let basis =
            Tensor::eye(n, (Kind::Float, Device::Cpu)).reshape([n, c as i64, s as i64, s as i64]);
        tch::no_grad(|| op.forward(&b, &basis, c, s))
            .reshape([n, -1])
            .transpose(0, 1)
            .to_kind(Kind::Double)
    }

    fn dense(op: &Operator, c: usize, s: usize) -> Result<Self> {
        let h = Self::matrix(op, c, s);
        let (u, sv, v) = h.svd(false, true); // full U and V, as the official torch.svd(some=False)
                                             // Singular values of exactly zero (the inpainted box) are not observed at all: the
                                             // official `Inpainting` lists only the kept pixels.
        let max = sv.max().double_value(&[]);
        let k = sv.ge(max * 1e-6).sum(Kind::Int64).int64_value(&[]);
        Ok(Self {
            u: u.to_kind(Kind::Float),
            s: sv.narrow(0, 0, k).to_kind(Kind::Float),
            v: v.to_kind(Kind::Float),
        })
    }

    /// A separable blur as the official `Deblurring`: SVD of the 1-D matrix `H1` (read off the
    /// operator: `H (e_i e_c^T) = (H1 e_i)(H1 e_c)^T`), small singular values zeroed, and
    /// `H = I_C (x) H1 (x) H1`.
    fn separable_blur(op: &Operator, b: &TchBackend, c: usize, s: usize) -> Result<Self> {
        const ZERO: f64 = 3e-2;
        let (si, mid) = (s as i64, (s / 2) as i64);
        let basis = Tensor::zeros([si, 1, si, si], (Kind::Float, Device::Cpu));
        for i in 0..si {
            let _ = basis.get(i).get(0).get(i).get(mid).fill_(1.0);
        }
        let out = tch::no_grad(|| op.forward(b, &basis, 1, s)).to_kind(Kind::Double); // [s, 1, s, s]
        let col = out.select(1, 0).select(2, mid); // [i, row]: (H1 e_i)[row] * H1[mid, mid]
        let center = col.get(mid).get(mid).double_value(&[]).sqrt();
        if center <= 0.0 {
            bail!("DDRM: the blur's centre tap is not positive");
        }
        let h1 = col.transpose(0, 1) / center; // [row, i]
        let (u1, s1, v1) = h1.svd(false, true);
        // `kron` views its inputs: the SVD's factors come back strided (column-major).
        let (u1, v1) = (u1.contiguous(), v1.contiguous());
        let s1 = s1.where_scalarother(&s1.ge(ZERO), 0.0);
        let u2 = u1.kron(&u1).contiguous();
        let v2 = v1.kron(&v1).contiguous();
        let s2 = s1.unsqueeze(1).matmul(&s1.unsqueeze(0)).reshape([-1]);
        let eye = Tensor::eye(c as i64, (Kind::Double, Device::Cpu));
        Ok(Self {
            u: eye.kron(&u2).to_kind(Kind::Float),
            s: s2.repeat([c as i64]).to_kind(Kind::Float),
            v: eye.kron(&v2).to_kind(Kind::Float),
        })
    }

    /// `V^T x` per image: [N, ...] -> [N, n].
    pub fn vt(&self, x: &Tensor) -> Tensor {
        x.flatten(1, -1).matmul(&self.v)
    }

    /// `V z` per row: [N, n] -> [N, n].
    pub fn v_of(&self, z: &Tensor) -> Tensor {
        z.matmul(&self.v.transpose(0, 1))
    }

    /// `U^T y` per measurement: [N, ...] -> [N, m].
    pub fn ut(&self, y: &Tensor) -> Tensor {
        y.flatten(1, -1).matmul(&self.u)
    }
}

/// `alpha_bar` at step `t`, 1 at `t = -1` (the official `compute_alpha`).
fn alpha_bar(d: &Diffusion, t: i64) -> f64 {
    if t < 0 {
        1.0
    } else {
        d.alphas_cumprod[t as usize]
    }
}

/// DDRM of `y` with the noise prediction `eps_fn(x_t, t)`: the images (not clipped) and the
/// network evaluations per image.
///
/// # Shapes
/// - `y`: [N, Cy, Hy, Wy] -> [N, c, s, s]
#[allow(clippy::too_many_arguments)]
pub fn sample(
    eps_fn: &dyn Fn(&Tensor, usize) -> Result<Tensor>,
    d: &Diffusion,
    svd: &Svd,
    y: &Tensor,
    sigma_0: f64,
    shape: [usize; 3],
    cfg: &Ddrm,
    seed: i64,
) -> Result<(Tensor, usize)> {
    let [c, s_img, _] = shape;
    let (n_img, dim) = (y.size()[0], (c * s_img * s_img) as i64);
    let dev = y.device();
    let t_max = d.steps();
    let skip = (t_max / cfg.steps.clamp(1, t_max)).max(1);
    let seq: Vec<i64> = (0..t_max as i64).step_by(skip).collect();
    tch::manual_seed(seed);
    let k = svd.s.size()[0];
    // Sigma over all n components (zero past the k singular values), U^T y likewise.
    let sig = Tensor::zeros([dim], (Kind::Float, dev));
    sig.narrow(0, 0, k).copy_(&svd.s);
    let uty = svd.ut(y).narrow(1, 0, k);
    let uty_n = Tensor::zeros([n_img, dim], (Kind::Float, dev));
    uty_n.narrow(1, 0, k).copy_(&uty);
    let pos = sig.gt(0.0);
    let safe = sig.where_scalarother(&pos, 1.0);
    let sig_inv_uty = (&uty_n / &safe).where_scalarother(&pos, 0.0);
    let has = Tensor::zeros([dim], (Kind::Bool, dev));
    let _ = has.narrow(0, 0, k).fill_(1);

    // x_T from p(x_T | y) (singular values too small for the noise level: pure noise).
    let ab_t = alpha_bar(d, *seq.last().expect("steps"));
    let sigma_t = (1.0 - ab_t).sqrt() / ab_t.sqrt();
    let large = sig.f_mul_scalar(sigma_t)?.gt(sigma_0).logical_and(&has);
    let inv = (sigma_0 / &safe).where_scalarother(&large, 0.0);
    let init = &sig_inv_uty * large.to_kind(Kind::Float)
        + (inv.square().neg() + sigma_t * sigma_t)
            .clamp_min(0.0)
            .sqrt()
            * Tensor::randn([n_img, dim], (Kind::Float, dev));
    let mut x = svd
        .v_of(&(init / sigma_t))
        .reshape([n_img, c as i64, s_img as i64, s_img as i64]);

    let mut nfe = 0;
    for (idx, &t) in seq.iter().enumerate().rev() {
        let t_next = if idx == 0 { -1 } else { seq[idx - 1] };
        let (at, at_next) = (alpha_bar(d, t), alpha_bar(d, t_next));
        let et = eps_fn(&x, t as usize)?;
        nfe += 1;
        let x0_t = (&x - &et * (1.0 - at).sqrt()) / at.sqrt();
        let sigma_next = (1.0 - at_next).sqrt() / at_next.sqrt();
        let vt_x0 = svd.vt(&x0_t);
        let svt_x0 = &vt_x0 * &sig;
        let before = sig.f_mul_scalar(sigma_next)?.gt(sigma_0).logical_and(&has);
        let after = sig.f_mul_scalar(sigma_next)?.lt(sigma_0).logical_and(&has);
        let std_c = sigma_next * cfg.eta;
        let tilde_c = (sigma_next * sigma_next - std_c * std_c).max(0.0).sqrt();
        let (std_a, tilde_a) = (std_c, tilde_c); // etaA = etaC = eta
                                                 // Missing components: DDIM on the prior's prediction.
        let missing = &vt_x0 + svd.vt(&et) * tilde_c + Tensor::randn_like(&vt_x0) * std_c;
        // Less noisy than y: pulled toward y.
        let after_v = if sigma_0 > 0.0 {
            &vt_x0 + (&uty_n - &svt_x0) * (tilde_a / sigma_0) + Tensor::randn_like(&vt_x0) * std_a
        } else {
            vt_x0.shallow_clone()
        };
        // Noisier than y: y itself, with the missing noise.
        let diff = ((sigma_0 * sigma_0 * cfg.eta_b * cfg.eta_b) / safe.square())
            .neg()
            .f_add_scalar(sigma_next * sigma_next)?
            .clamp_min(0.0)
            .sqrt();
        let before_v = &sig_inv_uty * cfg.eta_b
            + &vt_x0 * (1.0 - cfg.eta_b)
            + diff * Tensor::randn_like(&vt_x0);
        let next = missing
            .where_self(&after.logical_not(), &after_v)
            .where_self(&before.logical_not(), &before_v);
        x = (svd.v_of(&next) * at_next.sqrt()).reshape([
            n_img,
            c as i64,
            s_img as i64,
            s_img as i64,
        ]);
    }
    Ok((x, nfe))
}

/// DDRM with the prior `unet` on `b`: the images clipped to [-1, 1], and the evaluations.
#[allow(clippy::too_many_arguments)]
pub fn restore(
    unet: &UNetModel,
    b: &TchBackend,
    d: &Diffusion,
    svd: &Svd,
    y: &Tensor,
    sigma_0: f64,
    cfg: &Ddrm,
    seed: i64,
) -> Result<(Tensor, usize)> {
    let (c, s) = (unet.config.in_channels, unet.config.image_size);
    tch::no_grad(|| {
        let eps_fn = |x: &Tensor, t: usize| -> Result<Tensor> {
            eps(unet, b, x, &vec![t; x.size()[0] as usize])
        };
        let (x, k) = sample(&eps_fn, d, svd, y, sigma_0, [c, s, s], cfg, seed)?;
        Ok((x.clamp(-1.0, 1.0), k))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use davi_models::schedule::BetaSchedule;

    #[test]
    fn the_decomposition_reproduces_every_operator() {
        let _rng = crate::global_rng();
        tch::manual_seed(0);
        for (task, c) in [
            ("denoise", 1),
            ("deblur", 1),
            ("sr", 1),
            ("inpaint", 1),
            ("colorize", 3),
            // RGB photo models (the 3-channel blur failed in libtorch's kron once).
            ("denoise", 3),
            ("deblur", 3),
            ("sr", 3),
        ] {
            let mut op = Operator::for_task(task, 16).unwrap();
            if task == "deblur" {
                op = Operator::Deblur {
                    kernel_size: 9,
                    sigma: 1.5,
                };
            }
            let svd = Svd::of(&op, c, 16, Device::Cpu).unwrap();
            let x = Tensor::randn([4, c as i64, 16, 16], (Kind::Float, Device::Cpu));
            let b = TchBackend::new(Default::default(), Device::Cpu);
            let hx = op.forward(&b, &x, c, 16).flatten(1, -1);
            let k = svd.s.size()[0];
            // U[:, :k] diag(s) (V^T x)[:k]
            let rec = (svd.vt(&x).narrow(1, 0, k) * &svd.s)
                .matmul(&svd.u.narrow(1, 0, k).transpose(0, 1));
            let err = (&rec - &hx).abs().max().double_value(&[]);
            let scale = hx.abs().max().double_value(&[]);
            // The blur's zeroed singular values (< 3e-2, as the official code) leave a little.
            let tol = if task == "deblur" { 0.05 } else { 1e-4 };
            assert!(err <= tol * scale, "{task}: {err} of {scale}");
            // Orthogonal factors.
            let vtv = svd.v.transpose(0, 1).matmul(&svd.v);
            let n = vtv.size()[0];
            let e = (vtv - Tensor::eye(n, (Kind::Float, Device::Cpu)))
                .abs()
                .max()
                .double_value(&[]);
            assert!(e < 1e-4, "{task}: V not orthogonal ({e})");
        }
        // Too large for dense matrices: a clear error, not an allocation of n^2 floats.
        let e = Svd::of(&Operator::Denoise, 3, 256, Device::Cpu)
            .err()
            .unwrap();
        assert!(e.to_string().contains("too large"), "{e}");
        let inpaint = Svd::of(&Operator::Inpaint { box_size: 8 }, 1, 16, Device::Cpu).unwrap();
        assert_eq!(
            inpaint.s.size()[0],
            16 * 16 - 8 * 8,
            "only kept pixels are observed"
        );
    }

    /// The exact noise prediction of the Gaussian prior `x0 ~ N(0, tau^2 I)` at step `t`.
    fn gaussian_eps(d: &Diffusion, tau: f64, x: &Tensor, t: usize) -> Result<Tensor> {
        let ab = d.alphas_cumprod[t];
        Ok(x * ((1.0 - ab).sqrt() / (ab * tau * tau + 1.0 - ab)))
    }

    /// A tensor's values, flattened, as f64.
    fn flat(t: &Tensor) -> Vec<f64> {
        Vec::<f64>::try_from(t.flatten(0, -1).to_kind(Kind::Double)).unwrap()
    }

    /// The official recurrence written per pixel, on plain floats, for an observed pixel
    /// (`s = 1`) or an unobserved one: what the spectral implementation must reproduce.
    fn scalar_reference(
        d: &Diffusion,
        y: &[f64],
        sigma_0: f64,
        tau: f64,
        observed: bool,
    ) -> Vec<f64> {
        use rand::SeedableRng;
        use rand_distr::{Distribution, StandardNormal};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let mut z = || -> f64 { StandardNormal.sample(&mut rng) };
        let seq: Vec<i64> = (0..1000).step_by(50).collect();
        let sig = |t: i64| (1.0 - alpha_bar(d, t)).sqrt() / alpha_bar(d, t).sqrt();
        let s_t = sig(999 - 49);
        y.iter()
            .map(|&y| {
                let mut x = if observed {
                    (y + (s_t * s_t - sigma_0 * sigma_0).max(0.0).sqrt() * z()) / s_t
                } else {
                    z()
                };
                for (idx, &t) in seq.iter().enumerate().rev() {
                    let tn = if idx == 0 { -1 } else { seq[idx - 1] };
                    let (at, an) = (alpha_bar(d, t), alpha_bar(d, tn));
                    let et = x * (1.0 - at).sqrt() / (at * tau * tau + 1.0 - at);
                    let x0 = (x - et * (1.0 - at).sqrt()) / at.sqrt();
                    let sn = sig(tn);
                    let std = sn * 0.85;
                    let til = (sn * sn - std * std).sqrt();
                    let v = if !observed {
                        x0 + til * et + std * z()
                    } else if sn > sigma_0 {
                        y + (sn * sn - sigma_0 * sigma_0).sqrt() * z()
                    } else if sn < sigma_0 {
                        x0 + til * (y - x0) / sigma_0 + std * z()
                    } else {
                        x0 + til * et + std * z()
                    };
                    x = an.sqrt() * v;
                }
                x
            })
            .collect()
    }

    /// Colorization (singular value 1/sqrt(3) on the channel mean of each pixel, three channels
    /// per pixel, two of them unobserved) in the spectral domain, where each component must follow
    /// the scalar recurrence of a singular value s: `U^T y / s` observed with noise `sigma_0 / s`.
    /// This is the colorization path the photo baselines take.
    #[test]
    fn ddrm_colorizes_a_gaussian_prior_as_the_official_recurrence() {
        let _rng = crate::global_rng();
        let tau = 0.25f64;
        let d = Diffusion::new(BetaSchedule::Linear, 1000);
        let eps_fn = |x: &Tensor, t: usize| gaussian_eps(&d, tau, x, t);
        let (c, s, n) = (3usize, 8usize, 128i64);
        let op = Operator::Colorize;
        tch::manual_seed(1);
        let x0 = Tensor::randn([n, 3, 8, 8], (Kind::Float, Device::Cpu)) * tau;
        let b = TchBackend::new(Default::default(), Device::Cpu);
        let svd = Svd::of(&op, c, s, Device::Cpu).unwrap();
        let k = svd.s.size()[0];
        assert_eq!(k, 64, "one observed component per pixel");
        let sv = svd.s.mean(Kind::Double).double_value(&[]);
        assert!((sv - 1.0 / 3f64.sqrt()).abs() < 1e-5, "singular value {sv}");
        for sigma_0 in [0.05, 0.2] {
            let y = op.forward(&b, &x0, c, s)
                + Tensor::randn([n, 1, 8, 8], (Kind::Float, Device::Cpu)) * sigma_0;
            let (x, _) = sample(
                &eps_fn,
                &d,
                &svd,
                &y,
                sigma_0,
                [c, s, s],
                &Ddrm::default(),
                3,
            )
            .unwrap();
            let vx = svd.vt(&x);
            let ybar = flat(&(svd.ut(&y).narrow(1, 0, k) / sv));
            let xo = flat(&vx.narrow(1, 0, k));
            let (slope, sd) = slope_and_sd(&xo, &ybar);
            let reference = scalar_reference(&d, &ybar, sigma_0 / sv, tau, true);
            let (r_slope, r_sd) = slope_and_sd(&reference, &ybar);
            assert!(
                (slope - r_slope).abs() < 0.04,
                "{sigma_0}: slope {slope} vs {r_slope}"
            );
            assert!(
                (sd - r_sd).abs() < 0.15 * r_sd + 2e-3,
                "{sigma_0}: sd {sd} vs {r_sd}"
            );
            // The two colour components of each pixel: the prior alone.
            let xm = vx.narrow(1, k, 2 * k);
            let (m, sd) = (
                xm.mean(Kind::Double).double_value(&[]),
                xm.std(true).double_value(&[]),
            );
            let r = scalar_reference(&d, &vec![0.0; 20000], sigma_0, tau, false);
            let (_, r_sd) = slope_and_sd(&r, &vec![1.0; r.len()]);
            assert!(
                m.abs() < 0.03 && (sd - r_sd).abs() < 0.1 * r_sd,
                "colour: mean {m}, sd {sd} vs {r_sd}"
            );
            // In pixels: the channel mean of the result follows y with the reference's shrinkage
            // (the channel mean is s times the observed component, y is s times ybar).
            let back = op.forward(&b, &x, c, s);
            let (bs, _) = slope_and_sd(&flat(&back), &flat(&y));
            assert!(
                (bs - r_slope).abs() < 0.04,
                "{sigma_0}: channel mean follows y with slope {bs}, reference {r_slope}"
            );
        }
    }

    fn slope_and_sd(x: &[f64], y: &[f64]) -> (f64, f64) {
        let slope =
            x.iter().zip(y).map(|(a, b)| a * b).sum::<f64>() / y.iter().map(|b| b * b).sum::<f64>();
        let r: Vec<f64> = x.iter().zip(y).map(|(a, b)| a - slope * b).collect();
        let m = r.iter().sum::<f64>() / r.len() as f64;
        let sd = (r.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (r.len() - 1) as f64).sqrt();
        (slope, sd)
    }

    /// With a Gaussian prior `x0 ~ N(0, tau^2 I)` the exact noise prediction is known in closed
    /// form. Observed pixels must follow the official recurrence (checked against a per-pixel
    /// reference, statistically); unobserved ones the prior; and nearly noiseless observations
    /// come back as they were.
    #[test]
    fn ddrm_follows_the_official_recurrence_on_a_gaussian_prior() {
        let _rng = crate::global_rng();
        let tau = 0.25f64;
        let d = Diffusion::new(BetaSchedule::Linear, 1000);
        let eps_fn = |x: &Tensor, t: usize| gaussian_eps(&d, tau, x, t);
        let (c, s, n) = (1usize, 8usize, 256i64);
        tch::manual_seed(1);
        let x0 = Tensor::randn([n, 1, 8, 8], (Kind::Float, Device::Cpu)) * tau;
        let b = TchBackend::new(Default::default(), Device::Cpu);
        for (op, sigma_0) in [
            (Operator::Denoise, 0.2),
            (Operator::Inpaint { box_size: 4 }, 0.2),
            (Operator::Inpaint { box_size: 4 }, 1e-3),
        ] {
            let y = op.forward(&b, &x0, c, s)
                + Tensor::randn([n, 1, 8, 8], (Kind::Float, Device::Cpu)) * sigma_0;
            let svd = Svd::of(&op, c, s, Device::Cpu).unwrap();
            let (x, nfe) = sample(
                &eps_fn,
                &d,
                &svd,
                &y,
                sigma_0,
                [c, s, s],
                &Ddrm::default(),
                3,
            )
            .unwrap();
            assert_eq!(nfe, 20);
            let ones = Tensor::ones([1, 1, 8, 8], (Kind::Float, Device::Cpu));
            let kept = op
                .forward(&b, &ones, c, s)
                .expand_as(&x)
                .flatten(0, -1)
                .gt(0.5);
            let (xf, yf) = (x.flatten(0, -1), y.flatten(0, -1));
            let (xo, yo) = (
                flat(&xf.masked_select(&kept)),
                flat(&yf.masked_select(&kept)),
            );
            let (slope, sd) = slope_and_sd(&xo, &yo);
            let reference = scalar_reference(&d, &yo, sigma_0, tau, true);
            let (r_slope, r_sd) = slope_and_sd(&reference, &yo);
            assert!(
                (slope - r_slope).abs() < 0.03,
                "{op:?} {sigma_0}: slope {slope} vs {r_slope}"
            );
            assert!(
                (sd - r_sd).abs() < 0.1 * r_sd + 2e-3,
                "{op:?} {sigma_0}: sd {sd} vs {r_sd}"
            );
            if sigma_0 < 0.01 {
                let err = xo
                    .iter()
                    .zip(&yo)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f64::max);
                assert!(err < 0.05, "noiseless pixels moved by {err}");
            }
            if let Operator::Inpaint { .. } = op {
                // Unobserved pixels: DDIM (eta 0.85) on the prior alone, as the reference.
                let xm = xf.masked_select(&kept.logical_not());
                let (m, sd) = (
                    xm.mean(Kind::Double).double_value(&[]),
                    xm.std(true).double_value(&[]),
                );
                let r = scalar_reference(&d, &vec![0.0; 20000], sigma_0, tau, false);
                let (_, r_sd) = slope_and_sd(&r, &vec![1.0; r.len()]);
                assert!(
                    m.abs() < 0.03 && (sd - r_sd).abs() < 0.1 * r_sd,
                    "box: mean {m}, sd {sd} vs {r_sd}"
                );
            }
        }
    }
}
