//! What a lazy section's destination still lacks, as it crosses the wire: per region,
//! a bitmap of pages or the runs of missing pages, whichever is smaller.
//!
//! At a post-copy switch the source says this inside the pause. A bitmap costs a bit
//! per page of the memory whatever is missing (256 KiB for 8 GiB of VRAM, which made
//! the pause grow with VRAM); what is missing is mostly a few long runs (the pages a
//! guest ever wrote), a few hundred bytes as runs. Scattered pages stay a bitmap, so
//! neither form is ever much larger than the other. The components take bitmaps
//! (`godwit_vmm::migratable::Bitmap`); runs become one here, checked against the
//! receiver's own memory, so a hostile count never sizes an allocation.

use godwit_vmm::migratable::{lazy::runs, Bitmap, PAGE_SIZE};

/// One region's missing pages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lacks {
    /// One bit per page of the region, set for each missing one.
    Bitmap(Bitmap),
    /// (first page, pages) of each run of missing pages, in ascending order, apart.
    Runs(Vec<(u64, u64)>),
}

impl Lacks {
    /// The smaller form of `bitmap` on the wire (a run takes 16 bytes, a word 8).
    pub fn of(bitmap: Bitmap) -> Lacks {
        let r = runs(&bitmap);
        if r.len() * 2 < bitmap.len() {
            Lacks::Runs(r)
        } else {
            Lacks::Bitmap(bitmap)
        }
    }

    /// How many pages are missing.
    pub fn pages(&self) -> u64 {
        match self {
            Lacks::Bitmap(b) => b.iter().map(|w| w.count_ones() as u64).sum(),
            Lacks::Runs(r) => r.iter().map(|(_, n)| n).sum(),
        }
    }

    /// The region's bitmap, for a region of `pages` pages. A bitmap is passed on as it
    /// is (its owner checks its shape); runs must lie inside the region, ascending and
    /// apart.
    pub fn into_bitmap(self, pages: u64) -> Result<Bitmap, String> {
        let r = match self {
            Lacks::Bitmap(b) => return Ok(b),
            Lacks::Runs(r) => r,
        };
        let mut b = vec![0u64; pages.div_ceil(64) as usize];
        let mut next = 0u64;
        for (first, n) in r {
            let end = first
                .checked_add(n)
                .filter(|e| n > 0 && first >= next && *e <= pages)
                .ok_or_else(|| {
                    format!(
                        "a run of {n} missing pages at page {first} is empty, out of order \
                         or past the region's {pages} pages"
                    )
                })?;
            set(&mut b, first, end);
            next = end;
        }
        Ok(b)
    }
}

/// The bitmaps of `lacks`, one per region of `regions` ((first address, bytes), as
/// `Component::lazy_regions` gives them).
pub fn bitmaps(lacks: Vec<Lacks>, regions: &[(u64, u64)]) -> Result<Vec<Bitmap>, String> {
    if lacks.len() != regions.len() {
        return Err(format!(
            "{} regions named, this memory has {}",
            lacks.len(),
            regions.len()
        ));
    }
    lacks
        .into_iter()
        .zip(regions)
        .map(|(l, (_, bytes))| l.into_bitmap(bytes / PAGE_SIZE as u64))
        .collect()
}

// On the wire, after the frame's section: a region count (u32), then per region its
// form (u8, LACKS only: 0 a bitmap, 1 runs), its entry count (u32) and the entries
// (u64 words, or (u64 first page, u64 pages) runs), little endian. POSTCOPY (wire
// version 4) is the same with bitmaps only and no form byte.

/// Appends `regions` as a LACKS payload does.
pub(crate) fn encode(p: &mut Vec<u8>, regions: &[Lacks]) {
    p.extend_from_slice(&(regions.len() as u32).to_le_bytes());
    for r in regions {
        match r {
            Lacks::Bitmap(b) => {
                p.push(0);
                put_words(p, b);
            }
            Lacks::Runs(runs) => {
                p.push(1);
                p.extend_from_slice(&(runs.len() as u32).to_le_bytes());
                for (first, n) in runs {
                    p.extend_from_slice(&first.to_le_bytes());
                    p.extend_from_slice(&n.to_le_bytes());
                }
            }
        }
    }
}

/// Appends `bitmaps` as a POSTCOPY payload does.
pub(crate) fn encode_bitmaps(p: &mut Vec<u8>, bitmaps: &[Bitmap]) {
    p.extend_from_slice(&(bitmaps.len() as u32).to_le_bytes());
    for b in bitmaps {
        put_words(p, b);
    }
}

fn put_words(p: &mut Vec<u8>, b: &[u64]) {
    p.extend_from_slice(&(b.len() as u32).to_le_bytes());
    for w in b {
        p.extend_from_slice(&w.to_le_bytes());
    }
}

/// The regions of a LACKS payload (after its section), every count checked against
/// the bytes there.
pub(crate) fn decode(rest: &[u8]) -> Result<Vec<Lacks>, String> {
    regions(rest, true)
}

/// The bitmaps of a POSTCOPY payload (after its section).
pub(crate) fn decode_bitmaps(rest: &[u8]) -> Result<Vec<Bitmap>, String> {
    regions(rest, false)?
        .into_iter()
        .map(|r| match r {
            Lacks::Bitmap(b) => Ok(b),
            Lacks::Runs(_) => Err("runs in a bitmaps-only frame".into()),
        })
        .collect()
}

fn regions(rest: &[u8], formed: bool) -> Result<Vec<Lacks>, String> {
    let u32_at = |at: usize| u32::from_le_bytes(rest[at..at + 4].try_into().expect("4 bytes"));
    let u64_at = |at: usize| u64::from_le_bytes(rest[at..at + 8].try_into().expect("8 bytes"));
    if rest.len() < 4 {
        return Err("no region count".into());
    }
    let count = u32_at(0) as usize;
    // Each region takes at least its form and its 4-byte count.
    let head = 4 + formed as usize;
    if count == 0 || count > rest.len() / head {
        return Err(format!("{count} regions"));
    }
    let mut at = 4;
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        if rest.len() < at + head {
            return Err("truncated region".into());
        }
        let form = if formed { rest[at] } else { 0 };
        let n = u32_at(at + head - 4) as usize;
        at += head;
        let item = match form {
            0 => 8,
            1 => 16,
            f => return Err(format!("region form {f}")),
        };
        let end = n
            .checked_mul(item)
            .and_then(|b| b.checked_add(at))
            .filter(|e| *e <= rest.len())
            .ok_or_else(|| format!("{n} entries do not fit"))?;
        out.push(if form == 0 {
            Lacks::Bitmap((at..end).step_by(8).map(u64_at).collect())
        } else {
            Lacks::Runs(
                (at..end)
                    .step_by(16)
                    .map(|i| (u64_at(i), u64_at(i + 8)))
                    .collect(),
            )
        });
        at = end;
    }
    if at != rest.len() {
        return Err(format!("{} stray bytes", rest.len() - at));
    }
    Ok(out)
}

/// Sets bits [first, end), a word at a time inside the run.
fn set(b: &mut [u64], first: u64, end: u64) {
    let mut p = first;
    while p < end {
        let (w, bit) = ((p / 64) as usize, p % 64);
        let n = (64 - bit).min(end - p);
        let mask = if n == 64 {
            u64::MAX
        } else {
            ((1u64 << n) - 1) << bit
        };
        b[w] |= mask;
        p += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_runs_go_as_runs_and_scattered_pages_as_a_bitmap() {
        // 8 GiB of pages with one 520 MiB run missing: 256 KiB as a bitmap, 16 bytes
        // as runs.
        let pages = 2u64 << 20;
        let l = Lacks::Runs(vec![(4096, 133_120)]);
        let b = l.clone().into_bitmap(pages).unwrap();
        assert_eq!(b.len(), 32768);
        assert_eq!(Lacks::of(b.clone()), l);
        assert_eq!(Lacks::of(b.clone()).pages(), 133_120);
        assert_eq!(Lacks::of(b.clone()).into_bitmap(pages).unwrap(), b);
        // Every other page: runs would be 8 times the bitmap.
        let scattered = vec![0x5555_5555_5555_5555u64; 16];
        assert_eq!(
            Lacks::of(scattered.clone()),
            Lacks::Bitmap(scattered.clone())
        );
    }

    #[test]
    fn runs_become_the_same_bitmap_at_every_alignment() {
        for pages in [1u64, 63, 64, 65, 130, 200] {
            for first in 0..pages {
                for n in 1..=(pages - first).min(70) {
                    let b = Lacks::Runs(vec![(first, n)]).into_bitmap(pages).unwrap();
                    let want: Vec<u64> = (0..pages.div_ceil(64))
                        .map(|w| {
                            (0..64)
                                .filter(|i| (first..first + n).contains(&(w * 64 + i)))
                                .fold(0, |x, i| x | 1 << i)
                        })
                        .collect();
                    assert_eq!(b, want, "{pages} pages, run ({first}, {n})");
                    assert_eq!(runs(&b), vec![(first, n)]);
                }
            }
        }
    }

    #[test]
    fn runs_out_of_bounds_or_order_are_refused() {
        let bad = [
            vec![(0, 0)],
            vec![(60, 5)],
            vec![(u64::MAX, 2)],
            vec![(10, 5), (12, 1)],
            vec![(10, 5), (3, 1)],
        ];
        for r in bad {
            assert!(Lacks::Runs(r.clone()).into_bitmap(64).is_err(), "{r:?}");
        }
        assert!(Lacks::Runs(vec![(0, 5), (5, 59)]).into_bitmap(64).is_ok());
        assert!(bitmaps(vec![Lacks::Runs(vec![])], &[]).is_err());
        assert_eq!(
            bitmaps(vec![Lacks::Runs(vec![(1, 1)])], &[(0, 3 * 4096)]).unwrap(),
            vec![vec![2]]
        );
    }
}
