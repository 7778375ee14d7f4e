//! A source's migration thread hears whatever the destination sends back: its ACCEPT,
//! each round's SYNCED, READY and STARTED, and in post-copy its page requests and the
//! lists of what it lacks. Before it dials, the thread holds itself (and the threads it
//! starts: the connections' writers, post-copy's background stream) to a source's
//! system calls (`confine::Role::Source`): no file opened, created, renamed or removed,
//! no listener, no memory file or userfaultfd. What it needs of files is read first.

use super::*;
use godwit_vmm::confine::{self, Role};

impl Driver<'_> {
    /// Reads what the migration needs of files (the TLS credentials, the destination's
    /// addresses, the process's pagemap for the GPU's first pass), then holds this
    /// thread to a source's calls. A snapshot's thread writes a file and hears no peer:
    /// it stays as it was.
    pub(super) fn confine(&mut self) -> Res<()> {
        let target = self.target.clone();
        self.tls = match &self.o.tls_dir {
            Some(d) => Some(crate::tls::Creds::client(d).map_err(unreachable_at(&target))?),
            None => None,
        };
        if target.is_file() {
            return Ok(());
        }
        self.addrs = target.resolve().map_err(unreachable_at(&target))?;
        godwit_vmm::pagemap::prepare();
        confine::enter(Role::Source).map_err(MigrationError::Confine)
    }
}
