//! How much CPU a guest got while a benchmark migrated it: its vCPU threads' time on a
//! CPU, on both hosts' processes, over the wall time watched.
//!
//! A pause shows only when the guest was stopped outright. On a small host the
//! migration's own threads also take cores the vCPUs would have had, and a VMM that
//! runs more of them converges sooner by slowing its guest down without ever saying it
//! throttles. This makes that cost visible beside the totals, the same way for godwit
//! and QEMU.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often the threads are read. A thread's last few milliseconds before it ends (a
/// source stopped for good) are lost, which is why this is short.
const EVERY: Duration = Duration::from_millis(5);

/// Watches the vCPU threads of some processes until `share` is called (or it is
/// dropped).
pub(crate) struct GuestCpu {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<f64>>,
}

impl GuestCpu {
    /// Starts watching the processes `pids` (source and destination).
    pub fn watch(pids: Vec<u32>) -> GuestCpu {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let t0 = Instant::now();
            // Per thread: its CPU time when first and last seen, in ns.
            let mut seen: HashMap<(u32, u32), (u64, u64)> = HashMap::new();
            loop {
                let done = s.load(Ordering::SeqCst);
                for &pid in &pids {
                    for (tid, ns) in vcpu_times(pid) {
                        seen.entry((pid, tid))
                            .and_modify(|e| e.1 = ns)
                            .or_insert((ns, ns));
                    }
                }
                if done {
                    break;
                }
                std::thread::sleep(EVERY);
            }
            let ran: u64 = seen.values().map(|(a, b)| b - a).sum();
            ran as f64 / t0.elapsed().as_nanos().max(1) as f64
        });
        GuestCpu {
            stop,
            thread: Some(thread),
        }
    }

    /// The guest's vCPU time over the time watched: 1.0 is one CPU the whole time.
    pub fn share(mut self) -> f64 {
        self.stop.store(true, Ordering::SeqCst);
        let t = self.thread.take().expect("joined only here");
        t.join().unwrap_or(f64::NAN)
    }
}

impl Drop for GuestCpu {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// The CPU time (ns) of each of `pid`'s vCPU threads: godwit's `vcpuN`, QEMU's
/// `CPU N/KVM`. Nothing for a process that has ended.
fn vcpu_times(pid: u32) -> Vec<(u32, u64)> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return vec![];
    };
    tasks
        .filter_map(|t| {
            let t = t.ok()?;
            let tid: u32 = t.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(t.path().join("comm")).ok()?;
            let comm = comm.trim_end();
            let vcpu = comm
                .strip_prefix("vcpu")
                .is_some_and(|n| n.parse::<u32>().is_ok())
                || (comm.starts_with("CPU ") && comm.ends_with("/KVM"));
            if !vcpu {
                return None;
            }
            // schedstat: time on a CPU, time waiting for one, slices (ns, ns, count).
            let s = std::fs::read_to_string(t.path().join("schedstat")).ok()?;
            Some((tid, s.split_whitespace().next()?.parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A thread named as a vCPU that spins is seen at about one CPU, one that sleeps
    /// at about none, and threads by other names not at all.
    #[test]
    fn a_busy_vcpu_thread_counts_and_others_do_not() {
        let pid = std::process::id();
        let stop = Arc::new(AtomicBool::new(false));
        let spin = |name: &str, s: Arc<AtomicBool>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(move || {
                    while !s.load(Ordering::SeqCst) {
                        std::hint::spin_loop();
                    }
                })
                .unwrap()
        };
        let other = spin("worker", stop.clone());
        // Named before it is watched, so its whole life is seen.
        let vcpu = spin("vcpu0", stop.clone());
        while vcpu_times(pid).is_empty() {
            std::thread::yield_now();
        }
        let w = GuestCpu::watch(vec![pid]);
        std::thread::sleep(Duration::from_millis(300));
        let busy = w.share();
        stop.store(true, Ordering::SeqCst);
        vcpu.join().unwrap();
        other.join().unwrap();
        // One spinning vCPU among two spinning threads: more than nothing, at most one
        // CPU (with a margin for the clock reads around it), whatever else runs here.
        assert!(busy > 0.0 && busy <= 1.05, "{busy}");
        let idle = std::thread::Builder::new()
            .name("vcpu1".into())
            .spawn(|| std::thread::sleep(Duration::from_millis(400)))
            .unwrap();
        let w = GuestCpu::watch(vec![pid]);
        std::thread::sleep(Duration::from_millis(300));
        let asleep = w.share();
        idle.join().unwrap();
        assert!(asleep < 0.05, "{asleep}");
    }
}
