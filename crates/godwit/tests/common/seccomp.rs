//! A seccomp filter for what a test starts: one system call (or one of its ioctl
//! requests) answered with an errno, every other call allowed. Installed on a thread
//! of its own, which whatever it starts inherits (through setpriv too, and across
//! exec); the test's other threads are untouched.

/// AUDIT_ARCH_X86_64: a call from another ABI has numbers of its own, and goes through.
const X86_64: u32 = 0xc000_003e;

/// What the filter refuses.
pub enum Refuse {
    /// Every call of this number.
    Call(i64),
    /// ioctl(2) with this request (the low 32 bits of its second argument).
    Ioctl(u32),
}

/// Whether this kernel takes seccomp filters (CONFIG_SECCOMP_FILTER); said where not.
pub fn available() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let yes = status.lines().any(|l| l.starts_with("Seccomp_filters:"));
    if !yes {
        eprintln!("skipping: this kernel takes no seccomp filters");
    }
    yes
}

/// `f` on a thread of its own under a filter that answers `what` with `errno`.
pub fn under_filter<T: Send>(what: Refuse, errno: i32, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            install(&what, errno);
            f()
        })
        .join()
        .unwrap()
    })
}

fn install(what: &Refuse, errno: i32) {
    let field = |off: usize| stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, off as u32);
    let arch = std::mem::offset_of!(libc::seccomp_data, arch);
    let nr = std::mem::offset_of!(libc::seccomp_data, nr);
    // args[1]'s low half (little-endian).
    let arg1 = std::mem::offset_of!(libc::seccomp_data, args) + 8;
    let mut checks = vec![(arch, X86_64)];
    match *what {
        Refuse::Call(n) => checks.push((nr, n as u32)),
        Refuse::Ioctl(request) => {
            checks.push((nr, libc::SYS_ioctl as u32));
            checks.push((arg1, request));
        }
    }
    // Each check loads a field and falls through on a match, or jumps to ALLOW, last.
    let k = checks.len();
    let mut prog = Vec::new();
    for (i, &(off, value)) in checks.iter().enumerate() {
        prog.push(field(off));
        prog.push(libc::sock_filter {
            jt: 0,
            jf: (2 * (k - i) - 1) as u8,
            ..stmt(libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K, value)
        });
    }
    prog.push(stmt(
        libc::BPF_RET | libc::BPF_K,
        libc::SECCOMP_RET_ERRNO | errno as u32,
    ));
    prog.push(stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW));
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_mut_ptr(),
    };
    // SAFETY: prctl with integer arguments, then with a filter program that outlives
    // the call (the kernel copies it); both affect this thread only.
    unsafe {
        assert_eq!(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 0);
        assert_eq!(
            libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &fprog as *const libc::sock_fprog
            ),
            0,
            "{}",
            std::io::Error::last_os_error()
        );
    }
}

fn stmt(code: u32, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    }
}
