//! A GPU virtual function as a migration component, the way the SR-IOV GPU migration
//! work does it: VRAM is pre-copied while the VF keeps computing, with every write
//! tracked (the guest's stores through the aperture in KVM's dirty log of its memory
//! slot, the engine's own writes recorded by the VF model); at the switchover the VF
//! stops after the vCPUs, preempting the command in flight at a chunk boundary, and its
//! registers, ring position, fences, interrupt state and that command travel as its
//! state. A destination takes the state through the same checks as guest input and
//! resumes the command where it stopped.

use super::lazy::HostRegion;
use super::paged::{self, Bitmap, Memory, MemoryState, PAGE_SIZE};
use super::ram::{merge, DmaLog};
use super::Faults;
use super::{
    check_arc, expect, Component, ComponentError, MigState, PageSource, PreCopyInfo, ReadReport,
    Result, Section, Sink, SyncReport,
};
use crate::config::GpuPrefetch;
use crate::dirty::{DirtyLog, SlotId, Written};
use crate::memory::SharedRam;
use godwit_gpu::cpu::CpuBackend;
use godwit_gpu::{Hold, Vf, VfState};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

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
    /// The alias of shared (prefaulted) VRAM, where post-copy writes pages.
    shared: Option<Arc<SharedRam>>,
    /// Its old mapping (`memory::Prefaulted::unmap_for_postcopy`), until post-copy ends.
    retired: Mutex<Option<CpuBackend>>,
}

impl Vram {
    fn log(&self) -> MutexGuard<'_, DirtyLog> {
        self.dirty.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn pages(&self) -> u64 {
        self.vf.backend().vram_size() / PAGE_SIZE as u64
    }

    fn failed(&self, at: u64, e: godwit_gpu::backend::OutOfRange) -> ComponentError {
        ComponentError::Refused(format!("VRAM page {at:#x}: {e:?}"))
    }
}

impl Memory for Vram {
    fn what(&self) -> &'static str {
        "this VF's VRAM"
    }

    fn base(&self, _region: usize) -> u64 {
        0
    }

    fn read_page(&self, _region: usize, page: u64, buf: &mut [u8]) -> Result<()> {
        self.read_at(page * PAGE_SIZE as u64, buf)
    }

    fn populated(&self) -> Vec<Bitmap> {
        // What the backend ever backed; a backend VRAM the host cannot see is sent whole,
        // and so is shared VRAM, whose pages the engine's mapping may not map while they
        // hold data (reached through the alias, or unmapped with their huge page), as
        // RAM's.
        if self.shared.is_some() {
            return vec![crate::pagemap::all(self.pages())];
        }
        let bits = self
            .vf
            .backend()
            .aperture()
            .and_then(|a| crate::pagemap::populated(a.host, a.len))
            .unwrap_or_else(|| crate::pagemap::all(self.pages()));
        vec![bits]
    }

    fn start_tracking(&self) -> Result<()> {
        self.vf.start_vram_tracking();
        if let Err(e) = self.log().start(&[self.slot]) {
            self.vf.stop_vram_tracking();
            return Err(e.into());
        }
        Ok(())
    }

    fn stop_tracking(&self) {
        let _ = self.log().stop(&[self.slot]);
        self.vf.stop_vram_tracking();
    }

    /// The guest's stores through the aperture (KVM) and the engine's writes, merged.
    fn take(&self, last: bool) -> Result<(Vec<Bitmap>, BTreeMap<String, u64>)> {
        let mut kvm = if last {
            self.log().take_last(&[self.slot])?
        } else {
            self.log().take(&[self.slot])?
        };
        let aperture = paged::count(&kvm);
        // The engine's bits go straight into KVM's bitmap: a bitmap of their own cost
        // every take (the last one inside the pause) a fresh 256 KiB at 8 GiB of VRAM
        // and another pass over it.
        let engine = match kvm.first_mut() {
            Some(b) => self.vf.take_vram_dirty_into(b),
            None => 0,
        };
        let extra = [
            ("aperture_pages".to_string(), aperture),
            ("engine_pages".to_string(), engine),
        ];
        Ok((kvm, extra.into()))
    }

    fn peek_dirty(&self) -> Result<Option<Written>> {
        let Some(w) = self.log().peek(&[self.slot])? else {
            return Ok(None);
        };
        Ok(Some(merge(w, &[self.vf.peek_vram_dirty()])))
    }

    fn contains(&self, off: u64, pages: u64) -> bool {
        let end = pages
            .checked_mul(PAGE_SIZE as u64)
            .and_then(|l| off.checked_add(l));
        end.is_some_and(|e| e <= self.vf.backend().vram_size())
    }

    fn read_at(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        self.vf
            .backend()
            .read(off, buf)
            .map_err(|e| self.failed(off, e))
    }

    fn write_at(&self, off: u64, data: &[u8]) -> Result<()> {
        self.vf
            .backend()
            .write(off, data)
            .map_err(|e| self.failed(off, e))
    }

    fn pages_slice(&self, off: u64, pages: usize) -> Option<vm_memory::VolatileSlice<'_>> {
        let len = (pages as u64).checked_mul(PAGE_SIZE as u64)?;
        self.vf.backend().slice(off, len).ok().flatten()
    }

    /// The VF owns its backend, and the backend its aperture's mapping: a writer that
    /// holds the VF keeps the pages `pages_slice` gave it mapped.
    fn mapping(&self) -> Option<super::Kept> {
        Some(self.vf.clone())
    }

    /// A backend whose VRAM the host maps can run ahead of it (post-copy).
    fn host_regions(&self) -> Option<Vec<HostRegion>> {
        let a = self.vf.backend().aperture()?;
        Some(vec![HostRegion {
            host: a.host,
            len: a.len,
            base: 0,
            alias: self.shared.as_ref().and_then(|s| s.alias(0)),
        }])
    }

    fn keep_alive(&self) -> Option<super::Kept> {
        self.shared.clone().map(|s| s as super::Kept)
    }

    fn retire(&self) -> Option<Box<dyn FnOnce() + Send>> {
        paged::retiring(&self.retired, crate::memory::retire_vram)
    }
}

struct Inner {
    mem: MemoryState,
    /// This component holds the engine (so it releases it if the VM stays here).
    held: bool,
    loaded: bool,
    /// Whether a command was in flight when the engine stopped, for reports.
    preempted: bool,
    /// How far auto-converge held the engine back when it stopped, for reports: the
    /// last round's estimate of the pause assumed that share.
    held_at_stop_pct: u32,
    /// The engine's busy time at the last sync.
    engine_ns: u64,
}

pub struct GpuFunction {
    m: Vram,
    profile: String,
    backend: String,
    inner: Mutex<Inner>,
    /// Post-copy: what the engine brings in before each command.
    prefetch: Arc<Ahead>,
}

/// The VF's memories that may be missing in post-copy: its VRAM and the guest RAM.
struct Ahead {
    vram: super::lazy::Shared,
    ram: super::lazy::Shared,
}

impl Ahead {
    fn get(s: &super::lazy::Shared) -> Option<Arc<super::lazy::Lazy>> {
        s.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl godwit_gpu::Prefetch for Ahead {
    fn active(&self) -> bool {
        [&self.vram, &self.ram]
            .iter()
            .any(|s| Ahead::get(s).is_some_and(|l| l.left() > 0))
    }
    fn vram(&self, off: u64, len: u64) {
        if let Some(l) = Ahead::get(&self.vram) {
            l.fetch(off, len);
        }
    }
    fn ram(&self, gpa: u64, len: u64) {
        if let Some(l) = Ahead::get(&self.ram) {
            l.fetch(gpa, len);
        }
    }
    fn vram_here(&self, off: u64, len: u64) -> bool {
        Ahead::get(&self.vram).is_none_or(|l| l.here(off, len))
    }
    fn ram_here(&self, gpa: u64, len: u64) -> bool {
        Ahead::get(&self.ram).is_none_or(|l| l.here(gpa, len))
    }
}

impl GpuFunction {
    pub fn new(
        vf: Arc<Vf>,
        profile: &str,
        slot: SlotId,
        dirty: Arc<Mutex<DirtyLog>>,
        ram: super::lazy::Shared,
        how: GpuPrefetch,
    ) -> GpuFunction {
        let backend = vf.backend().name().to_string();
        let prefetch = Arc::new(Ahead {
            vram: Default::default(),
            ram,
        });
        match how {
            GpuPrefetch::Off => {}
            GpuPrefetch::Auto => vf.set_prefetch(Some(prefetch.clone()), false),
            GpuPrefetch::Always => vf.set_prefetch(Some(prefetch.clone()), true),
        }
        GpuFunction {
            prefetch,
            m: Vram {
                vf,
                slot,
                dirty,
                shared: None,
                retired: Mutex::new(None),
            },
            profile: profile.into(),
            backend,
            inner: Mutex::new(Inner {
                mem: MemoryState::default(),
                held: false,
                loaded: false,
                preempted: false,
                held_at_stop_pct: 0,
                engine_ns: 0,
            }),
        }
    }

    /// Says whether its VRAM maps no page and holds nothing (an incoming VM's, mapped
    /// just now or anew for post-copy: its pages come later, through this component).
    /// Post-copy then has no stale copies to drop at the switch, where dropping them
    /// walked KVM's reverse map over all of VRAM inside the pause (2.3 ms at 8 GiB).
    pub fn fresh(mut self, fresh: bool) -> GpuFunction {
        if fresh {
            self.inner.get_mut().unwrap_or_else(|e| e.into_inner()).mem = MemoryState::fresh();
        }
        self
    }

    /// Says that its VRAM is shared memory with an alias (prefaulted), which post-copy
    /// fills through, and gives it the VRAM's old mapping, if it was replaced, to drop
    /// once post-copy is over.
    pub fn shared(mut self, shared: Option<Arc<SharedRam>>, retired: Option<CpuBackend>) -> Self {
        self.m.shared = shared;
        self.m.retired = Mutex::new(retired);
        self
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
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
        self.lock().mem.state
    }

    fn set_state(&self, to: MigState) -> Result<()> {
        let mut i = self.lock();
        check_arc(i.mem.state, to)?;
        use MigState::*;
        match (i.mem.state, to) {
            // Stop: no fetch, no DMA, no interrupt from here on; a command in flight
            // stays in flight at a chunk boundary.
            (PreCopyP2p, StopCopy) | (RunningP2p, Stop) => {
                if !i.held {
                    self.m.vf.pause(Hold::Migration);
                    i.held = true;
                }
                i.preempted = self.m.vf.save_state().is_ok_and(|s| s.in_flight.is_some());
                i.held_at_stop_pct = self.m.vf.engine_cap();
            }
            (Stop, Resuming) => i.loaded = false,
            (Resuming, Stop) if !i.loaded => {
                return Err(ComponentError::Refused("no GPU state arrived".into()))
            }
            // Let go at RUNNING, not RUNNING_P2P, as the vCPUs are: a destination says
            // STARTED in between, and an engine let go first took one of the host's
            // cores from the thread that says it (GO to STARTED up to 5 ms here).
            (RunningP2p, Running) if i.held => {
                self.m.vf.resume(Hold::Migration);
                i.held = false;
            }
            (Running, PreCopy) => i.engine_ns = self.m.vf.regs().engine_ns,
            _ => {}
        }
        if !matches!(to, PreCopy | PreCopyP2p) {
            // Auto-converge ends with pre-copy, however it ends, and only once the
            // engine has stopped: uncapped on the way in PRE_COPY_P2P, it ran flat out
            // until its stop and wrote VRAM the last round's estimate never counted.
            self.m.vf.cap_engine(0);
        }
        i.mem.arc(&self.m, to)?;
        i.mem.state = to;
        Ok(())
    }

    fn precopy_info(&self) -> Result<PreCopyInfo> {
        self.lock().mem.info()
    }

    fn pages(&self) -> u64 {
        self.m.pages()
    }

    fn sync(&self) -> Result<SyncReport> {
        let mut i = self.lock();
        let mut r = i.mem.sync(&self.m)?;
        r.extra.insert("preempted".into(), i.preempted as u64);
        if i.mem.state == MigState::StopCopy {
            r.extra
                .insert("held_at_stop_pct".into(), i.held_at_stop_pct as u64);
        }
        // The engine's busy time since the last sync: what the guest got of its GPU
        // (and lost to a throttle).
        let ns = self.m.vf.regs().engine_ns;
        r.extra
            .insert("engine_us".into(), ns.saturating_sub(i.engine_ns) / 1000);
        i.engine_ns = ns;
        Ok(r)
    }

    fn throttle_order(&self) -> Option<u8> {
        // First: holding the vCPUs back does not slow an engine that has work queued,
        // and the engine's writes (VRAM, DMA) are what a GPU adds.
        Some(0)
    }

    fn throttle(&self, pct: u32) -> bool {
        if !matches!(self.state(), MigState::PreCopy | MigState::PreCopyP2p) {
            return false;
        }
        self.m.vf.cap_engine(pct);
        true
    }

    fn read(&self, sink: &mut dyn Sink, pages: u64) -> Result<ReadReport> {
        // A post-copy source sends outside the lock, which requests need too.
        let taken = self.lock().mem.take_postcopy(&self.m, pages)?;
        match taken {
            Some(t) => super::paged::send_taken(&self.m, sink, &t),
            None => self.lock().mem.read(&self.m, sink, pages),
        }
    }

    fn save(&self) -> Result<Vec<u8>> {
        expect(self.state(), MigState::StopCopy, "save")?;
        let s = self.m.vf.save_state().map_err(ComponentError::Refused)?;
        Ok(s.encode())
    }

    fn load(&self, bytes: &[u8]) -> Result<()> {
        let mut i = self.lock();
        expect(i.mem.state, MigState::Resuming, "load")?;
        let s = VfState::decode(bytes).map_err(ComponentError::Refused)?;
        self.m
            .vf
            .restore_state(&s)
            .map_err(|e| ComponentError::Refused(format!("GPU state: {e}")))?;
        i.loaded = true;
        Ok(())
    }

    fn load_pages(&self, addrs: &[u64], data: &[u8]) -> Result<()> {
        // Post-copy's placements go without this lock (see `Paged::filler`).
        let filler = self.lock().mem.filler();
        match filler {
            Some(l) => l.place(addrs, data),
            None => self.lock().mem.load_pages(&self.m, addrs, data),
        }
    }

    fn load_pages_from(&self, addrs: &[u64], src: &mut dyn PageSource) -> Result<bool> {
        let filler = self.lock().mem.filler();
        if let Some(l) = filler {
            return l.place_from(addrs, src);
        }
        // Admitted under the lock, read without it (see `MemoryState::read_in_place`).
        if !self.lock().mem.admit_in_place(&self.m, addrs)? {
            return Ok(false);
        }
        MemoryState::read_in_place(&self.m, addrs, src)?;
        Ok(true)
    }

    fn load_zero(&self, runs: &[(u64, u32)]) -> Result<()> {
        let filler = self.lock().mem.filler();
        match filler {
            Some(l) => l.zero(runs),
            None => self.lock().mem.load_zero(&self.m, runs),
        }
    }

    fn postcopy_switch(&self) -> Result<Option<Vec<Bitmap>>> {
        self.lock().mem.postcopy_switch(&self.m)
    }

    fn read_requested(&self, sink: &mut dyn Sink, addrs: &[u64]) -> Result<ReadReport> {
        let (taken, checked) = self.lock().mem.take_requested(&self.m, addrs)?;
        let r = super::paged::send_taken(&self.m, sink, &taken)?;
        checked.map(|_| r)
    }

    fn postcopy_resume(&self, missing: Vec<Bitmap>) -> Result<()> {
        self.lock().mem.postcopy_resume(&self.m, missing)
    }

    fn arriving(&self) -> Option<u64> {
        self.lock().mem.arriving()
    }

    fn lazy_regions(&self) -> Vec<(u64, u64)> {
        super::paged::lazy_regions(&self.m)
    }

    fn postcopy_expect(&self, missing: Vec<Bitmap>) -> Result<Arc<dyn Faults>> {
        let l = self.lock().mem.postcopy_expect(&self.m, missing)?;
        *self.prefetch.vram.lock().unwrap_or_else(|e| e.into_inner()) = Some(l.clone());
        Ok(l)
    }
}

#[cfg(test)]
mod tests {
    use super::super::held_sink::drain;
    use super::*;
    use crate::dirty::{DirtyLogMode, Slot};
    use godwit_gpu::backend::Backend;

    const PAGES: u64 = 32;

    /// A post-copy source sends VRAM from where the VF maps it, as it does guest RAM:
    /// each page with data is handed over in place with what keeps the aperture
    /// mapped, and still reads right once the component has let go of the VF.
    #[test]
    fn a_postcopy_source_hands_vram_over_in_place_with_the_vf() {
        let vm = Arc::new(kvm_ioctls::Kvm::new().unwrap().create_vm().unwrap());
        let mut log = DirtyLog::new(vm, DirtyLogMode::Bitmap).unwrap();
        let backend = godwit_gpu::cpu::CpuBackend::new(PAGES * PAGE_SIZE as u64).unwrap();
        for p in [2u64, 9, 30] {
            backend
                .write(p * PAGE_SIZE as u64, &[p as u8 + 1; PAGE_SIZE])
                .unwrap();
        }
        let ap = backend.aperture().unwrap();
        // SAFETY: the aperture is owned by the backend inside the VF below, which
        // outlives the VM's use of the slot (the test's end drops the log first).
        unsafe {
            log.add_slot(Slot {
                id: 1,
                guest_phys_addr: 1 << 32,
                size: ap.len,
                host: ap.host,
            })
        }
        .unwrap();
        let ram = crate::memory::create(16 << 20).unwrap();
        let vf = Vf::new(
            Box::new(backend),
            ram,
            Box::new(godwit_gpu::sched::Unshared),
        );
        let m = Vram {
            vf,
            slot: 1,
            dirty: Arc::new(Mutex::new(log)),
            shared: None,
            retired: Mutex::new(None),
        };
        let (r, out) = drain(&m, 8);
        assert_eq!((r.pages, out.copied), (3, 0), "every page in place");
        drop(m);
        for p in [2u64, 9, 30] {
            let at = p * PAGE_SIZE as u64;
            assert_eq!(out.page(at), Some(vec![p as u8 + 1; PAGE_SIZE]), "page {p}");
        }
    }
}
