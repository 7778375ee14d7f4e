//! The migration driver on the source: owns the policy. Pre-copy rounds over the dirty
//! log until the expected downtime fits the limit (throttling the guest if it never
//! would), then the switchover handshake that leaves exactly one side running the VM.
//!
//! The VM takes part only through narrow calls: dirty-page reports
//! (`Machine::{start_dirty_log, take_dirty_pages, peek_dirty_pages, stop_dirty_log}`,
//! the same whether KVM's bitmap or its dirty ring is behind them), pause/resume and
//! hold (`Control`), and save of a plain state struct (`Machine::save_state`). Post-copy
//! would add a phase after `switchover` that starts the destination before all pages
//! have moved and serves the rest on demand; the rounds and the handshake stay.

use crate::pages::{self, Bitmap, Job, Limiter, Sent};
use crate::report::{Progress, Report, Round, Status};
use crate::throttle::Throttle;
use crate::transport::{Stream, Target};
use crate::wire::{self, Frame, Hello, PagesFrame, Totals, WireError, PAGE_SIZE};
use godwit_vmm::control::RunState;
use godwit_vmm::state::STATE_VERSION;
use godwit_vmm::VmHandle;
use serde::{Deserialize, Serialize};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// How long the source waits for the destination at each handshake step.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(20);
/// A write that makes no progress for this long means the destination is gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Throttle steps (percent of each time slice the vCPUs are held).
const THROTTLE_START: u32 = 20;
const THROTTLE_STEP: u32 = 10;
const THROTTLE_MAX: u32 = 99;
/// Rounds at full throttle after which the driver switches over even above the limit.
const ROUNDS_AT_MAX_THROTTLE: u32 = 5;
const MAX_ROUNDS: u32 = 200;
/// Below this expected downtime (less the round trips, which no round shortens) another
/// round gains nothing: the fixed costs dominate.
const SMALL_DOWNTIME_MS: f64 = 2.0;
/// Rounds that leave at most this share of the dirty set are worth another round.
const CONVERGING: f64 = 0.75;
/// The switchover's fixed part (pause, state, handshake) measured here: about 0.7 ms.
const FIXED_DOWNTIME_MS: f64 = 1.0;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Options {
    /// tcp:HOST:PORT, unix:PATH or file:PATH.
    pub to: String,
    #[serde(default = "default_downtime")]
    pub downtime_ms: u64,
    /// Bytes per second over all connections; None = as fast as possible.
    #[serde(default)]
    pub max_bandwidth: Option<u64>,
    #[serde(default = "default_connections")]
    pub connections: u32,
}

fn default_downtime() -> u64 {
    300
}

fn default_connections() -> u32 {
    1
}

pub const MAX_CONNECTIONS: u32 = 16;

impl Options {
    pub fn check(&self) -> Result<Target, String> {
        let t = Target::parse(&self.to)?;
        if self.connections == 0 || self.connections > MAX_CONNECTIONS {
            return Err(format!(
                "connections must be 1 to {MAX_CONNECTIONS} (got {})",
                self.connections
            ));
        }
        if t.is_file() && self.connections != 1 {
            return Err("a file takes one connection".into());
        }
        if self.downtime_ms == 0 {
            return Err("the downtime limit must be at least 1 ms".into());
        }
        if self.max_bandwidth == Some(0) {
            return Err("max bandwidth must be more than 0".into());
        }
        Ok(t)
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn mib_s(bytes: u64, d: Duration) -> f64 {
    if d.is_zero() {
        0.0
    } else {
        bytes as f64 / (1 << 20) as f64 / d.as_secs_f64()
    }
}

/// A migration failure, and whether the source may still run the VM.
struct Fail {
    msg: String,
    cancelled: bool,
    /// Past GO: the destination may run the VM, so the source must not resume it.
    ambiguous: bool,
}

fn fail(msg: impl Into<String>) -> Fail {
    Fail {
        msg: msg.into(),
        cancelled: false,
        ambiguous: false,
    }
}

/// What one pre-copy round sent, and what it learned on the way.
struct RoundSent {
    sent: Sent,
    /// Pages left for the next round because the guest wrote them again meanwhile.
    skipped: u64,
    peek_time: Duration,
}

struct Session<'a> {
    h: &'a VmHandle,
    o: &'a Options,
    target: Target,
    status: &'a Status,
    conns: Vec<Stream>,
    frames: Vec<PagesFrame>,
    /// Per connection, what it carried (checked by the receiver at the end).
    totals: Vec<Totals>,
    report: Report,
    t0: Instant,
    rtt: Duration,
    /// Bytes per second the link has shown.
    bandwidth: f64,
    /// Set once this migration paused the VM.
    paused_by_us: bool,
}

impl Session<'_> {
    fn progress(&self, phase: &str, remaining: u64, expected_ms: f64, throttle: u32) {
        let r = &self.report;
        self.status.set_progress(Progress {
            phase: phase.into(),
            round: r.rounds.len() as u32,
            bytes_sent: r.bytes.total,
            pages_sent: r.bytes.pages_sent,
            remaining_pages: remaining,
            memory_pages: r.memory_mib * 256,
            dirty_rate_mib_s: r.rounds.last().map_or(0.0, |x| x.dirty_rate_mib_s),
            expected_downtime_ms: expected_ms,
            throttle_pct: throttle,
            elapsed_ms: ms(self.t0.elapsed()),
        });
    }

    /// Why a write failed: the destination's ABORT reason when it sent one.
    fn explain(&mut self, e: std::io::Error) -> Fail {
        if e.kind() == std::io::ErrorKind::Interrupted && self.status.cancelled() {
            return Fail {
                msg: "cancelled".into(),
                cancelled: true,
                ambiguous: false,
            };
        }
        let mut why = format!("sending to {}: {e}", self.target);
        if let Some(c) = self.conns.first_mut() {
            let _ = c.set_read_timeout(Some(Duration::from_millis(500)));
            let mut buf = Vec::new();
            if let Ok(Frame::Abort(m)) = wire::read_frame(c, &mut buf) {
                why = format!("the destination aborted: {m}");
            }
        }
        fail(why)
    }

    fn connect(&mut self) -> Result<(), Fail> {
        let m = &self.h.machine;
        let session = (std::process::id() as u64) << 32
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
        let hello = Hello {
            wire_version: wire::WIRE_VERSION,
            state_version: STATE_VERSION,
            shape: m.shape(),
            guest: m.description().guest.clone(),
            memory_mib: m.description().memory_mib,
            connections: self.o.connections,
            session,
            snapshot: self.target.is_file(),
        };
        let mut main = Stream::connect(&self.target, Duration::from_secs(5))
            .map_err(|e| fail(format!("cannot reach {}: {e}", self.target)))?;
        let _ = main.set_write_timeout(Some(WRITE_TIMEOUT));
        let t = Instant::now();
        wire::write_frame(&mut main, &Frame::Hello(hello))
            .map_err(|e| fail(format!("{}: {e}", self.target)))?;
        if !self.target.is_file() {
            main.set_read_timeout(Some(HANDSHAKE_TIMEOUT))
                .map_err(|e| fail(e.to_string()))?;
            let mut buf = Vec::new();
            match wire::read_frame(&mut main, &mut buf) {
                Ok(Frame::Accept) => {}
                Ok(Frame::Refuse(why)) => {
                    return Err(fail(format!("the destination refused the VM: {why}")))
                }
                Ok(f) => return Err(fail(format!("the destination answered {:?}", f.kind()))),
                Err(e) => {
                    return Err(fail(format!(
                        "no answer from the destination {}: {e}",
                        self.target
                    )))
                }
            }
            self.rtt = t.elapsed();
        }
        self.conns.push(main);
        for index in 1..self.o.connections {
            let mut c = Stream::connect(&self.target, Duration::from_secs(5))
                .map_err(|e| fail(format!("data connection {index}: {e}")))?;
            let _ = c.set_write_timeout(Some(WRITE_TIMEOUT));
            wire::write_frame(&mut c, &Frame::Join { session, index })
                .map_err(|e| fail(format!("data connection {index}: {e}")))?;
            self.conns.push(c);
        }
        self.frames = (0..self.conns.len()).map(|_| PagesFrame::new()).collect();
        self.totals = vec![Totals::default(); self.conns.len()];
        Ok(())
    }

    /// Sends the pages of a pre-copy round in slices. Before each slice, pages the guest
    /// has written again since the round began are dropped from the rest of the round:
    /// they stay marked in the dirty log, so the next round (or the switchover) carries
    /// their newer content, and sending them now would be wasted bandwidth.
    fn send_round(&mut self, todo: &mut [Bitmap], fresh: bool) -> Result<RoundSent, Fail> {
        // A look at the log per 64 MiB sent: rarer costs bandwidth on pages rewritten
        // meanwhile, more often costs the look itself (with the bitmap, in proportion to
        // guest memory whatever was written).
        const SLICE_PAGES: u64 = 16384;
        let total = pages::words(todo);
        let mut all = Sent::default();
        let mut skipped = 0;
        let mut peek_time = Duration::ZERO;
        let mut at = 0;
        while at < total {
            if at > 0 {
                let t = Instant::now();
                let peek = self
                    .h
                    .machine
                    .peek_dirty_pages()
                    .map_err(|e| fail(format!("dirty log: {e}")))?;
                if let Some(w) = peek {
                    skipped += pages::drop_written(todo, &w, at);
                }
                peek_time += t.elapsed();
            }
            let end = pages::slice_end(todo, at, SLICE_PAGES);
            all += self.send(todo, fresh, at..end)?;
            at = end;
        }
        Ok(RoundSent {
            sent: all,
            skipped,
            peek_time,
        })
    }

    /// Sends the given pages over every connection in parallel.
    fn send(
        &mut self,
        pages: &[Bitmap],
        fresh: bool,
        words: std::ops::Range<usize>,
    ) -> Result<Sent, Fail> {
        let m = &self.h.machine;
        let limiter = Limiter::new(self.o.max_bandwidth);
        let parts = self.conns.len() as u64;
        let job = |part| Job {
            mem: m.memory(),
            ram: &m.description().ram,
            pages,
            part,
            parts,
            limiter: &limiter,
            cancel: &self.status.cancel,
            live: &self.status.live_bytes,
            fresh,
            words: words.clone(),
        };
        let results: Vec<std::io::Result<Sent>> = if parts == 1 {
            vec![pages::send(
                &mut self.conns[0],
                &job(0),
                &mut self.frames[0],
            )]
        } else {
            std::thread::scope(|s| {
                let hs: Vec<_> = self
                    .conns
                    .iter_mut()
                    .zip(self.frames.iter_mut())
                    .enumerate()
                    .map(|(i, (c, f))| {
                        let j = job(i as u64);
                        s.spawn(move || pages::send(c, &j, f))
                    })
                    .collect();
                hs.into_iter()
                    .map(|h| {
                        h.join()
                            .unwrap_or_else(|_| Err(std::io::Error::other("sender panicked")))
                    })
                    .collect()
            })
        };
        let mut all = Sent::default();
        for (i, r) in results.into_iter().enumerate() {
            let s = r.map_err(|e| self.explain(e))?;
            self.totals[i].pages += s.pages;
            self.totals[i].zero_pages += s.zero_sent;
            all += s;
        }
        let b = &mut self.report.bytes;
        b.total += all.bytes;
        b.memory_data += all.pages * PAGE_SIZE as u64;
        b.pages_sent += all.pages;
        b.zero_pages += all.zero_pages;
        Ok(all)
    }

    fn take_dirty(&self) -> Result<Vec<Bitmap>, Fail> {
        self.h
            .machine
            .take_dirty_pages()
            .map_err(|e| fail(format!("dirty log: {e}")))
    }

    /// The bandwidth to plan with: measured, and never above the cap.
    fn bandwidth_cap(&self) -> f64 {
        match self.o.max_bandwidth {
            Some(max) => self.bandwidth.min(max as f64),
            None => self.bandwidth,
        }
    }

    /// Time to carry `dirty` pages: the part of the downtime more rounds can shrink.
    fn transfer_ms(&self, dirty: u64) -> f64 {
        dirty as f64 * PAGE_SIZE as f64 / self.bandwidth_cap() * 1e3
    }

    /// Downtime if the VM stopped now with `dirty` pages left.
    fn expected_ms(&self, dirty: u64) -> f64 {
        self.transfer_ms(dirty) + FIXED_DOWNTIME_MS + 2.0 * ms(self.rtt)
    }

    fn learn_bandwidth(&mut self, sent: &Sent, d: Duration) {
        // Small rounds say more about latency than bandwidth; the floor keeps a tiny
        // first round from promising nothing can ever fit.
        if sent.bytes >= 4 << 20 || self.bandwidth == 0.0 {
            let bw = sent.bytes as f64 / d.as_secs_f64().max(1e-6);
            self.bandwidth = bw.max(64.0 * (1 << 20) as f64);
        }
    }

    fn precopy(&mut self, throttle: &Throttle) -> Result<Vec<Bitmap>, Fail> {
        let m = self.h.machine.clone();
        let limit = self.o.downtime_ms as f64;
        let mut last_sync = Instant::now();
        // Round 0: every page the guest ever touched; the rest is zero and stays unsent.
        let mut todo = pages::populated(m.memory(), &m.description().ram);
        let untouched = self.report.memory_mib * 256 - pages::count(&todo);
        self.report.bytes.zero_pages += untouched;
        let mut fresh = true;
        let mut rounds_at_max = 0;
        loop {
            let index = self.report.rounds.len() as u32;
            let pct = throttle.get();
            self.progress("precopy", pages::count(&todo), 0.0, pct);
            let t = Instant::now();
            let RoundSent {
                sent,
                skipped,
                peek_time,
            } = self.send_round(&mut todo, fresh)?;
            let d = t.elapsed();
            fresh = false;
            self.learn_bandwidth(&sent, d);
            let t = Instant::now();
            let dirty = self.take_dirty()?;
            let dirty_log_us = t.elapsed().as_secs_f64() * 1e6;
            let since = last_sync.elapsed();
            last_sync = Instant::now();
            let n = pages::count(&dirty);
            let expected = self.expected_ms(n);
            let mut round = Round {
                index,
                pages_sent: sent.pages,
                zero_pages: sent.zero_pages + if index == 0 { untouched } else { 0 },
                dirty_pages: n,
                dirty_rate_mib_s: mib_s(n * PAGE_SIZE as u64, since),
                duration_ms: ms(d),
                bytes: sent.bytes,
                throughput_mib_s: mib_s(sent.bytes, d),
                throttle_pct: pct,
                expected_downtime_ms: expected,
                skipped_redirtied: skipped,
                dirty_log_us,
                peek_us: peek_time.as_secs_f64() * 1e6,
            };
            todo = dirty;
            // Fitting the limit is enough to stop, but while rounds still shrink the
            // dirty set well another one is cheap and shortens the pause (the limit is a
            // ceiling, not a target); below a couple of ms the fixed costs dominate and
            // further rounds gain nothing. The next round lasts about n pages /
            // bandwidth and the guest dirties at its rate meanwhile, so each round
            // leaves rate / bandwidth of the set before it.
            let rate = n as f64 * PAGE_SIZE as f64 / since.as_secs_f64().max(1e-6);
            // A set that did not shrink since the last round (a few pages the guest
            // writes all the time) will not shrink in the next one either.
            let shrank = self
                .report
                .rounds
                .last()
                .is_none_or(|prev| n < prev.dirty_pages);
            let shrinking = shrank && rate <= self.bandwidth_cap() * CONVERGING;
            // Rounds shrink only the transfer; the fixed part and the round trips stay.
            let good_enough = self.transfer_ms(n) <= SMALL_DOWNTIME_MS - FIXED_DOWNTIME_MS;
            let reason = if n == 0 {
                Some("no dirty pages left".into())
            } else if expected <= limit && (good_enough || !shrinking) {
                Some(format!(
                    "expected downtime {expected:.1} ms fits the {limit} ms limit"
                ))
            } else if rounds_at_max >= ROUNDS_AT_MAX_THROTTLE {
                Some(format!(
                    "forced: still {expected:.1} ms expected after {rounds_at_max} rounds at {THROTTLE_MAX}% throttle"
                ))
            } else if index + 1 >= MAX_ROUNDS {
                Some(format!("forced: {MAX_ROUNDS} rounds"))
            } else {
                None
            };
            if reason.is_none() && index > 0 {
                // The guest dirties memory faster than half the link carries it: more
                // rounds alone will not converge. Throttle it, at once to the share that
                // should bring its dirty rate under half the bandwidth (its unthrottled
                // rate estimated from the throttled one), and higher each further round.
                let bw = self.bandwidth_cap();
                if rate > bw / 2.0 {
                    let free = rate / (1.0 - pct as f64 / 100.0).max(0.01);
                    let want = (100.0 * (1.0 - bw / 2.0 / free)).ceil() as u32;
                    let next = want
                        .max(if pct == 0 {
                            THROTTLE_START
                        } else {
                            pct + THROTTLE_STEP
                        })
                        .min(THROTTLE_MAX);
                    throttle.set(next);
                    self.report.throttled = true;
                    self.report.max_throttle_pct = self.report.max_throttle_pct.max(next);
                }
                if throttle.get() >= THROTTLE_MAX {
                    rounds_at_max += 1;
                }
            }
            round.expected_downtime_ms = expected;
            self.report.rounds.push(round);
            self.progress("precopy", n, expected, throttle.get());
            if self.status.cancelled() {
                return Err(Fail {
                    msg: "cancelled".into(),
                    cancelled: true,
                    ambiguous: false,
                });
            }
            if let Some(r) = reason {
                self.report.switchover_reason = r;
                return Ok(todo);
            }
        }
    }

    fn read_answer(&mut self, want: wire::Kind, timeout: Duration) -> Result<(), String> {
        let c = &mut self.conns[0];
        c.set_read_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        match wire::read_frame(c, &mut buf) {
            Ok(f) if f.kind() == want => Ok(()),
            Ok(Frame::Abort(m)) => Err(format!("the destination aborted: {m}")),
            Ok(f) => Err(format!("expected {want:?}, got {:?}", f.kind())),
            Err(WireError::Timeout) => Err(format!("no {want:?} within {timeout:?}")),
            Err(e) => Err(format!("waiting for {want:?}: {e}")),
        }
    }

    /// Stops the VM, sends what is left and the state, and hands the VM over.
    fn switchover(&mut self, mut todo: Vec<Bitmap>) -> Result<(), Fail> {
        let m = self.h.machine.clone();
        let ctl = m.control().clone();
        self.progress("switchover", pages::count(&todo), 0.0, 0);
        let tp = Instant::now();
        if ctl.state() != RunState::Paused {
            ctl.pause()
                .map_err(|e| fail(format!("cannot stop the VM: {e}")))?;
            self.paused_by_us = true;
        }
        let dt = &mut self.report.downtime;
        dt.pause_ms = ms(tp.elapsed());
        // The state first, then the last pages: the destination loads the state while
        // the pages arrive.
        let t = Instant::now();
        let state = m
            .save_state()
            .map_err(|e| fail(format!("cannot save the VM state: {e}")))?;
        let bytes = state.encode().map_err(fail)?;
        if bytes.len() > wire::MAX_PAYLOAD {
            return Err(fail(format!(
                "VM state of {} bytes is too large",
                bytes.len()
            )));
        }
        if let Err(e) = wire::write_frame(&mut self.conns[0], &Frame::State(&bytes)) {
            return Err(self.explain(e));
        }
        self.report.downtime.state_ms = ms(t.elapsed());
        let t = Instant::now();
        let last = m
            .take_last_dirty_pages()
            .map_err(|e| fail(format!("dirty log: {e}")))?;
        self.report.downtime.dirty_log_ms = ms(t.elapsed());
        pages::union(&mut todo, &last);
        let all = 0..pages::words(&todo);
        let sent = self.send(&todo, false, all)?;
        self.report.downtime.final_pages = sent.pages + sent.zero_pages;
        for i in 1..self.conns.len() {
            let end = Frame::End(self.totals[i]);
            if let Err(e) = wire::write_frame(&mut self.conns[i], &end) {
                return Err(self.explain(e));
            }
        }
        let complete = Frame::Complete(self.totals[0]);
        let r =
            wire::write_frame(&mut self.conns[0], &complete).and_then(|_| self.conns[0].finish());
        if let Err(e) = r {
            return Err(self.explain(e));
        }
        self.report.downtime.final_pages_ms = ms(t.elapsed());
        self.report.bytes.state = bytes.len() as u64;
        self.report.bytes.total += bytes.len() as u64 + 2 * wire::HEADER_LEN as u64 + 64;
        if self.target.is_file() {
            self.report.downtime_ms = ms(tp.elapsed());
            return Ok(());
        }
        let t = Instant::now();
        self.read_answer(wire::Kind::Ready, HANDSHAKE_TIMEOUT)
            .map_err(fail)?;
        self.report.downtime.confirm_ms = ms(t.elapsed());
        // The destination holds everything: from here the VM is the destination's.
        let t = Instant::now();
        if let Err(e) = wire::write_frame(&mut self.conns[0], &Frame::Go) {
            // GO never left: the destination will not start, so the VM stays here.
            return Err(fail(format!("sending GO: {e}")));
        }
        if let Err(e) = self.read_answer(wire::Kind::Started, HANDSHAKE_TIMEOUT) {
            if e.starts_with("the destination aborted") {
                // It said so: it does not run the VM, so the VM comes back here.
                return Err(fail(e));
            }
            return Err(Fail {
                msg: format!(
                    "GO was sent but the destination did not confirm its start ({e}); \
                     the VM stays paused here: resume it only if the destination is not running it"
                ),
                cancelled: false,
                ambiguous: true,
            });
        }
        self.report.downtime.start_ms = ms(t.elapsed());
        self.report.downtime_ms = ms(tp.elapsed());
        Ok(())
    }
}

/// Migrates the VM behind `h` as `o` asks. The source VM is left running on any failure
/// before the destination confirmed; on success the caller ends this VM (it runs at the
/// destination now). Always returns a report; `status` carries progress and cancel.
pub fn migrate(h: &VmHandle, o: &Options, status: &Status) -> Report {
    let t0 = Instant::now();
    let m = h.machine.clone();
    let mut report = Report {
        status: "failed".into(),
        to: o.to.clone(),
        connections: o.connections,
        downtime_limit_ms: o.downtime_ms,
        max_bandwidth: o.max_bandwidth,
        memory_mib: m.description().memory_mib,
        dirty_log: m.dirty_log_kind().into(),
        source_running: true,
        ..Default::default()
    };
    let target = match o.check() {
        Ok(t) => t,
        Err(e) => {
            report.error = Some(e);
            return report;
        }
    };
    if let Some(g) = &m.description().gpu {
        report.error = Some(format!(
            "this VM has a GPU ({} VF on gpu{}); migrating GPU state is not supported yet",
            g.profile, g.gpu
        ));
        return report;
    }
    match h.state() {
        RunState::Running | RunState::Paused => {}
        s => {
            report.error = Some(format!("the VM is {s:?}, not running"));
            report.source_running = false;
            return report;
        }
    }
    let mut s = Session {
        h,
        o,
        target,
        status,
        conns: Vec::new(),
        frames: Vec::new(),
        totals: Vec::new(),
        report,
        t0,
        rtt: Duration::ZERO,
        bandwidth: 0.0,
        paused_by_us: false,
    };
    status.live_bytes.store(0, Ordering::Relaxed);
    let ring_full_before = m.dirty_stats().ring_full_exits;
    s.progress("setup", 0, 0.0, 0);
    let result = (|| {
        s.connect()?;
        s.report.setup_ms = ms(t0.elapsed());
        let t = Instant::now();
        m.start_dirty_log()
            .map_err(|e| fail(format!("cannot log dirty pages: {e}")))?;
        s.report.dirty_log_start_ms = ms(t.elapsed());
        let throttle =
            Throttle::start(m.control().clone()).map_err(|e| fail(format!("throttle: {e}")))?;
        let todo = s.precopy(&throttle)?;
        throttle.set(0);
        drop(throttle);
        s.switchover(todo)
    })();
    let _ = m.stop_dirty_log();
    let mut report = std::mem::take(&mut s.report);
    report.ring_full_exits = m.dirty_stats().ring_full_exits - ring_full_before;
    report.total_ms = ms(t0.elapsed());
    report.round_count = report.rounds.len() as u32;
    let precopy_ms: f64 = report.rounds.iter().map(|r| r.duration_ms).sum();
    let precopy_bytes: u64 = report.rounds.iter().map(|r| r.bytes).sum();
    if precopy_ms > 0.0 {
        report.throughput_mib_s = precopy_bytes as f64 / (1 << 20) as f64 / (precopy_ms / 1e3);
    }
    match result {
        Ok(()) => {
            report.status = "completed".into();
            report.source_running = false;
        }
        Err(f) => {
            // Tell the destination (it then discards what it has) and take the VM back.
            if let Some(c) = s.conns.first_mut() {
                let _ = c.set_write_timeout(Some(Duration::from_millis(200)));
                let _ = wire::write_frame(c, &Frame::Abort(f.msg.clone()));
            }
            if f.ambiguous {
                report.source_running = false;
            } else if s.paused_by_us {
                report.source_running = m.control().resume().is_ok();
            }
            report.status = if f.cancelled { "cancelled" } else { "failed" }.into();
            report.error = Some(f.msg);
        }
    }
    s.progress("done", 0, 0.0, 0);
    status.active.store(false, Ordering::Relaxed);
    *status.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(report.clone());
    report
}
