//! The sending side of a migration stream: one lane per connection. The main
//! connection is written by the thread that sends (its control frames are on the
//! switchover's critical path, where a hand-off to another thread costs a wake-up);
//! each extra connection has a writer thread that owns its socket, so several
//! connections carry pages at once. A cancel interrupts a blocked write by shutting
//! the socket down. Pages go to a lane chosen by their address (a 2 MiB chunk of a
//! section always travels on the same connection, so TCP's ordering keeps a page's
//! newest copy last); everything else (states, data streams, COMPLETE, GO) goes on the
//! main lane, in order.
//!
//! On sockets (TCP, Unix), a pre-copy round's pages go from guest memory to every
//! connection with no copy of godwit's own (`Sink::pages_in_place`): a writer thread
//! gets where the pages are, takes each page's CRC there (unless the transport checks
//! the data, `--page-checks transport`) and writes them, and the component's read
//! waits at its end until each writer is done with them (`Sink::settle`). So the
//! reading of every page, for its CRC and for the kernel's copy, is spread over the
//! connections' threads, as QEMU's multifd channels spread theirs. Post-copy's
//! background, whose memory no longer changes and whose pages each go once, sends
//! them in place too, a frame at a time between requests, on each of its connections
//! in turn (`Route::Frames`).

use crate::nice::Tid;
use crate::transport::{PageRuns, Stream};
use crate::wire::{self, Checked, Frame, PageChecks, PagesFrame, Totals, PAGE_SIZE};
use godwit_vmm::migratable::{Kept, Sink};
use std::io::{self, Write};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

mod sink;
pub use sink::{Route, SectionSink};

/// Pages per chunk of a section's address space given to one connection.
const CHUNK_PAGES: u64 = 512;
/// Frames queued per lane before the reader waits for its writer. Pages in place are
/// only where they lie, so a deep queue costs nothing and lets the writer go on while
/// the sending thread writes the main connection's share itself: with 4, on a host
/// with cores to spare, the writer sat idle for that long and the sending thread
/// waited for it in turn (docs/benchmarks.md, "On a host with cores to spare").
const QUEUE: usize = 16;
/// Frame buffers a writer keeps for its lane (one being filled, four queued, one
/// being written); once all are on their way, the sending thread waits for one to
/// come back rather than touch fresh memory (see `frame_buffer`).
const SPARE: usize = 6;
/// The longest a sender waits for a writer thread to get ready.
const READY_WAIT: Duration = Duration::from_secs(2);

/// A buffer for a PAGES frame, its memory already touched. Frames reuse their
/// buffers; one allocated while pages flow lands on memory the kernel has not handed
/// out yet, whose first touch is slow on a host that takes free memory back (free page
/// reporting, as this one does): 180-760 us for one 64-page frame, against 30 us in a
/// buffer in use (traced). In post-copy that was the first answers to a touch.
fn frame_buffer() -> Vec<u8> {
    // Not zeros: zeroed memory from the allocator may be memory not yet touched.
    vec![0xa5; PagesFrame::BUFFER]
}

/// Whether a written buffer is worth keeping: a frame buffer, not a control frame's.
fn reusable(buf: &Vec<u8>) -> bool {
    buf.capacity() >= PagesFrame::BUFFER
}

enum Msg {
    Data(Vec<u8>, Range<usize>),
    /// A PAGES frame whose pages go from where they are in memory: mapped until the
    /// sender's next `settle` returns, which waits for this to be written.
    InPlace(InPlaceFrame),
    /// Flush (and for a file, make durable), then answer.
    Sync(SyncSender<io::Result<()>>),
}

/// Pages that go from where they are in memory, checked by the transport
/// (`Checked::Head`) or by a CRC of each that the writer takes (`Checked::Pages`).
struct InPlaceFrame {
    section: u32,
    addrs: Vec<u64>,
    runs: PageRuns,
    checked: Checked,
    /// What keeps the pages mapped until this frame is written and dropped, where the
    /// sender does not settle (`Sink::pages_kept`).
    _kept: Option<Kept>,
}

enum Io {
    /// Written by the sending thread itself.
    Direct(Stream),
    Thread {
        tx: Option<SyncSender<Msg>>,
        /// Buffers the writer has finished with.
        spare: Receiver<Vec<u8>>,
        thread: Option<JoinHandle<io::Result<()>>>,
        /// Frames handed to the writer and not yet written.
        queued: Arc<AtomicU64>,
        /// The writer's thread id, sent once its buffers are ready (`Outbound::ready`).
        ready: Option<Receiver<Tid>>,
        /// That id, once it came (`Outbound::writer_tids`).
        tid: Option<Tid>,
        /// Buffers put in circulation on this lane so far (at most `SPARE`).
        made: usize,
    },
}

struct Lane {
    io: Io,
    /// A buffer written and free again (direct lanes).
    recycled: Option<Vec<u8>>,
    frame: PagesFrame,
    zeros: Vec<(u64, u32)>,
    zero_section: u32,
    totals: Totals,
    /// What the CRCs of the PAGES frames it builds cover: all of a frame, its head (the
    /// transport's own checks suffice) or its head and each page apart (files).
    checked: Checked,
    /// Whether it may take pages straight from memory (`Stream::write_pages`), and how
    /// their data is checked then: by the transport (`Head`) or by a CRC of each page
    /// taken as it goes (`Pages`).
    in_place: Option<Checked>,
    /// Pages handed to its writer thread in place since the last `settle`.
    unsettled: bool,
}

/// Keeps the lanes of one migration under `rate` bytes per second, together (post-copy's
/// two halves too: they count into one `sent`).
struct Limiter {
    rate: Option<u64>,
    start: Instant,
    sent: Arc<AtomicU64>,
    /// Whether sending waits here; else the caller waits `due` itself (post-copy
    /// does, listening for requests meanwhile, which then go first).
    wait: bool,
}

impl Limiter {
    fn account(&mut self, bytes: usize) {
        if self.rate.is_none() {
            return;
        }
        self.sent.fetch_add(bytes as u64, Ordering::Relaxed);
        let d = self.due();
        if self.wait && !d.is_zero() {
            std::thread::sleep(d);
        }
    }

    /// How long until the cap allows more.
    fn due(&self) -> Duration {
        let Some(rate) = self.rate else {
            return Duration::ZERO;
        };
        let sent = self.sent.load(Ordering::Relaxed);
        let due = self.start + Duration::from_secs_f64(sent as f64 / rate as f64);
        due.saturating_duration_since(Instant::now())
    }
}

pub struct Outbound {
    lanes: Vec<Lane>,
    limiter: Limiter,
    /// Bytes handed to the lanes (progress reports read it while the stream runs).
    pub live: Arc<AtomicU64>,
    pub bytes: u64,
    checks: PageChecks,
    /// Nudged by the writers as their queues go down (`wait_room`).
    room: Arc<Room>,
}

/// Where a sender that must not block in a send (post-copy's background, which hears
/// requests between frames) waits for the writers to take more: each nudges it as its
/// queue goes below `ROOM` frames, or as it ends. The background's thread used to
/// sleep 50 us at a time and look again: 2,600 wake-ups in a 1 GiB post-copy whose
/// frames went in place (traced), each costing CPU the guest and both ends share.
#[derive(Default)]
struct Room {
    lock: Mutex<()>,
    cv: Condvar,
}

impl Room {
    fn nudge(&self) {
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.cv.notify_all();
    }
}

/// Frames a lane may have queued and still have room (`Outbound::room`).
const ROOM: u64 = 2;

fn writer(
    s: Stream,
    rx: Receiver<Msg>,
    spare: SyncSender<Vec<u8>>,
    touched: usize,
    queued: Arc<AtomicU64>,
    ready: SyncSender<Tid>,
    room: Arc<Room>,
) -> io::Result<()> {
    let written = || {
        if queued.fetch_sub(1, Ordering::Relaxed) <= ROOM {
            room.nudge();
        }
    };
    let r = write_all(s, rx, spare, touched, ready, written);
    // A writer that ended has room (its next frame brings the error), and a sender
    // woken now must see that before this thread is seen to have finished: woken by
    // the nudge alone, it found the frames still counted and the thread still running,
    // and waited on (seen with the suite beside a busy core).
    queued.store(0, Ordering::Relaxed);
    room.nudge();
    r
}

fn write_all(
    mut s: Stream,
    rx: Receiver<Msg>,
    spare: SyncSender<Vec<u8>>,
    touched: usize,
    ready: SyncSender<Tid>,
    written: impl Fn(),
) -> io::Result<()> {
    // Here, not in the sending thread: the connection is set up meanwhile.
    for _ in 0..touched {
        let _ = spare.try_send(frame_buffer());
    }
    let _ = ready.try_send(crate::nice::this_thread());
    drop(ready);
    while let Ok(m) = rx.recv() {
        match m {
            Msg::Data(buf, r) => {
                s.write_all(&buf[r])?;
                written();
                if reusable(&buf) {
                    let _ = spare.try_send(buf);
                }
            }
            Msg::InPlace(f) => {
                // SAFETY (both): the pages stay mapped while this frame lives: the
                // frame holds what keeps them mapped (`_kept`), or the sender keeps
                // them until its `settle`, which returns only once this thread has
                // answered a `Sync` queued after this frame, or has ended.
                let crcs = (f.checked == Checked::Pages).then(|| unsafe { f.runs.page_crcs() });
                let head = wire::pages_head(f.section, &f.addrs, crcs.as_deref());
                unsafe { s.write_runs(&head, &f.runs) }?;
                written();
            }
            Msg::Sync(reply) => {
                let r = s.finish();
                let failed = r.is_err();
                let _ = reply.send(r);
                if failed {
                    return Err(io::Error::other("flush failed"));
                }
            }
        }
    }
    Ok(())
}

/// The CRC32 of each page as it is now in guest memory, read where it is (the guest
/// may be writing it: a page that changes before the transport has copied it arrives
/// failing its CRC, and is sent again, the write having made it dirty). The read brings
/// the page into cache for the transport's copy that follows.
fn pages_crcs(pages: &[vm_memory::VolatileSlice<'_>]) -> Vec<u32> {
    pages.iter().map(crate::inplace::crc_in_place).collect()
}

impl Outbound {
    /// Lanes over `streams` (the main connection first), every page checked by CRC.
    pub fn new(
        streams: Vec<Stream>,
        rate: Option<u64>,
        live: Arc<AtomicU64>,
    ) -> io::Result<Outbound> {
        Outbound::checked_by(streams, rate, live, PageChecks::Crc)
    }

    /// Lanes over `streams`, page data checked as `checks` says.
    pub fn checked_by(
        streams: Vec<Stream>,
        rate: Option<u64>,
        live: Arc<AtomicU64>,
        checks: PageChecks,
    ) -> io::Result<Outbound> {
        let mut out = Outbound {
            checks,
            lanes: Vec::new(),
            limiter: Limiter {
                rate,
                start: Instant::now(),
                sent: Arc::default(),
                wait: true,
            },
            live,
            bytes: 0,
            room: Arc::default(),
        };
        for s in streams {
            out.add_lane(s)?;
        }
        Ok(out)
    }

    /// Whether pages go from memory to the main connection with no copy, and who
    /// checks their data.
    pub fn in_place(&self) -> Option<Checked> {
        self.lanes.first().and_then(|l| l.in_place)
    }

    /// One more connection: the first is written directly, the others by a writer
    /// thread each.
    pub fn add_lane(&mut self, s: Stream) -> io::Result<()> {
        let transport = self.checks == PageChecks::Transport && s.checks_in_transit();
        let checked = if transport {
            Checked::Head
        } else if matches!(s, Stream::File(_)) {
            // A snapshot file's pages each carry their CRC: a lazy restore's touch reads
            // and checks its own page, not the 256 KiB frame around it.
            Checked::Pages
        } else {
            Checked::All
        };
        // On a lane with a writer thread, that thread reads the pages (for their CRCs
        // and the kernel's copy) after the sink has handed them over, before the
        // component's read returns (`Sink::settle`). On a host of two cores this went
        // no faster than frames copied by the sending thread; with cores to spare the
        // sending thread, which read every page of every lane, was what limited the
        // rate (docs/benchmarks.md, "On a host with cores to spare").
        let in_place = s.writes_in_place().then_some(match checked {
            Checked::Head => Checked::Head,
            _ => Checked::Pages,
        });
        // A writer's lane that takes pages in place copies only what cannot go so (VRAM
        // in post-copy): its buffers are made, untouched, as first needed. Touching six
        // up front took 0.9-5.7 ms of a post-copy's setup here, the sender waiting.
        let lazy = !self.lanes.is_empty() && in_place.is_some();
        let touched = if lazy { 0 } else { SPARE };
        let io = if self.lanes.is_empty() {
            Io::Direct(s)
        } else {
            let (tx, rx) = sync_channel(QUEUE);
            let (spare_tx, spare) = sync_channel(SPARE);
            let queued = Arc::new(AtomicU64::new(0));
            let q = queued.clone();
            let (ready_tx, ready) = sync_channel(1);
            let room = self.room.clone();
            let thread = std::thread::Builder::new()
                .name(format!("migration-send{}", self.lanes.len()))
                .spawn(move || writer(s, rx, spare_tx, touched, q, ready_tx, room))?;
            Io::Thread {
                tx: Some(tx),
                spare,
                thread: Some(thread),
                queued,
                ready: Some(ready),
                tid: None,
                made: touched,
            }
        };
        let recycled = matches!(io, Io::Direct(_)).then(frame_buffer);
        let first = if lazy { Vec::new() } else { frame_buffer() };
        self.lanes.push(Lane {
            io,
            recycled,
            frame: PagesFrame::with_buffer(first),
            zeros: Vec::new(),
            zero_section: 0,
            totals: Totals::default(),
            checked,
            in_place,
            unsettled: false,
        });
        Ok(())
    }

    /// Returns once every writer thread has its buffers (their first touch costs up to
    /// a millisecond a frame on a host that takes free memory back). A post-copy stops
    /// the VM right after its connections open, and the writers, filling theirs on
    /// both cores, kept the vCPU that was to park from running: 2 to 5 ms of pause
    /// (traced, 4 GiB).
    pub fn ready(&mut self) {
        for l in &mut self.lanes {
            if let Io::Thread { ready, tid, .. } = &mut l.io {
                if let Some(r) = ready.take() {
                    // Its id when ready (closed instead if the writer ended).
                    *tid = r.recv_timeout(READY_WAIT).ok();
                }
            }
        }
    }

    /// The writer threads that were ready (`ready`).
    pub fn writer_tids(&self) -> Vec<Tid> {
        self.lanes
            .iter()
            .filter_map(|l| match l.io {
                Io::Thread { tid, .. } => tid,
                Io::Direct(_) => None,
            })
            .collect()
    }

    /// The error that ended lane `i`'s writer thread.
    fn lane_error(&mut self, i: usize) -> io::Error {
        let Io::Thread { tx, thread, .. } = &mut self.lanes[i].io else {
            return io::Error::other("the connection failed");
        };
        *tx = None;
        match thread.take().map(|t| t.join()) {
            Some(Ok(Err(e))) => e,
            Some(Err(_)) => io::Error::other("a sender thread failed"),
            _ => io::Error::new(io::ErrorKind::BrokenPipe, "the connection is closed"),
        }
    }

    fn send(&mut self, i: usize, buf: Vec<u8>, r: Range<usize>) -> io::Result<()> {
        let n = r.len();
        let lane = &mut self.lanes[i];
        match &mut lane.io {
            Io::Direct(s) => {
                s.write_all(&buf[r])?;
                if reusable(&buf) {
                    lane.recycled = Some(buf);
                }
            }
            Io::Thread { tx, queued, .. } => {
                queued.fetch_add(1, Ordering::Relaxed);
                let sent = tx
                    .as_ref()
                    .is_some_and(|t| t.send(Msg::Data(buf, r)).is_ok());
                if !sent {
                    return Err(self.lane_error(i));
                }
            }
        }
        self.bytes += n as u64;
        self.live.fetch_add(n as u64, Ordering::Relaxed);
        self.limiter.account(n);
        Ok(())
    }

    /// Pages of `section` straight from memory, after whatever lane `i` held back:
    /// written before this returns on the main lane, before the next `settle` on one
    /// with a writer thread, or whenever its writer comes to them where `kept` keeps
    /// them mapped (the frame holds it until then). Only on a lane that takes them in
    /// place.
    fn send_in_place(
        &mut self,
        i: usize,
        section: u32,
        addrs: &[u64],
        pages: &[vm_memory::VolatileSlice<'_>],
        kept: Option<&Kept>,
    ) -> io::Result<()> {
        self.flush_pages(i)?;
        let lane = &mut self.lanes[i];
        let Some(checked) = lane.in_place else {
            return Err(io::Error::other(
                "pages in place on a lane that cannot take them",
            ));
        };
        let n = wire::pages_frame_len(addrs.len(), checked);
        match &mut lane.io {
            Io::Direct(s) => {
                let crcs = (checked == Checked::Pages).then(|| pages_crcs(pages));
                let head = wire::pages_head(section, addrs, crcs.as_deref());
                s.write_pages(&head, pages)?
            }
            Io::Thread { tx, queued, .. } => {
                let f = InPlaceFrame {
                    section,
                    addrs: addrs.to_vec(),
                    runs: PageRuns::new(pages.iter().map(|p| (p.ptr_guard().as_ptr(), p.len()))),
                    checked,
                    _kept: kept.cloned(),
                };
                queued.fetch_add(1, Ordering::Relaxed);
                lane.unsettled |= kept.is_none();
                let sent = tx.as_ref().is_some_and(|t| t.send(Msg::InPlace(f)).is_ok());
                if !sent {
                    return Err(self.lane_error(i));
                }
            }
        }
        self.lanes[i].totals.pages += addrs.len() as u64;
        self.bytes += n as u64;
        self.live.fetch_add(n as u64, Ordering::Relaxed);
        self.limiter.account(n);
        Ok(())
    }

    /// Returns once every page handed to a writer thread in place has been written
    /// (or its writer has ended): the memory they are in may change hands after.
    fn settle(&mut self) -> io::Result<()> {
        let mut first_error = None;
        for i in 0..self.lanes.len() {
            if !std::mem::take(&mut self.lanes[i].unsettled) {
                continue;
            }
            let Io::Thread { tx, .. } = &self.lanes[i].io else {
                continue;
            };
            let (rtx, rx) = sync_channel(1);
            let asked = tx.as_ref().is_some_and(|t| t.send(Msg::Sync(rtx)).is_ok());
            // An answer, or the writer gone (the reply's sender dropped with it):
            // either way it no longer reads the pages.
            let r = if asked { rx.recv().ok() } else { None };
            let r = match r {
                Some(r) => r,
                None => Err(self.lane_error(i)),
            };
            if let Err(e) = r {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn spare(&mut self, i: usize) -> Vec<u8> {
        let lane = &mut self.lanes[i];
        match &mut lane.io {
            Io::Direct(_) => lane.recycled.take(),
            Io::Thread { spare, made, .. } => match spare.try_recv() {
                Ok(b) => Some(b),
                // One more while fewer are in circulation (it grows in the frame).
                Err(TryRecvError::Empty) if *made < SPARE => {
                    *made += 1;
                    None
                }
                // None back when the writer has ended: its error comes with the next
                // send.
                Err(_) => spare.recv().ok(),
            },
        }
        .unwrap_or_default()
    }

    fn flush_pages(&mut self, i: usize) -> io::Result<()> {
        // Nothing to send: the spare buffer stays where it is.
        if self.lanes[i].frame.is_empty() {
            return Ok(());
        }
        let next = self.spare(i);
        let checked = self.lanes[i].checked;
        if let Some((buf, r)) = self.lanes[i].frame.take(next, checked) {
            self.send(i, buf, r)?;
        }
        Ok(())
    }

    fn flush_zeros(&mut self, i: usize) -> io::Result<()> {
        let lane = &mut self.lanes[i];
        if lane.zeros.is_empty() {
            return Ok(());
        }
        let f = Frame::Zero {
            section: lane.zero_section,
            runs: std::mem::take(&mut lane.zeros),
        };
        let mut out = Vec::new();
        wire::write_frame(&mut out, &f)?;
        let n = out.len();
        self.send(i, out, 0..n)
    }

    /// Sends whatever the lanes hold back.
    pub fn flush(&mut self) -> io::Result<()> {
        for i in 0..self.lanes.len() {
            self.flush_pages(i)?;
            self.flush_zeros(i)?;
        }
        Ok(())
    }

    /// The end of a round: SYNC `n` on every connection, after everything before it.
    pub fn round_end(&mut self, n: u64) -> io::Result<()> {
        self.flush()?;
        let mut out = Vec::new();
        wire::write_frame(&mut out, &Frame::Sync(n))?;
        for i in 0..self.lanes.len() {
            let len = out.len();
            self.send(i, out.clone(), 0..len)?;
        }
        Ok(())
    }

    /// A frame on the main connection, after everything before it.
    pub fn control(&mut self, f: &Frame) -> io::Result<()> {
        self.flush_pages(0)?;
        self.flush_zeros(0)?;
        let mut out = Vec::new();
        wire::write_frame(&mut out, f)?;
        let n = out.len();
        self.send(0, out, 0..n)
    }

    /// Waits until every lane has written (and for a file, made durable) all it was
    /// given.
    pub fn sync(&mut self) -> io::Result<()> {
        let mut replies = Vec::new();
        for i in 0..self.lanes.len() {
            match &mut self.lanes[i].io {
                Io::Direct(s) => s.finish()?,
                Io::Thread { tx, .. } => {
                    let (rtx, rx) = sync_channel(1);
                    if tx.as_ref().is_none_or(|t| t.send(Msg::Sync(rtx)).is_err()) {
                        return Err(self.lane_error(i));
                    }
                    replies.push((i, rx));
                }
            }
        }
        for (i, rx) in replies {
            match rx.recv() {
                Ok(r) => r?,
                Err(_) => return Err(self.lane_error(i)),
            }
        }
        Ok(())
    }

    /// The end of the page stream: END with its totals on every data connection,
    /// COMPLETE on the main one, all written.
    /// The stream is whole: a snapshot file replaces its path. Only after `complete`.
    pub fn seal(&mut self) -> io::Result<()> {
        match self.lanes.first_mut().map(|l| &mut l.io) {
            Some(Io::Direct(s)) => s.seal(),
            _ => Ok(()),
        }
    }

    pub fn complete(&mut self) -> io::Result<()> {
        self.flush()?;
        for i in 1..self.lanes.len() {
            let f = Frame::End(self.lanes[i].totals);
            let mut out = Vec::new();
            wire::write_frame(&mut out, &f)?;
            let n = out.len();
            self.send(i, out, 0..n)?;
        }
        let t = self.lanes[0].totals;
        self.control(&Frame::Complete(t))?;
        self.sync()
    }

    /// From now on sending never waits for the bandwidth cap: the caller waits `due`
    /// before it sends more, and may send what cannot wait meanwhile.
    pub fn pace_by_caller(&mut self) {
        self.limiter.wait = false;
    }

    /// Whether every connection could take another frame without waiting for its
    /// writer. A writer that stopped (its connection failed) has room, its frames no
    /// longer counted: the next frame handed to it brings its error back, where
    /// waiting for room would wait forever.
    pub fn room(&self) -> bool {
        self.lanes.iter().all(|l| match &l.io {
            Io::Thread { queued, thread, .. } => {
                queued.load(Ordering::Relaxed) < ROOM
                    || thread.as_ref().is_none_or(|t| t.is_finished())
            }
            Io::Direct(_) => true,
        })
    }

    /// Returns once `room` holds, or after `most`: a writer nudges as its queue goes
    /// down, so this sleeps until then rather than look again and again.
    pub fn wait_room(&self, most: Duration) {
        let g = self.room.lock.lock().unwrap_or_else(|e| e.into_inner());
        // Under the lock a writer takes to nudge: a frame written between this look
        // and the wait still wakes it.
        let _ = self.room.cv.wait_timeout_while(g, most, |_| !self.room());
    }

    /// Post-copy: the connections but the main one, as lanes of their own, for the
    /// background stream's thread; this keeps the main one, for the pages a touch
    /// waits for. They share the progress count and the bandwidth cap: neither half
    /// waits for the cap in a send (the background half's caller waits `due` before it
    /// reads, so never with a component's lock held), and what the main one sends
    /// makes the background wait longer. Nothing is split off when there is only the
    /// main one.
    pub fn split_background(&mut self) -> Option<Outbound> {
        if self.lanes.len() < 2 {
            return None;
        }
        // Pages go in place on them as on the main one: the memory they are read from
        // no longer changes, and each frame keeps it mapped (`Sink::pages_kept`), so a
        // read of a frame between requests waits for no writer.
        let lanes = self.lanes.split_off(1);
        Some(Outbound {
            lanes,
            limiter: Limiter {
                rate: self.limiter.rate,
                start: self.limiter.start,
                sent: self.limiter.sent.clone(),
                wait: false,
            },
            live: self.live.clone(),
            bytes: 0,
            checks: self.checks,
            room: self.room.clone(),
        })
    }

    /// How long until the bandwidth cap allows more.
    pub fn due(&self) -> Duration {
        self.limiter.due()
    }

    /// Sends what the main lane holds back (pages asked for go out at once).
    pub fn flush_main(&mut self) -> io::Result<()> {
        self.flush_pages(0)?;
        self.flush_zeros(0)
    }

    /// Stops every writer thread (after an error or a cancel), without waiting for them.
    pub fn close(&mut self) {
        for l in &mut self.lanes {
            if let Io::Thread { tx, .. } = &mut l.io {
                *tx = None;
            }
        }
    }
}

impl Drop for Outbound {
    fn drop(&mut self) {
        self.close();
        for l in &mut self.lanes {
            if let Io::Thread { thread, .. } = &mut l.io {
                if let Some(t) = thread.take() {
                    let _ = t.join();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
