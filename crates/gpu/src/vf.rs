//! A virtual function: its registers, its command ring in guest memory, its GPU address
//! space, and the engine thread that runs its commands in chunks.
//!
//! Threads: vCPU threads call `mmio_read`/`mmio_write` (and block in `WAIT_FENCE`); the
//! engine thread takes entries from the ring, holds the shared engine only while it runs
//! chunks, and parks at a chunk boundary when paused. Everything the guest can influence
//! is checked; a bad command sets ERROR on this VF and stops its ring at that entry.

use crate::abi::{self, control, err, irq, reg, status, ENTRY_SIZE};
use crate::backend::{Acc, Backend};
use crate::command::{self, Command, Entry, Kernel};
use crate::mmu::{GuestRam, Mmu, Target};
use crate::sched::{self, Arbiter};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

/// Bytes a copy or fill moves per chunk.
pub const COPY_CHUNK: u64 = 256 << 10;

/// The registers, as software sees them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Regs {
    pub enabled: bool,
    /// code | ring index << 32; 0 = no error.
    pub error: u64,
    pub error_addr: u64,
    pub ring_base: u64,
    pub ring_size: u64,
    pub head: u64,
    pub tail: u64,
    pub fence: u64,
    pub pt_root: u64,
    pub engine_ns: u64,
    pub completed: u64,
    #[serde(default)]
    pub int_status: u64,
    #[serde(default)]
    pub int_mask: u64,
}

impl Regs {
    /// Makes `cause` pending; true when that must send a message (see `abi::irq`).
    fn raise(&mut self, cause: u64) -> bool {
        let new = cause & self.int_mask & !self.int_status;
        self.int_status |= cause;
        new != 0
    }
}

/// Where a VF's interrupt goes: the VMM turns it into an MSI as the guest programmed it
/// (or drops it while MSI is off). Called from the engine and vCPU threads.
pub trait IrqLine: Send + Sync {
    fn raise(&self);
}

/// A command the engine has started and not finished: enough to go on at the next chunk
/// boundary, here or (for the migration issue) in another process.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InFlight {
    pub index: u64,
    pub entry: Entry,
    /// Bytes (copy, fill) or units (kernels) done.
    pub done: u64,
    pub acc: Acc,
}

/// Everything about a VF except its VRAM contents.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VfState {
    pub regs: Regs,
    pub in_flight: Option<InFlight>,
    /// The GPU clock when saved.
    pub clock_ns: u64,
    pub vram_size: u64,
}

struct Inner {
    regs: Regs,
    in_flight: Option<InFlight>,
    /// Operand addresses of the in-flight kernel, translated (not part of the state:
    /// recomputed after a restore).
    resolved: Option<Kernel>,
    pause: bool,
    parked: bool,
    shutdown: bool,
    /// Bumped by a reset, so a chunk that ran across one is dropped.
    generation: u64,
    /// An interrupt to send once the lock is dropped.
    irq_due: bool,
}

pub struct Vf {
    inner: Mutex<Inner>,
    /// The engine thread waits here for work or a change of state.
    work: Condvar,
    /// Fence waiters and `pause` wait here.
    done: Condvar,
    backend: Box<dyn Backend>,
    ram: GuestRam,
    arbiter: Box<dyn Arbiter>,
    clock0: Instant,
    clock_offset_ns: Mutex<u64>,
    /// Guest pages the engine wrote (DMA): KVM's dirty log does not see them.
    dma_dirty: Mutex<BTreeSet<u64>>,
    irq: Mutex<Option<Arc<dyn IrqLine>>>,
}

/// Why a command stopped early.
enum Stop {
    Error(u32, u64),
}

impl Vf {
    pub fn new(backend: Box<dyn Backend>, ram: GuestRam, arbiter: Box<dyn Arbiter>) -> Arc<Vf> {
        Arc::new(Vf {
            inner: Mutex::new(Inner {
                regs: Regs::default(),
                in_flight: None,
                resolved: None,
                pause: false,
                parked: false,
                shutdown: false,
                generation: 0,
                irq_due: false,
            }),
            work: Condvar::new(),
            done: Condvar::new(),
            backend,
            ram,
            arbiter,
            clock0: Instant::now(),
            clock_offset_ns: Mutex::new(0),
            dma_dirty: Mutex::new(BTreeSet::new()),
            irq: Mutex::new(None),
        })
    }

    /// Connects the VF's interrupt output (before the guest runs).
    pub fn connect_irq(&self, line: Arc<dyn IrqLine>) {
        *self.irq.lock().unwrap_or_else(|e| e.into_inner()) = Some(line);
    }

    /// Sends the interrupt a state change made due. Called without the state lock, so
    /// the VMM's delivery never runs under it.
    fn deliver_irq(&self) {
        if std::mem::take(&mut self.lock().irq_due) {
            if let Some(line) = &*self.irq.lock().unwrap_or_else(|e| e.into_inner()) {
                line.raise();
            }
        }
    }

    /// Starts the engine thread. It holds a reference until `shutdown`.
    pub fn start(self: &Arc<Vf>, name: &str) -> std::io::Result<JoinHandle<()>> {
        let vf = self.clone();
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || vf.engine())
    }

    /// Stops the engine thread for good.
    pub fn shutdown(&self) {
        self.lock().shutdown = true;
        self.work.notify_all();
        self.done.notify_all();
    }

    pub fn backend(&self) -> &dyn Backend {
        &*self.backend
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn clock_ns(&self) -> u64 {
        *self.clock_offset_ns.lock().unwrap() + self.clock0.elapsed().as_nanos() as u64
    }

    pub fn regs(&self) -> Regs {
        self.lock().regs.clone()
    }

    fn status(i: &Inner) -> u64 {
        let mut s = 0;
        if i.regs.enabled {
            s |= status::ENABLED;
        }
        if i.in_flight.is_some() {
            s |= status::BUSY;
        }
        if i.regs.error != 0 {
            s |= status::ERROR;
        }
        s
    }

    fn read_reg(&self, r: u64) -> u64 {
        let i = self.lock();
        match r {
            reg::ID => abi::MAGIC | abi::VERSION << 32,
            reg::VRAM_SIZE => self.backend.vram_size(),
            reg::STATUS => Self::status(&i),
            reg::ERROR => i.regs.error,
            reg::ERROR_ADDR => i.regs.error_addr,
            reg::RING_BASE => i.regs.ring_base,
            reg::RING_SIZE => i.regs.ring_size,
            reg::RING_HEAD => i.regs.head,
            reg::RING_TAIL => i.regs.tail,
            reg::FENCE => i.regs.fence,
            reg::PT_ROOT => i.regs.pt_root,
            reg::TIMESTAMP => self.clock_ns(),
            reg::ENGINE_NS => i.regs.engine_ns,
            reg::COMPLETED => i.regs.completed,
            reg::INT_STATUS => i.regs.int_status,
            reg::INT_MASK => i.regs.int_mask,
            _ => 0,
        }
    }

    /// A register read of 1, 2, 4 or 8 bytes at `offset` in the register BAR.
    pub fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        let n = data.len();
        if !matches!(n, 1 | 2 | 4 | 8)
            || !offset.is_multiple_of(n as u64)
            || offset >= abi::REGS_SIZE
        {
            data.fill(0);
            return;
        }
        let v = self.read_reg(offset & !7) >> ((offset & 7) * 8);
        data.copy_from_slice(&v.to_le_bytes()[..n]);
    }

    /// A register write. `stop` tells a blocking WAIT_FENCE that the vCPU is needed.
    pub fn mmio_write(&self, offset: u64, data: &[u8], stop: &dyn Fn() -> bool) {
        self.write_reg(offset, data, stop);
        self.deliver_irq();
    }

    fn write_reg(&self, offset: u64, data: &[u8], stop: &dyn Fn() -> bool) {
        let n = data.len();
        if !matches!(n, 4 | 8) || !offset.is_multiple_of(n as u64) || offset >= abi::REGS_SIZE {
            return;
        }
        let mut b = [0u8; 8];
        b[..n].copy_from_slice(data);
        let v = u64::from_le_bytes(b);
        let r = offset & !7;
        let high = offset & 4 != 0;
        match r {
            reg::WAIT_FENCE if !high => {
                self.wait_fence(v, Duration::from_nanos(abi::WAIT_MAX_NS), stop)
            }
            reg::CONTROL if !high => self.control(v),
            reg::RING_TAIL if !high => self.set_tail(v),
            reg::INT_STATUS if !high => self.lock().regs.int_status &= !v,
            reg::INT_MASK if !high => {
                let mut i = self.lock();
                let pending_before = i.regs.int_status & i.regs.int_mask;
                i.regs.int_mask = v & irq::ALL;
                if i.regs.int_status & i.regs.int_mask & !pending_before != 0 {
                    i.irq_due = true;
                }
            }
            reg::RING_BASE | reg::RING_SIZE | reg::PT_ROOT => {
                let mut i = self.lock();
                if i.regs.enabled {
                    Self::set_error(&mut i, err::BUSY_WRITE, u64::MAX, r);
                    return;
                }
                let field = match r {
                    reg::RING_BASE => &mut i.regs.ring_base,
                    reg::RING_SIZE => &mut i.regs.ring_size,
                    _ => &mut i.regs.pt_root,
                };
                *field = match (n, high) {
                    (8, _) => v,
                    (_, false) => (*field & !0xffff_ffff) | v,
                    (_, true) => (*field & 0xffff_ffff) | v << 32,
                };
            }
            _ => {}
        }
    }

    /// Records the first error since the last clear.
    fn set_error(i: &mut Inner, code: u32, index: u64, addr: u64) {
        let r = &mut i.regs;
        if r.error == 0 {
            r.error = code as u64 | (index & 0xffff_ffff) << 32;
            r.error_addr = addr;
            i.irq_due |= r.raise(irq::ERROR);
        }
    }

    fn control(&self, v: u64) {
        let mut i = self.lock();
        if v & control::RESET != 0 {
            let keep = (
                i.regs.ring_base,
                i.regs.ring_size,
                i.regs.pt_root,
                i.regs.engine_ns,
                i.regs.int_mask,
            );
            i.regs = Regs::default();
            (
                i.regs.ring_base,
                i.regs.ring_size,
                i.regs.pt_root,
                i.regs.engine_ns,
                i.regs.int_mask,
            ) = keep;
            i.in_flight = None;
            i.resolved = None;
            i.generation += 1;
        }
        if v & control::CLEAR_ERROR != 0 && i.regs.error != 0 {
            let failed_in_ring = i.regs.error >> 32 != 0xffff_ffff;
            i.regs.error = 0;
            i.regs.error_addr = 0;
            if failed_in_ring
                && i.regs.enabled
                && i.in_flight.is_none()
                && i.regs.head != i.regs.tail
            {
                i.regs.head = (i.regs.head + 1) % i.regs.ring_size;
            }
        }
        if v & control::ENABLE != 0 && !i.regs.enabled {
            let r = &i.regs;
            let ring_bytes = r.ring_size.saturating_mul(ENTRY_SIZE as u64);
            let ring_ok = r.ring_size.is_power_of_two()
                && (abi::RING_MIN..=abi::RING_MAX).contains(&r.ring_size)
                && r.ring_base.is_multiple_of(4096)
                && self
                    .ram
                    .check_range(GuestAddress(r.ring_base), ring_bytes as usize);
            let root_ok = r.pt_root.is_multiple_of(4096)
                && r.pt_root
                    .checked_add(4096)
                    .is_some_and(|e| e <= self.backend.vram_size());
            if ring_ok && root_ok {
                i.regs.enabled = true;
                i.regs.head = 0;
                i.regs.tail = 0;
            } else {
                let addr = if ring_ok { r.pt_root } else { r.ring_base };
                Self::set_error(&mut i, err::BAD_RING, u64::MAX, addr);
            }
        }
        drop(i);
        self.work.notify_all();
        self.done.notify_all();
    }

    fn set_tail(&self, v: u64) {
        let mut i = self.lock();
        if !i.regs.enabled || v >= i.regs.ring_size {
            Self::set_error(&mut i, err::BAD_TAIL, u64::MAX, v);
            return;
        }
        i.regs.tail = v;
        drop(i);
        self.work.notify_all();
    }

    /// Blocks until FENCE >= `value`, an error, the VF is disabled, `max` passes or
    /// `stop()`; checks `stop` every quarter millisecond, so a pause is never held up.
    pub fn wait_fence(&self, value: u64, max: Duration, stop: &dyn Fn() -> bool) {
        let end = Instant::now() + max;
        let mut i = self.lock();
        while i.regs.fence < value && i.regs.error == 0 && i.regs.enabled && !i.shutdown && !stop()
        {
            let now = Instant::now();
            if now >= end {
                return;
            }
            i = self
                .done
                .wait_timeout(i, (end - now).min(Duration::from_micros(250)))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Pauses the engine at the next chunk boundary and returns once it is parked. A
    /// command in flight stays in flight (see `save_state`).
    pub fn pause(&self) {
        let mut i = self.lock();
        i.pause = true;
        self.work.notify_all();
        while !i.parked && !i.shutdown {
            i = self.done.wait(i).unwrap_or_else(|e| e.into_inner());
        }
    }

    pub fn resume(&self) {
        self.lock().pause = false;
        self.work.notify_all();
    }

    /// The VF's state. Only meaningful while paused (or before the engine started).
    pub fn save_state(&self) -> VfState {
        let i = self.lock();
        VfState {
            regs: i.regs.clone(),
            in_flight: i.in_flight.clone(),
            clock_ns: self.clock_ns(),
            vram_size: self.backend.vram_size(),
        }
    }

    /// Loads a saved state (paused, or before the engine started); VRAM is the caller's.
    pub fn restore_state(&self, s: &VfState) -> Result<(), String> {
        if s.vram_size != self.backend.vram_size() {
            return Err(format!(
                "saved VF has {} bytes of VRAM, this one {}",
                s.vram_size,
                self.backend.vram_size()
            ));
        }
        let mut i = self.lock();
        i.regs = s.regs.clone();
        i.in_flight = s.in_flight.clone();
        i.resolved = None;
        *self.clock_offset_ns.lock().unwrap() = s
            .clock_ns
            .saturating_sub(self.clock0.elapsed().as_nanos() as u64);
        drop(i);
        self.work.notify_all();
        Ok(())
    }

    /// Guest pages the engine has written since the last call.
    pub fn take_dma_dirty(&self) -> Vec<u64> {
        std::mem::take(&mut *self.dma_dirty.lock().unwrap())
            .into_iter()
            .collect()
    }

    fn has_work(i: &Inner) -> bool {
        i.regs.enabled && i.regs.error == 0 && (i.in_flight.is_some() || i.regs.head != i.regs.tail)
    }

    /// The engine thread.
    fn engine(self: Arc<Vf>) {
        let mut last_beat = Instant::now();
        loop {
            {
                let mut i = self.lock();
                loop {
                    if i.shutdown {
                        i.parked = true;
                        self.done.notify_all();
                        return;
                    }
                    if i.pause {
                        if !i.parked {
                            i.parked = true;
                            self.done.notify_all();
                        }
                    } else {
                        i.parked = false;
                        if Self::has_work(&i) {
                            break;
                        }
                    }
                    i = self
                        .work
                        .wait_timeout(i, Duration::from_millis(100))
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                    if last_beat.elapsed() > Duration::from_millis(100) {
                        drop(i);
                        self.arbiter.heartbeat(self.backend.resident_bytes());
                        last_beat = Instant::now();
                        i = self.lock();
                    }
                }
            }
            let stop = || {
                let i = self.lock();
                i.pause || i.shutdown || !Self::has_work(&i)
            };
            let Some(slice) = self.arbiter.acquire(&stop) else {
                continue;
            };
            // Run chunks until the slice ends, the work runs out, or a pause.
            loop {
                let t0 = Instant::now();
                let more = self.step();
                self.deliver_irq();
                let dt = t0.elapsed().as_nanos() as u64;
                self.arbiter.used(dt);
                self.lock().regs.engine_ns += dt;
                if !more || stop() || sched::now_ns() >= slice.end_ns {
                    break;
                }
            }
            let more = !stop();
            self.arbiter.release(more);
        }
    }

    /// Runs one chunk of the current command (taking the next entry if none is in
    /// flight). Returns whether there may be more to do.
    fn step(&self) -> bool {
        let (mut fl, resolved, root, generation) = {
            let mut i = self.lock();
            if !Self::has_work(&i) || i.pause {
                return false;
            }
            if i.in_flight.is_none() {
                let index = i.regs.head;
                let mut e = [0u8; ENTRY_SIZE];
                let at = i.regs.ring_base + index * ENTRY_SIZE as u64;
                if self.ram.read_slice(&mut e, GuestAddress(at)).is_err() {
                    Self::set_error(&mut i, err::BAD_RING, index, at);
                    self.arbiter.count(false, true);
                    self.done.notify_all();
                    return false;
                }
                match command::decode(&e) {
                    Ok(entry) => {
                        i.in_flight = Some(InFlight {
                            index,
                            acc: match entry.cmd {
                                Command::Kernel(k) => k.initial_acc(),
                                _ => Acc::default(),
                            },
                            entry,
                            done: 0,
                        });
                        i.resolved = None;
                    }
                    Err(d) => {
                        Self::set_error(&mut i, d.code, index, d.value);
                        self.arbiter.count(false, true);
                        self.done.notify_all();
                        return false;
                    }
                }
            }
            (
                i.in_flight.clone().expect("set above"),
                i.resolved,
                i.regs.pt_root,
                i.generation,
            )
        };
        let mmu = Mmu {
            backend: &*self.backend,
            ram: &self.ram,
            root,
        };
        let mut resolved = resolved;
        let result = self.run_chunk(&mmu, &mut fl, &mut resolved);
        let mut i = self.lock();
        if i.generation != generation || i.in_flight.is_none() {
            // Reset while the chunk ran: drop its result.
            return true;
        }
        match result {
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
                    self.arbiter.count(true, false);
                    self.done.notify_all();
                } else {
                    i.in_flight = Some(fl);
                    i.resolved = resolved;
                }
                true
            }
            Err(Stop::Error(code, addr)) => {
                Self::set_error(&mut i, code, fl.index, addr);
                i.in_flight = None;
                i.resolved = None;
                self.arbiter.count(false, true);
                self.done.notify_all();
                false
            }
        }
    }

    /// Runs one chunk of `fl`; Ok(true) when the command is complete.
    fn run_chunk(
        &self,
        mmu: &Mmu,
        fl: &mut InFlight,
        resolved: &mut Option<Kernel>,
    ) -> Result<bool, Stop> {
        let fault = |f: crate::mmu::Fault| Stop::Error(err::GPU_FAULT, f.va);
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
                let s = mmu.segments(src + fl.done, n, false).map_err(fault)?;
                let d = mmu.segments(dst + fl.done, n, true).map_err(fault)?;
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
                for seg in mmu.segments(dst + fl.done, n, true).map_err(fault)? {
                    match seg.target {
                        Target::Vram(o) => {
                            self.backend.fill(o, seg.len, pattern).map_err(broken)?
                        }
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
                    .map_err(fault)?;
                Ok(true)
            }
            Command::Write { dst, value } => {
                self.write_va(mmu, dst, &value.to_le_bytes())
                    .map_err(fault)?;
                Ok(true)
            }
            Command::Kernel(k) => {
                let r = match resolved {
                    Some(r) => *r,
                    None => {
                        let r = Self::resolve(mmu, &k)?;
                        *resolved = Some(r);
                        r
                    }
                };
                let units = k.units();
                let end = (fl.done + k.chunk()).min(units);
                self.backend
                    .kernel(&r, fl.done..end, &mut fl.acc)
                    .map_err(broken)?;
                fl.done = end;
                if end == units {
                    if let Some(bytes) = r.result_bytes(&fl.acc) {
                        let dst = *r
                            .operands()
                            .last()
                            .map(|o| &o.va)
                            .expect("reductions have a result");
                        self.backend.write(dst, &bytes).map_err(broken)?;
                    }
                    return Ok(true);
                }
                Ok(false)
            }
        }
    }

    /// Translates a kernel's operands: each must be one contiguous VRAM run, and what it
    /// writes must not overlap what it reads (unless an element-wise kernel works in
    /// place on exactly the same range).
    fn resolve(mmu: &Mmu, k: &Kernel) -> Result<Kernel, Stop> {
        let ops = k.operands();
        let mut offs = Vec::with_capacity(ops.len());
        for o in &ops {
            match mmu.vram_range(o.va, o.bytes, o.write) {
                Ok(Some(off)) => offs.push(off),
                Ok(None) => return Err(Stop::Error(err::BAD_OPERAND, o.va)),
                Err(f) => return Err(Stop::Error(err::GPU_FAULT, f.va)),
            }
        }
        for (w, ow) in ops.iter().zip(&offs) {
            if !w.write || w.result {
                continue;
            }
            for (r, or) in ops.iter().zip(&offs) {
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
        Ok(k.with_operands(&offs))
    }

    fn write_guest(&self, gpa: u64, data: &[u8]) -> Result<(), ()> {
        self.ram
            .write_slice(data, GuestAddress(gpa))
            .map_err(|_| ())?;
        let mut d = self.dma_dirty.lock().unwrap();
        for p in gpa / 4096..(gpa + data.len() as u64).div_ceil(4096) {
            d.insert(p);
        }
        Ok(())
    }

    fn write_va(&self, mmu: &Mmu, va: u64, data: &[u8]) -> Result<(), crate::mmu::Fault> {
        let mut at = 0usize;
        for seg in mmu.segments(va, data.len() as u64, true)? {
            let part = &data[at..at + seg.len as usize];
            let ok = match seg.target {
                Target::Vram(o) => self.backend.write(o, part).is_ok(),
                Target::System(g) => self.write_guest(g, part).is_ok(),
            };
            if !ok {
                return Err(crate::mmu::Fault { va: va + at as u64 });
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
                (Target::Vram(d), Target::Vram(s)) => self.backend.copy(d, s, n).map_err(|_| ())?,
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
                        Target::Vram(o) => self.backend.write(o, &bounce).map_err(|_| ())?,
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
