//! The driver for godwit's virtual GPU function: finds the VF over PCI, maps its BARs
//! (identity mapped: the VMM's page tables cover the aperture), builds the GPU page
//! tables in the VF's own VRAM, owns the command ring, and waits on fences without
//! burning a host core: by default the device blocks the vCPU (WAIT_FENCE, one exit);
//! after `use_interrupts` the vCPU halts until the VF's MSI arrives (FENCE or ERROR).
//!
//! GPU virtual address space set up by `open`:
//! - [0, usable) -> VRAM [0, usable), 2 MiB pages, writable;
//! - SYS_VA + gpa -> guest RAM at gpa, for every RAM region, 2 MiB pages, writable;
//! - the page tables themselves (the last PT_RESERVE bytes of VRAM) are not mapped, so no
//!   command can rewrite them.

use crate::gpu_abi::{self as abi, control, irq, pte, reg};
use crate::{env, mem, pci};

/// Where guest RAM appears in the GPU's address space.
pub const SYS_VA: u64 = 1 << 38;
/// VRAM kept for page tables, at the top.
pub const PT_RESERVE: u64 = 2 << 20;
const RING_ENTRIES: u64 = 256;
const PAGE: u64 = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GpuError {
    pub code: u32,
    pub index: u32,
    pub addr: u64,
}

impl core::fmt::Display for GpuError {
    fn fmt(&self, f: &mut core::fmt::Formatter) -> core::fmt::Result {
        write!(
            f,
            "GPU error {} ({}) at ring entry {} addr={:#x}",
            self.code,
            abi::err::name(self.code),
            self.index,
            self.addr
        )
    }
}

pub struct Gpu {
    pub bdf: pci::Bdf,
    regs: u64,
    /// Guest-physical (= virtual) address of the VRAM aperture.
    pub aperture: u64,
    pub vram_size: u64,
    ring: u64,
    tail: u64,
    fence: u64,
    /// Next free page-table page (VRAM offset).
    pt_next: u64,
    root: u64,
    /// The vector the VF's MSI arrives on, once `use_interrupts` set it up.
    irq_vector: Option<u8>,
}

impl Gpu {
    pub fn read(&self, r: u64) -> u64 {
        crate::sys::mmio_read64(self.regs + r)
    }

    pub fn write(&self, r: u64, v: u64) {
        crate::sys::mmio_write64(self.regs + r, v)
    }

    /// Finds the first godwit GPU function and brings it up.
    pub fn open() -> Result<Gpu, &'static str> {
        let mut found = None;
        pci::enumerate(|d| {
            if found.is_none() && d.vendor == abi::VENDOR_ID && d.device == abi::DEVICE_ID_VF {
                found = Some(d.bdf);
            }
        });
        let bdf = found.ok_or("no godwit GPU function on the PCI bus")?;
        let bar = |i: u16| pci::read32(bdf, 0x10 + 4 * i) as u64;
        let regs = bar(abi::BAR_REGS as u16) & !0xf;
        let aperture = (bar(abi::BAR_VRAM as u16) & !0xf) | bar(abi::BAR_VRAM as u16 + 1) << 32;
        // Memory decoding and bus mastering on.
        let cmd = pci::read32(bdf, 0x04);
        pci::write32(bdf, 0x04, cmd | 0x6);
        let mut g = Gpu {
            bdf,
            regs,
            aperture,
            vram_size: 0,
            ring: 0,
            tail: 0,
            fence: 0,
            pt_next: 0,
            root: 0,
            irq_vector: None,
        };
        if g.read(reg::ID) != abi::MAGIC | abi::VERSION << 32 {
            return Err("the GPU function's ID register is not godwit's");
        }
        g.vram_size = g.read(reg::VRAM_SIZE);
        if g.vram_size < 2 * PT_RESERVE {
            return Err("the GPU function has too little VRAM");
        }
        g.write(reg::CONTROL, control::RESET);
        let ring =
            mem::alloc(RING_ENTRIES * abi::ENTRY_SIZE as u64).ok_or("no memory for the ring")?;
        ring.fill(0);
        g.ring = ring.as_ptr() as u64;
        // Page tables: root, then tables as needed, from the bottom of the reserve.
        g.pt_next = g.vram_size - PT_RESERVE;
        g.root = g.alloc_table();
        g.map_range(0, 0, g.usable(), pte::WRITE);
        let info = env::get();
        for r in &info.ram[..info.nr_ram as usize] {
            g.map_range(SYS_VA + r.start, r.start, r.size, pte::WRITE | pte::SYSTEM);
        }
        g.write(reg::RING_BASE, g.ring);
        g.write(reg::RING_SIZE, RING_ENTRIES);
        g.write(reg::PT_ROOT, g.root);
        g.write(reg::CONTROL, control::ENABLE);
        if g.read(reg::ERROR) != 0 {
            return Err("the GPU function refused its ring or page tables");
        }
        Ok(g)
    }

    /// VRAM the driver hands to programs: everything below the page tables.
    pub fn usable(&self) -> u64 {
        self.vram_size - PT_RESERVE
    }

    /// A pointer into VRAM through the aperture.
    pub fn vram_ptr(&self, off: u64) -> *mut u8 {
        (self.aperture + off) as *mut u8
    }

    pub fn vram_u64(&self, off: u64) -> u64 {
        // SAFETY: the aperture is identity mapped guest memory; callers pass offsets
        // inside VRAM.
        unsafe { core::ptr::read_volatile(self.vram_ptr(off) as *const u64) }
    }

    pub fn set_vram_u64(&self, off: u64, v: u64) {
        // SAFETY: as in `vram_u64`.
        unsafe { core::ptr::write_volatile(self.vram_ptr(off) as *mut u64, v) }
    }

    fn alloc_table(&mut self) -> u64 {
        let t = self.pt_next;
        assert!(
            t + PAGE <= self.vram_size,
            "GPU page-table reserve exhausted"
        );
        self.pt_next += PAGE;
        for i in 0..512 {
            self.set_vram_u64(t + i * 8, 0);
        }
        t
    }

    /// The table an entry of `table` points to, made if absent.
    fn next_table(&mut self, table: u64, index: u64) -> u64 {
        let e = self.vram_u64(table + index * 8);
        if e & pte::VALID != 0 {
            return e & pte::ADDR_MASK;
        }
        let t = self.alloc_table();
        self.set_vram_u64(table + index * 8, t | pte::VALID);
        t
    }

    /// Maps [va, va + len) to `target` with 2 MiB pages where aligned, 4 KiB elsewhere.
    pub fn map_range(&mut self, va: u64, target: u64, len: u64, flags: u64) {
        let mut off = 0;
        while off < len {
            let (v, t) = (va + off, target + off);
            let l1 = self.next_table(self.root, v >> 30 & 0x1ff);
            if v % (2 << 20) == 0 && t % (2 << 20) == 0 && len - off >= 2 << 20 {
                self.set_vram_u64(
                    l1 + (v >> 21 & 0x1ff) * 8,
                    t | flags | pte::VALID | pte::HUGE,
                );
                off += 2 << 20;
            } else {
                let l0 = self.next_table(l1, v >> 21 & 0x1ff);
                self.set_vram_u64(
                    l0 + (v >> 12 & 0x1ff) * 8,
                    (t & pte::ADDR_MASK) | flags | pte::VALID,
                );
                off += PAGE;
            }
        }
    }

    /// Writes a raw leaf entry (tests of the device's checks use this to map nonsense).
    pub fn set_leaf_2m(&mut self, va: u64, entry: u64) {
        let l1 = self.next_table(self.root, va >> 30 & 0x1ff);
        self.set_vram_u64(l1 + (va >> 21 & 0x1ff) * 8, entry);
    }

    /// Queues a command (waiting for room in the ring) and rings the doorbell; returns
    /// the fence it signals.
    pub fn submit(&mut self, opcode: u16, args: [u64; 6]) -> u64 {
        self.queue(opcode, args);
        self.kick();
        self.fence
    }

    /// Queues without ringing the doorbell (batching saves an exit per command).
    pub fn queue(&mut self, opcode: u16, args: [u64; 6]) -> u64 {
        while (self.tail + 1) % RING_ENTRIES == self.read(reg::RING_HEAD) {
            self.kick();
            self.write(reg::WAIT_FENCE, self.fence);
        }
        self.fence += 1;
        let e = (self.ring + self.tail * abi::ENTRY_SIZE as u64) as *mut u64;
        let words = [
            opcode as u64 | (abi::flags::FENCE as u64) << 16,
            self.fence,
            args[0],
            args[1],
            args[2],
            args[3],
            args[4],
            args[5],
        ];
        for (i, w) in words.iter().enumerate() {
            // SAFETY: the ring is RING_ENTRIES * 64 bytes of RAM this driver owns.
            unsafe { core::ptr::write_volatile(e.add(i), *w) };
        }
        self.tail = (self.tail + 1) % RING_ENTRIES;
        self.fence
    }

    pub fn kick(&self) {
        self.write(reg::RING_TAIL, self.tail);
    }

    /// The error register, if set.
    pub fn error(&self) -> Option<GpuError> {
        let e = self.read(reg::ERROR);
        (e != 0).then(|| GpuError {
            code: e as u32,
            index: (e >> 32) as u32,
            addr: self.read(reg::ERROR_ADDR),
        })
    }

    /// Clears the error; the ring goes on after the failing entry.
    pub fn clear_error(&self) {
        self.write(reg::CONTROL, control::CLEAR_ERROR);
    }

    pub fn completed_fence(&self) -> u64 {
        self.read(reg::FENCE)
    }

    /// Config-space offset of the VF's MSI capability.
    fn msi_cap(&self) -> Option<u16> {
        if pci::read32(self.bdf, 0x04) >> 16 & 0x10 == 0 {
            return None;
        }
        let mut p = (pci::read32(self.bdf, 0x34) & 0xfc) as u16;
        for _ in 0..48 {
            if p < 0x40 {
                return None;
            }
            let h = pci::read32(self.bdf, p);
            if h & 0xff == 0x05 {
                return Some(p);
            }
            p = (h >> 8 & 0xfc) as u16;
        }
        None
    }

    /// Routes the VF's MSI to `vector` on vCPU `cpu` (APIC id = index), unmasks FENCE
    /// and ERROR, and makes `wait` sleep until the interrupt.
    pub fn use_interrupts(&mut self, vector: u8, cpu: u32) -> Result<(), &'static str> {
        if (vector as u32) < crate::abi::irq::FIRST_VECTOR {
            return Err("interrupt vectors below 32 are exceptions");
        }
        let p = self
            .msi_cap()
            .ok_or("the GPU function has no MSI capability")?;
        pci::write32(
            self.bdf,
            p + 4,
            (crate::abi::irq::LAPIC_BASE | (cpu as u64) << 12) as u32,
        );
        pci::write32(self.bdf, p + 8, 0);
        pci::write32(self.bdf, p + 12, vector as u32);
        pci::write32(self.bdf, p, pci::read32(self.bdf, p) | 1 << 16);
        self.irq_vector = Some(vector);
        self.write(reg::INT_MASK, irq::ALL);
        Ok(())
    }

    /// Back to WAIT_FENCE waits; the VF sends nothing more.
    pub fn stop_interrupts(&mut self) {
        self.write(reg::INT_MASK, 0);
        if let Some(p) = self.msi_cap() {
            pci::write32(self.bdf, p, pci::read32(self.bdf, p) & !(1 << 16));
        }
        self.irq_vector = None;
    }

    pub fn irq_vector(&self) -> Option<u8> {
        self.irq_vector
    }

    /// `irq=VECTOR` (32 to 255) on the command line: wait on interrupts sent to vCPU 0.
    pub fn interrupts_from_args(&mut self) -> Result<(), &'static str> {
        match crate::args::get_u64("irq", 0) {
            0 => Ok(()),
            v if v <= 255 => self.use_interrupts(v as u8, 0),
            _ => Err("irq= takes a vector from 32 to 255"),
        }
    }

    /// Interrupts taken on this GPU's vector so far.
    pub fn interrupts(&self) -> u64 {
        self.irq_vector.map(crate::sys::irq_count).unwrap_or(0)
    }

    /// Waits for `fence` without spinning: blocked in the device, or halted until the
    /// VF's interrupt.
    pub fn wait(&self, fence: u64) -> Result<(), GpuError> {
        loop {
            if self.read(reg::FENCE) >= fence {
                return Ok(());
            }
            if let Some(e) = self.error() {
                return Err(e);
            }
            if self.irq_vector.is_none() {
                self.write(reg::WAIT_FENCE, fence);
                continue;
            }
            // Clear, re-check, then halt: a fence that lands in between raises the cause
            // again, and its MSI stays pending in the LAPIC until the halt takes it.
            self.write(reg::INT_STATUS, irq::ALL);
            if self.read(reg::FENCE) < fence && self.read(reg::ERROR) == 0 {
                crate::sys::wait_irq();
            }
        }
    }

    pub fn run(&mut self, opcode: u16, args: [u64; 6]) -> Result<(), GpuError> {
        let f = self.submit(opcode, args);
        self.wait(f)
    }

    /// The GPU VA of guest memory at `ptr` (identity mapped).
    pub fn sys_va<T>(ptr: *const T) -> u64 {
        SYS_VA + ptr as u64
    }
}

/// A kernel's SGEMM dimension word.
pub fn dims(m: u64, n: u64, k: u64) -> u64 {
    m | n << 21 | k << 42
}
