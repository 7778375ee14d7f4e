//! How much CPU a guest got while a benchmark migrated it: its vCPU threads' time on a
//! CPU, on both hosts' processes, over the wall time watched; and where every other
//! thread of those processes spent that time, on a CPU or waiting for one.
//!
//! A pause shows only when the guest was stopped outright. On a small host the
//! migration's own threads also take cores the vCPUs would have had, and a VMM that
//! runs more of them converges sooner by slowing its guest down without ever saying it
//! throttles. This makes that cost visible beside the totals, the same way for godwit
//! and QEMU. The threads' waits say which of them the sharing of the cores held up,
//! and how often each ran (by hand, until 2026-12-05: `perf sched`, or /proc read in a
//! loop beside the bench).

use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often the threads are read. A thread's last few milliseconds before it ends (a
/// source stopped for good) are lost, which is why this is short.
const EVERY: Duration = Duration::from_millis(5);

/// The threads of one name at one end over the time watched (a connection's several
/// readers are one row).
#[derive(Serialize, Clone, Debug, PartialEq)]
pub(crate) struct ThreadTime {
    /// Which process: the label it was watched under (source, destination).
    pub end: &'static str,
    /// The thread's name as the kernel has it (`comm`, at most 15 bytes).
    pub name: String,
    /// On a CPU, ms.
    pub cpu_ms: f64,
    /// Runnable but waiting for a CPU, ms: what sharing the cores cost it.
    pub wait_ms: f64,
    /// Times it was put on a CPU: about once per wake-up for a thread that blocks, so
    /// this against `cpu_ms` says how it worked, in many short goes or a few long ones.
    pub runs: u64,
}

/// What a watch saw.
pub(crate) struct Watched {
    /// The guest's vCPU time over the time watched: 1.0 is one CPU the whole time.
    pub guest_cpu: f64,
    /// Every thread seen that ran or waited to, by end and name, in that order.
    pub threads: Vec<ThreadTime>,
}

/// Watches the threads of some processes until `share` is called (or it is dropped).
pub(crate) struct GuestCpu {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Watched>>,
}

/// One thread as read from /proc: its name and its schedstat times (ns).
struct Task {
    tid: u32,
    name: String,
    cpu: u64,
    wait: u64,
    runs: u64,
}

impl GuestCpu {
    /// Starts watching the processes `procs` (each labelled with its end).
    pub fn watch(procs: Vec<(&'static str, u32)>) -> GuestCpu {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let t0 = Instant::now();
            // Per thread: its end, name, and (cpu ns, wait ns, runs) when first and last
            // seen.
            // A thread that was not there at the first read started since: all of its
            // time counts.
            type Seen = (&'static str, String, [u64; 3], [u64; 3]);
            let mut seen: HashMap<(u32, u32), Seen> = HashMap::new();
            let mut first = true;
            loop {
                let done = s.load(Ordering::SeqCst);
                for &(end, pid) in &procs {
                    for t in tasks(pid) {
                        let now = [t.cpu, t.wait, t.runs];
                        let e = seen.entry((pid, t.tid)).or_insert_with(|| {
                            let from = if first { now } else { [0; 3] };
                            (end, String::new(), from, now)
                        });
                        // The name last read: a thread names itself once it runs, and a
                        // read before that finds its creator's name.
                        e.1 = t.name;
                        e.3 = now;
                    }
                }
                first = false;
                if done {
                    break;
                }
                std::thread::sleep(EVERY);
            }
            let wall = t0.elapsed().as_nanos().max(1) as f64;
            let mut vcpus = 0;
            let mut rows: BTreeMap<(&'static str, String), [u64; 3]> = BTreeMap::new();
            for (end, name, a, b) in seen.into_values() {
                let [cpu, wait, runs] = [0, 1, 2].map(|k| b[k].saturating_sub(a[k]));
                if cpu == 0 && wait == 0 {
                    // Asleep throughout (the API's listener, the signal thread).
                    continue;
                }
                if is_vcpu(&name) {
                    vcpus += cpu;
                }
                let r = rows.entry((end, name)).or_default();
                r[0] += cpu;
                r[1] += wait;
                r[2] += runs;
            }
            Watched {
                guest_cpu: vcpus as f64 / wall,
                threads: rows
                    .into_iter()
                    .map(|((end, name), [cpu, wait, runs])| ThreadTime {
                        end,
                        name,
                        cpu_ms: cpu as f64 / 1e6,
                        wait_ms: wait as f64 / 1e6,
                        runs,
                    })
                    .collect(),
            }
        });
        GuestCpu {
            stop,
            thread: Some(thread),
        }
    }

    /// What was seen, up to now.
    pub fn share(mut self) -> Watched {
        self.stop.store(true, Ordering::SeqCst);
        let t = self.thread.take().expect("joined only here");
        t.join().unwrap_or(Watched {
            guest_cpu: f64::NAN,
            threads: vec![],
        })
    }
}

impl Drop for GuestCpu {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// A vCPU thread's name: godwit's `vcpuN`, QEMU's `CPU N/KVM`.
fn is_vcpu(comm: &str) -> bool {
    comm.strip_prefix("vcpu")
        .is_some_and(|n| n.parse::<u32>().is_ok())
        || (comm.starts_with("CPU ") && comm.ends_with("/KVM"))
}

/// Each of `pid`'s threads. Nothing for a process that has ended.
fn tasks(pid: u32) -> Vec<Task> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return vec![];
    };
    tasks
        .filter_map(|t| {
            let t = t.ok()?;
            let tid: u32 = t.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(t.path().join("comm")).ok()?;
            // schedstat: time on a CPU, time waiting for one, slices (ns, ns, count).
            let s = std::fs::read_to_string(t.path().join("schedstat")).ok()?;
            let mut f = s.split_whitespace().map(|x| x.parse::<u64>().ok());
            Some(Task {
                tid,
                name: comm.trim_end().to_string(),
                cpu: f.next()??,
                wait: f.next()??,
                runs: f.next()??,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A thread named as a vCPU that spins is seen at about one CPU, one that sleeps
    /// at about none, and threads by other names not in the guest's share but in the
    /// rows of threads.
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
        while !tasks(pid).iter().any(|t| is_vcpu(&t.name)) {
            std::thread::yield_now();
        }
        let w = GuestCpu::watch(vec![("here", pid)]);
        std::thread::sleep(Duration::from_millis(300));
        let seen = w.share();
        let busy = seen.guest_cpu;
        stop.store(true, Ordering::SeqCst);
        vcpu.join().unwrap();
        other.join().unwrap();
        // One spinning vCPU among two spinning threads: more than nothing, at most one
        // CPU (with a margin for the clock reads around it), whatever else runs here.
        assert!(busy > 0.0 && busy <= 1.05, "{busy}");
        let row = |w: &Watched, name: &str| {
            w.threads
                .iter()
                .find(|t| t.end == "here" && t.name == name)
                .cloned()
        };
        let worker = row(&seen, "worker").expect("the worker's row");
        assert!(worker.cpu_ms > 0.0 && worker.runs > 0, "{worker:?}");
        assert!(row(&seen, "vcpu0").is_some_and(|t| t.cpu_ms > 0.0));
        let idle = std::thread::Builder::new()
            .name("vcpu1".into())
            .spawn(|| std::thread::sleep(Duration::from_millis(400)))
            .unwrap();
        while !tasks(pid).iter().any(|t| t.name == "vcpu1") {
            std::thread::yield_now();
        }
        let w = GuestCpu::watch(vec![("here", pid)]);
        std::thread::sleep(Duration::from_millis(300));
        let seen = w.share();
        idle.join().unwrap();
        assert!(seen.guest_cpu < 0.05, "{}", seen.guest_cpu);

        // A thread seen before it names itself is counted under the name it takes.
        let w = GuestCpu::watch(vec![("here", pid)]);
        let late = std::thread::spawn(|| {
            std::thread::sleep(Duration::from_millis(50));
            let name = c"late";
            // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
            assert_eq!(unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) }, 0);
            let t = Instant::now();
            while t.elapsed() < Duration::from_millis(50) {
                std::hint::spin_loop();
            }
        });
        late.join().unwrap();
        let seen = w.share();
        assert!(
            row(&seen, "late").is_some_and(|t| t.cpu_ms > 0.0),
            "{:?}",
            seen.threads
        );
        assert!(
            row(&seen, "vcpu1").is_none_or(|t| t.cpu_ms < 15.0),
            "{:?}",
            row(&seen, "vcpu1")
        );
    }
}
