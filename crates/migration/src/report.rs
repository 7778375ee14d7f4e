//! What a migration tells its user: live progress while it runs, a report at the end.
//! The driver names no device, so everything a component did is reported under its
//! section's name ("ram", "gpu", ...), beside the totals.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// How a migration ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The destination runs the VM.
    Completed,
    #[default]
    Failed,
    Cancelled,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(match self {
            Outcome::Completed => "completed",
            Outcome::Failed => "failed",
            Outcome::Cancelled => "cancelled",
        })
    }
}

/// Where a migration is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Connecting; the destination checks the VM.
    #[default]
    Setup,
    /// Rounds of data while the VM runs.
    Precopy,
    /// The VM is stopped here and its last data moves.
    Switchover,
    /// GO is sent: the VM belongs to the destination.
    Handover,
    /// The VM runs at the destination while the rest of its memory moves there.
    Postcopy,
    /// Post-copy with its connections broken: waiting for `migrate-recover`.
    PostcopyPaused,
    Done,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        let s = match self {
            Phase::Setup => "setup",
            Phase::Precopy => "precopy",
            Phase::Switchover => "switchover",
            Phase::Handover => "handover",
            Phase::Postcopy => "postcopy",
            Phase::PostcopyPaused => "postcopy_paused",
            Phase::Done => "done",
        };
        f.write_str(s)
    }
}

/// One component's part of a round.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RoundPart {
    pub pages_sent: u64,
    pub zero_pages: u64,
    /// Pages written during the round (due again).
    pub dirty_pages: u64,
    pub dirty_rate_mib_s: f64,
    pub skipped_redirtied: u64,
    /// Reading its dirty log at the end of the round.
    pub dirty_log_us: f64,
    pub peek_us: f64,
    /// What the component counted besides (e.g. pages a GPU wrote into RAM by DMA).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, u64>,
}

/// One pre-copy round (round 0 is the first pass); totals over the components.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Round {
    pub index: u32,
    /// Pages sent as data.
    pub pages_sent: u64,
    /// Pages found to be zero (not sent as data).
    pub zero_pages: u64,
    /// Dirty pages found at the end of the round.
    pub dirty_pages: u64,
    pub dirty_rate_mib_s: f64,
    pub duration_ms: f64,
    pub bytes: u64,
    pub throughput_mib_s: f64,
    /// Throttle in force during the round (percent of time held back), the most of
    /// any component.
    pub throttle_pct: u32,
    /// Each component held back during the round, and how far.
    #[serde(default)]
    pub throttle: BTreeMap<String, u32>,
    /// Downtime if the VM were stopped after this round.
    pub expected_downtime_ms: f64,
    /// Pages not sent because they were written again meanwhile (the next round sends
    /// them).
    pub skipped_redirtied: u64,
    /// Reading (and re-protecting) the dirty logs at the end of the round.
    pub dirty_log_us: f64,
    /// Looking at the dirty logs during the round to find re-written pages, in all.
    pub peek_us: f64,
    pub components: BTreeMap<String, RoundPart>,
}

/// How far and how long auto-converge held one component back.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Throttled {
    pub max_pct: u32,
    /// Pre-copy rounds it was held back through.
    pub rounds: u32,
    /// Time held back, in all.
    pub ms: f64,
}

/// What one component sent in all.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ComponentBytes {
    pub pages_sent: u64,
    /// 4 KiB per page sent.
    pub page_bytes: u64,
    pub zero_pages: u64,
    /// Its state part.
    pub state: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Bytes {
    /// Everything written to the stream(s).
    pub total: u64,
    /// Page data (4 KiB per page sent).
    pub memory_data: u64,
    /// The components' state parts (vCPUs, devices, GPU registers...).
    pub state: u64,
    pub pages_sent: u64,
    /// Zero pages recognised and sent as (address, count) runs or not at all.
    pub zero_pages: u64,
    pub components: BTreeMap<String, ComponentBytes>,
}

/// One component's part of the pause.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DowntimePart {
    /// Stopping it (the vCPUs parking; a GPU preempting its command at a chunk
    /// boundary and quiescing).
    pub stop_ms: f64,
    /// Reading and sending its state part.
    pub state_ms: f64,
    pub state_bytes: u64,
    /// Its last dirty-log read.
    pub dirty_log_ms: f64,
    pub final_pages: u64,
    pub final_pages_ms: f64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, u64>,
}

/// Where the switchover time went.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Downtime {
    /// Stopping every component, in order.
    pub pause_ms: f64,
    /// Reading and sending the state parts (sent first: the destination loads them
    /// while the last pages arrive).
    pub state_ms: f64,
    /// The last reads of the dirty logs.
    pub dirty_log_ms: f64,
    /// The last dirty pages.
    pub final_pages_ms: f64,
    pub final_pages: u64,
    /// Until the destination confirmed it holds and has loaded everything.
    pub confirm_ms: f64,
    /// Of which: the destination loading the states (as it measured).
    pub restore_ms: f64,
    /// Until the destination's VM runs.
    pub start_ms: f64,
    /// Of which: the destination starting the VM (as it measured).
    pub vm_start_ms: f64,
    pub components: BTreeMap<String, DowntimePart>,
}

/// How memory moves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Rounds while the VM runs, then the rest inside the pause (throttling what
    /// writes when rounds alone do not converge).
    #[default]
    Precopy,
    /// The VM starts at the destination at once; its memory follows, asked for where
    /// touched and pushed in the background.
    Postcopy,
    /// Pre-copy rounds while they converge, then post-copy instead of throttling; a
    /// rest the pause carries in a millisecond or less ends it as pre-copy.
    Hybrid,
    /// Pre-copy when it fits the downtime limit, else hybrid.
    Auto,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Precopy => "precopy",
            Mode::Postcopy => "postcopy",
            Mode::Hybrid => "hybrid",
            Mode::Auto => "auto",
        })
    }
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Mode, String> {
        Ok(match s {
            "precopy" => Mode::Precopy,
            "postcopy" => Mode::Postcopy,
            "hybrid" => Mode::Hybrid,
            "auto" => Mode::Auto,
            _ => {
                return Err(format!(
                    "{s:?} is not a mode (precopy, postcopy, hybrid, auto)"
                ))
            }
        })
    }
}

/// What post-copy did: the switch, the window in which the VM's memory was split over
/// both hosts, and the pages moved in it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Postcopy {
    /// From the start of the migration to the switch (the VM stopping here).
    pub switched_at_ms: f64,
    pub reason: String,
    /// Pages the destination lacked when it started the VM, per component.
    pub missing_pages: BTreeMap<String, u64>,
    /// From the switch to the destination holding every page (DONE).
    pub window_ms: f64,
    /// Pages sent because the destination asked (a touch waited for them).
    pub requested_pages: u64,
    /// Pages pushed in the background.
    pub background_pages: u64,
    /// Of those, pages the destination wanted ahead of a touch (a GPU command's).
    #[serde(default)]
    pub ahead_pages: u64,
    /// Requests the source refused (pages outside the VM): counted, never served.
    pub refused_requests: u64,
    /// Touches of a page that had to be fetched, over all components.
    pub remote_faults: u64,
    /// Pages the background stream placed before anything touched them.
    pub prepaged_pages: u64,
    /// Fault to page placed at the destination (the component with the most faults).
    pub fault_latency: godwit_vmm::migratable::Latency,
    /// What each component's destination side counted.
    pub destination: BTreeMap<String, godwit_vmm::migratable::FaultStats>,
    /// Times the connections broke and post-copy went on on new ones.
    #[serde(default)]
    pub recoveries: u32,
    /// Set when the VM ended at the destination before all its memory got there (the
    /// rest was no longer needed): how it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_ended: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    /// The mode asked for.
    #[serde(default)]
    pub mode: Mode,
    /// What ran: "precopy" (the VM moved whole inside the pause) or "postcopy" (it
    /// ran at the destination ahead of its memory).
    #[serde(default)]
    pub ran: String,
    /// Set when post-copy ran.
    #[serde(default)]
    pub postcopy: Option<Postcopy>,
    /// Why post-copy could not come to the destination, where it said so: nothing
    /// switched to it (`auto` ran as pre-copy, throttling where it had to; `hybrid`
    /// and `postcopy` were refused before the VM paused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postcopy_unavailable: Option<String>,
    pub status: Outcome,
    pub error: Option<String>,
    /// The error's kind, for programs (see `MigrationError::kind`).
    pub error_kind: Option<String>,
    pub to: String,
    pub connections: u32,
    /// Who checked the pages' data on the way.
    pub page_checks: crate::wire::PageChecks,
    /// The vCPUs' weight while pre-copy ran: `low` only where it was asked for, the
    /// guest ran pre-copy rounds, and the vCPUs could be given their weight back.
    #[serde(default)]
    pub vcpu_priority: crate::vcpu_priority::VcpuPriority,
    /// Which ends' migration threads had the highest weight while pre-copy ran: those
    /// asked for, where pre-copy ran and the end could raise them (the destination's
    /// say so with READY).
    #[serde(default)]
    pub migration_priority: crate::migration_priority::MigrationPriority,
    pub downtime_limit_ms: u64,
    pub max_bandwidth: Option<u64>,
    pub memory_mib: u64,
    /// The components that moved, in stop order.
    pub sections: Vec<String>,
    /// Those that skipped pre-copy: all their data moved inside the pause.
    pub stop_copy: Vec<String>,
    /// Dirty tracking used: "ring", "manual-protect" or "classic".
    pub dirty_log: String,
    /// Turning dirty logging on (KVM write-protects all of guest memory).
    pub dirty_log_start_ms: f64,
    /// Times a vCPU stopped because its dirty ring was full (ring only).
    pub ring_full_exits: u64,
    pub total_ms: f64,
    /// Source VM stopped to destination VM running (as seen by the source: it
    /// includes one network hop back).
    pub downtime_ms: f64,
    pub downtime: Downtime,
    /// Connecting and the destination's check of the VM configuration.
    pub setup_ms: f64,
    pub bytes: Bytes,
    pub throughput_mib_s: f64,
    pub round_count: u32,
    pub rounds: Vec<Round>,
    pub switchover_reason: String,
    pub throttled: bool,
    pub max_throttle_pct: u32,
    /// Each component auto-converge held back.
    #[serde(default)]
    pub throttle: BTreeMap<String, Throttled>,
    /// Whether the source still runs the VM (true after any failure before GO).
    pub source_running: bool,
}

/// Progress while a migration runs.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Progress {
    pub phase: Phase,
    pub round: u32,
    pub bytes_sent: u64,
    pub pages_sent: u64,
    pub remaining_pages: u64,
    /// Pages of every component's memory (RAM and VRAM).
    pub memory_pages: u64,
    pub dirty_rate_mib_s: f64,
    pub expected_downtime_ms: f64,
    pub throttle_pct: u32,
    pub elapsed_ms: f64,
    /// Setup: pages of this VM's own memory still arriving (from the migration into it,
    /// or the snapshot it was restored from lazily), which it waits for first.
    #[serde(default)]
    pub arriving_pages: u64,
}

/// Shared between the migration's worker thread and the API: progress, the last
/// report, cancel.
#[derive(Default)]
pub struct Status {
    pub progress: Mutex<Option<Progress>>,
    pub last: Mutex<Option<Report>>,
    pub cancel: AtomicBool,
    pub active: AtomicBool,
    /// Bytes written so far by the migration in progress (updated per frame).
    pub live_bytes: Arc<AtomicU64>,
    pub interrupt: Mutex<Interrupt>,
    /// A hand-over left unconfirmed (GO sent, no answer): the VM stays stopped here.
    pub handover: Mutex<Option<Handover>>,
    /// `migrate-postcopy`: switch to post-copy at the next chance.
    pub postcopy_now: AtomicBool,
    /// Whether the migration in progress can switch to post-copy (a live destination,
    /// still in pre-copy).
    pub postcopy_possible: AtomicBool,
    /// Why the migration in progress cannot switch to post-copy (its destination
    /// said so), for `migrate-postcopy`'s answer.
    pub no_postcopy: Mutex<Option<String>>,
    /// The migration in progress has not yet heard whether its destination takes
    /// post-copy (it connects): `migrate-postcopy` waits for the answer.
    settling: Mutex<bool>,
    settled_cv: std::sync::Condvar,
    /// A post-copy whose connections broke, and the user's answer (`migrate-recover`).
    pub recovery: Mutex<Recovery>,
    pub recovery_cv: std::sync::Condvar,
    /// Why this godwit stops, once it does (a signal): the VM will not run on here
    /// after a migration that this cancels.
    stopping: Mutex<Option<String>>,
}

/// A paused post-copy and the user's answer to it.
#[derive(Default)]
pub struct Recovery {
    /// Why it is paused, while it is.
    pub paused: Option<String>,
    /// Where to go on.
    pub to: Option<RecoverTo>,
    /// Recoveries asked for so far.
    pub asked: u64,
    /// How many had been asked for when the driver took the one it works on.
    pub attempt: u64,
    /// The last attempt the driver finished: how many had been asked for when it
    /// began, and why it failed.
    pub finished: Option<(u64, Result<(), String>)>,
}

/// Where a `migrate-recover` goes: `to` (empty: where the migration went, at the
/// addresses found as it began), and a TCP destination's addresses, looked up by the
/// thread that took the request: the migration thread may open no file, the resolver's
/// among them.
#[derive(Clone, Debug, PartialEq)]
pub struct RecoverTo {
    pub to: String,
    pub addrs: Result<Vec<std::net::SocketAddr>, String>,
}

impl RecoverTo {
    /// `to`, its addresses looked up now.
    pub fn resolve(to: String) -> RecoverTo {
        let addrs = match crate::transport::Target::parse(&to) {
            Ok(t) => t.resolve().map_err(|e| e.to_string()),
            Err(_) => Ok(Vec::new()),
        };
        RecoverTo { to, addrs }
    }
}

/// An unconfirmed hand-over: where GO went, and the connection on which a late answer
/// may come (shut down when the user takes the VM back).
pub struct Handover {
    pub to: String,
    pub socket: Option<crate::transport::Stream>,
}

/// What a cancel may interrupt of the migration in progress.
#[derive(Default)]
pub struct Interrupt {
    /// Its sockets, shut down by a cancel so that a blocked write or read returns.
    pub sockets: Vec<crate::transport::Stream>,
    /// GO is on its way: the VM is being handed over, too late to cancel.
    pub committed: bool,
    /// The pause ran past its budget before GO: the VM resumes here.
    pub expired: bool,
}

impl Status {
    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    /// As `request_cancel`, for a godwit that stops (`why`): the VM stops here too once
    /// the migration has ended, and its report says so rather than that the VM runs on.
    pub fn request_stop(
        &self,
        why: String,
        grace: std::time::Duration,
    ) -> Result<(), &'static str> {
        *self.stopping.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
        self.request_cancel(grace)
    }

    /// Why this godwit stops, if it does.
    pub fn stopping(&self) -> Option<String> {
        self.stopping
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Asks the migration in progress to stop; refused once the VM is being handed
    /// over. The migration notices between two slices of work and tells the
    /// destination why; if it is still running after `grace` (blocked on a peer that
    /// does not read), its sockets are shut down so the blocked call returns.
    pub fn request_cancel(&self, grace: std::time::Duration) -> Result<(), &'static str> {
        {
            // A paused post-copy is given up (its VM stays stopped here).
            let r = self.recovery.lock().unwrap_or_else(|e| e.into_inner());
            if r.paused.is_some() {
                self.cancel.store(true, Ordering::SeqCst);
                self.recovery_cv.notify_all();
                return Ok(());
            }
        }
        {
            let i = self.interrupt.lock().unwrap_or_else(|e| e.into_inner());
            if i.committed {
                return Err("too late to cancel: the VM is being handed over to the destination");
            }
            self.cancel.store(true, Ordering::SeqCst);
        }
        let end = std::time::Instant::now() + grace;
        while self.active.load(Ordering::SeqCst) && std::time::Instant::now() < end {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let i = self.interrupt.lock().unwrap_or_else(|e| e.into_inner());
        if self.active.load(Ordering::SeqCst) && !i.committed {
            for s in &i.sockets {
                s.shutdown();
            }
        }
        Ok(())
    }

    /// The VM ended while it migrated: unless it is being handed over already, the
    /// migration stops at its next check, as for a cancel (the driver then says why).
    pub fn vm_ended(&self) {
        // Under the lock `commit` takes: either the cancel is seen there, or GO went first.
        let i = self.interrupt.lock().unwrap_or_else(|e| e.into_inner());
        if !i.committed {
            self.cancel.store(true, Ordering::SeqCst);
        }
    }

    /// The point of no return: after this a cancel is refused. False if a cancel came
    /// first.
    pub fn commit(&self) -> bool {
        let mut i = self.interrupt.lock().unwrap_or_else(|e| e.into_inner());
        if self.cancelled() || i.expired {
            return false;
        }
        i.committed = true;
        true
    }

    /// The pause's budget is spent: unless GO is already on its way, the migration
    /// fails now (its sockets are shut down, so whatever blocks returns) and the VM
    /// resumes here.
    pub fn expire(&self) {
        let mut i = self.interrupt.lock().unwrap_or_else(|e| e.into_inner());
        if i.committed {
            return;
        }
        i.expired = true;
        for s in &i.sockets {
            s.shutdown();
        }
    }

    /// A migration starts: until `settled`, `migrate-postcopy` waits to hear whether
    /// post-copy can come.
    pub fn settling(&self) {
        *self.settling.lock().unwrap_or_else(|e| e.into_inner()) = true;
    }

    /// Whether post-copy can come is known (or the migration ended first).
    pub fn settled(&self) {
        *self.settling.lock().unwrap_or_else(|e| e.into_inner()) = false;
        self.settled_cv.notify_all();
    }

    /// `migrate-postcopy`: refused unless the migration in progress is still in its
    /// pre-copy rounds to a live destination. One that still connects is waited for
    /// (up to `wait`), so that a destination's refusal is told with its reason.
    pub fn ask_postcopy(&self, wait: std::time::Duration) -> Result<(), String> {
        {
            let end = std::time::Instant::now() + wait;
            let mut s = self.settling.lock().unwrap_or_else(|e| e.into_inner());
            while *s && !self.cancelled() {
                let left = end.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    return Err("the migration still connects to its destination, which \
                                has not yet said whether it takes post-copy: ask again once \
                                the migration copies"
                        .into());
                }
                s = self
                    .settled_cv
                    .wait_timeout(s, left.min(std::time::Duration::from_millis(100)))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        }
        if let Some(why) = self
            .no_postcopy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            return Err(format!("the destination cannot take post-copy: {why}"));
        }
        if !self.postcopy_possible.load(Ordering::SeqCst) {
            return Err(
                "post-copy needs a migration in its pre-copy rounds to a live destination \
                 (not a file, not past the switchover)"
                    .into(),
            );
        }
        self.postcopy_now.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Post-copy lost its connections (`Some(why)`), or goes on again (None).
    pub fn set_paused(&self, why: Option<String>) {
        let mut r = self.recovery.lock().unwrap_or_else(|e| e.into_inner());
        r.paused = why;
        r.to = None;
    }

    /// Post-copy stays paused, now for `why` (an attempt to go on failed); a request
    /// that came meanwhile is kept for the next attempt.
    pub fn still_paused(&self, why: String) {
        self.recovery
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .paused = Some(why);
    }

    /// The paused post-copy's driver waits here: the address to recover to, or None
    /// when the user gave up (migrate-cancel).
    pub fn wait_recover(&self) -> Option<RecoverTo> {
        let mut r = self.recovery.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if self.cancelled() {
                return None;
            }
            if let Some(to) = r.to.take() {
                r.attempt = r.asked;
                return Some(to);
            }
            r = self
                .recovery_cv
                .wait_timeout(r, std::time::Duration::from_millis(500))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// `migrate-recover`: refused unless post-copy is paused. Returns the request's
    /// number, for `wait_recovered`.
    pub fn ask_recover(&self, to: RecoverTo) -> Result<u64, String> {
        let mut r = self.recovery.lock().unwrap_or_else(|e| e.into_inner());
        match &r.paused {
            None => Err("no post-copy is paused: there is nothing to recover".into()),
            Some(_) => {
                r.to = Some(to);
                r.asked += 1;
                self.recovery_cv.notify_all();
                Ok(r.asked)
            }
        }
    }

    /// The driver's attempt to go on, taken with `wait_recover`, has ended.
    pub fn recovery_ended(&self, outcome: Result<(), String>) {
        let mut r = self.recovery.lock().unwrap_or_else(|e| e.into_inner());
        r.finished = Some((r.attempt, outcome));
        self.recovery_cv.notify_all();
    }

    /// How recovery request `n` (or one asked for after it, which took its place)
    /// ended; None while it still runs after `within`, or when the migration was given
    /// up meanwhile.
    pub fn wait_recovered(
        &self,
        n: u64,
        within: std::time::Duration,
    ) -> Option<Result<(), String>> {
        let by = std::time::Instant::now() + within;
        let mut r = self.recovery.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some((k, outcome)) = &r.finished {
                if *k >= n {
                    return Some(outcome.clone());
                }
            }
            let left = by.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() || self.cancelled() {
                return None;
            }
            r = self
                .recovery_cv
                .wait_timeout(r, left.min(std::time::Duration::from_millis(500)))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Why post-copy is paused, if it is.
    pub fn paused(&self) -> Option<String> {
        self.recovery
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .paused
            .clone()
    }

    /// GO is on its way: the VM is the destination's.
    pub fn committed(&self) -> bool {
        self.interrupt
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .committed
    }

    pub fn expired(&self) -> bool {
        self.interrupt
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .expired
    }

    pub fn set_progress(&self, p: Progress) {
        *self.progress.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
    }

    pub fn progress(&self) -> Option<Progress> {
        let mut p = self
            .progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()?;
        p.bytes_sent = p.bytes_sent.max(self.live_bytes.load(Ordering::Relaxed));
        Some(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// `migrate-postcopy` during the handshake waits for the destination's answer and
    /// is told its reason; one that waits too long is told the migration still connects.
    #[test]
    fn a_switch_asked_while_connecting_waits_for_the_destinations_answer() {
        let s = Arc::new(Status::default());
        s.settling();
        let e = s.ask_postcopy(Duration::from_millis(20)).unwrap_err();
        assert!(e.contains("still connects"), "{e}");
        assert!(!s.postcopy_now.load(Ordering::SeqCst));
        let asker = {
            let s = s.clone();
            std::thread::spawn(move || s.ask_postcopy(Duration::from_secs(60)))
        };
        *s.no_postcopy.lock().unwrap() = Some("no userfaultfd".into());
        s.settled();
        let e = asker.join().unwrap().unwrap_err();
        assert_eq!(e, "the destination cannot take post-copy: no userfaultfd");

        let s = Arc::new(Status::default());
        s.settling();
        let asker = {
            let s = s.clone();
            std::thread::spawn(move || s.ask_postcopy(Duration::from_secs(60)))
        };
        s.postcopy_possible.store(true, Ordering::SeqCst);
        s.settled();
        asker.join().unwrap().unwrap();
        assert!(s.postcopy_now.load(Ordering::SeqCst));
    }

    /// `migrate-recover` answers with the outcome of the attempt it asked for; a request
    /// that comes while an attempt runs is kept for the next, and answered by it.
    #[test]
    fn a_recovery_request_gets_the_outcome_of_its_attempt() {
        let s = Status::default();
        let to = |t: &str| RecoverTo {
            to: t.into(),
            addrs: Ok(vec![]),
        };
        let got = || s.wait_recover().map(|r| r.to);
        assert!(s.ask_recover(to("")).is_err(), "nothing is paused");
        s.set_paused(Some("link".into()));
        let first = s.ask_recover(to("tcp:a:1")).unwrap();
        assert_eq!(got().as_deref(), Some("tcp:a:1"));
        assert_eq!(
            s.wait_recovered(first, Duration::ZERO),
            None,
            "still running"
        );
        let second = s.ask_recover(to("tcp:b:2")).unwrap();
        s.recovery_ended(Err("refused".into()));
        s.still_paused("link; recovery to tcp:a:1: refused".into());
        assert_eq!(
            s.wait_recovered(first, Duration::ZERO),
            Some(Err("refused".into()))
        );
        assert_eq!(s.wait_recovered(second, Duration::ZERO), None);
        // The second request survived the first's failure.
        let kept = s.recovery.lock().unwrap().to.clone().map(|r| r.to);
        assert_eq!(kept.as_deref(), Some("tcp:b:2"));
        assert_eq!(got().as_deref(), Some("tcp:b:2"));
        let waiter = std::thread::scope(|sc| {
            let w = sc.spawn(|| s.wait_recovered(second, Duration::from_secs(60)));
            std::thread::sleep(Duration::from_millis(50));
            s.recovery_ended(Ok(()));
            w.join().unwrap()
        });
        assert_eq!(waiter, Some(Ok(())));
    }
}
