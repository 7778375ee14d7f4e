//! A snapshot's page index, written after its stream so that a restore can start the
//! VM before reading its memory: for each section with pages, a table with one entry
//! per page (the offset of the PAGES frame that holds its latest copy, or 0 for a page
//! that is zero or was never sent), the offsets of every other frame (HELLO, states,
//! data, COMPLETE), and a footer that finds them. Pre-copy rounds leave several copies
//! of a page in the stream; the table names the one that counts.
//!
//! File: `[stream: HELLO ... COMPLETE][tables][directory (JSON)][footer]`. Footer (32
//! bytes, little endian): magic "GDWI", version u32, directory offset u64, directory
//! length u32, CRC32 of the directory u32, stream length u64.
//!
//! The index is written by this godwit, but a file is hostile input like any other:
//! the directory is checked whole when opened, a table entry only when used (it must
//! name a PAGES frame of its section, inside the stream, whose CRC passes, that holds
//! the page). A restore therefore never places a page it has not checked.

use crate::wire::{self, Checked, Frame, Kind, Totals, WireError, HEADER_LEN, PAGE_SIZE};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

const MAGIC: u32 = u32::from_le_bytes(*b"GDWI");
const VERSION: u32 = 1;
const FOOTER_LEN: u64 = 32;
/// A directory larger than this is not one this godwit wrote.
const MAX_DIRECTORY: u32 = 64 << 20;
/// The highest page a table may cover (16 TiB of a component's space).
const MAX_TABLE_PAGES: u64 = 1 << 32;

/// One section's table.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Table {
    pub section: u32,
    /// Entries (pages from address 0 on); pages past the end are zero.
    pub pages: u64,
    /// Where the entries start in the file.
    pub at: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct Directory {
    stream_len: u64,
    /// Offsets of the frames that are neither PAGES nor ZERO, in stream order.
    control: Vec<u64>,
    tables: Vec<Table>,
    /// Pages and zero pages the stream carries, as COMPLETE counts them.
    totals: Totals,
}

fn bad(m: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, m.into())
}

/// Appends the index of the stream that fills `f` up to `stream_len` (written and
/// flushed by the caller), by reading the stream's frame headers back.
pub fn append(f: &File, stream_len: u64) -> io::Result<()> {
    let mut tables: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    let mut control = Vec::new();
    let mut totals = Totals::default();
    let mut at = 0u64;
    let mut h = [0u8; HEADER_LEN];
    let mut payload = Vec::new();
    while at < stream_len {
        f.read_exact_at(&mut h, at)?;
        let (kind, len) = wire::check_header(&h).map_err(|e| bad(e.to_string()))?;
        let body = at + HEADER_LEN as u64;
        match kind {
            Kind::Pages => {
                let mut head = [0u8; 8];
                f.read_exact_at(&mut head, body)?;
                let section = u32::from_le_bytes(head[..4].try_into().expect("4 bytes"));
                let n = u32::from_le_bytes(head[4..].try_into().expect("4 bytes")) as usize;
                payload.resize(8 * n, 0);
                f.read_exact_at(&mut payload, body + 8)?;
                let t = tables.entry(section).or_default();
                for a in payload.chunks_exact(8) {
                    let page =
                        u64::from_le_bytes(a.try_into().expect("8 bytes")) / PAGE_SIZE as u64;
                    if page >= MAX_TABLE_PAGES {
                        return Err(bad(format!("a page at {:#x}", page * PAGE_SIZE as u64)));
                    }
                    if t.len() as u64 <= page {
                        t.resize(page as usize + 1, 0);
                    }
                    t[page as usize] = at;
                }
                totals.pages += n as u64;
            }
            Kind::Zero => {
                payload.resize(len, 0);
                f.read_exact_at(&mut payload, body)?;
                let Frame::Zero { section, runs } =
                    wire::decode(kind, &payload).map_err(|e| bad(e.to_string()))?
                else {
                    unreachable!("a ZERO payload decodes as ZERO")
                };
                let t = tables.entry(section).or_default();
                for (a, n) in runs {
                    let first = a / PAGE_SIZE as u64;
                    for p in first..first.saturating_add(n as u64).min(t.len() as u64) {
                        t[p as usize] = 0;
                    }
                    totals.zero_pages += n as u64;
                }
            }
            _ => control.push(at),
        }
        at = body + len as u64;
    }
    if at != stream_len {
        return Err(bad("the stream's last frame runs past its end"));
    }
    let mut out = stream_len;
    let mut dir = Directory {
        stream_len,
        control,
        tables: Vec::new(),
        totals,
    };
    for (section, entries) in tables {
        let bytes: Vec<u8> = entries.iter().flat_map(|e| e.to_le_bytes()).collect();
        f.write_all_at(&bytes, out)?;
        dir.tables.push(Table {
            section,
            pages: entries.len() as u64,
            at: out,
        });
        out += bytes.len() as u64;
    }
    let json = serde_json::to_vec(&dir).expect("plain data serialises");
    f.write_all_at(&json, out)?;
    let mut footer = [0u8; FOOTER_LEN as usize];
    footer[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    footer[4..8].copy_from_slice(&VERSION.to_le_bytes());
    footer[8..16].copy_from_slice(&out.to_le_bytes());
    footer[16..20].copy_from_slice(&(json.len() as u32).to_le_bytes());
    footer[20..24].copy_from_slice(&crc32fast::hash(&json).to_le_bytes());
    footer[24..32].copy_from_slice(&stream_len.to_le_bytes());
    f.write_all_at(&footer, out + json.len() as u64)?;
    f.set_len(out + json.len() as u64 + FOOTER_LEN)
}

/// What a file's end says about an index.
pub enum Found {
    Index(Index),
    /// No footer: a snapshot written before indexes existed (or something else).
    None,
    /// A footer that does not fit the file: damaged, or bytes were added after it.
    Unfit(String),
}

/// An opened index: reads frames and table entries from the file on demand.
pub struct Index {
    f: File,
    dir: Directory,
}

impl Index {
    pub fn open(f: File) -> io::Result<Found> {
        let len = f.metadata()?.len();
        if len < FOOTER_LEN {
            return Ok(Found::None);
        }
        let mut footer = [0u8; FOOTER_LEN as usize];
        f.read_exact_at(&mut footer, len - FOOTER_LEN)?;
        let u32_at = |i: usize| u32::from_le_bytes(footer[i..i + 4].try_into().expect("4"));
        let u64_at = |i: usize| u64::from_le_bytes(footer[i..i + 8].try_into().expect("8"));
        if u32_at(0) != MAGIC {
            return Ok(Found::None);
        }
        if u32_at(4) != VERSION {
            return Ok(Found::Unfit(format!("index version {}", u32_at(4))));
        }
        let (dir_at, dir_len, crc, stream_len) = (u64_at(8), u32_at(16), u32_at(20), u64_at(24));
        if dir_len > MAX_DIRECTORY
            || dir_at.checked_add(dir_len as u64 + FOOTER_LEN) != Some(len)
            || stream_len > dir_at
        {
            return Ok(Found::Unfit(
                "the index's footer does not fit the file".into(),
            ));
        }
        let mut json = vec![0u8; dir_len as usize];
        f.read_exact_at(&mut json, dir_at)?;
        if crc32fast::hash(&json) != crc {
            return Ok(Found::Unfit("the index's directory is corrupt".into()));
        }
        let dir: Directory = match serde_json::from_slice(&json) {
            Ok(d) => d,
            Err(e) => return Ok(Found::Unfit(format!("the index's directory: {e}"))),
        };
        let fits = dir.stream_len == stream_len
            && dir.control.first() == Some(&0)
            && dir.control.windows(2).all(|w| w[0] < w[1])
            && dir.control.iter().all(|&c| c < stream_len)
            && dir.tables.iter().all(|t| {
                t.pages <= MAX_TABLE_PAGES
                    && t.at >= stream_len
                    && t.at.checked_add(8 * t.pages).is_some_and(|e| e <= dir_at)
            });
        if !fits {
            return Ok(Found::Unfit("the index does not fit its stream".into()));
        }
        Ok(Found::Index(Index { f, dir }))
    }

    /// Where the stream ends and the index begins.
    pub fn stream_len(&self) -> u64 {
        self.dir.stream_len
    }

    pub fn control(&self) -> &[u64] {
        &self.dir.control
    }

    pub fn tables(&self) -> &[Table] {
        &self.dir.tables
    }

    pub fn totals(&self) -> Totals {
        self.dir.totals
    }

    /// Entries `first..first + out.len()` of table `t` (0 past its end).
    pub fn entries(&self, t: &Table, first: u64, out: &mut [u64]) -> io::Result<()> {
        out.fill(0);
        if first >= t.pages {
            return Ok(());
        }
        let n = (out.len() as u64).min(t.pages - first) as usize;
        let mut b = vec![0u8; 8 * n];
        self.f.read_exact_at(&mut b, t.at + 8 * first)?;
        for (o, e) in out.iter_mut().zip(b.chunks_exact(8)) {
            *o = u64::from_le_bytes(e.try_into().expect("8 bytes"));
        }
        Ok(())
    }

    /// The whole frame at `at` in the stream, its CRC checked.
    pub fn frame_at<'b>(&self, at: u64, buf: &'b mut Vec<u8>) -> Result<Frame<'b>, WireError> {
        let head = self.header_at(at)?;
        let buf = wire::room(buf, head.len);
        self.f
            .read_exact_at(buf, at + HEADER_LEN as u64)
            .map_err(WireError::Io)?;
        head.check(buf)?;
        wire::decode_checked(head.kind, head.checked, buf)
    }

    /// The header of the frame at `at`, checked, and the frame inside the stream.
    fn header_at(&self, at: u64) -> Result<wire::Header, WireError> {
        let mut h = [0u8; HEADER_LEN];
        if at
            .checked_add(HEADER_LEN as u64)
            .is_none_or(|e| e > self.dir.stream_len)
        {
            return Err(WireError::Truncated);
        }
        self.f.read_exact_at(&mut h, at).map_err(WireError::Io)?;
        let head = wire::parse_header(&h)?;
        if at + (HEADER_LEN + head.len) as u64 > self.dir.stream_len {
            return Err(WireError::Truncated);
        }
        Ok(head)
    }

    /// The head of the PAGES frame at `at`, read and checked, where its pages carry a
    /// CRC each (snapshots since they do): their data stays in the file, for
    /// `read_pages` to read a page or a run of them alone. `None` for any other frame
    /// (read it whole with `frame_at`).
    pub fn pages_at(&self, at: u64) -> Result<Option<PagesAt>, WireError> {
        let head = self.header_at(at)?;
        if head.kind != Kind::Pages || head.checked != Checked::Pages {
            return Ok(None);
        }
        let len = wire::pages_head_len(head.len, head.checked)?;
        let mut b = vec![0u8; len];
        self.f
            .read_exact_at(&mut b, at + HEADER_LEN as u64)
            .map_err(WireError::Io)?;
        head.matches(crc32fast::hash(&b))?;
        let h = wire::decode_pages_head(&b, head.checked)?;
        Ok(Some(PagesAt {
            section: h.section,
            addrs: h.addrs,
            crcs: h.crcs,
            data_at: at + (HEADER_LEN + len) as u64,
        }))
    }

    /// Pages `pages` of `p` (indices into its `addrs`) read into `buf`, each checked
    /// against its CRC.
    pub fn read_pages<'b>(
        &self,
        p: &PagesAt,
        pages: std::ops::Range<usize>,
        buf: &'b mut Vec<u8>,
    ) -> Result<&'b [u8], WireError> {
        if pages.start > pages.end || pages.end > p.addrs.len() {
            return Err(WireError::Malformed(
                Kind::Pages,
                format!("pages {pages:?} of a frame of {}", p.addrs.len()),
            ));
        }
        let b = wire::room(buf, pages.len() * PAGE_SIZE);
        self.f
            .read_exact_at(b, p.data_at + (pages.start * PAGE_SIZE) as u64)
            .map_err(WireError::Io)?;
        for (page, &want) in b.chunks_exact(PAGE_SIZE).zip(&p.crcs[pages]) {
            let got = crc32fast::hash(page);
            if got != want {
                return Err(WireError::BadCrc {
                    kind: Kind::Pages,
                    got,
                    want,
                });
            }
        }
        Ok(b)
    }
}

/// A PAGES frame's head, checked, whose pages (each with its CRC) are still in the file.
#[derive(Debug)]
pub struct PagesAt {
    pub section: u32,
    pub addrs: Vec<u64>,
    crcs: Vec<u32>,
    /// Where its first page's data starts in the file.
    data_at: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn stream() -> Vec<u8> {
        let mut s = Vec::new();
        let page = |b: u8| vec![b; PAGE_SIZE];
        wire::write_frame(&mut s, &Frame::Sync(1)).unwrap();
        for (addrs, fill) in [(vec![0u64, 0x1000], 1u8), (vec![0x1000, 0x5000], 2)] {
            let data: Vec<u8> = addrs.iter().flat_map(|_| page(fill)).collect();
            wire::write_frame(
                &mut s,
                &Frame::Pages {
                    section: 0,
                    addrs,
                    data: &data,
                },
            )
            .unwrap();
        }
        wire::write_frame(
            &mut s,
            &Frame::Zero {
                section: 0,
                runs: vec![(0x5000, 1)],
            },
        )
        .unwrap();
        wire::write_frame(
            &mut s,
            &Frame::Complete(Totals {
                pages: 4,
                zero_pages: 1,
                data: 0,
            }),
        )
        .unwrap();
        s
    }

    fn file_with(bytes: &[u8]) -> (tempfile_path::Path, File) {
        let p = tempfile_path::Path::new();
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p.0)
            .unwrap();
        f.write_all(bytes).unwrap();
        (p, f)
    }

    mod tempfile_path {
        pub struct Path(pub std::path::PathBuf);
        impl Path {
            pub fn new() -> Path {
                use std::sync::atomic::{AtomicU32, Ordering};
                static N: AtomicU32 = AtomicU32::new(0);
                Path(std::env::temp_dir().join(format!(
                    "godwit-index-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::SeqCst)
                )))
            }
        }
        impl Drop for Path {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    #[test]
    fn the_index_names_each_pages_latest_copy() {
        let s = stream();
        let (p, f) = file_with(&s);
        append(&f, s.len() as u64).unwrap();
        let Found::Index(ix) = Index::open(File::open(&p.0).unwrap()).unwrap() else {
            panic!("no index")
        };
        assert_eq!(ix.stream_len(), s.len() as u64);
        assert_eq!(ix.control().len(), 2, "SYNC and COMPLETE");
        assert_eq!(ix.totals().pages, 4);
        let t = ix.tables()[0].clone();
        let mut e = [9u64; 8];
        ix.entries(&t, 0, &mut e).unwrap();
        // Page 0 from the first frame, page 1 from the second, page 5 zeroed after.
        let mut buf = Vec::new();
        let Frame::Pages { data, .. } = ix.frame_at(e[0], &mut buf).unwrap() else {
            panic!()
        };
        assert_eq!(data[0], 1);
        let Frame::Pages { data, .. } = ix.frame_at(e[1], &mut buf).unwrap() else {
            panic!()
        };
        assert_eq!(data[0], 2);
        assert_eq!(&e[2..], &[0; 6]);
        // An entry that does not name a frame start is an error, never a page.
        assert!(ix.frame_at(e[1] + 8, &mut buf).is_err());
        assert!(ix.frame_at(s.len() as u64 - 4, &mut buf).is_err());
    }

    /// A frame whose pages carry their own CRCs (as a snapshot's do): its head says
    /// which pages it holds, each page is read and checked by itself, and damage to
    /// one page fails that page alone (and the frame read whole).
    #[test]
    fn a_page_with_its_own_crc_is_read_and_checked_alone() {
        let mut s = Vec::new();
        wire::write_frame(&mut s, &Frame::Sync(1)).unwrap();
        let at = s.len();
        let mut f = wire::PagesFrame::new();
        for (i, a) in [0x3000u64, 0x4000, 0x9000].into_iter().enumerate() {
            f.next_slot().fill(i as u8 + 1);
            f.commit(a);
        }
        let (b, r) = f.take(Vec::new(), Checked::Pages).unwrap();
        s.extend_from_slice(&b[r]);
        let totals = Totals {
            pages: 3,
            zero_pages: 0,
            data: 0,
        };
        wire::write_frame(&mut s, &Frame::Complete(totals)).unwrap();
        let open = |s: &[u8]| {
            let (p, f) = file_with(s);
            append(&f, s.len() as u64).unwrap();
            let Found::Index(ix) = Index::open(File::open(&p.0).unwrap()).unwrap() else {
                panic!("no index")
            };
            (p, ix)
        };
        let (_p, ix) = open(&s);
        let mut b = Vec::new();
        let p = ix.pages_at(at as u64).unwrap().expect("pages with CRCs");
        assert_eq!(p.addrs, [0x3000, 0x4000, 0x9000]);
        assert_eq!(
            ix.read_pages(&p, 1..2, &mut b).unwrap(),
            &[2u8; PAGE_SIZE][..]
        );
        let all = ix.read_pages(&p, 0..3, &mut b).unwrap();
        assert_eq!((all[0], all[PAGE_SIZE], all[3 * PAGE_SIZE - 1]), (1, 2, 3));
        assert!(ix.read_pages(&p, 2..4, &mut b).is_err());
        let Frame::Pages { addrs, data, .. } = ix.frame_at(at as u64, &mut b).unwrap() else {
            panic!("not read whole")
        };
        assert_eq!((addrs.len(), data[2 * PAGE_SIZE]), (3, 3));
        // Any other frame is read whole.
        assert!(ix.pages_at(0).unwrap().is_none());
        // The third page damaged: it fails; the first two still read.
        let data_at = at + HEADER_LEN + 8 + 12 * 3;
        let mut d = s.clone();
        d[data_at + 2 * PAGE_SIZE + 7] ^= 1;
        let (_q, ix) = open(&d);
        let p = ix.pages_at(at as u64).unwrap().unwrap();
        assert!(matches!(
            ix.read_pages(&p, 2..3, &mut b),
            Err(WireError::BadCrc { .. })
        ));
        assert!(ix.read_pages(&p, 0..2, &mut b).is_ok());
        assert!(ix.frame_at(at as u64, &mut b).is_err());
        // A damaged CRC in the head: no page of the frame is read.
        let mut d = s.clone();
        d[at + HEADER_LEN + 8 + 24 + 1] ^= 1;
        let (_r, ix) = open(&d);
        assert!(matches!(
            ix.pages_at(at as u64),
            Err(WireError::BadCrc { .. })
        ));
    }

    /// The fuzzer's seeds (written by hand, as a snapshot of two rounds; and the same
    /// with a CRC of each page) are indexes this reader takes: fuzzing starts from
    /// inside the format, not at its door.
    #[test]
    fn the_fuzz_seed_is_an_index() {
        let seed = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../fuzz/corpus/snapshot_index/two_rounds"
        );
        let Found::Index(ix) = Index::open(File::open(seed).unwrap()).unwrap() else {
            panic!("the seed is not an index")
        };
        let t = ix.tables()[0].clone();
        let mut e = [0u64; 6];
        ix.entries(&t, 0, &mut e).unwrap();
        let mut buf = Vec::new();
        assert!(matches!(
            ix.frame_at(e[1], &mut buf),
            Ok(Frame::Pages { .. })
        ));
        assert_eq!(e[5], 0);
        // Its twin whose pages carry a CRC each, as snapshots do since.
        let seed = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../fuzz/corpus/snapshot_index/two_rounds_page_crcs"
        );
        let Found::Index(ix) = Index::open(File::open(seed).unwrap()).unwrap() else {
            panic!("the seed is not an index")
        };
        let mut e2 = [0u64; 6];
        ix.entries(&ix.tables()[0].clone(), 0, &mut e2).unwrap();
        assert_eq!(e2.map(|a| a == 0), e.map(|a| a == 0));
        for at in e2.into_iter().filter(|&a| a != 0) {
            let p = ix.pages_at(at).unwrap().expect("pages with CRCs");
            assert!(ix.read_pages(&p, 0..p.addrs.len(), &mut buf).is_ok());
        }
    }

    #[test]
    fn a_footer_that_does_not_fit_is_not_taken() {
        let s = stream();
        let (p, f) = file_with(&s);
        assert!(matches!(
            Index::open(f.try_clone().unwrap()).unwrap(),
            Found::None
        ));
        append(&f, s.len() as u64).unwrap();
        let whole = std::fs::read(&p.0).unwrap();
        // Twice over, and a flipped directory byte.
        let (q, g) = file_with(&[&whole[..], &whole[..]].concat());
        assert!(matches!(Index::open(g).unwrap(), Found::Unfit(_)));
        drop(q);
        let mut bad = whole.clone();
        let n = bad.len();
        bad[n - 40] ^= 1;
        let (_r, h) = file_with(&bad);
        assert!(matches!(Index::open(h).unwrap(), Found::Unfit(_)));
        drop(p);
    }
}
