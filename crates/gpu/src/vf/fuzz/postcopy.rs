//! The migrated VF as post-copy's destination has it: none of its memory has come
//! yet, and the engine, told to bring in what its next command touches before it runs
//! it (`Vf::prefetch_next`, at the start of each turn at the GPU, whenever
//! `next_not_brought_in` ends one, and after each run, as the engine thread does
//! before it waits for the GPU again), must find every VRAM page a step touches (the
//! page tables on the way included), and every guest page it changes, here: asked
//! for, read by the prefetch's own walk of the page tables, or written by the guest
//! (whose vCPU faults a page in before it writes it). A page that is not here would be
//! fetched over the network while the engine holds the GPU every VF shares.
//!
//! This holds whatever the guest does after a command was brought in (it rewrites a
//! page table the walk read, moves the ring or the tables, resets the VF), whatever
//! state is restored, and for a range longer than the memory the walk brings in: a
//! step that would touch what is not here stops before it touches anything, and the
//! engine gives the GPU up to bring it in (`Vf::forget_brought_in`).
//!
//! Guest RAM a step only reads is checked too: the pages not here are unreadable
//! while it runs (`unread`).

use super::{ram_bytes, record, Seen};
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
    fn vram_here(&self, off: u64, len: u64) -> bool {
        let here = self.vram.lock().unwrap();
        pages(off, len).all(|p| here.contains(&p))
    }
    fn ram_here(&self, gpa: u64, len: u64) -> bool {
        let here = self.ram.lock().unwrap();
        pages(gpa, len).all(|p| here.contains(&p))
    }
}

pub(super) struct Destination {
    here: Arc<Here>,
    /// Steps checked, for the seeds' test.
    pub checked: u64,
}

impl Destination {
    /// `vf` as a post-copy destination that brings in every command first.
    pub fn new(vf: &Vf) -> Destination {
        let here = Arc::new(Here::default());
        vf.set_prefetch(Some(here.clone()), true);
        Destination { here, checked: 0 }
    }

    /// A turn at the GPU begins (`first`, or the engine would give it up here): what
    /// the next command touches is brought in, holding nothing. The page tables the
    /// walk reads come in as it reads them.
    pub fn turn(&mut self, vf: &Vf, seen: &Seen, first: bool) {
        if !first && !vf.next_not_brought_in() {
            return;
        }
        let ((), read) = record(seen, || vf.prefetch_next());
        self.here
            .vram
            .lock()
            .unwrap()
            .extend(read.iter().flat_map(|&(o, l)| pages(o, l)));
    }

    /// Runs one engine step and checks that what it touched was here.
    pub fn step(&mut self, vf: &Vf, seen: &Seen, ram: &GuestRam) -> bool {
        let before = ram_bytes(ram);
        let missing: Vec<u64> = {
            let here = self.here.ram.lock().unwrap();
            ram.iter()
                .flat_map(|r| pages(r.start_addr().raw_value(), r.len()))
                .filter(|p| !here.contains(p))
                .collect()
        };
        let ((more, touched), read) =
            super::unread::guard(ram, &missing, || record(seen, || vf.step()));
        if let Some(p) = read.first() {
            panic!(
                "the engine touched guest page {:#x}, which was not brought in first",
                p * PAGE
            );
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

    /// The guest wrote VRAM [off, off + len): the page is here now.
    pub fn guest_wrote_vram(&mut self, off: u64, len: u64) {
        self.here.vram.lock().unwrap().extend(pages(off, len));
    }

    /// The guest wrote its RAM [gpa, gpa + len): the page is here now.
    pub fn guest_wrote_ram(&mut self, gpa: u64, len: u64) {
        self.here.ram.lock().unwrap().extend(pages(gpa, len));
    }
}
