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

use userfaultfd::{RegisterMode, Uffd, UffdBuilder};

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
    let fail = |e: &dyn std::fmt::Display| {
        format!("post-copy into prefaulted memory could not be tried: {e}")
    };
    let page = crate::memory::PAGE_SIZE as usize;
    let file = crate::memory::memfd(c"godwit-probe", page as u64).map_err(|e| fail(&e))?;
    let map = vm_memory::MmapRegion::<()>::from_file(vm_memory::FileOffset::new(file, 0), page)
        .map_err(|e| fail(&e))?;
    // Unregistered when `uffd` closes, before `map` goes.
    register_minor(uffd, &map)
}

/// Registers `map` for minor faults, or says why it cannot be (a kernel that refuses:
/// EINVAL, as for memory that is not shared).
fn register_minor(uffd: &Uffd, map: &vm_memory::MmapRegion) -> Result<(), String> {
    let fail = |e: &dyn std::fmt::Display| {
        format!("post-copy into prefaulted memory could not be tried: {e}")
    };
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
                fail(&std::io::Error::from_raw_os_error(n as i32))
            }
            e => fail(&e),
        })
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

    /// A kernel that will not catch minor faults there (as none does in private
    /// memory) is told as one that cannot take post-copy into prefaulted memory.
    #[test]
    fn memory_without_minor_faults_is_refused_with_the_way_out() {
        if std::fs::metadata("/proc/self")
            .is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) != 0)
        {
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
        use std::os::unix::fs::MetadataExt;
        if std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0) {
            postcopy_support(false).unwrap();
            postcopy_support(true).unwrap();
        }
    }
}
