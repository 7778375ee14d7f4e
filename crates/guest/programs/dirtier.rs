//! dirtier: touches a working set of `wss` MiB, then rewrites it page by page at `rate`
//! MiB/s (0 or `flat` = as fast as it can). Every 8-byte word of page i holds
//! f(i, generation of page i, word index), so all of memory can be checked at any time.
//! It also reports the largest gap between two of its own loop iterations beyond any
//! sleep it asked for, overall and since the previous report line: a guest-side witness
//! of how long the VM was stopped, and when.
//!
//! Arguments: wss=MiB (64), rate=MiB/s (100), seconds=S (run time, 0 = forever; 5),
//! verify-every=S (0 = only at the end; 0), report-every=MS (1000), check-writes=1
//! (checks each page before it rewrites it: a page lost on the way is caught at its next
//! rewrite, which would otherwise hide it; 0), end=crash (once done, take an invalid-opcode
//! exception instead of exiting: a guest that crashes, for tests).
//! Exit code 0 when every check passed, 1 on corruption.
#![no_std]
#![no_main]

use godwit_rt::pace::{Pace, Tick};
use godwit_rt::{args, mem, println, time};

const PAGE: usize = 4096;
const WORDS: usize = PAGE / 8;
/// Pages written between two looks at the clock.
const CHUNK: usize = 16;

fn value(page: u64, gen: u32, word: usize) -> u64 {
    // splitmix64 of (page, gen, word): every word differs, and a stale or misplaced page
    // shows up as a mismatch.
    let mut z = page
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add((gen as u64) << 32 | word as u64);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

struct Set {
    pages: &'static mut [u8],
    gens: &'static mut [u32],
    /// Check each page before rewriting it (`check-writes`).
    check: bool,
    /// Pages found stale before a rewrite, and the first of them.
    stale: usize,
    first_stale: Option<usize>,
}

impl Set {
    fn npages(&self) -> usize {
        self.gens.len()
    }

    fn holds(&self, p: usize) -> bool {
        let gen = self.gens[p];
        let page = &self.pages[p * PAGE..(p + 1) * PAGE];
        (0..WORDS).all(|w| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&page[w * 8..w * 8 + 8]);
            u64::from_le_bytes(b) == value(p as u64, gen, w)
        })
    }

    fn write(&mut self, p: usize) {
        if self.check && !self.holds(p) {
            if self.stale == 0 {
                println!("dirtier: page {} stale before its rewrite", p);
            }
            self.stale += 1;
            self.first_stale.get_or_insert(p);
        }
        let gen = self.gens[p].wrapping_add(1);
        self.gens[p] = gen;
        let page = &mut self.pages[p * PAGE..(p + 1) * PAGE];
        for (w, chunk) in page.chunks_exact_mut(8).enumerate() {
            chunk.copy_from_slice(&value(p as u64, gen, w).to_le_bytes());
        }
    }

    /// Returns (bad pages, first bad page).
    fn verify(&self) -> (usize, Option<usize>) {
        let mut bad = 0;
        let mut first = None;
        for p in 0..self.npages() {
            if !self.holds(p) {
                bad += 1;
                first.get_or_insert(p);
            }
        }
        (bad, first)
    }
}

fn verify_and_report(set: &Set, when_ms: u64) -> bool {
    let (bad, first) = set.verify();
    if bad == 0 {
        println!("dirtier: verify ok pages={} t_ms={}", set.npages(), when_ms);
        true
    } else {
        println!(
            "dirtier: verify FAILED bad_pages={} of {} first_bad={} t_ms={}",
            bad,
            set.npages(),
            first.unwrap_or(0),
            when_ms
        );
        false
    }
}

fn main() -> i32 {
    let wss = args::get_u64("wss", 64).max(1);
    let rate = args::get_u64("rate", 100);
    let seconds = args::get_u64("seconds", 5);
    let verify_every = args::get_u64("verify-every", 0);
    let report_ms = args::get_u64("report-every", 1000);
    let check = args::get_u64("check-writes", 0) != 0;
    let crash = args::get("end") == Some("crash");

    let npages = (wss as usize) << 8;
    let (Some(pages), Some(gens)) = (mem::alloc(wss << 20), mem::alloc(npages as u64 * 4)) else {
        println!(
            "dirtier: not enough guest memory for wss={}MiB (free {}MiB)",
            wss,
            mem::free_bytes() >> 20
        );
        return 2;
    };
    // SAFETY: `gens` is page aligned and exactly npages * 4 bytes (rounded up).
    let gens = unsafe { core::slice::from_raw_parts_mut(gens.as_mut_ptr() as *mut u32, npages) };
    let mut set = Set {
        pages,
        gens,
        check: false,
        stale: 0,
        first_stale: None,
    };

    let t0 = time::now_ns();
    for p in 0..npages {
        set.gens[p] = 0;
        set.write(p);
    }
    set.check = check;
    let touched = time::now_ns();
    println!(
        "dirtier: touched wss={}MiB pages={} in {}ms rate={}MiB/s",
        wss,
        npages,
        (touched - t0) / 1_000_000,
        rate
    );

    // ns per chunk at the requested rate.
    let chunk_ns = if rate == 0 {
        0
    } else {
        (CHUNK * PAGE) as u64 * 1_000_000_000 / (rate << 20)
    };
    let mut pace = Pace::new(t0, chunk_ns, seconds, report_ms, verify_every);
    let mut cursor = 0usize;
    let mut ok = true;
    loop {
        for _ in 0..CHUNK {
            set.write(cursor);
            cursor = (cursor + 1) % npages;
        }
        match pace.tick("dirtier", (CHUNK * PAGE) as u64) {
            Tick::Go => pace.wait(),
            Tick::Verify => {
                ok &= verify_and_report(&set, pace.ms());
                pace.verified();
            }
            Tick::End => break,
        }
    }
    ok &= verify_and_report(&set, pace.ms());
    if set.stale > 0 {
        println!(
            "dirtier: FAILED stale_pages={} first_stale={}",
            set.stale,
            set.first_stale.unwrap_or(0)
        );
        ok = false;
    }
    println!(
        "dirtier: done written_mib={} max_gap_us={} result={}",
        pace.written_mib(),
        pace.max_gap_us(),
        if ok { "ok" } else { "CORRUPT" }
    );
    if crash {
        println!("dirtier: crashing as asked (end=crash)");
        // SAFETY: raises #UD on purpose; it does not return.
        unsafe { core::arch::asm!("ud2") };
    }
    if ok {
        0
    } else {
        1
    }
}

godwit_rt::entry!("dirtier", main);
