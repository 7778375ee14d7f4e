//! The migrated VF as post-copy's destination has it: none of its memory has come
//! yet, and the engine, told to bring in what its next command touches before it runs
//! it (`Vf::prefetch_next`, at the start of each turn at the GPU, whenever
//! `next_not_brought_in` ends one, and after each run, as the engine thread does
//! before it waits for the GPU again), must find every VRAM page a step then touches,
//! and every guest page it changes, here: asked for, read by the prefetch's own walk
//! of the page tables, or written by the guest (whose vCPU faults a page in before it
//! writes it). A page that is not here would be fetched over the network while the
//! engine holds the GPU every VF shares.
//!
//! Not checked: guest RAM that a step only reads (the model reads guest memory
//! directly, past the backend); a command with a range longer than all the memory
//! the VF reaches, which the prefetch brings in only that far; and the steps after
//! the guest did something the prefetch could not have seen, until the next command
//! is brought in: it wrote a page table the walk read or a register that moves the
//! ring or the tables, or a hostile state was restored. The engine then meets
//! pages nobody asked for, as a GPU meets a TLB miss; real post-copy fetches them as
//! they are touched.

use super::{ram_bytes, record, Seen};
use crate::abi::reg;
use crate::command::Command;
use crate::mmu::GuestRam;
use crate::vf::{Prefetch, Vf};
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};

const PAGE: u64 = 4096;

/// The pages here: VRAM page numbers, guest page numbers.
#[derive(Default)]
struct Here {
    vram: Mutex<BTreeSet<u64>>,
    ram: Mutex<BTreeSet<u64>>,
}

/// The page numbers of [at, at + len); the asks and writes come from translated ranges
/// and the harness's small memory, so they are few.
fn pages(at: u64, len: u64) -> impl Iterator<Item = u64> {
    let end = at.saturating_add(len);
    (at / PAGE..end.div_ceil(PAGE)).take_while(move |_| len > 0)
}

impl Prefetch for Here {
    fn active(&self) -> bool {
        true
    }
    fn vram(&self, off: u64, len: u64) {
        self.vram.lock().unwrap().extend(pages(off, len));
    }
    fn ram(&self, gpa: u64, len: u64) {
        self.ram.lock().unwrap().extend(pages(gpa, len));
    }
}

pub(super) struct Destination {
    here: Arc<Here>,
    /// The VRAM pages the last prefetch's walk read (page tables).
    walked: BTreeSet<u64>,
    /// The guest did something the last prefetch could not see (see the module's doc).
    stale: bool,
    /// Steps checked, for the seeds' test.
    pub checked: u64,
}

impl Destination {
    /// `vf` as a post-copy destination that brings in every command first.
    pub fn new(vf: &Vf) -> Destination {
        let here = Arc::new(Here::default());
        vf.set_prefetch(Some(here.clone()), true);
        Destination {
            here,
            walked: BTreeSet::new(),
            stale: false,
            checked: 0,
        }
    }

    /// A turn at the GPU begins (`first`, or the engine would give it up here): what
    /// the next command touches is brought in, holding nothing.
    pub fn turn(&mut self, vf: &Vf, seen: &Seen, first: bool) {
        if !first && !vf.next_not_brought_in() {
            return;
        }
        let memo = || *vf.prefetched.lock().unwrap();
        let before = memo();
        let ((), read) = record(seen, || vf.prefetch_next());
        if memo() != before {
            self.walked = read.iter().flat_map(|&(o, l)| pages(o, l)).collect();
            self.here.vram.lock().unwrap().extend(&self.walked);
            self.stale = false;
        }
    }

    /// Runs one engine step and checks that what it touched was here.
    pub fn step(&mut self, vf: &Vf, seen: &Seen, ram: &GuestRam) -> bool {
        let before = ram_bytes(ram);
        let beyond = Self::beyond_reach(vf);
        let (more, touched) = record(seen, || vf.step());
        if self.stale || beyond {
            return more;
        }
        self.checked += 1;
        let here = self.here.vram.lock().unwrap();
        for p in touched.iter().flat_map(|&(o, l)| pages(o, l)) {
            assert!(
                here.contains(&p),
                "the engine touched VRAM page {p}, which was not brought in first"
            );
        }
        let here = self.here.ram.lock().unwrap();
        for ((r, a), b) in ram.iter().zip(&before).zip(ram_bytes(ram)) {
            for (p, (x, y)) in a
                .chunks(PAGE as usize)
                .zip(b.chunks(PAGE as usize))
                .enumerate()
            {
                let gpa = r.start_addr().raw_value() + p as u64 * PAGE;
                assert!(
                    x == y || here.contains(&(gpa / PAGE)),
                    "the engine wrote guest page {gpa:#x}, which was not brought in first"
                );
            }
        }
        more
    }

    /// Whether the command in flight has a range longer than all the memory the VF
    /// reaches: its page tables alias pages over and over, and the prefetch brings it
    /// in only that far (`prefetch_next`), leaving the rest to be fetched as it runs.
    fn beyond_reach(vf: &Vf) -> bool {
        let reach = vf.reach();
        match vf.lock().in_flight.as_ref().map(|f| f.entry.cmd) {
            Some(Command::Copy { bytes, .. } | Command::Fill { bytes, .. }) => bytes > reach,
            Some(Command::Kernel(k)) => k.operands().iter().any(|o| o.bytes > reach),
            _ => false,
        }
    }

    /// The guest wrote VRAM [off, off + len): the page is here now; if the last
    /// prefetch walked it, the engine may now walk elsewhere.
    pub fn guest_wrote_vram(&mut self, off: u64, len: u64) {
        for p in pages(off, len) {
            self.here.vram.lock().unwrap().insert(p);
            self.stale |= self.walked.contains(&p);
        }
    }

    /// The guest wrote its RAM [gpa, gpa + len): the page is here now. A rewritten
    /// ring entry needs no exemption: the engine brings in a command taken that is not
    /// the one it read before (`Vf::next_not_brought_in`).
    pub fn guest_wrote_ram(&mut self, gpa: u64, len: u64) {
        self.here.ram.lock().unwrap().extend(pages(gpa, len));
    }

    /// A register write: one that moves the ring or the tables, or resets or enables
    /// the VF, changes what the engine touches next.
    pub fn guest_wrote_reg(&mut self, offset: u64) {
        self.stale |= matches!(
            offset & !7,
            reg::CONTROL | reg::RING_BASE | reg::RING_SIZE | reg::PT_ROOT
        );
    }

    /// A hostile state was restored over the VF.
    pub fn restored(&mut self) {
        self.stale = true;
    }
}
