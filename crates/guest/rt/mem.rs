//! Guest RAM: where it is and a bump allocator over what the image does not use.

use crate::env;
use core::sync::atomic::{AtomicU64, Ordering};

const PAGE: u64 = 4096;
/// Bytes handed out so far, counted over the free regions in order.
static USED: AtomicU64 = AtomicU64::new(0);

pub fn ram_bytes() -> u64 {
    let i = env::get();
    i.ram[..i.nr_ram as usize].iter().map(|r| r.size).sum()
}

/// Free regions: RAM minus everything below the end of the image (tables, image, stacks).
fn free_regions() -> impl Iterator<Item = (u64, u64)> {
    let i = env::get();
    let floor = (i.image_end + PAGE - 1) & !(PAGE - 1);
    i.ram[..i.nr_ram as usize].iter().filter_map(move |r| {
        let start = r.start.max(floor);
        let end = r.start + r.size;
        (end > start).then(|| (start, end - start))
    })
}

pub fn free_bytes() -> u64 {
    free_regions().map(|(_, s)| s).sum::<u64>() - USED.load(Ordering::Relaxed)
}

/// Takes `bytes` (rounded up to pages) of contiguous free memory, or `None`.
/// Only vCPU 0 allocates; the memory is never returned.
pub fn alloc(bytes: u64) -> Option<&'static mut [u8]> {
    let bytes = (bytes + PAGE - 1) & !(PAGE - 1);
    let mut skip = USED.load(Ordering::Relaxed);
    let mut offset = 0;
    for (start, size) in free_regions() {
        if skip >= size {
            skip -= size;
            offset += size;
            continue;
        }
        if size - skip >= bytes {
            USED.store(offset + skip + bytes, Ordering::Relaxed);
            // SAFETY: [start+skip, +bytes) is RAM that nothing else uses (bump allocator),
            // identity mapped.
            return Some(unsafe {
                core::slice::from_raw_parts_mut((start + skip) as *mut u8, bytes as usize)
            });
        }
        // Not enough left here: abandon the rest of this region.
        offset += size;
        skip = 0;
    }
    None
}

/// The first guest-physical address above all RAM.
pub fn ram_end() -> u64 {
    let i = env::get();
    i.ram[..i.nr_ram as usize]
        .iter()
        .map(|r| r.start + r.size)
        .max()
        .unwrap_or(0)
}
