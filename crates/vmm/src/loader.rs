//! Recognising and loading godwit guest images. Linux kernels are loaded in arch::linux.

use crate::error::{Error, Result};
use crate::memory::{GuestMemory, RamRegion};
use godwit_guest::abi;
use linux_loader::elf::{Elf64_Ehdr, Elf64_Phdr};
use linux_loader::loader::{elf::Elf, KernelLoader};
use std::io::Cursor;
use vm_memory::GuestAddress;

const PT_NOTE: u32 = 4;

fn read<T: Copy + Default>(b: &[u8], off: usize) -> Option<T> {
    let size = std::mem::size_of::<T>();
    let bytes = b.get(off..off.checked_add(size)?)?;
    let mut v = T::default();
    // SAFETY: T is a plain-old-data ELF header struct (no invalid bit patterns) and
    // `bytes` holds exactly size_of::<T>() bytes.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), &mut v as *mut T as *mut u8, size) };
    Some(v)
}

/// True if `image` is an ELF carrying the godwit guest note. Any malformed input is
/// simply "not a godwit guest"; the real loader then says what is wrong with it.
pub fn is_godwit_guest(image: &[u8]) -> bool {
    let Some(eh) = read::<Elf64_Ehdr>(image, 0) else {
        return false;
    };
    if eh.e_ident[..4] != *b"\x7fELF"
        || eh.e_phentsize as usize != std::mem::size_of::<Elf64_Phdr>()
    {
        return false;
    }
    (0..eh.e_phnum as usize).any(|i| {
        let Some(ph) = read::<Elf64_Phdr>(image, eh.e_phoff as usize + i * eh.e_phentsize as usize)
        else {
            return false;
        };
        if ph.p_type != PT_NOTE {
            return false;
        }
        let (start, len) = (ph.p_offset as usize, ph.p_filesz as usize);
        let Some(notes) = start.checked_add(len).and_then(|end| image.get(start..end)) else {
            return false;
        };
        let mut at = 0;
        while at + 12 <= notes.len() {
            let w = |o: usize| {
                u32::from_le_bytes(notes[at + o..at + o + 4].try_into().unwrap()) as usize
            };
            let (namesz, descsz, ty) = (w(0), w(4), w(8) as u32);
            let name_end = at + 12 + namesz;
            if notes.get(at + 12..name_end) == Some(abi::NOTE_NAME) && ty == abi::NOTE_TYPE_ABI {
                return true;
            }
            at = name_end.next_multiple_of(4) + descsz.next_multiple_of(4);
        }
        false
    })
}

/// Loads a godwit guest image; returns (entry, end of the image).
pub fn load_guest(
    mem: &GuestMemory,
    ram: &[RamRegion],
    name: &str,
    image: &[u8],
) -> Result<(u64, u64)> {
    let bad = |m: String| Error::BadImage(name.to_string(), m);
    if !is_godwit_guest(image) {
        return Err(bad("not a godwit guest image (no godwit ELF note)".into()));
    }
    let r = Elf::load(
        mem,
        None,
        &mut Cursor::new(image),
        Some(GuestAddress(crate::arch::ring3::IMAGE_MIN)),
    )
    .map_err(|e| bad(format!("cannot load: {e}")))?;
    let end = r.kernel_end;
    if end > ram[0].end() {
        return Err(bad(format!("image ends at {end:#x}, beyond low guest RAM")));
    }
    Ok((r.kernel_load.0, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_built_in_images_and_rejects_others() {
        for name in godwit_guest::names() {
            assert!(
                is_godwit_guest(godwit_guest::image(name).unwrap()),
                "{name}"
            );
        }
        assert!(!is_godwit_guest(b""));
        assert!(!is_godwit_guest(b"\x7fELF"));
        assert!(!is_godwit_guest(&[0u8; 4096]));
        // Truncated at every length: never a panic.
        let img = godwit_guest::image("heartbeat").unwrap();
        for n in (0..4096).step_by(7) {
            let _ = is_godwit_guest(&img[..n]);
        }
    }

    #[test]
    fn loads_at_one_mib_and_refuses_garbage() {
        let mem = crate::memory::create(64 << 20).unwrap();
        let ram = crate::memory::layout(64 << 20);
        let (entry, end) = load_guest(
            &mem,
            &ram,
            "heartbeat",
            godwit_guest::image("heartbeat").unwrap(),
        )
        .unwrap();
        assert_eq!(entry, 0x100000);
        assert!(end > entry && end < 8 << 20);
        assert!(matches!(
            load_guest(&mem, &ram, "x", b"junk"),
            Err(Error::BadImage(..))
        ));
        // A godwit image whose headers are cut off.
        let img = godwit_guest::image("heartbeat").unwrap();
        assert!(load_guest(&mem, &ram, "cut", &img[..0x8000]).is_err());
    }
}
