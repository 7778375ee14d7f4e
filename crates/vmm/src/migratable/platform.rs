//! The platform as a migration component: the in-kernel interrupt controllers and timer,
//! the KVM clock, the serial port (with bytes in flight) and every PCI function's config
//! space. All passive: they change only when the vCPUs or devices touch them, so their
//! state is read once everything else has stopped.

use super::{
    check_arc, decode, encode, expect, unix_ns, Component, ComponentError, MigState, PreCopyInfo,
    Result, Section,
};
use crate::devices::pci::{PciBus, PciSlotState};
use crate::devices::serial::{SerialDevice, SerialDeviceState};
use crate::error::KvmContext;
use crate::state::{GuestKind, IrqchipState};
use kvm_bindings::{kvm_clock_data, kvm_irqchip};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex, MutexGuard};

pub const VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
pub(crate) struct PlatformState {
    /// When the state was read (CLOCK_REALTIME): the guest's clock moves on by the
    /// time since, as it does while a VM is paused.
    saved_at_unix_ns: u64,
    clock: kvm_clock_data,
    irqchip: IrqchipState,
    serial: SerialDeviceState,
    pci: Vec<PciSlotState>,
}

struct Inner {
    state: MigState,
    loaded: bool,
}

pub struct Platform {
    fd: Arc<VmFd>,
    serial: Arc<Mutex<SerialDevice>>,
    pci: Arc<Mutex<PciBus>>,
    kind: GuestKind,
    inner: Mutex<Inner>,
}

impl Platform {
    pub fn new(
        fd: Arc<VmFd>,
        serial: Arc<Mutex<SerialDevice>>,
        pci: Arc<Mutex<PciBus>>,
        kind: GuestKind,
    ) -> Platform {
        Platform {
            fd,
            serial,
            pci,
            kind,
            inner: Mutex::new(Inner {
                state: MigState::Running,
                loaded: false,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn irqchip(&self, id: u32) -> Result<Box<kvm_irqchip>> {
        let mut c = Box::new(kvm_irqchip {
            chip_id: id,
            ..Default::default()
        });
        self.fd.get_irqchip(&mut c).kvm("KVM_GET_IRQCHIP")?;
        Ok(c)
    }

    fn pci(&self) -> MutexGuard<'_, PciBus> {
        self.pci.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Component for Platform {
    fn section(&self) -> Section {
        let pci: Vec<String> = self
            .pci()
            .state()
            .into_iter()
            .map(|s| format!("{}:{}", s.slot, s.name))
            .collect();
        let kind = match self.kind {
            GuestKind::Godwit => "godwit",
            GuestKind::Linux => "linux",
        };
        Section::new(
            "platform",
            VERSION,
            &[("guest", kind.into()), ("pci", pci.join(","))],
        )
    }

    fn stop_order(&self) -> u8 {
        3
    }

    fn state(&self) -> MigState {
        self.lock().state
    }

    fn set_state(&self, to: MigState) -> Result<()> {
        let mut i = self.lock();
        check_arc(i.state, to)?;
        match (i.state, to) {
            (MigState::Stop, MigState::Resuming) => i.loaded = false,
            (MigState::Resuming, MigState::Stop) if !i.loaded => {
                return Err(ComponentError::Refused("no platform state arrived".into()))
            }
            _ => {}
        }
        i.state = to;
        Ok(())
    }

    fn precopy_info(&self) -> Result<PreCopyInfo> {
        Ok(PreCopyInfo::default())
    }

    fn save(&self) -> Result<Vec<u8>> {
        expect(self.state(), MigState::StopCopy, "save")?;
        let s = PlatformState {
            saved_at_unix_ns: unix_ns(),
            clock: self.fd.get_clock().kvm("KVM_GET_CLOCK")?,
            irqchip: IrqchipState {
                pic_master: self.irqchip(0)?,
                pic_slave: self.irqchip(1)?,
                ioapic: self.irqchip(2)?,
                pit: self.fd.get_pit2().kvm("KVM_GET_PIT2")?,
            },
            serial: self
                .serial
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .state(),
            pci: self.pci().state(),
        };
        encode(VERSION, &s)
    }

    fn load(&self, bytes: &[u8]) -> Result<()> {
        let mut i = self.lock();
        expect(i.state, MigState::Resuming, "load")?;
        let s: PlatformState = decode("platform", VERSION, bytes)?;
        // Checked before anything is written: the PCI functions and their read-only
        // config bytes must be this VM's, and the UART state one it can hold.
        self.pci().check(&s.pci).map_err(ComponentError::Refused)?;
        let probe = vmm_sys_util::eventfd::EventFd::new(0)
            .map_err(|e| ComponentError::Refused(format!("serial: {e}")))?;
        SerialDevice::from_state(&s.serial, probe, Box::new(std::io::sink()))
            .map_err(ComponentError::Refused)?;
        for (c, id) in [
            (&s.irqchip.pic_master, 0),
            (&s.irqchip.pic_slave, 1),
            (&s.irqchip.ioapic, 2),
        ] {
            if c.chip_id != id {
                return Err(ComponentError::Refused(format!(
                    "interrupt controller {id} saved as chip {}",
                    c.chip_id
                )));
            }
        }
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
        self.pci()
            .restore(&s.pci)
            .map_err(ComponentError::Refused)?;
        let mut serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        let out = serial.uart.writer_mut().take();
        let irq = serial
            .uart
            .interrupt_evt()
            .0
            .try_clone()
            .map_err(|e| ComponentError::Refused(format!("serial: {e}")))?;
        match SerialDevice::from_state(&s.serial, irq, out) {
            Ok(d) => *serial = d,
            Err(e) => return Err(ComponentError::Refused(e)),
        }
        i.loaded = true;
        Ok(())
    }
}
