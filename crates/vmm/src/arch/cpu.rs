//! vCPU set-up shared by every kind of guest: CPUID, FPU, local APIC, the MSRs to save.

use crate::error::{KvmContext, Result};
use kvm_bindings::{kvm_fpu, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd};

/// The host's supported CPUID with this vCPU's APIC ID and the vCPU count filled in.
pub fn cpuid_for(base: &CpuId, index: u32, count: u32) -> CpuId {
    let mut cpuid = base.clone();
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (index << 24) | (count.min(255) << 16);
                // Hypervisor present.
                e.ecx |= 1 << 31;
            }
            0xb | 0x1f => e.edx = index,
            _ => {}
        }
    }
    cpuid
}

pub fn supported_cpuid(kvm: &Kvm) -> Result<CpuId> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .kvm("KVM_GET_SUPPORTED_CPUID")
}

/// FPU at reset, with SSE exceptions masked.
pub fn reset_fpu(vcpu: &VcpuFd) -> Result<()> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).kvm("KVM_SET_FPU")
}

/// LINT0 as ExtINT and LINT1 as NMI, as firmware leaves them for an OS.
pub fn setup_lapic_lints(vcpu: &VcpuFd) -> Result<()> {
    const LVT_LINT0: usize = 0x350;
    const LVT_LINT1: usize = 0x360;
    let mut lapic = vcpu.get_lapic().kvm("KVM_GET_LAPIC")?;
    let set = |regs: &mut [i8], off: usize, mode: u32| {
        let mut b = [0u8; 4];
        for (i, x) in b.iter_mut().enumerate() {
            *x = regs[off + i] as u8;
        }
        let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
        for (i, x) in v.to_le_bytes().iter().enumerate() {
            regs[off + i] = *x as i8;
        }
    };
    set(&mut lapic.regs, LVT_LINT0, 0x7);
    set(&mut lapic.regs, LVT_LINT1, 0x4);
    vcpu.set_lapic(&lapic).kvm("KVM_SET_LAPIC")
}

/// For godwit's ring-3 guests, which have no kernel to do it: the LAPIC software-enabled
/// (spurious vector 0xff), task priority 0, LINT0 masked (no legacy PIC interrupts),
/// LINT1 as NMI. Device MSIs then reach the vectors of `godwit_guest::abi::irq`.
pub fn enable_lapic(vcpu: &VcpuFd) -> Result<()> {
    const TPR: usize = 0x80;
    const SVR: usize = 0xf0;
    const LVT_LINT0: usize = 0x350;
    const LVT_LINT1: usize = 0x360;
    let mut lapic = vcpu.get_lapic().kvm("KVM_GET_LAPIC")?;
    let mut set = |off: usize, v: u32| {
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[off + i] = *b as i8;
        }
    };
    set(TPR, 0);
    set(SVR, 0x1ff);
    set(LVT_LINT0, 1 << 16);
    set(LVT_LINT1, 0x4 << 8);
    vcpu.set_lapic(&lapic).kvm("KVM_SET_LAPIC")
}

/// The MSRs KVM lists that this vCPU can actually read: what a save must capture.
pub fn savable_msrs(kvm: &Kvm, vcpu: &VcpuFd) -> Result<Vec<u32>> {
    let list = kvm.get_msr_index_list().kvm("KVM_GET_MSR_INDEX_LIST")?;
    let mut ok = Vec::new();
    for &index in list.as_slice() {
        let mut msrs = Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
            index,
            ..Default::default()
        }])
        .expect("one entry fits");
        if matches!(vcpu.get_msrs(&mut msrs), Ok(1)) {
            ok.push(index);
        }
    }
    Ok(ok)
}
