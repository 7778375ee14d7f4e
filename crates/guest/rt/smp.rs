//! Secondary vCPUs. They start at the same entry as vCPU 0, wait for the runtime to be
//! ready, then for work from `run_on_aps`; idle APs sleep instead of spinning.

use core::sync::atomic::{AtomicUsize, Ordering};

static AP_FN: AtomicUsize = AtomicUsize::new(0);

pub fn vcpus() -> u32 {
    crate::env::get().vcpus
}

/// Runs `f(vcpu_index)` once on every secondary vCPU (in parallel with the caller).
pub fn run_on_aps(f: fn(u32)) {
    AP_FN.store(f as usize, Ordering::Release);
}

pub(crate) fn ap_loop(index: u32) -> ! {
    crate::env::wait_ready();
    loop {
        let f = AP_FN.load(Ordering::Acquire);
        if f != 0 {
            // SAFETY: only `run_on_aps` stores here, always a valid `fn(u32)`.
            let f: fn(u32) = unsafe { core::mem::transmute::<usize, fn(u32)>(f) };
            f(index);
            loop {
                crate::sys::sleep_ns(100_000_000);
            }
        }
        crate::sys::sleep_ns(1_000_000);
    }
}
