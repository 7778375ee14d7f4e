//! PAGES frames: a page's address and data, many to a frame. Built in one buffer
//! (`PagesFrame`) or as a head whose pages go apart, straight from memory
//! (`pages_head`); read in two parts, head then data (`pages_head_len`,
//! `decode_pages_head`), so that the data can go straight into place.

use super::{
    header, header_with, u32_at, u64_at, Checked, Kind, WireError, HEADER_LEN, PAGES_PER_FRAME,
    PAGE_SIZE,
};
use std::io::{self, Write};

/// The header and head of a PAGES frame of `section` whose data (a page for each of
/// `addrs`) goes apart, straight from memory (`Stream::write_pages`): its CRC covers
/// the head, which carries `crcs` (one per page: `PAGE_CRCS`) if given (else
/// `HEAD_ONLY`).
pub fn pages_head(section: u32, addrs: &[u64], crcs: Option<&[u32]>) -> Vec<u8> {
    debug_assert!(crcs.is_none_or(|c| c.len() == addrs.len()));
    let checked = match crcs {
        Some(_) => Checked::Pages,
        None => Checked::Head,
    };
    let mut p = Vec::with_capacity(HEADER_LEN + 8 + checked.head_per_page() * addrs.len());
    p.extend_from_slice(&[0; HEADER_LEN]);
    p.extend_from_slice(&section.to_le_bytes());
    p.extend_from_slice(&(addrs.len() as u32).to_le_bytes());
    for a in addrs {
        p.extend_from_slice(&a.to_le_bytes());
    }
    for c in crcs.unwrap_or_default() {
        p.extend_from_slice(&c.to_le_bytes());
    }
    let len = p.len() - HEADER_LEN + addrs.len() * PAGE_SIZE;
    let h = header_with(
        Kind::Pages,
        checked.flags(),
        len,
        crc32fast::hash(&p[HEADER_LEN..]),
    );
    p[..HEADER_LEN].copy_from_slice(&h);
    p
}

/// The length on the wire of a PAGES frame of `pages` pages whose head is laid out as
/// `checked` says.
pub fn pages_frame_len(pages: usize, checked: Checked) -> usize {
    HEADER_LEN + 8 + pages * (checked.head_per_page() + PAGE_SIZE)
}

/// Builds a PAGES frame of one section in one buffer: header, section, count,
/// addresses, then data, so that it goes out in a single write.
pub struct PagesFrame {
    buf: Vec<u8>,
    count: usize,
    section: u32,
}

impl Default for PagesFrame {
    fn default() -> Self {
        Self::new()
    }
}

impl PagesFrame {
    const ADDRS: usize = HEADER_LEN + 8;
    /// Room for the longest head: an address and a CRC for each page.
    const DATA: usize = Self::ADDRS + 12 * PAGES_PER_FRAME;
    pub const BUFFER: usize = Self::DATA + PAGES_PER_FRAME * PAGE_SIZE;

    pub fn new() -> Self {
        Self::with_buffer(vec![0u8; Self::BUFFER])
    }

    /// A frame built in `buf` (grown to `BUFFER` bytes if shorter).
    pub fn with_buffer(mut buf: Vec<u8>) -> Self {
        if buf.len() < Self::BUFFER {
            buf.resize(Self::BUFFER, 0);
        }
        PagesFrame {
            buf,
            count: 0,
            section: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn is_full(&self) -> bool {
        self.count == PAGES_PER_FRAME
    }

    /// The section of the pages in the frame.
    pub fn section(&self) -> u32 {
        self.section
    }

    /// Starts the frame over for pages of `section` (the frame must be empty).
    pub fn set_section(&mut self, section: u32) {
        debug_assert!(self.is_empty());
        self.section = section;
    }

    /// The slot for the next page's data; `commit` keeps it, anything else reuses it.
    pub fn next_slot(&mut self) -> &mut [u8] {
        let at = Self::DATA + self.count * PAGE_SIZE;
        &mut self.buf[at..at + PAGE_SIZE]
    }

    pub fn commit(&mut self, addr: u64) {
        let at = Self::ADDRS + 8 * self.count;
        self.buf[at..at + 8].copy_from_slice(&addr.to_le_bytes());
        self.count += 1;
    }

    /// Completes the frame in place (its head packed against the data) and hands out
    /// its buffer and the range to write, leaving `next` (a spare buffer) in its place.
    /// `Checked::Pages` puts a CRC of each page in the head, so that a reader can check
    /// one page without reading the others (a lazy restore's touch).
    pub fn take(
        &mut self,
        next: Vec<u8>,
        checked: Checked,
    ) -> Option<(Vec<u8>, std::ops::Range<usize>)> {
        let n = self.count;
        if n == 0 {
            return None;
        }
        let end = Self::DATA + n * PAGE_SIZE;
        if checked == Checked::Pages {
            // After the addresses, where the unused address slots were.
            let crcs_at = Self::ADDRS + 8 * n;
            for k in 0..n {
                let data = Self::DATA + k * PAGE_SIZE;
                let crc = crc32fast::hash(&self.buf[data..data + PAGE_SIZE]);
                self.buf[crcs_at + 4 * k..crcs_at + 4 * k + 4].copy_from_slice(&crc.to_le_bytes());
            }
        }
        // Close the gap between the head and the data.
        let head_end = Self::ADDRS + checked.head_per_page() * n;
        let start = Self::DATA - head_end;
        self.buf
            .copy_within(Self::ADDRS..head_end, start + Self::ADDRS);
        let payload_start = start + HEADER_LEN;
        self.buf[payload_start..payload_start + 4].copy_from_slice(&self.section.to_le_bytes());
        self.buf[payload_start + 4..payload_start + 8].copy_from_slice(&(n as u32).to_le_bytes());
        let h = match checked {
            // Copied, its pages cannot tear: a CRC over all of it is as good as one per
            // page, where nobody reads a page alone.
            Checked::All => header(Kind::Pages, &self.buf[payload_start..end]),
            Checked::Head | Checked::Pages => header_with(
                Kind::Pages,
                checked.flags(),
                end - payload_start,
                crc32fast::hash(&self.buf[payload_start..Self::DATA]),
            ),
        };
        self.buf[start..payload_start].copy_from_slice(&h);
        self.count = 0;
        let mut next = next;
        if next.len() < Self::BUFFER {
            next.resize(Self::BUFFER, 0);
        }
        Some((std::mem::replace(&mut self.buf, next), start..end))
    }

    /// Writes the frame and empties it; returns the bytes written.
    pub fn flush(&mut self, w: &mut impl Write) -> io::Result<usize> {
        match self.take(Vec::new(), Checked::All) {
            None => Ok(0),
            Some((buf, r)) => {
                w.write_all(&buf[r.clone()])?;
                self.buf = buf;
                Ok(r.len())
            }
        }
    }
}

/// A PAGES frame's head: its section, its pages' addresses, and their CRCs where the
/// frame carries them (`Checked::Pages`; else empty).
#[derive(Debug, PartialEq, Eq)]
pub struct PagesHead {
    pub section: u32,
    pub addrs: Vec<u64>,
    pub crcs: Vec<u32>,
}

/// A PAGES frame's payload up to its data: its length for a frame of `len` bytes laid
/// out as `checked` says, so that the data can be read apart (straight into place,
/// `crate::inplace`).
pub fn pages_head_len(len: usize, checked: Checked) -> Result<usize, WireError> {
    let per = checked.head_per_page();
    let n = len.saturating_sub(8) / (per + PAGE_SIZE);
    if len < 8 || 8 + n * (per + PAGE_SIZE) != len || n == 0 || n > PAGES_PER_FRAME {
        return Err(WireError::Malformed(
            Kind::Pages,
            format!("{len} bytes are not 1 to {PAGES_PER_FRAME} pages"),
        ));
    }
    Ok(8 + per * n)
}

/// A PAGES frame's head (`pages_head_len` bytes) laid out as `checked` says.
pub fn decode_pages_head(p: &[u8], checked: Checked) -> Result<PagesHead, WireError> {
    let per = checked.head_per_page();
    let n = (p.len().saturating_sub(8)) / per;
    if p.len() < 8 || p.len() != 8 + per * n || u32_at(p, 4) as usize != n {
        return Err(WireError::Malformed(
            Kind::Pages,
            "the page count does not match the frame's length".into(),
        ));
    }
    let crcs_at = 8 + 8 * n;
    Ok(PagesHead {
        section: u32_at(p, 0),
        addrs: (0..n).map(|i| u64_at(p, 8 + 8 * i)).collect(),
        crcs: match checked {
            Checked::Pages => (0..n).map(|i| u32_at(p, crcs_at + 4 * i)).collect(),
            _ => Vec::new(),
        },
    })
}
