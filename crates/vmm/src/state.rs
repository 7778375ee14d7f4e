//! Plain, serialisable images of a VM's KVM objects: read from the live objects, written
//! back into fresh ones. Kept apart from the live objects (Firecracker's Persist idea) so
//! that snapshots and migration handle data, never file descriptors. The migration
//! components (`migratable`) put them into their versioned state sections.

use kvm_bindings::{
    kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_pit_state2, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use serde::{Deserialize, Serialize};

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
