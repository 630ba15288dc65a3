//! Paths as `davi` must treat them: printed on one line, compared as directory entries (so no
//! output can replace an input), and temporaries of dead writers recognised and removed.

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Characters that reorder what follows them on a terminal: the bidirectional embeddings,
/// overrides and isolates (U+202A-U+202E, U+2066-U+2069). Joiners and marks, which real names
/// in Persian, Indic scripts or emoji use, are kept.
fn invisible(ch: char) -> bool {
    matches!(ch, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// A path on one line: control characters, bidirectional overrides, and bytes that are not
/// UTF-8 are escaped (`\n`, `\x1b`, `\u{202e}`, `\xff`), so one failure is one line
/// of the log and of the report, shown as it is named.
pub fn escape(path: &Path) -> String {
    let mut out = String::new();
    for chunk in path.as_os_str().as_bytes().utf8_chunks() {
        for ch in chunk.valid().chars() {
            if ch.is_control() || ch == '\\' || invisible(ch) {
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

/// The name the output folder's write check is a temporary of.
const WRITE_CHECK: &str = "davi-write-check";

/// Creates the output folder `dir` and makes sure a file can be written in it, before any work:
/// an output path that is a file, or a folder this user cannot write in, is found out once, not
/// once per image after every image was run through the model.
pub fn prepare_output_dir(dir: &Path) -> Result<(), crate::RuntimeError> {
    if dir.exists() && !dir.is_dir() {
        return Err(crate::RuntimeError::Usage(format!(
            "output {}: exists and is not a folder",
            escape(dir)
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| crate::RuntimeError::io(dir, e))?;
    // Named as every temporary (`.NAME.XXXXXX.HOST.PID.tmp`), so the one a kill left behind
    // here is known by its dead writer and removed by the next run.
    remove_stale_temporaries([dir], |_, name| name == WRITE_CHECK);
    let mut prefix = std::ffi::OsString::from(".");
    prefix.push(WRITE_CHECK);
    prefix.push(".");
    tempfile::Builder::new()
        .prefix(&prefix)
        .suffix(&format!(
            ".{}.{}.tmp",
            davi_models::atomic::host(),
            std::process::id()
        ))
        .rand_bytes(6)
        .tempfile_in(dir)
        .map_err(|e| {
            crate::RuntimeError::Usage(format!("output {}: cannot write in it: {e}", escape(dir)))
        })?;
    Ok(())
}

/// Canonical form of a folder that may not exist yet: its nearest existing ancestor resolved
/// (symlinks included), the rest appended.
pub fn canonical_dir(dir: &Path) -> PathBuf {
    let abs = if dir.is_absolute() {
        dir.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(dir)
    };
    let mut rest: Vec<std::ffi::OsString> = Vec::new();
    let mut cur = abs.as_path();
    loop {
        if let Ok(c) = cur.canonicalize() {
            // The parts that do not exist yet, with `.` and `..` applied as the folders will be
            // created (`missing/../x` is `x`: it must not escape the overlap checks).
            let mut p = c;
            for part in rest.iter().rev() {
                if part == ".." {
                    p.pop();
                } else if part != "." {
                    p.push(part);
                }
            }
            return p;
        }
        match (cur.parent(), cur.components().next_back()) {
            (Some(parent), Some(last)) => {
                rest.push(last.as_os_str().to_os_string());
                cur = parent;
            }
            _ => return abs,
        }
    }
}

/// What a folder is: its device and inode when it exists, so that one folder reached by two
/// paths that no symlink joins (a bind mount, a container's two volumes of one host folder) is
/// one folder; else the canonical path it will have ([`canonical_dir`]).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum DirId {
    /// An existing folder: (device, inode).
    Node(u64, u64),
    /// A folder not made yet.
    Path(PathBuf),
}

/// The [`DirId`] of folder `dir`.
pub fn dir_id(dir: &Path) -> DirId {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if let Ok(m) = std::fs::metadata(dir) {
            if m.is_dir() {
                return DirId::Node(m.dev(), m.ino());
            }
        }
    }
    DirId::Path(canonical_dir(dir))
}

/// Whether folder `inner` is folder `outer` or lies inside it, by whatever paths the two are
/// reached (symlinks, `..`, bind mounts).
pub fn dir_within(inner: &Path, outer: &Path) -> bool {
    let mut cur = canonical_dir(inner);
    let outer_id = dir_id(outer);
    if let DirId::Path(o) = &outer_id {
        return cur.starts_with(o);
    }
    loop {
        if dir_id(&cur) == outer_id {
            return true;
        }
        if !cur.pop() {
            return false;
        }
    }
}

/// Directory entries (parent folder's [`DirId`], file name): what a rename onto a path
/// replaces. Folders are resolved once each.
#[derive(Default)]
pub struct Entries {
    dirs: HashMap<PathBuf, DirId>,
    set: HashMap<DirId, HashSet<OsString>>,
}

impl Entries {
    /// The entry of `path`.
    pub fn key(&mut self, path: &Path) -> (DirId, OsString) {
        let parent = path.parent().unwrap_or(Path::new("."));
        let parent = if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        };
        let dir = self
            .dirs
            .entry(parent.to_path_buf())
            .or_insert_with(|| dir_id(parent))
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

    /// Whether any entry was recorded in `dir`.
    pub fn has_dir(&mut self, dir: &Path) -> bool {
        let d = self
            .dirs
            .entry(dir.to_path_buf())
            .or_insert_with(|| dir_id(dir))
            .clone();
        self.set.contains_key(&d)
    }
}

/// A model card's largest size: a card is a page of YAML.
pub const MAX_CARD_BYTES: u64 = 16 << 20;

/// Reads `path`, a regular file (links followed) of at most `max` bytes
/// ([`davi_models::atomic::read_regular`]); the error names the file and the reason.
pub fn read_file(path: &Path, max: u64) -> Result<Vec<u8>, crate::RuntimeError> {
    davi_models::atomic::read_regular(path, max).map_err(|e| crate::RuntimeError::file(path, e))
}

/// [`read_file`] as UTF-8 text.
pub fn read_text(path: &Path, max: u64) -> Result<String, crate::RuntimeError> {
    String::from_utf8(read_file(path, max)?)
        .map_err(|_| crate::RuntimeError::file(path, "not UTF-8 text"))
}

pub use davi_models::atomic::file_kind;

pub use davi_models::atomic::Temporary;

/// Whether the writer of a temporary (`host`, `pid`, the file's modification time) may still be
/// writing it. Another machine's writers always count as alive: only they can tell. Here, the
/// process must exist and have started before the file was last written (a process that took a
/// dead writer's id later is not that writer). Without /proc every writer counts as alive.
pub fn writer_alive(t: &Temporary, modified: std::time::SystemTime) -> bool {
    if t.host != davi_models::atomic::host() || !Path::new("/proc/self").exists() {
        return true;
    }
    match process_start(t.pid) {
        None => false,
        Some(start) => start <= modified + std::time::Duration::from_secs(2),
    }
}

/// When process `pid` started (Linux: /proc/PID/stat's start time after /proc/stat's boot time);
/// `None` when it is gone or a zombie (killed, not yet reaped: it writes nothing more).
fn process_start(pid: u32) -> Option<std::time::SystemTime> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which may hold spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    if matches!(rest.split_whitespace().next(), Some("Z" | "X" | "x")) {
        return None;
    }
    let ticks: u64 = rest.split_whitespace().nth(19)?.parse().ok()?;
    let boot: u64 = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime ").and_then(|v| v.trim().parse().ok()))?;
    // Clock ticks are 100 per second on every Linux build that matters (USER_HZ).
    Some(std::time::UNIX_EPOCH + std::time::Duration::from_millis(boot * 1000 + ticks * 10))
}

/// Removes, in `dirs`, the temporaries of writers of this machine that no longer run and that
/// were to become a file this run will write (`planned(dir, name)`); anything else stays.
/// Returns how many went.
pub fn remove_stale_temporaries<'a>(
    dirs: impl IntoIterator<Item = &'a Path>,
    planned: impl Fn(&Path, &OsStr) -> bool,
) -> usize {
    let mut n = 0;
    for dir in dirs {
        let Ok(rd) = std::fs::read_dir(dir) else {
            continue;
        };
        for e in rd.flatten() {
            let name = e.file_name();
            let Some(t) = Temporary::parse(&name) else {
                continue;
            };
            let Ok(meta) = e.metadata() else { continue };
            if !meta.is_file() || !planned(dir, OsStr::from_bytes(&t.target)) {
                continue;
            }
            let modified = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
            if !writer_alive(&t, modified) && std::fs::remove_file(e.path()).is_ok() {
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
    fn a_missing_folder_then_dot_dot_resolves_where_it_will_be() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("inputs");
        std::fs::create_dir_all(&real).unwrap();
        let sneaky = tmp.path().join("missing/deeper/../../inputs");
        assert_eq!(canonical_dir(&sneaky), real.canonicalize().unwrap());
        assert_eq!(
            canonical_dir(&tmp.path().join("missing/./new")),
            tmp.path().canonicalize().unwrap().join("missing/new")
        );
    }

    #[test]
    fn the_write_check_a_kill_left_behind_goes_with_the_next_run() {
        let tmp = tempfile::tempdir().unwrap();
        let host = davi_models::atomic::host();
        // A writer that has exited, and one that still runs (this process).
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let stale = tmp
            .path()
            .join(format!(".{WRITE_CHECK}.aB3dE6.{host}.{dead}.tmp"));
        let live = tmp.path().join(format!(
            ".{WRITE_CHECK}.xY7zW1.{host}.{}.tmp",
            std::process::id()
        ));
        let other = tmp.path().join(format!(".a.png.aB3dE6.{host}.{dead}.tmp"));
        for f in [&stale, &live, &other] {
            std::fs::write(f, b"").unwrap();
        }
        prepare_output_dir(tmp.path()).unwrap();
        assert!(!stale.exists());
        // A live writer's check, and temporaries of other files, are not this check's to remove.
        assert!(live.exists() && other.exists());
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 2);
    }

    #[test]
    fn escapes_make_one_line() {
        let p = Path::new(OsStr::from_bytes(b"a\nb\xff\\c.png"));
        assert_eq!(escape(p), "a\\nb\\xff\\\\c.png");
        assert_eq!(escape(Path::new("ok/é.png")), "ok/é.png");
        assert_eq!(
            escape(Path::new("evil\u{202e}gnp.exe")),
            "evil\\u{202e}gnp.exe"
        );
        // A joiner is part of a real name (Persian, emoji), not escaped.
        assert_eq!(
            escape(Path::new("می\u{200c}خواهم.png")),
            "می\u{200c}خواهم.png"
        );
    }

    #[test]
    fn a_writer_is_alive_only_while_its_process_is_the_one_that_wrote() {
        let host = davi_models::atomic::host();
        let me = Temporary {
            target: b"a.png".to_vec(),
            host: host.clone(),
            pid: std::process::id(),
        };
        let now = std::time::SystemTime::now();
        assert!(writer_alive(&me, now));
        // A file older than this process: its writer was another one that had our id.
        assert!(!writer_alive(&me, std::time::UNIX_EPOCH));
        let elsewhere = Temporary {
            host: format!("{host}x"),
            ..me.clone()
        };
        assert!(writer_alive(&elsewhere, std::time::UNIX_EPOCH));
        let dead = Temporary {
            pid: u32::MAX - 1,
            ..me.clone()
        };
        assert!(!writer_alive(&dead, now));
        // A killed writer that its parent has not reaped yet (a zombie) writes nothing more.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let zombie = Temporary {
            pid: child.id(),
            ..me
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while writer_alive(&zombie, std::time::SystemTime::now())
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(!writer_alive(&zombie, std::time::SystemTime::now()));
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", child.id())).unwrap();
        assert!(stat.contains(") Z "), "not a zombie yet: {stat}");
        child.wait().unwrap();
    }
}
