//! Sending guest pages: which pages, split across connections, zero pages recognised,
//! at a bounded rate.

use crate::wire::{self, Frame, PagesFrame, PAGE_SIZE};
use godwit_vmm::dirty::Written;
use godwit_vmm::memory::{GuestMemory, RamRegion};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// Pages per chunk of the address space given to one connection: a page always travels on
/// the same connection, so TCP's ordering keeps its newest copy last.
const CHUNK_PAGES: u64 = 512;

/// One bit per page of one RAM region.
pub type Bitmap = Vec<u64>;

pub fn count(bitmaps: &[Bitmap]) -> u64 {
    bitmaps
        .iter()
        .flatten()
        .map(|w| w.count_ones() as u64)
        .sum()
}

/// Clears from `todo` the pages a look at the dirty log found, in words from `from` on
/// (flat index across regions); returns how many were cleared.
pub fn drop_written(todo: &mut [Bitmap], written: &Written, from: usize) -> u64 {
    match written {
        Written::Since(b) => drop_dirty(todo, b, from),
        Written::New(list) => {
            let mut n = 0;
            for &(region, page) in list {
                let r = region as usize;
                let Some(base) = todo.get(..r).map(words) else {
                    continue;
                };
                let w = (page / 64) as usize;
                if base + w < from {
                    continue;
                }
                if let Some(x) = todo[r].get_mut(w) {
                    let bit = 1u64 << (page % 64);
                    if *x & bit != 0 {
                        *x &= !bit;
                        n += 1;
                    }
                }
            }
            n
        }
    }
}

/// The end (in words) of the slice that starts at word `from` and holds at least
/// `pages` pages of `todo`, or the end of `todo`.
pub fn slice_end(todo: &[Bitmap], from: usize, pages: u64) -> usize {
    let mut n = 0;
    let mut at = 0;
    for b in todo {
        if at + b.len() <= from {
            at += b.len();
            continue;
        }
        for (i, w) in b.iter().enumerate().skip(from.saturating_sub(at)) {
            n += w.count_ones() as u64;
            if n >= pages {
                return at + i + 1;
            }
        }
        at += b.len();
    }
    at
}

/// Clears from `todo` the pages set in `dirty`, in words from `from` on (flat index across
/// regions); returns how many were cleared.
pub fn drop_dirty(todo: &mut [Bitmap], dirty: &[Bitmap], from: usize) -> u64 {
    let mut base = 0;
    let mut n = 0;
    for (a, b) in todo.iter_mut().zip(dirty) {
        for (i, (x, y)) in a.iter_mut().zip(b).enumerate() {
            if base + i >= from && *x & *y != 0 {
                n += (*x & *y).count_ones() as u64;
                *x &= !*y;
            }
        }
        base += a.len();
    }
    n
}

pub fn words(b: &[Bitmap]) -> usize {
    b.iter().map(|x| x.len()).sum()
}

pub fn union(into: &mut [Bitmap], from: &[Bitmap]) {
    for (a, b) in into.iter_mut().zip(from) {
        for (x, y) in a.iter_mut().zip(b) {
            *x |= *y;
        }
    }
}

pub fn pages_of(r: &RamRegion) -> u64 {
    r.size / PAGE_SIZE as u64
}

/// The pages of each region that the host has ever backed with memory. A page of the
/// guest's anonymous mapping that is neither present nor swapped was never written and
/// reads as zero, so a first pass need not even look at it (from /proc/self/pagemap: bit
/// 63 present, bit 62 swapped). Falls back to "all pages" if pagemap cannot be read.
pub fn populated(mem: &GuestMemory, ram: &[RamRegion]) -> Vec<Bitmap> {
    let all = |r: &RamRegion| {
        let n = pages_of(r);
        let mut b = vec![u64::MAX; n.div_ceil(64) as usize];
        if !n.is_multiple_of(64) {
            *b.last_mut().expect("non-empty") = (1u64 << (n % 64)) - 1;
        }
        b
    };
    let Ok(mut f) = std::fs::File::open("/proc/self/pagemap") else {
        return ram.iter().map(all).collect();
    };
    ram.iter()
        .zip(mem.iter())
        .map(|(r, region)| {
            let host = match region.get_host_address(vm_memory::MemoryRegionAddress(0)) {
                Ok(h) => h as u64,
                Err(_) => return all(r),
            };
            let n = pages_of(r) as usize;
            let mut bits = vec![0u64; n.div_ceil(64)];
            let mut entries = vec![0u8; 8 * 65536];
            let mut done = 0usize;
            while done < n {
                let take = (n - done).min(65536);
                let off = (host / PAGE_SIZE as u64 + done as u64) * 8;
                let buf = &mut entries[..take * 8];
                if f.seek(SeekFrom::Start(off)).is_err() || f.read_exact(buf).is_err() {
                    return all(r);
                }
                for (i, e) in buf.chunks_exact(8).enumerate() {
                    let e = u64::from_le_bytes(e.try_into().expect("8 bytes"));
                    if e & (3 << 62) != 0 {
                        let p = done + i;
                        bits[p / 64] |= 1 << (p % 64);
                    }
                }
                done += take;
            }
            bits
        })
        .collect()
}

pub fn is_zero(page: &[u8]) -> bool {
    let mut chunks = page.chunks_exact(16);
    chunks
        .by_ref()
        .all(|c| u128::from_ne_bytes(c.try_into().expect("16 bytes")) == 0)
        && chunks.remainder().iter().all(|b| *b == 0)
}

/// Keeps the senders of one migration under `rate` bytes per second, together.
pub struct Limiter {
    rate: Option<u64>,
    start: Instant,
    sent: AtomicU64,
}

impl Limiter {
    pub fn new(rate: Option<u64>) -> Self {
        Limiter {
            rate,
            start: Instant::now(),
            sent: AtomicU64::new(0),
        }
    }

    fn account(&self, bytes: usize, live: &AtomicU64) {
        live.fetch_add(bytes as u64, Ordering::Relaxed);
        let Some(rate) = self.rate else { return };
        let sent = self.sent.fetch_add(bytes as u64, Ordering::Relaxed) + bytes as u64;
        let due = self.start + Duration::from_secs_f64(sent as f64 / rate as f64);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
    }
}

/// What one sender did in one round.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sent {
    pub pages: u64,
    /// Zero pages found; `zero_sent` of them went out as runs (the rest needed no message).
    pub zero_pages: u64,
    pub zero_sent: u64,
    pub bytes: u64,
}

impl std::ops::AddAssign for Sent {
    fn add_assign(&mut self, o: Sent) {
        self.pages += o.pages;
        self.zero_pages += o.zero_pages;
        self.zero_sent += o.zero_sent;
        self.bytes += o.bytes;
    }
}

/// Everything a sender needs for one round.
pub struct Job<'a> {
    pub mem: &'a GuestMemory,
    pub ram: &'a [RamRegion],
    pub pages: &'a [Bitmap],
    pub part: u64,
    pub parts: u64,
    pub limiter: &'a Limiter,
    pub cancel: &'a AtomicBool,
    /// Bytes written, for progress reports.
    pub live: &'a AtomicU64,
    /// The receiver's memory is still fresh (all zero), so zero pages need no message.
    pub fresh: bool,
    /// Only bitmap words in this range, counted across regions in order.
    pub words: std::ops::Range<usize>,
}

fn cancelled() -> io::Error {
    io::Error::new(io::ErrorKind::Interrupted, "cancelled")
}

/// Sends this connection's share of the pages of `job` on `w`.
pub fn send(w: &mut impl Write, job: &Job, frame: &mut PagesFrame) -> io::Result<Sent> {
    let mut sent = Sent::default();
    let mut zero_runs: Vec<(u64, u32)> = Vec::new();
    let flush_zero = |w: &mut dyn Write, runs: &mut Vec<(u64, u32)>, sent: &mut Sent| {
        if runs.is_empty() {
            return Ok(());
        }
        let mut out = Vec::with_capacity(16 + 4 + 12 * runs.len());
        wire::write_frame(&mut out, &Frame::Zero(std::mem::take(runs)))?;
        w.write_all(&out)?;
        sent.bytes += out.len() as u64;
        Ok::<(), io::Error>(())
    };
    let mut base = 0;
    for (region, bitmap) in job.ram.iter().zip(job.pages) {
        let region_base = base;
        base += bitmap.len();
        let lo = job
            .words
            .start
            .saturating_sub(region_base)
            .min(bitmap.len());
        let hi = job.words.end.saturating_sub(region_base).min(bitmap.len());
        for (wi, &word) in bitmap.iter().enumerate().take(hi).skip(lo) {
            if word == 0 {
                continue;
            }
            let first = wi as u64 * 64;
            if (first / CHUNK_PAGES) % job.parts != job.part {
                continue;
            }
            if job.cancel.load(Ordering::Relaxed) {
                return Err(cancelled());
            }
            let mut bits = word;
            while bits != 0 {
                let p = first + bits.trailing_zeros() as u64;
                bits &= bits - 1;
                let gpa = region.start + p * PAGE_SIZE as u64;
                let slot = frame.next_slot();
                job.mem
                    .read_slice(slot, GuestAddress(gpa))
                    .map_err(|e| io::Error::other(format!("guest page {gpa:#x}: {e}")))?;
                if is_zero(slot) {
                    sent.zero_pages += 1;
                    if job.fresh {
                        continue;
                    }
                    sent.zero_sent += 1;
                    match zero_runs.last_mut() {
                        Some((g, n)) if *g + *n as u64 * PAGE_SIZE as u64 == gpa => *n += 1,
                        _ => zero_runs.push((gpa, 1)),
                    }
                    if zero_runs.len() == wire::MAX_ZERO_RUNS {
                        flush_zero(w, &mut zero_runs, &mut sent)?;
                    }
                    continue;
                }
                frame.commit(gpa);
                sent.pages += 1;
                if frame.is_full() {
                    let n = frame.flush(w)?;
                    sent.bytes += n as u64;
                    job.limiter.account(n, job.live);
                }
            }
        }
    }
    let n = frame.flush(w)?;
    sent.bytes += n as u64;
    job.limiter.account(n, job.live);
    flush_zero(w, &mut zero_runs, &mut sent)?;
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_look_at_the_log_drops_only_pages_not_yet_sent() {
        // Two regions of 128 pages, all to send.
        let all = || vec![vec![u64::MAX; 2], vec![u64::MAX; 2]];
        let mut todo = all();
        // Seen rewritten: page 3 (word 0, already sent), page 70 (word 1), region 1
        // page 5 (flat word 2), and one out of range.
        let new = Written::New(vec![(0, 3), (0, 70), (1, 5), (1, 999), (7, 1)]);
        assert_eq!(drop_written(&mut todo, &new, 1), 2);
        assert_eq!(todo[0][0], u64::MAX);
        assert_eq!(todo[0][1], !(1 << 6));
        assert_eq!(todo[1][0], !(1 << 5));
        // Seen again: nothing more to drop. The same set as bitmaps drops the same.
        assert_eq!(drop_written(&mut todo, &new, 1), 0);
        let mut other = all();
        let mut since = vec![vec![0u64; 2], vec![0u64; 2]];
        since[0][0] = 1 << 3;
        since[0][1] = 1 << 6;
        since[1][0] = 1 << 5;
        assert_eq!(drop_written(&mut other, &Written::Since(since), 1), 2);
        assert_eq!(other, todo);
    }

    #[test]
    fn slices_hold_a_number_of_pages_not_of_addresses() {
        let mut todo = vec![vec![0u64; 100], vec![0u64; 100]];
        todo[0][10] = 0b111;
        todo[1][50] = u64::MAX;
        assert_eq!(slice_end(&todo, 0, 3), 11);
        assert_eq!(slice_end(&todo, 0, 4), 151);
        assert_eq!(slice_end(&todo, 11, 64), 151);
        assert_eq!(slice_end(&todo, 151, 1), 200);
        assert_eq!(slice_end(&todo, 0, 1000), 200);
    }

    #[test]
    fn zero_pages_are_recognised() {
        let mut p = vec![0u8; PAGE_SIZE];
        assert!(is_zero(&p));
        p[PAGE_SIZE - 1] = 1;
        assert!(!is_zero(&p));
        assert!(!is_zero(&p[1..]));
    }

    #[test]
    fn populated_sees_only_written_pages() {
        let mem = godwit_vmm::memory::create(16 << 20).unwrap();
        let ram = godwit_vmm::memory::layout(16 << 20);
        assert_eq!(count(&populated(&mem, &ram)), 0);
        mem.write_slice(&[1], GuestAddress(5 * 4096 + 7)).unwrap();
        mem.write_slice(&[1], GuestAddress(4000 * 4096)).unwrap();
        let b = populated(&mem, &ram);
        assert!(count(&b) >= 2, "{}", count(&b));
        assert!(b[0][0] & (1 << 5) != 0);
    }
}
