//! Pages a destination holds damaged: read into place from a `PAGE_CRCS` frame, they
//! failed their own CRC. The source sent them straight from guest memory, so a page the
//! guest wrote while the kernel copied it arrives torn; that write made it dirty, and
//! the source sends it again (a later round, the last pass while the VM is stopped, or
//! post-copy, which fetches it). A later copy that lands whole (or as zero) mends it.
//! Damage nothing mends (a link that corrupts data past its own checks) is refused
//! before the VM runs here: every byte is checked end to end, as with a CRC over every
//! frame, without the copy into a frame that such a CRC needs.

use godwit_vmm::migratable::{Bitmap, PAGE_SIZE};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// The most pages held damaged at once (256 MiB of them).
const MAX: usize = 1 << 16;

/// Damaged pages, by section, as the connections reading into place find them.
#[derive(Default)]
pub struct Damaged {
    pages: Mutex<BTreeSet<(u32, u64)>>,
    /// How many: nothing to look up while none is (nearly always).
    count: AtomicUsize,
    /// Copies that failed their CRC, mended or not.
    seen: AtomicUsize,
}

impl Damaged {
    /// Pages `addrs` of `section` landed; those in `bad` (a subset) failed their CRC.
    /// More than `MAX` damaged at once is no longer pages torn by the guest's writes
    /// (a round's few) but a link that corrupts, or a source that lies: an error.
    pub fn landed(&self, section: u32, addrs: &[u64], bad: &[u64]) -> Result<(), String> {
        if bad.is_empty() && self.count.load(Ordering::Acquire) == 0 {
            return Ok(());
        }
        self.seen.fetch_add(bad.len(), Ordering::Relaxed);
        let mut pages = self.lock();
        for &a in addrs {
            pages.remove(&(section, a));
        }
        pages.extend(bad.iter().map(|&a| (section, a)));
        self.count.store(pages.len(), Ordering::Release);
        if pages.len() > MAX {
            return Err(format!(
                "more than {MAX} pages arrived corrupt (failed their CRC): the link damages data"
            ));
        }
        Ok(())
    }

    /// Runs (first address, pages) of `section` were set to zero, whole.
    pub fn zeroed(&self, section: u32, runs: &[(u64, u32)]) {
        if self.count.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut pages = self.lock();
        for &(a, n) in runs {
            let end = a.saturating_add(n as u64 * PAGE_SIZE as u64);
            let mended: Vec<_> = pages.range((section, a)..(section, end)).copied().collect();
            for p in mended {
                pages.remove(&p);
            }
        }
        self.count.store(pages.len(), Ordering::Release);
    }

    /// Copies of pages that failed their CRC so far, mended since or not.
    pub fn seen(&self) -> usize {
        self.seen.load(Ordering::Relaxed)
    }

    /// Pages still damaged, by section.
    pub fn left(&self) -> BTreeMap<u32, Vec<u64>> {
        let mut by = BTreeMap::<u32, Vec<u64>>::new();
        for &(s, a) in self.lock().iter() {
            by.entry(s).or_default().push(a);
        }
        by
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<(u32, u64)>> {
        self.pages.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Of `damaged` (addresses in a memory of `regions`, as `Component::lazy_regions` gives
/// them), those post-copy does not fetch again: not in `missing` (one bitmap per
/// region, as `lacks::bitmaps` gives them).
pub fn not_fetched(damaged: &[u64], regions: &[(u64, u64)], missing: &[Bitmap]) -> Vec<u64> {
    damaged
        .iter()
        .copied()
        .filter(|&a| {
            let fetched = regions.iter().zip(missing).any(|(&(base, len), b)| {
                let page = a.wrapping_sub(base) / PAGE_SIZE as u64;
                a >= base
                    && a - base < len
                    && b.get((page / 64) as usize)
                        .is_some_and(|w| w & (1 << (page % 64)) != 0)
            });
            !fetched
        })
        .collect()
}

/// What a destination says of pages still damaged when its VM would run.
pub fn refusal(pages: &[u64]) -> String {
    format!(
        "{} page(s) arrived corrupt (failed their CRC; the first at {:#x}) and were not \
         sent again: the link damages data past its own checks",
        pages.len(),
        pages.first().copied().unwrap_or_default()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = PAGE_SIZE as u64;

    #[test]
    fn a_page_stays_damaged_until_a_whole_copy_lands() {
        let d = Damaged::default();
        d.landed(1, &[0, P, 2 * P], &[P]).unwrap();
        d.landed(2, &[P], &[P]).unwrap();
        assert_eq!(d.left(), BTreeMap::from([(1, vec![P]), (2, vec![P])]));
        // Another section's copy, another page's: still damaged.
        d.landed(0, &[P], &[]).unwrap();
        d.landed(1, &[0, 2 * P], &[]).unwrap();
        assert_eq!(d.left().len(), 2);
        // Damaged again, then whole.
        d.landed(1, &[P], &[P]).unwrap();
        d.landed(1, &[P], &[]).unwrap();
        assert_eq!(d.left(), BTreeMap::from([(2, vec![P])]));
        // Zero runs: the run that covers it mends it, one that ends before does not.
        d.zeroed(2, &[(0, 1)]);
        assert_eq!(d.left().len(), 1);
        d.zeroed(2, &[(0, 2)]);
        assert!(d.left().is_empty());
        d.zeroed(2, &[(u64::MAX - P, u32::MAX)]);
    }

    #[test]
    fn a_flood_of_damaged_pages_is_an_error() {
        let d = Damaged::default();
        let addrs: Vec<u64> = (0..64).map(|i| i * P).collect();
        let mut r = Ok(());
        for f in 0..(MAX as u64 / 64 + 1) {
            let a: Vec<u64> = addrs.iter().map(|a| a + f * 64 * P).collect();
            r = d.landed(0, &a, &a);
            if r.is_err() {
                break;
            }
        }
        assert!(r.unwrap_err().contains("corrupt"));
    }

    #[test]
    fn post_copy_fetches_only_what_it_lacks() {
        // Two regions: 4 pages at 0, 4 at 1 MiB.
        let regions = [(0, 4 * P), (1 << 20, 4 * P)];
        let missing = vec![vec![0b0010], vec![0b1000]];
        let damaged = [P, 2 * P, (1 << 20) + 3 * P, (1 << 20) + P, 9 << 20];
        assert_eq!(
            not_fetched(&damaged, &regions, &missing),
            vec![2 * P, (1 << 20) + P, 9 << 20]
        );
        assert!(refusal(&[2 * P]).contains("corrupt"));
    }
}
