//! The CPU backend: VRAM is a host mapping (anonymous, or shared memory a prefaulted
//! destination made; also mapped into the guest as the aperture), kernels run on the
//! VF's engine thread.

use crate::backend::{Acc, Aperture, Backend, OutOfRange};
use crate::command::Kernel;
use crate::kernels;
use std::ops::Range;

pub struct CpuBackend {
    ptr: *mut u8,
    len: u64,
    /// The file a shared mapping maps (`from_mapping`): what the VRAM holds is there,
    /// not in the mapping's pages.
    file: Option<std::fs::File>,
}

// SAFETY: the mapping is owned by this struct for its whole life and only reached
// through bounds-checked copies; concurrent access from the guest (through the aperture)
// is the same race a real GPU's VRAM has, and never unsafe for the host: every access
// copies bytes and never forms references that outlive one copy.
unsafe impl Send for CpuBackend {}
// SAFETY: as above.
unsafe impl Sync for CpuBackend {}

impl CpuBackend {
    /// Maps `len` bytes of VRAM (lazily: pages exist once touched).
    pub fn new(len: u64) -> std::io::Result<CpuBackend> {
        if len == 0 || !len.is_multiple_of(4096) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "VRAM size must be a non-zero multiple of 4 KiB",
            ));
        }
        // SAFETY: a fresh anonymous mapping; nothing else refers to that range.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: advice on the mapping just made; failure is harmless.
        unsafe { libc::madvise(p, len as usize, libc::MADV_HUGEPAGE) };
        Ok(CpuBackend {
            ptr: p as *mut u8,
            len,
            file: None,
        })
    }

    /// VRAM in a shared mapping of `file` the caller made (a second mapping of the
    /// caller's also reaches it: a destination's post-copy places pages through it).
    /// The backend owns the mapping from now on and unmaps it when dropped.
    ///
    /// # Safety
    /// `ptr` must be the start of a shared mapping of all of `file`, exactly `len`
    /// bytes (a non-zero multiple of 4 KiB), readable and writable, that nothing else
    /// unmaps or uses as its own.
    pub unsafe fn from_mapping(ptr: *mut u8, len: u64, file: std::fs::File) -> CpuBackend {
        CpuBackend {
            ptr,
            len,
            file: Some(file),
        }
    }

    fn check(&self, offset: u64, len: u64) -> Result<usize, OutOfRange> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(offset as usize),
            _ => Err(OutOfRange { offset, len }),
        }
    }

    fn read_f32(&self, offset: u64, n: usize, out: &mut Vec<f32>) -> Result<(), OutOfRange> {
        let o = self.check(offset, n as u64 * 4)?;
        out.clear();
        out.reserve(n);
        // SAFETY: [o, o + 4n) is inside the mapping (checked); `out` has room for n
        // floats and every bit pattern is a valid f32.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr.add(o), out.as_mut_ptr() as *mut u8, n * 4);
            out.set_len(n);
        }
        Ok(())
    }

    /// `rows` runs of `width` floats, the first at `offset` and each `stride` bytes after
    /// the last: a block of columns of a row-major matrix, packed.
    fn gather_f32(
        &self,
        offset: u64,
        stride: u64,
        rows: usize,
        width: usize,
        out: &mut Vec<f32>,
    ) -> Result<(), OutOfRange> {
        if rows == 0 {
            out.clear();
            return Ok(());
        }
        let span = stride * (rows as u64 - 1) + width as u64 * 4;
        let o = self.check(offset, span)?;
        out.clear();
        out.reserve(rows * width);
        let dst = out.as_mut_ptr() as *mut u8;
        for r in 0..rows {
            // SAFETY: every run lies inside [o, o + span), checked above; `out` has room
            // for rows * width floats and any bits are a valid f32.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    self.ptr.add(o + r * stride as usize),
                    dst.add(r * width * 4),
                    width * 4,
                )
            };
        }
        // SAFETY: all rows * width floats were written above.
        unsafe { out.set_len(rows * width) };
        Ok(())
    }

    fn write_f32(&self, offset: u64, v: &[f32]) -> Result<(), OutOfRange> {
        let o = self.check(offset, v.len() as u64 * 4)?;
        // SAFETY: inside the mapping (checked); `v` is a separate host buffer.
        unsafe {
            std::ptr::copy_nonoverlapping(v.as_ptr() as *const u8, self.ptr.add(o), v.len() * 4)
        };
        Ok(())
    }
}

impl Drop for CpuBackend {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len as usize) };
    }
}

thread_local! {
    static SCRATCH: std::cell::RefCell<[Vec<f32>; 5]> = std::cell::RefCell::new(Default::default());
}

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn vram_size(&self) -> u64 {
        self.len
    }

    fn aperture(&self) -> Option<Aperture> {
        Some(Aperture {
            host: self.ptr as u64,
            len: self.len,
        })
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), OutOfRange> {
        let o = self.check(offset, buf.len() as u64)?;
        // SAFETY: inside the mapping (checked); `buf` is a separate host buffer.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(o), buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), OutOfRange> {
        let o = self.check(offset, data.len() as u64)?;
        // SAFETY: as in `read`.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(o), data.len()) };
        Ok(())
    }

    fn slice(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<Option<vm_memory::VolatileSlice<'_>>, OutOfRange> {
        let o = self.check(offset, len)?;
        // SAFETY: inside the mapping (checked), which lives as long as `self` and so as
        // long as the slice; a VolatileSlice only reads and writes it volatilely.
        Ok(Some(unsafe {
            vm_memory::VolatileSlice::new(self.ptr.add(o), len as usize)
        }))
    }

    fn fill(&self, offset: u64, len: u64, pattern: u32) -> Result<(), OutOfRange> {
        let o = self.check(offset, len)?;
        if pattern == 0 {
            // SAFETY: inside the mapping (checked).
            unsafe { std::ptr::write_bytes(self.ptr.add(o), 0, len as usize) };
            return Ok(());
        }
        let block: Vec<u8> = std::iter::repeat_n(pattern.to_le_bytes(), 1024)
            .flatten()
            .collect();
        let mut at = 0;
        while at < len {
            let n = (len - at).min(block.len() as u64) as usize;
            // SAFETY: [o + at, + n) is inside the checked range.
            unsafe {
                std::ptr::copy_nonoverlapping(block.as_ptr(), self.ptr.add(o + at as usize), n)
            };
            at += n as u64;
        }
        Ok(())
    }

    fn copy(&self, dst: u64, src: u64, len: u64) -> Result<(), OutOfRange> {
        let d = self.check(dst, len)?;
        let s = self.check(src, len)?;
        // SAFETY: both ranges inside the mapping (checked); `copy` allows overlap.
        unsafe { std::ptr::copy(self.ptr.add(s), self.ptr.add(d), len as usize) };
        Ok(())
    }

    fn kernel(&self, k: &Kernel, units: Range<u64>, acc: &mut Acc) -> Result<(), OutOfRange> {
        SCRATCH.with(|s| {
            let [a, b, c, d, e] = &mut *s.borrow_mut();
            let n = (units.end - units.start) as usize;
            let at = |base: u64, i: u64| base + 4 * i;
            match *k {
                Kernel::VecAdd { x, y, z, .. } | Kernel::VecMul { x, y, z, .. } => {
                    self.read_f32(at(x, units.start), n, a)?;
                    self.read_f32(at(y, units.start), n, b)?;
                    if matches!(k, Kernel::VecAdd { .. }) {
                        kernels::vec_add(a, b, c);
                    } else {
                        kernels::vec_mul(a, b, c);
                    }
                    self.write_f32(at(z, units.start), c)
                }
                Kernel::Axpy { x, y, a: alpha, .. } => {
                    self.read_f32(at(x, units.start), n, a)?;
                    self.read_f32(at(y, units.start), n, b)?;
                    kernels::axpy(alpha, a, b);
                    self.write_f32(at(y, units.start), b)
                }
                Kernel::Relu { x, out, .. } => {
                    self.read_f32(at(x, units.start), n, a)?;
                    kernels::relu(a);
                    self.write_f32(at(out, units.start), a)
                }
                Kernel::ReduceSum { x, .. } => {
                    self.read_f32(at(x, units.start), n, a)?;
                    acc.f = kernels::sum(acc.f, a);
                    Ok(())
                }
                Kernel::Dot { x, y, .. } => {
                    self.read_f32(at(x, units.start), n, a)?;
                    self.read_f32(at(y, units.start), n, b)?;
                    acc.f = kernels::dot(acc.f, a, b);
                    Ok(())
                }
                Kernel::Sgemm {
                    a: pa,
                    b: pb,
                    c: pc,
                    n: cols,
                    k: inner,
                    alpha,
                    beta,
                    ..
                } => {
                    // Elements units.start..units.end of C, row by row. All of B is read
                    // once when the piece spans a row (then k * n is at most a chunk's
                    // work); otherwise only the columns the piece needs.
                    let (n, k) = (cols, inner as usize);
                    let whole_b = units.end - units.start >= n;
                    if whole_b {
                        self.read_f32(pb, k * n as usize, b)?;
                    }
                    let mut el = units.start;
                    while el < units.end {
                        let (i, j0) = (el / n, el % n);
                        let j1 = (j0 + (units.end - el)).min(n);
                        let width = (j1 - j0) as usize;
                        self.read_f32(at(pa, i * inner), k, a)?;
                        let (ldb, boff) = if whole_b {
                            (n as usize, j0 as usize)
                        } else {
                            self.gather_f32(at(pb, j0), 4 * n, k, width, b)?;
                            (width, 0)
                        };
                        self.read_f32(at(pc, el), width, c)?;
                        kernels::sgemm_piece(a, &b[boff..], ldb, c, alpha, beta, d);
                        self.write_f32(at(pc, el), c)?;
                        el += j1 - j0;
                    }
                    Ok(())
                }
                Kernel::Stencil {
                    input,
                    out,
                    f,
                    w,
                    h,
                    ..
                } => {
                    // Elements units.start..units.end with their neighbours: the piece
                    // and one element either side, and the same span one row up and
                    // one row down (never whole rows, however wide).
                    let (e0, e1, total) = (units.start, units.end, w * h);
                    let (mid_at, mid_end) = (e0.saturating_sub(1), (e1 + 1).min(total));
                    let (up_at, up_end) = (e0.max(w) - w, e1.max(w) - w);
                    let (down_at, down_end) = ((e0 + w).min(total), (e1 + w).min(total));
                    self.read_f32(at(input, mid_at), (mid_end - mid_at) as usize, a)?;
                    self.read_f32(at(input, up_at), (up_end - up_at) as usize, b)?;
                    self.read_f32(at(input, down_at), (down_end - down_at) as usize, c)?;
                    self.read_f32(at(f, e0), n, e)?;
                    let i = kernels::StencilInput {
                        mid: a,
                        mid_at: mid_at as usize,
                        up: b,
                        up_at: up_at as usize,
                        down: c,
                        down_at: down_at as usize,
                    };
                    acc.f = kernels::stencil_piece(
                        &i,
                        e,
                        d,
                        w as usize,
                        h as usize,
                        e0 as usize,
                        acc.f,
                    );
                    self.write_f32(at(out, e0), d)
                }
                Kernel::Hash { src, .. } => {
                    let bytes = n * 8;
                    let o = self.check(src + units.start * 8, bytes as u64)?;
                    let mut buf = vec![0u8; bytes];
                    // SAFETY: inside the mapping (checked).
                    unsafe {
                        std::ptr::copy_nonoverlapping(self.ptr.add(o), buf.as_mut_ptr(), bytes)
                    };
                    acc.u = kernels::hash(acc.u, &buf);
                    Ok(())
                }
            }
        })
    }

    fn scrub(&self) {
        // Private anonymous pages read as zero once dropped; shared ones only once
        // their file's pages are freed too (MADV_REMOVE), or the next VM would read
        // the last one's data.
        let advice = match self.file {
            Some(_) => libc::MADV_REMOVE,
            None => libc::MADV_DONTNEED,
        };
        // SAFETY: the whole mapping, which this backend owns; the advice only frees
        // pages, which then read as zero.
        unsafe { libc::madvise(self.ptr as *mut libc::c_void, self.len as usize, advice) };
    }

    fn resident_bytes(&self) -> u64 {
        // A shared VRAM's memory is its file's: its size on the host, at once. mincore
        // over the mapping looks every page not mapped up in the file, one by one: 50
        // ms of the engine's thread at 8 GiB after a post-copy from the start, whose
        // new mapping maps only the pages placed, with the guest waiting on its fences.
        if let Some(f) = &self.file {
            use std::os::unix::fs::MetadataExt;
            return f.metadata().map_or(0, |m| (m.blocks() * 512).min(self.len));
        }
        let pages = self.len.div_ceil(4096) as usize;
        let mut v = vec![0u8; pages];
        // SAFETY: the mapping and a vector of one byte per page.
        let r = unsafe {
            libc::mincore(
                self.ptr as *mut libc::c_void,
                self.len as usize,
                v.as_mut_ptr(),
            )
        };
        if r != 0 {
            return 0;
        }
        v.iter().filter(|&&b| b & 1 != 0).count() as u64 * 4096
    }
}
