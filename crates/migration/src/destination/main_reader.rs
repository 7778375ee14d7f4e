//! The main connection's reader, which carries a receive from the source's first state
//! to READY. Besides pages it takes each component's state as it arrives (loaded while
//! the source still sends the last pages), the end of each pre-copy round (answered
//! once every data connection has passed it) and post-copy's lists of the pages still
//! at the source; once the data connections' readers are done it makes the last checks
//! and confirms to the source. It runs on a thread of its own under the page readers'
//! narrower filters, as the data connections' readers do: the thread that called
//! `receive` goes on to start the VM, which needs more. READY goes out from here, not
//! from that thread, so no hand-over between threads lies in pre-copy's pause (with
//! one there, its downtime measured a tenth of a millisecond longer: docs/benchmarks.md).
//! Post-copy's sections need a userfaultfd each, which the reader's filters do not
//! allow: for those the reader hands the checked lists back, and that thread makes them
//! and sends READY (`expect`).

use super::drain::{drain, Ended, Event, Lanes};
use super::{abort, answer, ReceiveError};
use crate::damaged::{self, Damaged};
use crate::lacks::{self, Lacks};
use crate::migration_priority::raise_this_thread;
use crate::postcopy_in::LazyPart;
use crate::snapshot_index::{Found, Index};
use crate::transport::Stream;
use crate::wire::{self, Frame, Kind, Ready};
use godwit_vmm::confine::{self, Role};
use godwit_vmm::migratable::{step_to, Bitmap, Component, MigState};
use std::sync::Arc;
use std::thread::ScopedJoinHandle;
use std::time::{Duration, Instant};

/// What the main connection brought besides pages.
struct Taken {
    /// Which sections' states were loaded.
    states: Vec<bool>,
    /// Time spent loading them.
    restore: Duration,
    /// Post-copy: each section's pages still at the source.
    postcopy: Vec<Option<Vec<Lacks>>>,
    /// Whether the reader ran at a raised priority (`migration_priority`).
    raised: bool,
}

/// The sections and what stands between their streams: as `drain` takes them.
pub(super) struct Sections<'a> {
    pub parts: &'a [Arc<dyn Component>],
    pub names: &'a [String],
    pub damaged: &'a Damaged,
    pub lanes: &'a Lanes,
    /// The data connections (clones), to end their readers' reads.
    pub data: &'a [Stream],
}

/// A data connection's reader: its connection back once its stream has ended.
pub(super) type Worker<'s> = std::io::Result<ScopedJoinHandle<'s, Result<Stream, Ended>>>;

/// Where a receive stands once the main reader is done.
pub(super) struct Received {
    /// The data connections, for post-copy's background stream.
    pub lanes: Vec<Stream>,
    pub then: Then,
}

/// What is left once the main reader is done.
pub(super) enum Then {
    /// Nothing: READY went out then.
    Ready(Instant),
    /// Post-copy: each section whose pages are still at the source, and which those
    /// are (checked), for its component to expect before READY. That makes a
    /// userfaultfd, which the reader's filters do not allow: `expect` does it.
    Expect(Vec<(usize, Vec<Bitmap>)>, Ready),
}

/// Reads the main connection `c` to its COMPLETE on a reader thread of its own
/// (`migration-recv0`, raised if `raise`), SYNCED going back on `main`; then waits for
/// the data connections' `workers`, makes the last checks of what arrived and sends
/// READY unless post-copy is to follow (`Then`). Every failure is told to the source
/// (ABORT) where it can be.
pub(super) fn read_main(
    c: &mut Stream,
    main: &mut Option<Stream>,
    at: Sections,
    workers: Vec<Worker>,
    raise: bool,
    snapshot: bool,
) -> Result<Received, ReceiveError> {
    let ended = std::thread::scope(|s| {
        let reader = std::thread::Builder::new()
            .name("migration-recv0".into())
            .spawn_scoped(s, || {
                let raised = raise
                    .then(|| raise_this_thread("the main reader"))
                    .flatten();
                let raised = raised.as_ref().is_some_and(|r| r.count() > 0);
                let read = confine::enter(Role::PageReader)
                    .map_err(Ended::from)
                    .and_then(|()| take(c, main, &at, raised));
                // Failed first (not woken by a data connection's failure): the data
                // connections' readers are ended too, not waited for until the
                // source gives up or they go idle.
                let first = read.is_err() && !at.lanes.any_failed();
                if first {
                    at.data.iter().for_each(Stream::shutdown_read);
                }
                let (lanes, taken) = joined(workers, read, first);
                let taken = taken.map_err(|e| abort(main, e))?;
                let then = finish(c, main, &at, taken, snapshot)?;
                Ok(Received { lanes, then })
            });
        let why = match reader.map(|h| h.join()) {
            Ok(Ok(r)) => return Ok(r),
            Ok(Err(_)) => "the main reader thread failed".to_string(),
            Err(e) => format!("cannot start the main reader thread: {e}"),
        };
        // Readers it did not join end now: the scope waits for them.
        at.data.iter().for_each(Stream::shutdown_read);
        Err(why)
    });
    ended.unwrap_or_else(|why| Err(abort(main, why)))
}

/// The main connection's frames to its COMPLETE.
fn take(
    c: &mut Stream,
    main: &mut Option<Stream>,
    at: &Sections,
    raised: bool,
) -> Result<Taken, Ended> {
    let n = at.parts.len();
    let mut t = Taken {
        states: vec![false; n],
        restore: Duration::ZERO,
        postcopy: vec![None; n],
        raised,
    };
    drain(
        c,
        at.parts,
        at.names,
        at.damaged,
        Kind::Complete,
        &mut |e| t.take(e, at, main),
    )?;
    Ok(t)
}

/// The data connections back from their readers, and why the stream failed if it did:
/// the main connection's reason where it failed first (`main_first`: the others were
/// ended for it); a data connection that only closed defers to what the main one heard
/// (the source's ABORT, read even after a failed reader woke it, which leaves what
/// arrived).
fn joined(
    workers: Vec<Worker>,
    main: Result<Taken, Ended>,
    main_first: bool,
) -> (Vec<Stream>, Result<Taken, String>) {
    let mut lanes = Vec::new();
    let mut first_err: Option<Ended> = None;
    for w in workers {
        let r = match w {
            Ok(w) => w
                .join()
                .unwrap_or_else(|_| Err("a receiver thread failed".to_string().into())),
            Err(e) => Err(format!("cannot start a receiver thread: {e}").into()),
        };
        match r {
            Ok(c) => lanes.push(c),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    let r = match (first_err, main) {
        (_, Err(m)) if main_first => Err(m.why),
        (Some(e), Err(m)) if e.closed => Err(m.why),
        (Some(e), _) => Err(e.why),
        (None, r) => r.map_err(String::from),
    };
    (lanes, r)
}

/// The last checks of what arrived, each component brought to STOP, post-copy's lists
/// of missing pages read and held against the pages that arrived damaged; then READY,
/// unless a section is to be filled in post-copy.
fn finish(
    c: &mut Stream,
    main: &mut Option<Stream>,
    at: &Sections,
    taken: Taken,
    snapshot: bool,
) -> Result<Then, ReceiveError> {
    let (parts, names) = (at.parts, at.names);
    let t = Instant::now();
    if let Some(i) = taken.states.iter().position(|s| !s) {
        return Err(abort(
            main,
            format!("the stream ended without the {} state", names[i]),
        ));
    }
    // A snapshot ends at its COMPLETE: anything after it (a file damaged, or two
    // snapshots concatenated) means this is not the file that was written.
    // Only its own page index may follow.
    if snapshot {
        let fits = match c.file_in() {
            Some((at, f)) => match f.metadata() {
                Ok(m) if m.len() == at => true,
                Ok(_) => matches!(Index::open(f), Ok(Found::Index(ix)) if ix.stream_len() == at),
                Err(e) => return Err(ReceiveError::Stream(format!("reading the snapshot: {e}"))),
            },
            None => false,
        };
        if !fits {
            return Err(ReceiveError::Stream(
                "bytes after the snapshot's end: the file is damaged or not one snapshot".into(),
            ));
        }
    }
    // RESUMING -> STOP: each component's last checks of what it took.
    for (c, n) in parts.iter().zip(names) {
        step_to(&**c, MigState::Stop).map_err(|e| abort(main, format!("{n}: {e}")))?;
    }
    // Post-copy: what is still at the source goes missing here, to be fetched when
    // touched once the VM runs. A page still damaged must be one of those.
    let seen = at.damaged.seen();
    let mut damaged = at.damaged.left();
    if seen > 0 {
        tracing::info!(
            "{seen} page copies arrived failing their CRC (torn by the guest's writes, or \
             damaged); {} not sent again",
            damaged.values().map(Vec::len).sum::<usize>()
        );
    }
    let mut missing = Vec::new();
    for (i, lacks) in taken.postcopy.into_iter().enumerate() {
        let Some(lacks) = lacks else { continue };
        if snapshot {
            return Err(ReceiveError::Stream(
                "a snapshot cannot leave memory behind (post-copy)".into(),
            ));
        }
        let regions = parts[i].lazy_regions();
        let m = lacks::bitmaps(lacks, &regions)
            .map_err(|e| format!("post-copy: {e}"))
            .and_then(|m| {
                let bad = damaged.remove(&(i as u32)).unwrap_or_default();
                let kept = damaged::not_fetched(&bad, &regions, &m);
                match kept.is_empty() {
                    true => Ok(m),
                    false => Err(damaged::refusal(&kept)),
                }
            })
            .map_err(|e| abort(main, format!("{}: {e}", names[i])))?;
        missing.push((i, m));
    }
    if let Some((s, pages)) = damaged.into_iter().next() {
        let name = names.get(s as usize).map_or("?", |n| n.as_str());
        let e = format!("{name}: {}", damaged::refusal(&pages));
        return Err(abort(main, e));
    }
    let ready = Ready {
        restore_ms: taken.restore.as_secs_f64() * 1e3,
        check_ms: t.elapsed().as_secs_f64() * 1e3,
        readers_raised: taken.raised,
    };
    if !missing.is_empty() {
        return Ok(Then::Expect(missing, ready));
    }
    send_ready(main, ready).map(Then::Ready)
}

/// Post-copy: each section's component told which of its pages are still at the
/// source (`Then::Expect`), then READY. On the thread that starts the VM.
pub(super) fn expect(
    main: &mut Option<Stream>,
    parts: &[Arc<dyn Component>],
    names: &[String],
    missing: Vec<(usize, Vec<Bitmap>)>,
    mut ready: Ready,
) -> Result<(Vec<LazyPart>, Instant), ReceiveError> {
    let t = Instant::now();
    let mut lazy = Vec::new();
    for (i, m) in missing {
        let faults = parts[i]
            .postcopy_expect(m)
            .map_err(|e| abort(main, format!("{}: {e}", names[i])))?;
        lazy.push(LazyPart {
            section: i as u32,
            name: names[i].clone(),
            faults,
        });
    }
    ready.check_ms += t.elapsed().as_secs_f64() * 1e3;
    Ok((lazy, send_ready(main, ready)?))
}

/// READY to the source (none to a snapshot's reader), and when it went.
fn send_ready(main: &mut Option<Stream>, ready: Ready) -> Result<Instant, ReceiveError> {
    if let Some(m) = main {
        wire::write_frame(m, &Frame::Ready(ready))
            .map_err(|e| ReceiveError::Stream(format!("confirming to the source: {e}")))?;
    }
    Ok(Instant::now())
}

impl Taken {
    fn take(&mut self, e: Event, at: &Sections, main: &mut Option<Stream>) -> Result<(), String> {
        match e {
            Event::State(i, bytes) => {
                let name = &at.names[i];
                if std::mem::replace(&mut self.states[i], true) {
                    return Err(format!("{name}: a second state"));
                }
                let t = Instant::now();
                at.parts[i]
                    .load(bytes)
                    .map_err(|e| format!("{name}: {e}"))?;
                self.restore += t.elapsed();
            }
            Event::Sync(n) => {
                at.lanes.wait(n)?;
                answer(main, &Frame::Synced(n));
            }
            Event::Postcopy(i, missing) => {
                if self.postcopy[i].replace(missing).is_some() {
                    return Err(format!("{}: post-copy said twice", at.names[i]));
                }
            }
        }
        Ok(())
    }
}
