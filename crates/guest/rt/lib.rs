//! godwit-rt: the tiny no_std runtime that godwit's guest programs run on.
//!
//! Everything runs in ring 3 (see entry.rs for why). The runtime gives programs a console,
//! time, sleep, exit, guest arguments, free memory, PCI access and the other vCPUs, on
//! two platforms: godwit (boot info + system device) and QEMU (PVH + legacy ports).
#![no_std]

#[path = "../abi.rs"]
pub mod abi;
pub mod args;
pub mod console;
mod entry;
mod env;
pub mod gpu;
/// The virtual GPU's register, command and page-table layout, shared with the device.
#[path = "../../gpu/src/abi.rs"]
pub mod gpu_abi;
mod intrinsics;
pub mod mem;
pub mod pace;
pub mod pci;
pub mod port;
pub mod smp;
pub mod sys;
pub mod time;

pub use env::Platform;

/// Guest-physical address of the IDT (godwit only; 0 elsewhere).
pub fn abi_idt_base() -> u64 {
    env::get().idt_base
}

/// Declares the program's `main` (returning the exit code) and its name.
#[macro_export]
macro_rules! entry {
    ($name:literal, $main:path) => {
        #[no_mangle]
        pub fn __godwit_main() -> i32 {
            $main()
        }
        #[no_mangle]
        pub static __GODWIT_NAME: &str = $name;
    };
}

extern "Rust" {
    fn __godwit_main() -> i32;
    static __GODWIT_NAME: &'static str;
}

/// Called from `_start` on every vCPU.
extern "C" fn rust_start(info: u64, vcpu: u64, platform: u64) -> ! {
    if vcpu != 0 {
        smp::ap_loop(vcpu as u32);
    }
    env::init(info, platform);
    // SAFETY: the program defines both symbols through `entry!`.
    let name = unsafe { __GODWIT_NAME };
    println!(
        "godwit-rt: {} starting (platform={} vcpus={} ram={}MiB tsc={}kHz)",
        name,
        env::platform().name(),
        env::get().vcpus,
        mem::ram_bytes() >> 20,
        time::tsc_khz()
    );
    // SAFETY: as above.
    let code = unsafe { __godwit_main() };
    sys::exit(code)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    println!("godwit-rt: panic: {}", info);
    sys::exit(101)
}

// Marks the image as a godwit guest for the VMM's loader.
core::arch::global_asm!(
    r#"
    .section .note.godwit, "a", @note
    .balign 4
    .long 7
    .long 4
    .long {ty}
    .asciz "godwit"
    .balign 4
    .long {abi}
    .balign 4
"#,
    ty = const abi::NOTE_TYPE_ABI,
    abi = const abi::ABI_VERSION,
);

/// The host target's precompiled libcore is built with unwinding and names this symbol.
/// With panic=abort nothing ever unwinds, so it is never called.
#[no_mangle]
extern "C" fn rust_eh_personality() {}
