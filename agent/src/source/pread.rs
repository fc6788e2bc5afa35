//! The fallback engine: one synchronous pread at a time.

use std::fs::File;
use std::os::unix::fs::FileExt;

use super::{BufPool, ReadBuf, SourceError};

pub(super) fn read_pieces<E: From<SourceError>>(
    file: &File,
    pieces: impl Iterator<Item = (u64, usize)>,
    pool: &BufPool,
    limit: Option<&crate::throttle::ReadLimit>,
    mut deliver: impl FnMut(u64, ReadBuf) -> Result<(), E>,
) -> Result<(), E> {
    for (offset, len) in pieces {
        if let Some(l) = limit {
            if let Some(wait) = l.wait() {
                std::thread::sleep(wait);
            }
            l.spend(len as u64);
        }
        let mut buf = pool.get();
        let mut done = 0;
        while done < len {
            match file.read_at(&mut buf.full_mut()[done..len], offset + done as u64) {
                Ok(0) => {
                    return Err(SourceError::ShortRead {
                        offset_bytes: offset,
                        expected: len,
                        got: done,
                    }
                    .into())
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(SourceError::ReadDevice {
                        offset_bytes: offset + done as u64,
                        source,
                    }
                    .into())
                }
            }
        }
        buf.set_len(len);
        deliver(offset, buf)?;
    }
    Ok(())
}
