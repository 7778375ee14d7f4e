//! A device's view of memory that is still arriving: it must not wait while it holds
//! something others need (the GPU engine holds the GPU every VF shares), so it asks
//! whether what it is about to touch is here, without waiting, and brings a range in
//! in one go, holding nothing, when it is not.

use super::{Lazy, PAGE_SIZE};
use std::time::{Duration, Instant};

impl Lazy {
    /// Returns once [addr, addr + len) (clipped to this memory) is all here, asking
    /// for what is missing in one go rather than a touch at a time. For a device that
    /// must not wait while it holds something others need (the GPU engine).
    pub fn fetch(&self, addr: u64, len: u64) {
        let first = addr & !(PAGE_SIZE as u64 - 1);
        let end = addr.saturating_add(len);
        let mut i = self.lock();
        if !i.registered {
            return;
        }
        let mut wait = Vec::new();
        let mut at = first;
        while at < end {
            let Some((r, p)) = self.locate(at) else {
                at += PAGE_SIZE as u64;
                continue;
            };
            if i.lacks(r, p) {
                wait.push((r, p));
                if let std::collections::hash_map::Entry::Vacant(e) = i.asked.entry(at) {
                    e.insert((Instant::now(), true));
                    i.stats.fetched_ahead += 1;
                    i.queued.push(at);
                }
            } else if i.flies(r, p) {
                wait.push((r, p));
            }
            at += PAGE_SIZE as u64;
        }
        if wait.is_empty() {
            return;
        }
        if !i.queued.is_empty() {
            let _ = self.wake.write(1);
        }
        loop {
            wait.retain(|&(r, p)| i.lacks(r, p) || i.flies(r, p));
            if wait.is_empty() || !i.registered {
                return;
            }
            i = self
                .placed
                .wait_timeout(i, Duration::from_millis(100))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Whether a touch of [addr, addr + len) would find all of it here now; never
    /// waits. A page still at the source, or on its way in, is not here. For the GPU
    /// engine, which checks what a step touches before it runs the step on the shared
    /// GPU, and gives the GPU up to bring it in (`fetch`) when it is not.
    pub fn here(&self, addr: u64, len: u64) -> bool {
        let i = self.lock();
        if !i.registered || len == 0 {
            return true;
        }
        let end = addr.saturating_add(len);
        let page = PAGE_SIZE as u64;
        self.regions.iter().enumerate().all(|(r, reg)| {
            let (from, to) = (addr.max(reg.base), end.min(reg.base + reg.len));
            if from >= to {
                return true;
            }
            // Whole words at a time: a kernel's operand can be a GiB (262,144 pages),
            // checked before every chunk of it.
            let (p0, p1) = ((from - reg.base) / page, (to - reg.base).div_ceil(page));
            let lacks = (p0 / 64..p1.div_ceil(64)).any(|w| {
                let lo = if w == p0 / 64 { p0 % 64 } else { 0 };
                let hi = if w == p1 / 64 { p1 % 64 } else { 64 };
                hi > lo && i.missing[r][w as usize] & ((u64::MAX >> (64 - (hi - lo))) << lo) != 0
            });
            let flies = i
                .flying
                .iter()
                .any(|&(fr, fp, n)| fr == r && fp < p1 && p0 < fp + n);
            !lacks && !flies
        })
    }
}
