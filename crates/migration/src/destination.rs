//! The receiving side: waits for a source, builds the VM its sections describe (leasing
//! a GPU function of the profile it names from this host's manager), refuses anything
//! it cannot take before a byte of guest data moves, feeds each section's stream to its
//! component, and starts the VM only once the source has handed it over. Everything it
//! reads is hostile: any malformed, truncated, corrupt or out-of-range input ends the
//! migration with a clear error and the VM is never started.

use crate::damaged::Damaged;
use crate::migration_priority::raise_this_thread;
use crate::postcopy_in::LazyPart;
pub use crate::postcopy_in::PostcopyIn;
use crate::restore::Restore;
use crate::transport::{Listener, Stream};
use crate::wire::{self, Frame, Hello, Kind, Started, WireError};
use godwit_vmm::migratable::incoming::{self, Host};
use godwit_vmm::migratable::{step_to, Component, MigState};
use godwit_vmm::{Console, Vm};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod drain;
mod main_reader;
use drain::Lanes;
pub use drain::{drain, Ended, Event, OnEvent};
use main_reader::{read_main, Sections, Then};

/// A source that sends nothing for this long is given up.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Time for the extra data connections to arrive after ACCEPT.
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a new connection has to send its whole first frame (HELLO or JOIN). A
/// connection that does not (a port scan, an idle or trickling client, another
/// protocol) is dropped and the destination goes on listening.
pub const FIRST_FRAME_DEADLINE: Duration = Duration::from_secs(10);

/// GO must arrive within this long after READY went out, or the VM is not started here.
/// The source reports a hand-over unconfirmed only after waiting `STARTED_TIMEOUT`
/// (10 s) past GO, which it sends after READY arrived; only then may the user take the
/// VM back there. A GO held back beyond this window (by a slow or hostile network) thus
/// finds a destination that refuses it, never one that starts a VM the source may run
/// again: the two windows cannot overlap.
pub const GO_WINDOW: Duration = Duration::from_secs(8);

/// Reads from a stream until a deadline for the whole read, not per call.
struct Within<'a> {
    s: &'a mut Stream,
    end: Instant,
}

impl std::io::Read for Within<'_> {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        let left = self.end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the first frame did not arrive in time",
            ));
        }
        self.s.set_read_timeout(Some(left))?;
        self.s.read(b)
    }
}

/// Connections whose opening (TLS handshake, HELLO) runs at once, each on its own
/// thread; more wait in the listen queue.
const OPENING_AT_ONCE: usize = 16;

/// Waits for the first connection that opens as a godwit source: its TLS handshake (if
/// asked for) and whole HELLO within their deadlines. Each opening runs on its own
/// thread, so no stranger (a port scan, an idle or trickling client, another protocol)
/// holds up the real source; those are dropped.
fn first_source(l: &Listener) -> Result<(Stream, Hello, Instant), ReceiveError> {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::mpsc;
    let (tx, rx) = mpsc::channel::<(Stream, Hello, Instant)>();
    let done = AtomicBool::new(false);
    let opening = Arc::new(AtomicUsize::new(0));
    let tls = l.tls();
    // The source found, the acceptor must end before the listener takes its other
    // connections: closing `stop_tx` ends its wait at once (a wait that only ran out
    // added up to its length to every setup).
    let (stop_tx, stop_rx) =
        std::os::unix::net::UnixStream::pair().map_err(ReceiveError::Listen)?;
    std::thread::scope(|s| {
        let acceptor = s.spawn(|| -> Result<(), ReceiveError> {
            while !done.load(Ordering::SeqCst) {
                if opening.load(Ordering::SeqCst) >= OPENING_AT_ONCE {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                let c = match l.accept_raw_unless(&stop_rx) {
                    Ok(Some(c)) => c,
                    Ok(None) => break,
                    Err(e) => return Err(ReceiveError::Listen(e)),
                };
                let (tx, tls, mine) = (tx.clone(), tls.clone(), opening.clone());
                opening.fetch_add(1, Ordering::SeqCst);
                let spawned = std::thread::Builder::new()
                    .name("opening".into())
                    .spawn(move || {
                        let t0 = Instant::now();
                        let confined =
                            godwit_vmm::confine::enter(godwit_vmm::confine::Role::Handshake);
                        let why = match confined
                            .map_err(std::io::Error::other)
                            .and_then(|()| crate::transport::secure(tls.as_ref(), c))
                        {
                            Err(e) => e.to_string(),
                            Ok(mut c) => {
                                let mut buf = Vec::new();
                                match first_frame(&mut c, &mut buf) {
                                    Ok(Frame::Hello(h)) => {
                                        // Only the first source is taken; a later one
                                        // finds the receiver gone and is dropped.
                                        if let Err(mpsc::SendError((c, ..))) = tx.send((c, h, t0)) {
                                            c.shutdown();
                                        }
                                        mine.fetch_sub(1, Ordering::SeqCst);
                                        return;
                                    }
                                    Ok(f) => {
                                        c.shutdown();
                                        format!("it opened with {:?}, not HELLO", f.kind())
                                    }
                                    Err(e) => {
                                        c.shutdown();
                                        e.to_string()
                                    }
                                }
                            }
                        };
                        tracing::warn!(
                            "dropped a connection that did not open as a godwit source: {why}"
                        );
                        mine.fetch_sub(1, Ordering::SeqCst);
                    });
                if let Err(e) = spawned {
                    opening.fetch_sub(1, Ordering::SeqCst);
                    tracing::error!("cannot start a thread for a new connection: {e}");
                }
            }
            Ok(())
        });
        let got = loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(x) => break Ok(x),
                Err(mpsc::RecvTimeoutError::Timeout) if acceptor.is_finished() => {
                    break Err(());
                }
                Err(_) => {}
            }
        };
        done.store(true, Ordering::SeqCst);
        drop(stop_tx);
        let accepted = acceptor.join();
        match (got, accepted) {
            (Ok(x), _) => Ok(x),
            (Err(_), Ok(Err(e))) => Err(e),
            (Err(_), _) => Err(ReceiveError::Listen(std::io::Error::other(
                "the listener stopped",
            ))),
        }
    })
}

/// The first frame of a new connection, whole within FIRST_FRAME_DEADLINE.
pub(crate) fn first_frame<'b>(
    s: &mut Stream,
    buf: &'b mut Vec<u8>,
) -> Result<Frame<'b>, WireError> {
    let end = Instant::now() + FIRST_FRAME_DEADLINE;
    wire::read_frame(&mut Within { s, end }, buf)
}

#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error("waiting for the source: {0}")]
    Listen(#[source] std::io::Error),
    #[error("reading the source's HELLO: {0}")]
    Hello(#[source] WireError),
    #[error("refused the incoming VM: {0}")]
    Refused(String),
    /// The stream went wrong after ACCEPT: the VM is dropped unstarted.
    #[error("{0}")]
    Stream(String),
    #[error(
        "no GO from the source ({0}): the VM was not started here; the source did not \
         hand it over and keeps it (if the source process is gone, so is the VM)"
    )]
    NoGo(String),
    #[error("cannot start the VM: {0}")]
    Start(String),
}

/// A VM received and loaded, not yet running.
pub struct Incoming {
    pub vm: Vm,
    /// The main connection (None for a snapshot): GO comes on it, STARTED goes back.
    main: Option<Stream>,
    /// The VM's components, in the source's section order.
    parts: Vec<Arc<dyn Component>>,
    pub source_guest: String,
    /// From the first byte of the stream to READY.
    pub receive_ms: f64,
    /// When READY went out: GO counts only within GO_WINDOW of it.
    ready_at: Instant,
    /// Post-copy: the components that run ahead of their data, and the data
    /// connections that go on bringing it.
    lazy: Vec<LazyPart>,
    lanes: Vec<Stream>,
    /// The migration's session, and where a source that lost its connections during
    /// post-copy comes back.
    session: u64,
    /// The wire version the source speaks: a recovery answers it in that version.
    wire_version: u32,
    recovery: Option<Listener>,
    /// A snapshot restored lazily: what fills the memory once the VM runs.
    restore: Option<Restore>,
}

/// Answers the source, if there is one to answer.
fn answer(main: &mut Option<Stream>, f: &Frame) {
    if let Some(m) = main {
        let _ = wire::write_frame(m, f);
    }
}

fn refuse(main: &mut Option<Stream>, why: String) -> ReceiveError {
    answer(main, &Frame::Refuse(why.clone()));
    ReceiveError::Refused(why)
}

fn abort(main: &mut Option<Stream>, why: String) -> ReceiveError {
    answer(main, &Frame::Abort(why.clone()));
    ReceiveError::Stream(why)
}

/// The VM's components in the source's section order (frames name them by index).
pub fn in_order(vm: &Vm, names: &[String]) -> Result<Vec<Arc<dyn Component>>, String> {
    names
        .iter()
        .map(|n| {
            vm.components()
                .iter()
                .find(|c| &c.section().name == n)
                .cloned()
                .ok_or_else(|| format!("this VM has no {n}"))
        })
        .collect()
}

/// Checks what HELLO asks for and builds that VM, its vCPU threads parked and each
/// component ready to take data (RESUMING): the components in the source's section
/// order, and their names. `lazy_from_start`: every page will come through userfaultfd
/// (post-copy from the start, a lazy restore).
#[allow(clippy::type_complexity)]
pub(crate) fn build(
    hello: &Hello,
    snapshot: bool,
    host: &Host,
    console: Console,
    main: &mut Option<Stream>,
    lazy_from_start: bool,
) -> Result<(Vm, Vec<Arc<dyn Component>>, Vec<String>), ReceiveError> {
    if !(wire::OLDEST_WIRE_VERSION..=wire::WIRE_VERSION).contains(&hello.wire_version) {
        return Err(refuse(
            main,
            format!(
                "the source speaks migration wire version {}, this godwit takes {} to {}",
                hello.wire_version,
                wire::OLDEST_WIRE_VERSION,
                wire::WIRE_VERSION
            ),
        ));
    }
    if hello.snapshot != snapshot {
        return Err(refuse(
            main,
            "a snapshot stream came over a socket (or a live one from a file)".into(),
        ));
    }
    if hello.connections == 0
        || hello.connections > crate::source::MAX_CONNECTIONS
        || (snapshot && hello.connections != 1)
    {
        return Err(refuse(
            main,
            format!("{} connections asked for", hello.connections),
        ));
    }
    let cfg = incoming::config(&hello.sections, &hello.guest, host, console)
        .map_err(|why| refuse(main, why))?;
    if lazy_from_start {
        // Every page will be placed through userfaultfd, which needs it unmapped for
        // the guest: prefaulted memory would have to be unmapped page run by page run
        // inside the pause (1.5-2 ms for 512 MiB here). Done now, whole: the pages of
        // the RAM and the VRAM stay, placed through their aliases.
        match cfg.prefaulted.unmap_for_postcopy() {
            Ok(true) => tracing::info!(
                "prefaulted memory readied for post-copy: every page comes through userfaultfd"
            ),
            Ok(false) => {}
            Err(e) => return Err(refuse(main, format!("cannot ready the memory: {e}"))),
        }
    }
    let mut vm = Vm::create(cfg).map_err(|e| refuse(main, format!("cannot build the VM: {e}")))?;
    let ours: Vec<_> = vm.components().iter().map(|c| c.section()).collect();
    if let Some(why) = incoming::mismatch(&hello.sections, &ours) {
        return Err(refuse(main, why));
    }
    let names: Vec<String> = hello.sections.iter().map(|s| s.name.clone()).collect();
    let parts = in_order(&vm, &names).map_err(|why| refuse(main, why))?;
    // The vCPU threads exist from here on, parked: starting them is not on the
    // switchover's critical path. Dropping the VM on any failure below ends them unrun.
    vm.start_paused()
        .map_err(|e| refuse(main, format!("cannot create the vCPU threads: {e}")))?;
    for (c, n) in parts.iter().zip(&names) {
        step_to(&**c, MigState::Resuming)
            .map_err(|e| refuse(main, format!("{n}: cannot take data: {e}")))?;
    }
    Ok((vm, parts, names))
}

/// How a snapshot file is restored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RestoreMode {
    /// The VM starts once its states are loaded; its memory is read from the file as it
    /// is touched and in the background (a snapshot without an index is read whole).
    #[default]
    Lazy,
    /// Everything is read and checked before the VM starts.
    Eager,
}

/// How long the wait for data connections goes between looks at the main one.
pub(crate) const JOIN_LOOK: Duration = Duration::from_millis(50);

/// Why a source that closed its main connection while its data connections were
/// awaited went: its ABORT where one came through, else the close. None while the main
/// connection is open: its frames are left for the receiver.
fn gone_before_joining(first: &mut Stream, buf: &mut Vec<u8>) -> Option<String> {
    if !first.peer_closed() {
        return None;
    }
    // The source writes nothing more: what is left is what was in flight, and it ends.
    loop {
        match wire::read_frame(first, buf) {
            Ok(Frame::Abort(m)) => return Some(format!("the source aborted: {m}")),
            Ok(_) => {}
            Err(WireError::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                // What a source does when its end cannot get through.
                return Some(
                    "the source reset the connection before its data connections came".into(),
                );
            }
            Err(_) => {
                return Some(
                    "the source closed the connection before its data connections came".into(),
                )
            }
        }
    }
}

/// Waits for a source on `l`, then receives and loads its VM (a snapshot lazily).
pub fn receive(l: &Listener, host: &Host, console: Console) -> Result<Incoming, ReceiveError> {
    receive_with(l, host, console, RestoreMode::Lazy)
}

/// `receive`, restoring a snapshot as `how` says.
pub fn receive_with(
    l: &Listener,
    host: &Host,
    console: Console,
    how: RestoreMode,
) -> Result<Incoming, ReceiveError> {
    if let (Listener::File(p), RestoreMode::Lazy) = (l, how) {
        if let Some(index) = crate::restore::page_index(p)? {
            return crate::restore::receive(p, index, host, console);
        }
    }
    let snapshot = matches!(l, Listener::File(_));
    let mut buf = Vec::new();
    // Connections that do not open with a whole HELLO in time are dropped, and the
    // destination waits for the next: no stranger can end or hold it. A file has one
    // chance.
    let (mut first, hello, t0) = if snapshot {
        let mut c = l.accept(None).map_err(ReceiveError::Listen)?;
        let t0 = Instant::now();
        match first_frame(&mut c, &mut buf) {
            Ok(Frame::Hello(h)) => (c, h, t0),
            Ok(f) => {
                return Err(ReceiveError::Stream(format!(
                    "the stream starts with {:?}, not HELLO",
                    f.kind()
                )))
            }
            Err(e) => return Err(ReceiveError::Hello(e)),
        }
    } else {
        first_source(l)?
    };
    first
        .set_read_timeout(Some(IDLE_TIMEOUT))
        .map_err(ReceiveError::Listen)?;
    let mut main = first.try_clone();
    // Asked before anything is built: a VM that moves first needs post-copy, and a
    // source that asks is told (it then never switches to it).
    let no_postcopy = match snapshot {
        true => None,
        false => godwit_vmm::migratable::lazy::postcopy_support(host.prefaulted.holds_any()).err(),
    };
    if let (true, Some(why)) = (hello.postcopy_first, &no_postcopy) {
        return Err(refuse(
            &mut main,
            format!("post-copy cannot come here: {why}"),
        ));
    }
    let (vm, parts, names) = build(
        &hello,
        snapshot,
        host,
        console,
        &mut main,
        hello.postcopy_first,
    )?;
    if let Some(m) = &mut main {
        let accept = wire::Accept {
            no_postcopy: no_postcopy.filter(|_| hello.asks_postcopy),
        };
        wire::write_frame(m, &Frame::Accept(accept))
            .map_err(|e| ReceiveError::Stream(format!("answering the source: {e}")))?;
    }

    // Extra data connections: each must name this session and a fresh index; any
    // other connection meanwhile is dropped.
    let mut data = Vec::new();
    let mut seen = HashSet::new();
    let joined_by = Instant::now() + JOIN_TIMEOUT;
    while data.len() + 1 < hello.connections as usize {
        let left = joined_by.saturating_duration_since(Instant::now());
        let mut c = match l.accept(Some(left.min(JOIN_LOOK))) {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionAborted => {
                tracing::warn!("dropped a connection: {e}");
                continue;
            }
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut && left > JOIN_LOOK => {
                if let Some(why) = gone_before_joining(&mut first, &mut buf) {
                    return Err(abort(&mut main, why));
                }
                continue;
            }
            Err(e) => {
                return Err(abort(
                    &mut main,
                    format!(
                        "{} of {} data connections came: {e}",
                        data.len(),
                        hello.connections - 1
                    ),
                ))
            }
        };
        match first_frame(&mut c, &mut buf) {
            Ok(Frame::Join { session, index })
                if session == hello.session
                    && (1..hello.connections).contains(&index)
                    && seen.insert(index) => {}
            Ok(f) => {
                tracing::warn!("dropped a connection that opened with {:?}", f.kind());
                continue;
            }
            Err(e) => {
                tracing::warn!("dropped a connection that did not join: {e}");
                continue;
            }
        }
        c.set_read_timeout(Some(IDLE_TIMEOUT))
            .map_err(|e| abort(&mut main, e.to_string()))?;
        data.push(c);
    }
    let wake = first.try_clone();
    let data_ends: Vec<Stream> = data.iter().filter_map(Stream::try_clone).collect();
    // How far each data connection has got (the last SYNC it passed), so the main one
    // answers SYNCED only once all of them have taken in the round.
    let lanes = Lanes::new(data.len());
    let damaged = Damaged::default();
    // Pre-copy's readers first (`migration_priority`), until the pause's last frame is
    // in: the VM runs here only after, and what they spawn ends with them.
    let raise = hello.raise_readers;
    let received = std::thread::scope(|s| {
        let workers: Vec<_> = data
            .into_iter()
            .enumerate()
            .map(|(k, mut c)| {
                let (parts, names, wake, lanes, damaged) =
                    (&parts, &names, &wake, &lanes, &damaged);
                // Named as the source's senders are, for whoever reads the host's threads.
                let spawned = std::thread::Builder::new()
                    .name(format!("migration-recv{}", k + 1))
                    .spawn_scoped(s, move || {
                        let _raised = raise.then(|| raise_this_thread("a reader")).flatten();
                        let r = godwit_vmm::confine::enter(godwit_vmm::confine::Role::PageReader)
                            .map_err(Ended::from)
                            .and_then(|()| {
                                drain(&mut c, parts, names, damaged, Kind::End, &mut |e| match e {
                                    Event::Sync(n) => {
                                        lanes.passed(k, n);
                                        Ok(())
                                    }
                                    Event::State(..) | Event::Postcopy(..) => {
                                        Err("a state on a data connection".into())
                                    }
                                })
                            });
                        if r.is_err() {
                            lanes.failed();
                            // Wake the main connection so the failure is reported now.
                            if let Some(m) = wake {
                                m.shutdown_read();
                            }
                        }
                        // Post-copy's background stream goes on on it.
                        r.map(|_| c)
                    });
                if spawned.is_err() {
                    // No reader will pass this lane: as when one fails, the main
                    // connection is woken to report it now.
                    lanes.failed();
                    if let Some(m) = wake {
                        m.shutdown_read();
                    }
                }
                spawned
            })
            .collect();
        let at = Sections {
            parts: &parts,
            names: &names,
            damaged: &damaged,
            lanes: &lanes,
            data: &data_ends,
        };
        read_main(&mut first, &mut main, at, workers, raise, snapshot)
    })?;
    let (lazy, ready_at) = match received.then {
        Then::Ready(at) => (Vec::new(), at),
        Then::Expect(missing, ready) => {
            main_reader::expect(&mut main, &parts, &names, missing, ready)?
        }
    };
    Ok(Incoming {
        vm,
        main,
        parts,
        source_guest: hello.guest,
        receive_ms: t0.elapsed().as_secs_f64() * 1e3,
        ready_at,
        lazy,
        lanes: received.lanes,
        session: hello.session,
        wire_version: hello.wire_version,
        recovery: None,
        restore: None,
    })
}

impl Incoming {
    /// A VM loaded from a snapshot whose memory `restore` fills once it runs.
    pub(crate) fn restored(
        vm: Vm,
        parts: Vec<Arc<dyn Component>>,
        hello: Hello,
        receive_ms: f64,
        restore: Restore,
    ) -> Incoming {
        Incoming {
            vm,
            main: None,
            parts,
            source_guest: hello.guest,
            receive_ms,
            ready_at: Instant::now(),
            lazy: Vec::new(),
            lanes: Vec::new(),
            session: hello.session,
            wire_version: hello.wire_version,
            recovery: None,
            restore: Some(restore),
        }
    }

    /// Keeps `l` (the listener this VM came on) for post-copy: a source whose
    /// connections break comes back on it. Without it a broken post-copy cannot recover.
    pub fn keep_for_recovery(&mut self, l: Listener) {
        self.recovery = Some(l);
    }

    /// Starts the VM once the source has given it up (GO); from a snapshot, at once.
    /// Without GO the VM is dropped unstarted: the source keeps it. In post-copy the
    /// VM runs ahead of its memory, which the returned handle follows.
    pub fn start(mut self) -> Result<(Vm, Option<Arc<PostcopyIn>>), ReceiveError> {
        if let Some(m) = &mut self.main {
            let mut buf = Vec::new();
            let end = self.ready_at + GO_WINDOW;
            match wire::read_frame(&mut Within { s: m, end }, &mut buf) {
                Ok(Frame::Go) if Instant::now() <= end => {}
                Ok(Frame::Abort(why)) => {
                    return Err(ReceiveError::Stream(format!("the source aborted: {why}")))
                }
                Ok(Frame::Go) | Err(WireError::Timeout) | Err(WireError::Io(_))
                    if Instant::now() > end =>
                {
                    // Too late: the source may have given up and been told to take the
                    // VM back. Saying so lets it do that at once.
                    let why = format!(
                        "no GO within {} s of READY: not starting the VM here",
                        GO_WINDOW.as_secs()
                    );
                    answer(&mut self.main, &Frame::Abort(why.clone()));
                    return Err(ReceiveError::NoGo(why));
                }
                Ok(f) => return Err(ReceiveError::NoGo(format!("it sent {:?}", f.kind()))),
                Err(e) => return Err(ReceiveError::NoGo(e.to_string())),
            }
        }
        let t = Instant::now();
        if let Some(r) = self.restore.take() {
            // Before anything runs: a device may touch memory while it starts.
            crate::restore::start(r).map_err(|e| {
                ReceiveError::Start(format!("cannot start reading the memory: {e}"))
            })?;
        }
        let mut postcopy: Option<Arc<PostcopyIn>> = None;
        if !self.lazy.is_empty() {
            // Without these threads nothing would ever fill a missing page: a VM that
            // cannot have them must not run (the source takes it back).
            let lazy = std::mem::take(&mut self.lazy);
            let lanes = std::mem::take(&mut self.lanes);
            let n: u64 = lazy.iter().map(|l| l.faults.left()).sum();
            let main = self.main.as_ref().and_then(|m| m.try_clone());
            let started = main
                .ok_or_else(|| std::io::Error::other("the main connection cannot be shared"))
                .and_then(|m| {
                    let recovery =
                        self.recovery
                            .take()
                            .map(|listener| crate::postcopy_in::Recovery {
                                listener,
                                session: self.session,
                                wire_version: self.wire_version,
                            });
                    crate::postcopy_in::start(m, lanes, self.parts.clone(), lazy, recovery)
                });
            match started {
                Ok(pc) => postcopy = Some(pc),
                Err(e) => {
                    let why = format!("cannot start post-copy: {e}");
                    answer(&mut self.main, &Frame::Abort(why.clone()));
                    return Err(ReceiveError::Start(why));
                }
            }
            tracing::info!(pages = n, "post-copy: the VM runs ahead of its memory");
        }
        // Devices before the vCPUs that drive them: the reverse of the stop order.
        let mut order: Vec<&Arc<dyn Component>> = self.parts.iter().collect();
        order.sort_by_key(|c| std::cmp::Reverse(c.stop_order()));
        // In post-copy the fault thread asks for pages on the main connection from now
        // on (a device may touch a missing page while it starts): answers go through
        // the same writer, a whole frame at a time.
        let mut say = |f: &Frame| match &postcopy {
            Some(pc) => {
                let _ = pc.answer(f);
            }
            None => answer(&mut self.main, f),
        };
        // Up to RUNNING_P2P first: what can refuse refuses there, while the source can
        // still take the VM back.
        for c in &order {
            if let Err(e) = step_to(&***c, MigState::RunningP2p) {
                // An explicit refusal: the source knows the VM is not running here and
                // takes it back.
                let why = format!("{}: {e}", c.section().name);
                say(&Frame::Abort(why.clone()));
                return Err(ReceiveError::Start(why));
            }
        }
        // STARTED before the vCPUs and the GPU's engine go (they go at RUNNING): a woken
        // vCPU preempts this thread, and on a busy host STARTED then waited for the next
        // scheduler tick, up to 4 ms that the source counted as downtime while the guest
        // already ran (median downtime 5.2 against 1.5 ms over 16 runs of a 1 GiB guest
        // rewriting 512 MiB at 1 GiB/s). The source waits for this; if it is lost, the source
        // keeps its copy paused (it never resumes after GO), so the VM still runs only
        // here.
        let started = Frame::Started(Started {
            start_ms: t.elapsed().as_secs_f64() * 1e3,
        });
        match &postcopy {
            Some(pc) => {
                let _ = pc.started(&started);
            }
            None => answer(&mut self.main, &started),
        }
        for c in &order {
            // Past STARTED the source has let the VM go. Only what starts work acts on
            // this arc (the vCPUs, a GPU's engine), and only the vCPUs can fail, when the
            // VM has already stopped here.
            if let Err(e) = step_to(&***c, MigState::Running) {
                return Err(ReceiveError::Start(format!("{}: {e}", c.section().name)));
            }
        }
        Ok((self.vm, postcopy))
    }
}
