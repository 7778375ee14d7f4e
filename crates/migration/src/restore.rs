//! Lazy restore from a snapshot file: the VM runs before its memory is read.
//! `receive` reads HELLO, the states and COMPLETE through the snapshot's page index and
//! builds the VM; once it starts, `start` fills its memory. Every component that is
//! memory starts with all of its pages missing (userfaultfd, as in post-copy). A touch
//! is filled from the file at once: the page's latest copy, found through the index,
//! together with the rest of its frame that is still current (the pages around a
//! touched one are likely next). A background thread reads everything else in address
//! order. A page is placed only once its CRC passes (its own, which a touch reads and
//! checks alone; in snapshots from before pages carried one, its whole frame's): a
//! damaged or unreadable page stops the VM with the reason, since it cannot go on
//! without that memory.

use crate::destination::{Incoming, ReceiveError};
use crate::postcopy_in::FaultWatch;
use crate::snapshot_index::{Found, Index, PagesAt, Table};
use crate::wire::{Frame, Totals, WireError, PAGE_SIZE};
use godwit_vmm::control::VmExit;
use godwit_vmm::migratable::incoming::Host;
use godwit_vmm::migratable::{step_to, Bitmap, Faults, MigState};
use godwit_vmm::{Console, VmHandle};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const PAGE: u64 = PAGE_SIZE as u64;
/// Table entries the background reads at a time.
const CHUNK: usize = 512;

/// A component filled from the file.
pub(crate) struct Part {
    pub section: u32,
    pub name: String,
    pub faults: Arc<dyn Faults>,
    pub table: Table,
    /// (first address, bytes) of each region.
    pub regions: Vec<(u64, u64)>,
}

pub(crate) struct Restore {
    pub index: Index,
    pub parts: Vec<Part>,
    pub vm: VmHandle,
    pub what: String,
    failed: AtomicBool,
    /// Touches are being answered: the background steps aside (on a small host it
    /// would take the core and the memory's lock they need).
    urgent: AtomicBool,
    /// `report_whole` has spoken.
    reported: AtomicBool,
    t0: Instant,
    /// When a touch was last answered (us since t0).
    last_touch_us: AtomicU64,
}

/// The background waits for the guest's first touches to settle: this long without one.
const QUIET: Duration = Duration::from_millis(2);
/// ... but starts this long after the VM at the latest, whatever the guest does.
const QUIET_AT_MOST: Duration = Duration::from_millis(20);

/// What a touch left for when no touch waits.
enum Later {
    /// (part, frame offset, its head, the page placed): the rest of a touched page's
    /// frame.
    Rest(usize, u64, PagesAt, usize),
    /// (part, address): a page read ahead, with its frame.
    Page(usize, u64),
}

impl Restore {
    pub fn new(index: Index, parts: Vec<Part>, vm: VmHandle, what: String) -> Restore {
        Restore {
            index,
            parts,
            vm,
            what,
            failed: AtomicBool::new(false),
            urgent: AtomicBool::new(false),
            reported: AtomicBool::new(false),
            t0: Instant::now(),
            last_touch_us: AtomicU64::new(0),
        }
    }

    fn left(&self) -> u64 {
        self.parts.iter().map(|p| p.faults.left()).sum()
    }

    fn over(&self) -> bool {
        self.failed.load(Ordering::SeqCst) || self.vm.ctl.state() == godwit_vmm::RunState::Stopped
    }

    /// The VM cannot go on: it is stopped with the reason.
    fn fail(&self, p: &Part, why: String) {
        if self.failed.load(Ordering::SeqCst) {
            return;
        }
        let m = format!(
            "restoring {}: {}: {why}; the VM cannot run without that memory",
            self.what, p.name
        );
        // The VM's end and its reason first (the first reason asked for stays): once
        // `failed` shows, a waiting toucher is let go on zeros, and the guest may crash on
        // them before this thread got any further (a log line is slow on a loaded host).
        self.vm.ctl.request_exit(VmExit::Error(m.clone()));
        if !self.failed.swap(true, Ordering::SeqCst) {
            tracing::error!("{m}");
        }
    }

    /// Holds this thread to what a page reader may do (the file it reads is a stranger's);
    /// false, the VM stopped with why, if it cannot be.
    fn confined(&self) -> bool {
        let Err(e) = godwit_vmm::confine::enter(godwit_vmm::confine::Role::PageReader) else {
            return true;
        };
        if let Some(p) = self.parts.first() {
            self.fail(p, e);
        }
        false
    }

    /// Fills the page at `addr` of `p` (a touch waits for it) and the rest of its frame
    /// that is current.
    fn fill(&self, p: &Part, addr: u64, buf: &mut Vec<u8>) -> Result<(), String> {
        match self.touch(p, addr, buf)? {
            Some((at, f, k)) => self.place_runs(p, at, &f, Some(k), buf),
            None => Ok(()),
        }
    }

    /// Places the pages of the frame at `at` whose latest copy it holds.
    fn place_frame(&self, p: &Part, at: u64, buf: &mut Vec<u8>) -> Result<(), String> {
        let bad = |e: WireError| format!("the frame at byte {at}: {e}");
        let Some(f) = self.index.pages_at(at).map_err(bad)? else {
            return self.place_whole_frame(p, at, None, buf);
        };
        self.held(p, at, f.section, &f.addrs, None)?;
        self.place_runs(p, at, &f, None, buf)
    }

    /// Places the current pages of `f`, the frame at `at`, but for `skip`: a run of
    /// pages in a row at a time, each page checked against its CRC.
    fn place_runs(
        &self,
        p: &Part,
        at: u64,
        f: &PagesAt,
        skip: Option<usize>,
        buf: &mut Vec<u8>,
    ) -> Result<(), String> {
        let current = self.current(p, at, &f.addrs)?;
        for r in runs(&current, skip) {
            let data = self
                .index
                .read_pages(f, r.clone(), buf)
                .map_err(|e| format!("the frame at byte {at}: {e}"))?;
            p.faults
                .place(&f.addrs[r], data)
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// `place_frame` for a frame checked whole by one CRC (snapshots written before
    /// pages carried their own): all of it is read and checked before any page goes.
    fn place_whole_frame(
        &self,
        p: &Part,
        at: u64,
        must_hold: Option<u64>,
        buf: &mut Vec<u8>,
    ) -> Result<(), String> {
        let f = self
            .index
            .frame_at(at, buf)
            .map_err(|e| format!("the frame at byte {at}: {e}"))?;
        let Frame::Pages {
            section,
            addrs,
            data,
        } = f
        else {
            return Err(format!(
                "the index names a {:?} frame at byte {at}, not pages",
                f.kind()
            ));
        };
        let first = self.held(p, at, section, &addrs, must_hold)?;
        let page = |k: usize| &data[k * PAGE_SIZE..(k + 1) * PAGE_SIZE];
        if let Some(k) = first {
            p.faults
                .place(&addrs[k..=k], page(k))
                .map_err(|e| e.to_string())?;
        }
        // The rest straight from the frame, a run of its pages at a time: copying them
        // into a buffer of their own first took a fifth of a lazy restore's page faults
        // (a perf profile of one, to its first line) for nothing.
        let current = self.current(p, at, &addrs)?;
        for r in runs(&current, first) {
            p.faults
                .place(
                    &addrs[r.clone()],
                    &data[r.start * PAGE_SIZE..r.end * PAGE_SIZE],
                )
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Checks that the frame at `at`, of `section` with pages `addrs`, is one of `p`'s
    /// and holds `must_hold`; returns where it holds it.
    fn held(
        &self,
        p: &Part,
        at: u64,
        section: u32,
        addrs: &[u64],
        must_hold: Option<u64>,
    ) -> Result<Option<usize>, String> {
        if section != p.section {
            return Err(format!(
                "the index names pages of section {section} at byte {at}"
            ));
        }
        match must_hold {
            None => Ok(None),
            Some(a) => match addrs.iter().position(|&x| x == a) {
                Some(k) => Ok(Some(k)),
                None => Err(format!("the frame at byte {at} does not hold page {a:#x}")),
            },
        }
    }

    /// Which of `addrs`, the pages of the frame at `at`, are current: those whose
    /// entry names this frame.
    fn current(&self, p: &Part, at: u64, addrs: &[u64]) -> Result<Vec<bool>, String> {
        let t = &p.table;
        let lo = addrs.iter().min().copied().unwrap_or(0) / PAGE;
        let hi = addrs.iter().max().copied().unwrap_or(0) / PAGE;
        let index = |e: std::io::Error| format!("reading the index: {e}");
        if hi - lo < CHUNK as u64 {
            let mut e = vec![0u64; (hi - lo + 1) as usize];
            self.index.entries(t, lo, &mut e).map_err(index)?;
            return Ok(addrs
                .iter()
                .map(|a| e[(a / PAGE - lo) as usize] == at)
                .collect());
        }
        let mut v = Vec::with_capacity(addrs.len());
        for a in addrs {
            let mut e = [0u64];
            self.index.entries(t, a / PAGE, &mut e).map_err(index)?;
            v.push(e[0] == at);
        }
        Ok(v)
    }

    /// Answers touches until every page is in, or the VM ends. A touch gets its own
    /// page at once; the rest of its frame, and the pages read ahead, wait until no
    /// touch does (`Later`): a vCPU touches its next page microseconds after the last
    /// one came in, and would otherwise wait behind some 250 KiB read for pages it may
    /// never use.
    fn serve_faults(&self) {
        let mut w = godwit_vmm::migratable::Wanted::default();
        let mut buf = Vec::new();
        let mut watch = FaultWatch::new(self.parts.iter().map(|p| &*p.faults));
        let mut later = std::collections::VecDeque::new();
        while self.left() > 0 {
            if self.vm.ctl.state() == godwit_vmm::RunState::Stopped
                && !self.failed.load(Ordering::SeqCst)
            {
                // The VM ends before its memory is in: whatever waits on a page goes
                // on, so that it can stop (a kick alone does not free every vCPU:
                // `Faults::abandon`).
                for p in &self.parts {
                    p.faults.abandon();
                }
                return;
            }
            watch.wait(if later.is_empty() { 100 } else { 0 });
            let mut touched = false;
            for (i, p) in self.parts.iter().enumerate() {
                w.clear();
                if let Err(e) = p.faults.take(&mut w) {
                    self.fail(p, format!("reading faults: {e}"));
                    continue;
                }
                touched |= !w.is_empty();
                if !w.is_empty() {
                    self.urgent.store(true, Ordering::SeqCst);
                }
                for &a in &w.ask {
                    match self.touch(p, a, &mut buf) {
                        Ok(Some((at, f, k))) => later.push_back(Later::Rest(i, at, f, k)),
                        Ok(None) => {}
                        Err(why) => {
                            self.fail(p, why);
                            let _ = p.faults.zero(&[(a, 1)]);
                        }
                    }
                }
                // Pages read ahead are asked for: a touch of one waits for it without
                // a fault of its own, so they go first when no touch waits.
                for &a in w.after.iter().rev() {
                    later.push_front(Later::Page(i, a));
                }
                later.extend(w.ahead.iter().map(|&a| Later::Page(i, a)));
            }
            if touched {
                self.last_touch_us
                    .store(self.t0.elapsed().as_micros() as u64, Ordering::SeqCst);
            } else if let Some(l) = later.pop_front() {
                // No touch waits: one frame's worth of what waited.
                match l {
                    Later::Rest(i, at, f, k) => {
                        let p = &self.parts[i];
                        if !self.failed.load(Ordering::SeqCst) {
                            if let Err(why) = self.place_runs(p, at, &f, Some(k), &mut buf) {
                                self.fail(p, why);
                            }
                        }
                    }
                    // Asked for: a touch may wait for it, let go on zeros after a
                    // failure as a touch is (`touch`).
                    Later::Page(i, a) => {
                        let p = &self.parts[i];
                        if let Err(why) = self.fill(p, a, &mut buf) {
                            self.fail(p, why);
                            let _ = p.faults.zero(&[(a, 1)]);
                        }
                    }
                }
            }
            self.urgent.store(!later.is_empty(), Ordering::SeqCst);
        }
    }

    /// Places the touched page `addr` of `p` alone, checked by itself where its frame
    /// carries a CRC of each page, and returns that frame (its offset, its head, where
    /// in it the page was) for the rest of it; `None` where nothing is left (a zero
    /// page, or a frame checked whole and placed whole). After a failure, whoever waits
    /// is let go on zeros.
    fn touch(
        &self,
        p: &Part,
        addr: u64,
        buf: &mut Vec<u8>,
    ) -> Result<Option<(u64, PagesAt, usize)>, String> {
        if self.failed.load(Ordering::SeqCst) {
            // Whoever waits is let go (on zeros) to find the VM stopping: it stops at
            // its next entry and never runs on.
            let _ = p.faults.zero(&[(addr, 1)]);
            return Ok(None);
        }
        let mut e = [0u64];
        self.index
            .entries(&p.table, addr / PAGE, &mut e)
            .map_err(|e| format!("reading the index: {e}"))?;
        let at = e[0];
        if at == 0 {
            p.faults.zero(&[(addr, 1)]).map_err(|e| e.to_string())?;
            return Ok(None);
        }
        let bad = |e: WireError| format!("the frame at byte {at}: {e}");
        let Some(f) = self.index.pages_at(at).map_err(bad)? else {
            self.place_whole_frame(p, at, Some(addr), buf)?;
            return Ok(None);
        };
        let k = self.held(p, at, f.section, &f.addrs, Some(addr))?;
        let k = k.expect("held asks for the page");
        let data = self.index.read_pages(&f, k..k + 1, buf).map_err(bad)?;
        p.faults
            .place(&f.addrs[k..=k], data)
            .map_err(|e| e.to_string())?;
        Ok(Some((at, f, k)))
    }

    /// Says once, when every page is in, how long that took and what brought them.
    fn report_whole(&self) {
        if self.failed.load(Ordering::SeqCst)
            || self.left() > 0
            || self.reported.swap(true, Ordering::SeqCst)
        {
            return;
        }
        let parts: Vec<String> = self
            .parts
            .iter()
            .map(|p| {
                let s = p.faults.stats();
                format!(
                    "{}: {} touched first, median {:.0} us, {} read ahead",
                    p.name, s.remote_faults, s.fault_latency.median_us, s.prepaged
                )
            })
            .collect();
        tracing::info!(
            "restore: every page is in after {:.1} ms ({})",
            self.t0.elapsed().as_secs_f64() * 1e3,
            parts.join("; ")
        );
    }

    /// Waits (briefly) while touches are answered.
    fn step_aside(&self) {
        let mut n = 0;
        while self.urgent.load(Ordering::SeqCst) && n < 1000 {
            std::thread::sleep(std::time::Duration::from_micros(20));
            n += 1;
        }
    }

    /// Waits until the guest has gone QUIET without touching missing memory (its
    /// first touches after the start come in a burst: reading ahead beside them on a
    /// small host takes the cores they need), or QUIET_AT_MOST.
    fn settle(&self) {
        loop {
            let now = self.t0.elapsed();
            let last = Duration::from_micros(self.last_touch_us.load(Ordering::SeqCst));
            if now >= QUIET_AT_MOST || (now >= QUIET && now - last >= QUIET) || self.over() {
                return;
            }
            std::thread::sleep(Duration::from_micros(500));
        }
    }

    /// Reads every page in, in address order.
    fn background(&self) {
        self.settle();
        let mut buf = Vec::new();
        let mut e = vec![0u64; CHUNK];
        for p in &self.parts {
            for &(base, len) in &p.regions {
                let (first, end) = (base / PAGE, (base + len) / PAGE);
                let mut at = first;
                while at < end {
                    if self.over() {
                        return;
                    }
                    let n = ((end - at) as usize).min(CHUNK);
                    let chunk = &mut e[..n];
                    if let Err(err) = self.index.entries(&p.table, at, chunk) {
                        self.fail(p, format!("reading the index: {err}"));
                        return;
                    }
                    if let Err(why) = self.fill_chunk(p, at, chunk, &mut buf) {
                        self.fail(p, why);
                        return;
                    }
                    at += n as u64;
                }
            }
        }
    }

    /// The pages `at..at + entries.len()` of `p`: zero runs, then each frame once.
    fn fill_chunk(
        &self,
        p: &Part,
        at: u64,
        entries: &[u64],
        buf: &mut Vec<u8>,
    ) -> Result<(), String> {
        let mut runs: Vec<(u64, u32)> = Vec::new();
        for (k, &en) in entries.iter().enumerate() {
            if en != 0 {
                continue;
            }
            let addr = (at + k as u64) * PAGE;
            match runs.last_mut() {
                Some((a, n)) if *a + *n as u64 * PAGE == addr => *n += 1,
                _ => runs.push((addr, 1)),
            }
        }
        if !runs.is_empty() {
            p.faults.zero(&runs).map_err(|e| e.to_string())?;
        }
        let mut seen = HashSet::new();
        for &en in entries {
            if en != 0 && seen.insert(en) {
                self.step_aside();
                self.place_frame(p, en, buf)?;
            }
        }
        Ok(())
    }
}

/// Every page of memory of this shape missing.
/// The runs of pages in a row that are `current`, leaving out `skip` (placed already).
fn runs(current: &[bool], skip: Option<usize>) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut k = 0;
    while k < current.len() {
        let take = |j: usize| current[j] && Some(j) != skip;
        if !take(k) {
            k += 1;
            continue;
        }
        let end = (k..current.len())
            .find(|&j| !take(j))
            .unwrap_or(current.len());
        out.push(k..end);
        k = end;
    }
    out
}

fn all_pages(regions: &[(u64, u64)]) -> Vec<Bitmap> {
    regions
        .iter()
        .map(|&(_, len)| {
            let pages = len / PAGE_SIZE as u64;
            let mut b = vec![u64::MAX; pages.div_ceil(64) as usize];
            if let Some(last) = b.last_mut().filter(|_| !pages.is_multiple_of(64)) {
                *last = (1 << (pages % 64)) - 1;
            }
            b
        })
        .collect()
}

/// The page index of the snapshot at `path`; None when it has none that fits it: it is
/// then read whole, which says what is wrong with it, if anything.
pub(crate) fn page_index(path: &std::path::Path) -> Result<Option<Index>, ReceiveError> {
    let (f, _) = godwit_vmm::files::open_regular(path, u64::MAX).map_err(ReceiveError::Listen)?;
    match Index::open(f).map_err(|e| ReceiveError::Stream(format!("reading the snapshot: {e}")))? {
        Found::Index(ix) => Ok(Some(ix)),
        Found::None => {
            tracing::info!("{}: no page index: restored whole", path.display());
            Ok(None)
        }
        Found::Unfit(why) => {
            tracing::warn!("{}: {why}: restored whole", path.display());
            Ok(None)
        }
    }
}

/// Restores the snapshot at `path` through its page index: HELLO, the states and
/// COMPLETE are read and checked now, the memory once the VM runs (`start`).
pub(crate) fn receive(
    path: &std::path::Path,
    index: Index,
    host: &Host,
    console: Console,
) -> Result<Incoming, ReceiveError> {
    let t0 = Instant::now();
    let damaged = |e: WireError| ReceiveError::Stream(format!("reading the snapshot: {e}"));
    let mut buf = Vec::new();
    let hello = match index.frame_at(0, &mut buf) {
        Ok(Frame::Hello(h)) => h,
        Ok(f) => {
            return Err(ReceiveError::Stream(format!(
                "the stream starts with {:?}, not HELLO",
                f.kind()
            )))
        }
        Err(e) => return Err(ReceiveError::Hello(e)),
    };
    let (vm, parts, names) =
        crate::destination::build(&hello, true, host, console, &mut None, true)?;
    tracing::debug!(ms = t0.elapsed().as_secs_f64() * 1e3, "restore: VM built");
    let mut states = vec![false; parts.len()];
    let mut complete = None;
    let mut data = 0u64;
    for &at in &index.control()[1..] {
        if complete.is_some() {
            return Err(ReceiveError::Stream(
                "the snapshot's index lists frames after its end".into(),
            ));
        }
        let part = |s: u32| {
            parts.get(s as usize).ok_or_else(|| {
                ReceiveError::Stream(format!("a frame for section {s}, of {}", parts.len()))
            })
        };
        let named = |s: u32| {
            let n = names[s as usize].clone();
            move |e: godwit_vmm::migratable::ComponentError| {
                ReceiveError::Stream(format!("{n}: {e}"))
            }
        };
        match index.frame_at(at, &mut buf).map_err(damaged)? {
            Frame::State { section, data } => {
                let c = part(section)?;
                if std::mem::replace(&mut states[section as usize], true) {
                    return Err(ReceiveError::Stream(format!(
                        "{}: a second state",
                        names[section as usize]
                    )));
                }
                c.load(data).map_err(named(section))?;
            }
            Frame::Data { section, data: d } => {
                part(section)?.load_data(d).map_err(named(section))?;
                data += d.len() as u64;
            }
            Frame::Sync(_) => {}
            Frame::Complete(t) => complete = Some(t),
            f => {
                return Err(ReceiveError::Stream(format!(
                    "unexpected {:?} frame in the snapshot",
                    f.kind()
                )))
            }
        }
    }
    let Some(t) = complete else {
        return Err(ReceiveError::Stream(
            "the snapshot has no end (COMPLETE)".into(),
        ));
    };
    let found = index.totals();
    if (t.pages, t.zero_pages, t.data) != (found.pages, found.zero_pages, data) {
        return Err(ReceiveError::Stream(format!(
            "the snapshot says it holds {t:?} but {:?} are in it",
            Totals { data, ..found }
        )));
    }
    if let Some(i) = states.iter().position(|s| !s) {
        return Err(ReceiveError::Stream(format!(
            "the snapshot has no {} state",
            names[i]
        )));
    }
    tracing::debug!(
        ms = t0.elapsed().as_secs_f64() * 1e3,
        "restore: states loaded"
    );
    for (c, n) in parts.iter().zip(&names) {
        step_to(&**c, MigState::Stop).map_err(|e| ReceiveError::Stream(format!("{n}: {e}")))?;
    }
    tracing::debug!(ms = t0.elapsed().as_secs_f64() * 1e3, "restore: stopped");
    // Each memory with pages in the file goes missing whole, to be filled from it.
    let mut lazy = Vec::new();
    for t in index.tables() {
        let i = t.section as usize;
        let c = parts.get(i).ok_or_else(|| {
            ReceiveError::Stream(format!("pages of section {i}, of {}", parts.len()))
        })?;
        let regions = c.lazy_regions();
        if regions.is_empty() {
            return Err(ReceiveError::Stream(format!(
                "{}: pages in the snapshot, but it cannot be filled lazily",
                names[i]
            )));
        }
        let faults = c
            .postcopy_expect(all_pages(&regions))
            .map_err(|e| ReceiveError::Stream(format!("{}: {e}", names[i])))?;
        lazy.push(Part {
            section: t.section,
            name: names[i].clone(),
            faults,
            table: t.clone(),
            regions,
        });
    }
    let restore = Restore::new(index, lazy, vm.handle(), path.display().to_string());
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    Ok(Incoming::restored(vm, parts, hello, ms, restore))
}

/// Starts the threads that fill the VM's memory; they end by themselves once every
/// page is in or the VM has ended.
pub(crate) fn start(r: Restore) -> std::io::Result<()> {
    let r = Arc::new(r);
    tracing::info!(
        "restore: the VM runs before its memory is read from {}: pages come in as they \
         are touched and in the background",
        r.what
    );
    let f = r.clone();
    std::thread::Builder::new()
        .name("restore-faults".into())
        .spawn(move || {
            if !f.confined() {
                return;
            }
            f.serve_faults();
            f.report_whole();
        })?;
    std::thread::Builder::new()
        .name("restore-fill".into())
        .spawn(move || {
            if !r.confined() {
                return;
            }
            r.background();
            r.report_whole();
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::runs;

    #[test]
    fn runs_are_the_current_pages_in_a_row_less_the_one_placed() {
        let (t, f) = (true, false);
        assert_eq!(runs(&[t, t, f, t, t, t, f], None), [0..2, 3..6]);
        assert_eq!(runs(&[t, t, f, t, t, t, f], Some(4)), [0..2, 3..4, 5..6]);
        assert_eq!(runs(&[t, t, t, f, t], Some(0)), [1..3, 4..5]);
        assert_eq!(runs(&[f, f], None), Vec::<std::ops::Range<usize>>::new());
        assert_eq!(runs(&[], Some(0)), Vec::<std::ops::Range<usize>>::new());
    }
}
