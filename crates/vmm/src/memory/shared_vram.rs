//! A prefaulted destination's VRAM, made as its guest RAM is (`SharedRam`): shared
//! memory that a second mapping, the alias, also reaches. Post-copy writes a VRAM page
//! through the alias and maps it for the guest and the engine with UFFDIO_CONTINUE;
//! private VRAM took UFFDIO_COPY, which allocates, charges and clears a page each time,
//! and had to be given back and allocated again for it.

use super::{make_huge, map_shared_aligned, memfd, populate_error, SharedRam};
use crate::error::{Error, Result};
use godwit_gpu::backend::Backend;
use godwit_gpu::cpu::CpuBackend;
use std::sync::Arc;

/// Prefaulted VRAM, as a GPU function takes it.
pub struct Vram {
    /// The VRAM as the engine and the guest's aperture map it.
    pub backend: CpuBackend,
    pub shared: Arc<SharedRam>,
    /// `backend` maps no page yet (`remap_bare`): every first touch faults, and every
    /// page holds zeros.
    pub bare: bool,
    /// The old mapping, which maps every page, once `remap_bare` replaced it: to be
    /// dropped once post-copy is over (`retire`).
    pub retired: Option<CpuBackend>,
}

impl Vram {
    /// `bytes` of VRAM (checked by the caller) on a memfd, every page touched through
    /// both mappings, in huge pages where the host has them.
    pub(super) fn new(bytes: u64) -> Result<Vram> {
        let io = |what: &str, e: std::io::Error| Error::Gpu(format!("VRAM: {what}: {e}"));
        let len = usize::try_from(bytes).map_err(|_| Error::Gpu("VRAM: too large".into()))?;
        let file = memfd(c"godwit-vram", bytes).map_err(|e| io("memfd", e))?;
        let backend = map_backend(&file, len)?;
        let alias = map_shared_aligned(&file, len, 0).map_err(|e| io("mmap", e))?;
        let shared = SharedRam {
            file,
            alias: alias as u64,
            len,
            offsets: vec![0],
        };
        make_huge(shared.alias, len);
        let host = backend.aperture().map_or(0, |a| a.host);
        // The alias first: it allocates the pages; the engine's mapping then only maps
        // them.
        for at in [shared.alias, host] {
            // SAFETY: a whole shared mapping of the file that this function made and
            // nothing else uses yet; populating only allocates its pages (zeros) and
            // maps them, as the first write to each would.
            let rc =
                unsafe { libc::madvise(at as *mut libc::c_void, len, libc::MADV_POPULATE_WRITE) };
            if rc != 0 {
                let e = std::io::Error::last_os_error();
                return Err(populate_error(e, "VRAM", bytes));
            }
        }
        Ok(Vram {
            backend,
            shared: Arc::new(shared),
            bare: false,
            retired: None,
        })
    }

    /// Before a VM is built whose every VRAM page comes through userfaultfd: the pages
    /// stay in the file (placed through the alias), and the engine and the guest get a
    /// new mapping of them that maps none yet. The old one goes once post-copy is
    /// over, as RAM's does (`Prefaulted::unmap_for_postcopy`).
    pub(super) fn remap_bare(&mut self) -> Result<()> {
        let fresh = map_backend(&self.shared.file, self.shared.len)?;
        self.retired = Some(std::mem::replace(&mut self.backend, fresh));
        self.bare = true;
        Ok(())
    }
}

/// A new shared mapping of all of `file` (`len` bytes), as a backend's VRAM.
fn map_backend(file: &std::fs::File, len: usize) -> Result<CpuBackend> {
    let io = |what: &str, e: std::io::Error| Error::Gpu(format!("VRAM: {what}: {e}"));
    let own = file.try_clone().map_err(|e| io("dup", e))?;
    let at = map_shared_aligned(file, len, 0).map_err(|e| io("mmap", e))?;
    // SAFETY: `at` is a new shared mapping of all of the file (`len` bytes, a whole
    // number of pages), readable and writable, that nothing else owns: the backend
    // takes it over and unmaps it.
    Ok(unsafe { CpuBackend::from_mapping(at, len as u64, own) })
}

/// Drops a VRAM mapping that nothing uses any more, its page-table entries first by
/// madvise, which holds up no page fault elsewhere in this process, where unmapping
/// them all at once would (see `super::retire`); its pages stay in their file.
pub fn retire(old: CpuBackend) {
    if let Some(a) = old.aperture() {
        // SAFETY: the whole of `old`'s own mapping of shared memory, which nothing
        // reads or writes through any more; its pages stay in the file.
        unsafe {
            libc::madvise(
                a.host as *mut libc::c_void,
                a.len as usize,
                libc::MADV_DONTNEED,
            )
        };
    }
    drop(old);
}
