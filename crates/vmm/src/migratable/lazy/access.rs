//! Whether this process may catch page faults with userfaultfd, as post-copy and a lazy
//! restore need, and what to change where it may not. Asked before either begins, so
//! that neither stops a VM only to find out: a source paused for a switch that fails, a
//! restore that never runs.
//!
//! KVM touches guest memory from kernel mode (a vCPU's fault goes through
//! get_user_pages), so user-mode-only handling does not do. Linux grants kernel-mode
//! handling through /dev/userfaultfd to whoever may open it (Linux 6.1 on), and through
//! the system call to a process with CAP_SYS_PTRACE or where the sysctl
//! vm.unprivileged_userfaultfd is 1. The userfaultfd crate opens the device where it
//! exists and does not fall back to the system call when the device will not open;
//! godwit does, as QEMU does, so that either grant is enough.

use std::os::fd::FromRawFd;
use userfaultfd::{RegisterMode, Uffd, UffdBuilder};

/// A userfaultfd for faults from any mode, or why there is none here, said so that an
/// operator knows what to change.
pub(super) fn open() -> Result<Uffd, String> {
    match UffdBuilder::new()
        .close_on_exec(true)
        .non_blocking(true)
        // vCPUs touch guest memory from inside KVM (kernel mode).
        .user_mode_only(false)
        .create()
    {
        Ok(u) => Ok(u),
        Err(userfaultfd::Error::OpenDevUserfaultfd(device)) => {
            from_syscall().map_err(|errno| why(&Cause::Neither { device, errno }))
        }
        Err(e) => Err(why(&Cause::of(e))),
    }
}

/// A userfaultfd from the system call (the kernel decides by CAP_SYS_PTRACE or the
/// sysctl), set up as the crate's builder sets one up; the errno where it is refused.
fn from_syscall() -> Result<Uffd, i32> {
    let errno = || std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
    // SAFETY: userfaultfd(2) takes only flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd < 0 {
        return Err(errno());
    }
    // SAFETY: `fd` is a new userfaultfd that nothing else owns; the Uffd closes it.
    let uffd = unsafe { Uffd::from_raw_fd(fd as i32) };
    let mut api = userfaultfd_sys::uffdio_api {
        api: userfaultfd_sys::UFFD_API,
        features: 0,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API on that descriptor, with a struct of the kernel's layout that
    // outlives the call.
    let rc = unsafe { libc::ioctl(fd as i32, userfaultfd_sys::UFFDIO_API as _, &mut api) };
    if rc != 0 {
        return Err(errno());
    }
    Ok(uffd)
}

const DEVICE: &str = "/dev/userfaultfd";

/// Ok where this process can take post-copy (or a lazy restore): it may open a
/// userfaultfd for faults from inside KVM, and, for memory that is `shared`
/// (prefaulted), catch minor faults there. Cheap (a descriptor and a page made and
/// dropped).
pub fn postcopy_support(shared: bool) -> Result<(), String> {
    let uffd = open()?;
    if shared {
        minor_faults(&uffd)?;
    }
    Ok(())
}

/// Whether minor faults in shared memory can be caught (Linux 5.14 on), as post-copy
/// into prefaulted memory needs (its pages exist and are placed through their alias):
/// a page of a memfd registered for them.
fn minor_faults(uffd: &Uffd) -> Result<(), String> {
    let page = crate::memory::PAGE_SIZE as usize;
    let file = crate::memory::memfd(c"godwit-probe", page as u64).map_err(|e| untried(&e))?;
    let map = vm_memory::MmapRegion::<()>::from_file(vm_memory::FileOffset::new(file, 0), page)
        .map_err(|e| untried(&e))?;
    // Unregistered when `uffd` closes, before `map` goes.
    register_minor(uffd, &map)
}

/// Registers `map` for minor faults, or says why it cannot be (a kernel that refuses:
/// EINVAL, as for memory that is not shared).
fn register_minor(uffd: &Uffd, map: &vm_memory::MmapRegion) -> Result<(), String> {
    uffd.register_with_mode(map.as_ptr().cast(), map.size(), RegisterMode::MINOR)
        .map(drop)
        .map_err(|e| match e {
            userfaultfd::Error::SystemError(n) if n as i32 == libc::EINVAL => {
                "post-copy into prefaulted (shared) memory catches minor faults there with \
                 userfaultfd, which this kernel cannot (Linux 5.14 or later can): run the \
                 destination without --prefault"
                    .to_string()
            }
            userfaultfd::Error::SystemError(n) => {
                untried(&std::io::Error::from_raw_os_error(n as i32))
            }
            e => untried(&e),
        })
}

/// The probe of minor faults failed for a reason of its own.
fn untried(e: &dyn std::fmt::Display) -> String {
    format!("post-copy into prefaulted memory could not be tried: {e}")
}

/// What stopped a userfaultfd from being made.
#[derive(Debug)]
enum Cause {
    /// /dev/userfaultfd exists and would not open, and the system call was refused
    /// with this errno.
    Neither {
        device: std::io::Error,
        errno: i32,
    },
    /// The system call failed with this errno (no device, or a later step).
    Errno {
        errno: i32,
    },
    Other(String),
}

impl Cause {
    fn of(e: userfaultfd::Error) -> Cause {
        match e {
            userfaultfd::Error::SystemError(n) => Cause::Errno { errno: n as i32 },
            e => Cause::Other(e.to_string()),
        }
    }
}

/// What `c` means for post-copy, and what to change.
fn why(c: &Cause) -> String {
    const NEED: &str = "post-copy and lazy restore catch the guest's page faults with userfaultfd";
    // What the system call's refusal means, and what grants it.
    const REFUSED: &str = "not root, no CAP_SYS_PTRACE, vm.unprivileged_userfaultfd is 0; \
                           or a seccomp filter, as a container's, forbids the call";
    const SYSCALL: &str = "give it CAP_SYS_PTRACE, or set the sysctl vm.unprivileged_userfaultfd=1";
    let os = |errno: i32| std::io::Error::from_raw_os_error(errno);
    // With the device there, opening it to the user grants it too.
    let grant = format!(
        "run godwit as root, or let its user read and write {DEVICE} (for example group \
         kvm, mode 0660), or {SYSCALL}"
    );
    match c {
        Cause::Neither {
            device,
            errno: libc::EPERM,
        } => format!(
            "{NEED}, and this process may not open {DEVICE} ({device}) nor make one for \
             faults from inside KVM with the system call ({REFUSED}): {grant}"
        ),
        Cause::Neither { device, errno } => format!(
            "{NEED}, and this process may not open {DEVICE} ({device}), and the system \
             call failed: {}; {grant}",
            os(*errno)
        ),
        // No device (before Linux 6.1): the system call alone decides.
        Cause::Errno { errno: libc::EPERM } => format!(
            "{NEED}, and the kernel refused this process faults from inside KVM \
             ({REFUSED}): run godwit as root, or {SYSCALL}"
        ),
        Cause::Errno {
            errno: libc::ENOSYS,
        } => format!("{NEED}, and this kernel has none (built without CONFIG_USERFAULTFD)"),
        Cause::Errno { errno } => format!("{NEED}, and creating one failed: {}", os(*errno)),
        Cause::Other(e) => format!("{NEED}, and creating one failed: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_refusal_says_what_to_change() {
        let denied = Cause::Neither {
            device: std::io::Error::from_raw_os_error(libc::EACCES),
            errno: libc::EPERM,
        };
        let m = why(&denied);
        assert!(
            m.contains("may not open /dev/userfaultfd (Permission denied")
                && m.contains("nor make one for faults from inside KVM with the system call"),
            "{m}"
        );
        assert!(m.contains("read and write /dev/userfaultfd"), "{m}");
        assert!(m.contains("CAP_SYS_PTRACE") && m.contains("vm.unprivileged_userfaultfd=1"));
        let errno = |errno| why(&Cause::Errno { errno });
        let m = errno(libc::EPERM);
        assert!(m.contains("vm.unprivileged_userfaultfd=1"), "{m}");
        let m = errno(libc::ENOSYS);
        assert!(m.contains("CONFIG_USERFAULTFD"), "{m}");
        let m = errno(libc::EINVAL);
        assert!(m.contains("creating one failed: Invalid argument"), "{m}");
    }

    /// The system call's userfaultfd is one the crate can use: a page registered for
    /// missing faults is filled by a copy.
    #[test]
    fn a_userfaultfd_from_the_system_call_works() {
        if !root() {
            return;
        }
        let uffd = from_syscall().unwrap();
        let map = vm_memory::MmapRegion::<()>::new(4096).unwrap();
        uffd.register(map.as_ptr().cast(), 4096).unwrap();
        let page = [7u8; 4096];
        // SAFETY: both ranges are one page, `map`'s registered and missing.
        unsafe { uffd.copy(page.as_ptr().cast(), map.as_ptr().cast(), 4096, true) }.unwrap();
        // SAFETY: the page is mapped now, and nothing else writes it.
        assert_eq!(unsafe { *map.as_ptr().add(100) }, 7);
    }

    /// A kernel that will not catch minor faults there (as none does in private
    /// memory) is told as one that cannot take post-copy into prefaulted memory.
    #[test]
    fn memory_without_minor_faults_is_refused_with_the_way_out() {
        if !root() {
            return;
        }
        let uffd = open().unwrap();
        let private = vm_memory::MmapRegion::<()>::new(4096).unwrap();
        let m = register_minor(&uffd, &private).unwrap_err();
        assert!(
            m.contains("Linux 5.14") && m.contains("without --prefault"),
            "{m}"
        );
    }

    /// As root (the suite's user) both ways are open.
    #[test]
    fn root_may_take_post_copy() {
        if root() {
            postcopy_support(false).unwrap();
            postcopy_support(true).unwrap();
        }
    }

    /// Whether these tests run as root (the suite's user), which may make a userfaultfd
    /// every way.
    fn root() -> bool {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
    }
}
