//! godwit-vmm: the virtual machine monitor. One `Vm` per process; the CLI (crates/godwit)
//! builds one from a `VmConfig`, serves the API, and waits for it to stop.

pub mod api;
pub mod arch;
pub mod config;
pub mod confine;
pub mod control;
pub mod devices;
pub mod dirty;
pub mod error;
pub mod files;
pub mod loader;
pub mod memory;
pub mod migratable;
pub mod pagemap;
pub mod state;
pub mod vcpu;
pub mod vm;

pub use config::{Console, Payload, VmConfig};
pub use control::{RunState, VmExit};
pub use error::{Error, Result};
pub use vm::{Vm, VmHandle};
