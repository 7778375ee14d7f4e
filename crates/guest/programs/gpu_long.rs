//! gpu-long: one long GPU command, checked exactly: C = 1.5 A B + 0.5 C on an M x N
//! matrix with inner dimension K, submitted as a single SGEMM (seconds of work), then
//! sampled rows of C recomputed on the CPU bit for bit. The update reads C, so a chunk
//! run twice or skipped (a command preempted and resumed badly, say across a migration)
//! shows. It says when the command is in flight, so a test can act meanwhile.
//!
//! Arguments: m=M (4096), n=N (4096), k=K (1024), rows=R (rows checked; 16).
//! Exit code 0 when the result is exact, 1 on a wrong result, 2 on a GPU error.
#![no_std]
#![no_main]

use godwit_rt::gpu::{dims, Gpu};
use godwit_rt::gpu_abi::{kernel, op};
use godwit_rt::{args, println, time};

fn val(i: u64, seed: u64) -> f32 {
    let mut z = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z ^= z >> 29;
    ((z % 2001) as f32 - 1000.0) / 256.0
}

fn main() -> i32 {
    let m = args::get_u64("m", 4096).max(1);
    let n = args::get_u64("n", 4096).max(1);
    let k = args::get_u64("k", 1024).max(1);
    let rows = args::get_u64("rows", 16).clamp(1, m);
    let mut g = match Gpu::open() {
        Ok(g) => g,
        Err(e) => {
            println!("gpu-long: {}", e);
            return 2;
        }
    };
    let (a, b) = (0, m * k * 4);
    let c = b + k * n * 4;
    if c + m * n * 4 > g.usable() {
        println!("gpu-long: the matrices do not fit this VF's VRAM");
        return 2;
    }
    let put = |g: &Gpu, at: u64, count: u64, seed: u64| {
        let p = g.vram_ptr(at) as *mut f32;
        for i in 0..count {
            // SAFETY: inside the usable VRAM through the aperture (checked above).
            unsafe { core::ptr::write_volatile(p.add(i as usize), val(i, seed)) };
        }
    };
    put(&g, a, m * k, 1);
    put(&g, b, k * n, 2);
    put(&g, c, m * n, 3);
    let ab = 1.5f32.to_bits() as u64 | (0.5f32.to_bits() as u64) << 32;
    let t0 = time::now_ms();
    let f = g.submit(op::KERNEL, [kernel::SGEMM, a, b, c, dims(m, n, k), ab]);
    println!("gpu-long: submitted sgemm m={} n={} k={}", m, n, k);
    if let Err(e) = g.wait(f) {
        println!("gpu-long: {}", e);
        return 2;
    }
    let t_ms = time::now_ms() - t0;
    let at = |base: u64, i: u64| {
        // SAFETY: inside the usable VRAM through the aperture.
        unsafe { core::ptr::read_volatile((g.vram_ptr(base) as *const f32).add(i as usize)) }
    };
    // Rows spread over C, the first and last among them.
    for r in 0..rows {
        let i = if rows == 1 {
            0
        } else {
            r * (m - 1) / (rows - 1)
        };
        for j in 0..n {
            let mut t = 0f32;
            for p in 0..k {
                t += val(i * k + p, 1) * val(p * n + j, 2);
            }
            let want = 1.5 * t + 0.5 * val(i * n + j, 3);
            let got = at(c, i * n + j);
            if got.to_bits() != want.to_bits() {
                println!(
                    "gpu-long: MISMATCH C[{},{}] got={} want={}",
                    i, j, got, want
                );
                return 1;
            }
        }
    }
    println!("gpu-long: ok rows_checked={} t_ms={}", rows, t_ms);
    0
}

godwit_rt::entry!("gpu-long", main);
