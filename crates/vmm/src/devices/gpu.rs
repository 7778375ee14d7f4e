//! A virtual GPU function in the VM: its PCI function (ids, a register BAR, a VRAM
//! aperture BAR, an MSI capability), the register BAR's MMIO handler, the VF's interrupt
//! as an MSI, and the aperture mapped straight into the guest as a KVM memory slot (the
//! guest's loads and stores never exit). The device
//! model itself is godwit-gpu's `Vf`; the VF comes from the host's GPU manager.

use super::bus::SharedDevice;
use super::pci::{BarKind, PciConfig, PciDevice};
use crate::config::GpuRequest;
use crate::control::Control;
use crate::dirty::{DirtyLog, Slot, SlotId};
use crate::error::{Error, Result};
use crate::memory::{self, GuestMemory, SharedRam, GIB};
use godwit_gpu::abi;
use godwit_gpu::cpu::CpuBackend;
use godwit_gpu::{IrqLine, Lease, Manager, Vf};
use kvm_bindings::kvm_msi;
use kvm_ioctls::VmFd;
use serde::Serialize;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// KVM slot of the VRAM aperture (RAM uses slots 0 and 1).
pub const APERTURE_SLOT: SlotId = 8;
/// The register BAR: the first page of the 32-bit PCI window.
pub const REGS_BASE: u64 = memory::PCI_MMIO_BASE;

/// What `vm.info` shows of the GPU.
#[derive(Clone, Debug, Serialize)]
pub struct GpuInfo {
    pub gpu: usize,
    pub vf: usize,
    pub profile: String,
    pub framebuffer: u64,
    pub vram_offset: u64,
    pub backend: String,
    pub regs_bar: u64,
    pub vram_bar: u64,
}

/// Where the aperture goes: the first address above RAM (and 4 GiB) aligned to its size,
/// as firmware places 64-bit BARs.
pub fn aperture_base(ram_end: u64, size: u64) -> u64 {
    ram_end.max(memory::MMIO_HOLE_END).div_ceil(size) * size
}

/// The VF's interrupt: an MSI with the message the guest last programmed (kept current
/// by config-space writes), sent with KVM_SIGNAL_MSI into the in-kernel LAPICs.
struct Msi {
    fd: Arc<VmFd>,
    message: Mutex<Option<kvm_msi>>,
}

impl IrqLine for Msi {
    fn raise(&self) {
        let m = *self.message.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = m {
            // A message to no LAPIC is dropped, as on real hardware.
            if let Err(e) = self.fd.signal_msi(m) {
                tracing::debug!(error = %e, "KVM_SIGNAL_MSI");
            }
        }
    }
}

struct Function {
    config: PciConfig,
    msi: Arc<Msi>,
}

impl PciDevice for Function {
    fn name(&self) -> &str {
        "gpu-vf"
    }
    fn config(&self) -> &PciConfig {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }
    fn config_changed(&mut self) {
        // Only messages to the LAPIC window are interrupts; anything else would be a DMA
        // write to that address, which this VF does not make: it sends nothing.
        let lapic = |a: u64| a >> 20 == 0xfee;
        let m = self.config.msi_message().filter(|&(a, _)| lapic(a));
        let m = m.map(|(address, data)| kvm_msi {
            address_lo: address as u32,
            address_hi: (address >> 32) as u32,
            data,
            ..Default::default()
        });
        *self.msi.message.lock().unwrap_or_else(|e| e.into_inner()) = m;
    }
}

struct Registers {
    vf: Arc<Vf>,
    ctl: Arc<Control>,
}

impl SharedDevice for Registers {
    fn read(&self, offset: u64, data: &mut [u8]) {
        self.vf.mmio_read(offset, data);
    }
    fn write(&self, offset: u64, data: &[u8]) {
        // A fence wait blocks this vCPU, but gives way as soon as the VMM needs it.
        self.vf.mmio_write(offset, data, &|| self.ctl.stopping());
    }
}

/// A VF attached to this VM: dropping it stops the engine and gives the VF back.
pub struct AttachedGpu {
    pub info: GpuInfo,
    pub vf: Arc<Vf>,
    /// Its VRAM maps no page and holds nothing: mapped just now, not prefaulted, or
    /// prefaulted and mapped anew for post-copy.
    pub vram_untouched: bool,
    engine: Option<JoinHandle<()>>,
    _lease: Lease,
}

impl Drop for AttachedGpu {
    fn drop(&mut self) {
        self.vf.shutdown();
        if let Some(t) = self.engine.take() {
            let _ = t.join();
        }
    }
}

/// The parts of a VM a GPU is plugged into.
pub struct Slots<'a> {
    pub fd: &'a Arc<VmFd>,
    pub mem: &'a GuestMemory,
    pub ram_end: u64,
    pub ctl: &'a Arc<Control>,
    /// The VM's memory slots (the aperture becomes one).
    pub dirty: &'a mut DirtyLog,
    /// VRAM readied beforehand (`--prefault`), taken if there is some.
    pub prefaulted: &'a crate::memory::Prefaulted,
}

/// A built device and what the caller plugs into its buses.
pub struct Parts {
    pub gpu: AttachedGpu,
    pub function: Box<dyn PciDevice>,
    /// The register BAR's handler, for the MMIO bus at REGS_BASE.
    pub regs: Arc<dyn SharedDevice>,
    /// Prefaulted VRAM is shared memory with an alias, which post-copy fills through.
    pub vram_shared: Option<Arc<SharedRam>>,
    /// Its old mapping, if post-copy had it mapped anew: to drop once post-copy ends.
    pub vram_retired: Option<CpuBackend>,
}

/// Takes a VF from the host's manager and builds the device.
pub fn attach(req: &GpuRequest, at: Slots) -> Result<Parts> {
    let mgr = Manager::open(&req.manager_dir).map_err(|e| Error::Gpu(e.to_string()))?;
    let lease = mgr
        .allocate_on(&req.profile, &req.vm_name, req.gpu_index)
        .map_err(|e| Error::Gpu(e.to_string()))?;
    let fb = lease.profile.framebuffer;
    let vram_bar = aperture_base(at.ram_end, fb);
    if vram_bar + fb > 64 * GIB {
        return Err(Error::Config(format!(
            "a {} GiB VRAM aperture above {} GiB of guest RAM does not fit under 64 GiB",
            fb / GIB,
            at.ram_end.div_ceil(GIB)
        )));
    }
    let (backend, vram_untouched, vram_shared, vram_retired) = match at.prefaulted.take_vram(fb)? {
        Some(v) => {
            tracing::info!("the GPU function's VRAM is the one prefaulted");
            (v.backend, v.bare, Some(v.shared), v.retired)
        }
        None => (
            CpuBackend::new(fb).map_err(|e| Error::Gpu(format!("VRAM: {e}")))?,
            true,
            None,
            None,
        ),
    };
    let ap = godwit_gpu::backend::Backend::aperture(&backend)
        .ok_or_else(|| Error::Gpu("the backend cannot map VRAM into the guest".into()))?;
    let slot = Slot {
        id: APERTURE_SLOT,
        guest_phys_addr: vram_bar,
        size: ap.len,
        host: ap.host,
    };
    let vf = Vf::new(Box::new(backend), at.mem.clone(), Box::new(lease.seat()));
    // SAFETY: the aperture mapping is owned by the backend inside `vf`, which the VM keeps
    // (in AttachedGpu) for as long as the VM and its KVM fd exist.
    unsafe { at.dirty.add_slot(slot) }?;
    let mut config = PciConfig::new(abi::VENDOR_ID, abi::DEVICE_ID_VF, abi::CLASS, abi::REVISION);
    config.add_bar(
        abi::BAR_REGS,
        BarKind::Mem32,
        abi::REGS_SIZE,
        REGS_BASE,
        false,
    );
    config.add_bar(abi::BAR_VRAM, BarKind::Mem64, fb, vram_bar, true);
    config.add_msi(abi::MSI_CAP as usize);
    let msi = Arc::new(Msi {
        fd: at.fd.clone(),
        message: Mutex::new(None),
    });
    vf.connect_irq(msi.clone());
    let engine = vf
        .start(&format!("gpu{}-vf{}", lease.gpu, lease.slot), || {
            crate::confine::enter(crate::confine::Role::GpuEngine)
        })
        .map_err(|e| Error::Gpu(format!("the engine thread: {e}")))?;
    let info = GpuInfo {
        gpu: lease.gpu,
        vf: lease.slot,
        profile: lease.profile.name.into(),
        framebuffer: fb,
        vram_offset: lease.vram_offset(),
        backend: "cpu".into(),
        regs_bar: REGS_BASE,
        vram_bar,
    };
    tracing::info!(?info, "GPU VF attached");
    let regs = Arc::new(Registers {
        vf: vf.clone(),
        ctl: at.ctl.clone(),
    });
    Ok(Parts {
        gpu: AttachedGpu {
            info,
            vf,
            vram_untouched,
            engine: Some(engine),
            _lease: lease,
        },
        function: Box::new(Function { config, msi }),
        regs,
        vram_shared,
        vram_retired,
    })
}
