//! Post-copy on a destination: the VF's memory (its VRAM, the guest RAM it reads and
//! writes by DMA) may not all be here yet, and a touch of a missing page waits for the
//! network. The engine runs on the GPU shared by every VF, so it must not wait while it
//! holds it when another VF wants it: then, before it asks for the engine, it brings in
//! every page the next command will touch (the ring entry, the page tables on the way,
//! every operand), and only then runs it. Pages never go missing again once here, so
//! the command runs through, unless the guest changed what it touches after it was
//! brought in (a page table, the ring): each step checks, without waiting, that what
//! it touches is here, and one that finds a page missing stops before it touches
//! anything; the engine gives the GPU up and brings in what the command has left.
//! With nobody else at the engine it runs at once and fetches what it touches as it
//! goes: bringing whole operands in first would only delay it.

use super::{Inner, Vf, COPY_CHUNK};
use crate::abi::ENTRY_SIZE;
use crate::command::{self, Command};
use crate::mmu::{Mmu, Target};
use std::sync::Arc;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// The pages of a VF's memory that may not have arrived.
pub trait Prefetch: Send + Sync {
    /// Whether any page may still be missing (false: the engine stops asking).
    fn active(&self) -> bool;
    /// Returns once VRAM [off, off + len) is all here.
    fn vram(&self, off: u64, len: u64);
    /// Returns once guest RAM [gpa, gpa + len) is all here.
    fn ram(&self, gpa: u64, len: u64);
    /// Whether VRAM [off, off + len) is all here now; never waits.
    fn vram_here(&self, off: u64, len: u64) -> bool;
    /// Whether guest RAM [gpa, gpa + len) is all here now; never waits.
    fn ram_here(&self, gpa: u64, len: u64) -> bool;
}

/// The command the last prefetch brought in: the entry at ring index `head` of the
/// ring's `generation`, as it read it. The guest may rewrite an entry until the engine
/// takes it; a command taken that is not the one read then is brought in again.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Brought {
    head: u64,
    generation: u64,
    raw: [u8; ENTRY_SIZE],
}

impl Vf {
    /// Has the engine bring in what each command touches before it runs (post-copy):
    /// while another VF wants the engine, or `always`.
    pub fn set_prefetch(&self, p: Option<Arc<dyn Prefetch>>, always: bool) {
        *self.prefetch.lock().unwrap_or_else(|e| e.into_inner()) = p.map(|p| (p, always));
    }

    /// Whether a prefetch is in force now: pages may be missing, and the engine is
    /// told to bring them in always or someone else wants the engine.
    pub(super) fn prefetching(&self) -> Option<Arc<dyn Prefetch>> {
        let p = self
            .prefetch
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let (p, always) = p.filter(|(p, _)| p.active())?;
        (always || self.arbiter.contended()).then_some(p)
    }

    /// Whether the engine must give up the GPU before it goes on: a prefetch is in
    /// force and the command it runs next (at the ring's head once a command
    /// completes, a new one after a reset, or one taken whose entry the guest rewrote
    /// after it was brought in) is not the one brought in. Its next turn brings that
    /// one in first, holding nothing.
    pub(super) fn next_not_brought_in(&self) -> bool {
        if self.prefetching().is_none() {
            return false;
        }
        let i = self.lock();
        Self::has_work(&i) && !self.brought_in(&i)
    }

    /// A step found memory it touches not here (the guest changed its page tables or
    /// its ring after the command was brought in, or a range went past what a walk
    /// brings in): the engine gives the GPU up and brings in, holding nothing, what the
    /// command has left to touch. A guest cannot keep this up: each time brings in the
    /// pages the command then maps, a page never goes missing again, so the pages it
    /// can point the command at run out (and the background brings them all anyway).
    pub(super) fn forget_brought_in(&self) {
        *self.prefetched.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Whether the command the engine runs next is the one last brought in: the entry
    /// at the ring's head, and once taken, that entry as it was read then. So a command
    /// is brought in once, while it waits in the ring, and not walked again when taken.
    fn brought_in(&self, i: &Inner) -> bool {
        let done = *self.prefetched.lock().unwrap_or_else(|e| e.into_inner());
        done.is_some_and(|b| {
            b.head == i.regs.head
                && b.generation == i.generation
                && i.in_flight.as_ref().is_none_or(|f| f.raw == b.raw)
        })
    }

    /// The bytes of memory this VF reaches: its VRAM and its VM's RAM.
    pub(super) fn reach(&self) -> u64 {
        self.backend.vram_size() + self.ram.iter().map(|r| r.len()).sum::<u64>()
    }

    /// Brings in every page the next command touches, holding nothing: not the shared
    /// engine, not this VF's state lock (the vCPUs take it for every register access).
    pub(super) fn prefetch_next(&self) {
        let Some(p) = self.prefetching() else {
            return;
        };
        let (head, generation, taken, entry_at, root) = {
            let i = self.lock();
            if !Self::has_work(&i) || i.holds != 0 || self.brought_in(&i) {
                return;
            }
            (
                i.regs.head,
                i.generation,
                i.in_flight
                    .as_ref()
                    .map(|f| (f.raw, f.entry.cmd, f.done, i.resolved)),
                Self::entry_at(&i, i.regs.head),
                i.regs.pt_root,
            )
        };
        let brought = |raw| {
            *self.prefetched.lock().unwrap_or_else(|e| e.into_inner()) = Some(Brought {
                head,
                generation,
                raw,
            });
        };
        // A kernel in flight whose operands are translated works on those VRAM ranges,
        // whatever the page tables say now (the guest may have changed them since).
        if let Some((raw, _, _, Some(k))) = taken {
            for o in k.operands() {
                p.vram(o.va, o.bytes);
            }
            brought(raw);
            return;
        }
        // A copy or fill under way has what it did behind it: what is left is brought
        // in (again, when a step found some of it missing).
        let (raw, cmd, done) = match taken {
            Some((raw, cmd, done, _)) => (raw, cmd, done),
            None => {
                p.ram(entry_at, ENTRY_SIZE as u64);
                let mut raw = [0u8; ENTRY_SIZE];
                if self
                    .ram
                    .read_slice(&mut raw, GuestAddress(entry_at))
                    .is_err()
                {
                    return;
                }
                match command::decode(&raw) {
                    Ok(e) => (raw, e.cmd, 0),
                    // The engine reports it when it takes the entry.
                    Err(_) => return,
                }
            }
        };
        // This walk is what brings the pages in: it waits for each.
        let mmu = Mmu::new(&*self.backend, &self.ram, root, None);
        let ranges: Vec<(u64, u64, bool)> = match cmd {
            Command::Copy { dst, src, bytes } => vec![
                (src.saturating_add(done), bytes.saturating_sub(done), false),
                (dst.saturating_add(done), bytes.saturating_sub(done), true),
            ],
            Command::Fill { dst, bytes, .. } => {
                vec![(dst.saturating_add(done), bytes.saturating_sub(done), true)]
            }
            Command::Timestamp { dst } | Command::Write { dst, .. } => vec![(dst, 8, true)],
            Command::Kernel(k) => k
                .operands()
                .iter()
                .map(|o| (o.va, o.bytes, o.write))
                .collect(),
            _ => Vec::new(),
        };
        // A range longer than all the memory this VF reaches goes over some pages more
        // than once (the guest's page tables alias them), which no command needs to:
        // it is brought in only that far, and a step that gets to a page beyond that
        // which is not here stops, and the rest is brought in from there. A walk over
        // all of it (up to 512 GiB, page by page) would be the guest's way to keep
        // this thread busy for minutes. Never less than a step's chunk, though: the
        // rest is brought in from where the command got to, and a step that stopped
        // inside its first chunk got nowhere, so a shorter walk would bring in the same
        // pages again and again while the step stopped at the same page.
        let reach = self.reach().max(COPY_CHUNK);
        for (va, len, write) in ranges {
            // The walk reads the page tables (VRAM): those come in as it goes. A range
            // that does not translate is the command's error, which it reports itself
            // once it gets there; a COPY or FILL works through what comes before that
            // first, chunk by chunk, so that part is brought in all the same.
            mmu.walk(va, len.min(reach), write, |s| match s.target {
                Target::Vram(o) => p.vram(o, s.len),
                Target::System(g) => p.ram(g, s.len),
            });
        }
        brought(raw);
    }
}
