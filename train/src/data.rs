//! Training and test images: Fashion-MNIST (IDX, gzip), crops of the scikit-image photos, or any
//! folder. Images are `[C, S, S]` in [-1, 1]. Splits and batches are deterministic functions of
//! the seed and the step, so a resumed run sees the batches an uninterrupted one would.

use anyhow::{bail, Context, Result};
use davi_models::card::DataConfig;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Which split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Split {
    /// Training images.
    Train,
    /// Held-out images.
    Test,
}

enum Source {
    /// Decoded images, `n * c * s * s` values.
    Memory(Vec<f32>),
    /// Image files decoded on demand.
    Files(Vec<PathBuf>),
    /// Photos to cut crops from: (c, h, w, data).
    Crops(Vec<(usize, usize, Vec<f32>)>, usize),
}

/// A set of images of one size and channel count.
pub struct Dataset {
    source: Source,
    /// Channels.
    pub channels: usize,
    /// Side.
    pub size: usize,
    /// Number of images (for crops: crops per epoch).
    pub len: usize,
    /// Unreadable files skipped so far.
    pub skipped: AtomicUsize,
    /// Skip unreadable files (else they are errors).
    pub skip_bad: bool,
    /// A name for messages.
    pub name: String,
}

fn read_gz(path: &Path) -> Result<Vec<u8>> {
    let f =
        std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(f)
        .read_to_end(&mut out)
        .with_context(|| format!("{}: not a gzip file", path.display()))?;
    Ok(out)
}

/// Reads an IDX3 image file: (count, rows, cols, pixels).
pub fn read_idx3(path: &Path) -> Result<(usize, usize, usize, Vec<u8>)> {
    let b = read_gz(path)?;
    if b.len() < 16 || b[..4] != [0, 0, 8, 3] {
        bail!("{}: not an IDX3 ubyte file", path.display());
    }
    let be = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]) as usize;
    let (n, r, c) = (be(4), be(8), be(12));
    if b.len() != 16 + n * r * c {
        bail!(
            "{}: truncated ({} bytes for {n}x{r}x{c})",
            path.display(),
            b.len()
        );
    }
    Ok((n, r, c, b[16..].to_vec()))
}

/// Reads an IDX1 label file.
pub fn read_idx1(path: &Path) -> Result<Vec<u8>> {
    let b = read_gz(path)?;
    if b.len() < 8 || b[..4] != [0, 0, 8, 1] {
        bail!("{}: not an IDX1 ubyte file", path.display());
    }
    let n = u32::from_be_bytes([b[4], b[5], b[6], b[7]]) as usize;
    if b.len() != 8 + n {
        bail!(
            "{}: truncated ({} bytes for {n} labels)",
            path.display(),
            b.len()
        );
    }
    Ok(b[8..].to_vec())
}

/// Fashion-MNIST's images (padded to 32x32 on [-1, 1]) and labels of a split, from `dir`.
pub fn fashion_mnist(dir: &Path, split: Split) -> Result<(tch::Tensor, tch::Tensor)> {
    let (img, lab) = match split {
        Split::Train => ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
        Split::Test => ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
    };
    let (n, r, c, px) = read_idx3(&dir.join(img))?;
    let labels = read_idx1(&dir.join(lab))?;
    if labels.len() != n || r > 32 || c > 32 {
        bail!(
            "{}: {n} images of {r}x{c} and {} labels",
            dir.display(),
            labels.len()
        );
    }
    let x = tch::Tensor::from_slice(&px)
        .reshape([n as i64, 1, r as i64, c as i64])
        .to_kind(tch::Kind::Float)
        / 127.5
        - 1.0;
    let (pt, pl) = (((32 - r) / 2) as i64, ((32 - c) / 2) as i64);
    let x = x.constant_pad_nd([pl, 32 - c as i64 - pl, pt, 32 - r as i64 - pt]);
    // Padding is black (-1), as the models see the images.
    let mask = tch::Tensor::ones(
        [1, 1, r as i64, c as i64],
        (tch::Kind::Float, tch::Device::Cpu),
    )
    .constant_pad_nd([pl, 32 - c as i64 - pl, pt, 32 - r as i64 - pt]);
    let x = &x * &mask - (1.0 - &mask);
    let y = tch::Tensor::from_slice(&labels).to_kind(tch::Kind::Int64);
    Ok((x, y))
}

/// The photographs of a split, each downscaled by `downscale` (so a crop holds a scene part, not
/// a few pixels), with their file stems. With `test_photos`, those photos form the test split
/// whole and the others train; without, each photo gives its left 80% to training and its right
/// 20% to test. Colour models (`c = 3`) skip grey photos; the `exclude` stems are in no split.
#[allow(clippy::too_many_arguments)]
pub fn split_photos(
    dir: &str,
    extra_dirs: &[String],
    test_photos: &[String],
    exclude: &[String],
    downscale: usize,
    split: Split,
    c: usize,
) -> Result<Vec<(String, image::DynamicImage)>> {
    let mut files = Vec::new();
    for d in std::iter::once(dir).chain(extra_dirs.iter().map(String::as_str)) {
        let found = list_images(Path::new(d))?;
        if found.is_empty() {
            bail!("{d}: no photos (scripts/setup installs the photo sets under .deps/data)");
        }
        files.extend(found);
    }
    let stem = |f: &Path| f.file_stem().map(|s| s.to_string_lossy().to_string());
    for t in test_photos {
        if !files.iter().any(|f| stem(f).as_deref() == Some(t.as_str())) {
            bail!("test photo '{t}' is in none of the photo folders");
        }
        if exclude.contains(t) {
            bail!("photo '{t}' is both a test photo and excluded");
        }
    }
    for x in exclude {
        if !files.iter().any(|f| stem(f).as_deref() == Some(x.as_str())) {
            bail!("excluded photo '{x}' is in none of the photo folders");
        }
    }
    files.retain(|f| {
        !exclude
            .iter()
            .any(|x| stem(f).as_deref() == Some(x.as_str()))
    });
    let k = downscale.max(1) as u32;
    let mut out = Vec::new();
    for f in files {
        let name = stem(&f).unwrap_or_default();
        let held_out = test_photos.contains(&name);
        if !test_photos.is_empty() && held_out != (split == Split::Test) {
            continue;
        }
        let img = image::open(&f).with_context(|| format!("{}: cannot decode", f.display()))?;
        if c == 3 && !img.color().has_color() {
            continue;
        }
        let img = img.resize(
            img.width() / k,
            img.height() / k,
            image::imageops::FilterType::Lanczos3,
        );
        let (w, h) = (img.width(), img.height());
        let part = if !test_photos.is_empty() {
            img
        } else {
            let cut = w * 4 / 5;
            match split {
                Split::Train => img.crop_imm(0, 0, cut, h),
                Split::Test => img.crop_imm(cut, 0, w - cut, h),
            }
        };
        out.push((name, part));
    }
    Ok(out)
}

/// Decodes an image file to `[c, s, s]` in [-1, 1]: shorter side resized to `s` (Lanczos), centre crop.
pub fn load_image(path: &Path, c: usize, s: usize) -> Result<Vec<f32>> {
    let img = image::ImageReader::open(path)
        .with_context(|| format!("{}: cannot open", path.display()))?
        .with_guessed_format()
        .with_context(|| format!("{}: cannot read", path.display()))?
        .decode()
        .with_context(|| format!("{}: cannot decode", path.display()))?;
    let (w, h) = (img.width(), img.height());
    let scale = s as f64 / w.min(h) as f64;
    let (nw, nh) = (
        ((w as f64 * scale).round() as u32).max(s as u32),
        ((h as f64 * scale).round() as u32).max(s as u32),
    );
    let img = img.resize_exact(nw, nh, image::imageops::FilterType::Lanczos3);
    let (x0, y0) = ((nw - s as u32) / 2, (nh - s as u32) / 2);
    let img = img.crop_imm(x0, y0, s as u32, s as u32);
    Ok(to_chw(&img, c))
}

fn to_chw(img: &image::DynamicImage, c: usize) -> Vec<f32> {
    let rgb = img.to_rgb32f();
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    let mut out = vec![0f32; c * h * w];
    for (x, y, p) in rgb.enumerate_pixels() {
        let (x, y) = (x as usize, y as usize);
        if c == 1 {
            // On the 256-level grid of 8-bit images (the t = 0 decoder of the hybrid loss
            // assumes it).
            let g = ((p[0] + p[1] + p[2]) / 3.0 * 255.0).round() / 255.0;
            out[y * w + x] = g * 2.0 - 1.0;
        } else {
            for k in 0..3 {
                out[k * h * w + y * w + x] = p[k] * 2.0 - 1.0;
            }
        }
    }
    out
}

fn list_images(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v = Vec::new();
    for e in walkdir::WalkDir::new(dir).sort_by_file_name() {
        let e = e.with_context(|| format!("{}: cannot list", dir.display()))?;
        let ok = e
            .path()
            .extension()
            .and_then(|x| x.to_str())
            .is_some_and(|x| {
                ["png", "jpg", "jpeg", "webp", "bmp", "tif", "tiff"]
                    .contains(&x.to_ascii_lowercase().as_str())
            });
        if e.file_type().is_file() && ok {
            v.push(e.path().to_path_buf());
        }
    }
    Ok(v)
}

/// A stable hash of a path, for splits that do not move when files are added.
fn path_bucket(p: &Path) -> u64 {
    use sha2::Digest;
    let d = sha2::Sha256::digest(p.to_string_lossy().as_bytes());
    u64::from_le_bytes(d[..8].try_into().expect("8 bytes")) % 100
}

impl Dataset {
    /// Opens the data set of `cfg` for images of `c` channels and side `s`.
    pub fn open(
        cfg: &DataConfig,
        split: Split,
        c: usize,
        s: usize,
        skip_bad: bool,
    ) -> Result<Self> {
        let (source, len, name) = match cfg {
            DataConfig::FashionMnist { dir } => {
                if c != 1 || s < 28 {
                    bail!("Fashion-MNIST is grey 28x28: the model must have 1 channel and size >= 28 (has {c}, {s})");
                }
                let file = match split {
                    Split::Train => "train-images-idx3-ubyte.gz",
                    Split::Test => "t10k-images-idx3-ubyte.gz",
                };
                let path = Path::new(dir).join(file);
                if !path.is_file() {
                    bail!("{}: not found (scripts/setup installs the Debian package dataset-fashion-mnist)", path.display());
                }
                let (n, r, cols, px) = read_idx3(&path)?;
                let pad = (s - r) / 2;
                let mut v = vec![-1f32; n * s * s];
                for i in 0..n {
                    for y in 0..r {
                        for x in 0..cols {
                            v[i * s * s + (y + pad) * s + x + pad] =
                                px[i * r * cols + y * cols + x] as f32 / 127.5 - 1.0;
                        }
                    }
                }
                (Source::Memory(v), n, format!("fashion-mnist {split:?}"))
            }
            DataConfig::Photos {
                dir,
                extra_dirs,
                test_photos,
                exclude,
                downscale,
            } => {
                let mut photos = Vec::new();
                for (_, part) in split_photos(
                    dir,
                    extra_dirs,
                    test_photos,
                    exclude,
                    *downscale as usize,
                    split,
                    c,
                )? {
                    if (part.width() as usize) < s || (part.height() as usize) < s {
                        continue;
                    }
                    photos.push((
                        part.height() as usize,
                        part.width() as usize,
                        to_chw(&part, c),
                    ));
                }
                if photos.is_empty() {
                    bail!("{dir}: no photo is large enough for {s}x{s} crops");
                }
                let len = match split {
                    Split::Train => 50_000,
                    Split::Test => 1_000,
                };
                (
                    Source::Crops(photos, c),
                    len,
                    format!("photo crops {split:?}"),
                )
            }
            DataConfig::Folder { dir } => {
                // Split by the path inside the folder: a data set moved or copied elsewhere
                // keeps its split (by the full path, each copy had another test set).
                let root = Path::new(dir);
                let files: Vec<PathBuf> = list_images(root)?
                    .into_iter()
                    .filter(|p| {
                        let rel = p.strip_prefix(root).unwrap_or(p);
                        (path_bucket(rel) < 5) == (split == Split::Test)
                    })
                    .collect();
                if files.is_empty() {
                    bail!("{dir}: no images for the {split:?} split");
                }
                let n = files.len();
                (Source::Files(files), n, format!("{dir} {split:?}"))
            }
        };
        Ok(Self {
            source,
            channels: c,
            size: s,
            len,
            skipped: AtomicUsize::new(0),
            skip_bad,
            name,
        })
    }

    /// Image `i` (for crops: a deterministic crop).
    pub fn get(&self, i: usize) -> Result<Vec<f32>> {
        let (c, s) = (self.channels, self.size);
        match &self.source {
            Source::Memory(v) => Ok(v[i * c * s * s..(i + 1) * c * s * s].to_vec()),
            Source::Files(files) => {
                // An unreadable file is named; with skip_bad the next readable one stands in.
                for k in 0..files.len() {
                    let p = &files[(i + k) % files.len()];
                    match load_image(p, c, s) {
                        Ok(v) => return Ok(v),
                        Err(e) if self.skip_bad => {
                            self.skipped.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!("skipping {e:#}");
                        }
                        Err(e) => return Err(e),
                    }
                }
                bail!("{}: no readable image", self.name)
            }
            Source::Crops(photos, c) => {
                let mut rng = ChaCha8Rng::seed_from_u64(i as u64);
                let (h, w, data) = &photos[rng.random_range(0..photos.len())];
                let (y0, x0) = (rng.random_range(0..=h - s), rng.random_range(0..=w - s));
                let flip = rng.random_bool(0.5);
                let mut out = vec![0f32; c * s * s];
                for k in 0..*c {
                    for y in 0..s {
                        for x in 0..s {
                            let sx = if flip { s - 1 - x } else { x };
                            out[k * s * s + y * s + x] = data[k * h * w + (y0 + y) * w + x0 + sx];
                        }
                    }
                }
                Ok(out)
            }
        }
    }

    /// Images at `indices`, decoded in parallel, as `[n, c, s, s]` values.
    pub fn batch(&self, indices: &[usize]) -> Result<Vec<f32>> {
        let parts: Vec<Vec<f32>> = indices
            .par_iter()
            .map(|&i| self.get(i))
            .collect::<Result<_>>()?;
        Ok(parts.concat())
    }

    /// The indices of training batch `step`: epoch-wise shuffles seeded by (seed, epoch), so the
    /// batch is a function of the step alone.
    pub fn batch_indices(&self, seed: u64, step: usize, batch: usize) -> Vec<usize> {
        let n = self.len;
        let mut out = Vec::with_capacity(batch);
        let mut pos = step * batch;
        let mut cached: Option<(usize, Vec<usize>)> = None;
        while out.len() < batch {
            let epoch = pos / n;
            if cached.as_ref().map(|(e, _)| *e) != Some(epoch) {
                let mut perm: Vec<usize> = (0..n).collect();
                perm.shuffle(&mut ChaCha8Rng::seed_from_u64(
                    seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                ));
                cached = Some((epoch, perm));
            }
            out.push(cached.as_ref().expect("set").1[pos % n]);
            pos += 1;
        }
        out
    }
}

/// The data set of a model config (`origin` names the config in errors), at the config's image
/// size and channels.
pub fn open_config(
    cfg: &davi_models::DaviConfig,
    origin: &Path,
    split: Split,
    skip_bad: bool,
) -> Result<Dataset> {
    let data = cfg
        .data
        .as_ref()
        .with_context(|| format!("{}: no data section", origin.display()))?;
    Dataset::open(
        data,
        split,
        cfg.unet.in_channels,
        cfg.unet.image_size,
        skip_bad,
    )
}

/// Writes the first `n` images of `ds` as PNG files `00000.png`, ... into `out` (grey or RGB).
/// Returns how many.
pub fn write_images(ds: &Dataset, n: usize, out: &Path) -> Result<usize> {
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    let (c, s) = (ds.channels, ds.size);
    let n = n.min(ds.len);
    for i in 0..n {
        let img = crate::plot::grid(&ds.get(i)?, 1, c, s, 1);
        let img = image::imageops::crop_imm(&img, 2, 2, s as u32, s as u32).to_image();
        let img = if c == 1 {
            image::DynamicImage::ImageRgb8(img).to_luma8().into()
        } else {
            image::DynamicImage::ImageRgb8(img)
        };
        let mut buf = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut buf), image::ImageFormat::Png)?;
        crate::run::write_atomic(&out.join(format!("{i:05}.png")), &buf)?;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A folder's split depends on the paths inside it only: the same images in two places
    /// have the same test set.
    #[test]
    fn a_folder_keeps_its_split_wherever_it_lies() {
        let tmp = tempfile::tempdir().unwrap();
        let test_batch = |dir: &Path| {
            std::fs::create_dir_all(dir).unwrap();
            for i in 0..40u8 {
                image::GrayImage::from_pixel(8, 8, image::Luma([i * 6]))
                    .save(dir.join(format!("{i:02}.png")))
                    .unwrap();
            }
            let cfg = DataConfig::Folder {
                dir: dir.display().to_string(),
            };
            let ds = Dataset::open(&cfg, Split::Test, 1, 8, false).unwrap();
            ds.batch(&(0..ds.len).collect::<Vec<_>>()).unwrap()
        };
        let a = test_batch(&tmp.path().join("a"));
        let b = test_batch(&tmp.path().join("elsewhere/b"));
        assert!(!a.is_empty());
        assert_eq!(a, b);
    }

    #[test]
    fn batches_are_deterministic_and_cover_an_epoch() {
        let ds = Dataset {
            source: Source::Memory(vec![0.0; 10]),
            channels: 1,
            size: 1,
            len: 10,
            skipped: AtomicUsize::new(0),
            skip_bad: false,
            name: "t".into(),
        };
        let a: Vec<usize> = (0..5).flat_map(|s| ds.batch_indices(7, s, 2)).collect();
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
        assert_eq!(ds.batch_indices(7, 3, 2), a[6..8].to_vec());
        assert_ne!(ds.batch_indices(7, 5, 10), ds.batch_indices(7, 0, 10));
    }

    #[test]
    fn unreadable_file_is_named_or_skipped() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("bad.png"), b"not a png").unwrap();
        image::RgbImage::from_pixel(40, 40, image::Rgb([255, 0, 0]))
            .save(dir.path().join("good.png"))
            .unwrap();
        let mut ds = Dataset {
            source: Source::Files(vec![
                dir.path().join("bad.png"),
                dir.path().join("good.png"),
            ]),
            channels: 3,
            size: 32,
            len: 2,
            skipped: AtomicUsize::new(0),
            skip_bad: false,
            name: "t".into(),
        };
        let err = format!("{:#}", ds.get(0).unwrap_err());
        assert!(err.contains("bad.png"), "{err}");
        ds.skip_bad = true;
        let v = ds.get(0).unwrap();
        assert_eq!(v.len(), 3 * 32 * 32);
        assert!((v[0] - 1.0).abs() < 1e-6 && (v[32 * 32] + 1.0).abs() < 1e-6);
        assert_eq!(ds.skipped.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn held_out_photos_form_the_test_split_whole() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        // Solid colours tell the photos apart: red and green train, blue is held out.
        let solid = |dir: &Path, name: &str, rgb: [u8; 3]| {
            image::RgbImage::from_pixel(160, 160, image::Rgb(rgb))
                .save(dir.join(name))
                .unwrap();
        };
        solid(a.path(), "red.png", [255, 0, 0]);
        solid(a.path(), "green.png", [0, 255, 0]);
        solid(b.path(), "blue.png", [0, 0, 255]);
        let cfg = |test: &[&str]| DataConfig::Photos {
            dir: a.path().display().to_string(),
            extra_dirs: vec![b.path().display().to_string()],
            test_photos: test.iter().map(|s| s.to_string()).collect(),
            exclude: Vec::new(),
            downscale: 4,
        };
        let blue = |v: &[f32]| v[2 * 32 * 32] > 0.9 && v[0] < -0.9;
        let test = Dataset::open(&cfg(&["blue"]), Split::Test, 3, 32, false).unwrap();
        let train = Dataset::open(&cfg(&["blue"]), Split::Train, 3, 32, false).unwrap();
        for i in 0..50 {
            assert!(
                blue(&test.get(i).unwrap()),
                "test crop {i} is not from the held-out photo"
            );
            assert!(
                !blue(&train.get(i).unwrap()),
                "train crop {i} is from the held-out photo"
            );
        }
        let err = format!(
            "{:#}",
            Dataset::open(&cfg(&["purple"]), Split::Test, 3, 32, false)
                .err()
                .unwrap()
        );
        assert!(err.contains("purple"), "{err}");
        // Whole photographs of a split (`davi-train images --whole`): by name, downscaled.
        let whole = split_photos(
            &a.path().display().to_string(),
            &[b.path().display().to_string()],
            &["blue".to_string()],
            &[],
            4,
            Split::Test,
            3,
        )
        .unwrap();
        assert_eq!(whole.len(), 1);
        assert_eq!(whole[0].0, "blue");
        assert_eq!((whole[0].1.width(), whole[0].1.height()), (40, 40));
        // Excluded pictures are in no split; an unknown or held-out name is an error.
        let split = |exclude: &[&str], sp: Split| {
            split_photos(
                &a.path().display().to_string(),
                &[b.path().display().to_string()],
                &["blue".to_string()],
                &exclude.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
                4,
                sp,
                3,
            )
        };
        let names = |v: Vec<(String, image::DynamicImage)>| {
            v.into_iter().map(|(n, _)| n).collect::<Vec<_>>()
        };
        assert_eq!(names(split(&[], Split::Train).unwrap()), ["green", "red"]);
        assert_eq!(names(split(&["red"], Split::Train).unwrap()), ["green"]);
        assert_eq!(names(split(&["red"], Split::Test).unwrap()), ["blue"]);
        let e = format!("{:#}", split(&["wheel"], Split::Train).unwrap_err());
        assert!(e.contains("'wheel' is in none"), "{e}");
        let e = format!("{:#}", split(&["blue"], Split::Train).unwrap_err());
        assert!(e.contains("both a test photo and excluded"), "{e}");
    }
}
