//! A VM: KVM objects, memory, devices, vCPU threads, and its state image.

use crate::arch::{cpu, linux, ring3};
use crate::config::{Payload, VmConfig};
use crate::control::{Control, RunState, VmExit};
use crate::devices::gpu::{self, AttachedGpu};
use crate::devices::pci::{Ecam, LegacyConfig, PciBus, LEGACY_PORT};
use crate::devices::serial::{SerialDevice, COM1_IRQ, COM1_PORT};
use crate::devices::Bus;
use crate::dirty::{DirtyLog, DirtyStats, Slot, SlotId};
use crate::error::{Error, KvmContext, Result};
use crate::memory::{self, GuestMemory, RamRegion};
use crate::migratable::{self, Component, Section};
use crate::state::GuestKind;
use crate::vcpu::{self, Vcpu, VcpuContext, VcpuStats};
use kvm_bindings::{kvm_mp_state, kvm_pit_config, KVM_MP_STATE_RUNNABLE, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm};
use serde::Serialize;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

/// Static facts about a VM, for `vm.info`.
#[derive(Clone, Debug, Serialize)]
pub struct VmDescription {
    /// The name its manager gave it (`godwit run --id`), if any.
    pub id: Option<String>,
    pub guest: String,
    pub kind: GuestKind,
    pub memory_mib: u64,
    pub vcpus: u32,
    pub ram: Vec<RamRegion>,
    pub console: String,
    pub tsc_khz: u32,
    pub gpu: Option<crate::devices::gpu::GpuInfo>,
    /// How guest writes are tracked for migration: bitmap or ring:ENTRIES.
    pub dirty_log: String,
}

/// What other threads (the API, a migration) may touch of a running VM.
#[derive(Clone)]
pub struct VmHandle {
    pub ctl: Arc<Control>,
    pub desc: Arc<VmDescription>,
    pub stats: Arc<Vec<Arc<VcpuStats>>>,
    pub started: Instant,
    pub machine: Arc<Machine>,
}

impl VmHandle {
    pub fn state(&self) -> RunState {
        self.ctl.state()
    }

    /// Pauses the VM: the vCPUs, then its devices (a GPU stops computing and writing
    /// memory too). Returns once everything is parked.
    pub fn pause(&self) -> std::result::Result<(), &'static str> {
        self.ctl.pause()?;
        if let Some(g) = self.machine.gpu() {
            g.vf.pause(godwit_gpu::Hold::User);
        }
        Ok(())
    }

    /// Resumes a paused VM: its devices, then the vCPUs.
    pub fn resume(&self) -> std::result::Result<(), &'static str> {
        if self.ctl.state() != RunState::Paused {
            return self.ctl.resume();
        }
        if let Some(g) = self.machine.gpu() {
            g.vf.resume(godwit_gpu::Hold::User);
        }
        self.ctl.resume()
    }
}

/// The KVM objects and devices of a VM: shared by the thread that owns the VM and the
/// threads that pause, save or migrate it.
pub struct Machine {
    _kvm: Kvm,
    ctx: VcpuContext,
    desc: Arc<VmDescription>,
    /// Everything that migrates, in the order of `stop_order`.
    components: Vec<Arc<dyn Component>>,
    ram_slots: Vec<SlotId>,
    /// Dropped after the components (it owns memory a component's memory slot maps).
    gpu: Option<AttachedGpu>,
}

pub struct Vm {
    m: Arc<Machine>,
    handle: VmHandle,
    threads: Vec<JoinHandle<()>>,
    vcpus: Vec<Arc<Mutex<Vcpu>>>,
}

fn open_kvm() -> Result<Kvm> {
    let kvm = Kvm::new().map_err(Error::KvmOpen)?;
    let v = kvm.get_api_version();
    if v != 12 {
        return Err(Error::KvmVersion(v));
    }
    for (cap, name) in [
        (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
        (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
        (Cap::Pit2, "KVM_CAP_PIT2"),
        (Cap::Irqfd, "KVM_CAP_IRQFD"),
        (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(Error::KvmCap(name));
        }
    }
    Ok(kvm)
}

impl Vm {
    /// Builds the VM up to the point where its vCPUs could run. Nothing runs yet.
    pub fn create(cfg: VmConfig) -> Result<Vm> {
        cfg.validate()?;
        let kvm = open_kvm()?;
        // KVM_GET_SUPPORTED_CPUID needs only /dev/kvm and took a millisecond on some
        // hosts: it runs on a thread of its own beside the VM's creation and the
        // registration of its memory, which is KVM's own work on the other core.
        let cpuid = std::thread::Builder::new()
            .name("cpuid".into())
            .spawn(|| cpu::supported_cpuid(&Kvm::new().map_err(Error::KvmOpen)?))
            .map_err(Error::Thread)?;
        // Shared with devices that signal interrupts from their own threads.
        let fd = Arc::new(kvm.create_vm().kvm("KVM_CREATE_VM")?);
        let bytes = cfg
            .memory_mib
            .checked_mul(memory::MIB)
            .ok_or_else(|| Error::Config("memory size overflows".into()))?;
        // `untouched`: no page of it is mapped for the guest yet, and every page reads
        // as zero.
        let (mem, shared, untouched, retired) = match cfg.prefaulted.take(bytes)? {
            Some(r) => (r.mem, Some(r.shared), r.bare, r.retired),
            None => (memory::create(bytes)?, None, true, None),
        };
        let ram = memory::layout(bytes);
        // The tracker owns the memory slots; the ring (if any) must exist before the
        // vCPUs. The slots come first, on this thread: made once the irqchip or a vCPU
        // exists, or beside them on another thread, a slot took 5-10 ms here against
        // 0.1-1 ms (KVM's slots lock and a grace period; tried three times, see
        // docs/benchmarks.md, "Registering the memory slots beside the rest").
        let mut dirty = DirtyLog::new(fd.clone(), cfg.dirty_log)?;
        let mut ram_slots = Vec::new();
        for (i, region) in mem.iter().enumerate() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|e| Error::Memory(e.to_string()))?;
            let slot = Slot {
                id: i as SlotId,
                guest_phys_addr: region.start_addr().0,
                size: region.len(),
                host: host as u64,
            };
            // SAFETY: the mapping belongs to `mem`, which the VM holds (in its vCPU
            // context) for as long as the VM and its KVM fd exist.
            unsafe { dirty.add_slot(slot) }?;
            ram_slots.push(slot.id);
        }

        fd.set_tss_address(0xfffb_d000).kvm("KVM_SET_TSS_ADDR")?;
        fd.create_irq_chip().kvm("KVM_CREATE_IRQCHIP")?;
        fd.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .kvm("KVM_CREATE_PIT2")?;

        let console = cfg.console.describe();
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| Error::Memory(e.to_string()))?;
        fd.register_irqfd(&irq, COM1_IRQ).kvm("KVM_IRQFD")?;
        let serial = Arc::new(Mutex::new(SerialDevice::new(irq, cfg.console.open()?)));
        let pci = Arc::new(Mutex::new(PciBus::new()));
        let mut pio = Bus::default();
        let mut mmio = Bus::default();
        pio.insert(COM1_PORT, 8, serial.clone())
            .map_err(Error::Config)?;
        pio.insert(
            LEGACY_PORT,
            8,
            Arc::new(Mutex::new(LegacyConfig {
                bus: pci.clone(),
                address: 0,
            })),
        )
        .map_err(Error::Config)?;
        mmio.insert(
            memory::ECAM_BASE,
            memory::ECAM_SIZE,
            Arc::new(Mutex::new(Ecam(pci.clone()))),
        )
        .map_err(Error::Config)?;

        let ctl = Arc::new(Control::new());
        let ram_end = ram.iter().map(|r| r.end()).max().unwrap_or(0);
        let (mut vram_shared, mut vram_retired) = (None, None);
        let gpu = match &cfg.gpu {
            None => None,
            Some(req) => {
                let gpu::Parts {
                    gpu: g,
                    function,
                    regs,
                    vram_shared: shared,
                    vram_retired: retired,
                } = gpu::attach(
                    req,
                    gpu::Slots {
                        fd: &fd,
                        mem: &mem,
                        ram_end,
                        ctl: &ctl,
                        dirty: &mut dirty,
                        prefaulted: &cfg.prefaulted,
                    },
                )?;
                mmio.insert(gpu::REGS_BASE, godwit_gpu::abi::REGS_SIZE, regs)
                    .map_err(Error::Config)?;
                pci.lock()
                    .unwrap()
                    .add(function)
                    .ok_or_else(|| Error::Config("no free PCI slot".into()))?;
                (vram_shared, vram_retired) = (shared, retired);
                Some(g)
            }
        };
        let map_top = gpu
            .as_ref()
            .map(|g| g.info.vram_bar + g.info.framebuffer)
            .unwrap_or(0);

        let base_cpuid = cpuid
            .join()
            .map_err(|_| Error::State("the CPUID query's thread panicked".into()))??;
        let mut vcpu_fds = Vec::new();
        for i in 0..cfg.vcpus {
            let v = fd.create_vcpu(i as u64).kvm("KVM_CREATE_VCPU")?;
            v.set_cpuid2(&cpu::cpuid_for(&base_cpuid, i, cfg.vcpus))
                .kvm("KVM_SET_CPUID2")?;
            dirty.add_vcpu(&v)?;
            vcpu_fds.push(v);
        }
        let tsc_khz = vcpu_fds[0].get_tsc_khz().kvm("KVM_GET_TSC_KHZ")?;
        let msr_list = Arc::new(cpu::savable_msrs(&kvm, &vcpu_fds[0])?);

        let (kind, guest) = match &cfg.payload {
            Payload::Guest { name, image, args } => {
                let (entry, end) = crate::loader::load_guest(&mem, &ram, name, image)?;
                ring3::setup_memory(&mem, &ram, cfg.vcpus, tsc_khz, end, args, map_top)?;
                for (i, v) in vcpu_fds.iter().enumerate() {
                    let i = i as u32;
                    let base = v.get_sregs().kvm("KVM_GET_SREGS")?;
                    v.set_sregs(&ring3::sregs(&base, i)).kvm("KVM_SET_SREGS")?;
                    v.set_regs(&ring3::regs(entry, i)).kvm("KVM_SET_REGS")?;
                    cpu::reset_fpu(v)?;
                    cpu::enable_lapic(v)?;
                    // With the in-kernel irqchip, APs would wait for INIT/SIPI forever.
                    v.set_mp_state(kvm_mp_state {
                        mp_state: KVM_MP_STATE_RUNNABLE,
                    })
                    .kvm("KVM_SET_MP_STATE")?;
                }
                (GuestKind::Godwit, name.clone())
            }
            Payload::Linux {
                kernel,
                initrd,
                cmdline,
            } => {
                let k = linux::load(&mem, &ram, kernel, initrd.as_deref(), cmdline)?;
                for (i, v) in vcpu_fds.iter().enumerate() {
                    cpu::reset_fpu(v)?;
                    cpu::setup_lapic_lints(v)?;
                    if i == 0 {
                        let base = v.get_sregs().kvm("KVM_GET_SREGS")?;
                        v.set_sregs(&linux::sregs(&base)).kvm("KVM_SET_SREGS")?;
                        v.set_regs(&linux::regs(k.entry)).kvm("KVM_SET_REGS")?;
                    }
                }
                (
                    GuestKind::Linux,
                    format!("linux:{} ({:?})", kernel.display(), k.format),
                )
            }
            Payload::Incoming { kind, guest } => (kind.clone(), guest.clone()),
        };
        let vcpus: Vec<Arc<Mutex<Vcpu>>> = vcpu_fds
            .into_iter()
            .enumerate()
            .map(|(i, fd)| {
                Arc::new(Mutex::new(Vcpu {
                    index: i as u32,
                    fd,
                    msr_list: msr_list.clone(),
                }))
            })
            .collect();
        let desc = Arc::new(VmDescription {
            id: cfg.id.clone(),
            guest,
            kind: kind.clone(),
            memory_mib: cfg.memory_mib,
            vcpus: cfg.vcpus,
            ram: ram.clone(),
            console,
            tsc_khz,
            gpu: gpu.as_ref().map(|g| g.info.clone()),
            dirty_log: dirty.mode().to_string(),
        });
        let stats = (0..cfg.vcpus)
            .map(|_| Arc::new(VcpuStats::default()))
            .collect();
        let dirty = Arc::new(Mutex::new(dirty));
        let serial_dev = serial.clone();
        let mut components: Vec<Arc<dyn Component>> = vec![Arc::new(
            migratable::vcpus::Vcpus::new(vcpus.clone(), ctl.clone()),
        )];
        let mut dma: Vec<Arc<dyn migratable::ram::DmaLog>> = Vec::new();
        let lazy_ram = migratable::lazy::Shared::default();
        // Memory made for an incoming VM and untouched since holds nothing to drop when
        // it goes lazy (`MemoryState::fresh`).
        let incoming = matches!(cfg.payload, Payload::Incoming { .. });
        if let Some(g) = &gpu {
            components.push(Arc::new(
                migratable::gpu::GpuFunction::new(
                    g.vf.clone(),
                    &g.info.profile,
                    gpu::APERTURE_SLOT,
                    dirty.clone(),
                    lazy_ram.clone(),
                    cfg.gpu.as_ref().map(|r| r.prefetch).unwrap_or_default(),
                )
                .fresh(incoming && g.vram_untouched)
                .shared(vram_shared.take(), vram_retired.take()),
            ));
            dma.push(g.vf.clone());
        }
        components.push(Arc::new(
            migratable::ram::Ram::new(
                mem.clone(),
                ram.clone(),
                ram_slots.clone(),
                dirty.clone(),
                dma,
                cfg.memory_mib,
                lazy_ram,
            )
            .fresh(incoming && untouched)
            .shared(shared, retired),
        ));
        components.push(Arc::new(migratable::platform::Platform::new(
            fd.clone(),
            serial_dev,
            pci.clone(),
            kind.clone(),
        )));
        components.sort_by_key(|c| c.stop_order());
        let m = Arc::new(Machine {
            _kvm: kvm,
            ctx: VcpuContext {
                mem,
                pio: Arc::new(pio),
                mmio: Arc::new(mmio),
                serial,
                ctl: ctl.clone(),
                kind,
                dirty,
            },
            desc: desc.clone(),
            components,
            ram_slots,
            gpu,
        });
        Ok(Vm {
            handle: VmHandle {
                ctl,
                desc,
                stats: Arc::new(stats),
                started: Instant::now(),
                machine: m.clone(),
            },
            m,
            threads: Vec::new(),
            vcpus,
        })
    }

    pub fn handle(&self) -> VmHandle {
        self.handle.clone()
    }

    pub fn machine(&self) -> &Arc<Machine> {
        &self.m
    }

    pub fn memory(&self) -> &GuestMemory {
        self.m.memory()
    }

    /// Starts one thread per vCPU.
    pub fn start(&mut self) -> Result<()> {
        if !self.threads.is_empty() {
            return Err(Error::State("the VM is already started".into()));
        }
        crate::control::install_kick_handler().map_err(Error::Thread)?;
        for (i, v) in self.vcpus.iter().enumerate() {
            let (v, ctx, stats) = (v.clone(), self.m.ctx.clone(), self.handle.stats[i].clone());
            let t = std::thread::Builder::new()
                .name(format!("vcpu{i}"))
                .spawn(move || vcpu::run(v, ctx, stats));
            match t {
                Ok(t) => self.threads.push(t),
                Err(e) => {
                    // Never leave a half-started VM: stop the vCPUs already running.
                    self.handle
                        .ctl
                        .request_exit(VmExit::Error(format!("cannot start vCPU {i}: {e}")));
                    return Err(Error::Thread(e));
                }
            }
        }
        self.handle.ctl.launched();
        Ok(())
    }

    /// Creates the vCPU threads now but keeps them parked until `resume` (see
    /// `Control::stage`); the state may still be restored meanwhile.
    pub fn start_paused(&mut self) -> Result<()> {
        self.handle.ctl.stage();
        self.start()?;
        // Every thread parks before it touches its vCPU; waiting for all of them keeps a
        // slow thread start from showing up later, inside the switchover.
        let n = self.vcpus.len() as u32;
        if !self
            .handle
            .ctl
            .wait_parked(n, std::time::Duration::from_secs(5))
        {
            return Err(Error::State("vCPU threads did not park".into()));
        }
        Ok(())
    }

    /// Waits for the VM to stop and all vCPU threads to end.
    pub fn wait(&mut self) -> VmExit {
        let why = self.handle.ctl.wait_exit();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        why
    }

    /// The VM's parts that migrate, in stop order.
    pub fn components(&self) -> &[Arc<dyn Component>] {
        self.m.components()
    }
}

impl Machine {
    pub fn memory(&self) -> &GuestMemory {
        &self.ctx.mem
    }

    pub fn control(&self) -> &Arc<Control> {
        &self.ctx.ctl
    }

    /// The attached GPU function, if any.
    pub fn gpu(&self) -> Option<&AttachedGpu> {
        self.gpu.as_ref()
    }

    pub fn description(&self) -> &VmDescription {
        &self.desc
    }

    /// The VM's parts that migrate, in stop order.
    pub fn components(&self) -> &[Arc<dyn Component>] {
        &self.components
    }

    /// What each part says about itself to a migration destination.
    pub fn sections(&self) -> Vec<Section> {
        self.components.iter().map(|c| c.section()).collect()
    }

    /// The memory slots and their dirty tracker (tests look at it directly).
    pub fn dirty_log(&self) -> &Arc<Mutex<DirtyLog>> {
        &self.ctx.dirty
    }

    /// The memory slots of guest RAM, region by region.
    pub fn ram_slots(&self) -> &[SlotId] {
        &self.ram_slots
    }

    fn dirty(&self) -> std::sync::MutexGuard<'_, DirtyLog> {
        self.ctx.dirty.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How this VM tracks guest writes, for reports: "ring", "manual-protect", "classic".
    pub fn dirty_log_kind(&self) -> &'static str {
        self.dirty().describe()
    }

    pub fn dirty_stats(&self) -> DirtyStats {
        self.dirty().stats()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.handle.ctl.request_exit(VmExit::Shutdown);
            self.wait();
        }
    }
}
