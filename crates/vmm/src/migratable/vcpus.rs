//! The vCPUs as a migration component: they stop first (nothing new starts in the VM
//! once they are parked), their registers are read after every device has stopped (a
//! device's last interrupt lands in a LAPIC, which is vCPU state), and on a destination
//! they start last: armed at RUNNING_P2P, let go at RUNNING. While pre-copy runs they can
//! be held back for a share of every time slice (auto-converge; the driver chooses the
//! share).

use super::{
    check_arc, decode, encode, expect, unix_ns, Component, ComponentError, MigState, PreCopyInfo,
    Result, Section,
};
use crate::control::{Control, RunState};
use crate::state::VcpuState;
use crate::vcpu::Vcpu;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

pub const VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
pub(crate) struct VcpusState {
    /// The user had paused the VM: it arrives paused.
    paused: bool,
    /// When the state was read (CLOCK_REALTIME): the guest's TSC moves on by the time
    /// since, as it does while a VM is paused.
    saved_at_unix_ns: u64,
    vcpus: Vec<VcpuState>,
}

/// Auto-converge: hold every vCPU out of the guest for a share of every 10 ms slice
/// (QEMU's cpu-throttle idea, with the same slice).
struct Throttle {
    pct: Arc<AtomicU32>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

const SLICE: Duration = Duration::from_millis(10);

impl Throttle {
    fn start(ctl: Arc<Control>) -> std::io::Result<Throttle> {
        let pct = Arc::new(AtomicU32::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (pct.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("throttle".into())
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    let pct = p.load(Ordering::Relaxed).min(99);
                    if pct > 0 {
                        ctl.hold(SLICE * pct / 100);
                    }
                    // Woken at once when the throttle ends (see Drop).
                    std::thread::park_timeout(SLICE);
                }
            })?;
        Ok(Throttle {
            pct,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

struct Inner {
    state: MigState,
    /// This component paused the vCPUs (so it resumes them if the VM stays here).
    paused_by_us: bool,
    /// The VM was paused by its user when it stopped for the migration.
    user_paused: bool,
    /// Destination: a state was loaded, and whether to run once started.
    loaded: Option<bool>,
    /// On the way up from STOP: whether the vCPUs run once RUNNING is reached. They are
    /// let go only then, not at RUNNING_P2P, so that a destination can say STARTED in
    /// between: on a busy host a woken vCPU takes the CPU from the thread that would
    /// say it, and the source counted that wait (up to a scheduler tick, 4 ms) as
    /// downtime.
    armed: Option<bool>,
    throttle: Option<Throttle>,
}

pub struct Vcpus {
    vcpus: Vec<Arc<Mutex<Vcpu>>>,
    ctl: Arc<Control>,
    inner: Mutex<Inner>,
}

impl Vcpus {
    pub fn new(vcpus: Vec<Arc<Mutex<Vcpu>>>, ctl: Arc<Control>) -> Vcpus {
        Vcpus {
            vcpus,
            ctl,
            inner: Mutex::new(Inner {
                state: MigState::Running,
                paused_by_us: false,
                user_paused: false,
                loaded: None,
                armed: None,
                throttle: None,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Parks every vCPU unless they are parked already.
    fn stop(&self, i: &mut Inner) -> Result<()> {
        i.throttle = None;
        match self.ctl.state() {
            RunState::Running => {
                self.ctl
                    .pause()
                    .map_err(|e| ComponentError::Refused(format!("cannot stop the vCPUs: {e}")))?;
                i.paused_by_us = true;
                i.user_paused = false;
            }
            RunState::Paused => i.user_paused = true,
            // The guest exited (or was shut down) while the migration ran: there is no
            // VM left to move, and saying so beats naming a state.
            RunState::Stopped => {
                return Err(ComponentError::Refused(
                    "the VM ended before its vCPUs could be stopped for the migration".into(),
                ))
            }
            RunState::Created => {
                return Err(ComponentError::Refused(
                    "the vCPUs cannot stop: the VM has not started".into(),
                ))
            }
        }
        Ok(())
    }

    /// Runs the vCPUs armed on the way up from STOP, if they are to run.
    fn let_go(&self, i: &mut Inner) -> Result<()> {
        if i.armed.take() == Some(true) {
            self.ctl
                .resume()
                .map_err(|e| ComponentError::Refused(format!("cannot run the vCPUs: {e}")))?;
        }
        Ok(())
    }
}

impl Component for Vcpus {
    fn section(&self) -> Section {
        Section::new("vcpus", VERSION, &[("count", self.vcpus.len().to_string())])
    }

    fn stop_order(&self) -> u8 {
        0
    }

    fn state(&self) -> MigState {
        self.lock().state
    }

    fn set_state(&self, to: MigState) -> Result<()> {
        let mut i = self.lock();
        check_arc(i.state, to)?;
        use MigState::*;
        match (i.state, to) {
            // Armed, never let go: they are still parked.
            (RunningP2p, Stop) if i.armed.is_some() => {
                i.paused_by_us = i.armed.take() == Some(true);
            }
            // (A destination's vCPU threads wait parked from the start: already stopped.)
            (PreCopyP2p, StopCopy) | (RunningP2p, Stop) => self.stop(&mut i)?,
            (PreCopy, Running) | (PreCopyP2p, RunningP2p) => i.throttle = None,
            (Stop, Resuming) => i.loaded = None,
            (Resuming, Stop) if i.loaded.is_none() => {
                return Err(ComponentError::Refused("no vCPU state arrived".into()))
            }
            (Stop, RunningP2p) => {
                let run = match i.loaded {
                    Some(paused) => !paused,
                    None => i.paused_by_us,
                };
                // Refused here, where a destination can still give the VM back, rather
                // than at RUNNING.
                let now = self.ctl.state();
                if run && now != RunState::Paused {
                    return Err(ComponentError::Refused(format!(
                        "cannot run the vCPUs: the VM is {now:?}"
                    )));
                }
                i.paused_by_us = false;
                i.armed = Some(run);
            }
            (RunningP2p, Running) => self.let_go(&mut i)?,
            _ => {}
        }
        i.state = to;
        Ok(())
    }

    fn precopy_info(&self) -> Result<PreCopyInfo> {
        Ok(PreCopyInfo::default())
    }

    fn save(&self) -> Result<Vec<u8>> {
        let i = self.lock();
        expect(i.state, MigState::StopCopy, "save")?;
        let vcpus = self
            .vcpus
            .iter()
            .map(|v| v.lock().unwrap_or_else(|e| e.into_inner()).save())
            .collect::<crate::Result<Vec<_>>>()?;
        encode(
            VERSION,
            &VcpusState {
                paused: i.user_paused,
                saved_at_unix_ns: unix_ns(),
                vcpus,
            },
        )
    }

    fn load(&self, bytes: &[u8]) -> Result<()> {
        let mut i = self.lock();
        expect(i.state, MigState::Resuming, "load")?;
        let s: VcpusState = decode("vCPU", VERSION, bytes)?;
        if s.vcpus.len() != self.vcpus.len() {
            return Err(ComponentError::Refused(format!(
                "state of {} vCPUs for a VM of {}",
                s.vcpus.len(),
                self.vcpus.len()
            )));
        }
        let elapsed_ns = unix_ns().saturating_sub(s.saved_at_unix_ns);
        for (v, st) in self.vcpus.iter().zip(&s.vcpus) {
            let ticks = (elapsed_ns as u128 * st.tsc_khz as u128 / 1_000_000) as u64;
            v.lock()
                .unwrap_or_else(|e| e.into_inner())
                .restore(st, ticks)?;
        }
        i.loaded = Some(s.paused);
        Ok(())
    }

    fn throttle_order(&self) -> Option<u8> {
        // Last: holding the vCPUs back costs the guest everything it does.
        Some(1)
    }

    fn throttle(&self, pct: u32) -> bool {
        let mut i = self.lock();
        if !matches!(i.state, MigState::PreCopy | MigState::PreCopyP2p) {
            return false;
        }
        if pct == 0 {
            i.throttle = None;
            return true;
        }
        if i.throttle.is_none() {
            match Throttle::start(self.ctl.clone()) {
                Ok(t) => i.throttle = Some(t),
                Err(e) => {
                    tracing::warn!("cannot start the throttle: {e}");
                    return false;
                }
            }
        }
        if let Some(t) = &i.throttle {
            t.pct.store(pct.min(99), Ordering::Relaxed);
        }
        true
    }
}
