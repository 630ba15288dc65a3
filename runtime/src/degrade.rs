//! `davi degrade`: measurements `y = H x + n` of clean images, made by the same operator code
//! that training uses (recorded to ONNX by `davi-export` and run here).

use crate::images::{self, Format};
use crate::model::{session, ModelSource, SessionOptions};
use crate::pipeline::{noise, Report, RestoreOptions};
use crate::RuntimeError;
use davi_models::Operator;
use ndarray::{Array4, Axis};
use ort::value::TensorRef;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

/// What `degrade` does.
pub struct DegradeOptions {
    /// Clean image file or folder.
    pub input: PathBuf,
    /// Output folder (PNG, relative paths mirrored).
    pub output: PathBuf,
    /// The operator, given or built per image size from `task`.
    pub operator: Option<Operator>,
    /// The task name when no operator is given.
    pub task: Option<String>,
    /// Image channels (1 or 3); `None`: as the image is.
    pub channels: Option<usize>,
    /// Measurement noise (None: the task's default).
    pub sigma_y: Option<f64>,
    /// Seed of the measurement noise.
    pub seed: u64,
    /// Also write each measurement lifted back to the image's size and channels into this
    /// folder: the baseline a restoration must beat (bicubic upsampling for SR, the grey image
    /// in R, G and B for colorization, the measurement itself otherwise).
    pub lift: Option<PathBuf>,
}

/// The lifted measurement of `y_png` (the measurement as written) for an image of `w` x `h`
/// and `c` channels.
fn lifted(op: &Operator, y_png: &[u8], w: u32, h: u32, c: usize) -> Result<Vec<u8>, String> {
    let y = image::load_from_memory(y_png).map_err(|e| e.to_string())?;
    let img = match op {
        Operator::SuperRes { .. } => y.resize_exact(w, h, image::imageops::FilterType::CatmullRom),
        _ => y,
    };
    let img = if c == 3 {
        image::DynamicImage::ImageRgb8(img.to_rgb8())
    } else {
        img
    };
    let mut out = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .map_err(|e| e.to_string())?;
    Ok(out)
}

/// Degrades every image; per-file problems are counted in the report.
pub fn degrade(opts: &DegradeOptions, sess: &SessionOptions) -> Result<Report, RuntimeError> {
    let start = Instant::now();
    if let Some(s) = opts.sigma_y {
        if !(s as f32).is_finite() || s < 0.0 {
            return Err(RuntimeError::Usage(format!(
                "--sigma-y {s}: the measurement noise must be a finite number >= 0"
            )));
        }
    }
    let mut report = Report::default();
    let mut sessions: HashMap<(usize, usize, usize), (ort::session::Session, Operator)> =
        HashMap::new();
    // The same listing, naming and no-overwrite rules as `restore`.
    let plan_opts = RestoreOptions {
        input: opts.input.clone(),
        output: opts.output.clone(),
        format: Format::Png,
        batch: 1,
        seed: opts.seed,
        skip_existing: false,
        shard: None,
        samples: 1,
        follow_symlinks: false,
        progress: false,
        print_failures: false,
        max_pixels: images::DEFAULT_MAX_PIXELS,
        overlap: crate::pipeline::DEFAULT_OVERLAP,
        stop: None,
    };
    let (jobs, planned) = crate::pipeline::plan(&plan_opts, None, &[])?;
    report.found = jobs.len();
    report.ignored = planned.ignored;
    report.output_inside_input = planned.output_inside_input;
    if let Some(l) = &opts.lift {
        use crate::paths::dir_within;
        let taken = [&opts.input, &opts.output]
            .iter()
            .any(|p| dir_within(l, p) || dir_within(p, l));
        if l.exists() && !l.is_dir() {
            return Err(RuntimeError::Usage(format!(
                "--lift {}: exists and is not a folder",
                crate::paths::escape(l)
            )));
        }
        if taken {
            return Err(RuntimeError::Usage(format!(
                "refused: --lift {} overlaps the input or the output folder; nothing was written",
                crate::paths::escape(l)
            )));
        }
        std::fs::create_dir_all(l).map_err(|e| RuntimeError::io(l, e))?;
    }
    crate::paths::prepare_output_dir(&opts.output)?;
    crate::pipeline::mark_output_inside_input(&plan_opts)?;
    crate::pipeline::remove_stale_temporaries(&jobs, &plan_opts);
    for job in &jobs {
        let (path, rel) = (&job.path, &job.rel);
        // Each failure is printed as it happens, and kept for the summary and the report.
        let fail = |report: &mut Report, reason: String| {
            let f = job.failure(reason);
            f.print();
            report.failed.push(f);
        };
        if let Some(p) = &job.problem {
            fail(&mut report, p.clone());
            continue;
        }
        let c = match opts.channels {
            Some(c) => c,
            // From the header: the image is decoded once, by `load`, under the pixel limit.
            None => match images::has_colour(path) {
                Ok(true) => 3,
                Ok(false) => 1,
                Err(e) => {
                    fail(&mut report, e);
                    continue;
                }
            },
        };
        let x = match images::load(path, c, None) {
            Ok(x) => x,
            Err(r) => {
                fail(&mut report, r);
                continue;
            }
        };
        let (_, h, w) = x.dim();
        if let std::collections::hash_map::Entry::Vacant(e) = sessions.entry((c, h, w)) {
            // --task scales the operator to the image (by its shorter side); -m takes the
            // model's own.
            let op = match (&opts.operator, &opts.task) {
                (Some(op), _) => op.clone(),
                (None, Some(t)) => Operator::for_task(t, h.min(w))
                    .map_err(|e| RuntimeError::Usage(e.to_string()))?,
                (None, None) => return Err(RuntimeError::Usage("give --task or -m MODEL".into())),
            };
            let proto = match davi_export::export_operator_hw(&op, c, h, w) {
                Ok(p) => p,
                Err(e) => {
                    // The operator's own words, about this image (there is no model here).
                    let why = match &e {
                        davi_export::ExportError::Model(davi_models::Error::Config(m)) => {
                            m.replace("a colour model", "a colour (RGB) image")
                        }
                        other => other.to_string(),
                    };
                    fail(
                        &mut report,
                        format!(
                            "the {} operator does not fit this {w}x{h} image: {why}",
                            op.task()
                        ),
                    );
                    continue;
                }
            };
            let bytes = davi_export::to_bytes(&proto);
            let s = session(ModelSource::Bytes(&bytes, "operator"), sess)?;
            e.insert((s, op));
        }
        let (s, op) = sessions.get_mut(&(c, h, w)).expect("inserted");
        let sigma_y = opts.sigma_y.unwrap_or_else(|| op.default_sigma_y()) as f32;
        let input = x.insert_axis(Axis(0));
        let input: Array4<f32> = input.into_dimensionality().expect("rank 4");
        let tensor = TensorRef::from_array_view(input.view())
            .map_err(|e| RuntimeError::Usage(e.to_string()))?;
        let out = s
            .run(ort::inputs!["image" => tensor])
            .map_err(|e| RuntimeError::Model {
                path: "operator".into(),
                reason: e.to_string(),
            })?;
        let mut y = out["measurement"]
            .try_extract_array::<f32>()
            .map_err(|e| RuntimeError::Model {
                path: "operator".into(),
                reason: e.to_string(),
            })?
            .to_owned();
        let n = noise(opts.seed, "measurement", rel, 0, y.len());
        y.iter_mut().zip(n).for_each(|(v, z)| *v += sigma_y * z);
        let y3 = y
            .index_axis_move(Axis(0), 0)
            .into_dimensionality::<ndarray::Ix3>()
            .expect("rank 3");
        let dst = job.output(&opts.output, Format::Png, "");
        let written = images::encode(y3.view(), Format::Png).and_then(|b| {
            // The lifted image is made before anything is written: a failure leaves neither.
            let lift = match &opts.lift {
                Some(l) => Some((l, lifted(op, &b, w as u32, h as u32, c)?)),
                None => None,
            };
            images::write_atomic(&dst, &b).map_err(|e| e.to_string())?;
            if let Some((l, lift)) = lift {
                images::write_atomic(&job.output(l, Format::Png, ""), &lift).map_err(|e| {
                    format!("the measurement was written, its lifted image not: {e}")
                })?;
            }
            Ok(())
        });
        match written {
            Ok(()) => report.restored += 1,
            Err(r) => fail(&mut report, r),
        }
    }
    report.seconds = start.elapsed().as_secs_f64();
    report.images_per_second = report.restored as f64 / report.seconds.max(1e-9);
    Ok(report)
}
