//! x86-64 specifics: descriptor tables, page tables, the two ways guests start (godwit's
//! ring-3 guests, Linux), and the vCPU set-up both share.

pub mod cpu;
pub mod gdt;
pub mod linux;
pub mod paging;
pub mod ring3;
