//! PAGES frames read straight into the memory they fill (a destination's pre-copy
//! bulk): the data goes from the socket to its page with no buffer between, which on
//! a host whose cores the guest and both ends of the migration share is a copy of
//! every page the receiving thread no longer makes.
//!
//! The frame's CRC is checked once its pages are in place (a CRC over the head only was
//! checked before any page was read). A frame that fails it ends
//! the migration with the error as any bad frame does; the pages it wrote are in a VM
//! that has not run and never will. A component that must place each page whole
//! (post-copy) declines, and the frame is read into a buffer as every other one is.

use crate::wire::{self, Header, WireError};
use godwit_vmm::migratable::{Component, PageSource};
use std::io::{self, Read};
use vm_memory::{ReadVolatile, VolatileSlice};

/// The stream as the component reads its pages from it: every byte goes into the
/// frame's CRC (None: it covers the head only).
struct Source<'r, R> {
    r: &'r mut R,
    crc: Option<crc32fast::Hasher>,
    /// What went wrong with the stream itself (the component sees only an I/O error).
    failed: Option<WireError>,
}

impl<R: ReadVolatile> PageSource for Source<'_, R> {
    fn fill(&mut self, page: &mut VolatileSlice<'_>) -> io::Result<()> {
        let r = self.r.read_exact_volatile(page).map_err(|e| match e {
            vm_memory::VolatileMemoryError::IOError(e) => e,
            e => io::Error::other(e),
        });
        if let Err(e) = r {
            let kept = io::Error::new(e.kind(), e.to_string());
            self.failed = Some(wire::io_err(e));
            return Err(kept);
        }
        let Some(crc) = &mut self.crc else {
            return Ok(());
        };
        // The CRC over what landed, read back through a small buffer still in cache: a
        // plain slice over the memory would be unsound should another connection write
        // the same page meanwhile (a hostile source can send it on two).
        let mut tmp = [0u8; 4096];
        let mut at = 0;
        while at < page.len() {
            let n = (page.len() - at).min(tmp.len());
            let part = page.subslice(at, n).map_err(io::Error::other)?;
            part.copy_to(&mut tmp[..n]);
            crc.update(&tmp[..n]);
            at += n;
        }
        Ok(())
    }
}

/// Reads the rest of the PAGES frame whose header is `h` into component `c` (`buf` for
/// its head, and for its data where `c` cannot take them in place); returns the pages.
/// `c` comes from the head's section through `section`.
pub fn read_pages<'p, R: Read + ReadVolatile>(
    r: &mut R,
    h: &Header,
    buf: &mut Vec<u8>,
    section: impl FnOnce(u32) -> Result<(&'p dyn Component, &'p str), String>,
) -> Result<u64, String> {
    let stream = |e: WireError| format!("migration stream: {e}");
    let head = wire::pages_head_len(h.len).map_err(stream)?;
    buf.resize(head, 0);
    r.read_exact(buf).map_err(|e| stream(wire::io_err(e)))?;
    let mut crc = crc32fast::Hasher::new();
    crc.update(buf);
    let crc = match h.checked {
        wire::Checked::All => Some(crc),
        wire::Checked::Head => {
            // Checked before any page lands: the addresses say where they go.
            h.matches(crc.finalize()).map_err(stream)?;
            None
        }
    };
    let (s, addrs) = wire::decode_pages_head(buf).map_err(stream)?;
    let (c, name) = section(s)?;
    let mut src = Source {
        r,
        crc,
        failed: None,
    };
    let placed = c.load_pages_from(&addrs, &mut src);
    let Source { r, mut crc, failed } = src;
    if let Some(e) = failed {
        return Err(stream(e));
    }
    let placed = placed.map_err(|e| format!("{name}: {e}"))?;
    let data = h.len - head;
    if !placed {
        buf.resize(head + data, 0);
        r.read_exact(&mut buf[head..])
            .map_err(|e| stream(wire::io_err(e)))?;
        if let Some(crc) = &mut crc {
            crc.update(&buf[head..]);
        }
    }
    if let Some(crc) = crc {
        h.matches(crc.finalize()).map_err(stream)?;
    }
    if !placed {
        c.load_pages(&addrs, &buf[head..])
            .map_err(|e| format!("{name}: {e}"))?;
    }
    Ok(addrs.len() as u64)
}
