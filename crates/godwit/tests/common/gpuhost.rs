//! Shared by the GPU tests: a private GPU host (its own manager directory), its status,
//! and the answer gpu-train must reach.

use super::mig::*;
use super::*;
use std::time::Duration;

/// A private GPU manager directory with `gpus` GPUs.
pub fn host(tag: &str, gpus: usize, extra: &[&str]) -> TempDir {
    let d = TempDir::new(tag);
    let dir = d.path("gpu");
    let mut args = vec!["gpu", "init", "--gpus"];
    let n = gpus.to_string();
    args.push(&n);
    args.extend(["--gpu-dir", dir.to_str().unwrap()]);
    args.extend(extra);
    let o = run(&args, Duration::from_secs(10));
    assert!(o.status.success(), "{}", stderr(&o));
    d
}

pub fn gpu_dir(d: &TempDir) -> String {
    d.path("gpu").to_str().unwrap().to_string()
}

pub fn status(d: &TempDir) -> serde_json::Value {
    let o = run(
        &["gpu", "status", "--json", "--gpu-dir", &gpu_dir(d)],
        Duration::from_secs(10),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    serde_json::from_str(&stdout(&o)).unwrap()
}

/// gpu-train's arguments in the tests that move it mid-job, whose answer is
/// `jacobi(128, 1e-10)`. Paced, it lasts at least 8 s however fast the host is: a loaded
/// host's migration must still find it running (unpaced, about 3 s in a debug build, a
/// clean clone's suite beside a CPU hog saw it end before the migration got going).
pub const TRAIN: &[&str] = &["grid=128", "tol-exp=10", "pace-ms=3"];

/// The Jacobi solve gpu-train runs, on the host in the same f32 arithmetic.
pub fn jacobi(w: usize, tol: f64) -> (u64, u64) {
    let source = 1.0e-3f32;
    let mut u = [vec![0f32; w * w], vec![0f32; w * w]];
    let mut iters = 0u64;
    loop {
        let mut change = 0f64;
        for k in 0..10 {
            let (src, dst) = if iters.is_multiple_of(2) {
                (0, 1)
            } else {
                (1, 0)
            };
            let mut sq = 0f64;
            for y in 0..w {
                for x in 0..w {
                    let i = y * w + x;
                    let s = &u[src];
                    let v = if y == 0 || y == w - 1 || x == 0 || x == w - 1 {
                        s[i]
                    } else {
                        0.25 * (s[i - w] + s[i + w] + s[i - 1] + s[i + 1] + source)
                    };
                    let d = (v - s[i]) as f64;
                    sq += d * d;
                    u[dst][i] = v;
                }
            }
            iters += 1;
            if k == 9 {
                change = sq;
            }
        }
        if change < tol {
            break;
        }
    }
    let sol = &u[(iters % 2) as usize];
    let bytes: Vec<u8> = sol.iter().flat_map(|v| v.to_le_bytes()).collect();
    let h = bytes
        .chunks_exact(8)
        .fold(godwit_gpu::abi::HASH_SEED, |h, c| {
            godwit_gpu::abi::hash_word(h, u64::from_le_bytes(c.try_into().unwrap()))
        });
    (iters, h)
}

/// gpu-train (`TRAIN`) ended in `log` with exactly the answer of a run that was never
/// moved.
pub fn assert_trained(log: &str) {
    let (iters, hash) = jacobi(128, 1e-10);
    assert!(
        log.contains(&format!("converged iterations={iters} "))
            && log.contains(&format!("hash={hash:#018x}")),
        "expected {iters} iterations and hash {hash:#018x}:\n{log}"
    );
}

/// The GPU dirtier's load in the migration tests: 16 MiB rewritten through the aperture
/// and 16 MiB by the engine, 4 MiB of GPU DMA into RAM, 48 MiB/s in all, every region
/// verified every second.
pub const DIRTIER_ARGS: [&str; 7] = [
    "aperture=16",
    "engine=16",
    "dma=4",
    "rate=48",
    "seconds=0",
    "verify-every=1",
    "report-every=250",
];

/// The GPU dirtier moved from `from` to `to` (move `hop`): the source ended cleanly,
/// and every region checks out twice more at the destination (by then every page was
/// also checked right before its next rewrite).
pub fn dirtier_arrived(from: &mut Vm, to: &Vm, hop: impl std::fmt::Display) {
    assert_eq!(exit_code(from, LIMIT), 0, "{}", read(&from.err));
    gains(&to.log, "verify ok", 2);
    assert!(
        !read(&to.log).contains("FAILED"),
        "hop {hop}:\n{}",
        read(&to.log)
    );
}

/// Shuts the GPU dirtier down where it ended up: it exits cleanly, no check failed.
pub fn dirtier_shut_down(mut vm: Vm) {
    run(
        &["shutdown", "--api-socket", vm.sock.to_str().unwrap()],
        LIMIT,
    );
    assert_eq!(exit_code(&mut vm, LIMIT), 0);
    assert!(!read(&vm.log).contains("FAILED"), "{}", read(&vm.log));
}
