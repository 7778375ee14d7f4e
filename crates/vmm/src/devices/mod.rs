//! Devices the guest reaches through port I/O or MMIO exits.

pub mod bus;
pub mod gpu;
pub mod pci;
pub mod serial;

pub use bus::{Bus, BusDevice, SharedDevice};
