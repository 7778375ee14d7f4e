use super::*;
use std::cell::RefCell;

#[test]
fn a_look_at_the_log_drops_only_pages_not_yet_sent() {
    // Two regions of 128 pages, all to send.
    let all = || vec![vec![u64::MAX; 2], vec![u64::MAX; 2]];
    let mut todo = all();
    // Seen rewritten: page 3 (word 0, already sent), page 70 (word 1), region 1
    // page 5 (flat word 2), and one out of range.
    let new = Written::New(vec![(0, 3), (0, 70), (1, 5), (1, 999), (7, 1)]);
    assert_eq!(drop_written(&mut todo, &new, 1), 2);
    assert_eq!(todo[0][0], u64::MAX);
    assert_eq!(todo[0][1], !(1 << 6));
    assert_eq!(todo[1][0], !(1 << 5));
    assert_eq!(drop_written(&mut todo, &new, 1), 0);
    let mut other = all();
    let mut since = vec![vec![0u64; 2], vec![0u64; 2]];
    since[0][0] = 1 << 3;
    since[0][1] = 1 << 6;
    since[1][0] = 1 << 5;
    assert_eq!(drop_written(&mut other, &Written::Since(since), 1), 2);
    assert_eq!(other, todo);
}

#[test]
fn a_take_merges_in_and_is_counted_in_one_pass() {
    // Two regions of two words; the take has fewer words in its second region.
    let mut left = vec![vec![0b1, 0], vec![0, 1 << 63]];
    assert_eq!(merge(&mut left, vec![vec![0b11, 0], vec![0b1000]]), (3, 4));
    assert_eq!(left, vec![vec![0b11, 0], vec![0b1000, 1 << 63]]);
    // Into nothing: the take is what is left.
    let mut empty = Vec::new();
    assert_eq!(merge(&mut empty, vec![vec![0, u64::MAX]]), (64, 64));
    assert_eq!(count(&empty), 64);
}

#[test]
fn zero_pages_are_recognised() {
    let mut p = vec![0u8; PAGE_SIZE];
    assert!(is_zero(&p));
    p[PAGE_SIZE - 1] = 1;
    assert!(!is_zero(&p));
    assert!(!is_zero(&p[1..]));
}

#[test]
fn a_page_in_memory_is_zero_only_if_every_byte_is() {
    let mut p = vec![0u8; PAGE_SIZE];
    let zero = |p: &mut [u8]| {
        // SAFETY: `p` is a live buffer of its length, not otherwise used meanwhile.
        let s = unsafe { vm_memory::VolatileSlice::new(p.as_mut_ptr(), p.len()) };
        zero_in_place(&s)
    };
    assert!(zero(&mut p));
    // A byte anywhere, the edges of the pieces it is read in among them.
    for at in [0, 63, 64, 65, 319, 320, 2048, PAGE_SIZE - 1] {
        p[at] = 0x80;
        assert!(!zero(&mut p), "data at byte {at} read as a zero page");
        p[at] = 0;
    }
    assert!(zero(&mut p));
    // A slice shorter than a page: only its bytes count.
    p[100] = 1;
    assert!(zero(&mut p[..100]));
    assert!(!zero(&mut p[..101]));
}

/// Two regions of 100 pages at 0 and 1 MiB; page i holds i + 1 (page 7 is zero).
struct Mem {
    written: RefCell<Vec<(u32, u64)>>,
}

impl Memory for Mem {
    fn what(&self) -> &'static str {
        "test memory"
    }
    fn start_tracking(&self) -> crate::migratable::Result<()> {
        Ok(())
    }
    fn stop_tracking(&self) {}
    fn take(&self, _last: bool) -> crate::migratable::Result<(Vec<Bitmap>, BTreeMap<String, u64>)> {
        Ok((Vec::new(), BTreeMap::new()))
    }
    fn contains(&self, _addr: u64, _pages: u64) -> bool {
        false
    }
    fn read_at(&self, _addr: u64, _buf: &mut [u8]) -> crate::migratable::Result<()> {
        Ok(())
    }
    fn write_at(&self, _addr: u64, _data: &[u8]) -> crate::migratable::Result<()> {
        Ok(())
    }
    fn base(&self, region: usize) -> u64 {
        region as u64 * (1 << 20)
    }
    fn read_page(
        &self,
        _region: usize,
        page: u64,
        buf: &mut [u8],
    ) -> crate::migratable::Result<()> {
        buf.fill(0);
        if page != 7 {
            buf[..8].copy_from_slice(&(page + 1).to_le_bytes());
        }
        Ok(())
    }
    fn populated(&self) -> Vec<Bitmap> {
        vec![crate::pagemap::all(100), vec![0, 0]]
    }
    fn peek_dirty(&self) -> crate::migratable::Result<Option<Written>> {
        Ok(Some(Written::New(
            self.written.borrow_mut().drain(..).collect(),
        )))
    }
}

#[derive(Default)]
struct Out {
    buf: Vec<u8>,
    at: u64,
    pages: Vec<u64>,
    zeros: Vec<u64>,
}

impl Sink for Out {
    fn slot(&mut self, addr: u64) -> &mut [u8] {
        self.at = addr;
        self.buf.resize(PAGE_SIZE, 0);
        &mut self.buf
    }
    fn page(&mut self) -> std::io::Result<()> {
        self.pages.push(self.at);
        Ok(())
    }
    fn zero(&mut self) -> std::io::Result<()> {
        self.zeros.push(self.at);
        Ok(())
    }
    fn data(&mut self, _bytes: &[u8]) -> std::io::Result<()> {
        unreachable!("memory sends pages")
    }
}

#[test]
fn a_first_pass_then_rounds_of_what_was_written() {
    let m = Mem {
        written: RefCell::new(Vec::new()),
    };
    let mut p = Paged::default();
    p.begin(&m);
    assert_eq!(p.left(), (100, 0));
    let mut out = Out::default();
    // In budgets of 30: the first pass sends 99 pages as data, page 7 not at all.
    let mut total = ReadReport::default();
    while p.left().0 > 0 {
        total += p.read(&m, &mut out, 30).unwrap();
    }
    assert_eq!((total.pages, total.zero_pages, total.zero_sent), (99, 1, 0));
    assert!(out.zeros.is_empty());
    // A round: pages 7 and 9 of region 0, page 0 of region 1. Page 7 is zero now,
    // and the destination may hold older data there: it goes as a zero page.
    assert_eq!(p.sync(vec![vec![1 << 7 | 1 << 9, 0], vec![1, 0]]), 3);
    assert_eq!(p.left(), (0, 3));
    let r = p.read(&m, &mut out, 100).unwrap();
    assert_eq!((r.pages, r.zero_sent), (2, 1));
    assert_eq!(out.zeros, vec![7 * 4096]);
    assert_eq!(&out.pages[99..], &[9 * 4096, 1 << 20]);
}

#[test]
fn pages_written_again_wait_for_the_next_round() {
    let m = Mem {
        written: RefCell::new(Vec::new()),
    };
    // A look is due before the next page.
    let mut p = Paged {
        pending: vec![crate::pagemap::all(100), vec![0, 0]],
        left: 100,
        since_look: SLICE_PAGES,
        ..Default::default()
    };
    m.written.borrow_mut().extend([(0, 50), (0, 99)]);
    let mut out = Out::default();
    let r = p.read(&m, &mut out, 1000).unwrap();
    assert_eq!((r.pages, r.skipped), (97, 2));
    assert!(!out.pages.contains(&(50 * 4096)));
}

/// Memory the host maps (one region of `PAGES` pages at 0): page i holds i + 1 in
/// its first word, pages 7 and 150 hold zeros.
struct Mapped(vm_memory::GuestMemoryMmap);

const PAGES: u64 = 300;

impl Mapped {
    fn new() -> Mapped {
        use vm_memory::{Bytes, GuestAddress};
        let m = vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(
            GuestAddress(0),
            PAGES as usize * PAGE_SIZE,
        )])
        .unwrap();
        for i in (0..PAGES).filter(|i| ![7, 150].contains(i)) {
            m.write_obj(i + 1, GuestAddress(i * PAGE_SIZE as u64))
                .unwrap();
        }
        Mapped(m)
    }
}

impl Memory for Mapped {
    fn what(&self) -> &'static str {
        "mapped test memory"
    }
    fn start_tracking(&self) -> crate::migratable::Result<()> {
        Ok(())
    }
    fn stop_tracking(&self) {}
    fn take(&self, _last: bool) -> crate::migratable::Result<(Vec<Bitmap>, BTreeMap<String, u64>)> {
        Ok((Vec::new(), BTreeMap::new()))
    }
    fn contains(&self, addr: u64, pages: u64) -> bool {
        addr + pages * PAGE_SIZE as u64 <= PAGES * PAGE_SIZE as u64
    }
    fn read_at(&self, addr: u64, buf: &mut [u8]) -> crate::migratable::Result<()> {
        use vm_memory::{Bytes, GuestAddress};
        self.0.read_slice(buf, GuestAddress(addr)).unwrap();
        Ok(())
    }
    fn write_at(&self, addr: u64, data: &[u8]) -> crate::migratable::Result<()> {
        use vm_memory::{Bytes, GuestAddress};
        self.0.write_slice(data, GuestAddress(addr)).unwrap();
        Ok(())
    }
    fn base(&self, _region: usize) -> u64 {
        0
    }
    fn read_page(&self, _r: usize, page: u64, buf: &mut [u8]) -> crate::migratable::Result<()> {
        self.read_at(page * PAGE_SIZE as u64, buf)
    }
    fn populated(&self) -> Vec<Bitmap> {
        vec![crate::pagemap::all(PAGES)]
    }
    fn peek_dirty(&self) -> crate::migratable::Result<Option<Written>> {
        Ok(None)
    }
    fn pages_slice(&self, addr: u64, pages: usize) -> Option<vm_memory::VolatileSlice<'_>> {
        use vm_memory::{GuestAddress, GuestMemoryBackend};
        self.0.get_slice(GuestAddress(addr), pages * PAGE_SIZE).ok()
    }
}

/// A sink that takes pages in place: what each frame held, as it was when sent.
#[derive(Default)]
struct Frames {
    buf: Vec<u8>,
    at: u64,
    frames: Vec<Vec<(u64, u64)>>,
    zeros: Vec<u64>,
    /// Frames handed over in place and not yet settled (a writer thread may still be
    /// reading their pages).
    unsettled: usize,
    /// Frames it takes before its connection fails.
    fails_after: Option<usize>,
}

impl Sink for Frames {
    fn slot(&mut self, addr: u64) -> &mut [u8] {
        self.at = addr;
        self.buf.resize(PAGE_SIZE, 0);
        &mut self.buf
    }
    fn page(&mut self) -> std::io::Result<()> {
        panic!("page {:#x} copied where it could go in place", self.at)
    }
    fn zero(&mut self) -> std::io::Result<()> {
        self.zeros.push(self.at);
        Ok(())
    }
    fn in_place(&self) -> bool {
        true
    }
    fn pages_in_place(
        &mut self,
        addrs: &[u64],
        pages: &[vm_memory::VolatileSlice<'_>],
    ) -> std::io::Result<()> {
        if self.fails_after == Some(self.frames.len()) {
            return Err(std::io::ErrorKind::BrokenPipe.into());
        }
        assert!(!addrs.is_empty() && addrs.len() <= IN_PLACE_BATCH);
        assert_eq!(addrs.len(), pages.len());
        let mut f = Vec::new();
        for (a, p) in addrs.iter().zip(pages) {
            let mut w = [0u8; 8];
            p.copy_to(&mut w[..]);
            f.push((*a, u64::from_le_bytes(w)));
        }
        self.frames.push(f);
        self.unsettled += 1;
        Ok(())
    }
    fn settle(&mut self) -> std::io::Result<()> {
        self.unsettled = 0;
        Ok(())
    }
    fn data(&mut self, _bytes: &[u8]) -> std::io::Result<()> {
        unreachable!("memory sends pages")
    }
}

/// Pages that can go in place do, a frame at a time, each exactly once and in
/// order, whatever the budgets cut: none is left behind when a read ends; zero
/// pages are recognised in place, and later rounds send what is there then.
#[test]
fn pages_go_in_place_a_frame_at_a_time_and_none_is_left_behind() {
    let m = Mapped::new();
    let mut p = Paged::default();
    p.begin(&m);
    let mut out = Frames::default();
    let mut total = ReadReport::default();
    // Budgets that end reads in the middle of a frame.
    while p.left().0 > 0 {
        total += p.read(&m, &mut out, 37).unwrap();
        // Every read lets its sink finish with the pages before the memory's borrow
        // ends.
        assert_eq!(out.unsettled, 0);
    }
    assert_eq!(
        (total.pages, total.zero_pages, total.zero_sent),
        (298, 2, 0)
    );
    let sent: Vec<(u64, u64)> = out.frames.iter().flatten().copied().collect();
    let want: Vec<(u64, u64)> = (0..PAGES)
        .filter(|i| ![7, 150].contains(i))
        .map(|i| (i * PAGE_SIZE as u64, i + 1))
        .collect();
    assert_eq!(sent, want);
    assert!(out.zeros.is_empty());
    // A round: page 7 written, page 9 zeroed, page 299 rewritten.
    m.write_at(7 * 4096, &1000u64.to_le_bytes()).unwrap();
    m.write_at(9 * 4096, &[0; 8]).unwrap();
    m.write_at(299 * 4096, &2000u64.to_le_bytes()).unwrap();
    let mut round = vec![0u64; (PAGES as usize).div_ceil(64)];
    for i in [7u64, 9, 299] {
        round[(i / 64) as usize] |= 1 << (i % 64);
    }
    p.sync(vec![round]);
    out.frames.clear();
    let r = p.read(&m, &mut out, 1000).unwrap();
    assert_eq!(out.unsettled, 0);
    assert_eq!((r.pages, r.zero_sent), (2, 1));
    assert_eq!(out.frames, vec![vec![(7 * 4096, 1000), (299 * 4096, 2000)]]);
    assert_eq!(out.zeros, vec![9 * 4096]);
}

/// A read whose sink fails mid-way still lets the sink finish with the frames it
/// took, before the error goes back.
#[test]
fn a_read_that_fails_settles_what_it_handed_over() {
    let m = Mapped::new();
    let mut p = Paged::default();
    p.begin(&m);
    let mut out = Frames {
        fails_after: Some(2),
        ..Default::default()
    };
    let e = p.read(&m, &mut out, 1000).unwrap_err();
    assert!(e.to_string().contains("pipe"), "{e}");
    assert_eq!(out.frames.len(), 2);
    assert_eq!(out.unsettled, 0);
}
