//! The shared page of one physical GPU: scheduler words and per-VF counters, in a file
//! every godwit process on the host maps (MAP_SHARED). Only atomics live there, so
//! processes need no lock to read or update it, and a process that dies leaves nothing
//! locked (its lease lock goes with it; see `manager`).

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicU64};

pub const MAX_VFS: usize = 16;
const MAGIC: u64 = 0x4d48_5355_5047_5747; // "GWGPUSHM"

#[repr(C)]
pub struct VfShm {
    /// Non-zero while a VM holds this VF (it may have died since: see heartbeat).
    pub attached: AtomicU32,
    pub pid: AtomicU32,
    pub heartbeat_ns: AtomicU64,
    pub engine_ns: AtomicU64,
    pub commands: AtomicU64,
    pub errors: AtomicU64,
    pub resident: AtomicU64,
    pub attached_at_ns: AtomicU64,
    /// A migration holds the VF's engine back this share of the time (`sched::Cap`).
    pub cap_pct: AtomicU32,
}

#[repr(C)]
pub struct GpuPage {
    pub magic: AtomicU64,
    pub policy: AtomicU32,
    /// Futex word: 0 = engine free, slot + 1 = held (or handed) to that VF.
    pub owner: AtomicU32,
    /// Bit i: VF i waits for the engine.
    pub waiting: AtomicU32,
    /// The profile's maximum instances (fixed-share's denominator).
    pub max_vfs: AtomicU32,
    pub owner_beat_ns: AtomicU64,
    pub vf: [VfShm; MAX_VFS],
}

const SIZE: usize = 4096;
const _: () = assert!(std::mem::size_of::<GpuPage>() <= SIZE);

/// A mapping of a GPU's shared page.
pub struct GpuShm {
    ptr: *mut GpuPage,
}

// SAFETY: the page holds only atomics, which are meant to be shared between threads (and
// here processes); the mapping lives as long as this struct.
unsafe impl Send for GpuShm {}
// SAFETY: as above.
unsafe impl Sync for GpuShm {}

impl GpuShm {
    /// Maps (creating if needed) the page at `path`.
    pub fn open(path: &Path) -> std::io::Result<GpuShm> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        if f.metadata()?.len() < SIZE as u64 {
            f.set_len(SIZE as u64)?;
        }
        // SAFETY: maps SIZE bytes of a file at least that long; the kernel zero-fills a
        // new file, which is a valid GpuPage (all atomics zero).
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let shm = GpuShm {
            ptr: p as *mut GpuPage,
        };
        let page = shm.page();
        let _ = page.magic.compare_exchange(
            0,
            MAGIC,
            std::sync::atomic::Ordering::SeqCst,
            std::sync::atomic::Ordering::SeqCst,
        );
        if page.magic.load(std::sync::atomic::Ordering::SeqCst) != MAGIC {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{} is not a godwit GPU page", path.display()),
            ));
        }
        Ok(shm)
    }

    pub fn page(&self) -> &GpuPage {
        // SAFETY: mapped in `open` for the life of self; only atomics inside.
        unsafe { &*self.ptr }
    }
}

impl Drop for GpuShm {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `open`.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, SIZE) };
    }
}
