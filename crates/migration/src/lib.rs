//! godwit-migration: moves a running VM to another godwit process (live, pre-copy) or
//! into a file (snapshot), and back.
//!
//! Every part of the VM that moves is a component of `godwit_vmm::migratable`, driven
//! through the same device-migration state machine; this crate names none of them.
//! The modules keep the concerns apart: `wire` is the format (frames, checked
//! decoding), `transport` the byte streams (TCP, Unix sockets, files; `snapshot_file` writes
//! a snapshot beside its path and swaps it in when whole), `outbound` the
//! sending lanes, `back` what the destination says while a migration runs, and
//! `source` the policy (rounds, switchover), on its own thread, with
//! `converge` deciding what to hold back when rounds alone do not converge.
//! `destination` is the receiving side (`inplace` reading pre-copy's pages straight
//! into memory, `damaged` keeping those that arrived torn until mended), `postcopy_in` its part once a VM runs there
//! ahead of its memory, `restore` the same for a snapshot read lazily through the page
//! index (`snapshot_index`) that sealing a snapshot appends.

pub mod api;
mod back;
mod converge;
pub mod damaged;
pub mod destination;
pub mod error;
mod inplace;
pub mod lacks;
pub mod migration_priority;
pub mod nice;
pub mod outbound;
pub mod postcopy_in;
mod priority;
pub mod report;
mod restore;
pub mod snapshot_file;
pub mod snapshot_index;
pub mod source;
pub mod tls;
pub mod transport;
pub mod vcpu_priority;
pub mod wire;

pub use destination::{receive, Incoming, ReceiveError};
pub use error::MigrationError;
pub use godwit_vmm::migratable::incoming::Host;
pub use report::{Mode, Outcome, Phase, Progress, Report, Status};
pub use source::{migrate, Options, DEFAULT_CONNECTIONS};
pub use transport::{Listener, Target};
