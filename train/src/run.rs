//! A run folder: config copy, checkpoints (atomic, last N kept, EMA apart), `metrics.csv`, a
//! loss-curve PNG, progress, Ctrl-C and resume.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// What `state.json` records: enough to resume.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunState {
    /// Steps done.
    pub step: usize,
    /// The latest checkpoint file (in the run folder).
    pub checkpoint: String,
    /// Hash of the config the run trains.
    pub config_hash: String,
    /// Training seconds so far.
    pub seconds: f64,
}

/// A run folder.
pub struct Run {
    /// The folder.
    pub dir: PathBuf,
    /// Metric column names (after `step`).
    pub columns: Vec<String>,
    /// Checkpoints kept.
    pub keep: usize,
    stop: Arc<AtomicBool>,
}

impl Run {
    /// Creates `dir` (or reopens it to resume), copies the config there and installs the Ctrl-C
    /// handler (a first Ctrl-C asks the loop to checkpoint and stop).
    pub fn open(dir: &Path, config_yaml: &str, columns: &[&str], keep: usize) -> Result<Self> {
        std::fs::create_dir_all(dir.join("samples"))
            .with_context(|| format!("{}: cannot create", dir.display()))?;
        // Until the first checkpoint the run has nothing to resume: a config.yaml left by a
        // start that failed before one (a bad value, fixed since) is this start's.
        let cfg = dir.join("config.yaml");
        if !cfg.exists() || !dir.join("state.json").exists() {
            write_atomic(&cfg, config_yaml.as_bytes())?;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        // Only one handler per process; a second open (tests) keeps the first.
        let _ = ctrlc::set_handler(move || {
            if s.swap(true, Ordering::SeqCst) {
                eprintln!("\nsecond interrupt: exiting without a checkpoint");
                std::process::exit(130);
            }
            eprintln!(
                "\ninterrupt: writing a checkpoint, then stopping (Ctrl-C again to quit now)"
            );
        });
        let metrics = dir.join("metrics.csv");
        if !metrics.exists() {
            let mut header = String::from("step");
            for c in columns {
                header.push(',');
                header.push_str(c);
            }
            header.push('\n');
            write_atomic(&metrics, header.as_bytes())?;
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            columns: columns.iter().map(|s| s.to_string()).collect(),
            keep,
            stop,
        })
    }

    /// Whether Ctrl-C asked to stop.
    pub fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// The saved state, if the folder holds a run to resume.
    pub fn state(&self) -> Result<Option<RunState>> {
        let p = self.dir.join("state.json");
        if !p.exists() {
            return Ok(None);
        }
        let s =
            std::fs::read_to_string(&p).with_context(|| format!("{}: cannot read", p.display()))?;
        Ok(Some(
            serde_json::from_str(&s).with_context(|| format!("{}: corrupt", p.display()))?,
        ))
    }

    /// The checkpoint to resume from, when the folder holds a run: checks that it trains the
    /// config hashing to `hash`, loads its tensors onto `device` and drops the metric rows written
    /// after it (by a killed run).
    pub fn resume(
        &self,
        hash: &str,
        device: tch::Device,
    ) -> Result<Option<(RunState, HashMap<String, tch::Tensor>)>> {
        let Some(st) = self.state()? else {
            return Ok(None);
        };
        check_resume(&st, hash, &self.dir)?;
        let all = crate::checkpoint::load_tensors(&self.dir.join(&st.checkpoint), device)?;
        self.truncate_metrics(st.step)?;
        tracing::info!("resuming {} at step {}", self.dir.display(), st.step);
        Ok(Some((st, all)))
    }

    /// Appends metric rows; rows past `step` from an interrupted run are dropped first on resume.
    pub fn log(&self, step: usize, values: &[f64]) -> Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(self.dir.join("metrics.csv"))?;
        let mut line = step.to_string();
        for v in values {
            line.push_str(&format!(",{v:.6e}"));
        }
        line.push('\n');
        f.write_all(line.as_bytes())?;
        Ok(())
    }

    /// Appends a validation score to `validation.csv` (rows past the resumed step are dropped
    /// with the metrics').
    pub fn log_validation(&self, step: usize, psnr: f64) -> Result<()> {
        let p = self.dir.join("validation.csv");
        if !p.exists() {
            write_atomic(&p, b"step,psnr\n")?;
        }
        let mut f = std::fs::OpenOptions::new().append(true).open(&p)?;
        f.write_all(format!("{step},{psnr:.4}\n").as_bytes())?;
        drop(f);
        // validation.png: PSNR against step, so the reader sees where it flattens.
        plot_csv(
            &p,
            &self.dir.join("validation.png"),
            &["psnr".into()],
            (480, 270),
            false,
        )
    }

    /// Drops metric rows after `step` (written after the last checkpoint of a killed run).
    pub fn truncate_metrics(&self, step: usize) -> Result<()> {
        let v = self.dir.join("validation.csv");
        if v.exists() {
            truncate_csv(&v, step)?;
        }
        truncate_csv(&self.dir.join("metrics.csv"), step)
    }

    /// Saves a checkpoint atomically, records it in `state.json`, and prunes old ones.
    pub fn checkpoint(
        &self,
        step: usize,
        tensors: &[(String, tch::Tensor)],
        config_hash: &str,
        seconds: f64,
    ) -> Result<()> {
        let name = format!("ckpt-{step:08}.safetensors");
        crate::checkpoint::save_tensors(&self.dir.join(&name), tensors)?;
        let st = RunState {
            step,
            checkpoint: name,
            config_hash: config_hash.into(),
            seconds,
        };
        write_atomic(
            &self.dir.join("state.json"),
            serde_json::to_string_pretty(&st)?.as_bytes(),
        )?;
        let mut ckpts: Vec<PathBuf> = std::fs::read_dir(&self.dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("ckpt-") && n.ends_with(".safetensors"))
            })
            .collect();
        ckpts.sort();
        while ckpts.len() > self.keep.max(1) {
            let _ = std::fs::remove_file(ckpts.remove(0));
        }
        Ok(())
    }

    /// Draws the loss curve(s) of `metrics.csv` to `loss.png` (log scale).
    pub fn plot(&self) -> Result<()> {
        plot_csv(
            &self.dir.join("metrics.csv"),
            &self.dir.join("loss.png"),
            &self.columns,
            (640, 360),
            true,
        )
    }
}

/// The curves of a CSV (first column the step) as a PNG, once it has two rows.
fn plot_csv(
    csv: &Path,
    png: &Path,
    columns: &[String],
    (w, h): (u32, u32),
    log: bool,
) -> Result<()> {
    let rows: Vec<Vec<f64>> = std::fs::read_to_string(csv)?
        .lines()
        .skip(1)
        .map(|l| l.split(',').filter_map(|v| v.parse().ok()).collect())
        .collect();
    if rows.len() < 2 {
        return Ok(());
    }
    let img = if log {
        crate::plot::curves(&rows, columns, w, h)
    } else {
        crate::plot::linear_curves(&rows, columns, w, h)
    };
    let mut buf = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut buf), image::ImageFormat::Png)?;
    write_atomic(png, &buf)
}

/// Keeps the header and the rows whose first column is at most `step`.
fn truncate_csv(p: &Path, step: usize) -> Result<()> {
    let s = std::fs::read_to_string(p)?;
    let kept: Vec<&str> = s
        .lines()
        .enumerate()
        .filter(|(i, l)| {
            *i == 0
                || l.split(',')
                    .next()
                    .and_then(|v| v.parse::<usize>().ok())
                    .is_some_and(|v| v <= step)
        })
        .map(|(_, l)| l)
        .collect();
    write_atomic(p, (kept.join("\n") + "\n").as_bytes())
}

/// Checks that a resumed run trains the same config.
pub fn check_resume(state: &RunState, hash: &str, dir: &Path) -> Result<()> {
    if state.config_hash != hash {
        bail!(
            "{}: the run was started with config hash {}, this config hashes to {hash}; resume with the run's own config.yaml",
            dir.display(),
            state.config_hash
        );
    }
    Ok(())
}

/// Writes a file atomically (temporary file, sync, rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    Ok(davi_models::atomic::write_atomic(path, bytes)?)
}
