//! gpu-verify: runs the GPU's copy engine and every compute kernel continuously on VRAM
//! data and checks each result against values it recomputes on the CPU (bit for bit: the
//! kernels' summation order is defined, see the device's `kernels`).
//!
//! Arguments: rounds=N (0 = forever; 0), mib=M (vector size; 8), report-every=N (1).
//! Exit code 0 when every check passed, 1 on a wrong result, 2 on a GPU error.
#![no_std]
#![no_main]

use godwit_rt::gpu::{dims, Gpu, GpuError};
use godwit_rt::gpu_abi::{hash_word, kernel, op, HASH_SEED};
use godwit_rt::{args, mem, println, sys, time};

fn val(i: u64, seed: u64) -> f32 {
    let mut z = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z ^= z >> 29;
    ((z % 2001) as f32 - 1000.0) / 128.0
}

fn floats(bytes: &'static mut [u8]) -> &'static mut [f32] {
    let n = bytes.len() / 4;
    // SAFETY: page-aligned RAM from the allocator, n * 4 bytes, any bits are a valid f32.
    unsafe { core::slice::from_raw_parts_mut(bytes.as_mut_ptr() as *mut f32, n) }
}

fn alloc_f32(n: usize) -> &'static mut [f32] {
    floats(mem::alloc(n as u64 * 4).unwrap_or_else(|| {
        println!("gpu-verify: out of guest memory");
        sys::exit(2)
    }))
}

struct Checker {
    round: u64,
    checks: u64,
}

impl Checker {
    fn eq_f32(&mut self, what: &str, got: &[f32], want: impl Fn(usize) -> f32) {
        for (i, g) in got.iter().enumerate() {
            let w = want(i);
            if g.to_bits() != w.to_bits() {
                println!(
                    "gpu-verify: MISMATCH round={} what={} index={} got={} want={}",
                    self.round, what, i, g, w
                );
                sys::exit(1);
            }
        }
        self.checks += 1;
    }

    fn eq_u64(&mut self, what: &str, got: u64, want: u64) {
        if got != want {
            println!(
                "gpu-verify: MISMATCH round={} what={} got={:#x} want={:#x}",
                self.round, what, got, want
            );
            sys::exit(1);
        }
        self.checks += 1;
    }
}

fn gpu_failed(e: GpuError) -> ! {
    println!("gpu-verify: {}", e);
    sys::exit(2)
}

fn vram_f32(g: &Gpu, off: u64, n: usize) -> &'static [f32] {
    // SAFETY: VRAM through the identity-mapped aperture; the region is inside VRAM.
    unsafe { core::slice::from_raw_parts(g.vram_ptr(off) as *const f32, n) }
}

fn main() -> i32 {
    let rounds = args::get_u64("rounds", 0);
    let mib = args::get_u64("mib", 8).max(1);
    let every = args::get_u64("report-every", 1).max(1);
    let mut g = match Gpu::open() {
        Ok(g) => g,
        Err(e) => {
            println!("gpu-verify: {}", e);
            return 2;
        }
    };
    if let Err(e) = g.interrupts_from_args() {
        println!("gpu-verify: {}", e);
        return 2;
    }
    let n = (mib << 20) / 4;
    let nb = n * 4;
    if 5 * nb + (1 << 20) > g.usable() {
        println!("gpu-verify: mib={} does not fit this VF's VRAM", mib);
        return 2;
    }
    println!(
        "gpu-verify: GPU at {} regs aperture={:#x} vram={}MiB, {} floats per vector",
        g.bdf,
        g.aperture,
        g.vram_size >> 20,
        n
    );
    let (hx, hy, hz) = (
        alloc_f32(n as usize),
        alloc_f32(n as usize),
        alloc_f32(n as usize),
    );
    let (x, y, z, w, s) = (0, nb, 2 * nb, 3 * nb, 4 * nb);
    let small = s + 4096;
    const M: usize = 48;
    const SG: u64 = 96;
    let (ha, hb) = (alloc_f32(M * M), alloc_f32(M * M));
    let hs = alloc_f32((SG * SG) as usize);
    let t0 = time::now_ms();
    let mut c = Checker {
        round: 0,
        checks: 0,
    };
    let mut r = 0;
    while rounds == 0 || r < rounds {
        c.round = r;
        for i in 0..n as usize {
            hx[i] = val(i as u64, r);
            hy[i] = val(i as u64, r + 1_000_000);
        }
        let a = 0.5 + (r % 3) as f32;
        let sv = |p: *const f32| Gpu::sys_va(p);
        g.queue(op::COPY, [x, sv(hx.as_ptr()), nb, 0, 0, 0]);
        g.queue(op::COPY, [y, sv(hy.as_ptr()), nb, 0, 0, 0]);
        g.queue(op::KERNEL, [kernel::VEC_ADD, x, y, z, n, 0]);
        g.queue(op::KERNEL, [kernel::VEC_MUL, x, y, w, n, 0]);
        g.queue(op::KERNEL, [kernel::AXPY, x, y, n, a.to_bits() as u64, 0]);
        g.queue(op::KERNEL, [kernel::RELU, z, z, n, 0, 0]);
        g.queue(op::KERNEL, [kernel::DOT, x, y, n, s, 0]);
        g.queue(op::KERNEL, [kernel::REDUCE_SUM, w, n, s + 8, 0, 0]);
        g.queue(op::KERNEL, [kernel::HASH, z, nb, s + 16, 0, 0]);
        g.queue(op::COPY, [sv(hz.as_ptr()), z, nb, 0, 0, 0]);
        let f = g.submit(op::WRITE, [s + 24, r, 0, 0, 0, 0]);
        if let Err(e) = g.wait(f) {
            gpu_failed(e);
        }
        c.eq_f32("relu(x+y) copied back", hz, |i| (hx[i] + hy[i]).max(0.0));
        c.eq_f32("x*y", vram_f32(&g, w, n as usize), |i| hx[i] * hy[i]);
        let yv = vram_f32(&g, y, n as usize);
        c.eq_f32("axpy", yv, |i| hy[i] + a * hx[i]);
        let dot = (0..n as usize).fold(0f64, |acc, i| acc + hx[i] as f64 * yv[i] as f64);
        c.eq_u64("dot", g.vram_u64(s), dot.to_bits());
        let sum = (0..n as usize).fold(0f64, |acc, i| acc + (hx[i] * hy[i]) as f64);
        c.eq_u64("reduce", g.vram_u64(s + 8), sum.to_bits());
        let mut h = HASH_SEED;
        for p in hz.chunks_exact(2) {
            h = hash_word(h, p[0].to_bits() as u64 | (p[1].to_bits() as u64) << 32);
        }
        c.eq_u64("hash", g.vram_u64(s + 16), h);
        c.eq_u64("write", g.vram_u64(s + 24), r);

        // VRAM -> VRAM copy and fill.
        g.queue(op::COPY, [w, x, nb, 0, 0, 0]);
        let pattern = 0x4000_0000u32 + r as u32;
        let f = g.submit(op::FILL, [z, nb, pattern as u64, 0, 0, 0]);
        if let Err(e) = g.wait(f) {
            gpu_failed(e);
        }
        c.eq_f32("vram copy", vram_f32(&g, w, n as usize), |i| hx[i]);
        c.eq_f32("fill", vram_f32(&g, z, n as usize), |_| {
            f32::from_bits(pattern)
        });

        // SGEMM: C = 1.5 A B + 0.5 C, C starting at 1.0.
        for i in 0..M * M {
            ha[i] = val(i as u64, r + 7);
            hb[i] = val(i as u64, r + 8);
        }
        let mb = (M * M * 4) as u64;
        let (pa, pb, pc) = (small, small + mb, small + 2 * mb);
        g.queue(op::COPY, [pa, sv(ha.as_ptr()), mb, 0, 0, 0]);
        g.queue(op::COPY, [pb, sv(hb.as_ptr()), mb, 0, 0, 0]);
        g.queue(op::FILL, [pc, mb, 1.0f32.to_bits() as u64, 0, 0, 0]);
        let ab = 1.5f32.to_bits() as u64 | (0.5f32.to_bits() as u64) << 32;
        let f = g.submit(
            op::KERNEL,
            [
                kernel::SGEMM,
                pa,
                pb,
                pc,
                dims(M as u64, M as u64, M as u64),
                ab,
            ],
        );
        if let Err(e) = g.wait(f) {
            gpu_failed(e);
        }
        c.eq_f32("sgemm", vram_f32(&g, pc, M * M), |ij| {
            let (i, j) = (ij / M, ij % M);
            let mut t = 0f32;
            for p in 0..M {
                t += ha[i * M + p] * hb[p * M + j];
            }
            1.5 * t + 0.5 * 1.0
        });

        // One Jacobi step on an SG x SG grid.
        let gb = SG * SG * 4;
        let (pin, pout, pf) = (small + 3 * mb, small + 3 * mb + gb, small + 3 * mb + 2 * gb);
        for i in 0..(SG * SG) as usize {
            hs[i] = val(i as u64, r + 9);
        }
        g.queue(op::COPY, [pin, sv(hs.as_ptr()), gb, 0, 0, 0]);
        g.queue(op::FILL, [pf, gb, 0.25f32.to_bits() as u64, 0, 0, 0]);
        let f = g.submit(
            op::KERNEL,
            [kernel::STENCIL, pin, pout, pf, SG | SG << 32, s + 32],
        );
        if let Err(e) = g.wait(f) {
            gpu_failed(e);
        }
        let sg = SG as usize;
        let out = vram_f32(&g, pout, sg * sg);
        let mut sq = 0f64;
        c.eq_f32("stencil", out, |i| {
            let (yy, xx) = (i / sg, i % sg);
            let v = if yy == 0 || yy == sg - 1 || xx == 0 || xx == sg - 1 {
                hs[i]
            } else {
                0.25 * (hs[i - sg] + hs[i + sg] + hs[i - 1] + hs[i + 1] + 0.25)
            };
            v
        });
        for i in 0..sg * sg {
            let d = (out[i] - hs[i]) as f64;
            sq += d * d;
        }
        c.eq_u64("stencil change", g.vram_u64(s + 32), sq.to_bits());

        r += 1;
        if r % every == 0 {
            println!(
                "gpu-verify: round {} ok checks={} t_ms={}",
                r,
                c.checks,
                time::now_ms() - t0
            );
        }
    }
    println!(
        "gpu-verify: done rounds={} checks={} errors=0 interrupts={}",
        r,
        c.checks,
        g.interrupts()
    );
    0
}

godwit_rt::entry!("gpu-verify", main);
