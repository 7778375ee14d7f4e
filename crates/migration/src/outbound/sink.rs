//! A component's pages into the lanes: which connection each page takes, and the
//! frames they go in (copied, or in place where the memory allows).

use super::*;

/// Which connections a sink's pages take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// All of them, by address.
    Spread,
    /// The main one: post-copy's pages asked for, which nothing may queue behind.
    Main,
    /// All but the main one (where there are others): post-copy's background stream.
    Background,
    /// All of them, a frame's worth of addresses each in turn: post-copy's background
    /// on the connections split off for it, whose pages each go once (the destination
    /// never overwrites a page it holds, so one sent again may take another). By 2 MiB
    /// chunks, one connection took eight frames in a row while the pusher, which reads
    /// only while every connection has room, left the others idle.
    Frames,
}

impl Outbound {
    /// A sink that frames `section`'s pages; `cancel` stops a long read early.
    pub fn sink<'a>(&'a mut self, section: u32, cancel: &'a AtomicBool) -> SectionSink<'a> {
        self.routed(section, cancel, Route::Spread)
    }

    /// A sink whose pages go the way `route` says.
    pub fn routed<'a>(
        &'a mut self,
        section: u32,
        cancel: &'a AtomicBool,
        route: Route,
    ) -> SectionSink<'a> {
        SectionSink {
            out: self,
            section,
            cancel,
            lane: 0,
            addr: 0,
            route,
        }
    }
}

/// One component's pages into the lanes.
pub struct SectionSink<'a> {
    out: &'a mut Outbound,
    section: u32,
    cancel: &'a AtomicBool,
    lane: usize,
    addr: u64,
    route: Route,
}

impl SectionSink<'_> {
    /// The lane the page at `addr` goes on: a 2 MiB chunk always the same one, but for
    /// `Route::Frames`.
    fn lane_of(&self, addr: u64) -> usize {
        let lanes = self.out.lanes.len() as u64;
        let chunk = addr / PAGE_SIZE as u64 / CHUNK_PAGES + self.section as u64;
        match self.route {
            Route::Main => 0,
            Route::Background if lanes > 1 => (1 + chunk % (lanes - 1)) as usize,
            Route::Frames => {
                let frame = addr / PAGE_SIZE as u64 / wire::PAGES_PER_FRAME as u64;
                ((frame + self.section as u64) % lanes) as usize
            }
            _ => (chunk % lanes) as usize,
        }
    }

    /// Pages in place, one frame per run of them bound for the same lane; `kept` as in
    /// `Sink::pages_kept`.
    fn spread_in_place(
        &mut self,
        addrs: &[u64],
        pages: &[vm_memory::VolatileSlice<'_>],
        kept: Option<&Kept>,
    ) -> io::Result<()> {
        if addrs.is_empty() {
            return Ok(());
        }
        if !self.in_place() || addrs.len() != pages.len() || addrs.len() > wire::PAGES_PER_FRAME {
            return Err(io::Error::other("pages in place where they cannot go"));
        }
        let mut from = 0;
        while from < addrs.len() {
            let lane = self.lane_of(addrs[from]);
            let to = from
                + addrs[from..]
                    .iter()
                    .take_while(|&&a| self.lane_of(a) == lane)
                    .count();
            self.out
                .send_in_place(lane, self.section, &addrs[from..to], &pages[from..to], kept)?;
            from = to;
        }
        Ok(())
    }
}

impl Sink for SectionSink<'_> {
    fn slot(&mut self, addr: u64) -> &mut [u8] {
        self.lane = self.lane_of(addr);
        self.addr = addr;
        let section = self.section;
        let f = &mut self.out.lanes[self.lane].frame;
        if !f.is_empty() && f.section() != section {
            // Cannot happen while one component is read at a time; flushed anyway.
            let _ = self.out.flush_pages(self.lane);
        }
        let f = &mut self.out.lanes[self.lane].frame;
        if f.is_empty() {
            f.set_section(section);
        }
        f.next_slot()
    }

    fn page(&mut self) -> io::Result<()> {
        let i = self.lane;
        let lane = &mut self.out.lanes[i];
        lane.frame.commit(self.addr);
        lane.totals.pages += 1;
        if lane.frame.is_full() {
            self.out.flush_pages(i)?;
        }
        Ok(())
    }

    fn zero(&mut self) -> io::Result<()> {
        let i = self.lane;
        if !self.out.lanes[i].zeros.is_empty() && self.out.lanes[i].zero_section != self.section {
            self.out.flush_zeros(i)?;
        }
        let lane = &mut self.out.lanes[i];
        lane.zero_section = self.section;
        lane.totals.zero_pages += 1;
        let a = self.addr;
        match lane.zeros.last_mut() {
            Some((g, n)) if *g + *n as u64 * PAGE_SIZE as u64 == a && *n < u32::MAX => *n += 1,
            _ => lane.zeros.push((a, 1)),
        }
        if lane.zeros.len() == wire::MAX_ZERO_RUNS {
            self.out.flush_zeros(i)?;
        }
        Ok(())
    }

    fn in_place(&self) -> bool {
        let lanes = &self.out.lanes;
        match self.route {
            Route::Main => lanes[0].in_place.is_some(),
            Route::Spread | Route::Frames => lanes.iter().all(|l| l.in_place.is_some()),
            // Post-copy's background on the main connection (the only one).
            Route::Background => lanes.len() == 1 && lanes[0].in_place.is_some(),
        }
    }

    fn pages_in_place(
        &mut self,
        addrs: &[u64],
        pages: &[vm_memory::VolatileSlice<'_>],
    ) -> io::Result<()> {
        self.spread_in_place(addrs, pages, None)
    }

    fn pages_kept(
        &mut self,
        addrs: &[u64],
        pages: &[vm_memory::VolatileSlice<'_>],
        kept: &Kept,
    ) -> io::Result<()> {
        self.spread_in_place(addrs, pages, Some(kept))
    }

    fn settle(&mut self) -> io::Result<()> {
        self.out.settle()
    }

    fn data(&mut self, bytes: &[u8]) -> io::Result<()> {
        for part in bytes.chunks(wire::MAX_PAYLOAD - 4) {
            self.out.control(&Frame::Data {
                section: self.section,
                data: part,
            })?;
            self.out.lanes[0].totals.data += part.len() as u64;
        }
        Ok(())
    }

    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }
}
