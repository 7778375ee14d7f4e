//! The contract between godwit and its guests: the boot-info block the VMM writes and the
//! registers of the godwit system device. Shared verbatim by the guest runtime (no_std)
//! and the VMM, so the two can never disagree.

/// "GODWITBI", little endian.
pub const BOOT_INFO_MAGIC: u64 = 0x4942_5449_5744_4f47;
pub const ABI_VERSION: u32 = 1;
pub const MAX_RAM_REGIONS: usize = 4;
/// Size of [`BootInfo`] when encoded.
pub const BOOT_INFO_SIZE: usize = 8 + 4 + 4 + 8 + MAX_RAM_REGIONS * 16 + 4 + 4 + 8 * 7;

/// ELF note that marks an image as a godwit guest (name "godwit", this type, desc = ABI).
pub const NOTE_NAME: &[u8] = b"godwit\0";
pub const NOTE_TYPE_ABI: u32 = 0x6764_0001;

#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct RamRegion {
    pub start: u64,
    pub size: u64,
}

#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct BootInfo {
    pub vcpus: u32,
    pub tsc_khz: u64,
    pub ram: [RamRegion; MAX_RAM_REGIONS],
    pub nr_ram: u32,
    pub ecam_buses: u32,
    pub image_end: u64,
    pub ecam_base: u64,
    pub sysdev_base: u64,
    pub cmdline_addr: u64,
    pub cmdline_len: u64,
    pub idt_base: u64,
    pub pci_mmio_base: u64,
}

impl BootInfo {
    pub fn encode(&self) -> [u8; BOOT_INFO_SIZE] {
        let mut out = [0u8; BOOT_INFO_SIZE];
        let mut at = 0;
        let mut put = |bytes: &[u8]| {
            out[at..at + bytes.len()].copy_from_slice(bytes);
            at += bytes.len();
        };
        put(&BOOT_INFO_MAGIC.to_le_bytes());
        put(&ABI_VERSION.to_le_bytes());
        put(&self.vcpus.to_le_bytes());
        put(&self.tsc_khz.to_le_bytes());
        for r in &self.ram {
            put(&r.start.to_le_bytes());
            put(&r.size.to_le_bytes());
        }
        put(&self.nr_ram.to_le_bytes());
        put(&self.ecam_buses.to_le_bytes());
        for v in [
            self.image_end,
            self.ecam_base,
            self.sysdev_base,
            self.cmdline_addr,
            self.cmdline_len,
            self.idt_base,
            self.pci_mmio_base,
        ] {
            put(&v.to_le_bytes());
        }
        out
    }

    /// Decodes a block; `None` if the magic or the version is not ours.
    pub fn decode(b: &[u8; BOOT_INFO_SIZE]) -> Option<BootInfo> {
        let u64_at = |o: usize| {
            let mut v = [0u8; 8];
            v.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(v)
        };
        let u32_at = |o: usize| {
            let mut v = [0u8; 4];
            v.copy_from_slice(&b[o..o + 4]);
            u32::from_le_bytes(v)
        };
        if u64_at(0) != BOOT_INFO_MAGIC || u32_at(8) != ABI_VERSION {
            return None;
        }
        let mut info = BootInfo {
            vcpus: u32_at(12),
            tsc_khz: u64_at(16),
            ..Default::default()
        };
        let mut o = 24;
        for r in info.ram.iter_mut() {
            r.start = u64_at(o);
            r.size = u64_at(o + 8);
            o += 16;
        }
        info.nr_ram = u32_at(o);
        info.ecam_buses = u32_at(o + 4);
        o += 8;
        let mut next = || {
            let v = u64_at(o);
            o += 8;
            v
        };
        info.image_end = next();
        info.ecam_base = next();
        info.sysdev_base = next();
        info.cmdline_addr = next();
        info.cmdline_len = next();
        info.idt_base = next();
        info.pci_mmio_base = next();
        Some(info)
    }
}

/// Device interrupts in godwit guests. The VMM software-enables each vCPU's LAPIC (LINT0
/// masked, so no legacy PIC interrupts) and points vectors FIRST_VECTOR..=255 at a ring-0
/// stub that adds one to the vector's 64-bit counter at `COUNTS + 8 * (vector -
/// FIRST_VECTOR)`, writes the LAPIC's EOI and returns with interrupts disabled. Ring 3
/// reads the counters and waits with `sysdev::WAIT_IRQ`. MSIs address the LAPIC of the
/// vCPU with APIC id = vCPU index (`0xfee0_0000 | index << 12`).
pub mod irq {
    pub const FIRST_VECTOR: u32 = 32;
    pub const COUNTS: u64 = 0x4800;
    pub const LAPIC_BASE: u64 = 0xfee0_0000;
}

/// Registers of the godwit system device (MMIO, 8-byte writes).
pub mod sysdev {
    /// Write: the guest exits with this code.
    pub const EXIT: u64 = 0x00;
    /// Write `addr | len << CONSOLE_LEN_SHIFT`: print `len` bytes at guest-physical `addr`.
    pub const CONSOLE: u64 = 0x08;
    /// Write: block this vCPU for this many nanoseconds (or until the VMM needs it).
    pub const SLEEP_NS: u64 = 0x10;
    /// Written by the ring-0 exception stubs: the vector of an exception the guest took.
    pub const FAULT: u64 = 0x18;
    /// Write (any value): halt this vCPU with interrupts enabled until an interrupt is
    /// delivered, as `sti; hlt` would (ring 3 cannot do either). The interrupt's stub
    /// returns after this write with interrupts disabled again. One already pending ends
    /// the wait at once, so check, then wait, never loses a wake-up.
    pub const WAIT_IRQ: u64 = 0x20;
    pub const SIZE: u64 = 0x1000;
    pub const CONSOLE_LEN_SHIFT: u32 = 48;
    pub const CONSOLE_MAX: u64 = 0xffff;
}
