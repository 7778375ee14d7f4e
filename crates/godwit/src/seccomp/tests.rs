//! The filter under the real kernel, on a thread of its own (a filter stays with its
//! thread and the threads that thread creates; the rest of the test process is free).

use super::*;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Where refusals are reported is the process's: one test at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Whether this kernel takes seccomp filters (and counts them, Linux 5.9 on).
fn available() -> bool {
    let yes = std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .contains("Seccomp_filters:");
    if !yes {
        eprintln!("skipping: this kernel takes no seccomp filters");
    }
    yes
}

/// What a raw system call returned: its value, or its errno.
fn call(f: impl FnOnce() -> libc::c_long) -> Result<libc::c_long, i32> {
    let r = f();
    if r < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        Ok(r)
    }
}

fn status_field(name: &str) -> String {
    let s = std::fs::read_to_string("/proc/thread-self/status").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(name))
        .map(|v| v.trim().to_string())
        .unwrap_or_default()
}

/// The refusal lines written while it lives, read from a pipe.
struct Report {
    reader: std::fs::File,
    writer: Option<OwnedFd>,
}

impl Report {
    fn new() -> Report {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills the two descriptors it is given.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both are this test's own, just made.
        let (reader, writer) = unsafe {
            (
                std::fs::File::from_raw_fd(fds[0]),
                OwnedFd::from_raw_fd(fds[1]),
            )
        };
        REPORT_FD.store(writer.as_raw_fd(), Ordering::Relaxed);
        Report {
            reader,
            writer: Some(writer),
        }
    }

    fn lines(mut self) -> Vec<String> {
        REPORT_FD.store(libc::STDERR_FILENO, Ordering::Relaxed);
        drop(self.writer.take());
        let mut text = String::new();
        self.reader.read_to_string(&mut text).unwrap();
        text.lines().map(String::from).collect()
    }
}

/// Puts this thread (and the threads it makes) under the process's filter, refusing
/// with EPERM.
fn under_process_filter() {
    handle_sigsys().unwrap();
    for p in programs(SeccompAction::Trap, false).unwrap() {
        seccompiler::apply_filter(&p).unwrap();
    }
}

/// Runs `f` on a thread named `name` under the filter that refuses with EPERM.
fn filtered<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            under_process_filter();
            f()
        })
        .unwrap()
        .join()
        .unwrap()
}

#[test]
fn calls_outside_the_filter_fail_with_eperm_and_are_named_and_the_rest_work() {
    if !available() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let report = Report::new();
    // A test runner may be under filters of its own.
    let own: u32 = status_field("Seccomp_filters:").parse().unwrap_or(0);
    let seen = filtered("filtered-test", || {
        let nowhere = c"/nonexistent/godwit-seccomp-test";
        let argv = [nowhere.as_ptr(), std::ptr::null()];
        // SAFETY: each call is given valid arguments (or none it reads); the fork, were
        // it allowed, ends its child at once.
        unsafe {
            let exec = call(|| {
                libc::syscall(
                    libc::SYS_execve,
                    nowhere.as_ptr(),
                    argv.as_ptr(),
                    std::ptr::null::<*const libc::c_char>(),
                )
            });
            let fork = call(|| {
                let r = libc::syscall(libc::SYS_clone, libc::SIGCHLD, 0, 0, 0, 0);
                if r == 0 {
                    libc::_exit(0);
                }
                r
            });
            // Allowed, it would answer ESRCH: init is no tracee of this thread.
            let ptrace = call(|| libc::syscall(libc::SYS_ptrace, libc::PTRACE_PEEKDATA, 1, 0, 0));
            let unshare = call(|| libc::syscall(libc::SYS_unshare, 0));
            let packet = call(|| libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) as libc::c_long);
            let clone3 = call(|| libc::syscall(libc::SYS_clone3, 0, 0));
            let unix = call(|| libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) as libc::c_long);
            if let Ok(fd) = unix {
                libc::close(fd as i32);
            }
            // A thread made under the filter (clone3 refused, clone with CLONE_THREAD
            // allowed) works, and is under it too.
            let child = std::thread::spawn(|| {
                (
                    call(|| libc::syscall(libc::SYS_unshare, 0)),
                    status_field("Seccomp_filters:"),
                )
            })
            .join()
            .unwrap();
            (
                [exec, fork, ptrace, unshare, packet, clone3],
                unix.is_ok(),
                child,
                status_field("Seccomp_filters:"),
            )
        }
    });
    let got = report.lines();
    let (refusals, unix_ok, (child_unshare, child_filters), filters) = seen;
    let [exec, fork, ptrace, unshare, packet, clone3] = refusals;
    assert_eq!(exec, Err(libc::EPERM), "execve");
    assert_eq!(fork, Err(libc::EPERM), "clone without CLONE_THREAD");
    assert_eq!(ptrace, Err(libc::EPERM), "ptrace");
    assert_eq!(unshare, Err(libc::EPERM), "unshare");
    assert_eq!(packet, Err(libc::EPERM), "socket(AF_PACKET)");
    assert_eq!(clone3, Err(libc::ENOSYS), "clone3");
    assert!(unix_ok, "socket(AF_UNIX) must be allowed");
    assert_eq!(
        child_unshare,
        Err(libc::EPERM),
        "a thread made under the filter"
    );
    let n = (own + 2).to_string();
    assert_eq!((filters.as_str(), child_filters.as_str()), (&*n, &*n));
    // Not this thread's, which has none of godwit's.
    assert_eq!(status_field("Seccomp_filters:"), own.to_string());
    let want = |nr: libc::c_long, thread: &str| {
        format!(
            "godwit: seccomp refused system call {nr} (x86_64) in thread \"{thread}\": it \
             failed with EPERM (`godwit run --seccomp off` allows it)"
        )
    };
    // clone3's ENOSYS is not a refusal.
    assert_eq!(got.len(), 6, "{got:?}");
    assert_eq!(got[0], want(libc::SYS_execve, "filtered-test"));
    assert_eq!(got[1], want(libc::SYS_clone, "filtered-test"));
    assert_eq!(got[2], want(libc::SYS_ptrace, "filtered-test"));
    assert_eq!(got[4], want(libc::SYS_socket, "filtered-test"));
    assert!(
        got[5].contains(&format!("call {} ", libc::SYS_unshare)),
        "{got:?}"
    );
}

/// An ioctl on a pipe: its answer, or its errno.
fn ioctl(fd: i32, request: u64) -> Result<libc::c_long, i32> {
    let mut arg = [0u64; 8];
    // SAFETY: every request tried here reads or writes at most 64 bytes at `arg`.
    call(|| unsafe { libc::syscall(libc::SYS_ioctl, fd, request, arg.as_mut_ptr()) })
}

/// ioctl(2) only for KVM's and userfaultfd's families and three socket queries. Tried on
/// a pipe, where an allowed request the pipe does not know answers ENOTTY and a refused
/// one EPERM.
#[test]
fn ioctls_outside_kvm_userfaultfd_and_the_socket_queries_are_refused_and_named() {
    if !available() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let report = Report::new();
    let tiocsti = libc::TIOCSTI;
    let tiocgwinsz = libc::TIOCGWINSZ;
    let seen = filtered("filtered-ioctl", move || {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills the two descriptors it is given.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        let r = fds[0];
        let got = [
            ioctl(r, libc::FIONREAD),
            ioctl(r, libc::FIONBIO),
            // KVM_GET_API_VERSION and UFFDIO_API: their families are allowed.
            ioctl(r, 0xae00),
            ioctl(r, 0xc018_aa3f),
            ioctl(r, tiocsti),
            ioctl(r, tiocgwinsz),
            // The kernel reads 32 bits: a refused request with a bit set above them is
            // still the same request.
            ioctl(r, tiocgwinsz | 1 << 32),
        ];
        for fd in fds {
            // SAFETY: this thread's own descriptors.
            unsafe { libc::close(fd) };
        }
        got
    });
    let lines = report.lines();
    let [fionread, fionbio, kvm, uffd, sti, winsz, winsz_high] = seen;
    assert_eq!(fionread, Ok(0), "FIONREAD");
    assert_eq!(fionbio, Ok(0), "FIONBIO");
    assert_eq!(kvm, Err(libc::ENOTTY), "a KVM request");
    assert_eq!(uffd, Err(libc::ENOTTY), "a userfaultfd request");
    assert_eq!(sti, Err(libc::EPERM), "TIOCSTI");
    assert_eq!(winsz, Err(libc::EPERM), "TIOCGWINSZ");
    assert_eq!(winsz_high, Err(libc::EPERM), "TIOCGWINSZ with bit 32 set");
    let want = |request: u64| {
        format!(
            "godwit: seccomp refused system call {} (x86_64, ioctl request 0x{request:08x}) \
             in thread \"filtered-ioctl\": it failed with EPERM (`godwit run --seccomp off` \
             allows it)",
            libc::SYS_ioctl
        )
    };
    assert_eq!(lines, [want(tiocsti), want(tiocgwinsz), want(tiocgwinsz)]);
}

/// A vCPU thread's own filter on top: it may still write, wait and run its vCPU, but
/// opens and connects nothing, nor does a thread it makes. The process's filter lets a
/// thread add a filter to itself, never to every thread (TSYNC).
#[test]
fn a_vcpu_thread_and_the_threads_it_makes_open_nothing() {
    if !available() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let own: u32 = status_field("Seccomp_filters:").parse().unwrap_or(0);
    let report = Report::new();
    // The thread cannot read its own /proc entry once filtered: this one reads it, while
    // the thread waits.
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let t = std::thread::Builder::new()
        .name("vcpu-test".into())
        .spawn(move || {
            under_process_filter();
            let [quiet, prog] = thread_programs(Role::Vcpu, SeccompAction::Trap).unwrap();
            let everyone = call(|| {
                let p = libc::sock_fprog {
                    len: prog.len() as u16,
                    filter: prog.as_ptr() as *mut libc::sock_filter,
                };
                // SAFETY: a valid program the kernel copies.
                unsafe {
                    libc::syscall(
                        libc::SYS_seccomp,
                        libc::SECCOMP_SET_MODE_FILTER,
                        libc::SECCOMP_FILTER_FLAG_TSYNC,
                        &p as *const libc::sock_fprog,
                    )
                }
            });
            seccompiler::apply_filter(&quiet).unwrap();
            seccompiler::apply_filter(&prog).unwrap();
            // SAFETY: valid arguments; the descriptors, were they made, are closed.
            let seen = unsafe {
                let open = call(|| {
                    libc::open(c"/proc/self/status".as_ptr(), libc::O_RDONLY) as libc::c_long
                });
                let unix =
                    call(|| libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) as libc::c_long);
                for fd in [open, unix].into_iter().flatten() {
                    libc::close(fd as i32);
                }
                let written =
                    call(|| libc::write(libc::STDERR_FILENO, b"".as_ptr().cast(), 0) as _);
                // KVM's ioctls only: a pipe answers ENOTTY to KVM_GET_API_VERSION, and
                // the socket query the process allows is refused.
                let kvm = ioctl(libc::STDERR_FILENO, 0xae00);
                let fionread = ioctl(libc::STDERR_FILENO, libc::FIONREAD);
                // A thread it makes is under its filter too.
                let thread = std::thread::spawn(|| {
                    call(|| libc::open(c"/proc/self/status".as_ptr(), libc::O_RDONLY) as _)
                })
                .join()
                .unwrap();
                (everyone, open, unix, written, kvm, fionread, thread)
            };
            // SAFETY: no arguments.
            tid_tx.send(unsafe { libc::gettid() }).unwrap();
            let _ = go_rx.recv();
            seen
        })
        .unwrap();
    let tid = tid_rx.recv().unwrap();
    let filters = std::fs::read_to_string(format!("/proc/self/task/{tid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Seccomp_filters:"))
        .map(|v| v.trim().to_string())
        .unwrap_or_default();
    go_tx.send(()).unwrap();
    let (everyone, open, unix, written, kvm, fionread, thread) = t.join().unwrap();
    assert_eq!(everyone, Err(libc::EPERM), "seccomp(2) with TSYNC");
    assert_eq!(filters, (own + 4).to_string());
    // Answered without a refusal's SIGSYS: the C library opens files of its own.
    assert_eq!(open, Err(libc::EACCES), "open");
    assert_eq!(unix, Err(libc::EPERM), "socket(AF_UNIX)");
    assert_eq!(written, Ok(0), "write");
    assert_ne!(kvm, Err(libc::EPERM), "a KVM ioctl");
    assert_eq!(fionread, Err(libc::EPERM), "FIONREAD");
    assert_eq!(
        thread,
        Err(libc::EACCES),
        "open, in a thread a vCPU thread made"
    );
    let got = report.lines();
    let calls: Vec<String> = [libc::SYS_seccomp, libc::SYS_socket, libc::SYS_ioctl]
        .iter()
        .map(|nr| format!("call {nr} "))
        .collect();
    assert_eq!(got.len(), 3, "{got:?}");
    for (line, call) in got.iter().zip(&calls) {
        assert!(line.contains(call), "{line} has no {call}");
    }
}

/// A page reader's own filter on top (the threads that parse a migration stream or a
/// snapshot): it reads, writes, places pages and may make threads, but opens no file and
/// makes no socket, memory file or userfaultfd; the process's checks of ioctl still hold.
#[test]
fn a_page_reader_opens_nothing_and_makes_no_socket_nor_does_a_thread_it_makes() {
    if !available() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let report = Report::new();
    let seen = filtered("reader-test", || {
        for p in thread_programs(Role::PageReader, SeccompAction::Trap).unwrap() {
            seccompiler::apply_filter(&p).unwrap();
        }
        let mut fds = [0; 2];
        // SAFETY: valid arguments; the descriptors, were they made, are closed.
        unsafe {
            let pipe = call(|| libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) as _);
            let fionread = ioctl(fds[0], libc::FIONREAD);
            let winsz = ioctl(fds[0], libc::TIOCGWINSZ);
            let written = call(|| libc::write(fds[1], b"x".as_ptr().cast(), 1) as _);
            let open =
                call(|| libc::open(c"/proc/self/status".as_ptr(), libc::O_RDONLY) as libc::c_long);
            let unix = call(|| libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) as libc::c_long);
            let memfd = call(|| libc::memfd_create(c"reader".as_ptr(), 0) as libc::c_long);
            for fd in [open, unix, memfd].into_iter().flatten() {
                libc::close(fd as i32);
            }
            for fd in fds {
                libc::close(fd);
            }
            let thread = std::thread::spawn(|| {
                call(|| libc::open(c"/proc/self/status".as_ptr(), libc::O_RDONLY) as _)
            })
            .join()
            .unwrap();
            (pipe, fionread, winsz, written, open, unix, memfd, thread)
        }
    });
    let got = report.lines();
    let (pipe, fionread, winsz, written, open, unix, memfd, thread) = seen;
    assert_eq!(pipe, Ok(0), "pipe2");
    assert_eq!(fionread, Ok(0), "FIONREAD");
    assert_eq!(winsz, Err(libc::EPERM), "TIOCGWINSZ");
    assert_eq!(written, Ok(1), "write");
    assert_eq!(open, Err(libc::EACCES), "open");
    assert_eq!(unix, Err(libc::EPERM), "socket(AF_UNIX)");
    assert_eq!(memfd, Err(libc::EPERM), "memfd_create");
    assert_eq!(thread, Err(libc::EACCES), "open, in a thread a reader made");
    let calls = [libc::SYS_ioctl, libc::SYS_socket, libc::SYS_memfd_create];
    assert_eq!(got.len(), calls.len(), "{got:?}");
    for (line, nr) in got.iter().zip(calls) {
        assert!(
            line.starts_with(&format!("godwit: seccomp refused system call {nr} ")),
            "{line}"
        );
        assert!(line.contains("reader-test"), "{line}");
    }
}

/// A source's migration thread's own filter on top: it dials (a socket of the process's
/// domains, connect) and a thread it makes may too, but it opens no file, listens for
/// nothing, and creates, renames or removes nothing in the file system.
#[test]
fn a_source_connects_but_opens_binds_and_renames_nothing() {
    if !available() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let at = listener.local_addr().unwrap();
    let dir = std::env::temp_dir().join(format!("godwit-source-filter-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (from, to) = (dir.join("a"), dir.join("b"));
    std::fs::write(&from, b"x").unwrap();
    let paths = (
        std::ffi::CString::new(from.to_str().unwrap()).unwrap(),
        std::ffi::CString::new(to.to_str().unwrap()).unwrap(),
    );
    let report = Report::new();
    let seen = filtered("source-test", move || {
        for p in thread_programs(Role::Source, SeccompAction::Trap).unwrap() {
            seccompiler::apply_filter(&p).unwrap();
        }
        let dialled = std::net::TcpStream::connect(at)
            .map(drop)
            .map_err(|e| e.to_string());
        let in_thread = std::thread::spawn(move || {
            std::net::TcpStream::connect(at)
                .map(drop)
                .map_err(|e| e.to_string())
        })
        .join()
        .unwrap();
        // SAFETY: valid arguments; the descriptors, were they made, are closed.
        unsafe {
            let open =
                call(|| libc::open(c"/proc/self/status".as_ptr(), libc::O_RDONLY) as libc::c_long);
            let netlink =
                call(|| libc::socket(libc::AF_NETLINK, libc::SOCK_RAW, 0) as libc::c_long);
            let tcp = call(|| libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) as libc::c_long);
            let any: libc::sockaddr_in = std::mem::zeroed();
            let bind = match tcp {
                Ok(fd) => call(|| {
                    libc::bind(
                        fd as i32,
                        (&any as *const libc::sockaddr_in).cast(),
                        std::mem::size_of::<libc::sockaddr_in>() as u32,
                    ) as libc::c_long
                }),
                Err(e) => Err(e),
            };
            let rename =
                call(|| libc::syscall(libc::SYS_rename, paths.0.as_ptr(), paths.1.as_ptr()));
            for fd in [open, netlink, tcp].into_iter().flatten() {
                libc::close(fd as i32);
            }
            (
                dialled,
                in_thread,
                open,
                netlink,
                tcp.map(|_| ()),
                bind,
                rename,
            )
        }
    });
    let got = report.lines();
    let (dialled, in_thread, open, netlink, tcp, bind, rename) = seen;
    assert_eq!(dialled, Ok(()), "connect");
    assert_eq!(in_thread, Ok(()), "connect, in a thread it made");
    assert_eq!(open, Err(libc::EACCES), "open");
    assert_eq!(netlink, Err(libc::EPERM), "socket(AF_NETLINK)");
    assert_eq!(tcp, Ok(()), "socket(AF_INET)");
    assert_eq!(bind, Err(libc::EPERM), "bind");
    assert_eq!(rename, Err(libc::EPERM), "rename");
    assert!(from.exists() && !to.exists(), "renamed");
    std::fs::remove_dir_all(&dir).unwrap();
    let calls = [libc::SYS_socket, libc::SYS_bind, libc::SYS_rename];
    assert_eq!(got.len(), calls.len(), "{got:?}");
    for (line, nr) in got.iter().zip(calls) {
        assert!(
            line.starts_with(&format!("godwit: seccomp refused system call {nr} ")),
            "{line}"
        );
        assert!(line.contains("source-test"), "{line}");
    }
}

#[test]
fn a_sigsys_that_the_filter_did_not_send_changes_nothing() {
    if !available() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let report = Report::new();
    let sent = filtered("sigsys-by-hand", || {
        // SAFETY: a signal to this very thread, which handles SIGSYS.
        call(|| unsafe {
            libc::syscall(
                libc::SYS_tgkill,
                libc::getpid(),
                libc::gettid(),
                libc::SIGSYS,
            )
        })
    });
    // The call that sent it succeeded (the handler left its answer alone), and nothing
    // was reported.
    assert_eq!(sent, Ok(0));
    assert_eq!(report.lines(), Vec::<String>::new());
}

/// This test binary again, running test `name` (of this module) alone with `env` set: a
/// child for a test that puts the whole process under a filter.
fn this_test_alone(name: &str, env: &str) -> std::process::Command {
    let mut c = std::process::Command::new(std::env::current_exe().unwrap());
    c.args(["--exact", &format!("seccomp::tests::{name}")])
        .args(["--test-threads=1", "--nocapture"])
        .env(env, "1");
    c
}

/// `--seccomp kill`: the kernel kills the whole process at the first call outside it. Run
/// in a child (this test binary again, this test alone), which the call must kill.
#[test]
fn in_kill_mode_a_call_outside_the_filter_kills_the_process() {
    if !available() {
        return;
    }
    const CHILD: &str = "GODWIT_SECCOMP_KILL_CHILD";
    if std::env::var_os(CHILD).is_some() {
        for p in programs(SeccompAction::KillProcess, false).unwrap() {
            seccompiler::apply_filter(&p).unwrap();
        }
        println!("filter in");
        // SAFETY: a call with no argument it reads.
        unsafe { libc::syscall(libc::SYS_unshare, 0) };
        println!("still alive");
        std::process::exit(0);
    }
    let out = this_test_alone(
        "in_kill_mode_a_call_outside_the_filter_kills_the_process",
        CHILD,
    )
    .output()
    .unwrap();
    use std::os::unix::process::ExitStatusExt;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("filter in"), "{:?} {stdout}", out.status);
    assert!(!stdout.contains("still alive"), "{stdout}");
    assert_eq!(out.status.signal(), Some(libc::SIGSYS), "{stdout}");
}

/// `--seccomp log`: every call runs, and one outside the process's filter is named by
/// godwit's listener thread (itself under the filter), once; one outside only a page
/// reader's own list runs and is left to the kernel's audit log. Run in a child (this
/// test binary again, this test alone), since `install` puts the whole process under
/// the filter.
#[test]
fn in_log_mode_calls_outside_the_filter_run_and_are_named() {
    if !available() {
        return;
    }
    const CHILD: &str = "GODWIT_SECCOMP_LOG_CHILD";
    if std::env::var_os(CHILD).is_some() {
        return log_child();
    }
    let kmsg_before = kernel_log();
    let child = this_test_alone(
        "in_log_mode_calls_outside_the_filter_run_and_are_named",
        CHILD,
    )
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    let pid = child.id();
    // A listener that waited on itself would hang the child: bounded.
    let (done, out) = std::sync::mpsc::channel();
    std::thread::spawn(move || done.send(child.wait_with_output()));
    let out = match out.recv_timeout(std::time::Duration::from_secs(120)) {
        Ok(o) => o.unwrap(),
        Err(_) => {
            // SAFETY: a signal to the child this test started.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("the log-mode child hung: a call waited for a listener that never answered");
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}\n{stdout}\n{stderr}", out.status);
    assert!(stdout.contains("log child: all ran"), "{stdout}\n{stderr}");
    let logged: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("godwit: seccomp"))
        .collect();
    let want = |nr: libc::c_long, extra: &str, thread: &str| {
        format!(
            "godwit: seccomp logged system call {nr} (x86_64{extra}) in thread \"{thread}\": \
             it ran, outside the filter (under --seccomp refuse it would fail with EPERM)"
        )
    };
    let winsz = format!(", ioctl request 0x{:08x}", libc::TIOCGWINSZ);
    assert_eq!(
        logged,
        [
            want(libc::SYS_ioctl, &winsz, "log-main"),
            want(libc::SYS_unshare, "", "log-main"),
            want(libc::SYS_execve, "", "log-main"),
            want(libc::SYS_ioctl, &winsz, "log-reader"),
        ],
        "{stderr}"
    );
    // The reader's socket(2), outside its own list only, in the kernel's audit log
    // where this test can read it (root, no audit daemon taking the records).
    let Some(before) = kmsg_before else {
        eprintln!("skipping the audit-log check: /dev/kmsg cannot be read here");
        return;
    };
    let logs_log = std::fs::read_to_string("/proc/sys/kernel/seccomp/actions_logged")
        .is_ok_and(|a| a.split_whitespace().any(|w| w == "log"));
    if !logs_log || auditd_running() {
        eprintln!("skipping the audit-log check: SECCOMP_RET_LOG is not logged to dmesg here");
        return;
    }
    let record = |r: &&String| {
        r.contains(&format!(" pid={pid} "))
            && r.contains("comm=\"log-reader\"")
            && r.contains(&format!(" syscall={} ", libc::SYS_socket))
    };
    // The kernel's audit thread prints its records when it runs: waited for.
    let mut new = Vec::new();
    for _ in 0..100 {
        let after = kernel_log().unwrap();
        new = after.into_iter().filter(|r| !before.contains(r)).collect();
        if new.iter().any(|r| record(&r)) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("no audit record of the reader's socket(2) in dmesg: {new:#?}");
}

/// The log-mode child: godwit's `install`, then calls outside the filter on the main
/// thread and in a page reader.
fn log_child() {
    install(Seccomp::Log).unwrap();
    let name = |n: &std::ffi::CStr| {
        // SAFETY: PR_SET_NAME reads a NUL-terminated name.
        unsafe { libc::prctl(libc::PR_SET_NAME, n.as_ptr(), 0, 0, 0) };
    };
    name(c"log-main");
    let mut fds = [0; 2];
    let nowhere = c"/nonexistent/godwit-seccomp-log-test";
    let argv = [nowhere.as_ptr(), std::ptr::null()];
    // SAFETY: valid arguments; the execve, which runs, finds no program.
    unsafe {
        assert_eq!(libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC), 0);
        assert_eq!(ioctl(fds[0], libc::FIONREAD), Ok(0), "FIONREAD");
        assert_eq!(ioctl(fds[0], libc::TIOCGWINSZ), Err(libc::ENOTTY));
        // The same call again runs and is not named again.
        assert_eq!(ioctl(fds[0], libc::TIOCGWINSZ), Err(libc::ENOTTY));
        assert_eq!(call(|| libc::syscall(libc::SYS_unshare, 0)), Ok(0));
        let exec = call(|| {
            libc::syscall(
                libc::SYS_execve,
                nowhere.as_ptr(),
                argv.as_ptr(),
                std::ptr::null::<*const libc::c_char>(),
            )
        });
        assert_eq!(exec, Err(libc::ENOENT), "execve");
    }
    // The reader's filters are read by this thread (a reader opens nothing) while it waits.
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let reader = std::thread::spawn(move || {
        name(c"log-reader");
        godwit_vmm::confine::enter(Role::PageReader).unwrap();
        // SAFETY: valid arguments; the socket made is closed.
        unsafe {
            assert_eq!(ioctl(fds[0], libc::TIOCGWINSZ), Err(libc::ENOTTY));
            let unix = call(|| libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) as _);
            assert!(unix.is_ok(), "socket(AF_UNIX) in a page reader: {unix:?}");
            libc::close(unix.unwrap() as i32);
            let open =
                call(|| libc::open(c"/proc/self/status".as_ptr(), libc::O_RDONLY) as libc::c_long);
            assert_eq!(open, Err(libc::EACCES), "open in a page reader");
            tid_tx.send(libc::gettid()).unwrap();
        }
        let _ = go_rx.recv();
    });
    let filters = |path: &str| {
        let s = std::fs::read_to_string(path).unwrap();
        let n = s.lines().find_map(|l| l.strip_prefix("Seccomp_filters:"));
        n.unwrap().trim().parse::<u32>().unwrap()
    };
    let tid = tid_rx.recv().unwrap();
    let theirs = filters(&format!("/proc/self/task/{tid}/status"));
    drop(go_tx);
    reader.join().unwrap();
    assert_eq!(theirs, filters("/proc/thread-self/status") + 2);
    println!("log child: all ran");
}

/// The kernel log's records now, or None where it cannot be read.
fn kernel_log() -> Option<Vec<String>> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/kmsg")
        .ok()?;
    let mut records = Vec::new();
    let mut buf = vec![0u8; 8192];
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => records.push(String::from_utf8_lossy(&buf[..n]).into_owned()),
            // Overwritten while read: go on from the oldest left.
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(_) => return None,
        }
    }
    Some(records)
}

fn auditd_running() -> bool {
    std::fs::read_dir("/proc").is_ok_and(|d| {
        d.flatten().any(|p| {
            std::fs::read_to_string(p.path().join("comm")).is_ok_and(|c| c.trim() == "auditd")
        })
    })
}
