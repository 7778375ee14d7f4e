//! The migration driver on the source: owns all the policy and names no device. It
//! moves every component of the VM through the device-migration state machine
//! (`godwit_vmm::migratable`): PRE_COPY rounds over their data until the expected
//! downtime fits the limit (throttling what can be throttled if it never would), then
//! STOP_COPY in stop order, their states and last data, and the handshake that leaves
//! exactly one side running the VM. It runs on its own thread; the API starts it,
//! reads its progress and cancels it. In post-copy (`Mode`) the switchover hands the VM
//! over before the memory that can follow it has moved; `postcopy` then serves what
//! the destination asks for and pushes the rest in the background, until the
//! destination holds all of it.
//!
//! `precopy` holds the rounds, `switchover` the stop and the handshake up to STARTED,
//! `postcopy` the phase after it, `handover` what follows a hand-over the destination
//! did not confirm.

use crate::back::{Answer, BackChannel};
use crate::converge::{self, Converge};
use crate::error::MigrationError;
use crate::outbound::Outbound;
pub use crate::report::Mode;
use crate::report::{
    DowntimePart, Handover, Outcome, Phase, Progress, Report, Round, RoundPart, Status,
};
use crate::transport::{Stream, Target};
use crate::wire::{self, Frame, Hello, Ready, PAGE_SIZE};
use godwit_vmm::control::{RunState, VmExit};
use godwit_vmm::migratable::{step_to, Component, MigState, ReadReport};
use godwit_vmm::VmHandle;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod confined;
mod handover;
mod options;
mod postcopy;
mod precopy;
mod push;
mod switchover;
mod weights;
use handover::await_late_answer;
pub use handover::{take_back, unconfirmed_message};
pub use options::{Options, DEFAULT_CONNECTIONS, MAX_CONNECTIONS};

/// How long the source waits for the destination at each handshake step while the VM
/// runs (ACCEPT, each round's SYNCED).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(20);
/// What a pause may last beyond the downtime limit (or the downtime expected when the
/// driver had to switch over above it) and the time stop-and-copy data takes: the
/// destination's READY must come within it, or the source resumes the VM (no GO is
/// sent, so the destination never starts it).
pub const HANDSHAKE_ALLOWANCE: Duration = Duration::from_secs(3);
/// How long the source waits for STARTED after GO before it reports the hand-over as
/// unconfirmed (it goes on listening for it afterwards).
const STARTED_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an unconfirmed hand-over goes on listening for STARTED or ABORT.
const LATE_ANSWER_WAIT: Duration = Duration::from_secs(600);
/// A write that makes no progress for this long means the destination is gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a failed migration's ABORT may take to be written, and then to reach the
/// destination, before the connection is reset instead.
const ABORT_WAIT: Duration = Duration::from_millis(200);
/// A VM whose memory is still arriving waits for it to be whole before it moves on, as
/// long as some page arrives within this (a lazy restore's background reads one every
/// few microseconds; a post-copy into it whose link broke delivers nothing).
const ARRIVAL_STALL: Duration = Duration::from_secs(10);
/// Rounds with everything held back as far as it goes after which the driver switches
/// over even above the limit.
const ROUNDS_AT_MAX_THROTTLE: u32 = 5;
const MAX_ROUNDS: u32 = 200;
/// Below this expected downtime (less the round trips, which no round shortens) another
/// round gains nothing: the fixed costs dominate.
const SMALL_DOWNTIME_MS: f64 = 2.0;
/// Rounds that leave at most this share of the dirty set are worth another round.
const CONVERGING: f64 = 0.75;
/// The switchover's fixed part (stops, states, handshake) measured here: about 0.7 ms.
const FIXED_DOWNTIME_MS: f64 = 1.0;
/// Pages read from a component before the driver looks at cancel and the back channel.
const SLICE_PAGES: u64 = 16384;

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

/// What a failure to reach `target` is.
fn unreachable_at(target: &Target) -> impl Fn(std::io::Error) -> MigrationError + '_ {
    move |e| MigrationError::Unreachable {
        target: target.to_string(),
        source: e,
    }
}

/// A component and its name (its section's), fixed for the migration.
struct Part {
    c: Arc<dyn Component>,
    name: String,
    /// It takes part in pre-copy (else it is stop-and-copy).
    precopy: bool,
    /// In post-copy, its data follows the VM (it cannot change any more).
    lazy: bool,
}

struct Driver<'a> {
    o: &'a Options,
    /// The VM that moves: whether it still runs here.
    vm: VmHandle,
    target: Target,
    status: &'a Status,
    parts: Vec<Part>,
    out: Option<Outbound>,
    back: Option<BackChannel>,
    report: Report,
    phase: Phase,
    t0: Instant,
    /// Pages of every component's memory, for progress.
    space_pages: u64,
    /// The round trip to the destination: the shortest exchange seen so far. HELLO to
    /// ACCEPT is only an upper bound (the destination builds the VM in between, tens
    /// of ms for a large one); the SYNC that ends a small round comes back after one
    /// round trip. Counting the VM's build twice into every expected downtime kept
    /// cells that fit the limit throttling for seconds.
    rtt: Duration,
    /// Bytes per second the link has shown.
    bandwidth: f64,
    converge: Converge,
    /// The downtime the last round expected.
    expected_ms: f64,
    /// When the VM stopped, once it has.
    paused_at: Option<Instant>,
    /// What the pause may last (see HANDSHAKE_ALLOWANCE).
    pause_budget: Duration,
    /// The switchover goes post-copy, and why.
    postcopy: Option<String>,
    /// Ties the data connections (and a post-copy recovery) to this migration.
    session: u64,
    /// Bytes sent on connections given up (post-copy recovery).
    bytes_base: u64,
    /// Post-copy: pages the destination wants ahead of a touch, served before the
    /// rest of the background stream.
    ahead: std::collections::VecDeque<(u32, Vec<u64>)>,
    /// TLS credentials for the connections (and a post-copy recovery's).
    tls: Option<crate::tls::Creds>,
    /// The destination's addresses, looked up before this thread may open no file.
    addrs: Vec<SocketAddr>,
    /// Setup: pages of this VM's memory still arriving, while it waits for them.
    arriving: u64,
    /// Post-copy: the connections but the main one, once the background stream has
    /// had them (given up with the rest).
    bg: Option<Outbound>,
    /// The vCPUs lowered and the migration's threads raised while pre-copy runs
    /// (`weights`).
    weights: weights::Weights,
}

type Res<T> = Result<T, MigrationError>;

impl Driver<'_> {
    fn progress(&self, remaining: u64, expected_ms: f64) {
        let r = &self.report;
        self.status.set_progress(Progress {
            phase: self.phase,
            round: r.rounds.len() as u32,
            bytes_sent: r.bytes.total,
            pages_sent: r.bytes.pages_sent,
            remaining_pages: remaining,
            memory_pages: self.space_pages,
            dirty_rate_mib_s: r.rounds.last().map_or(0.0, |x| x.dirty_rate_mib_s),
            expected_downtime_ms: expected_ms,
            throttle_pct: self.converge.max_pct(),
            elapsed_ms: ms(self.t0.elapsed()),
            arriving_pages: self.arriving,
        });
    }

    /// Pages of this VM's memory still arriving.
    fn pages_arriving(&self) -> u64 {
        self.parts.iter().filter_map(|p| p.c.arriving()).sum()
    }

    /// A VM whose memory is still arriving (a post-copy into it, a lazy restore) cannot
    /// be read out yet: it moves once whole. Waits while pages keep arriving, and gives
    /// up once none has for `ARRIVAL_STALL` (a post-copy into it whose link broke).
    fn wait_whole(&mut self) -> Res<()> {
        let (mut left, mut since) = (self.pages_arriving(), Instant::now());
        if left > 0 {
            tracing::info!(pages = left, "the VM's memory is still arriving: waiting");
        }
        while left > 0 {
            if self.status.cancelled() {
                return Err(MigrationError::Cancelled);
            }
            if since.elapsed() > ARRIVAL_STALL {
                return Err(MigrationError::StillArriving {
                    pages: left,
                    stalled: ARRIVAL_STALL,
                });
            }
            self.arriving = left;
            self.progress(0, 0.0);
            std::thread::sleep(Duration::from_millis(10));
            let now = self.pages_arriving();
            if now < left {
                since = Instant::now();
            }
            left = now;
        }
        self.arriving = 0;
        Ok(())
    }

    fn out(&mut self) -> &mut Outbound {
        self.out.as_mut().expect("connected")
    }

    /// What a failed write means: the destination's ABORT reason when it sent one, a
    /// cancel when one was asked for.
    fn send_error(&mut self, e: std::io::Error) -> MigrationError {
        if self.status.cancelled() {
            return MigrationError::Cancelled;
        }
        if let Some(b) = &mut self.back {
            if let Some(Answer::Abort(m)) = b.wait(Duration::from_millis(500)) {
                return MigrationError::Aborted(m);
            }
        }
        MigrationError::Send {
            target: self.target.to_string(),
            source: e,
        }
    }

    /// Between two slices of work: a cancel, the VM's end (before it is handed over:
    /// its guest exited, or it was shut down), or anything the destination said, ends
    /// the migration now.
    fn check_in(&mut self) -> Res<()> {
        if self.status.cancelled() {
            return Err(MigrationError::Cancelled);
        }
        if matches!(self.phase, Phase::Setup | Phase::Precopy) {
            if let Some(why) = ended(&self.vm) {
                return Err(MigrationError::VmEnded(why));
            }
        }
        match self.back.as_mut().and_then(|b| b.poll()) {
            None => Ok(()),
            Some(Answer::Abort(m)) => Err(MigrationError::Aborted(m)),
            Some(Answer::Closed) => Err(MigrationError::Closed("during the transfer")),
            Some(Answer::Failed(e)) => Err(e.into()),
            Some(a) => Err(MigrationError::Unexpected {
                want: "nothing",
                got: format!("{a:?}"),
            }),
        }
    }

    /// Waits for the destination's next answer.
    fn answer(&mut self, want: &'static str) -> Res<Answer> {
        self.answer_within(want, HANDSHAKE_TIMEOUT)
    }

    /// Waits at most `limit` for the destination's next answer. A cancel (which shuts
    /// the sockets down) or an expired pause ends the wait and says so.
    fn answer_within(&mut self, want: &'static str, limit: Duration) -> Res<Answer> {
        let b = self
            .back
            .as_mut()
            .expect("live migrations have a back channel");
        let a = b.wait(limit);
        if self.status.cancelled() {
            return Err(MigrationError::Cancelled);
        }
        let a = a.ok_or(MigrationError::Timeout {
            what: want,
            after: limit,
        })?;
        match a {
            Answer::Abort(m) => Err(MigrationError::Aborted(m)),
            Answer::Closed => Err(MigrationError::Closed(want)),
            Answer::Failed(e) => Err(e.into()),
            Answer::Other(k) => Err(MigrationError::Unexpected {
                want,
                got: format!("{k:?}"),
            }),
            a => Ok(a),
        }
    }

    fn connect(&mut self, h: &VmHandle) -> Res<()> {
        let session = (std::process::id() as u64) << 32
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
        self.session = session;
        let hello = Hello {
            wire_version: wire::WIRE_VERSION,
            guest: h.desc.guest.clone(),
            sections: self.parts.iter().map(|p| p.c.section()).collect(),
            connections: self.o.lanes(),
            session,
            snapshot: self.target.is_file(),
            postcopy_first: self.o.mode == Mode::Postcopy,
            raise_readers: self.raises_readers(),
            asks_postcopy: true,
        };
        let (target, addrs) = (self.target.clone(), self.addrs.clone());
        let t = Instant::now();
        self.open_main(&target, &addrs, &Frame::Hello(hello))?;
        if !self.target.is_file() {
            match self.answer("ACCEPT")? {
                Answer::Accept(a) => self.report.postcopy_unavailable = a.no_postcopy,
                Answer::Refuse(why) => return Err(MigrationError::Refused(why)),
                a => {
                    return Err(MigrationError::Unexpected {
                        want: "ACCEPT",
                        got: format!("{a:?}"),
                    })
                }
            }
            self.rtt = t.elapsed();
        }
        self.join_lanes(&target, &addrs)
    }

    /// The main connection to `target`, opened with `first` (HELLO, or RESUME for a
    /// post-copy recovery): the sending lanes and the back channel start with it.
    fn open_main(&mut self, target: &Target, addrs: &[SocketAddr], first: &Frame) -> Res<()> {
        let unreachable = unreachable_at(target);
        let main = Stream::dial(target, addrs, Duration::from_secs(5), self.tls.as_ref())
            .map_err(unreachable_at(target))?;
        if !target.is_file() {
            let _ = main.set_write_timeout(Some(WRITE_TIMEOUT));
            let reader = main.try_clone().ok_or_else(|| {
                unreachable(std::io::Error::other("the connection cannot be shared"))
            })?;
            self.back = Some(BackChannel::new(reader));
        }
        self.register(&main);
        self.out = Some(
            Outbound::checked_by(
                vec![main],
                self.o.max_bandwidth,
                self.status.live_bytes.clone(),
                self.o.page_checks,
            )
            .map_err(unreachable_at(target))?,
        );
        match self.out().in_place() {
            Some(wire::Checked::Head) => tracing::info!(
                "pages go from guest memory to the socket; the transport checks their data"
            ),
            Some(_) => {
                tracing::info!("pages go from guest memory to the socket, each with its own CRC")
            }
            None => {}
        }
        self.out().control(first).map_err(|e| self.send_error(e))
    }

    /// The data connections, each opened with JOIN.
    fn join_lanes(&mut self, target: &Target, addrs: &[SocketAddr]) -> Res<()> {
        for index in 1..self.o.lanes() {
            let mut c = Stream::dial(target, addrs, Duration::from_secs(5), self.tls.as_ref())
                .map_err(unreachable_at(target))?;
            let _ = c.set_write_timeout(Some(WRITE_TIMEOUT));
            let join = Frame::Join {
                session: self.session,
                index,
            };
            wire::write_frame(&mut c, &join).map_err(|e| self.send_error(e))?;
            self.register(&c);
            self.out().add_lane(c).map_err(unreachable_at(target))?;
        }
        // Set up before anything is timed: a post-copy stops the VM right after this.
        self.out().ready();
        Ok(())
    }

    /// Lets a cancel shut this socket down.
    fn register(&self, s: &Stream) {
        if let Some(c) = s.try_clone() {
            self.status
                .interrupt
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .sockets
                .push(c);
        }
    }

    /// Reads each saving component's data until it has nothing left for this round;
    /// returns what was sent, and how long it took, per component.
    fn send_all(&mut self) -> Res<Vec<(ReadReport, Duration)>> {
        let mut reports = Vec::new();
        for i in 0..self.parts.len() {
            let t = Instant::now();
            let mut total = ReadReport::default();
            // A stop-and-copy component has nothing to send until it is stopped; a lazy
            // one sends the rest after the hand-over; a round cut short by a switch to
            // post-copy leaves its pages to post-copy.
            while self.parts[i].c.state().saving() && !self.parts[i].lazy && !self.switch_asked() {
                let c = self.parts[i].c.clone();
                let info = c
                    .precopy_info()
                    .map_err(MigrationError::component(&self.parts[i].name))?;
                if info.total() == 0 {
                    break;
                }
                let cancel = &self.status.cancel;
                let out = self.out.as_mut().expect("connected");
                let r = c.read(&mut out.sink(i as u32, cancel), SLICE_PAGES);
                let r = match r {
                    Ok(r) => r,
                    Err(godwit_vmm::migratable::ComponentError::Io(e)) => {
                        return Err(self.send_error(e))
                    }
                    Err(e) => return Err(MigrationError::component(&self.parts[i].name)(e)),
                };
                total += r;
                self.check_in()?;
            }
            reports.push((total, t.elapsed()));
        }
        self.out().flush().map_err(|e| self.send_error(e))?;
        for (i, (r, _)) in reports.iter().enumerate() {
            self.count_sent(i, r);
        }
        Ok(reports)
    }

    /// What part `i` sent, into the report's byte counts.
    fn count_sent(&mut self, i: usize, r: &ReadReport) {
        let total = self.wire_bytes();
        let b = &mut self.report.bytes;
        let c = b.components.entry(self.parts[i].name.clone()).or_default();
        c.pages_sent += r.pages;
        c.page_bytes += r.pages * PAGE_SIZE as u64;
        c.zero_pages += r.zero_pages;
        b.pages_sent += r.pages;
        b.memory_data += r.pages * PAGE_SIZE as u64;
        b.zero_pages += r.zero_pages;
        b.total = total;
    }

    /// Every byte the connections carried so far: those given up (post-copy
    /// recovery), the ones in use and post-copy's background.
    fn wire_bytes(&self) -> u64 {
        self.bytes_base
            + self.out.as_ref().map_or(0, |o| o.bytes)
            + self.bg.as_ref().map_or(0, |o| o.bytes)
    }

    /// Ends a round: it is over once the destination has taken in all of it (SYNC on
    /// every connection, SYNCED back). Until then its pages are still in flight: a
    /// switchover now would wait for them inside the pause (a destination that first
    /// touches fresh memory takes it in slowly), and the bandwidth it measured would
    /// be the sockets' buffers, not the destination's.
    fn round_end(&mut self, n: u64) -> Res<()> {
        if self.target.is_file() {
            return Ok(());
        }
        self.out().round_end(n).map_err(|e| self.send_error(e))?;
        let t = Instant::now();
        match self.answer("SYNCED")? {
            Answer::Synced(m) if m == n => {
                self.rtt = self.rtt.min(t.elapsed());
                Ok(())
            }
            a => Err(MigrationError::Unexpected {
                want: "SYNCED",
                got: format!("{a:?}"),
            }),
        }
    }

    /// `migrate-postcopy` was asked for while the rounds run.
    fn switch_asked(&self) -> bool {
        self.phase == Phase::Precopy && self.status.postcopy_now.load(Ordering::Relaxed)
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

    fn learn_bandwidth(&mut self, bytes: u64, d: Duration) {
        // Small rounds say more about latency than bandwidth; the floor keeps a tiny
        // first round from promising nothing can ever fit.
        if bytes >= 4 << 20 || self.bandwidth == 0.0 {
            let bw = bytes as f64 / d.as_secs_f64().max(1e-6);
            self.bandwidth = bw.max(64.0 * (1 << 20) as f64);
        }
    }

    fn throttle(&self, changes: Vec<converge::Change>) {
        for (i, pct) in changes {
            let p = &self.parts[i];
            if !p.c.throttle(pct) && pct > 0 {
                tracing::warn!(component = p.name, "cannot be held back");
            }
        }
    }
}

/// Migrates the VM behind `h` as `o` asks. The source VM is left running on any
/// failure before GO; on success the caller ends this VM (it runs at the destination
/// now). Always returns a report; `status` carries progress and cancel. A hand-over
/// left unconfirmed (GO sent, no answer) leaves the VM stopped here.
pub fn migrate(h: &VmHandle, o: &Options, status: &Status) -> Report {
    migrate_keeping(h, o, status).0
}

/// `migrate`, and for an unconfirmed hand-over the back channel on which the
/// destination may still answer.
fn migrate_keeping(h: &VmHandle, o: &Options, status: &Status) -> (Report, Option<BackChannel>) {
    let t0 = Instant::now();
    let m = h.machine.clone();
    let mut parts: Vec<Part> = m
        .components()
        .iter()
        .map(|c| {
            let name = c.section().name;
            Part {
                precopy: !o.stop_copy.contains(&name),
                lazy: false,
                name,
                c: c.clone(),
            }
        })
        .collect();
    parts.sort_by_key(|p| p.c.stop_order());
    let report = Report {
        status: Outcome::Failed,
        mode: o.mode,
        to: o.to.clone(),
        connections: o.lanes(),
        page_checks: o.page_checks,
        vcpu_priority: crate::vcpu_priority::VcpuPriority::Normal,
        migration_priority: crate::migration_priority::MigrationPriority::Normal,
        downtime_limit_ms: o.downtime_ms,
        max_bandwidth: o.max_bandwidth,
        memory_mib: m.description().memory_mib,
        sections: parts.iter().map(|p| p.name.clone()).collect(),
        stop_copy: parts
            .iter()
            .filter(|p| !p.precopy)
            .map(|p| p.name.clone())
            .collect(),
        dirty_log: m.dirty_log_kind().into(),
        source_running: true,
        ..Default::default()
    };
    let space_pages = parts.iter().map(|p| p.c.pages()).sum();
    let mut d = Driver {
        o,
        vm: h.clone(),
        target: Target::File(Default::default()),
        status,
        parts,
        out: None,
        back: None,
        report,
        phase: Phase::Setup,
        t0,
        space_pages,
        rtt: Duration::ZERO,
        bandwidth: 0.0,
        converge: Converge::new(vec![]),
        expected_ms: 0.0,
        paused_at: None,
        pause_budget: Duration::ZERO,
        postcopy: None,
        session: 0,
        bytes_base: 0,
        ahead: Default::default(),
        tls: None,
        addrs: Vec::new(),
        arriving: 0,
        bg: None,
        weights: Default::default(),
    };
    status.live_bytes.store(0, Ordering::Relaxed);
    status.postcopy_now.store(false, Ordering::SeqCst);
    status.postcopy_possible.store(false, Ordering::SeqCst);
    *status.no_postcopy.lock().unwrap_or_else(|e| e.into_inner()) = None;
    *status.interrupt.lock().unwrap_or_else(|e| e.into_inner()) = Default::default();
    let ring_full_before = m.dirty_stats().ring_full_exits;
    d.progress(0, 0.0);
    let result = (|| {
        d.target = o.check().map_err(MigrationError::BadOptions)?;
        if let Some(n) = o
            .stop_copy
            .iter()
            .find(|n| !d.parts.iter().any(|p| &p.name == *n))
        {
            let have: Vec<_> = d.parts.iter().map(|p| p.name.as_str()).collect();
            return Err(MigrationError::BadOptions(format!(
                "stop-and-copy names {n:?}, which this VM does not have (it has {})",
                have.join(", ")
            )));
        }
        match h.state() {
            RunState::Running | RunState::Paused => {}
            s => return Err(MigrationError::NotRunning(format!("{s:?}").to_lowercase())),
        }
        d.wait_whole()?;
        d.confine()?;
        d.connect(h)?;
        d.report.setup_ms = ms(t0.elapsed());
        d.check_in()?;
        if let Some(why) = &d.report.postcopy_unavailable {
            *status.no_postcopy.lock().unwrap_or_else(|e| e.into_inner()) = Some(why.clone());
            if matches!(o.mode, Mode::Hybrid | Mode::Postcopy) {
                return Err(MigrationError::NoPostcopy {
                    mode: o.mode,
                    why: why.clone(),
                });
            }
        }
        // From here on `migrate-postcopy` is heard (at the first round's slices).
        status.postcopy_possible.store(
            !d.target.is_file() && d.report.postcopy_unavailable.is_none(),
            Ordering::SeqCst,
        );
        status.settled();
        let t = Instant::now();
        for p in d.parts.iter().filter(|p| p.precopy) {
            step_to(&*p.c, MigState::PreCopy).map_err(MigrationError::component(&p.name))?;
        }
        d.report.dirty_log_start_ms = ms(t.elapsed());
        d.take_weights(h);
        d.converge = Converge::new(
            d.parts
                .iter()
                .enumerate()
                .filter(|(_, p)| p.precopy)
                .filter_map(|(i, p)| Some((i, p.name.clone(), p.c.throttle_order()?)))
                .collect(),
        );
        d.phase = Phase::Precopy;
        if o.mode == Mode::Postcopy {
            d.postcopy = Some("post-copy asked for: the VM moves first".into());
        } else {
            d.precopy()?;
        }
        d.switchover()?;
        if d.postcopy.is_some() {
            d.serve_postcopy()?;
        }
        Ok(())
    })();
    // A migration that failed before its rounds answers a waiting `migrate-postcopy`.
    status.settled();
    // Whatever the outcome: a VM that stays here runs on with its own weight.
    d.give_weights_back();
    // A VM that ended here before it was handed over is why the rounds stopped (its
    // end cancels them: `watch_end`) or its vCPUs could not be stopped; a cancel that
    // came with this godwit's own stop ends the VM here too. Once GO is on its way the
    // VM is the destination's, and what broke is said as it is.
    let result = match result {
        Err(e @ (MigrationError::Cancelled | MigrationError::Component { .. }))
            if !status.committed() =>
        {
            Err(match (ended(h), e, status.stopping()) {
                (Some(why), _, _) => MigrationError::VmEnded(why),
                (None, MigrationError::Cancelled, Some(why)) => MigrationError::Stopping(why),
                (None, e, _) => e,
            })
        }
        r => r,
    };
    let mut report = std::mem::take(&mut d.report);
    // Everything that went on the wire, an unfinished round's too (the components'
    // counts are taken at each round's end; a cancel or a failure mid-round left the
    // total at the last one's).
    report.bytes.total = report.bytes.total.max(d.wire_bytes());
    report.throttle = d.converge.report();
    report.ring_full_exits = m.dirty_stats().ring_full_exits - ring_full_before;
    report.total_ms = ms(t0.elapsed());
    report.round_count = report.rounds.len() as u32;
    let precopy_ms: f64 = report.rounds.iter().map(|r| r.duration_ms).sum();
    let precopy_bytes: u64 = report.rounds.iter().map(|r| r.bytes).sum();
    if precopy_ms > 0.0 {
        report.throughput_mib_s = precopy_bytes as f64 / (1 << 20) as f64 / (precopy_ms / 1e3);
    }
    let mut kept = None;
    if report.ran.is_empty() {
        // Failed before the hand-over: the VM never ran ahead of its memory.
        report.ran = "precopy".into();
        if result.is_err() {
            report.postcopy = None;
        }
    }
    match result {
        Ok(()) => {
            // The VM runs at the destination: close every component's data session.
            for p in &d.parts {
                let _ = step_to(&*p.c, MigState::Stop);
            }
            report.status = Outcome::Completed;
            report.source_running = false;
        }
        Err(e) => {
            // Tell the destination (it then discards what it has), then take the VM
            // back, unless it may be running there. In post-copy it does run there,
            // and an ABORT would only tell it to give up pages it still needs.
            if let Some(out) = d.out.as_mut().filter(|_| !e.split()) {
                let main = status
                    .interrupt
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .sockets
                    .first()
                    .and_then(|s| s.try_clone());
                if let Some(s) = &main {
                    let _ = s.set_write_timeout(Some(ABORT_WAIT));
                }
                let told = out
                    .control(&Frame::Abort(e.to_string()))
                    .and_then(|()| out.sync())
                    .is_ok();
                // A destination that has not read what came before (the connection is
                // full) would hear neither the ABORT nor the close behind it: it is
                // reset instead, which it hears at once.
                if let Some(s) = main.filter(|s| !(told && s.delivered_within(ABORT_WAIT))) {
                    tracing::info!(
                        "the destination has not taken the migration's end: its connection \
                         is reset"
                    );
                    s.reset_on_close();
                }
                out.close();
            }
            if e.split() {
                // The destination runs the VM: this copy is stale, and what it still
                // holds is the only copy of those pages. It stays stopped, its data
                // sessions open.
                report.source_running = false;
            } else if e.ambiguous() {
                report.source_running = false;
                kept = d.back.take();
                // The pause so far (it goes on until the hand-over is settled).
                if let Some(tp) = d.paused_at {
                    report.downtime_ms = ms(tp.elapsed());
                }
            } else {
                let mut running = true;
                for p in d.parts.iter().rev() {
                    // A VM that ended does not run again: each component still closes
                    // its data session, and its refusal to run says nothing new.
                    let r = step_to(&*p.c, MigState::Running);
                    if matches!(e, MigrationError::VmEnded(_) | MigrationError::Stopping(_)) {
                        running = false;
                    } else if let Err(err) = r {
                        tracing::error!(
                            component = p.name,
                            "cannot resume after a failed migration: {err}"
                        );
                        running = false;
                    }
                }
                report.source_running = running && h.state() != RunState::Stopped;
                // The real pause, from the stop to the resume.
                if let Some(tp) = d.paused_at {
                    report.downtime_ms = ms(tp.elapsed());
                }
            }
            report.status = if matches!(e, MigrationError::Cancelled | MigrationError::Stopping(_))
            {
                Outcome::Cancelled
            } else {
                Outcome::Failed
            };
            report.error_kind = Some(e.kind().into());
            report.error = Some(e.to_string());
        }
    }
    drop(d.back.take());
    drop(d.out.take());
    status
        .interrupt
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .sockets
        .clear();
    d.phase = Phase::Done;
    d.report = report;
    d.progress(0, 0.0);
    let report = std::mem::take(&mut d.report);
    *status.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(report.clone());
    (report, kept)
}

/// Why the VM has stopped for good here, if it has (not paused, not moved away).
fn ended(h: &VmHandle) -> Option<String> {
    Some(match h.ctl.exit_requested_within(Duration::ZERO)? {
        VmExit::Guest(code) => format!("its guest exited with status {code}"),
        VmExit::Shutdown => "it was shut down".into(),
        VmExit::Crash(m) => format!("its guest crashed: {m}"),
        VmExit::Error(m) => format!("it failed: {m}"),
        VmExit::Signal(s) => format!("godwit was stopped by signal {s}"),
        VmExit::Migrated(_) => return None,
    })
}

/// Until `done`, watches for the VM's end: a guest that exits (or a VM shut down)
/// while it migrates leaves nothing to move, and the slice being read (up to
/// SLICE_PAGES, seconds under a bandwidth cap) stops at its next page, as for a cancel.
fn watch_end(h: VmHandle, status: Arc<Status>, done: Arc<AtomicBool>) {
    while !done.load(Ordering::SeqCst) {
        if let Some(e) = h.ctl.exit_requested_within(Duration::from_millis(50)) {
            if !matches!(e, VmExit::Migrated(_)) {
                status.vm_ended();
            }
            return;
        }
    }
}

/// Starts `migrate` on its own thread. The caller (the API) owns `status.active`.
pub fn start(
    h: VmHandle,
    o: Options,
    status: Arc<Status>,
) -> std::io::Result<std::thread::JoinHandle<Report>> {
    // Before the thread: a `migrate-postcopy` right after this returns must wait.
    status.settling();
    std::thread::Builder::new()
        .name("migration".into())
        .spawn(move || {
            let done = Arc::new(AtomicBool::new(false));
            let watch = {
                let (h, status, done) = (h.clone(), status.clone(), done.clone());
                std::thread::Builder::new()
                    .name("migration-watch".into())
                    .spawn(move || watch_end(h, status, done))
            };
            let (r, back) = migrate_keeping(&h, &o, &status);
            done.store(true, Ordering::SeqCst);
            if let Ok(w) = watch {
                let _ = w.join();
            }
            if r.error_kind.as_deref() == Some("postcopy_broken") {
                // The VM runs at the destination; this stale copy must never run, and
                // it holds pages the destination still lacks.
                let _ = h.ctl.set_owner(None);
                let _ = h.ctl.set_owner(Some(
                    "post-copy broke: the VM runs at the destination and this stale copy \
                     keeps the pages it still lacks; it must never run again",
                ));
            }
            if let Some(back) = back {
                // The VM stays stopped and owned: neither resume nor another migration
                // may run it until the user has checked (resume --force), or the
                // destination answers after all.
                let _ = h.ctl.set_owner(None);
                let _ = h.ctl.set_owner(Some(&unconfirmed_message(&o.to)));
                *status.handover.lock().unwrap_or_else(|e| e.into_inner()) = Some(Handover {
                    to: o.to.clone(),
                    socket: back.socket(),
                });
                let (h, status, to) = (h.clone(), status.clone(), o.to.clone());
                let _ = std::thread::Builder::new()
                    .name("late-answer".into())
                    .spawn(move || await_late_answer(back, h, status, to));
            }
            status.active.store(false, Ordering::SeqCst);
            r
        })
}
