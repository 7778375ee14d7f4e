//! What a migration tells its user: live progress while it runs, a report at the end.

use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

/// One pre-copy round (round 0 is the first pass over all memory).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Round {
    pub index: u32,
    /// Pages sent as data.
    pub pages_sent: u64,
    /// Pages found to be zero (not sent as data).
    pub zero_pages: u64,
    /// Dirty pages found by the dirty log at the end of the round.
    pub dirty_pages: u64,
    pub dirty_rate_mib_s: f64,
    pub duration_ms: f64,
    pub bytes: u64,
    pub throughput_mib_s: f64,
    /// vCPU throttle in force during the round (percent of time held out of the guest).
    pub throttle_pct: u32,
    /// Downtime if the VM were stopped after this round.
    pub expected_downtime_ms: f64,
    /// Pages of the round not sent because the guest had written them again meanwhile
    /// (the next round sends them).
    pub skipped_redirtied: u64,
    /// Reading (and re-protecting) the dirty log at the end of the round.
    #[serde(default)]
    pub dirty_log_us: f64,
    /// Looking at the dirty log during the round to find re-written pages, in all.
    #[serde(default)]
    pub peek_us: f64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Bytes {
    /// Everything written to the stream(s).
    pub total: u64,
    /// Page data (4 KiB per page sent).
    pub memory_data: u64,
    /// The serialised VM state (vCPUs, irqchip, clock, devices).
    pub state: u64,
    pub pages_sent: u64,
    /// Zero pages recognised and sent as (address, count) runs or not at all.
    pub zero_pages: u64,
}

/// Where the switchover time went.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Downtime {
    /// Stopping the vCPUs.
    pub pause_ms: f64,
    /// The last dirty pages (sent after the state, while the destination loads it).
    pub final_pages_ms: f64,
    pub final_pages: u64,
    /// The last read of the dirty log (part of final_pages_ms).
    #[serde(default)]
    pub dirty_log_ms: f64,
    /// Reading and sending the VM state (sent first).
    pub state_ms: f64,
    /// Until the destination confirmed it holds and has loaded everything.
    pub confirm_ms: f64,
    /// Until the destination's vCPUs run.
    pub start_ms: f64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    /// completed, failed or cancelled.
    pub status: String,
    pub error: Option<String>,
    pub to: String,
    pub connections: u32,
    pub downtime_limit_ms: u64,
    pub max_bandwidth: Option<u64>,
    pub memory_mib: u64,
    /// Dirty tracking used: "ring", "manual-protect" or "classic".
    pub dirty_log: String,
    /// Turning dirty logging on (KVM write-protects all of guest memory).
    #[serde(default)]
    pub dirty_log_start_ms: f64,
    /// Times a vCPU stopped because its dirty ring was full (ring only).
    #[serde(default)]
    pub ring_full_exits: u64,
    pub total_ms: f64,
    /// Source vCPUs stopped to destination vCPUs running (as seen by the source: it
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
    /// Whether the source still runs the VM (true after any failure).
    pub source_running: bool,
}

/// Progress while a migration runs.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Progress {
    /// setup, precopy, switchover, done.
    pub phase: String,
    pub round: u32,
    pub bytes_sent: u64,
    pub pages_sent: u64,
    pub remaining_pages: u64,
    pub memory_pages: u64,
    pub dirty_rate_mib_s: f64,
    pub expected_downtime_ms: f64,
    pub throttle_pct: u32,
    pub elapsed_ms: f64,
}

/// Shared between the migration thread and the API: progress, the last report, cancel.
#[derive(Default)]
pub struct Status {
    pub progress: Mutex<Option<Progress>>,
    pub last: Mutex<Option<Report>>,
    pub cancel: AtomicBool,
    pub active: AtomicBool,
    /// Bytes written so far by the migration in progress (updated per frame).
    pub live_bytes: AtomicU64,
}

impl Status {
    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
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
