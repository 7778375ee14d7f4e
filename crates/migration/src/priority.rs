//! How the threads that a touch in post-copy waits on are scheduled: the
//! destination's thread that reads faults and asks for pages, the one that places the
//! answers, and the source's thread that answers the requests. Each does little but
//! wait; meanwhile the background stream (reading pages, sending them, placing them)
//! keeps the cores busy. The source's migration thread is one too at the end of every
//! pause, from COMPLETE to STARTED, where it only waits for answers.
//!
//! Woken onto a core that ran the background, such a thread waited its turn there, even
//! with the other core idle: traces with the kernel's scheduler events showed a request
//! sitting 200-700 us behind a 64-page placement, or behind the pusher that held the
//! core it was woken on. Two classes help, the first much more:
//! - The real-time class, at its lowest priority (SCHED_FIFO 1). A woken thread
//!   preempts any fair-class thread at once, and the kernel moves it to a core that is
//!   idle or runs only fair-class threads. Linux grants it with CAP_SYS_NICE (or an
//!   RLIMIT_RTPRIO above 0). These threads block between requests, so they hold no
//!   core; the kernel's real-time throttling (by default 5% of every second kept for
//!   the fair class) bounds even a runaway.
//! - Without that privilege, a short slice in the fair class (since Linux 6.12,
//!   `sched_attr.sched_runtime`, 0.1 ms at least): its deadline comes sooner, so a
//!   wake-up may preempt the background instead of queueing behind it. Older kernels
//!   ignore the field.
//!
//! The post-copy threads take only the second (`Urgent::fair`): in the real-time class
//! they also preempted the running guest's vCPU at every wake-up, and on the PVM host
//! of 2026-12-03's afternoon the guest then stood still for up to its whole post-copy
//! window (largest gaps 16 / 63 / 257 ms against 4 / 7 / 19 with the short slice).
//! The source's migration thread at the end of the pause, when no guest runs, keeps
//! the real-time class.
//!
//! A thread a user put under another policy (real-time, batch, idle) is left as it is.

/// `struct sched_attr` as `sched_setattr(2)` takes it (SCHED_ATTR_SIZE_VER0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct SchedAttr {
    size: u32,
    policy: u32,
    flags: u64,
    nice: i32,
    priority: u32,
    runtime: u64,
    deadline: u64,
    period: u64,
}

/// The shortest slice Linux grants a fair-class thread.
pub const SLICE_NS: u64 = 100_000;

fn get() -> std::io::Result<SchedAttr> {
    let mut a = SchedAttr {
        size: std::mem::size_of::<SchedAttr>() as u32,
        ..Default::default()
    };
    // SAFETY: `a` is a writable sched_attr of the size passed; pid 0 is this thread.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_sched_getattr,
            0,
            &mut a as *mut SchedAttr,
            std::mem::size_of::<SchedAttr>() as u32,
            0,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(a)
}

fn set(mut a: SchedAttr) -> std::io::Result<()> {
    a.size = std::mem::size_of::<SchedAttr>() as u32;
    // SAFETY: `a` is a valid sched_attr of the size it says; pid 0 is this thread.
    let rc = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &a as *const SchedAttr, 0) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The calling thread scheduled as urgent while this lives (see the module's notes);
/// its scheduling as before comes back on drop. Best effort: what the kernel refuses
/// is logged and changes nothing.
#[must_use = "the thread is urgent only while the guard lives"]
pub struct Urgent {
    before: Option<SchedAttr>,
}

/// What `Urgent` got the thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    RealTime,
    ShortSlice,
    /// Left as it was (another policy, or both refused).
    Unchanged,
}

impl Urgent {
    /// `who`: the thread, for the log.
    pub fn new(who: &str) -> Urgent {
        Self::logged(who, true)
    }

    /// Urgent in the fair class only (a short slice), for the threads a running guest's
    /// touches wait on in post-copy. In the real-time class they preempted the guest's
    /// vCPU at every wake-up, and on a PVM host seen on 2026-12-03 a vCPU preempted
    /// that often made no progress: the guest stood still for up to the whole post-copy
    /// window (docs/benchmarks.md, "Post-copy's guest stalls").
    pub fn fair(who: &str) -> Urgent {
        Self::logged(who, false)
    }

    /// `with`, and what the thread got, in the log.
    fn logged(who: &str, realtime: bool) -> Urgent {
        let u = Self::with(realtime);
        tracing::debug!(class = ?u.class(), "{who}: scheduling");
        u
    }

    /// `realtime`: try the real-time class first.
    fn with(realtime: bool) -> Urgent {
        let before = match get() {
            Ok(a) if a.policy == libc::SCHED_OTHER as u32 => a,
            Ok(_) => return Urgent { before: None },
            Err(e) => {
                tracing::debug!("reading this thread's scheduling: {e}");
                return Urgent { before: None };
            }
        };
        if realtime {
            let fifo = SchedAttr {
                policy: libc::SCHED_FIFO as u32,
                priority: 1,
                ..Default::default()
            };
            match set(fifo) {
                Ok(()) => {
                    return Urgent {
                        before: Some(before),
                    }
                }
                Err(e) => tracing::debug!("the real-time class for an urgent thread: {e}"),
            }
        }
        match set(SchedAttr {
            runtime: SLICE_NS,
            ..before
        }) {
            Ok(()) => Urgent {
                before: Some(before),
            },
            Err(e) => {
                tracing::debug!("a short scheduler slice: {e}");
                Urgent { before: None }
            }
        }
    }

    /// What the thread got.
    pub fn class(&self) -> Class {
        match (self.before, get()) {
            (None, _) | (_, Err(_)) => Class::Unchanged,
            (Some(_), Ok(a)) if a.policy == libc::SCHED_FIFO as u32 => Class::RealTime,
            (Some(_), Ok(_)) => Class::ShortSlice,
        }
    }
}

impl Drop for Urgent {
    fn drop(&mut self) {
        if let Some(b) = self.before {
            if let Err(e) = set(b) {
                tracing::debug!("restoring an urgent thread's scheduling: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The slice the kernel grants, this thread's nice value and policy, as it reports
    /// them.
    fn now() -> (u64, i32, u32) {
        let a = get().unwrap();
        (a.runtime, a.nice, a.policy)
    }

    fn kernel_at_least(major: u32, minor: u32) -> bool {
        let r = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let mut v = r
            .trim()
            .split(['.', '-'])
            .map(|x| x.parse::<u32>().unwrap_or(0));
        let (a, b) = (v.next().unwrap_or(0), v.next().unwrap_or(0));
        (a, b) >= (major, minor)
    }

    #[test]
    fn a_thread_gets_a_short_slice_keeps_its_nice_value_and_gets_its_slice_back() {
        std::thread::spawn(|| {
            // SAFETY: setpriority on this thread (pid 0 of PRIO_PROCESS is the caller's
            // thread on Linux).
            assert_eq!(unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 5) }, 0);
            let (before, nice, policy) = now();
            assert_eq!((nice, policy), (5, libc::SCHED_OTHER as u32));
            let short = Urgent::fair("a test");
            let (after, nice, policy) = now();
            assert_eq!((nice, policy), (5, libc::SCHED_OTHER as u32));
            if kernel_at_least(6, 12) {
                assert_eq!(short.class(), Class::ShortSlice);
                assert_eq!(after, SLICE_NS);
                assert!(before > SLICE_NS, "{before}");
            }
            drop(short);
            assert_eq!(now(), (before, 5, libc::SCHED_OTHER as u32));
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_thread_under_another_policy_is_left_alone() {
        std::thread::spawn(|| {
            let p = libc::sched_param { sched_priority: 0 };
            // SAFETY: `p` is a valid sched_param; pid 0 is this thread.
            assert_eq!(
                unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &p) },
                0
            );
            let before = now();
            let short = Urgent::new("a test");
            assert_eq!(short.class(), Class::Unchanged);
            assert_eq!(now(), before);
            drop(short);
            assert_eq!(now(), before);
            assert_eq!(before.2, libc::SCHED_BATCH as u32);
        })
        .join()
        .unwrap();
    }

    /// Whether this process may use the real-time class (tried on a scratch thread).
    fn realtime_allowed() -> bool {
        std::thread::spawn(|| {
            let p = libc::sched_param { sched_priority: 1 };
            // SAFETY: `p` is a valid sched_param; pid 0 is this (scratch) thread.
            unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &p) == 0 }
        })
        .join()
        .unwrap()
    }

    #[test]
    fn a_thread_goes_real_time_where_allowed_and_comes_back_as_it_was() {
        let allowed = realtime_allowed();
        std::thread::spawn(move || {
            // SAFETY: as above.
            assert_eq!(unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 3) }, 0);
            let before = get().unwrap();
            let urgent = Urgent::new("a test");
            let during = get().unwrap();
            if allowed {
                assert_eq!(urgent.class(), Class::RealTime);
                assert_eq!(
                    (during.policy, during.priority),
                    (libc::SCHED_FIFO as u32, 1)
                );
            } else {
                assert_ne!(urgent.class(), Class::RealTime);
                assert_eq!(during.policy, libc::SCHED_OTHER as u32);
            }
            drop(urgent);
            assert_eq!(get().unwrap(), before);
        })
        .join()
        .unwrap();
    }
}
