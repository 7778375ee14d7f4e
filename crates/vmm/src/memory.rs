//! Guest physical memory: the layout (RAM below a 1 GiB MMIO hole at 3 GiB, the rest above
//! 4 GiB) and the mappings that back it (anonymous, or a memfd when prefaulted).

use crate::error::{Error, Result};
use godwit_gpu::backend::Backend;
use serde::{Deserialize, Serialize};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

mod shared_vram;
pub use shared_vram::{retire as retire_vram, Vram};

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
    check_size(bytes)?;
    let ranges: Vec<(GuestAddress, usize)> = layout(bytes)
        .iter()
        .map(|r| (GuestAddress(r.start), r.size as usize))
        .collect();
    let mem = GuestMemory::from_ranges(&ranges).map_err(|e| Error::Memory(e.to_string()))?;
    // Transparent huge pages (as QEMU asks for guest RAM): one fault and one TLB entry
    // per 2 MiB. Filling a fresh destination with 4 KiB faults was the largest cost of
    // receiving a migration here. Advice only: failure is harmless.
    advise_harmlessly(&mem, libc::MADV_HUGEPAGE);
    Ok(mem)
}

/// Gives `advice` on every region of `mem`, ignoring failure: only advice that changes
/// nothing anyone reads (`MADV_HUGEPAGE`; `MADV_DONTNEED` on a shared mapping nobody
/// uses, whose pages stay in their file).
fn advise_harmlessly(mem: &GuestMemory, advice: libc::c_int) {
    for region in mem.iter() {
        if let Ok(host) = region.get_host_address(vm_memory::MemoryRegionAddress(0)) {
            // SAFETY: the range is exactly one mapping that `mem` owns; the advice the
            // callers give changes no content anyone reads (see above).
            unsafe { libc::madvise(host as *mut libc::c_void, region.len() as usize, advice) };
        }
    }
}

/// Whether godwit can give a VM `bytes` of RAM on this host.
fn check_size(bytes: u64) -> Result<()> {
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
    Ok(())
}

/// Guest RAM (or a GPU function's VRAM: `Vram`) made of shared memory (a memfd) that a
/// second mapping, the alias, also reaches. Post-copy writes a page through the alias,
/// where nothing faults, and then maps it for the guest with UFFDIO_CONTINUE: the page
/// exists already, so placing it costs a copy and a page-table entry. UFFDIO_COPY into
/// private memory allocates, charges and clears a page each time, half of a
/// destination's time in post-copy here. Only prefaulted memory is made this way: its
/// pages exist before the source connects.
pub struct SharedRam {
    /// The memfd, to map the guest's side anew (`unmap_for_postcopy`).
    file: std::fs::File,
    /// Host address of the alias: the whole file, regions one after another.
    alias: u64,
    len: usize,
    /// Each RAM region's offset in the file, in layout order.
    offsets: Vec<u64>,
}

impl std::fmt::Debug for SharedRam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedRam").field("len", &self.len).finish()
    }
}

impl SharedRam {
    /// Host address, in the alias, of region `region`'s first byte.
    pub fn alias(&self, region: usize) -> Option<u64> {
        self.offsets.get(region).map(|o| self.alias + o)
    }
}

impl Drop for SharedRam {
    fn drop(&mut self) {
        // SAFETY: the alias is this object's own mapping; whoever writes through it
        // (post-copy's placement) holds this object.
        unsafe { libc::munmap(self.alias as *mut libc::c_void, self.len) };
    }
}

/// `bytes` of guest RAM (checked by the caller) on a memfd, mapped for the guest
/// (shared) and once more as the alias.
fn create_shared(bytes: u64) -> Result<(GuestMemory, SharedRam)> {
    let io = |what: &str, e: std::io::Error| Error::Memory(format!("guest memory: {what}: {e}"));
    let file = memfd(c"godwit-ram", bytes).map_err(|e| io("memfd", e))?;
    let (mem, offsets) = map_guest_side(&file, bytes)?;
    // Owned by the SharedRam below.
    let alias = map_shared_aligned(&file, bytes as usize, 0).map_err(|e| io("mmap", e))?;
    let shared = SharedRam {
        file,
        alias: alias as u64,
        len: bytes as usize,
        offsets,
    };
    Ok((mem, shared))
}

/// A new memfd of `bytes`, named `name`.
pub(crate) fn memfd(name: &std::ffi::CStr, bytes: u64) -> std::io::Result<std::fs::File> {
    // SAFETY: a NUL-terminated name and valid flags; the fd returned is new and owned
    // by the File below.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor nothing else owns.
    let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    file.set_len(bytes)?;
    Ok(file)
}

/// The guest's mapping of `bytes` of RAM in `file`, regions one after another in it,
/// and each region's offset there.
///
/// Each region is mapped where its address and its offset in the file agree modulo
/// 2 MiB, which vm-memory's own mappings (placed by the kernel) do not: only so can the
/// file's huge pages (`Prefaulted::new`) be mapped whole, and KVM map the guest 2 MiB
/// at a time. vm-memory does not own these mappings, and nothing unmaps them: godwit
/// runs one VM per process, and a mapping any clone of the memory may still reach
/// cannot be unmapped safely before the process ends. The one replaced during a
/// post-copy (`retire`) gives up its page-table entries and keeps only its addresses.
/// Nor does a failure part way give back the regions mapped so far: it ends the
/// process (a `--prefault` that cannot be had, a destination that refuses).
fn map_guest_side(file: &std::fs::File, bytes: u64) -> Result<(GuestMemory, Vec<u64>)> {
    let mut offsets = Vec::new();
    let mut regions = Vec::new();
    let mut off = 0u64;
    for r in layout(bytes) {
        offsets.push(off);
        let host = map_shared_aligned(file, r.size as usize, off)
            .map_err(|e| Error::Memory(format!("guest memory: mmap: {e}")))?;
        // SAFETY: `host` is a new shared mapping of exactly `r.size` bytes, readable and
        // writable, that nothing else uses and that stays mapped for the life of the
        // process (above), so every clone of the memory outlives nothing it points at.
        let mapping = unsafe {
            vm_memory::MmapRegion::build_raw(
                host,
                r.size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
            )
        }
        .map_err(|e| Error::Memory(format!("guest memory: {e}")))?;
        let region = vm_memory::GuestRegionMmap::new(mapping, GuestAddress(r.start))
            .ok_or_else(|| Error::Memory("guest memory: a region past the end".into()))?;
        regions.push(region);
        off += r.size;
    }
    let mem = GuestMemory::from_regions(regions).map_err(|e| Error::Memory(e.to_string()))?;
    Ok((mem, offsets))
}

/// Huge pages, as the host's MMU and KVM map them.
const HUGE_PAGE: usize = 2 << 20;

/// A shared mapping of `len` bytes of `file` from `off`, readable and writable, at an
/// address that agrees with `off` modulo 2 MiB (the kernel does not place one so for a
/// memfd while `shmem_enabled` is `never`, as here): a space twice a huge page larger
/// is reserved, the mapping put in it, and the rest given back.
fn map_shared_aligned(file: &std::fs::File, len: usize, off: u64) -> std::io::Result<*mut u8> {
    let span = len + 2 * HUGE_PAGE;
    // SAFETY: a new reservation that nothing can touch (PROT_NONE), owned here until
    // the mapping replaces part of it and the rest is unmapped below.
    let space = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            span,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if space == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let start = space as usize;
    let at = start.next_multiple_of(HUGE_PAGE) + (off as usize % HUGE_PAGE);
    // SAFETY: [at, at + len) lies inside the reservation above, which this function
    // owns, so MAP_FIXED replaces nothing anyone else holds.
    let host = unsafe {
        libc::mmap(
            at as *mut libc::c_void,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_FIXED | libc::MAP_NORESERVE,
            std::os::fd::AsRawFd::as_raw_fd(file),
            off as libc::off_t,
        )
    };
    let failed = host == libc::MAP_FAILED;
    let e = std::io::Error::last_os_error();
    // SAFETY: the parts of the reservation the mapping does not use (all of it when
    // mapping failed), which this function owns.
    unsafe {
        if failed {
            libc::munmap(space, span);
        } else {
            libc::munmap(space, at - start);
            libc::munmap((at + len) as *mut libc::c_void, start + span - at - len);
        }
    }
    if failed {
        return Err(e);
    }
    Ok(host as *mut u8)
}

/// Retires `mem`, a mapping of shared memory whose pages stay in their file, without
/// holding up page faults elsewhere in this process: its page-table entries go by
/// madvise, which shares the mmap lock with faults. Unmapped at once, 4 GiB of 4 KiB
/// entries held the lock for tens of milliseconds, and a vCPU faulting meanwhile (KVM
/// takes the lock to look a page up) stopped for as long: 66-85 ms guest gaps in idle
/// post-copy runs. The addresses stay reserved (`map_guest_side`).
pub fn retire(mem: GuestMemory) {
    // Nothing uses `mem` any more: the guest has another mapping of the same pages.
    advise_harmlessly(&mem, libc::MADV_DONTNEED);
    drop(mem);
}

pub const PAGE_SIZE: u64 = 4096;

/// Guest memory made before its VM, every page touched once (Cloud Hypervisor's
/// `prefault=on`, QEMU's `prealloc=on`), and the VRAM of its GPU function when one is
/// named. The first touch of a page costs the kernel's allocation and clearing, and on
/// a host that hands free memory back to its own hypervisor (free page reporting, a
/// balloon) a fault there as well: 5 to 15 times what reused memory costs
/// (docs/benchmarks.md, "Why the total time is bimodal"). A destination that knows the
/// sizes pays it before the source connects, so the migration does not.
///
/// Clones share one memory, which the first VM built on it takes: a second VM never
/// sees what the first wrote (a destination takes the source's first pass to be laid
/// on zeros).
#[derive(Clone, Default)]
pub struct Prefaulted(std::sync::Arc<std::sync::Mutex<Readied>>);

#[derive(Default)]
struct Readied {
    ram: Option<Ram>,
    vram: Option<Vram>,
}

/// Prefaulted RAM, as a VM takes it.
pub struct Ram {
    pub bytes: u64,
    pub mem: GuestMemory,
    pub shared: std::sync::Arc<SharedRam>,
    /// No page is mapped for the guest (`unmap_for_postcopy`): every first touch
    /// faults, and every page holds zeros.
    pub bare: bool,
    /// The guest's old mapping, which maps every page, once `unmap_for_postcopy`
    /// replaced it: to be dropped once post-copy is over (see there).
    pub retired: Option<GuestMemory>,
}

impl std::fmt::Debug for Prefaulted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (ram, vram) = self
            .0
            .lock()
            .map(|g| {
                (
                    g.ram.as_ref().map(|r| r.bytes),
                    g.vram.as_ref().map(|v| v.backend.vram_size()),
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

/// Makes the file behind `alias` (a mapping of `len` bytes from offset 0, aligned to
/// 2 MiB) out of huge pages, where the kernel can: shared memory gets them here only
/// this way (`shmem_enabled` is `never`; MADV_COLLAPSE, Linux 6.1, is not bound by it).
/// Without them the guest is mapped 4 KiB at a time: after a pre-copy into this memory
/// the dirtier ran at a fifth of its speed for 0.6 s while KVM mapped its 512 MiB page
/// by page (131 thousand mappings against 377). One byte per huge page is touched
/// first, so that there is something to collapse and nothing to copy. Best effort: a
/// host without huge pages to give keeps the small ones.
fn make_huge(alias: u64, len: usize) {
    for at in (0..len).step_by(HUGE_PAGE) {
        // SAFETY: inside the alias, a mapping of the file nothing else uses yet; a
        // fresh page holds zeros, and a zero is written.
        unsafe { std::ptr::write_volatile((alias as usize + at) as *mut u8, 0) };
    }
    let whole = len - len % HUGE_PAGE;
    // One part per CPU: most of a collapse is the kernel getting and clearing memory.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per = (whole / HUGE_PAGE).div_ceil(cpus.max(1)).max(1) * HUGE_PAGE;
    std::thread::scope(|s| {
        for from in (0..whole).step_by(per) {
            let n = per.min(whole - from);
            s.spawn(move || {
                // SAFETY: whole huge pages of the alias; collapsing keeps every byte as
                // it was.
                let p = (alias as usize + from) as *mut libc::c_void;
                if unsafe { libc::madvise(p, n, libc::MADV_COLLAPSE) } != 0 {
                    tracing::info!(
                        "guest memory stays (partly) in 4 KiB pages: {}",
                        std::io::Error::last_os_error()
                    );
                }
            });
        }
    });
}

impl Prefaulted {
    /// Maps `bytes` of guest memory (checked as `create` does, shared: see
    /// `SharedRam`) and touches every page, through both mappings.
    pub fn new(bytes: u64) -> Result<Prefaulted> {
        check_size(bytes)?;
        fits("guest memory", bytes, available_mib())?;
        let (mem, shared) = create_shared(bytes)?;
        let mut ranges = vec![(shared.alias, shared.len)];
        for region in mem.iter() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|e| Error::Memory(e.to_string()))?;
            ranges.push((host as u64, region.len() as usize));
        }
        make_huge(shared.alias, shared.len);
        // The alias first: it allocates the pages; the guest's mapping then only maps
        // them, so that a pre-copy writing there does not fault a page at a time.
        for (host, len) in ranges {
            // SAFETY: the range is exactly one shared mapping that `mem` or `shared`
            // owns and nothing else uses yet; populating only allocates its pages
            // (zeros) and maps them, as the first write to each would.
            let rc =
                unsafe { libc::madvise(host as *mut libc::c_void, len, libc::MADV_POPULATE_WRITE) };
            if rc != 0 {
                let e = std::io::Error::last_os_error();
                return Err(populate_error(e, "guest memory", bytes));
            }
        }
        let ready = Readied {
            ram: Some(Ram {
                bytes,
                mem,
                shared: std::sync::Arc::new(shared),
                bare: false,
                retired: None,
            }),
            vram: None,
        };
        Ok(Prefaulted(std::sync::Arc::new(std::sync::Mutex::new(
            ready,
        ))))
    }

    /// Also maps `bytes` of VRAM for the VM's GPU function (shared, as the RAM is:
    /// see `Vram`) and touches every page.
    pub fn with_vram(self, bytes: u64) -> Result<Prefaulted> {
        fits("VRAM", bytes, available_mib())?;
        let vram = Vram::new(bytes)?;
        self.0.lock().unwrap_or_else(|e| e.into_inner()).vram = Some(vram);
        Ok(self)
    }

    /// Before a VM is built whose every page comes through userfaultfd: the pages of
    /// the RAM and the VRAM stay (placed through their aliases), and the guest and the
    /// GPU's engine get new mappings of them that map none yet, so that every first
    /// touch faults. Whether there was any.
    pub fn unmap_for_postcopy(&self) -> Result<bool> {
        let mut r = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let had_vram = match r.vram.as_mut() {
            Some(v) => v.remap_bare().map(|()| true)?,
            None => false,
        };
        // A new mapping of the RAM's pages maps none of them yet. The old one maps them
        // all, and tearing its page-table entries down takes about 25 ms of CPU per GiB
        // here: done now (or on another thread of this two-core host, or at the
        // switch), the migration waits for it. It goes once post-copy is over.
        let had_ram = match r.ram.as_mut() {
            Some(ram) => {
                let (fresh, _) = map_guest_side(&ram.shared.file, ram.bytes)?;
                ram.bare = true;
                ram.retired = Some(std::mem::replace(&mut ram.mem, fresh));
                true
            }
            None => false,
        };
        Ok(had_ram || had_vram)
    }

    /// Whether any memory or VRAM is readied here (post-copy then places pages in
    /// shared memory).
    pub fn holds_any(&self) -> bool {
        let r = self.0.lock().unwrap_or_else(|e| e.into_inner());
        r.ram.is_some() || r.vram.is_some()
    }

    /// The memory, for a VM of `bytes`: None when there is none (or it was taken).
    pub fn take(&self, bytes: u64) -> Result<Option<Ram>> {
        let mut r = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match r.ram.take() {
            None => Ok(None),
            Some(ram) if ram.bytes == bytes => Ok(Some(ram)),
            Some(ram) => Err(Error::Config(format!(
                "the memory was prefaulted for {} MiB, the VM has {} MiB",
                ram.bytes / MIB,
                bytes / MIB
            ))),
        }
    }

    /// The VRAM, for a GPU function of `bytes`: None when there is none (or it was
    /// taken).
    pub fn take_vram(&self, bytes: u64) -> Result<Option<Vram>> {
        let mut r = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match r.vram.take() {
            None => Ok(None),
            Some(v) if v.backend.vram_size() == bytes => Ok(Some(v)),
            Some(v) => Err(Error::Config(format!(
                "the VRAM was prefaulted for {} MiB, the GPU function has {} MiB",
                v.backend.vram_size() / MIB,
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
    fn prefaulted_memory_is_mapped_for_the_guest_in_huge_pages() {
        let p = Prefaulted::new(16 * MIB).unwrap();
        let ram = p.take(16 * MIB).unwrap().expect("the memory");
        let r = ram.mem.iter().next().unwrap();
        let host = r
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .unwrap() as usize;
        assert_eq!(host % HUGE_PAGE, 0, "placed for huge pages");
        // The guest's mapping, as the kernel reports it: huge pages mapped whole.
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let vma: Vec<&str> = smaps
            .lines()
            .skip_while(|l| !l.starts_with(&format!("{host:x}-")))
            .take_while(|l| !l.starts_with("VmFlags"))
            .collect();
        assert!(!vma.is_empty(), "the guest's mapping is not in smaps");
        let pmd_kib: u64 = vma
            .iter()
            .find_map(|l| l.strip_prefix("ShmemPmdMapped:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("ShmemPmdMapped");
        assert_eq!(pmd_kib * 1024, r.len(), "{vma:?}");
    }

    /// A mapping lands where the kernel can map the file's huge pages whole: its
    /// address agrees with its offset in the file modulo 2 MiB.
    #[test]
    fn shared_mappings_agree_with_their_offset_modulo_a_huge_page() {
        let f = tempfile_in_memory(8 * MIB);
        for off in [0u64, 4096, 3 * 4096, 2 * MIB - 4096, 2 * MIB, 5 * MIB] {
            let p = map_shared_aligned(&f, 2 * MIB as usize, off).unwrap() as usize;
            assert_eq!(p % HUGE_PAGE, off as usize % HUGE_PAGE, "offset {off}");
            // SAFETY: the mapping just made, used by nothing else.
            unsafe { libc::munmap(p as *mut libc::c_void, 2 * MIB as usize) };
        }
    }

    fn tempfile_in_memory(len: u64) -> std::fs::File {
        // SAFETY: a NUL-terminated name; the new fd is owned by the File.
        let fd = unsafe { libc::memfd_create(c"test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: `fd` is new and owned by nothing else.
        let f = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        f.set_len(len).unwrap();
        f
    }

    #[test]
    fn prefaulted_memory_is_populated_and_taken_once() {
        let p = Prefaulted::new(16 * MIB).unwrap();
        let again = p.clone();
        let ram = p.take(16 * MIB).unwrap().expect("the memory");
        let r = ram.mem.iter().next().unwrap();
        let host = r
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .unwrap();
        let pages = crate::pagemap::populated(host as u64, r.len()).expect("pagemap");
        let n: u32 = pages.iter().map(|w| w.count_ones()).sum();
        assert_eq!(u64::from(n), r.len() / PAGE_SIZE, "every page is in");
        assert!(again.take(16 * MIB).unwrap().is_none(), "taken once");
        let other = Prefaulted::new(16 * MIB).unwrap();
        assert!(other.take(32 * MIB).is_err(), "another size is refused");
    }

    /// Readied for post-copy: the guest's mapping and the VRAM's map nothing (every
    /// touch faults), and the pages stay in their files behind the aliases.
    #[test]
    fn prefaulted_memory_unmapped_for_postcopy_keeps_its_pages_behind_the_alias() {
        let p = Prefaulted::new(16 * MIB)
            .unwrap()
            .with_vram(8 * MIB)
            .unwrap();
        assert!(p.unmap_for_postcopy().unwrap());
        let vram = p.take_vram(8 * MIB).unwrap().expect("the VRAM stays");
        assert!(vram.bare && vram.retired.is_some());
        let ap = vram.backend.aperture().unwrap();
        let mapped = crate::pagemap::populated(ap.host, ap.len).expect("pagemap");
        assert!(mapped.iter().all(|&w| w == 0), "a VRAM page still mapped");
        let behind = crate::pagemap::populated(vram.shared.alias(0).unwrap(), ap.len).unwrap();
        let n: u32 = behind.iter().map(|w| w.count_ones()).sum();
        assert_eq!(
            u64::from(n),
            ap.len / PAGE_SIZE,
            "every VRAM page is behind the alias"
        );
        let ram = p.take(16 * MIB).unwrap().expect("the memory stays");
        assert!(ram.bare);
        let r = ram.mem.iter().next().unwrap();
        let host = r
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .unwrap();
        let mapped = crate::pagemap::populated(host as u64, r.len()).expect("pagemap");
        assert!(mapped.iter().all(|&w| w == 0), "a page still mapped");
        let alias = ram.shared.alias(0).unwrap();
        let behind = crate::pagemap::populated(alias, r.len()).expect("pagemap");
        let n: u32 = behind.iter().map(|w| w.count_ones()).sum();
        assert_eq!(
            u64::from(n),
            r.len() / PAGE_SIZE,
            "every page is behind the alias"
        );
        assert!(
            !Prefaulted::default().unmap_for_postcopy().unwrap(),
            "nothing there"
        );
    }

    #[test]
    fn prefaulted_vram_is_populated_and_taken_once() {
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
        assert!(!vram.bare && vram.retired.is_none());
        let ap = vram
            .backend
            .aperture()
            .expect("a CPU backend maps its VRAM");
        let pages = crate::pagemap::populated(ap.host, ap.len).expect("pagemap");
        let n: u32 = pages.iter().map(|w| w.count_ones()).sum();
        assert_eq!(u64::from(n), 8 * MIB / PAGE_SIZE, "every page is in");
        assert!(p.take_vram(8 * MIB).unwrap().is_none(), "taken once");
        assert!(p.take(16 * MIB).unwrap().is_some(), "the memory stays");
    }

    /// Shared VRAM counts as resident what its file holds (a post-copy's new mapping
    /// maps nothing at first; mincore says the same, but looks every unmapped page up
    /// in the file), and a scrub frees the file's pages too, so that the next VM reads
    /// zeros there, through either mapping.
    #[test]
    fn prefaulted_vram_is_counted_by_its_file_and_scrubbed_to_zero() {
        let p = Prefaulted::new(16 * MIB)
            .unwrap()
            .with_vram(8 * MIB)
            .unwrap();
        assert!(p.unmap_for_postcopy().unwrap());
        let v = p.take_vram(8 * MIB).unwrap().expect("the VRAM");
        assert_eq!(
            v.backend.resident_bytes(),
            8 * MIB,
            "every page is in the file"
        );
        v.backend
            .write(PAGE_SIZE, &[7; PAGE_SIZE as usize])
            .unwrap();
        v.backend.scrub();
        assert_eq!(v.backend.resident_bytes(), 0, "the file's pages are freed");
        let mut b = [1u8; PAGE_SIZE as usize];
        v.backend.read(PAGE_SIZE, &mut b).unwrap();
        assert!(
            b.iter().all(|&x| x == 0),
            "the last VM's data through the mapping"
        );
        let alias = v.shared.alias(0).unwrap() + PAGE_SIZE;
        // SAFETY: a page of the alias, which `v.shared` keeps mapped; only read.
        let through = unsafe { std::slice::from_raw_parts(alias as *const u8, 4096) };
        assert!(
            through.iter().all(|&x| x == 0),
            "the last VM's data through the alias"
        );
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
