//! Booting Linux with the 64-bit boot protocol: kernel (ELF vmlinux or bzImage) at 1 MiB,
//! zero page, command line, initrd, e820, and a vCPU already in long mode.
//!
//! Under PVM (these development machines) the kernel's ring-0 code is emulated and Linux
//! gets as far as its early console; on hosts with VMX/SVM it runs normally.

use super::gdt::{self, segment};
use crate::error::{Error, Result};
use crate::memory::{GuestMemory, RamRegion};
use kvm_bindings::{kvm_regs, kvm_sregs};
use linux_loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::{bzimage::BzImage, elf::Elf, KernelLoader};
use std::fs::File;
use std::path::Path;
use vm_memory::{Bytes, GuestAddress};

pub const GDT: u64 = 0x500;
pub const IDT: u64 = 0x520;
pub const ZERO_PAGE: u64 = 0x7000;
pub const BOOT_STACK: u64 = 0x8ff0;
pub const PML4: u64 = 0x9000;
pub const CMDLINE: u64 = 0x20000;
pub const CMDLINE_MAX: usize = 0x10000;
pub const HIMEM: u64 = 0x100000;
/// End of the legacy RAM below the EBDA.
const EBDA: u64 = 0x9fc00;
const E820_RAM: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    Elf,
    BzImage,
}

/// What `load` left in memory.
pub struct LoadedKernel {
    pub entry: u64,
    pub format: KernelFormat,
}

fn bad(path: &Path, msg: impl Into<String>) -> Error {
    Error::BadImage(path.display().to_string(), msg.into())
}

/// The largest kernel image read (bzImages are tens of MiB).
const MAX_KERNEL: u64 = 512 << 20;

fn open(path: &Path) -> Result<File> {
    crate::files::open_regular(path, MAX_KERNEL)
        .map(|(f, _)| f)
        .map_err(|source| Error::ImageRead {
            path: path.into(),
            source,
        })
}

/// Loads the kernel, the initrd and the boot parameters.
pub fn load(
    mem: &GuestMemory,
    ram: &[RamRegion],
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
) -> Result<LoadedKernel> {
    let mut f = open(kernel)?;
    let mut magic = [0u8; 4];
    std::io::Read::read_exact(&mut f, &mut magic)
        .map_err(|_| bad(kernel, "file too short to be a kernel"))?;
    let (loaded, format) = if magic == *b"\x7fELF" {
        let r = Elf::load(mem, None, &mut f, Some(GuestAddress(HIMEM)))
            .map_err(|e| bad(kernel, format!("not a loadable vmlinux: {e}")))?;
        (r, KernelFormat::Elf)
    } else {
        let r = BzImage::load(mem, None, &mut f, Some(GuestAddress(HIMEM)))
            .map_err(|e| bad(kernel, format!("neither an ELF vmlinux nor a bzImage: {e}")))?;
        (r, KernelFormat::BzImage)
    };
    let entry = match format {
        KernelFormat::Elf => loaded.kernel_load.0,
        // The 64-bit entry point sits 0x200 past the protected-mode code.
        KernelFormat::BzImage => loaded.kernel_load.0 + 0x200,
    };

    let mut params = boot_params::default();
    if let Some(hdr) = loaded.setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = 0xff;
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448; // "HdrS"
    params.hdr.kernel_alignment = 0x0100_0000;

    let mut cl = Cmdline::new(CMDLINE_MAX).map_err(|e| Error::Config(e.to_string()))?;
    cl.insert_str(cmdline)
        .map_err(|e| Error::Config(format!("kernel command line: {e}")))?;
    linux_loader::loader::load_cmdline(mem, GuestAddress(CMDLINE), &cl)
        .map_err(|e| Error::Config(format!("kernel command line: {e}")))?;
    params.hdr.cmd_line_ptr = CMDLINE as u32;
    params.hdr.cmdline_size = cmdline.len() as u32 + 1;

    let low_end = ram[0].end();
    if let Some(path) = initrd {
        // It must fit below 4 GiB with the kernel: no larger file is read.
        let data =
            crate::files::read_regular(path, ram[0].size).map_err(|source| Error::ImageRead {
                path: path.into(),
                source,
            })?;
        let at = low_end.saturating_sub(data.len() as u64) & !0xfff;
        if at < loaded.kernel_end {
            return Err(bad(
                path,
                format!(
                    "initrd of {} bytes does not fit in guest memory",
                    data.len()
                ),
            ));
        }
        mem.write_slice(&data, GuestAddress(at))
            .map_err(|e| Error::Memory(e.to_string()))?;
        params.hdr.ramdisk_image = at as u32;
        params.hdr.ramdisk_size = data.len() as u32;
    }

    let mut e820 = vec![(0, EBDA), (HIMEM, low_end - HIMEM)];
    e820.extend(ram[1..].iter().map(|r| (r.start, r.size)));
    for (i, (addr, size)) in e820.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: E820_RAM,
        };
    }
    params.e820_entries = e820.len() as u8;
    LinuxBootConfigurator::write_bootparams::<GuestMemory>(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE)),
        mem,
    )
    .map_err(|e| Error::Memory(format!("zero page: {e}")))?;

    let gdt: Vec<u8> = [
        0u64,
        gdt::KERNEL_CODE64,
        gdt::KERNEL_DATA,
        gdt::descriptor(0x8b, 0x8, 0, 0xfffff),
    ]
    .iter()
    .flat_map(|d| d.to_le_bytes())
    .collect();
    mem.write_slice(&gdt, GuestAddress(GDT))
        .map_err(|e| Error::Memory(e.to_string()))?;
    mem.write_obj(0u64, GuestAddress(IDT))
        .map_err(|e| Error::Memory(e.to_string()))?;
    super::paging::identity_map(mem, PML4, super::ring3::mapped_bytes(ram), false)?;
    Ok(LoadedKernel { entry, format })
}

pub fn sregs(base: &kvm_sregs) -> kvm_sregs {
    let mut s = *base;
    s.cs = segment(0x08, gdt::KERNEL_CODE64);
    let ds = segment(0x10, gdt::KERNEL_DATA);
    s.ds = ds;
    s.es = ds;
    s.fs = ds;
    s.gs = ds;
    s.ss = ds;
    s.tr = segment(0x18, gdt::descriptor(0x8b, 0x8, 0, 0xfffff));
    s.gdt.base = GDT;
    s.gdt.limit = 4 * 8 - 1;
    s.idt.base = IDT;
    s.idt.limit = 7;
    s.cr0 = 0x8000_0011; // PG | ET | PE
    s.cr3 = PML4;
    s.cr4 = 0x20; // PAE
    s.efer = 0x500; // LME | LMA
    s
}

pub fn regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rflags: 0x2,
        rsp: BOOT_STACK,
        rbp: BOOT_STACK,
        rsi: ZERO_PAGE,
        ..Default::default()
    }
}
