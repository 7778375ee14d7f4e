//! A virtual function: its registers, its command ring in guest memory, its GPU address
//! space, and the engine thread that runs its commands in chunks. This file holds the
//! registers and what the guest and VMM do to them; `engine` runs the commands;
//! `state` is what a migration saves, restores and reads.
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
use crate::command::{Entry, Kernel};
use crate::dirty::Tracking;
use crate::mmu::GuestRam;
use crate::sched::{self, Arbiter};
use engine::Resolving;
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

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

/// Whether ERROR holds a failed command's error (with its ring index), not one a
/// register write set (index 0xffff_ffff). A failed command leaves nothing in flight
/// and is skipped by CLEAR_ERROR; a register write's error leaves the ring as it was.
fn command_failed(error: u64) -> bool {
    error != 0 && error >> 32 != 0xffff_ffff
}

mod engine;
pub mod fuzz;
mod prefetch;
mod state;

pub use prefetch::Prefetch;
pub use state::{InFlightState, VfState, STATE_VERSION};

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
    /// Off the engine until then (its share is capped: `cap`).
    rest_until: Option<Instant>,
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
    cap: sched::Cap,
    irq: Mutex<Option<Arc<dyn IrqLine>>>,
    /// Post-copy: the pages that may be missing, brought in before a command runs.
    prefetch: Mutex<Option<(Arc<dyn Prefetch>, bool)>>,
    /// The command last brought in.
    prefetched: Mutex<Option<prefetch::Brought>>,
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
                rest_until: None,
            }),
            work: Condvar::new(),
            done: Condvar::new(),
            backend,
            ram,
            arbiter,
            clock0: Instant::now(),
            clock_offset_ns: Mutex::new(0),
            dirty,
            cap: sched::Cap::default(),
            irq: Mutex::new(None),
            prefetch: Mutex::new(None),
            prefetched: Mutex::new(None),
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

    /// Starts the engine thread. It holds a reference until `shutdown`. The thread runs
    /// `first` before it reads a command (the VMM holds it to the calls an engine
    /// makes): its error is this call's, and the engine never runs.
    pub fn start(
        self: &Arc<Vf>,
        name: &str,
        first: impl FnOnce() -> Result<(), String> + Send + 'static,
    ) -> std::io::Result<JoinHandle<()>> {
        let vf = self.clone();
        self.lock().started = true;
        let (ready, readied) = std::sync::mpsc::sync_channel(1);
        let started = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let r = first();
                let ok = r.is_ok();
                let _ = ready.send(r);
                if ok {
                    vf.engine();
                }
            })
            .and_then(|t| match readied.recv() {
                Ok(Ok(())) => Ok(t),
                Ok(Err(e)) => {
                    let _ = t.join();
                    Err(std::io::Error::other(e))
                }
                Err(_) => {
                    let _ = t.join();
                    Err(std::io::Error::other(
                        "the engine thread failed as it started",
                    ))
                }
            });
        started.inspect_err(|_| self.lock().started = false)
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

    /// The GPU clock: a 64-bit nanosecond counter that wraps, as hardware's do. It
    /// goes on from a restored state's, and a hostile state's near the top only makes
    /// its own guest's clock wrap (it once overflowed the addition).
    pub fn clock_ns(&self) -> u64 {
        self.clock_offset_ns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .wrapping_add(self.clock0.elapsed().as_nanos() as u64)
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

    /// Records the first error since the last clear (`index` u64::MAX: not a ring
    /// entry's, but a register write's; see `command_failed`).
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
            let failed_in_ring = command_failed(i.regs.error);
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

    /// Caps the engine share: held back `pct` percent of the time (0: no cap).
    pub fn cap_engine(&self, pct: u32) {
        self.cap.set(pct);
        self.arbiter.capped(self.cap.pct());
        if pct == 0 {
            self.lock().rest_until = None;
            self.work.notify_all();
        }
    }

    pub fn engine_cap(&self) -> u32 {
        self.cap.pct()
    }

    /// Whether `who` holds the engine.
    pub fn held_by(&self, who: Hold) -> bool {
        self.lock().holds & who as u8 != 0
    }
}
