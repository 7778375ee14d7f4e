//! What post-copy did on the destination, for reports and the API.

use serde::{Deserialize, Serialize};

/// Latencies, in microseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    pub count: u64,
    pub min_us: f64,
    pub median_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

impl Latency {
    pub fn of(mut v: Vec<f64>) -> Latency {
        if v.is_empty() {
            return Latency::default();
        }
        v.sort_by(f64::total_cmp);
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
        Latency {
            count: v.len() as u64,
            min_us: v[0],
            median_us: at(0.5),
            p99_us: at(0.99),
            max_us: v[v.len() - 1],
        }
    }
}

/// What post-copy did on the destination, per component.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FaultStats {
    /// Pages missing when the VM started here.
    pub missing_at_start: u64,
    /// Of those, pages whose stale copy here was dropped first (sent earlier and
    /// written at the source since). None where the memory was fresh (nothing loaded
    /// into it): dropping costs a walk of KVM's reverse map over the range, inside the
    /// pause, and grows with the memory.
    #[serde(default)]
    pub dropped_at_start: u64,
    /// Touches of a missing page that had to be asked for (a page asked for once).
    pub remote_faults: u64,
    /// Pages the background stream placed before anything touched them.
    pub prepaged: u64,
    /// Pages touched here that the source never had, filled with zeros.
    pub zero_filled: u64,
    /// Copies of a page that was already placed (an answer and the background copy).
    pub duplicates: u64,
    /// Pages asked for ahead of a touch, not counted as remote faults unless a touch
    /// then waited for one: what the GPU engine's next command will touch, brought in
    /// before it runs, and the pages after touches in a row (read ahead).
    #[serde(default)]
    pub fetched_ahead: u64,
    /// From a remote fault read here to its page placed.
    pub fault_latency: Latency,
}
