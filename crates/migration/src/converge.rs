//! Auto-converge: what the driver holds back, and how far, when the VM writes its
//! memory faster than the link carries it.
//!
//! More than one thing writes: the vCPUs, and a GPU's engine (VRAM, and guest RAM by
//! DMA) that holding vCPUs back does not slow. Each component that can be held back
//! says in which order (`Component::throttle_order`: the GPU before the vCPUs, whose
//! throttling costs the guest everything it does); the driver takes them one at a time,
//! each up to the most before the next one joins it. Each component lets go by itself
//! once it leaves pre-copy: at the switchover only after it has stopped (so the pause
//! carries what the last round expected), and on any failure or cancel.
//!
//! The signal is the dirty rate a round measured, which says little about who writes:
//! a guest that rewrites a working set smaller than what a round sends dirties the
//! whole set whatever its speed, so the rate stays at the set's size over the round's
//! time until the writer is slow enough to leave part of it alone. That is why each
//! step halves what the component still gets, rather than waiting for the rate to
//! move.

use crate::report::Throttled;
use std::collections::BTreeMap;
use std::time::Instant;

/// Percent of each time slice a component is held back: at least this at first, and
/// at most `MAX`.
const START: u32 = 20;
pub const MAX: u32 = 99;

struct Stage {
    part: usize,
    name: String,
    pct: u32,
    since: Option<Instant>,
    report: Throttled,
}

impl Stage {
    fn set(&mut self, pct: u32) {
        match (self.pct, pct) {
            (0, p) if p > 0 => self.since = Some(Instant::now()),
            (_, 0) => {
                if let Some(t) = self.since.take() {
                    self.report.ms += t.elapsed().as_secs_f64() * 1e3;
                }
            }
            _ => {}
        }
        self.pct = pct;
        self.report.max_pct = self.report.max_pct.max(pct);
    }
}

pub struct Converge {
    /// Components that can be held back, in throttle order.
    stages: Vec<Stage>,
    /// The stage being raised; past the end, nothing is left to raise.
    at: usize,
}

/// A component's share changed: (part index, percent held back).
pub type Change = (usize, u32);

impl Converge {
    /// `parts`: (part index, name, throttle order) of every component that can be held
    /// back.
    pub fn new(mut parts: Vec<(usize, String, u8)>) -> Converge {
        parts.sort_by_key(|p| p.2);
        Converge {
            stages: parts
                .into_iter()
                .map(|(part, name, _)| Stage {
                    part,
                    name,
                    pct: 0,
                    since: None,
                    report: Throttled::default(),
                })
                .collect(),
            at: 0,
        }
    }

    /// After a pre-copy round (not the first) that did not end pre-copy: the guest
    /// dirtied `rate` bytes/s against a link of `bandwidth`. Returns what to change.
    pub fn round(&mut self, rate: f64, bandwidth: f64) -> Vec<Change> {
        for s in self.stages.iter_mut().filter(|s| s.pct > 0) {
            s.report.rounds += 1;
        }
        let mut changes = Vec::new();
        // More rounds alone converge while the guest dirties under half the link.
        if rate <= bandwidth / 2.0 {
            return changes;
        }
        while let Some(s) = self.stages.get_mut(self.at) {
            if s.pct >= MAX {
                self.at += 1;
                continue;
            }
            // At once to the share that should bring the rate under half the link (the
            // unheld rate estimated from the held one), and each further round at least
            // half of what it still gets.
            let free = rate / (1.0 - s.pct as f64 / 100.0).max(0.01);
            let want = (100.0 * (1.0 - bandwidth / 2.0 / free)).ceil() as u32;
            let next = want
                .max(if s.pct == 0 {
                    START
                } else {
                    100 - (100 - s.pct) / 2
                })
                .min(MAX);
            s.set(next);
            changes.push((s.part, next));
            break;
        }
        changes
    }

    /// Everything that can be held back is, as far as it goes (or nothing can be).
    pub fn exhausted(&self) -> bool {
        self.at >= self.stages.len()
    }

    /// The most any component is held back now.
    pub fn max_pct(&self) -> u32 {
        self.stages.iter().map(|s| s.pct).max().unwrap_or(0)
    }

    /// Components held back now, and how far.
    pub fn held(&self) -> BTreeMap<String, u32> {
        self.stages
            .iter()
            .filter(|s| s.pct > 0)
            .map(|s| (s.name.clone(), s.pct))
            .collect()
    }

    /// Lets everything go (in the account; what to tell the components, for a caller
    /// that does not leave it to them).
    pub fn release(&mut self) -> Vec<Change> {
        let mut changes = Vec::new();
        for s in self.stages.iter_mut().filter(|s| s.pct > 0) {
            s.set(0);
            changes.push((s.part, 0));
        }
        changes
    }

    /// What each component went through, for those ever held back.
    pub fn report(&self) -> BTreeMap<String, Throttled> {
        self.stages
            .iter()
            .filter(|s| s.report.max_pct > 0)
            .map(|s| {
                let mut r = s.report.clone();
                if let Some(t) = s.since {
                    r.ms += t.elapsed().as_secs_f64() * 1e3;
                }
                (s.name.clone(), r)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BW: f64 = 100.0;

    fn two() -> Converge {
        // Given out of order: the GPU (order 0) is held back before the vCPUs (1).
        Converge::new(vec![(0, "vcpus".into(), 1), (1, "gpu".into(), 0)])
    }

    #[test]
    fn a_guest_under_half_the_link_is_never_held_back() {
        let mut c = two();
        for _ in 0..10 {
            assert!(c.round(50.0, BW).is_empty());
        }
        assert!(c.report().is_empty() && !c.exhausted());
    }

    #[test]
    fn the_first_in_order_is_raised_to_the_most_before_the_next_joins() {
        let mut c = two();
        // 400 against a link of 100: 7/8 held back would bring it to half the link.
        assert_eq!(c.round(400.0, BW), vec![(1, 88)]);
        // Not enough: each round halves what it still gets, up to the most.
        assert_eq!(c.round(100.0, BW), vec![(1, 94)]);
        assert_eq!(c.round(100.0, BW), vec![(1, 97)]);
        assert_eq!(c.round(100.0, BW), vec![(1, 99)]);
        // At the most: the vCPUs join, the GPU stays held.
        assert_eq!(c.round(80.0, BW), vec![(0, 38)]);
        assert_eq!(c.held().len(), 2);
        assert!(!c.exhausted());
        for _ in 0..20 {
            c.round(60.0, BW);
        }
        assert!(c.exhausted());
        assert_eq!(c.max_pct(), MAX);
        let mut released = c.release();
        released.sort();
        assert_eq!(released, vec![(0, 0), (1, 0)]);
        assert_eq!(c.max_pct(), 0);
        let r = c.report();
        assert_eq!((r["gpu"].max_pct, r["vcpus"].max_pct), (MAX, MAX));
        assert!(r["gpu"].rounds >= 4);
    }

    #[test]
    fn a_saturated_rate_still_reaches_the_most_in_a_few_rounds() {
        // A working set rewritten whole every round: the rate does not move at all.
        let mut c = two();
        let mut steps = vec![];
        while !c.exhausted() {
            steps.extend(c.round(60.0, BW).into_iter().map(|(_, p)| p));
        }
        assert_eq!(
            steps,
            [20, 60, 80, 90, 95, 98, 99, 20, 60, 80, 90, 95, 98, 99]
        );
    }

    #[test]
    fn nothing_to_hold_back_is_exhausted_from_the_start() {
        let mut c = Converge::new(vec![]);
        assert!(c.exhausted());
        assert!(c.round(1000.0, BW).is_empty());
    }
}
