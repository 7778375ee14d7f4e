//! gpu-train: a Jacobi solve of the Poisson equation on a W x W grid (zero boundary,
//! constant source), run on the GPU to convergence: stencil steps ping-pong between two
//! VRAM buffers, the squared change of every tenth step decides when to stop, and the
//! solution's hash is the deterministic answer (tests recompute it on the host).
//!
//! Arguments: grid=W (64), tol-exp=E (stop when the squared change < 10^-E; 9),
//! max-iters=N (200000), pace-ms=P (0: the guest sleeps P ms after each check, so that
//! the job lasts at least P ms per ten steps however fast the host runs it; a test that
//! moves the VM mid-job needs the job to outlast the migration's start on a loaded host,
//! and the answer does not change).
#![no_std]
#![no_main]

use godwit_rt::gpu::Gpu;
use godwit_rt::gpu_abi::{kernel, op};
use godwit_rt::{args, println, time};

/// The source term added at every interior point (already scaled by h^2).
pub const SOURCE: f32 = 1.0e-3;
const CHECK_EVERY: u64 = 10;

fn main() -> i32 {
    let w = args::get_u64("grid", 64).clamp(3, 2048);
    let tol_exp = args::get_u64("tol-exp", 9).min(30) as i32;
    let max_iters = args::get_u64("max-iters", 200_000);
    let pace_ns = args::get_u64("pace-ms", 0).min(1000) * 1_000_000;
    let mut tol = 1.0f64;
    for _ in 0..tol_exp {
        tol /= 10.0;
    }
    let mut g = match Gpu::open() {
        Ok(g) => g,
        Err(e) => {
            println!("gpu-train: {}", e);
            return 2;
        }
    };
    if let Err(e) = g.interrupts_from_args() {
        println!("gpu-train: {}", e);
        return 2;
    }
    let nb = w * w * 4;
    let (u0, u1, f, s) = (0, nb, 2 * nb, 3 * nb);
    g.queue(op::FILL, [u0, nb, 0, 0, 0, 0]);
    g.queue(op::FILL, [u1, nb, 0, 0, 0, 0]);
    g.queue(op::FILL, [f, nb, SOURCE.to_bits() as u64, 0, 0, 0]);
    println!(
        "gpu-train: jacobi grid={}x{} tol=1e-{} max-iters={}",
        w, w, tol_exp, max_iters
    );
    let t0 = time::now_ms();
    let mut iters = 0u64;
    let mut change;
    loop {
        let mut last = 0;
        for k in 0..CHECK_EVERY {
            let (src, dst) = if iters % 2 == 0 { (u0, u1) } else { (u1, u0) };
            let report = if k == CHECK_EVERY - 1 { s } else { 0 };
            last = g.queue(
                op::KERNEL,
                [kernel::STENCIL, src, dst, f, w | w << 32, report],
            );
            iters += 1;
        }
        g.kick();
        if let Err(e) = g.wait(last) {
            println!("gpu-train: {}", e);
            return 2;
        }
        change = f64::from_bits(g.vram_u64(s));
        if iters % 2000 == 0 {
            println!(
                "gpu-train: iteration {} change={:e} t_ms={}",
                iters,
                change,
                time::now_ms() - t0
            );
        }
        if change < tol || iters >= max_iters {
            break;
        }
        if pace_ns > 0 {
            time::sleep_until_ns(time::now_ns() + pace_ns);
        }
    }
    let solution = if iters % 2 == 0 { u0 } else { u1 };
    if let Err(e) = g.run(op::KERNEL, [kernel::HASH, solution, nb, s + 8, 0, 0]) {
        println!("gpu-train: {}", e);
        return 2;
    }
    let center = f32::from_bits(g.vram_u64(solution + (w / 2 * w + w / 2) * 4) as u32);
    println!(
        "gpu-train: {} iterations={} change={:e} center={} hash={:#018x} t_ms={} interrupts={}",
        if change < tol { "converged" } else { "stopped" },
        iters,
        change,
        center,
        g.vram_u64(s + 8),
        time::now_ms() - t0,
        g.interrupts()
    );
    if change < tol {
        0
    } else {
        1
    }
}

godwit_rt::entry!("gpu-train", main);
