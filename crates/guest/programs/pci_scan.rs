//! pci-scan: lists every PCI function with its ids, class and memory BAR sizes.
#![no_std]
#![no_main]

use godwit_rt::{pci, println};

fn main() -> i32 {
    let mut n = 0;
    pci::enumerate(|d| {
        n += 1;
        println!(
            "pci: {} vendor={:04x} device={:04x} class={:06x} header={}",
            d.bdf, d.vendor, d.device, d.class, d.header_type
        );
        if d.header_type == 0 {
            for bar in 0..6 {
                let size = pci::bar_size(d.bdf, bar);
                if size != 0 {
                    println!("pci: {} bar{} size={:#x}", d.bdf, bar, size);
                }
            }
        }
    });
    println!("pci: {} functions", n);
    0
}

godwit_rt::entry!("pci-scan", main);
