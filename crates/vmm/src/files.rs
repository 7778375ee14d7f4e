//! Paths a user hands godwit: what may be read from them, and what may be replaced.
//! A FIFO would hang the read, a device such as /dev/zero would grow it without end, and
//! a user's file at a socket path must never be deleted: these checks come before any
//! byte is read or any file removed.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::path::Path;

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// What kind of thing is at a path, in words.
pub fn kind(ft: std::fs::FileType) -> &'static str {
    if ft.is_dir() {
        "a directory"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_block_device() {
        "a block device"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_symlink() {
        "a symbolic link"
    } else {
        "a file"
    }
}

/// Why connecting to the Unix socket at `path` failed (`e`), in words: nothing there,
/// something that is not a socket, or a socket nobody listens on.
pub fn socket_problem(path: &Path, e: &io::Error) -> String {
    match std::fs::metadata(path) {
        Err(_) => "it does not exist".into(),
        Ok(m) if !m.file_type().is_socket() => {
            format!("it is {}, not a socket", kind(m.file_type()))
        }
        Ok(_) if e.kind() == io::ErrorKind::ConnectionRefused => {
            "nobody listens on it (a stale socket left by a process that ended?)".into()
        }
        Ok(_) => e.to_string(),
    }
}

/// Opens `path` for reading if it is a regular file of at most `max` bytes; returns it
/// with its size. Opening never blocks (a FIFO is refused, not waited on).
pub fn open_regular(path: &Path, max: u64) -> io::Result<(File, u64)> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(invalid(format!(
            "is {}, not a regular file",
            kind(meta.file_type())
        )));
    }
    if meta.len() > max {
        return Err(invalid(format!(
            "is {} bytes; the limit here is {max}",
            meta.len()
        )));
    }
    Ok((f, meta.len()))
}

/// Reads a whole regular file of at most `max` bytes (a file growing while it is read
/// is cut at the limit and refused).
pub fn read_regular(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    let (f, len) = open_regular(path, max)?;
    let mut data = Vec::with_capacity(len as usize);
    f.take(max + 1).read_to_end(&mut data)?;
    if data.len() as u64 > max {
        return Err(invalid(format!("grew past {max} bytes while read")));
    }
    Ok(data)
}

/// Makes `path` free for a new listening socket: nothing there, or a stale socket (no
/// process answers on it), which is removed. A live socket and anything that is not a
/// socket are refused and left alone.
pub fn claim_socket_path(path: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "exists and is {}, not a socket; refusing to replace it (choose another path)",
                kind(meta.file_type())
            ),
        ));
    }
    if UnixStream::connect(path).is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "already in use by a running process (another godwit?)",
        ));
    }
    std::fs::remove_file(path)
        .map_err(|e| io::Error::new(e.kind(), format!("stale socket cannot be removed: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_bounded_regular_files_are_read() {
        let dir = std::env::temp_dir().join(format!("godwit-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("f");
        std::fs::write(&f, [7u8; 100]).unwrap();
        assert_eq!(read_regular(&f, 100).unwrap().len(), 100);
        let e = read_regular(&f, 99).unwrap_err().to_string();
        assert!(e.contains("is 100 bytes"), "{e}");
        let e = read_regular(Path::new("/dev/zero"), 1 << 20)
            .unwrap_err()
            .to_string();
        assert!(e.contains("a character device"), "{e}");
        let e = read_regular(&dir, 1 << 20).unwrap_err().to_string();
        assert!(e.contains("a directory"), "{e}");
        let fifo = dir.join("fifo");
        assert!(std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success());
        // No writer: a plain open would block here forever.
        let e = read_regular(&fifo, 1 << 20).unwrap_err().to_string();
        assert!(e.contains("a FIFO"), "{e}");
        let e = claim_socket_path(&f).unwrap_err().to_string();
        assert!(e.contains("not a socket"), "{e}");
        assert!(f.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
