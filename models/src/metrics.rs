//! Image quality metrics on [0, 1]: PSNR and SSIM (Wang et al. 2004, Gaussian window 11, sigma 1.5,
//! K1 = 0.01, K2 = 0.03, valid region, averaged over channels), shared by `davi eval` and
//! `davi-train eval`.

use ndarray::{s, Array2, ArrayView2, ArrayView3};

/// PSNR in dB of two images on [0, 1] (`inf` when identical).
pub fn psnr(a: ArrayView3<f32>, b: ArrayView3<f32>) -> f64 {
    let n = a.len().max(1) as f64;
    let mse: f64 = a
        .iter()
        .zip(b.iter())
        .map(|(x, y)| ((*x - *y) as f64).powi(2))
        .sum::<f64>()
        / n;
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (1.0 / mse).log10()
    }
}

fn gaussian_window(size: usize, sigma: f64) -> Vec<f64> {
    let r = (size / 2) as f64;
    let g: Vec<f64> = (0..size)
        .map(|i| (-((i as f64 - r).powi(2)) / (2.0 * sigma * sigma)).exp())
        .collect();
    let s: f64 = g.iter().sum();
    g.into_iter().map(|v| v / s).collect()
}

/// Separable 'valid' filtering of `x` with the 1-D window `w`.
fn filter_valid(x: &Array2<f64>, w: &[f64]) -> Array2<f64> {
    let k = w.len();
    let (h, wd) = x.dim();
    let (oh, ow) = (h + 1 - k, wd + 1 - k);
    let mut tmp = Array2::<f64>::zeros((h, ow));
    for i in 0..h {
        for j in 0..ow {
            tmp[[i, j]] = (0..k).map(|t| w[t] * x[[i, j + t]]).sum();
        }
    }
    let mut out = Array2::<f64>::zeros((oh, ow));
    for i in 0..oh {
        for j in 0..ow {
            out[[i, j]] = (0..k).map(|t| w[t] * tmp[[i + t, j]]).sum();
        }
    }
    out
}

fn ssim_channel(a: ArrayView2<f32>, b: ArrayView2<f32>, win: &[f64]) -> f64 {
    let a = a.mapv(|v| v as f64);
    let b = b.mapv(|v| v as f64);
    let (c1, c2) = (0.01f64.powi(2), 0.03f64.powi(2));
    let mu_a = filter_valid(&a, win);
    let mu_b = filter_valid(&b, win);
    let aa = filter_valid(&(&a * &a), win);
    let bb = filter_valid(&(&b * &b), win);
    let ab = filter_valid(&(&a * &b), win);
    let mut total = 0.0;
    for ((((ma, mb), saa), sbb), sab) in mu_a
        .iter()
        .zip(mu_b.iter())
        .zip(aa.iter())
        .zip(bb.iter())
        .zip(ab.iter())
    {
        let va = saa - ma * ma;
        let vb = sbb - mb * mb;
        let cov = sab - ma * mb;
        total +=
            ((2.0 * ma * mb + c1) * (2.0 * cov + c2)) / ((ma * ma + mb * mb + c1) * (va + vb + c2));
    }
    total / mu_a.len().max(1) as f64
}

/// Mean SSIM of two `[c, h, w]` images on [0, 1]. The window shrinks (odd) for images under 11 px.
pub fn ssim(a: ArrayView3<f32>, b: ArrayView3<f32>) -> f64 {
    let (c, h, w) = a.dim();
    let size = 11
        .min(h.min(w) | 1)
        .min(if h.min(w) % 2 == 0 {
            h.min(w) - 1
        } else {
            h.min(w)
        })
        .max(1);
    let win = gaussian_window(size, 1.5);
    (0..c)
        .map(|k| ssim_channel(a.slice(s![k, .., ..]), b.slice(s![k, .., ..]), &win))
        .sum::<f64>()
        / c as f64
}

/// Mean and half-width of the 95% confidence interval of the mean of `v` (Student's t with
/// `n - 1` degrees of freedom: 3.18 standard errors for 4 images, 2.13 for 16, 1.96 for many).
/// NaN for no value; the half-width is NaN for a single value (no interval).
pub fn mean_ci95(v: &[f64]) -> (f64, f64) {
    use statrs::distribution::{ContinuousCDF, StudentsT};
    let n = v.len() as f64;
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let m = v.iter().sum::<f64>() / n;
    if v.len() < 2 {
        return (m, f64::NAN);
    }
    let var = v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0);
    let t = StudentsT::new(0.0, 1.0, n - 1.0)
        .expect("n - 1 >= 1 degrees of freedom")
        .inverse_cdf(0.975);
    (m, t * (var / n).sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array3;

    #[test]
    fn identical_images() {
        let a = Array3::from_shape_fn((3, 32, 32), |(c, i, j)| ((c + i * j) % 7) as f32 / 7.0);
        assert_eq!(psnr(a.view(), a.view()), f64::INFINITY);
        assert!((ssim(a.view(), a.view()) - 1.0).abs() < 1e-9);
    }

    #[test]
    fn intervals_use_students_t() {
        // Sample standard deviation 1: the half-width is t(0.975, n-1) / sqrt(n).
        let (m, h) = mean_ci95(&[-1.0, 1.0]);
        assert_eq!(m, 0.0);
        assert!((h - 12.706 * 2f64.sqrt() / 2f64.sqrt()).abs() < 1e-2, "{h}");
        let four = [1.0, 2.0, 3.0, 4.0]; // sd 1.291
        let (_, h) = mean_ci95(&four);
        assert!((h - 3.182 * 1.2910 / 2.0).abs() < 1e-3, "{h}");
        let many: Vec<f64> = (0..1000).map(|i| (i % 2) as f64).collect();
        let (_, h) = mean_ci95(&many);
        let sd = (250.0f64 / 999.0 * 1000.0 / 250.0 * 0.25).sqrt();
        assert!((h - 1.9623 * sd / 1000f64.sqrt()).abs() < 1e-4, "{h}");
        assert!(mean_ci95(&[3.0]).1.is_nan());
        assert!(mean_ci95(&[]).0.is_nan());
    }

    #[test]
    fn psnr_of_known_error() {
        let a = Array3::<f32>::zeros((1, 4, 4));
        let b = Array3::<f32>::from_elem((1, 4, 4), 0.1);
        assert!((psnr(a.view(), b.view()) - 20.0).abs() < 1e-5);
    }

    #[test]
    fn ssim_drops_with_noise() {
        let a = Array3::from_shape_fn((1, 32, 32), |(_, i, j)| ((i / 4 + j / 4) % 2) as f32);
        let b = Array3::from_shape_fn((1, 32, 32), |(_, i, j)| {
            a[[0, i, j]] * 0.6 + (((i * 31 + j * 17) % 11) as f32 / 11.0) * 0.4
        });
        let v = ssim(a.view(), b.view());
        assert!(v < 0.9 && v > 0.0, "{v}");
    }
}
