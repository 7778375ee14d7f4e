//! Time-slicing one physical GPU's engine among its VFs, across the godwit processes that
//! own them. The state lives in a small shared-memory page per GPU (see `shm`): a futex
//! word says which VF holds the engine, a bit mask which VFs wait for it, and per-VF
//! counters. A VF runs only while it holds the engine, and gives it up at a chunk
//! boundary when its slice ends, so VFs never run at once and each one's engine time is
//! measured.
//!
//! Policies (named after NVIDIA's vGPU schedulers):
//! - best effort: whoever has work runs; when a slice ends the engine goes round-robin
//!   to the next waiting VF, and an idle VF costs the others nothing;
//! - equal share: strict time-division among the VFs attached now: each gets 1/n of the
//!   engine whether or not the others use theirs;
//! - fixed share: strict time-division by the profile's maximum instance count: a VF
//!   gets 1/max even when it is alone on the GPU (predictable, never more).

use crate::shm::{GpuShm, VfShm, MAX_VFS};
use serde::{Deserialize, Serialize};
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release, SeqCst};
use std::sync::Arc;
use std::time::Duration;

/// Engine time slice.
pub const SLICE_NS: u64 = 2_000_000;
/// A holder that has not finished a chunk for this long is presumed dead.
pub const STALE_NS: u64 = 50_000_000;
/// A VF that has not shown a sign of life for this long is not counted as attached.
pub const ALIVE_NS: u64 = 500_000_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    #[default]
    BestEffort,
    EqualShare,
    FixedShare,
}

impl Policy {
    pub const ALL: [Policy; 3] = [Policy::BestEffort, Policy::EqualShare, Policy::FixedShare];

    pub fn name(self) -> &'static str {
        match self {
            Policy::BestEffort => "best-effort",
            Policy::EqualShare => "equal-share",
            Policy::FixedShare => "fixed-share",
        }
    }

    pub fn parse(s: &str) -> Option<Policy> {
        Policy::ALL.into_iter().find(|p| p.name() == s)
    }

    pub fn code(self) -> u32 {
        self as u32
    }

    pub fn from_code(c: u32) -> Policy {
        match c {
            1 => Policy::EqualShare,
            2 => Policy::FixedShare,
            _ => Policy::BestEffort,
        }
    }
}

/// CLOCK_MONOTONIC in ns: one clock for every process on the host.
/// Whether an owner's stamp says it is gone: older than STALE_NS, or from the future (a
/// stamp left on persistent storage by a holder killed before a reboot, whose monotonic
/// clock started again from zero).
pub fn stale_stamp(beat_ns: u64, now_ns: u64) -> bool {
    now_ns.saturating_sub(beat_ns) > STALE_NS || beat_ns > now_ns.saturating_add(STALE_NS)
}

pub fn now_ns() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// A cap on one VF's engine share, below whatever its policy grants: held back `pct`
/// percent of the time, it stays off the engine after each slice for as long as
/// the slice ran times pct / (100 - pct). A migration sets it when the VF writes VRAM
/// faster than the link carries it (vCPU throttling does not slow an engine), and
/// clears it when the migration ends, whichever way.
#[derive(Default)]
pub struct Cap {
    pct: std::sync::atomic::AtomicU32,
}

impl Cap {
    pub const MAX: u32 = 99;

    pub fn set(&self, pct: u32) {
        self.pct.store(pct.min(Self::MAX), Relaxed);
    }

    pub fn pct(&self) -> u32 {
        self.pct.load(Relaxed)
    }

    /// How long to stay off the engine after using it for `used_ns`.
    pub fn rest_ns(&self, used_ns: u64) -> u64 {
        let p = self.pct() as u64;
        used_ns.saturating_mul(p) / (100 - p)
    }
}

/// A grant of the engine until `end_ns`.
#[derive(Clone, Copy, Debug)]
pub struct Slice {
    pub end_ns: u64,
}

/// How a VF gets engine time. The engine thread asks before running chunks and reports
/// what it used.
pub trait Arbiter: Send + Sync {
    /// Blocks until this VF holds the engine, or returns None once `stop()` says so.
    fn acquire(&self, stop: &dyn Fn() -> bool) -> Option<Slice>;
    /// Gives the engine up; `more` says whether this VF still has work.
    fn release(&self, more: bool);
    /// Engine time used (while holding it), and a sign of life.
    fn used(&self, ns: u64);
    /// A sign of life while idle, with the VF's resident VRAM.
    fn heartbeat(&self, resident: u64);
    fn count(&self, command: bool, error: bool);
    /// The VF's share is capped at 100 - `pct` percent (0: no cap), for others to see.
    fn capped(&self, _pct: u32) {}
    /// Whether another VF holds the engine or waits for it now: then a wait while
    /// holding it would hold that VF up.
    fn contended(&self) -> bool {
        false
    }
}

/// A VF alone on its engine (tests, tools): always granted.
pub struct Unshared;

impl Arbiter for Unshared {
    fn acquire(&self, stop: &dyn Fn() -> bool) -> Option<Slice> {
        (!stop()).then(|| Slice {
            end_ns: now_ns() + SLICE_NS,
        })
    }
    fn release(&self, _more: bool) {}
    fn used(&self, _ns: u64) {}
    fn heartbeat(&self, _resident: u64) {}
    fn count(&self, _command: bool, _error: bool) {}
}

/// One VF's seat at a shared GPU.
pub struct Seat {
    pub shm: Arc<GpuShm>,
    pub slot: usize,
}

fn futex_wait(word: &std::sync::atomic::AtomicU32, expected: u32, ns: u64) {
    let ts = libc::timespec {
        tv_sec: (ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: FUTEX_WAIT on a 4-byte aligned word in a shared mapping, with a timeout; the
    // kernel only reads the word. (Not FUTEX_PRIVATE: other processes wake it.)
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
        )
    };
}

/// Wakes every process waiting for the engine (after its owner word was reset).
pub fn wake_all(word: &std::sync::atomic::AtomicU32) {
    futex_wake(word)
}

fn futex_wake(word: &std::sync::atomic::AtomicU32) {
    // SAFETY: FUTEX_WAKE on the same word; wakes every waiter.
    unsafe { libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, i32::MAX) };
}

impl Seat {
    fn me(&self) -> &VfShm {
        &self.shm.page().vf[self.slot]
    }

    fn live(&self, v: &VfShm, now: u64) -> bool {
        v.attached.load(Relaxed) != 0 && now.saturating_sub(v.heartbeat_ns.load(Relaxed)) < ALIVE_NS
    }

    /// For the time-division policies: (n, my position). None under best effort.
    fn division(&self, now: u64) -> Option<(u64, u64)> {
        let p = self.shm.page();
        match Policy::from_code(p.policy.load(Relaxed)) {
            Policy::BestEffort => None,
            Policy::FixedShare => Some((
                (p.max_vfs.load(Relaxed) as u64).clamp(1, MAX_VFS as u64),
                self.slot as u64,
            )),
            Policy::EqualShare => {
                let mut n = 0;
                let mut pos = 0;
                for (i, v) in p.vf.iter().enumerate() {
                    if i == self.slot || self.live(v, now) {
                        if i == self.slot {
                            pos = n;
                        }
                        n += 1;
                    }
                }
                Some((n, pos))
            }
        }
    }
}

impl Arbiter for Seat {
    fn acquire(&self, stop: &dyn Fn() -> bool) -> Option<Slice> {
        let p = self.shm.page();
        let me = self.slot as u32 + 1;
        let bit = 1u32 << self.slot;
        loop {
            if stop() {
                p.waiting.fetch_and(!bit, SeqCst);
                if p.owner.compare_exchange(me, 0, SeqCst, Relaxed).is_ok() {
                    futex_wake(&p.owner);
                }
                return None;
            }
            let now = now_ns();
            self.me().heartbeat_ns.store(now, Relaxed);
            // Under time division, wait for this VF's slot.
            let end_ns = match self.division(now) {
                None => now + SLICE_NS,
                Some((n, pos)) => {
                    let period = n * SLICE_NS;
                    let into = now % period;
                    let start = pos * SLICE_NS;
                    if into < start || into >= start + SLICE_NS {
                        let wait = (start + period - into) % period;
                        std::thread::sleep(Duration::from_nanos(wait.min(1_000_000)));
                        continue;
                    }
                    now - into + start + SLICE_NS
                }
            };
            p.waiting.fetch_or(bit, SeqCst);
            let cur = p.owner.load(Acquire);
            let stale = cur != 0 && cur != me && stale_stamp(p.owner_beat_ns.load(Relaxed), now);
            if (cur == 0 || cur == me || stale)
                && p.owner.compare_exchange(cur, me, SeqCst, Relaxed).is_ok()
            {
                p.owner_beat_ns.store(now, Relaxed);
                p.waiting.fetch_and(!bit, SeqCst);
                return Some(Slice { end_ns });
            }
            futex_wait(&p.owner, cur, 1_000_000);
        }
    }

    fn contended(&self) -> bool {
        let p = self.shm.page();
        let owner = p.owner.load(Acquire);
        (owner != 0 && owner != self.slot as u32 + 1)
            || p.waiting.load(SeqCst) & !(1u32 << self.slot) != 0
    }

    fn release(&self, more: bool) {
        let p = self.shm.page();
        let me = self.slot as u32 + 1;
        let waiting = p.waiting.load(SeqCst) & !(1 << self.slot);
        // Round-robin: hand the engine to the next waiting VF after this one.
        let next = (1..=MAX_VFS)
            .map(|d| (self.slot + d) % MAX_VFS)
            .find(|&i| waiting & (1 << i) != 0);
        let to = match next {
            Some(i) if Policy::from_code(p.policy.load(Relaxed)) == Policy::BestEffort => {
                i as u32 + 1
            }
            _ => 0,
        };
        p.owner_beat_ns.store(now_ns(), Relaxed);
        if p.owner.compare_exchange(me, to, SeqCst, Relaxed).is_ok() {
            futex_wake(&p.owner);
        }
        if more && to != 0 {
            // Let the next VF take over before this one asks again.
            std::thread::yield_now();
        }
    }

    fn used(&self, ns: u64) {
        let now = now_ns();
        self.me().engine_ns.fetch_add(ns, Relaxed);
        self.me().heartbeat_ns.store(now, Relaxed);
        self.shm.page().owner_beat_ns.store(now, Relaxed);
    }

    fn heartbeat(&self, resident: u64) {
        self.me().heartbeat_ns.store(now_ns(), Relaxed);
        self.me().resident.store(resident, Relaxed);
    }

    fn capped(&self, pct: u32) {
        self.me().cap_pct.store(pct, Relaxed);
    }

    fn count(&self, command: bool, error: bool) {
        if command {
            self.me().commands.fetch_add(1, Relaxed);
        }
        if error {
            self.me().errors.fetch_add(1, Relaxed);
        }
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        let p = self.shm.page();
        let me = self.slot as u32 + 1;
        p.waiting.fetch_and(!(1 << self.slot), SeqCst);
        if p.owner.compare_exchange(me, 0, SeqCst, Relaxed).is_ok() {
            futex_wake(&p.owner);
        }
        self.me().cap_pct.store(0, Relaxed);
        self.me().attached.store(0, Release);
    }
}

#[cfg(test)]
mod stale_tests {
    use super::*;

    #[test]
    fn stamps_too_old_or_from_the_future_are_stale() {
        let now = 10 * STALE_NS;
        assert!(!stale_stamp(now, now));
        assert!(!stale_stamp(now - STALE_NS / 2, now));
        assert!(stale_stamp(now - 2 * STALE_NS, now));
        assert!(stale_stamp(now + 3600 * 1_000_000_000, now));
        assert!(!stale_stamp(now + STALE_NS / 2, now));
    }
}
