//! Post-copy on the source: pages are taken off what is left under the component's
//! lock and read out of memory after it. The VM has stopped here for good, so nothing
//! writes the memory any more and a page read outside the lock is the page.
//!
//! Read under the lock, a background frame held it for its whole copy, and a request
//! for a page a vCPU waited on, answered on another thread, waited for that lock: 164
//! to 1252 us for 6 requests in three 1 GiB post-copies of a 64 MiB working set (48
//! touches; docs/benchmarks.md, "The source's answers waited for the background's
//! lock"). The copy is short, but a background thread preempted in the middle of it
//! (the cores shared with the guest's vCPU) kept the lock until it ran again.

use super::super::{ComponentError, MigState, ReadReport, Result, Sink};
use super::{check, is_zero, zero_in_place, InPlace, Memory, MemoryState, Paged, PAGE_SIZE};

/// A page taken off what is left, to be sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Taken {
    pub region: usize,
    pub page: u64,
    /// Its address in the component's space.
    pub addr: u64,
}

impl Paged {
    /// Takes up to `budget` pages off what is left, in the order `read` sends them.
    fn take_next(&mut self, bases: &[u64], budget: u64) -> Vec<Taken> {
        let mut out = Vec::new();
        let mut wrapped = false;
        while self.left > 0 && (out.len() as u64) < budget {
            let Some((region, word)) = self.next_word(&mut wrapped) else {
                break;
            };
            let bits = self.pending[region][word];
            let mut rest = bits;
            while rest != 0 && (out.len() as u64) < budget {
                let page = word as u64 * 64 + rest.trailing_zeros() as u64;
                rest &= rest - 1;
                out.push(Taken {
                    region,
                    page,
                    addr: bases[region] + page * PAGE_SIZE as u64,
                });
            }
            self.pending[region][word] = rest;
            self.left -= (bits & !rest).count_ones() as u64;
            if rest == 0 {
                self.cursor += 1;
            }
        }
        out
    }
}

impl MemoryState {
    /// Post-copy, on the source: up to `pages` pages taken off what is left, for
    /// `send_taken` to send outside the component's lock. None when this memory is not
    /// a post-copy source: `read` sends its pages.
    pub fn take_postcopy(&mut self, mem: &dyn Memory, pages: u64) -> Result<Option<Vec<Taken>>> {
        if self.state != MigState::StopCopy || !self.paged.lazy_source {
            return Ok(None);
        }
        let bases: Vec<u64> = (0..self.paged.pending.len()).map(|i| mem.base(i)).collect();
        Ok(Some(self.paged.take_next(&bases, pages)))
    }

    /// Post-copy, on the source: the pages at `addrs`, taken off what is left (the
    /// background goes on from the last of them), for `send_taken`. The result says
    /// whether every address was one of this memory's: the pages before the first that
    /// was not are taken all the same.
    pub fn take_requested(
        &mut self,
        mem: &dyn Memory,
        addrs: &[u64],
    ) -> Result<(Vec<Taken>, Result<()>)> {
        super::super::expect(self.state, MigState::StopCopy, "pages asked for")?;
        let regions = mem
            .host_regions()
            .ok_or_else(|| ComponentError::Refused(format!("{} is not lazy", mem.what())))?;
        let mut taken = Vec::with_capacity(addrs.len());
        for &addr in addrs {
            if let Err(e) = check(mem, addr, 1) {
                return Ok((taken, Err(e)));
            }
            let Some((region, reg)) = regions
                .iter()
                .enumerate()
                .find(|(_, g)| addr >= g.base && addr - g.base < g.len)
            else {
                let e =
                    ComponentError::Refused(format!("page {addr:#x} is not inside {}", mem.what()));
                return Ok((taken, Err(e)));
            };
            let page = (addr - reg.base) / PAGE_SIZE as u64;
            self.paged.take_page(region, page);
            taken.push(Taken { region, page, addr });
        }
        Ok((taken, Ok(())))
    }
}

/// Sends pages taken with `take_postcopy` or `take_requested`, read from `mem` (whose
/// writers have stopped for good) without the component's lock. Zero pages are said as
/// such: the destination's copy is missing, not zero. To a sink that takes pages in
/// place they go from where they are, each frame holding the memory's mapping until
/// it is written (`Sink::pages_kept`), where a copy of each on the sending thread was
/// what a many-core host's post-copy waited for (the background stream's one thread
/// copied and checked every page while the connections' writers waited for it); a
/// memory that cannot be held so is copied.
pub fn send_taken(mem: &dyn Memory, sink: &mut dyn Sink, taken: &[Taken]) -> Result<ReadReport> {
    let mut r = ReadReport::default();
    if sink.cancelled() {
        return Err(ComponentError::Io(std::io::Error::new(
            std::io::ErrorKind::Interrupted,
            "cancelled",
        )));
    }
    let kept = sink.in_place().then(|| mem.mapping()).flatten();
    let held = kept.is_some();
    let mut batch = InPlace::new(kept);
    for t in taken {
        if let Some(page) = held.then(|| mem.pages_slice(t.addr, 1)).flatten() {
            if zero_in_place(&page) {
                sink.slot(t.addr);
                sink.zero()?;
                r.zero_pages += 1;
                r.zero_sent += 1;
                continue;
            }
            batch.push(sink, t.addr, page)?;
            r.pages += 1;
            continue;
        }
        let slot = sink.slot(t.addr);
        mem.read_page(t.region, t.page, slot)?;
        if is_zero(slot) {
            sink.zero()?;
            r.zero_pages += 1;
            r.zero_sent += 1;
        } else {
            sink.page()?;
            r.pages += 1;
        }
    }
    batch.flush(sink)?;
    Ok(r)
}
