//! Guest RAM as a migration component: its pages, the writes of the vCPUs (KVM's dirty
//! log of the RAM slots) and of devices that write guest memory themselves (DMA, which
//! KVM does not see), merged into one record in every round and in the final pass.

use super::paged::{self, Bitmap, Memory, Paged, PAGE_SIZE};
use super::{
    arc, Component, ComponentError, MigState, PreCopyInfo, ReadReport, Result, Section, Sink,
    SyncReport,
};
use crate::dirty::{DirtyLog, SlotId, Written};
use crate::memory::{GuestMemory, RamRegion};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;
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
    regions: Vec<RamRegion>,
    slots: Vec<SlotId>,
    dirty: Arc<Mutex<DirtyLog>>,
    dma: Vec<Arc<dyn DmaLog>>,
}

impl Mem {
    fn log(&self) -> MutexGuard<'_, DirtyLog> {
        self.dirty.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds the devices' DMA record to `b`; returns how many pages it held.
    fn add_dma(&self, b: &mut [Bitmap]) -> u64 {
        let mut n = 0;
        for d in &self.dma {
            let t = d.take_dma_log();
            n += paged::count(&t);
            paged::union(b, &t);
        }
        n
    }
}

impl Memory for Mem {
    fn base(&self, region: usize) -> u64 {
        self.regions[region].start
    }

    fn read_page(&self, region: usize, page: u64, buf: &mut [u8]) -> Result<()> {
        let gpa = self.regions[region].start + page * PAGE_SIZE as u64;
        self.mem
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|e| ComponentError::Refused(format!("guest page {gpa:#x}: {e}")))
    }

    fn populated(&self) -> Vec<Bitmap> {
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
        if paged::count(&dma) == 0 {
            return Ok(Some(w));
        }
        Ok(Some(match w {
            Written::Since(mut b) => {
                paged::union(&mut b, &dma);
                Written::Since(b)
            }
            Written::New(mut list) => {
                for (r, words) in dma.iter().enumerate() {
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
        }))
    }
}

struct Inner {
    state: MigState,
    paged: Paged,
    /// Writes are being recorded (from PRE_COPY until the data stream ends).
    tracking: bool,
    /// Pages found in the devices' DMA records at the last sync.
    dma_pages: u64,
    /// What the destination has written, for its checks: (pages, zero pages).
    loaded: (u64, u64),
}

pub struct Ram {
    m: Mem,
    memory_mib: u64,
    inner: Mutex<Inner>,
}

impl Ram {
    pub fn new(
        mem: GuestMemory,
        regions: Vec<RamRegion>,
        slots: Vec<SlotId>,
        dirty: Arc<Mutex<DirtyLog>>,
        dma: Vec<Arc<dyn DmaLog>>,
        memory_mib: u64,
    ) -> Ram {
        Ram {
            m: Mem {
                mem,
                regions,
                slots,
                dirty,
                dma,
            },
            memory_mib,
            inner: Mutex::new(Inner {
                state: MigState::Running,
                paged: Paged::default(),
                tracking: false,
                dma_pages: 0,
                loaded: (0, 0),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn start_tracking(&self) -> Result<()> {
        for d in &self.m.dma {
            d.start_dma_log();
        }
        self.m.log().start(&self.m.slots)?;
        Ok(())
    }

    fn stop_tracking(&self) {
        let _ = self.m.log().stop(&self.m.slots);
        for d in &self.m.dma {
            d.stop_dma_log();
        }
    }

    /// The page at `gpa` for a destination's write: page-aligned and inside RAM.
    fn check(&self, gpa: u64, pages: u64) -> Result<()> {
        let len = pages.checked_mul(PAGE_SIZE as u64);
        let end = len.and_then(|l| gpa.checked_add(l));
        let ok = gpa.is_multiple_of(PAGE_SIZE as u64)
            && end.is_some_and(|e| {
                self.m
                    .regions
                    .iter()
                    .any(|r| gpa >= r.start && e <= r.end())
            });
        if ok {
            Ok(())
        } else {
            Err(ComponentError::Refused(format!(
                "{pages} pages at {gpa:#x} are not inside guest RAM"
            )))
        }
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
        let from = i.state;
        if !from.is_arc(to) {
            return Err(ComponentError::Arc { from, to });
        }
        match (from, to) {
            (MigState::Running, MigState::PreCopy) => {
                self.start_tracking()?;
                i.tracking = true;
                i.paged.begin(&self.m);
            }
            (MigState::PreCopy, MigState::Running)
            | (MigState::PreCopyP2p, MigState::RunningP2p)
            | (MigState::StopCopy, MigState::Stop) => {
                if std::mem::take(&mut i.tracking) {
                    self.stop_tracking();
                }
                i.paged = Paged::default();
            }
            // Saved without a pre-copy: everything, once, while stopped.
            (MigState::Stop, MigState::StopCopy) => i.paged.begin_stopped(&self.m),
            _ => {}
        }
        arc(&mut i.state, to)?;
        Ok(())
    }

    fn precopy_info(&self) -> Result<PreCopyInfo> {
        let i = self.lock();
        if !i.state.saving() {
            return Err(ComponentError::WrongState {
                what: "pre-copy info",
                state: i.state,
            });
        }
        let (a, b) = i.paged.left();
        Ok(PreCopyInfo {
            initial_bytes: a * PAGE_SIZE as u64,
            dirty_bytes: b * PAGE_SIZE as u64,
        })
    }

    fn sync(&self) -> Result<SyncReport> {
        let mut i = self.lock();
        let last = match i.state {
            MigState::PreCopy | MigState::PreCopyP2p => false,
            MigState::StopCopy => true,
            state => {
                return Err(ComponentError::WrongState {
                    what: "sync",
                    state,
                })
            }
        };
        if !i.tracking {
            return Ok(SyncReport::default());
        }
        let t = Instant::now();
        let mut dirty = if last {
            self.m.log().take_last(&self.m.slots)?
        } else {
            self.m.log().take(&self.m.slots)?
        };
        let log_us = t.elapsed().as_secs_f64() * 1e6;
        let dma = self.m.add_dma(&mut dirty);
        i.dma_pages = dma;
        let n = if last {
            i.paged.finish(dirty)
        } else {
            i.paged.sync(dirty)
        };
        Ok(SyncReport {
            dirty_pages: n,
            log_us,
            extra: [("dma_pages".to_string(), dma)].into(),
        })
    }

    fn read(&self, sink: &mut dyn Sink, pages: u64) -> Result<ReadReport> {
        let mut i = self.lock();
        if !i.state.saving() {
            return Err(ComponentError::WrongState {
                what: "read",
                state: i.state,
            });
        }
        i.paged.read(&self.m, sink, pages)
    }

    fn save(&self) -> Result<Vec<u8>> {
        let state = self.state();
        if state != MigState::StopCopy {
            return Err(ComponentError::WrongState {
                what: "save",
                state,
            });
        }
        // RAM has no state apart from its pages.
        Ok(Vec::new())
    }

    fn load(&self, bytes: &[u8]) -> Result<()> {
        if !bytes.is_empty() {
            return Err(ComponentError::Refused(format!(
                "ram: {} bytes of state where there is none",
                bytes.len()
            )));
        }
        Ok(())
    }

    fn load_pages(&self, addrs: &[u64], data: &[u8]) -> Result<()> {
        let state = self.state();
        if state != MigState::Resuming {
            return Err(ComponentError::WrongState {
                what: "pages",
                state,
            });
        }
        if data.len() != addrs.len() * PAGE_SIZE {
            return Err(ComponentError::Refused(
                "page data does not match its addresses".into(),
            ));
        }
        for &g in addrs {
            self.check(g, 1)?;
        }
        for (g, page) in addrs.iter().zip(data.chunks_exact(PAGE_SIZE)) {
            self.m
                .mem
                .write_slice(page, GuestAddress(*g))
                .map_err(|e| ComponentError::Refused(format!("page {g:#x}: {e}")))?;
        }
        self.lock().loaded.0 += addrs.len() as u64;
        Ok(())
    }

    fn load_zero(&self, runs: &[(u64, u32)]) -> Result<()> {
        let state = self.state();
        if state != MigState::Resuming {
            return Err(ComponentError::WrongState {
                what: "pages",
                state,
            });
        }
        for &(g, n) in runs {
            if n == 0 {
                return Err(ComponentError::Refused(format!("empty zero run at {g:#x}")));
            }
            self.check(g, n as u64)?;
        }
        let mut buf = [0u8; PAGE_SIZE];
        let mut total = 0;
        for &(g, n) in runs {
            for k in 0..n as u64 {
                let a = GuestAddress(g + k * PAGE_SIZE as u64);
                // Memory never written reads as zero without being allocated: only
                // pages that hold something are cleared, so a stream of zero runs
                // cannot make this process allocate the guest's memory.
                self.m
                    .mem
                    .read_slice(&mut buf, a)
                    .map_err(|e| ComponentError::Refused(format!("page {:#x}: {e}", a.0)))?;
                if !paged::is_zero(&buf) {
                    buf.fill(0);
                    self.m
                        .mem
                        .write_slice(&buf, a)
                        .map_err(|e| ComponentError::Refused(format!("page {:#x}: {e}", a.0)))?;
                }
            }
            total += n as u64;
        }
        self.lock().loaded.1 += total;
        Ok(())
    }
}
