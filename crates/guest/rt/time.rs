//! Guest time from the TSC. godwit hands over the TSC frequency; under PVH it is measured
//! against the PIT once at boot.

use crate::env;
use crate::port::{inb, outb};

pub fn rdtsc() -> u64 {
    // SAFETY: rdtsc has no side effects; CR4.TSD is clear so it works in ring 3.
    unsafe { core::arch::x86_64::_rdtsc() }
}

pub fn tsc_khz() -> u64 {
    env::get().tsc_khz.max(1)
}

pub fn ticks_to_ns(ticks: u64) -> u64 {
    (ticks as u128 * 1_000_000 / tsc_khz() as u128) as u64
}

/// Nanoseconds since the runtime started.
pub fn now_ns() -> u64 {
    ticks_to_ns(rdtsc().wrapping_sub(env::tsc0()))
}

pub fn now_ms() -> u64 {
    now_ns() / 1_000_000
}

/// Sleeps until `now_ns() >= deadline`.
pub fn sleep_until_ns(deadline: u64) {
    loop {
        let now = now_ns();
        if now >= deadline {
            return;
        }
        crate::sys::sleep_ns(deadline - now);
    }
}

/// Counts TSC ticks over 50 ms of PIT channel 2 (gate via port 0x61, mode 0).
pub(crate) fn calibrate_with_pit() -> u64 {
    const MS: u64 = 50;
    let count = (1_193_182 * MS / 1000) as u16;
    outb(0x61, inb(0x61) & !0x03);
    outb(0x43, 0xB0);
    outb(0x42, count as u8);
    outb(0x42, (count >> 8) as u8);
    let t0 = rdtsc();
    outb(0x61, (inb(0x61) & !0x02) | 0x01);
    while inb(0x61) & 0x20 == 0 {}
    (rdtsc() - t0) / MS
}
