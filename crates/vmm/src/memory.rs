//! Guest physical memory: the layout (RAM below a 1 GiB MMIO hole at 3 GiB, the rest above
//! 4 GiB) and the anonymous mappings that back it.

use crate::error::{Error, Result};
use godwit_gpu::backend::Backend;
use godwit_gpu::cpu::CpuBackend;
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
    meminfo_mib("MemTotal:")
}

/// What the host can still give without swapping (MemAvailable), in MiB.
fn available_mib() -> Option<u64> {
    meminfo_mib("MemAvailable:")
}

fn meminfo_mib(field: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with(field))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// Whether `bytes` of `what` can be touched now, with `available` MiB free for it.
/// Touching more than the host can give does not fail: the kernel's OOM killer ends
/// this process (or another) part way.
fn fits(what: &str, bytes: u64, available: Option<u64>) -> Result<()> {
    match available {
        Some(a) if bytes.div_ceil(MIB) > a => Err(Error::Memory(format!(
            "cannot prefault {} MiB of {what}: this host has {a} MiB available now",
            bytes.div_ceil(MIB)
        ))),
        _ => Ok(()),
    }
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

/// Guest memory made before its VM, every page touched once (Cloud Hypervisor's
/// `prefault=on`, QEMU's `prealloc=on`), and the VRAM of its GPU function when one is
/// named. The first touch of a page costs the kernel's allocation and clearing, and on
/// a host that hands free memory back to its own hypervisor (free page reporting, a
/// balloon) a fault there as well: 5 to 15 times what reused memory costs (README,
/// "Why the total time is bimodal"). A destination that knows the sizes pays it before
/// the source connects, so the migration does not.
///
/// Clones share one memory, which the first VM built on it takes: a second VM never
/// sees what the first wrote (a destination takes the source's first pass to be laid
/// on zeros).
#[derive(Clone, Default)]
pub struct Prefaulted(std::sync::Arc<std::sync::Mutex<Readied>>);

#[derive(Default)]
struct Readied {
    ram: Option<(u64, GuestMemory)>,
    vram: Option<CpuBackend>,
}

impl std::fmt::Debug for Prefaulted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (ram, vram) = self
            .0
            .lock()
            .map(|g| {
                (
                    g.ram.as_ref().map(|(b, _)| *b),
                    g.vram.as_ref().map(|v| v.vram_size()),
                )
            })
            .unwrap_or_default();
        f.debug_struct("Prefaulted")
            .field("ram", &ram)
            .field("vram", &vram)
            .finish()
    }
}

/// Why touching `bytes` of `what` failed.
fn populate_error(e: std::io::Error, what: &str, bytes: u64) -> Error {
    Error::Memory(match e.raw_os_error() {
        Some(libc::EINVAL) => format!(
            "cannot prefault {what}: this kernel has no MADV_POPULATE_WRITE (Linux 5.14 or \
             later)"
        ),
        Some(libc::ENOMEM) | Some(libc::EFAULT) => format!(
            "cannot prefault {} MiB of {what}: the host is out of memory",
            bytes / MIB
        ),
        _ => format!("cannot prefault {what}: {e}"),
    })
}

impl Prefaulted {
    /// Maps `bytes` of guest memory (checked as `create` does) and touches every page.
    pub fn new(bytes: u64) -> Result<Prefaulted> {
        let mem = create(bytes)?;
        fits("guest memory", bytes, available_mib())?;
        for region in mem.iter() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|e| Error::Memory(e.to_string()))?;
            // SAFETY: the range is exactly one private anonymous mapping that `mem`
            // owns and nothing else uses yet; populating only allocates its pages
            // (zeros), as the first write to each would.
            let rc = unsafe {
                libc::madvise(
                    host as *mut libc::c_void,
                    region.len() as usize,
                    libc::MADV_POPULATE_WRITE,
                )
            };
            if rc != 0 {
                let e = std::io::Error::last_os_error();
                return Err(populate_error(e, "guest memory", bytes));
            }
        }
        let ready = Readied {
            ram: Some((bytes, mem)),
            vram: None,
        };
        Ok(Prefaulted(std::sync::Arc::new(std::sync::Mutex::new(
            ready,
        ))))
    }

    /// Also maps `bytes` of VRAM for the VM's GPU function and touches every page.
    pub fn with_vram(self, bytes: u64) -> Result<Prefaulted> {
        fits("VRAM", bytes, available_mib())?;
        let vram = CpuBackend::new(bytes).map_err(|e| Error::Gpu(format!("VRAM: {e}")))?;
        vram.prefault()
            .map_err(|e| populate_error(e, "VRAM", bytes))?;
        self.0.lock().unwrap_or_else(|e| e.into_inner()).vram = Some(vram);
        Ok(self)
    }

    /// Unmaps the memory and VRAM now (their pages go back to the host, recently
    /// used): whether there was any.
    pub fn release(&self) -> bool {
        let mut r = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let (ram, vram) = (r.ram.take(), r.vram.take());
        ram.is_some() || vram.is_some()
    }

    /// The memory, for a VM of `bytes`: None when there is none (or it was taken).
    pub fn take(&self, bytes: u64) -> Result<Option<GuestMemory>> {
        let mut r = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match r.ram.take() {
            None => Ok(None),
            Some((b, mem)) if b == bytes => Ok(Some(mem)),
            Some((b, _)) => Err(Error::Config(format!(
                "the memory was prefaulted for {} MiB, the VM has {} MiB",
                b / MIB,
                bytes / MIB
            ))),
        }
    }

    /// The VRAM, for a GPU function of `bytes`: None when there is none (or it was
    /// taken).
    pub fn take_vram(&self, bytes: u64) -> Result<Option<CpuBackend>> {
        let mut r = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match r.vram.take() {
            None => Ok(None),
            Some(v) if v.vram_size() == bytes => Ok(Some(v)),
            Some(v) => Err(Error::Config(format!(
                "the VRAM was prefaulted for {} MiB, the GPU function has {} MiB",
                v.vram_size() / MIB,
                bytes / MIB
            ))),
        }
    }
}

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
    fn prefaulted_memory_is_populated_and_taken_once() {
        let p = Prefaulted::new(16 * MIB).unwrap();
        let again = p.clone();
        let mem = p.take(16 * MIB).unwrap().expect("the memory");
        let r = mem.iter().next().unwrap();
        let host = r
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .unwrap();
        let pages = crate::pagemap::populated(host as u64, r.len()).expect("pagemap");
        let n: u32 = pages.iter().map(|w| w.count_ones()).sum();
        assert_eq!(u64::from(n), r.len() / PAGE_SIZE, "every page is in");
        assert!(again.take(16 * MIB).unwrap().is_none(), "taken once");
        assert!(!again.release(), "nothing left to give back");
        let other = Prefaulted::new(16 * MIB).unwrap();
        assert!(other.take(32 * MIB).is_err(), "another size is refused");
        let third = Prefaulted::new(16 * MIB).unwrap();
        assert!(third.release());
        assert!(third.take(16 * MIB).unwrap().is_none(), "given back");
    }

    #[test]
    fn prefaulted_vram_is_populated_taken_once_and_given_back_with_the_memory() {
        let p = Prefaulted::new(16 * MIB)
            .unwrap()
            .with_vram(8 * MIB)
            .unwrap();
        assert!(p.take_vram(4 * MIB).is_err(), "another size is refused");
        let p = Prefaulted::new(16 * MIB)
            .unwrap()
            .with_vram(8 * MIB)
            .unwrap();
        let vram = p.take_vram(8 * MIB).unwrap().expect("the VRAM");
        let ap = vram.aperture().expect("a CPU backend maps its VRAM");
        let pages = crate::pagemap::populated(ap.host, ap.len).expect("pagemap");
        let n: u32 = pages.iter().map(|w| w.count_ones()).sum();
        assert_eq!(u64::from(n), 8 * MIB / PAGE_SIZE, "every page is in");
        assert!(p.take_vram(8 * MIB).unwrap().is_none(), "taken once");
        assert!(p.take(16 * MIB).unwrap().is_some(), "the memory stays");
        let both = Prefaulted::new(16 * MIB)
            .unwrap()
            .with_vram(8 * MIB)
            .unwrap();
        assert!(both.release());
        assert!(both.take(16 * MIB).unwrap().is_none());
        assert!(both.take_vram(8 * MIB).unwrap().is_none(), "given back too");
    }

    #[test]
    fn what_the_host_cannot_give_is_refused_before_a_page_is_touched() {
        assert!(fits("VRAM", 8 * GIB, Some(8192)).is_ok());
        let e = fits("VRAM", 8 * GIB + 1, Some(8192))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("8193 MiB of VRAM") && e.contains("8192 MiB available"),
            "{e}"
        );
        assert!(
            fits("guest memory", GIB, None).is_ok(),
            "unknown: not refused"
        );
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
