//! How the migration's own threads are scheduled while pre-copy's pages move: the
//! destination's readers of its connections, and the source's migration thread and its
//! connections' writers.
//!
//! A guest that never blocks keeps a core; on cores it shares with the migration, the
//! migration's threads, which hand every frame from one to the next and to the kernel,
//! waited for that core at every hand-off (docs/benchmarks.md, "The guest's vCPUs at the
//! lowest weight"). A raised end's threads get the highest weight of the fair class
//! (nice -20) while pre-copy runs: a woken one runs at once.
//!
//! - **The destination's**. Its VM does not run before the pause ends; its readers come
//!   first against the other work of their scheduling group (the cgroup, or with the
//!   kernel's autogroup the session: nice ranks threads only within one), and where both
//!   ends share a host and a group (a local migration started from one session, this
//!   project's benchmarks) they no longer wait behind the source's vCPU, which then
//!   waits for them instead. They can go no faster than the source sends.
//! - **The source's**: there they take the CPU from the guest itself, as QEMU's multifd
//!   threads do by their number.
//!
//! Neither is the default: on this 2-core host (both ends here) each helps and each
//! costs (docs/benchmarks.md, "The migration's threads at the highest weight"). With a
//! guest rewriting 512 MiB at 1 GiB/s, pre-copy's median total fell 4-20% with the
//! destination's readers raised and 16-26% with both ends, the guest's vCPU keeping
//! 0.51-0.63 of a CPU with both (QEMU 10.0's multifd leaves its guest about that), and
//! its largest gap up to 23 ms. But moving an idle GPU VM's filled VRAM, where no guest
//! competes and both ends are busy, the destination's raise made pre-copy and hybrid
//! 7-9% slower (most likely a raised reader preempting the sender at each wake-up),
//! and a busy GPU guest's largest gap rose to 21-32 ms in runs where it stayed under
//! 15 ms without.
//! And with both ends raised, a test guest that had to fill its dirty ring during a
//! migration run beside other tests did not get to run enough to fill it once.
//!
//! The threads get their weight back when pre-copy's rounds end on the source (before
//! the pause: nothing competes once the guest stops), once the pause's last frame is in
//! on the destination (before its VM runs, so no thread of the VM inherits it), and
//! whatever the outcome. Post-copy, whose guest runs at the destination while pages
//! still move, raises nothing: there the fault path's own scheduling (`priority`)
//! decides. Lowering a nice value takes CAP_SYS_NICE (or an RLIMIT_NICE that allows
//! it): an end without it keeps its threads as they are, and the report's
//! `migration_priority` says which ends' threads went first.

use crate::nice::{Reniced, Tid};
use serde::{Deserialize, Serialize};

/// Which ends' migration threads take the highest weight while pre-copy runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrationPriority {
    /// Neither: the migration competes with the guest on equal terms.
    #[default]
    Normal,
    /// The destination's readers (see the module's notes).
    Destination,
    /// The source's migration thread and writers.
    Source,
    /// Both.
    Both,
}

impl MigrationPriority {
    /// From which ends went first.
    pub fn of(source: bool, destination: bool) -> Self {
        match (source, destination) {
            (false, false) => Self::Normal,
            (false, true) => Self::Destination,
            (true, false) => Self::Source,
            (true, true) => Self::Both,
        }
    }

    pub fn source(self) -> bool {
        matches!(self, Self::Source | Self::Both)
    }

    pub fn destination(self) -> bool {
        matches!(self, Self::Destination | Self::Both)
    }
}

/// The nice value a raised thread gets.
const HIGHEST: i32 = -20;

/// Raises the fair-class threads among `tids` to `HIGHEST` for as long as the guard
/// lives. Refused, with nothing changed, without the privilege.
pub fn raise(tids: &[Tid]) -> Result<Reniced, String> {
    Reniced::threads(tids, HIGHEST)
}

/// `raise` for the calling thread, `None` (logged) where it is refused.
pub fn raise_this_thread(who: &str) -> Option<Reniced> {
    raise(&[crate::nice::this_thread()])
        .map_err(|why| tracing::debug!("{who} keeps its weight: {why}"))
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ends_and_the_value_agree() {
        for p in [
            MigrationPriority::Normal,
            MigrationPriority::Destination,
            MigrationPriority::Source,
            MigrationPriority::Both,
        ] {
            assert_eq!(MigrationPriority::of(p.source(), p.destination()), p);
        }
    }
}
