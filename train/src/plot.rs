//! Pictures: loss curves and image grids.

use image::{Rgb, RgbImage};

const COLOURS: [[u8; 3]; 6] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
];

/// Loss curves (one per column after `step`, log10 of |value|), on a white canvas with a legend
/// strip of colour swatches in column order.
pub fn curves(rows: &[Vec<f64>], columns: &[String], w: u32, h: u32) -> RgbImage {
    plot(rows, columns, w, h, true)
}

/// Curves of the values themselves (e.g. validation PSNR), each point marked.
pub fn linear_curves(rows: &[Vec<f64>], columns: &[String], w: u32, h: u32) -> RgbImage {
    plot(rows, columns, w, h, false)
}

fn plot(rows: &[Vec<f64>], columns: &[String], w: u32, h: u32, log: bool) -> RgbImage {
    let mut img = RgbImage::from_pixel(w, h, Rgb([255, 255, 255]));
    let (x0, y0, x1, y1) = (40.0, 20.0, w as f64 - 10.0, h as f64 - 20.0);
    let steps: Vec<f64> = rows.iter().map(|r| r[0]).collect();
    let (smin, smax) = (steps[0], *steps.last().expect("rows"));
    for (k, _) in columns.iter().enumerate().take(COLOURS.len()) {
        let vals: Vec<(f64, f64)> = rows
            .iter()
            .filter_map(|r| {
                r.get(k + 1)
                    .map(|&v| (r[0], if log { v.abs().max(1e-12).log10() } else { v }))
            })
            .filter(|(_, v)| v.is_finite())
            .collect();
        if vals.len() < 2 {
            continue;
        }
        let lo = vals.iter().map(|v| v.1).fold(f64::INFINITY, f64::min);
        let hi = vals
            .iter()
            .map(|v| v.1)
            .fold(f64::NEG_INFINITY, f64::max)
            .max(lo + 1e-6);
        let px = |s: f64, v: f64| {
            let x = x0 + (s - smin) / (smax - smin).max(1e-9) * (x1 - x0);
            let y = y1 - (v - lo) / (hi - lo) * (y1 - y0);
            (x, y)
        };
        if !log {
            for &(s, v) in &vals {
                let (x, y) = px(s, v);
                for dx in -2i64..=2 {
                    for dy in -2i64..=2 {
                        let (xx, yy) = (x as i64 + dx, y as i64 + dy);
                        if xx >= 0 && yy >= 0 && (xx as u32) < w && (yy as u32) < h {
                            img.put_pixel(xx as u32, yy as u32, Rgb(COLOURS[k]));
                        }
                    }
                }
            }
        }
        for pair in vals.windows(2) {
            let (a, b) = (px(pair[0].0, pair[0].1), px(pair[1].0, pair[1].1));
            let n = ((b.0 - a.0).abs().max((b.1 - a.1).abs()) as usize).max(1);
            for i in 0..=n {
                let t = i as f64 / n as f64;
                let (x, y) = (a.0 + (b.0 - a.0) * t, a.1 + (b.1 - a.1) * t);
                if x >= 0.0 && y >= 0.0 && (x as u32) < w && (y as u32) < h {
                    img.put_pixel(x as u32, y as u32, Rgb(COLOURS[k]));
                }
            }
        }
        for dx in 0..12 {
            for dy in 0..8 {
                img.put_pixel(4 + dx + 16 * k as u32, 4 + dy, Rgb(COLOURS[k]));
            }
        }
    }
    img
}

/// A grid of `[n, c, s, s]` images in [-1, 1] (c = 1 or 3), `cols` per row, 2 px gaps.
pub fn grid(data: &[f32], n: usize, c: usize, s: usize, cols: usize) -> RgbImage {
    let rows = n.div_ceil(cols);
    let gap = 2;
    let mut img = RgbImage::from_pixel(
        (cols * (s + gap) + gap) as u32,
        (rows * (s + gap) + gap) as u32,
        Rgb([255, 255, 255]),
    );
    let q = |v: f32| (((v.clamp(-1.0, 1.0) + 1.0) * 127.5) + 0.5) as u8;
    for i in 0..n {
        let (gx, gy) = (gap + (i % cols) * (s + gap), gap + (i / cols) * (s + gap));
        for y in 0..s {
            for x in 0..s {
                let at = |k: usize| data[i * c * s * s + k * s * s + y * s + x];
                let p = if c == 1 {
                    [q(at(0)); 3]
                } else {
                    [q(at(0)), q(at(1)), q(at(2))]
                };
                img.put_pixel((gx + x) as u32, (gy + y) as u32, Rgb(p));
            }
        }
    }
    img
}
