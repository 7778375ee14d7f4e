//! A GPU virtual function as a migration component, the way the SR-IOV GPU migration
//! work does it: VRAM is pre-copied while the VF keeps computing, with every write
//! tracked (the guest's stores through the aperture in KVM's dirty log of its memory
//! slot, the engine's own writes recorded by the VF model); at the switchover the VF
//! stops after the vCPUs, preempting the command in flight at a chunk boundary, and its
//! registers, ring position, fences, interrupt state and that command travel as its
//! state. A destination takes the state through the same checks as guest input and
//! resumes the command where it stopped.

use super::paged::{self, Bitmap, Memory, Paged, PAGE_SIZE};
use super::ram::DmaLog;
use super::{
    arc, Component, ComponentError, MigState, PreCopyInfo, ReadReport, Result, Section, Sink,
    SyncReport,
};
use crate::dirty::{DirtyLog, SlotId, Written};
use godwit_gpu::{Hold, Vf, VfState};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

/// The VF's DMA into guest RAM, for the RAM component.
impl DmaLog for Vf {
    fn start_dma_log(&self) {
        self.start_dma_tracking();
    }
    fn stop_dma_log(&self) {
        self.stop_dma_tracking();
    }
    fn take_dma_log(&self) -> Vec<Bitmap> {
        self.take_dma_dirty()
    }
    fn peek_dma_log(&self) -> Vec<Bitmap> {
        self.peek_dma_dirty()
    }
}

struct Vram {
    vf: Arc<Vf>,
    slot: SlotId,
    dirty: Arc<Mutex<DirtyLog>>,
}

impl Vram {
    fn log(&self) -> MutexGuard<'_, DirtyLog> {
        self.dirty.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn pages(&self) -> u64 {
        self.vf.backend().vram_size() / PAGE_SIZE as u64
    }

    /// The aperture's guest stores (KVM) and the engine's writes, since the last take.
    fn take(&self, last: bool) -> Result<(Vec<Bitmap>, u64, u64)> {
        let mut kvm = if last {
            self.log().take_last(&[self.slot])?
        } else {
            self.log().take(&[self.slot])?
        };
        let engine = vec![self.vf.take_vram_dirty()];
        let (a, e) = (paged::count(&kvm), paged::count(&engine));
        paged::union(&mut kvm, &engine);
        Ok((kvm, a, e))
    }
}

impl Memory for Vram {
    fn base(&self, _region: usize) -> u64 {
        0
    }

    fn read_page(&self, _region: usize, page: u64, buf: &mut [u8]) -> Result<()> {
        self.vf
            .backend()
            .read(page * PAGE_SIZE as u64, buf)
            .map_err(|e| ComponentError::Refused(format!("VRAM page {page}: {e:?}")))
    }

    fn populated(&self) -> Vec<Bitmap> {
        // What the backend ever backed; a backend VRAM the host cannot see is sent whole.
        let b = self.vf.backend();
        let bits = b
            .aperture()
            .and_then(|a| crate::pagemap::populated(a.host, a.len))
            .unwrap_or_else(|| crate::pagemap::all(self.pages()));
        vec![bits]
    }

    fn peek_dirty(&self) -> Result<Option<Written>> {
        let Some(w) = self.log().peek(&[self.slot])? else {
            return Ok(None);
        };
        let engine = self.vf.peek_vram_dirty();
        Ok(Some(match w {
            Written::Since(mut b) => {
                paged::union(&mut b, std::slice::from_ref(&engine));
                Written::Since(b)
            }
            Written::New(mut list) => {
                for (i, &word) in engine.iter().enumerate() {
                    let mut bits = word;
                    while bits != 0 {
                        list.push((0, i as u64 * 64 + bits.trailing_zeros() as u64));
                        bits &= bits - 1;
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
    tracking: bool,
    /// This component holds the engine (so it releases it if the VM stays here).
    held: bool,
    loaded: bool,
    /// Whether a command was in flight when the engine stopped, for reports.
    preempted: bool,
}

pub struct GpuFunction {
    m: Vram,
    profile: String,
    backend: String,
    inner: Mutex<Inner>,
}

impl GpuFunction {
    pub fn new(
        vf: Arc<Vf>,
        profile: &str,
        slot: SlotId,
        dirty: Arc<Mutex<DirtyLog>>,
    ) -> GpuFunction {
        let backend = vf.backend().name().to_string();
        GpuFunction {
            m: Vram { vf, slot, dirty },
            profile: profile.into(),
            backend,
            inner: Mutex::new(Inner {
                state: MigState::Running,
                paged: Paged::default(),
                tracking: false,
                held: false,
                loaded: false,
                preempted: false,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn start_tracking(&self) -> Result<()> {
        self.m.vf.start_vram_tracking();
        if let Err(e) = self.m.log().start(&[self.m.slot]) {
            self.m.vf.stop_vram_tracking();
            return Err(e.into());
        }
        Ok(())
    }

    fn stop_tracking(&self) {
        let _ = self.m.log().stop(&[self.m.slot]);
        self.m.vf.stop_vram_tracking();
    }

    /// Stops the VF: no fetch, no DMA, no interrupt from here on.
    fn hold(&self, i: &mut Inner) {
        if !i.held {
            self.m.vf.pause(Hold::Migration);
            i.held = true;
        }
    }

    fn check(&self, off: u64, pages: u64) -> Result<()> {
        let end = pages
            .checked_mul(PAGE_SIZE as u64)
            .and_then(|l| off.checked_add(l));
        if off.is_multiple_of(PAGE_SIZE as u64)
            && end.is_some_and(|e| e <= self.m.vf.backend().vram_size())
        {
            Ok(())
        } else {
            Err(ComponentError::Refused(format!(
                "{pages} VRAM pages at {off:#x} are outside this VF's VRAM"
            )))
        }
    }

    fn resuming(&self) -> Result<()> {
        let state = self.state();
        if state != MigState::Resuming {
            return Err(ComponentError::WrongState {
                what: "VRAM pages",
                state,
            });
        }
        Ok(())
    }
}

impl Component for GpuFunction {
    fn section(&self) -> Section {
        let v = godwit_gpu::abi::VERSION;
        Section::new(
            "gpu",
            godwit_gpu::vf::STATE_VERSION,
            &[
                ("profile", self.profile.clone()),
                ("abi", format!("{}.{}", v >> 16, v & 0xffff)),
                ("backend", self.backend.clone()),
                ("vram", self.m.vf.backend().vram_size().to_string()),
            ],
        )
    }

    fn stop_order(&self) -> u8 {
        // After the vCPUs that feed it, before the memory and interrupt controllers it
        // writes.
        1
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
        use MigState::*;
        match (from, to) {
            (Running, PreCopy) => {
                self.start_tracking()?;
                i.tracking = true;
                i.paged.begin(&self.m);
            }
            (PreCopy, Running) | (PreCopyP2p, RunningP2p) | (StopCopy, Stop) => {
                if std::mem::take(&mut i.tracking) {
                    self.stop_tracking();
                }
                i.paged = Paged::default();
            }
            (PreCopyP2p, StopCopy) | (RunningP2p, Stop) => {
                self.hold(&mut i);
                i.preempted = self.m.vf.save_state().is_ok_and(|s| s.in_flight.is_some());
            }
            // Stop-and-copy: all of VRAM inside the pause.
            (Stop, StopCopy) => i.paged.begin_stopped(&self.m),
            (Stop, Resuming) => i.loaded = false,
            (Resuming, Stop) if !i.loaded => {
                return Err(ComponentError::Refused("no GPU state arrived".into()))
            }
            (Stop, RunningP2p) if i.held => {
                self.m.vf.resume(Hold::Migration);
                i.held = false;
            }
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
        let mut extra = std::collections::BTreeMap::new();
        extra.insert("preempted".to_string(), i.preempted as u64);
        if !i.tracking {
            return Ok(SyncReport {
                extra,
                ..Default::default()
            });
        }
        let t = Instant::now();
        let (dirty, aperture, engine) = self.m.take(last)?;
        let log_us = t.elapsed().as_secs_f64() * 1e6;
        let n = if last {
            i.paged.finish(dirty)
        } else {
            i.paged.sync(dirty)
        };
        extra.insert("aperture_pages".into(), aperture);
        extra.insert("engine_pages".into(), engine);
        Ok(SyncReport {
            dirty_pages: n,
            log_us,
            extra,
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
        let i = self.lock();
        if i.state != MigState::StopCopy {
            return Err(ComponentError::WrongState {
                what: "save",
                state: i.state,
            });
        }
        let s = self.m.vf.save_state().map_err(ComponentError::Refused)?;
        Ok(s.encode())
    }

    fn load(&self, bytes: &[u8]) -> Result<()> {
        let mut i = self.lock();
        if i.state != MigState::Resuming {
            return Err(ComponentError::WrongState {
                what: "load",
                state: i.state,
            });
        }
        let s = VfState::decode(bytes).map_err(ComponentError::Refused)?;
        self.m
            .vf
            .restore_state(&s)
            .map_err(|e| ComponentError::Refused(format!("GPU state: {e}")))?;
        i.loaded = true;
        Ok(())
    }

    fn load_pages(&self, addrs: &[u64], data: &[u8]) -> Result<()> {
        self.resuming()?;
        if data.len() != addrs.len() * PAGE_SIZE {
            return Err(ComponentError::Refused(
                "page data does not match its addresses".into(),
            ));
        }
        for &a in addrs {
            self.check(a, 1)?;
        }
        let b = self.m.vf.backend();
        for (a, page) in addrs.iter().zip(data.chunks_exact(PAGE_SIZE)) {
            b.write(*a, page)
                .map_err(|e| ComponentError::Refused(format!("VRAM page {a:#x}: {e:?}")))?;
        }
        Ok(())
    }

    fn load_zero(&self, runs: &[(u64, u32)]) -> Result<()> {
        self.resuming()?;
        for &(a, n) in runs {
            if n == 0 {
                return Err(ComponentError::Refused(format!("empty zero run at {a:#x}")));
            }
            self.check(a, n as u64)?;
        }
        let b = self.m.vf.backend();
        let mut buf = [0u8; PAGE_SIZE];
        for &(a, n) in runs {
            for k in 0..n as u64 {
                let at = a + k * PAGE_SIZE as u64;
                // Only pages that hold something are cleared (see the RAM component).
                let r = b.read(at, &mut buf).and_then(|_| {
                    if paged::is_zero(&buf) {
                        Ok(())
                    } else {
                        b.fill(at, PAGE_SIZE as u64, 0)
                    }
                });
                r.map_err(|e| ComponentError::Refused(format!("VRAM page {at:#x}: {e:?}")))?;
            }
        }
        Ok(())
    }
}
