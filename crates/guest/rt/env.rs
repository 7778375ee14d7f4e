//! What the runtime learned at boot, shared by all vCPUs.

use crate::abi::{BootInfo, RamRegion, BOOT_INFO_SIZE, MAX_RAM_REGIONS};
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, Ordering};

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Platform {
    Godwit,
    /// QEMU (or any PVH loader): legacy ports, no system device.
    Pvh,
}

impl Platform {
    pub fn name(self) -> &'static str {
        match self {
            Platform::Godwit => "godwit",
            Platform::Pvh => "pvh",
        }
    }
}

pub struct Env {
    pub platform: Platform,
    pub info: BootInfo,
    pub tsc0: u64,
}

struct EnvCell(UnsafeCell<Env>);
// SAFETY: written once by vCPU 0 before READY is set, read-only afterwards.
unsafe impl Sync for EnvCell {}

static ENV: EnvCell = EnvCell(UnsafeCell::new(Env {
    platform: Platform::Godwit,
    info: BootInfo {
        vcpus: 1,
        tsc_khz: 0,
        ram: [RamRegion { start: 0, size: 0 }; MAX_RAM_REGIONS],
        nr_ram: 0,
        ecam_buses: 0,
        image_end: 0,
        ecam_base: 0,
        sysdev_base: 0,
        cmdline_addr: 0,
        cmdline_len: 0,
        idt_base: 0,
        pci_mmio_base: 0,
    },
    tsc0: 0,
}));
static READY: AtomicBool = AtomicBool::new(false);

extern "C" {
    static __image_end: u8;
}

pub fn get() -> &'static BootInfo {
    // SAFETY: see EnvCell.
    unsafe { &(*ENV.0.get()).info }
}

pub fn platform() -> Platform {
    // SAFETY: see EnvCell.
    unsafe { (*ENV.0.get()).platform }
}

pub fn tsc0() -> u64 {
    // SAFETY: see EnvCell.
    unsafe { (*ENV.0.get()).tsc0 }
}

pub fn wait_ready() {
    while !READY.load(Ordering::Acquire) {
        core::hint::spin_loop();
    }
}

pub(crate) fn init(info_addr: u64, platform: u64) {
    let tsc0 = crate::time::rdtsc();
    let (platform, info) = if platform == 0 {
        // SAFETY: godwit put a BOOT_INFO_SIZE block at info_addr (identity mapped).
        let raw = unsafe { &*(info_addr as *const [u8; BOOT_INFO_SIZE]) };
        match BootInfo::decode(raw) {
            Some(i) => (Platform::Godwit, i),
            None => crate::sys::halt_forever(),
        }
    } else {
        (Platform::Pvh, pvh_info(info_addr))
    };
    // SAFETY: only vCPU 0 runs this, before READY; APs wait for READY.
    unsafe {
        *ENV.0.get() = Env {
            platform,
            info,
            tsc0,
        };
    }
    if platform == Platform::Pvh {
        let khz = crate::time::calibrate_with_pit();
        // SAFETY: as above, still before READY.
        unsafe { (*ENV.0.get()).info.tsc_khz = khz };
    }
    READY.store(true, Ordering::Release);
}

/// Reads what a PVH loader hands over: command line and the e820-style memory map.
fn pvh_info(start_info: u64) -> BootInfo {
    // SAFETY: the loader passes a valid hvm_start_info; everything is identity mapped.
    unsafe {
        let p = start_info as *const u8;
        let rd32 = |o: usize| core::ptr::read_unaligned(p.add(o) as *const u32);
        let rd64 = |o: usize| core::ptr::read_unaligned(p.add(o) as *const u64);
        let mut info = BootInfo {
            vcpus: 1,
            image_end: &__image_end as *const u8 as u64,
            ..Default::default()
        };
        let cmdline = rd64(24);
        if cmdline != 0 {
            let mut len = 0;
            while len < 4096 && *((cmdline + len) as *const u8) != 0 {
                len += 1;
            }
            info.cmdline_addr = cmdline;
            info.cmdline_len = len;
        }
        if rd32(4) >= 1 {
            let map = rd64(40) as *const u8;
            let n = rd32(48) as usize;
            for i in 0..n {
                let e = map.add(i * 24);
                let addr = core::ptr::read_unaligned(e as *const u64);
                let size = core::ptr::read_unaligned(e.add(8) as *const u64);
                let ty = core::ptr::read_unaligned(e.add(16) as *const u32);
                if ty == 1 && (info.nr_ram as usize) < MAX_RAM_REGIONS {
                    info.ram[info.nr_ram as usize] = RamRegion { start: addr, size };
                    info.nr_ram += 1;
                }
            }
        }
        info
    }
}
