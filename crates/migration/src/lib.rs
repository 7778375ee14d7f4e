//! godwit-migration: moves a running VM to another godwit process (live, pre-copy) or
//! into a file (snapshot), and back.
//!
//! The modules keep the three concerns apart: `wire` is the format (frames, checked
//! decoding), `transport` the byte streams (TCP, Unix sockets, files), and `source` the
//! policy (rounds, convergence, throttling, switchover). `destination` is the receiving
//! side; `pages` and `throttle` are the mechanisms the policy drives.

pub mod api;
pub mod destination;
pub mod pages;
pub mod report;
pub mod source;
pub mod throttle;
pub mod transport;
pub mod wire;

pub use destination::{receive, Expect, Incoming};
pub use report::{Progress, Report, Status};
pub use source::{migrate, Options};
pub use transport::{Listener, Target};
