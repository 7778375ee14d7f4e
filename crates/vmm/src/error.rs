//! Errors a user of the VMM can act on.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "cannot open /dev/kvm: {0} (is the kvm module loaded, and may this user open /dev/kvm?)"
    )]
    KvmOpen(#[source] kvm_ioctls::Error),
    #[error("KVM API version {0} is not supported (need 12)")]
    KvmVersion(i32),
    #[error("KVM lacks a capability godwit needs: {0}")]
    KvmCap(&'static str),
    #[error("KVM call {what} failed: {source}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("{memory_mib} MiB of guest memory asked for, but this host has only {host_mib} MiB")]
    TooMuchMemory { memory_mib: u64, host_mib: u64 },
    #[error("cannot allocate guest memory: {0}")]
    Memory(String),
    #[error("cannot read image {path}: {source}")]
    ImageRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("image {0}: {1}")]
    BadImage(String, String),
    #[error("console: {0}")]
    Console(String),
    #[error("API socket {path}: {msg}")]
    ApiSocket { path: PathBuf, msg: String },
    #[error("vCPU thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error("VM state: {0}")]
    State(String),
    #[error("the VM is not running")]
    NotRunning,
    #[error("GPU: {0}")]
    Gpu(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Wraps a failed KVM ioctl with what godwit was doing.
pub(crate) trait KvmContext<T> {
    fn kvm(self, what: &'static str) -> Result<T>;
}

impl<T> KvmContext<T> for std::result::Result<T, kvm_ioctls::Error> {
    fn kvm(self, what: &'static str) -> Result<T> {
        self.map_err(|source| Error::Kvm { what, source })
    }
}
