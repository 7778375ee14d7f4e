//! The clock of a workload that runs in iterations: paces them to a rate, prints a
//! progress line now and then, says when to verify and when to stop, and witnesses the
//! largest gap between two iterations beyond the sleeps it asked for, overall and since
//! the last progress line: the guest's own view of how long the VM was stopped, and
//! when.

use crate::{println, sys, time};

pub struct Pace {
    t0: u64,
    start: u64,
    /// Time per iteration at the requested rate (0: as fast as it can).
    iter_ns: u64,
    end: u64,
    report_ns: u64,
    next_report: u64,
    verify_ns: u64,
    next_verify: u64,
    iters: u64,
    written: u64,
    max_gap: u64,
    window_gap: u64,
    last: u64,
    slept: u64,
}

/// What the workload does after an iteration.
pub enum Tick {
    Go,
    /// Check everything now (then call `verified`).
    Verify,
    End,
}

impl Pace {
    /// Starts the clock. `t0`: when the program started (times are printed from it);
    /// `iter_ns`: time per iteration; `seconds` (0: forever), `report_ms`, `verify_s`
    /// (0: never until the end).
    pub fn new(t0: u64, iter_ns: u64, seconds: u64, report_ms: u64, verify_s: u64) -> Pace {
        let start = time::now_ns();
        let at = |every: u64| if every == 0 { u64::MAX } else { start + every };
        Pace {
            t0,
            start,
            iter_ns,
            end: at(seconds * 1_000_000_000),
            report_ns: report_ms.max(1) * 1_000_000,
            next_report: start + report_ms.max(1) * 1_000_000,
            verify_ns: verify_s * 1_000_000_000,
            next_verify: at(verify_s * 1_000_000_000),
            iters: 0,
            written: 0,
            max_gap: 0,
            window_gap: 0,
            last: start,
            slept: 0,
        }
    }

    /// Milliseconds since the program started.
    pub fn ms(&self) -> u64 {
        (time::now_ns() - self.t0) / 1_000_000
    }

    pub fn iters(&self) -> u64 {
        self.iters
    }

    pub fn written_mib(&self) -> u64 {
        self.written >> 20
    }

    pub fn max_gap_us(&self) -> u64 {
        self.max_gap / 1000
    }

    /// After an iteration that wrote `bytes`: records its gap, prints a progress line
    /// (`name: t_ms=.. written_mib=.. rate_mibs=.. max_gap_us=.. window_gap_us=..`) when
    /// due, and says what next.
    pub fn tick(&mut self, name: &str, bytes: u64) -> Tick {
        self.iters += 1;
        self.written += bytes;
        let now = time::now_ns();
        let gap = now.saturating_sub(self.last).saturating_sub(self.slept);
        self.max_gap = self.max_gap.max(gap);
        self.window_gap = self.window_gap.max(gap);
        self.slept = 0;
        if now >= self.next_report {
            let secs = (now - self.start) as f64 / 1e9;
            let mib = self.written as f64 / (1u64 << 20) as f64;
            println!(
                "{}: t_ms={} written_mib={} rate_mibs={} max_gap_us={} window_gap_us={}",
                name,
                (now - self.t0) / 1_000_000,
                mib as u64,
                (mib / secs) as u64,
                self.max_gap / 1000,
                self.window_gap / 1000
            );
            self.window_gap = 0;
            self.next_report += self.report_ns;
        }
        if now >= self.next_verify {
            self.next_verify += self.verify_ns;
            return Tick::Verify;
        }
        if now >= self.end {
            return Tick::End;
        }
        self.last = now;
        Tick::Go
    }

    /// Verification is work, not a pause: it does not count as a gap.
    pub fn verified(&mut self) {
        self.last = time::now_ns();
    }

    /// Waits until the next iteration is due at the requested rate.
    pub fn wait(&mut self) {
        if self.iter_ns == 0 {
            return;
        }
        let now = time::now_ns();
        let due = self.start + self.iters * self.iter_ns;
        if due > now {
            // Long waits give the CPU back; the VMM may wake us early, so finish by
            // spinning to the deadline either way.
            if due - now >= 200_000 {
                sys::sleep_ns(due - now);
            }
            while time::now_ns() < due {
                core::hint::spin_loop();
            }
            self.slept = due - now;
        }
    }
}
