//! Guest physical memory: the layout (RAM below a 1 GiB MMIO hole at 3 GiB, the rest above
//! 4 GiB) and the anonymous mappings that back it.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

pub type GuestMemory = vm_memory::GuestMemoryMmap<()>;

pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;
/// Start of the MMIO hole below 4 GiB.
pub const MMIO_HOLE_START: u64 = 3 * GIB;
pub const MMIO_HOLE_END: u64 = 4 * GIB;
/// 32-bit PCI BAR window.
pub const PCI_MMIO_BASE: u64 = 0xC000_0000;
pub const PCI_MMIO_SIZE: u64 = 0x1000_0000;
/// PCI ECAM window: one bus.
pub const ECAM_BASE: u64 = 0xE000_0000;
pub const ECAM_BUSES: u32 = 1;
pub const ECAM_SIZE: u64 = (ECAM_BUSES as u64) << 20;
/// godwit's system device (console, exit, sleep, fault reports).
pub const SYSDEV_BASE: u64 = 0xF000_0000;
/// The most guest RAM godwit maps (its guests' identity map covers 64 GiB).
pub const MAX_MEMORY: u64 = 60 * GIB;

/// One RAM region: guest-physical start and size in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RamRegion {
    pub start: u64,
    pub size: u64,
}

impl RamRegion {
    pub fn end(&self) -> u64 {
        self.start + self.size
    }
}

/// Where `bytes` of RAM go.
pub fn layout(bytes: u64) -> Vec<RamRegion> {
    let low = bytes.min(MMIO_HOLE_START);
    let mut v = vec![RamRegion {
        start: 0,
        size: low,
    }];
    if bytes > low {
        v.push(RamRegion {
            start: MMIO_HOLE_END,
            size: bytes - low,
        });
    }
    v
}

/// Host RAM, from /proc/meminfo, in MiB.
fn host_memory_mib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// Checks the size and maps the memory (lazily: pages are allocated when first touched).
pub fn create(bytes: u64) -> Result<GuestMemory> {
    if bytes < 16 * MIB || !bytes.is_multiple_of(MIB) {
        return Err(Error::Config(format!(
            "memory must be a whole number of MiB, at least 16 MiB (got {bytes} bytes)"
        )));
    }
    if bytes > MAX_MEMORY {
        return Err(Error::Config(format!(
            "memory {} MiB is more than godwit supports ({} MiB)",
            bytes / MIB,
            MAX_MEMORY / MIB
        )));
    }
    if let Some(host) = host_memory_mib() {
        if bytes / MIB > host {
            return Err(Error::TooMuchMemory {
                memory_mib: bytes / MIB,
                host_mib: host,
            });
        }
    }
    let ranges: Vec<(GuestAddress, usize)> = layout(bytes)
        .iter()
        .map(|r| (GuestAddress(r.start), r.size as usize))
        .collect();
    let mem = GuestMemory::from_ranges(&ranges).map_err(|e| Error::Memory(e.to_string()))?;
    for region in mem.iter() {
        if let Ok(host) = region.get_host_address(vm_memory::MemoryRegionAddress(0)) {
            // Transparent huge pages (as QEMU asks for guest RAM): one fault and one TLB
            // entry per 2 MiB. Filling a fresh destination with 4 KiB faults was the
            // largest cost of receiving a migration here. Advice only: failure is harmless.
            // SAFETY: the range is exactly one mapping that `mem` owns.
            unsafe {
                libc::madvise(
                    host as *mut libc::c_void,
                    region.len() as usize,
                    libc::MADV_HUGEPAGE,
                )
            };
        }
    }
    Ok(mem)
}

pub const PAGE_SIZE: u64 = 4096;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_splits_around_the_hole() {
        assert_eq!(
            layout(GIB),
            vec![RamRegion {
                start: 0,
                size: GIB
            }]
        );
        let l = layout(4 * GIB);
        assert_eq!(
            l[0],
            RamRegion {
                start: 0,
                size: 3 * GIB
            }
        );
        assert_eq!(
            l[1],
            RamRegion {
                start: 4 * GIB,
                size: GIB
            }
        );
        assert_eq!(l.iter().map(|r| r.size).sum::<u64>(), 4 * GIB);
    }

    #[test]
    fn bad_sizes_are_refused() {
        assert!(matches!(create(MIB), Err(Error::Config(_))));
        assert!(matches!(create(64 * MIB + 1), Err(Error::Config(_))));
        assert!(matches!(create(MAX_MEMORY + GIB), Err(Error::Config(_))));
        let m = create(64 * MIB).unwrap();
        assert_eq!(m.iter().count(), 1);
    }
}
