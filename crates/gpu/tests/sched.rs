//! The scheduling policies, measured on real VFs sharing one GPU through the host
//! manager's shared page: strict policies cap a VF's engine time, best effort gives an
//! idle VF's time to a busy one, and nobody starves. Bounds are loose (this is a 2-core
//! machine shared with other tests); the benchmark reports the exact shares.

mod common;

use common::*;
use godwit_gpu::abi::{kernel, op};
use godwit_gpu::cpu::CpuBackend;
use godwit_gpu::manager::{GpuSpec, HostConfig, Placement};
use godwit_gpu::mmu::GuestRam;
use godwit_gpu::sched::Policy;
use godwit_gpu::{Manager, Vf};
use std::time::{Duration, Instant};
use vm_memory::GuestAddress;

/// Engine share of each of two VFs over a one-second window; the first `busy` of them
/// run SGEMMs flat out, the others stay attached and idle.
fn shares(tag: &str, policy: Policy, busy: usize) -> Vec<f64> {
    // One measurement at a time: the tests of this file would otherwise compete for the
    // same two host cores.
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = std::env::temp_dir().join(format!("godwit-sched-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cfg = HostConfig {
        gpus: vec![GpuSpec {
            model: "GW-8".into(),
            policy,
        }],
        placement: Placement::BreadthFirst,
    };
    let m = Manager::init(&dir, cfg).unwrap();
    let leases: Vec<_> = (0..2)
        .map(|i| m.allocate("GW8-2C", &format!("t{i}")).unwrap())
        .collect();
    let stop = Instant::now() + Duration::from_millis(1800);
    let workers: Vec<_> = leases
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let ram = GuestRam::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap();
            let vf = Vf::new(
                Box::new(CpuBackend::new(VRAM).unwrap()),
                ram.clone(),
                Box::new(l.seat()),
            );
            let mut d = Driver::with(vf, ram, true);
            std::thread::spawn(move || {
                let n = 128u64;
                let dims = n | n << 21 | n << 42;
                while Instant::now() < stop {
                    if i < busy {
                        let mut f = 0;
                        for _ in 0..8 {
                            f = d.submit(
                                op::KERNEL,
                                [
                                    kernel::SGEMM,
                                    0,
                                    1 << 20,
                                    2 << 20,
                                    dims,
                                    1.0f32.to_bits() as u64,
                                ],
                            );
                        }
                        d.wait(f).unwrap();
                    } else {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(400));
    let (t1, e1) = (Instant::now(), m.engine_ns(0).unwrap());
    std::thread::sleep(Duration::from_millis(1000));
    let (t2, e2) = (Instant::now(), m.engine_ns(0).unwrap());
    for w in workers {
        w.join().unwrap();
    }
    let wall = (t2 - t1).as_nanos() as f64;
    let s: Vec<f64> = leases
        .iter()
        .map(|l| (e2[l.slot] - e1[l.slot]) as f64 / wall)
        .collect();
    drop(leases);
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!("{policy:?} busy={busy}: {s:?}");
    s
}

#[test]
fn fixed_share_caps_each_vf_at_its_profile_share() {
    // GW8-2C: four per GPU, so 1/4 each, even when the other VF is idle.
    for busy in [2, 1] {
        let s = shares(&format!("fixed{busy}"), Policy::FixedShare, busy);
        assert!(s[0] > 0.05 && s[0] <= 0.32, "{s:?}");
        if busy == 2 {
            assert!(s[1] > 0.05 && s[1] <= 0.32, "{s:?}");
        }
    }
}

#[test]
fn equal_share_splits_among_attached_vfs_and_best_effort_lends_idle_time() {
    let s = shares("equal", Policy::EqualShare, 1);
    assert!(
        s[0] > 0.05 && s[0] <= 0.58,
        "equal share, other VF idle: {s:?}"
    );
    let s = shares("be1", Policy::BestEffort, 1);
    assert!(
        s[0] > 0.58,
        "best effort, other VF idle: the busy one takes its time: {s:?}"
    );
    let s = shares("be2", Policy::BestEffort, 2);
    assert!(
        s[0] > 0.1 && s[1] > 0.1,
        "best effort, both busy: nobody starves: {s:?}"
    );
}
