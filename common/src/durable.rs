//! Crash-safe file replacement. Assumes a POSIX filesystem where rename is
//! atomic and an fsync of a directory makes a rename in it durable (ext4,
//! xfs, btrfs). A crash leaves either the old file or the new one, never a
//! mix; a leftover `.tmp` file is overwritten by the next write.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path` durably: temp file, fsync, rename, fsync the
/// directory. `mode` sets the permission bits (keys: 0o600).
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    write_atomic_with(path, mode, |w| w.write_all(bytes))
}

/// [`write_atomic`] of what `write` produces, streamed through a buffer
/// rather than assembled in memory first.
pub fn write_atomic_with(
    path: &Path,
    mode: u32,
    write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> std::io::Result<()> {
    replace_with(path, mode, true, write)
}

/// [`write_atomic_with`], durable only if `sync`. Without it the
/// replacement is still whole for every reader and survives the writer's
/// crash (the page cache keeps it), but a power cut may leave the old
/// file: for state that is only trusted within the boot that wrote it.
pub fn replace_with(
    path: &Path,
    mode: u32,
    sync: bool,
    write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    {
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        let mut w = std::io::BufWriter::with_capacity(64 << 10, f);
        write(&mut w)?;
        let f = w.into_inner().map_err(|e| e.into_error())?;
        if sync {
            f.sync_all()?;
        }
    }
    std::fs::rename(&tmp, path)?;
    if sync {
        sync_dir(dir)?;
    }
    Ok(())
}

/// Makes creations, renames and removals in `dir` durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_whole_file_and_leaves_no_temp() {
        let dir = std::env::temp_dir().join(format!("tdm-durable-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let p = dir.join("state.json");
        write_atomic(&p, b"first, longer", 0o600).expect("write");
        write_atomic(&p, b"second", 0o600).expect("write");
        assert_eq!(std::fs::read(&p).expect("read"), b"second");
        assert!(!dir.join("state.json.tmp").exists());
        // Unsynced, the same for every reader: whole, and no temp left.
        replace_with(&p, 0o600, false, |w| w.write_all(b"third")).expect("replace");
        assert_eq!(std::fs::read(&p).expect("read"), b"third");
        assert!(!dir.join("state.json.tmp").exists());
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
