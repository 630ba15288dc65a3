//! The degradation operators `H` of the inverse problems, and their lift of a measurement back
//! to image space (`y_lift`), as the official DAVI code (`utils/svd_operators.py`) defines them.

use crate::Backend;
use ndarray::{ArrayD, IxDyn};
use serde::{Deserialize, Serialize};

/// A degradation operator. Images are [N, C, S, S] in [-1, 1].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "task", rename_all = "snake_case", deny_unknown_fields)]
pub enum Operator {
    /// `H = I`.
    Denoise,
    /// Gaussian blur with zero padding ('same' size).
    Deblur {
        /// Taps of the (square, odd) kernel.
        kernel_size: usize,
        /// Standard deviation in pixels.
        sigma: f64,
    },
    /// Average pooling by `scale`; lifted by bilinear upsampling.
    #[serde(rename = "sr")]
    SuperRes {
        /// Downsampling factor.
        scale: usize,
    },
    /// Keep the pixels outside a centred square box; the box is zero-filled.
    Inpaint {
        /// Side of the box, in pixels.
        box_size: usize,
    },
    /// Channel mean (weights 1/C); lifted by repeating the grey image over C channels.
    Colorize,
}

impl Operator {
    /// Short task name (`denoise`, `deblur`, `sr`, `inpaint`, `colorize`).
    pub fn task(&self) -> &'static str {
        match self {
            Operator::Denoise => "denoise",
            Operator::Deblur { .. } => "deblur",
            Operator::SuperRes { .. } => "sr",
            Operator::Inpaint { .. } => "inpaint",
            Operator::Colorize => "colorize",
        }
    }

    /// The operator of `task` with the official 256 px parameters scaled to an image side `s`:
    /// blur 61 taps / sigma 3 and the 128 px box scale by `s / 256`; SR is x4.
    pub fn for_task(task: &str, s: usize) -> crate::Result<Self> {
        let f = s as f64 / 256.0;
        Ok(match task {
            "denoise" => Operator::Denoise,
            "deblur" => {
                let k = ((61.0 * f).round() as usize) | 1;
                Operator::Deblur {
                    kernel_size: k.max(3),
                    sigma: 3.0 * f,
                }
            }
            "sr" | "sr4" => Operator::SuperRes { scale: 4 },
            "inpaint" => Operator::Inpaint {
                box_size: ((128.0 * f).round() as usize).max(1),
            },
            "colorize" => Operator::Colorize,
            t => {
                return Err(crate::Error::Config(format!(
                    "unknown task '{t}': use denoise, deblur, sr, inpaint or colorize"
                )))
            }
        })
    }

    /// The measurement noise of the official configs: 0.2 for denoising, else 0.05.
    pub fn default_sigma_y(&self) -> f64 {
        if *self == Operator::Denoise {
            0.2
        } else {
            0.05
        }
    }

    /// Checks the operator against an image of `c` channels and side `s`.
    pub fn validate(&self, c: usize, s: usize) -> crate::Result<()> {
        let bad = |m: String| Err(crate::Error::Config(m));
        match *self {
            Operator::Deblur { kernel_size, sigma } => {
                if kernel_size % 2 == 0 || kernel_size == 0 || !(sigma.is_finite() && sigma > 0.0) {
                    return bad(format!(
                        "deblur needs an odd kernel_size and sigma > 0, got {kernel_size}, {sigma}"
                    ));
                }
            }
            Operator::SuperRes { scale } => {
                if scale == 0 || !s.is_multiple_of(scale) {
                    return bad(format!("sr scale {scale} does not divide image size {s}"));
                }
            }
            Operator::Inpaint { box_size } => {
                if box_size > s || box_size == 0 {
                    return bad(format!(
                        "inpaint box {box_size}: at least 1 px and at most the image ({s})"
                    ));
                }
            }
            Operator::Colorize => {
                if c < 2 {
                    return bad("colorize needs a colour model (channels >= 2)".into());
                }
            }
            Operator::Denoise => {}
        }
        Ok(())
    }

    /// Whether `H` acts locally (a pixel of `H x` depends on a neighbourhood of `x`), so that a
    /// larger image can be restored tile by tile. The fixed centred box of inpainting is not.
    pub fn is_local(&self) -> bool {
        !matches!(self, Operator::Inpaint { .. })
    }

    /// Shape `[Cy, Hy, Wy]` of a measurement of an image `[c, s, s]`.
    pub fn measurement_shape(&self, c: usize, s: usize) -> [usize; 3] {
        match *self {
            Operator::SuperRes { scale } => [c, s / scale, s / scale],
            Operator::Colorize => [1, s, s],
            _ => [c, s, s],
        }
    }

    /// Normalised 2-D Gaussian kernel [k, k].
    pub fn gaussian_kernel(kernel_size: usize, sigma: f64) -> Vec<f32> {
        let r = (kernel_size / 2) as f64;
        let g: Vec<f64> = (0..kernel_size)
            .map(|i| (-((i as f64 - r).powi(2)) / (2.0 * sigma * sigma)).exp())
            .collect();
        let s: f64 = g.iter().sum();
        let mut k = Vec::with_capacity(kernel_size * kernel_size);
        for a in &g {
            for b in &g {
                k.push((a * b / (s * s)) as f32);
            }
        }
        k
    }

    /// The mask of kept pixels of box inpainting, [1, 1, s, s] (1 outside the box).
    pub fn inpaint_mask(box_size: usize, s: usize) -> ArrayD<f32> {
        let lo = (s - box_size) / 2;
        let hi = lo + box_size;
        ArrayD::from_shape_fn(IxDyn(&[1, 1, s, s]), |ix| {
            let (i, j) = (ix[2], ix[3]);
            if (lo..hi).contains(&i) && (lo..hi).contains(&j) {
                0.0
            } else {
                1.0
            }
        })
    }

    /// `H x`, without noise.
    ///
    /// # Shapes
    /// - `x`: [N, c, s, s] -> [N, Cy, Hy, Wy] of [`Self::measurement_shape`]
    pub fn forward<B: Backend>(&self, b: &B, x: &B::Tensor, c: usize, s: usize) -> B::Tensor {
        match *self {
            Operator::Denoise => b.identity(x),
            Operator::Deblur { kernel_size, sigma } => {
                let k = Self::gaussian_kernel(kernel_size, sigma);
                let mut w = Vec::with_capacity(c * k.len());
                for _ in 0..c {
                    w.extend_from_slice(&k);
                }
                let w = ArrayD::from_shape_vec(IxDyn(&[c, 1, kernel_size, kernel_size]), w)
                    .expect("kernel shape");
                b.conv2d(x, &b.constant(w), None, 1, kernel_size / 2, c)
            }
            Operator::SuperRes { scale } => b.avg_pool2d(x, scale),
            Operator::Inpaint { box_size } => {
                b.mul(x, &b.constant(Self::inpaint_mask(box_size, s)))
            }
            Operator::Colorize => {
                let w = ArrayD::from_elem(IxDyn(&[1, c, 1, 1]), 1.0 / c as f32);
                b.conv2d(x, &b.constant(w), None, 1, 0, 1)
            }
        }
    }

    /// The lift `y_lift` of a measurement to image space.
    ///
    /// # Shapes
    /// - `y`: [N, Cy, Hy, Wy] -> [N, c, s, s]
    pub fn lift<B: Backend>(&self, b: &B, y: &B::Tensor, c: usize, s: usize) -> B::Tensor {
        match *self {
            Operator::Denoise | Operator::Deblur { .. } | Operator::Inpaint { .. } => b.identity(y),
            Operator::SuperRes { .. } => b.resize_bilinear(y, s, s),
            Operator::Colorize => {
                let ys: Vec<&B::Tensor> = (0..c).map(|_| y).collect();
                b.concat(&ys, 1)
            }
        }
    }

    /// The residual the data-consistency loss compares: `H x` (zero-filled for inpainting, which
    /// `forward` already is).
    pub fn consistency<B: Backend>(&self, b: &B, x: &B::Tensor, c: usize, s: usize) -> B::Tensor {
        self.forward(b, x, c, s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaussian_kernel_sums_to_one_and_is_symmetric() {
        let k = Operator::gaussian_kernel(9, 1.5);
        let s: f32 = k.iter().sum();
        assert!((s - 1.0).abs() < 1e-5);
        assert_eq!(k[0], k[80]);
        assert!(k[40] > k[39]);
    }

    #[test]
    fn inpaint_mask_is_centred() {
        let m = Operator::inpaint_mask(16, 32);
        assert_eq!(m.sum(), (32 * 32 - 16 * 16) as f32);
        assert_eq!(m[[0, 0, 8, 8]], 0.0);
        assert_eq!(m[[0, 0, 7, 8]], 1.0);
        assert_eq!(m[[0, 0, 23, 23]], 0.0);
        assert_eq!(m[[0, 0, 24, 23]], 1.0);
    }

    #[test]
    fn yaml_round_trip() {
        let op: Operator =
            serde_yaml::from_str("task: deblur\nkernel_size: 9\nsigma: 1.0\n").unwrap();
        assert_eq!(
            op,
            Operator::Deblur {
                kernel_size: 9,
                sigma: 1.0
            }
        );
        assert!(Operator::SuperRes { scale: 3 }.validate(1, 32).is_err());
        assert_eq!(Operator::Colorize.measurement_shape(3, 32), [1, 32, 32]);
    }
}
