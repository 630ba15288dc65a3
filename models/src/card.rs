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
        /// Pictures left out of every split, by file stem (e.g. the synthetic ones among
        /// scikit-image's samples: a colour wheel, an RGB chessboard, a logo).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        exclude: Vec<String>,
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
        // A config is a page of YAML: a device or a pipe named as one is refused, not read.
        let bytes = crate::atomic::read_regular(path, 16 << 20).map_err(|e| err(e.to_string()))?;
        let text = String::from_utf8(bytes).map_err(|_| err("not UTF-8 text".into()))?;
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
            // Finite and in range: a NaN compares false with everything, and a sigma_y of
            // 1e30 drowns any image.
            let ok = |v: f64| v.is_finite() && (0.0..=10.0).contains(&v);
            if !ok(task.sigma_y) || !ok(task.h) {
                return Err(Error::Config(format!(
                    "task.sigma_y {} and task.h {} must be finite, in [0, 10] (images are on [-1, 1])",
                    task.sigma_y, task.h
                )));
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
        // The name is a folder's name (`runs/<name>`, `models/zoo/<name>`): `../x`, `/abs` or ""
        // would put a run outside `runs/` or in `runs/` itself.
        let plain = !self.name.is_empty()
            && !self.name.starts_with('.')
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !plain {
            return Err(Error::Config(format!(
                "name {:?}: letters, digits, '-', '_' and '.', not starting with '.' (it names the run's folder)",
                self.name
            )));
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
    /// DPS with the same prior, when run (an evaluation with `--dps-n 0` has no DPS row, not a
    /// row of NaN).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dps: Option<EvalRow>,
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
    /// The spread of DAVI's posterior samples, when drawn (`davi-train eval --samples K`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub samples: Option<SampleSpread>,
}

/// K posterior samples of the same measurements: how much they differ, and how well each fits y.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleSpread {
    /// Samples per measurement.
    pub k: usize,
    /// Measurements (the first of the test images).
    pub n: usize,
    /// Mean over pixels of the per-pixel standard deviation across samples, on [0, 1].
    pub spread: f64,
    /// Mean of `mean((y - H x_k)^2)` over the samples (on [-1, 1]).
    pub consistency_samples: f64,
    /// The same for the true images: the noise floor, about `sigma_y^2`.
    pub consistency_truth: f64,
}

impl EvalTable {
    /// The row of method `m` (`lifted`, `davi`, `dps`, `ddrm`, `supervised`), when it ran.
    pub fn row(&self, m: &str) -> Option<&EvalRow> {
        match m {
            "lifted" => Some(&self.lifted),
            "davi" => Some(&self.davi),
            "dps" => self.dps.as_ref(),
            "ddrm" => self.ddrm.as_ref(),
            "supervised" => self.supervised.as_ref(),
            _ => None,
        }
    }
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

/// The methods of an evaluation, in the order the table prints them.
pub const METHODS: [&str; 5] = ["lifted", "davi", "dps", "ddrm", "supervised"];

impl EvalTable {
    /// An error naming the first row whose PSNR, SSIM or time is not a number (NaN, infinite,
    /// a negative time), which the table would print as nonsense or leave out. A DPS row of NaN
    /// scores is an older evaluation's way of saying DPS did not run: no row, no error.
    pub fn check(&self) -> Result<(), String> {
        let check = |what: String, r: &EvalRow| {
            let ok = r.psnr.is_finite()
                && r.ssim.is_finite()
                && r.seconds_per_image.is_finite()
                && r.seconds_per_image >= 0.0;
            if ok {
                Ok(())
            } else {
                Err(format!(
                    "{what}: PSNR {}, SSIM {}, seconds per image {}: not a score",
                    r.psnr, r.ssim, r.seconds_per_image
                ))
            }
        };
        for m in METHODS {
            if let Some(r) = self.row(m) {
                if !(m == "dps" && r.psnr.is_nan() && r.ssim.is_nan()) {
                    check(format!("eval.{m}"), r)?;
                }
            }
            if let Some(r) = self.paired.as_ref().and_then(|p| p.row(m)) {
                check(format!("eval.paired.{m}"), r)?;
            }
        }
        Ok(())
    }
}

impl PairedTable {
    /// The row of method `m`, as [`EvalTable::row`].
    pub fn row(&self, m: &str) -> Option<&EvalRow> {
        match m {
            "lifted" => Some(&self.lifted),
            "davi" => Some(&self.davi),
            "dps" => Some(&self.dps),
            "ddrm" => self.ddrm.as_ref(),
            "supervised" => self.supervised.as_ref(),
            _ => None,
        }
    }
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
    /// SHA-256 of the prior's checkpoint the sweep ran with: a sweep of another prior (one since
    /// retrained) is neither resumed nor used. Absent in cards of before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teacher_sha256: Option<String>,
}

fn complete_default() -> bool {
    true
}

/// Markdown tables of model cards (`davi cards`): the evaluation on test crops (every method on
/// all images, then on the paired images), DPS's tuning, and the whole held-out photographs.
pub fn cards_markdown(cards: &[ModelCard]) -> String {
    let label = |m: &str| match m {
        "lifted" => "lifted measurement".to_string(),
        "davi" => "**DAVI**".to_string(),
        "dps" => "DPS".to_string(),
        "ddrm" => "DDRM".to_string(),
        "supervised" => "supervised control".to_string(),
        other => other.to_string(),
    };
    let pm = |v: f64, ci: Option<f64>, digits: usize| match ci.filter(|c| c.is_finite()) {
        Some(c) => format!("{v:.digits$} ± {c:.digits$}"),
        None => format!("{v:.digits$}"),
    };
    let mut s = String::from(
        "| model | method | images | PSNR (dB) | SSIM | FID / KID | network evaluations | seconds / image (device: see the card's notes) |\n\
         |---|---|---:|---:|---:|---:|---:|---:|\n",
    );
    // `n` of a row, else (older cards) the table's for every method but DPS.
    let mut line =
        |name: &str, what: String, r: &EvalRow, n: Option<usize>, spread: Option<&SampleSpread>| {
            let perceptual = [
                r.fid.map(|f| format!("FID {f:.2}")),
                r.kid.map(|k| format!("KID {k:.4}")),
                spread.map(|k| format!("spread of {} samples {:.4} (n {})", k.k, k.spread, k.n)),
            ]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(", ");
            s += &format!(
                "| {name} | {what} | {} | {} | {} | {perceptual} | {} | {:.4} |\n",
                r.n.or(n).map_or("?".into(), |n| n.to_string()),
                pm(r.psnr, r.psnr_ci95, 2),
                pm(r.ssim, r.ssim_ci95, 4),
                r.nfe,
                r.seconds_per_image
            );
        };
    for c in cards {
        let Some(e) = &c.eval else { continue };
        let zeta = |m: &str| match (m, e.dps_zeta) {
            ("dps", Some(z)) => format!(" (zeta {})", round_sig(z)),
            _ => String::new(),
        };
        for m in METHODS {
            // A DPS that did not run (NaN scores) has no row ([`EvalTable::check`] refuses any
            // other row that is not a number).
            if let Some(r) = e.row(m).filter(|r| r.psnr.is_finite()) {
                let n = (m != "dps").then_some(e.n);
                let spread = e.samples.as_ref().filter(|_| m == "davi");
                line(&c.name, format!("{}{}", label(m), zeta(m)), r, n, spread);
            }
        }
        if let Some(p) = &e.paired {
            for m in METHODS {
                if let Some(r) = p.row(m) {
                    line(
                        &c.name,
                        format!("paired: {}{}", label(m), zeta(m)),
                        r,
                        Some(p.n),
                        None,
                    );
                }
            }
        }
    }
    let tuned: Vec<(&ModelCard, &DpsTuning)> = cards
        .iter()
        .filter_map(|c| c.dps_tuning.as_ref().map(|t| (c, t)))
        .collect();
    if !tuned.is_empty() {
        s += "\n| model | DPS zeta chosen | validation images | DPS steps | sweep: zeta (PSNR dB) |\n|---|---:|---:|---:|---|\n";
        for (c, t) in tuned {
            let mut sweep = t.sweep.clone();
            sweep.sort_by(|a, b| a.0.total_cmp(&b.0));
            let sweep = sweep
                .iter()
                .map(|(z, p, _)| format!("{} ({p:.2})", round_sig(*z)))
                .collect::<Vec<_>>()
                .join(", ");
            let done = if t.complete { "" } else { " (incomplete)" };
            s += &format!(
                "| {} | {}{done} | {} | {} | {sweep} |\n",
                c.name,
                round_sig(t.zeta),
                t.n,
                t.steps
            );
        }
    }
    let photos: Vec<(&ModelCard, &WholePhotos)> = cards
        .iter()
        .filter_map(|c| c.whole_photos.as_ref().map(|w| (c, w)))
        .collect();
    if !photos.is_empty() {
        s += "\n| model | whole photographs | method | PSNR (dB) | SSIM |\n|---|---|---|---:|---:|\n";
        for (c, w) in photos {
            let mut methods: Vec<(&String, &PhotoRow)> = w.methods.iter().collect();
            let rank = |m: &str| {
                METHODS
                    .iter()
                    .position(|x| *x == m)
                    .unwrap_or(METHODS.len())
            };
            methods.sort_by_key(|(m, _)| rank(m));
            for (m, r) in methods {
                s += &format!(
                    "| {} | {} ({}) | {} | {} | {} |\n",
                    c.name,
                    r.n,
                    w.images.join(", "),
                    label(m),
                    pm(r.psnr, Some(r.psnr_ci95), 2),
                    pm(r.ssim, Some(r.ssim_ci95), 4)
                );
            }
        }
    }
    s
}

/// `z` with at most 3 significant digits (0.17320508 -> 0.173).
fn round_sig(z: f64) -> String {
    if z == 0.0 || !z.is_finite() {
        return z.to_string();
    }
    let e = z.abs().log10().floor() as i32;
    if e > 2 {
        // 1000 and above: three significant digits, the rest zeros (1234.5 -> 1230).
        let p = 10f64.powi(e - 2);
        return format!("{:.0}", (z / p).round() * p);
    }
    let digits = (2 - e) as usize;
    let s = format!("{z:.digits$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(n: Option<usize>, psnr: f64) -> EvalRow {
        EvalRow {
            n,
            psnr,
            psnr_ci95: n.map(|_| 0.25),
            ssim: 0.5,
            ssim_ci95: None,
            fid: None,
            kid: n.filter(|&n| n < 100).map(|_| 0.0123),
            nfe: 1,
            seconds_per_image: 0.01,
        }
    }

    /// `norm_groups` at its default (the reference's 32) is not written, so the hash of every
    /// config written before it existed is unchanged; another value is written and read back;
    /// one that does not divide every width is refused, naming it.
    #[test]
    fn norm_groups_keeps_old_hashes_and_is_checked() {
        let unet = "unet:\n  image_size: 16\n  in_channels: 3\n  model_channels: 32\n  out_channels: 3\n  num_res_blocks: 1\n  channel_mult: [1, 2]\n";
        let a: DaviConfig = serde_yaml::from_str(&format!("name: t\n{unet}")).unwrap();
        assert_eq!(a.unet.norm_groups, 32);
        assert!(!serde_yaml::to_string(&a).unwrap().contains("norm_groups"));
        let b: DaviConfig =
            serde_yaml::from_str(&format!("name: t\n{unet}  norm_groups: 32\n")).unwrap();
        assert_eq!(a.hash(), b.hash());
        let c: DaviConfig =
            serde_yaml::from_str(&format!("name: t\n{unet}  norm_groups: 8\n")).unwrap();
        assert_ne!(a.hash(), c.hash());
        assert!(serde_yaml::to_string(&c)
            .unwrap()
            .contains("norm_groups: 8"));
        c.unet.validate().unwrap();
        let mut d = c.unet.clone();
        d.norm_groups = 12;
        let e = d.validate().unwrap_err().to_string();
        assert!(e.contains("norm_groups 12"), "{e}");
    }

    /// A row that is not a number is an error naming it; DPS's NaN row (not run) is none.
    #[test]
    fn a_score_that_is_not_a_number_is_named() {
        let mut t = EvalTable {
            n: 10,
            davi: row(Some(10), 27.5),
            dps: Some(row(Some(0), f64::NAN)),
            lifted: row(Some(10), 26.0),
            dps_zeta: None,
            paired: None,
            ddrm: None,
            supervised: None,
            samples: None,
        };
        t.dps.as_mut().unwrap().ssim = f64::NAN;
        assert_eq!(t.check(), Ok(()));
        t.davi.psnr = f64::NAN;
        let e = t.check().unwrap_err();
        assert!(e.starts_with("eval.davi: PSNR NaN"), "{e}");
        t.davi.psnr = 27.5;
        t.paired = Some(PairedTable {
            n: 4,
            davi: row(Some(4), 27.0),
            dps: row(Some(4), f64::INFINITY),
            lifted: row(Some(4), 25.0),
            ddrm: None,
            supervised: None,
        });
        assert!(t.check().unwrap_err().starts_with("eval.paired.dps"));
        t.paired.as_mut().unwrap().dps.psnr = 28.0;
        t.lifted.seconds_per_image = -1.0;
        assert!(t.check().unwrap_err().starts_with("eval.lifted"));
    }

    #[test]
    fn markdown_of_cards() {
        let card = ModelCard {
            name: "m".into(),
            task: TaskConfig {
                operator: Operator::Denoise,
                sigma_y: 0.1,
                h: 0.1,
            },
            data: "d".into(),
            training_steps: 1,
            training_seconds: 1.0,
            notes: None,
            eval: Some(EvalTable {
                n: 1000,
                davi: row(Some(1000), 27.5),
                dps: Some(row(Some(0), f64::NAN)),
                lifted: row(Some(1000), 26.0),
                dps_zeta: None,
                paired: Some(PairedTable {
                    n: 16,
                    davi: row(Some(16), 27.0),
                    dps: row(Some(16), 28.0),
                    lifted: row(Some(16), 25.0),
                    ddrm: None,
                    supervised: None,
                }),
                ddrm: Some(row(Some(1000), 30.4)),
                supervised: None,
                samples: Some(SampleSpread {
                    k: 8,
                    n: 64,
                    spread: 0.0163,
                    consistency_samples: 0.0027,
                    consistency_truth: 0.0019,
                }),
            }),
            dps_tuning: Some(DpsTuning {
                split: "validation".into(),
                n: 8,
                steps: 1000,
                sweep: vec![(1.0, 19.0, 0.6), (0.17320508075688773, 19.4, 0.6)],
                zeta: 0.17320508075688773,
                complete: false,
                teacher_sha256: None,
            }),
            whole_photos: Some(WholePhotos {
                images: vec!["a.png".into(), "b.png".into()],
                methods: [
                    ("lifted".to_string(), (25.0, 0.5)),
                    ("davi".to_string(), (27.8, 1.0)),
                ]
                .into_iter()
                .map(|(m, (p, c))| {
                    (
                        m,
                        PhotoRow {
                            n: 2,
                            psnr: p,
                            psnr_ci95: c,
                            ssim: 0.7,
                            ssim_ci95: 0.03,
                        },
                    )
                })
                .collect(),
            }),
        };
        let md = cards_markdown(&[card]);
        let lines: Vec<&str> = md.lines().collect();
        // A DPS that did not run has no row; DDRM and the paired rows do, with n and intervals.
        assert!(!md.contains("| m | DPS |"), "{md}");
        assert!(
            md.contains(
                "| m | **DAVI** | 1000 | 27.50 ± 0.25 | 0.5000 | spread of 8 samples 0.0163 (n 64) | 1 | 0.0100 |"
            ),
            "{md}"
        );
        // The spread is DAVI's, on its own row only.
        assert_eq!(md.matches("spread of").count(), 1, "{md}");
        assert!(md.contains("| m | DDRM | 1000 | 30.40 ± 0.25 |"), "{md}");
        assert!(
            md.contains("| m | paired: DPS | 16 | 28.00 ± 0.25 | 0.5000 | KID 0.0123 |"),
            "{md}"
        );
        // The sweep sorted by zeta, zeta rounded, an incomplete sweep said so.
        assert!(
            md.contains("| m | 0.173 (incomplete) | 8 | 1000 | 0.173 (19.40), 1 (19.00) |"),
            "{md}"
        );
        // Whole photographs: lifted before DAVI, the images named.
        let l = lines
            .iter()
            .position(|l| l.contains("| lifted measurement | 25.00 ± 0.50"))
            .unwrap();
        let d = lines
            .iter()
            .position(|l| l.contains("| **DAVI** | 27.80 ± 1.00 | 0.7000 ± 0.0300 |"))
            .unwrap();
        assert!(
            l < d && lines[d].contains("| m | 2 (a.png, b.png) |"),
            "{md}"
        );
    }

    #[test]
    fn significant_digits() {
        assert_eq!(round_sig(0.17320508075688773), "0.173");
        assert_eq!(round_sig(0.3), "0.3");
        assert_eq!(round_sig(1.0), "1");
        assert_eq!(round_sig(0.5477225575051661), "0.548");
        assert_eq!(round_sig(3.0), "3");
        assert_eq!(round_sig(0.03), "0.03");
        assert_eq!(round_sig(12.345), "12.3");
        assert_eq!(round_sig(999.7), "1000");
        assert_eq!(round_sig(1234.5), "1230");
        assert_eq!(round_sig(-31623.0), "-31600");
    }
}
