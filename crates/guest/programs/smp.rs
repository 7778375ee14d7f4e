//! smp: proves that all vCPUs run at the same time. Each vCPU counts loop iterations in a
//! shared array for `ms` milliseconds of its own time; vCPU 0 samples every counter at
//! the start and the end of a window in which it is itself busy. A counter that advanced
//! inside that window belonged to a vCPU running alongside vCPU 0.
//! Arguments: ms=MS (500).
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU64, Ordering};
use godwit_rt::{args, println, smp, time};

const MAX: usize = 8;
static COUNT: [AtomicU64; MAX] = [const { AtomicU64::new(0) }; MAX];
static STOP: AtomicU64 = AtomicU64::new(0);

fn spin(index: u32) {
    println!("smp: vcpu {} online t_ms={}", index, time::now_ms());
    let c = &COUNT[index as usize];
    while STOP.load(Ordering::Relaxed) == 0 {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

fn main() -> i32 {
    let n = (smp::vcpus() as usize).min(MAX);
    let ms = args::get_u64("ms", 500);
    smp::run_on_aps(spin);
    // Wait until every AP counts, then measure a window in which vCPU 0 is busy too.
    let wait_until = time::now_ns() + 5_000_000_000;
    while (1..n).any(|i| COUNT[i].load(Ordering::Relaxed) == 0) {
        if time::now_ns() > wait_until {
            println!("smp: FAILED: not every vCPU started");
            return 1;
        }
        core::hint::spin_loop();
    }
    let before: [u64; MAX] = core::array::from_fn(|i| COUNT[i].load(Ordering::Relaxed));
    let end = time::now_ns() + ms * 1_000_000;
    let mut own = 0u64;
    while time::now_ns() < end {
        own += 1;
    }
    COUNT[0].store(own, Ordering::Relaxed);
    let after: [u64; MAX] = core::array::from_fn(|i| COUNT[i].load(Ordering::Relaxed));
    STOP.store(1, Ordering::Relaxed);
    let mut concurrent = 1;
    for i in 1..n {
        let d = after[i] - before[i];
        println!("smp: vcpu {} advanced {} while vcpu 0 ran {}ms", i, d, ms);
        if d > 0 {
            concurrent += 1;
        }
    }
    println!(
        "smp: vcpus={} concurrent={} result={}",
        n,
        concurrent,
        if concurrent == n { "ok" } else { "FAILED" }
    );
    if concurrent == n {
        0
    } else {
        1
    }
}

godwit_rt::entry!("smp", main);
