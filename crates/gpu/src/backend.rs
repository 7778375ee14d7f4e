//! What executes a VF's work. The VF model (registers, ring, decoder, page tables,
//! chunking, scheduling, fences) is the same for every backend; a backend owns the VF's
//! VRAM and runs copies and kernels on it, given VRAM offsets that the model has already
//! translated and checked. The CPU backend keeps VRAM in host memory and runs kernels on
//! the VF's engine thread; a CUDA backend would keep VRAM in device memory (offsets
//! become device pointers from one allocation) and launch the same kernels on a stream,
//! one chunk per launch, with no change to the model.

use crate::command::Kernel;
use serde::{Deserialize, Serialize};
use std::ops::Range;

/// An access outside the backend's VRAM: the model checks every range first, so this
/// only reports a broken invariant, as an error rather than a crash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutOfRange {
    pub offset: u64,
    pub len: u64,
}

/// Running state of a reduction or hash, carried from one chunk to the next (and across
/// a preemption or, later, a migration).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Acc {
    pub f: f64,
    pub u: u64,
}

/// Host memory that the guest's VRAM aperture maps directly (as guest memory, not
/// trapped). `host` stays valid as long as the backend lives.
#[derive(Clone, Copy, Debug)]
pub struct Aperture {
    pub host: u64,
    pub len: u64,
}

pub trait Backend: Send + Sync {
    fn name(&self) -> &'static str;
    fn vram_size(&self) -> u64;
    /// The mapping for the aperture BAR, if the backend's VRAM can be mapped into the
    /// guest (the CPU backend's always can; a CUDA backend's through a host-visible
    /// window).
    fn aperture(&self) -> Option<Aperture>;
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), OutOfRange>;
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), OutOfRange>;
    /// `len` bytes of VRAM at `offset` as the host maps them, for a migration's
    /// destination to read pages into in place while the engine is stopped (None: this
    /// backend does not lend its memory; pages go through `write`).
    fn slice(
        &self,
        _offset: u64,
        _len: u64,
    ) -> Result<Option<vm_memory::VolatileSlice<'_>>, OutOfRange> {
        Ok(None)
    }
    fn fill(&self, offset: u64, len: u64, pattern: u32) -> Result<(), OutOfRange>;
    /// VRAM to VRAM; the ranges may overlap (memmove).
    fn copy(&self, dst: u64, src: u64, len: u64) -> Result<(), OutOfRange>;
    /// Runs units `units` (see `Kernel::units`) of `k`, whose operands are VRAM offsets.
    fn kernel(&self, k: &Kernel, units: Range<u64>, acc: &mut Acc) -> Result<(), OutOfRange>;
    /// Zeroes all of VRAM (a VF handed to a new VM must not show the last one's data).
    fn scrub(&self);
    /// Bytes of VRAM that hold memory now (touched since the last scrub).
    fn resident_bytes(&self) -> u64;
}
