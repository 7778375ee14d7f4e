//! `godwit run`'s system-call filter (seccomp), as Firecracker and Cloud Hypervisor have:
//! the process that holds a guest and reads a migration stream can make only the calls a
//! VMM makes. A guest or a peer that took over a thread through a bug in godwit still
//! could not start a program, trace or signal another process, mount, load a module or a
//! BPF program, change its credentials or enter another namespace.
//!
//! One filter for the whole process (every thread, TSYNC), installed before godwit reads
//! anything a guest, a client or a peer sends, and narrower ones that each vCPU thread,
//! each page reader (the threads that parse a migration stream or a snapshot), each
//! reader of a new connection to a destination, a destination's post-copy recovery
//! thread, a source's migration thread (which hears what a destination answers) and
//! each GPU engine (which runs a guest's GPU commands) add for themselves
//! (`godwit_vmm::confine`). A call outside them, by default, fails with EPERM and
//! godwit says which one on stderr: the VM and a migration in flight live on
//! and the caller's own error says what failed (a killed process would lose the guest);
//! `--seccomp kill` ends the process instead, as Firecracker does; `--seccomp log` lets
//! every call run and names those outside the filter (`log`). A refusal is a SIGSYS, and
//! the kernel kills a process whose thread has SIGSYS blocked: the C library blocks every
//! signal while it makes a thread, so what that takes is allowed everywhere.

use godwit_vmm::confine::Role;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI32, Ordering};

/// What a call outside the filter meets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Seccomp {
    /// It fails with EPERM and godwit names it on stderr; the VM runs on.
    #[default]
    Refuse,
    /// The kernel kills the process (SIGSYS).
    Kill,
    /// It runs, and godwit names it on stderr (one outside a vCPU thread's, page
    /// reader's or GPU engine's own list: the kernel's audit log does). For finding what another kernel
    /// or C library needs before refuse or kill; it protects nothing.
    Log,
    /// No filter.
    Off,
}

impl Seccomp {
    /// As `--seccomp` spells it.
    pub fn name(self) -> &'static str {
        match self {
            Seccomp::Refuse => "refuse",
            Seccomp::Kill => "kill",
            Seccomp::Log => "log",
            Seccomp::Off => "off",
        }
    }
}

/// The calls godwit makes, with no condition on their arguments. Everything a VMM does:
/// memory (guest RAM and VRAM mappings, prefaulting, userfaultfd), KVM's ioctls, files
/// (images, snapshots, the GPU manager's directory, /proc), sockets (the API, migration
/// over Unix, TCP and TLS), threads and their scheduling, signals within the process.
const ALLOWED: &[libc::c_long] = &[
    // Memory.
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_mincore,
    libc::SYS_memfd_create,
    libc::SYS_userfaultfd,
    // Files and descriptors.
    libc::SYS_openat,
    libc::SYS_close,
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_pread64,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_pwrite64,
    libc::SYS_lseek,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_access,
    libc::SYS_faccessat2,
    libc::SYS_readlink,
    libc::SYS_getdents64,
    libc::SYS_ftruncate,
    libc::SYS_fallocate,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_flock,
    libc::SYS_fcntl,
    libc::SYS_dup,
    libc::SYS_dup2,
    libc::SYS_dup3,
    libc::SYS_pipe2,
    libc::SYS_eventfd2,
    libc::SYS_mkdir,
    libc::SYS_rename,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_fchmod,
    libc::SYS_poll,
    libc::SYS_ppoll,
    // Sockets (their domains: below).
    libc::SYS_socketpair,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_shutdown,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    // Threads, time and scheduling (clone: below); uname for the C library's resolver.
    libc::SYS_uname,
    libc::SYS_clone3,
    libc::SYS_futex,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_set_tid_address,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_prctl,
    libc::SYS_arch_prctl,
    libc::SYS_prlimit64,
    libc::SYS_getrusage,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_sched_setscheduler,
    libc::SYS_sched_getscheduler,
    libc::SYS_sched_setattr,
    libc::SYS_sched_getattr,
    libc::SYS_setpriority,
    libc::SYS_getpriority,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_getrandom,
    // Signals, within this process.
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_tgkill,
    libc::SYS_restart_syscall,
];

/// What a vCPU thread may call, on top of the process's filter: the thread that runs
/// guest code and handles its exits (port and MMIO accesses, the GPU function's
/// registers, the console) is the one a guest reaches first. It opens and connects
/// nothing. It may make threads, as the process's filter allows them (clone3 answered
/// ENOSYS, clone for a thread only): each is under the vCPU's filter too, and refusing
/// them here would be fatal, since the C library blocks every signal (SIGSYS too, which
/// a refusal sends) around them.
const VCPU_ALLOWED: &[libc::c_long] = &[
    // Answered EACCES by `quiet_program`.
    libc::SYS_openat,
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_rseq,
    libc::SYS_set_robust_list,
    libc::SYS_sched_getaffinity,
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_getrandom,
    libc::SYS_sched_yield,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_tgkill,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// What a page reader (a destination's migration readers, a lazy restore's: the threads
/// that parse what a peer or a snapshot file sends), a new connection's reader (its TLS
/// handshake and first frame, before anything shows it is a source) or a GPU engine
/// (which runs what a guest's driver submits) may not call of what the process may: it
/// makes, binds, accepts or connects no socket, renames, removes or creates nothing in
/// the file system, and makes no memory file or userfaultfd. Nor does it open a file
/// ([`quiet_program`]).
const WORKER_DENIED: &[libc::c_long] = &[
    libc::SYS_mkdir,
    libc::SYS_rename,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_fchmod,
    libc::SYS_memfd_create,
    libc::SYS_userfaultfd,
    libc::SYS_socketpair,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_accept4,
    libc::SYS_connect,
];

/// The type byte (bits 8-15) of KVM's ioctl requests (/dev/kvm, the VM, its vCPUs).
const KVM_IOCTLS: u32 = 0xAE;
/// ... and of userfaultfd's (post-copy, lazy restore).
const USERFAULTFD_IOCTLS: u32 = 0xAA;

/// The ioctl families the process drives.
const IOCTL_TYPES: &[u32] = &[KVM_IOCTLS, USERFAULTFD_IOCTLS];

/// Single ioctl requests on sockets: the standard library's `set_nonblocking`, and how
/// much a connection has queued each way (the migration's flow control).
const IOCTL_REQUESTS: &[u32] = &[
    libc::FIONBIO as u32,
    libc::FIONREAD as u32,
    libc::TIOCOUTQ as u32,
];

/// The socket domains godwit opens: the API and Unix migrations, TCP over IPv4 and IPv6.
const SOCKET_DOMAINS: &[libc::c_int] = &[libc::AF_UNIX, libc::AF_INET, libc::AF_INET6];

/// Where the refusal lines go (a test points it at a pipe).
static REPORT_FD: AtomicI32 = AtomicI32::new(libc::STDERR_FILENO);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot build the system-call filter: {0}")]
    Build(#[from] seccompiler::BackendError),
    #[error("cannot handle SIGSYS: {0}")]
    Handler(std::io::Error),
    #[error(
        "cannot install the system-call filter ({0}): this kernel may take no seccomp \
         filters; --seccomp off runs without one"
    )]
    Install(#[from] seccompiler::Error),
    #[error(
        "cannot listen for calls outside the system-call filter ({0}): --seccomp log \
         needs Linux 5.7 or later"
    )]
    Listen(std::io::Error),
}

/// The process's two programs, in the order they go in: clone3 answered ENOSYS, then the
/// allow-list (which lets a thread add a filter to itself, nothing more). A clone3's
/// flags are in memory, out of a filter's reach, so the C library is made to create
/// threads with clone, whose flags it can check (a thread, never a new process).
/// `listening`: in log mode, the listener's own ioctls are allowed too.
fn programs(on_other: SeccompAction, listening: bool) -> Result<[BpfProgram; 2], Error> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        ALLOWED.iter().map(|&nr| (nr, Vec::new())).collect();
    let thread = libc::CLONE_THREAD as u64;
    rules.insert(
        libc::SYS_clone,
        vec![SeccompRule::new(vec![arg(
            0,
            SeccompCmpOp::MaskedEq(thread),
            thread,
        )?])?],
    );
    rules.insert(libc::SYS_socket, socket_rules()?);
    let mut requests = IOCTL_REQUESTS.to_vec();
    if listening {
        requests.extend(log::LISTENER_IOCTLS);
    }
    rules.insert(libc::SYS_ioctl, ioctl_rules(IOCTL_TYPES, &requests)?);
    rules.insert(libc::SYS_seccomp, own_filters()?);
    Ok([
        answer_with(libc::SYS_clone3, libc::ENOSYS)?,
        allow_only(rules, on_other)?,
    ])
}

/// ioctl(2) for the families in `types` and the single `requests`. The kernel reads a
/// request as 32 bits, and so does the filter: bits above cannot smuggle one past it.
/// A terminal's requests (TIOCSTI types into one), a block device's, a network
/// interface's or another driver's are refused.
fn ioctl_rules(types: &[u32], requests: &[u32]) -> Result<Vec<SeccompRule>, Error> {
    let request = |op, value: u32| {
        Ok(SeccompRule::new(vec![SeccompCondition::new(
            1,
            SeccompCmpArgLen::Dword,
            op,
            value.into(),
        )?])?)
    };
    types
        .iter()
        .map(|&t| request(SeccompCmpOp::MaskedEq(0xff00), t << 8))
        .chain(requests.iter().map(|&r| request(SeccompCmpOp::Eq, r)))
        .collect()
}

/// A condition on a call's argument `index` (the whole 64 bits).
fn arg(index: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, Error> {
    Ok(SeccompCondition::new(
        index,
        SeccompCmpArgLen::Qword,
        op,
        value,
    )?)
}

/// The vCPU threads' own filter, on top of the process's (after [`quiet_program`]).
fn vcpu_program(on_other: SeccompAction) -> Result<BpfProgram, Error> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        VCPU_ALLOWED.iter().map(|&nr| (nr, Vec::new())).collect();
    // A refusal's line names the thread (a second refusal inside the SIGSYS handler
    // would kill the process), and a new thread names itself.
    let names = [libc::PR_GET_NAME, libc::PR_SET_NAME]
        .iter()
        .map(|&op| {
            Ok(SeccompRule::new(vec![arg(
                0,
                SeccompCmpOp::Eq,
                op as u64,
            )?])?)
        })
        .collect::<Result<_, Error>>()?;
    rules.insert(libc::SYS_prctl, names);
    // A process-directed signal may land on a vCPU thread, and the handler of godwit's
    // termination signals (signal-hook's) wakes its thread with a send(2) of one byte
    // that must not block: on a connected socket only, never waiting.
    rules.insert(
        libc::SYS_sendto,
        vec![SeccompRule::new(vec![
            arg(3, SeccompCmpOp::Eq, libc::MSG_DONTWAIT as u64)?,
            arg(4, SeccompCmpOp::Eq, 0)?,
        ])?],
    );
    // Its vCPU's and the VM's ioctls, no socket's.
    rules.insert(libc::SYS_ioctl, ioctl_rules(&[KVM_IOCTLS], &[])?);
    allow_only(rules, on_other)
}

/// A page reader's, new connection's reader's or GPU engine's own filter, on top of the
/// process's (after [`quiet_program`]): the process's calls less [`WORKER_DENIED`] (and
/// no socket, no seccomp). ioctl and clone are allowed here as the
/// process's filter allows them, which still checks their arguments; clone3 too, for
/// the process's filter to answer ENOSYS (a refusal from this one would take
/// precedence, and come while the C library blocks SIGSYS).
fn worker_program(on_other: SeccompAction) -> Result<BpfProgram, Error> {
    allow_only(worker_rules(&[]), on_other)
}

/// The process's calls less [`WORKER_DENIED`] but `also`, with no condition.
fn worker_rules(also: &[libc::c_long]) -> BTreeMap<i64, Vec<SeccompRule>> {
    ALLOWED
        .iter()
        .chain(&[libc::SYS_ioctl, libc::SYS_clone])
        .filter(|nr| !WORKER_DENIED.contains(nr) || also.contains(nr))
        .map(|&nr| (nr, Vec::new()))
        .collect()
}

/// What a post-copy recovery thread may call beyond a page reader: it accepts the
/// source's new connections, and removes a Unix listener's socket file as it ends.
const RECOVERY_ALSO: &[libc::c_long] = &[libc::SYS_accept4, libc::SYS_unlink, libc::SYS_unlinkat];

/// A post-copy recovery thread's own filter: a page reader's, with [`RECOVERY_ALSO`];
/// and the post-copy readers it starts on the new connections add their own.
fn recovery_program(on_other: SeccompAction) -> Result<BpfProgram, Error> {
    let mut rules = worker_rules(RECOVERY_ALSO);
    rules.insert(libc::SYS_seccomp, own_filters()?);
    allow_only(rules, on_other)
}

/// What a source's migration thread (and the threads it starts) may call beyond a page
/// reader: it dials the destination, again on a recovery (a socket of the process's
/// domains, and connect).
const SOURCE_ALSO: &[libc::c_long] = &[libc::SYS_connect];

/// A source's migration thread's own filter: a page reader's, with [`SOURCE_ALSO`]. It
/// hears what a destination sends back, post-copy's page requests among it; it opens no
/// file, creates, renames or removes nothing, and listens for and accepts nothing.
fn source_program(on_other: SeccompAction) -> Result<BpfProgram, Error> {
    let mut rules = worker_rules(SOURCE_ALSO);
    rules.insert(libc::SYS_socket, socket_rules()?);
    allow_only(rules, on_other)
}

/// socket(2) in the domains godwit opens ([`SOCKET_DOMAINS`]).
fn socket_rules() -> Result<Vec<SeccompRule>, Error> {
    SOCKET_DOMAINS
        .iter()
        .map(|&d| Ok(SeccompRule::new(vec![arg(0, SeccompCmpOp::Eq, d as u64)?])?))
        .collect()
}

/// seccomp(2) as a thread adds its own filters, to itself alone: no flags (no TSYNC, no
/// listener), nothing a filter could loosen.
fn own_filters() -> Result<Vec<SeccompRule>, Error> {
    Ok(vec![SeccompRule::new(vec![
        arg(0, SeccompCmpOp::Eq, libc::SECCOMP_SET_MODE_FILTER as u64)?,
        arg(1, SeccompCmpOp::Eq, 0)?,
    ])?])
}

/// A program that allows `rules` and meets any other call with `on_other`.
fn allow_only(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    on_other: SeccompAction,
) -> Result<BpfProgram, Error> {
    let f = SeccompFilter::new(rules, on_other, SeccompAction::Allow, TargetArch::x86_64)?;
    Ok(f.try_into()?)
}

/// The first of a vCPU thread's, page reader's or GPU engine's own two filters: openat fails with
/// EACCES, without a SIGSYS or a line. The C library opens files on its own, once per
/// process, in whichever thread first needs what they say: malloc reads
/// /proc/sys/vm/overcommit_memory the first time it gives a thread's heap back, and
/// takes a failure as its default. Refused through the handler, that thread would
/// report a call godwit never made (and in kill mode end the process); the thread's
/// allow-list lets openat through to this answer instead.
fn quiet_program() -> Result<BpfProgram, Error> {
    answer_with(libc::SYS_openat, libc::EACCES)
}

/// A program that answers call `nr` with `errno`, without making it, and allows the rest.
fn answer_with(nr: libc::c_long, errno: libc::c_int) -> Result<BpfProgram, Error> {
    let f = SeccompFilter::new(
        [(nr, Vec::new())].into_iter().collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(errno as u32),
        TargetArch::x86_64,
    )?;
    Ok(f.try_into()?)
}

/// A vCPU thread's, page reader's or GPU engine's own filters, in the order they go in.
fn thread_programs(role: Role, on_other: SeccompAction) -> Result<[BpfProgram; 2], Error> {
    let own = match role {
        Role::Vcpu => vcpu_program(on_other)?,
        Role::PageReader | Role::Handshake | Role::GpuEngine => worker_program(on_other)?,
        Role::Recovery => recovery_program(on_other)?,
        Role::Source => source_program(on_other)?,
    };
    Ok([quiet_program()?, own])
}

/// malloc also asks how many CPUs the host has (opening /sys/devices/system/cpu/online)
/// the first time the process's threads need a ninth arena. Its limit set now, before
/// the filters, at the C library's own default (8 arenas per online CPU), it never
/// asks, and the limit does not depend on which thread got there first.
fn fix_malloc_arenas() {
    // SAFETY: sysconf and mallopt take and return plain integers.
    unsafe {
        let cpus = libc::sysconf(libc::_SC_NPROCESSORS_ONLN);
        if cpus > 0 {
            libc::mallopt(libc::M_ARENA_MAX, (8 * cpus).min(i32::MAX.into()) as i32);
        }
    }
}

/// Installs the filter on every thread of this process, for the rest of its life, and
/// has every vCPU thread, page reader, source's migration thread and GPU engine add its
/// own.
pub fn install(mode: Seccomp) -> Result<(), Error> {
    godwit_vmm::confine::set_mode(mode.name());
    // The process's and the threads' own (see `log` for why they differ in log mode).
    let (on_other, threads_other) = match mode {
        Seccomp::Off => return Ok(()),
        Seccomp::Kill => (SeccompAction::KillProcess, SeccompAction::KillProcess),
        Seccomp::Refuse => {
            handle_sigsys()?;
            (SeccompAction::Trap, SeccompAction::Trap)
        }
        // The traps are handed to the listener as the filter goes in.
        Seccomp::Log => (SeccompAction::Trap, SeccompAction::Log),
    };
    let vcpu = thread_programs(Role::Vcpu, threads_other.clone())?;
    let worker = thread_programs(Role::PageReader, threads_other.clone())?;
    let recovery = thread_programs(Role::Recovery, threads_other.clone())?;
    let source = thread_programs(Role::Source, threads_other)?;
    fix_malloc_arenas();
    let [first, allow_list] = programs(on_other, mode == Seccomp::Log)?;
    seccompiler::apply_filter_all_threads(&first)?;
    if mode == Seccomp::Log {
        let flags = libc::SECCOMP_FILTER_FLAG_TSYNC | libc::SECCOMP_FILTER_FLAG_TSYNC_ESRCH;
        log::serve(log::listen(allow_list, flags)?)?;
        tracing::warn!(
            "--seccomp log: calls outside the system-call filter run (each named here, or \
             by the kernel's audit log for a vCPU thread's, page reader's or GPU \
             engine's own list); \
             nothing is refused"
        );
    } else {
        seccompiler::apply_filter_all_threads(&allow_list)?;
    }
    godwit_vmm::confine::on_thread_start(move |role| {
        let programs = match role {
            Role::Vcpu => &vcpu,
            Role::PageReader | Role::Handshake | Role::GpuEngine => &worker,
            Role::Recovery => &recovery,
            Role::Source => &source,
        };
        programs
            .iter()
            .try_for_each(|p| seccompiler::apply_filter(p))
            .map_err(|e| format!("cannot add its system-call filters: {e}"))
    });
    Ok(())
}

fn handle_sigsys() -> Result<(), Error> {
    // SAFETY: a zeroed sigaction is valid; the handler only touches its own arguments,
    // an atomic and write(2)/prctl(2), which are async-signal-safe.
    let r = unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigsys as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut())
    };
    if r != 0 {
        return Err(Error::Handler(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// The head of a SIGSYS `siginfo_t` (the kernel's `_sigsys` member), which the libc
/// crate does not spell out.
#[repr(C)]
struct SigsysInfo {
    signo: libc::c_int,
    errno: libc::c_int,
    code: libc::c_int,
    call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    arch: libc::c_uint,
}

/// `si_code` of a SIGSYS sent by seccomp.
const SYS_SECCOMP: libc::c_int = 1;

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // The call's number, and its second argument (an ioctl's request).
    // SAFETY: the kernel hands a SA_SIGINFO handler a valid siginfo and the interrupted
    // thread's ucontext; a SIGSYS's siginfo holds `_sigsys`.
    let (nr, second) = unsafe {
        let info = &*info.cast::<SigsysInfo>();
        if info.code != SYS_SECCOMP {
            // Sent by kill(1), not by the filter: there is no call to answer.
            return;
        }
        let uc = &mut *ctx.cast::<libc::ucontext_t>();
        // The call was not made; this is what it returns.
        let gregs = &mut uc.uc_mcontext.gregs;
        gregs[libc::REG_RAX as usize] = -(libc::EPERM as i64);
        (info.syscall, gregs[libc::REG_RSI as usize] as u32)
    };
    let mut name = [0u8; 17];
    // SAFETY: PR_GET_NAME writes at most 16 bytes into the buffer.
    unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr(), 0, 0, 0) };
    let mut line = Line::default();
    line.push(b"godwit: seccomp refused ");
    describe(
        &mut line,
        nr,
        second,
        name.split(|&b| b == 0).next().unwrap_or_default(),
    );
    line.push(b": it failed with EPERM (`godwit run --seccomp off` allows it)");
    report(line.end());
}

/// "system call N (x86_64[, ioctl request 0x...]) in thread "name"": a call outside the
/// filter, as the refusal and log lines name it.
fn describe(line: &mut Line, nr: i32, second: u32, thread: &[u8]) {
    line.push(b"system call ");
    line.number(nr as u64);
    line.push(b" (x86_64");
    if nr as libc::c_long == libc::SYS_ioctl {
        line.push(b", ioctl request 0x");
        line.hex(second);
    }
    line.push(b") in thread \"");
    line.push(thread);
    line.push(b"\"");
}

/// Writes a refusal's or log line, without allocating.
fn report(line: &[u8]) {
    // SAFETY: the line is valid for its length.
    unsafe {
        libc::write(
            REPORT_FD.load(Ordering::Relaxed),
            line.as_ptr().cast(),
            line.len(),
        )
    };
}

/// A line built without allocating (a signal handler may not).
struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Default for Line {
    fn default() -> Self {
        Self {
            buf: [0; 256],
            len: 0,
        }
    }
}

impl Line {
    fn push(&mut self, s: &[u8]) {
        let n = s.len().min(self.buf.len() - 1 - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s[..n]);
        self.len += n;
    }

    /// The newline, in the byte kept for it: a line cut short is still a line.
    fn end(&mut self) -> &[u8] {
        self.buf[self.len] = b'\n';
        &self.buf[..=self.len]
    }

    fn number(&mut self, mut n: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }

    fn hex(&mut self, n: u32) {
        let digits: [u8; 8] =
            std::array::from_fn(|i| b"0123456789abcdef"[(n >> (28 - 4 * i)) as usize & 0xf]);
        self.push(&digits);
    }
}

mod log;
#[cfg(test)]
mod tests;
