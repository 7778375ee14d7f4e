//! Post-copy's pages read from the stream straight into memory that has an alias: the
//! bytes go from the socket to the page in the file, through the alias, which the
//! guest cannot see, with no buffer between; the guest's mapping gets them only once
//! the stream has checked them. Into memory without an alias there is no such place:
//! UFFDIO_COPY takes a page whole from a buffer.

use super::{ComponentError, Lazy, Result, PAGE_SIZE};
use crate::migratable::PageSource;
use vm_memory::VolatileSlice;

impl Lazy {
    /// Pages from the source (`addrs`, a frame's, all checked first) read from `src` in
    /// the frame's order: each run of pages that were missing into its place through
    /// the alias, the rest (here already, or twice in the frame) into a buffer that is
    /// dropped. None is mapped for the guest before `src` verifies every byte; when it
    /// does not, or the stream fails, they are all missing again. False, with nothing
    /// read: memory without an alias, or a frame holding a page a touch waits for.
    pub fn place_from(&self, addrs: &[u64], src: &mut dyn PageSource) -> Result<bool> {
        let at = self.locate_all(addrs)?;
        if at.iter().any(|&(r, _)| self.regions[r].alias.is_none()) || self.awaited(addrs) {
            return Ok(false);
        }
        let runs = self.take_missing(&at, addrs, false);
        let flying = || runs.iter().map(|&(r, p, _, n)| (r, p, n as u64));
        if let Err(e) = self.read_runs(&runs, addrs.len(), src) {
            self.give_back(&runs);
            self.landed(flying());
            return Err(e);
        }
        {
            let mut i = self.lock();
            for &(r, p, _, n) in &runs {
                for j in 0..n as u64 {
                    let addr = self.regions[r].base + (p + j) * PAGE_SIZE as u64;
                    self.count_in(&mut i, addr);
                }
            }
        }
        let mapped = runs
            .iter()
            .try_for_each(|&(r, p, _, n)| self.map_run(r, p, n as u64));
        self.landed(flying());
        self.unless_abandoned(mapped).map(|()| true)
    }

    /// Reads the frame's `n` pages from `src`: `runs` (taken by `take_missing`, in the
    /// frame's order) through the alias, the pages between them into a buffer.
    fn read_runs(
        &self,
        runs: &[(usize, u64, usize, usize)],
        n: usize,
        src: &mut dyn PageSource,
    ) -> Result<()> {
        let mut skipped = Vec::new();
        let mut k = 0;
        // The frame's end stands last, as an empty run.
        for &(r, p, k0, len) in runs.iter().chain([(0, 0, n, 0)].iter()) {
            if k < k0 {
                skipped.resize((k0 - k) * PAGE_SIZE, 0);
                src.fill(&mut VolatileSlice::from(&mut skipped[..]))?;
            }
            if len > 0 {
                let alias = self.regions[r].alias.ok_or_else(|| {
                    ComponentError::Refused(format!("{}: no alias to read into", self.what))
                })?;
                let at = (alias + p * PAGE_SIZE as u64) as *mut u8;
                // SAFETY: `len` pages of this region's alias, a shared mapping that
                // `_keep` keeps mapped (each page was located inside the region); no
                // other thread writes them (taken off `missing` under the lock), and the
                // guest does not map them until `map_run`, after `verify`.
                let mut pages = unsafe { VolatileSlice::new(at, len * PAGE_SIZE) };
                src.fill(&mut pages)?;
            }
            k = k0 + len;
        }
        Ok(src.verify()?)
    }

    /// Whether a touch waits for one of `addrs`. Read in place, such a frame would hold
    /// that page from its head to its check, and a reader kept off a core meanwhile
    /// would hold the touch with it. Read into a buffer, the page is taken only once
    /// the frame is read and checked, and the copy asked for on the urgent lane can
    /// answer first.
    fn awaited(&self, addrs: &[u64]) -> bool {
        let i = self.lock();
        !i.asked.is_empty()
            && addrs
                .iter()
                .any(|a| matches!(i.asked.get(a), Some((_, false))))
    }

    /// Pages taken for a read that failed are missing again. What the read left in
    /// them is cleared: a fresh memory's unsent pages must hold zeros (`zero_run`).
    /// Whoever touched one meanwhile is woken to touch it again, and so asks for it.
    fn give_back(&self, runs: &[(usize, u64, usize, usize)]) {
        let mut i = self.lock();
        for &(r, p, _, n) in runs {
            if let Some(alias) = self.regions[r].alias {
                // SAFETY: as in `read_runs`: pages of the alias taken by this thread,
                // not mapped for the guest.
                unsafe {
                    std::ptr::write_bytes(
                        (alias + p * PAGE_SIZE as u64) as *mut u8,
                        0,
                        n * PAGE_SIZE,
                    )
                };
            }
            for j in 0..n as u64 {
                let q = p + j;
                i.missing[r][(q / 64) as usize] |= 1 << (q % 64);
            }
            i.left += n as u64;
            let _ = self.uffd.wake(self.host(r, p), n * PAGE_SIZE);
        }
    }
}
