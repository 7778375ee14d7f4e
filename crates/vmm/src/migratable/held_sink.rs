//! A sink for tests of a post-copy source: it takes pages in place and reads them only
//! after the sender has let go of its borrow, as a connection's writer thread does.

use super::paged::{send_taken, Memory, MemoryState, PAGE_SIZE};
use super::{Kept, MigState, ReadReport, Sink};

#[derive(Default)]
pub struct HeldSink {
    /// Each page handed over in place: its address, where it is mapped, and what keeps
    /// that mapping.
    pub held: Vec<(u64, usize, Kept)>,
    pub zeros: Vec<u64>,
    /// Pages that came through the buffer instead.
    pub copied: u64,
    addr: u64,
    buf: Vec<u8>,
}

impl HeldSink {
    /// The bytes of the page handed over at `addr`, read where it is.
    pub fn page(&self, addr: u64) -> Option<Vec<u8>> {
        let (_, ptr, _) = self.held.iter().find(|h| h.0 == addr)?;
        // SAFETY: a page of a mapping that the entry's `Kept` keeps mapped while `self`
        // lives; only read, and copied out at once.
        Some(unsafe { std::slice::from_raw_parts(*ptr as *const u8, PAGE_SIZE) }.to_vec())
    }
}

impl Sink for HeldSink {
    fn slot(&mut self, addr: u64) -> &mut [u8] {
        self.addr = addr;
        self.buf.resize(PAGE_SIZE, 0);
        &mut self.buf
    }
    fn page(&mut self) -> std::io::Result<()> {
        self.copied += 1;
        Ok(())
    }
    fn zero(&mut self) -> std::io::Result<()> {
        self.zeros.push(self.addr);
        Ok(())
    }
    fn in_place(&self) -> bool {
        true
    }
    fn pages_in_place(
        &mut self,
        _addrs: &[u64],
        _pages: &[vm_memory::VolatileSlice<'_>],
    ) -> std::io::Result<()> {
        panic!("pages of a stopped memory that can be held go without a settle");
    }
    fn pages_kept(
        &mut self,
        addrs: &[u64],
        pages: &[vm_memory::VolatileSlice<'_>],
        kept: &Kept,
    ) -> std::io::Result<()> {
        assert!(addrs.len() == pages.len() && addrs.len() <= 64);
        for (a, p) in addrs.iter().zip(pages) {
            self.held
                .push((*a, p.ptr_guard().as_ptr() as usize, kept.clone()));
        }
        Ok(())
    }
    fn data(&mut self, _bytes: &[u8]) -> std::io::Result<()> {
        Ok(())
    }
}

/// Everything a stopped memory `m` holds, as a post-copy source sends it (from the
/// switch, `frame` pages a take), into a `HeldSink`.
pub fn drain(m: &dyn Memory, frame: u64) -> (ReadReport, HeldSink) {
    let mut src = MemoryState::default();
    src.state = MigState::Stop;
    src.arc(m, MigState::StopCopy).unwrap();
    src.state = MigState::StopCopy;
    src.postcopy_switch(m).unwrap().unwrap();
    let mut out = HeldSink::default();
    let mut r = ReadReport::default();
    while let Some(t) = src.take_postcopy(m, frame).unwrap() {
        if t.is_empty() {
            break;
        }
        r += send_taken(m, &mut out, &t).unwrap();
    }
    (r, out)
}
