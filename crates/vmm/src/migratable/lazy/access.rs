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
//! exists and then does not fall back to the system call, so there the device's
//! permissions alone decide.

use userfaultfd::{Uffd, UffdBuilder};

/// A userfaultfd for faults from any mode, or why there is none here, said so that an
/// operator knows what to change.
pub(super) fn open() -> Result<Uffd, String> {
    UffdBuilder::new()
        .close_on_exec(true)
        .non_blocking(true)
        // vCPUs touch guest memory from inside KVM (kernel mode).
        .user_mode_only(false)
        .create()
        .map_err(|e| why(&Cause::of(e)))
}

const DEVICE: &str = "/dev/userfaultfd";

/// Ok where this process can take post-copy (or a lazy restore): it may open a
/// userfaultfd for faults from inside KVM. Cheap (a descriptor opened and closed).
pub fn postcopy_support() -> Result<(), String> {
    open().map(drop)
}

/// What stopped a userfaultfd from being made.
#[derive(Debug)]
enum Cause {
    /// /dev/userfaultfd exists and would not open.
    Device(std::io::Error),
    /// The system call failed with this errno (no device, or a later step).
    Errno {
        errno: i32,
        device: bool,
    },
    Other(String),
}

impl Cause {
    fn of(e: userfaultfd::Error) -> Cause {
        match e {
            userfaultfd::Error::OpenDevUserfaultfd(io) => Cause::Device(io),
            userfaultfd::Error::SystemError(n) => Cause::Errno {
                errno: n as i32,
                device: std::path::Path::new(DEVICE).exists(),
            },
            e => Cause::Other(e.to_string()),
        }
    }
}

/// What `c` means for post-copy, and what to change.
fn why(c: &Cause) -> String {
    const NEED: &str = "post-copy and lazy restore catch the guest's page faults with userfaultfd";
    match c {
        Cause::Device(io) => format!(
            "{NEED}, and this process may not open {DEVICE}: {io}; run godwit as root, or \
             let its user read and write {DEVICE} (for example group kvm, mode 0660)"
        ),
        Cause::Errno {
            errno: libc::EPERM,
            device: false,
        } => format!(
            "{NEED}, and the kernel refused this process faults from inside KVM (not root, \
             no CAP_SYS_PTRACE, vm.unprivileged_userfaultfd is 0; or a seccomp filter, as \
             a container's, forbids the call): run godwit as root or with CAP_SYS_PTRACE, \
             or set the sysctl vm.unprivileged_userfaultfd=1"
        ),
        Cause::Errno {
            errno: libc::ENOSYS,
            ..
        } => format!("{NEED}, and this kernel has none (built without CONFIG_USERFAULTFD)"),
        Cause::Errno { errno, .. } => format!(
            "{NEED}, and creating one failed: {}",
            std::io::Error::from_raw_os_error(*errno)
        ),
        Cause::Other(e) => format!("{NEED}, and creating one failed: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_refusal_says_what_to_change() {
        let denied = Cause::Device(std::io::Error::from_raw_os_error(libc::EACCES));
        let m = why(&denied);
        assert!(
            m.contains("may not open /dev/userfaultfd: Permission denied"),
            "{m}"
        );
        assert!(m.contains("read and write /dev/userfaultfd"), "{m}");
        let errno = |errno, device| why(&Cause::Errno { errno, device });
        let m = errno(libc::EPERM, false);
        assert!(m.contains("vm.unprivileged_userfaultfd=1"), "{m}");
        let m = errno(libc::ENOSYS, false);
        assert!(m.contains("CONFIG_USERFAULTFD"), "{m}");
        let m = errno(libc::EINVAL, true);
        assert!(m.contains("creating one failed: Invalid argument"), "{m}");
    }

    /// As root (the suite's user) both ways are open.
    #[test]
    fn root_may_take_post_copy() {
        use std::os::unix::fs::MetadataExt;
        if std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0) {
            postcopy_support().unwrap();
        }
    }
}
