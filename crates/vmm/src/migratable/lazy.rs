//! Post-copy on the destination: memory the VM runs on before all of it has arrived.
//! The pages still at the source are *missing* here (never sent, or dropped because
//! they changed there after they were sent); userfaultfd stops whoever touches one (a
//! vCPU inside KVM, the GPU engine, a device model) until the page is placed, whole and
//! at once, by UFFDIO_COPY. Pages the source never had are zero and are filled here
//! without asking. Placing is idempotent: an answer and the background copy of the same
//! page may both arrive, and the second is dropped.
//!
//! Memory that has an alias (shared, prefaulted: `memory::SharedRam`) holds its pages
//! already; the guest's mapping only does not map the missing ones. A touch of one is a
//! *minor* fault; a page is placed by writing it through the alias, which the guest
//! cannot see, and mapping it with UFFDIO_CONTINUE, which wakes whoever waits.

use super::paged::{Bitmap, PAGE_SIZE};
use super::{ComponentError, Faults, Result, Wanted};
use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Instant;
use userfaultfd::{Event, EventBuffer, RegisterMode, Uffd};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

mod access;
mod stats;
pub use access::postcopy_support;
pub use stats::{FaultStats, Latency};

/// Where a component that is filled lazily puts its `Lazy`, for another that must
/// reach the same memory ahead of a touch (the GPU engine reads guest RAM by DMA).
pub type Shared = std::sync::Arc<Mutex<Option<std::sync::Arc<Lazy>>>>;

/// One region of a memory as the host maps it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostRegion {
    /// Host virtual address of its first byte.
    pub host: u64,
    pub len: u64,
    /// Address of its first byte in the component's space.
    pub base: u64,
    /// Host virtual address of the same pages in a second, shared mapping outside
    /// userfaultfd (see the module's note), if the memory has one.
    pub alias: Option<u64>,
}

struct Inner {
    /// Pages still at the source.
    missing: Vec<Bitmap>,
    /// Pages asked for and not yet placed: when, and whether ahead of a touch.
    asked: HashMap<u64, (Instant, bool)>,
    /// Pages asked for ahead of a touch, not yet sent to the source.
    queued: Vec<u64>,
    left: u64,
    stats: FaultStats,
    latencies: Vec<f64>,
    registered: bool,
    /// The missing pages will never come (`abandon`): nothing is placed any more.
    abandoned: bool,
    /// Runs (region, first page, count) taken off `missing` whose copy is under way
    /// outside the lock: a touch of one waits for that copy, which wakes it.
    flying: Vec<(usize, u64, u64)>,
    /// The last touch asked for (region, page), and how many pages after it were
    /// asked for with it (`read_ahead`).
    last_touch: Option<(usize, u64)>,
    window: u64,
}

impl Inner {
    /// Whether page `p` of region `r` is still at the source.
    fn lacks(&self, r: usize, p: u64) -> bool {
        self.missing[r][(p / 64) as usize] & (1 << (p % 64)) != 0
    }

    /// Whether page `p` of region `r` is being placed (taken off `missing`, not yet in).
    fn flies(&self, r: usize, p: u64) -> bool {
        self.flying
            .iter()
            .any(|&(fr, fp, n)| fr == r && (fp..fp + n).contains(&p))
    }
}

/// Pages asked for after a touch that follows the last one in a row: at first, and
/// at most (16 pages is a 64 KiB answer, still a few tens of microseconds on the wire).
const READ_AHEAD_MIN: u64 = 4;
const READ_AHEAD_MAX: u64 = 16;

pub struct Lazy {
    uffd: Uffd,
    what: &'static str,
    regions: Vec<HostRegion>,
    inner: Mutex<Inner>,
    /// Readable when pages were asked for ahead of a touch (`fetch`).
    wake: EventFd,
    /// Notified whenever pages are placed.
    placed: Condvar,
    /// Keeps the aliases mapped while this places pages through them.
    _keep: Option<std::sync::Arc<dyn std::any::Any + Send + Sync>>,
    /// Made fresh: a page not yet placed holds zeros (behind an alias, in the file).
    fresh: bool,
    /// Run on a thread of its own once every page is here (`Memory::retire`).
    retired: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

fn refused(m: String) -> ComponentError {
    ComponentError::Refused(m)
}

fn uffd_err(what: &str, e: userfaultfd::Error) -> ComponentError {
    ComponentError::Io(std::io::Error::other(format!("userfaultfd {what}: {e}")))
}

/// Whether a uffd copy or zero-fill failed only because the page is there already.
fn exists(e: &userfaultfd::Error) -> bool {
    errno(e) == Some(libc::EEXIST)
}

fn errno(e: &userfaultfd::Error) -> Option<i32> {
    match e {
        userfaultfd::Error::CopyFailed(n)
        | userfaultfd::Error::ZeropageFailed(n)
        | userfaultfd::Error::SystemError(n) => Some(*n as i32),
        _ => None,
    }
}

impl Lazy {
    /// Makes the pages `missing` names (one bitmap per region, checked as hostile
    /// input) missing in `regions` and starts catching touches of them. `fresh`: the
    /// mapping holds no page yet (nothing ever wrote or read it), so there is no stale
    /// copy to drop.
    pub fn new(
        what: &'static str,
        regions: Vec<HostRegion>,
        missing: Vec<Bitmap>,
        fresh: bool,
    ) -> Result<Lazy> {
        if missing.len() != regions.len() {
            return Err(refused(format!(
                "{what}: post-copy names {} regions, this memory has {}",
                missing.len(),
                regions.len()
            )));
        }
        let mut left = 0;
        for (r, b) in regions.iter().zip(&missing) {
            let pages = r.len / PAGE_SIZE as u64;
            if b.len() as u64 != pages.div_ceil(64) {
                return Err(refused(format!(
                    "{what}: a post-copy bitmap of {} words for a region of {pages} pages",
                    b.len()
                )));
            }
            if let Some(last) = b.last() {
                let tail = pages % 64;
                if tail != 0 && last >> tail != 0 {
                    return Err(refused(format!(
                        "{what}: post-copy names pages past a region's end"
                    )));
                }
            }
            left += b.iter().map(|w| w.count_ones() as u64).sum::<u64>();
        }
        let uffd = access::open().map_err(|why| ComponentError::Io(std::io::Error::other(why)))?;
        let mut dropped = 0;
        for (r, b) in regions.iter().zip(&missing) {
            // Pages that changed at the source since they were sent: the copy here is
            // stale. Dropped, they read as missing once the range is registered (with
            // an alias, only the guest's page-table entries go: a touch then is a
            // minor fault). A fresh mapping has none.
            for (first, n) in if fresh { Vec::new() } else { runs(b) } {
                dropped += n;
                let at = r.host + first * PAGE_SIZE as u64;
                // SAFETY: [at, at + n pages) lies inside this memory's mapping (the
                // bitmap was checked against the region's size above); dropping the
                // pages of a private anonymous mapping only discards their content,
                // which is stale by design (of a shared one, only unmaps them), and
                // the VM does not run yet.
                let rc = unsafe {
                    libc::madvise(
                        at as *mut libc::c_void,
                        (n * PAGE_SIZE as u64) as usize,
                        libc::MADV_DONTNEED,
                    )
                };
                if rc != 0 {
                    return Err(ComponentError::Io(std::io::Error::last_os_error()));
                }
            }
            // Missing as well as minor faults on an alias's memory: a page of the file
            // that does not exist (never expected of prefaulted memory) is then caught
            // too rather than allocated as zeros behind this memory's back.
            let mode = match r.alias {
                Some(_) => RegisterMode::MISSING | RegisterMode::MINOR,
                None => RegisterMode::MISSING,
            };
            uffd.register_with_mode(r.host as *mut libc::c_void, r.len as usize, mode)
                .map_err(|e| uffd_err("register", e))?;
        }
        let stats = FaultStats {
            missing_at_start: left,
            dropped_at_start: dropped,
            ..Default::default()
        };
        let lazy = Lazy {
            uffd,
            what,
            regions,
            wake: EventFd::new(EFD_NONBLOCK).map_err(ComponentError::Io)?,
            placed: Condvar::new(),
            _keep: None,
            fresh,
            retired: Mutex::new(None),
            inner: Mutex::new(Inner {
                missing,
                asked: HashMap::new(),
                queued: Vec::new(),
                left,
                stats,
                latencies: Vec::new(),
                registered: true,
                abandoned: false,
                flying: Vec::new(),
                last_touch: None,
                window: 0,
            }),
        };
        if left == 0 {
            lazy.finish(&mut lazy.lock());
        }
        Ok(lazy)
    }

    /// Holds `owner` (what maps the aliases) for as long as this lives.
    pub fn keeping(
        mut self,
        owner: Option<std::sync::Arc<dyn std::any::Any + Send + Sync>>,
    ) -> Lazy {
        self._keep = owner;
        self
    }

    /// Runs `old` once every page is here, not before.
    pub fn retiring(self, old: Option<Box<dyn FnOnce() + Send>>) -> Lazy {
        *self.retired.lock().unwrap_or_else(|e| e.into_inner()) = old;
        if !self.lock().registered {
            self.retire();
        }
        self
    }

    /// Runs what was retired, on a thread of its own: nobody waits for it.
    fn retire(&self) {
        let old = self
            .retired
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(old) = old {
            let _ = std::thread::Builder::new().name("retire".into()).spawn(old);
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// (region, page) of the page at `addr` in the component's space.
    fn locate(&self, addr: u64) -> Option<(usize, u64)> {
        if !addr.is_multiple_of(PAGE_SIZE as u64) {
            return None;
        }
        self.regions.iter().enumerate().find_map(|(i, r)| {
            (addr >= r.base && addr - r.base < r.len)
                .then(|| (i, (addr - r.base) / PAGE_SIZE as u64))
        })
    }

    fn host(&self, region: usize, page: u64) -> *mut libc::c_void {
        (self.regions[region].host + page * PAGE_SIZE as u64) as *mut libc::c_void
    }

    /// Writes `data` (whole pages; None: zeros) at page `p` of region `r` through its
    /// alias and maps the pages for the guest. Only for pages missing until the caller
    /// took them: the guest cannot see them, so nothing reads a page half written.
    fn through_alias(
        &self,
        alias: u64,
        r: usize,
        p: u64,
        n: usize,
        data: Option<&[u8]>,
    ) -> Result<()> {
        let at = (alias + p * PAGE_SIZE as u64) as *mut u8;
        // SAFETY: `n` pages of this region's alias, a shared mapping that `_keep` keeps
        // mapped (the caller located each page inside the region); no other thread
        // writes them (they were taken off `missing` under the lock), and the guest
        // does not map them until the UFFDIO_CONTINUE below.
        unsafe {
            match data {
                Some(d) => std::ptr::copy_nonoverlapping(d.as_ptr(), at, n * PAGE_SIZE),
                None => std::ptr::write_bytes(at, 0, n * PAGE_SIZE),
            }
        }
        self.map_run(r, p, n as u64)
    }

    /// Maps `n` pages (present in the file) at page `p` of region `r` for the guest
    /// and wakes whoever waits on them; a page mapped already is left as it is.
    fn map_run(&self, r: usize, p: u64, n: u64) -> Result<()> {
        let len = n as usize * PAGE_SIZE;
        if let Ok(m) = self.uffd.r#continue(self.host(r, p), len, true) {
            if m as usize == len {
                return Ok(());
            }
        }
        // Part of the run was mapped already, or the kernel stopped short.
        for j in 0..n {
            if let Err(e) = self.uffd.r#continue(self.host(r, p + j), PAGE_SIZE, true) {
                if !exists(&e) {
                    return Err(uffd_err("continue", e));
                }
            }
        }
        Ok(())
    }

    /// A touch of (region `r`, page `p`) is asked for: when it follows the last one
    /// in a row (the next page, or just past the pages asked for with it), the pages
    /// after it come with it, twice as many each time up to `READ_AHEAD_MAX`. A guest
    /// that writes through memory touched a page at a time, each a round trip, while
    /// the background stream's pre-paging was still behind the frames already in
    /// flight.
    fn read_ahead(&self, i: &mut Inner, r: usize, p: u64, after: &mut Vec<u64>) {
        let in_a_row =
            matches!(i.last_touch, Some((lr, lp)) if lr == r && p > lp && p <= lp + i.window + 1);
        i.window = if in_a_row {
            (i.window * 2).clamp(READ_AHEAD_MIN, READ_AHEAD_MAX)
        } else {
            0
        };
        i.last_touch = Some((r, p));
        let reg = self.regions[r];
        let pages = reg.len / PAGE_SIZE as u64;
        for q in p + 1..(p + 1 + i.window).min(pages) {
            if !i.lacks(r, q) {
                continue;
            }
            let a = reg.base + q * PAGE_SIZE as u64;
            if let std::collections::hash_map::Entry::Vacant(e) = i.asked.entry(a) {
                e.insert((Instant::now(), true));
                i.stats.fetched_ahead += 1;
                after.push(a);
            }
        }
    }

    /// Every page is here: nothing faults any more.
    fn finish(&self, i: &mut Inner) {
        if std::mem::take(&mut i.registered) {
            for r in &self.regions {
                let _ = self
                    .uffd
                    .unregister(r.host as *mut libc::c_void, r.len as usize);
            }
            i.stats.fault_latency = Latency::of(std::mem::take(&mut i.latencies));
            self.retire();
            // Whoever watches the touches (and says DONE once every page is here)
            // hears it now, not at its next timeout (100 ms at the end of every
            // post-copy window).
            let _ = self.wake.write(1);
        }
    }

    /// Takes a page that was missing and counts it in; false if it was already here.
    fn arrived(&self, i: &mut Inner, region: usize, page: u64, addr: u64) -> bool {
        if !self.claim(i, region, page) {
            return false;
        }
        self.count_in(i, addr);
        true
    }

    /// Takes a page off `missing`; false if it was not missing.
    fn claim(&self, i: &mut Inner, region: usize, page: u64) -> bool {
        let w = &mut i.missing[region][(page / 64) as usize];
        let bit = 1u64 << (page % 64);
        if *w & bit == 0 {
            i.stats.duplicates += 1;
            return false;
        }
        *w &= !bit;
        i.left -= 1;
        true
    }

    /// A page taken off `missing` is in: a request for it is answered.
    fn count_in(&self, i: &mut Inner, addr: u64) {
        match i.asked.remove(&addr) {
            Some((t, false)) => i.latencies.push(t.elapsed().as_secs_f64() * 1e6),
            Some((_, true)) => {}
            None => i.stats.prepaged += 1,
        }
    }

    /// Pages from the source: `data` holds one page per address. All are checked
    /// before any is placed.
    pub fn place(&self, addrs: &[u64], data: &[u8]) -> Result<()> {
        if data.len() != addrs.len() * PAGE_SIZE {
            return Err(refused("page data does not match its addresses".into()));
        }
        let at = self.locate_all(addrs)?;
        let runs = self.take_missing(&at, addrs, true);
        let copied = runs.iter().try_for_each(|&x| self.copy_run(x, data));
        self.landed(runs.iter().map(|&(r, p, _, n)| (r, p, n as u64)));
        self.unless_abandoned(copied)
    }

    /// A placement that failed because the memory was abandoned meanwhile (it is no
    /// longer registered) is no failure: the VM ends, and the page was not needed.
    fn unless_abandoned(&self, r: Result<()>) -> Result<()> {
        match r {
            Err(_) if self.lock().abandoned => Ok(()),
            r => r,
        }
    }

    /// See `Faults::abandon`. Unregistering wakes whoever waits on a missing page: its
    /// touch then maps what the memory holds there (zeros, or a page placed in part).
    /// A kick alone does not free a vCPU: under PVM one whose guest page table is
    /// missing was seen to spin in the host's shadow-paging walk with the kick
    /// pending, the walk's read of the table failing at once and being retried.
    pub fn abandon(&self) {
        let mut i = self.lock();
        i.abandoned = true;
        if std::mem::take(&mut i.registered) {
            for r in &self.regions {
                let _ = self
                    .uffd
                    .unregister(r.host as *mut libc::c_void, r.len as usize);
            }
        }
        drop(i);
        // Those waiting in `fetch` (the GPU engine) go on too.
        self.placed.notify_all();
        let _ = self.wake.write(1);
    }

    /// (region, page) of each of `addrs`, all checked: one outside refuses them all.
    fn locate_all(&self, addrs: &[u64]) -> Result<Vec<(usize, u64)>> {
        addrs
            .iter()
            .map(|&a| {
                self.locate(a)
                    .ok_or_else(|| refused(format!("page {a:#x} is not inside {}", self.what)))
            })
            .collect()
    }

    /// Takes the pages of `addrs` (a frame's, at `at`) that are missing, for the caller
    /// to place and then hand to `landed`: runs (region, first page, index of that page
    /// in `addrs`, count) of pages next to each other here and in the frame. One
    /// UFFDIO_COPY or UFFDIO_CONTINUE each: a page at a time costs a system call and a
    /// wake-up each. They are taken under the lock and placed outside it: a touch
    /// answered meanwhile does not wait for a large placement (fresh host memory can
    /// take a millisecond per frame to fault in). `count`: counted in now (else by the
    /// caller once they are placed, `count_in`).
    fn take_missing(
        &self,
        at: &[(usize, u64)],
        addrs: &[u64],
        count: bool,
    ) -> Vec<(usize, u64, usize, usize)> {
        let mut runs: Vec<(usize, u64, usize, usize)> = Vec::new();
        let mut i = self.lock();
        if i.abandoned {
            return runs;
        }
        for (k, (&(r, p), &a)) in at.iter().zip(addrs).enumerate() {
            let taken = if count {
                self.arrived(&mut i, r, p, a)
            } else {
                self.claim(&mut i, r, p)
            };
            if !taken {
                continue;
            }
            match runs.last_mut() {
                Some((rr, p0, k0, n)) if *rr == r && *p0 + *n as u64 == p && *k0 + *n == k => {
                    *n += 1
                }
                _ => runs.push((r, p, k, 1)),
            }
        }
        i.flying
            .extend(runs.iter().map(|&(r, p, _, n)| (r, p, n as u64)));
        runs
    }

    /// Runs taken by `place` or `zero` are in place (or failed): the memory is whole
    /// once none is missing or flying.
    fn landed(&self, runs: impl Iterator<Item = (usize, u64, u64)>) {
        let mut i = self.lock();
        for x in runs {
            if let Some(k) = i.flying.iter().position(|&f| f == x) {
                i.flying.swap_remove(k);
            }
        }
        if i.left == 0 && i.flying.is_empty() {
            self.finish(&mut i);
        }
        self.placed.notify_all();
    }

    /// Places `n` pages at page `p` of region `r` from `data`'s pages from `k` on.
    fn copy_run(&self, (r, p, k, n): (usize, u64, usize, usize), data: &[u8]) -> Result<()> {
        let src = &data[k * PAGE_SIZE..(k + n) * PAGE_SIZE];
        if let Some(alias) = self.regions[r].alias {
            return self.through_alias(alias, r, p, n, Some(src));
        }
        // SAFETY: the destination is `n` pages inside this memory's mapping (each
        // located by the caller) and registered with this userfaultfd; the source is
        // `n` pages of `data`. UFFDIO_COPY fills missing pages whole and wakes whoever
        // waits on them.
        let rc = unsafe {
            self.uffd
                .copy(src.as_ptr() as *const _, self.host(r, p), src.len(), true)
        };
        if rc.is_ok() {
            return Ok(());
        }
        // Part of the run was there already (filled by a touch meanwhile) or the copy
        // stopped short: page by page, a page that is there is left as it is.
        for (j, page) in src.chunks_exact(PAGE_SIZE).enumerate() {
            // SAFETY: as above, one page of the run.
            let rc = unsafe {
                self.uffd.copy(
                    page.as_ptr() as *const _,
                    self.host(r, p + j as u64),
                    PAGE_SIZE,
                    true,
                )
            };
            if let Err(e) = rc {
                if !exists(&e) {
                    return Err(uffd_err("copy", e));
                }
            }
        }
        Ok(())
    }

    /// Fills `n` pages at page `p` of region `r` with zeros.
    fn zero_run(&self, (r, p, n): (usize, u64, u64)) -> Result<()> {
        if let Some(alias) = self.regions[r].alias {
            if self.fresh {
                // The file holds zeros there already. Mapping every zero page of a
                // mostly idle memory cost 25 ms per GiB here; left unmapped, a first
                // touch maps it (`map_unsent`), and one that waits for it now is only
                // woken to touch again.
                let _ = self.uffd.wake(self.host(r, p), n as usize * PAGE_SIZE);
                return Ok(());
            }
            return self.through_alias(alias, r, p, n as usize, None);
        }
        // SAFETY: `n` pages inside this memory's registered mapping (each located by the
        // caller).
        let rc = unsafe {
            self.uffd
                .zeropage(self.host(r, p), n as usize * PAGE_SIZE, true)
        };
        if rc.is_ok() {
            return Ok(());
        }
        // Part of the run was filled meanwhile: page by page, leaving those as they are.
        for j in 0..n {
            // SAFETY: as above, one page of the run.
            let rc = unsafe { self.uffd.zeropage(self.host(r, p + j), PAGE_SIZE, true) };
            if let Err(e) = rc {
                if !exists(&e) {
                    return Err(uffd_err("zero-fill", e));
                }
            }
        }
        Ok(())
    }

    /// A touch of a page of an alias's memory that is not at the source: placed
    /// meanwhile (mapped already, the toucher only needs waking) or never at the
    /// source or sent as zero into fresh memory (left unmapped), which is zero. Its
    /// page in the file holds zeros then: prefaulted, and written since only by a
    /// pre-copy (through the guest's mapping, which maps it, so that it does not fault)
    /// or by placing (which maps it). It is mapped as it is:
    /// writing zeros first could overwrite a page placed since the touch was read.
    /// So is a page that arrived whole in pre-copy but lost its mapping with the rest of
    /// its huge page when a stale page beside it was dropped (the kernel unmaps a huge
    /// page of a file whole): the file holds its current bytes.
    fn map_unsent(&self, r: usize, page: u64) {
        match self.uffd.r#continue(self.host(r, page), PAGE_SIZE, true) {
            Ok(_) => self.lock().stats.zero_filled += 1,
            Err(e) if exists(&e) => {
                let _ = self.uffd.wake(self.host(r, page), PAGE_SIZE);
            }
            // Not in the file (a missing fault): no other thread can place a page
            // that is not at the source, so zeros written through the alias are
            // what it holds.
            Err(e) if errno(&e) == Some(libc::EFAULT) => {
                if let Some(alias) = self.regions[r].alias {
                    if self.through_alias(alias, r, page, 1, None).is_ok() {
                        self.lock().stats.zero_filled += 1;
                    }
                }
            }
            // Unregistered meanwhile (every page arrived): the toucher retries.
            Err(_) => {}
        }
    }

    /// Zero pages from the source (runs: first address, count), all checked first.
    pub fn zero(&self, runs: &[(u64, u32)]) -> Result<()> {
        let mut at = Vec::new();
        for &(a, n) in runs {
            if n == 0 {
                return Err(refused(format!("empty zero run at {a:#x}")));
            }
            for k in 0..n as u64 {
                let addr = k
                    .checked_mul(PAGE_SIZE as u64)
                    .and_then(|o| a.checked_add(o))
                    .ok_or_else(|| refused(format!("zero run at {a:#x} overflows")))?;
                let (r, p) = self.locate(addr).ok_or_else(|| {
                    refused(format!("page {addr:#x} is not inside {}", self.what))
                })?;
                at.push((r, p, addr));
            }
        }
        // Runs of pages that were missing, one UFFDIO_ZEROPAGE each, outside the lock
        // as in `place`.
        let mut runs: Vec<(usize, u64, u64)> = Vec::new();
        {
            let mut i = self.lock();
            if i.abandoned {
                return Ok(());
            }
            for (r, p, addr) in at {
                if !self.arrived(&mut i, r, p, addr) {
                    continue;
                }
                match runs.last_mut() {
                    Some((rr, p0, n)) if *rr == r && *p0 + *n == p => *n += 1,
                    _ => runs.push((r, p, 1)),
                }
            }
            i.flying.extend(runs.iter().copied());
        }
        let done = runs.iter().try_for_each(|&x| self.zero_run(x));
        self.landed(runs.into_iter());
        self.unless_abandoned(done)
    }
}

impl Faults for Lazy {
    fn fd(&self) -> RawFd {
        self.uffd.as_raw_fd()
    }

    fn wake_fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }

    fn take(&self, w: &mut Wanted) -> Result<()> {
        let _ = self.wake.read();
        {
            let mut i = self.lock();
            let queued = std::mem::take(&mut i.queued);
            w.ahead
                .extend(queued.into_iter().filter(|&a| i.asked.contains_key(&a)));
        }
        let mut buf = EventBuffer::new(64);
        loop {
            let events: Vec<_> = self
                .uffd
                .read_events(&mut buf)
                .map_err(|e| uffd_err("read", e))?
                .collect();
            if events.is_empty() {
                return Ok(());
            }
            for ev in events {
                let Ok(Event::Pagefault { addr, .. }) = ev else {
                    continue;
                };
                let host = addr as u64 & !(PAGE_SIZE as u64 - 1);
                let Some((r, reg)) = self
                    .regions
                    .iter()
                    .enumerate()
                    .find(|(_, g)| host >= g.host && host - g.host < g.len)
                else {
                    continue;
                };
                let page = (host - reg.host) / PAGE_SIZE as u64;
                let addr = reg.base + page * PAGE_SIZE as u64;
                let mut i = self.lock();
                let missing = i.registered && i.lacks(r, page);
                if missing {
                    match i.asked.get(&addr).copied() {
                        None => {
                            i.asked.insert(addr, (Instant::now(), false));
                            i.stats.remote_faults += 1;
                            w.ask.push(addr);
                            self.read_ahead(&mut i, r, page, &mut w.after);
                        }
                        // Asked for ahead, and a touch waits for it now: a remote
                        // fault after all, timed from here.
                        Some((_, true)) => {
                            i.asked.insert(addr, (Instant::now(), false));
                            i.stats.fetched_ahead -= 1;
                            i.stats.remote_faults += 1;
                        }
                        Some((_, false)) => {}
                    }
                    continue;
                }
                // Being placed right now: that copy wakes the toucher.
                if i.flies(r, page) {
                    continue;
                }
                drop(i);
                if reg.alias.is_some() {
                    self.map_unsent(r, page);
                    continue;
                }
                // Not at the source: either placed meanwhile (then the fill finds it
                // there and the waiter only needs waking) or a page the source never
                // had, which is zero.
                // SAFETY: one page inside this memory's registered mapping.
                match unsafe { self.uffd.zeropage(self.host(r, page), PAGE_SIZE, true) } {
                    Ok(_) => self.lock().stats.zero_filled += 1,
                    Err(e) if exists(&e) => {
                        let _ = self.uffd.wake(self.host(r, page), PAGE_SIZE);
                    }
                    // Unregistered meanwhile (every page arrived): the toucher retries.
                    Err(_) => {}
                }
            }
        }
    }

    /// Pages in flight (taken, not yet placed) count as still to come: a read into
    /// place that fails gives them back (`place_from`), so DONE must wait for them.
    fn left(&self) -> u64 {
        let i = self.lock();
        i.left + i.flying.iter().map(|f| f.2).sum::<u64>()
    }

    /// With the pages in flight, for the same reason: a source told what is missing
    /// (a recovery) sends them again, and the copy that lands second is dropped.
    fn missing(&self) -> Vec<Bitmap> {
        let i = self.lock();
        let mut m = i.missing.clone();
        for &(r, p, n) in &i.flying {
            for q in p..p + n {
                m[r][(q / 64) as usize] |= 1 << (q % 64);
            }
        }
        m
    }

    fn asked(&self) -> Vec<u64> {
        self.lock().asked.keys().copied().collect()
    }

    fn place(&self, addrs: &[u64], data: &[u8]) -> Result<()> {
        Lazy::place(self, addrs, data)
    }

    fn zero(&self, runs: &[(u64, u32)]) -> Result<()> {
        Lazy::zero(self, runs)
    }

    fn abandon(&self) {
        Lazy::abandon(self)
    }

    fn stats(&self) -> FaultStats {
        let i = self.lock();
        let mut s = i.stats.clone();
        if i.registered {
            s.fault_latency = Latency::of(i.latencies.clone());
        }
        s
    }
}

/// Runs of set bits: (first page, count).
pub fn runs(b: &[u64]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut add = |p: u64, n: u64| match out.last_mut() {
        Some((f, m)) if *f + *m == p => *m += n,
        _ => out.push((p, n)),
    };
    // A run of set bits at a time, not a bit at a time: whole memories go missing at
    // once when a snapshot is restored lazily.
    for (i, &w) in b.iter().enumerate() {
        let mut bits = w;
        while bits != 0 {
            let start = bits.trailing_zeros();
            let len = (bits >> start).trailing_ones();
            add(i as u64 * 64 + start as u64, len as u64);
            let end = start + len;
            bits = if end == 64 {
                0
            } else {
                bits & !((1u64 << end) - 1)
            };
        }
    }
    out
}

mod device;
mod from_stream;
#[cfg(test)]
mod tests;
