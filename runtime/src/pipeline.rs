//! `davi restore`: a folder of measurements through one session, in bounded batches.
//!
//! Three stages run at once: decoding on the rayon pool, the session on the calling thread
//! (ONNX Runtime's `run` takes `&mut self`), encoding and atomic writes on the rayon pool. Each
//! stage hands the next one chunks through a bounded channel, so memory does not grow with the
//! folder. Noise is seeded from (seed, relative path, sample), so outputs never depend on batch
//! size, order or sharding.

use crate::images::{self, Format};
use crate::tiles::{Canvas, Grid};
use crate::{paths, Model, RuntimeError};
use ndarray::{Array3, Array4, Axis, Zip};
use rand::SeedableRng;
use rand_distr::Distribution;
use rayon::prelude::*;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// What to restore and how.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// An image file or a folder (walked recursively, sorted).
    pub input: PathBuf,
    /// Output folder; relative paths of the input are mirrored under it.
    pub output: PathBuf,
    /// Output format.
    pub format: Format,
    /// Images per session run.
    pub batch: usize,
    /// Seed of the bridge noise.
    pub seed: u64,
    /// Set (by [`stop_on_signals`]) to stop after the images in flight: no other input starts,
    /// and the report counts the rest as `not_done`. `None`: run to the end.
    pub stop: Option<Arc<AtomicBool>>,
    /// Skip inputs whose outputs (with `samples`, every sample, `.std` and the mean) all exist.
    pub skip_existing: bool,
    /// Process only the inputs of shard `i` of `n` ([`shard_of`] their relative path).
    pub shard: Option<(usize, usize)>,
    /// Posterior samples per image (> 1 also writes their mean and standard deviation).
    pub samples: usize,
    /// Follow symbolic links that leave the input folder.
    pub follow_symlinks: bool,
    /// Show a progress bar (on a TTY).
    pub progress: bool,
    /// Print each failure to stderr as it happens (`davi: failed: PATH: REASON`), not only in
    /// the report: a run over a million files takes days, and a kill loses no line printed.
    pub print_failures: bool,
    /// Images above this many pixels are refused from their header, without decoding.
    pub max_pixels: u64,
    /// Overlap of neighbouring tiles of a larger image, as a fraction of the tile.
    pub overlap: f64,
}

/// One file that could not be restored.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Failure {
    /// The input path.
    pub path: String,
    /// Why.
    pub reason: String,
}

impl Failure {
    /// Prints `davi: failed: PATH: REASON` to stderr (a closed stderr is no error: the report
    /// still has it).
    pub fn print(&self) {
        let _ = writeln!(
            std::io::stderr().lock(),
            "davi: failed: {}: {}",
            self.path,
            self.reason
        );
    }
}

/// The file that marks a folder inside the input folder as davi's output folder: the images in
/// it are outputs (a rerun replaces them, and no run reads them as inputs), not the user's.
pub const OUTPUT_MARK: &str = ".davi-output";

/// An output folder inside the input folder is not read as input, so the images already in it
/// would be neither inputs nor protected from this run's outputs: such a folder that holds
/// images is refused unless davi marked it as its own ([`OUTPUT_MARK`]).
fn check_output_inside_input(opts: &RestoreOptions) -> Result<(), RuntimeError> {
    let out = &opts.output;
    if out.join(OUTPUT_MARK).is_file() {
        return Ok(());
    }
    let theirs = walkdir::WalkDir::new(out)
        .into_iter()
        .filter_map(Result::ok)
        .find(|e| !e.file_type().is_dir() && images::is_image_path(e.path()));
    if let Some(e) = theirs {
        return Err(RuntimeError::Usage(format!(
            "refused: the output folder {} lies inside the input folder and holds images davi did not write there ({}, ...): they are not read as inputs and this run could replace them; give a new folder or one outside the input (if they are outputs of an earlier davi, create {} to say so); nothing was written",
            paths::escape(out),
            paths::escape(e.path()),
            paths::escape(&out.join(OUTPUT_MARK))
        )));
    }
    Ok(())
}

/// Marks an output folder that lies inside the input folder as davi's ([`OUTPUT_MARK`]), once it
/// exists and before anything is written in it.
pub fn mark_output_inside_input(opts: &RestoreOptions) -> Result<(), RuntimeError> {
    if !opts.input.is_dir() || !paths::dir_within(&opts.output, &opts.input) {
        return Ok(());
    }
    let mark = opts.output.join(OUTPUT_MARK);
    if mark.is_file() {
        return Ok(());
    }
    images::write_atomic(
        &mark,
        b"Written by davi: this folder inside its input folder holds davi's outputs. davi never reads it as input, and a rerun may replace the images in it.\n",
    )
    .map_err(RuntimeError::from)
}

/// What a run did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Report {
    /// Inputs found (after sharding).
    pub found: usize,
    /// Restored now.
    pub restored: usize,
    /// Skipped because their output existed.
    pub skipped: usize,
    /// Files with another extension, not read.
    pub ignored: usize,
    /// The output folder, when it lies inside the input folder: not walked, so that no output
    /// is read back as an input (and no file already in it is one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_inside_input: Option<String>,
    /// Failures, each with its path and reason.
    pub failed: Vec<Failure>,
    /// Wall time of the run.
    pub seconds: f64,
    /// Restored images per second.
    pub images_per_second: f64,
    /// Seconds spent inside the session.
    pub session_seconds: f64,
    /// Session rows run (tiles of every sample).
    pub rows: usize,
    /// Whether a signal (SIGINT, SIGTERM, SIGHUP) stopped the run before every input was done:
    /// the images in flight were finished and written, no other was started.
    pub interrupted: bool,
    /// Inputs not started because the run was interrupted (found = restored + skipped + failed
    /// + not_done).
    pub not_done: usize,
    /// Megapixels of restored output (per input, not per sample).
    pub megapixels: f64,
}

/// One input: where it is, its path relative to the input (mirrored under the output), the base
/// name of its outputs (without suffix and extension), or the reason it cannot be restored.
#[derive(Debug, Clone)]
pub struct Job {
    /// The input file.
    pub path: PathBuf,
    /// Its path relative to the input folder.
    pub rel: PathBuf,
    /// The base name of its outputs (see [`plan`] for the naming rule).
    pub base: OsString,
    /// Why it cannot be restored, when it cannot.
    pub problem: Option<String>,
    /// The file it resolves to, when it was reached through a symbolic link.
    pub link_target: Option<PathBuf>,
}

impl Job {
    fn ok(path: PathBuf, rel: PathBuf) -> Self {
        let base = rel.file_stem().unwrap_or_default().to_os_string();
        Self {
            path,
            rel,
            base,
            problem: None,
            link_target: None,
        }
    }
    fn failed(path: PathBuf, reason: impl Into<String>) -> Self {
        Self {
            rel: PathBuf::new(),
            base: OsString::new(),
            problem: Some(reason.into()),
            path,
            link_target: None,
        }
    }
    /// Its output with `suffix` (`""`, `.std`, `.sample3`).
    pub fn output(&self, out: &Path, format: Format, suffix: &str) -> PathBuf {
        let mut name = self.base.clone();
        name.push(suffix);
        name.push(".");
        name.push(format.ext());
        out.join(&self.rel).with_file_name(name)
    }
    /// A failure of this input.
    pub fn failure(&self, reason: impl Into<String>) -> Failure {
        Failure {
            path: paths::escape(&self.path),
            reason: paths::one_line(&reason.into()),
        }
    }
}

/// Lists the inputs, sorted and recursive, image extensions only. Entries that cannot be used
/// (unreadable folders, symlink loops, links that leave the folder, FIFOs, sockets, devices)
/// stay in the list as failures with their reason, in their sorted place, so that sharding and
/// the counts treat them like every other input.
fn list_inputs(opts: &RestoreOptions, report: &mut Report) -> Result<Vec<Job>, RuntimeError> {
    let input = &opts.input;
    let meta = std::fs::metadata(input).map_err(|e| RuntimeError::io(input, e))?;
    if !meta.is_dir() {
        let name = input
            .file_name()
            .ok_or_else(|| RuntimeError::file(input, "no file name"))?;
        let job = Job::ok(input.clone(), PathBuf::from(name));
        return Ok(vec![if meta.is_file() {
            job
        } else {
            Job::failed(input.clone(), "not a regular file")
        }]);
    }
    let root = input
        .canonicalize()
        .map_err(|e| RuntimeError::io(input, e))?;
    // An output folder inside the input folder is not walked: its files are ours, not inputs.
    let out_root = paths::dir_id(&opts.output);
    let mut jobs = Vec::new();
    let out_inside = std::cell::Cell::new(false);
    let walker = walkdir::WalkDir::new(input)
        .follow_links(opts.follow_symlinks)
        .sort_by_file_name()
        .into_iter()
        .filter_entry(|e| {
            // Only folders can be the output folder: files are not resolved.
            let ours = e.file_type().is_dir() && paths::dir_id(e.path()) == out_root;
            if ours {
                out_inside.set(true);
            }
            !ours
        });
    for entry in walker {
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                let path = e.path().unwrap_or(input).to_path_buf();
                let reason = if e.loop_ancestor().is_some() {
                    "symlink loop".to_string()
                } else {
                    format!(
                        "cannot read: {}",
                        e.io_error()
                            .map(|e| e.to_string())
                            .unwrap_or_else(|| e.to_string())
                    )
                };
                jobs.push(Job::failed(path, reason));
                continue;
            }
        };
        let path = entry.path();
        let ft = entry.file_type();
        if ft.is_dir() {
            continue;
        }
        if ft.is_symlink() {
            // Not followed by walkdir: resolve it ourselves and keep it only if it stays inside.
            match path.canonicalize() {
                Err(e) => {
                    jobs.push(Job::failed(
                        path.to_path_buf(),
                        format!("broken symlink or symlink loop: {e}"),
                    ));
                    continue;
                }
                Ok(target) if !target.starts_with(&root) => {
                    jobs.push(Job::failed(
                        path.to_path_buf(),
                        "symlink leaves the input folder; not followed (use --follow-symlinks)",
                    ));
                    continue;
                }
                Ok(target) if target.is_dir() => continue, // its files are reached inside the folder
                Ok(target) if !target.is_file() => {
                    jobs.push(Job::failed(
                        path.to_path_buf(),
                        format!("symlink to {}", file_kind(&target)),
                    ));
                    continue;
                }
                Ok(_) => {}
            }
        } else if !ft.is_file() {
            jobs.push(Job::failed(path.to_path_buf(), file_kind(path)));
            continue;
        }
        if !images::is_image_path(path) {
            report.ignored += 1;
            continue;
        }
        let rel = path.strip_prefix(input).unwrap_or(path).to_path_buf();
        if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
            jobs.push(Job::failed(
                path.to_path_buf(),
                "path escapes the input folder",
            ));
            continue;
        }
        let mut job = Job::ok(path.to_path_buf(), rel);
        if entry.path_is_symlink() || opts.follow_symlinks {
            job.link_target = path.canonicalize().ok();
        }
        jobs.push(job);
    }
    if out_inside.get() {
        report.output_inside_input = Some(paths::escape(&opts.output));
    }
    Ok(jobs)
}

/// What a non-regular file is, for its failure.
fn file_kind(path: &Path) -> String {
    match std::fs::metadata(path) {
        Ok(m) => paths::file_kind(&m),
        Err(_) => "not a regular file; not read".into(),
    }
}

/// The output suffixes of one input: `""` alone, or with K samples each sample, `.std` and the
/// mean under the plain name.
fn suffixes(k: usize) -> Vec<String> {
    if k == 1 {
        return vec![String::new()];
    }
    let mut v: Vec<String> = (0..k).map(|i| format!(".sample{i}")).collect();
    v.push(".std".into());
    v.push(String::new());
    v
}

/// Gives every input distinct output names. The rule: outputs are named after the input's stem
/// (`a.png` -> `a.png`, `a.sample0.png`, ...); when two inputs of one folder would write the same
/// output (`a.png`, `a.bmp`, `a.tif`; or `a.png` with `--samples 2` beside an input
/// `a.sample0.png`), each input of the clash keeps its source extension in its names
/// (`a.bmp.png`, `a.tif.png`); an input whose names still clash fails, with the reason. Nothing
/// is ever written twice.
fn name_outputs(jobs: &mut [Job], k: usize, format: Format) {
    let derived: Vec<String> = suffixes(k).into_iter().filter(|s| !s.is_empty()).collect();
    // Folders of the output tree: a file output may not take a folder's name.
    let dirs: HashSet<PathBuf> = jobs
        .iter()
        .filter(|j| j.problem.is_none())
        .flat_map(|j| j.rel.ancestors().skip(1).map(Path::to_path_buf))
        .collect();
    let ext = format!(".{}", format.ext());
    // Outputs collide only when bases are equal (same suffix), or when one input's plain output
    // is another's derived one (base_b == base_a + suffix): suffixes are single dot-segments.
    let clashes = |jobs: &[Job]| -> Vec<usize> {
        let mut by_base: HashMap<(PathBuf, OsString), Vec<usize>> = HashMap::new();
        for (i, j) in jobs.iter().enumerate().filter(|(_, j)| j.problem.is_none()) {
            let dir = j.rel.parent().unwrap_or(Path::new("")).to_path_buf();
            by_base.entry((dir, j.base.clone())).or_default().push(i);
        }
        let mut hit = BTreeSet::new();
        for ((dir, base), idx) in &by_base {
            if idx.len() > 1 {
                hit.extend(idx.iter().copied());
            }
            let mut plain = base.clone();
            plain.push(&ext);
            if dirs.contains(&dir.join(&plain)) {
                hit.extend(idx.iter().copied());
            }
            let b = base.as_bytes();
            for suf in &derived {
                if let Some(stem) = b.strip_suffix(suf.as_bytes()) {
                    let key = (dir.clone(), OsStr::from_bytes(stem).to_os_string());
                    if let Some(other) = by_base.get(&key) {
                        hit.extend(idx.iter().copied());
                        hit.extend(other.iter().copied());
                    }
                }
            }
        }
        hit.into_iter().collect()
    };
    let mut extended = vec![false; jobs.len()];
    loop {
        let hit = clashes(jobs);
        let mut changed = false;
        for &i in &hit {
            if !extended[i] {
                jobs[i].base = jobs[i].rel.file_name().unwrap_or_default().to_os_string();
                extended[i] = true;
                changed = true;
            }
        }
        if !changed {
            for i in hit {
                let name = paths::escape(Path::new(&jobs[i].base));
                jobs[i].problem = Some(format!(
                    "its output names ({name}.*) clash with another input's even with the source extension kept; rename one"
                ));
            }
            return;
        }
    }
}

/// Refuses, before any work, a run whose outputs would replace an input or each other's report:
/// the output folder equal to the input folder, a file restored into its own folder, overlapping
/// trees, or `--report` on an input, an output or an image.
fn check_no_input_replaced(
    opts: &RestoreOptions,
    jobs: &[Job],
    report: Option<&Path>,
    protect: &[&Path],
) -> Result<(), RuntimeError> {
    let refuse = |msg: String| {
        Err(RuntimeError::Usage(format!(
            "refused: {msg}; nothing was written"
        )))
    };
    if opts.input.is_dir() && paths::dir_id(&opts.input) == paths::dir_id(&opts.output) {
        return refuse(format!(
            "the output folder {} is the input folder",
            paths::escape(&opts.output)
        ));
    }
    let mut inputs = paths::Entries::default();
    for j in jobs {
        inputs.insert(&j.path);
        // What a link reaches is an input too: an output must not replace it either.
        if let Some(t) = &j.link_target {
            inputs.insert(t);
        }
    }
    for p in protect {
        inputs.insert(p);
    }
    // The input folder inside the output folder: an output that lands in it would be read back
    // as an input by the next run.
    let in_root = (opts.input.is_dir() && paths::dir_within(&opts.input, &opts.output))
        .then_some(opts.input.as_path());
    let sufs = suffixes(opts.samples);
    let mut out_dirs: HashMap<PathBuf, bool> = HashMap::new();
    for j in jobs.iter().filter(|j| j.problem.is_none()) {
        let plain = j.output(&opts.output, opts.format, "");
        let dir = plain.parent().unwrap_or(Path::new(".")).to_path_buf();
        if let Some(root) = &in_root {
            if paths::dir_within(&dir, root) {
                return refuse(format!(
                    "the output {} would land in the input folder {} (inside the output folder)",
                    paths::escape(&plain),
                    paths::escape(&opts.input)
                ));
            }
        }
        // Only folders that hold inputs need a look at each name.
        let holds_inputs = *out_dirs
            .entry(dir.clone())
            .or_insert_with(|| inputs.has_dir(&dir));
        if !holds_inputs {
            continue;
        }
        for suf in &sufs {
            let o = j.output(&opts.output, opts.format, suf);
            if inputs.contains(&o) {
                return refuse(format!(
                    "the output {} would replace the input {} (the output folder overlaps the input)",
                    paths::escape(&o),
                    paths::escape(&j.path)
                ));
            }
        }
    }
    if let Some(r) = report {
        // The output folder is made later: a report named as it is a folder too.
        let is_output_dir = paths::dir_id(r) == paths::dir_id(&opts.output);
        // A link is written through (`write_named`): its target counts as the report too.
        let target = r.canonicalize().unwrap_or_else(|_| r.to_path_buf());
        let names_input = [r, target.as_path()]
            .iter()
            .any(|p| images::is_image_path(p) || inputs.contains(p));
        if names_input || r.is_dir() || is_output_dir {
            return refuse(format!(
                "--report {} names an image, an input, the model or a folder; give a .json path",
                paths::escape(r)
            ));
        }
        let mut outs = paths::Entries::default();
        outs.insert(r);
        if jobs
            .iter()
            .filter(|j| j.problem.is_none())
            .any(|j| outs.contains(&j.output(&opts.output, opts.format, "")))
        {
            return refuse(format!(
                "--report {} is one of the outputs",
                paths::escape(r)
            ));
        }
    }
    Ok(())
}

/// The shard of `n` an input belongs to, from its path relative to the input folder alone (the
/// first 8 bytes of its SHA-256, mod `n`): a file keeps its shard whatever else the folder holds,
/// so files that arrive while an array job runs, or a listing that differs between machines,
/// move no other file to another shard.
pub fn shard_of(rel: &Path, n: usize) -> usize {
    let h = Sha256::digest(rel.as_os_str().as_bytes());
    let v = u64::from_le_bytes(h[..8].try_into().expect("8 bytes"));
    (v % n as u64) as usize
}

/// The inputs of `opts` (sorted, sharded) with their output names, and a report that counts the
/// other files ignored (and names an output folder inside the input folder, not walked). Refuses
/// (a usage error, before anything is written) a run whose outputs would replace an input or
/// `report_path`.
///
/// Naming: outputs mirror the input's relative path with the input's stem (`a.png` ->
/// `a.png`, `a.sample0.png`, ...). When two inputs of one folder would write the same output
/// (`a.png`, `a.bmp`, `a.tif`; or `a.png` under `--samples 2` beside an input `a.sample0.png`),
/// each input of the clash keeps its source extension (`a.bmp.png`, `a.tif.png`); an input whose
/// names still clash fails with the reason.
pub fn plan(
    opts: &RestoreOptions,
    report_path: Option<&Path>,
    protect: &[&Path],
) -> Result<(Vec<Job>, Report), RuntimeError> {
    let mut report = Report::default();
    let mut jobs = list_inputs(opts, &mut report)?;
    // Names are given over the whole list, so that every shard names files as one run would.
    name_outputs(&mut jobs, opts.samples, opts.format);
    if let Some((i, n)) = opts.shard {
        jobs.retain(|j| shard_of(j.path.strip_prefix(&opts.input).unwrap_or(&j.path), n) == i);
    }
    check_no_input_replaced(opts, &jobs, report_path, protect)?;
    if report.output_inside_input.is_some() {
        check_output_inside_input(opts)?;
    }
    Ok((jobs, report))
}

/// Removes the temporaries that killed writers of this machine left for outputs this run plans
/// (see [`paths::remove_stale_temporaries`]): nothing else in the output tree is touched.
pub fn remove_stale_temporaries(jobs: &[Job], opts: &RestoreOptions) -> usize {
    let ext = format!(".{}", opts.format.ext());
    let mut planned: HashMap<PathBuf, HashSet<OsString>> = HashMap::new();
    for j in jobs.iter().filter(|j| j.problem.is_none()) {
        let plain = j.output(&opts.output, opts.format, "");
        let dir = plain.parent().unwrap_or(Path::new(".")).to_path_buf();
        planned.entry(dir).or_default().insert(j.base.clone());
    }
    let k = opts.samples;
    paths::remove_stale_temporaries(planned.keys().map(|d| d.as_path()), |dir, name| {
        let Some(bases) = planned.get(dir) else {
            return false;
        };
        let Some(stem) = name.as_bytes().strip_suffix(ext.as_bytes()) else {
            return false;
        };
        if bases.contains(OsStr::from_bytes(stem)) {
            return true;
        }
        if k == 1 {
            return false;
        }
        // `BASE.std` and `BASE.sampleN`.
        let Some(dot) = stem.iter().rposition(|&c| c == b'.') else {
            return false;
        };
        let (base, suf) = (&stem[..dot], &stem[dot + 1..]);
        let derived = suf == b"std"
            || suf
                .strip_prefix(b"sample")
                .and_then(|n| std::str::from_utf8(n).ok()?.parse::<usize>().ok())
                .is_some_and(|i| i < k);
        derived && bases.contains(OsStr::from_bytes(base))
    })
}

/// Standard normal noise of `n` values seeded from (seed, stream, relative path, sample). The
/// path's bytes count as they are (names that are not UTF-8 included).
pub fn noise(seed: u64, stream: &str, rel: &Path, sample: usize, n: usize) -> Vec<f32> {
    let mut h = Sha256::new();
    h.update(seed.to_le_bytes());
    h.update(stream.as_bytes());
    h.update((sample as u64).to_le_bytes());
    h.update(rel.as_os_str().as_bytes());
    let key: [u8; 32] = h.finalize().into();
    let mut rng = rand_chacha::ChaCha8Rng::from_seed(key);
    rand_distr::StandardNormal
        .sample_iter(&mut rng)
        .take(n)
        .collect()
}

/// One row of a session run: an input's measurement and the noise of one of its samples.
struct Row {
    measurement: Array3<f32>,
    noise: Vec<f32>,
    tile: usize,
    grid: Arc<Grid>,
}

/// One restored row: tile `tile` of its input's `grid`.
struct Restored {
    image: Array3<f32>,
    tile: usize,
    grid: Arc<Grid>,
}

/// What flows between the stages: rows (decoded, or restored) and inputs that failed.
struct Chunk<T> {
    rows: Vec<(usize, usize, T)>,
    failed: Vec<(usize, String)>,
}

/// The default overlap of neighbouring tiles, as a fraction of the tile.
pub const DEFAULT_OVERLAP: f64 = 0.25;

/// The largest `--batch` and `--samples` accepted.
pub const MAX_BATCH: usize = 1 << 16;
/// The largest `--samples`.
pub const MAX_SAMPLES: usize = 1 << 16;

/// Restores every input of `opts` with `model`. `report_path`, when given, is checked with the
/// outputs (it must not replace an input or an output). Three stages run at once: decoding
/// ([`decode_stage`]), the session on this thread ([`session_stage`]) and the [`Writer`].
pub fn restore(
    model: &mut Model,
    opts: &RestoreOptions,
    report_path: Option<&Path>,
) -> Result<Report, RuntimeError> {
    let start = Instant::now();
    if opts.batch == 0 || opts.samples == 0 {
        return Err(RuntimeError::Usage(
            "--batch and --samples must be at least 1".into(),
        ));
    }
    if !(0.0..0.9).contains(&opts.overlap) {
        return Err(RuntimeError::Usage(format!(
            "--overlap {}: a fraction of the tile, at least 0 and below 0.9",
            opts.overlap
        )));
    }
    if opts.batch > MAX_BATCH || opts.samples > MAX_SAMPLES {
        return Err(RuntimeError::Usage(format!(
            "--batch {} / --samples {}: at most {MAX_BATCH} / {MAX_SAMPLES}",
            opts.batch, opts.samples
        )));
    }
    let model_path = model.path.clone();
    let (jobs, mut report) = plan(opts, report_path, &[&model_path])?;
    report.found = jobs.len();
    crate::paths::prepare_output_dir(&opts.output)?;
    mark_output_inside_input(opts)?;
    remove_stale_temporaries(&jobs, opts);

    let mut failed: BTreeMap<usize, String> = jobs
        .iter()
        .enumerate()
        .filter_map(|(i, j)| j.problem.clone().map(|p| (i, p)))
        .collect();
    let mut todo: Vec<usize> = (0..jobs.len())
        .filter(|i| !failed.contains_key(i))
        .collect();
    if opts.skip_existing {
        let before = todo.len();
        // Done only when every output of this run's naming exists (the mean is written last,
        // after them): more --samples, or a sample or .std deleted since, is redone. Outputs of
        // a run with more samples than this one (their mean and .std are of more samples) are
        // not this run's to resume: that input fails with the reason.
        let names = suffixes(opts.samples);
        let beyond = format!(".sample{}", opts.samples.max(1));
        // A name that is another input's output in this run (an input `b.sample1.png` beside
        // `b.png`) is that input's, not a leftover of a run with more samples. The set of this
        // run's outputs is made only when such a name exists (rare), not on every resume.
        let ours: std::cell::OnceCell<HashSet<PathBuf>> = std::cell::OnceCell::new();
        let ours = || {
            ours.get_or_init(|| {
                jobs.iter()
                    .filter(|j| j.problem.is_none())
                    .flat_map(|j| {
                        names
                            .iter()
                            .map(|sfx| j.output(&opts.output, opts.format, sfx))
                    })
                    .collect()
            })
        };
        let mut refused = Vec::new();
        todo.retain(|&i| {
            // A file with something in it (atomic writes never leave an empty or partial one);
            // a folder, an empty file or a link there is not an output of a run.
            let has = |sfx: &str| {
                std::fs::symlink_metadata(jobs[i].output(&opts.output, opts.format, sfx))
                    .is_ok_and(|m| m.is_file() && m.len() > 0)
            };
            if has(&beyond) && !ours().contains(&jobs[i].output(&opts.output, opts.format, &beyond))
            {
                refused.push((
                    i,
                    format!(
                        "{} exists: outputs of a run with more than --samples {}; restore into another folder, or with that run's --samples",
                        paths::escape(&jobs[i].output(&opts.output, opts.format, &beyond)),
                        opts.samples
                    ),
                ));
                return false;
            }
            if !names.iter().all(|sfx| has(sfx)) {
                return true;
            }
            // Every output is there: done, if each is an image of the output format. Another
            // file at an output's name (a text file called `a.png`) is not an output of a run:
            // neither done nor to be replaced.
            if let Some(p) = names
                .iter()
                .map(|sfx| jobs[i].output(&opts.output, opts.format, sfx))
                .find(|p| !opts.format.starts(p))
            {
                refused.push((
                    i,
                    format!(
                        "{} exists and is not a {} image, so not an output of davi: move it away and rerun",
                        paths::escape(&p),
                        opts.format.ext().to_uppercase()
                    ),
                ));
            }
            false
        });
        let n_refused = refused.len();
        failed.extend(refused);
        report.skipped = before - todo.len() - n_refused;
    }
    if opts.print_failures {
        for (&i, reason) in &failed {
            jobs[i].failure(reason.as_str()).print();
        }
    }
    // Rows per session run: a fixed batch of the graph wins (short runs are padded).
    let rows_per_run = model.fixed_batch.unwrap_or(opts.batch);
    model.check_memory(rows_per_run.min(todo.len() * opts.samples))?;
    let bar = progress_bar(opts.progress, jobs.len());
    bar.inc((jobs.len() - todo.len()) as u64);
    let (dec_tx, dec_rx) = crossbeam_channel::bounded::<Chunk<Row>>(2);
    let (enc_tx, enc_rx) = crossbeam_channel::bounded::<Chunk<Restored>>(2);
    let (mut session_seconds, mut rows) = (0.0, 0usize);
    let (jobs_ref, todo_ref, bar_ref, info) = (&jobs, &todo, &bar, &model.info.clone());
    let outcome = std::thread::scope(|scope| -> Result<Writer, RuntimeError> {
        scope.spawn(move || decode_stage(jobs_ref, todo_ref, opts, info, rows_per_run, dec_tx));
        let writer = scope.spawn(move || {
            let mut w = Writer::new(opts, opts.samples, info.channels);
            for chunk in enc_rx {
                w.take(jobs_ref, chunk, bar_ref);
            }
            w
        });
        let run = session_stage(model, dec_rx, &enc_tx, &mut session_seconds, &mut rows);
        drop(enc_tx);
        let w = writer.join().expect("the writer does not panic");
        run.map(|()| w)
    })?;
    bar.finish_and_clear();
    for (i, reason) in outcome.failed {
        failed.entry(i).or_insert(reason);
    }
    report.restored = outcome.restored;
    report.failed = failed
        .into_iter()
        .map(|(i, reason)| jobs[i].failure(reason))
        .collect();
    let accounted = report.restored + report.skipped + report.failed.len();
    report.not_done = report.found.checked_sub(accounted).unwrap_or_else(|| {
        unreachable!("{accounted} inputs accounted for of {} found", report.found)
    });
    report.interrupted = stopped(opts) && report.not_done > 0;
    assert!(
        report.not_done == 0 || report.interrupted,
        "{} inputs neither restored, skipped nor failed without a stop",
        report.not_done
    );
    if report.interrupted {
        let _ = writeln!(
            std::io::stderr(),
            "davi: stopped by a signal after the images in flight (a second signal exits at once)"
        );
    }
    report.seconds = start.elapsed().as_secs_f64();
    report.session_seconds = session_seconds;
    report.rows = rows;
    report.megapixels = outcome.pixels as f64 / 1e6;
    report.images_per_second = report.restored as f64 / report.seconds.max(1e-9);
    Ok(report)
}

fn progress_bar(show: bool, n: usize) -> indicatif::ProgressBar {
    let bar = if show {
        indicatif::ProgressBar::new(n as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} {per_sec} eta {eta}")
            .expect("valid template"),
    );
    bar
}

/// The tile grid of a decoded measurement `[c, H, W]` for `info`'s model, or why it cannot be
/// restored: smaller than the model, or larger with an operator that is not local.
fn grid_of(
    m: &Array3<f32>,
    info: &crate::ModelInfo,
    overlap: f64,
    format: Format,
) -> Result<Grid, String> {
    let [_, hy, wy] = info.measurement_shape();
    let (_, h, w) = m.dim();
    let scale = info.image_size / hy.max(1);
    let px = ((hy.min(wy) as f64 * overlap).round() as usize).min(hy.min(wy) - 1);
    let grid = Grid::new((h, w), (hy, wy), px, scale).map_err(|e| format!("wrong size: {e}"))?;
    // Formats that cannot hold the output are refused before any tile runs.
    let (oh, ow) = (grid.size.0 * grid.scale, grid.size.1 * grid.scale);
    if let Some(most) = format.max_side() {
        if oh.max(ow) > most {
            return Err(format!(
                "the output would be {ow}x{oh}; {} holds at most {most} px a side (use -f png)",
                format.ext()
            ));
        }
    }
    if !grid.is_single() && !info.operator.is_local() {
        return Err(format!(
            "wrong size: the model takes exactly {wy}x{hy} images, this one is {w}x{h}; its {} operator is not local (a box at the centre of the image), so it cannot be restored in tiles",
            info.operator.task()
        ));
    }
    Ok(grid)
}

/// Pixels decoded at once at most (several images in parallel, as long as they are small).
const GROUP_PIXELS: u64 = 32_000_000;

/// The next group of inputs to decode together, from `todo[start..]`: at most `most` of them,
/// and at most [`GROUP_PIXELS`] in all by their headers (a large image goes alone), so that
/// memory follows the batch, not the images' sizes. Headers are read as the groups are made.
fn next_group(jobs: &[Job], todo: &[usize], start: usize, most: usize) -> usize {
    let pixels = |i: usize| {
        image::ImageReader::open(&jobs[i].path)
            .ok()
            .and_then(|r| r.with_guessed_format().ok())
            .and_then(|r| r.into_dimensions().ok())
            .map_or(0, |(w, h)| w as u64 * h as u64)
    };
    let mut sum = 0u64;
    let mut end = start;
    while end < todo.len() && end - start < most {
        let p = pixels(todo[end]);
        if end > start && sum + p > GROUP_PIXELS {
            break;
        }
        sum += p;
        end += 1;
    }
    end
}

/// A stop flag set by SIGINT, SIGTERM or SIGHUP, for [`RestoreOptions::stop`]; a second signal
/// exits at once with 130 (atomic writes leave nothing half-written). A signal that was ignored
/// when the program started (`nohup` ignores SIGHUP, a shell's background job SIGINT) stays
/// ignored.
pub fn stop_on_signals() -> std::io::Result<Arc<AtomicBool>> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [SIGINT, SIGTERM, SIGHUP] {
        if signal_ignored(sig) {
            continue;
        }
        // The first signal sets the flag; one that finds it set exits.
        signal_hook::flag::register_conditional_shutdown(sig, 130, Arc::clone(&flag))?;
        signal_hook::flag::register(sig, Arc::clone(&flag))?;
    }
    Ok(flag)
}

/// Whether `sig`'s disposition is "ignore".
fn signal_ignored(sig: i32) -> bool {
    // SAFETY: reads the current action into a zeroed struct; changes nothing.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(sig, std::ptr::null(), &mut old) == 0 && old.sa_sigaction == libc::SIG_IGN
    }
}

fn stopped(opts: &RestoreOptions) -> bool {
    opts.stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst))
}

/// Stage 1: decodes the inputs `todo` on the rayon pool, cuts each into the tiles the model
/// takes, and sends the rows (one per sample and tile, with its noise, drawn there too) in runs
/// of `rows_per_run`, and the inputs that failed. An image of the model's size is one tile whose
/// noise is seeded as ever; the tiles of a larger one by their position too.
fn decode_stage(
    jobs: &[Job],
    todo: &[usize],
    opts: &RestoreOptions,
    info: &crate::ModelInfo,
    rows_per_run: usize,
    tx: crossbeam_channel::Sender<Chunk<Row>>,
) {
    let [cy, _, _] = info.measurement_shape();
    let [c, sz, _] = info.image_shape();
    let k = opts.samples;
    type Pending = (usize, usize, usize, Arc<Array3<f32>>, Arc<Grid>);
    let mut pending: Vec<Pending> = Vec::new();
    let mut fails = Vec::new();
    let send = |pending: &mut Vec<Pending>, fails: &mut Vec<(usize, String)>| -> bool {
        let rows = pending
            .par_drain(..)
            .map(|(job, sample, tile, m, grid)| {
                let stream = if grid.is_single() {
                    "bridge".to_string()
                } else {
                    let (y, x) = grid.origins[tile];
                    format!("bridge-tile-{y}-{x}")
                };
                let noise = noise(opts.seed, &stream, &jobs[job].rel, sample, c * sz * sz);
                let measurement = grid.cut(m.view(), tile);
                let row = Row {
                    measurement,
                    noise,
                    tile,
                    grid,
                };
                (job, sample, row)
            })
            .collect();
        let failed = std::mem::take(fails);
        tx.send(Chunk { rows, failed }).is_ok()
    };
    let mut start = 0;
    'groups: while start < todo.len() && !stopped(opts) {
        let end = next_group(jobs, todo, start, (rows_per_run / k).max(1));
        let group = &todo[start..end];
        start = end;
        type Decoded = Result<(Array3<f32>, Grid), String>;
        let decoded: Vec<(usize, Decoded)> = group
            .par_iter()
            .map(|&i| {
                let path = &jobs[i].path;
                let r = images::load_limited(path, cy, None, opts.max_pixels).and_then(|m| {
                    let g = grid_of(&m, info, opts.overlap, opts.format)?;
                    // The limit bounds the output too (x4 SR makes 16 times the pixels): one
                    // image's canvas must not take the memory every other image needs.
                    let (h, w) = (g.size.0 * g.scale, g.size.1 * g.scale);
                    let out = h as u64 * w as u64;
                    if out > opts.max_pixels {
                        return Err(format!(
                            "its output would be {w}x{h}, {out} pixels, more than --max-pixels {}; not restored",
                            opts.max_pixels
                        ));
                    }
                    Ok((m, g))
                });
                (i, r)
            })
            .collect();
        for (i, r) in decoded {
            // Stopped: no further image starts (its decode is dropped; it counts as not done).
            if stopped(opts) {
                break 'groups;
            }
            match r {
                Err(reason) => fails.push((i, reason)),
                Ok((m, grid)) => {
                    let (m, grid) = (Arc::new(m), Arc::new(grid));
                    for s in 0..k {
                        for t in 0..grid.len() {
                            pending.push((i, s, t, m.clone(), grid.clone()));
                            if pending.len() == rows_per_run && !send(&mut pending, &mut fails) {
                                return;
                            }
                        }
                    }
                }
            }
        }
    }
    if !pending.is_empty() || !fails.is_empty() {
        send(&mut pending, &mut fails);
    }
}

/// Stage 2: runs each chunk of rows through the session (padded to a fixed batch), sends the
/// outputs on. A failed run fails its rows' inputs with the reason; a wrong output shape, the
/// model's own fault, stops everything.
fn session_stage(
    model: &mut Model,
    rx: crossbeam_channel::Receiver<Chunk<Row>>,
    tx: &crossbeam_channel::Sender<Chunk<Restored>>,
    seconds: &mut f64,
    rows_run: &mut usize,
) -> Result<(), RuntimeError> {
    let [cy, hy, wy] = model.info.measurement_shape();
    let [c, sz, _] = model.info.image_shape();
    for Chunk { rows, mut failed } in rx {
        let mut done = Vec::new();
        if !rows.is_empty() {
            let padded = rows.len().max(model.fixed_batch.unwrap_or(0));
            let mut meas = Array4::<f32>::zeros((padded, cy, hy, wy));
            let mut z = Array4::<f32>::zeros((padded, c, sz, sz));
            for (r, (_, _, row)) in rows.iter().enumerate() {
                meas.index_axis_mut(Axis(0), r).assign(&row.measurement);
                z.index_axis_mut(Axis(0), r)
                    .as_slice_mut()
                    .expect("standard layout")
                    .copy_from_slice(&row.noise);
            }
            let t = Instant::now();
            let out = model.restore(&meas, &z);
            *seconds += t.elapsed().as_secs_f64();
            *rows_run += rows.len();
            match out {
                Ok(out) => {
                    let out = out
                        .into_dimensionality::<ndarray::Ix4>()
                        .expect("checked by Model::restore");
                    done = rows
                        .into_iter()
                        .enumerate()
                        .map(|(r, (job, sample, row))| {
                            let image = out.index_axis(Axis(0), r).to_owned();
                            let (tile, grid) = (row.tile, row.grid);
                            (job, sample, Restored { image, tile, grid })
                        })
                        .collect();
                }
                Err(e @ RuntimeError::BadOutput { .. }) => return Err(e),
                Err(e) => {
                    let reason = e.to_string();
                    let mut seen = BTreeSet::new();
                    for &(job, _, _) in &rows {
                        if seen.insert(job) {
                            failed.push((job, reason.clone()));
                        }
                    }
                }
            }
        }
        if tx.send(Chunk { rows: done, failed }).is_err() {
            break;
        }
    }
    Ok(())
}

/// Running sums of one input's samples (mean and standard deviation written once all arrived).
struct Stats {
    n: usize,
    sum: Array3<f64>,
    sum_sq: Array3<f64>,
}

/// The last stage: checks each output, writes it, and keeps the sample statistics.
struct Writer<'a> {
    opts: &'a RestoreOptions,
    k: usize,
    channels: usize,
    /// Tiled samples being blended, by (input, sample).
    canvases: HashMap<(usize, usize), Canvas>,
    stats: HashMap<usize, Stats>,
    failed: BTreeMap<usize, String>,
    restored: usize,
    /// Output pixels of the inputs restored.
    pixels: usize,
}

impl<'a> Writer<'a> {
    fn new(opts: &'a RestoreOptions, k: usize, channels: usize) -> Self {
        Self {
            opts,
            k,
            channels,
            canvases: HashMap::new(),
            stats: HashMap::new(),
            failed: BTreeMap::new(),
            restored: 0,
            pixels: 0,
        }
    }

    fn fail(&mut self, jobs: &[Job], i: usize, reason: String, bar: &indicatif::ProgressBar) {
        if self.failed.contains_key(&i) {
            return;
        }
        self.canvases.retain(|&(job, _), _| job != i);
        // Samples already written for it go: nothing is left of an input that failed.
        if let Some(st) = self.stats.remove(&i) {
            for s in 0..st.n {
                let _ = std::fs::remove_file(jobs[i].output(
                    &self.opts.output,
                    self.opts.format,
                    &format!(".sample{s}"),
                ));
            }
        }
        if self.opts.print_failures {
            bar.suspend(|| jobs[i].failure(reason.as_str()).print());
        }
        self.failed.insert(i, reason);
        bar.inc(1);
    }

    fn take(&mut self, jobs: &[Job], chunk: Chunk<Restored>, bar: &indicatif::ProgressBar) {
        for (i, reason) in chunk.failed {
            self.fail(jobs, i, reason, bar);
        }
        let (opts, k) = (self.opts, self.k);
        // Check each row, and blend the tiles of larger images until their sample is whole.
        let mut samples = Vec::new();
        for (i, s, r) in chunk.rows {
            if self.failed.contains_key(&i) {
                continue;
            }
            if r.image.iter().any(|v| !v.is_finite()) {
                let reason = "the model returned NaN or infinite values".to_string();
                self.fail(jobs, i, reason, bar);
                continue;
            }
            if r.grid.is_single() {
                samples.push((i, s, r.image));
                continue;
            }
            let c = self.channels;
            let canvas = self
                .canvases
                .entry((i, s))
                .or_insert_with(|| Canvas::new(&r.grid, c));
            if let Some(image) = canvas.add(&r.grid, r.tile, r.image.view()) {
                self.canvases.remove(&(i, s));
                samples.push((i, s, image));
            }
        }
        // Write every whole sample in parallel.
        let written: Vec<(usize, usize, Result<Array3<f32>, String>)> = samples
            .into_par_iter()
            .map(|(i, s, img)| {
                let suffix = if k == 1 {
                    String::new()
                } else {
                    format!(".sample{s}")
                };
                let path = jobs[i].output(&opts.output, opts.format, &suffix);
                let r = images::encode(img.view(), opts.format)
                    .and_then(|b| images::write_atomic(&path, &b).map_err(|e| e.to_string()))
                    .map(|()| img);
                (i, s, r)
            })
            .collect();
        let mut complete = Vec::new();
        for (i, s, r) in written {
            if self.failed.contains_key(&i) {
                if r.is_ok() && k > 1 {
                    let _ = std::fs::remove_file(jobs[i].output(
                        &opts.output,
                        opts.format,
                        &format!(".sample{s}"),
                    ));
                }
                continue;
            }
            match r {
                Err(reason) => self.fail(jobs, i, reason, bar),
                Ok(img) if k == 1 => {
                    self.restored += 1;
                    self.pixels += img.len() / img.dim().0;
                    bar.inc(1);
                }
                Ok(img) => {
                    let st = self.stats.entry(i).or_insert_with(|| Stats {
                        n: 0,
                        sum: Array3::zeros(img.dim()),
                        sum_sq: Array3::zeros(img.dim()),
                    });
                    debug_assert_eq!(st.n, s, "samples arrive in order");
                    st.sum.zip_mut_with(&img, |a, &b| *a += b as f64);
                    st.sum_sq
                        .zip_mut_with(&img, |a, &b| *a += (b as f64) * (b as f64));
                    st.n += 1;
                    if st.n == k {
                        complete.push(i);
                    }
                }
            }
        }
        let finished: Vec<(usize, Stats)> = complete
            .into_iter()
            .filter_map(|i| self.stats.remove(&i).map(|st| (i, st)))
            .collect();
        let results: Vec<(usize, usize, Result<(), String>)> = finished
            .into_par_iter()
            .map(|(i, st)| {
                let px = st.sum.len() / st.sum.dim().0;
                (i, px, write_statistics(&jobs[i], opts, st))
            })
            .collect();
        for (i, px, r) in results {
            match r {
                Ok(()) => {
                    self.restored += 1;
                    self.pixels += px;
                    bar.inc(1);
                }
                Err(reason) => self.fail(jobs, i, reason, bar),
            }
        }
    }
}

/// Writes the per-pixel standard deviation of an input's samples (`.std`, 255 = 0.25 on the
/// [0, 1] scale) and, last, their mean under the plain name, so the plain output exists only
/// once everything else is written.
fn write_statistics(job: &Job, opts: &RestoreOptions, st: Stats) -> Result<(), String> {
    let k = st.n as f64;
    let mean = st.sum.mapv(|v| v / k);
    let var = Zip::from(&st.sum_sq)
        .and(&mean)
        .map_collect(|&sq, &m| (sq / k - m * m).max(0.0));
    // std on [0, 1] is half the std on [-1, 1]; map 0..0.25 to -1..1 for the picture.
    let std_img = var.mapv(|v| ((v.sqrt() * 0.5 / 0.25).min(1.0) * 2.0 - 1.0) as f32);
    let bytes = images::encode(std_img.view(), opts.format)?;
    let write = |suffix: &str, bytes: &[u8]| {
        images::write_atomic(&job.output(&opts.output, opts.format, suffix), bytes)
            .map_err(|e| e.to_string())
    };
    write(".std", &bytes)?;
    write(
        "",
        &images::encode(mean.mapv(|v| v as f32).view(), opts.format)?,
    )
}
