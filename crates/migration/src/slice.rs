//! A short scheduler slice for the threads a touch in post-copy waits on: the
//! destination's thread that reads faults and asks for pages, the one that places the
//! answers, and the source's thread that serves the requests.
//!
//! On a busy host the background stream keeps the cores full (reading pages at the
//! source, sending them, placing them at the destination), and a thread on the fault
//! path, woken onto a core running one of those, waited its turn there: traces with the
//! kernel's scheduler events showed a request sitting 200-400 us behind a 64-page
//! placement while the other core idled. Since Linux 6.12 a fair-class thread can ask
//! for a shorter slice (`sched_attr.sched_runtime`, 0.1 ms at least): its deadline comes
//! sooner, so a wake-up preempts the background instead of queueing behind it. Older
//! kernels ignore the field.

/// `struct sched_attr` as `sched_setattr(2)` takes it (SCHED_ATTR_SIZE_VER0).
#[repr(C)]
#[derive(Default)]
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

/// Sets this thread's slice to `runtime` ns (0: the kernel's default), keeping its
/// policy and nice value; returns the slice it had. Only a normal (SCHED_OTHER) thread
/// changes: one a user put under another policy (real-time, batch, idle) stays as it
/// is.
fn set(runtime: u64) -> std::io::Result<Option<u64>> {
    let mut a = get()?;
    if a.policy != libc::SCHED_OTHER as u32 {
        return Ok(None);
    }
    let before = a.runtime;
    a.size = std::mem::size_of::<SchedAttr>() as u32;
    a.runtime = runtime;
    // SAFETY: `a` is a valid sched_attr of the size it says; pid 0 is this thread.
    let rc = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &a as *const SchedAttr, 0) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(Some(before))
}

/// A short slice for the calling thread while this lives; the slice it had before
/// comes back on drop. Best effort: a refusal is logged and changes nothing.
#[must_use = "the slice is short only while the guard lives"]
pub struct Short {
    before: Option<u64>,
}

impl Short {
    pub fn new() -> Short {
        let before = set(SLICE_NS).unwrap_or_else(|e| {
            tracing::debug!("a short scheduler slice: {e}");
            None
        });
        Short { before }
    }
}

impl Drop for Short {
    fn drop(&mut self) {
        if let Some(b) = self.before {
            if let Err(e) = set(b) {
                tracing::debug!("restoring the scheduler slice: {e}");
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
            let short = Short::new();
            let (after, nice, policy) = now();
            assert_eq!((nice, policy), (5, libc::SCHED_OTHER as u32));
            if kernel_at_least(6, 12) {
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
            let short = Short::new();
            assert_eq!(now(), before);
            drop(short);
            assert_eq!(now(), before);
            assert_eq!(before.2, libc::SCHED_BATCH as u32);
        })
        .join()
        .unwrap();
    }
}
