//! The small set of tensor ops the ADM UNet, the operators and the bridge need.
//!
//! Like burn's `Backend` (a sum of op traits) but much smaller: exactly what this crate uses.
//! The batch dimension is never known to the model code: every reshape puts `-1` there, so a
//! recording backend can emit a graph with a dynamic batch.

use ndarray::ArrayD;

/// A tensor backend. Tensors are NCHW, f32.
pub trait Backend {
    /// The backend's tensor handle.
    type Tensor;

    /// The weight called `name` (a guided-diffusion state-dict key, e.g. `input_blocks.0.0.weight`).
    fn param(&self, name: &str) -> crate::Result<Self::Tensor>;
    /// A constant tensor.
    fn constant(&self, value: ArrayD<f32>) -> Self::Tensor;

    /// The same tensor (no op; shares storage where the backend can).
    fn identity(&self, x: &Self::Tensor) -> Self::Tensor;
    /// 2-D convolution, `w` [out, in/groups, kh, kw], symmetric zero padding.
    fn conv2d(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        b: Option<&Self::Tensor>,
        stride: usize,
        padding: usize,
        groups: usize,
    ) -> Self::Tensor;
    /// `x @ w^T + b` for `x` [N, in], `w` [out, in].
    fn linear(&self, x: &Self::Tensor, w: &Self::Tensor, b: &Self::Tensor) -> Self::Tensor;
    /// Group normalization over dims 1.. of `x` [N, C, ...] with per-channel affine `w`, `b` [C].
    fn group_norm(
        &self,
        x: &Self::Tensor,
        groups: usize,
        w: &Self::Tensor,
        b: &Self::Tensor,
        eps: f64,
    ) -> Self::Tensor;
    /// `x * sigmoid(x)`.
    fn silu(&self, x: &Self::Tensor) -> Self::Tensor;
    /// Dropout with probability `p` (identity unless the backend is training).
    fn dropout(&self, x: &Self::Tensor, p: f64) -> Self::Tensor;
    /// Hyperbolic tangent.
    fn tanh(&self, x: &Self::Tensor) -> Self::Tensor;
    /// Broadcasting `a + b`.
    fn add(&self, a: &Self::Tensor, b: &Self::Tensor) -> Self::Tensor;
    /// Broadcasting `a - b`.
    fn sub(&self, a: &Self::Tensor, b: &Self::Tensor) -> Self::Tensor;
    /// Broadcasting `a * b`.
    fn mul(&self, a: &Self::Tensor, b: &Self::Tensor) -> Self::Tensor;
    /// `x * s`.
    fn scale(&self, x: &Self::Tensor, s: f32) -> Self::Tensor;
    /// `x + s`.
    fn add_scalar(&self, x: &Self::Tensor, s: f32) -> Self::Tensor;
    /// Batched matrix product with broadcasting of leading dims.
    fn matmul(&self, a: &Self::Tensor, b: &Self::Tensor) -> Self::Tensor;
    /// Softmax over the last dim.
    fn softmax_last(&self, x: &Self::Tensor) -> Self::Tensor;
    /// Reshape; `-1` marks the one inferred dim (the model code puts it on the batch).
    fn reshape(&self, x: &Self::Tensor, shape: &[i64]) -> Self::Tensor;
    /// Permute dims.
    fn permute(&self, x: &Self::Tensor, perm: &[usize]) -> Self::Tensor;
    /// `len` entries of dim `dim` from `start`.
    fn narrow(&self, x: &Self::Tensor, dim: usize, start: usize, len: usize) -> Self::Tensor;
    /// Concatenate along `dim`.
    fn concat(&self, xs: &[&Self::Tensor], dim: usize) -> Self::Tensor;
    /// Nearest-neighbour upsampling by 2 of the last two dims.
    fn upsample_nearest2x(&self, x: &Self::Tensor) -> Self::Tensor;
    /// Average pooling, kernel = stride = `k`, no padding.
    fn avg_pool2d(&self, x: &Self::Tensor, k: usize) -> Self::Tensor;
    /// Bilinear resize of the last two dims to `[h, w]` (half-pixel centres, PyTorch's
    /// `align_corners=False`).
    fn resize_bilinear(&self, x: &Self::Tensor, h: usize, w: usize) -> Self::Tensor;
}
