//! Which pages of a host mapping were ever backed with memory, from
//! /proc/self/pagemap. A page of an anonymous mapping that is neither present (bit 63)
//! nor swapped (bit 62) was never written and reads as zero, so a migration's first pass
//! need not even look at it.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::OnceLock;

const PAGE: u64 = 4096;
/// pagemap entries read per system call.
const BATCH: usize = 65536;

/// The process's pagemap, opened once: every thread reads it through one descriptor,
/// and a thread held to open no file (a source's migration thread) reads it too.
static PAGEMAP: OnceLock<Option<File>> = OnceLock::new();

fn pagemap() -> Option<&'static File> {
    PAGEMAP
        .get_or_init(|| File::open("/proc/self/pagemap").ok())
        .as_ref()
}

/// Opens the process's pagemap now, before a thread that will read it may open no file.
pub fn prepare() {
    pagemap();
}

/// One bit per 4 KiB page of [host, host + len): set where the page holds memory. None
/// when pagemap cannot be read (the caller must then assume every page may).
pub fn populated(host: u64, len: u64) -> Option<Vec<u64>> {
    let f = pagemap()?;
    let n = len.div_ceil(PAGE) as usize;
    let mut bits = vec![0u64; n.div_ceil(64)];
    let mut entries = vec![0u8; 8 * BATCH];
    let mut done = 0usize;
    while done < n {
        let take = (n - done).min(BATCH);
        let off = (host / PAGE + done as u64) * 8;
        let buf = &mut entries[..take * 8];
        f.read_exact_at(buf, off).ok()?;
        for (i, e) in buf.chunks_exact(8).enumerate() {
            let e = u64::from_le_bytes(e.try_into().expect("8 bytes"));
            if e & (3 << 62) != 0 {
                let p = done + i;
                bits[p / 64] |= 1 << (p % 64);
            }
        }
        done += take;
    }
    Some(bits)
}

/// Every page of `pages`: what to assume when pagemap says nothing.
pub fn all(pages: u64) -> Vec<u64> {
    let mut b = vec![u64::MAX; pages.div_ceil(64) as usize];
    if !pages.is_multiple_of(64) {
        if let Some(last) = b.last_mut() {
            *last = (1u64 << (pages % 64)) - 1;
        }
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_written_pages_are_populated() {
        let len = 64 * PAGE;
        // SAFETY: a fresh private anonymous mapping, unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        // SAFETY: inside the mapping.
        unsafe { *(p as *mut u8).add(5 * PAGE as usize + 7) = 1 };
        let b = populated(p as u64, len).unwrap();
        assert_eq!(b, vec![1 << 5]);
        assert_eq!(all(70), vec![u64::MAX, (1 << 6) - 1]);
        // SAFETY: the mapping made above.
        unsafe { libc::munmap(p, len as usize) };
    }
}
