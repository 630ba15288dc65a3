//! Decoding images into model tensors and encoding results, atomically.

use image::ImageDecoder;
use ndarray::{Array3, ArrayView3};
use std::path::Path;

/// Extensions `davi` reads.
pub const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "webp", "bmp", "tif", "tiff"];

/// Whether `path` has one of [`IMAGE_EXTENSIONS`].
pub fn is_image_path(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Lossless PNG.
    Png,
    /// JPEG, quality 95.
    Jpg,
    /// Lossless WebP.
    Webp,
}

impl Format {
    /// The largest side the format holds, where it has a limit (WebP 16383, JPEG 65535).
    pub fn max_side(self) -> Option<usize> {
        match self {
            Format::Png => None,
            Format::Jpg => Some(65_535),
            Format::Webp => Some(16_383),
        }
    }

    /// The `image` crate's name of the format.
    pub fn image_format(self) -> image::ImageFormat {
        match self {
            Format::Png => image::ImageFormat::Png,
            Format::Jpg => image::ImageFormat::Jpeg,
            Format::Webp => image::ImageFormat::WebP,
        }
    }

    /// Whether the file at `path` starts as a file of this format does (its signature, read
    /// from the first bytes; the contents are not decoded).
    pub fn starts(self, path: &Path) -> bool {
        use std::io::Read;
        let mut head = Vec::with_capacity(32);
        std::fs::File::open(path)
            .and_then(|f| f.take(32).read_to_end(&mut head))
            .is_ok()
            && image::guess_format(&head).ok() == Some(self.image_format())
    }

    /// The file extension.
    pub fn ext(self) -> &'static str {
        match self {
            Format::Png => "png",
            Format::Jpg => "jpg",
            Format::Webp => "webp",
        }
    }
}

/// The largest image `davi` decodes unless told otherwise (`--max-pixels`).
pub const DEFAULT_MAX_PIXELS: u64 = 100_000_000;

/// Decodes an image file to `[c, h, w]` in [-1, 1] with `c` channels (1: grey as the channel mean,
/// the colorization operator's `H`; 3: RGB). Alpha is dropped; 16-bit and float inputs keep
/// their precision until the conversion. `Err` is the reason, for the report. Images above
/// [`DEFAULT_MAX_PIXELS`] are refused from their header, before decoding.
pub fn load(
    path: &Path,
    c: usize,
    expect_hw: Option<(usize, usize)>,
) -> Result<Array3<f32>, String> {
    load_limited(path, c, expect_hw, DEFAULT_MAX_PIXELS)
}

/// Whether the image at `path` has colour, from its header alone (the format guessed from its
/// bytes, as [`load`] does, not from its extension).
pub fn has_colour(path: &Path) -> Result<bool, String> {
    let dec = image::ImageReader::open(path)
        .map_err(|e| format!("cannot read: {e}"))?
        .with_guessed_format()
        .map_err(|e| format!("cannot read: {e}"))?
        .into_decoder()
        .map_err(|e| format!("cannot decode: {e}"))?;
    Ok(image::ImageDecoder::color_type(&dec).has_color())
}

/// [`load`] with a pixel limit: the header is read first, and an image larger than
/// `max_pixels` (or not of `expect_hw`) is refused without decoding it.
pub fn load_limited(
    path: &Path,
    c: usize,
    expect_hw: Option<(usize, usize)>,
    max_pixels: u64,
) -> Result<Array3<f32>, String> {
    let len = std::fs::metadata(path)
        .map_err(|e| format!("cannot read: {e}"))?
        .len();
    if len == 0 {
        return Err("empty file".into());
    }
    // No format stores fewer than one bit per pixel... but a compressed one can store far fewer
    // bytes than pixels; the file's size only bounds what reading it costs.
    if len > max_pixels.saturating_mul(16).saturating_add(1 << 20) {
        return Err(format!(
            "file of {len} bytes is larger than any image of at most {max_pixels} pixels"
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
    if image::guess_format(&bytes).ok() == Some(image::ImageFormat::Jpeg) && !jpeg_complete(&bytes)
    {
        return Err(
            "cannot decode: truncated JPEG (no end-of-image marker after its last scan)".into(),
        );
    }
    let reader = || {
        image::ImageReader::new(std::io::Cursor::new(&bytes))
            .with_guessed_format()
            .map_err(|e| format!("cannot read: {e}"))
    };
    let mut dec = reader()?
        .into_decoder()
        .map_err(|e| format!("cannot decode: {e}"))?;
    let orientation = orientation_of(&mut dec);
    let stored = dec.dimensions();
    let (w, h) = oriented(stored, orientation);
    let pixels = w as u64 * h as u64;
    if pixels > max_pixels {
        return Err(format!(
            "{w}x{h} is {pixels} pixels, more than --max-pixels {max_pixels}; not decoded"
        ));
    }
    if let Some((eh, ew)) = expect_hw {
        if (h as usize, w as usize) != (eh, ew) {
            return Err(format!(
                "wrong size: the model takes {ew}x{eh} images, this one is {w}x{h}"
            ));
        }
    }
    // The decoders check the stored (unrotated) size; the decoded buffer (at most 4 channels of
    // 32-bit floats per pixel) is bounded by the pixel check above.
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(stored.0);
    limits.max_image_height = Some(stored.1);
    limits.max_alloc = Some(pixels.saturating_mul(16).max(1 << 20));
    dec.set_limits(limits)
        .map_err(|e| format!("cannot decode: {e}"))?;
    let mut img =
        image::DynamicImage::from_decoder(dec).map_err(|e| format!("cannot decode: {e}"))?;
    // Upright as a viewer shows it (a phone's JPEG stores its rotation in EXIF).
    img.apply_orientation(orientation);
    let (w, h) = (img.width() as usize, img.height() as usize);
    let rgb = img.to_rgb32f();
    let grey_source = !img.color().has_color();
    let mut out = Array3::<f32>::zeros((c, h, w));
    for (x, y, p) in rgb.enumerate_pixels() {
        let (x, y) = (x as usize, y as usize);
        match c {
            1 => {
                let v = if grey_source {
                    p[0]
                } else {
                    (p[0] + p[1] + p[2]) / 3.0
                };
                out[[0, y, x]] = v * 2.0 - 1.0;
            }
            _ => {
                for k in 0..c.min(3) {
                    out[[k, y, x]] = p[k] * 2.0 - 1.0;
                }
            }
        }
    }
    Ok(out)
}

/// Whether a JPEG's last scan is followed by its end-of-image marker (FF D9). The decoders fill
/// the missing blocks of a cut file with grey and report nothing; a scan's own bytes never hold
/// FF D9 (an FF in them is stuffed as FF 00), and an EXIF thumbnail's scan and end come before
/// the image's scan. A file without a scan is left to the decoder.
fn jpeg_complete(bytes: &[u8]) -> bool {
    match bytes.windows(2).rposition(|w| w == [0xFF, 0xDA]) {
        Some(scan) => bytes[scan..].windows(2).any(|w| w == [0xFF, 0xD9]),
        None => true,
    }
}

/// The EXIF orientation a decoder reports; none when the file has none or it cannot be read
/// (a damaged EXIF block does not make the pixels unreadable).
fn orientation_of(dec: &mut impl image::ImageDecoder) -> image::metadata::Orientation {
    dec.orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms)
}

/// `(w, h)` as stored, turned as `o` turns the image.
fn oriented((w, h): (u32, u32), o: image::metadata::Orientation) -> (u32, u32) {
    use image::metadata::Orientation::*;
    match o {
        Rotate90 | Rotate270 | Rotate90FlipH | Rotate270FlipH => (h, w),
        _ => (w, h),
    }
}

/// Width and height of the image at `path` as [`load`] returns it (after its EXIF rotation),
/// from its header alone.
pub fn dimensions(path: &Path) -> Result<(u32, u32), String> {
    let mut dec = image::ImageReader::open(path)
        .map_err(|e| format!("cannot read: {e}"))?
        .with_guessed_format()
        .map_err(|e| format!("cannot read: {e}"))?
        .into_decoder()
        .map_err(|e| format!("cannot decode: {e}"))?;
    let o = orientation_of(&mut dec);
    Ok(oriented(dec.dimensions(), o))
}

/// `[c, h, w]` in [-1, 1] to 8-bit pixels (round to nearest).
pub fn to_u8(x: f32) -> u8 {
    (((x.clamp(-1.0, 1.0) + 1.0) * 127.5) + 0.5)
        .floor()
        .min(255.0) as u8
}

/// Encodes `[c, h, w]` in [-1, 1] (c = 1 or 3) in `format`.
pub fn encode(img: ArrayView3<f32>, format: Format) -> Result<Vec<u8>, String> {
    let (c, h, w) = img.dim();
    let dynimg = match c {
        1 => image::DynamicImage::ImageLuma8(image::GrayImage::from_fn(
            w as u32,
            h as u32,
            |x, y| image::Luma([to_u8(img[[0, y as usize, x as usize]])]),
        )),
        3 => {
            image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(w as u32, h as u32, |x, y| {
                let (x, y) = (x as usize, y as usize);
                image::Rgb([
                    to_u8(img[[0, y, x]]),
                    to_u8(img[[1, y, x]]),
                    to_u8(img[[2, y, x]]),
                ])
            }))
        }
        _ => return Err(format!("cannot encode an image of {c} channels")),
    };
    let mut buf = Vec::new();
    let mut cur = std::io::Cursor::new(&mut buf);
    match format {
        Format::Png => dynimg.write_to(&mut cur, image::ImageFormat::Png),
        Format::Webp => dynimg.write_to(&mut cur, image::ImageFormat::WebP),
        Format::Jpg => {
            let enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut cur, 95);
            dynimg.write_with_encoder(enc)
        }
    }
    .map_err(|e| format!("cannot encode: {e}"))?;
    Ok(buf)
}

pub use davi_models::atomic::{write_atomic, write_named, WriteError};

#[cfg(test)]
mod tests {
    use super::*;

    /// A JPEG whose EXIF says "rotate 90 degrees clockwise" (orientation 6), as a phone writes a
    /// portrait photo: stored 16x8, left half red, right half blue.
    fn rotated_jpeg(path: &Path) {
        let img = image::RgbImage::from_fn(16, 8, |x, _| {
            if x < 8 {
                image::Rgb([250, 0, 0])
            } else {
                image::Rgb([0, 0, 250])
            }
        });
        let mut jpg = Vec::new();
        img.write_to(
            &mut std::io::Cursor::new(&mut jpg),
            image::ImageFormat::Jpeg,
        )
        .unwrap();
        let mut tiff = b"II*\0\x08\0\0\0\x01\0".to_vec();
        tiff.extend_from_slice(&[0x12, 0x01, 3, 0, 1, 0, 0, 0, 6, 0, 0, 0, 0, 0, 0, 0]);
        let mut app1 = b"Exif\0\0".to_vec();
        app1.extend_from_slice(&tiff);
        let len = (app1.len() + 2) as u16;
        let mut seg = vec![0xFF, 0xE1];
        seg.extend_from_slice(&len.to_be_bytes());
        seg.extend_from_slice(&app1);
        jpg.splice(2..2, seg);
        std::fs::write(path, jpg).unwrap();
    }

    fn jpeg_of(w: u32, h: u32) -> Vec<u8> {
        let mut s = 7u32;
        let img = image::RgbImage::from_fn(w, h, |_, _| {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            let v = (s >> 24) as u8;
            image::Rgb([v, v / 2, 255 - v])
        });
        let mut jpg = Vec::new();
        img.write_to(
            &mut std::io::Cursor::new(&mut jpg),
            image::ImageFormat::Jpeg,
        )
        .unwrap();
        jpg
    }

    /// A cut JPEG decodes without complaint (the decoder fills the rest with grey): it is refused
    /// by its missing end marker, also when an embedded thumbnail (its own scan and end) comes
    /// first. A whole one, or one with bytes after its end (as cameras append), loads.
    #[test]
    fn a_cut_jpeg_is_refused_and_a_whole_one_loads() {
        let t = tempfile::tempdir().unwrap();
        let mut jpg = jpeg_of(64, 64);
        // An APP1 segment holding a whole 8x8 JPEG, where EXIF keeps a thumbnail.
        let mut app = b"Exif\0\0".to_vec();
        app.extend_from_slice(&jpeg_of(8, 8));
        let mut seg = vec![0xFF, 0xE1];
        seg.extend_from_slice(&((app.len() + 2) as u16).to_be_bytes());
        seg.extend_from_slice(&app);
        jpg.splice(2..2, seg);
        let whole = t.path().join("whole.jpg");
        std::fs::write(&whole, &jpg).unwrap();
        assert_eq!(load(&whole, 3, None).unwrap().dim(), (3, 64, 64));
        let mut tail = jpg.clone();
        tail.extend_from_slice(b"appended by a camera");
        let tailed = t.path().join("tail.jpg");
        std::fs::write(&tailed, &tail).unwrap();
        assert!(load(&tailed, 3, None).is_ok());
        for keep in [0.95, 0.6] {
            let cut = t.path().join(format!("cut{keep}.jpg"));
            std::fs::write(&cut, &jpg[..(jpg.len() as f64 * keep) as usize]).unwrap();
            let e = load(&cut, 3, None).unwrap_err();
            assert!(e.contains("truncated JPEG"), "{keep}: {e}");
        }
    }

    #[test]
    fn a_photo_is_loaded_upright_as_its_exif_orientation_says() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("portrait.jpg");
        rotated_jpeg(&p);
        assert_eq!(dimensions(&p).unwrap(), (8, 16));
        let a = load(&p, 3, None).unwrap();
        assert_eq!(a.dim(), (3, 16, 8));
        // Turned clockwise: the stored left half (red) is on top.
        assert!(a[[0, 2, 4]] > 0.5 && a[[2, 2, 4]] < -0.5, "top is red");
        assert!(
            a[[2, 13, 4]] > 0.5 && a[[0, 13, 4]] < -0.5,
            "bottom is blue"
        );
        // The size a model expects is the upright one.
        assert!(load(&p, 3, Some((16, 8))).is_ok());
        let e = load(&p, 3, Some((8, 16))).unwrap_err();
        assert!(e.contains("this one is 8x16"), "{e}");
    }
}
