//! A virtual function: its registers, its command ring in guest memory, its GPU address
//! space, and the engine thread that runs its commands in chunks.
//!
//! Threads: vCPU threads call `mmio_read`/`mmio_write` (and block in `WAIT_FENCE`); the
//! engine thread takes entries from the ring, holds the shared engine only while it runs
//! chunks, and parks at a chunk boundary when held. Everything the guest can influence
//! is checked; a bad command sets ERROR on this VF and stops its ring at that entry.
//!
//! For migration the model itself records what the engine writes (`dirty`): VRAM pages
//! and guest pages (DMA), at the point where it has translated a range and written it,
//! so a backend on a real GPU is tracked the same way. Its state (`VfState`) is plain
//! data, and restoring one re-checks it like fresh guest input.

use crate::abi::{self, control, err, irq, reg, status, ENTRY_SIZE};
use crate::backend::{Acc, Backend};
use crate::command::{self, Command, Entry, Kernel, Operand};
use crate::dirty::Tracking;
use crate::mmu::{GuestRam, Mmu, Target};
use crate::sched::{self, Arbiter};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// Bytes a copy or fill moves per chunk.
pub const COPY_CHUNK: u64 = 256 << 10;
/// Page translations one engine step makes while it checks a kernel's operands: a
/// fraction of a millisecond, so even an operand of millions of 4 KiB pages is checked
/// across many preemptible steps.
const RESOLVE_PAGES_PER_STEP: u64 = 8192;
/// The version of `VfState`'s encoding.
pub const STATE_VERSION: u32 = 1;

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
    pub int_status: u64,
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

/// Who holds the engine parked. Each holds it independently: a migration that stops a
/// VM the user had paused leaves it paused when it gives the engine back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hold {
    /// The VM is paused (`vm.pause`).
    User = 1,
    /// A migration or snapshot has stopped the device.
    Migration = 2,
}

/// A command the engine has started and not finished.
#[derive(Clone, Debug, PartialEq)]
struct InFlight {
    index: u64,
    /// The entry as the guest wrote it: what a saved state carries, so that a restore
    /// decodes it with the same checks as a fresh command.
    raw: [u8; ENTRY_SIZE],
    entry: Entry,
    /// Bytes (copy, fill) or units (kernels) done.
    done: u64,
    acc: Acc,
}

/// The in-flight command in a saved state: the raw entry and how far it got.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InFlightState {
    pub index: u64,
    /// The 64-byte ring entry, as eight little-endian words.
    pub entry: [u64; 8],
    pub done: u64,
    pub acc: Acc,
}

/// Everything about a VF except its VRAM contents: enough to go on at the next chunk
/// boundary in another process.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VfState {
    pub regs: Regs,
    pub in_flight: Option<InFlightState>,
    /// The VM's user holds the engine (the VM is paused): it stays held where the
    /// state is restored, until the VM is resumed there.
    pub user_held: bool,
    /// The GPU clock when saved.
    pub clock_ns: u64,
    pub vram_size: u64,
}

impl VfState {
    /// The state as bytes: the version (u32, little endian), then postcard.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = STATE_VERSION.to_le_bytes().to_vec();
        postcard::to_io(self, &mut out).expect("plain data encodes into a Vec");
        out
    }

    /// Reads `encode`'s bytes; a foreign version or malformed input is an error. What
    /// the values mean is checked by `Vf::restore_state`.
    pub fn decode(bytes: &[u8]) -> Result<VfState, String> {
        let (v, rest) = bytes
            .split_first_chunk::<4>()
            .ok_or("the GPU state is truncated")?;
        let v = u32::from_le_bytes(*v);
        if v != STATE_VERSION {
            return Err(format!(
                "GPU state version {v}; this godwit reads version {STATE_VERSION}"
            ));
        }
        let (s, left): (VfState, _) = postcard::take_from_bytes(rest)
            .map_err(|e| format!("the GPU state is malformed: {e}"))?;
        if !left.is_empty() {
            return Err(format!("{} stray bytes after the GPU state", left.len()));
        }
        Ok(s)
    }
}

fn entry_words(raw: &[u8; ENTRY_SIZE]) -> [u64; 8] {
    core::array::from_fn(|i| u64::from_le_bytes(raw[8 * i..8 * i + 8].try_into().expect("8")))
}

fn entry_bytes(words: &[u64; 8]) -> [u8; ENTRY_SIZE] {
    let mut raw = [0u8; ENTRY_SIZE];
    for (i, w) in words.iter().enumerate() {
        raw[8 * i..8 * i + 8].copy_from_slice(&w.to_le_bytes());
    }
    raw
}

/// The amount of work in a command: bytes for copies and fills, units for kernels, and
/// None for commands that finish in one step (never in flight at a chunk boundary).
fn work(e: &Entry) -> Option<u64> {
    match e.cmd {
        Command::Copy { bytes, .. } | Command::Fill { bytes, .. } => Some(bytes),
        Command::Kernel(k) => Some(k.units()),
        _ => None,
    }
}

/// A kernel's operands being checked and translated, a bounded number of pages per
/// engine step. Transient: a restored command starts its check again.
#[derive(Clone, Debug)]
struct Resolving {
    ops: Vec<Operand>,
    /// VRAM offset of each operand checked so far.
    offs: Vec<u64>,
    op: usize,
    /// Bytes of operand `op` found contiguous so far.
    at: u64,
}

struct Inner {
    regs: Regs,
    in_flight: Option<InFlight>,
    /// Operand addresses of the in-flight kernel, translated (not part of the state:
    /// recomputed after a restore).
    resolved: Option<Kernel>,
    resolving: Option<Resolving>,
    /// `Hold` bits; the engine parks while any is set.
    holds: u8,
    parked: bool,
    started: bool,
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
    /// What the engine wrote while a migration watches (KVM's dirty log sees none of it).
    dirty: Tracking,
    irq: Mutex<Option<Arc<dyn IrqLine>>>,
}

/// Why a command stopped early.
enum Stop {
    Error(u32, u64),
}

impl Vf {
    pub fn new(backend: Box<dyn Backend>, ram: GuestRam, arbiter: Box<dyn Arbiter>) -> Arc<Vf> {
        let dirty = Tracking::new(
            backend.vram_size(),
            ram.iter().map(|r| (r.start_addr().0, r.len())),
        );
        Arc::new(Vf {
            inner: Mutex::new(Inner {
                regs: Regs::default(),
                in_flight: None,
                resolved: None,
                resolving: None,
                holds: 0,
                parked: false,
                started: false,
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
            dirty,
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
        self.lock().started = true;
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || vf.engine())
            .inspect_err(|_| self.lock().started = false)
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
        *self
            .clock_offset_ns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            + self.clock0.elapsed().as_nanos() as u64
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

    /// Whether ENABLE would take this ring and page-table root: (ring ok, root ok).
    fn config_ok(&self, r: &Regs) -> (bool, bool) {
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
        (ring_ok, root_ok)
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
            i.resolving = None;
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
            let (ring_ok, root_ok) = self.config_ok(&i.regs);
            if ring_ok && root_ok {
                i.regs.enabled = true;
                i.regs.head = 0;
                i.regs.tail = 0;
            } else {
                let addr = if ring_ok {
                    i.regs.pt_root
                } else {
                    i.regs.ring_base
                };
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

    /// Holds the engine at the next chunk boundary for `who` and returns once it is
    /// parked: from then on it fetches nothing, writes no memory and raises no
    /// interrupt. A command in flight stays in flight (see `save_state`).
    pub fn pause(&self, who: Hold) {
        let mut i = self.lock();
        i.holds |= who as u8;
        self.work.notify_all();
        while i.started && !i.parked && !i.shutdown {
            i = self.done.wait(i).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Releases `who`'s hold; the engine runs again once nobody holds it.
    pub fn resume(&self, who: Hold) {
        self.lock().holds &= !(who as u8);
        self.work.notify_all();
    }

    /// Whether `who` holds the engine.
    pub fn held_by(&self, who: Hold) -> bool {
        self.lock().holds & who as u8 != 0
    }

    fn quiet(i: &Inner) -> Result<(), String> {
        if i.started && !i.parked && !i.shutdown {
            return Err("the GPU engine is running: hold it first".into());
        }
        Ok(())
    }

    /// The VF's state. Only while the engine is held (or not started), so it is final.
    pub fn save_state(&self) -> Result<VfState, String> {
        let i = self.lock();
        Self::quiet(&i)?;
        Ok(VfState {
            regs: i.regs.clone(),
            user_held: i.holds & Hold::User as u8 != 0,
            in_flight: i.in_flight.as_ref().map(|f| InFlightState {
                index: f.index,
                entry: entry_words(&f.raw),
                done: f.done,
                acc: f.acc,
            }),
            clock_ns: self.clock_ns(),
            vram_size: self.backend.vram_size(),
        })
    }

    /// Checks a saved state as hostile input, with the checks a guest's own register
    /// writes and commands get: the result is what the VF may hold, or why not.
    fn check_state(&self, s: &VfState) -> Result<(Regs, Option<InFlight>), String> {
        let r = &s.regs;
        if s.vram_size != self.backend.vram_size() {
            return Err(format!(
                "saved VF has {} bytes of VRAM, this one {}",
                s.vram_size,
                self.backend.vram_size()
            ));
        }
        let code = (r.error & 0xffff_ffff) as u32;
        if code > err::BUSY_WRITE {
            return Err(format!("error register holds unknown code {code}"));
        }
        if (r.int_status | r.int_mask) & !irq::ALL != 0 {
            return Err("interrupt registers hold undefined causes".into());
        }
        if r.enabled {
            let (ring_ok, root_ok) = self.config_ok(r);
            if !ring_ok {
                return Err(format!(
                    "ring of {} entries at {:#x} is not one this VM's VF could enable",
                    r.ring_size, r.ring_base
                ));
            }
            if !root_ok {
                return Err(format!("page-table root {:#x} is outside VRAM", r.pt_root));
            }
            if r.head >= r.ring_size || r.tail >= r.ring_size {
                return Err(format!(
                    "ring head {} or tail {} outside a ring of {}",
                    r.head, r.tail, r.ring_size
                ));
            }
        } else if r.head != 0 || r.tail != 0 {
            return Err("a disabled VF has a non-empty ring".into());
        }
        let Some(f) = &s.in_flight else {
            return Ok((r.clone(), None));
        };
        if !r.enabled || r.error != 0 {
            return Err(
                "a command in flight on a VF that is disabled or stopped by an error".into(),
            );
        }
        if f.index != r.head {
            return Err(format!(
                "the command in flight is entry {}, the ring head {}",
                f.index, r.head
            ));
        }
        let raw = entry_bytes(&f.entry);
        let entry = command::decode(&raw).map_err(|e| {
            format!(
                "the command in flight does not decode: {} (value {:#x})",
                err::name(e.code),
                e.value
            )
        })?;
        let total = work(&entry).ok_or("a single-step command cannot be in flight")?;
        let aligned = match entry.cmd {
            Command::Fill { .. } => f.done.is_multiple_of(4),
            _ => true,
        };
        if f.done > total || !aligned {
            return Err(format!(
                "the command in flight has done {} of {total}",
                f.done
            ));
        }
        Ok((
            r.clone(),
            Some(InFlight {
                index: f.index,
                raw,
                entry,
                done: f.done,
                acc: f.acc,
            }),
        ))
    }

    /// Loads a saved state (engine held, or not started); VRAM is the caller's. The
    /// state is checked whole first: a bad one is refused and changes nothing.
    pub fn restore_state(&self, s: &VfState) -> Result<(), String> {
        let (regs, in_flight) = self.check_state(s)?;
        let mut i = self.lock();
        Self::quiet(&i)?;
        i.regs = regs;
        i.in_flight = in_flight;
        i.resolved = None;
        i.resolving = None;
        if s.user_held {
            i.holds |= Hold::User as u8;
        } else {
            i.holds &= !(Hold::User as u8);
        }
        *self
            .clock_offset_ns
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = s
            .clock_ns
            .saturating_sub(self.clock0.elapsed().as_nanos() as u64);
        drop(i);
        self.work.notify_all();
        Ok(())
    }

    /// Starts recording the VRAM pages the engine writes, from none.
    pub fn start_vram_tracking(&self) {
        self.dirty.start_vram();
    }

    pub fn stop_vram_tracking(&self) {
        self.dirty.stop_vram();
    }

    /// Starts recording the guest pages the engine writes (DMA), from none.
    pub fn start_dma_tracking(&self) {
        self.dirty.start_ram();
    }

    pub fn stop_dma_tracking(&self) {
        self.dirty.stop_ram();
    }

    /// VRAM pages the engine wrote since the last take (bit i = page i), now cleared.
    pub fn take_vram_dirty(&self) -> Vec<u64> {
        self.dirty.vram.take()
    }

    /// The same without clearing.
    pub fn peek_vram_dirty(&self) -> Vec<u64> {
        self.dirty.vram.peek()
    }

    /// Guest pages the engine wrote (DMA) since the last take, one bitmap per region of
    /// its VM's RAM in order, now cleared.
    pub fn take_dma_dirty(&self) -> Vec<Vec<u64>> {
        self.dirty.ram.iter().map(|r| r.bits.take()).collect()
    }

    /// The same without clearing.
    pub fn peek_dma_dirty(&self) -> Vec<Vec<u64>> {
        self.dirty.ram.iter().map(|r| r.bits.peek()).collect()
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
                    if i.holds != 0 {
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
                i.holds != 0 || i.shutdown || !Self::has_work(&i)
            };
            let Some(slice) = self.arbiter.acquire(&stop) else {
                continue;
            };
            // Run chunks until the slice ends, the work runs out, or a hold.
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
        let (mut fl, mut resolved, mut resolving, root, generation) = {
            let mut i = self.lock();
            if !Self::has_work(&i) || i.holds != 0 {
                return false;
            }
            if i.in_flight.is_none() {
                let index = i.regs.head;
                let mut raw = [0u8; ENTRY_SIZE];
                let at = i.regs.ring_base + index * ENTRY_SIZE as u64;
                if self.ram.read_slice(&mut raw, GuestAddress(at)).is_err() {
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
                i.resolving.clone(),
                i.regs.pt_root,
                i.generation,
            )
        };
        let mmu = Mmu {
            backend: &*self.backend,
            ram: &self.ram,
            root,
        };
        let result = self.run_chunk(&mmu, &mut fl, &mut resolved, &mut resolving);
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

    /// Runs one chunk of `fl`; Ok(true) when the command is complete.
    fn run_chunk(
        &self,
        mmu: &Mmu,
        fl: &mut InFlight,
        resolved: &mut Option<Kernel>,
        resolving: &mut Option<Resolving>,
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
                    .map_err(fault)?;
                Ok(true)
            }
            Command::Write { dst, value } => {
                self.write_va(mmu, dst, &value.to_le_bytes())
                    .map_err(fault)?;
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
                let (t, left) = mmu
                    .translate(va, o.write)
                    .map_err(|f| Stop::Error(err::GPU_FAULT, f.va))?;
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
