//! Segment descriptors, encoded for the guest's GDT and decoded for KVM's sregs.

use kvm_bindings::kvm_segment;

/// A code or data descriptor: `access` is the access byte (P, DPL, S, type), `flags` the
/// high nibble (G, D/B, L).
pub const fn descriptor(access: u8, flags: u8, base: u32, limit: u32) -> u64 {
    (limit as u64 & 0xffff)
        | ((base as u64 & 0xff_ffff) << 16)
        | ((access as u64) << 40)
        | (((limit as u64 >> 16) & 0xf) << 48)
        | (((flags as u64) & 0xf) << 52)
        | (((base as u64 >> 24) & 0xff) << 56)
}

pub const KERNEL_CODE64: u64 = descriptor(0x9a, 0xa, 0, 0xfffff);
pub const KERNEL_DATA: u64 = descriptor(0x92, 0xc, 0, 0xfffff);
pub const USER_DATA: u64 = descriptor(0xf2, 0xc, 0, 0xfffff);
pub const USER_CODE64: u64 = descriptor(0xfa, 0xa, 0, 0xfffff);

/// A 64-bit available TSS descriptor: two GDT slots.
pub fn tss_descriptor(base: u64, limit: u32) -> [u64; 2] {
    [descriptor(0x89, 0, base as u32, limit), base >> 32]
}

/// The KVM segment register image of a descriptor loaded with `selector`.
pub fn segment(selector: u16, desc: u64) -> kvm_segment {
    let access = (desc >> 40) as u8;
    let flags = (desc >> 52) as u8 & 0xf;
    let base = ((desc >> 16) & 0xff_ffff) | ((desc >> 56) << 24);
    let raw_limit = (desc & 0xffff) | ((desc >> 32) & 0xf_0000);
    let g = flags >> 3 & 1;
    kvm_segment {
        base,
        limit: if g == 1 {
            (raw_limit << 12 | 0xfff) as u32
        } else {
            raw_limit as u32
        },
        selector,
        type_: access & 0xf,
        present: access >> 7,
        dpl: access >> 5 & 3,
        db: flags >> 2 & 1,
        s: access >> 4 & 1,
        l: flags >> 1 & 1,
        g,
        avl: flags & 1,
        unusable: 0,
        padding: 0,
    }
}

/// An IDT interrupt gate (64-bit, 16 bytes) to `handler` in code segment `selector`.
pub fn interrupt_gate(handler: u64, selector: u16, dpl: u8) -> [u8; 16] {
    let mut g = [0u8; 16];
    g[0..2].copy_from_slice(&(handler as u16).to_le_bytes());
    g[2..4].copy_from_slice(&selector.to_le_bytes());
    g[5] = 0x8e | (dpl & 3) << 5;
    g[6..8].copy_from_slice(&((handler >> 16) as u16).to_le_bytes());
    g[8..12].copy_from_slice(&((handler >> 32) as u32).to_le_bytes());
    g
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_match_the_well_known_encodings() {
        assert_eq!(KERNEL_CODE64, 0x00AF_9A00_0000_FFFF);
        assert_eq!(KERNEL_DATA, 0x00CF_9200_0000_FFFF);
        assert_eq!(USER_DATA, 0x00CF_F200_0000_FFFF);
        assert_eq!(USER_CODE64, 0x00AF_FA00_0000_FFFF);
    }

    #[test]
    fn segments_decode() {
        let cs = segment(0x23, USER_CODE64);
        assert_eq!(
            (cs.dpl, cs.l, cs.db, cs.g, cs.s, cs.type_, cs.present),
            (3, 1, 0, 1, 1, 0xa, 1)
        );
        assert_eq!(cs.limit, 0xffff_ffff);
        let [lo, hi] = tss_descriptor(0x1234_5678_9abc, 0x2067);
        let tr = segment(0x28, lo);
        assert_eq!(tr.base, 0x5678_9abc);
        assert_eq!(hi, 0x1234);
        assert_eq!((tr.limit, tr.type_, tr.s, tr.g), (0x2067, 9, 0, 0));
    }

    #[test]
    fn gates_split_the_handler_address() {
        let g = interrupt_gate(0x1122_3344_5566_7788, 0x08, 0);
        assert_eq!(&g[0..2], &[0x88, 0x77]);
        assert_eq!(&g[2..4], &[0x08, 0]);
        assert_eq!(g[5], 0x8e);
        assert_eq!(&g[6..8], &[0x66, 0x55]);
        assert_eq!(&g[8..12], &[0x44, 0x33, 0x22, 0x11]);
    }
}
