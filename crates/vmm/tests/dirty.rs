//! Dirty tracking misses no write. Whichever way KVM reports them (its bitmap or its
//! per-vCPU rings), every page whose content changed while logging was on is reported,
//! also when the rings fill up and the vCPUs have to empty them themselves mid-round;
//! and a page seen by a look (peek) is still handed out by the next take.

mod common;

use common::{kvm_available, vm_tracked, wait_until, Sink};
use godwit_vmm::dirty::{DirtyLogMode, DirtyStats, Written};
use godwit_vmm::{Vm, VmExit};
use std::time::Duration;
use vm_memory::{Bytes, GuestAddress};

const PAGE: usize = 4096;

fn ram(vm: &Vm) -> Vec<Vec<u8>> {
    vm.handle()
        .desc
        .ram
        .iter()
        .map(|r| {
            let mut buf = vec![0u8; r.size as usize];
            vm.memory()
                .read_slice(&mut buf, GuestAddress(r.start))
                .unwrap();
            buf
        })
        .collect()
}

fn union(into: &mut [Vec<u64>], from: &[Vec<u64>]) {
    for (a, b) in into.iter_mut().zip(from) {
        for (x, y) in a.iter_mut().zip(b) {
            *x |= *y;
        }
    }
}

fn set(b: &[Vec<u64>], region: usize, page: usize) -> bool {
    b[region][page / 64] & (1 << (page % 64)) != 0
}

/// Runs a dirtier flat out under dirty logging, collecting the log the way a migration
/// does, and checks that every changed page was reported. Returns the counters.
fn no_write_is_missed(
    mode: DirtyLogMode,
    enough: impl Fn(usize, &DirtyStats) -> bool,
) -> DirtyStats {
    let out = Sink::default();
    let mut vm = vm_tracked(
        "dirtier",
        "wss=32 rate=flat seconds=3 report-every=100",
        1,
        128,
        &out,
        mode,
    );
    vm.start().unwrap();
    assert!(wait_until(Duration::from_secs(10), || out
        .text()
        .contains("written_mib=")));
    let m = vm.machine().clone();
    let ctl = vm.handle().ctl.clone();
    let slots = m.ram_slots().to_vec();
    let log = || m.dirty_log().lock().unwrap();
    log().start(&slots).unwrap();
    ctl.pause().unwrap();
    let before = ram(&vm);
    let mut reported = log().take(&slots).unwrap();
    for b in reported.iter_mut() {
        b.fill(0);
    }
    ctl.resume().unwrap();
    // Rounds go on until the log has been exercised as the caller needs (a loaded host
    // runs the guest slowly; nothing here counts on how fast), while the guest writes.
    let mut rounds = 0;
    let mut total = 0;
    while rounds < 6 || (!enough(total, &m.dirty_stats()) && !out.text().contains("verify")) {
        rounds += 1;
        std::thread::sleep(Duration::from_millis(30));
        let peek = log()
            .peek(&slots)
            .unwrap()
            .expect("both modes can look without resetting");
        std::thread::sleep(Duration::from_millis(10));
        let take = log().take(&slots).unwrap();
        let seen: Vec<(usize, usize)> = match peek {
            Written::Since(b) => (0..b.len())
                .flat_map(|r| (0..b[r].len() * 64).map(move |p| (r, p)))
                .filter(|&(r, p)| set(&b, r, p))
                .collect(),
            Written::New(list) => list
                .into_iter()
                .map(|(r, p)| (r as usize, p as usize))
                .collect(),
        };
        total += seen.len();
        for (r, p) in seen {
            assert!(
                set(&take, r, p),
                "{mode}: page {p} of region {r} seen by a look, not taken"
            );
        }
        union(&mut reported, &take);
    }
    ctl.pause().unwrap();
    union(&mut reported, &log().take_last(&slots).unwrap());
    let after = ram(&vm);
    let mut changed = 0;
    for (r, (a, b)) in before.iter().zip(&after).enumerate() {
        for (p, (x, y)) in a.chunks(PAGE).zip(b.chunks(PAGE)).enumerate() {
            if x != y {
                changed += 1;
                assert!(
                    set(&reported, r, p),
                    "{mode}: page {p} of region {r} changed unreported"
                );
            }
        }
    }
    // 32 MiB rewritten flat out for a quarter of a second: thousands of pages.
    assert!(changed > 2048, "{mode}: only {changed} pages changed");
    let stats = m.dirty_stats();
    log().stop(&slots).unwrap();
    assert!(log().take(&slots).is_err(), "logging is off");
    ctl.resume().unwrap();
    // The guest checks all of its memory at the end: tracking must not have disturbed it.
    assert_eq!(vm.wait(), VmExit::Guest(0), "{}", out.text());
    assert!(
        out.text().contains("verify ok pages=8192"),
        "{}",
        out.text()
    );
    stats
}

#[test]
fn the_dirty_bitmap_misses_no_write() {
    if !kvm_available() {
        return;
    }
    let stats = no_write_is_missed(DirtyLogMode::Bitmap, |seen, _| seen > 2048);
    assert_eq!(stats.ring_full_exits, 0);
}

#[test]
fn the_dirty_ring_misses_no_write_even_when_rings_fill() {
    if !kvm_available() {
        return;
    }
    // The smallest ring fills every 256 pages or so, so pages pass through the vCPU's
    // own emptying as well as the reader's. How often depends on how fast this host
    // ran the guest between two looks; the rounds go on until it has happened.
    let stats = no_write_is_missed(DirtyLogMode::Ring { entries: 256 }, |seen, s| {
        seen > 2048 && s.ring_full_exits > 0
    });
    assert!(stats.ring_full_exits > 0, "{stats:?}");
    assert!(stats.ring_entries > 2048, "{stats:?}");
}
