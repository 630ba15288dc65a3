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

/// Writes `bytes` to `path` atomically, creating its folder. What is at `path` is replaced when
/// it is a file or a symbolic link (the link itself, never its target); anything else (a
/// folder, a device, a pipe) is an error, since renaming over it would replace it.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), WriteError> {
    let err = |source| WriteError {
        path: path.to_path_buf(),
        source,
    };
    if let Ok(m) = std::fs::symlink_metadata(path) {
        let t = m.file_type();
        if !t.is_file() && !t.is_symlink() {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "exists and is not a regular file (a folder, device, pipe or socket); not replaced",
            )));
        }
    }
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
    std::fs::create_dir_all(dir).map_err(|e| {
        // Name the part of the path that is in the way (`out/sub` a file where `out/sub/a.png`
        // needs a folder), not only the errno.
        let blocker = dir
            .ancestors()
            .find(|a| std::fs::metadata(a).is_ok_and(|m| !m.is_dir()));
        match blocker {
            Some(b) => err(std::io::Error::new(
                e.kind(),
                format!(
                    "{} is not a folder; cannot make the folder of this file",
                    b.display()
                ),
            )),
            None => err(e),
        }
    })?;
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

/// Writes a file the user named (a report, a table, a card, a sheet) through to what is there:
/// a device or pipe (`/dev/stdout`, `/dev/null`) is written to as it is; a symbolic link to a
/// file is followed, and its target replaced atomically; anything else as [`write_atomic`].
pub fn write_named(path: &Path, bytes: &[u8]) -> Result<(), WriteError> {
    use std::os::unix::fs::FileTypeExt;
    let err = |source| WriteError {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::metadata(path).map(|m| m.file_type()) {
        Ok(t) if t.is_char_device() || t.is_fifo() => {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(err)?;
            f.write_all(bytes).and_then(|_| f.flush()).map_err(err)
        }
        Ok(t) if t.is_file() => write_atomic(&std::fs::canonicalize(path).map_err(err)?, bytes),
        _ => write_atomic(path, bytes),
    }
}

/// At most this many bytes of a file's name go into its temporary's name (file names are
/// limited to 255 bytes).
pub const NAME_BYTES: usize = 180;

/// Reads `path`, a regular file (links followed) of at most `max` bytes. A device, a pipe or a
/// folder where a file is expected is refused, not read until memory runs out or for ever.
pub fn read_regular(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    let m = std::fs::metadata(path)?;
    if !m.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            file_kind(&m),
        ));
    }
    if m.len() > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "{} bytes, more than such a file has ({max}); not read",
                m.len()
            ),
        ));
    }
    std::fs::read(path)
}

/// What a path that is not a regular file is, for the message that refuses it.
pub fn file_kind(m: &std::fs::Metadata) -> String {
    use std::os::unix::fs::FileTypeExt;
    let t = m.file_type();
    let kind = if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_block_device() || t.is_char_device() {
        "a device"
    } else if t.is_dir() {
        "a folder"
    } else {
        "not a regular file"
    };
    format!("{kind}, not a regular file; not read")
}

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
    use std::os::unix::fs::FileTypeExt;

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
        // A folder, device or pipe at the path is not replaced; a link is, not its target.
        let fifo = dir.join("fifo");
        assert!(std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success());
        for p in [&fifo, &dir.join("sub")] {
            let e = write_atomic(p, b"x").unwrap_err();
            assert!(e.to_string().contains("not a regular file"), "{e}");
        }
        assert!(std::fs::symlink_metadata(&fifo)
            .unwrap()
            .file_type()
            .is_fifo());
        let link = dir.join("link.json");
        std::os::unix::fs::symlink("sub/a.png", &link).unwrap();
        write_atomic(&link, b"new").unwrap();
        assert!(std::fs::symlink_metadata(&link).unwrap().is_file());
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let e = write_atomic(&dir.join("sub/a.png/x"), b"").unwrap_err();
        assert!(e.to_string().contains("a.png/x"), "{e}");
        // The file in the way of the folder is named.
        let e = write_atomic(&dir.join("sub/a.png/deeper/x"), b"").unwrap_err();
        assert!(e.to_string().contains("sub/a.png is not a folder"), "{e}");
        assert!(std::error::Error::source(&e).is_some());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_named_file_is_written_through_devices_and_links() {
        let dir = tempfile::tempdir().unwrap();
        // A device is written to, not replaced (/dev/null takes anything; /dev/full's error is
        // the write's).
        write_named(Path::new("/dev/null"), b"x").unwrap();
        assert!(std::fs::metadata("/dev/null")
            .unwrap()
            .file_type()
            .is_char_device());
        if Path::new("/dev/full").exists() {
            assert!(write_named(Path::new("/dev/full"), b"x").is_err());
        }
        // A link to a file: the target is replaced, the link stays.
        let target = dir.path().join("t.json");
        std::fs::write(&target, b"old").unwrap();
        let link = dir.path().join("link.json");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        write_named(&link, b"new").unwrap();
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read(&target).unwrap(), b"new");
        // A new file, and a folder refused.
        write_named(&dir.path().join("n.json"), b"n").unwrap();
        assert!(write_named(dir.path(), b"x").is_err());
    }
}
