//! gpu-probe: what a hostile or nosy guest can do with its GPU function, and proof that it
//! gets nowhere.
//!
//! mode=hostile: submits bad commands and register writes of every kind (bad opcode,
//!   unmapped and out-of-space addresses, page-table entries aimed past its own VRAM or
//!   its VM's RAM, writes to its own page tables, bad kernels and operands, bad ring
//!   pointers); each must set the expected error on this VF and leave it working.
//! mode=secret secret=N seconds=S mib=M: fills its VRAM (all, or the first M MiB) with N
//!   and holds it.
//! mode=scan: reads all of its VRAM (it must be zero: nothing of another VM shows), and
//!   tries to reach VRAM beyond its own (it must fault).
//! mode=irq: the VF's interrupt end to end: nothing is delivered while MSI is off, the
//!   cause is masked, or after MSI is turned off again; with MSI on, fences and errors
//!   wake a halted vCPU, and the vector's counter moves by at most one per fence.
#![no_std]
#![no_main]

use godwit_rt::gpu::{Gpu, SYS_VA};
use godwit_rt::gpu_abi::{err, irq, kernel, op, pte, reg};
use godwit_rt::{args, mem, println, sys, time};

const SCRATCH_VA: u64 = 1 << 36;

fn open() -> Gpu {
    match Gpu::open() {
        Ok(g) => g,
        Err(e) => {
            println!("gpu-probe: {}", e);
            sys::exit(2)
        }
    }
}

/// Expects `code` after `f`; clears it and checks the VF still works.
fn expect(
    g: &mut Gpu,
    name: &str,
    code: u32,
    mark: &mut u64,
    f: impl FnOnce(&mut Gpu) -> Option<u64>,
) -> bool {
    let fence = f(g);
    if let Some(fe) = fence {
        let _ = g.wait(fe);
    }
    let e = g.error();
    let ok = e.map(|e| e.code) == Some(code);
    match e {
        Some(e) => println!(
            "gpu-probe: {} -> {}{}",
            name,
            e,
            if ok { "" } else { " UNEXPECTED" }
        ),
        None => println!("gpu-probe: {} -> no error UNEXPECTED", name),
    }
    g.clear_error();
    // The VF still works: a semaphore write into guest RAM lands.
    *mark += 1;
    let slot = MARK.as_ptr() as u64;
    let good = g.run(op::WRITE, [SYS_VA + slot, *mark, 0, 0, 0, 0]).is_ok()
        // SAFETY: MARK is this program's static; the GPU wrote it.
        && unsafe { core::ptr::read_volatile(slot as *const u64) } == *mark;
    if !good {
        println!("gpu-probe: the VF stopped working after {}", name);
    }
    ok && good
}

static MARK: [u64; 1] = [0];

fn hostile() -> i32 {
    let mut g = open();
    let vram = g.vram_size;
    let buf = mem::alloc(4096).unwrap();
    let bva = SYS_VA + buf.as_ptr() as u64;
    // A canary at VRAM 0 that none of the bad commands may change.
    g.run(op::FILL, [0, 4096, 0x5a5a_5a5a, 0, 0, 0]).unwrap();
    let mut m = 0;
    let mut ok = 0;
    let mut total = 0;
    let mut t = |g: &mut Gpu, name: &str, code: u32, f: &dyn Fn(&mut Gpu) -> Option<u64>| {
        total += 1;
        if expect(g, name, code, &mut m, f) {
            ok += 1;
        }
    };
    t(&mut g, "bad opcode", err::BAD_OPCODE, &|g| {
        Some(g.submit(0x77, [0; 6]))
    });
    t(&mut g, "zero-length copy", err::BAD_ARGS, &|g| {
        Some(g.submit(op::COPY, [0, 4096, 0, 0, 0, 0]))
    });
    t(&mut g, "unaligned fill", err::BAD_ARGS, &|g| {
        Some(g.submit(op::FILL, [2, 6, 0, 0, 0, 0]))
    });
    t(&mut g, "unmapped VA", err::GPU_FAULT, &|g| {
        Some(g.submit(op::COPY, [0, 1 << 37, 64, 0, 0, 0]))
    });
    t(&mut g, "VA beyond 39 bits", err::GPU_FAULT, &|g| {
        Some(g.submit(op::FILL, [1 << 45, 64, 0, 0, 0, 0]))
    });
    t(&mut g, "write to own page tables", err::GPU_FAULT, &|g| {
        let pt = g.usable();
        Some(g.submit(op::FILL, [pt, 4096, 0xffff_ffff, 0, 0, 0]))
    });
    t(
        &mut g,
        "PTE past own VRAM (another VF's slice)",
        err::GPU_FAULT,
        &|g| {
            g.set_leaf_2m(SCRATCH_VA, vram | pte::VALID | pte::WRITE | pte::HUGE);
            Some(g.submit(op::COPY, [bva, SCRATCH_VA, 64, 0, 0, 0]))
        },
    );
    t(&mut g, "PTE past the VM's RAM", err::GPU_FAULT, &|g| {
        let beyond = (mem::ram_end() + (1 << 30)) & !((2 << 20) - 1);
        g.set_leaf_2m(
            SCRATCH_VA + (2 << 20),
            beyond | pte::VALID | pte::WRITE | pte::HUGE | pte::SYSTEM,
        );
        Some(g.submit(op::WRITE, [SCRATCH_VA + (2 << 20), 1, 0, 0, 0, 0]))
    });
    t(&mut g, "unknown kernel", err::BAD_KERNEL, &|g| {
        Some(g.submit(op::KERNEL, [99, 0, 0, 0, 0, 0]))
    });
    t(
        &mut g,
        "kernel operand in system memory",
        err::BAD_OPERAND,
        &|g| Some(g.submit(op::KERNEL, [kernel::VEC_ADD, bva, 0, 8192, 16, 0])),
    );
    t(
        &mut g,
        "overlapping kernel output",
        err::BAD_OPERAND,
        &|g| Some(g.submit(op::KERNEL, [kernel::VEC_ADD, 0, 8192, 8, 1024, 0])),
    );
    t(&mut g, "overlapping copy", err::BAD_ARGS, &|g| {
        Some(g.submit(op::COPY, [8, 0, 4096, 0, 0, 0]))
    });
    t(&mut g, "huge SGEMM", err::BAD_ARGS, &|g| {
        Some(g.submit(op::KERNEL, [kernel::SGEMM, 0, 0, 0, u64::MAX >> 1, 0]))
    });
    t(&mut g, "ring tail outside the ring", err::BAD_TAIL, &|g| {
        g.write(reg::RING_TAIL, 1 << 20);
        None
    });
    t(&mut g, "ring moved while enabled", err::BUSY_WRITE, &|g| {
        g.write(reg::RING_BASE, 0);
        None
    });
    // SAFETY: VRAM through the aperture.
    let canary_ok = (0..512).all(|i| g.vram_u64(i * 8) == 0x5a5a_5a5a_5a5a_5a5a);
    println!(
        "gpu-probe: {} of {} contained, canary {}",
        ok,
        total,
        if canary_ok { "intact" } else { "CHANGED" }
    );
    if ok == total && canary_ok {
        0
    } else {
        1
    }
}

fn secret() -> i32 {
    let mut g = open();
    let s = args::get_u64("secret", 0x5ec2_e7ed) as u32;
    let seconds = args::get_u64("seconds", 0);
    let len = match args::get_u64("mib", 0) {
        0 => g.usable(),
        m => (m << 20).min(g.usable()),
    };
    if let Err(e) = g.run(op::FILL, [0, len, s as u64, 0, 0, 0]) {
        println!("gpu-probe: {}", e);
        return 2;
    }
    let want = s as u64 | (s as u64) << 32;
    let ok = (0..len / (1 << 20)).all(|i| g.vram_u64(i << 20) == want);
    println!(
        "gpu-probe: secret {:#x} written over {} MiB ({})",
        s,
        len >> 20,
        if ok { "verified" } else { "NOT VERIFIED" }
    );
    let t0 = time::now_ms();
    while seconds == 0 || time::now_ms() - t0 < seconds * 1000 {
        time::sleep_until_ns(time::now_ns() + 200_000_000);
    }
    0
}

fn scan() -> i32 {
    let mut g = open();
    let len = g.usable();
    let mut nonzero = 0u64;
    let mut first = u64::MAX;
    let mut at = 0;
    while at < len {
        if g.vram_u64(at) != 0 {
            nonzero += 1;
            first = first.min(at);
        }
        at += 8;
    }
    println!(
        "gpu-probe: scanned {} MiB of VRAM: {} non-zero words (first at {:#x})",
        len >> 20,
        nonzero,
        if nonzero > 0 { first } else { 0 }
    );
    let dst = mem::alloc(4096).unwrap();
    g.set_leaf_2m(SCRATCH_VA, g.vram_size | pte::VALID | pte::HUGE);
    let r = g.run(
        op::COPY,
        [SYS_VA + dst.as_ptr() as u64, SCRATCH_VA, 4096, 0, 0, 0],
    );
    let fault = matches!(r, Err(e) if e.code == err::GPU_FAULT);
    println!(
        "gpu-probe: VRAM beyond this VF: {}",
        if fault {
            "unreachable (GPU fault)"
        } else {
            "REACHED"
        }
    );
    if nonzero == 0 && fault {
        0
    } else {
        1
    }
}

/// Halts until `vector`'s counter passes `before`. Interrupts of earlier steps may still
/// be pending (an MSI that lands between a driver's last check and its halt waits in the
/// LAPIC), so each step uses its own vector and this tolerates a few other wake-ups; if
/// the expected interrupt never comes, the guest hangs and its test times out.
fn drain(vector: u8, before: u64) -> u64 {
    for _ in 0..4 {
        if sys::irq_count(vector) > before {
            break;
        }
        sys::wait_irq();
    }
    sys::irq_count(vector) - before
}

fn interrupts() -> i32 {
    let mut g = open();
    let v = args::get_u64("vector", 0x41).clamp(32, 252) as u8;
    let (mut ok, mut total) = (0, 0);
    let mut check = |name: &str, good: bool, detail: u64| {
        total += 1;
        ok += good as u32;
        println!(
            "gpu-probe: irq {} ({}) {}",
            name,
            detail,
            if good { "ok" } else { "FAILED" }
        );
    };
    // A fill long enough (milliseconds) that the waiter really halts.
    const BIG: u64 = 16 << 20;
    let block = |g: &Gpu, f: u64| {
        while g.read(reg::FENCE) < f && g.error().is_none() {
            g.write(reg::WAIT_FENCE, f);
        }
    };
    let vector = |g: &mut Gpu, v: u8| {
        if let Err(e) = g.use_interrupts(v, 0) {
            println!("gpu-probe: {}", e);
            sys::exit(2);
        }
    };

    // MSI off, causes unmasked: the status bit is set, nothing is delivered.
    g.write(reg::INT_MASK, irq::ALL);
    let f = g.submit(op::FILL, [0, BIG, 1, 0, 0, 0]);
    block(&g, f);
    let st = g.read(reg::INT_STATUS);
    check(
        "status set, no MSI while MSI is off",
        st & irq::FENCE != 0 && sys::irq_count(v) == 0,
        sys::irq_count(v),
    );

    // MSI on: the waits below halt the vCPU until the VF's interrupt.
    vector(&mut g, v);
    let before = sys::irq_count(v);
    let t0 = time::now_ns();
    for i in 0..20 {
        let f = g.submit(op::FILL, [0, BIG, i, 0, 0, 0]);
        if g.wait(f).is_err() {
            break;
        }
    }
    let n = sys::irq_count(v) - before;
    check(
        "20 fence waits woken by interrupts",
        (1..=20).contains(&n) && g.vram_u64(BIG - 8) == 19 | 19 << 32,
        n,
    );
    println!(
        "gpu-probe: irq 20 waits took {} us",
        (time::now_ns() - t0) / 1000
    );

    // An error wakes the waiter too: with only ERROR enabled, the waiter halts through a
    // long fill and the bad entry after it is the one thing that can wake it.
    let v1 = v + 1;
    vector(&mut g, v1);
    g.write(reg::INT_MASK, irq::ERROR);
    let before = sys::irq_count(v1);
    g.queue(op::FILL, [0, BIG, 4, 0, 0, 0]);
    let f = g.submit(0x7777, [0; 6]);
    let e = g.wait(f);
    let n = drain(v1, before);
    check(
        "an error sends exactly one interrupt",
        matches!(e, Err(e) if e.code == err::BAD_OPCODE) && n == 1,
        n,
    );
    g.clear_error();

    // Masked causes send nothing; unmasking a pending one sends it (so a driver cannot
    // lose it).
    let v2 = v + 2;
    vector(&mut g, v2);
    g.write(reg::INT_MASK, 0);
    g.write(reg::INT_STATUS, irq::ALL);
    let before = sys::irq_count(v2);
    let f = g.submit(op::FILL, [0, BIG, 2, 0, 0, 0]);
    block(&g, f);
    sys::sleep_ns(2_000_000);
    check(
        "nothing while masked",
        sys::irq_count(v2) == before && g.read(reg::INT_STATUS) == irq::FENCE,
        sys::irq_count(v2) - before,
    );
    g.write(reg::INT_MASK, irq::ALL);
    let n = drain(v2, before);
    check("unmasking a pending cause sends it", n == 1, n);

    // MSI off again: nothing more.
    g.stop_interrupts();
    g.write(reg::INT_MASK, irq::ALL);
    g.write(reg::INT_STATUS, irq::ALL);
    let before = sys::irq_count(v2);
    let f = g.submit(op::FILL, [0, BIG, 3, 0, 0, 0]);
    block(&g, f);
    sys::sleep_ns(2_000_000);
    check(
        "nothing after MSI is turned off",
        sys::irq_count(v2) == before,
        sys::irq_count(v2) - before,
    );
    println!("gpu-probe: irq {}/{} ok", ok, total);
    if ok == total {
        0
    } else {
        1
    }
}

fn main() -> i32 {
    match args::get("mode").unwrap_or("hostile") {
        "hostile" => hostile(),
        "irq" => interrupts(),
        "secret" => secret(),
        "scan" => scan(),
        m => {
            println!("gpu-probe: unknown mode {}", m);
            2
        }
    }
}

godwit_rt::entry!("gpu-probe", main);
