//! How the source's vCPUs are scheduled while pre-copy copies their memory.
//!
//! On cores that the guest's vCPUs share with the migration's threads, the kernel's fair
//! scheduler gives each runnable thread the same weight: a guest that never blocks keeps
//! most of a core, and the migration's threads, which hand pages to one another and to
//! the kernel, wait their turn at every hand-off (docs/benchmarks.md, "The guest's
//! vCPUs at the lowest weight"). `Low` gives the vCPUs the lowest weight of the fair
//! class (nice 19) for as long as pre-copy runs: the migration's threads come first, and
//! the guest still gets every moment they leave a core idle. A host whose vCPUs have
//! cores of their own sees no difference. QEMU's multifd takes the cores by running
//! more threads; this takes them only while the migration can use them.
//!
//! A nice value counts against every thread of its scheduling group (the cgroup, or with
//! the kernel's autogroup the session), not only the migration's: where other work
//! (other guests) shares that group, the vCPUs yield to all of it while pre-copy runs.
//! That is why `Low` is asked for, never the default: a CPU hog started in the test
//! suite's session held a lowered guest to a few MiB/s of its writes. The migration's
//! threads raised instead (`migration_priority`'s `source`) yield the guest to the
//! migration alone.
//!
//! The vCPUs get their weight back before the pause (they must run to stop: lowered,
//! beside the hog, they took 88 ms to park) and when the migration ends, whatever its
//! outcome. Raising a nice value again takes CAP_SYS_NICE (or an RLIMIT_NICE that
//! allows it): a process that could not do it leaves its vCPUs as they are.

use crate::nice::{Reniced, Tid};
use serde::{Deserialize, Serialize};

/// The vCPUs' weight while pre-copy runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VcpuPriority {
    /// As they are: the guest competes with the migration on equal terms.
    #[default]
    Normal,
    /// The lowest fair-class weight: the migration first (see the module's notes).
    Low,
}

/// The nice value `Low` gives.
const LOWEST: i32 = 19;

/// Lowers the fair-class vCPU threads among `tids` to `LOWEST` for as long as the
/// guard lives. Refused, with nothing changed, where they could not be given their
/// weight back.
pub fn lower(tids: &[Tid]) -> Result<Reniced, String> {
    Reniced::threads(tids, LOWEST)
}
