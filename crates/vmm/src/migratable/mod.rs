//! The device-migration interface. Every part of a VM that migrates (guest RAM, the
//! vCPUs, the platform devices, a GPU function) is a `Component`, and the migration
//! driver moves all of them the same way without knowing what any of them is.
//!
//! The model is Linux VFIO migration v2 (`include/uapi/linux/vfio.h`):
//! - each component has a device state (`MigState`: RUNNING, PRE_COPY, STOP_COPY,
//!   STOP, RESUMING and the P2P variants) and takes only the arcs the kernel defines;
//!   `MigState::next_step` walks longer transitions through them as the kernel does;
//! - it has one data stream: in PRE_COPY the data it can send while running (the first
//!   pass, then what changed), in STOP_COPY the rest; in RESUMING the destination's
//!   component takes the same stream back;
//! - `precopy_info` is VFIO_MIG_GET_PRECOPY_INFO: initial bytes (first-pass data not
//!   yet read) and dirty bytes (data known to have changed since).
//!
//! A component that is not memory streams opaque bytes (`Sink::data`,
//! `Component::load_data`), as a VFIO device's data fd does. Two extensions a VFIO byte
//! stream does not have, because memory dominates a VM:
//! a component's stream may carry *pages* (4 KiB, addressed in the component's own
//! space, last copy wins), which the driver may spread over several connections and
//! which the destination writes in place; and the stream has a small *state* part
//! (`save`/`load`) sent ahead of the last pages, so the destination loads it while
//! they arrive. A real VFIO device would stream only state-part bytes.
//!
//! Each component names its section (`Section`): its data version and what a
//! destination must offer to take it. A destination builds its VM from the sections
//! (`incoming_config`) and refuses before anything moves if they do not match its own.

pub mod fuzz_postcopy;
pub mod gpu;
#[cfg(test)]
mod held_sink;
pub mod incoming;
pub mod lazy;
pub mod paged;
pub mod platform;
pub mod ram;
pub mod vcpus;

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io;

/// What keeps a component's memory mapped (a handle on its mapping) while a page read
/// from it in place waits to be written (`Sink::pages_kept`).
pub type Kept = std::sync::Arc<dyn std::any::Any + Send + Sync>;

pub use lazy::{FaultStats, Latency};
pub use paged::{Bitmap, PAGE_SIZE};

/// A component's device state (VFIO's `enum vfio_device_mig_state`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigState {
    /// Unrecoverable: the component must be reset (dropped).
    Error,
    /// Stopped: no work, no DMA, no interrupts, state frozen.
    Stop,
    Running,
    /// Stopped, its remaining data being read.
    StopCopy,
    /// Taking data on a destination.
    Resuming,
    /// Running but starting no peer-to-peer DMA.
    RunningP2p,
    /// Running, with changes tracked and its data being read.
    PreCopy,
    PreCopyP2p,
}

impl MigState {
    /// Whether a component takes the arc `self` -> `to` directly: the 15 arcs a VFIO
    /// migration driver with P2P and PRE_COPY support implements.
    pub fn is_arc(self, to: MigState) -> bool {
        use MigState::*;
        matches!(
            (self, to),
            (Running, RunningP2p | PreCopy)
                | (RunningP2p, Running | Stop | PreCopyP2p)
                | (Stop, RunningP2p | StopCopy | Resuming)
                | (StopCopy, Stop)
                | (Resuming, Stop)
                | (PreCopy, Running | PreCopyP2p)
                | (PreCopyP2p, PreCopy | RunningP2p | StopCopy)
        )
    }

    /// The next arc on the way from `self` to `to`, as the kernel's
    /// vfio_mig_get_next_state takes it; None when `to` cannot be reached (from ERROR,
    /// into ERROR) or `self` is already `to`.
    pub fn next_step(self, to: MigState) -> Option<MigState> {
        use MigState::*;
        if self == to || self == Error || to == Error {
            return None;
        }
        Some(match self {
            Stop => match to {
                StopCopy | Resuming => to,
                _ => RunningP2p,
            },
            Running => match to {
                PreCopy => PreCopy,
                _ => RunningP2p,
            },
            PreCopy => match to {
                StopCopy | PreCopyP2p => PreCopyP2p,
                _ => Running,
            },
            PreCopyP2p => match to {
                StopCopy | PreCopy => to,
                _ => RunningP2p,
            },
            StopCopy | Resuming => Stop,
            RunningP2p => match to {
                Running | PreCopy => Running,
                PreCopyP2p => PreCopyP2p,
                _ => Stop,
            },
            Error => return None,
        })
    }

    /// Whether the component is saving (its data stream is open for reading).
    pub fn saving(self) -> bool {
        matches!(
            self,
            MigState::PreCopy | MigState::PreCopyP2p | MigState::StopCopy
        )
    }
}

/// What a component says about itself in a migration stream's HELLO.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Section {
    /// Unique in its VM: "ram", "vcpus", "platform", "gpu".
    pub name: String,
    /// Version of the component's data (its state encoding and page space).
    pub version: u32,
    /// What the destination must offer, which must be equal on both sides (memory
    /// size, vCPU count, GPU profile and ABI...).
    pub needs: BTreeMap<String, String>,
}

impl Section {
    pub fn new(name: &str, version: u32, needs: &[(&str, String)]) -> Section {
        Section {
            name: name.into(),
            version,
            needs: needs
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        }
    }

    /// Why `other` (a destination's) cannot take this (a source's), if it cannot.
    pub fn mismatch(&self, other: &Section) -> Option<String> {
        if self.version != other.version {
            return Some(format!(
                "{}: the source sends data version {}, this godwit reads {}",
                self.name, self.version, other.version
            ));
        }
        for (k, v) in &self.needs {
            match other.needs.get(k) {
                Some(w) if w == v => {}
                Some(w) => {
                    return Some(format!(
                        "{}: the source has {k} {v}, this destination {w}",
                        self.name
                    ))
                }
                None => return Some(format!("{}: this destination has no {k}", self.name)),
            }
        }
        other
            .needs
            .keys()
            .find(|k| !self.needs.contains_key(*k))
            .map(|k| format!("{}: the source does not say its {k}", self.name))
    }
}

/// VFIO_MIG_GET_PRECOPY_INFO: what a saving component has left to send.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreCopyInfo {
    /// First-pass data not yet read.
    pub initial_bytes: u64,
    /// Data known to have changed since it was read, not yet read again.
    pub dirty_bytes: u64,
}

impl PreCopyInfo {
    pub fn total(&self) -> u64 {
        self.initial_bytes + self.dirty_bytes
    }
}

/// What one `read` put into the stream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ReadReport {
    /// Pages sent as data.
    pub pages: u64,
    /// Zero pages found; `zero_sent` of them went out as zero runs (in a first pass the
    /// destination's memory is still zero, so they need no message at all).
    pub zero_pages: u64,
    pub zero_sent: u64,
    /// Pages left for the next round because they were written again meanwhile.
    pub skipped: u64,
    /// Time spent looking at the dirty log for such pages, in microseconds.
    pub peek_us: f64,
}

impl std::ops::AddAssign for ReadReport {
    fn add_assign(&mut self, o: ReadReport) {
        self.pages += o.pages;
        self.zero_pages += o.zero_pages;
        self.zero_sent += o.zero_sent;
        self.skipped += o.skipped;
        self.peek_us += o.peek_us;
    }
}

/// What a sync (the end of a pre-copy round) found.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SyncReport {
    /// Pages written since the last sync, now due to be sent again.
    pub dirty_pages: u64,
    /// Time the dirty log took to read, in microseconds.
    pub log_us: f64,
    /// Component-specific counts, for reports (e.g. pages a device wrote by DMA).
    pub extra: BTreeMap<String, u64>,
}

/// Where a component's pages go: the driver frames them for the wire.
pub trait Sink {
    /// A page-sized buffer for the page at `addr` (in the component's space); then
    /// `page` sends what the buffer holds, `zero` says the page is zero, and neither
    /// drops it.
    fn slot(&mut self, addr: u64) -> &mut [u8];
    fn page(&mut self) -> io::Result<()>;
    fn zero(&mut self) -> io::Result<()>;
    /// Whether `pages_in_place` may be used: the pages go from the memory they are in
    /// to the connection with no copy between.
    fn in_place(&self) -> bool {
        false
    }
    /// Sends the pages at `addrs` (at most a frame's worth), read from `pages` (each a
    /// page of the component's memory, as the host maps it) before the next `settle`
    /// returns: the caller keeps that memory mapped until then. A page written
    /// meanwhile may go torn: only for memory whose writes are tracked (it is dirty
    /// again, and goes again), or whose writers are stopped.
    fn pages_in_place(
        &mut self,
        _addrs: &[u64],
        _pages: &[vm_memory::VolatileSlice<'_>],
    ) -> io::Result<()> {
        Err(io::Error::other("this sink copies every page"))
    }
    /// Sends the pages at `addrs` as `pages_in_place` does, from memory that nothing
    /// writes any more (a post-copy source's, stopped for good) and that `kept` keeps
    /// mapped: the sink may read them after this returns and after the caller's borrow
    /// ends, holding `kept` until it has, so no `settle` is needed (a post-copy source
    /// reads a frame at a time between requests, and would wait for each to be
    /// written). By default they go in place and are settled before this returns.
    fn pages_kept(
        &mut self,
        addrs: &[u64],
        pages: &[vm_memory::VolatileSlice<'_>],
        _kept: &Kept,
    ) -> io::Result<()> {
        self.pages_in_place(addrs, pages)?;
        self.settle()
    }
    /// Returns once every page given to `pages_in_place` has been read from memory.
    /// A reader that used `pages_in_place` calls it before the pages' borrow ends,
    /// whether it failed or not.
    fn settle(&mut self) -> io::Result<()> {
        Ok(())
    }
    /// Sends bytes of an opaque data stream (a device that is not memory, such as a
    /// VFIO device streaming its internal state in PRE_COPY), in order.
    fn data(&mut self, bytes: &[u8]) -> io::Result<()>;
    /// Whether the migration was cancelled: a long read stops early.
    fn cancelled(&self) -> bool {
        false
    }
}

/// Where a destination's pages come from when a component reads them straight into
/// place (`Component::load_pages_from`): the migration stream, which checks what it
/// hands over.
pub trait PageSource {
    /// Fills `pages` (whole pages of the component's memory, which nothing runs on
    /// while the component is RESUMING) with the stream's next bytes.
    fn fill(&mut self, pages: &mut vm_memory::VolatileSlice<'_>) -> io::Result<()>;
    /// Whether every byte filled so far checked out against the stream's CRCs. Asked
    /// where pages must not be seen before they are known whole: post-copy maps them
    /// for a guest that runs.
    fn verify(&mut self) -> io::Result<()>;
}

#[derive(Debug, thiserror::Error)]
pub enum ComponentError {
    #[error("no transition from {from:?} to {to:?}")]
    Arc { from: MigState, to: MigState },
    #[error("{what} in state {state:?}")]
    WrongState { what: &'static str, state: MigState },
    /// Data from the other side that this component cannot take.
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Vmm(#[from] crate::Error),
    #[error("{0}")]
    Io(#[from] io::Error),
}

pub type Result<T> = std::result::Result<T, ComponentError>;

/// What a destination asks its source for, from the touches (`Faults::take`).
#[derive(Debug, Default)]
pub struct Wanted {
    /// Pages a touch waits for: asked for first.
    pub ask: Vec<u64>,
    /// The pages after touches in a row (read ahead): asked for right after `ask`,
    /// apart from it, so that their answer does not hold up the touches'.
    pub after: Vec<u64>,
    /// Pages wanted ahead of a touch (what a device's next command touches): they
    /// come with the background stream.
    pub ahead: Vec<u64>,
}

impl Wanted {
    pub fn clear(&mut self) {
        self.ask.clear();
        self.after.clear();
        self.ahead.clear();
    }

    pub fn is_empty(&self) -> bool {
        self.ask.is_empty() && self.after.is_empty() && self.ahead.is_empty()
    }
}

/// Post-copy on a destination: the touches of a component's missing pages.
pub trait Faults: Send + Sync {
    /// A descriptor that polls readable while touches wait to be taken.
    fn fd(&self) -> std::os::fd::RawFd;
    /// Another: readable when pages were asked for ahead of a touch.
    fn wake_fd(&self) -> std::os::fd::RawFd;
    /// Takes the touches that arrived: what to ask the source for goes into `w`
    /// (addresses in the component's space, each page once); pages the source never
    /// had are filled here.
    fn take(&self, w: &mut Wanted) -> Result<()>;
    /// Pages still at the source.
    fn left(&self) -> u64;
    /// The pages still at the source, one bitmap per region.
    fn missing(&self) -> Vec<Bitmap>;
    /// Pages asked for that have not arrived (to ask again on a new connection).
    fn asked(&self) -> Vec<u64>;
    fn stats(&self) -> FaultStats;
    /// Places pages (`data` one page per address, each checked) that were missing;
    /// pages already here are left as they are. What `Component::load_pages` does in
    /// post-copy, without the component's lock: a filler on this host (a snapshot
    /// restored lazily) places pages without waiting for others that hold it.
    fn place(&self, addrs: &[u64], data: &[u8]) -> Result<()>;
    /// Fills runs (first address, count) of missing pages with zeros.
    fn zero(&self, runs: &[(u64, u32)]) -> Result<()>;
    /// The pages still missing will never come: the VM ends first. Stops catching
    /// touches, so that whoever waits on one (a vCPU, a device) goes on and can be
    /// stopped; pages that arrive later are dropped. They still count as missing.
    fn abandon(&self);
}

/// A part of a VM that migrates. Implementations keep their own state machine and
/// refuse any call their state does not allow.
pub trait Component: Send + Sync {
    fn section(&self) -> Section;
    /// The order in which components stop: lower first. Those that start work stop
    /// before those that do it (vCPUs before a GPU they feed), and both before what
    /// they write (memory, interrupt controllers), whose last state is read after.
    fn stop_order(&self) -> u8;
    fn state(&self) -> MigState;
    /// Takes one arc (`MigState::is_arc`).
    fn set_state(&self, to: MigState) -> Result<()>;
    /// What is left to read (PRE_COPY, PRE_COPY_P2P, STOP_COPY).
    fn precopy_info(&self) -> Result<PreCopyInfo>;
    /// Pages of memory the data stream covers (0 for a component that is not memory):
    /// for progress, and to count what was never sent because it was never written.
    fn pages(&self) -> u64 {
        0
    }
    /// The end of a pre-copy round: what changed since the last sync becomes dirty data.
    fn sync(&self) -> Result<SyncReport> {
        Ok(SyncReport::default())
    }
    /// Reads up to `pages` pages of the data stream into `sink`.
    fn read(&self, _sink: &mut dyn Sink, _pages: u64) -> Result<ReadReport> {
        Ok(ReadReport::default())
    }
    /// STOP_COPY: the component's state part (device registers, vCPU state...).
    fn save(&self) -> Result<Vec<u8>>;
    /// RESUMING: the state part, checked as hostile input.
    fn load(&self, bytes: &[u8]) -> Result<()>;
    /// RESUMING: the next bytes of an opaque data stream (`Sink::data` on the source).
    fn load_data(&self, _bytes: &[u8]) -> Result<()> {
        Err(ComponentError::Refused(format!(
            "{} has no data stream",
            self.section().name
        )))
    }
    /// RESUMING: pages at `addrs` (checked), `data` holding one page per address.
    fn load_pages(&self, _addrs: &[u64], _data: &[u8]) -> Result<()> {
        Err(ComponentError::Refused(format!(
            "{} has no pages",
            self.section().name
        )))
    }
    /// RESUMING: as `load_pages`, each page read from `src` straight into place, in
    /// order, with no buffer between (pre-copy's bulk; post-copy's into memory with an
    /// alias, mapped for the guest once `src` verifies them). False, with nothing read:
    /// the component takes its pages only whole now (post-copy into memory that
    /// UFFDIO_COPY fills; a memory the host does not map here), and the caller reads
    /// them and calls `load_pages`.
    fn load_pages_from(&self, _addrs: &[u64], _src: &mut dyn PageSource) -> Result<bool> {
        Ok(false)
    }
    /// RESUMING: runs of zero pages (first address, count).
    fn load_zero(&self, _runs: &[(u64, u32)]) -> Result<()> {
        Err(ComponentError::Refused(format!(
            "{} has no pages",
            self.section().name
        )))
    }
    /// Post-copy, on the source, in STOP_COPY after the last sync: the pages the
    /// destination still needs, one bitmap per region. From then on `read` sends them
    /// (the background stream) and `read_requested` sends the ones asked for at once.
    /// None: the component cannot run ahead of its data, which then moves inside the
    /// pause as in pre-copy.
    fn postcopy_switch(&self) -> Result<Option<Vec<Bitmap>>> {
        Ok(None)
    }
    /// Post-copy, on the source: the pages at `addrs`, asked for by the destination,
    /// sent now whether or not they went before (checked: an address outside the
    /// component is refused, after the good ones before it went).
    fn read_requested(&self, _sink: &mut dyn Sink, _addrs: &[u64]) -> Result<ReadReport> {
        Err(ComponentError::Refused(format!(
            "{} has no pages to ask for",
            self.section().name
        )))
    }
    /// Post-copy recovery, on the source: what the destination still lacks (its own
    /// account, after a connection broke and pages in flight may have been lost)
    /// becomes what is left to send.
    fn postcopy_resume(&self, _missing: Vec<Bitmap>) -> Result<()> {
        Err(ComponentError::Refused(format!(
            "{} has no pages to resume",
            self.section().name
        )))
    }
    /// Pages of this memory still arriving (post-copy, or a snapshot restored lazily),
    /// while any are.
    fn arriving(&self) -> Option<u64> {
        None
    }
    /// The regions of a component that is memory and can run ahead of its data, as
    /// (first address in its space, bytes): what `postcopy_expect` takes one bitmap
    /// each for. Empty for anything else.
    fn lazy_regions(&self) -> Vec<(u64, u64)> {
        Vec::new()
    }
    /// Post-copy, on a destination that has loaded the states (STOP): the pages still
    /// at the source (`postcopy_switch`'s bitmaps, checked as hostile input) go
    /// missing here; a touch of one waits until `load_pages` or `load_zero` places it,
    /// which they do in any state until none is missing.
    fn postcopy_expect(&self, _missing: Vec<Bitmap>) -> Result<std::sync::Arc<dyn Faults>> {
        Err(ComponentError::Refused(format!(
            "{} cannot run ahead of its data",
            self.section().name
        )))
    }
    /// Whether the component can be held back to slow what it writes (auto-converge),
    /// and in which order: lower first. A writer that others' throttling does not slow
    /// comes before those whose throttling costs the guest most.
    fn throttle_order(&self) -> Option<u8> {
        None
    }
    /// Holds the component back `pct` percent of the time (0: not at all), in
    /// PRE_COPY; false where it cannot. It lets go by itself when it leaves PRE_COPY.
    fn throttle(&self, _pct: u32) -> bool {
        false
    }
}

/// Walks `c` from its state to `to`, one arc at a time.
pub fn step_to(c: &dyn Component, to: MigState) -> Result<()> {
    while let Some(next) = c.state().next_step(to) {
        c.set_state(next)?;
    }
    if c.state() != to {
        return Err(ComponentError::Arc {
            from: c.state(),
            to,
        });
    }
    Ok(())
}

/// Refuses `from` -> `to` unless it is an arc; implementations check before they act,
/// and set their state once the arc's work is done.
pub(crate) fn check_arc(from: MigState, to: MigState) -> Result<()> {
    if from.is_arc(to) {
        Ok(())
    } else {
        Err(ComponentError::Arc { from, to })
    }
}

/// Refuses `what` unless the component is in `want`.
pub(crate) fn expect(state: MigState, want: MigState, what: &'static str) -> Result<()> {
    if state == want {
        Ok(())
    } else {
        Err(ComponentError::WrongState { what, state })
    }
}

/// Encodes a component's state part: version (u32, little endian), then postcard.
pub(crate) fn encode<T: Serialize>(version: u32, v: &T) -> Result<Vec<u8>> {
    let mut out = version.to_le_bytes().to_vec();
    postcard::to_io(v, &mut out)
        .map_err(|e| ComponentError::Refused(format!("encoding the state: {e}")))?;
    Ok(out)
}

/// Reads `encode`'s bytes; a foreign version, malformed input or trailing bytes are
/// refused.
pub(crate) fn decode<T: serde::de::DeserializeOwned>(
    what: &str,
    version: u32,
    bytes: &[u8],
) -> Result<T> {
    let refuse = |m: String| ComponentError::Refused(format!("{what} state: {m}"));
    let (v, rest) = bytes
        .split_first_chunk::<4>()
        .ok_or_else(|| refuse("truncated".into()))?;
    let v = u32::from_le_bytes(*v);
    if v != version {
        return Err(refuse(format!(
            "version {v}; this godwit reads version {version}"
        )));
    }
    let (s, left) =
        postcard::take_from_bytes(rest).map_err(|e| refuse(format!("malformed: {e}")))?;
    if !left.is_empty() {
        return Err(refuse(format!("{} stray bytes", left.len())));
    }
    Ok(s)
}

/// For the fuzz targets (fuzz/): the VM's state decoders on hostile bytes. Decoding only;
/// `load` then checks a decoded state against the live VM.
#[doc(hidden)]
pub fn fuzz_decode_states(bytes: &[u8]) -> (bool, bool) {
    (
        decode::<vcpus::VcpusState>("vCPU", vcpus::VERSION, bytes).is_ok(),
        decode::<platform::PlatformState>("platform", platform::VERSION, bytes).is_ok(),
    )
}

/// Wall-clock time, for carrying real time across a migration or a snapshot.
pub(crate) fn unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use MigState::*;

    const ALL: [MigState; 8] = [
        Error, Stop, Running, StopCopy, Resuming, RunningP2p, PreCopy, PreCopyP2p,
    ];

    #[test]
    fn there_are_fifteen_arcs_and_every_walk_uses_only_them() {
        let arcs = ALL
            .iter()
            .flat_map(|a| ALL.iter().map(move |b| (*a, *b)))
            .filter(|(a, b)| a.is_arc(*b))
            .count();
        assert_eq!(arcs, 15);
        for from in ALL {
            for to in ALL {
                let mut at = from;
                let mut steps = 0;
                while let Some(n) = at.next_step(to) {
                    assert!(
                        at.is_arc(n),
                        "{at:?} -> {n:?} on the way {from:?} -> {to:?}"
                    );
                    at = n;
                    steps += 1;
                    assert!(steps <= 4, "{from:?} -> {to:?} loops");
                }
                let reachable = from != Error && to != Error;
                assert_eq!(at == to, reachable || from == to, "{from:?} -> {to:?}");
            }
        }
        // The paths the kernel takes for the transitions a migration uses.
        let path = |from: MigState, to| {
            let mut v = vec![from];
            while let Some(n) = v.last().unwrap().next_step(to) {
                v.push(n);
            }
            v
        };
        assert_eq!(path(PreCopy, StopCopy), [PreCopy, PreCopyP2p, StopCopy]);
        assert_eq!(
            path(StopCopy, Running),
            [StopCopy, Stop, RunningP2p, Running]
        );
        assert_eq!(
            path(Running, Resuming),
            [Running, RunningP2p, Stop, Resuming]
        );
        assert_eq!(path(PreCopy, Stop), [PreCopy, Running, RunningP2p, Stop]);
    }

    #[test]
    fn sections_say_what_differs() {
        let a = Section::new("gpu", 1, &[("profile", "GW8-1C".into())]);
        assert_eq!(a.mismatch(&a), None);
        let b = Section::new("gpu", 1, &[("profile", "GW8-2C".into())]);
        assert!(a.mismatch(&b).unwrap().contains("profile GW8-1C"));
        let c = Section::new("gpu", 2, &[("profile", "GW8-1C".into())]);
        assert!(a.mismatch(&c).unwrap().contains("version 1"));
    }

    #[test]
    fn state_encoding_refuses_foreign_or_damaged_bytes() {
        let b = encode(3, &(7u32, "x".to_string())).unwrap();
        let back: (u32, String) = decode("t", 3, &b).unwrap();
        assert_eq!(back, (7, "x".into()));
        assert!(decode::<(u32, String)>("t", 4, &b).is_err());
        let mut long = b.clone();
        long.push(0);
        assert!(decode::<(u32, String)>("t", 3, &long).is_err());
        assert!(decode::<(u32, String)>("t", 3, &b[..2]).is_err());
    }
}
