//! fault: takes the exception named by `kind` so that tests can check how the VMM reports
//! a crashing guest. kind=ud|pf|gp|div|triple.
#![no_std]
#![no_main]

use godwit_rt::{args, println};

fn main() -> i32 {
    let kind = args::get("kind").unwrap_or("ud");
    println!("fault: taking {}", kind);
    // SAFETY: every arm deliberately faults; none returns.
    unsafe {
        match kind {
            "ud" => core::arch::asm!("ud2"),
            // Beyond the identity map: not present.
            "pf" => {
                let _ = core::ptr::read_volatile(0x40_0000_0000u64 as *const u64);
            }
            // Non-canonical address.
            "gp" => {
                let _ = core::ptr::read_volatile(0x8000_0000_0000u64 as *const u64);
            }
            "div" => {
                core::arch::asm!("xor edx, edx", "xor eax, eax", "xor ecx, ecx", "div ecx", out("eax") _, out("edx") _, out("ecx") _)
            }
            // Break the IDT (guest memory is writable from ring 3 here), then fault: the
            // CPU cannot deliver the exception, then not the double fault: triple fault.
            "triple" => {
                let idt = godwit_rt::abi_idt_base();
                core::ptr::write_bytes(idt as *mut u8, 0, 4096);
                core::arch::asm!("ud2");
            }
            other => {
                println!("fault: unknown kind {}", other);
                return 2;
            }
        }
    }
    println!("fault: survived {}?!", kind);
    3
}

godwit_rt::entry!("fault", main);
