//! The VF's GPU address space: page tables that the guest driver writes into its own
//! VRAM, walked by the engine for every access. Every table pointer and every leaf is
//! checked against this VF's VRAM and its VM's RAM; anything else is a GPU fault on the
//! VA, reported to the guest, never a host error.

use crate::abi::pte;
use crate::backend::Backend;
use crate::vf::Prefetch;
use std::cell::Cell;
use vm_memory::{GuestAddress, GuestMemoryBackend};

pub type GuestRam = vm_memory::GuestMemoryMmap<()>;

const PAGE: u64 = 4096;
const HUGE_PAGE: u64 = 2 << 20;

/// Where a VA lands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Vram(u64),
    System(u64),
}

/// A run of bytes that is contiguous both in VA and in its target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub target: Target,
    pub len: u64,
}

impl Segment {
    /// Whether `next` starts where this segment ends, in the same memory.
    fn continues_at(&self, next: Target) -> bool {
        match (self.target, next) {
            (Target::Vram(a), Target::Vram(b)) | (Target::System(a), Target::System(b)) => {
                a + self.len == b
            }
            _ => false,
        }
    }
}

/// A fault: the VA at which translation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    pub va: u64,
    /// Not a fault of the guest's: translation stopped at memory that is not here yet
    /// (`Mmu::here`). The engine brings it in, holding nothing, and tries again.
    pub missing: bool,
}

impl Fault {
    pub fn at(va: u64) -> Fault {
        Fault { va, missing: false }
    }
}

pub struct Mmu<'a> {
    pub backend: &'a dyn Backend,
    pub ram: &'a GuestRam,
    /// VRAM offset of the L2 table.
    pub root: u64,
    /// Post-copy, on the shared GPU: what is here now. Translation then stops, missing,
    /// at a table or a target that is not here, rather than wait for it there.
    pub here: Option<&'a dyn Prefetch>,
    /// Table pages found here, so that each is asked about once, not at every
    /// translation (a page never goes missing again): a ring of the last few.
    known: Cell<[u64; 4]>,
}

impl<'a> Mmu<'a> {
    pub fn new(
        backend: &'a dyn Backend,
        ram: &'a GuestRam,
        root: u64,
        here: Option<&'a dyn Prefetch>,
    ) -> Mmu<'a> {
        Mmu {
            backend,
            ram,
            root,
            here,
            known: Cell::new([u64::MAX; 4]),
        }
    }

    /// Whether the table page holding `at` is here (always, but in post-copy).
    fn table_here(&self, at: u64) -> bool {
        let Some(h) = self.here else {
            return true;
        };
        let page = at / PAGE;
        let mut known = self.known.get();
        if known.contains(&page) {
            return true;
        }
        if !h.vram_here(page * PAGE, PAGE) {
            return false;
        }
        known.rotate_right(1);
        known[0] = page;
        self.known.set(known);
        true
    }

    fn entry(&self, table: u64, index: u64, va: u64) -> Result<u64, Fault> {
        if !self.table_here(table + index * 8) {
            return Err(Fault { va, missing: true });
        }
        let mut b = [0u8; 8];
        self.backend
            .read(table + index * 8, &mut b)
            .map_err(|_| Fault::at(va))?;
        Ok(u64::from_le_bytes(b))
    }

    /// The next-level table an entry points at: valid, in VRAM, inside this VF's VRAM.
    fn table(&self, e: u64, va: u64) -> Result<u64, Fault> {
        let t = e & pte::ADDR_MASK;
        if e & pte::VALID == 0 || e & pte::SYSTEM != 0 || t + PAGE > self.backend.vram_size() {
            return Err(Fault::at(va));
        }
        Ok(t)
    }

    /// Translates one VA: its target and the bytes left in its page.
    pub fn translate(&self, va: u64, write: bool) -> Result<(Target, u64), Fault> {
        if va >> pte::VA_BITS != 0 || self.root.saturating_add(PAGE) > self.backend.vram_size() {
            return Err(Fault::at(va));
        }
        let l2 = self.entry(self.root, va >> 30 & 0x1ff, va)?;
        let l1t = self.table(l2, va)?;
        let l1 = self.entry(l1t, va >> 21 & 0x1ff, va)?;
        let (leaf, size) = if l1 & pte::HUGE != 0 {
            (l1, HUGE_PAGE)
        } else {
            let l0t = self.table(l1, va)?;
            (self.entry(l0t, va >> 12 & 0x1ff, va)?, PAGE)
        };
        if leaf & pte::VALID == 0 || (write && leaf & pte::WRITE == 0) {
            return Err(Fault::at(va));
        }
        let base = leaf & pte::ADDR_MASK & !(size - 1);
        let within = va & (size - 1);
        let left = size - within;
        let target = if leaf & pte::SYSTEM != 0 {
            // The whole page must be this VM's RAM (regions that touch count as one).
            if !self.ram.check_range(GuestAddress(base), size as usize) {
                return Err(Fault::at(va));
            }
            Target::System(base + within)
        } else {
            if base + size > self.backend.vram_size() {
                return Err(Fault::at(va));
            }
            Target::Vram(base + within)
        };
        Ok((target, left))
    }

    /// The segments of [va, va + len), merged where contiguous. A range that wraps or
    /// leaves the address space faults at its first bad byte.
    pub fn segments(&self, va: u64, len: u64, write: bool) -> Result<Vec<Segment>, Fault> {
        let mut out = Vec::new();
        match self.walk(va, len, write, |s| out.push(s)) {
            None => Ok(out),
            Some(f) => Err(f),
        }
    }

    /// Hands `f` the segments of [va, va + len), merged where contiguous, one at a time
    /// and up to the range's first bad byte (what a command working through it chunk
    /// by chunk may touch before it faults); returns that fault, if any. Nothing is
    /// kept: a range that the guest's page tables alias over and over costs time, not
    /// memory. With `here`, it stops, missing, at the first table or run of pages that
    /// is not here, before it hands that run on.
    pub fn walk(
        &self,
        va: u64,
        len: u64,
        write: bool,
        mut f: impl FnMut(Segment),
    ) -> Option<Fault> {
        let Some(end) = va.checked_add(len) else {
            return Some(Fault::at(va));
        };
        let mut run: Option<Segment> = None;
        let mut at = va;
        let mut fault = None;
        while at < end {
            let (target, left) = match self.translate(at, write) {
                Ok(t) => t,
                Err(e) => {
                    fault = Some(e);
                    break;
                }
            };
            let n = left.min(end - at);
            match &mut run {
                Some(s) if s.continues_at(target) => s.len += n,
                _ => {
                    if let Some(s) = run.replace(Segment { target, len: n }) {
                        if let Err(missing) = self.segment_here(&s, at - s.len) {
                            return Some(missing);
                        }
                        f(s);
                    }
                }
            }
            at += n;
        }
        if let Some(s) = run {
            if let Err(missing) = self.segment_here(&s, at - s.len) {
                return Some(missing);
            }
            f(s);
        }
        fault
    }

    /// A segment (at `va`) is handed on only once all of it is here: one question per
    /// run of pages, not one per page.
    fn segment_here(&self, s: &Segment, va: u64) -> Result<(), Fault> {
        let here = self.here.is_none_or(|h| match s.target {
            Target::Vram(o) => h.vram_here(o, s.len),
            Target::System(g) => h.ram_here(g, s.len),
        });
        match here {
            true => Ok(()),
            false => Err(Fault { va, missing: true }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::CpuBackend;

    fn put(b: &dyn Backend, off: u64, v: u64) {
        b.write(off, &v.to_le_bytes()).unwrap();
    }

    #[test]
    fn walks_huge_and_small_pages_and_faults_on_everything_else() {
        let b = CpuBackend::new(8 << 20).unwrap();
        let ram = GuestRam::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        // Root at 7 MiB, L1 at +4K, L0 at +8K.
        let (root, l1, l0) = (7 << 20, (7 << 20) + 4096, (7 << 20) + 8192);
        put(&b, root, l1 | pte::VALID);
        // VA 0: 2 MiB VRAM page at 2 MiB, writable.
        put(&b, l1, (2 << 20) | pte::VALID | pte::WRITE | pte::HUGE);
        // VA 2 MiB: small pages; page 0 -> guest RAM 0x3000 read-only, page 1 -> VRAM 0x5000.
        put(&b, l1 + 8, l0 | pte::VALID);
        put(&b, l0, 0x3000 | pte::VALID | pte::SYSTEM);
        put(&b, l0 + 8, 0x5000 | pte::VALID | pte::WRITE);
        // VA 4 MiB: a huge page past the end of VRAM; VA 6 MiB: guest RAM beyond RAM.
        put(&b, l1 + 16, (8 << 20) | pte::VALID | pte::HUGE);
        put(&b, l0 + 16, (16 << 20) | pte::VALID | pte::SYSTEM);
        let m = Mmu::new(&b, &ram, root, None);
        assert_eq!(
            m.translate(0x1234, true).unwrap(),
            (Target::Vram((2 << 20) + 0x1234), (2 << 20) - 0x1234)
        );
        assert_eq!(
            m.translate((2 << 20) + 5, false).unwrap(),
            (Target::System(0x3005), 4091)
        );
        assert_eq!(
            m.translate((2 << 20) + 5, true),
            Err(Fault::at((2 << 20) + 5))
        );
        assert_eq!(m.translate(4 << 20, false), Err(Fault::at(4 << 20)));
        assert_eq!(
            m.translate((2 << 20) + 0x2000, false),
            Err(Fault::at((2 << 20) + 0x2000))
        );
        assert_eq!(m.translate(1 << 39, false), Err(Fault::at(1 << 39)));
        // Unmapped L2 slot.
        assert_eq!(m.translate(1 << 30, false), Err(Fault::at(1 << 30)));
        // A range crossing from VRAM into the read-only system page: two segments, and a
        // write to it faults where the read-only page starts.
        let segs = m.segments((2 << 20) - 16, 32, false).unwrap();
        assert_eq!(segs.len(), 2);
        assert_eq!(
            m.segments((2 << 20) - 16, 32, true),
            Err(Fault::at(2 << 20))
        );
        // What comes before the fault is still there to bring in.
        let mut before = Vec::new();
        let fault = m.walk((2 << 20) - 16, 32, true, |s| before.push(s));
        assert_eq!(fault, Some(Fault::at(2 << 20)));
        assert_eq!(
            before,
            vec![Segment {
                target: Target::Vram((4 << 20) - 16),
                len: 16
            }]
        );
        assert_eq!(
            m.segments(0, 4096, true).unwrap(),
            vec![Segment {
                target: Target::Vram(2 << 20),
                len: 4096
            }]
        );
        assert!(m.segments(u64::MAX - 4, 8, false).is_err());
        // A table pointer outside VRAM faults, too.
        put(&b, root + 8, (64 << 20) | pte::VALID);
        assert_eq!(m.translate(1 << 30, false), Err(Fault::at(1 << 30)));
    }

    /// Post-copy: VRAM pages not here, and how often it was asked.
    struct Missing(Vec<u64>, std::sync::Mutex<u64>);

    impl Prefetch for Missing {
        fn active(&self) -> bool {
            true
        }
        fn vram(&self, _off: u64, _len: u64) {}
        fn ram(&self, _gpa: u64, _len: u64) {}
        fn vram_here(&self, off: u64, len: u64) -> bool {
            *self.1.lock().unwrap() += 1;
            !self.0.iter().any(|&p| off < p + PAGE && p < off + len)
        }
        fn ram_here(&self, _gpa: u64, _len: u64) -> bool {
            true
        }
    }

    #[test]
    fn with_pages_missing_translation_stops_before_them_and_asks_once_per_table_and_run() {
        let b = CpuBackend::new(8 << 20).unwrap();
        let ram = GuestRam::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let (root, l1, l0) = (7 << 20, (7 << 20) + 4096, (7 << 20) + 8192);
        put(&b, root, l1 | pte::VALID);
        put(&b, l1, l0 | pte::VALID);
        // VA 0..64 KiB: 4 KiB pages onto VRAM 1 MiB.. (one run).
        for i in 0..16 {
            put(
                &b,
                l0 + i * 8,
                ((1 << 20) + i * PAGE) | pte::VALID | pte::WRITE,
            );
        }
        let missing = |pages: Vec<u64>| Missing(pages, Default::default());
        let all_here = missing(vec![]);
        let m = Mmu::new(&b, &ram, root, Some(&all_here));
        let whole = vec![Segment {
            target: Target::Vram(1 << 20),
            len: 16 * PAGE,
        }];
        assert_eq!(m.segments(0, 16 * PAGE, true), Ok(whole));
        // Three table pages and one run, not 3 x 16 tables and 16 pages.
        assert_eq!(*all_here.1.lock().unwrap(), 4);
        // A target page not here: nothing from its run on is handed on.
        let target = missing(vec![(1 << 20) + 5 * PAGE]);
        let m = Mmu::new(&b, &ram, root, Some(&target));
        let mut got = Vec::new();
        let stop = m.walk(0, 16 * PAGE, true, |s| got.push(s));
        assert!(stop.is_some_and(|f| f.missing), "{stop:?}");
        assert!(got.is_empty());
        // A table page not here: translation stops there, as missing, not as a fault.
        let table = missing(vec![l0]);
        let m = Mmu::new(&b, &ram, root, Some(&table));
        assert_eq!(
            m.translate(0, false),
            Err(Fault {
                va: 0,
                missing: true
            })
        );
        // Without `here`, the same tables translate.
        assert!(Mmu::new(&b, &ram, root, None).translate(0, false).is_ok());
    }
}
