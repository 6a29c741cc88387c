//! The journal's write-ahead log, `DIR/kv.wal`: a commit is one frame
//! appended and one fdatasync, the least a durable write can cost. The
//! redb file holds everything up to the last checkpoint; the log holds
//! what came after, and is emptied by each checkpoint.
//!
//! A frame is `len: u32 LE | crc32(payload): u32 LE | payload`; the payload
//! is records `op: u8 (1 set, 0 delete) | tenant: u16 len + bytes | key:
//! u32 len + bytes | value (set only): u32 len + bytes`. Records carry
//! values, not deltas, so replaying a frame twice is harmless.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::journal::Batch;

/// One write read back: tenant, key, value (None: deleted).
pub(crate) type Record = (String, String, Option<Vec<u8>>);

const HEADER: usize = 8;
/// A frame longer than this is not one evrhost wrote.
const MAX_FRAME: usize = 1 << 31;

#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("kv: cannot open {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "kv: {path} is damaged at byte {offset} (a complete frame fails its checksum, and more follows): \
         move it away to start from the last checkpoint in kv.redb, losing the writes after it"
    )]
    Corrupt { path: PathBuf, offset: u64 },
}

pub(crate) struct Wal {
    file: File,
    path: PathBuf,
    /// Bytes of complete frames: where the next one goes.
    len: u64,
}

impl Wal {
    /// Opens (or creates) the log and reads back its frames. A last frame
    /// cut short by a crash (never acknowledged) is cut off.
    pub fn open(path: &Path) -> Result<(Wal, Vec<Record>), WalError> {
        let io = |source| WalError::Io { path: path.to_path_buf(), source };
        let file =
            std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).map_err(io)?;
        let bytes = std::fs::read(path).map_err(io)?;
        let mut records = Vec::new();
        let mut at = 0usize;
        while at < bytes.len() {
            let Some(frame) = frame_at(&bytes, at) else {
                // Incomplete: the tail of a write that never finished.
                break;
            };
            match frame {
                Ok((payload, next)) => match decode(payload) {
                    Some(mut r) => {
                        records.append(&mut r);
                        at = next;
                    }
                    None => return Err(WalError::Corrupt { path: path.to_path_buf(), offset: at as u64 }),
                },
                // A bad checksum on the last frame is a torn write; with
                // more after it, the file is damaged.
                Err(next) if next >= bytes.len() => break,
                Err(_) => return Err(WalError::Corrupt { path: path.to_path_buf(), offset: at as u64 }),
            }
        }
        if at < bytes.len() {
            tracing::info!(path = %path.display(), bytes = bytes.len() - at, "kv: cut off an unfinished write at the end of the log");
            file.set_len(at as u64).map_err(io)?;
            file.sync_data().map_err(io)?;
        }
        Ok((Wal { file, path: path.to_path_buf(), len: at as u64 }, records))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    /// Appends `batch` as one frame and makes it durable. On failure the
    /// partial frame is cut off (as far as the disk lets), so a retry
    /// appends where the last good frame ended.
    pub fn append(&mut self, batch: &Batch) -> io::Result<()> {
        let frame = encode(batch);
        let done = self.file.write_all_at(&frame, self.len).and_then(|()| self.file.sync_data());
        match done {
            Ok(()) => {
                self.len += frame.len() as u64;
                Ok(())
            }
            Err(e) => {
                let _ = self.file.set_len(self.len);
                Err(e)
            }
        }
    }

    /// Empties the log (after a checkpoint has every frame in it).
    pub fn reset(&mut self) -> io::Result<()> {
        self.file.set_len(0)?;
        self.file.sync_data()?;
        self.len = 0;
        Ok(())
    }
}

/// The frame at `at`: Ok((payload, next offset)), Err(next offset) for a
/// bad checksum, None when the bytes end first.
fn frame_at(bytes: &[u8], at: usize) -> Option<Result<(&[u8], usize), usize>> {
    let header = bytes.get(at..at + HEADER)?;
    let len = u32::from_le_bytes(header[..4].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(header[4..].try_into().ok()?);
    let end = (at + HEADER).checked_add(len).filter(|_| len < MAX_FRAME)?;
    let Some(payload) = bytes.get(at + HEADER..end) else {
        return Some(Err(end));
    };
    Some(if crc32fast::hash(payload) == crc { Ok((payload, end)) } else { Err(end) })
}

fn encode(batch: &Batch) -> Vec<u8> {
    let mut out = vec![0u8; HEADER];
    for (tenant, keys) in batch {
        for (key, value) in keys {
            out.push(u8::from(value.is_some()));
            // Tenant names are at most 64 bytes, keys at most 64 KiB.
            out.extend_from_slice(&(tenant.len() as u16).to_le_bytes());
            out.extend_from_slice(tenant.as_bytes());
            out.extend_from_slice(&(key.len() as u32).to_le_bytes());
            out.extend_from_slice(key.as_bytes());
            if let Some(v) = value {
                out.extend_from_slice(&(v.len() as u32).to_le_bytes());
                out.extend_from_slice(v);
            }
        }
    }
    let len = (out.len() - HEADER) as u32;
    let crc = crc32fast::hash(&out[HEADER..]);
    out[..4].copy_from_slice(&len.to_le_bytes());
    out[4..HEADER].copy_from_slice(&crc.to_le_bytes());
    out
}

fn decode(mut p: &[u8]) -> Option<Vec<Record>> {
    fn take<'a>(p: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (p.get(..n)?, p.get(n..)?);
        *p = rest;
        Some(head)
    }
    fn text(p: &mut &[u8], n: usize) -> Option<String> {
        String::from_utf8(take(p, n)?.to_vec()).ok()
    }
    let mut records = Vec::new();
    while !p.is_empty() {
        let op = take(&mut p, 1)?[0];
        let tenant_len = u16::from_le_bytes(take(&mut p, 2)?.try_into().ok()?) as usize;
        let tenant = text(&mut p, tenant_len)?;
        let key_len = u32::from_le_bytes(take(&mut p, 4)?.try_into().ok()?) as usize;
        let key = text(&mut p, key_len)?;
        let value = match op {
            0 => None,
            1 => {
                let n = u32::from_le_bytes(take(&mut p, 4)?.try_into().ok()?) as usize;
                Some(take(&mut p, n)?.to_vec())
            }
            _ => return None,
        };
        records.push((tenant, key, value));
    }
    Some(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(entries: &[(&str, &str, Option<&[u8]>)]) -> Batch {
        let mut b = Batch::new();
        for (t, k, v) in entries {
            b.entry(t.to_string()).or_default().insert(k.to_string(), v.map(<[u8]>::to_vec));
        }
        b
    }

    #[test]
    fn frames_read_back_and_a_torn_tail_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kv.wal");
        let (mut wal, records) = Wal::open(&path).unwrap();
        assert!(records.is_empty());
        wal.append(&batch(&[("a", "k", Some(b"v1"))])).unwrap();
        wal.append(&batch(&[("a", "k", None), ("b", "x", Some(&[0, 255]))])).unwrap();
        let good = wal.len();
        drop(wal);
        // A crash mid-append: half a frame at the end.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.extend_from_slice(&encode(&batch(&[("a", "lost", Some(b"x"))]))[..11]);
        std::fs::write(&path, &bytes).unwrap();
        let (wal, mut records) = Wal::open(&path).unwrap();
        assert_eq!(wal.len(), good);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), good);
        records.sort();
        assert_eq!(
            records,
            vec![
                ("a".to_string(), "k".to_string(), None),
                ("a".to_string(), "k".to_string(), Some(b"v1".to_vec())),
                ("b".to_string(), "x".to_string(), Some(vec![0, 255])),
            ]
        );
    }

    #[test]
    fn a_damaged_frame_with_more_after_it_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kv.wal");
        let (mut wal, _) = Wal::open(&path).unwrap();
        wal.append(&batch(&[("a", "k", Some(b"v1"))])).unwrap();
        wal.append(&batch(&[("a", "k", Some(b"v2"))])).unwrap();
        drop(wal);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[HEADER + 3] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        let err = Wal::open(&path).err().expect("refused");
        assert!(matches!(err, WalError::Corrupt { offset: 0, .. }), "{err}");
        assert!(err.to_string().contains("kv.wal"), "{err}");
    }

    #[test]
    fn a_torn_last_frame_with_a_bad_checksum_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kv.wal");
        let (mut wal, _) = Wal::open(&path).unwrap();
        wal.append(&batch(&[("a", "k", Some(b"v1"))])).unwrap();
        let good = wal.len();
        wal.append(&batch(&[("a", "k", Some(b"v2"))])).unwrap();
        drop(wal);
        // The last frame's length landed, its data did not.
        let mut bytes = std::fs::read(&path).unwrap();
        let n = bytes.len();
        bytes[n - 3..].fill(0);
        std::fs::write(&path, &bytes).unwrap();
        let (wal, records) = Wal::open(&path).unwrap();
        assert_eq!((wal.len(), records.len()), (good, 1));
    }
}
