//! PAGES frames read straight into the memory they fill (a destination's pre-copy
//! bulk): the data goes from the socket to its page with no buffer between, which on
//! a host whose cores the guest and both ends of the migration share is a copy of
//! every page the receiving thread no longer makes.
//!
//! A frame's CRC over its head is checked before any page lands; one over all of it
//! once its pages are in place, and a frame that fails it ends the migration with the
//! error as any bad frame does (the pages it wrote are in a VM that has not run and
//! never will). A page that fails its own CRC (`PAGE_CRCS`) is torn or damaged: it is
//! left to `crate::damaged`, which a later copy mends. In post-copy, where the VM runs,
//! a component reads pages into place only where the guest cannot see them yet, and
//! maps them once `PageSource::verify` says the frame checked out; one that must place
//! each page whole from a buffer (UFFDIO_COPY) declines, and the frame is read into a
//! buffer as every other one is; a damaged page in it is not placed.

use crate::wire::{self, Header, PagesHead, WireError, PAGE_SIZE};
use godwit_vmm::migratable::{Component, PageSource};
use std::io::{self, Read};
use vm_memory::{ReadVolatile, VolatileSlice};

/// How the data of a frame read into place is checked.
enum Check<'h> {
    /// Every byte goes into the frame's CRC.
    Frame(crc32fast::Hasher),
    /// Each page against its own CRC (`PAGE_CRCS`), in the frame's order.
    Pages(&'h [u32]),
    /// Not here: the transport checks it (`HEAD_ONLY`).
    Transport,
}

/// The stream as the component reads its pages from it.
struct Source<'r, 'h, R> {
    r: &'r mut R,
    check: Check<'h>,
    addrs: &'h [u64],
    /// Pages filled so far (the component fills them in the frame's order).
    next: usize,
    /// Those that failed their own CRC, and the first one's CRC and the one it carried.
    bad: Vec<u64>,
    first_bad: Option<(u32, u32)>,
    /// The CRC the frame carries (`Check::Frame`).
    frame_crc: u32,
    /// What went wrong with the stream itself (the component sees only an I/O error).
    failed: Option<WireError>,
}

impl<R: ReadVolatile> PageSource for Source<'_, '_, R> {
    fn fill(&mut self, run: &mut VolatileSlice<'_>) -> io::Result<()> {
        let r = self.r.read_exact_volatile(run).map_err(|e| match e {
            vm_memory::VolatileMemoryError::IOError(e) => e,
            e => io::Error::other(e),
        });
        if let Err(e) = r {
            let kept = io::Error::new(e.kind(), e.to_string());
            self.failed = Some(wire::io_err(e));
            return Err(kept);
        }
        // What landed is read back where it is (still in cache) for the frame's CRC, or
        // for each page's own.
        let crcs = match &mut self.check {
            Check::Frame(crc) => {
                with_bytes(run, |b| crc.update(b));
                return Ok(());
            }
            Check::Transport => return Ok(()),
            Check::Pages(crcs) => *crcs,
        };
        let mut at = 0;
        while at < run.len() {
            let n = (run.len() - at).min(PAGE_SIZE);
            let page = run.subslice(at, n).map_err(io::Error::other)?;
            let i = self.next;
            let (Some(&want), Some(&addr)) = (crcs.get(i), self.addrs.get(i)) else {
                return Err(io::Error::other("more pages filled than the frame holds"));
            };
            let got = crc_in_place(&page);
            if got != want {
                self.bad.push(addr);
                self.first_bad.get_or_insert((got, want));
            }
            self.next += 1;
            at += n;
        }
        Ok(())
    }

    fn verify(&mut self) -> io::Result<()> {
        let bad = match &self.check {
            Check::Frame(crc) => {
                Some((crc.clone().finalize(), self.frame_crc)).filter(|(got, want)| got != want)
            }
            Check::Pages(_) => self.first_bad,
            Check::Transport => None,
        };
        let Some((got, want)) = bad else {
            return Ok(());
        };
        let e = WireError::BadCrc {
            kind: wire::Kind::Pages,
            got,
            want,
        };
        let kept = io::Error::other(e.to_string());
        self.failed = Some(e);
        Err(kept)
    }
}

/// The CRC32 of `s`, guest memory, read where it is.
pub fn crc_in_place(s: &VolatileSlice<'_>) -> u32 {
    with_bytes(s, crc32fast::hash)
}

/// `hash` over the bytes of `s`, guest memory, read where they are. The guest (on the
/// source) or another connection (a hostile source may send a page on two) may be
/// writing them meanwhile: what is read then is some mix of old and new, its CRC matches
/// neither, and the page is held as damaged until a whole copy lands (`crate::damaged`)
/// or the frame is refused; nothing else is taken from them. vm-memory's own copies
/// out of guest memory read it the same way (a plain `memcpy`).
fn with_bytes<T>(s: &VolatileSlice<'_>, hash: impl FnOnce(&[u8]) -> T) -> T {
    let g = s.ptr_guard();
    // SAFETY: `s` is `s.len()` bytes of a live mapping, which the guard keeps mapped
    // until it drops, after the hash: valid for reads, never written through the slice.
    // The slice lives only for the hash, which uses the bytes only to compute it, so a
    // byte that changes under it changes nothing but the result.
    let bytes = unsafe { std::slice::from_raw_parts(g.as_ptr(), s.len()) };
    hash(bytes)
}

/// A PAGES frame read: its section, its pages' addresses, and those of its pages that
/// failed their own CRC (`PAGE_CRCS`), placed or not (left to `crate::damaged`).
pub struct Landed {
    pub section: u32,
    pub addrs: Vec<u64>,
    pub bad: Vec<u64>,
}

/// Reads the rest of the PAGES frame whose header is `h` into component `c` (`buf` for
/// its head, and for its data where `c` cannot take them in place, or `in_place` says
/// not to offer them). `c` comes from the head's section through `section`.
pub fn read_pages<'p, R: Read + ReadVolatile>(
    r: &mut R,
    h: &Header,
    buf: &mut Vec<u8>,
    in_place: bool,
    section: impl FnOnce(u32) -> Result<(&'p dyn Component, &'p str), String>,
) -> Result<Landed, String> {
    let stream = |e: WireError| format!("migration stream: {e}");
    let head = wire::pages_head_len(h.len, h.checked).map_err(stream)?;
    let head_bytes = wire::room(buf, head);
    r.read_exact(head_bytes)
        .map_err(|e| stream(wire::io_err(e)))?;
    let mut crc = crc32fast::Hasher::new();
    crc.update(head_bytes);
    let frame_crc = match h.checked {
        wire::Checked::All => Some(crc),
        wire::Checked::Head | wire::Checked::Pages => {
            // Checked before any page lands: the addresses say where they go.
            h.matches(crc.finalize()).map_err(stream)?;
            None
        }
    };
    let PagesHead {
        section: s,
        addrs,
        crcs,
    } = wire::decode_pages_head(&buf[..head], h.checked).map_err(stream)?;
    let (c, name) = section(s)?;
    let check = match frame_crc {
        Some(crc) => Check::Frame(crc),
        None if crcs.is_empty() => Check::Transport,
        None => Check::Pages(&crcs),
    };
    let mut src = Source {
        r,
        check,
        addrs: &addrs,
        next: 0,
        bad: Vec::new(),
        first_bad: None,
        frame_crc: h.crc,
        failed: None,
    };
    let placed = if in_place {
        c.load_pages_from(&addrs, &mut src)
    } else {
        Ok(false)
    };
    let Source {
        r,
        check,
        mut bad,
        next,
        failed,
        ..
    } = src;
    if let Some(e) = failed {
        return Err(stream(e));
    }
    if placed.map_err(|e| format!("{name}: {e}"))? {
        match check {
            Check::Frame(crc) => h.matches(crc.finalize()).map_err(stream)?,
            Check::Pages(_) if next != addrs.len() => {
                return Err(format!("{name}: {next} of {} pages filled", addrs.len()))
            }
            _ => {}
        }
    } else {
        // Into the buffer, checked, and only the pages that are whole placed.
        r.read_exact(&mut wire::room(buf, h.len)[head..])
            .map_err(|e| stream(wire::io_err(e)))?;
        let data = &buf[head..h.len];
        if let Check::Frame(mut crc) = check {
            crc.update(data);
            h.matches(crc.finalize()).map_err(stream)?;
        }
        for ((&a, page), &want) in addrs.iter().zip(data.chunks_exact(PAGE_SIZE)).zip(&crcs) {
            if crc32fast::hash(page) != want {
                bad.push(a);
            }
        }
        let loaded = if bad.is_empty() {
            c.load_pages(&addrs, data)
        } else {
            let mut whole = (Vec::new(), Vec::new());
            for (&a, page) in addrs.iter().zip(data.chunks_exact(PAGE_SIZE)) {
                if !bad.contains(&a) {
                    whole.0.push(a);
                    whole.1.extend_from_slice(page);
                }
            }
            c.load_pages(&whole.0, &whole.1)
        };
        loaded.map_err(|e| format!("{name}: {e}"))?;
    }
    Ok(Landed {
        section: s,
        addrs,
        bad,
    })
}
