//! Talking to the VMM: exit, sleep, raw MMIO.

use crate::abi::{irq, sysdev};
use crate::env::{self, Platform};

pub fn mmio_write64(addr: u64, v: u64) {
    // SAFETY: addr is a device register in an identity-mapped MMIO window; the write
    // traps to the VMM.
    unsafe { core::ptr::write_volatile(addr as *mut u64, v) }
}

pub fn mmio_read64(addr: u64) -> u64 {
    // SAFETY: as above.
    unsafe { core::ptr::read_volatile(addr as *const u64) }
}

pub fn mmio_read32(addr: u64) -> u32 {
    // SAFETY: as above.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

pub fn mmio_write32(addr: u64, v: u32) {
    // SAFETY: as above.
    unsafe { core::ptr::write_volatile(addr as *mut u32, v) }
}

pub(crate) fn sysdev_write(reg: u64, v: u64) {
    mmio_write64(env::get().sysdev_base + reg, v);
}

/// Ends the guest with `code` as the VMM's exit status.
pub fn exit(code: i32) -> ! {
    match env::platform() {
        Platform::Godwit => sysdev_write(sysdev::EXIT, code as u32 as u64),
        // isa-debug-exit: QEMU exits with (code << 1) | 1.
        Platform::Pvh => crate::port::outb(0xf4, code as u8),
    }
    halt_forever()
}

pub fn halt_forever() -> ! {
    loop {
        core::hint::spin_loop();
    }
}

/// Gives the CPU back for `ns` nanoseconds. godwit blocks the vCPU thread; elsewhere this
/// spins. May return early; callers that need a deadline loop on `time::now_ns`.
pub fn sleep_ns(ns: u64) {
    match env::platform() {
        Platform::Godwit => sysdev_write(sysdev::SLEEP_NS, ns),
        Platform::Pvh => {
            let end = crate::time::now_ns() + ns;
            while crate::time::now_ns() < end {
                core::hint::spin_loop();
            }
        }
    }
}

/// Halts this vCPU until an interrupt is delivered (godwit only: `abi::irq`). Returns at
/// once if one is already pending; the interrupt's stub leaves interrupts off again.
pub fn wait_irq() {
    sysdev_write(sysdev::WAIT_IRQ, 0);
}

/// Interrupts delivered on `vector` so far, by any vCPU (godwit only).
pub fn irq_count(vector: u8) -> u64 {
    if (vector as u32) < irq::FIRST_VECTOR || env::platform() != Platform::Godwit {
        return 0;
    }
    let at = irq::COUNTS + 8 * (vector as u32 - irq::FIRST_VECTOR) as u64;
    // SAFETY: the counters are identity-mapped guest RAM the VMM reserved for them; only
    // the interrupt stubs write them.
    unsafe { core::ptr::read_volatile(at as *const u64) }
}
