//! Post-copy on the destination, once the VM runs here: the touches of missing pages
//! become requests to the source, and pages arriving either way (answers on the main
//! connection, the background stream on the others) are placed as they come. When no
//! page is missing any more, DONE tells the source it may let go; it answers RELEASED.
//!
//! Threads: one watches the components' fault descriptors and sends the requests (and
//! DONE), one reads each connection. A connection that fails pauses post-copy: the VM
//! runs on what it has, a touch of a page still missing waits, and a recovery thread
//! waiting on the listener for the source to come back (RESUME) tells it what is still
//! missing and goes on on the new connections. A link gone silent (a host or a path
//! lost without a reset) breaks no connection: the destination takes it for broken
//! once nothing has come for `SILENCE` while pages are still missing, and takes the
//! source back also while nothing broke here (the source may notice first).

use crate::transport::{Listener, Stream};
use crate::wire::{self, Done, Frame, Lacks, WireError, MAX_REQUEST};
use godwit_vmm::migratable::{Component, FaultStats, Faults, Wanted};
use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Nothing from the source for this long, while pages are still missing, means the
/// link is gone: the source pushes the rest without a break and answers a request at
/// once. As long as the source's own wait for a write to make progress, so neither
/// side gives up on a link the other still finds merely slow.
const SILENCE: Duration = Duration::from_secs(30);
/// How long after DONE the destination still takes the source back: a DONE lost with
/// the connections leaves the source paused, waiting for it, until `migrate-recover`
/// (as long as the source itself listens for a late answer).
const AFTER_DONE: Duration = Duration::from_secs(600);

/// A component filled lazily: its section index and name, and its touches.
pub(crate) struct LazyPart {
    pub section: u32,
    pub name: String,
    pub faults: Arc<dyn Faults>,
}

/// What `GET vm.migration` says of a post-copy into this VM.
#[derive(Debug, serde::Serialize)]
pub struct Incoming {
    /// Pages still at the source: until 0, the VM's state is split over two hosts and
    /// the source must stay up.
    pub pages_left: u64,
    /// Why the connections to the source broke (or were given up after `SILENCE`
    /// without a byte while pages were missing), while they are broken (until the
    /// source comes back with `migrate-recover`).
    pub paused: Option<String>,
    /// Times the source came back on new connections.
    pub recoveries: u64,
    /// What post-copy did so far, per component filled lazily.
    pub sections: std::collections::BTreeMap<String, FaultStats>,
}

/// Post-copy in progress on this destination.
pub struct PostcopyIn {
    /// The main connection's sending side: requests and DONE, whole frames one at a
    /// time.
    writer: Mutex<Stream>,
    lazy: Vec<LazyPart>,
    parts: Arc<Vec<Arc<dyn Component>>>,
    /// DONE went out: nothing more is sent.
    done: AtomicBool,
    /// The DONE that went out, told again to a source that comes back for it.
    said_done: Mutex<Option<Done>>,
    /// The source answered DONE with RELEASED: it will not come back for it.
    released: AtomicBool,
    /// Whether STARTED has gone out, and a DONE due before it. The source takes DONE
    /// only after STARTED, and with nothing (or only what the starting VM touched) to
    /// fetch, every page can be in before the VM has even started.
    gate: Mutex<(bool, Option<Done>)>,
    /// The connections in use: the n-th set since the VM started here (a recovery
    /// opens a new one; readers of older ones end quietly).
    generation: AtomicU64,
    /// Why the connections in use broke, while they are broken.
    broken: Mutex<Option<String>>,
    /// Every connection in use, shut down when they are given up.
    streams: Mutex<Vec<Stream>>,
    /// When post-copy began here, and how long after it a byte last came on the
    /// connections in use (or they were opened).
    began: Instant,
    heard_ms: AtomicU64,
}

impl PostcopyIn {
    fn send(&self, f: &Frame) -> std::io::Result<()> {
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        wire::write_frame(&mut *w, f).and_then(|_| w.finish())
    }

    /// A frame to the source on the main connection, between the requests.
    pub(crate) fn answer(&self, f: &Frame) -> std::io::Result<()> {
        self.send(f)
    }

    /// STARTED (`f`) to the source, then a DONE that was due before it.
    pub(crate) fn started(&self, f: &Frame) -> std::io::Result<()> {
        let mut g = self.gate.lock().unwrap_or_else(|e| e.into_inner());
        self.send(f)?;
        g.0 = true;
        match g.1.take() {
            Some(d) => self.send_done(d),
            None => Ok(()),
        }
    }

    fn send_done(&self, d: Done) -> std::io::Result<()> {
        *self.said_done.lock().unwrap_or_else(|e| e.into_inner()) = Some(d.clone());
        self.send(&Frame::Done(d))
    }

    fn done(&self, ended: Option<String>) -> std::io::Result<()> {
        if self.done.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let d = Done {
            sections: self.stats().collect(),
            ended,
            answer_released: true,
        };
        let mut g = self.gate.lock().unwrap_or_else(|e| e.into_inner());
        if !g.0 {
            g.1 = Some(d);
            return Ok(());
        }
        self.send_done(d)
    }

    /// The connections of generation `generation` failed: post-copy pauses until the
    /// source opens new ones (if they are still the ones in use). Whether this call
    /// paused it.
    fn broke(&self, generation: u64, why: String) -> bool {
        if self.done.load(Ordering::SeqCst) || generation != self.generation.load(Ordering::SeqCst)
        {
            return false;
        }
        let mut b = self.broken.lock().unwrap_or_else(|e| e.into_inner());
        if b.is_some() {
            return false;
        }
        tracing::error!(
            "post-copy paused: {why}; the VM runs on, whatever touches a page still at the \
             source waits for it until the source recovers (godwit migrate-recover)"
        );
        *b = Some(why);
        true
    }

    /// Something came from the source just now.
    fn heard(&self) {
        let ms = self.began.elapsed().as_millis() as u64;
        self.heard_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// Takes the connections in use for broken when nothing has come on them for
    /// `SILENCE` while pages are still missing, and shuts them down (a source that
    /// still hears this side then stops at once).
    fn check_silence(&self) {
        // Taken first: connections that a recovery opens meanwhile are not the ones
        // found silent.
        let generation = self.generation.load(Ordering::SeqCst);
        if self.done.load(Ordering::SeqCst)
            || self
                .broken
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some()
        {
            return;
        }
        let quiet = (self.began.elapsed().as_millis() as u64)
            .saturating_sub(self.heard_ms.load(Ordering::Relaxed));
        if quiet < SILENCE.as_millis() as u64 {
            return;
        }
        let left = self.left();
        if left == 0 {
            return;
        }
        let why = format!(
            "nothing came from the source for {} s while {left} pages are still there: \
             the link went silent",
            quiet / 1000
        );
        if self.broke(generation, why) {
            self.give_up_streams(Some(generation));
        }
    }

    /// Shuts down every connection in use (when `generation` says which, only if they
    /// are still those): their readers end. New ones join the list only after the
    /// generation has moved on.
    fn give_up_streams(&self, generation: Option<u64>) {
        let mut kept = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        if generation.is_some_and(|g| g != self.generation.load(Ordering::SeqCst)) {
            return;
        }
        for s in kept.drain(..) {
            s.shutdown();
        }
    }

    /// Tells a source that came back on `main` what is still missing, then RESUMED.
    fn tell_missing(&self, main: &mut Stream, wire_version: u32) -> std::io::Result<()> {
        self.lazy
            .iter()
            .try_for_each(|l| {
                let (section, missing) = (l.section, l.faults.missing());
                let f = if wire_version < 5 {
                    Frame::Postcopy { section, missing }
                } else {
                    let regions = missing.into_iter().map(Lacks::of).collect();
                    Frame::Lacks { section, regions }
                };
                wire::write_frame(&mut *main, &f)
            })
            .and_then(|_| wire::write_frame(&mut *main, &Frame::Resumed))
            .and_then(|_| main.finish())
    }

    /// A source that came back after DONE went out (it was lost with the old
    /// connections, and the source paused waiting for it): nothing is missing, and
    /// DONE again. The source answers RELEASED once it has it, then closes them.
    fn done_again(&self, mut streams: Vec<Stream>, wire_version: u32, done: Done) {
        let main = &mut streams[0];
        let told = self
            .tell_missing(main, wire_version)
            .and_then(|_| wire::write_frame(&mut *main, &Frame::Done(done)))
            .and_then(|_| main.finish());
        match told {
            Ok(()) => {
                self.generation.fetch_add(1, Ordering::SeqCst);
                tracing::warn!(
                    "post-copy: the source came back after every page was here (DONE was \
                     lost with the old connections): told it again"
                );
                // The source answers RELEASED once DONE reached it, then closes;
                // closing first could reset the connection with DONE still unread.
                let _ = main.set_read_timeout(Some(Duration::from_secs(10)));
                if let Ok(Frame::Released) = wire::read_frame(main, &mut Vec::new()) {
                    self.source_let_go();
                }
            }
            Err(e) => tracing::warn!("post-copy recovery after DONE: {e}"),
        }
    }

    /// RELEASED came: the source has DONE and will not come back for it.
    fn source_let_go(&self) {
        if !self.released.swap(true, Ordering::SeqCst) {
            tracing::debug!("post-copy: the source let go; no longer listening for it");
        }
    }

    /// The VM has ended here before all its memory arrived: the source need keep
    /// nothing.
    pub fn vm_ended(&self, why: &str) {
        if let Err(e) = self.done(Some(why.to_string())) {
            tracing::warn!("post-copy: telling the source the VM ended: {e}");
        }
    }

    /// The VM is ending before all its memory arrived: whatever waits on a page still
    /// at the source goes on, so that it can stop (`Faults::abandon`).
    pub fn abandon(&self) {
        for l in &self.lazy {
            l.faults.abandon();
        }
    }

    /// Pages still at the source.
    pub fn left(&self) -> u64 {
        self.lazy.iter().map(|l| l.faults.left()).sum()
    }

    /// What post-copy did so far, per component filled lazily.
    fn stats(&self) -> impl Iterator<Item = (String, FaultStats)> + '_ {
        self.lazy.iter().map(|l| (l.name.clone(), l.faults.stats()))
    }

    /// Where post-copy stands, for the API.
    pub fn incoming(&self) -> Incoming {
        Incoming {
            pages_left: self.left(),
            paused: self
                .broken
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            recoveries: self.generation.load(Ordering::SeqCst),
            sections: self.stats().collect(),
        }
    }

    /// Reads on `streams` (the main connection first) as generation `generation`.
    fn serve(self: &Arc<Self>, streams: Vec<Stream>, generation: u64) -> std::io::Result<()> {
        let mut kept = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        for (k, s) in streams.into_iter().enumerate() {
            if let Some(c) = s.try_clone() {
                kept.push(c);
            }
            let pc = self.clone();
            std::thread::Builder::new()
                .name(format!("postcopy-in{k}"))
                .spawn(move || {
                    // Answers to touches come on the main connection.
                    let _urgent = (k == 0)
                        .then(|| crate::priority::Urgent::fair("post-copy's placing of answers"));
                    read_pages(s, &pc, generation)
                })?;
        }
        Ok(())
    }
}

/// Waits for touches of missing pages (or pages asked for ahead of one) in any of
/// several memories: what the threads that fill them sleep on.
pub(crate) struct FaultWatch {
    fds: Vec<libc::pollfd>,
}

impl FaultWatch {
    pub(crate) fn new<'a>(faults: impl Iterator<Item = &'a dyn Faults>) -> FaultWatch {
        FaultWatch {
            fds: faults
                .flat_map(|f| [f.fd(), f.wake_fd()])
                .map(|fd| libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                })
                .collect(),
        }
    }

    /// Returns once one of them has something to take, or after `ms` milliseconds.
    pub(crate) fn wait(&mut self, ms: i32) {
        // SAFETY: `fds` is a valid array of pollfd for its whole length; poll writes
        // only their revents.
        unsafe { libc::poll(self.fds.as_mut_ptr(), self.fds.len() as libc::nfds_t, ms) };
        for f in &mut self.fds {
            f.revents = 0;
        }
    }
}

/// How a destination in post-copy takes a source back after the connections broke.
pub(crate) struct Recovery {
    pub listener: Listener,
    pub session: u64,
    /// What the source speaks: wire version 4 knows only bitmaps (POSTCOPY).
    pub wire_version: u32,
}

/// Starts the threads of post-copy; they end by themselves. From here on whatever
/// else goes to the source on the main connection goes through `PostcopyIn::answer`.
pub(crate) fn start(
    main: Stream,
    lanes: Vec<Stream>,
    parts: Vec<Arc<dyn Component>>,
    lazy: Vec<LazyPart>,
    recovery: Option<Recovery>,
) -> std::io::Result<Arc<PostcopyIn>> {
    let writer = main
        .try_clone()
        .ok_or_else(|| std::io::Error::other("the main connection cannot be shared"))?;
    let pc = Arc::new(PostcopyIn {
        writer: Mutex::new(writer),
        lazy,
        parts: Arc::new(parts),
        done: AtomicBool::new(false),
        gate: Mutex::new((false, None)),
        generation: AtomicU64::new(0),
        broken: Mutex::new(None),
        streams: Mutex::new(Vec::new()),
        said_done: Mutex::new(None),
        released: AtomicBool::new(false),
        began: Instant::now(),
        heard_ms: AtomicU64::new(0),
    });
    pc.serve(std::iter::once(main).chain(lanes).collect(), 0)?;
    let watcher = pc.clone();
    std::thread::Builder::new()
        .name("postcopy-faults".into())
        .spawn(move || watch(&watcher))?;
    if let Some(r) = recovery {
        let pc = pc.clone();
        std::thread::Builder::new()
            .name("postcopy-recovery".into())
            .spawn(move || {
                match godwit_vmm::confine::enter(godwit_vmm::confine::Role::Recovery) {
                    Ok(()) => supervise(&pc, r),
                    Err(e) => tracing::error!(
                        "post-copy cannot recover from a broken link: its listener's thread \
                         {e}"
                    ),
                }
            })?;
    }
    Ok(pc)
}

/// Waits for the source to come back on the listener with RESUME, tells it what is
/// still missing and goes on on the new connections. Until then the VM runs and
/// whatever touches a missing page waits. The source may come back while the
/// connections in use still look alive here: a link that went silent (a host or a
/// path gone without a reset) breaks nothing this side can see until `SILENCE` has
/// passed, and the source may notice first (its writes stop making progress, or its
/// DONE never comes); the old ones are given up then. A source that comes back after
/// DONE went out lost it with the old connections: it is told again. Ends (and lets
/// the listener go) once the source answers DONE with RELEASED, or `AFTER_DONE` after
/// DONE from a source that never does.
fn supervise(pc: &Arc<PostcopyIn>, r: Recovery) {
    let mut done_at = None;
    loop {
        if pc.released.load(Ordering::SeqCst) {
            return;
        }
        if pc.done.load(Ordering::SeqCst)
            && done_at.get_or_insert_with(Instant::now).elapsed() > AFTER_DONE
        {
            return;
        }
        let mut streams = match resumed(&r) {
            Ok(Some(s)) => s,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!("post-copy recovery: {e}");
                continue;
            }
        };
        let said = pc
            .said_done
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(done) = said {
            pc.done_again(streams, r.wire_version, done);
            continue;
        }
        if pc.done.load(Ordering::SeqCst) {
            // Ended while the source came back, DONE not yet out: it comes on the
            // connections in use, or the source comes back again for it.
            continue;
        }
        {
            let mut b = pc.broken.lock().unwrap_or_else(|e| e.into_inner());
            if b.is_none() {
                tracing::warn!(
                    "post-copy: the source came back on new connections while the ones in \
                     use still looked alive here (a link that went silent): giving them up"
                );
                *b = Some("the source came back on new connections".into());
            }
        }
        // Give the old connections up: readers still blocked on them end.
        pc.give_up_streams(None);
        // What is still missing, then RESUMED: the source sends exactly that.
        if let Err(e) = pc.tell_missing(&mut streams[0], r.wire_version) {
            tracing::warn!("post-copy recovery: answering the source: {e}");
            continue;
        }
        let Some(writer) = streams[0].try_clone() else {
            continue;
        };
        let generation = pc.generation.fetch_add(1, Ordering::SeqCst) + 1;
        *pc.writer.lock().unwrap_or_else(|e| e.into_inner()) = writer;
        // The new connections have their own silence to count, from now.
        pc.heard();
        *pc.broken.lock().unwrap_or_else(|e| e.into_inner()) = None;
        if let Err(e) = pc.serve(streams, generation) {
            pc.broke(generation, format!("cannot read the new connections: {e}"));
            continue;
        }
        // Touches that asked on the broken connections ask again.
        for l in &pc.lazy {
            for addrs in l.faults.asked().chunks(MAX_REQUEST) {
                let f = Frame::Request {
                    section: l.section,
                    addrs: addrs.to_vec(),
                };
                if let Err(e) = pc.send(&f) {
                    pc.broke(generation, format!("asking again: {e}"));
                    break;
                }
            }
        }
        tracing::warn!(pages = pc.left(), "post-copy resumed on new connections");
    }
}

/// The source's new connections, once one opens with RESUME for this migration and
/// the others JOIN it; None when nothing came within a second.
fn resumed(r: &Recovery) -> Result<Option<Vec<Stream>>, String> {
    let mut buf = Vec::new();
    let mut main = match r.listener.accept(Some(Duration::from_secs(1))) {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let connections = match crate::destination::first_frame(&mut main, &mut buf) {
        Ok(Frame::Resume {
            session,
            connections,
        }) if session == r.session
            && (1..=crate::source::MAX_CONNECTIONS).contains(&connections) =>
        {
            connections
        }
        Ok(f) => {
            main.shutdown();
            return Err(format!(
                "a connection opened with {:?}, not RESUME",
                f.kind()
            ));
        }
        Err(e) => {
            main.shutdown();
            return Err(format!("a connection that did not open: {e}"));
        }
    };
    let mut streams = vec![main];
    let by = std::time::Instant::now() + Duration::from_secs(10);
    let mut seen = std::collections::HashSet::new();
    while streams.len() < connections as usize {
        let left = by.saturating_duration_since(std::time::Instant::now());
        let look = crate::destination::JOIN_LOOK;
        let mut c = match r.listener.accept(Some(left.min(look))) {
            Ok(c) => c,
            // A source that gave up on this try is not waited for.
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut && left > look => {
                if streams[0].peer_closed() {
                    return Err("the source closed the connection before the others joined".into());
                }
                continue;
            }
            Err(e) => {
                return Err(format!(
                    "{} of {connections} connections came: {e}",
                    streams.len()
                ))
            }
        };
        match crate::destination::first_frame(&mut c, &mut buf) {
            Ok(Frame::Join { session, index })
                if session == r.session
                    && (1..connections).contains(&index)
                    && seen.insert(index) =>
            {
                streams.push(c)
            }
            _ => {
                c.shutdown();
                tracing::warn!("post-copy recovery: dropped a connection that did not join")
            }
        }
    }
    for s in &streams {
        s.set_read_timeout(Some(Duration::from_secs(1)))
            .map_err(|e| e.to_string())?;
    }
    Ok(Some(streams))
}

/// How long a connection's reader waits for a frame before it looks at the state of
/// post-copy again.
const READ_WAIT: Duration = Duration::from_secs(1);
/// How long one frame may take to arrive once it has begun, before the connection is
/// taken for broken (a page frame is 260 KiB: a minute is a link of 35 kbit/s).
const FRAME_WAIT: Duration = Duration::from_secs(60);

/// Places the pages one connection brings until the source closes it. Pages go
/// straight from the socket into place where the memory allows (`crate::inplace`).
fn read_pages(mut s: Stream, pc: &PostcopyIn, generation: u64) {
    if let Err(e) = godwit_vmm::confine::enter(godwit_vmm::confine::Role::PageReader) {
        pc.broke(generation, e);
        return;
    }
    let mut buf = Vec::new();
    let _ = s.set_read_timeout(Some(READ_WAIT));
    let current = || generation == pc.generation.load(Ordering::SeqCst);
    let why = loop {
        let since = std::time::Instant::now();
        let go_on = || current() && since.elapsed() < FRAME_WAIT;
        let mut heard = Heard { s: &mut s, pc };
        let mut r = wire::Between::new(&mut heard, go_on);
        let h = match wire::read_header(&mut r) {
            Ok(h) => h,
            Err(WireError::Timeout) if current() => continue,
            // Given up for newer connections.
            Err(_) if !current() => return,
            // The source closes the connections once DONE has reached it.
            Err(WireError::Closed) if pc.done.load(Ordering::SeqCst) => return,
            Err(e) => break e.to_string(),
        };
        let placed = if h.kind == wire::Kind::Pages {
            // Into place only when the whole frame is here already: its pages are taken
            // before they are read, and a touch of one waits until they are in. Read as
            // it trickles in, a frame held them for as long as its bytes took (or its
            // reader was kept off a core): fault latencies' p99 rose from 1.8 to 4.5 ms.
            let whole = r.get_ref().s.queued() >= h.len;
            crate::inplace::read_pages(&mut r, &h, &mut buf, whole, |section| {
                let c = pc
                    .parts
                    .get(section as usize)
                    .ok_or_else(|| format!("pages of section {section}"))?;
                let name = pc.lazy.iter().find(|l| l.section == section);
                Ok((&**c, name.map_or("a component", |l| l.name.as_str())))
            })
            .and_then(|l| match l.bad.len() {
                0 => Ok(()),
                n => Err(format!("{n} pages failed their CRCs")),
            })
        } else {
            match wire::read_payload(&mut r, &h, &mut buf) {
                Ok(Frame::Zero { section, runs }) => match pc.parts.get(section as usize) {
                    Some(c) => c.load_zero(&runs).map_err(|e| e.to_string()),
                    None => Err(format!("zero pages of section {section}")),
                },
                Ok(Frame::Abort(m)) => Err(format!("the source aborted: {m}")),
                Ok(Frame::Released) if pc.done.load(Ordering::SeqCst) => {
                    pc.source_let_go();
                    return;
                }
                Ok(f) => Err(format!("unexpected {:?} frame", f.kind())),
                Err(e) => Err(e.to_string()),
            }
        };
        match placed {
            Ok(()) => {}
            Err(_) if !current() => return,
            Err(e) => break e,
        }
    };
    pc.broke(generation, why);
}

/// A connection's reads, each news from the source.
struct Heard<'a> {
    s: &'a mut Stream,
    pc: &'a PostcopyIn,
}

impl Read for Heard<'_> {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        let n = self.s.read(b)?;
        if n > 0 {
            self.pc.heard();
        }
        Ok(n)
    }
}

impl vm_memory::ReadVolatile for Heard<'_> {
    fn read_volatile<B: vm_memory::bitmap::BitmapSlice>(
        &mut self,
        b: &mut vm_memory::VolatileSlice<B>,
    ) -> Result<usize, vm_memory::VolatileMemoryError> {
        let n = self.s.read_volatile(b)?;
        if n > 0 {
            self.pc.heard();
        }
        Ok(n)
    }
}

/// Sends a request for every page a touch waits for, and DONE once none is missing;
/// takes a silent link for broken.
fn watch(pc: &PostcopyIn) {
    let _urgent = crate::priority::Urgent::fair("post-copy's fault watch");
    let mut w = Wanted::default();
    let mut watch = FaultWatch::new(pc.lazy.iter().map(|l| &*l.faults));
    loop {
        if pc.done.load(Ordering::SeqCst) {
            return;
        }
        if pc.left() == 0 {
            match pc.done(None) {
                Ok(()) => tracing::info!("post-copy: every page is here"),
                Err(e) => tracing::warn!("post-copy: every page is here, but DONE failed: {e}"),
            }
            return;
        }
        watch.wait(100);
        pc.check_silence();
        for l in &pc.lazy {
            w.clear();
            if let Err(e) = l.faults.take(&mut w) {
                tracing::error!(component = l.name, "post-copy: reading faults: {e}");
                continue;
            }
            // The touches' pages, then (in frames of their own, answered after) the
            // pages read ahead of them, both answered on the main connection; pages
            // wanted ahead of a touch come with the background.
            let request = |a: &[u64]| Frame::Request {
                section: l.section,
                addrs: a.to_vec(),
            };
            let urgent = w.ask.chunks(MAX_REQUEST).map(request);
            let next = w.after.chunks(MAX_REQUEST).map(request);
            let later = w.ahead.chunks(MAX_REQUEST).map(|a| Frame::Ahead {
                section: l.section,
                addrs: a.to_vec(),
            });
            for f in urgent.chain(next).chain(later) {
                if let Err(e) = pc.send(&f) {
                    // Asked again on the new connections, once the source recovers.
                    pc.broke(
                        pc.generation.load(Ordering::SeqCst),
                        format!("asking the source for pages: {e}"),
                    );
                }
            }
        }
    }
}
