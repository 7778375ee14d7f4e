//! gpu-bench: measures the virtual GPU from inside the guest, where a user sees it.
//!
//! mode=measure (default): copy bandwidth guest RAM -> VRAM, VRAM -> guest RAM and VRAM ->
//!   VRAM, SGEMM and AXPY throughput, and submission-to-fence latency, as `bench:` lines
//!   (min/median/max over `reps`).
//! mode=busy seconds=S: keeps the engine busy with SGEMMs for S seconds (for scheduler
//!   share measurements) and reports how many it ran.
#![no_std]
#![no_main]

use godwit_rt::gpu::{dims, Gpu, SYS_VA};
use godwit_rt::gpu_abi::{kernel, op};
use godwit_rt::{args, mem, println, time};

fn sort(v: &mut [u64]) {
    for i in 1..v.len() {
        let mut j = i;
        while j > 0 && v[j - 1] > v[j] {
            v.swap(j - 1, j);
            j -= 1;
        }
    }
}

/// Times `reps` runs of `f` (ns each), sorted.
fn timed(reps: usize, out: &mut [u64], mut f: impl FnMut()) {
    for o in out.iter_mut().take(reps) {
        let t = time::now_ns();
        f();
        *o = time::now_ns() - t;
    }
    sort(&mut out[..reps]);
}

fn report(name: &str, unit: &str, scale: f64, ns: &[u64]) {
    // Throughput: the fastest run is the max; latency: as measured.
    let v = |t: u64| {
        if scale > 0.0 {
            scale / (t as f64 / 1e9)
        } else {
            t as f64 / 1000.0
        }
    };
    let (a, m, b) = (v(ns[0]), v(ns[ns.len() / 2]), v(ns[ns.len() - 1]));
    let (min, max) = if a < b { (a, b) } else { (b, a) };
    println!(
        "bench: {} unit={} min={:.1} median={:.1} max={:.1}",
        name, unit, min, m, max
    );
}

fn measure(g: &mut Gpu) {
    let reps = args::get_u64("reps", 5).clamp(1, 64) as usize;
    let mib = args::get_u64("mib", 64).clamp(1, 256);
    let bytes = mib << 20;
    let host = mem::alloc(bytes).expect("guest memory for the copy buffer");
    for (i, b) in host.iter_mut().enumerate() {
        *b = i as u8;
    }
    let hva = SYS_VA + host.as_ptr() as u64;
    let mut ns = [0u64; 64];
    let mbs = bytes as f64 / (1 << 20) as f64;
    // Touch the VRAM once so page faults do not count.
    g.run(op::FILL, [0, 2 * bytes, 0, 0, 0, 0]).unwrap();
    timed(reps, &mut ns, || {
        g.run(op::COPY, [0, hva, bytes, 0, 0, 0]).unwrap()
    });
    report("copy_ram_to_vram", "MiB/s", mbs, &ns[..reps]);
    timed(reps, &mut ns, || {
        g.run(op::COPY, [hva, 0, bytes, 0, 0, 0]).unwrap()
    });
    report("copy_vram_to_ram", "MiB/s", mbs, &ns[..reps]);
    timed(reps, &mut ns, || {
        g.run(op::COPY, [bytes, 0, bytes, 0, 0, 0]).unwrap()
    });
    report("copy_vram_to_vram", "MiB/s", mbs, &ns[..reps]);
    let n = 256u64;
    let mb = n * n * 4;
    g.run(op::FILL, [0, 3 * mb, 0x3f80_0000, 0, 0, 0]).unwrap();
    let one = 1.0f32.to_bits() as u64;
    timed(reps, &mut ns, || {
        g.run(
            op::KERNEL,
            [kernel::SGEMM, 0, mb, 2 * mb, dims(n, n, n), one],
        )
        .unwrap()
    });
    report(
        "sgemm_256",
        "GFLOP/s",
        2.0 * (n * n * n) as f64 / 1e9,
        &ns[..reps],
    );
    let elems = bytes / 8;
    timed(reps, &mut ns, || {
        g.run(op::KERNEL, [kernel::AXPY, 0, elems * 4, elems, one, 0])
            .unwrap()
    });
    report("axpy", "GB/s", (elems * 12) as f64 / 1e9, &ns[..reps]);
    let lat_reps = 64;
    let mut lat = [0u64; 64];
    // A NOP is done before the driver first looks; a 4 MiB fill (a few hundred us) makes
    // the driver really wait, so the wake-up path shows.
    let fill = [0, 4 << 20, 7, 0, 0, 0];
    timed(lat_reps, &mut lat, || g.run(op::NOP, [0; 6]).unwrap());
    report("submit_to_fence_latency", "us", 0.0, &lat[..lat_reps]);
    timed(lat_reps, &mut lat, || g.run(op::FILL, fill).unwrap());
    report("fill_4m_wait_fence", "us", 0.0, &lat[..lat_reps]);
    // The same waits on the VF's MSI (the vCPU halts until the interrupt).
    if g.use_interrupts(0x41, 0).is_ok() {
        timed(lat_reps, &mut lat, || g.run(op::NOP, [0; 6]).unwrap());
        report("submit_to_fence_latency_irq", "us", 0.0, &lat[..lat_reps]);
        timed(lat_reps, &mut lat, || g.run(op::FILL, fill).unwrap());
        report("fill_4m_wait_irq", "us", 0.0, &lat[..lat_reps]);
        g.stop_interrupts();
    }
}

fn busy(g: &mut Gpu) {
    let seconds = args::get_u64("seconds", 3);
    let n = 128u64;
    let mb = n * n * 4;
    g.run(op::FILL, [0, 3 * mb, 0x3f80_0000, 0, 0, 0]).unwrap();
    let t0 = time::now_ns();
    let mut done = 0u64;
    while time::now_ns() - t0 < seconds * 1_000_000_000 {
        let mut last = 0;
        for _ in 0..8 {
            last = g.queue(
                op::KERNEL,
                [
                    kernel::SGEMM,
                    0,
                    mb,
                    2 * mb,
                    dims(n, n, n),
                    1.0f32.to_bits() as u64,
                ],
            );
        }
        g.kick();
        g.wait(last).unwrap();
        done += 8;
    }
    println!("bench: busy kernels={} seconds={}", done, seconds);
}

fn main() -> i32 {
    let mut g = match Gpu::open() {
        Ok(g) => g,
        Err(e) => {
            println!("gpu-bench: {}", e);
            return 2;
        }
    };
    match args::get("mode").unwrap_or("measure") {
        "busy" => busy(&mut g),
        _ => measure(&mut g),
    }
    0
}

godwit_rt::entry!("gpu-bench", main);
