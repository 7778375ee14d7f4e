//! `--seccomp log`: every call runs, and one outside the process's filter is named on
//! stderr the first time it is made, as a refusal would be. For finding what a kernel or a C library
//! other than the ones godwit was checked on needs, before refuse or kill is turned on;
//! it protects nothing.
//!
//! The filter meets a call outside it with SECCOMP_RET_USER_NOTIF instead of a trap: the
//! calling thread waits while a listener thread of godwit's own (`seccomp-log`, under
//! the same filter, making only calls on its list) names the call and lets the kernel
//! carry it out (SECCOMP_USER_NOTIF_FLAG_CONTINUE, Linux 5.5; a listener with TSYNC
//! needs 5.7). A SIGSYS handler could not do it: it cannot make the call itself, which
//! the filter would trap again while SIGSYS is blocked.
//!
//! A filter chain has one listener, and of two equal actions the newer filter's wins, so
//! the narrower filters a vCPU thread, page reader or GPU engine adds cannot hand their
//! refusals to it: theirs go to the kernel's audit log instead (SECCOMP_RET_LOG: dmesg,
//! naming the thread and the call's number, rate-limited), and the call runs.

use super::{describe, report, Error, Line};
use seccompiler::BpfProgram;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// The listener's own ioctls, which the process's filter allows in log mode (else the
/// listener would wait on itself).
pub(super) const LISTENER_IOCTLS: &[u32] = &[
    libc::SECCOMP_IOCTL_NOTIF_RECV as u32,
    libc::SECCOMP_IOCTL_NOTIF_SEND as u32,
];

/// `program` (built to trap) with each trap handed to a listener instead.
fn notifying(mut program: BpfProgram) -> BpfProgram {
    const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    for i in &mut program {
        if i.code == RET_K && i.k == libc::SECCOMP_RET_TRAP {
            i.k = libc::SECCOMP_RET_USER_NOTIF;
        }
    }
    program
}

/// Installs `program` (built to trap) with `flags` (TSYNC for the process), its traps
/// handed to a listener: the descriptor returned.
pub(super) fn listen(program: BpfProgram, flags: libc::c_ulong) -> Result<OwnedFd, Error> {
    let program = notifying(program);
    let fprog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_ptr().cast_mut().cast(),
    };
    // SAFETY: prctl takes integers; seccomp reads the program (seccompiler's
    // `sock_filter` has the kernel's layout) for the length given, and returns a new
    // descriptor or -1.
    let fd = unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(Error::Listen(std::io::Error::last_os_error()));
        }
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            flags | libc::SECCOMP_FILTER_FLAG_NEW_LISTENER,
            &fprog,
        )
    };
    if fd < 0 {
        return Err(Error::Listen(std::io::Error::last_os_error()));
    }
    // SAFETY: the kernel just made this descriptor, and nothing else holds it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Starts the listener thread on `listener`.
pub(super) fn serve(listener: OwnedFd) -> Result<(), Error> {
    std::thread::Builder::new()
        .name("seccomp-log".into())
        .spawn(move || answer_all(listener))
        .map(drop)
        .map_err(Error::Listen)
}

/// Calls named: beyond this many, a call is named every time it comes.
const REMEMBERED: usize = 4096;

/// Names each call the first time it comes (a call: its number, an ioctl's request, the
/// thread's name; a loop making one would otherwise flood the log) and lets every one
/// run. Should the listener fail, the descriptor is closed, and the kernel then answers
/// a call outside the filter ENOSYS: said once, on the same stream.
fn answer_all(listener: OwnedFd) {
    let fd = listener.as_raw_fd();
    let mut named = std::collections::HashSet::new();
    let why = loop {
        // SAFETY: the kernel requires a zeroed `seccomp_notif`, which is plain data.
        let mut n: libc::seccomp_notif = unsafe { std::mem::zeroed() };
        // SAFETY: RECV fills the `seccomp_notif` it is given.
        if unsafe { libc::ioctl(fd, libc::SECCOMP_IOCTL_NOTIF_RECV, &mut n) } != 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                // A signal; or the caller was gone before its call was read.
                Some(libc::EINTR | libc::ENOENT) => continue,
                _ => break e,
            }
        }
        let request = if n.data.nr as libc::c_long == libc::SYS_ioctl {
            n.data.args[1] as u32
        } else {
            0
        };
        let call = (n.data.nr, request, thread_name(n.pid));
        if named.len() >= REMEMBERED || !named.contains(&call) {
            let mut line = Line::default();
            line.push(b"godwit: seccomp logged ");
            describe(&mut line, call.0, call.1, &call.2);
            line.push(
                b": it ran, outside the filter (under --seccomp refuse it would fail with EPERM)",
            );
            report(line.end());
            if named.len() < REMEMBERED {
                named.insert(call);
            }
        }
        let mut go = libc::seccomp_notif_resp {
            id: n.id,
            val: 0,
            error: 0,
            flags: libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32,
        };
        // SAFETY: SEND reads the `seccomp_notif_resp` it is given. ENOENT: the caller
        // was interrupted by a signal (it makes the call again) or is gone.
        unsafe { libc::ioctl(fd, libc::SECCOMP_IOCTL_NOTIF_SEND, &mut go) };
    };
    drop(listener);
    let mut line = Line::default();
    line.push(b"godwit: seccomp's log mode stopped listening (");
    line.push(why.to_string().as_bytes());
    line.push(b"): a call outside the filter now fails with ENOSYS");
    report(line.end());
}

/// A thread's name, read while its call waits (so the thread is there).
fn thread_name(tid: u32) -> Vec<u8> {
    let mut name = std::fs::read(format!("/proc/self/task/{tid}/comm")).unwrap_or_default();
    if name.last() == Some(&b'\n') {
        name.pop();
    }
    name
}
