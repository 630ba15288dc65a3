//! Atomic file writes shared by every crate: a temporary file beside the target, synced, then
//! renamed over it (`tempfile`'s `persist`). A crash leaves the old file or the whole new one,
//! never a part. Temporaries are named `.NAME.XXXXXX.HOST.PID.tmp` (NAME cut to 180 bytes), so a
//! later run can tell those of a writer of this machine that no longer runs ([`Temporary`]) and
//! remove them. Files are created readable as any other (mode 0666 less the umask).

use std::ffi::OsStr;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// A write that failed, with the file and the cause.
#[derive(Debug, thiserror::Error)]
#[error("cannot write {}: {source}", path.display())]
pub struct WriteError {
    /// The file.
    pub path: PathBuf,
    /// Why.
    #[source]
    pub source: std::io::Error,
}

/// Writes `bytes` to `path` atomically, creating its folder.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), WriteError> {
    let err = |source| WriteError {
        path: path.to_path_buf(),
        source,
    };
    let name = path.file_name().ok_or_else(|| {
        err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "no file name",
        ))
    })?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).map_err(err)?;
    let mut prefix = std::ffi::OsString::from(".");
    prefix.push(OsStr::from_bytes(truncated(name.as_bytes())));
    prefix.push(".");
    let suffix = format!(".{}.{}.tmp", host(), std::process::id());
    let mut tmp = tempfile::Builder::new()
        .prefix(&prefix)
        .suffix(&suffix)
        .rand_bytes(6)
        .permissions(std::fs::Permissions::from_mode(0o666))
        .tempfile_in(dir)
        .map_err(err)?;
    tmp.write_all(bytes).map_err(err)?;
    tmp.as_file().sync_all().map_err(err)?;
    tmp.persist(path).map_err(|e| err(e.error))?;
    Ok(())
}

/// At most this many bytes of a file's name go into its temporary's name (file names are
/// limited to 255 bytes).
pub const NAME_BYTES: usize = 180;

fn truncated(name: &[u8]) -> &[u8] {
    if name.len() <= NAME_BYTES {
        return name;
    }
    // Cut at a character boundary where the name is UTF-8.
    let mut end = NAME_BYTES;
    while end > 0 && std::str::from_utf8(&name[..end]).is_err() && name[end] & 0xc0 == 0x80 {
        end -= 1;
    }
    &name[..end]
}

/// This machine's name as temporaries carry it: letters, digits and `-`, at most 16.
pub fn host() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_default();
    let h: String = raw
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .take(16)
        .collect();
    if h.is_empty() {
        "host".into()
    } else {
        h
    }
}

/// What a temporary's name says about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Temporary {
    /// The (possibly cut) name of the file it was to become.
    pub target: Vec<u8>,
    /// The writer's machine.
    pub host: String,
    /// The writer's process id.
    pub pid: u32,
}

impl Temporary {
    /// Parses `.NAME.XXXXXX.HOST.PID.tmp`; `None` for any other name.
    pub fn parse(name: &OsStr) -> Option<Self> {
        let b = name.as_bytes();
        let inner = b.strip_prefix(b".")?.strip_suffix(b".tmp")?;
        let mut parts = inner.rsplitn(4, |&c| c == b'.');
        let pid = std::str::from_utf8(parts.next()?).ok()?.parse().ok()?;
        let host = std::str::from_utf8(parts.next()?).ok()?.to_string();
        let rand = parts.next()?;
        let target = parts.next()?;
        if rand.len() != 6 || target.is_empty() {
            return None;
        }
        Some(Self {
            target: target.to_vec(),
            host,
            pid,
        })
    }

    /// Whether this temporary would be the one of a file named `name`.
    pub fn is_for(&self, name: &OsStr) -> bool {
        self.target == truncated(name.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_whole_files_and_names_temporaries_by_host_and_pid() {
        let dir = std::env::temp_dir().join(format!("davi-atomic-{}", std::process::id()));
        let p = dir.join("sub/a.png");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(p.parent().unwrap()).unwrap().count(), 1);
        // Created 0666 less the umask, not tempfile's private 0600.
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert!(mode & 0o044 != 0, "mode {mode:o}");
        let t = Temporary::parse(OsStr::new(".a.png.x1Y2z3.box-1.123.tmp")).unwrap();
        assert_eq!((t.host.as_str(), t.pid), ("box-1", 123));
        assert!(t.is_for(OsStr::new("a.png")) && !t.is_for(OsStr::new("b.png")));
        assert_eq!(Temporary::parse(OsStr::new(".a.png.123.tmp")), None);
        assert_eq!(Temporary::parse(OsStr::new("a.png.x1Y2z3.h.12.tmp")), None);
        // A name of 255 bytes still gets a temporary that fits.
        let long = dir.join(format!("{}.png", "n".repeat(251)));
        write_atomic(&long, b"x").unwrap();
        let e = write_atomic(&dir.join("sub/a.png/x"), b"").unwrap_err();
        assert!(e.to_string().contains("a.png/x"), "{e}");
        assert!(std::error::Error::source(&e).is_some());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
