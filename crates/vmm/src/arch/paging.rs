//! Identity page tables with 2 MiB pages, written into guest memory.

use crate::error::{Error, Result};
use crate::memory::{GuestMemory, GIB};
use vm_memory::{Bytes, GuestAddress};

const PRESENT: u64 = 1;
const WRITABLE: u64 = 2;
const USER: u64 = 4;
const HUGE: u64 = 0x80;

/// Maps [0, `bytes`) 1:1 (rounded up to GiB). PML4 at `pml4`, PDPT on the next page, then
/// one PD page per GiB. `user` makes every level user-accessible (godwit's ring-3 guests).
/// Returns the first byte after the tables.
pub fn identity_map(mem: &GuestMemory, pml4: u64, bytes: u64, user: bool) -> Result<u64> {
    let gibs = bytes.div_ceil(GIB);
    if gibs > 512 {
        return Err(Error::Config("identity map larger than 512 GiB".into()));
    }
    let flags = PRESENT | WRITABLE | if user { USER } else { 0 };
    let pdpt = pml4 + 0x1000;
    let pd0 = pdpt + 0x1000;
    let write = |addr: u64, v: u64| {
        mem.write_obj(v, GuestAddress(addr))
            .map_err(|e| Error::Memory(format!("page tables at {addr:#x}: {e}")))
    };
    write(pml4, pdpt | flags)?;
    for g in 0..gibs {
        let pd = pd0 + g * 0x1000;
        write(pdpt + g * 8, pd | flags)?;
        let mut page = [0u8; 4096];
        for (i, e) in page.chunks_exact_mut(8).enumerate() {
            let v = (g * GIB + ((i as u64) << 21)) | flags | HUGE;
            e.copy_from_slice(&v.to_le_bytes());
        }
        mem.write_slice(&page, GuestAddress(pd))
            .map_err(|e| Error::Memory(format!("page tables at {pd:#x}: {e}")))?;
    }
    Ok(pd0 + gibs * 0x1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_every_2mib_page_to_itself() {
        let mem = crate::memory::create(64 << 20).unwrap();
        let end = identity_map(&mem, 0x5000, 5 * GIB, true).unwrap();
        assert_eq!(end, 0x7000 + 5 * 0x1000);
        let r = |a: u64| mem.read_obj::<u64>(GuestAddress(a)).unwrap();
        assert_eq!(r(0x5000), 0x6000 | 7);
        // Walk 0x1_2345_6789 (GiB 4, 2 MiB page 145).
        let va: u64 = 0x1_2345_6789;
        let pdpte = r(0x6000 + (va >> 30) * 8);
        let pde = r((pdpte & !0xfff) + ((va >> 21) & 0x1ff) * 8);
        assert_eq!(pde & HUGE, HUGE);
        assert_eq!(pde & USER, USER);
        assert_eq!((pde & !0x1f_ffff) | (va & 0x1f_ffff), va);
        // Kernel-only tables for Linux.
        identity_map(&mem, 0x9000, GIB, false).unwrap();
        assert_eq!(r(0x9000) & USER, 0);
    }
}
