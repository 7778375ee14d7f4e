//! A VM: KVM objects, memory, devices, vCPU threads, and its state image.

use crate::arch::{cpu, linux, ring3};
use crate::config::{Payload, VmConfig};
use crate::control::{Control, RunState, VmExit};
use crate::devices::gpu::{self, AttachedGpu};
use crate::devices::pci::{Ecam, LegacyConfig, PciBus, LEGACY_PORT};
use crate::devices::serial::{SerialDevice, COM1_IRQ, COM1_PORT};
use crate::devices::Bus;
use crate::dirty::{DirtyLog, DirtyStats, Written};
use crate::error::{Error, KvmContext, Result};
use crate::memory::{self, GuestMemory, RamRegion};
use crate::state::{DeviceStates, GuestKind, IrqchipState, VmShape, VmState, STATE_VERSION};
use crate::vcpu::{self, Vcpu, VcpuContext, VcpuStats};
use kvm_bindings::{
    kvm_irqchip, kvm_mp_state, kvm_pit_config, KVM_MP_STATE_RUNNABLE, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use serde::Serialize;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;
use vmm_sys_util::eventfd::EventFd;

/// Static facts about a VM, for `vm.info`.
#[derive(Clone, Debug, Serialize)]
pub struct VmDescription {
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
}

/// The KVM objects and devices of a VM: shared by the thread that owns the VM and the
/// threads that pause, save or migrate it.
pub struct Machine {
    _kvm: Kvm,
    fd: Arc<VmFd>,
    vcpus: Vec<Arc<Mutex<Vcpu>>>,
    ctx: VcpuContext,
    pci: Arc<Mutex<PciBus>>,
    desc: Arc<VmDescription>,
    gpu: Option<AttachedGpu>,
}

pub struct Vm {
    m: Arc<Machine>,
    handle: VmHandle,
    threads: Vec<JoinHandle<()>>,
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
        // Shared with devices that signal interrupts from their own threads.
        let fd = Arc::new(kvm.create_vm().kvm("KVM_CREATE_VM")?);
        let bytes = cfg
            .memory_mib
            .checked_mul(memory::MIB)
            .ok_or_else(|| Error::Config("memory size overflows".into()))?;
        let mem = memory::create(bytes)?;
        let ram = memory::layout(bytes);
        memory::register(&fd, &mem, 0)?;

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
        let gpu = match &cfg.gpu {
            None => None,
            Some(req) => {
                let gpu::Parts {
                    gpu: g,
                    function,
                    regs,
                } = gpu::attach(
                    req,
                    gpu::Slots {
                        fd: &fd,
                        mem: &mem,
                        ram_end,
                        ctl: &ctl,
                    },
                )?;
                mmio.insert(gpu::REGS_BASE, godwit_gpu::abi::REGS_SIZE, regs)
                    .map_err(Error::Config)?;
                pci.lock()
                    .unwrap()
                    .add(function)
                    .ok_or_else(|| Error::Config("no free PCI slot".into()))?;
                Some(g)
            }
        };
        let map_top = gpu
            .as_ref()
            .map(|g| g.info.vram_bar + g.info.framebuffer)
            .unwrap_or(0);

        let base_cpuid = cpu::supported_cpuid(&kvm)?;
        let mut dirty = DirtyLog::new(fd.clone(), cfg.dirty_log, &ram)?;
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
            guest,
            kind: kind.clone(),
            memory_mib: cfg.memory_mib,
            vcpus: cfg.vcpus,
            ram,
            console,
            tsc_khz,
            gpu: gpu.as_ref().map(|g| g.info.clone()),
            dirty_log: dirty.mode().to_string(),
        });
        let stats = (0..cfg.vcpus)
            .map(|_| Arc::new(VcpuStats::default()))
            .collect();
        let m = Arc::new(Machine {
            _kvm: kvm,
            fd,
            ctx: VcpuContext {
                mem,
                pio: Arc::new(pio),
                mmio: Arc::new(mmio),
                serial,
                ctl: ctl.clone(),
                kind,
                dirty: Arc::new(Mutex::new(dirty)),
            },
            vcpus,
            pci,
            desc: desc.clone(),
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
        for (i, v) in self.m.vcpus.iter().enumerate() {
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
        Ok(())
    }

    /// Creates the vCPU threads now but keeps them parked until `resume` (see
    /// `Control::stage`); the state may still be restored meanwhile.
    pub fn start_paused(&mut self) -> Result<()> {
        self.handle.ctl.stage();
        self.start()?;
        // Every thread parks before it touches its vCPU; waiting for all of them keeps a
        // slow thread start from showing up later, inside the switchover.
        let n = self.m.vcpus.len() as u32;
        if !self
            .handle
            .ctl
            .wait_parked(n, std::time::Duration::from_secs(5))
        {
            return Err(Error::State("vCPU threads did not park".into()));
        }
        Ok(())
    }

    /// Lets vCPU threads created by `start_paused` run.
    pub fn release(&self) -> Result<()> {
        self.handle.ctl.resume().map_err(|e| Error::State(e.into()))
    }

    /// Waits for the VM to stop and all vCPU threads to end.
    pub fn wait(&mut self) -> VmExit {
        let why = self.handle.ctl.wait_exit();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        why
    }

    pub fn shape(&self) -> VmShape {
        self.m.shape()
    }

    pub fn save_state(&self) -> Result<VmState> {
        self.m.save_state()
    }

    /// Loads a saved state into this (not yet started) VM of the same shape.
    pub fn restore_state(&self, s: &VmState) -> Result<()> {
        // Parked vCPU threads (start_paused) hold no vCPU: restoring under them is safe.
        if !self.threads.is_empty() && self.handle.ctl.state() != RunState::Paused {
            return Err(Error::State("cannot restore into a running VM".into()));
        }
        self.m.restore_state(s)
    }
}

/// Wall-clock time, for carrying real time across a migration or a snapshot.
fn unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
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

    pub fn shape(&self) -> VmShape {
        VmShape {
            ram: self.desc.ram.clone(),
            vcpus: self.desc.vcpus,
            kind: self.desc.kind.clone(),
            pci: self
                .pci
                .lock()
                .unwrap()
                .state()
                .into_iter()
                .map(|s| (s.slot, s.name))
                .collect(),
        }
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

    /// Starts logging guest writes to memory (every page reads clean from now on).
    pub fn start_dirty_log(&self) -> Result<()> {
        let mut log = self.dirty();
        log.set_on(true)?;
        if let Err(e) = memory::register(
            &self.fd,
            &self.ctx.mem,
            kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES,
        ) {
            let _ = log.set_on(false);
            return Err(e);
        }
        Ok(())
    }

    pub fn stop_dirty_log(&self) -> Result<()> {
        let mut log = self.dirty();
        if log.is_on() {
            memory::register(&self.fd, &self.ctx.mem, 0)?;
            log.set_on(false)?;
        }
        Ok(())
    }

    /// The pages written since the last call (or since logging started), one bitmap per
    /// RAM region (bit i = page i of the region), and resets them.
    pub fn take_dirty_pages(&self) -> Result<Vec<Vec<u64>>> {
        self.dirty().take()
    }

    /// The last read before logging stops, with the vCPUs stopped: as
    /// `take_dirty_pages`, without re-protecting pages nobody will track any more.
    pub fn take_last_dirty_pages(&self) -> Result<Vec<Vec<u64>>> {
        self.dirty().take_last()
    }

    /// A look at the pages written since the last `take_dirty_pages` (or, with the ring,
    /// since the last look), leaving them marked (None where the kernel cannot). A
    /// sender skips such pages, since the next round sends them anyway.
    pub fn peek_dirty_pages(&self) -> Result<Option<Written>> {
        self.dirty().peek()
    }

    fn irqchip(&self, id: u32) -> Result<Box<kvm_irqchip>> {
        let mut c = Box::new(kvm_irqchip {
            chip_id: id,
            ..Default::default()
        });
        self.fd.get_irqchip(&mut c).kvm("KVM_GET_IRQCHIP")?;
        Ok(c)
    }

    /// The VM's state, less memory. The vCPUs must not be running (paused, or not started).
    pub fn save_state(&self) -> Result<VmState> {
        if self.ctx.ctl.state() == RunState::Running {
            return Err(Error::State("pause the VM before saving its state".into()));
        }
        if self.gpu.is_some() {
            return Err(Error::State(
                "this VM has a GPU, and saving or migrating GPU state is not supported yet".into(),
            ));
        }
        let vcpus = self
            .vcpus
            .iter()
            .map(|v| v.lock().unwrap_or_else(|e| e.into_inner()).save())
            .collect::<Result<Vec<_>>>()?;
        Ok(VmState {
            version: STATE_VERSION,
            shape: self.shape(),
            guest: self.desc.guest.clone(),
            saved_at_unix_ns: unix_ns(),
            clock: self.fd.get_clock().kvm("KVM_GET_CLOCK")?,
            irqchip: IrqchipState {
                pic_master: self.irqchip(0)?,
                pic_slave: self.irqchip(1)?,
                ioapic: self.irqchip(2)?,
                pit: self.fd.get_pit2().kvm("KVM_GET_PIT2")?,
            },
            vcpus,
            devices: DeviceStates {
                serial: self.ctx.serial.lock().unwrap().state(),
                pci: self.pci.lock().unwrap().state(),
            },
        })
    }

    /// Checks that a state image fits this VM (version and shape), touching nothing.
    pub fn check_state(&self, s: &VmState) -> Result<()> {
        if s.version != STATE_VERSION {
            return Err(Error::State(format!(
                "state version {} (this godwit reads {STATE_VERSION})",
                s.version
            )));
        }
        let shape = self.shape();
        if s.shape != shape {
            return Err(Error::State(format!(
                "saved VM {:?} does not match this VM {:?}",
                s.shape, shape
            )));
        }
        if s.vcpus.len() != self.vcpus.len() {
            return Err(Error::State(format!(
                "state holds {} vCPUs, the VM has {}",
                s.vcpus.len(),
                self.vcpus.len()
            )));
        }
        Ok(())
    }

    /// Loads a saved state into this VM, whose vCPUs must not have run. The guest's
    /// clocks move on by the wall time since the state was saved, as they do while a VM
    /// is paused: the guest sees how long it was stopped.
    fn restore_state(&self, s: &VmState) -> Result<()> {
        self.check_state(s)?;
        let elapsed_ns = unix_ns().saturating_sub(s.saved_at_unix_ns);
        let mut clock = s.clock;
        clock.flags = 0;
        clock.clock = clock.clock.wrapping_add(elapsed_ns);
        self.fd.set_clock(&clock).kvm("KVM_SET_CLOCK")?;
        for c in [
            &s.irqchip.pic_master,
            &s.irqchip.pic_slave,
            &s.irqchip.ioapic,
        ] {
            self.fd.set_irqchip(c).kvm("KVM_SET_IRQCHIP")?;
        }
        self.fd.set_pit2(&s.irqchip.pit).kvm("KVM_SET_PIT2")?;
        for (v, st) in self.vcpus.iter().zip(&s.vcpus) {
            let ticks = (elapsed_ns as u128 * st.tsc_khz as u128 / 1_000_000) as u64;
            v.lock().unwrap().restore(st, ticks)?;
        }
        self.pci
            .lock()
            .unwrap()
            .restore(&s.devices.pci)
            .map_err(Error::State)?;
        let mut serial = self.ctx.serial.lock().unwrap();
        let out = std::mem::replace(serial.uart.writer_mut(), Box::new(std::io::sink()));
        let irq = serial
            .uart
            .interrupt_evt()
            .0
            .try_clone()
            .map_err(|e| Error::State(e.to_string()))?;
        *serial = SerialDevice::from_state(&s.devices.serial, irq, out).map_err(Error::State)?;
        Ok(())
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
