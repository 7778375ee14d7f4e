//! One connection's frames into the components they name, until the sender's END or
//! COMPLETE, and where the data connections stand against the main one.

use super::IDLE_TIMEOUT;
use crate::damaged::Damaged;
use crate::lacks::Lacks;
use crate::wire::{self, Frame, Kind, Totals, WireError};
use godwit_vmm::migratable::Component;
use std::sync::Arc;
use std::time::Instant;

/// What a connection's stream carries besides pages and data streams.
pub enum Event<'a> {
    /// Section `i`'s state (main connection only).
    State(usize, &'a [u8]),
    /// The end of pre-copy round `n` on this connection.
    Sync(u64),
    /// Post-copy: the pages of section `i` still at the source (main connection only).
    Postcopy(usize, Vec<Lacks>),
}

/// Takes each event as it arrives.
pub type OnEvent<'a> = dyn FnMut(Event) -> Result<(), String> + 'a;

/// Why a connection's stream ended short.
#[derive(Debug, PartialEq, Eq)]
pub struct Ended {
    pub why: String,
    /// The source closed it between two frames. That says nothing of why: a source
    /// that gives up says so on the main connection (ABORT) before it closes the
    /// others, so a data connection that closed defers to what the main one heard.
    pub closed: bool,
}

impl From<String> for Ended {
    fn from(why: String) -> Ended {
        Ended { why, closed: false }
    }
}

impl From<Ended> for String {
    fn from(e: Ended) -> String {
        e.why
    }
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.why)
    }
}

/// Reads one connection's frames until `until` (END on a data connection, COMPLETE on
/// the main one, which also carries the states and data streams), feeding each to its
/// section's component; then checks the sender's totals against what arrived.
pub fn drain(
    r: &mut (impl std::io::Read + vm_memory::ReadVolatile),
    parts: &[Arc<dyn Component>],
    names: &[String],
    damaged: &Damaged,
    until: Kind,
    on_event: &mut OnEvent,
) -> Result<Totals, Ended> {
    let mut buf = Vec::new();
    let mut got = Totals::default();
    let section = |s: u32| {
        parts
            .get(s as usize)
            .map(|c| (c, &names[s as usize]))
            .ok_or_else(|| format!("a frame for section {s}, of {} sections", parts.len()))
    };
    let stream = |e| match e {
        WireError::Closed => Ended {
            why: "the source closed the connection before the end".into(),
            closed: true,
        },
        e => format!("migration stream: {e}").into(),
    };
    loop {
        let h = wire::read_header(r).map_err(stream)?;
        if h.kind == Kind::Pages {
            let l = crate::inplace::read_pages(r, &h, &mut buf, true, |s| {
                section(s).map(|(c, name)| (&**c, name.as_str()))
            })?;
            damaged.landed(l.section, &l.addrs, &l.bad)?;
            got.pages += l.addrs.len() as u64;
            continue;
        }
        let f = wire::read_payload(r, &h, &mut buf).map_err(stream)?;
        match f {
            Frame::Zero { section: s, runs } => {
                let (c, name) = section(s)?;
                c.load_zero(&runs).map_err(|e| format!("{name}: {e}"))?;
                damaged.zeroed(s, &runs);
                got.zero_pages += runs.iter().map(|r| r.1 as u64).sum::<u64>();
            }
            Frame::State { section: s, data } if until == Kind::Complete => {
                section(s)?;
                on_event(Event::State(s as usize, data))?;
            }
            Frame::Sync(n) => on_event(Event::Sync(n))?,
            Frame::Postcopy {
                section: s,
                missing,
            } if until == Kind::Complete => {
                section(s)?;
                let lacks = missing.into_iter().map(Lacks::Bitmap).collect();
                on_event(Event::Postcopy(s as usize, lacks))?;
            }
            Frame::Lacks {
                section: s,
                regions,
            } if until == Kind::Complete => {
                section(s)?;
                on_event(Event::Postcopy(s as usize, regions))?;
            }
            Frame::Data { section: s, data } if until == Kind::Complete => {
                let (c, name) = section(s)?;
                c.load_data(data).map_err(|e| format!("{name}: {e}"))?;
                got.data += data.len() as u64;
            }
            Frame::End(t) | Frame::Complete(t) if f.kind() == until => {
                if t != got {
                    return Err(format!(
                        "the source sent {t:?} on this connection but {got:?} arrived"
                    )
                    .into());
                }
                return Ok(got);
            }
            Frame::Abort(m) => return Err(format!("the source aborted: {m}").into()),
            f => return Err(format!("unexpected {:?} frame in the page stream", f.kind()).into()),
        }
    }
}

/// Where the data connections are: the last round each has passed, and whether one
/// failed.
pub(super) struct Lanes {
    m: std::sync::Mutex<(Vec<u64>, bool)>,
    cv: std::sync::Condvar,
}

impl Lanes {
    pub(super) fn new(n: usize) -> Lanes {
        Lanes {
            m: std::sync::Mutex::new((vec![0; n], false)),
            cv: std::sync::Condvar::new(),
        }
    }

    pub(super) fn passed(&self, lane: usize, n: u64) {
        self.m.lock().unwrap_or_else(|e| e.into_inner()).0[lane] = n;
        self.cv.notify_all();
    }

    pub(super) fn failed(&self) {
        self.m.lock().unwrap_or_else(|e| e.into_inner()).1 = true;
        self.cv.notify_all();
    }

    /// Whether a data connection has failed.
    pub(super) fn any_failed(&self) -> bool {
        self.m.lock().unwrap_or_else(|e| e.into_inner()).1
    }

    /// Waits until every data connection has passed round `n`.
    pub(super) fn wait(&self, n: u64) -> Result<(), String> {
        let end = Instant::now() + IDLE_TIMEOUT;
        let mut g = self.m.lock().unwrap_or_else(|e| e.into_inner());
        while !g.1 && g.0.iter().any(|&p| p < n) {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!("round {n} never ended on every data connection"));
            }
            g = self
                .cv
                .wait_timeout(g, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        if g.1 {
            return Err("a data connection failed".into());
        }
        Ok(())
    }
}
