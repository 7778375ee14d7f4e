//! A host-side driver for one VF, the way a guest driver works: page tables in VRAM, the
//! ring in "guest" RAM, register writes through the MMIO entry points.
#![allow(dead_code)]

use godwit_gpu::abi::{control, pte, reg};
use godwit_gpu::command::encode;
use godwit_gpu::cpu::CpuBackend;
use godwit_gpu::mmu::GuestRam;
use godwit_gpu::sched::Unshared;
use godwit_gpu::Vf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress};

pub const RAM: u64 = 64 << 20;
pub const RING: u64 = 0x10_0000;
pub const RING_SIZE: u64 = 64;
/// Guest RAM appears at this GPU VA.
pub const SYS: u64 = 1 << 38;
pub const VRAM: u64 = 64 << 20;
/// Page tables live in the last MiB of VRAM.
pub const PT: u64 = VRAM - (1 << 20);

/// n test values in -5.0..5.0, different for each seed.
pub fn data(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as u32).wrapping_mul(2654435761) ^ seed) % 1000)
        .map(|v| v as f32 / 100.0 - 5.0)
        .collect()
}

pub struct Driver {
    pub vf: Arc<Vf>,
    pub ram: GuestRam,
    pub tail: u64,
    pub fence: u64,
    pub thread: Option<std::thread::JoinHandle<()>>,
}

pub fn w(vf: &Vf, r: u64, v: u64) {
    vf.mmio_write(r, &v.to_le_bytes(), &|| false);
}

pub fn r(vf: &Vf, r: u64) -> u64 {
    let mut b = [0u8; 8];
    vf.mmio_read(r, &mut b);
    u64::from_le_bytes(b)
}

pub fn put(vf: &Vf, off: u64, v: u64) {
    vf.backend().write(off, &v.to_le_bytes()).unwrap();
}

/// VA 0.. = VRAM (2 MiB pages, writable); SYS.. = guest RAM (2 MiB pages, writable).
pub fn identity_tables(vf: &Vf) {
    let root = PT;
    let l1_vram = PT + 0x1000;
    let l1_sys = PT + 0x2000;
    put(vf, root, l1_vram | pte::VALID);
    put(vf, root + (SYS >> 30) * 8, l1_sys | pte::VALID);
    for i in 0..VRAM >> 21 {
        put(
            vf,
            l1_vram + i * 8,
            (i << 21) | pte::VALID | pte::WRITE | pte::HUGE,
        );
    }
    for i in 0..RAM >> 21 {
        put(
            vf,
            l1_sys + i * 8,
            (i << 21) | pte::VALID | pte::WRITE | pte::HUGE | pte::SYSTEM,
        );
    }
}

impl Driver {
    pub fn new() -> Driver {
        let ram = GuestRam::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap();
        let vf = Vf::new(
            Box::new(CpuBackend::new(VRAM).unwrap()),
            ram.clone(),
            Box::new(Unshared),
        );
        Self::with(vf, ram, true)
    }

    pub fn with(vf: Arc<Vf>, ram: GuestRam, setup: bool) -> Driver {
        Self::named(vf, ram, setup, "test-engine")
    }

    /// As `with`, its engine thread named `engine` (at most 15 bytes, Linux's limit), so
    /// that a test can find it in /proc.
    pub fn named(vf: Arc<Vf>, ram: GuestRam, setup: bool, engine: &str) -> Driver {
        let thread = Some(vf.start(engine, || Ok(())).unwrap());
        if setup {
            identity_tables(&vf);
            w(&vf, reg::RING_BASE, RING);
            w(&vf, reg::RING_SIZE, RING_SIZE);
            w(&vf, reg::PT_ROOT, PT);
            w(&vf, reg::CONTROL, control::ENABLE);
            assert_eq!(r(&vf, reg::ERROR), 0);
        }
        Driver {
            vf,
            ram,
            tail: 0,
            fence: 0,
            thread,
        }
    }

    /// Writes an entry and rings the doorbell; returns its fence.
    pub fn submit(&mut self, opcode: u16, args: [u64; 6]) -> u64 {
        self.fence += 1;
        let e = encode(opcode, Some(self.fence), args);
        self.ram
            .write_slice(&e, GuestAddress(RING + self.tail * 64))
            .unwrap();
        self.tail = (self.tail + 1) % RING_SIZE;
        w(&self.vf, reg::RING_TAIL, self.tail);
        self.fence
    }

    /// Waits for `fence`; Err(error register) if the VF reports an error first.
    pub fn wait(&self, fence: u64) -> Result<(), (u64, u64)> {
        let end = Instant::now() + Duration::from_secs(20);
        while r(&self.vf, reg::FENCE) < fence {
            let e = r(&self.vf, reg::ERROR);
            if e != 0 {
                return Err((e, r(&self.vf, reg::ERROR_ADDR)));
            }
            assert!(Instant::now() < end, "fence {fence} never came");
            w(&self.vf, reg::WAIT_FENCE, fence);
        }
        Ok(())
    }

    pub fn run(&mut self, opcode: u16, args: [u64; 6]) -> Result<(), (u64, u64)> {
        let f = self.submit(opcode, args);
        self.wait(f)
    }

    pub fn put_f32(&self, gpa: u64, v: &[f32]) {
        let b: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.ram.write_slice(&b, GuestAddress(gpa)).unwrap();
    }

    pub fn get_f32(&self, gpa: u64, n: usize) -> Vec<f32> {
        let mut b = vec![0u8; n * 4];
        self.ram.read_slice(&mut b, GuestAddress(gpa)).unwrap();
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    pub fn vram_f32(&self, off: u64, n: usize) -> Vec<f32> {
        let mut b = vec![0u8; n * 4];
        self.vf.backend().read(off, &mut b).unwrap();
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.vf.shutdown();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
