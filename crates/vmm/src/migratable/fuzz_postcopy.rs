//! For the fuzz targets (fuzz/): post-copy's handling of hostile page traffic, on a
//! small private memory. The source side takes page requests (`read_requested`, as
//! REQUEST and AHEAD frames bring them); the destination side takes a bitmap of missing
//! pages, then pages and zero runs to place (as POSTCOPY, PAGES and ZERO frames bring
//! them; into shared memory, pages read from the stream through its alias) and its own
//! account for a recovery. Nothing touches the memory meanwhile, so nothing waits.

use super::lazy::{HostRegion, Lazy};
use super::paged::{Bitmap, Memory, MemoryState, PAGE_SIZE};
use super::{Faults, MigState, Result, Sink};
use crate::dirty::Written;
use std::collections::BTreeMap;

const PAGES: u64 = 256;
const BASE: u64 = 0x10_0000;

/// A private anonymous mapping, unmapped on drop (also the lazy memory's unit tests' and
/// the VMM's placement test's).
pub struct AnonMap {
    pub host: u64,
    len: usize,
}

impl AnonMap {
    pub fn new(pages: usize) -> Option<AnonMap> {
        let len = pages * PAGE_SIZE;
        // SAFETY: a fresh anonymous mapping, unmapped on drop.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        (p != libc::MAP_FAILED).then_some(AnonMap {
            host: p as u64,
            len,
        })
    }
}

impl Drop for AnonMap {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`.
        unsafe { libc::munmap(self.host as *mut _, self.len) };
    }
}

/// A memfd mapped twice, the second the alias, as prefaulted RAM is; unmapped on drop
/// (also the lazy memory's unit tests'). Its pages exist once something writes them.
pub struct SharedMap {
    pub host: u64,
    pub alias: u64,
    len: usize,
}

impl SharedMap {
    pub fn new(pages: usize) -> Option<SharedMap> {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        let len = pages * PAGE_SIZE;
        // SAFETY: a NUL-terminated name.
        let fd = unsafe { libc::memfd_create(c"shared".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return None;
        }
        // SAFETY: a new descriptor, ours alone; closed when this drops (the mappings
        // keep the file).
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: `fd` is ours.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len as i64) } != 0 {
            return None;
        }
        let map = || {
            // SAFETY: a new shared mapping of the file, unmapped on drop.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    fd.as_raw_fd(),
                    0,
                )
            };
            (p != libc::MAP_FAILED).then_some(p as u64)
        };
        let host = map()?;
        let Some(alias) = map() else {
            // SAFETY: the mapping made just above.
            unsafe { libc::munmap(host as *mut libc::c_void, len) };
            return None;
        };
        Some(SharedMap { host, alias, len })
    }
}

impl Drop for SharedMap {
    fn drop(&mut self) {
        // SAFETY: the mappings made in `new`.
        unsafe {
            libc::munmap(self.host as *mut libc::c_void, self.len);
            libc::munmap(self.alias as *mut libc::c_void, self.len);
        }
    }
}

/// Page data from the fuzzer's bytes, as a stream hands it over; it checks out or not
/// as they say.
struct Stream<'a> {
    data: &'a [u8],
    whole: bool,
}

impl super::PageSource for Stream<'_> {
    fn fill(&mut self, pages: &mut vm_memory::VolatileSlice<'_>) -> std::io::Result<()> {
        let n = pages.len().min(self.data.len());
        pages.copy_from(&self.data[..n]);
        self.data = &self.data[n..];
        if n < pages.len() {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(())
    }

    fn verify(&mut self) -> std::io::Result<()> {
        if !self.whole {
            return Err(std::io::Error::other("bad CRC"));
        }
        Ok(())
    }
}

/// `PAGES` pages, at `BASE` in their space; whether the mapping can be held past a
/// borrow (`Memory::mapping`), as RAM's can.
struct Mem(std::sync::Arc<AnonMap>, bool);

impl Mem {
    fn new() -> Option<Mem> {
        AnonMap::new(PAGES as usize).map(|a| Mem(std::sync::Arc::new(a), true))
    }

    fn at(&self, addr: u64, len: usize) -> Option<*mut u8> {
        let off = addr.checked_sub(BASE)?;
        (off.checked_add(len as u64)? <= PAGES * PAGE_SIZE as u64)
            .then(|| (self.0.host + off) as *mut u8)
    }
}

impl Memory for Mem {
    fn what(&self) -> &'static str {
        "fuzzed memory"
    }
    fn base(&self, _region: usize) -> u64 {
        BASE
    }
    fn read_page(&self, _region: usize, page: u64, buf: &mut [u8]) -> Result<()> {
        self.read_at(BASE + page * PAGE_SIZE as u64, buf)
    }
    fn populated(&self) -> Vec<Bitmap> {
        vec![crate::pagemap::all(PAGES)]
    }
    fn start_tracking(&self) -> Result<()> {
        Ok(())
    }
    fn stop_tracking(&self) {}
    fn take(&self, _last: bool) -> Result<(Vec<Bitmap>, BTreeMap<String, u64>)> {
        Ok((vec![vec![0; PAGES as usize / 64]], BTreeMap::new()))
    }
    fn peek_dirty(&self) -> Result<Option<Written>> {
        Ok(None)
    }
    fn contains(&self, addr: u64, pages: u64) -> bool {
        pages
            .checked_mul(PAGE_SIZE as u64)
            .is_some_and(|l| self.at(addr, l as usize).is_some())
    }
    fn read_at(&self, addr: u64, buf: &mut [u8]) -> Result<()> {
        let p = self
            .at(addr, buf.len())
            .ok_or_else(|| super::ComponentError::Refused("outside".into()))?;
        // SAFETY: [p, p + len) lies inside the mapping (checked by `at`).
        unsafe { std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }
    fn write_at(&self, addr: u64, data: &[u8]) -> Result<()> {
        let p = self
            .at(addr, data.len())
            .ok_or_else(|| super::ComponentError::Refused("outside".into()))?;
        // SAFETY: as in read_at.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
        Ok(())
    }
    fn pages_slice(&self, addr: u64, pages: usize) -> Option<vm_memory::VolatileSlice<'_>> {
        let len = pages.checked_mul(PAGE_SIZE)?;
        let p = self.at(addr, len)?;
        // SAFETY: [p, p + len) lies inside the mapping (checked by `at`), which lives
        // as long as `self`.
        Some(unsafe { vm_memory::VolatileSlice::new(p, len) })
    }
    fn mapping(&self) -> Option<super::Kept> {
        self.1.then(|| self.0.clone() as super::Kept)
    }
    fn host_regions(&self) -> Option<Vec<HostRegion>> {
        Some(vec![HostRegion {
            host: self.0.host,
            len: PAGES * PAGE_SIZE as u64,
            base: BASE,
            alias: None,
        }])
    }
}

/// Counts what a source sends.
#[derive(Default)]
struct Count {
    buf: Vec<u8>,
    pages: u64,
}

impl Sink for Count {
    fn slot(&mut self, _addr: u64) -> &mut [u8] {
        self.buf.resize(PAGE_SIZE, 0);
        &mut self.buf
    }
    fn page(&mut self) -> std::io::Result<()> {
        self.pages += 1;
        Ok(())
    }
    fn zero(&mut self) -> std::io::Result<()> {
        self.pages += 1;
        Ok(())
    }
    fn data(&mut self, _bytes: &[u8]) -> std::io::Result<()> {
        Ok(())
    }
}

fn words(b: &[u8]) -> impl Iterator<Item = u64> + '_ {
    b.chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
}

/// What the GPU engine asks before each step in post-copy: whether a range is all here.
/// For any range (around the memory, across it, to the top of the address space) the
/// answer is what the missing pages say; once abandoned, nothing waits, so it is yes.
fn says_what_is_here(lazy: &Lazy, words_from: &[u8], abandoned: bool) {
    let gone = lazy.missing();
    let page = PAGE_SIZE as u64;
    for w in words(words_from).take(32) {
        let at = (BASE - 2 * page).wrapping_add(w & 0xf_ffff);
        let len = match w >> 62 {
            3 => u64::MAX,
            _ => (w >> 20) & 0x1f_ffff,
        };
        let end = at.saturating_add(len);
        let lacks = len > 0
            && (0..PAGES).any(|p| {
                let a = BASE + p * page;
                a < end && at < a + page && gone[0][(p / 64) as usize] >> (p % 64) & 1 == 1
            });
        assert_eq!(
            lazy.here(at, len),
            abandoned || !lacks,
            "here({at:#x}, {len:#x}), abandoned {abandoned}"
        );
    }
}

/// Hostile page traffic for both sides of post-copy; never panics or touches memory
/// outside the mapping.
#[doc(hidden)]
pub fn fuzz_postcopy(bytes: &[u8]) {
    let Some(m) = Mem::new() else { return };
    let (head, rest) = bytes.split_at(bytes.len().min(40));
    // The source: requests for any address, then a recovery's account.
    let mut src = MemoryState::default();
    src.state = MigState::StopCopy;
    if let Ok(Some(_)) = src.postcopy_switch(&m) {
        let addrs: Vec<u64> = words(rest).take(128).collect();
        // The background between requests, read outside the lock as the pusher does.
        for (k, a) in addrs.chunks(16).enumerate() {
            let _ = src.read_requested(&m, &mut Count::default(), a);
            if let Ok(Some(t)) = src.take_postcopy(&m, 1 + k as u64 * 7) {
                let _ = super::paged::send_taken(&m, &mut Count::default(), &t);
            }
        }
        let account: Bitmap = words(head).collect();
        let _ = src.postcopy_resume(&m, vec![account]);
        let _ = src.read(&m, &mut Count::default(), PAGES);
    }
    // The destination: a bitmap of missing pages, then pages and zero runs.
    let missing: Bitmap = words(head).take(PAGES as usize / 64).collect();
    let Ok(lazy) = Lazy::new(
        "fuzzed memory",
        m.host_regions().unwrap_or_default(),
        vec![missing],
        false,
    ) else {
        return;
    };
    // The VM ends at some point (or never): from then on nothing is placed.
    let end_at = head.first().map_or(usize::MAX, |&b| b as usize);
    let mut left_at_end = None;
    let page = [0x5au8; PAGE_SIZE];
    for (k, w) in words(rest).enumerate().take(256) {
        if k == end_at {
            lazy.abandon();
            left_at_end = Some(lazy.left());
        }
        if k % 3 == 0 {
            let n = (w >> 48) as u32 & 0xff;
            let _ = lazy.zero(&[(w & 0xffff_ffff_ffff, n)]);
        } else {
            let _ = lazy.place(&[w], &page);
        }
    }
    let _ = lazy.take(&mut super::Wanted::default());
    let _ = (lazy.left(), lazy.missing(), lazy.stats());
    if let Some(left) = left_at_end {
        assert_eq!(lazy.left(), left, "pages placed after the end");
    }
    says_what_is_here(&lazy, rest, left_at_end.is_some());
    // The same into shared memory, pages read from a stream through its alias: frames
    // of up to 4 pages for any addresses, some of which fail their check or end short.
    let Some(shared) = SharedMap::new(PAGES as usize) else {
        return;
    };
    let region = HostRegion {
        host: shared.host,
        len: PAGES * PAGE_SIZE as u64,
        base: BASE,
        alias: Some(shared.alias),
    };
    let missing: Bitmap = words(head).take(PAGES as usize / 64).collect();
    let Ok(lazy) = Lazy::new("fuzzed shared memory", vec![region], vec![missing], false) else {
        return;
    };
    let data = [0xa5u8; 4 * PAGE_SIZE];
    let mut left_at_end = None;
    for (k, w) in words(rest).enumerate().take(256) {
        if k == end_at {
            lazy.abandon();
            left_at_end = Some(lazy.left());
        }
        let n = 1 + (w >> 62) as usize;
        let addrs: Vec<u64> = (0..n as u64)
            .map(|j| (w & 0xffff_ffff_ffff).wrapping_add(j * PAGE_SIZE as u64))
            .collect();
        let short = (w >> 56) as usize & 0x3;
        let mut src = Stream {
            data: &data[..n * PAGE_SIZE - short * 100],
            whole: k % 5 != 0,
        };
        let _ = lazy.place_from(&addrs, &mut src);
    }
    let _ = lazy.take(&mut super::Wanted::default());
    let _ = (lazy.left(), lazy.missing(), lazy.stats());
    if let Some(left) = left_at_end {
        assert_eq!(lazy.left(), left, "pages read in after the end");
    }
    says_what_is_here(&lazy, rest, left_at_end.is_some());
}

#[cfg(test)]
mod tests {
    use super::super::held_sink::{drain, HeldSink};
    use super::*;

    /// Whether the page at `host` holds memory (mincore).
    fn resident(host: u64) -> bool {
        let mut v = [0u8; 1];
        // SAFETY: `host` is a page of a live mapping; mincore only writes `v`.
        let rc = unsafe { libc::mincore(host as *mut libc::c_void, PAGE_SIZE, v.as_mut_ptr()) };
        assert_eq!(rc, 0);
        v[0] & 1 == 1
    }

    /// A page in the mapping when it goes missing is a stale copy: it is dropped, so a
    /// touch fetches the page rather than read the old one. Whether it came with a
    /// pre-copy round into a fresh memory or was written by the memory's owner (a
    /// booted VM's image), which a memory that is not said to be fresh may hold.
    #[test]
    fn a_page_held_when_it_goes_missing_is_dropped() {
        let mut missing = vec![0u64; PAGES as usize / 64];
        missing[0] = 0b11;
        // Taken during pre-copy.
        let m = Mem::new().unwrap();
        let mut dst = MemoryState::fresh();
        dst.state = MigState::Resuming;
        dst.load_pages(&m, &[BASE + PAGE_SIZE as u64], &[0x11; PAGE_SIZE])
            .unwrap();
        dst.state = MigState::Stop;
        let page = m.0.host + PAGE_SIZE as u64;
        assert!(resident(page));
        let lazy = dst.postcopy_expect(&m, vec![missing.clone()]).unwrap();
        assert!(!resident(page), "the stale copy is still there");
        assert_eq!(lazy.left(), 2);
        // Written by its owner.
        let m = Mem::new().unwrap();
        m.write_at(BASE, &[0x22; PAGE_SIZE]).unwrap();
        let mut dst = MemoryState::default();
        dst.state = MigState::Stop;
        assert!(resident(m.0.host));
        dst.postcopy_expect(&m, vec![missing]).unwrap();
        assert!(!resident(m.0.host), "the owner's copy is still there");
    }

    /// A post-copy source takes what is left a frame at a time, in order and from where
    /// the last request moved it, outside the component's lock: every page goes once,
    /// whether asked for or in the background. A request with an address outside the
    /// memory takes only the pages before it.
    #[test]
    fn a_postcopy_source_takes_each_page_once_in_order() {
        let m = Mem::new().unwrap();
        m.write_at(BASE + 3 * PAGE_SIZE as u64, &[0x33; PAGE_SIZE])
            .unwrap();
        let mut src = MemoryState::default();
        src.state = MigState::Stop;
        src.arc(&m, MigState::StopCopy).unwrap();
        src.state = MigState::StopCopy;
        // Not switched yet: pre-copy's final pass reads under the lock, as before.
        assert_eq!(src.take_postcopy(&m, 64).unwrap(), None);
        src.postcopy_switch(&m).unwrap().unwrap();
        let addrs = |t: &[super::super::paged::Taken]| -> Vec<u64> {
            t.iter()
                .map(|t| (t.addr - BASE) / PAGE_SIZE as u64)
                .collect()
        };
        let first = src.take_postcopy(&m, 10).unwrap().unwrap();
        assert_eq!(addrs(&first), (0..10).collect::<Vec<_>>());
        let mut out = Count::default();
        let r = super::super::paged::send_taken(&m, &mut out, &first).unwrap();
        // Page 3 holds data, the rest are zero (said as such).
        assert_eq!((r.pages, r.zero_sent, out.pages), (1, 9, 10));
        let (asked, checked) = src.take_requested(&m, &[BASE + 40 * 4096]).unwrap();
        checked.unwrap();
        assert_eq!(addrs(&asked), [40]);
        // On from the request's word, without the page it took.
        let next = src.take_postcopy(&m, 64).unwrap().unwrap();
        let want: Vec<u64> = (10..40).chain(41..75).collect();
        assert_eq!(addrs(&next), want);
        let (partly, checked) = src
            .take_requested(&m, &[BASE + 200 * 4096, BASE - 4096, BASE + 201 * 4096])
            .unwrap();
        assert!(checked.is_err());
        assert_eq!(addrs(&partly), [200]);
        let mut seen: Vec<u64> = [first, asked, next, partly]
            .iter()
            .flat_map(|t| addrs(t))
            .collect();
        while let Some(t) = src.take_postcopy(&m, 64).unwrap() {
            if t.is_empty() {
                break;
            }
            assert!(t.len() <= 64);
            seen.extend(addrs(&t));
        }
        seen.sort();
        assert_eq!(
            seen,
            (0..PAGES).collect::<Vec<_>>(),
            "a page twice or never"
        );
        assert_eq!(src.info().unwrap().total(), 0);
    }

    /// A post-copy source's background goes from memory, with no copy: each page that
    /// holds data is handed over where it is, with what keeps its mapping, and read
    /// after `send_taken` returns; zero pages are said as such. A memory whose mapping
    /// cannot be held is copied.
    #[test]
    fn a_postcopy_source_hands_its_pages_over_in_place_with_their_mapping() {
        let m = Mem::new().unwrap();
        for p in [3u64, 5, 70] {
            m.write_at(BASE + p * PAGE_SIZE as u64, &[p as u8; PAGE_SIZE])
                .unwrap();
        }
        let (r, out) = drain(&m, 100);
        assert_eq!((r.pages, r.zero_sent, out.copied), (3, PAGES - 3, 0));
        assert_eq!(out.zeros.len() as u64, PAGES - 3);
        let page = |a: u64| (a - BASE) / PAGE_SIZE as u64;
        let held: Vec<u64> = out.held.iter().map(|h| page(h.0)).collect();
        assert_eq!(held, [3, 5, 70]);
        // The sender's borrows are over; the memory stays mapped for whoever holds a
        // page of it, even once its owner lets go.
        drop(m);
        for (a, ptr, kept) in &out.held {
            assert!(kept.downcast_ref::<AnonMap>().is_some());
            // SAFETY: a page of the mapping that `kept` keeps mapped.
            let b = unsafe { std::slice::from_raw_parts(*ptr as *const u8, PAGE_SIZE) };
            assert!(b.iter().all(|&x| x == page(*a) as u8));
        }
        // Memory that cannot be held goes through the sink's buffer.
        let mut m = Mem::new().unwrap();
        m.1 = false;
        m.write_at(BASE, &[9; PAGE_SIZE]).unwrap();
        let mut src = MemoryState::default();
        src.state = MigState::Stop;
        src.arc(&m, MigState::StopCopy).unwrap();
        src.state = MigState::StopCopy;
        src.postcopy_switch(&m).unwrap().unwrap();
        let t = src.take_postcopy(&m, 8).unwrap().unwrap();
        let mut out = HeldSink::default();
        let r = super::super::paged::send_taken(&m, &mut out, &t).unwrap();
        assert_eq!((r.pages, out.copied, out.held.len()), (1, 1, 0));
    }

    #[test]
    fn hostile_traffic_is_taken_without_harm() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut cases: Vec<Vec<u8>> = vec![vec![], vec![0xff; 4096], vec![0; 4096]];
        for n in [8usize, 40, 41, 100, 2000, 9000] {
            cases.push(
                (0..n)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x as u8
                    })
                    .collect(),
            );
        }
        // Requests and pages for real addresses too.
        let mut real = vec![0xffu8; 40];
        for p in 0..64u64 {
            real.extend_from_slice(&(super::BASE + p * 4096).to_le_bytes());
        }
        // The same, the VM ending after its tenth operation.
        let mut ended = real.clone();
        ended[0] = 10;
        cases.push(real);
        cases.push(ended);
        for c in cases {
            super::fuzz_postcopy(&c);
        }
    }
}
