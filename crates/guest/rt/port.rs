//! Port I/O from ring 3: allowed for the ports the TSS I/O bitmap opens.

pub fn outb(port: u16, v: u8) {
    // SAFETY: port I/O has no memory effects; the I/O bitmap decides what is allowed.
    unsafe { core::arch::asm!("out dx, al", in("dx") port, in("al") v, options(nostack, nomem)) }
}

pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: as above.
    unsafe { core::arch::asm!("in al, dx", in("dx") port, out("al") v, options(nostack, nomem)) }
    v
}

pub fn outl(port: u16, v: u32) {
    // SAFETY: as above.
    unsafe { core::arch::asm!("out dx, eax", in("dx") port, in("eax") v, options(nostack, nomem)) }
}

pub fn inl(port: u16) -> u32 {
    let v: u32;
    // SAFETY: as above.
    unsafe { core::arch::asm!("in eax, dx", in("dx") port, out("eax") v, options(nostack, nomem)) }
    v
}
