//! The main connection's reader. Besides pages it takes each component's state as it
//! arrives (loaded while the source still sends the last pages), the end of each
//! pre-copy round (answered once every data connection has passed it) and post-copy's
//! lists of the pages still at the source. It runs on a thread of its own under the
//! page readers' narrower filters, as the data connections' readers do: the thread that
//! called `receive` goes on to start the VM, which needs more.

use super::answer;
use super::drain::{drain, Ended, Event, Lanes};
use crate::damaged::Damaged;
use crate::lacks::Lacks;
use crate::migration_priority::raise_this_thread;
use crate::transport::Stream;
use crate::wire::{Frame, Kind};
use godwit_vmm::confine::{self, Role};
use godwit_vmm::migratable::Component;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the main connection brought besides pages.
pub(super) struct Taken {
    /// Which sections' states were loaded.
    pub states: Vec<bool>,
    /// Time spent loading them.
    pub restore: Duration,
    /// Post-copy: each section's pages still at the source.
    pub postcopy: Vec<Option<Vec<Lacks>>>,
    /// Whether the reader ran at a raised priority (`migration_priority`).
    pub raised: bool,
}

/// The sections and what stands between their streams: as `drain` takes them.
pub(super) struct Sections<'a> {
    pub parts: &'a [Arc<dyn Component>],
    pub names: &'a [String],
    pub damaged: &'a Damaged,
    pub lanes: &'a Lanes,
}

/// Reads the main connection `c` to its COMPLETE on a reader thread of its own
/// (`migration-recv0`), raised if `raise`; SYNCED goes back on `main`.
pub(super) fn read_main(
    c: &mut Stream,
    main: &mut Option<Stream>,
    at: Sections,
    raise: bool,
) -> Result<Taken, Ended> {
    std::thread::scope(|s| {
        let reader = std::thread::Builder::new()
            .name("migration-recv0".into())
            .spawn_scoped(s, || {
                let raised = raise
                    .then(|| raise_this_thread("the main reader"))
                    .flatten();
                confine::enter(Role::PageReader).map_err(Ended::from)?;
                let n = at.parts.len();
                let mut t = Taken {
                    states: vec![false; n],
                    restore: Duration::ZERO,
                    postcopy: vec![None; n],
                    raised: raised.as_ref().is_some_and(|r| r.count() > 0),
                };
                let (parts, names, damaged) = (at.parts, at.names, at.damaged);
                drain(c, parts, names, damaged, Kind::Complete, &mut |e| {
                    t.take(e, &at, main)
                })?;
                Ok(t)
            });
        match reader.map(|h| h.join()) {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err("the main reader thread failed".to_string().into()),
            Err(e) => Err(format!("cannot start the main reader thread: {e}").into()),
        }
    })
}

impl Taken {
    fn take(&mut self, e: Event, at: &Sections, main: &mut Option<Stream>) -> Result<(), String> {
        match e {
            Event::State(i, bytes) => {
                let name = &at.names[i];
                if std::mem::replace(&mut self.states[i], true) {
                    return Err(format!("{name}: a second state"));
                }
                let t = Instant::now();
                at.parts[i]
                    .load(bytes)
                    .map_err(|e| format!("{name}: {e}"))?;
                self.restore += t.elapsed();
            }
            Event::Sync(n) => {
                at.lanes.wait(n)?;
                answer(main, &Frame::Synced(n));
            }
            Event::Postcopy(i, missing) => {
                if self.postcopy[i].replace(missing).is_some() {
                    return Err(format!("{}: post-copy said twice", at.names[i]));
                }
            }
        }
        Ok(())
    }
}
