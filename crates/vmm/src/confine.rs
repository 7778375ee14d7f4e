//! The threads that take in what a guest or a migration peer sends, by what they do, so
//! that the process's manager (godwit's CLI: a seccomp filter for each) can hold each to
//! the system calls that work needs. The crates that make those threads say which they
//! are; they know nothing of how they are held.

use std::sync::OnceLock;

/// What a thread that takes in hostile input does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Runs a vCPU and handles its exits (port and MMIO accesses, the GPU function's
    /// registers, the console): the thread a guest reaches first.
    Vcpu,
    /// Reads a migration stream or a snapshot and places its pages, and loads the
    /// components' states from its main connection (a destination's pre-copy readers,
    /// one per connection, its post-copy readers, a lazy restore's): what a peer or a
    /// file sends.
    PageReader,
    /// Reads a new connection's first bytes (its TLS handshake, its first frame) from
    /// whoever reached a destination's listener, before anything shows it is a source.
    Handshake,
    /// Waits on a destination's listener for the source's new connections after a
    /// post-copy link broke: accepts them and reads their first frames, from whoever
    /// reaches the port.
    Recovery,
    /// Runs a GPU function's commands: what a guest's driver puts in its ring, its GPU
    /// page tables and the addresses it has the engine read and write.
    GpuEngine,
    /// Sends a VM to a live destination and hears what it answers (its acceptance, its
    /// confirmations, post-copy's page requests and lists of what it lacks): a source's
    /// migration thread, from before it dials until the migration ends, and the threads
    /// it starts (the connections' writers, post-copy's background stream). It dials
    /// again on a recovery, but opens no file: what it needs of files (TLS credentials,
    /// a host name's addresses) is read before it enters.
    Source,
}

type Hook = Box<dyn Fn(Role) -> Result<(), String> + Send + Sync>;
static HOOK: OnceLock<Hook> = OnceLock::new();
static MODE: OnceLock<&'static str> = OnceLock::new();

/// Names how the process holds its threads (godwit's CLI: its seccomp mode), for
/// `vm.info`. Once per process: false if it was named already.
pub fn set_mode(mode: &'static str) -> bool {
    MODE.set(mode).is_ok()
}

/// How the process holds its threads; "off" where nothing said.
pub fn mode() -> &'static str {
    MODE.get().copied().unwrap_or("off")
}

/// Has every thread that says its role run `f` with it first. Once per process: false if
/// it was set already.
pub fn on_thread_start(f: impl Fn(Role) -> Result<(), String> + Send + Sync + 'static) -> bool {
    HOOK.set(Box::new(f)).is_ok()
}

/// Called by a thread as it starts, before it reads anything it was made for. An error
/// (the thread could not be held as the process asks) is the thread's to report as its
/// own failure, before it does its work.
pub fn enter(role: Role) -> Result<(), String> {
    HOOK.get().map_or(Ok(()), |f| f(role))
}
