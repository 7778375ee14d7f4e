//! A snapshot being written to `file:PATH`. It goes to a hidden temporary file beside
//! PATH, held under an exclusive lock, and replaces PATH only once it is whole and
//! durable: a cancelled or failed snapshot leaves whatever PATH held before, and two
//! snapshots to one path cannot interleave (the second is refused while the first
//! writes). Sealing appends the page index (`snapshot_index`) that lets a restore start
//! the VM before it reads the memory.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

pub struct SnapshotOut {
    w: BufWriter<File>,
    tmp: PathBuf,
    dst: PathBuf,
    sealed: bool,
}

fn temp_path(dst: &Path) -> PathBuf {
    let name = dst
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dst.with_file_name(format!(".{name}.godwit-partial"))
}

impl SnapshotOut {
    pub fn create(dst: &Path) -> io::Result<SnapshotOut> {
        let parent = match dst.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        if !parent.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("the directory {} does not exist", parent.display()),
            ));
        }
        if let Ok(m) = std::fs::metadata(dst) {
            if !m.is_file() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "{} is {}, not a snapshot file",
                        dst.display(),
                        godwit_vmm::files::kind(m.file_type())
                    ),
                ));
            }
        }
        let tmp = temp_path(dst);
        // A temporary file of a snapshot that died is taken over (nobody holds its
        // lock); one that a live snapshot writes is not. The path is checked again once
        // locked: a writer that gave up may have removed it meanwhile.
        for _ in 0..8 {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&tmp)?;
            match f.try_lock() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(io::Error::new(
                        io::ErrorKind::ResourceBusy,
                        format!(
                            "another snapshot is being written to {} right now",
                            dst.display()
                        ),
                    ))
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(e),
            }
            let ours = f.metadata()?;
            match std::fs::metadata(&tmp) {
                Ok(m) if m.ino() == ours.ino() && m.dev() == ours.dev() => {}
                _ => continue,
            }
            f.set_len(0)?;
            return Ok(SnapshotOut {
                w: BufWriter::with_capacity(1 << 20, f),
                tmp,
                dst: dst.into(),
                sealed: false,
            });
        }
        Err(io::Error::other(format!(
            "{} keeps changing under this snapshot",
            tmp.display()
        )))
    }

    /// Makes what was written durable.
    pub fn finish(&mut self) -> io::Result<()> {
        self.w.flush()?;
        self.w.get_ref().sync_all()
    }

    /// The snapshot is whole: its index goes after it, and it replaces the path,
    /// durably.
    pub fn seal(&mut self) -> io::Result<()> {
        self.w.flush()?;
        let f = self.w.get_ref();
        let stream_len = f.metadata()?.len();
        crate::snapshot_index::append(f, stream_len)?;
        self.finish()?;
        std::fs::rename(&self.tmp, &self.dst)?;
        self.sealed = true;
        if let Some(dir) = self.dst.parent().filter(|p| !p.as_os_str().is_empty()) {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

impl Write for SnapshotOut {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.w.write(b)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.w.flush()
    }
}

impl Drop for SnapshotOut {
    fn drop(&mut self) {
        if !self.sealed {
            // Still locked by this process: the file is this snapshot's own.
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_replaces_its_path_only_when_sealed() {
        let dir = std::env::temp_dir().join(format!("godwit-snapfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let dst = dir.join("vm.snap");
        std::fs::write(&dst, b"good old snapshot").unwrap();
        {
            let mut a = SnapshotOut::create(&dst).unwrap();
            a.write_all(b"half of a new one").unwrap();
            a.finish().unwrap();
            let e = SnapshotOut::create(&dst).err().unwrap().to_string();
            assert!(e.contains("another snapshot is being written"), "{e}");
            // Dropped unsealed: cancelled.
        }
        assert_eq!(std::fs::read(&dst).unwrap(), b"good old snapshot");
        assert!(!temp_path(&dst).exists());
        // A whole stream (here one frame) is sealed with its page index after it.
        let mut stream = Vec::new();
        crate::wire::write_frame(&mut stream, &crate::wire::Frame::Sync(7)).unwrap();
        let mut b = SnapshotOut::create(&dst).unwrap();
        b.write_all(&stream).unwrap();
        b.seal().unwrap();
        drop(b);
        let sealed = std::fs::read(&dst).unwrap();
        assert!(sealed.len() > stream.len() && sealed.starts_with(&stream));
        match crate::snapshot_index::Index::open(File::open(&dst).unwrap()).unwrap() {
            crate::snapshot_index::Found::Index(ix) => {
                assert_eq!(ix.stream_len(), stream.len() as u64)
            }
            _ => panic!("no index after the stream"),
        }
        let e = SnapshotOut::create(&dir.join("nodir/x.snap"))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("nodir does not exist"), "{e}");
        let e = SnapshotOut::create(&dir).err().unwrap().to_string();
        assert!(e.contains("a directory, not a snapshot file"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
