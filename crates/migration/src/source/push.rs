//! Post-copy's background stream, on a thread of its own. The thread that answers
//! requests used to push the background between two looks for requests, so a request
//! waited for the push in progress; and since pushing kept that thread busy, the
//! scheduler treated it as a busy thread: woken by a request, it queued behind the
//! destination's placements on the same core while the other core idled (traced:
//! 300-650 us from a request sent to the source reading it). Apart, the thread that
//! answers requests does little but wait for them, and the scheduler runs it when one
//! arrives.
//!
//! The pusher owns the connections but the main one (`Outbound::split_background`)
//! and reads the lazy components in slices. It holds a component's lock only to take
//! a slice's pages off what is left, and reads and sends them after it (the memory no
//! longer changes; `paged/unlocked.rs`), so an answer to a request never waits for its
//! copy or its send. It reads only when its connections have room, so that it hears a
//! request's hold-off or the stop between slices rather than inside a send.

use crate::outbound::{Outbound, Route};
use crate::wire;
use godwit_vmm::migratable::{Component, ComponentError, ReadReport};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Background pages read at a time (one frame): the pusher hears a request's hold-off
/// and the stop only between them.
pub(super) const PUSH_PAGES: u64 = wire::PAGES_PER_FRAME as u64;
/// How long the pusher sleeps while a request is answered.
const ANSWER_WAIT: Duration = Duration::from_micros(50);
/// The longest it waits for its connections to have room before it looks at the stop
/// again (their writers wake it as soon as they have).
const ROOM_WAIT: Duration = Duration::from_millis(1);
/// The longest single sleep under a bandwidth cap.
const DUE_SLICE: Duration = Duration::from_millis(10);
/// How long it waits for pages wanted ahead once everything is pushed.
const IDLE_WAIT: Duration = Duration::from_millis(20);
/// The pusher starts once this passes without a request after the VM started ...
const QUIET: Duration = Duration::from_millis(1);
/// ... or this long after it, whatever the guest does.
const QUIET_AT_MOST: Duration = Duration::from_millis(4);
/// ... or once this many have come: a device that faults on without a pause is no
/// burst, and needs the background.
const BURST: u64 = 16;
/// How often the pusher looks while it waits for them to settle.
const SETTLE_STEP: Duration = Duration::from_micros(50);

/// What the pusher did, for the report.
#[derive(Default)]
pub(super) struct Pushed {
    /// Per section: what went.
    pub sent: Vec<(usize, ReadReport)>,
    pub background_pages: u64,
    /// Of those, pages wanted ahead of a touch.
    pub ahead_pages: u64,
    /// Pages wanted ahead that the VM cannot give (outside it).
    pub refused: u64,
}

/// Why the pusher stopped short.
pub(super) enum Stopped {
    /// The connections failed (recoverable).
    Link(String),
    /// A component failed.
    Component(String, ComponentError),
}

/// Shared with the thread that answers requests.
#[derive(Default)]
pub(super) struct Shared {
    /// Set by the answering thread: stop now (DONE came, or the link broke).
    pub stop: AtomicBool,
    /// Set by the answering thread while it answers a request: the pusher holds off
    /// (it would take the component's lock again between two of its reads, and keep
    /// the core the answering thread was woken on).
    pub answering: AtomicBool,
    /// Set by the pusher: every page went out.
    pub all_out: AtomicBool,
    /// Set by the pusher when it stopped short.
    pub failed: Mutex<Option<Stopped>>,
    /// Requests that came so far (the pusher waits for the first ones to settle).
    pub requests: AtomicU64,
    /// Set by the answering thread once pages are wanted ahead: the pusher brings
    /// them at once.
    pub wanted_ahead: AtomicBool,
}

impl Shared {
    fn fail(&self, why: Stopped) {
        *self.failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
    }
}

/// One lazy component: its section index, name and the component.
pub(super) type LazyPart = (usize, String, Arc<dyn Component>);

/// Pushes the lazy components' pages into `out`, pages wanted ahead (`ahead`: section
/// and addresses, checked by the caller to name a lazy section) first, until told to
/// stop.
pub(super) fn push(
    lazy: &[LazyPart],
    out: &mut Outbound,
    ahead: &Receiver<(u32, Vec<u64>)>,
    shared: &Shared,
    cancel: &AtomicBool,
) -> Pushed {
    let mut p = Pushed::default();
    let mut sent = vec![ReadReport::default(); lazy.len()];
    settle(shared);
    let r = (|| -> Result<(), Stopped> {
        loop {
            if shared.stop.load(Ordering::SeqCst) {
                return Ok(());
            }
            if shared.answering.load(Ordering::SeqCst) {
                std::thread::sleep(ANSWER_WAIT);
                continue;
            }
            if !out.room() {
                out.wait_room(ROOM_WAIT);
                continue;
            }
            // Pages wanted ahead go at once, as the pages a touch waits for do: a
            // device waits for them (the GPU engine's next command does not run until
            // they are here). They count into the cap, so the rest waits longer after.
            if let Ok(a) = ahead.try_recv() {
                wanted_ahead(lazy, out, cancel, a, &mut p, &mut sent)?;
                continue;
            }
            // Under a bandwidth cap, waiting here, between reads, a slice at a time to
            // hear the stop (and pages wanted ahead).
            let due = out.due();
            if !due.is_zero() {
                let slice = due.min(DUE_SLICE);
                match ahead.recv_timeout(slice) {
                    Ok(a) => wanted_ahead(lazy, out, cancel, a, &mut p, &mut sent)?,
                    // No more can come: the slice is slept all the same.
                    Err(RecvTimeoutError::Disconnected) => std::thread::sleep(slice),
                    Err(RecvTimeoutError::Timeout) => {}
                }
                continue;
            }
            let next = lazy
                .iter()
                .position(|l| l.2.precopy_info().is_ok_and(|i| i.total() > 0));
            let Some(k) = next else {
                out.flush().map_err(link)?;
                shared.all_out.store(true, Ordering::SeqCst);
                // Only pages wanted ahead (sent again) or the stop can come now.
                match ahead.recv_timeout(IDLE_WAIT) {
                    Ok(a) => {
                        shared.all_out.store(false, Ordering::SeqCst);
                        wanted_ahead(lazy, out, cancel, a, &mut p, &mut sent)?;
                    }
                    Err(RecvTimeoutError::Disconnected) => return Ok(()),
                    Err(RecvTimeoutError::Timeout) => {}
                }
                continue;
            };
            let (section, name, c) = &lazy[k];
            match c.read(
                &mut out.routed(*section as u32, cancel, Route::Frames),
                PUSH_PAGES,
            ) {
                Ok(r) => {
                    p.background_pages += r.pages + r.zero_sent;
                    sent[k] += r;
                }
                Err(ComponentError::Io(e)) => return Err(link(e)),
                Err(e) => return Err(Stopped::Component(name.clone(), e)),
            }
        }
    })();
    if let Err(why) = r {
        shared.fail(why);
    }
    p.sent = lazy.iter().map(|l| l.0).zip(sent).collect();
    p
}

/// Waits while the guest's first touches come: the VM has just started at the
/// destination (or the connections were opened anew, and the touches that waited are
/// asked again), and they come in a burst (its page tables, code and stack), each a
/// round trip the guest waits for. On a small host the pusher's reads and sends, and
/// the destination's placing of what it sends, took the cores their answers needed
/// (docs/benchmarks.md, "Post-copy's background holds off for the first touches").
fn settle(shared: &Shared) {
    let start = Instant::now();
    let (mut seen, mut since) = (shared.requests.load(Ordering::SeqCst), start);
    loop {
        let (now, n) = (Instant::now(), shared.requests.load(Ordering::SeqCst));
        if n != seen {
            (seen, since) = (n, now);
        }
        if settled(shared, now - start, now - since) {
            return;
        }
        std::thread::sleep(SETTLE_STEP);
    }
}

/// Whether the pusher may start, `running` after the VM started and `quiet` after the
/// last request: the burst is over (`QUIET`), or it is no burst (`BURST` requests: a
/// device that faults on without a pause needs the background), or pages are wanted
/// ahead (a device's next command), or it has waited long enough, or it must stop.
fn settled(shared: &Shared, running: Duration, quiet: Duration) -> bool {
    quiet >= QUIET
        || running >= QUIET_AT_MOST
        || shared.requests.load(Ordering::SeqCst) >= BURST
        || shared.wanted_ahead.load(Ordering::SeqCst)
        || shared.stop.load(Ordering::SeqCst)
}

fn link(e: std::io::Error) -> Stopped {
    Stopped::Link(format!("sending: {e}"))
}

/// Pages wanted ahead of a touch: sent before the rest of the background.
fn wanted_ahead(
    lazy: &[LazyPart],
    out: &mut Outbound,
    cancel: &AtomicBool,
    (section, addrs): (u32, Vec<u64>),
    p: &mut Pushed,
    sent: &mut [ReadReport],
) -> Result<(), Stopped> {
    let Some(k) = lazy.iter().position(|l| l.0 == section as usize) else {
        p.refused += 1;
        return Ok(());
    };
    match lazy[k]
        .2
        .read_requested(&mut out.routed(section, cancel, Route::Frames), &addrs)
    {
        Ok(r) => {
            p.ahead_pages += r.pages + r.zero_sent;
            p.background_pages += r.pages + r.zero_sent;
            sent[k] += r;
            Ok(())
        }
        Err(ComponentError::Io(e)) => Err(link(e)),
        Err(e) => {
            tracing::warn!(component = lazy[k].1, "refused pages wanted ahead: {e}");
            p.refused += 1;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_background_waits_for_a_burst_of_touches_but_not_for_a_device_that_faults_on() {
        let ms = |n: f64| Duration::from_secs_f64(n / 1e3);
        let s = Shared::default();
        // A few touches, the last just now: a burst still coming.
        s.requests.store(3, Ordering::SeqCst);
        assert!(!settled(&s, ms(0.5), ms(0.1)));
        assert!(!settled(&s, ms(3.0), ms(0.9)));
        // Quiet for long enough, or waited long enough.
        assert!(settled(&s, ms(1.5), QUIET));
        assert!(settled(&s, QUIET_AT_MOST, ms(0.1)));
        // Requests without a pause are a device at work, not a burst.
        s.requests.store(BURST, Ordering::SeqCst);
        assert!(settled(&s, ms(0.5), ms(0.0)));
        // Pages wanted ahead (a device's next command), or the stop: at once.
        let s = Shared::default();
        s.wanted_ahead.store(true, Ordering::SeqCst);
        assert!(settled(&s, ms(0.0), ms(0.0)));
        let s = Shared::default();
        s.stop.store(true, Ordering::SeqCst);
        assert!(settled(&s, ms(0.0), ms(0.0)));
    }
}
