//! The data stream of a component whose state is memory (guest RAM, a GPU's VRAM):
//! what is still to send, as one bitmap per region. A first pass over the pages that
//! ever held data (the rest is zero on both sides and is never even read), then, round
//! by round, the pages written since. Within a round the component looks at its dirty
//! log every so often and leaves pages written again for the next round (they stay in
//! the log, so the next sync brings them back with their newer content). Zero pages are
//! recognised and never sent as data.

use super::lazy::{HostRegion, Lazy};
use super::{ComponentError, MigState, PreCopyInfo, ReadReport, Result, Sink, SyncReport};
use crate::dirty::Written;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

pub const PAGE_SIZE: usize = 4096;

/// One bit per page of one region.
pub type Bitmap = Vec<u64>;

/// Pages read between two looks at the dirty log: rarer costs bandwidth on pages
/// rewritten meanwhile, more often costs the look (with KVM's bitmap, in proportion to
/// the memory's size whatever was written).
const SLICE_PAGES: u64 = 16384;

pub fn count(bitmaps: &[Bitmap]) -> u64 {
    // Most words of a take are clear: a test is cheaper than a count (no POPCNT in the
    // baseline x86-64 target), and the pause counts a whole VRAM's bitmap.
    bitmaps
        .iter()
        .flatten()
        .filter(|w| **w != 0)
        .map(|w| w.count_ones() as u64)
        .sum()
}

/// ORs `from` into `into` (an empty `into` takes it whole) and counts in the same pass:
/// (pages set in `from`, pages set in the result). The last take of a memory happens
/// in the pause, and three passes over an 8 GiB VRAM's bitmap (the take's count, the
/// union, the count of what is left) cost three times one.
pub fn merge(into: &mut Vec<Bitmap>, from: Vec<Bitmap>) -> (u64, u64) {
    if into.is_empty() {
        *into = from;
        let n = count(into);
        return (n, n);
    }
    let (mut taken, mut left) = (0, 0);
    for (r, a) in into.iter_mut().enumerate() {
        let b = from.get(r).map_or(&[][..], |b| &b[..]);
        for (i, x) in a.iter_mut().enumerate() {
            let y = b.get(i).copied().unwrap_or(0);
            *x |= y;
            if *x != 0 {
                taken += y.count_ones() as u64;
                left += x.count_ones() as u64;
            }
        }
    }
    (taken, left)
}

pub fn union(into: &mut [Bitmap], from: &[Bitmap]) {
    for (a, b) in into.iter_mut().zip(from) {
        for (x, y) in a.iter_mut().zip(b) {
            *x |= *y;
        }
    }
}

/// Clears from `todo` the pages a look at the dirty log found, in words from `from` on
/// (a flat index across regions); returns how many were cleared.
pub fn drop_written(todo: &mut [Bitmap], written: &Written, from: usize) -> u64 {
    let mut n = 0;
    match written {
        Written::Since(dirty) => {
            let mut base = 0;
            for (a, b) in todo.iter_mut().zip(dirty) {
                for (i, (x, y)) in a.iter_mut().zip(b).enumerate() {
                    if base + i >= from && *x & *y != 0 {
                        n += (*x & *y).count_ones() as u64;
                        *x &= !*y;
                    }
                }
                base += a.len();
            }
        }
        Written::New(list) => {
            for &(region, page) in list {
                let r = region as usize;
                let Some(base) = todo
                    .get(..r)
                    .map(|b| b.iter().map(|x| x.len()).sum::<usize>())
                else {
                    continue;
                };
                let w = (page / 64) as usize;
                if base + w < from {
                    continue;
                }
                if let Some(x) = todo.get_mut(r).and_then(|b| b.get_mut(w)) {
                    let bit = 1u64 << (page % 64);
                    if *x & bit != 0 {
                        *x &= !bit;
                        n += 1;
                    }
                }
            }
        }
    }
    n
}

pub fn is_zero(page: &[u8]) -> bool {
    let mut chunks = page.chunks_exact(16);
    chunks
        .by_ref()
        .all(|c| u128::from_ne_bytes(c.try_into().expect("16 bytes")) == 0)
        && chunks.remainder().iter().all(|b| *b == 0)
}

/// Pages sent straight from memory per frame (a PAGES frame's most).
const IN_PLACE_BATCH: usize = 64;

/// Whether a page of memory that others may write meanwhile reads as zero: its first
/// bytes decide almost every page, and are all that is read of it then. Read a piece
/// at a time into a buffer that stays in the L1 cache: a page-sized buffer cost every
/// page a 4 KiB fill before its first 64 bytes were even looked at (half the time of a
/// pass over pages that hold data).
fn zero_in_place(page: &vm_memory::VolatileSlice<'_>) -> bool {
    let mut buf = [0u8; 256];
    let n = page.len().min(PAGE_SIZE);
    let (mut at, mut piece) = (0, 64);
    while at < n {
        let Ok(rest) = page.offset(at) else {
            return false;
        };
        let got = rest.copy_to(&mut buf[..piece.min(n - at)]);
        if got == 0 || !is_zero(&buf[..got]) {
            return false;
        }
        at += got;
        piece = buf.len();
    }
    true
}

/// Pages bound for a sink in place, handed over a frame at a time: with what keeps
/// their memory mapped where there is such a thing (`Sink::pages_kept`), else for the
/// caller to settle (`Sink::pages_in_place`).
struct InPlace<'m> {
    addrs: Vec<u64>,
    pages: Vec<vm_memory::VolatileSlice<'m>>,
    kept: Option<super::Kept>,
}

impl<'m> InPlace<'m> {
    fn new(kept: Option<super::Kept>) -> InPlace<'m> {
        InPlace {
            addrs: Vec::new(),
            pages: Vec::new(),
            kept,
        }
    }

    fn push(
        &mut self,
        sink: &mut dyn Sink,
        addr: u64,
        page: vm_memory::VolatileSlice<'m>,
    ) -> std::io::Result<()> {
        self.addrs.push(addr);
        self.pages.push(page);
        if self.addrs.len() == IN_PLACE_BATCH {
            self.flush(sink)?;
        }
        Ok(())
    }

    fn flush(&mut self, sink: &mut dyn Sink) -> std::io::Result<()> {
        if self.addrs.is_empty() {
            return Ok(());
        }
        match &self.kept {
            Some(k) => sink.pages_kept(&self.addrs, &self.pages, k)?,
            None => sink.pages_in_place(&self.addrs, &self.pages)?,
        }
        self.addrs.clear();
        self.pages.clear();
        Ok(())
    }
}

/// Access to a component's memory and its record of writes.
pub trait Memory {
    /// What it is, for messages ("guest RAM", "VRAM").
    fn what(&self) -> &'static str;
    /// The address (in the component's space) of page 0 of region `region`.
    fn base(&self, region: usize) -> u64;
    /// Copies page `page` of region `region` into `buf`.
    fn read_page(&self, region: usize, page: u64, buf: &mut [u8]) -> Result<()>;
    /// Pages that may hold data (the first pass); the others are zero.
    fn populated(&self) -> Vec<Bitmap>;
    fn start_tracking(&self) -> Result<()>;
    fn stop_tracking(&self);
    /// Pages written since the last take (`last`: with every writer stopped, no need
    /// to re-arm), and what the memory counted besides, for reports.
    fn take(&self, last: bool) -> Result<(Vec<Bitmap>, BTreeMap<String, u64>)>;
    /// A look at the pages written since the last take, leaving them for the next one
    /// (None: the tracker cannot look without taking).
    fn peek_dirty(&self) -> Result<Option<Written>>;
    /// `pages` pages from `addr` (checked) as the host maps them, to be written in
    /// place (None: not mapped here, or not in one piece; they are written with
    /// `write_at`).
    fn pages_slice(&self, _addr: u64, _pages: usize) -> Option<vm_memory::VolatileSlice<'_>> {
        None
    }
    /// Whether `pages` whole pages from `addr` lie inside this memory.
    fn contains(&self, addr: u64, pages: u64) -> bool;
    fn read_at(&self, addr: u64, buf: &mut [u8]) -> Result<()>;
    fn write_at(&self, addr: u64, data: &[u8]) -> Result<()>;
    /// The regions as the host maps them, in order (None: this memory cannot be
    /// filled lazily, so it takes no part in post-copy).
    fn host_regions(&self) -> Option<Vec<HostRegion>> {
        None
    }
    /// What keeps the mappings `pages_slice` gives mapped, held by whoever still has a
    /// page of them to write (None: they go in place only until the sink settles).
    fn mapping(&self) -> Option<super::Kept> {
        None
    }
    /// What must outlive whoever places pages through `host_regions`' aliases.
    fn keep_alive(&self) -> Option<super::Kept> {
        None
    }
    /// What to do once post-copy is over, not before: let go of what is costly to
    /// let go of (a mapping).
    fn retire(&self) -> Option<Box<dyn FnOnce() + Send>> {
        None
    }
}

/// `Memory::retire` for a memory that keeps what it replaced in `old`: `drop_it` on
/// it, once, whenever post-copy is over.
pub fn retiring<T: Send + 'static>(
    old: &std::sync::Mutex<Option<T>>,
    drop_it: fn(T),
) -> Option<Box<dyn FnOnce() + Send>> {
    let old = old.lock().unwrap_or_else(|e| e.into_inner()).take()?;
    Some(Box::new(move || drop_it(old)))
}

/// A memory's regions as `Component::lazy_regions` gives them: (first address, bytes)
/// of each one the host maps (none if it cannot be filled lazily).
pub fn lazy_regions(mem: &dyn Memory) -> Vec<(u64, u64)> {
    mem.host_regions()
        .unwrap_or_default()
        .iter()
        .map(|r| (r.base, r.len))
        .collect()
}

/// The migration state of a component that is memory: its device state, what it
/// still has to send, and whether writes are being tracked (from PRE_COPY until the
/// data stream ends). The arcs, the rounds and the destination's writes are the same
/// for every memory; components add their own around them.
pub struct MemoryState {
    pub state: MigState,
    paged: Paged,
    tracking: bool,
    /// On a destination in post-copy: the pages still at the source.
    lazy: Option<Arc<Lazy>>,
    /// The mapping holds no page at all: made for an incoming VM that has not run, and
    /// nothing loaded into it since (a load clears this). Going lazy then need not drop
    /// stale copies, and dropping them costs a walk of KVM's reverse map over the whole
    /// memory (0.9 ms at 4 GiB here), inside a lazy restore's start or post-copy's
    /// pause. Only the memory's owner can know it was never written: false by default.
    fresh: AtomicBool,
}

impl Default for MemoryState {
    fn default() -> Self {
        MemoryState {
            state: MigState::Running,
            paged: Paged::default(),
            tracking: false,
            lazy: None,
            fresh: AtomicBool::new(false),
        }
    }
}

impl MemoryState {
    /// The state of a memory its owner has just mapped and nothing has written or read
    /// (see `fresh`).
    pub fn fresh() -> MemoryState {
        MemoryState {
            fresh: AtomicBool::new(true),
            ..Default::default()
        }
    }

    /// The memory's part of the arc `self.state` -> `to` (the caller checked it is one
    /// and sets the state after its own part).
    pub fn arc(&mut self, mem: &dyn Memory, to: MigState) -> Result<()> {
        use MigState::*;
        // Memory still arriving (post-copy in progress here) cannot be read out: a read
        // of a missing page would wait, under this component's lock, for a placement
        // that needs the same lock.
        if matches!(to, PreCopy | StopCopy) {
            if let Some(n) = self.lazy.as_ref().map(|l| super::Faults::left(&**l)) {
                if n > 0 {
                    return Err(ComponentError::Refused(format!(
                        "{} is still arriving (from the last migration, or the snapshot it \
                         was restored from; {n} pages to go): it moves once it is whole",
                        mem.what()
                    )));
                }
            }
        }
        match (self.state, to) {
            (Running, PreCopy) => {
                mem.start_tracking()?;
                self.tracking = true;
                self.paged.begin(mem);
            }
            (PreCopy, Running) | (PreCopyP2p, RunningP2p) | (StopCopy, Stop) => {
                if std::mem::take(&mut self.tracking) {
                    mem.stop_tracking();
                }
                self.paged = Paged::default();
            }
            // Saved without a pre-copy: everything, once, while stopped.
            (Stop, StopCopy) => self.paged.begin_stopped(mem),
            _ => {}
        }
        Ok(())
    }

    pub fn info(&self) -> Result<PreCopyInfo> {
        if !self.state.saving() {
            return Err(ComponentError::WrongState {
                what: "pre-copy info",
                state: self.state,
            });
        }
        let (a, b) = self.paged.left();
        Ok(PreCopyInfo {
            initial_bytes: a * PAGE_SIZE as u64,
            dirty_bytes: b * PAGE_SIZE as u64,
        })
    }

    /// The end of a round, or (in STOP_COPY) the last take.
    pub fn sync(&mut self, mem: &dyn Memory) -> Result<SyncReport> {
        let last = match self.state {
            MigState::PreCopy | MigState::PreCopyP2p => false,
            MigState::StopCopy => true,
            state => {
                return Err(ComponentError::WrongState {
                    what: "sync",
                    state,
                })
            }
        };
        if !self.tracking {
            return Ok(SyncReport::default());
        }
        let t = Instant::now();
        let (dirty, extra) = mem.take(last)?;
        let log_us = t.elapsed().as_secs_f64() * 1e6;
        let dirty_pages = if last {
            self.paged.finish(dirty)
        } else {
            self.paged.sync(dirty)
        };
        Ok(SyncReport {
            dirty_pages,
            log_us,
            extra,
        })
    }

    pub fn read(
        &mut self,
        mem: &dyn Memory,
        sink: &mut dyn Sink,
        pages: u64,
    ) -> Result<ReadReport> {
        if !self.state.saving() {
            return Err(ComponentError::WrongState {
                what: "read",
                state: self.state,
            });
        }
        self.paged.read(mem, sink, pages)
    }

    /// Post-copy, on the source (STOP_COPY, after the last sync): what the
    /// destination lacks, one bitmap per region. The rest of the stream goes by `read`
    /// (zero pages said as such: the destination's copy is missing, not zero) and by
    /// `read_requested`.
    pub fn postcopy_switch(&mut self, mem: &dyn Memory) -> Result<Option<Vec<Bitmap>>> {
        super::expect(self.state, MigState::StopCopy, "post-copy")?;
        let Some(regions) = mem.host_regions() else {
            return Ok(None);
        };
        Ok(Some(self.paged.postcopy(&regions)))
    }

    /// Post-copy recovery, on the source: what the destination says it still lacks.
    pub fn postcopy_resume(&mut self, mem: &dyn Memory, missing: Vec<Bitmap>) -> Result<()> {
        super::expect(self.state, MigState::StopCopy, "post-copy recovery")?;
        let regions = mem
            .host_regions()
            .ok_or_else(|| ComponentError::Refused(format!("{} is not lazy", mem.what())))?;
        let fits = missing.len() == regions.len()
            && regions.iter().zip(&missing).all(|(r, b)| {
                let pages = r.len / PAGE_SIZE as u64;
                b.len() as u64 == pages.div_ceil(64)
                    && (pages.is_multiple_of(64) || b.last().is_none_or(|w| w >> (pages % 64) == 0))
            });
        if !fits {
            return Err(ComponentError::Refused(format!(
                "{}: the destination's account of missing pages does not fit this memory",
                mem.what()
            )));
        }
        self.paged.resume(missing);
        Ok(())
    }

    /// Post-copy, on the source: the pages at `addrs`, now.
    pub fn read_requested(
        &mut self,
        mem: &dyn Memory,
        sink: &mut dyn Sink,
        addrs: &[u64],
    ) -> Result<ReadReport> {
        let (taken, checked) = self.take_requested(mem, addrs)?;
        let r = send_taken(mem, sink, &taken)?;
        checked.map(|_| r)
    }

    /// In post-copy, what fills the missing pages. It places pages under its own lock
    /// alone, so the component's need not be held meanwhile: a placement may take a
    /// millisecond (fresh host memory), and under the component's lock a background
    /// frame being placed held up a page a vCPU waited for, placed by another thread
    /// (2.3 ms in a traced run).
    pub fn filler(&self) -> Option<Arc<Lazy>> {
        self.lazy.clone()
    }

    /// Pages still arriving, while any are.
    pub fn arriving(&self) -> Option<u64> {
        self.lazy
            .as_ref()
            .map(|l| super::Faults::left(&**l))
            .filter(|&n| n > 0)
    }

    /// Post-copy, on a destination: the pages still at the source go missing here.
    pub fn postcopy_expect(&mut self, mem: &dyn Memory, missing: Vec<Bitmap>) -> Result<Arc<Lazy>> {
        if self.lazy.is_some() {
            return Err(ComponentError::Refused(format!(
                "{}: post-copy asked for twice",
                mem.what()
            )));
        }
        super::expect(self.state, MigState::Stop, "post-copy")?;
        let regions = mem.host_regions().ok_or_else(|| {
            ComponentError::Refused(format!("{} cannot be filled lazily", mem.what()))
        })?;
        if regions.iter().any(|r| r.alias.is_some()) {
            tracing::info!(
                "{}: post-copy places pages through the alias of its shared memory",
                mem.what()
            );
        }
        let fresh = self.fresh.load(Ordering::SeqCst);
        let lazy = Lazy::new(mem.what(), regions, missing, fresh)?
            .keeping(mem.keep_alive())
            .retiring(mem.retire());
        let lazy = Arc::new(lazy);
        self.lazy = Some(lazy.clone());
        Ok(lazy)
    }

    /// A destination's pages at `addrs`, `data` holding one page per address: all
    /// checked before any is written. (In post-copy they go to `filler` instead.)
    pub fn load_pages(&self, mem: &dyn Memory, addrs: &[u64], data: &[u8]) -> Result<()> {
        super::expect(self.state, MigState::Resuming, "pages")?;
        if data.len() != addrs.len() * PAGE_SIZE {
            return Err(ComponentError::Refused(
                "page data does not match its addresses".into(),
            ));
        }
        for &a in addrs {
            check(mem, a, 1)?;
        }
        self.fresh.store(false, Ordering::SeqCst);
        for (a, page) in addrs.iter().zip(data.chunks_exact(PAGE_SIZE)) {
            mem.write_at(*a, page)?;
        }
        Ok(())
    }

    /// Before pages are read straight into place (`read_in_place`): whether they can
    /// be, every address checked first. False: post-copy places each page whole
    /// (UFFDIO_COPY), never half-read, or this memory is not mapped here.
    pub fn admit_in_place(&self, mem: &dyn Memory, addrs: &[u64]) -> Result<bool> {
        if self.lazy.is_some() {
            return Ok(false);
        }
        super::expect(self.state, MigState::Resuming, "pages")?;
        for &a in addrs {
            check(mem, a, 1)?;
        }
        if addrs
            .first()
            .is_some_and(|&a| mem.pages_slice(a, 1).is_none())
        {
            return Ok(false);
        }
        self.fresh.store(false, Ordering::SeqCst);
        Ok(true)
    }

    /// A destination's pages at `addrs` (admitted by `admit_in_place`), each read from
    /// `src` straight into place. Not under the component's lock: a connection may wait
    /// for the rest of its frame here, and the others must not wait behind it. RESUMING
    /// lasts until every connection has ended, and within a round no page comes twice.
    pub fn read_in_place(
        mem: &dyn Memory,
        addrs: &[u64],
        src: &mut dyn super::PageSource,
    ) -> Result<()> {
        // Pages that follow each other in memory as in the frame (most of them: the
        // rounds go in address order) are read in one go: a read per page would cost
        // more than the copy it saves.
        let mut i = 0;
        while i < addrs.len() {
            let mut n = 1;
            while i + n < addrs.len() && addrs[i + n] == addrs[i] + (n * PAGE_SIZE) as u64 {
                n += 1;
            }
            let a = addrs[i];
            match mem.pages_slice(a, n) {
                Some(mut run) => src.fill(&mut run)?,
                // Across the end of a region: page by page.
                None => {
                    for k in 0..n as u64 {
                        let at = a + k * PAGE_SIZE as u64;
                        let mut page = mem.pages_slice(at, 1).ok_or_else(|| {
                            ComponentError::Refused(format!(
                                "{} page {at:#x} is not mapped",
                                mem.what()
                            ))
                        })?;
                        src.fill(&mut page)?;
                    }
                }
            }
            i += n;
        }
        Ok(())
    }

    /// A destination's runs of zero pages, all checked before any is written. Memory
    /// never written reads as zero without being allocated: only pages that hold
    /// something are cleared, so a stream of zero runs cannot make the destination
    /// allocate the memory it names. (In post-copy they go to `filler` instead.)
    pub fn load_zero(&self, mem: &dyn Memory, runs: &[(u64, u32)]) -> Result<()> {
        super::expect(self.state, MigState::Resuming, "pages")?;
        for &(a, n) in runs {
            if n == 0 {
                return Err(ComponentError::Refused(format!("empty zero run at {a:#x}")));
            }
            check(mem, a, n as u64)?;
        }
        self.fresh.store(false, Ordering::SeqCst);
        let mut buf = [0u8; PAGE_SIZE];
        for &(a, n) in runs {
            for k in 0..n as u64 {
                let at = a + k * PAGE_SIZE as u64;
                mem.read_at(at, &mut buf)?;
                if !is_zero(&buf) {
                    buf.fill(0);
                    mem.write_at(at, &buf)?;
                }
            }
        }
        Ok(())
    }
}

fn check(mem: &dyn Memory, addr: u64, pages: u64) -> Result<()> {
    if addr.is_multiple_of(PAGE_SIZE as u64) && mem.contains(addr, pages) {
        Ok(())
    } else {
        Err(ComponentError::Refused(format!(
            "{pages} pages at {addr:#x} are not inside {}",
            mem.what()
        )))
    }
}

/// What a memory component still has to send.
#[derive(Default)]
pub struct Paged {
    pending: Vec<Bitmap>,
    /// Pages set in `pending`.
    left: u64,
    /// `pending` is the first pass (the destination's memory is still all zero).
    first: bool,
    /// Word (flat across regions) to read next.
    cursor: usize,
    /// Pages read since the last look at the dirty log.
    since_look: u64,
    /// The writers are stopped: nothing is written again, no look is needed.
    last: bool,
    /// A post-copy source: read outside the component's lock (`unlocked`).
    lazy_source: bool,
}

impl Paged {
    /// The first pass: every page that may hold data.
    pub fn begin(&mut self, mem: &dyn Memory) {
        self.pending = mem.populated();
        self.left = count(&self.pending);
        self.first = true;
        self.cursor = 0;
        self.since_look = 0;
        self.last = false;
    }

    /// Everything that may hold data, with the writers stopped (no pre-copy came first).
    pub fn begin_stopped(&mut self, mem: &dyn Memory) {
        self.begin(mem);
        self.last = true;
    }

    /// What is left, as (initial, dirty) pages.
    pub fn left(&self) -> (u64, u64) {
        if self.first {
            (self.left, 0)
        } else {
            (0, self.left)
        }
    }

    /// The end of a round: pages written since join what is left. Returns how many
    /// were written.
    pub fn sync(&mut self, dirty: Vec<Bitmap>) -> u64 {
        let (n, left) = merge(&mut self.pending, dirty);
        self.left = left;
        self.first = false;
        self.cursor = 0;
        self.since_look = 0;
        n
    }

    /// The writers have stopped: the last pages written join what is left.
    pub fn finish(&mut self, dirty: Vec<Bitmap>) -> u64 {
        self.last = true;
        self.sync(dirty)
    }

    /// Post-copy: what is left is what the destination lacks, in the shape of
    /// `regions`; zero pages among it are sent as such from now on.
    pub fn postcopy(&mut self, regions: &[HostRegion]) -> Vec<Bitmap> {
        let shape: Vec<usize> = regions
            .iter()
            .map(|r| (r.len / PAGE_SIZE as u64).div_ceil(64) as usize)
            .collect();
        let same = self.pending.len() == shape.len()
            && self.pending.iter().zip(&shape).all(|(b, n)| b.len() == *n);
        if !same {
            // Nothing was ever pending (or a memory of another shape): nothing to send.
            self.pending = shape.iter().map(|n| vec![0; *n]).collect();
        }
        self.left = count(&self.pending);
        self.first = false;
        self.last = true;
        self.lazy_source = true;
        self.cursor = 0;
        self.pending.clone()
    }

    /// Post-copy recovery: exactly these pages are still due.
    pub fn resume(&mut self, missing: Vec<Bitmap>) {
        self.pending = missing;
        self.left = count(&self.pending);
        self.cursor = 0;
    }

    /// A page sent out of turn (asked for): no longer due, and the background stream
    /// goes on from there (the pages around a touched one are likely next).
    pub fn take_page(&mut self, region: usize, page: u64) {
        let w = (page / 64) as usize;
        if let Some(x) = self.pending.get_mut(region).and_then(|b| b.get_mut(w)) {
            let bit = 1u64 << (page % 64);
            if *x & bit != 0 {
                *x &= !bit;
                self.left -= 1;
            }
            self.cursor = self.pending[..region]
                .iter()
                .map(|b| b.len())
                .sum::<usize>()
                + w;
        }
    }

    /// Sends up to `budget` pages into `sink`.
    pub fn read(
        &mut self,
        mem: &dyn Memory,
        sink: &mut dyn Sink,
        budget: u64,
    ) -> Result<ReadReport> {
        let r = self.read_unsettled(mem, sink, budget);
        // Pages handed over in place are read before `mem`'s borrow ends, however the
        // read ended.
        let settled = sink.settle();
        let r = r?;
        settled?;
        Ok(r)
    }

    fn read_unsettled(
        &mut self,
        mem: &dyn Memory,
        sink: &mut dyn Sink,
        budget: u64,
    ) -> Result<ReadReport> {
        let mut r = ReadReport::default();
        let bases: Vec<u64> = (0..self.pending.len()).map(|i| mem.base(i)).collect();
        let mut sent = 0u64;
        let mut wrapped = false;
        // Pages that go straight from memory, a frame at a time: they stay where they
        // are until the sink writes them (see `Sink::pages_in_place`).
        let in_place = sink.in_place();
        let mut batch = InPlace::new(None);
        while self.left > 0 && sent < budget {
            if !self.last && self.since_look >= SLICE_PAGES {
                // Pages the guest has written again since the round began are left
                // for the next round, which sends their newer content anyway.
                let t = Instant::now();
                if let Some(w) = mem.peek_dirty()? {
                    let n = drop_written(&mut self.pending, &w, self.cursor);
                    r.skipped += n;
                    self.left -= n;
                }
                r.peek_us += t.elapsed().as_secs_f64() * 1e6;
                self.since_look = 0;
                continue;
            }
            if sink.cancelled() {
                return Err(super::ComponentError::Io(std::io::Error::new(
                    std::io::ErrorKind::Interrupted,
                    "cancelled",
                )));
            }
            let Some((region, word)) = self.next_word(&mut wrapped) else {
                break;
            };
            let bits = self.pending[region][word];
            let first = word as u64 * 64;
            let mut b = bits;
            while b != 0 {
                let p = first + b.trailing_zeros() as u64;
                b &= b - 1;
                let a = bases[region] + p * PAGE_SIZE as u64;
                if let Some(page) = in_place.then(|| mem.pages_slice(a, 1)).flatten() {
                    if !zero_in_place(&page) {
                        batch.push(sink, a, page)?;
                        r.pages += 1;
                        continue;
                    }
                    sink.slot(a);
                    r.zero_pages += 1;
                    if !self.first {
                        sink.zero()?;
                        r.zero_sent += 1;
                    }
                    continue;
                }
                let slot = sink.slot(a);
                mem.read_page(region, p, slot)?;
                if is_zero(slot) {
                    r.zero_pages += 1;
                    if !self.first {
                        sink.zero()?;
                        r.zero_sent += 1;
                    }
                } else {
                    sink.page()?;
                    r.pages += 1;
                }
            }
            let n = bits.count_ones() as u64;
            self.pending[region][word] = 0;
            self.left -= n;
            self.since_look += n;
            sent += n;
            self.cursor += 1;
        }
        batch.flush(sink)?;
        Ok(r)
    }

    /// (region, word) of the next word with pages left, from the cursor on (where it
    /// stops). Past the end, what is left lies behind the cursor (post-copy moves it to
    /// where the destination touched), so once more from the start (`wrapped`); None
    /// once nothing is left.
    fn next_word(&mut self, wrapped: &mut bool) -> Option<(usize, usize)> {
        loop {
            let Some((region, word)) = self.locate(self.cursor) else {
                if *wrapped || self.cursor == 0 {
                    self.left = 0;
                    return None;
                }
                *wrapped = true;
                self.cursor = 0;
                continue;
            };
            if self.pending[region][word] != 0 {
                return Some((region, word));
            }
            self.cursor += 1;
        }
    }

    /// (region, word) of flat word `at`.
    fn locate(&self, mut at: usize) -> Option<(usize, usize)> {
        for (i, b) in self.pending.iter().enumerate() {
            if at < b.len() {
                return Some((i, at));
            }
            at -= b.len();
        }
        None
    }
}

mod unlocked;
pub use unlocked::{send_taken, Taken};

#[cfg(test)]
mod tests;
