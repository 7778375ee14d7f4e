//! godwit's guest side, seen from the host: the ELF images of the guest programs (built by
//! build.rs from rt/ and programs/) and the boot ABI they share with the VMM.

#[path = "../abi.rs"]
pub mod abi;

include!(concat!(env!("OUT_DIR"), "/images.rs"));

/// The image of a built-in guest program, by name (`heartbeat`, `dirtier`, ...).
pub fn image(name: &str) -> Option<&'static [u8]> {
    IMAGES.iter().find(|(n, _)| *n == name).map(|(_, b)| *b)
}

/// Names of the built-in guest programs.
pub fn names() -> impl Iterator<Item = &'static str> {
    IMAGES.iter().map(|(n, _)| *n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_program_is_a_static_elf_with_both_entry_notes() {
        assert!(names().count() >= 5);
        for (name, elf) in IMAGES {
            assert_eq!(&elf[..4], b"\x7fELF", "{name}");
            assert_eq!(u16::from_le_bytes([elf[16], elf[17]]), 2, "{name}: ET_EXEC");
            let has = |needle: &[u8]| elf.windows(needle.len()).any(|w| w == needle);
            assert!(has(b"Xen\0"), "{name}: PVH note");
            assert!(has(abi::NOTE_NAME), "{name}: godwit note");
        }
    }

    #[test]
    fn boot_info_round_trips() {
        let mut info = abi::BootInfo {
            vcpus: 2,
            tsc_khz: 2_000_000,
            nr_ram: 2,
            ecam_base: 0xe000_0000,
            cmdline_len: 7,
            pci_mmio_base: 0xc000_0000,
            ..Default::default()
        };
        info.ram[1] = abi::RamRegion {
            start: 1 << 32,
            size: 1 << 30,
        };
        let enc = info.encode();
        assert_eq!(abi::BootInfo::decode(&enc), Some(info));
        let mut bad = enc;
        bad[0] ^= 1;
        assert_eq!(abi::BootInfo::decode(&bad), None);
    }
}
