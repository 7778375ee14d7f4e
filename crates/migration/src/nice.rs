//! Threads' nice values set for a while and given back: the mechanism under
//! `vcpu_priority` (the source's vCPUs lowered) and `migration_priority` (the
//! migration's own threads raised) while pre-copy runs.
//!
//! Only fair-class threads are touched: one a user put under another policy (real-time,
//! batch, idle) is left as it is. Lowering a nice value (raising a thread) takes
//! CAP_SYS_NICE or an RLIMIT_NICE that allows it, and so does giving a lowered thread
//! its weight back; raising a nice value back never does.

/// A thread of this process, by its kernel id.
pub type Tid = libc::pid_t;

/// The calling thread's id.
pub fn this_thread() -> Tid {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

fn nice_of(tid: Tid) -> std::io::Result<i32> {
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

fn set_nice(tid: Tid, nice: i32) -> std::io::Result<()> {
    // SAFETY: setpriority changes only the named thread's scheduling.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn fair(tid: Tid) -> bool {
    // SAFETY: sched_getscheduler only reads the named thread's policy.
    unsafe { libc::sched_getscheduler(tid) == libc::SCHED_OTHER }
}

/// Whether a thread of this process may go to `nice` and then back to `back`: tried on
/// a scratch thread, so that none of the caller's is left changed.
fn can_go_and_come_back(nice: i32, back: i32) -> std::io::Result<()> {
    std::thread::spawn(move || set_nice(0, nice).and_then(|()| set_nice(0, back)))
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("the probe's thread panicked")))
}

/// Fair-class threads set to one nice value; each gets its own back on drop. A thread
/// that a set one starts meanwhile inherits the value and keeps it: start none that
/// outlives this.
#[must_use = "the threads keep the value only while this lives"]
pub struct Reniced {
    saved: Vec<(Tid, i32)>,
}

impl Reniced {
    /// Sets the fair-class threads among `tids` to `nice`. Refused, with nothing
    /// changed, where a thread could not be set or given its value back.
    pub fn threads(tids: &[Tid], nice: i32) -> Result<Reniced, String> {
        let mut saved = Vec::new();
        for &t in tids.iter().filter(|&&t| fair(t)) {
            let n = nice_of(t).map_err(|e| format!("the nice value of thread {t}: {e}"))?;
            saved.push((t, n));
        }
        if let Some(least) = saved.iter().map(|&(_, n)| n).min() {
            can_go_and_come_back(nice, least)
                .map_err(|e| format!("nice {nice} and back to {least} (CAP_SYS_NICE): {e}"))?;
        }
        let r = Reniced { saved };
        for &(t, _) in &r.saved {
            // On failure `r` is dropped: what was set comes back.
            set_nice(t, nice).map_err(|e| format!("nice {nice} for thread {t}: {e}"))?;
        }
        Ok(r)
    }

    /// How many threads were set (none where every one is under another policy).
    pub fn count(&self) -> usize {
        self.saved.len()
    }
}

impl Drop for Reniced {
    fn drop(&mut self) {
        for &(t, n) in &self.saved {
            match set_nice(t, n) {
                Ok(()) => {}
                // The thread has ended (its VM stopped, its connection closed).
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
                Err(e) => tracing::error!("giving thread {t} its nice value {n} back: {e}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// A thread that parks until told, and its tid.
    fn parked() -> (Tid, mpsc::Sender<()>, std::thread::JoinHandle<()>) {
        let (tid_tx, tid_rx) = mpsc::channel();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let h = std::thread::spawn(move || {
            tid_tx.send(this_thread()).unwrap();
            let _ = go_rx.recv();
        });
        (tid_rx.recv().unwrap(), go_tx, h)
    }

    #[test]
    fn set_threads_get_their_own_nice_values_back() {
        for nice in [19, -20] {
            let (a, go_a, ha) = parked();
            let (b, go_b, hb) = parked();
            set_nice(b, 4).unwrap();
            let allowed = can_go_and_come_back(nice, 0).is_ok();
            match Reniced::threads(&[a, b], nice) {
                Ok(r) => {
                    assert!(allowed);
                    assert_eq!(r.count(), 2);
                    assert_eq!((nice_of(a).unwrap(), nice_of(b).unwrap()), (nice, nice));
                    drop(r);
                }
                Err(why) => assert!(!allowed, "{why}"),
            }
            assert_eq!((nice_of(a).unwrap(), nice_of(b).unwrap()), (0, 4));
            for (go, h) in [(go_a, ha), (go_b, hb)] {
                drop(go);
                h.join().unwrap();
            }
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
        for nice in [19, -20] {
            let r = Reniced::threads(&[t], nice);
            assert!(r.as_ref().map_or(true, |r| r.count() == 0));
            assert_eq!(nice_of(t).unwrap(), 0);
        }
        drop(go);
        h.join().unwrap();
    }
}
