//! `davi eval`: PSNR and SSIM of restored images against references, per image and mean.

use crate::images;
use crate::RuntimeError;
use davi_models::metrics::{mean_ci95, psnr, ssim};
use std::path::{Path, PathBuf};

/// One image's scores.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Score {
    /// Relative path of the reference.
    pub path: String,
    /// Relative path of the restored image it was scored against.
    pub restored: String,
    /// PSNR in dB on [0, 1], at most 100 (identical images: infinite, which JSON cannot hold;
    /// the mean counts them as 100 too).
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
    /// Restored images without a reference (not scored): a restore of other inputs, or a name
    /// that does not mirror its reference's.
    pub unmatched: Vec<String>,
    /// Pairs that could not be scored (unreadable, or of different sizes), with the reason; the
    /// others are scored all the same.
    pub failed: Vec<Failure>,
}

/// A pair [`evaluate`] could not score.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Failure {
    /// The file at fault.
    pub path: String,
    /// Why.
    pub reason: String,
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
    let mut failed = Vec::new();
    let mut matched: std::collections::HashSet<PathBuf> = Default::default();
    // References of one folder that share a stem (a.png, a.jpg) were restored under names that
    // keep their extension (a.png.png, a.jpg.png): only those names are theirs.
    let mut stems: std::collections::HashMap<PathBuf, usize> = Default::default();
    for r in &refs {
        *stems.entry(r.with_extension("")).or_default() += 1;
    }
    for r in refs {
        let rel = r.strip_prefix(reference).unwrap_or(&r).to_path_buf();
        let clash = stems[&r.with_extension("")] > 1;
        let found = find_image(restored, &rel, clash);
        let Some(out) = found else {
            missing.push(rel.display().to_string());
            continue;
        };
        matched.insert(out.clone());
        match score_pair(&r, &out, channels) {
            Ok((psnr, ssim)) => scores.push(Score {
                psnr: psnr.min(100.0),
                path: rel.display().to_string(),
                restored: out
                    .strip_prefix(restored)
                    .unwrap_or(&out)
                    .display()
                    .to_string(),
                ssim,
            }),
            Err((path, reason)) => failed.push(Failure {
                path: path.display().to_string(),
                reason,
            }),
        }
    }
    let mut unmatched = Vec::new();
    // Unreadable entries (a root-only lost+found) are not images of ours: skipped, not an error
    // after every pair was scored.
    for e in walkdir::WalkDir::new(restored)
        .sort_by_file_name()
        .into_iter()
        .filter_map(Result::ok)
    {
        if e.file_type().is_file() && images::is_image_path(e.path()) && !matched.contains(e.path())
        {
            let rel = e.path().strip_prefix(restored).unwrap_or(e.path());
            unmatched.push(rel.display().to_string());
        }
    }
    let (p, pc) = mean_ci95(&scores.iter().map(|s| s.psnr).collect::<Vec<_>>());
    let (s, sc) = mean_ci95(&scores.iter().map(|s| s.ssim).collect::<Vec<_>>());
    Ok(Evaluation {
        images: scores,
        psnr: p,
        psnr_ci95: pc,
        ssim: s,
        ssim_ci95: sc,
        missing,
        unmatched,
        failed,
    })
}

/// The image `rel` of `dir`: under its own name or with an output format's extension instead of
/// its own; when `clash` (another image of its folder shares its stem), only with an output
/// format's extension added to its own, as restore names such inputs (`a.png.png`, `a.jpg.png`),
/// so that `a.jpg` is never scored against `a.png`'s output.
fn find_image(dir: &Path, rel: &Path, clash: bool) -> Option<PathBuf> {
    const EXT: [&str; 3] = ["png", "jpg", "webp"];
    let p = dir.join(rel);
    if clash {
        return EXT
            .iter()
            .map(|e| {
                let mut q = p.clone().into_os_string();
                q.push(format!(".{e}"));
                PathBuf::from(q)
            })
            .find(|q| q.is_file());
    }
    std::iter::once(p.clone())
        .chain(EXT.iter().map(|e| p.with_extension(e)))
        .find(|q| q.is_file())
}

/// PSNR and SSIM of the restored image `out` against the reference `r`, in `channels` (default:
/// the reference's, from its header); the file at fault and why when they cannot be scored.
fn score_pair(
    r: &Path,
    out: &Path,
    channels: Option<usize>,
) -> Result<(f64, f64), (PathBuf, String)> {
    let c = channels.unwrap_or_else(|| {
        if images::has_colour(r).unwrap_or(true) {
            3
        } else {
            1
        }
    });
    let a = images::load(r, c, None)
        .map_err(|e| (r.to_path_buf(), e))?
        .mapv(|v| (v + 1.0) / 2.0);
    let b = images::load(out, c, None)
        .map_err(|e| (out.to_path_buf(), e))?
        .mapv(|v| (v + 1.0) / 2.0);
    if a.dim() != b.dim() {
        return Err((
            out.to_path_buf(),
            format!(
                "size {:?} differs from the reference's {:?}",
                b.dim(),
                a.dim()
            ),
        ));
    }
    Ok((psnr(a.view(), b.view()), ssim(a.view(), b.view())))
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
        // No interval for a single image.
        let pm = |m: f64, c: f64, d: usize| {
            if c.is_finite() {
                format!("{m:.d$} ± {c:.d$}")
            } else {
                format!("{m:.d$}")
            }
        };
        format!(
            "| images | PSNR (dB) | SSIM |\n|---:|---:|---:|\n| {} | {} | {} |\n",
            self.images.len(),
            pm(self.psnr, self.psnr_ci95, 2),
            pm(self.ssim, self.ssim_ci95, 4)
        )
    }
}

/// `[3, h, w]` in [-1, 1] as an 8-bit RGB image.
fn to_rgb(a: &ndarray::Array3<f32>) -> image::RgbImage {
    let (_, h, w) = a.dim();
    image::RgbImage::from_fn(w as u32, h as u32, |x, y| {
        let (x, y) = (x as usize, y as usize);
        image::Rgb([0, 1, 2].map(|k| images::to_u8(a[[k, y, x]])))
    })
}

/// The largest contact sheet [`sheet`] draws, in pixels (3 bytes each in memory).
pub const SHEET_MAX_PIXELS: u64 = 1 << 28;

/// How much [`sheet`] magnifies an image of `w` x `h`: 4x for the 32 px crops, less for larger
/// images so that a row is at least 128 px high where 4x allows it, never below 1x.
pub fn sheet_magnification(w: u32, h: u32) -> u32 {
    128u32.div_ceil(w.max(h).max(1)).clamp(1, 4)
}

/// The format of a contact sheet written to `out`, from its extension: PNG, JPEG or WebP.
pub fn sheet_format(out: &Path) -> Result<image::ImageFormat, RuntimeError> {
    match image::ImageFormat::from_path(out) {
        Ok(f @ (image::ImageFormat::Png | image::ImageFormat::Jpeg | image::ImageFormat::WebP)) => {
            Ok(f)
        }
        _ => Err(RuntimeError::file(
            out,
            "a contact sheet is written as .png, .jpg/.jpeg or .webp",
        )),
    }
}

/// A contact sheet: one row per image (up to `rows`), columns measurement (nearest-upscaled to
/// the image size, when given) | restored | reference, 2 px white gaps, each row magnified by
/// [`sheet_magnification`] of its reference; rows of different sizes each keep their own. The
/// format follows `out`'s extension (`.png`, `.jpg`/`.jpeg`, `.webp`; anything else is refused).
pub fn sheet(
    eval: &Evaluation,
    restored: &Path,
    reference: &Path,
    measurement: Option<&Path>,
    rows: usize,
    out: &Path,
) -> Result<(), RuntimeError> {
    let format = sheet_format(out)?;
    let mut dirs: Vec<&Path> = Vec::new();
    if let Some(m) = measurement {
        dirs.push(m);
    }
    dirs.push(restored);
    dirs.push(reference);
    // The layout from the references' headers alone, so that a sheet the format cannot hold (or
    // too large to be worth a canvas) is refused before any image is decoded.
    let gap = 2u64;
    let mut layout = Vec::new();
    for s in eval.images.iter().take(rows) {
        let p = reference.join(&s.path);
        let (w, h) = images::dimensions(&p).map_err(|e| RuntimeError::file(&p, e))?;
        layout.push((s, w, h, sheet_magnification(w, h)));
    }
    if layout.is_empty() {
        return Err(RuntimeError::Usage(
            "no images to put on a contact sheet".into(),
        ));
    }
    let cols = dirs.len() as u64;
    let width = layout
        .iter()
        .map(|&(_, w, _, m)| cols * (u64::from(w * m) + gap) + gap)
        .max()
        .unwrap_or(gap);
    let height = layout
        .iter()
        .map(|&(_, _, h, m)| u64::from(h * m) + gap)
        .sum::<u64>()
        + gap;
    let max_side = match format {
        image::ImageFormat::WebP => 16383,
        image::ImageFormat::Jpeg => 65535,
        _ => u64::from(u32::MAX),
    };
    if width.max(height) > max_side || width * height > SHEET_MAX_PIXELS {
        return Err(RuntimeError::file(
            out,
            format!(
                "a contact sheet of {} rows would be {width}x{height} px: more than {} holds (at most {max_side} px a side, {} Mpx in all); ask for fewer rows",
                layout.len(),
                match format {
                    image::ImageFormat::WebP => "WebP",
                    image::ImageFormat::Jpeg => "JPEG",
                    _ => "a sheet",
                },
                SHEET_MAX_PIXELS >> 20
            ),
        ));
    }
    let (width, height) = (width as u32, height as u32);
    let gap = gap as u32;
    let mut tiles: Vec<Vec<image::RgbImage>> = Vec::new();
    for &(s, w, h, m) in &layout {
        let mut row = Vec::new();
        for d in &dirs {
            // The restored image scored; the measurement and reference under their own names.
            let p = if *d == restored {
                Some(restored.join(&s.restored))
            } else {
                find_image(d, Path::new(&s.path), false)
            }
            .ok_or_else(|| RuntimeError::file(&d.join(&s.path), "not found"))?;
            let img = to_rgb(&images::load(&p, 3, None).map_err(|e| RuntimeError::file(&p, e))?);
            let img =
                image::imageops::resize(&img, w * m, h * m, image::imageops::FilterType::Nearest);
            row.push(img);
        }
        tiles.push(row);
    }
    let mut canvas = image::RgbImage::from_pixel(width, height, image::Rgb([255, 255, 255]));
    let mut y = gap;
    for row in &tiles {
        let mut x = gap;
        for t in row {
            image::imageops::overlay(&mut canvas, t, x as i64, y as i64);
            x += t.width() + gap;
        }
        y += row[0].height() + gap;
    }
    let mut buf = Vec::new();
    canvas
        .write_to(&mut std::io::Cursor::new(&mut buf), format)
        .map_err(|e| RuntimeError::file(out, e))?;
    Ok(images::write_named(out, &buf)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, w: u32, h: u32, v: u8) {
        std::fs::create_dir_all(dir).unwrap();
        image::RgbImage::from_pixel(w, h, image::Rgb([v, v / 2, 255 - v]))
            .save(dir.join(name))
            .unwrap();
    }

    /// Rows of different sizes each keep their own size and magnification (a large first row
    /// must not clip or shift a later one), and `.jpg` writes a JPEG.
    #[test]
    fn sheet_of_mixed_sizes() {
        let t = tempfile::tempdir().unwrap();
        let (re, rf) = (t.path().join("restored"), t.path().join("reference"));
        for (name, w, h) in [("a.png", 32, 32), ("b.png", 200, 120)] {
            write(&re, name, w, h, 40);
            write(&rf, name, w, h, 200);
        }
        assert_eq!(sheet_magnification(32, 32), 4);
        assert_eq!(sheet_magnification(200, 120), 1);
        assert_eq!(sheet_magnification(64, 40), 2);
        assert_eq!(sheet_magnification(100, 60), 2);
        let e = evaluate(&re, &rf, None).unwrap();
        let out = t.path().join("sheet.png");
        sheet(&e, &re, &rf, None, 8, &out).unwrap();
        let img = image::open(&out).unwrap().to_rgb8();
        // Row 1: two 128x128 tiles; row 2: two 200x120 tiles; 2 px gaps.
        assert_eq!(img.dimensions(), (2 + 2 * 202, 2 + 130 + 122));
        // The second row's reference tile ends at the right edge, unclipped.
        assert_eq!(
            img.get_pixel(2 + 202 + 199, 2 + 130 + 119),
            &image::Rgb([200, 100, 55])
        );
        // The first row's restored tile, 4x, then white beyond it.
        assert_eq!(img.get_pixel(2 + 127, 2), &image::Rgb([40, 20, 215]));
        assert_eq!(img.get_pixel(2 * 130 + 5, 2), &image::Rgb([255, 255, 255]));
        let jpg = t.path().join("sheet.jpg");
        sheet(&e, &re, &rf, None, 8, &jpg).unwrap();
        let bytes = std::fs::read(&jpg).unwrap();
        assert_eq!(&bytes[..3], &[0xFF, 0xD8, 0xFF], "a JPEG");
        let err = sheet(&e, &re, &rf, None, 8, &t.path().join("sheet.bmp")).unwrap_err();
        assert!(err.to_string().contains("sheet.bmp"), "{err}");
        // A reference under an extension no output has (.jpeg) is found by its own name.
        let (re2, rf2) = (t.path().join("r2"), t.path().join("f2"));
        write(&re2, "c.png", 32, 32, 10);
        std::fs::create_dir_all(&rf2).unwrap();
        image::RgbImage::from_pixel(32, 32, image::Rgb([9, 9, 9]))
            .save_with_format(rf2.join("c.jpeg"), image::ImageFormat::Jpeg)
            .unwrap();
        let e2 = evaluate(&re2, &rf2, None).unwrap();
        sheet(&e2, &re2, &rf2, None, 8, &t.path().join("s2.png")).unwrap();
    }

    /// One unreadable restored image or one of the wrong size is a failure of that pair, named
    /// with its reason; every other pair is scored, and restored images without a reference are
    /// named. References that differ only in their
    /// extension pair with restore's names for them (d.png.png, d.jpg.png) alone.
    #[test]
    fn a_bad_pair_is_reported_and_the_others_are_scored() {
        let t = tempfile::tempdir().unwrap();
        let (re, rf) = (t.path().join("restored"), t.path().join("reference"));
        for (name, v) in [("a.png", 10), ("b.png", 20), ("c.png", 30)] {
            write(&rf, name, 16, 16, v);
        }
        // d.jpg and d.png share a stem: restore wrote d.jpg.png and d.png.png; a stale d.png
        // (an earlier run's) must pair with neither.
        write(&rf, "d.jpg", 16, 16, 40);
        write(&rf, "d.png", 16, 16, 90);
        write(&re, "a.png", 16, 16, 12);
        std::fs::write(re.join("b.png"), b"").unwrap();
        write(&re, "c.png", 8, 8, 30);
        write(&re, "d.jpg.png", 16, 16, 40);
        write(&re, "d.png.png", 16, 16, 90);
        write(&re, "d.png", 16, 16, 200);
        let e = evaluate(&re, &rf, None).unwrap();
        let scored: Vec<(&str, &str)> = e
            .images
            .iter()
            .map(|s| (s.path.as_str(), s.restored.as_str()))
            .collect();
        assert_eq!(
            scored,
            [
                ("a.png", "a.png"),
                ("d.jpg", "d.jpg.png"),
                ("d.png", "d.png.png")
            ]
        );
        assert!(
            e.images[2].psnr > 40.0,
            "d.png scored against the stale file"
        );
        assert!(e.missing.is_empty());
        // The stale d.png and an image no reference has are named, not scored.
        write(&re.join("sub"), "extra.png", 16, 16, 1);
        let e2 = evaluate(&re, &rf, None).unwrap();
        assert_eq!(e2.unmatched, ["d.png", "sub/extra.png"]);
        assert_eq!(e2.images.len(), e.images.len());
        assert_eq!(e.failed.len(), 2);
        assert!(
            e.failed[0].path.ends_with("b.png") && e.failed[0].reason.contains("empty"),
            "{:?}",
            e.failed[0]
        );
        assert!(
            e.failed[1].path.ends_with("c.png") && e.failed[1].reason.contains("differs"),
            "{:?}",
            e.failed[1]
        );
    }

    /// Identical images score 100 dB everywhere: per image, in the mean, in CSV and JSON.
    #[test]
    fn identical_images_score_100_db_in_every_output() {
        let t = tempfile::tempdir().unwrap();
        let (re, rf) = (t.path().join("restored"), t.path().join("reference"));
        write(&re, "a.png", 8, 8, 40);
        write(&rf, "a.png", 8, 8, 40);
        let e = evaluate(&re, &rf, None).unwrap();
        assert_eq!((e.images[0].psnr, e.psnr), (100.0, 100.0));
        assert!(e.csv().contains("a.png,100.0000,"), "{}", e.csv());
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(json["images"][0]["psnr"], 100.0);
    }

    /// A sheet wider than WebP holds is refused from the headers, before any image is decoded
    /// (the restored image here is no longer readable: the refusal must come first), and writes
    /// nothing; the same sheet as PNG gets as far as the unreadable file and names it.
    #[test]
    fn a_sheet_too_large_for_its_format_is_refused_before_decoding() {
        let t = tempfile::tempdir().unwrap();
        let (re, rf) = (t.path().join("restored"), t.path().join("reference"));
        write(&re, "wide.png", 6000, 20, 40);
        write(&rf, "wide.png", 6000, 20, 200);
        let e = evaluate(&re, &rf, None).unwrap();
        std::fs::write(re.join("wide.png"), b"not a png").unwrap();
        // Two columns of 6000 px fit WebP's 16383; three (with the measurement) do not.
        let out = t.path().join("sheet.webp");
        let err = sheet(&e, &re, &rf, Some(&rf), 8, &out).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("WebP") && msg.contains("18008x24"), "{msg}");
        assert!(!out.exists());
        let err = sheet(&e, &re, &rf, None, 8, &out).unwrap_err().to_string();
        assert!(err.contains("restored/wide.png"), "{err}");
        let err = sheet(&e, &re, &rf, Some(&rf), 8, &t.path().join("s.png"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("restored/wide.png") && !err.contains("WebP"),
            "{err}"
        );
    }
}
