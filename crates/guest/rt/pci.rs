//! PCI configuration space: ECAM on godwit, the legacy 0xCF8/0xCFC ports elsewhere.

use crate::env::{self, Platform};
use crate::port::{inl, outl};
use crate::sys::{mmio_read32, mmio_write32};

#[derive(Clone, Copy, Debug)]
pub struct Bdf {
    pub bus: u8,
    pub dev: u8,
    pub func: u8,
}

impl core::fmt::Display for Bdf {
    fn fmt(&self, f: &mut core::fmt::Formatter) -> core::fmt::Result {
        write!(f, "{:02x}:{:02x}.{}", self.bus, self.dev, self.func)
    }
}

fn ecam_addr(b: Bdf, off: u16) -> u64 {
    env::get().ecam_base
        + ((b.bus as u64) << 20
            | (b.dev as u64) << 15
            | (b.func as u64) << 12
            | (off & 0xffc) as u64)
}

fn legacy_addr(b: Bdf, off: u16) -> u32 {
    0x8000_0000
        | (b.bus as u32) << 16
        | (b.dev as u32) << 11
        | (b.func as u32) << 8
        | (off & 0xfc) as u32
}

pub fn read32(b: Bdf, off: u16) -> u32 {
    match env::platform() {
        Platform::Godwit => mmio_read32(ecam_addr(b, off)),
        Platform::Pvh => {
            outl(0xcf8, legacy_addr(b, off));
            inl(0xcfc)
        }
    }
}

pub fn write32(b: Bdf, off: u16, v: u32) {
    match env::platform() {
        Platform::Godwit => mmio_write32(ecam_addr(b, off), v),
        Platform::Pvh => {
            outl(0xcf8, legacy_addr(b, off));
            outl(0xcfc, v);
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Device {
    pub bdf: Bdf,
    pub vendor: u16,
    pub device: u16,
    /// class << 16 | subclass << 8 | prog-if
    pub class: u32,
    pub header_type: u8,
}

/// Calls `f` for every function present on the buses the platform has.
pub fn enumerate(mut f: impl FnMut(Device)) {
    let buses = match env::platform() {
        Platform::Godwit => env::get().ecam_buses.min(256),
        Platform::Pvh => 1,
    };
    for bus in 0..buses {
        for dev in 0..32u8 {
            for func in 0..8u8 {
                let bdf = Bdf {
                    bus: bus as u8,
                    dev,
                    func,
                };
                let id = read32(bdf, 0);
                if id & 0xffff == 0xffff {
                    if func == 0 {
                        break;
                    }
                    continue;
                }
                let header_type = (read32(bdf, 0x0c) >> 16) as u8;
                f(Device {
                    bdf,
                    vendor: id as u16,
                    device: (id >> 16) as u16,
                    class: read32(bdf, 0x08) >> 8,
                    header_type: header_type & 0x7f,
                });
                if func == 0 && header_type & 0x80 == 0 {
                    break;
                }
            }
        }
    }
}

/// Size of a 32-bit memory BAR, by the standard write-all-ones probe. Restores the BAR.
pub fn bar_size(b: Bdf, index: u8) -> u32 {
    let off = 0x10 + 4 * index as u16;
    let old = read32(b, off);
    write32(b, off, 0xffff_ffff);
    let mask = read32(b, off);
    write32(b, off, old);
    if mask == 0 {
        return 0;
    }
    (!(mask & !0xf)).wrapping_add(1)
}
