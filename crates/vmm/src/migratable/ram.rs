//! Guest RAM as a migration component: its pages, the writes of the vCPUs (KVM's dirty
//! log of the RAM slots) and of devices that write guest memory themselves (DMA, which
//! KVM does not see), merged into one record in every round and in the final pass.

use super::lazy::HostRegion;
use super::paged::{self, Bitmap, Memory, MemoryState, PAGE_SIZE};
use super::{
    check_arc, expect, Component, ComponentError, Faults, MigState, PageSource, PreCopyInfo,
    ReadReport, Result, Section, Sink, SyncReport,
};
use crate::dirty::{DirtyLog, SlotId, Written};
use crate::memory::{GuestMemory, RamRegion, SharedRam};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// Pages are guest-physical addresses; the version of that space and of (no) state.
pub const VERSION: u32 = 1;

/// A device that writes guest RAM itself. Its record is one bitmap per RAM region, in
/// the VM's region order.
pub trait DmaLog: Send + Sync {
    fn start_dma_log(&self);
    fn stop_dma_log(&self);
    /// Pages written since the last take, now cleared.
    fn take_dma_log(&self) -> Vec<Bitmap>;
    /// The same, left as it is.
    fn peek_dma_log(&self) -> Vec<Bitmap>;
}

struct Mem {
    mem: GuestMemory,
    /// The alias of shared (prefaulted) RAM, where post-copy writes pages.
    shared: Option<Arc<SharedRam>>,
    /// Its old mapping (`memory::Prefaulted::unmap_for_postcopy`), until post-copy ends.
    retired: Mutex<Option<GuestMemory>>,
    regions: Vec<RamRegion>,
    slots: Vec<SlotId>,
    dirty: Arc<Mutex<DirtyLog>>,
    dma: Vec<Arc<dyn DmaLog>>,
}

impl Mem {
    fn log(&self) -> MutexGuard<'_, DirtyLog> {
        self.dirty.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Memory for Mem {
    fn what(&self) -> &'static str {
        "guest RAM"
    }

    fn base(&self, region: usize) -> u64 {
        self.regions[region].start
    }

    fn read_page(&self, region: usize, page: u64, buf: &mut [u8]) -> Result<()> {
        self.read_at(self.regions[region].start + page * PAGE_SIZE as u64, buf)
    }

    fn populated(&self) -> Vec<Bitmap> {
        // A page of shared memory that the guest's mapping does not map may still hold
        // data (swapped out, or reached through the alias): only private memory's
        // unmapped pages are surely zero.
        if self.shared.is_some() {
            return self
                .regions
                .iter()
                .map(|r| crate::pagemap::all(r.size / PAGE_SIZE as u64))
                .collect();
        }
        self.regions
            .iter()
            .zip(self.mem.iter())
            .map(|(r, region)| {
                let pages = r.size / PAGE_SIZE as u64;
                region
                    .get_host_address(vm_memory::MemoryRegionAddress(0))
                    .ok()
                    .and_then(|h| crate::pagemap::populated(h as u64, r.size))
                    .unwrap_or_else(|| crate::pagemap::all(pages))
            })
            .collect()
    }

    fn start_tracking(&self) -> Result<()> {
        for d in &self.dma {
            d.start_dma_log();
        }
        self.log().start(&self.slots)?;
        Ok(())
    }

    fn stop_tracking(&self) {
        let _ = self.log().stop(&self.slots);
        for d in &self.dma {
            d.stop_dma_log();
        }
    }

    /// The vCPUs' writes (KVM) and the devices' (DMA), merged.
    fn take(&self, last: bool) -> Result<(Vec<Bitmap>, BTreeMap<String, u64>)> {
        let mut b = if last {
            self.log().take_last(&self.slots)?
        } else {
            self.log().take(&self.slots)?
        };
        let mut dma = 0;
        for d in &self.dma {
            dma += paged::merge(&mut b, d.take_dma_log()).0;
        }
        Ok((b, [("dma_pages".to_string(), dma)].into()))
    }

    fn peek_dirty(&self) -> Result<Option<Written>> {
        let Some(w) = self.log().peek(&self.slots)? else {
            return Ok(None);
        };
        let mut dma: Vec<Bitmap> = Vec::new();
        for d in &self.dma {
            let t = d.peek_dma_log();
            if dma.is_empty() {
                dma = t;
            } else {
                paged::union(&mut dma, &t);
            }
        }
        Ok(Some(merge(w, &dma)))
    }

    fn contains(&self, gpa: u64, pages: u64) -> bool {
        let end = pages
            .checked_mul(PAGE_SIZE as u64)
            .and_then(|l| gpa.checked_add(l));
        end.is_some_and(|e| self.regions.iter().any(|r| gpa >= r.start && e <= r.end()))
    }

    fn read_at(&self, gpa: u64, buf: &mut [u8]) -> Result<()> {
        self.mem
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|e| ComponentError::Refused(format!("guest page {gpa:#x}: {e}")))
    }

    fn write_at(&self, gpa: u64, data: &[u8]) -> Result<()> {
        self.mem
            .write_slice(data, GuestAddress(gpa))
            .map_err(|e| ComponentError::Refused(format!("guest page {gpa:#x}: {e}")))
    }

    fn pages_slice(&self, gpa: u64, pages: usize) -> Option<vm_memory::VolatileSlice<'_>> {
        self.mem
            .get_slice(GuestAddress(gpa), pages * PAGE_SIZE)
            .ok()
    }

    fn host_regions(&self) -> Option<Vec<HostRegion>> {
        self.regions
            .iter()
            .zip(self.mem.iter())
            .enumerate()
            .map(|(i, (r, region))| {
                let host = region
                    .get_host_address(vm_memory::MemoryRegionAddress(0))
                    .ok()?;
                Some(HostRegion {
                    host: host as u64,
                    len: r.size,
                    base: r.start,
                    alias: match &self.shared {
                        Some(s) => Some(s.alias(i)?),
                        None => None,
                    },
                })
            })
            .collect()
    }

    fn retire(&self) -> Option<Box<dyn FnOnce() + Send>> {
        paged::retiring(&self.retired, crate::memory::retire)
    }

    fn mapping(&self) -> Option<super::Kept> {
        // A clone holds the regions' mappings (each an `Arc`) until it drops.
        Some(Arc::new(self.mem.clone()))
    }

    fn keep_alive(&self) -> Option<super::Kept> {
        self.shared.clone().map(|s| s as super::Kept)
    }
}

/// A look at a dirty log with more pages (from another record) added.
pub(crate) fn merge(w: Written, more: &[Bitmap]) -> Written {
    if paged::count(more) == 0 {
        return w;
    }
    match w {
        Written::Since(mut b) => {
            paged::union(&mut b, more);
            Written::Since(b)
        }
        Written::New(mut list) => {
            for (r, words) in more.iter().enumerate() {
                for (i, &word) in words.iter().enumerate() {
                    let mut bits = word;
                    while bits != 0 {
                        list.push((r as u32, i as u64 * 64 + bits.trailing_zeros() as u64));
                        bits &= bits - 1;
                    }
                }
            }
            Written::New(list)
        }
    }
}

pub struct Ram {
    m: Mem,
    memory_mib: u64,
    inner: Mutex<MemoryState>,
    /// Post-copy: where devices that reach guest RAM find what is still missing.
    lazy: super::lazy::Shared,
}

impl Ram {
    pub fn new(
        mem: GuestMemory,
        regions: Vec<RamRegion>,
        slots: Vec<SlotId>,
        dirty: Arc<Mutex<DirtyLog>>,
        dma: Vec<Arc<dyn DmaLog>>,
        memory_mib: u64,
        lazy: super::lazy::Shared,
    ) -> Ram {
        Ram {
            m: Mem {
                mem,
                shared: None,
                retired: Mutex::new(None),
                regions,
                slots,
                dirty,
                dma,
            },
            memory_mib,
            inner: Mutex::new(MemoryState::default()),
            lazy,
        }
    }

    /// Says whether this RAM was mapped just now with nothing written to it (an
    /// incoming VM's: its pages come later, through this component).
    pub fn fresh(mut self, fresh: bool) -> Ram {
        if fresh {
            *self.inner.get_mut().unwrap_or_else(|e| e.into_inner()) = MemoryState::fresh();
        }
        self
    }

    /// Says that this RAM is shared memory with an alias (prefaulted), which post-copy
    /// fills through, and gives it the guest's old mapping of it, if it was replaced,
    /// to drop once post-copy is over.
    pub fn shared(mut self, shared: Option<Arc<SharedRam>>, retired: Option<GuestMemory>) -> Ram {
        self.m.shared = shared;
        self.m.retired = Mutex::new(retired);
        self
    }

    fn lock(&self) -> MutexGuard<'_, MemoryState> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Component for Ram {
    fn section(&self) -> Section {
        let layout: Vec<String> = self
            .m
            .regions
            .iter()
            .map(|r| format!("{:#x}+{:#x}", r.start, r.size))
            .collect();
        Section::new(
            "ram",
            VERSION,
            &[
                ("memory_mib", self.memory_mib.to_string()),
                ("layout", layout.join(",")),
            ],
        )
    }

    fn stop_order(&self) -> u8 {
        // Written by the vCPUs and by devices: its last state is read once they stop.
        2
    }

    fn state(&self) -> MigState {
        self.lock().state
    }

    fn set_state(&self, to: MigState) -> Result<()> {
        let mut i = self.lock();
        check_arc(i.state, to)?;
        i.arc(&self.m, to)?;
        i.state = to;
        Ok(())
    }

    fn precopy_info(&self) -> Result<PreCopyInfo> {
        self.lock().info()
    }

    fn pages(&self) -> u64 {
        self.m
            .regions
            .iter()
            .map(|r| r.size / PAGE_SIZE as u64)
            .sum()
    }

    fn sync(&self) -> Result<SyncReport> {
        self.lock().sync(&self.m)
    }

    fn read(&self, sink: &mut dyn Sink, pages: u64) -> Result<ReadReport> {
        // A post-copy source sends outside the lock, which requests need too.
        let taken = self.lock().take_postcopy(&self.m, pages)?;
        match taken {
            Some(t) => super::paged::send_taken(&self.m, sink, &t),
            None => self.lock().read(&self.m, sink, pages),
        }
    }

    fn save(&self) -> Result<Vec<u8>> {
        expect(self.state(), MigState::StopCopy, "save")?;
        // RAM has no state apart from its pages.
        Ok(Vec::new())
    }

    fn load(&self, bytes: &[u8]) -> Result<()> {
        expect(self.state(), MigState::Resuming, "load")?;
        if !bytes.is_empty() {
            return Err(ComponentError::Refused(format!(
                "ram: {} bytes of state where there is none",
                bytes.len()
            )));
        }
        Ok(())
    }

    fn load_pages(&self, addrs: &[u64], data: &[u8]) -> Result<()> {
        // Post-copy's placements go without this lock (see `Paged::filler`).
        let filler = self.lock().filler();
        match filler {
            Some(l) => l.place(addrs, data),
            None => self.lock().load_pages(&self.m, addrs, data),
        }
    }

    fn load_pages_from(&self, addrs: &[u64], src: &mut dyn PageSource) -> Result<bool> {
        let filler = self.lock().filler();
        if let Some(l) = filler {
            return l.place_from(addrs, src);
        }
        // Admitted under the lock, read without it (see `MemoryState::read_in_place`).
        if !self.lock().admit_in_place(&self.m, addrs)? {
            return Ok(false);
        }
        MemoryState::read_in_place(&self.m, addrs, src)?;
        Ok(true)
    }

    fn load_zero(&self, runs: &[(u64, u32)]) -> Result<()> {
        let filler = self.lock().filler();
        match filler {
            Some(l) => l.zero(runs),
            None => self.lock().load_zero(&self.m, runs),
        }
    }

    fn postcopy_switch(&self) -> Result<Option<Vec<Bitmap>>> {
        self.lock().postcopy_switch(&self.m)
    }

    fn read_requested(&self, sink: &mut dyn Sink, addrs: &[u64]) -> Result<ReadReport> {
        let (taken, checked) = self.lock().take_requested(&self.m, addrs)?;
        let r = super::paged::send_taken(&self.m, sink, &taken)?;
        checked.map(|_| r)
    }

    fn postcopy_resume(&self, missing: Vec<Bitmap>) -> Result<()> {
        self.lock().postcopy_resume(&self.m, missing)
    }

    fn arriving(&self) -> Option<u64> {
        self.lock().arriving()
    }

    fn lazy_regions(&self) -> Vec<(u64, u64)> {
        super::paged::lazy_regions(&self.m)
    }

    fn postcopy_expect(&self, missing: Vec<Bitmap>) -> Result<Arc<dyn Faults>> {
        let l = self.lock().postcopy_expect(&self.m, missing)?;
        *self.lazy.lock().unwrap_or_else(|e| e.into_inner()) = Some(l.clone());
        Ok(l)
    }
}
