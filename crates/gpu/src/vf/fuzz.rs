//! For the fuzz targets (fuzz/): a VF driven by hostile bytes the way a guest drives
//! it, through register writes, ring entries in its RAM and page tables in its VRAM,
//! with its engine stepped on the calling thread (no engine thread, so a run is
//! repeatable), migrated mid-way, and restored from hostile saved states. What must
//! hold whatever the guest (or the stream) does:
//! - the model hands the backend no access outside VRAM (it checks every range first);
//! - every VRAM and guest page the engine changes is in its record of writes, or a
//!   migration that relies on the record would leave the old bytes at the destination;
//! - a state the VF saved is one a VF restores, at any point (or the guest could make
//!   its own VM unmovable), and the restored VF holds the same registers;
//! - a VF migrated mid-way and the one it left, given the same operations after, stay
//!   the same: registers, command in flight, and memory (unless a TIMESTAMP wrote its
//!   clock there, or the guest changed the page tables under its own kernel, whose
//!   operands the new VF translates again);
//! - a hostile saved state is refused and changes nothing, or is taken and run under
//!   all these checks;
//! - no interrupt is lost: a cause that becomes pending and enabled sends a message;
//! - the ring head stays inside the ring, and the VF still computes right after RESET;
//! - the migrated VF, a post-copy destination whose memory has not come, brings in what
//!   each command touches before it runs it (`postcopy`).
//!
//! The input is a list of operations, one byte each and then its arguments (see
//! `engine`); `seeds` builds the corpus's starting points.

use super::{IrqLine, Vf};
use crate::abi::{control, kernel, op, pte, reg, ENTRY_SIZE};
use crate::backend::{Acc, Aperture, Backend, OutOfRange};
use crate::command::{encode, Command, Kernel};
use crate::cpu::CpuBackend;
use crate::mmu::GuestRam;
use crate::sched::Unshared;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

const PAGE: u64 = 4096;
/// 32 pages: small enough that no operand is slow, large enough for tables and data.
pub const VRAM: u64 = 32 * PAGE;
/// Guest RAM: two regions side by side (a DMA write may run from one into the next)
/// and one after a gap.
pub const RAM: [(u64, u64); 3] = [(0, 8 * PAGE), (8 * PAGE, 8 * PAGE), (1 << 20, 8 * PAGE)];
/// Operations taken from one input, and engine steps per run: bounds on its time.
const MAX_OPS: usize = 1024;
const MAX_STEPS: usize = 64;

/// The seeds' page tables: the root and an L1 and an L0 table in the last three VRAM
/// pages, mapping VA 0.. to the first 29 VRAM pages (writable) and `SYS`.. to the 24
/// RAM pages in order (writable; the first two regions are contiguous), and `RO` to
/// VRAM page 0 read-only.
pub const ROOT: u64 = VRAM - 3 * PAGE;
pub const SYS: u64 = 64 * PAGE;
pub const RO: u64 = 128 * PAGE;
/// Where the seeds put the ring (16 entries, in RAM page 0).
pub const RING: u64 = 0;

mod postcopy;
mod seeds;
mod unread;

pub use seeds::seeds;

/// Where a `Guarded` backend notes the VRAM ranges it is handed, while it is asked to.
type Seen = Arc<Mutex<Option<Vec<(u64, u64)>>>>;

/// Runs `f` and returns the VRAM ranges the backend was handed meanwhile.
fn record<T>(seen: &Seen, f: impl FnOnce() -> T) -> (T, Vec<(u64, u64)>) {
    *seen.lock().unwrap() = Some(Vec::new());
    let r = f();
    (r, seen.lock().unwrap().take().unwrap_or_default())
}

/// Each region of `ram`, whole.
fn ram_bytes(ram: &GuestRam) -> Vec<Vec<u8>> {
    ram.iter()
        .map(|r| {
            let mut b = vec![0u8; r.len() as usize];
            ram.read_slice(&mut b, r.start_addr())
                .expect("a whole region");
            b
        })
        .collect()
}

/// What an input did: for the seeds' own test that they reach what they are for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub completed: u64,
    pub errors: u64,
    pub steps: u64,
    pub migrations: u64,
    /// Hostile states restored (not refused).
    pub tampered: u64,
    /// Engine steps of a migrated VF checked for what post-copy brought in first.
    pub brought_in: u64,
}

/// A backend that counts any access outside VRAM: the model checks every range before
/// it reaches a backend, so one is a broken invariant.
struct Guarded {
    inner: CpuBackend,
    broken: Arc<AtomicBool>,
    seen: Seen,
}

impl Guarded {
    /// Notes [off, off + len) as handed over, if asked to (no more than all of VRAM:
    /// a range beyond it is `broken` anyway).
    fn saw(&self, off: u64, len: u64) {
        if let Some(v) = self.seen.lock().unwrap().as_mut() {
            v.push((off, len.min(VRAM)));
        }
    }

    fn note<T>(&self, r: Result<T, OutOfRange>) -> Result<T, OutOfRange> {
        if r.is_err() {
            self.broken.store(true, Ordering::SeqCst);
        }
        r
    }
}

impl Backend for Guarded {
    fn name(&self) -> &'static str {
        "guarded"
    }
    fn vram_size(&self) -> u64 {
        self.inner.vram_size()
    }
    fn aperture(&self) -> Option<Aperture> {
        self.inner.aperture()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), OutOfRange> {
        self.saw(offset, buf.len() as u64);
        self.note(self.inner.read(offset, buf))
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), OutOfRange> {
        self.saw(offset, data.len() as u64);
        self.note(self.inner.write(offset, data))
    }
    fn fill(&self, offset: u64, len: u64, pattern: u32) -> Result<(), OutOfRange> {
        self.saw(offset, len);
        self.note(self.inner.fill(offset, len, pattern))
    }
    fn copy(&self, dst: u64, src: u64, len: u64) -> Result<(), OutOfRange> {
        self.saw(dst, len);
        self.saw(src, len);
        self.note(self.inner.copy(dst, src, len))
    }
    fn kernel(&self, k: &Kernel, units: Range<u64>, acc: &mut Acc) -> Result<(), OutOfRange> {
        // Its operands, resolved, are VRAM ranges: all of each, a bound on what these
        // units touch.
        for o in k.operands() {
            self.saw(o.va, o.bytes);
        }
        self.note(self.inner.kernel(k, units, acc))
    }
    fn scrub(&self) {
        self.inner.scrub()
    }
    fn resident_bytes(&self) -> u64 {
        self.inner.resident_bytes()
    }
}

/// Counts the VF's interrupt messages.
#[derive(Default)]
struct Irqs(AtomicU64);

impl IrqLine for Irqs {
    fn raise(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// The input, read front to back; past its end every read is 0.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut b = [0u8; N];
        let n = N.min(self.0.len());
        b[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        b
    }
    fn u8(&mut self) -> u8 {
        self.bytes::<1>()[0]
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.bytes())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.bytes())
    }
}

/// A VF with its own VRAM and guest RAM, tracking every engine write.
struct Rig {
    vf: Arc<Vf>,
    ram: GuestRam,
    broken: Arc<AtomicBool>,
    irqs: Arc<Irqs>,
    /// A TIMESTAMP command was taken: memory may hold this VF's clock.
    clock_seen: bool,
    seen: Seen,
    /// A migrated VF: post-copy's destination (see `postcopy`).
    postcopy: Option<postcopy::Destination>,
}

impl Rig {
    fn new() -> Rig {
        let ranges: Vec<_> = RAM
            .iter()
            .map(|&(s, l)| (GuestAddress(s), l as usize))
            .collect();
        let ram = GuestRam::from_ranges(&ranges).expect("guest RAM maps");
        let broken = Arc::new(AtomicBool::new(false));
        let seen = Seen::default();
        let backend = Guarded {
            inner: CpuBackend::new(VRAM).expect("VRAM maps"),
            broken: broken.clone(),
            seen: seen.clone(),
        };
        let vf = Vf::new(Box::new(backend), ram.clone(), Box::new(Unshared));
        vf.start_vram_tracking();
        vf.start_dma_tracking();
        let irqs = Arc::new(Irqs::default());
        vf.connect_irq(irqs.clone());
        Rig {
            vf,
            ram,
            broken,
            irqs,
            clock_seen: false,
            seen,
            postcopy: None,
        }
    }

    fn vram(&self) -> Vec<u8> {
        let mut b = vec![0u8; VRAM as usize];
        self.vf.backend().read(0, &mut b).expect("all of VRAM");
        b
    }

    fn ram_bytes(&self) -> Vec<Vec<u8>> {
        ram_bytes(&self.ram)
    }

    /// The guest wrote its RAM [gpa, gpa + len) (see `postcopy`).
    fn wrote_ram(&mut self, gpa: u64, len: u64) {
        if let Some(pc) = &mut self.postcopy {
            pc.guest_wrote_ram(gpa, len);
        }
    }

    fn write_reg(&self, offset: u64, data: &[u8]) {
        // A WAIT_FENCE returns at once: nothing runs the engine while it would wait.
        self.vf.mmio_write(offset, data, &|| true);
    }

    /// One engine step. Post-copy's destination first brings in what comes next, if
    /// the engine would (`first`: a turn at the GPU begins).
    fn step(&mut self, first: bool) -> bool {
        match &mut self.postcopy {
            Some(pc) => {
                pc.turn(&self.vf, &self.seen, first);
                pc.step(&self.vf, &self.seen, &self.ram)
            }
            None => self.vf.step(),
        }
    }

    /// Runs up to `steps` engine steps and checks that what changed was recorded.
    fn run(&mut self, steps: usize, out: &mut Outcome) {
        if !Vf::has_work(&self.vf.lock()) {
            return;
        }
        self.vf.take_vram_dirty();
        self.vf.take_dma_dirty();
        let (vram0, ram0) = (self.vram(), self.ram_bytes());
        let before = self.vf.regs();
        for k in 0..steps {
            // As the engine thread does: the interrupt a step made due goes after it,
            // whether or not there is more (a step that fails a command has none).
            let more = self.step(k == 0);
            self.vf.deliver_irq();
            out.steps += 1;
            if let Some(f) = &self.vf.lock().in_flight {
                self.clock_seen |= matches!(f.entry.cmd, Command::Timestamp { .. });
            }
            if !more {
                break;
            }
        }
        // As the engine thread does before it waits for the GPU again, it brings in what
        // comes next now; the guest runs on meanwhile (the operations before the next
        // run) and may rewrite what was read.
        if let Some(pc) = &mut self.postcopy {
            pc.turn(&self.vf, &self.seen, true);
        }
        let after = self.vf.regs();
        out.completed += after.completed.saturating_sub(before.completed);
        out.errors += u64::from(after.error != 0 && before.error == 0);
        assert!(
            !after.enabled || after.head < after.ring_size,
            "ring head {} outside a ring of {}",
            after.head,
            after.ring_size
        );
        let dirty = self.vf.take_vram_dirty();
        for (p, (a, b)) in vram0
            .chunks(PAGE as usize)
            .zip(self.vram().chunks(PAGE as usize))
            .enumerate()
        {
            assert!(
                a == b || dirty[p / 64] >> (p % 64) & 1 == 1,
                "the engine changed VRAM page {p} and did not record it"
            );
        }
        let dirty = self.vf.take_dma_dirty();
        for (r, (a, b)) in ram0.iter().zip(self.ram_bytes()).enumerate() {
            for (p, (x, y)) in a
                .chunks(PAGE as usize)
                .zip(b.chunks(PAGE as usize))
                .enumerate()
            {
                assert!(
                    x == y || dirty[r][p / 64] >> (p % 64) & 1 == 1,
                    "the engine changed page {p} of RAM region {r} and did not record it"
                );
            }
        }
    }

    /// Saves the VF and restores it on a new one with a copy of its memory, as a
    /// migration does. Also says whether the two must go on alike: a kernel's operands,
    /// once translated, are not part of the state, and the new VF translates them again
    /// (here at once, the step its engine would take first), so the two differ where the
    /// guest changed the page tables under its own kernel.
    fn migrate(&self, out: &mut Outcome) -> (Rig, bool) {
        let s = self
            .vf
            .save_state()
            .expect("a VF with no engine thread saves");
        let s2 = super::VfState::decode(&s.encode()).expect("a saved state decodes");
        let mut to = Rig::new();
        to.vf.backend().write(0, &self.vram()).expect("all of VRAM");
        for (r, b) in self.ram.iter().zip(self.ram_bytes()) {
            to.ram.write_slice(&b, r.start_addr()).expect("a region");
        }
        if let Err(e) = to.vf.restore_state(&s2) {
            panic!("a state the VF saved was refused: {e}\n{s:?}");
        }
        let back = to.vf.save_state().expect("saves");
        assert_eq!(back.regs, s.regs, "the restored VF's registers differ");
        assert_eq!(
            flight_bits(&back.in_flight),
            flight_bits(&s.in_flight),
            "the restored command differs"
        );
        out.migrations += 1;
        to.clock_seen = self.clock_seen;
        let (resolved, resolving) = {
            let i = self.vf.lock();
            (i.resolved, i.resolving.is_some())
        };
        let alike = match resolved {
            Some(k) if !resolving => {
                to.vf.step();
                to.vf.lock().resolved == Some(k)
            }
            _ => !resolving,
        };
        (to, alike)
    }

    /// RESET, the seeds' tables and ring, and a sum the VF must get right.
    fn still_computes(&mut self) {
        self.write_reg(reg::CONTROL, &control::RESET.to_le_bytes());
        for (off, v) in tables() {
            self.vf
                .backend()
                .write(off, &v.to_le_bytes())
                .expect("VRAM");
        }
        for (r, v) in [
            (reg::RING_BASE, RING),
            (reg::RING_SIZE, 16),
            (reg::PT_ROOT, ROOT),
        ] {
            self.write_reg(r, &v.to_le_bytes());
        }
        self.write_reg(
            reg::CONTROL,
            &(control::CLEAR_ERROR | control::ENABLE).to_le_bytes(),
        );
        let one = 1.0f32.to_bits() as u64;
        let cmds = [
            encode(op::FILL, None, [0, 4096, one, 0, 0, 0]),
            encode(
                op::KERNEL,
                Some(7),
                [kernel::REDUCE_SUM, 0, 1024, 8192, 0, 0],
            ),
        ];
        for (k, e) in cmds.iter().enumerate() {
            self.ram
                .write_slice(e, GuestAddress(RING + k as u64 * ENTRY_SIZE as u64))
                .expect("RAM");
        }
        self.write_reg(reg::RING_TAIL, &2u64.to_le_bytes());
        // Post-copy may stop a step or two to bring in what the next one touches.
        let mut n = 0;
        while self.step(n == 0) {
            n += 1;
            assert!(n < 32, "two small commands took more than 32 steps");
        }
        let r = self.vf.regs();
        assert_eq!(
            (r.error, r.fence),
            (0, 7),
            "after RESET the VF fails: {r:?}"
        );
        let mut s = [0u8; 8];
        self.vf.backend().read(8192, &mut s).expect("VRAM");
        assert_eq!(
            f64::from_le_bytes(s),
            1024.0,
            "after RESET the VF sums wrong"
        );
    }
}

/// The seeds' page tables, as (VRAM offset, entry).
fn tables() -> Vec<(u64, u64)> {
    let (l1, l0) = (ROOT + PAGE, ROOT + 2 * PAGE);
    let mut t = vec![(ROOT, l1 | pte::VALID), (l1, l0 | pte::VALID)];
    for p in 0..29 {
        t.push((l0 + p * 8, (p * PAGE) | pte::VALID | pte::WRITE));
    }
    let ram_pages = RAM
        .iter()
        .flat_map(|&(s, l)| (0..l / PAGE).map(move |p| s + p * PAGE));
    for (k, gpa) in ram_pages.enumerate() {
        let e = gpa | pte::VALID | pte::WRITE | pte::SYSTEM;
        t.push((l0 + (SYS / PAGE + k as u64) * 8, e));
    }
    t.push((l0 + RO / PAGE * 8, pte::VALID));
    t
}

/// One operation of an input (see `engine`).
#[derive(Debug)]
enum Op {
    PokeVram(u64, u64),
    PokeRam(u64, u64),
    Entry(u64, [u8; ENTRY_SIZE]),
    WriteReg(u64, [u8; 8], usize),
    ReadReg(u64, usize),
    Run(usize),
    Migrate,
    Submit(u16, u8, [u64; 6]),
    Tamper(u8, u64),
}

impl Op {
    fn read(input: &mut Input) -> Op {
        match input.u8() % 9 {
            0 => Op::PokeVram((u64::from(input.u32()) % VRAM) & !7, input.u64()),
            1 => {
                let off = (u64::from(input.u32()) % (24 * PAGE)) & !7;
                let (start, _) = RAM[(off / (8 * PAGE)) as usize];
                Op::PokeRam(start + off % (8 * PAGE), input.u64())
            }
            2 => Op::Entry(u64::from(input.u8()), input.bytes()),
            3 => {
                let sel = input.u8();
                let v = input.u64().to_le_bytes();
                let (offset, width) = if sel & 0x40 != 0 {
                    (u64::from(sel) * 37 % 0x1010, 1 + usize::from(sel % 8))
                } else if sel & 0x20 != 0 {
                    (u64::from(sel & 0x1f) * 8 + 4, 4)
                } else {
                    (
                        u64::from(sel & 0x1f) * 8,
                        if sel & 0x80 != 0 { 4 } else { 8 },
                    )
                };
                Op::WriteReg(offset, v, width)
            }
            4 => {
                let sel = input.u8();
                Op::ReadReg(
                    u64::from(sel & 0x3f) * 4,
                    [1, 2, 4, 8][usize::from(sel >> 6)],
                )
            }
            5 => Op::Run(usize::from(input.u8()) % MAX_STEPS + 1),
            6 => Op::Migrate,
            8 => Op::Tamper(input.u8(), input.u64()),
            _ => {
                let (opc, fence) = (u16::from(input.u8() % 8), input.u8());
                let mut args = [0u64; 6];
                for a in args.iter_mut() {
                    *a = u64::from(input.u32());
                }
                Op::Submit(opc, fence, args)
            }
        }
    }
}

impl Rig {
    /// Applies `op`, and checks that no interrupt was lost: a cause that became
    /// pending and enabled sent a message (see `abi::irq`).
    fn apply(&mut self, op: &Op, out: &mut Outcome) {
        let pending = |r: &Rig| {
            let r = r.vf.regs();
            r.int_status & r.int_mask
        };
        let (before, sent) = (pending(self), self.irqs.0.load(Ordering::SeqCst));
        self.apply_op(op, out);
        let new = pending(self) & !before;
        assert!(
            new == 0 || self.irqs.0.load(Ordering::SeqCst) > sent,
            "interrupt causes {new:#x} became pending and enabled, and no message went: {op:?}"
        );
    }

    fn apply_op(&mut self, op: &Op, out: &mut Outcome) {
        match *op {
            Op::PokeVram(off, v) => {
                self.vf
                    .backend()
                    .write(off, &v.to_le_bytes())
                    .expect("VRAM");
                if let Some(pc) = &mut self.postcopy {
                    pc.guest_wrote_vram(off, 8);
                }
            }
            Op::PokeRam(gpa, v) => {
                self.ram.write_obj(v, GuestAddress(gpa)).expect("RAM");
                self.wrote_ram(gpa, 8);
            }
            Op::Entry(slot, e) => {
                let r = self.vf.regs();
                let at = r.ring_base.wrapping_add(slot % r.ring_size.max(1) * 64);
                let _ = self.ram.write_slice(&e, GuestAddress(at));
                self.wrote_ram(at, 64);
            }
            Op::WriteReg(offset, v, width) => {
                self.write_reg(offset, &v[..width]);
            }
            Op::ReadReg(offset, width) => self.vf.mmio_read(offset, &mut [0u8; 8][..width]),
            Op::Run(steps) => self.run(steps, out),
            Op::Migrate | Op::Tamper(..) => unreachable!("the caller does these"),
            Op::Submit(opc, fence, args) => {
                let r = self.vf.regs();
                let e = encode(opc, (fence != 0).then_some(u64::from(fence)), args);
                let at = r.ring_base.wrapping_add(r.tail * 64);
                let _ = self.ram.write_slice(&e, GuestAddress(at));
                self.wrote_ram(at, 64);
                let tail = (r.tail + 1) % r.ring_size.max(1);
                self.write_reg(reg::RING_TAIL, &tail.to_le_bytes());
            }
        }
    }

    /// Restores the VF's own state with one field set to `v` (`field % 20` picks it;
    /// a command in flight is made up from the ring entry at the head if there is
    /// none): it is refused and changes nothing, or taken, and the engine goes on from
    /// it under the same checks. A VF restored as paused (`user_held`) is resumed, as
    /// its VM would be.
    fn tamper(&mut self, field: u8, v: u64, out: &mut Outcome) {
        let good = self
            .vf
            .save_state()
            .expect("a VF with no engine thread saves");
        let mut s = good.clone();
        let r = &mut s.regs;
        match field % 20 {
            0 => r.enabled = v & 1 != 0,
            1 => r.error = v,
            2 => r.error_addr = v,
            3 => r.ring_base = v,
            4 => r.ring_size = v,
            5 => r.head = v,
            6 => r.tail = v,
            7 => r.fence = v,
            8 => r.pt_root = v,
            9 => r.completed = v,
            10 => r.int_status = v,
            11 => r.int_mask = v,
            12 => s.user_held = v & 1 != 0,
            13 => s.vram_size = v,
            14 => s.clock_ns = v,
            f => {
                let at = r.ring_base.wrapping_add(r.head.wrapping_mul(64));
                let mut raw = [0u8; ENTRY_SIZE];
                let _ = self.ram.read_slice(&mut raw, GuestAddress(at));
                let index = r.head;
                let fl = s.in_flight.get_or_insert_with(|| super::InFlightState {
                    index,
                    entry: std::array::from_fn(|k| {
                        u64::from_le_bytes(raw[8 * k..8 * k + 8].try_into().expect("8"))
                    }),
                    done: 0,
                    acc: Acc::default(),
                });
                match f {
                    15 => fl.index = v,
                    16 => fl.done = v,
                    17 => fl.acc.u = v,
                    18 => fl.acc.f = f64::from_bits(v),
                    _ => fl.entry[usize::from(field / 20 % 8)] = v,
                }
            }
        }
        match self.vf.restore_state(&s) {
            Ok(()) => {
                self.vf.resume(super::Hold::User);
                out.tampered += 1;
            }
            Err(_) => {
                let now = self.vf.save_state().expect("saves");
                assert_eq!(
                    (now.regs, flight_bits(&now.in_flight), now.user_held),
                    (good.regs, flight_bits(&good.in_flight), good.user_held),
                    "a refused state changed the VF"
                );
            }
        }
    }

    /// The migrated VF and the one it came from, given the same operations since, are
    /// in the same state: registers (but for engine time), the command in flight, and
    /// memory, unless a TIMESTAMP wrote either clock into it.
    fn same_as(&self, twin: &Rig) {
        let (mut a, mut b) = (self.vf.regs(), twin.vf.regs());
        (a.engine_ns, b.engine_ns) = (0, 0);
        assert_eq!(a, b, "migrated and unmoved VFs' registers differ");
        let fl = |r: &Rig| {
            let i = r.vf.lock();
            let f = i.in_flight.as_ref();
            f.map(|f| (f.index, f.raw, f.done, f.acc.f.to_bits(), f.acc.u))
        };
        assert_eq!(
            fl(self),
            fl(twin),
            "migrated and unmoved VFs' commands differ"
        );
        if !self.clock_seen && !twin.clock_seen {
            assert!(
                self.vram() == twin.vram(),
                "migrated and unmoved VRAM differ"
            );
            assert!(
                self.ram_bytes() == twin.ram_bytes(),
                "migrated and unmoved guest RAM differ"
            );
        }
    }
}

/// A command in flight, compared by its bits: its accumulator may be NaN (a kernel's
/// sum, or a hostile state's), which is not equal to itself.
fn flight_bits(f: &Option<super::InFlightState>) -> Option<(u64, [u64; 8], u64, u64, u64)> {
    f.as_ref()
        .map(|f| (f.index, f.entry, f.done, f.acc.f.to_bits(), f.acc.u))
}

/// Runs the operations in `data`:
/// - 0 `off: u32, v: u64`: the guest writes `v` to VRAM (through its aperture);
/// - 1 `off: u32, v: u64`: the guest writes `v` to its RAM (`off` over all regions);
/// - 2 `slot: u8, entry: [u8; 64]`: the guest writes a ring entry at RING_BASE;
/// - 3 `sel: u8, v: u64`: a register write (`sel` picks the register, half, width);
/// - 4 `sel: u8`: a register read;
/// - 5 `n: u8`: the engine runs up to n % 64 + 1 steps, then the record is checked;
/// - 6: the VF is migrated; the one it left goes on beside it, given the same
///   operations, and each run compares the two;
/// - 7 `op: u8, fence: u8, args: [u32; 6]`: a ring entry from small numbers (opcode
///   `op % 8`, no fence if 0) written at RING_TAIL, and the doorbell after it;
/// - 8 `field: u8, v: u64`: the VF's saved state with one field set to `v` (see
///   `tamper`) is restored, as a hostile migration stream would have it.
///
/// then checks the VF still computes after RESET.
pub fn engine(data: &[u8]) -> Outcome {
    let mut input = Input(data);
    let mut rig = Rig::new();
    let mut twin: Option<Rig> = None;
    let mut out = Outcome::default();
    for _ in 0..MAX_OPS {
        if input.0.is_empty() {
            break;
        }
        let op = Op::read(&mut input);
        if let Op::Migrate = op {
            let (mut to, alike) = rig.migrate(&mut out);
            to.postcopy = Some(postcopy::Destination::new(&to.vf));
            let from = std::mem::replace(&mut rig, to);
            out.brought_in += from.postcopy.as_ref().map_or(0, |pc| pc.checked);
            twin = alike.then_some(from);
            continue;
        }
        if let Op::Tamper(field, v) = op {
            // The two part ways here.
            twin = None;
            rig.tamper(field, v, &mut out);
            continue;
        }
        rig.apply(&op, &mut out);
        if let Some(t) = &mut twin {
            t.apply(&op, &mut Outcome::default());
            if let Op::Run(_) = op {
                rig.same_as(t);
            }
        }
    }
    rig.run(MAX_STEPS, &mut out);
    out.brought_in += rig.postcopy.as_ref().map_or(0, |pc| pc.checked);
    for r in std::iter::once(&mut rig).chain(twin.as_mut()) {
        r.still_computes();
        assert!(
            !r.broken.load(Ordering::SeqCst),
            "the model handed its backend an access outside VRAM"
        );
    }
    out
}
