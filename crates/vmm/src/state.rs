//! Plain, serialisable images of everything a VM is: read from the live objects, written
//! back into fresh ones. Kept apart from the live objects (Firecracker's Persist idea) so
//! that snapshots and migration handle data, never file descriptors.

use crate::devices::pci::PciSlotState;
use crate::devices::serial::SerialDeviceState;
use crate::memory::RamRegion;
use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_pit_state2,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use serde::{Deserialize, Serialize};

pub const STATE_VERSION: u32 = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsrValue {
    pub index: u32,
    pub data: u64,
}

#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub index: u32,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: Box<kvm_xsave>,
    pub xcrs: kvm_xcrs,
    pub msrs: Vec<MsrValue>,
    pub lapic: Box<kvm_lapic_state>,
    pub mp_state: kvm_mp_state,
    pub events: kvm_vcpu_events,
    pub debugregs: kvm_debugregs,
    pub tsc_khz: u32,
}

/// The in-kernel interrupt controllers and timer.
#[derive(Clone, Serialize, Deserialize)]
pub struct IrqchipState {
    pub pic_master: Box<kvm_irqchip>,
    pub pic_slave: Box<kvm_irqchip>,
    pub ioapic: Box<kvm_irqchip>,
    pub pit: kvm_pit_state2,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum GuestKind {
    /// One of godwit's ring-3 guests.
    Godwit,
    Linux,
}

/// What must match between two VMs for one's state to be loaded into the other.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmShape {
    pub ram: Vec<RamRegion>,
    pub vcpus: u32,
    pub kind: GuestKind,
    /// Names of PCI devices by slot.
    pub pci: Vec<(u8, String)>,
}

#[derive(Clone, Serialize, Deserialize)]
pub struct DeviceStates {
    pub serial: SerialDeviceState,
    pub pci: Vec<PciSlotState>,
}

/// A paused VM, less its memory.
#[derive(Serialize, Deserialize)]
pub struct VmState {
    pub version: u32,
    pub shape: VmShape,
    /// What the VM runs (for `vm.info` on the side that restores it).
    pub guest: String,
    /// When the state was read (CLOCK_REALTIME): the restoring side advances the guest's
    /// clocks by the time since.
    pub saved_at_unix_ns: u64,
    pub clock: kvm_clock_data,
    pub irqchip: IrqchipState,
    pub vcpus: Vec<VcpuState>,
    pub devices: DeviceStates,
}

impl VmState {
    /// The state as bytes: the version (u32, little endian), then the fields in postcard's
    /// compact binary form. It is read inside the downtime window, where the JSON form
    /// cost about 0.1 ms to write and as much again to parse.
    pub fn encode(&self) -> Result<Vec<u8>, String> {
        let mut out = STATE_VERSION.to_le_bytes().to_vec();
        postcard::to_io(self, &mut out).map_err(|e| format!("encoding the VM state: {e}"))?;
        Ok(out)
    }

    /// Reads `encode`'s bytes; a foreign version or any malformed input is an error.
    pub fn decode(bytes: &[u8]) -> Result<VmState, String> {
        let (v, rest) = bytes
            .split_first_chunk::<4>()
            .ok_or("the VM state is truncated")?;
        let v = u32::from_le_bytes(*v);
        if v != STATE_VERSION {
            return Err(format!(
                "VM state version {v}; this godwit reads version {STATE_VERSION}"
            ));
        }
        let (s, left): (VmState, _) = postcard::take_from_bytes(rest)
            .map_err(|e| format!("the VM state is malformed: {e}"))?;
        if !left.is_empty() {
            return Err(format!("{} stray bytes after the VM state", left.len()));
        }
        if s.version != STATE_VERSION {
            return Err(format!(
                "VM state version field {} does not match",
                s.version
            ));
        }
        Ok(s)
    }
}
