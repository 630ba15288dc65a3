//! Noise schedules and the Perturbed Posterior Bridge (PPB) of DAVI.
//!
//! Schedules are host-side numbers (f64); the backends receive them as scalars or constants.

use serde::{Deserialize, Serialize};

/// How the betas of a diffusion are laid out over `T` steps.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    /// DDPM's linear betas, 1e-4 .. 0.02 at T = 1000 (scaled by 1000/T as in improved-diffusion).
    #[default]
    Linear,
    /// Nichol & Dhariwal's cosine schedule (s = 0.008, betas clipped at 0.999).
    Cosine,
    /// The official DAVI code's "i2sb" betas: `linspace(sqrt(1e-4), sqrt(0.02), T)^2`.
    I2sb,
}

impl BetaSchedule {
    /// The `T` betas.
    pub fn betas(self, t: usize) -> Vec<f64> {
        match self {
            BetaSchedule::Linear => {
                let scale = 1000.0 / t as f64;
                linspace(scale * 1e-4, scale * 0.02, t)
            }
            BetaSchedule::Cosine => {
                let f = |i: f64| {
                    ((i / t as f64 + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
                        .cos()
                        .powi(2)
                };
                (0..t)
                    .map(|i| (1.0 - f(i as f64 + 1.0) / f(i as f64)).min(0.999))
                    .collect()
            }
            BetaSchedule::I2sb => linspace(1e-4f64.sqrt(), 0.02f64.sqrt(), t)
                .into_iter()
                .map(|b| b * b)
                .collect(),
        }
    }
}

fn linspace(a: f64, b: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![a];
    }
    (0..n)
        .map(|i| a + (b - a) * i as f64 / (n - 1) as f64)
        .collect()
}

/// A discrete diffusion `x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps`.
#[derive(Debug, Clone)]
pub struct Diffusion {
    /// Per-step betas.
    pub betas: Vec<f64>,
    /// Cumulative products of `1 - beta`.
    pub alphas_cumprod: Vec<f64>,
}

impl Diffusion {
    /// The diffusion of `schedule` over `t` steps.
    pub fn new(schedule: BetaSchedule, t: usize) -> Self {
        let betas = schedule.betas(t);
        let mut acc = 1.0;
        let alphas_cumprod = betas
            .iter()
            .map(|b| {
                acc *= 1.0 - b;
                acc
            })
            .collect();
        Self {
            betas,
            alphas_cumprod,
        }
    }

    /// Number of steps `T`.
    pub fn steps(&self) -> usize {
        self.betas.len()
    }

    /// `ab_{t-1}` (1 at `t = 0`).
    pub fn alpha_bar_prev(&self, t: usize) -> f64 {
        if t == 0 {
            1.0
        } else {
            self.alphas_cumprod[t - 1]
        }
    }

    /// Coefficients `(c0, ct)` of the posterior mean of `q(x_{t-1} | x_t, x0)`:
    /// `mu = c0 x0 + ct x_t`.
    pub fn posterior_mean_coefs(&self, t: usize) -> (f64, f64) {
        let p = Posterior::between(
            self.alphas_cumprod[t],
            self.alpha_bar_prev(t),
            self.betas[t],
        );
        (p.c0, p.ct)
    }

    /// Variance `beta_t (1 - ab_{t-1}) / (1 - ab_t)` of `q(x_{t-1} | x_t, x0)` (0 at `t = 0`).
    pub fn posterior_variance(&self, t: usize) -> f64 {
        Posterior::between(
            self.alphas_cumprod[t],
            self.alpha_bar_prev(t),
            self.betas[t],
        )
        .variance
    }

    /// The posterior from step `t` to an earlier step `prev` (`None`: to `x0`), as a respaced
    /// sampler (DPS on fewer steps) takes it: `beta = 1 - ab_t / ab_prev`.
    pub fn posterior_to(&self, t: usize, prev: Option<usize>) -> Posterior {
        let ab = self.alphas_cumprod[t];
        let ab_prev = prev.map_or(1.0, |p| self.alphas_cumprod[p]);
        Posterior::between(ab, ab_prev, 1.0 - ab / ab_prev)
    }

    /// Log of the posterior variance with `t = 0` clipped to `t = 1`'s (it is 0 there): the
    /// lower end of the learned-variance interpolation, as in improved-diffusion.
    pub fn posterior_log_variance_clipped(&self, t: usize) -> f64 {
        let t = if t == 0 && self.steps() > 1 { 1 } else { t };
        self.posterior_variance(t).max(1e-20).ln()
    }

    /// Log variance of the reverse step at `t` for a learned-sigma output `v` in [-1, 1]:
    /// `frac log(beta_t) + (1 - frac) log(var~_t)` with `frac = (v + 1) / 2`.
    pub fn learned_log_variance(&self, t: usize, v: f64) -> f64 {
        let frac = (v + 1.0) / 2.0;
        frac * self.betas[t].ln() + (1.0 - frac) * self.posterior_log_variance_clipped(t)
    }

    /// Weight of the IKL gradient at `t`: `sqrt(ab_t / (1 - ab_t))`.
    pub fn ikl_weight(&self, t: usize) -> f64 {
        let ab = self.alphas_cumprod[t];
        (ab / (1.0 - ab)).sqrt()
    }
}

/// `q(x_prev | x_t, x0) = N(c0 x0 + ct x_t, variance)` between two steps of a schedule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Posterior {
    /// Coefficient of `x0` in the mean.
    pub c0: f64,
    /// Coefficient of `x_t` in the mean.
    pub ct: f64,
    /// The variance.
    pub variance: f64,
}

impl Posterior {
    /// With `ab = ab_t`, `ab_prev` and `beta` the step's beta:
    /// `c0 = sqrt(ab_prev) beta / (1 - ab)`, `ct = sqrt(1 - beta) (1 - ab_prev) / (1 - ab)`,
    /// `variance = beta (1 - ab_prev) / (1 - ab)`.
    pub fn between(ab: f64, ab_prev: f64, beta: f64) -> Self {
        Self {
            c0: ab_prev.sqrt() * beta / (1.0 - ab),
            ct: (1.0 - beta).sqrt() * (1.0 - ab_prev) / (1.0 - ab),
            variance: beta * (1.0 - ab_prev) / (1.0 - ab),
        }
    }
}

/// The Perturbed Posterior Bridge: an I2SB bridge between `x0` and the lifted measurement on
/// the symmetric schedule `concat(beta[:T/2], reverse(beta[:T/2]))`, perturbed by `h (1 - ab_a) z`.
#[derive(Debug, Clone)]
pub struct Bridge {
    /// `sigma2(a) = sum_{i <= a} beta_b[i]`.
    pub sigma2: Vec<f64>,
    /// `sigmabar2(a) = sum_{i > a} beta_b[i]`.
    pub sigmabar2: Vec<f64>,
    /// `alpha_bar` of the diffusion the perturbation scale uses.
    pub alphas_cumprod: Vec<f64>,
}

/// Coefficients of one bridge sample: `x_a = mu0 x0 + mu1 y_lift + noise_scale z`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BridgeCoeffs {
    /// Weight of `x0`.
    pub mu0: f64,
    /// Weight of the lifted measurement.
    pub mu1: f64,
    /// `h (1 - alpha_bar_a)`.
    pub noise_scale: f64,
    /// `sigma_fwd(a) = sqrt(sigma2(a))`, the scale of `F_phi` in the output map.
    pub sigma_fwd: f64,
}

impl Bridge {
    /// The bridge built from `diffusion`'s betas.
    pub fn new(diffusion: &Diffusion) -> Self {
        let t = diffusion.steps();
        let half = &diffusion.betas[..t / 2];
        let mut bb: Vec<f64> = half.to_vec();
        bb.extend(half.iter().rev());
        // With odd T the symmetric schedule is one short; repeat the middle beta.
        while bb.len() < t {
            bb.insert(t / 2, half[half.len() - 1]);
        }
        let total: f64 = bb.iter().sum();
        let mut acc = 0.0;
        let sigma2: Vec<f64> = bb
            .iter()
            .map(|b| {
                acc += b;
                acc
            })
            .collect();
        let sigmabar2 = sigma2.iter().map(|s| (total - s).max(0.0)).collect();
        Self {
            sigma2,
            sigmabar2,
            alphas_cumprod: diffusion.alphas_cumprod.clone(),
        }
    }

    /// Number of steps.
    pub fn steps(&self) -> usize {
        self.sigma2.len()
    }

    /// The coefficients at step `a` with perturbation `h`.
    pub fn coeffs(&self, a: usize, h: f64) -> BridgeCoeffs {
        let s2 = self.sigma2[a];
        let sb2 = self.sigmabar2[a];
        BridgeCoeffs {
            mu0: sb2 / (s2 + sb2),
            mu1: s2 / (s2 + sb2),
            noise_scale: h * (1.0 - self.alphas_cumprod[a]),
            sigma_fwd: s2.sqrt(),
        }
    }
}

/// A bridge step drawn as the official code does, `trunc(T * b - 0.5)` with `b ~ Beta(3, 1)`,
/// from a uniform `u` in [0, 1) (`b = u^(1/3)`: Beta(3, 1) has CDF x^3), within `0..T-1`.
pub fn beta31_step(u: f64, t: usize) -> usize {
    let a = t as f64 * u.cbrt() - 0.5;
    (a.max(0.0) as usize).min(t - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_betas_match_ddpm() {
        let b = BetaSchedule::Linear.betas(1000);
        assert!((b[0] - 1e-4).abs() < 1e-12 && (b[999] - 0.02).abs() < 1e-12);
        let d = Diffusion::new(BetaSchedule::Linear, 1000);
        // Known value of DDPM's alpha_bar at T-1 (~4.04e-5).
        assert!(
            (d.alphas_cumprod[999] - 4.035e-5).abs() < 1e-6,
            "{}",
            d.alphas_cumprod[999]
        );
    }

    #[test]
    fn bridge_endpoints() {
        let d = Diffusion::new(BetaSchedule::Linear, 1000);
        let br = Bridge::new(&d);
        let c0 = br.coeffs(0, 0.1);
        assert!(c0.mu0 > 0.999 && c0.mu1 < 1e-3);
        let c1 = br.coeffs(999, 0.1);
        assert_eq!(c1.mu0, 0.0);
        assert_eq!(c1.mu1, 1.0);
        assert!((c1.noise_scale - 0.1 * (1.0 - d.alphas_cumprod[999])).abs() < 1e-12);
        // Symmetric schedule: sigma2 at the middle is half the total.
        let total = br.sigma2[999];
        assert!((br.sigma2[499] - total / 2.0).abs() < 1e-9);
    }

    #[test]
    fn beta31_is_skewed_to_late_steps() {
        assert_eq!(beta31_step(0.0, 1000), 0);
        assert_eq!(beta31_step(0.999_999_9, 1000), 999);
        // median of Beta(3,1) is 2^(-1/3) ~ 0.794
        assert_eq!(beta31_step(0.5, 1000), 793);
        assert_eq!(beta31_step(1e-12, 1000), 0);
    }

    #[test]
    fn cosine_and_i2sb_are_increasing() {
        for s in [BetaSchedule::Cosine, BetaSchedule::I2sb] {
            let b = s.betas(1000);
            assert!(b.windows(2).all(|w| w[1] >= w[0] - 1e-12), "{s:?}");
        }
    }
}
