//! Paths as `davi` must treat them: printed on one line, compared as directory entries (so no
//! output can replace an input), and temporaries of dead writers recognised and removed.

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// A path on one line: control characters and bytes that are not UTF-8 are escaped (`\n`,
/// `\x1b`, `\xff`), so one failure is one line of the log and of the report.
pub fn escape(path: &Path) -> String {
    let mut out = String::new();
    for chunk in path.as_os_str().as_bytes().utf8_chunks() {
        for ch in chunk.valid().chars() {
            if ch.is_control() || ch == '\\' {
                out.extend(ch.escape_default());
            } else {
                out.push(ch);
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// A message on one line: control characters escaped.
pub fn one_line(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

/// Canonical form of a folder that may not exist yet: its nearest existing ancestor resolved
/// (symlinks included), the rest appended.
pub fn canonical_dir(dir: &Path) -> PathBuf {
    let abs = if dir.is_absolute() {
        dir.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(dir)
    };
    let mut rest = Vec::new();
    let mut cur = abs.as_path();
    loop {
        if let Ok(c) = cur.canonicalize() {
            let mut p = c;
            for part in rest.iter().rev() {
                p.push(part);
            }
            return p;
        }
        match (cur.parent(), cur.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                cur = parent;
            }
            _ => return abs,
        }
    }
}

/// Directory entries (canonical parent folder, file name): what a rename onto a path replaces.
/// Folders are resolved once each.
#[derive(Default)]
pub struct Entries {
    dirs: HashMap<PathBuf, PathBuf>,
    set: HashMap<PathBuf, HashSet<OsString>>,
}

impl Entries {
    /// The entry of `path`.
    pub fn key(&mut self, path: &Path) -> (PathBuf, OsString) {
        let parent = path.parent().unwrap_or(Path::new("."));
        let parent = if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        };
        let dir = self
            .dirs
            .entry(parent.to_path_buf())
            .or_insert_with(|| canonical_dir(parent))
            .clone();
        (dir, path.file_name().unwrap_or_default().to_os_string())
    }

    /// Records `path`'s entry.
    pub fn insert(&mut self, path: &Path) {
        let (d, n) = self.key(path);
        self.set.entry(d).or_default().insert(n);
    }

    /// Whether `path`'s entry was recorded.
    pub fn contains(&mut self, path: &Path) -> bool {
        let (d, n) = self.key(path);
        self.set.get(&d).is_some_and(|s| s.contains(&n))
    }

    /// Whether any entry was recorded in `dir` (its canonical form).
    pub fn has_dir(&mut self, dir: &Path) -> bool {
        let d = self
            .dirs
            .entry(dir.to_path_buf())
            .or_insert_with(|| canonical_dir(dir))
            .clone();
        self.set.contains_key(&d)
    }
}

/// The temporary name `write_atomic` uses for `path`: `.NAME.PID.tmp` beside it.
pub fn temporary_for(path: &Path) -> PathBuf {
    let mut name = OsString::from(".");
    name.push(path.file_name().unwrap_or_default());
    name.push(format!(".{}.tmp", std::process::id()));
    path.with_file_name(name)
}

/// The writer's process id, when `name` is one of our temporaries (`.NAME.PID.tmp`).
pub fn temporary_pid(name: &OsStr) -> Option<u32> {
    let b = name.as_bytes();
    let inner = b.strip_prefix(b".")?.strip_suffix(b".tmp")?;
    let dot = inner.iter().rposition(|&c| c == b'.')?;
    if dot == 0 {
        return None;
    }
    std::str::from_utf8(&inner[dot + 1..]).ok()?.parse().ok()
}

/// Whether a process of this id runs (Linux: `/proc/PID`; elsewhere every writer counts as
/// alive, so nothing is removed).
pub fn pid_alive(pid: u32) -> bool {
    if !Path::new("/proc/self").exists() {
        return true;
    }
    Path::new("/proc").join(pid.to_string()).exists()
}

/// Removes, under `dir`, the temporaries of writers that no longer run (left by a kill); those of
/// live writers (another shard writing into the same tree) stay. Returns how many went.
pub fn remove_stale_temporaries(dir: &Path) -> usize {
    if !dir.is_dir() {
        return 0;
    }
    let mut n = 0;
    for e in walkdir::WalkDir::new(dir).into_iter().flatten() {
        if !e.file_type().is_file() {
            continue;
        }
        if let Some(pid) = temporary_pid(e.file_name()) {
            if pid != std::process::id()
                && !pid_alive(pid)
                && std::fs::remove_file(e.path()).is_ok()
            {
                n += 1;
            }
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_make_one_line() {
        let p = Path::new(OsStr::from_bytes(b"a\nb\xff\\c.png"));
        assert_eq!(escape(p), "a\\nb\\xff\\\\c.png");
        assert_eq!(escape(Path::new("ok/é.png")), "ok/é.png");
    }

    #[test]
    fn temporaries_are_recognised() {
        assert_eq!(temporary_pid(OsStr::new(".a.png.123.tmp")), Some(123));
        assert_eq!(temporary_pid(OsStr::new(".a.png.tmp")), None);
        assert_eq!(temporary_pid(OsStr::new("a.png.12.tmp")), None);
        let t = temporary_for(Path::new("x/a.png"));
        assert_eq!(
            temporary_pid(t.file_name().unwrap()),
            Some(std::process::id())
        );
    }
}
