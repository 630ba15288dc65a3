//! Model configs (YAML, validated on load) and model cards.

use crate::schedule::BetaSchedule;
use crate::{Error, Operator, Result, UNetConfig};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::Path;

/// The diffusion of the prior.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiffusionConfig {
    /// Beta schedule (default: the prior's own linear schedule; the official DAVI code uses `i2sb`).
    #[serde(default)]
    pub schedule: BetaSchedule,
    /// Number of steps `T`.
    #[serde(default = "thousand")]
    pub steps: usize,
    /// The bridge's own beta schedule (absent: the prior's `schedule`, as the models shipped
    /// before it existed). The official code's bridge is `i2sb`: its symmetric betas give
    /// `sigma_fwd(T-1) = 1.48` where the linear ones give 2.25, and its `alpha_bar` sets the
    /// perturbation `h (1 - alpha_bar_a)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge_schedule: Option<BetaSchedule>,
}

impl DiffusionConfig {
    /// The bridge's schedule: `bridge_schedule`, else the prior's.
    pub fn bridge(&self) -> BetaSchedule {
        self.bridge_schedule.unwrap_or(self.schedule)
    }
}

impl Default for DiffusionConfig {
    fn default() -> Self {
        Self {
            schedule: BetaSchedule::Linear,
            steps: 1000,
            bridge_schedule: None,
        }
    }
}

fn thousand() -> usize {
    1000
}

/// The inverse problem a model solves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskConfig {
    /// The operator `H` and its parameters.
    pub operator: Operator,
    /// Measurement noise on the [-1, 1] scale.
    pub sigma_y: f64,
    /// Perturbation of the bridge.
    #[serde(default = "default_h")]
    pub h: f64,
}

fn default_h() -> f64 {
    0.1
}

/// Where training images come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum DataConfig {
    /// Fashion-MNIST IDX files (gzip), padded to 32x32.
    FashionMnist {
        /// Folder of the IDX files.
        #[serde(default = "fmnist_dir")]
        dir: String,
    },
    /// Random crops of photographs (by default the scikit-image sample photos), each downscaled
    /// by `downscale` first so that a crop holds a part of a scene, not a few pixels.
    Photos {
        /// Folder of the photos.
        #[serde(default = "photos_dir")]
        dir: String,
        /// More folders of photos (e.g. `.deps/data/wallpapers`, the photographs of Debian's
        /// `plasma-workspace-wallpapers`).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        extra_dirs: Vec<String>,
        /// Photos held out whole for the test split, by file stem (no scene shared with
        /// training). Empty: every photo gives its left 80% to training and its right 20% to test.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        test_photos: Vec<String>,
        /// Downscaling factor applied to each photo before cropping.
        #[serde(
            default = "photos_downscale",
            skip_serializing_if = "is_default_downscale"
        )]
        downscale: u32,
    },
    /// Any folder of images, resized and centre-cropped.
    Folder {
        /// The folder.
        dir: String,
    },
}

fn fmnist_dir() -> String {
    "/usr/share/datasets/fashion-mnist".into()
}
fn photos_dir() -> String {
    ".deps/data/skimage".into()
}
fn photos_downscale() -> u32 {
    4
}
fn is_default_downscale(d: &u32) -> bool {
    *d == photos_downscale()
}

/// A whole model config, as in `models/configs/*.yaml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaviConfig {
    /// Model name (the zoo folder).
    pub name: String,
    /// The UNet shared by teacher, auxiliary score and implicit networks.
    pub unet: UNetConfig,
    /// The prior's diffusion.
    #[serde(default)]
    pub diffusion: DiffusionConfig,
    /// The task (absent for a prior-only config).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<TaskConfig>,
    /// Training data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<DataConfig>,
    /// Training hyperparameters, read by `davi-train` (free-form here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train: Option<serde_yaml::Value>,
}

impl DaviConfig {
    /// Reads and validates a YAML config.
    pub fn from_file(path: &Path) -> Result<Self> {
        let err = |reason: String| Error::ConfigFile {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let cfg: Self = serde_yaml::from_str(&text).map_err(|e| err(e.to_string()))?;
        cfg.validate().map_err(|e| err(e.to_string()))?;
        Ok(cfg)
    }

    /// Checks the parts against each other.
    pub fn validate(&self) -> Result<()> {
        self.unet.validate()?;
        if let Some(task) = &self.task {
            task.operator
                .validate(self.unet.in_channels, self.unet.image_size)?;
            if task.sigma_y < 0.0 || task.h < 0.0 {
                return Err(Error::Config("sigma_y and h must be >= 0".into()));
            }
        }
        if self.unet.out_channels != self.unet.in_channels
            && self.unet.out_channels != 2 * self.unet.in_channels
        {
            return Err(Error::Config(format!(
                "out_channels {} must be in_channels ({}) or twice it (learned sigma)",
                self.unet.out_channels, self.unet.in_channels
            )));
        }
        if self.diffusion.steps < 2 {
            return Err(Error::Config("diffusion.steps must be >= 2".into()));
        }
        Ok(())
    }

    /// The task, or an error naming the config when it has none.
    pub fn task(&self) -> Result<&TaskConfig> {
        self.task.as_ref().ok_or_else(|| {
            Error::Config(format!(
                "config '{}' has no task (a prior-only config)",
                self.name
            ))
        })
    }

    /// sha256 of the canonical YAML of this config (first 16 hex digits).
    pub fn hash(&self) -> String {
        let text = serde_yaml::to_string(self).expect("config serialises");
        let d = Sha256::digest(text.as_bytes());
        d.iter().take(8).map(|b| format!("{b:02x}")).collect()
    }
}

/// One method's row of an evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalRow {
    /// Images scored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<usize>,
    /// Mean PSNR in dB on [0, 1].
    pub psnr: f64,
    /// Half-width of its 95% interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub psnr_ci95: Option<f64>,
    /// Mean SSIM on [0, 1].
    pub ssim: f64,
    /// Half-width of its 95% interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssim_ci95: Option<f64>,
    /// FID on the Fashion-MNIST classifier's features (full runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fid: Option<f64>,
    /// KID on the same features (paired runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kid: Option<f64>,
    /// Network evaluations per image.
    pub nfe: usize,
    /// Wall time per image.
    pub seconds_per_image: f64,
}

/// `eval:` of a model card.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalTable {
    /// Number of test images.
    pub n: usize,
    /// DAVI, one evaluation.
    pub davi: EvalRow,
    /// DPS with the same prior.
    pub dps: EvalRow,
    /// The lifted measurement itself.
    pub lifted: EvalRow,
    /// DPS's step size in this evaluation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dps_zeta: Option<f64>,
    /// Every method on the same images (those DPS ran on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paired: Option<PairedTable>,
    /// DDRM (20 steps) with the same prior, when run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ddrm: Option<EvalRow>,
    /// The supervised control (same network, plain MSE), when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supervised: Option<EvalRow>,
}

/// `eval.paired:` of a model card: every method scored on the same images.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PairedTable {
    /// The images, the first `n` of the test split.
    pub n: usize,
    /// DAVI.
    pub davi: EvalRow,
    /// DPS.
    pub dps: EvalRow,
    /// The lifted measurement.
    pub lifted: EvalRow,
    /// DDRM, when run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ddrm: Option<EvalRow>,
    /// The supervised control, when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supervised: Option<EvalRow>,
}

/// `card.yaml` of a shipped model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelCard {
    /// Model name.
    pub name: String,
    /// The task and operator.
    pub task: TaskConfig,
    /// Training data, in words.
    pub data: String,
    /// Training steps of DAVI.
    pub training_steps: usize,
    /// Training wall time in seconds.
    pub training_seconds: f64,
    /// Where it trained and evaluated, in words (device, teacher).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notes: Option<String>,
    /// Evaluation, when run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval: Option<EvalTable>,
    /// DPS's step size, tuned on a validation split (`davi-train tune-dps`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dps_tuning: Option<DpsTuning>,
    /// Scores on whole held-out photographs, restored tile by tile (`davi eval --card`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub whole_photos: Option<WholePhotos>,
}

/// `whole_photos:` of a model card: methods scored on whole photographs (`davi eval --card
/// CARD --method NAME`, one row per method).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WholePhotos {
    /// The reference photographs, by relative path.
    pub images: Vec<String>,
    /// Scores per method (`davi`, `lifted`, ...).
    pub methods: std::collections::BTreeMap<String, PhotoRow>,
}

/// One method on whole photographs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhotoRow {
    /// Photographs scored.
    pub n: usize,
    /// Mean PSNR in dB on [0, 1].
    pub psnr: f64,
    /// Half-width of its 95% interval.
    pub psnr_ci95: f64,
    /// Mean SSIM.
    pub ssim: f64,
    /// Half-width of its 95% interval.
    pub ssim_ci95: f64,
}

/// `dps_tuning:` of a model card: the sweep of DPS's step size on validation images.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DpsTuning {
    /// Which images: never the test split.
    pub split: String,
    /// How many.
    pub n: usize,
    /// DPS steps of each run.
    pub steps: usize,
    /// `(zeta, mean PSNR, mean SSIM)` of each zeta tried, in the order tried.
    pub sweep: Vec<(f64, f64, f64)>,
    /// The chosen zeta: the best mean PSNR (of the sweep so far, while incomplete).
    pub zeta: f64,
    /// Whether every zeta of the sweep ran (`tune-dps` records each as it finishes, so a stopped
    /// sweep resumes; `eval` takes only a complete one).
    #[serde(default = "complete_default")]
    pub complete: bool,
}

fn complete_default() -> bool {
    true
}
