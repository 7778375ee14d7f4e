use super::*;
use crate::transport::Target;
use std::os::unix::net::UnixStream;

/// Lanes over two socket pairs, the main one and one with a writer thread, their pages
/// checked as `checks` says; and the peers' ends (main, other).
fn two_lanes(checks: PageChecks) -> (Outbound, UnixStream, UnixStream) {
    let (main, main_peer) = UnixStream::pair().unwrap();
    let (lane, lane_peer) = UnixStream::pair().unwrap();
    let streams = vec![Stream::Unix(main), Stream::Unix(lane)];
    let out = Outbound::checked_by(streams, None, Arc::default(), checks).unwrap();
    (out, main_peer, lane_peer)
}

#[test]
fn pages_zeros_and_control_frames_reach_the_file_in_order() {
    let dir = std::env::temp_dir().join(format!("godwit-outbound-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("s");
    let s = Stream::connect(&Target::File(path.clone()), Duration::from_secs(1)).unwrap();
    let mut out = Outbound::new(vec![s], None, Arc::default()).unwrap();
    let cancel = AtomicBool::new(false);
    {
        let mut k = out.sink(3, &cancel);
        for p in 0..100u64 {
            k.slot(p * 4096).fill(p as u8 + 1);
            k.page().unwrap();
        }
        k.slot(200 * 4096);
        k.zero().unwrap();
        k.slot(201 * 4096);
        k.zero().unwrap();
    }
    out.control(&Frame::State {
        section: 3,
        data: b"st",
    })
    .unwrap();
    out.complete().unwrap();
    // A snapshot file replaces its path only when sealed.
    out.seal().unwrap();
    drop(out);
    let bytes = std::fs::read(&path).unwrap();
    let mut r = bytes.as_slice();
    let mut buf = Vec::new();
    let mut kinds = Vec::new();
    let mut pages = 0;
    while let Ok(f) = wire::read_frame(&mut r, &mut buf) {
        match &f {
            Frame::Pages { section, addrs, .. } => {
                assert_eq!(*section, 3);
                pages += addrs.len();
            }
            Frame::Zero { runs, .. } => assert_eq!(runs, &vec![(200 * 4096, 2)]),
            Frame::Complete(t) => assert_eq!((t.pages, t.zero_pages), (100, 2)),
            _ => {}
        }
        kinds.push(f.kind());
    }
    use wire::Kind::*;
    assert_eq!(pages, 100);
    assert_eq!(kinds, vec![Pages, Pages, Zero, State, Complete]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn frame_buffers_are_kept_and_control_frames_do_not_take_their_place() {
    let dir = std::env::temp_dir().join(format!("godwit-outbound-b-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let open =
        |n: &str| Stream::connect(&Target::File(dir.join(n)), Duration::from_secs(1)).unwrap();
    // The main lane, written directly, and one with a writer thread.
    let mut out = Outbound::new(vec![open("a"), open("b")], None, Arc::default()).unwrap();
    let cancel = AtomicBool::new(false);
    let mut main_buffers = std::collections::HashSet::new();
    for round in 0..4u64 {
        {
            let mut k = out.sink(0, &cancel);
            // Chunks of 512 pages alternate between the two lanes.
            for p in 0..4 * 512u64 {
                k.slot(p * 4096).fill(1);
                k.page().unwrap();
            }
        }
        // SYNC on both lanes and a state on the main one: small frames.
        out.round_end(round).unwrap();
        out.control(&Frame::Synced(round)).unwrap();
        out.sync().unwrap();
        let main = &out.lanes[0];
        main_buffers.insert(main.recycled.as_ref().expect("a buffer kept").as_ptr());
        assert!(main.recycled.as_ref().unwrap().capacity() >= PagesFrame::BUFFER);
    }
    // The main lane's frames take turns in the same two buffers.
    assert!(main_buffers.len() <= 2, "{}", main_buffers.len());
    // What the writer kept for the other lane are frame buffers, all of them.
    let Io::Thread { spare, .. } = &out.lanes[1].io else {
        panic!("the second lane has a writer thread");
    };
    let kept: Vec<usize> = std::iter::from_fn(|| spare.try_recv().ok())
        .map(|b| b.capacity())
        .collect();
    assert!(!kept.is_empty());
    assert!(kept.iter().all(|&c| c >= PagesFrame::BUFFER), "{kept:?}");
    drop(out);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A page off the wire: (section, address, data, what its frame's CRCs covered).
type PageOff = (u32, u64, Vec<u8>, Checked);

/// Reads PAGES frames off `s`, from `after` on, until END or COMPLETE, every CRC
/// checked (each page's own where the frame carries them).
fn pages_off(mut s: UnixStream, after: Duration) -> std::thread::JoinHandle<Vec<PageOff>> {
    std::thread::spawn(move || {
        std::thread::sleep(after);
        let mut got = Vec::new();
        let mut buf = Vec::new();
        loop {
            let h = wire::read_header(&mut s).unwrap();
            match wire::read_payload(&mut s, &h, &mut buf) {
                Ok(Frame::Pages {
                    section,
                    addrs,
                    data,
                }) => {
                    for (i, a) in addrs.iter().enumerate() {
                        let d = data[i * PAGE_SIZE..(i + 1) * PAGE_SIZE].to_vec();
                        got.push((section, *a, d, h.checked));
                    }
                }
                Ok(Frame::End(_) | Frame::Complete(_)) => return got,
                Ok(_) => {}
                Err(e) => panic!("{e}"),
            }
        }
    })
}

/// Pages `range` of `whole` (page i at address i * PAGE_SIZE) handed to `k` in place.
fn pages_in_place(
    k: &mut SectionSink<'_>,
    whole: &vm_memory::VolatileSlice<'_>,
    range: Range<usize>,
) {
    let addrs: Vec<u64> = range.clone().map(|p| (p * PAGE_SIZE) as u64).collect();
    let pages: Vec<_> = range
        .map(|p| whole.subslice(p * PAGE_SIZE, PAGE_SIZE).unwrap())
        .collect();
    k.pages_in_place(&addrs, &pages).unwrap();
}

/// On sockets every lane takes pages in place, whoever checks them.
#[test]
fn pages_go_in_place_on_every_lane_of_sockets() {
    let sinks = |checks| {
        let (mut out, _m, _l) = two_lanes(checks);
        let cancel = AtomicBool::new(false);
        let spread = out.sink(0, &cancel).in_place();
        let main = out.routed(0, &cancel, Route::Main).in_place();
        (spread, main)
    };
    assert_eq!(sinks(PageChecks::Crc), (true, true));
    assert_eq!(sinks(PageChecks::Transport), (true, true));
}

/// Pages in place go to the lane their address chunk says, the main one written
/// at once and the other by its writer thread; once the sink has settled, the
/// memory may change and what went is what was there when it was handed over, with
/// a CRC of each page unless the transport checks them.
#[test]
fn pages_in_place_go_on_every_lane_and_are_written_once_settled() {
    for (checks, checked) in [
        (PageChecks::Crc, Checked::Pages),
        (PageChecks::Transport, Checked::Head),
    ] {
        pages_in_place_on_two_lanes(checks, checked);
    }
}

fn pages_in_place_on_two_lanes(checks: PageChecks, checked: Checked) {
    let (mut out, main_peer, lane_peer) = two_lanes(checks);
    // The second lane's reader comes late: its writer is still blocked, pages in
    // hand, when the main lane is done, and the sink must wait for it to settle.
    let on_main = pages_off(main_peer, Duration::ZERO);
    let on_lane = pages_off(lane_peer, Duration::from_millis(200));
    let cancel = AtomicBool::new(false);
    // A chunk on the main lane, then 200 pages on the other: batches of 60 cross
    // from one to the other, and the second lane's four frames all fit its queue
    // (the sink never waits for that writer, which its socket blocks).
    let n = CHUNK_PAGES as usize + 200;
    let mut mem = vec![0u8; n * PAGE_SIZE];
    for (i, p) in mem.chunks_mut(PAGE_SIZE).enumerate() {
        p.fill(i as u8 ^ 0x5a);
        p[..8].copy_from_slice(&(i as u64).to_le_bytes());
    }
    {
        let whole = vm_memory::VolatileSlice::from(&mut mem[..]);
        let mut k = out.sink(2, &cancel);
        assert!(k.in_place());
        let mut at = 0;
        while at < n {
            // Batches of 60 pages straddle the 512-page chunks.
            let to = (at + 60).min(n);
            pages_in_place(&mut k, &whole, at..to);
            at = to;
        }
        k.settle().unwrap();
    }
    // Settled: nothing reads the memory any more.
    mem.fill(0xee);
    out.complete().unwrap();
    drop(out);
    let (on_main, on_lane) = (on_main.join().unwrap(), on_lane.join().unwrap());
    assert!(!on_lane.is_empty(), "the second lane carried pages");
    let chunk = |a: u64| a / PAGE_SIZE as u64 / CHUNK_PAGES + 2;
    assert!(on_main.iter().all(|p| chunk(p.1) % 2 == 0));
    assert!(on_lane.iter().all(|p| chunk(p.1) % 2 == 1));
    assert!(
        on_main.iter().chain(&on_lane).all(|p| p.3 == checked),
        "{checks:?}"
    );
    let mut all: Vec<_> = on_main.into_iter().chain(on_lane).collect();
    all.sort_by_key(|p| p.1);
    assert_eq!(all.len(), n);
    for (i, (section, a, d, _)) in all.iter().enumerate() {
        assert_eq!((*section, *a), (2, (i * PAGE_SIZE) as u64));
        assert_eq!(u64::from_le_bytes(d[..8].try_into().unwrap()), i as u64);
        assert!(d[8..].iter().all(|&b| b == i as u8 ^ 0x5a), "page {i}");
    }
}

/// Post-copy's background takes the connections a frame at a time: the first 2 MiB of a
/// memory, which pre-copy's spread gives to one, reaches both, frames alternating.
#[test]
fn the_background_takes_the_connections_a_frame_at_a_time() {
    let (mut out, main_peer, lane_peer) = two_lanes(PageChecks::Crc);
    let (on_main, on_lane) = (
        pages_off(main_peer, Duration::ZERO),
        pages_off(lane_peer, Duration::ZERO),
    );
    let cancel = AtomicBool::new(false);
    let n = CHUNK_PAGES as usize;
    let mut mem = vec![7u8; n * PAGE_SIZE];
    {
        let whole = vm_memory::VolatileSlice::from(&mut mem[..]);
        let mut k = out.routed(0, &cancel, Route::Frames);
        assert!(k.in_place());
        for at in (0..n).step_by(wire::PAGES_PER_FRAME) {
            let to = at + wire::PAGES_PER_FRAME;
            pages_in_place(&mut k, &whole, at..to);
        }
        k.settle().unwrap();
    }
    out.complete().unwrap();
    drop(out);
    let frame = |p: &PageOff| p.1 / PAGE_SIZE as u64 / wire::PAGES_PER_FRAME as u64;
    let (on_main, on_lane) = (on_main.join().unwrap(), on_lane.join().unwrap());
    assert_eq!((on_main.len(), on_lane.len()), (n / 2, n / 2));
    assert!(on_main.iter().all(|p| frame(p) % 2 == 0));
    assert!(on_lane.iter().all(|p| frame(p) % 2 == 1));
}

/// Post-copy's background: pages of a memory that no longer changes go in place on the
/// connections but the main one, each frame holding what keeps that memory mapped
/// until it is written; the sender never waits for a writer, and what arrives is the
/// memory, checked page by page, after the sender has let go of it.
#[test]
fn background_pages_go_in_place_holding_their_memory_until_written() {
    let (mut out, _main_peer, lane_peer) = two_lanes(PageChecks::Crc);
    let mut bg = out.split_background().unwrap();
    // The reader comes late: every frame is still queued when the sender is done.
    let on_lane = pages_off(lane_peer, Duration::from_millis(200));
    let n = 3 * 64;
    let mem: Arc<Vec<u8>> = Arc::new(
        (0..n * PAGE_SIZE)
            .map(|i| (i / PAGE_SIZE) as u8 ^ 0x3c)
            .collect(),
    );
    let kept: Kept = mem.clone();
    let cancel = AtomicBool::new(false);
    {
        let mut k = bg.sink(1, &cancel);
        assert!(k.in_place());
        for f in 0..3 {
            let addrs: Vec<u64> = (f * 64..(f + 1) * 64)
                .map(|p| (p * PAGE_SIZE) as u64)
                .collect();
            let pages: Vec<_> = (f * 64..(f + 1) * 64)
                .map(|p| {
                    // SAFETY: a page of `mem`, which `kept` keeps; only read.
                    unsafe {
                        vm_memory::VolatileSlice::new(
                            mem.as_ptr().add(p * PAGE_SIZE) as *mut u8,
                            PAGE_SIZE,
                        )
                    }
                })
                .collect();
            k.pages_kept(&addrs, &pages, &kept).unwrap();
        }
    }
    // Handed over, not written: the frames hold the memory.
    assert!(
        Arc::strong_count(&mem) > 2,
        "the frames let go of the memory"
    );
    drop(kept);
    bg.complete().unwrap();
    drop(bg);
    assert_eq!(Arc::strong_count(&mem), 1, "a frame still holds the memory");
    let got = on_lane.join().unwrap();
    assert_eq!(got.len(), n);
    for (i, (section, a, d, checked)) in got.iter().enumerate() {
        assert_eq!(
            (*section, *a, *checked),
            (1, (i * PAGE_SIZE) as u64, Checked::Pages)
        );
        assert!(d.iter().all(|&b| b == i as u8 ^ 0x3c), "page {i}");
    }
}

/// A sender waiting for room is woken by the writer as its queue goes down, or as it
/// ends, not by the end of its wait.
#[test]
fn waiting_for_room_ends_when_a_writer_takes_a_frame_or_ends() {
    for peer_fails in [false, true] {
        let (mut out, _main_peer, mut lane_peer) = two_lanes(PageChecks::Crc);
        let mut bg = out.split_background().unwrap();
        let cancel = AtomicBool::new(false);
        // Frames until the writer, blocked on a peer that reads nothing yet, has no room.
        let mut p = 0u64;
        while bg.room() {
            let mut k = bg.sink(0, &cancel);
            for _ in 0..64 {
                k.slot(p * 4096).fill(7);
                k.page().unwrap();
                p += 1;
            }
        }
        let peer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            if peer_fails {
                drop(lane_peer);
            } else {
                io::copy(&mut lane_peer, &mut io::sink()).unwrap();
            }
        });
        let t = Instant::now();
        bg.wait_room(Duration::from_secs(60));
        assert!(bg.room(), "woken without room");
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "not woken: the wait ran out"
        );
        drop(bg);
        drop(out);
        peer.join().unwrap();
    }
}

/// A writer whose connection failed is settled at once, with its error, and never
/// touches the pages afterwards.
#[test]
fn settling_a_lane_whose_connection_failed_brings_its_error() {
    let (mut out, _main_peer, lane_peer) = two_lanes(PageChecks::Transport);
    drop(lane_peer);
    let cancel = AtomicBool::new(false);
    let mut mem = vec![1u8; 2 * PAGE_SIZE];
    let whole = vm_memory::VolatileSlice::from(&mut mem[..]);
    let mut k = out.sink(0, &cancel);
    // Section 0's second chunk goes on the second lane.
    let a = CHUNK_PAGES * PAGE_SIZE as u64;
    let pages = [whole.subslice(0, PAGE_SIZE).unwrap()];
    // The frame may be handed over before the writer has found out.
    let handed = k.pages_in_place(&[a], &pages);
    let settled = k.settle();
    let e = handed.and(settled).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::BrokenPipe, "{e}");
}

/// A writer whose lane copies its pages (TLS) has its buffers touched by the time it
/// is ready; one whose lane takes them in place touches none: its sender makes them as
/// copies first need them, never more than `SPARE` (see
/// `copied_frames_wait_for_a_buffer_rather_than_fill_the_queue`).
#[test]
fn once_ready_a_copying_writer_has_its_buffers_and_an_in_place_one_none() {
    let (s, _peer) = UnixStream::pair().unwrap();
    let (tx, rx) = sync_channel(QUEUE);
    let (spare_tx, spare) = sync_channel(SPARE);
    let (ready_tx, ready) = sync_channel(1);
    let room = Arc::new(Room::default());
    let t = std::thread::spawn(move || {
        writer(
            Stream::Unix(s),
            rx,
            spare_tx,
            SPARE,
            Arc::default(),
            ready_tx,
            room,
        )
    });
    // Its id, and then closed, once ready.
    let tid = ready.recv_timeout(Duration::from_secs(60)).unwrap();
    assert_ne!(tid, crate::nice::this_thread());
    assert_eq!(
        ready.recv_timeout(Duration::from_secs(60)),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected)
    );
    assert_eq!(std::iter::from_fn(|| spare.try_recv().ok()).count(), SPARE);
    drop(tx);
    t.join().unwrap().unwrap();

    let (mut out, _main_peer, _lane_peer) = two_lanes(PageChecks::Crc);
    out.ready();
    let Io::Thread { spare, made, .. } = &out.lanes[1].io else {
        panic!("the second lane has a writer thread");
    };
    assert_eq!((spare.try_recv().ok(), *made), (None, 0));
    // One writer, the second lane's (the main one is written by the sending thread).
    let tids = out.writer_tids();
    assert_eq!(tids.len(), 1);
    assert_ne!(tids[0], crate::nice::this_thread());
}

#[test]
fn a_lane_whose_connection_failed_has_room_and_its_next_frame_brings_the_error() {
    let (main, _main_peer) = UnixStream::pair().unwrap();
    // Its peer never reads: the writer blocks with frames queued, then gives up.
    let (lane, _lane_peer) = UnixStream::pair().unwrap();
    lane.set_write_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut out = Outbound::new(
        vec![Stream::Unix(main), Stream::Unix(lane)],
        None,
        Arc::default(),
    )
    .unwrap();
    let mut bg = out.split_background().unwrap();
    let cancel = AtomicBool::new(false);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut p = 0u64;
    let e = loop {
        assert!(
            Instant::now() < deadline,
            "the lane neither had room again nor failed"
        );
        if !bg.room() {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        let mut k = bg.sink(0, &cancel);
        k.slot(p * 4096).fill(1);
        p += 1;
        if let Err(e) = k.page() {
            break e;
        }
    };
    assert_eq!(e.kind(), io::ErrorKind::WouldBlock, "{e}");
}

/// Frames copied into buffers stay bounded by the writer's buffers, however deep the
/// queue that pages in place use: once all are on their way, the sending thread waits
/// for one to come back instead of filling fresh memory.
#[test]
fn copied_frames_wait_for_a_buffer_rather_than_fill_the_queue() {
    let (mut out, _main_peer, mut lane_peer) = two_lanes(PageChecks::Crc);
    out.ready();
    let Io::Thread { queued, .. } = &out.lanes[1].io else {
        panic!("the second lane has a writer thread");
    };
    let queued = queued.clone();
    let most = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    // The peer reads nothing for a while (the writer blocks on its first frame and the
    // queue fills as far as it will), then everything.
    let reader = std::thread::spawn({
        let (queued, most, done) = (queued.clone(), most.clone(), done.clone());
        move || {
            let until = Instant::now() + Duration::from_millis(300);
            while Instant::now() < until {
                most.fetch_max(queued.load(Ordering::Relaxed), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(1));
            }
            done.store(true, Ordering::Relaxed);
            io::copy(&mut lane_peer, &mut io::sink()).unwrap();
        }
    });
    let cancel = AtomicBool::new(false);
    {
        let mut k = out.sink(0, &cancel);
        // Odd 512-page chunks go on the second lane: 64 frames of 64 pages.
        for c in (1..16u64).step_by(2) {
            for p in 0..CHUNK_PAGES {
                k.slot((c * CHUNK_PAGES + p) * PAGE_SIZE as u64)
                    .fill(p as u8);
                k.page().unwrap();
            }
        }
    }
    assert!(
        done.load(Ordering::Relaxed),
        "the sender waited for the peer"
    );
    out.complete().unwrap();
    drop(out);
    reader.join().unwrap();
    let most = most.load(Ordering::Relaxed);
    assert!(most > 0 && most <= SPARE as u64, "{most} frames queued");
}
