//! gpu-dirtier: keeps rewriting a GPU function's memory in every way a guest and its GPU
//! write it, each way in its own region so a lost write of any kind shows up as its own
//! failure:
//! - `aperture`: VRAM pages the CPU writes through the BAR2 aperture (plain stores);
//! - `engine`: VRAM the GPU engine writes (FILL commands, 64 KiB groups);
//! - `dma`: guest RAM pages only the GPU writes (FILL into system memory); the CPU
//!   never touches them after allocating them;
//! - `window`: a 2 MiB GPU virtual window remapped between two VRAM targets (the GPU
//!   page tables, in VRAM, rewritten by the CPU through the aperture) and filled through
//!   the window by the engine: a stale page table sends the fill to the wrong target.
//!
//! Every word is derivable from (kind, page or group, generation), so all of it can be
//! checked at any time; and each page or group is checked right before it is written
//! again, so a write lost anywhere (a migration that left a page stale, say) is caught
//! at the next rewrite, whenever that comes. It reports the largest gap between its own
//! iterations (a guest-side witness of a pause), like the dirtier.
//!
//! Two more loads, for the GPU migration benchmark:
//! - `idle=1`: every region written once (with `engine=0`, the engine region takes all
//!   the VRAM the others leave: the VRAM filled), then nothing more; the loop still runs
//!   to witness gaps;
//! - `busy=MiB`: a training-like load instead of the engine, DMA and window kinds: half
//!   the region is weights, half gradients, and the engine keeps running SGD steps
//!   (an SGEMM of 256^3, then weights -= 0.001 * gradients over all of them), two steps
//!   queued ahead, never waited for, so the loop's gaps stay the VM's. Not verified
//!   (floating point); the other kinds are.
//!
//! Arguments: aperture=MiB (16), engine=MiB (16; 0 = the rest of VRAM), dma=MiB (4),
//! rate=MiB/s per kind (64; 0 or flat = as fast as it can), seconds=S (5; 0 = forever),
//! verify-every=S (0 = only at the end), report-every=MS (1000), idle=1, busy=MiB.
//! Exit code 0 when every check passed, 1 on corruption, 2 on a GPU error.
#![no_std]
#![no_main]

use godwit_rt::gpu::{dims, Gpu, GpuError};
use godwit_rt::gpu_abi::{kernel, op, pte};
use godwit_rt::pace::{Pace, Tick};
use godwit_rt::{args, mem, println, sys, time};

const PAGE: u64 = 4096;
const WORDS: u64 = PAGE / 8;
/// Pages per engine group (one FILL command each).
const GROUP_PAGES: u64 = 16;
const GROUP: u64 = GROUP_PAGES * PAGE;
/// Aperture pages per iteration (and one engine group, one DMA group).
const CHUNK: u64 = 16;
/// A VA nothing else maps; remapped every few iterations.
const WINDOW_VA: u64 = 1 << 37;
const WINDOW: u64 = 2 << 20;
const WINDOW_EVERY: u64 = 8;

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Word `word` of aperture page `page` at generation `gen`.
fn value(page: u64, gen: u32, word: u64) -> u64 {
    mix(page
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add((gen as u64) << 32 | word))
}

/// The 32-bit fill pattern of group `idx` of a kind at `gen` (0 never: it is what
/// memory nobody wrote holds).
fn pattern(kind: u64, idx: u64, gen: u32) -> u32 {
    (mix(kind << 56 ^ idx << 24 ^ gen as u64) as u32) | 1
}

const ENGINE: u64 = 1;
const DMA: u64 = 2;
const WIN: u64 = 3;

fn zeroed<T: Copy>(n: u64) -> &'static mut [T] {
    let size = core::mem::size_of::<T>() as u64;
    let b = mem::alloc(n * size).unwrap_or_else(|| {
        println!("gpu-dirtier: out of guest memory");
        sys::exit(2)
    });
    b.fill(0);
    // SAFETY: page-aligned RAM from the allocator, n * size bytes (rounded up); the
    // callers' types (integers) are valid all-zero.
    unsafe { core::slice::from_raw_parts_mut(b.as_mut_ptr() as *mut T, n as usize) }
}

struct State {
    g: Gpu,
    ap_pages: u64,
    /// VRAM offset of the engine region.
    eng_at: u64,
    eng_groups: u64,
    dma: &'static mut [u8],
    dma_groups: u64,
    /// The two window targets (VRAM offsets, 2 MiB aligned).
    targets: [u64; 2],
    ap_gen: &'static mut [u32],
    eng_gen: &'static mut [u32],
    dma_gen: &'static mut [u32],
    /// Last generation filled into each window target (0: never).
    win_gen: [u32; 2],
    win_count: u32,
    /// The fence of the last fill of each engine group, DMA group and window target.
    eng_fence: &'static mut [u64],
    dma_fence: &'static mut [u64],
    win_fence: [u64; 2],
    fence: u64,
    /// Stale pages or groups found right before a rewrite.
    stale: u64,
    t0: u64,
    /// The training-like load: VRAM offset and bytes of its region (0: none), steps
    /// queued, and the fence of the last one.
    busy_at: u64,
    busy: u64,
    steps: u64,
    step_fence: u64,
}

fn failed(e: GpuError) -> ! {
    println!("gpu-dirtier: {}", e);
    sys::exit(2)
}

/// The first 8-byte word of a 4-byte-pattern page that is not `p`, if any.
fn bad_u32(ptr: *const u32, words: u64, p: u32) -> bool {
    (0..words).any(|i| {
        // SAFETY: callers pass pages inside VRAM (identity-mapped aperture) or their RAM.
        let got = unsafe { core::ptr::read_volatile(ptr.add(i as usize)) };
        got != p
    })
}

impl State {
    fn stale(&mut self, kind: &str, idx: u64) {
        self.stale += 1;
        if self.stale <= 5 {
            println!(
                "gpu-dirtier: verify FAILED kind={} index={} stale before its rewrite t_ms={}",
                kind,
                idx,
                (time::now_ns() - self.t0) / 1_000_000
            );
        }
    }

    /// Waits until the engine has done the command that signals `fence`.
    fn done(&mut self, fence: u64) {
        if fence > self.g.completed_fence() {
            self.g.kick();
            if let Err(e) = self.g.wait(fence) {
                failed(e)
            }
        }
    }

    fn aperture_ok(&self, page: u64) -> bool {
        let gen = self.ap_gen[page as usize];
        let base = self.g.vram_ptr(page * PAGE) as *const u64;
        (0..WORDS).all(|w| {
            let want = if gen == 0 { 0 } else { value(page, gen, w) };
            // SAFETY: inside the usable VRAM through the aperture.
            let got = unsafe { core::ptr::read_volatile(base.add(w as usize)) };
            got == want
        })
    }

    fn engine_ok(&self, grp: u64) -> bool {
        let gen = self.eng_gen[grp as usize];
        let want = if gen == 0 {
            0
        } else {
            pattern(ENGINE, grp, gen)
        };
        let ptr = self.g.vram_ptr(self.eng_at + grp * GROUP) as *const u32;
        !bad_u32(ptr, GROUP / 4, want)
    }

    fn dma_ok(&self, grp: u64) -> bool {
        let gen = self.dma_gen[grp as usize];
        let want = if gen == 0 { 0 } else { pattern(DMA, grp, gen) };
        // SAFETY: the group lies inside `dma`.
        let ptr = unsafe { self.dma.as_ptr().add((grp * GROUP) as usize) } as *const u32;
        !bad_u32(ptr, GROUP / 4, want)
    }

    fn window_ok(&self, t: usize) -> bool {
        let gen = self.win_gen[t];
        let want = if gen == 0 {
            0
        } else {
            pattern(WIN, t as u64, gen)
        };
        !bad_u32(
            self.g.vram_ptr(self.targets[t]) as *const u32,
            WINDOW / 4,
            want,
        )
    }

    fn write_aperture(&mut self, page: u64) {
        if !self.aperture_ok(page) {
            self.stale("aperture", page);
        }
        let gen = self.ap_gen[page as usize].wrapping_add(1);
        self.ap_gen[page as usize] = gen;
        let base = self.g.vram_ptr(page * PAGE) as *mut u64;
        for w in 0..WORDS {
            // SAFETY: page < ap_pages, inside the usable VRAM through the aperture.
            unsafe { core::ptr::write_volatile(base.add(w as usize), value(page, gen, w)) };
        }
    }

    fn fill_engine(&mut self, grp: u64) {
        self.done(self.eng_fence[grp as usize]);
        if !self.engine_ok(grp) {
            self.stale("engine", grp);
        }
        let gen = self.eng_gen[grp as usize].wrapping_add(1);
        self.eng_gen[grp as usize] = gen;
        let p = pattern(ENGINE, grp, gen);
        let at = self.eng_at + grp * GROUP;
        self.fence = self.g.queue(op::FILL, [at, GROUP, p as u64, 0, 0, 0]);
        self.eng_fence[grp as usize] = self.fence;
    }

    fn fill_dma(&mut self, grp: u64) {
        self.done(self.dma_fence[grp as usize]);
        if !self.dma_ok(grp) {
            self.stale("dma", grp);
        }
        let gen = self.dma_gen[grp as usize].wrapping_add(1);
        self.dma_gen[grp as usize] = gen;
        let p = pattern(DMA, grp, gen);
        let va = Gpu::sys_va(self.dma.as_ptr()) + grp * GROUP;
        self.fence = self.g.queue(op::FILL, [va, GROUP, p as u64, 0, 0, 0]);
        self.dma_fence[grp as usize] = self.fence;
    }

    /// Points the window at the other target (a page-table write through the
    /// aperture) and fills it through the window.
    fn remap_and_fill(&mut self) {
        self.win_count = self.win_count.wrapping_add(1);
        let t = (self.win_count % 2) as usize;
        // The ring holds commands that still use the old mapping: let them finish. The
        // last fills went where the page tables said: a stale table shows here.
        self.done(self.fence);
        for k in 0..2 {
            if self.win_fence[k] != 0 && !self.window_ok(k) {
                self.stale("window", k as u64);
            }
        }
        self.g
            .map_range(WINDOW_VA, self.targets[t], WINDOW, pte::WRITE);
        self.g.queue(op::TLB_INVALIDATE, [0; 6]);
        let p = pattern(WIN, t as u64, self.win_count);
        self.fence = self
            .g
            .queue(op::FILL, [WINDOW_VA, WINDOW, p as u64, 0, 0, 0]);
        self.win_gen[t] = self.win_count;
        self.win_fence[t] = self.fence;
    }

    /// Keeps two SGD steps queued on the engine, without waiting for it.
    fn train(&mut self) {
        let half = self.busy / 2;
        let (w, grad, n) = (self.busy_at, self.busy_at + half, half / 4);
        while self.step_fence <= self.g.completed_fence() + 2 {
            // Forward: 256 x 256 activations from the first weights, into the last
            // quarter MiB of the gradients' half (which stays constant otherwise: the
            // update reads only the rest).
            let act = grad + half - (256 << 10);
            self.g.queue(
                op::KERNEL,
                [kernel::SGEMM, w, w, act, dims(256, 256, 256), 0x3f80_0000],
            );
            let lr = (-0.001f32).to_bits() as u64;
            self.step_fence = self
                .g
                .queue(op::KERNEL, [kernel::AXPY, grad, w, n - (64 << 10), lr, 0]);
            self.steps += 1;
        }
        self.g.kick();
    }

    /// Checks every word of every region. Returns whether all held.
    fn verify(&mut self, when_ms: u64) -> bool {
        self.g.kick();
        if let Err(e) = self.g.wait(self.fence) {
            failed(e)
        }
        let mut ok = true;
        let mut report = |kind: &str, bad: u64, first: Option<u64>| {
            if bad > 0 {
                println!(
                    "gpu-dirtier: verify FAILED kind={} bad={} first_bad={} t_ms={}",
                    kind,
                    bad,
                    first.unwrap_or(0),
                    when_ms
                );
                ok = false;
            }
        };
        let (mut bad, mut first) = (0, None);
        for page in 0..self.ap_pages {
            if !self.aperture_ok(page) {
                bad += 1;
                first.get_or_insert(page);
            }
        }
        report("aperture", bad, first);
        let (mut bad, mut first) = (0, None);
        for grp in 0..self.eng_groups {
            if !self.engine_ok(grp) {
                bad += 1;
                first.get_or_insert(grp);
            }
        }
        report("engine", bad, first);
        let (mut bad, mut first) = (0, None);
        for grp in 0..self.dma_groups {
            if !self.dma_ok(grp) {
                bad += 1;
                first.get_or_insert(grp);
            }
        }
        report("dma", bad, first);
        let bad = (0..2).filter(|&t| !self.window_ok(t)).count() as u64;
        report("window", bad, None);
        if ok {
            println!(
                "gpu-dirtier: verify ok aperture_pages={} engine_pages={} dma_pages={} windows={} t_ms={}",
                self.ap_pages,
                self.eng_groups * GROUP_PAGES,
                self.dma_groups * GROUP_PAGES,
                self.win_count,
                when_ms
            );
        }
        ok
    }
}

fn main() -> i32 {
    let ap_mib = args::get_u64("aperture", 16).max(1);
    let eng_mib = args::get_u64("engine", 16);
    let dma_mib = args::get_u64("dma", 4).max(1);
    let rate = args::get_u64("rate", 64);
    let seconds = args::get_u64("seconds", 5);
    let verify_every = args::get_u64("verify-every", 0);
    let report_ms = args::get_u64("report-every", 1000);
    let idle = args::get_u64("idle", 0) != 0;
    let busy = args::get_u64("busy", 0) << 20;
    let g = match Gpu::open() {
        Ok(g) => g,
        Err(e) => {
            println!("gpu-dirtier: {}", e);
            return 2;
        }
    };
    let ap = ap_mib << 20;
    // The rest of VRAM, after the aperture region, the window targets and the
    // training load (each rounded to the window's alignment).
    let rest = g
        .usable()
        .saturating_sub(ap.div_ceil(WINDOW) * WINDOW + 2 * WINDOW + busy.div_ceil(WINDOW) * WINDOW);
    let eng = if eng_mib == 0 {
        rest / WINDOW * WINDOW
    } else {
        eng_mib << 20
    };
    let win_at = (ap + eng).div_ceil(WINDOW) * WINDOW;
    let busy_at = win_at + 2 * WINDOW;
    if eng == 0 || busy_at + busy > g.usable() {
        println!("gpu-dirtier: the regions do not fit this VF's VRAM");
        return 2;
    }
    let Some(dma) = mem::alloc(dma_mib << 20) else {
        println!(
            "gpu-dirtier: not enough guest memory for dma={}MiB",
            dma_mib
        );
        return 2;
    };
    let ap_pages = ap / PAGE;
    let (eng_groups, dma_groups) = (eng / GROUP, (dma_mib << 20) / GROUP);
    let mut s = State {
        g,
        ap_pages,
        eng_at: ap,
        eng_groups,
        dma,
        dma_groups,
        targets: [win_at, win_at + WINDOW],
        ap_gen: zeroed(ap_pages),
        eng_gen: zeroed(eng_groups),
        dma_gen: zeroed(dma_groups),
        win_gen: [0; 2],
        win_count: 0,
        eng_fence: zeroed(eng_groups),
        dma_fence: zeroed(dma_groups),
        win_fence: [0; 2],
        fence: 0,
        stale: 0,
        t0: time::now_ns(),
        busy_at,
        busy,
        steps: 0,
        step_fence: 0,
    };
    // Everything written once (VRAM starts zeroed, the DMA region is fresh RAM).
    let t0 = s.t0;
    for p in 0..ap_pages {
        s.write_aperture(p);
    }
    for grp in 0..eng_groups {
        s.fill_engine(grp);
    }
    for grp in 0..dma_groups {
        s.fill_dma(grp);
    }
    s.g.kick();
    s.remap_and_fill();
    s.remap_and_fill();
    if busy > 0 {
        // Weights 1.0, gradients 0.5.
        let half = busy / 2;
        s.g.queue(op::FILL, [busy_at, half, 0x3f80_0000, 0, 0, 0]);
        s.fence =
            s.g.queue(op::FILL, [busy_at + half, half, 0x3f00_0000, 0, 0, 0]);
    }
    s.g.kick();
    if let Err(e) = s.g.wait(s.fence) {
        failed(e)
    }
    println!(
        "gpu-dirtier: touched aperture={}MiB engine={}MiB dma={}MiB busy={}MiB in {}ms rate={}MiB/s{}",
        ap_mib,
        eng >> 20,
        dma_mib,
        busy >> 20,
        (time::now_ns() - t0) / 1_000_000,
        rate,
        if idle { " idle" } else { "" }
    );
    // Per iteration each kind moves CHUNK pages; at `rate` MiB/s that takes chunk_ns.
    let chunk_ns = if rate == 0 {
        0
    } else {
        CHUNK * PAGE * 1_000_000_000 / (rate << 20)
    };
    let mut pace = Pace::new(t0, chunk_ns, seconds, report_ms, verify_every);
    let (mut ap_cur, mut eng_cur, mut dma_cur) = (0u64, 0u64, 0u64);
    let mut ok = true;
    loop {
        let mut wrote = 0;
        if !idle {
            for _ in 0..CHUNK {
                s.write_aperture(ap_cur);
                ap_cur = (ap_cur + 1) % ap_pages;
            }
            wrote += CHUNK * PAGE;
        }
        if busy > 0 {
            s.train();
        } else if !idle {
            s.fill_engine(eng_cur);
            eng_cur = (eng_cur + 1) % eng_groups;
            s.fill_dma(dma_cur);
            dma_cur = (dma_cur + 1) % dma_groups;
            if (pace.iters() + 1).is_multiple_of(WINDOW_EVERY) {
                s.remap_and_fill();
            }
            s.g.kick();
            wrote += 2 * CHUNK * PAGE;
        }
        match pace.tick("gpu-dirtier", wrote) {
            Tick::Go => pace.wait(),
            Tick::Verify => {
                ok &= s.verify(pace.ms());
                pace.verified();
            }
            Tick::End => break,
        }
    }
    ok &= s.verify(pace.ms());
    ok &= s.stale == 0;
    println!(
        "gpu-dirtier: done written_mib={} max_gap_us={} steps={} result={}",
        pace.written_mib(),
        pace.max_gap_us(),
        s.steps,
        if ok { "ok" } else { "CORRUPT" }
    );
    if ok {
        0
    } else {
        1
    }
}

godwit_rt::entry!("gpu-dirtier", main);
