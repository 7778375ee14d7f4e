//! How the source's vCPUs are scheduled while pre-copy copies their memory.
//!
//! On cores that the guest's vCPUs share with the migration's threads, the kernel's fair
//! scheduler gives each runnable thread the same weight: a guest that never blocks keeps
//! most of a core, and the migration's threads, which hand pages to one another and to
//! the kernel, wait their turn at every hand-off (docs/benchmarks.md, "The guest's
//! vCPUs at the lowest weight"). `Low` gives the vCPUs the lowest weight of the fair
//! class (nice 19) for as long as pre-copy runs: the migration's threads come first, and
//! the guest still gets every moment they leave a core idle. A host whose vCPUs have
//! cores of their own sees no difference. QEMU's multifd takes the cores by running
//! more threads; this takes them only while the migration can use them.
//!
//! A nice value counts against every thread on the host, not only the migration's: on
//! a host with other work (other guests), the vCPUs yield to all of it while pre-copy
//! runs. That is why `Low` is asked for, never the default: the test suite's CPU hog
//! held a lowered guest to a few MiB/s of its writes. (Yielding to the migration alone
//! would take a cgroup of the VM's own, with its vCPUs in a child group.)
//!
//! The vCPUs get their weight back before the pause (they must run to stop: lowered,
//! beside the hog, they took 88 ms to park) and when the migration ends, whatever its
//! outcome. Raising a nice value again takes CAP_SYS_NICE (or an RLIMIT_NICE that
//! allows it): a process that could not do it leaves its vCPUs as they are.

use serde::{Deserialize, Serialize};

/// The vCPUs' weight while pre-copy runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VcpuPriority {
    /// As they are: the guest competes with the migration on equal terms.
    #[default]
    Normal,
    /// The lowest fair-class weight: the migration first (see the module's notes).
    Low,
}

/// The nice value `Low` gives.
const LOWEST: i32 = 19;

/// Threads lowered to `LOWEST`; their nice values come back on drop.
#[must_use = "the vCPUs are lowered only while this lives"]
pub struct Lowered {
    saved: Vec<(libc::pid_t, i32)>,
}

fn nice_of(tid: libc::pid_t) -> std::io::Result<i32> {
    // getpriority returns the nice value itself, which may be -1: errno tells.
    // SAFETY: errno is this thread's; getpriority only reads the thread's scheduling.
    let n = unsafe {
        *libc::__errno_location() = 0;
        libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t)
    };
    match std::io::Error::last_os_error() {
        e if n == -1 && e.raw_os_error() != Some(0) => Err(e),
        _ => Ok(n),
    }
}

fn set_nice(tid: libc::pid_t, nice: i32) -> std::io::Result<()> {
    // SAFETY: setpriority changes only the named thread's scheduling.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Whether a thread of this process may go back to `nice` after `LOWEST`: tried on a
/// scratch thread, so that no vCPU is lowered for good.
fn can_come_back_to(nice: i32) -> std::io::Result<()> {
    std::thread::spawn(move || set_nice(0, LOWEST).and_then(|()| set_nice(0, nice)))
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("the probe's thread panicked")))
}

fn fair(tid: libc::pid_t) -> bool {
    // SAFETY: sched_getscheduler only reads the named thread's policy.
    unsafe { libc::sched_getscheduler(tid) == libc::SCHED_OTHER }
}

impl Lowered {
    /// Lowers the fair-class threads among `tids` to the lowest weight. Refused, with
    /// nothing changed, where they could not be given their weight back.
    pub fn vcpus(tids: &[libc::pid_t]) -> Result<Lowered, String> {
        let mut saved = Vec::new();
        for &t in tids.iter().filter(|&&t| fair(t)) {
            let n = nice_of(t).map_err(|e| format!("the nice value of thread {t}: {e}"))?;
            saved.push((t, n));
        }
        if let Some(least) = saved.iter().map(|&(_, n)| n).min() {
            can_come_back_to(least).map_err(|e| {
                format!("a thread could not be given its weight back (CAP_SYS_NICE): {e}")
            })?;
        }
        let l = Lowered { saved };
        for &(t, _) in &l.saved {
            // On failure `l` is dropped: what was lowered comes back.
            set_nice(t, LOWEST).map_err(|e| format!("lowering thread {t}: {e}"))?;
        }
        Ok(l)
    }

    /// How many threads were lowered (none where every one is under another policy).
    pub fn count(&self) -> usize {
        self.saved.len()
    }
}

impl Drop for Lowered {
    fn drop(&mut self) {
        for &(t, n) in &self.saved {
            match set_nice(t, n) {
                Ok(()) => {}
                // The thread has ended (its VM stopped meanwhile).
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
                Err(e) => tracing::error!("giving vCPU thread {t} its nice value {n} back: {e}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// A thread that parks until told, and its tid.
    fn parked() -> (libc::pid_t, mpsc::Sender<()>, std::thread::JoinHandle<()>) {
        let (tid_tx, tid_rx) = mpsc::channel();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let h = std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            tid_tx.send(unsafe { libc::gettid() }).unwrap();
            let _ = go_rx.recv();
        });
        (tid_rx.recv().unwrap(), go_tx, h)
    }

    #[test]
    fn lowered_threads_get_their_own_nice_values_back() {
        let (a, go_a, ha) = parked();
        let (b, go_b, hb) = parked();
        set_nice(b, 4).unwrap();
        let allowed = can_come_back_to(0).is_ok();
        match Lowered::vcpus(&[a, b]) {
            Ok(l) => {
                assert!(allowed);
                assert_eq!((nice_of(a).unwrap(), nice_of(b).unwrap()), (19, 19));
                drop(l);
            }
            Err(why) => assert!(!allowed, "{why}"),
        }
        assert_eq!((nice_of(a).unwrap(), nice_of(b).unwrap()), (0, 4));
        for (go, h) in [(go_a, ha), (go_b, hb)] {
            drop(go);
            h.join().unwrap();
        }
    }

    #[test]
    fn a_thread_under_another_policy_is_left_alone() {
        let (t, go, h) = parked();
        let p = libc::sched_param { sched_priority: 0 };
        // SAFETY: a valid sched_param for a thread of this process.
        assert_eq!(
            unsafe { libc::sched_setscheduler(t, libc::SCHED_BATCH, &p) },
            0
        );
        let l = Lowered::vcpus(&[t]);
        assert!(l.as_ref().map_or(true, |l| l.count() == 0));
        assert_eq!(nice_of(t).unwrap(), 0);
        drop(l);
        drop(go);
        h.join().unwrap();
    }
}
