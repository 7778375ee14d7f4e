//! Who decides whether vCPUs run: the API (pause, resume, shutdown), the guest (exit, a
//! crash) and the vCPU threads themselves meet here. vCPU threads check in at every exit
//! from KVM_RUN; a thread inside KVM_RUN is kicked out with a signal.

use serde::Serialize;
use std::cell::Cell;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    Created,
    Running,
    Paused,
    Stopped,
}

/// Why the VM stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest asked to exit with this code.
    Guest(i32),
    /// Shut down through the API.
    Shutdown,
    /// The guest crashed (unhandled exception, triple fault, KVM could not run it).
    Crash(String),
    /// The VMM failed.
    Error(String),
    /// The VM now runs elsewhere (live migration or a snapshot file took it).
    Migrated(String),
    /// godwit was asked to stop by this signal (SIGTERM, SIGINT, SIGHUP).
    Signal(i32),
}

struct Inner {
    want: RunState,
    /// vCPU threads alive / parked in a pause.
    active: u32,
    parked: u32,
    exit: Option<VmExit>,
    threads: Vec<libc::pthread_t>,
    /// Their kernel thread ids, in the order they started.
    tids: Vec<libc::pid_t>,
    /// vCPUs wait at their next checkpoint until then (auto-converge throttling).
    hold_until: Option<Instant>,
    /// Who owns pause/resume for now (a migration), refusing them to the API.
    owner: Option<String>,
}

pub struct Control {
    m: Mutex<Inner>,
    cv: Condvar,
}

/// The signal that kicks a vCPU thread out of KVM_RUN.
pub fn kick_signal() -> i32 {
    libc::SIGRTMIN()
}

/// How long a pause waits for every vCPU to park. A vCPU parks within milliseconds
/// unless the host kernel holds it: under PVM, one whose touch of a page still at a
/// post-copy source walks the guest's page tables spins there with the kick pending,
/// until the page comes.
pub const PAUSE_LIMIT: Duration = Duration::from_secs(10);

thread_local! {
    /// The `immediate_exit` byte of the `kvm_run` of the vCPU this thread runs, if any.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

/// A kick that lands after a vCPU thread's checkpoint but before its KVM_RUN would
/// otherwise be lost: the guest would run on until its next exit, which for a halted
/// vCPU, or one waiting on a page that never comes, may be never. Setting
/// `immediate_exit` makes that KVM_RUN return EINTR at once.
extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // A const-initialised Cell without a destructor: no allocation, no lazy set-up,
    // safe in a signal handler.
    let p = IMMEDIATE_EXIT
        .try_with(Cell::get)
        .unwrap_or(std::ptr::null_mut());
    if !p.is_null() {
        // SAFETY: `arm_kicks` registered a byte that stays valid until this thread
        // clears it.
        unsafe { std::ptr::write_volatile(p, 1) };
    }
}

/// Makes kicks of this thread set `flag` (its vCPU's `kvm_run.immediate_exit`); null
/// stops that. The byte must stay valid until this thread clears it.
pub fn arm_kicks(flag: *mut u8) {
    IMMEDIATE_EXIT.with(|c| c.set(flag));
}

/// Installs the (empty) kick handler; KVM_RUN then returns EINTR on a kick.
pub fn install_kick_handler() -> std::io::Result<()> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

impl Default for Control {
    fn default() -> Self {
        Self::new()
    }
}

impl Control {
    pub fn new() -> Self {
        Control {
            m: Mutex::new(Inner {
                want: RunState::Created,
                active: 0,
                parked: 0,
                exit: None,
                threads: Vec::new(),
                tids: Vec::new(),
                hold_until: None,
                owner: None,
            }),
            cv: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.m.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn state(&self) -> RunState {
        let s = self.lock();
        if s.exit.is_some() {
            RunState::Stopped
        } else {
            s.want
        }
    }

    /// A vCPU thread starts: registers itself for kicks.
    pub fn vcpu_started(&self) {
        let mut s = self.lock();
        s.active += 1;
        // SAFETY: pthread_self has no preconditions.
        s.threads.push(unsafe { libc::pthread_self() });
        // SAFETY: gettid has no preconditions.
        s.tids.push(unsafe { libc::gettid() });
    }

    /// The kernel thread ids of the vCPU threads running now (for their scheduling).
    pub fn vcpu_tids(&self) -> Vec<libc::pid_t> {
        self.lock().tids.clone()
    }

    pub fn vcpu_stopped(&self) {
        let mut s = self.lock();
        s.active -= 1;
        // SAFETY: as above.
        let me = unsafe { libc::pthread_self() };
        s.threads.retain(|t| *t != me);
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        s.tids.retain(|t| *t != tid);
        self.cv.notify_all();
    }

    /// Called by a vCPU thread before each KVM_RUN. Parks while paused; false = stop.
    pub fn vcpu_checkpoint(&self) -> bool {
        let mut s = self.lock();
        loop {
            if s.exit.is_some() {
                return false;
            }
            if s.want == RunState::Paused {
                s.parked += 1;
                self.cv.notify_all();
                while s.want == RunState::Paused && s.exit.is_none() {
                    s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner());
                }
                s.parked -= 1;
                continue;
            }
            let now = Instant::now();
            match s.hold_until {
                // A pause that comes while held parks at once (above): leaving for
                // KVM_RUN instead would wait for the next kick, a millisecond of the
                // migration's pause.
                Some(until) if now < until => {
                    s = self
                        .cv
                        .wait_timeout(s, until - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
                _ => return true,
            }
        }
    }

    /// True while the VMM wants the vCPUs out of the guest (pause or exit): a vCPU thread
    /// then completes any I/O the guest has in flight before it parks, so a state saved
    /// while paused never holds a half-done instruction.
    pub fn stopping(&self) -> bool {
        let s = self.lock();
        s.exit.is_some() || s.want == RunState::Paused
    }

    /// Reserves pause/resume (None releases them); fails if already taken. `why` is
    /// what a refused pause or resume hears.
    pub fn set_owner(&self, who: Option<&str>) -> Result<(), String> {
        let mut s = self.lock();
        match (&s.owner, who) {
            (Some(o), Some(_)) => Err(o.clone()),
            _ => {
                s.owner = who.map(String::from);
                Ok(())
            }
        }
    }

    /// Who holds pause/resume, if anyone (the API refuses them meanwhile).
    pub fn owner(&self) -> Option<String> {
        self.lock().owner.clone()
    }

    /// Keeps every vCPU out of the guest for `d` from now (they are kicked out of
    /// KVM_RUN and wait at their checkpoint). Throttling slows a guest that dirties
    /// memory faster than a migration can carry it.
    pub fn hold(&self, d: Duration) {
        let mut s = self.lock();
        s.hold_until = Some(Instant::now() + d);
        Self::kick(&s);
    }

    /// Blocks a vCPU thread for up to `d`, ending early if the VMM needs the thread.
    pub fn vcpu_sleep(&self, d: Duration) {
        let end = Instant::now() + d;
        let mut s = self.lock();
        while s.exit.is_none() && s.want != RunState::Paused {
            let now = Instant::now();
            if now >= end {
                return;
            }
            s = self
                .cv
                .wait_timeout(s, end - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn kick(s: &Inner) {
        for &t in &s.threads {
            // SAFETY: the thread is registered only while it runs (removed under the same
            // lock before it exits), so the handle is valid.
            unsafe { libc::pthread_kill(t, kick_signal()) };
        }
    }

    /// Stops the VM for good; the first reason given wins.
    pub fn request_exit(&self, why: VmExit) {
        let mut s = self.lock();
        if s.exit.is_none() {
            s.exit = Some(why);
        }
        Self::kick(&s);
        self.cv.notify_all();
    }

    /// The vCPU threads are launched: the VM runs from now on, as far as anyone asking
    /// is concerned, not from whenever the first thread is scheduled (under load that
    /// was long enough for an orchestrator to read the VM as not yet started).
    pub fn launched(&self) {
        let mut s = self.lock();
        if s.want == RunState::Created {
            s.want = RunState::Running;
        }
    }

    /// Makes vCPU threads started from now on park at their first checkpoint, so they
    /// can be created ahead of time (a migration destination does this before the state
    /// arrives); `resume` lets them run.
    pub fn stage(&self) {
        let mut s = self.lock();
        if s.want == RunState::Created {
            s.want = RunState::Paused;
        }
    }

    /// Waits until `n` vCPU threads are parked (parking notifies); false after `limit`
    /// or if the VM stopped.
    pub fn wait_parked(&self, n: u32, limit: Duration) -> bool {
        let end = Instant::now() + limit;
        let mut s = self.lock();
        while s.parked < n && s.exit.is_none() {
            let now = Instant::now();
            if now >= end {
                return false;
            }
            s = self
                .cv
                .wait_timeout(s, end - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        s.exit.is_none()
    }

    /// Pauses every vCPU and returns once all are parked (or the VM stopped), or fails
    /// after `PAUSE_LIMIT`.
    pub fn pause(&self) -> Result<(), &'static str> {
        self.pause_within(PAUSE_LIMIT)
    }

    /// `pause`, giving up after `limit`: the vCPUs then run on, as they did.
    pub fn pause_within(&self, limit: Duration) -> Result<(), &'static str> {
        let end = Instant::now() + limit;
        let mut s = self.lock();
        match (s.exit.is_some(), s.want) {
            (true, _) | (_, RunState::Stopped) => return Err("the VM has stopped"),
            (_, RunState::Paused) => return Err("the VM is already paused"),
            (_, RunState::Created) => return Err("the VM has not started"),
            _ => {}
        }
        s.want = RunState::Paused;
        self.cv.notify_all();
        // A kick can land just before a thread enters KVM_RUN; kick again until all park.
        while s.parked < s.active && s.exit.is_none() {
            if Instant::now() >= end {
                s.want = RunState::Running;
                self.cv.notify_all();
                return Err(
                    "a vCPU did not stop in time (it may wait for memory still at a \
                            post-copy source); the VM runs on",
                );
            }
            Self::kick(&s);
            s = self
                .cv
                .wait_timeout(s, Duration::from_millis(1))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        if s.exit.is_some() {
            return Err("the VM stopped while pausing");
        }
        Ok(())
    }

    pub fn resume(&self) -> Result<(), &'static str> {
        let mut s = self.lock();
        if s.exit.is_some() {
            return Err("the VM has stopped");
        }
        if s.want != RunState::Paused {
            return Err("the VM is not paused");
        }
        s.want = RunState::Running;
        self.cv.notify_all();
        Ok(())
    }

    /// Waits until the VM is told to stop (its vCPU threads may still be leaving).
    pub fn wait_exit_requested(&self) -> VmExit {
        let mut s = self.lock();
        loop {
            if let Some(e) = &s.exit {
                return e.clone();
            }
            s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// `wait_exit_requested`, for at most `limit`.
    pub fn exit_requested_within(&self, limit: Duration) -> Option<VmExit> {
        let s = self.lock();
        let (s, _) = self
            .cv
            .wait_timeout_while(s, limit, |s| s.exit.is_none())
            .unwrap_or_else(|e| e.into_inner());
        s.exit.clone()
    }

    /// Waits until the VM has stopped and every vCPU thread has left.
    pub fn wait_exit(&self) -> VmExit {
        let mut s = self.lock();
        while s.exit.is_none() || s.active > 0 {
            s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.exit.clone().expect("checked")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    /// A thread that stands in for a vCPU: each pass through its loop is one KVM_RUN.
    fn vcpu(ctl: Arc<Control>, runs: Arc<AtomicU32>) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            ctl.vcpu_started();
            while ctl.vcpu_checkpoint() {
                runs.fetch_add(1, Ordering::SeqCst);
                // The guest runs until a kick (the signal interrupts no sleep here: the
                // pause kicks again every millisecond until the thread parks).
                std::thread::sleep(Duration::from_micros(200));
            }
            ctl.vcpu_stopped();
        })
    }

    /// A kick that lands outside KVM_RUN is not lost: it sets the armed byte, which
    /// the next KVM_RUN (`immediate_exit`) answers with EINTR at once.
    #[test]
    fn a_kick_sets_the_armed_immediate_exit_of_its_thread_only() {
        install_kick_handler().unwrap();
        let kick_me = || {
            // SAFETY: signals this very thread, whose handler is installed.
            assert_eq!(
                unsafe { libc::pthread_kill(libc::pthread_self(), kick_signal()) },
                0
            )
        };
        let mut flag = Box::new(0u8);
        let other = Box::new(0u8);
        arm_kicks(&mut *flag);
        let p = &*other as *const u8 as usize;
        std::thread::spawn(move || arm_kicks(p as *mut u8))
            .join()
            .unwrap();
        kick_me();
        // SAFETY: the byte is alive; the handler wrote it on this thread.
        assert_eq!(unsafe { std::ptr::read_volatile(&*flag) }, 1);
        assert_eq!(*other, 0, "another thread's byte was set");
        *flag = 0;
        arm_kicks(std::ptr::null_mut());
        kick_me();
        // SAFETY: as above.
        assert_eq!(unsafe { std::ptr::read_volatile(&*flag) }, 0);
    }

    /// A vCPU that does not come out of the guest fails the pause, after its limit,
    /// and the others run on: nothing is left half-paused.
    #[test]
    fn a_pause_that_cannot_park_every_vcpu_gives_up_and_runs_on() {
        install_kick_handler().unwrap();
        let ctl = Arc::new(Control::new());
        ctl.launched();
        let runs = Arc::new(AtomicU32::new(0));
        let free = vcpu(ctl.clone(), runs.clone());
        // Stuck: registered, deaf to kicks, not at its checkpoint until let go.
        let go = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stuck = {
            let (ctl, go) = (ctl.clone(), go.clone());
            std::thread::spawn(move || {
                ctl.vcpu_started();
                while !go.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(1));
                }
                while ctl.vcpu_checkpoint() {
                    std::thread::sleep(Duration::from_micros(200));
                }
                ctl.vcpu_stopped();
            })
        };
        // Both registered (on a loaded host the stuck one may start late: paused
        // before it counts, the pause parks only the free one and succeeds), and the
        // free one running.
        while runs.load(Ordering::SeqCst) == 0 || ctl.vcpu_tids().len() < 2 {
            std::thread::sleep(Duration::from_millis(1));
        }
        let e = ctl.pause_within(Duration::from_millis(200)).unwrap_err();
        assert!(e.contains("did not stop"), "{e}");
        assert_eq!(ctl.state(), RunState::Running);
        let before = runs.load(Ordering::SeqCst);
        while runs.load(Ordering::SeqCst) == before {
            std::thread::sleep(Duration::from_millis(1));
        }
        // Once it comes out, a pause parks both.
        go.store(true, Ordering::SeqCst);
        ctl.pause().unwrap();
        assert_eq!(ctl.state(), RunState::Paused);
        ctl.request_exit(VmExit::Shutdown);
        free.join().unwrap();
        stuck.join().unwrap();
    }

    #[test]
    fn a_pause_parks_a_held_vcpu_without_running_it_first() {
        install_kick_handler().unwrap();
        let ctl = Arc::new(Control::new());
        ctl.launched();
        // Held from its first checkpoint, as a throttled vCPU is between its slices.
        ctl.hold(Duration::from_secs(60));
        let runs = Arc::new(AtomicU32::new(0));
        let t = vcpu(ctl.clone(), runs.clone());
        // Give it time to reach the hold (if it has not, it parks at its first
        // checkpoint and the test proves less, never more).
        std::thread::sleep(Duration::from_millis(50));
        ctl.pause().unwrap();
        assert_eq!(
            runs.load(Ordering::SeqCst),
            0,
            "the held vCPU ran before it parked"
        );
        ctl.resume().unwrap();
        // Still held: resuming does not end the hold.
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(runs.load(Ordering::SeqCst), 0);
        ctl.hold(Duration::ZERO);
        ctl.cv.notify_all();
        let end = Instant::now() + Duration::from_secs(10);
        while runs.load(Ordering::SeqCst) == 0 && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(runs.load(Ordering::SeqCst) > 0, "the vCPU never ran again");
        ctl.request_exit(VmExit::Shutdown);
        t.join().unwrap();
    }
}
