//! The engine thread: it takes entries from the ring, runs them in chunks on the shared
//! engine while the arbiter gives it a slice, parks at a chunk boundary when held, and
//! records every VRAM and guest page it writes once the write has landed.

use super::{InFlight, Inner, Vf, COPY_CHUNK};
use crate::abi::{err, irq, ENTRY_SIZE};
use crate::backend::Acc;
use crate::command::{self, Command, Entry, Kernel, Operand};
use crate::mmu::{Mmu, Target};
use crate::sched;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress};

/// Page translations one engine step makes while it checks a kernel's operands: a
/// fraction of a millisecond, so even an operand of millions of 4 KiB pages is checked
/// across many preemptible steps.
const RESOLVE_PAGES_PER_STEP: u64 = 8192;

/// The amount of work in a command: bytes for copies and fills, units for kernels, and
/// 0 for commands that finish in the step that runs them. Any command can be in flight
/// at a chunk boundary, these too: the engine takes an entry in one step and runs it in
/// the next, and a hold can park it in between.
pub(super) fn work(e: &Entry) -> u64 {
    match e.cmd {
        Command::Copy { bytes, .. } | Command::Fill { bytes, .. } => bytes,
        Command::Kernel(k) => k.units(),
        _ => 0,
    }
}

/// A kernel's operands being checked and translated, a bounded number of pages per
/// engine step. Transient: a restored command starts its check again.
#[derive(Clone, Debug)]
pub(super) struct Resolving {
    ops: Vec<Operand>,
    /// VRAM offset of each operand checked so far.
    offs: Vec<u64>,
    op: usize,
    /// Bytes of operand `op` found contiguous so far.
    at: u64,
}

/// How often an idle engine counts its resident VRAM for `godwit gpu` (its sign of
/// life goes every 100 ms).
const RESIDENT_EVERY: Duration = Duration::from_secs(2);

/// Why a command stopped early.
enum Stop {
    Error(u32, u64),
    /// Post-copy: what the step would touch is not here (`Mmu::here`); nothing was
    /// done, and the step runs again once it is.
    Missing,
}

impl From<crate::mmu::Fault> for Stop {
    fn from(f: crate::mmu::Fault) -> Stop {
        match f.missing {
            true => Stop::Missing,
            false => Stop::Error(err::GPU_FAULT, f.va),
        }
    }
}

impl Vf {
    pub(super) fn has_work(i: &Inner) -> bool {
        i.regs.enabled && i.regs.error == 0 && (i.in_flight.is_some() || i.regs.head != i.regs.tail)
    }

    /// The engine thread.
    pub(super) fn engine(self: Arc<Vf>) {
        let mut last_beat = Instant::now();
        let (mut resident, mut counted) = (0, None::<Instant>);
        loop {
            {
                let mut i = self.lock();
                loop {
                    if i.shutdown {
                        i.parked = true;
                        self.done.notify_all();
                        return;
                    }
                    if i.holds != 0 {
                        if !i.parked {
                            i.parked = true;
                            self.done.notify_all();
                        }
                    } else {
                        i.parked = false;
                        let rested = i.rest_until.is_none_or(|t| t <= Instant::now());
                        if rested && Self::has_work(&i) {
                            break;
                        }
                    }
                    // Resting: back when the rest ends (or anything changes).
                    let wait = i
                        .rest_until
                        .map(|t| t.saturating_duration_since(Instant::now()))
                        .filter(|d| !d.is_zero() && i.holds == 0)
                        .map_or(Duration::from_millis(100), |d| {
                            d.min(Duration::from_millis(100))
                        });
                    i = self
                        .work
                        .wait_timeout(i, wait)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                    if last_beat.elapsed() > Duration::from_millis(100) {
                        // Counting resident VRAM walks the whole mapping (2-4 ms of a
                        // core at 8 GiB): seldom, and never while held, as in a
                        // migration's pause, where it took a core from the hand-over.
                        let held = i.holds != 0;
                        drop(i);
                        if !held && counted.is_none_or(|t| t.elapsed() >= RESIDENT_EVERY) {
                            resident = self.backend.resident_bytes();
                            counted = Some(Instant::now());
                        }
                        self.arbiter.heartbeat(resident);
                        last_beat = Instant::now();
                        i = self.lock();
                    }
                }
            }
            // Post-copy: whatever the next command touches is brought in first, while
            // this VF holds nothing others wait for.
            self.prefetch_next();
            let stop = || {
                let i = self.lock();
                i.holds != 0 || i.shutdown || !Self::has_work(&i)
            };
            let Some(slice) = self.arbiter.acquire(&stop) else {
                continue;
            };
            // Run chunks until the slice ends, the work runs out, a hold, or (post-copy)
            // a next command that is not brought in yet.
            let mut used = 0;
            loop {
                let t0 = Instant::now();
                let more = self.step();
                self.deliver_irq();
                let dt = t0.elapsed().as_nanos() as u64;
                used += dt;
                self.arbiter.used(dt);
                self.lock().regs.engine_ns += dt;
                if !more || stop() || sched::now_ns() >= slice.end_ns || self.next_not_brought_in()
                {
                    break;
                }
            }
            let more = !stop();
            self.arbiter.release(more);
            let rest = self.cap.rest_ns(used);
            self.lock().rest_until =
                (rest > 0).then(|| Instant::now() + Duration::from_nanos(rest));
        }
    }

    /// Runs one chunk of the current command, or takes the next entry if none is in
    /// flight. Returns whether there may be more to do.
    pub(super) fn step(&self) -> bool {
        let (mut fl, mut resolved, mut resolving, root, generation) = {
            let i = self.lock();
            if !Self::has_work(&i) || i.holds != 0 {
                return false;
            }
            let Some(fl) = i.in_flight.clone() else {
                let next = (i.regs.head, Self::entry_at(&i, i.regs.head), i.generation);
                drop(i);
                if self
                    .prefetching()
                    .is_some_and(|p| !p.ram_here(next.1, ENTRY_SIZE as u64))
                {
                    self.forget_brought_in();
                    return true;
                }
                return self.take_next(next);
            };
            (
                fl,
                i.resolved,
                i.resolving.clone(),
                i.regs.pt_root,
                i.generation,
            )
        };
        let prefetch = self.prefetching();
        let mmu = Mmu::new(&*self.backend, &self.ram, root, prefetch.as_deref());
        let result = self.run_chunk(&mmu, &mut fl, &mut resolved, &mut resolving);
        let mut i = self.lock();
        if i.generation != generation || i.in_flight.is_none() {
            // Reset while the chunk ran: drop its result.
            return true;
        }
        match result {
            Err(Stop::Missing) => {
                // Kept as far as it got (an operand check resumes where it stopped).
                i.resolving = resolving;
                drop(i);
                self.forget_brought_in();
                true
            }
            Ok(finished) => {
                if finished {
                    if let Some(f) = fl.entry.fence {
                        i.regs.fence = f;
                        i.irq_due |= i.regs.raise(irq::FENCE);
                    }
                    i.regs.completed += 1;
                    i.regs.head = (i.regs.head + 1) % i.regs.ring_size;
                    i.in_flight = None;
                    i.resolved = None;
                    i.resolving = None;
                    self.arbiter.count(true, false);
                    self.done.notify_all();
                } else {
                    i.in_flight = Some(fl);
                    i.resolved = resolved;
                    i.resolving = resolving;
                }
                true
            }
            Err(Stop::Error(code, addr)) => {
                Self::set_error(&mut i, code, fl.index, addr);
                i.in_flight = None;
                i.resolved = None;
                i.resolving = None;
                self.arbiter.count(false, true);
                self.done.notify_all();
                false
            }
        }
    }

    /// Takes the ring's next entry in flight. It is read from guest RAM without this
    /// VF's lock: in post-copy its page may still be at the source, and the wait for it
    /// must not hold up the vCPUs' register accesses (or a paused post-copy's recovery,
    /// which reads the VF's state) behind that lock. Returns whether there may be more
    /// to do. `(index, at, generation)`: the entry the caller found next, unlocked.
    fn take_next(&self, (index, at, generation): (u64, u64, u64)) -> bool {
        let mut raw = [0u8; ENTRY_SIZE];
        let read = self.ram.read_slice(&mut raw, GuestAddress(at)).is_ok();
        let mut i = self.lock();
        if i.in_flight.is_some()
            || i.generation != generation
            || i.regs.head != index
            || Self::entry_at(&i, index) != at
        {
            // The ring moved while it was read (a reset, new registers): look again.
            return true;
        }
        if !Self::has_work(&i) || i.holds != 0 {
            return false;
        }
        if !read {
            Self::set_error(&mut i, err::BAD_RING, index, at);
            self.arbiter.count(false, true);
            self.done.notify_all();
            return false;
        }
        match command::decode(&raw) {
            Ok(entry) => {
                i.in_flight = Some(InFlight {
                    index,
                    raw,
                    acc: match entry.cmd {
                        Command::Kernel(k) => k.initial_acc(),
                        _ => Acc::default(),
                    },
                    entry,
                    done: 0,
                });
                i.resolved = None;
                i.resolving = None;
                true
            }
            Err(d) => {
                Self::set_error(&mut i, d.code, index, d.value);
                self.arbiter.count(false, true);
                self.done.notify_all();
                false
            }
        }
    }

    /// Where ring entry `index` lies in guest RAM.
    pub(super) fn entry_at(i: &Inner, index: u64) -> u64 {
        i.regs.ring_base + index * ENTRY_SIZE as u64
    }

    /// Runs one chunk of `fl`; Ok(true) when the command is complete.
    fn run_chunk(
        &self,
        mmu: &Mmu,
        fl: &mut InFlight,
        resolved: &mut Option<Kernel>,
        resolving: &mut Option<Resolving>,
    ) -> Result<bool, Stop> {
        let broken = |_: crate::backend::OutOfRange| Stop::Error(err::GPU_FAULT, u64::MAX);
        let dma = |_: ()| Stop::Error(err::GPU_FAULT, u64::MAX);
        match fl.entry.cmd {
            Command::Nop | Command::TlbInvalidate => Ok(true),
            Command::Copy { dst, src, bytes } => {
                if fl.done == 0
                    && dst < src.saturating_add(bytes)
                    && src < dst.saturating_add(bytes)
                {
                    return Err(Stop::Error(err::BAD_ARGS, dst));
                }
                let n = (bytes - fl.done).min(COPY_CHUNK);
                let s = mmu.segments(src + fl.done, n, false).map_err(Stop::from)?;
                let d = mmu.segments(dst + fl.done, n, true).map_err(Stop::from)?;
                self.copy_segments(&d, &s).map_err(dma)?;
                fl.done += n;
                Ok(fl.done == bytes)
            }
            Command::Fill {
                dst,
                bytes,
                pattern,
            } => {
                let n = (bytes - fl.done).min(COPY_CHUNK);
                for seg in mmu.segments(dst + fl.done, n, true).map_err(Stop::from)? {
                    match seg.target {
                        Target::Vram(o) => self.vram_fill(o, seg.len, pattern).map_err(broken)?,
                        Target::System(g) => {
                            let buf: Vec<u8> = (0..seg.len)
                                .map(|k| pattern.to_le_bytes()[(k % 4) as usize])
                                .collect();
                            self.write_guest(g, &buf).map_err(dma)?;
                        }
                    }
                }
                fl.done += n;
                Ok(fl.done == bytes)
            }
            Command::Timestamp { dst } => {
                self.write_va(mmu, dst, &self.clock_ns().to_le_bytes())
                    .map_err(Stop::from)?;
                Ok(true)
            }
            Command::Write { dst, value } => {
                self.write_va(mmu, dst, &value.to_le_bytes())
                    .map_err(Stop::from)?;
                Ok(true)
            }
            Command::Kernel(k) => {
                let Some(r) = *resolved else {
                    // Check the operands a bounded part at a time; compute once done.
                    let state = resolving.get_or_insert_with(|| Resolving {
                        ops: k.operands(),
                        offs: Vec::new(),
                        op: 0,
                        at: 0,
                    });
                    if Self::resolve_some(mmu, state)? {
                        *resolved = Some(Self::check_overlap(&k, state)?);
                        *resolving = None;
                    }
                    return Ok(false);
                };
                // Its operands were translated to VRAM once; what the guest's tables
                // say now does not matter, only that those ranges are here.
                if let Some(h) = mmu.here {
                    if !r.operands().iter().all(|o| h.vram_here(o.va, o.bytes)) {
                        return Err(Stop::Missing);
                    }
                }
                let units = k.units();
                let end = (fl.done + k.chunk()).min(units);
                self.backend
                    .kernel(&r, fl.done..end, &mut fl.acc)
                    .map_err(broken)?;
                if let Some((off, len)) = r.written(fl.done..end) {
                    self.dirty.vram_written(off, len);
                }
                fl.done = end;
                if end == units {
                    if let Some(bytes) = r.result_bytes(&fl.acc) {
                        let dst = *r
                            .operands()
                            .last()
                            .map(|o| &o.va)
                            .expect("reductions have a result");
                        self.vram_write(dst, &bytes).map_err(broken)?;
                    }
                    return Ok(true);
                }
                Ok(false)
            }
        }
    }

    /// Checks more of a kernel's operands: each must be one contiguous, accessible VRAM
    /// run. Returns true once all are checked.
    fn resolve_some(mmu: &Mmu, s: &mut Resolving) -> Result<bool, Stop> {
        let mut budget = RESOLVE_PAGES_PER_STEP;
        while s.op < s.ops.len() {
            let o = s.ops[s.op];
            while s.at < o.bytes {
                if budget == 0 {
                    return Ok(false);
                }
                budget -= 1;
                let va =
                    o.va.checked_add(s.at)
                        .ok_or(Stop::Error(err::GPU_FAULT, o.va))?;
                let (t, left) = mmu.translate(va, o.write)?;
                let Target::Vram(off) = t else {
                    return Err(Stop::Error(err::BAD_OPERAND, o.va));
                };
                if s.at == 0 {
                    s.offs.push(off);
                } else if off != s.offs[s.op] + s.at {
                    return Err(Stop::Error(err::BAD_OPERAND, o.va));
                }
                s.at += left.min(o.bytes - s.at);
            }
            s.op += 1;
            s.at = 0;
        }
        Ok(true)
    }

    /// With every operand translated: what a kernel writes must not overlap what it
    /// reads (unless an element-wise kernel works in place on exactly the same range).
    fn check_overlap(k: &Kernel, s: &Resolving) -> Result<Kernel, Stop> {
        let (ops, offs) = (&s.ops, &s.offs);
        for (w, ow) in ops.iter().zip(offs) {
            if !w.write || w.result {
                continue;
            }
            for (r, or) in ops.iter().zip(offs) {
                if r.write {
                    continue;
                }
                let overlap = *ow < or + r.bytes && *or < ow + w.bytes;
                let in_place = k.elementwise() && ow == or && w.bytes == r.bytes;
                if overlap && !in_place {
                    return Err(Stop::Error(err::BAD_OPERAND, w.va));
                }
            }
        }
        Ok(k.with_operands(offs))
    }

    /// Every write the engine makes goes through these four, which record it after it
    /// landed (so a migration that clears the record and then copies a page either sees
    /// the new bytes or sees the page again).
    fn vram_write(&self, off: u64, data: &[u8]) -> Result<(), crate::backend::OutOfRange> {
        self.backend.write(off, data)?;
        self.dirty.vram_written(off, data.len() as u64);
        Ok(())
    }

    fn vram_fill(
        &self,
        off: u64,
        len: u64,
        pattern: u32,
    ) -> Result<(), crate::backend::OutOfRange> {
        self.backend.fill(off, len, pattern)?;
        self.dirty.vram_written(off, len);
        Ok(())
    }

    fn vram_copy(&self, dst: u64, src: u64, len: u64) -> Result<(), crate::backend::OutOfRange> {
        self.backend.copy(dst, src, len)?;
        self.dirty.vram_written(dst, len);
        Ok(())
    }

    fn write_guest(&self, gpa: u64, data: &[u8]) -> Result<(), ()> {
        self.ram
            .write_slice(data, GuestAddress(gpa))
            .map_err(|_| ())?;
        self.dirty.ram_written(gpa, data.len() as u64);
        Ok(())
    }

    fn write_va(&self, mmu: &Mmu, va: u64, data: &[u8]) -> Result<(), crate::mmu::Fault> {
        let mut at = 0usize;
        for seg in mmu.segments(va, data.len() as u64, true)? {
            let part = &data[at..at + seg.len as usize];
            let ok = match seg.target {
                Target::Vram(o) => self.vram_write(o, part).is_ok(),
                Target::System(g) => self.write_guest(g, part).is_ok(),
            };
            if !ok {
                return Err(crate::mmu::Fault::at(va + at as u64));
            }
            at += seg.len as usize;
        }
        Ok(())
    }

    /// Copies between two segment lists that cover the same number of bytes.
    fn copy_segments(
        &self,
        dst: &[crate::mmu::Segment],
        src: &[crate::mmu::Segment],
    ) -> Result<(), ()> {
        let (mut di, mut si, mut doff, mut soff) = (0, 0, 0u64, 0u64);
        let mut bounce = Vec::new();
        while di < dst.len() && si < src.len() {
            let n = (dst[di].len - doff).min(src[si].len - soff);
            let at = |t: Target, off: u64| match t {
                Target::Vram(o) => Target::Vram(o + off),
                Target::System(g) => Target::System(g + off),
            };
            match (at(dst[di].target, doff), at(src[si].target, soff)) {
                (Target::Vram(d), Target::Vram(s)) => self.vram_copy(d, s, n).map_err(|_| ())?,
                (d, s) => {
                    bounce.resize(n as usize, 0);
                    match s {
                        Target::Vram(o) => self.backend.read(o, &mut bounce).map_err(|_| ())?,
                        Target::System(g) => self
                            .ram
                            .read_slice(&mut bounce, GuestAddress(g))
                            .map_err(|_| ())?,
                    }
                    match d {
                        Target::Vram(o) => self.vram_write(o, &bounce).map_err(|_| ())?,
                        Target::System(g) => self.write_guest(g, &bounce)?,
                    }
                }
            }
            doff += n;
            soff += n;
            if doff == dst[di].len {
                di += 1;
                doff = 0;
            }
            if soff == src[si].len {
                si += 1;
                soff = 0;
            }
        }
        Ok(())
    }
}
