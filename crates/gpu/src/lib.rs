//! godwit-gpu: the virtual GPU. A host's physical GPUs are partitioned into virtual
//! functions (VFs) the way SR-IOV GPUs are: the manager places VFs by profile and
//! shares the GPUs' state among godwit processes (`manager`, `shm`); each GPU's engine is
//! time-sliced among its VFs (`sched`); a VF (`vf`) is what a VM's guest drives, through
//! registers, a command ring and page tables in its own VRAM (`abi`, `command`, `mmu`);
//! work runs on a backend (`backend`; `cpu` is the one that exists today).

pub mod abi;
pub mod backend;
pub mod command;
pub mod cpu;
pub mod dirty;
pub mod kernels;
pub mod manager;
pub mod mmu;
pub mod profile;
pub mod sched;
pub mod shm;
pub mod vf;

pub use manager::{Lease, Manager};
pub use vf::{Hold, IrqLine, Prefetch, Vf, VfState};
