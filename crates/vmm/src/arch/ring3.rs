//! Starting godwit's own guests directly in ring 3 (see shared/notes/host-kvm-facts.md:
//! under PVM ring-0 code is emulated, ring-3 code runs natively).
//!
//! The VMM writes what a kernel would have set up: GDT with user segments and one TSS per
//! vCPU (whose I/O bitmap opens COM1 and PCI config ports), an IDT whose exception gates
//! (0..32) point at one-instruction ring-0 stubs that report the vector to the system
//! device and whose interrupt gates (32..256) count the interrupt for ring 3 (see
//! `godwit_guest::abi::irq`), user-accessible identity page tables, and the boot-info
//! block. Guest-physical layout:
//!
//! | 0x1000  | GDT                 | 0x4800  | interrupt counters      |
//! | 0x2000  | IDT (256 gates)     | 0x5000  | PML4, PDPT, PDs (<= 64) |
//! | 0x3000  | a stub per vector   | 0x48000 | command line (4 KiB)    |
//! | 0x4000  | boot info           | 0x50000 | TSS i at +0x3000 * i    |
//! | 0x4400  | interrupt handler   | 0x70000 | ring-0 stacks           |
//! | 0x100000 and up: the image    |         |                         |

use super::gdt::{self, segment};
use crate::error::{Error, Result};
use crate::memory::{self, GuestMemory, RamRegion, GIB};
use godwit_guest::abi::{self, sysdev, BootInfo};
use kvm_bindings::{kvm_regs, kvm_sregs};
use vm_memory::{Bytes, GuestAddress};

pub const GDT: u64 = 0x1000;
pub const IDT: u64 = 0x2000;
pub const STUBS: u64 = 0x3000;
pub const BOOT_INFO: u64 = 0x4000;
pub const IRQ_HANDLER: u64 = 0x4400;
const _: () = assert!(BOOT_INFO + abi::BOOT_INFO_SIZE as u64 <= IRQ_HANDLER);
const _: () = assert!(IRQ_HANDLER + 64 <= abi::irq::COUNTS);
const _: () = assert!(abi::irq::COUNTS + 8 * (256 - abi::irq::FIRST_VECTOR as u64) <= PML4);
pub const PML4: u64 = 0x5000;
pub const CMDLINE: u64 = 0x48000;
pub const CMDLINE_MAX: usize = 4096;
pub const TSS: u64 = 0x50000;
pub const TSS_STRIDE: u64 = 0x3000;
pub const STACK0: u64 = 0x70000;
pub const IMAGE_MIN: u64 = 0x100000;
pub const MAX_VCPUS: u32 = 8;
/// Every gate's stub is this long.
pub const STUB_SIZE: u64 = 16;

const KERNEL_CS: u16 = 0x08;
const USER_DS: u16 = 0x18 | 3;
const USER_CS: u16 = 0x20 | 3;
const TSS_SEL0: u16 = 0x28;
/// TSS: 104 bytes, then an I/O bitmap for ports 0..0x10000, then the 0xff terminator.
const TSS_IOMAP: u64 = 104;
const TSS_LIMIT: u32 = (TSS_IOMAP + 8192) as u32;
/// Ports ring 3 may use directly.
const OPEN_PORTS: &[(u16, u16)] = &[(0x3f8, 8), (0xcf8, 8)];

fn tss_selector(i: u32) -> u16 {
    TSS_SEL0 + 16 * i as u16
}

/// The gdt as 8-byte slots.
fn gdt(vcpus: u32) -> Vec<u64> {
    let mut g = vec![
        0,
        gdt::KERNEL_CODE64,
        gdt::KERNEL_DATA,
        gdt::USER_DATA,
        gdt::USER_CODE64,
    ];
    for i in 0..vcpus {
        g.extend(gdt::tss_descriptor(TSS + TSS_STRIDE * i as u64, TSS_LIMIT));
    }
    g
}

/// One stub: `mov eax, SYSDEV+FAULT; mov dword [rax], vector; jmp $`. The write exits to the
/// VMM, which reads the exception frame from the ring-0 stack.
fn stub(vector: u32) -> [u8; STUB_SIZE as usize] {
    let mut s = [0x90u8; STUB_SIZE as usize];
    s[0] = 0xb8;
    s[1..5].copy_from_slice(&((memory::SYSDEV_BASE + sysdev::FAULT) as u32).to_le_bytes());
    s[5] = 0xc7;
    s[6] = 0x00;
    s[7..11].copy_from_slice(&vector.to_le_bytes());
    s[11] = 0xeb;
    s[12] = 0xfe;
    s
}

/// Interrupt stub: `push rax; mov eax, vector; jmp IRQ_HANDLER`. Under PVM ring-0 code is
/// emulated, so the whole path is kept to nine instructions.
fn irq_stub(vector: u32) -> [u8; STUB_SIZE as usize] {
    let at = STUBS + STUB_SIZE * vector as u64;
    let mut s = [0x90u8; STUB_SIZE as usize];
    s[0] = 0x50;
    s[1] = 0xb8;
    s[2..6].copy_from_slice(&vector.to_le_bytes());
    s[6] = 0xe9;
    let rel = IRQ_HANDLER as i64 - (at as i64 + 11);
    s[7..11].copy_from_slice(&(rel as i32).to_le_bytes());
    s
}

/// The common interrupt handler (vector in eax, the guest's rax pushed):
/// `lock inc qword [rax*8 + COUNTS - 8*FIRST]; mov eax, LAPIC_EOI; mov dword [rax], 0;
/// pop rax; and word [rsp+16], ~IF; iretq`. Clearing IF in the saved RFLAGS means ring 3
/// gets interrupts only inside a WAIT_IRQ, never in the middle of its own code.
fn irq_handler() -> Vec<u8> {
    let counts = (abi::irq::COUNTS - 8 * abi::irq::FIRST_VECTOR as u64) as u32;
    let eoi = (abi::irq::LAPIC_BASE + 0xb0) as u32;
    let mut h = vec![0xf0, 0x48, 0xff, 0x04, 0xc5];
    h.extend(counts.to_le_bytes());
    h.push(0xb8);
    h.extend(eoi.to_le_bytes());
    h.extend([0xc7, 0x00, 0, 0, 0, 0]);
    h.push(0x58);
    h.extend([0x66, 0x81, 0x64, 0x24, 0x10, 0xff, 0xfd]);
    h.extend([0x48, 0xcf]);
    h
}

fn tss(i: u32) -> Vec<u8> {
    let mut t = vec![0u8; (TSS_LIMIT + 1) as usize];
    let rsp0 = STACK0 + 0x1000 * (i as u64 + 1);
    t[4..12].copy_from_slice(&rsp0.to_le_bytes());
    t[102..104].copy_from_slice(&(TSS_IOMAP as u16).to_le_bytes());
    let map = &mut t[TSS_IOMAP as usize..];
    map.fill(0xff);
    for &(base, n) in OPEN_PORTS {
        for p in base..base + n {
            map[p as usize / 8] &= !(1 << (p % 8));
        }
    }
    t
}

fn put(mem: &GuestMemory, addr: u64, bytes: &[u8]) -> Result<()> {
    mem.write_slice(bytes, GuestAddress(addr))
        .map_err(|e| Error::Memory(format!("boot tables at {addr:#x}: {e}")))
}

/// Writes the tables and boot info. `image_end` is the first byte after the loaded image.
pub fn setup_memory(
    mem: &GuestMemory,
    ram: &[RamRegion],
    vcpus: u32,
    tsc_khz: u32,
    image_end: u64,
    cmdline: &str,
    map_top: u64,
) -> Result<()> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(Error::Config(format!(
            "godwit guests support 1 to {MAX_VCPUS} vCPUs"
        )));
    }
    if cmdline.len() > CMDLINE_MAX {
        return Err(Error::Config(format!(
            "guest arguments longer than {CMDLINE_MAX} bytes"
        )));
    }
    // Device memory above RAM (a GPU's VRAM aperture) is mapped too.
    let top = mapped_bytes(ram).max(map_top.div_ceil(GIB) * GIB);
    if PML4 + 0x2000 + top.div_ceil(GIB) * 0x1000 > CMDLINE {
        return Err(Error::Config(format!(
            "guest memory and device apertures reach {} GiB; godwit guests map at most {} GiB",
            top / GIB,
            (CMDLINE - PML4 - 0x2000) / 0x1000
        )));
    }
    let tables_end = super::paging::identity_map(mem, PML4, top, true)?;
    debug_assert!(tables_end <= CMDLINE);

    let g: Vec<u8> = gdt(vcpus).iter().flat_map(|d| d.to_le_bytes()).collect();
    put(mem, GDT, &g)?;
    let mut idt = Vec::with_capacity(4096);
    let mut stubs = Vec::with_capacity(4096);
    for v in 0..256u32 {
        idt.extend(gdt::interrupt_gate(
            STUBS + STUB_SIZE * v as u64,
            KERNEL_CS,
            0,
        ));
        if v < abi::irq::FIRST_VECTOR {
            stubs.extend(stub(v));
        } else {
            stubs.extend(irq_stub(v));
        }
    }
    put(mem, IDT, &idt)?;
    put(mem, STUBS, &stubs)?;
    put(mem, IRQ_HANDLER, &irq_handler())?;
    put(
        mem,
        abi::irq::COUNTS,
        &[0u8; 8 * (256 - abi::irq::FIRST_VECTOR as usize)],
    )?;
    for i in 0..vcpus {
        put(mem, TSS + TSS_STRIDE * i as u64, &tss(i))?;
    }
    put(mem, CMDLINE, cmdline.as_bytes())?;

    let mut info = BootInfo {
        vcpus,
        tsc_khz: tsc_khz as u64,
        nr_ram: ram.len().min(abi::MAX_RAM_REGIONS) as u32,
        ecam_buses: memory::ECAM_BUSES,
        image_end,
        ecam_base: memory::ECAM_BASE,
        sysdev_base: memory::SYSDEV_BASE,
        cmdline_addr: CMDLINE,
        cmdline_len: cmdline.len() as u64,
        idt_base: IDT,
        pci_mmio_base: memory::PCI_MMIO_BASE,
        ..Default::default()
    };
    for (dst, r) in info.ram.iter_mut().zip(ram) {
        *dst = abi::RamRegion {
            start: r.start,
            size: r.size,
        };
    }
    put(mem, BOOT_INFO, &info.encode())
}

/// Special registers for vCPU `i`: long mode, paging on, CPL 3.
pub fn sregs(base: &kvm_sregs, i: u32) -> kvm_sregs {
    let mut s = *base;
    s.cs = segment(USER_CS, gdt::USER_CODE64);
    let ds = segment(USER_DS, gdt::USER_DATA);
    s.ds = ds;
    s.es = ds;
    s.fs = ds;
    s.gs = ds;
    s.ss = ds;
    s.tr = segment(
        tss_selector(i),
        gdt::tss_descriptor(TSS + TSS_STRIDE * i as u64, TSS_LIMIT)[0],
    );
    s.tr.type_ = 0xb; // busy
    s.ldt.unusable = 1;
    s.ldt.present = 0;
    s.gdt.base = GDT;
    s.gdt.limit = (gdt(MAX_VCPUS).len() * 8 - 1) as u16;
    s.idt.base = IDT;
    s.idt.limit = 256 * 16 - 1;
    // PE | MP | ET | NE | WP | PG
    s.cr0 = 0x8001_0033;
    s.cr3 = PML4;
    // PAE | OSFXSR | OSXMMEXCPT
    s.cr4 = 0x20 | 0x200 | 0x400;
    // LME | LMA
    s.efer = 0x500;
    s
}

/// General registers for vCPU `i`: the runtime's `_start(boot_info, index, platform=0)`.
pub fn regs(entry: u64, i: u32) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rflags: 0x2,
        rdi: BOOT_INFO,
        rsi: i as u64,
        rdx: 0,
        ..Default::default()
    }
}

/// What the ring-0 stub of `vector` left on vCPU `i`'s ring-0 stack, read back for a
/// report: (error code if the vector has one, rip, cs, rflags, rsp).
pub fn exception_frame(
    mem: &GuestMemory,
    rsp: u64,
    vector: u32,
) -> Option<(Option<u64>, [u64; 4])> {
    let has_code = matches!(vector, 8 | 10..=14 | 17 | 21 | 29 | 30);
    let mut at = rsp;
    let mut next = || {
        let v = mem.read_obj::<u64>(GuestAddress(at)).ok();
        at += 8;
        v
    };
    let code = if has_code { Some(next()?) } else { None };
    Some((code, [next()?, next()?, next()?, next()?]))
}

/// The identity map covers this much guest-physical space.
pub fn mapped_bytes(ram: &[RamRegion]) -> u64 {
    ram.iter()
        .map(|r| r.end())
        .max()
        .unwrap_or(0)
        .max(memory::MMIO_HOLE_END)
        .div_ceil(GIB)
        * GIB
}

pub fn vector_name(v: u32) -> &'static str {
    match v {
        0 => "#DE divide error",
        1 => "#DB debug",
        2 => "NMI",
        3 => "#BP breakpoint",
        4 => "#OF overflow",
        5 => "#BR bound range",
        6 => "#UD invalid opcode",
        7 => "#NM device not available",
        8 => "#DF double fault",
        10 => "#TS invalid TSS",
        11 => "#NP segment not present",
        12 => "#SS stack fault",
        13 => "#GP general protection",
        14 => "#PF page fault",
        16 => "#MF x87 error",
        17 => "#AC alignment check",
        18 => "#MC machine check",
        19 => "#XM SIMD error",
        32..=255 => "external interrupt",
        _ => "reserved exception",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tss_opens_only_the_listed_ports() {
        let t = tss(1);
        let map = &t[TSS_IOMAP as usize..];
        let open = |p: usize| map[p / 8] & (1 << (p % 8)) == 0;
        assert!(open(0x3f8) && open(0x3ff) && open(0xcfc));
        assert!(!open(0x3f7) && !open(0x400) && !open(0x60) && !open(0xcf7));
        assert_eq!(*map.last().unwrap(), 0xff, "terminator");
        assert_eq!(
            u64::from_le_bytes(t[4..12].try_into().unwrap()),
            STACK0 + 0x2000
        );
    }

    #[test]
    fn stubs_report_their_vector() {
        let s = stub(14);
        assert_eq!(s[0], 0xb8);
        assert_eq!(
            u32::from_le_bytes(s[1..5].try_into().unwrap()) as u64,
            memory::SYSDEV_BASE + sysdev::FAULT
        );
        assert_eq!(u32::from_le_bytes(s[7..11].try_into().unwrap()), 14);
    }

    #[test]
    fn tables_fit_below_the_command_line_for_the_largest_guest() {
        let mem = crate::memory::create(64 << 20).unwrap();
        let ram = crate::memory::layout(crate::memory::MAX_MEMORY);
        let end = super::super::paging::identity_map(&mem, PML4, mapped_bytes(&ram), true).unwrap();
        assert!(end <= CMDLINE, "{end:#x}");
        assert!(TSS + TSS_STRIDE * MAX_VCPUS as u64 <= STACK0);
        assert!(STACK0 + 0x1000 * (MAX_VCPUS as u64 + 1) <= IMAGE_MIN);
        assert!(gdt(MAX_VCPUS).len() * 8 <= 0x1000);
    }

    #[test]
    fn boot_info_lands_where_the_runtime_reads_it() {
        let mem = crate::memory::create(64 << 20).unwrap();
        let ram = crate::memory::layout(64 << 20);
        setup_memory(&mem, &ram, 2, 2_000_000, 0x20_0000, "wss=8", 0).unwrap();
        let mut raw = [0u8; abi::BOOT_INFO_SIZE];
        mem.read_slice(&mut raw, GuestAddress(BOOT_INFO)).unwrap();
        let info = abi::BootInfo::decode(&raw).unwrap();
        assert_eq!((info.vcpus, info.tsc_khz, info.nr_ram), (2, 2_000_000, 1));
        let mut cmd = [0u8; 5];
        mem.read_slice(&mut cmd, GuestAddress(info.cmdline_addr))
            .unwrap();
        assert_eq!(&cmd, b"wss=8");
        assert!(setup_memory(&mem, &ram, 9, 1, 0, "", 0).is_err());
        assert!(setup_memory(&mem, &ram, 1, 1, 0, "", 66 * GIB).is_err());
    }
}
