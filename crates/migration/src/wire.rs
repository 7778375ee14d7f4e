//! The migration stream's wire format: frames, each a fixed 16-byte header and a payload
//! protected by a CRC32. Everything read from the network is hostile: every length,
//! count and kind is checked here before anything uses it, and a bad frame is an error,
//! never a panic or an allocation the sender chose.
//!
//! Header (little endian): magic u32 "GDWM", kind u8, flags u8, 2 reserved bytes
//! (zero), payload length u32, CRC32 (IEEE) of the payload u32. Two flags, PAGES frames
//! only, at most one set. `HEAD_ONLY` (version 6 on): the CRC covers the frame's head
//! (section, count, addresses) and not its page data, which is left to the transport's
//! own checks (`PageChecks::Transport`: TCP's checksum, TLS's AEAD, as QEMU's stream
//! does). `PAGE_CRCS` (version 7 on): the head also carries each page's own CRC32
//! after the addresses, and the frame's CRC covers the head. Either way the source
//! sends the pages straight from guest memory (`Stream::write_pages`), so a page the
//! guest writes meanwhile may arrive torn: it is sent again (the write made it dirty).
//! With `PAGE_CRCS` a destination reading pages into place keeps a page that fails its
//! own CRC as damaged until a later copy of it passes, and refuses to run a VM that
//! still has one (`crate::damaged`): every byte is still checked end to end. Frames
//! built in a buffer (other lanes, TLS, snapshot files) carry a CRC of every byte.
//!
//! A stream: the source sends HELLO (the VM's sections: each migrating component, its
//! data version and what the destination needs); the destination answers ACCEPT (with,
//! where the source asks, why post-copy cannot come there if it cannot) or REFUSE.
//! Extra data connections open with JOIN. Then PAGES and ZERO frames, each for one
//! section (pre-copy rounds); at switchover one STATE frame per section on the main
//! connection, the last pages, END on every data connection and COMPLETE on the main
//! one. A component that streams opaque bytes (as a VFIO device does) sends DATA frames
//! on the main connection, in order, whenever it has some. Each pre-copy round ends
//! with SYNC on every connection, which the destination answers with SYNCED once it has
//! taken in everything before it: the source stops the VM only with nothing of the
//! rounds still in flight. The destination answers READY once it holds and has loaded everything; the
//! source then gives the VM up with GO, and the destination answers STARTED once the VM
//! runs. ABORT (either way, at any time: the main connection is two-way) ends a
//! migration with a reason. A snapshot file is the same stream without the answers.

pub use crate::lacks::Lacks;
pub use pages::{
    decode_pages_head, pages_frame_len, pages_head, pages_head_len, PagesFrame, PagesHead,
};
use serde::{Deserialize, Serialize};
use std::io::{self, Read, Write};

pub const MAGIC: u32 = u32::from_le_bytes(*b"GDWM");
/// Bumped on any incompatible change. A destination takes streams from
/// `OLDEST_WIRE_VERSION` on (a snapshot file outlives the godwit that wrote it); a
/// source speaks only this one, so an older destination refuses a newer source.
pub const WIRE_VERSION: u32 = 7;
/// Version 4 said what a post-copy section lacks only as bitmaps (POSTCOPY); 5 adds
/// LACKS, which may say it as runs; 6 the `HEAD_ONLY` flag; 7 `PAGE_CRCS`.
pub const OLDEST_WIRE_VERSION: u32 = 4;
pub const HEADER_LEN: usize = 16;
/// Header flag (byte 5) of a PAGES frame: its CRC covers its head, not its data.
pub const HEAD_ONLY: u8 = 1;
/// Header flag (byte 5) of a PAGES frame: its head carries a CRC32 of each page, and
/// its CRC covers the head.
pub const PAGE_CRCS: u8 = 2;
pub const PAGE_SIZE: usize = 4096;
/// Pages carried by one PAGES frame.
pub const PAGES_PER_FRAME: usize = 64;
/// The largest payload a receiver accepts (a VM state image is far smaller).
pub const MAX_PAYLOAD: usize = 8 << 20;
/// The most zero runs one ZERO frame may carry.
pub const MAX_ZERO_RUNS: usize = 65536;
/// The most pages one post-copy REQUEST may ask for.
pub const MAX_REQUEST: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Hello = 1,
    Accept = 2,
    Refuse = 3,
    Join = 4,
    Pages = 5,
    Zero = 6,
    End = 7,
    State = 8,
    Complete = 9,
    Ready = 10,
    Go = 11,
    Started = 12,
    Abort = 13,
    Data = 14,
    Sync = 15,
    Synced = 16,
    Postcopy = 17,
    Request = 18,
    Done = 19,
    Resume = 20,
    Resumed = 21,
    Ahead = 22,
    Lacks = 23,
    Released = 24,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        use Kind::*;
        Some(match b {
            1 => Hello,
            2 => Accept,
            3 => Refuse,
            4 => Join,
            5 => Pages,
            6 => Zero,
            7 => End,
            8 => State,
            9 => Complete,
            10 => Ready,
            11 => Go,
            12 => Started,
            13 => Abort,
            14 => Data,
            15 => Sync,
            16 => Synced,
            17 => Postcopy,
            18 => Request,
            19 => Done,
            20 => Resume,
            21 => Resumed,
            22 => Ahead,
            23 => Lacks,
            24 => Released,
            _ => return None,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connection closed")]
    Closed,
    #[error("stream truncated inside a frame")]
    Truncated,
    #[error("timed out waiting for the peer")]
    Timeout,
    #[error("I/O: {0}")]
    Io(#[source] io::Error),
    #[error("not a godwit migration stream (bad magic {0:#010x})")]
    BadMagic(u32),
    #[error("unknown frame kind {0}")]
    BadKind(u8),
    #[error("frame of {0} bytes is larger than the {MAX_PAYLOAD}-byte limit")]
    TooLarge(u32),
    #[error("{kind:?} frame is corrupt: CRC {got:#010x}, expected {want:#010x}")]
    BadCrc { kind: Kind, got: u32, want: u32 },
    #[error("malformed {0:?} frame: {1}")]
    Malformed(Kind, String),
}

pub(crate) fn io_err(e: io::Error) -> WireError {
    match e.kind() {
        io::ErrorKind::UnexpectedEof => WireError::Truncated,
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => WireError::Timeout,
        _ => WireError::Io(e),
    }
}

/// A reader whose read timeout says "nothing yet" between frames only: once a frame
/// has begun, a timeout waits on while `go_on` says so. A slow or lossy link (TCP's
/// retransmissions back off to seconds) can stall one frame for longer than the
/// timeout, and a frame given up halfway would lose the stream's frame boundaries.
/// One frame's reads, a new one for each frame: `read_frame` through it says `Timeout`
/// only when no byte of the frame came in time; inside the frame it waits on while
/// `go_on()` holds, and fails with `Io` when it no longer does.
pub struct Between<'r, R, F> {
    r: &'r mut R,
    started: bool,
    go_on: F,
}

impl<'r, R, F: FnMut() -> bool> Between<'r, R, F> {
    pub fn new(r: &'r mut R, go_on: F) -> Self {
        Between {
            r,
            started: false,
            go_on,
        }
    }

    /// The reader underneath.
    pub fn get_ref(&self) -> &R {
        self.r
    }

    /// Whether a read that failed with `kind` waits on: inside a frame, a timeout does
    /// while `go_on` says so.
    fn waits_on(&mut self, kind: io::ErrorKind) -> io::Result<bool> {
        if !self.started || !matches!(kind, io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) {
            return Ok(false);
        }
        if !(self.go_on)() {
            // Not `Timeout`: the stream is cut inside a frame.
            return Err(io::Error::other("a frame began but did not finish"));
        }
        Ok(true)
    }
}

impl<R: Read, F: FnMut() -> bool> Read for Between<'_, R, F> {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.r.read(b) {
                Ok(n) => {
                    self.started |= n > 0;
                    return Ok(n);
                }
                Err(e) if self.waits_on(e.kind())? => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// Pages read into place (`crate::inplace`) wait on inside a frame the same way.
impl<R: vm_memory::ReadVolatile, F: FnMut() -> bool> vm_memory::ReadVolatile for Between<'_, R, F> {
    fn read_volatile<B: vm_memory::bitmap::BitmapSlice>(
        &mut self,
        b: &mut vm_memory::VolatileSlice<B>,
    ) -> Result<usize, vm_memory::VolatileMemoryError> {
        use vm_memory::VolatileMemoryError::IOError;
        loop {
            match self.r.read_volatile(b) {
                Ok(n) => {
                    self.started |= n > 0;
                    return Ok(n);
                }
                Err(IOError(e)) if self.waits_on(e.kind()).map_err(IOError)? => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// What the source tells the destination first.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Hello {
    pub wire_version: u32,
    /// What the VM runs (for `vm.info` on the destination).
    pub guest: String,
    /// The VM's migrating components, in stop order; frames name them by index.
    pub sections: Vec<godwit_vmm::migratable::Section>,
    /// Data connections, the main one included.
    pub connections: u32,
    /// Ties the extra connections to this migration.
    pub session: u64,
    /// Whether this is a file (no answers will come).
    pub snapshot: bool,
    /// The VM moves before any page does (post-copy from the start): every page then
    /// arrives through userfaultfd into missing memory, and a destination that readied
    /// its memory beforehand (`--prefault`) gives it back before it answers, not inside
    /// the pause. Older sources do not say; their destinations keep what they readied.
    #[serde(default)]
    pub postcopy_first: bool,
    /// The destination's readers take the fair scheduler's highest weight until the
    /// pause's last frame is in (`migration_priority`). Older sources do not say.
    #[serde(default)]
    pub raise_readers: bool,
    /// The source reads from ACCEPT whether post-copy can come here. Older sources do
    /// not ask, and take an ACCEPT without a payload only.
    #[serde(default)]
    pub asks_postcopy: bool,
}

/// The destination's ACCEPT. Its default goes as an empty payload, all that sources
/// that do not ask (`Hello::asks_postcopy`) take.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Accept {
    /// Why post-copy cannot come here (this process may not catch page faults with
    /// userfaultfd); None where it can. A source then neither switches to it nor
    /// starts a mode that would.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no_postcopy: Option<String>,
}

/// The destination's READY: it holds and has loaded everything.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Ready {
    /// Loading the sections' states (part of the downtime when the last arrives late).
    pub restore_ms: f64,
    /// From the last frame received to READY (the components' final checks).
    pub check_ms: f64,
    /// Its readers had the highest weight (`Hello::raise_readers`, and allowed).
    #[serde(default)]
    pub readers_raised: bool,
}

/// The destination's STARTED: the VM runs there.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Started {
    /// From GO to the VM running.
    pub start_ms: f64,
}

/// Totals the sender counts and the receiver checks (END and COMPLETE).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Totals {
    pub pages: u64,
    pub zero_pages: u64,
    /// Bytes of opaque data streams (DATA frames).
    #[serde(default)]
    pub data: u64,
}

/// The destination's DONE: it holds every page, the source may let go.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Done {
    /// What post-copy did there, per section that ran ahead of its data.
    pub sections: Vec<(String, godwit_vmm::migratable::FaultStats)>,
    /// Set when the VM ended there before every page arrived (nothing is left to
    /// keep): why.
    #[serde(default)]
    pub ended: Option<String>,
    /// Set by a destination that stops listening for the source once it answers
    /// RELEASED. One that does not say so (older) keeps listening a while after DONE,
    /// in case DONE was lost, and is sent nothing more.
    #[serde(default)]
    pub answer_released: bool,
}

/// A decoded frame, borrowing its payload from the read buffer.
#[derive(Debug, PartialEq)]
pub enum Frame<'a> {
    Hello(Hello),
    Accept(Accept),
    Refuse(String),
    Join {
        session: u64,
        index: u32,
    },
    /// Pages of one section: addresses in its space (validated only as numbers here).
    Pages {
        section: u32,
        addrs: Vec<u64>,
        data: &'a [u8],
    },
    /// Runs of zero pages of one section: (first address, page count).
    Zero {
        section: u32,
        runs: Vec<(u64, u32)>,
    },
    End(Totals),
    /// One section's state part, parsed by its component after its own checks.
    State {
        section: u32,
        data: &'a [u8],
    },
    /// Bytes of one section's data stream (a device that streams opaque data, as a
    /// VFIO device does), in order, on the main connection.
    Data {
        section: u32,
        data: &'a [u8],
    },
    /// The end of a pre-copy round, on every connection: the destination answers
    /// SYNCED once it has taken in everything before it on all of them.
    Sync(u64),
    Synced(u64),
    Complete(Totals),
    Ready(Ready),
    Go,
    Started(Started),
    Abort(String),
    /// Post-copy, at the switch, on the main connection: the pages of one section the
    /// destination still needs, one bitmap per region of the section's memory (wire
    /// version 4; LACKS since).
    Postcopy {
        section: u32,
        missing: Vec<Vec<u64>>,
    },
    /// As POSTCOPY, each region's pages as a bitmap or as runs, whichever is smaller.
    Lacks {
        section: u32,
        regions: Vec<Lacks>,
    },
    /// Post-copy, destination to source: pages a touch waits for.
    Request {
        section: u32,
        addrs: Vec<u64>,
    },
    /// Post-copy, destination to source: pages a device will touch soon (the GPU
    /// engine's next command), wanted before the rest of the background stream but
    /// after every page a touch already waits for.
    Ahead {
        section: u32,
        addrs: Vec<u64>,
    },
    Done(Done),
    /// Post-copy recovery, source to destination, opening a new main connection after
    /// the old ones broke: the migration it continues, and its connection count (the
    /// others open with JOIN). The destination answers with a POSTCOPY frame per lazy
    /// section (what it still lacks), then RESUMED.
    Resume {
        session: u64,
        connections: u32,
    },
    Resumed,
    /// Post-copy, source to destination, on the main connection: DONE reached the
    /// source, which lets go of the VM; the destination need not wait for it to come
    /// back for a DONE lost on the way.
    Released,
}

impl Frame<'_> {
    pub fn kind(&self) -> Kind {
        match self {
            Frame::Hello(_) => Kind::Hello,
            Frame::Accept(_) => Kind::Accept,
            Frame::Refuse(_) => Kind::Refuse,
            Frame::Join { .. } => Kind::Join,
            Frame::Pages { .. } => Kind::Pages,
            Frame::Zero { .. } => Kind::Zero,
            Frame::End(_) => Kind::End,
            Frame::State { .. } => Kind::State,
            Frame::Complete(_) => Kind::Complete,
            Frame::Ready(_) => Kind::Ready,
            Frame::Go => Kind::Go,
            Frame::Started(_) => Kind::Started,
            Frame::Abort(_) => Kind::Abort,
            Frame::Data { .. } => Kind::Data,
            Frame::Sync(_) => Kind::Sync,
            Frame::Synced(_) => Kind::Synced,
            Frame::Postcopy { .. } => Kind::Postcopy,
            Frame::Lacks { .. } => Kind::Lacks,
            Frame::Request { .. } => Kind::Request,
            Frame::Ahead { .. } => Kind::Ahead,
            Frame::Done(_) => Kind::Done,
            Frame::Resume { .. } => Kind::Resume,
            Frame::Resumed => Kind::Resumed,
            Frame::Released => Kind::Released,
        }
    }
}

fn header(kind: Kind, payload: &[u8]) -> [u8; HEADER_LEN] {
    header_with(kind, 0, payload.len(), crc32fast::hash(payload))
}

fn header_with(kind: Kind, flags: u8, len: usize, crc: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    h[4] = kind as u8;
    h[5] = flags;
    h[8..12].copy_from_slice(&(len as u32).to_le_bytes());
    h[12..16].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Who checks the page data a migration sends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PageChecks {
    /// godwit: every byte checked end to end. Pages sent straight from guest memory
    /// (one TCP or Unix connection) and pages in a snapshot file carry a CRC each
    /// (`PAGE_CRCS`), checked where they land (a lazy restore's touch reads and checks
    /// its page alone); a frame built in a buffer for another lane or TLS, a CRC of all
    /// of it.
    #[default]
    Crc,
    /// The transport (TCP's checksum, TLS's AEAD; a local socket has no wire): frames
    /// keep a CRC of their head (`HEAD_ONLY`), and the destination reads nothing back.
    /// Files keep `Crc`.
    Transport,
}

/// How a PAGES frame's data is checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Checked {
    /// The frame's CRC covers every byte (snapshot files, and streams before version 6).
    All,
    /// The frame's CRC covers its head only (`HEAD_ONLY`): the transport checks the data.
    Head,
    /// The frame's CRC covers its head, which carries a CRC of each page (`PAGE_CRCS`).
    Pages,
}

impl Checked {
    /// Header flags that say so.
    fn flags(self) -> u8 {
        match self {
            Checked::All => 0,
            Checked::Head => HEAD_ONLY,
            Checked::Pages => PAGE_CRCS,
        }
    }

    /// Bytes of a PAGES frame's head per page: its address, and its CRC if it has one.
    pub fn head_per_page(self) -> usize {
        match self {
            Checked::Pages => 12,
            _ => 8,
        }
    }
}

/// Writes one frame whose payload is already encoded.
pub fn write_raw(w: &mut impl Write, kind: Kind, payload: &[u8]) -> io::Result<()> {
    debug_assert!(payload.len() <= MAX_PAYLOAD);
    w.write_all(&header(kind, payload))?;
    w.write_all(payload)
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("plain data serialises")
}

/// Encodes and writes a frame (PAGES frames are built with `PagesFrame` instead).
pub fn write_frame(w: &mut impl Write, f: &Frame) -> io::Result<()> {
    let payload: Vec<u8> = match f {
        Frame::Hello(h) => json(h),
        Frame::Accept(a) if *a == Accept::default() => Vec::new(),
        Frame::Accept(a) => json(a),
        Frame::Go | Frame::Resumed | Frame::Released => Vec::new(),
        Frame::Resume {
            session,
            connections,
        } => {
            let mut p = session.to_le_bytes().to_vec();
            p.extend_from_slice(&connections.to_le_bytes());
            p
        }
        Frame::Sync(n) | Frame::Synced(n) => n.to_le_bytes().to_vec(),
        Frame::Ready(r) => json(r),
        Frame::Started(s) => json(s),
        Frame::Refuse(m) | Frame::Abort(m) => m.as_bytes().to_vec(),
        Frame::Join { session, index } => {
            let mut p = session.to_le_bytes().to_vec();
            p.extend_from_slice(&index.to_le_bytes());
            p
        }
        Frame::Pages {
            section,
            addrs,
            data,
        } => {
            let mut p = section.to_le_bytes().to_vec();
            p.extend_from_slice(&(addrs.len() as u32).to_le_bytes());
            for a in addrs {
                p.extend_from_slice(&a.to_le_bytes());
            }
            p.extend_from_slice(data);
            p
        }
        Frame::Zero { section, runs } => {
            let mut p = section.to_le_bytes().to_vec();
            p.extend_from_slice(&(runs.len() as u32).to_le_bytes());
            for (a, n) in runs {
                p.extend_from_slice(&a.to_le_bytes());
                p.extend_from_slice(&n.to_le_bytes());
            }
            p
        }
        Frame::End(t) | Frame::Complete(t) => json(t),
        Frame::Done(d) => json(d),
        Frame::Postcopy { section, missing } => {
            let mut p = section.to_le_bytes().to_vec();
            crate::lacks::encode_bitmaps(&mut p, missing);
            p
        }
        Frame::Lacks { section, regions } => {
            let mut p = section.to_le_bytes().to_vec();
            crate::lacks::encode(&mut p, regions);
            p
        }
        Frame::Request { section, addrs } | Frame::Ahead { section, addrs } => {
            let mut p = section.to_le_bytes().to_vec();
            p.extend_from_slice(&(addrs.len() as u32).to_le_bytes());
            for a in addrs {
                p.extend_from_slice(&a.to_le_bytes());
            }
            p
        }
        Frame::State { section, data } | Frame::Data { section, data } => {
            let mut p = section.to_le_bytes().to_vec();
            p.extend_from_slice(data);
            p
        }
    };
    write_raw(w, f.kind(), &payload)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Checks a frame header; returns the frame's kind and payload length.
pub fn check_header(h: &[u8; HEADER_LEN]) -> Result<(Kind, usize), WireError> {
    parse_header(h).map(|h| (h.kind, h.len))
}

/// Checks a frame header.
pub fn parse_header(h: &[u8; HEADER_LEN]) -> Result<Header, WireError> {
    let magic = u32_at(h, 0);
    if magic != MAGIC {
        return Err(WireError::BadMagic(magic));
    }
    let kind = Kind::from_u8(h[4]).ok_or(WireError::BadKind(h[4]))?;
    let checked = match h[5] {
        0 => Some(Checked::All),
        HEAD_ONLY if kind == Kind::Pages => Some(Checked::Head),
        PAGE_CRCS if kind == Kind::Pages => Some(Checked::Pages),
        _ => None,
    };
    let Some(checked) = checked.filter(|_| h[6..8] == [0, 0]) else {
        return Err(WireError::Malformed(
            kind,
            "reserved header bytes set".into(),
        ));
    };
    let len = u32_at(h, 8);
    if len as usize > MAX_PAYLOAD {
        return Err(WireError::TooLarge(len));
    }
    Ok(Header {
        kind,
        len: len as usize,
        crc: u32_at(h, 12),
        checked,
    })
}

/// A frame's header, read and checked.
#[derive(Clone, Copy, Debug)]
pub struct Header {
    pub kind: Kind,
    /// The payload's length (at most `MAX_PAYLOAD`).
    pub len: usize,
    /// The payload's CRC32, as the sender computed it.
    pub crc: u32,
    /// What the CRC covers.
    pub checked: Checked,
}

impl Header {
    /// Checks `payload` (the whole payload of this frame) against the CRC, and each
    /// page against its own where the frame carries them.
    pub fn check(&self, payload: &[u8]) -> Result<(), WireError> {
        if self.checked == Checked::All {
            return self.matches(crc32fast::hash(payload));
        }
        let head = pages_head_len(payload.len(), self.checked)?;
        self.matches(crc32fast::hash(&payload[..head]))?;
        if self.checked == Checked::Pages {
            let h = decode_pages_head(&payload[..head], self.checked)?;
            for (page, want) in payload[head..].chunks_exact(PAGE_SIZE).zip(h.crcs) {
                let got = crc32fast::hash(page);
                if got != want {
                    return Err(WireError::BadCrc {
                        kind: self.kind,
                        got,
                        want,
                    });
                }
            }
        }
        Ok(())
    }

    /// Whether `got`, a CRC of what this frame's CRC covers, is the one it carries.
    pub fn matches(&self, got: u32) -> Result<(), WireError> {
        if got != self.crc {
            return Err(WireError::BadCrc {
                kind: self.kind,
                got,
                want: self.crc,
            });
        }
        Ok(())
    }
}

/// Reads and checks one frame header. A clean end of stream before it is `Closed`.
pub fn read_header(r: &mut impl Read) -> Result<Header, WireError> {
    let mut h = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut h[got..]) {
            Ok(0) if got == 0 => return Err(WireError::Closed),
            Ok(0) => return Err(WireError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err(e)),
        }
    }
    parse_header(&h)
}

/// Reads the payload of the frame whose header is `h` into `buf`, checks it against the
/// header's CRC and decodes it.
pub fn read_payload<'a>(
    r: &mut impl Read,
    h: &Header,
    buf: &'a mut Vec<u8>,
) -> Result<Frame<'a>, WireError> {
    let buf = room(buf, h.len);
    r.read_exact(buf).map_err(io_err)?;
    h.check(buf)?;
    decode_checked(h.kind, h.checked, buf)
}

/// The first `len` bytes of `buf`, for a read to fill. Every byte is read over, so only
/// growth is filled, and `buf` never shrinks: shortened for a small frame, it was
/// filled again for the next page frame, 256 KiB of zeros written and then read over.
pub fn room(buf: &mut Vec<u8>, len: usize) -> &mut [u8] {
    if buf.len() < len {
        buf.resize(len, 0);
    }
    &mut buf[..len]
}

/// Reads one frame into `buf` and decodes it. A clean end of stream before a header is
/// `Closed`; anything cut short is `Truncated`.
pub fn read_frame<'a>(r: &mut impl Read, buf: &'a mut Vec<u8>) -> Result<Frame<'a>, WireError> {
    let h = read_header(r)?;
    read_payload(r, &h, buf)
}

/// A peer's text (REFUSE, ABORT, ACCEPT's reason) as shown to a user: its first 1000
/// characters.
fn shown(s: &str) -> String {
    s.chars().take(1000).collect()
}

/// Decodes a payload whose length and CRC have been checked (a PAGES frame's CRC over
/// all of it).
pub fn decode(kind: Kind, p: &[u8]) -> Result<Frame<'_>, WireError> {
    decode_checked(kind, Checked::All, p)
}

/// Decodes a payload whose length and CRCs have been checked (`Header::check`), a
/// PAGES frame laid out as `checked` says.
pub fn decode_checked(kind: Kind, checked: Checked, p: &[u8]) -> Result<Frame<'_>, WireError> {
    let bad = |m: String| WireError::Malformed(kind, m);
    let empty = |f: Frame<'static>| {
        if p.is_empty() {
            Ok(f)
        } else {
            Err(WireError::Malformed(kind, "unexpected payload".into()))
        }
    };
    let text = || {
        std::str::from_utf8(p)
            .map(shown)
            .map_err(|_| WireError::Malformed(kind, "text is not UTF-8".into()))
    };
    let counted = |p: &[u8], item: usize| -> Result<usize, WireError> {
        if p.len() < 4 {
            return Err(WireError::Malformed(kind, "no count".into()));
        }
        let n = u32_at(p, 0) as usize;
        let need = n.checked_mul(item).and_then(|b| b.checked_add(4));
        if need != Some(p.len()) {
            return Err(WireError::Malformed(
                kind,
                format!("{n} entries do not fit {} bytes", p.len()),
            ));
        }
        Ok(n)
    };
    let section = || -> Result<(u32, &[u8]), WireError> {
        if p.len() < 4 {
            return Err(WireError::Malformed(kind, "no section".into()));
        }
        Ok((u32_at(p, 0), &p[4..]))
    };
    match kind {
        Kind::Hello => serde_json::from_slice(p)
            .map(Frame::Hello)
            .map_err(|e| bad(e.to_string())),
        Kind::Accept if p.is_empty() => Ok(Frame::Accept(Accept::default())),
        Kind::Accept => serde_json::from_slice::<Accept>(p)
            .map(|mut a| {
                a.no_postcopy = a.no_postcopy.as_deref().map(shown);
                Frame::Accept(a)
            })
            .map_err(|e| bad(e.to_string())),
        Kind::Go => empty(Frame::Go),
        Kind::Resumed => empty(Frame::Resumed),
        Kind::Released => empty(Frame::Released),
        Kind::Resume => {
            if p.len() != 12 {
                return Err(bad(format!("{} bytes, expected 12", p.len())));
            }
            Ok(Frame::Resume {
                session: u64_at(p, 0),
                connections: u32_at(p, 8),
            })
        }
        Kind::Ready => serde_json::from_slice(p)
            .map(Frame::Ready)
            .map_err(|e| bad(e.to_string())),
        Kind::Started => serde_json::from_slice(p)
            .map(Frame::Started)
            .map_err(|e| bad(e.to_string())),
        Kind::Refuse => Ok(Frame::Refuse(text()?)),
        Kind::Abort => Ok(Frame::Abort(text()?)),
        Kind::Sync | Kind::Synced => {
            if p.len() != 8 {
                return Err(bad(format!("{} bytes, expected 8", p.len())));
            }
            let n = u64_at(p, 0);
            Ok(if kind == Kind::Sync {
                Frame::Sync(n)
            } else {
                Frame::Synced(n)
            })
        }
        Kind::Join => {
            if p.len() != 12 {
                return Err(bad(format!("{} bytes, expected 12", p.len())));
            }
            Ok(Frame::Join {
                session: u64_at(p, 0),
                index: u32_at(p, 8),
            })
        }
        // The same head as a frame read in place, by the same checks.
        Kind::Pages => {
            let head = pages_head_len(p.len(), checked)?;
            let h = decode_pages_head(&p[..head], checked)?;
            Ok(Frame::Pages {
                section: h.section,
                addrs: h.addrs,
                data: &p[head..],
            })
        }
        Kind::Zero => {
            let (section, rest) = section()?;
            let n = counted(rest, 12)?;
            if n == 0 || n > MAX_ZERO_RUNS {
                return Err(bad(format!("{n} runs (1 to {MAX_ZERO_RUNS} allowed)")));
            }
            Ok(Frame::Zero {
                section,
                runs: (0..n)
                    .map(|i| (u64_at(rest, 4 + 12 * i), u32_at(rest, 12 + 12 * i)))
                    .collect(),
            })
        }
        Kind::End => serde_json::from_slice(p)
            .map(Frame::End)
            .map_err(|e| bad(e.to_string())),
        Kind::Complete => serde_json::from_slice(p)
            .map(Frame::Complete)
            .map_err(|e| bad(e.to_string())),
        Kind::State => {
            let (section, data) = section()?;
            Ok(Frame::State { section, data })
        }
        Kind::Done => serde_json::from_slice(p)
            .map(Frame::Done)
            .map_err(|e| bad(e.to_string())),
        Kind::Request | Kind::Ahead => {
            let (section, rest) = section()?;
            let n = counted(rest, 8)?;
            if n == 0 || n > MAX_REQUEST {
                return Err(bad(format!(
                    "{n} pages asked for (1 to {MAX_REQUEST} allowed)"
                )));
            }
            let addrs = (0..n).map(|i| u64_at(rest, 4 + 8 * i)).collect();
            Ok(if kind == Kind::Request {
                Frame::Request { section, addrs }
            } else {
                Frame::Ahead { section, addrs }
            })
        }
        Kind::Postcopy => {
            let (section, rest) = section()?;
            let missing = crate::lacks::decode_bitmaps(rest).map_err(bad)?;
            Ok(Frame::Postcopy { section, missing })
        }
        Kind::Lacks => {
            let (section, rest) = section()?;
            let regions = crate::lacks::decode(rest).map_err(bad)?;
            Ok(Frame::Lacks { section, regions })
        }
        Kind::Data => {
            let (section, data) = section()?;
            if data.is_empty() {
                return Err(bad("no data".into()));
            }
            Ok(Frame::Data { section, data })
        }
    }
}

mod pages;
#[cfg(test)]
mod tests;
