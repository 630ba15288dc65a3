//! Restoring images larger than the model: overlapping tiles of the measurement, each restored
//! on its own, blended back with a smooth window so that no seam shows. The grid lives in
//! measurement space; outputs are `scale` times larger (4 for super-resolution x4, else 1).

use ndarray::{s, Array2, Array3, ArrayView3};

/// The tiles of one image.
#[derive(Debug, Clone, PartialEq)]
pub struct Grid {
    /// Tile origins `(y, x)` in measurement space, row by row.
    pub origins: Vec<(usize, usize)>,
    /// Tile side in measurement space `(h, w)`.
    pub tile: (usize, usize),
    /// Measurement size `(h, w)`.
    pub size: (usize, usize),
    /// Output pixels per measurement pixel.
    pub scale: usize,
}

/// Origins along one axis of `len` for tiles of `tile` overlapping by at least `overlap`: evenly
/// spread from 0 to `len - tile`.
fn axis(len: usize, tile: usize, overlap: usize) -> Vec<usize> {
    if len <= tile {
        return vec![0];
    }
    let stride = tile.saturating_sub(overlap).max(1);
    let n = (len - tile).div_ceil(stride) + 1;
    (0..n).map(|i| i * (len - tile) / (n - 1)).collect()
}

impl Grid {
    /// The grid of a measurement of `size` for a model taking `tile` and returning `scale` times
    /// as many pixels per side. `Err` when the image is smaller than a tile.
    pub fn new(
        size: (usize, usize),
        tile: (usize, usize),
        overlap: usize,
        scale: usize,
    ) -> Result<Self, String> {
        if size.0 < tile.0 || size.1 < tile.1 {
            return Err(format!(
                "{}x{} is smaller than the model's {}x{}",
                size.1, size.0, tile.1, tile.0
            ));
        }
        let ys = axis(size.0, tile.0, overlap);
        let xs = axis(size.1, tile.1, overlap);
        let origins = ys
            .iter()
            .flat_map(|&y| xs.iter().map(move |&x| (y, x)))
            .collect();
        Ok(Self {
            origins,
            tile,
            size,
            scale,
        })
    }

    /// Number of tiles.
    pub fn len(&self) -> usize {
        self.origins.len()
    }

    /// Never true: a grid has at least one tile.
    pub fn is_empty(&self) -> bool {
        self.origins.is_empty()
    }

    /// Whether the image is exactly one tile (restored as it is, with no blending).
    pub fn is_single(&self) -> bool {
        self.origins.len() == 1 && self.size == self.tile
    }

    /// Tile `i` of the measurement `m` `[c, H, W]`, copied.
    pub fn cut(&self, m: ArrayView3<f32>, i: usize) -> Array3<f32> {
        let (y, x) = self.origins[i];
        m.slice(s![.., y..y + self.tile.0, x..x + self.tile.1])
            .to_owned()
    }
}

/// The blending window of an output tile `[h, w]`: a raised cosine in each direction, never
/// zero, so that pixels near the tile's edge count little where a neighbour covers them.
pub fn window(h: usize, w: usize) -> Array2<f32> {
    let w1 = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|i| {
                let t = (i as f32 + 0.5) / n as f32;
                (std::f32::consts::PI * t).sin().powi(2).max(1e-3)
            })
            .collect()
    };
    let (wy, wx) = (w1(h), w1(w));
    Array2::from_shape_fn((h, w), |(i, j)| wy[i] * wx[j])
}

/// The weighted sum of an image's restored tiles, until all have arrived.
pub struct Canvas {
    sum: Array3<f32>,
    weight: Array2<f32>,
    window: Array2<f32>,
    missing: usize,
}

impl Canvas {
    /// An empty canvas for `grid`'s output, `c` channels.
    pub fn new(grid: &Grid, c: usize) -> Self {
        let (h, w) = (grid.size.0 * grid.scale, grid.size.1 * grid.scale);
        let (th, tw) = (grid.tile.0 * grid.scale, grid.tile.1 * grid.scale);
        Self {
            sum: Array3::zeros((c, h, w)),
            weight: Array2::zeros((h, w)),
            window: window(th, tw),
            missing: grid.len(),
        }
    }

    /// Adds output tile `i` `[c, th, tw]`; returns the blended image once every tile is in.
    pub fn add(&mut self, grid: &Grid, i: usize, tile: ArrayView3<f32>) -> Option<Array3<f32>> {
        let (y, x) = grid.origins[i];
        let (y, x) = (y * grid.scale, x * grid.scale);
        let (th, tw) = (self.window.nrows(), self.window.ncols());
        let mut wsum = self.weight.slice_mut(s![y..y + th, x..x + tw]);
        wsum += &self.window;
        let mut sum = self.sum.slice_mut(s![.., y..y + th, x..x + tw]);
        for (mut plane, t) in sum.outer_iter_mut().zip(tile.outer_iter()) {
            ndarray::Zip::from(&mut plane)
                .and(&t)
                .and(&self.window)
                .for_each(|a, &b, &w| *a += b * w);
        }
        self.missing -= 1;
        if self.missing > 0 {
            return None;
        }
        let mut out = std::mem::take(&mut self.sum);
        for mut plane in out.outer_iter_mut() {
            plane.zip_mut_with(&self.weight, |a, &w| *a /= w);
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grids_cover_the_image_with_the_asked_overlap() {
        let g = Grid::new((32, 32), (32, 32), 8, 1).unwrap();
        assert!(g.is_single());
        let g = Grid::new((70, 100), (32, 32), 8, 1).unwrap();
        let ys: Vec<usize> = g.origins.iter().map(|o| o.0).collect();
        assert_eq!(*ys.last().unwrap(), 70 - 32);
        for w in g.origins.windows(2) {
            if w[0].0 == w[1].0 {
                assert!(w[1].1 - w[0].1 <= 32 - 8, "{w:?}");
            }
        }
        assert!(Grid::new((20, 40), (32, 32), 8, 1).is_err());
    }

    #[test]
    fn blending_a_constant_gives_it_back_exactly_enough() {
        let g = Grid::new((50, 61), (8, 8), 2, 4).unwrap();
        let mut c = Canvas::new(&g, 3);
        let tile = Array3::from_elem((3, 32, 32), 0.25f32);
        let mut out = None;
        for i in 0..g.len() {
            out = c.add(&g, i, tile.view());
        }
        let out = out.unwrap();
        assert_eq!(out.dim(), (3, 200, 244));
        assert!(out.iter().all(|v| (v - 0.25).abs() < 1e-5));
    }
}
