//! `davi eval`: PSNR and SSIM of restored images against references, per image and mean.

use crate::images;
use crate::RuntimeError;
use davi_models::metrics::{mean_ci95, psnr, ssim};
use std::path::{Path, PathBuf};

/// One image's scores.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Score {
    /// Relative path.
    pub path: String,
    /// PSNR in dB on [0, 1].
    pub psnr: f64,
    /// SSIM on [0, 1].
    pub ssim: f64,
}

/// Scores of a folder.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Evaluation {
    /// Per image.
    pub images: Vec<Score>,
    /// Mean PSNR.
    pub psnr: f64,
    /// 95% half-interval of PSNR.
    pub psnr_ci95: f64,
    /// Mean SSIM.
    pub ssim: f64,
    /// 95% half-interval of SSIM.
    pub ssim_ci95: f64,
    /// References without a restored image.
    pub missing: Vec<String>,
}

/// Compares every reference image with the restored image of the same relative path (any of
/// the output formats).
pub fn evaluate(
    restored: &Path,
    reference: &Path,
    channels: Option<usize>,
) -> Result<Evaluation, RuntimeError> {
    let mut refs: Vec<PathBuf> = Vec::new();
    for e in walkdir::WalkDir::new(reference).sort_by_file_name() {
        let e = e.map_err(|e| RuntimeError::file(reference, e))?;
        if e.file_type().is_file() && images::is_image_path(e.path()) {
            refs.push(e.path().to_path_buf());
        }
    }
    let mut scores = Vec::new();
    let mut missing = Vec::new();
    for r in refs {
        let rel = r.strip_prefix(reference).unwrap_or(&r).to_path_buf();
        let found = ["png", "jpg", "webp"]
            .iter()
            .map(|e| restored.join(&rel).with_extension(e))
            .find(|p| p.is_file());
        let Some(out) = found else {
            missing.push(rel.display().to_string());
            continue;
        };
        let c = channels.unwrap_or_else(|| {
            if image::open(&r)
                .map(|i| i.color().has_color())
                .unwrap_or(true)
            {
                3
            } else {
                1
            }
        });
        let a = images::load(&r, c, None)
            .map_err(|e| RuntimeError::file(&r, e))?
            .mapv(|v| (v + 1.0) / 2.0);
        let b = images::load(&out, c, None)
            .map_err(|e| RuntimeError::file(&out, e))?
            .mapv(|v| (v + 1.0) / 2.0);
        if a.dim() != b.dim() {
            return Err(RuntimeError::file(
                &out,
                format!(
                    "size {:?} differs from the reference's {:?}",
                    b.dim(),
                    a.dim()
                ),
            ));
        }
        scores.push(Score {
            path: rel.display().to_string(),
            psnr: psnr(a.view(), b.view()),
            ssim: ssim(a.view(), b.view()),
        });
    }
    let (p, pc) = mean_ci95(&scores.iter().map(|s| s.psnr.min(100.0)).collect::<Vec<_>>());
    let (s, sc) = mean_ci95(&scores.iter().map(|s| s.ssim).collect::<Vec<_>>());
    Ok(Evaluation {
        images: scores,
        psnr: p,
        psnr_ci95: pc,
        ssim: s,
        ssim_ci95: sc,
        missing,
    })
}

impl Evaluation {
    /// CSV, one row per image.
    pub fn csv(&self) -> String {
        let mut s = String::from("path,psnr,ssim\n");
        for i in &self.images {
            s.push_str(&format!("{},{:.4},{:.5}\n", i.path, i.psnr, i.ssim));
        }
        s
    }

    /// A Markdown summary table.
    pub fn markdown(&self) -> String {
        format!(
            "| images | PSNR (dB) | SSIM |\n|---:|---:|---:|\n| {} | {:.2} ± {:.2} | {:.4} ± {:.4} |\n",
            self.images.len(),
            self.psnr,
            self.psnr_ci95,
            self.ssim,
            self.ssim_ci95
        )
    }
}

/// A contact sheet: one row per image (up to `rows`), columns measurement (nearest-upscaled to
/// the image size, when given) | restored | reference, 2 px white gaps, 4x magnified.
pub fn sheet(
    eval: &Evaluation,
    restored: &Path,
    reference: &Path,
    measurement: Option<&Path>,
    rows: usize,
    out: &Path,
) -> Result<(), RuntimeError> {
    let find = |dir: &Path, rel: &str| {
        ["png", "jpg", "webp"]
            .iter()
            .map(|e| dir.join(rel).with_extension(e))
            .find(|p| p.is_file())
    };
    let mut tiles: Vec<Vec<image::RgbImage>> = Vec::new();
    for s in eval.images.iter().take(rows) {
        let mut row = Vec::new();
        let mut dirs: Vec<&Path> = Vec::new();
        if let Some(m) = measurement {
            dirs.push(m);
        }
        dirs.push(restored);
        dirs.push(reference);
        let reference_img = image::open(reference.join(&s.path))
            .map_err(|e| RuntimeError::file(&reference.join(&s.path), e))?;
        let (w, h) = (reference_img.width(), reference_img.height());
        for d in dirs {
            let p = find(d, &s.path)
                .ok_or_else(|| RuntimeError::file(&d.join(&s.path), "not found"))?;
            let img = image::open(&p)
                .map_err(|e| RuntimeError::file(&p, e))?
                .to_rgb8();
            let img =
                image::imageops::resize(&img, w * 4, h * 4, image::imageops::FilterType::Nearest);
            row.push(img);
        }
        tiles.push(row);
    }
    if tiles.is_empty() {
        return Err(RuntimeError::Usage(
            "no images to put on a contact sheet".into(),
        ));
    }
    let (tw, th) = (tiles[0][0].width(), tiles[0][0].height());
    let cols = tiles[0].len() as u32;
    let gap = 2;
    let mut canvas = image::RgbImage::from_pixel(
        cols * (tw + gap) + gap,
        tiles.len() as u32 * (th + gap) + gap,
        image::Rgb([255, 255, 255]),
    );
    for (r, row) in tiles.iter().enumerate() {
        for (c, t) in row.iter().enumerate() {
            image::imageops::overlay(
                &mut canvas,
                t,
                (gap + c as u32 * (tw + gap)) as i64,
                (gap + r as u32 * (th + gap)) as i64,
            );
        }
    }
    let mut buf = Vec::new();
    canvas
        .write_to(&mut std::io::Cursor::new(&mut buf), image::ImageFormat::Png)
        .map_err(|e| RuntimeError::file(out, e))?;
    Ok(images::write_atomic(out, &buf)?)
}
