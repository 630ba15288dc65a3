//! guided-diffusion's ADM `UNetModel` (Dhariwal & Nichol, "Diffusion Models Beat GANs on Image
//! Synthesis", 2021; openai/guided-diffusion `guided_diffusion/unet.py`).
//!
//! The module tree and every parameter name follow the reference, so a published checkpoint
//! (`ffhq_10m.pt`, `256x256_diffusion_uncond.pt`) loads as it is. 2-D only.

use crate::{Backend, Error, Result};
use ndarray::{ArrayD, IxDyn};
use serde::{Deserialize, Serialize};

/// Constructor arguments of guided-diffusion's `UNetModel`, with the reference's key names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UNetConfig {
    /// Side of the (square) images, in pixels.
    pub image_size: usize,
    /// Channels of the input image.
    pub in_channels: usize,
    /// Base channel count.
    pub model_channels: usize,
    /// Channels of the output (2x `in_channels` with learned sigma).
    pub out_channels: usize,
    /// Residual blocks per resolution.
    pub num_res_blocks: usize,
    /// Resolutions, in pixels, at which attention is used (the reference's command line form).
    #[serde(default)]
    pub attention_resolutions: Vec<usize>,
    /// Dropout probability (training only).
    #[serde(default)]
    pub dropout: f64,
    /// Channel multiplier per resolution.
    pub channel_mult: Vec<usize>,
    /// Learned convolutions in the up/down samplers (else nearest / average pooling only).
    #[serde(default = "yes")]
    pub conv_resample: bool,
    /// Class-conditional when set: a label embedding of this many classes.
    #[serde(default)]
    pub num_classes: Option<usize>,
    /// Attention heads (used when `num_head_channels` is -1).
    #[serde(default = "one")]
    pub num_heads: i64,
    /// Channels per head; -1 to use `num_heads`.
    #[serde(default = "minus_one")]
    pub num_head_channels: i64,
    /// Heads in the decoder; -1 for `num_heads`.
    #[serde(default = "minus_one")]
    pub num_heads_upsample: i64,
    /// FiLM-like conditioning of the residual blocks on the time embedding.
    #[serde(default)]
    pub use_scale_shift_norm: bool,
    /// Residual blocks instead of plain samplers for up/down sampling.
    #[serde(default)]
    pub resblock_updown: bool,
    /// `QKVAttention` (split qkv before heads) instead of `QKVAttentionLegacy`.
    #[serde(default)]
    pub use_new_attention_order: bool,
    /// Groups of every GroupNorm: the reference's 32 (its `GroupNorm32`) by default. With
    /// `model_channels: 32` that is one channel per group, which removes each channel's spatial
    /// mean, so the network can hardly carry an image's mean colour to its output; fewer groups
    /// keep part of it (README, colorization). Parameter names and shapes do not depend on it.
    #[serde(default = "thirty_two", skip_serializing_if = "is_thirty_two")]
    pub norm_groups: usize,
    /// Accepted for compatibility with the reference's arguments; has no effect (fp32 here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_fp16: Option<bool>,
    /// Accepted for compatibility with the reference's arguments; has no effect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_checkpoint: Option<bool>,
}

fn yes() -> bool {
    true
}
fn one() -> i64 {
    1
}
fn minus_one() -> i64 {
    -1
}
fn thirty_two() -> usize {
    32
}
fn is_thirty_two(g: &usize) -> bool {
    *g == 32
}

impl UNetConfig {
    /// Reads a config from YAML or JSON (JSON is YAML) with the reference's keys.
    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::ConfigFile {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        let cfg: Self = serde_yaml::from_str(&text).map_err(|e| Error::ConfigFile {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        cfg.validate().map_err(|e| Error::ConfigFile {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Ok(cfg)
    }

    /// Checks the invariants the reference assumes.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.channel_mult.is_empty() || self.channel_mult.contains(&0) {
            return bad(format!(
                "channel_mult {:?}: one or more levels, each at least 1",
                self.channel_mult
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad(format!("dropout {}: a probability in [0, 1)", self.dropout));
        }
        let down = 1usize << (self.channel_mult.len() - 1);
        if !self.image_size.is_multiple_of(down) {
            return bad(format!(
                "image_size {} is not divisible by 2^(levels-1) = {down}",
                self.image_size
            ));
        }
        if self.norm_groups == 0 {
            return bad("norm_groups: at least 1".into());
        }
        for (ch, what) in self.channel_counts() {
            if ch % self.norm_groups != 0 {
                return bad(format!(
                    "{what} has {ch} channels; GroupNorm with norm_groups {} needs a multiple of it",
                    self.norm_groups
                ));
            }
        }
        for &r in &self.attention_resolutions {
            if r == 0 || !self.image_size.is_multiple_of(r) {
                return bad(format!(
                    "attention resolution {r} does not divide image_size"
                ));
            }
        }
        if self.num_head_channels == -1 && self.num_heads < 1 {
            return bad("num_heads must be >= 1 when num_head_channels is -1".into());
        }
        Ok(())
    }

    fn channel_counts(&self) -> Vec<(usize, String)> {
        self.channel_mult
            .iter()
            .enumerate()
            .map(|(i, m)| (m * self.model_channels, format!("level {i}")))
            .collect()
    }

    /// The attention resolutions as downsampling rates `ds`, as the reference's constructor takes them.
    pub fn attention_ds(&self) -> Vec<usize> {
        self.attention_resolutions
            .iter()
            .map(|r| self.image_size / r)
            .collect()
    }

    fn heads_upsample(&self) -> i64 {
        if self.num_heads_upsample == -1 {
            self.num_heads
        } else {
            self.num_heads_upsample
        }
    }
}

/// One layer of a `TimestepEmbedSequential`.
#[derive(Debug, Clone)]
enum Layer {
    Conv { name: String, stride: usize },
    Res(ResBlock),
    Attn(AttentionBlock),
    Up { conv: Option<String> },
    Down { conv: Option<String> },
}

/// guided-diffusion's `ResBlock` (parameters under `name`).
#[derive(Debug, Clone)]
pub struct ResBlock {
    /// Parameter prefix, e.g. `input_blocks.1.0`.
    pub name: String,
    /// `use_scale_shift_norm`.
    pub scale_shift: bool,
    /// Nearest 2x upsampling inside the block.
    pub up: bool,
    /// 2x average pooling inside the block.
    pub down: bool,
    /// A 1x1 `skip_connection` conv (input and output channels differ).
    pub has_skip_conv: bool,
    /// Output channels.
    pub out_channels: usize,
    /// Dropout of `out_layers.2`.
    pub dropout: f64,
    /// GroupNorm groups (`norm_groups`).
    pub groups: usize,
}

/// guided-diffusion's `AttentionBlock` (parameters under `name`).
#[derive(Debug, Clone)]
pub struct AttentionBlock {
    /// Parameter prefix.
    pub name: String,
    /// Channels.
    pub channels: usize,
    /// Side of the feature map it sees (image_size / ds).
    pub side: usize,
    /// Heads.
    pub heads: usize,
    /// `QKVAttention` (true) or `QKVAttentionLegacy`.
    pub new_order: bool,
    /// GroupNorm groups (`norm_groups`).
    pub groups: usize,
}

/// The ADM UNet: a module tree of names, no weights. Weights come from the backend.
#[derive(Debug, Clone)]
pub struct UNetModel {
    /// The config it was built from.
    pub config: UNetConfig,
    input_blocks: Vec<Vec<Layer>>,
    middle_block: Vec<Layer>,
    output_blocks: Vec<Vec<Layer>>,
    shapes: Vec<(String, Vec<usize>)>,
}

const EPS: f64 = 1e-5;

/// Builds the module tree and the parameter list of a config, in the reference's order.
struct Builder<'c> {
    c: &'c UNetConfig,
    /// Time-embedding width.
    ted: usize,
    shapes: Vec<(String, Vec<usize>)>,
}

impl Builder<'_> {
    fn conv(&mut self, n: &str, i: usize, o: usize, k: usize) {
        self.shapes.push((format!("{n}.weight"), vec![o, i, k, k]));
        self.shapes.push((format!("{n}.bias"), vec![o]));
    }

    fn linear(&mut self, n: &str, i: usize, o: usize) {
        self.shapes.push((format!("{n}.weight"), vec![o, i]));
        self.shapes.push((format!("{n}.bias"), vec![o]));
    }

    fn norm(&mut self, n: &str, ch: usize) {
        self.shapes.push((format!("{n}.weight"), vec![ch]));
        self.shapes.push((format!("{n}.bias"), vec![ch]));
    }

    /// `ResBlock(ch -> out)`, optionally resampling.
    fn res(&mut self, name: String, ch: usize, out: usize, up: bool, down: bool) -> Layer {
        let c = self.c;
        self.norm(&format!("{name}.in_layers.0"), ch);
        self.conv(&format!("{name}.in_layers.2"), ch, out, 3);
        let emb_out = if c.use_scale_shift_norm { 2 * out } else { out };
        self.linear(&format!("{name}.emb_layers.1"), self.ted, emb_out);
        self.norm(&format!("{name}.out_layers.0"), out);
        self.conv(&format!("{name}.out_layers.3"), out, out, 3);
        let has_skip_conv = out != ch;
        if has_skip_conv {
            self.conv(&format!("{name}.skip_connection"), ch, out, 1);
        }
        Layer::Res(ResBlock {
            name,
            scale_shift: c.use_scale_shift_norm,
            up,
            down,
            has_skip_conv,
            out_channels: out,
            dropout: c.dropout,
            groups: c.norm_groups,
        })
    }

    /// `AttentionBlock(ch)` at downsampling factor `ds`.
    fn attn(&mut self, name: String, ch: usize, num_heads: i64, ds: usize) -> Result<Layer> {
        let c = self.c;
        let heads = if c.num_head_channels == -1 {
            num_heads as usize
        } else {
            let hc = c.num_head_channels as usize;
            if hc == 0 || !ch.is_multiple_of(hc) {
                return Err(Error::Config(format!(
                    "{ch} channels are not divisible by num_head_channels {hc}"
                )));
            }
            ch / hc
        };
        if heads == 0 || !ch.is_multiple_of(heads) {
            return Err(Error::Config(format!(
                "{ch} channels not divisible into {heads} heads"
            )));
        }
        self.norm(&format!("{name}.norm"), ch);
        self.shapes
            .push((format!("{name}.qkv.weight"), vec![3 * ch, ch, 1]));
        self.shapes.push((format!("{name}.qkv.bias"), vec![3 * ch]));
        self.shapes
            .push((format!("{name}.proj_out.weight"), vec![ch, ch, 1]));
        self.shapes
            .push((format!("{name}.proj_out.bias"), vec![ch]));
        Ok(Layer::Attn(AttentionBlock {
            name,
            channels: ch,
            side: c.image_size / ds,
            heads,
            new_order: c.use_new_attention_order,
            groups: c.norm_groups,
        }))
    }

    /// A resampling layer: a resblock with `up`/`down`, a conv, or a plain resize.
    fn resample(&mut self, name: String, ch: usize, up: bool) -> Layer {
        if self.c.resblock_updown {
            return self.res(name, ch, ch, up, !up);
        }
        let conv = self.c.conv_resample.then(|| {
            let n = format!("{name}.{}", if up { "conv" } else { "op" });
            self.conv(&n, ch, ch, 3);
            n
        });
        if up {
            Layer::Up { conv }
        } else {
            Layer::Down { conv }
        }
    }
}

/// What the encoder hands the rest: its blocks, the channels of each skip, and where it ends.
struct Encoder {
    blocks: Vec<Vec<Layer>>,
    skips: Vec<usize>,
    ch: usize,
    ds: usize,
}

impl UNetModel {
    /// Builds the module tree of `config` exactly as the reference's constructor does.
    pub fn new(config: &UNetConfig) -> Result<Self> {
        config.validate()?;
        let mc = config.model_channels;
        let mut b = Builder {
            c: config,
            ted: mc * 4,
            shapes: Vec::new(),
        };
        b.linear("time_embed.0", mc, b.ted);
        b.linear("time_embed.2", b.ted, b.ted);
        if let Some(n) = config.num_classes {
            b.shapes.push(("label_emb.weight".into(), vec![n, b.ted]));
        }
        let enc = Self::encoder(&mut b)?;
        let (ch, ds) = (enc.ch, enc.ds);
        let middle_block = vec![
            b.res("middle_block.0".into(), ch, ch, false, false),
            b.attn("middle_block.1".into(), ch, config.num_heads, ds)?,
            b.res("middle_block.2".into(), ch, ch, false, false),
        ];
        let (output_blocks, ch) = Self::decoder(&mut b, enc.skips, ch, ds)?;
        b.norm("out.0", ch);
        b.conv("out.2", config.channel_mult[0] * mc, config.out_channels, 3);
        Ok(Self {
            config: config.clone(),
            input_blocks: enc.blocks,
            middle_block,
            output_blocks,
            shapes: b.shapes,
        })
    }

    /// `input_blocks`: the stem conv, then per level `num_res_blocks` resblocks (with attention
    /// at the configured resolutions) and a downsampling layer between levels.
    fn encoder(b: &mut Builder<'_>) -> Result<Encoder> {
        let c = b.c;
        let (mc, attn_ds) = (c.model_channels, c.attention_ds());
        let mut ch = c.channel_mult[0] * mc;
        b.conv("input_blocks.0.0", c.in_channels, ch, 3);
        let mut blocks = vec![vec![Layer::Conv {
            name: "input_blocks.0.0".into(),
            stride: 1,
        }]];
        let mut skips = vec![ch];
        let mut ds = 1;
        for (level, &mult) in c.channel_mult.iter().enumerate() {
            for _ in 0..c.num_res_blocks {
                let i = blocks.len();
                let out = mult * mc;
                let mut layers = vec![b.res(format!("input_blocks.{i}.0"), ch, out, false, false)];
                ch = out;
                if attn_ds.contains(&ds) {
                    layers.push(b.attn(format!("input_blocks.{i}.1"), ch, c.num_heads, ds)?);
                }
                blocks.push(layers);
                skips.push(ch);
            }
            if level != c.channel_mult.len() - 1 {
                let i = blocks.len();
                blocks.push(vec![b.resample(format!("input_blocks.{i}.0"), ch, false)]);
                skips.push(ch);
                ds *= 2;
            }
        }
        Ok(Encoder {
            blocks,
            skips,
            ch,
            ds,
        })
    }

    /// `output_blocks`: per level, from the deepest, `num_res_blocks + 1` resblocks on the
    /// concatenated skip (with attention where configured) and an upsampling layer between
    /// levels. Returns the blocks and the channels they end with.
    fn decoder(
        b: &mut Builder<'_>,
        mut skips: Vec<usize>,
        mut ch: usize,
        mut ds: usize,
    ) -> Result<(Vec<Vec<Layer>>, usize)> {
        let c = b.c;
        let (mc, attn_ds) = (c.model_channels, c.attention_ds());
        let mut blocks = Vec::new();
        for (level, &mult) in c.channel_mult.iter().enumerate().rev() {
            for i in 0..=c.num_res_blocks {
                let k = blocks.len();
                let ich = skips.pop().expect("input block channels");
                let out = mc * mult;
                let mut layers =
                    vec![b.res(format!("output_blocks.{k}.0"), ch + ich, out, false, false)];
                ch = out;
                if attn_ds.contains(&ds) {
                    let j = layers.len();
                    let name = format!("output_blocks.{k}.{j}");
                    layers.push(b.attn(name, ch, c.heads_upsample(), ds)?);
                }
                if level > 0 && i == c.num_res_blocks {
                    let j = layers.len();
                    layers.push(b.resample(format!("output_blocks.{k}.{j}"), ch, true));
                    ds /= 2;
                }
                blocks.push(layers);
            }
        }
        Ok((blocks, ch))
    }

    /// Every parameter name with its shape, in the reference's state-dict order... up to the
    /// order of sibling modules (names are what matter).
    pub fn param_shapes(&self) -> &[(String, Vec<usize>)] {
        &self.shapes
    }

    /// Number of scalar parameters.
    pub fn num_params(&self) -> usize {
        self.shapes
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }

    /// Noise prediction (and, with learned sigma, the variance channels).
    ///
    /// # Shapes
    /// - `x`: [N, in_channels, S, S]
    /// - `timesteps`: N values, or one value shared by the whole batch
    /// - `y`: optional class labels as one-hot-free indices are not supported through the backend;
    ///   pass the label embedding rows directly as `[N, 4 * model_channels]` when `num_classes` is set
    /// - returns [N, out_channels, S, S]
    pub fn forward<B: Backend>(
        &self,
        b: &B,
        x: &B::Tensor,
        timesteps: &[f32],
        class_emb: Option<&B::Tensor>,
    ) -> Result<B::Tensor> {
        let emb = self.embed(b, timesteps, class_emb)?;
        let mut hs = Vec::with_capacity(self.input_blocks.len());
        let mut h = self.input_block(b, 0, x, &emb)?;
        hs.push(h);
        for i in 1..self.input_blocks.len() {
            h = self.input_block(b, i, hs.last().expect("nonempty"), &emb)?;
            hs.push(h);
        }
        let mut h = self.middle_block(b, hs.last().expect("nonempty"), &emb)?;
        for i in 0..self.output_blocks.len() {
            let skip = hs.pop().expect("skip connection");
            h = self.output_block(b, i, &h, &skip, &emb)?;
        }
        self.out(b, &h)
    }

    // The stages of `forward`, for callers that run it block by block (gradient checkpointing
    // in training). `forward` is exactly their composition.

    /// The time (and class) embedding after the SiLU that starts every `emb_layers`:
    /// [N|1, 4 model_channels].
    pub fn embed<B: Backend>(
        &self,
        b: &B,
        timesteps: &[f32],
        class_emb: Option<&B::Tensor>,
    ) -> Result<B::Tensor> {
        let mc = self.config.model_channels;
        let t_emb = b.constant(timestep_embedding(timesteps, mc)); // [N|1, mc]
        let h = b.linear(
            &t_emb,
            &b.param("time_embed.0.weight")?,
            &b.param("time_embed.0.bias")?,
        );
        let h = b.silu(&h);
        let mut emb = b.linear(
            &h,
            &b.param("time_embed.2.weight")?,
            &b.param("time_embed.2.bias")?,
        ); // [N|1, 4mc]
        match (self.config.num_classes, class_emb) {
            (Some(_), Some(ce)) => emb = b.add(&emb, ce),
            (Some(_), None) => {
                return Err(Error::Config(
                    "class-conditional UNet called without class embedding".into(),
                ))
            }
            _ => {}
        }
        Ok(b.silu(&emb)) // every emb_layers starts with SiLU: compute it once
    }

    /// Number of `input_blocks` (and of skip connections).
    pub fn num_input_blocks(&self) -> usize {
        self.input_blocks.len()
    }

    /// Number of `output_blocks`.
    pub fn num_output_blocks(&self) -> usize {
        self.output_blocks.len()
    }

    /// `input_blocks[i]` on `x` (the previous block's output, or the image for `i = 0`).
    pub fn input_block<B: Backend>(
        &self,
        b: &B,
        i: usize,
        x: &B::Tensor,
        emb: &B::Tensor,
    ) -> Result<B::Tensor> {
        apply_seq(b, &self.input_blocks[i], x, emb)
    }

    /// `middle_block` on the last input block's output.
    pub fn middle_block<B: Backend>(
        &self,
        b: &B,
        h: &B::Tensor,
        emb: &B::Tensor,
    ) -> Result<B::Tensor> {
        apply_seq(b, &self.middle_block, h, emb)
    }

    /// `output_blocks[i]` on `cat(h, skip)`, `skip` the output of `input_blocks[n - 1 - i]`.
    pub fn output_block<B: Backend>(
        &self,
        b: &B,
        i: usize,
        h: &B::Tensor,
        skip: &B::Tensor,
        emb: &B::Tensor,
    ) -> Result<B::Tensor> {
        let cat = b.concat(&[h, skip], 1);
        apply_seq(b, &self.output_blocks[i], &cat, emb)
    }

    /// The head `out`: GroupNorm, SiLU, the zero-initialised 3x3 conv.
    pub fn out<B: Backend>(&self, b: &B, h: &B::Tensor) -> Result<B::Tensor> {
        let h = norm(b, "out.0", self.config.norm_groups, h)?;
        let h = b.silu(&h);
        conv(b, "out.2", &h, 1, 1)
    }

    /// Rows of `label_emb.weight` for the given class indices (class-conditional models only).
    pub fn class_embedding<B: Backend>(&self, b: &B, onehot: &B::Tensor) -> Result<B::Tensor> {
        // onehot [N, num_classes] @ label_emb.weight [num_classes, 4mc]
        let w = b.param("label_emb.weight")?;
        Ok(b.matmul(onehot, &w))
    }
}

/// Sinusoidal timestep embedding of the reference (`timestep_embedding`, max period 10000):
/// `[cos(t f_0..f_{half-1}), sin(t f_0..)]`, `f_i = exp(-ln(10000) i / half)`.
pub fn timestep_embedding(timesteps: &[f32], dim: usize) -> ArrayD<f32> {
    let half = dim / 2;
    let mut out = ArrayD::zeros(IxDyn(&[timesteps.len(), dim]));
    for (n, &t) in timesteps.iter().enumerate() {
        for i in 0..half {
            // The reference computes freqs in fp32 and multiplies in fp32.
            let f = (-(10000f32).ln() * i as f32 / half as f32).exp();
            let a = t * f;
            out[[n, i]] = a.cos();
            out[[n, half + i]] = a.sin();
        }
    }
    out
}

fn conv<B: Backend>(
    b: &B,
    name: &str,
    x: &B::Tensor,
    stride: usize,
    padding: usize,
) -> Result<B::Tensor> {
    let w = b.param(&format!("{name}.weight"))?;
    let bias = b.param(&format!("{name}.bias"))?;
    Ok(b.conv2d(x, &w, Some(&bias), stride, padding, 1))
}

fn norm<B: Backend>(b: &B, name: &str, groups: usize, x: &B::Tensor) -> Result<B::Tensor> {
    let w = b.param(&format!("{name}.weight"))?;
    let bias = b.param(&format!("{name}.bias"))?;
    Ok(b.group_norm(x, groups, &w, &bias, EPS))
}

fn apply_seq<B: Backend>(
    b: &B,
    layers: &[Layer],
    x: &B::Tensor,
    emb: &B::Tensor,
) -> Result<B::Tensor> {
    let mut h: Option<B::Tensor> = None;
    for layer in layers {
        let inp = h.as_ref().unwrap_or(x);
        h = Some(match layer {
            Layer::Conv { name, stride } => conv(b, name, inp, *stride, 1)?,
            Layer::Res(r) => r.forward(b, inp, emb)?,
            Layer::Attn(a) => a.forward(b, inp)?,
            Layer::Up { conv: c } => upsample(b, c.as_deref(), inp)?,
            Layer::Down { conv: c } => downsample(b, c.as_deref(), inp)?,
        });
    }
    Ok(h.expect("a block has at least one layer"))
}

/// guided-diffusion's `Upsample`: nearest 2x, then a 3x3 conv named `conv` when given.
pub fn upsample<B: Backend>(b: &B, conv_name: Option<&str>, x: &B::Tensor) -> Result<B::Tensor> {
    let u = b.upsample_nearest2x(x);
    match conv_name {
        Some(n) => conv(b, n, &u, 1, 1),
        None => Ok(u),
    }
}

/// guided-diffusion's `Downsample`: a 3x3 stride-2 conv named `op` when given, else 2x2 average pooling.
pub fn downsample<B: Backend>(b: &B, conv_name: Option<&str>, x: &B::Tensor) -> Result<B::Tensor> {
    match conv_name {
        Some(n) => conv(b, n, x, 2, 1),
        None => Ok(b.avg_pool2d(x, 2)),
    }
}

impl ResBlock {
    /// # Shapes
    /// - `x`: [N, C, H, W], `emb`: SiLU of the time embedding, [N|1, 4mc]
    /// - returns [N, out, H', W'] (H' = 2H up, H/2 down)
    pub fn forward<B: Backend>(&self, b: &B, x: &B::Tensor, emb: &B::Tensor) -> Result<B::Tensor> {
        let n = &self.name;
        let h = norm(b, &format!("{n}.in_layers.0"), self.groups, x)?;
        let h = b.silu(&h);
        let resample = |t: &B::Tensor| {
            if self.up {
                b.upsample_nearest2x(t)
            } else {
                b.avg_pool2d(t, 2)
            }
        };
        let (h, x_resampled) = if self.up || self.down {
            (resample(&h), Some(resample(x)))
        } else {
            (h, None)
        };
        let x = x_resampled.as_ref().unwrap_or(x);
        let h = conv(b, &format!("{n}.in_layers.2"), &h, 1, 1)?;
        let e = b.linear(
            emb,
            &b.param(&format!("{n}.emb_layers.1.weight"))?,
            &b.param(&format!("{n}.emb_layers.1.bias"))?,
        );
        let out = self.out_channels as i64;
        let h = if self.scale_shift {
            let e = b.reshape(&e, &[-1, 2 * out, 1, 1]); // [N, 2C, 1, 1]
            let scale = b.narrow(&e, 1, 0, self.out_channels);
            let shift = b.narrow(&e, 1, self.out_channels, self.out_channels);
            let h = norm(b, &format!("{n}.out_layers.0"), self.groups, &h)?;
            let h = b.add(&b.mul(&h, &b.add_scalar(&scale, 1.0)), &shift);
            b.silu(&h)
        } else {
            let e = b.reshape(&e, &[-1, out, 1, 1]);
            let h = b.add(&h, &e);
            let h = norm(b, &format!("{n}.out_layers.0"), self.groups, &h)?;
            b.silu(&h)
        };
        let h = b.dropout(&h, self.dropout); // out_layers.2
        let h = conv(b, &format!("{n}.out_layers.3"), &h, 1, 1)?;
        let skip = if self.has_skip_conv {
            conv(b, &format!("{n}.skip_connection"), x, 1, 0)?
        } else {
            return Ok(b.add(x, &h));
        };
        Ok(b.add(&skip, &h))
    }
}

impl AttentionBlock {
    /// # Shapes
    /// - `x`: [N, C, S, S] -> [N, C, S, S]
    pub fn forward<B: Backend>(&self, b: &B, x: &B::Tensor) -> Result<B::Tensor> {
        let n = &self.name;
        let c = self.channels as i64;
        let t = (self.side * self.side) as i64;
        let heads = self.heads as i64;
        let ch = c / heads;
        // GroupNorm does not care whether the spatial dims are flattened: normalise in 4-D.
        let h = norm(b, &format!("{n}.norm"), self.groups, x)?; // [N, C, S, S]
        let h = b.reshape(&h, &[-1, c, t]); // [N, C, T]
        let qkv = conv1x1(b, &format!("{n}.qkv"), &h, 3 * self.channels)?; // [N, 3C, T]
        let scale = 1.0 / (ch as f32).sqrt().sqrt();
        let (q, k, v) = if self.new_order {
            // QKVAttention: split q, k, v first, then heads.
            let q = b.reshape(&b.narrow(&qkv, 1, 0, self.channels), &[-1, ch, t]);
            let k = b.reshape(
                &b.narrow(&qkv, 1, self.channels, self.channels),
                &[-1, ch, t],
            );
            let v = b.reshape(
                &b.narrow(&qkv, 1, 2 * self.channels, self.channels),
                &[-1, ch, t],
            );
            (q, k, v)
        } else {
            // QKVAttentionLegacy: heads first, then q, k, v within each head.
            let r = b.reshape(&qkv, &[-1, 3 * ch, t]); // [N*heads, 3ch, T]
            let chu = ch as usize;
            (
                b.narrow(&r, 1, 0, chu),
                b.narrow(&r, 1, chu, chu),
                b.narrow(&r, 1, 2 * chu, chu),
            )
        };
        let q = b.scale(&q, scale);
        let k = b.scale(&k, scale);
        let w = b.matmul(&b.permute(&q, &[0, 2, 1]), &k); // [N*heads, T, T] = einsum bct,bcs->bts
        let w = b.softmax_last(&w);
        let a = b.matmul(&v, &b.permute(&w, &[0, 2, 1])); // [N*heads, ch, T] = einsum bts,bcs->bct
        let a = b.reshape(&a, &[-1, c, t]); // [N, C, T]
        let h = conv1x1(b, &format!("{n}.proj_out"), &a, self.channels)?;
        let side = self.side as i64;
        let h = b.reshape(&h, &[-1, c, side, side]);
        Ok(b.add(x, &h))
    }
}

/// guided-diffusion's `conv_nd(1, cin, cout, 1)` on [N, cin, T]: a matrix product with the
/// [cout, cin, 1] weight.
fn conv1x1<B: Backend>(b: &B, name: &str, x: &B::Tensor, cout: usize) -> Result<B::Tensor> {
    let w = b.param(&format!("{name}.weight"))?; // [cout, cin, 1]
    let bias = b.param(&format!("{name}.bias"))?; // [cout]
    let w = b.reshape(&w, &[cout as i64, -1]);
    let bias = b.reshape(&bias, &[cout as i64, 1]);
    Ok(b.add(&b.matmul(&w, x), &bias))
}
