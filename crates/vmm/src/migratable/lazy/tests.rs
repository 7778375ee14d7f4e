use super::*;
use std::time::Duration;

#[test]
fn runs_of_bits() {
    assert_eq!(
        runs(&[0b1110_0011, 1 << 63, 1]),
        vec![(0, 2), (5, 3), (127, 2)]
    );
    assert!(runs(&[0, 0]).is_empty());
    assert_eq!(runs(&[u64::MAX, u64::MAX, 0b1]), vec![(0, 129)]);
    assert_eq!(runs(&[1 << 63 | 1, u64::MAX >> 1]), vec![(0, 1), (63, 64)]);
}

#[test]
fn latencies_summarised() {
    let l = Latency::of((1..=100).map(|x| x as f64).collect());
    assert_eq!((l.count, l.min_us, l.max_us), (100, 1.0, 100.0));
    assert_eq!(l.p99_us, 99.0);
    assert_eq!(Latency::of(vec![]), Latency::default());
}

use crate::migratable::fuzz_postcopy::{AnonMap, SharedMap};

fn peek(host: u64, page: usize) -> u64 {
    // SAFETY: the callers' pages lie inside their mapping.
    unsafe { std::ptr::read_volatile((host as *const u64).add(page * 512)) }
}

fn poke(host: u64, page: usize, v: u64) {
    // SAFETY: as in peek.
    unsafe { std::ptr::write_volatile((host as *mut u64).add(page * 512), v) }
}

/// The first `pages` pages of `m`, at `base` in the component's space.
fn region_of(m: &AnonMap, pages: u64, base: u64) -> HostRegion {
    HostRegion {
        host: m.host,
        len: pages * PAGE_SIZE as u64,
        base,
        alias: None,
    }
}

/// What the touches ask for, once one has: waits up to 20 s for it (`why` if none).
fn asked(lazy: &Lazy, why: &str) -> Wanted {
    let mut w = Wanted::default();
    let t = Instant::now();
    while w.ask.is_empty() {
        lazy.take(&mut w).unwrap();
        assert!(t.elapsed().as_secs() < 20, "{why}");
    }
    w
}

/// `m`'s `pages` pages, at 0 in the component's space, each first written `fill(page)`
/// through the alias (what the file held before the switch).
fn shared_region(m: &SharedMap, pages: usize, fill: impl Fn(usize) -> u64) -> HostRegion {
    for p in 0..pages {
        poke(m.alias, p, fill(p));
    }
    HostRegion {
        host: m.host,
        len: (pages * PAGE_SIZE) as u64,
        base: 0,
        alias: Some(m.alias),
    }
}

/// Touches in a row bring the pages after them, asked for apart from the touch
/// (twice as many each time, up to READ_AHEAD_MAX); a touch that then waits for
/// one of those is a remote fault after all; a touch elsewhere starts over.
#[test]
fn touches_in_a_row_bring_the_next_pages_with_them() {
    let m = AnonMap::new(128).unwrap();
    let region = region_of(&m, 128, 0);
    let lazy = std::sync::Arc::new(
        Lazy::new("test", vec![region], vec![vec![u64::MAX; 2]], true).unwrap(),
    );
    let page = |p: u64| p * PAGE_SIZE as u64;
    // Touches page `p` on a thread of its own; returns what that asks for once
    // the touch is counted (it waits until the test places the page).
    let touch = |p: usize| {
        let faults = lazy.stats().remote_faults;
        let host = m.host;
        let t = std::thread::spawn(move || peek(host, p));
        let mut w = Wanted::default();
        let since = Instant::now();
        while lazy.stats().remote_faults == faults {
            lazy.take(&mut w).unwrap();
            assert!(since.elapsed().as_secs() < 20, "no fault seen");
        }
        (t, w)
    };
    let fill = |addrs: &[u64]| {
        lazy.place(addrs, &vec![1u8; addrs.len() * PAGE_SIZE])
            .unwrap()
    };
    let (t, w) = touch(10);
    assert_eq!((w.ask, w.after), (vec![page(10)], vec![]));
    fill(&[page(10)]);
    t.join().unwrap();
    let (t, w) = touch(11);
    assert_eq!(w.ask, vec![page(11)]);
    assert_eq!(w.after, (12..16).map(page).collect::<Vec<_>>());
    fill(&[page(11)]);
    t.join().unwrap();
    // Just past what came with the last touch: twice as many.
    let (t, w) = touch(16);
    assert_eq!(w.ask, vec![page(16)]);
    assert_eq!(w.after, (17..25).map(page).collect::<Vec<_>>());
    fill(&[page(16)]);
    t.join().unwrap();
    let before = lazy.stats();
    assert_eq!((before.remote_faults, before.fetched_ahead), (3, 12));
    // A touch of a page asked for ahead waits for the answer on its way: counted
    // as a remote fault, asked for once.
    let (t, w) = touch(20);
    assert!(w.ask.is_empty() && w.after.is_empty(), "{w:?}");
    let s = lazy.stats();
    assert_eq!((s.remote_faults, s.fetched_ahead), (4, 11));
    fill(&[page(20)]);
    t.join().unwrap();
    // Elsewhere: no read-ahead until the next run.
    let (t, w) = touch(100);
    assert_eq!((w.ask, w.after), (vec![page(100)], vec![]));
    fill(&[page(100)]);
    t.join().unwrap();
}

#[test]
fn missing_pages_wait_for_the_source_and_the_rest_is_kept_or_zero() {
    let m = AnonMap::new(128).unwrap();
    missing_pages_wait(m.host, None);
}

/// The same through an alias: the missing pages' old copies stay in the file, and
/// a touch of one is a minor fault; pages the file does not hold yet (40, 70) are
/// missing faults and are filled all the same.
#[test]
fn missing_pages_of_shared_memory_are_placed_through_its_alias() {
    let m = SharedMap::new(128).unwrap();
    missing_pages_wait(m.host, Some(m.alias));
    // Page 1's old copy was overwritten in the file itself, not beside it.
    assert_eq!(peek(m.alias, 1), 7);
}

/// Zero pages sent into fresh shared memory are left as the file holds them
/// (zeros), unmapped; a touch maps one; a touch that waited for one reads zero.
#[test]
fn zero_pages_of_fresh_shared_memory_are_left_for_a_touch_to_map() {
    let m = SharedMap::new(64).unwrap();
    let region = shared_region(&m, 64, |_| 0);
    let lazy =
        std::sync::Arc::new(Lazy::new("test", vec![region], vec![vec![0b1111]], true).unwrap());
    let host = m.host;
    let waiter = std::thread::spawn(move || peek(host, 2));
    let w = asked(&lazy, "no fault seen");
    assert_eq!(w.ask, vec![2 * PAGE_SIZE as u64]);
    lazy.zero(&[(0, 3)]).unwrap();
    // Woken, the waiter touches again: that touch maps the page.
    let t = Instant::now();
    while !waiter.is_finished() {
        lazy.take(&mut Wanted::default()).unwrap();
        assert!(t.elapsed().as_secs() < 20, "the waiter was not woken");
    }
    assert_eq!(waiter.join().unwrap(), 0);
    let mapped = crate::pagemap::populated(m.host, 4 * PAGE_SIZE as u64).unwrap();
    assert_eq!(
        mapped[0] & 0b111,
        0b100,
        "zero pages mapped: {:#b}",
        mapped[0]
    );
    assert_eq!(lazy.left(), 1);
    let toucher = std::thread::spawn(move || peek(host, 0));
    let t = Instant::now();
    while !toucher.is_finished() {
        lazy.take(&mut Wanted::default()).unwrap();
        assert!(t.elapsed().as_secs() < 20, "the touch was not answered");
    }
    assert_eq!(toucher.join().unwrap(), 0);
    assert_eq!(lazy.stats().zero_filled, 2);
}

/// Pages 0..4 hold old data, 1 and 2 changed at the source since; 40 was never
/// here; 70 and 80 were never at the source (80's page exists, zero).
fn missing_pages_wait(host: u64, alias: Option<u64>) {
    for p in 0..4 {
        poke(host, p, 100 + p as u64);
    }
    if let Some(a) = alias {
        poke(a, 80, 0);
    }
    let mut missing = vec![0u64; 2];
    missing[0] = 0b110 | 1 << 40;
    let region = HostRegion {
        host,
        len: 128 * PAGE_SIZE as u64,
        base: 0x10_0000,
        alias,
    };
    let lazy = std::sync::Arc::new(Lazy::new("test", vec![region], vec![missing], false).unwrap());
    assert_eq!(lazy.left(), 3);
    // Kept pages read at once; pages the source never had read as zero.
    assert_eq!(peek(host, 0), 100);
    assert_eq!(peek(host, 3), 103);
    let (tx, rx) = std::sync::mpsc::channel();
    let toucher = std::thread::spawn(move || {
        tx.send((peek(host, 70), peek(host, 80), peek(host, 1)))
            .unwrap();
    });
    // The toucher zero-fills pages 70 and 80, then waits for page 1.
    let w = asked(&lazy, "no fault seen");
    assert_eq!(w.ask, vec![0x10_0000 + 4096]);
    assert!(w.after.is_empty(), "one touch is not a run: {:?}", w.after);
    assert!(rx.try_recv().is_err(), "a missing page read before it came");
    let mut page = vec![0u8; PAGE_SIZE];
    page[..8].copy_from_slice(&7u64.to_le_bytes());
    lazy.place(&[0x10_0000 + 4096], &page).unwrap();
    assert_eq!(rx.recv().unwrap(), (0, 0, 7));
    toucher.join().unwrap();
    // A duplicate is dropped; outside addresses are refused, nothing placed.
    lazy.place(&[0x10_0000 + 4096], &page).unwrap();
    assert!(lazy
        .place(&[0x10_0000 + 2 * 4096, 0x9000], &[0; 8192])
        .is_err());
    assert!(lazy.zero(&[(0x10_0000 + 127 * 4096, 2)]).is_err());
    assert_eq!(lazy.left(), 2);
    lazy.zero(&[(0x10_0000 + 2 * 4096, 1)]).unwrap();
    let _ = lazy.wake.read();
    lazy.place(&[0x10_0000 + 40 * 4096], &page).unwrap();
    assert_eq!(lazy.left(), 0);
    // The last page in wakes whoever watches (to say DONE), at once.
    let mut fd = libc::pollfd {
        fd: lazy.wake_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    assert_eq!(unsafe { libc::poll(&mut fd, 1, 0) }, 1, "no wake-up");
    assert_eq!((peek(host, 1), peek(host, 2), peek(host, 40)), (7, 0, 7));
    let s = lazy.stats();
    assert_eq!(
        (s.remote_faults, s.prepaged, s.zero_filled, s.duplicates),
        (1, 2, 2, 1)
    );
    assert_eq!(s.fault_latency.count, 1);
}

#[test]
fn hostile_bitmaps_are_refused() {
    let m = AnonMap::new(100).unwrap();
    let region = region_of(&m, 100, 0);
    assert!(Lazy::new("t", vec![region], vec![vec![0; 1]], false).is_err());
    assert!(Lazy::new("t", vec![region], vec![vec![0, 1 << 40]], false).is_err());
    assert!(Lazy::new("t", vec![], vec![vec![0, 0]], false).is_err());
    assert!(Lazy::new("t", vec![region], vec![vec![0, 1 << 35]], false).is_ok());
}

/// A frame's page data as a stream hands it over, and what it says of its checks.
struct Frame<'a> {
    data: &'a [u8],
    at: usize,
    whole: bool,
}

impl<'a> Frame<'a> {
    /// A frame of `data` that checks out (`whole`) or not.
    fn of(data: &'a [u8], whole: bool) -> Frame<'a> {
        Frame { data, at: 0, whole }
    }
}

impl crate::migratable::PageSource for Frame<'_> {
    fn fill(&mut self, pages: &mut vm_memory::VolatileSlice<'_>) -> std::io::Result<()> {
        let end = self.at + pages.len();
        pages.copy_from(&self.data[self.at..end]);
        self.at = end;
        Ok(())
    }

    fn verify(&mut self) -> std::io::Result<()> {
        if !self.whole {
            return Err(std::io::Error::other("the frame failed its CRC"));
        }
        Ok(())
    }
}

/// The data of a frame of pages `pages`: each page's first word is 1000 + its number.
fn frame_pages(pages: &[usize]) -> Vec<u8> {
    let mut d = vec![0u8; pages.len() * PAGE_SIZE];
    for (i, &p) in pages.iter().enumerate() {
        d[i * PAGE_SIZE..][..8].copy_from_slice(&(1000 + p as u64).to_le_bytes());
    }
    d
}

/// Pages read from the stream straight into memory with an alias: the missing ones
/// land through the alias and are mapped only once the frame checks out; a page that
/// is here already is read over, not written. A frame that fails its check leaves its
/// pages missing, cleared in the file and unmapped, and a touch that waited on one
/// touches again; the next good copy places them. Memory without an alias declines,
/// reading nothing.
#[test]
fn pages_read_into_the_alias_are_mapped_only_once_checked() {
    let m = SharedMap::new(64).unwrap();
    let region = shared_region(&m, 64, |p| 10 + p as u64);
    let lazy =
        std::sync::Arc::new(Lazy::new("test", vec![region], vec![vec![0b10_1110]], false).unwrap());
    let addr = |p: usize| (p * PAGE_SIZE) as u64;
    let mapped = || crate::pagemap::populated(m.host, 8 * PAGE_SIZE as u64).unwrap()[0] & 0xff;
    assert_eq!(mapped() & 0b10_1110, 0, "missing pages still mapped");

    // Page 5's frame fails its check: nothing of it is mapped or kept.
    let d = frame_pages(&[5]);
    let mut bad = Frame::of(&d, false);
    assert!(lazy.place_from(&[addr(5)], &mut bad).is_err());
    assert_eq!(bad.at, PAGE_SIZE, "the frame was not read whole");
    assert_eq!((lazy.left(), peek(m.alias, 5)), (4, 0));
    assert_eq!(mapped() & 0b10_0000, 0, "a page of a bad frame was mapped");

    // Pages 1-3, then 6 (here already) and 2 again: 1-3 placed, the rest read over.
    let pages = [1, 2, 3, 6, 2];
    let d = frame_pages(&pages);
    let mut good = Frame::of(&d, true);
    let a: Vec<u64> = pages.iter().map(|&p| addr(p)).collect();
    assert!(lazy.place_from(&a, &mut good).unwrap());
    assert_eq!(good.at, d.len(), "the frame was not read whole");
    assert_eq!(lazy.left(), 1);
    assert_eq!(
        (
            peek(m.host, 1),
            peek(m.host, 2),
            peek(m.host, 3),
            peek(m.alias, 6)
        ),
        (1001, 1002, 1003, 16)
    );
    assert_eq!(mapped() & 0b1110, 0b1110);

    // A touch of page 5 waits: a frame holding it declines, reading nothing, and goes
    // through a buffer (`place`), which wakes it.
    let host = m.host;
    let toucher = std::thread::spawn(move || peek(host, 5));
    let w = asked(&lazy, "no fault seen");
    assert_eq!(w.ask, vec![addr(5)]);
    let d = frame_pages(&[5]);
    let mut awaited = Frame::of(&d, true);
    assert!(!lazy.place_from(&[addr(5)], &mut awaited).unwrap());
    assert_eq!(awaited.at, 0, "a frame a touch waits on was read in place");
    lazy.place(&[addr(5)], &d).unwrap();
    assert_eq!(toucher.join().unwrap(), 1005);
    assert_eq!(lazy.left(), 0);
    let s = lazy.stats();
    assert_eq!(
        (
            s.remote_faults,
            s.prepaged,
            s.duplicates,
            s.fault_latency.count
        ),
        (1, 3, 2, 1)
    );

    // Outside the memory: refused, nothing read.
    let mut none = Frame::of(&d, true);
    assert!(lazy.place_from(&[addr(64)], &mut none).is_err());
    assert_eq!(none.at, 0);
    // Without an alias: declined, nothing read.
    let anon = AnonMap::new(8).unwrap();
    let plain = Lazy::new("test", vec![region_of(&anon, 8, 0)], vec![vec![1]], true).unwrap();
    assert!(!plain.place_from(&[0], &mut none).unwrap());
    assert_eq!((none.at, plain.left()), (0, 1));
}

/// A touch of a page whose frame is being read waits for it, and the page counts as
/// still to come: the frame's mapping wakes the toucher when it checks out; when it
/// fails its check the toucher is woken, touches again, and that touch is asked for.
#[test]
fn a_touch_behind_a_frame_waits_for_it_and_asks_again_if_it_fails() {
    touch_behind_a_frame(true);
    touch_behind_a_frame(false);
}

fn touch_behind_a_frame(whole: bool) {
    let m = SharedMap::new(8).unwrap();
    let region = shared_region(&m, 8, |_| 0);
    let lazy =
        std::sync::Arc::new(Lazy::new("test", vec![region], vec![vec![0b10]], true).unwrap());
    // The frame's read stops halfway until the touch is seen.
    struct Held<'a> {
        lazy: &'a Lazy,
        host: u64,
        toucher: Option<std::thread::JoinHandle<u64>>,
        whole: bool,
    }
    impl crate::migratable::PageSource for Held<'_> {
        fn fill(&mut self, pages: &mut vm_memory::VolatileSlice<'_>) -> std::io::Result<()> {
            pages.copy_from(&[0xabu8; PAGE_SIZE][..]);
            let host = self.host;
            self.toucher = Some(std::thread::spawn(move || peek(host, 1)));
            // The touch is seen while the page flies: nothing to ask for yet.
            let mut fd = libc::pollfd {
                fd: self.lazy.fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            assert_eq!(unsafe { libc::poll(&mut fd, 1, 20_000) }, 1, "no touch");
            let mut w = Wanted::default();
            self.lazy.take(&mut w).unwrap();
            assert!(w.ask.is_empty(), "a flying page asked for: {:?}", w.ask);
            // Until it lands it is still to come: no DONE, and a source that comes
            // back (a recovery) is told to send it again.
            assert_eq!(self.lazy.left(), 1);
            assert_eq!(self.lazy.missing(), vec![vec![0b10]]);
            Ok(())
        }

        fn verify(&mut self) -> std::io::Result<()> {
            if !self.whole {
                return Err(std::io::Error::other("the frame failed its CRC"));
            }
            Ok(())
        }
    }
    let mut held = Held {
        lazy: &lazy,
        host: m.host,
        toucher: None,
        whole,
    };
    let placed = lazy.place_from(&[PAGE_SIZE as u64], &mut held);
    let toucher = held.toucher.take().unwrap();
    if whole {
        assert!(placed.unwrap());
        assert_eq!(toucher.join().unwrap(), u64::from_ne_bytes([0xab; 8]));
        assert_eq!((lazy.left(), lazy.stats().remote_faults), (0, 0));
        return;
    }
    assert!(placed.is_err());
    let w = asked(&lazy, "the toucher was not woken to ask");
    assert_eq!(w.ask, vec![PAGE_SIZE as u64]);
    assert!(!toucher.is_finished(), "a page of a bad frame was read");
    let page = frame_pages(&[1]);
    lazy.place(&[PAGE_SIZE as u64], &page).unwrap();
    assert_eq!(toucher.join().unwrap(), 1001);
}

/// The VM ends before its memory arrived: a touch that waits on a missing page goes
/// on (reading zero: the page was never here), and so does a device's `fetch`; pages
/// that come later are dropped, without an error, and still count as missing.
#[test]
fn an_abandoned_memory_lets_whoever_waits_go_on() {
    let m = AnonMap::new(64).unwrap();
    let region = region_of(&m, 64, 0);
    let lazy =
        std::sync::Arc::new(Lazy::new("test", vec![region], vec![vec![0b10_1000]], false).unwrap());
    let host = m.host;
    let toucher = std::thread::spawn(move || peek(host, 3));
    asked(&lazy, "no fault seen");
    let l = lazy.clone();
    let fetcher = std::thread::spawn(move || l.fetch(5 * PAGE_SIZE as u64, PAGE_SIZE as u64));
    let t = Instant::now();
    while lazy.stats().fetched_ahead == 0 {
        assert!(t.elapsed().as_secs() < 20, "the fetch asked for nothing");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(!toucher.is_finished() && !fetcher.is_finished());
    lazy.abandon();
    let t = Instant::now();
    while !(toucher.is_finished() && fetcher.is_finished()) {
        assert!(t.elapsed().as_secs() < 20, "a waiter was left waiting");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(toucher.join().unwrap(), 0);
    fetcher.join().unwrap();
    lazy.place(&[5 * PAGE_SIZE as u64], &[9; PAGE_SIZE])
        .unwrap();
    lazy.zero(&[(3 * PAGE_SIZE as u64, 1)]).unwrap();
    assert_eq!(peek(host, 5), 0, "a page placed after the end");
    assert_eq!(lazy.left(), 2);
}

/// What the GPU engine checks before each step: whether a range is all here, page by
/// page across words of the bitmap and across regions, without waiting.
#[test]
fn a_range_is_here_once_every_page_of_it_is() {
    let m = AnonMap::new(200).unwrap();
    let page = PAGE_SIZE as u64;
    // Region 0: pages 0..130 at 0; region 1: its next 8 pages at 1 GiB.
    let r0 = region_of(&m, 130, 0);
    let r1 = HostRegion {
        host: m.host + 130 * page,
        len: 8 * page,
        base: 1 << 30,
        alias: None,
    };
    let missing = vec![vec![0, 1, 1 << 1], vec![1 << 7]];
    let lazy = Lazy::new("test", vec![r0, r1], missing, false).unwrap();
    assert!(lazy.here(0, 64 * page));
    assert!(!lazy.here(63 * page, 2 * page), "page 64 is missing");
    assert!(!lazy.here(64 * page + 4095, 1), "its last byte");
    assert!(lazy.here(65 * page, 64 * page), "pages 65..129");
    assert!(!lazy.here(65 * page, 65 * page), "page 129 is missing");
    assert!(lazy.here(130 * page, 1 << 20), "between the regions");
    assert!(lazy.here(1 << 30, 7 * page));
    assert!(!lazy.here((1 << 30) + 7 * page, 1), "region 1's page 7");
    assert!(!lazy.here(0, u64::MAX), "everything, clipped");
    assert!(lazy.here(64 * page, 0), "nothing");
    lazy.place(&[64 * page], &[1; PAGE_SIZE]).unwrap();
    assert!(lazy.here(0, 129 * page));
    assert!(!lazy.here(0, u64::MAX));
    // Abandoned: nothing waits any more, so a touch would not wait either.
    lazy.abandon();
    assert!(lazy.here(0, u64::MAX));
}
