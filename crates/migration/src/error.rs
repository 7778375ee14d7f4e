//! Why a migration failed, as types: the driver decides what to do from the variant
//! (resume here, or not), and reports carry its kind for programs.

use crate::wire::WireError;
use godwit_vmm::migratable::ComponentError;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("{0}")]
    BadOptions(String),
    #[error("the VM is {0}, not running")]
    NotRunning(String),
    #[error("cannot {} {target}: {source}", if target.starts_with("file:") { "write the snapshot" } else { "reach" })]
    Unreachable {
        target: String,
        #[source]
        source: std::io::Error,
    },
    /// The migration thread could not be held to a source's system calls (godwit run
    /// --seccomp): nothing was sent.
    #[error("the migration thread {0}")]
    Confine(String),
    #[error("the destination refused the VM: {0}")]
    Refused(String),
    #[error("the destination aborted: {0}")]
    Aborted(String),
    /// The mode asked for switches to post-copy, and the destination said at the
    /// handshake that it cannot take it: nothing was paused or sent.
    #[error(
        "--mode {mode} needs post-copy, which the destination cannot take: {why}; --mode \
         precopy or auto moves the VM without it"
    )]
    NoPostcopy {
        mode: crate::report::Mode,
        why: String,
    },
    #[error("sending to {target}: {source}")]
    Send {
        target: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no {what} from the destination within {after:?}")]
    Timeout { what: &'static str, after: Duration },
    #[error("the destination closed the connection ({0})")]
    Closed(&'static str),
    #[error("the destination answered {got} where {want} was due")]
    Unexpected { want: &'static str, got: String },
    #[error("reading the destination's answer: {0}")]
    Wire(#[from] WireError),
    #[error("{component}: {source}")]
    Component {
        component: String,
        #[source]
        source: ComponentError,
    },
    #[error("cancelled")]
    Cancelled,
    /// Cancelled because this godwit stops: the VM does not run on here either.
    #[error("cancelled: {0}, and the VM stops with it")]
    Stopping(String),
    #[error("the VM ended while it migrated ({0}): there is nothing left to move")]
    VmEnded(String),
    #[error(
        "GO was sent but the destination did not confirm its start ({0}); the VM stays \
         stopped here and refuses resume and migrate: if the destination does not run \
         it, `godwit resume --force` takes it back"
    )]
    Unconfirmed(String),
    #[error(
        "the destination did not confirm within the pause's budget of {} ms (downtime \
         limit + handshake allowance): the VM resumed here and the destination will not \
         start it", budget.as_millis()
    )]
    PauseExceeded { budget: Duration },
    #[error(
        "post-copy broke ({why}): the VM runs at the destination and {pages} of its pages \
         are still only here; this copy stays stopped and keeps them (never resume it: it \
         is stale) while this process lives"
    )]
    PostcopyBroken { why: String, pages: u64 },
    #[error(
        "this VM's memory is still arriving (from the migration into it, or the snapshot \
         it was restored from) and none of its last {pages} pages arrived in {} s: it \
         moves once it is whole", stalled.as_secs()
    )]
    StillArriving { pages: u64, stalled: Duration },
}

impl MigrationError {
    /// A stable name for programs (`error_kind` in reports).
    pub fn kind(&self) -> &'static str {
        match self {
            MigrationError::BadOptions(_) => "bad_options",
            MigrationError::NotRunning(_) => "not_running",
            MigrationError::Unreachable { .. } => "unreachable",
            MigrationError::Confine(_) => "confine",
            MigrationError::Refused(_) => "refused",
            MigrationError::Aborted(_) => "aborted",
            MigrationError::NoPostcopy { .. } => "no_postcopy",
            MigrationError::Send { .. } => "send",
            MigrationError::Timeout { .. } => "timeout",
            MigrationError::Closed(_) => "closed",
            MigrationError::Unexpected { .. } => "protocol",
            MigrationError::Wire(_) => "protocol",
            MigrationError::Component { .. } => "component",
            MigrationError::Cancelled | MigrationError::Stopping(_) => "cancelled",
            MigrationError::VmEnded(_) => "vm_ended",
            MigrationError::Unconfirmed(_) => "unconfirmed",
            MigrationError::PauseExceeded { .. } => "pause_exceeded",
            MigrationError::PostcopyBroken { .. } => "postcopy_broken",
            MigrationError::StillArriving { .. } => "still_arriving",
        }
    }

    /// Past GO with no answer: the destination may run the VM, so the source must not.
    pub fn ambiguous(&self) -> bool {
        matches!(self, MigrationError::Unconfirmed(_))
    }

    /// The destination runs the VM ahead of its memory: the source must never run it
    /// again, and must keep what it still holds.
    pub fn split(&self) -> bool {
        matches!(self, MigrationError::PostcopyBroken { .. })
    }

    pub(crate) fn component(name: &str) -> impl FnOnce(ComponentError) -> MigrationError + '_ {
        move |source| MigrationError::Component {
            component: name.to_string(),
            source,
        }
    }
}
