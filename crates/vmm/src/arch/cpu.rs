//! vCPU set-up shared by every kind of guest: CPUID, FPU, local APIC, the MSRs to save.

use crate::error::{KvmContext, Result};
use kvm_bindings::{
    kvm_fpu, kvm_msr_entry, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES,
};
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
///
/// KVM_GET_MSRS reads its entries in order and stops at the first it cannot read,
/// returning how many it read; so one call tells apart a whole run of readable MSRs, and
/// the one it stopped at is dropped. Where every MSR reads (the usual case) this is one
/// ioctl per `KVM_MAX_MSR_ENTRIES`, not one per MSR, which a VM's start pays.
pub fn savable_msrs(kvm: &Kvm, vcpu: &VcpuFd) -> Result<Vec<u32>> {
    let list = kvm.get_msr_index_list().kvm("KVM_GET_MSR_INDEX_LIST")?;
    Ok(readable_prefixes(list.as_slice(), |indices| {
        let entries: Vec<kvm_msr_entry> = indices
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).expect("at most KVM_MAX_MSR_ENTRIES");
        // An error reads nothing: the first MSR is the one dropped.
        vcpu.get_msrs(&mut msrs).unwrap_or(0)
    }))
}

/// The indices `read` can read, where `read(indices)` says how many of `indices` in a row,
/// from the first, it read (at most `KVM_MAX_MSR_ENTRIES` asked at once).
fn readable_prefixes(list: &[u32], mut read: impl FnMut(&[u32]) -> usize) -> Vec<u32> {
    let mut ok = Vec::with_capacity(list.len());
    let mut rest = list;
    while !rest.is_empty() {
        let ask = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
        let n = read(ask).min(ask.len());
        ok.extend_from_slice(&ask[..n]);
        // The entry it stopped at cannot be read; a full read stops at none.
        rest = &rest[(n + usize::from(n < ask.len()))..];
    }
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader that reads, in a row from the first, every index not in `unreadable`.
    fn reader<'a>(unreadable: &'a [u32], calls: &'a mut usize) -> impl FnMut(&[u32]) -> usize + 'a {
        move |ask| {
            *calls += 1;
            assert!(ask.len() <= KVM_MAX_MSR_ENTRIES);
            ask.iter().take_while(|i| !unreadable.contains(i)).count()
        }
    }

    #[test]
    fn every_readable_msr_is_kept_and_only_those() {
        let list: Vec<u32> = (0..600).collect();
        for unreadable in [vec![], vec![0], vec![599], vec![3, 4, 5, 255, 256, 511]] {
            let mut calls = 0;
            let ok = readable_prefixes(&list, reader(&unreadable, &mut calls));
            let want: Vec<u32> = list
                .iter()
                .copied()
                .filter(|i| !unreadable.contains(i))
                .collect();
            assert_eq!(ok, want, "unreadable {unreadable:?}");
            // One call per run of readable MSRs, not one per MSR.
            assert!(
                calls <= 3 + unreadable.len(),
                "{calls} calls for {unreadable:?}"
            );
        }
    }

    #[test]
    fn the_batched_probe_finds_what_probing_one_at_a_time_finds() {
        let kvm = Kvm::new().expect("/dev/kvm");
        let vm = kvm.create_vm().expect("KVM_CREATE_VM");
        let vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
        let list = kvm.get_msr_index_list().unwrap();
        let one_by_one: Vec<u32> = list
            .as_slice()
            .iter()
            .copied()
            .filter(|&index| {
                let entry = kvm_msr_entry {
                    index,
                    ..Default::default()
                };
                let mut msrs = Msrs::from_entries(&[entry]).unwrap();
                matches!(vcpu.get_msrs(&mut msrs), Ok(1))
            })
            .collect();
        assert!(!one_by_one.is_empty());
        assert_eq!(savable_msrs(&kvm, &vcpu).unwrap(), one_by_one);
    }
}
