//! SIGTERM, SIGINT and SIGHUP end godwit cleanly: a migration in progress is cancelled
//! (before GO; after GO it is left to finish, since the VM then belongs to the
//! destination), the vCPUs stop, the API socket and a waiting destination's socket are
//! removed, the reason is said, and the exit status is 128 + the signal's number, as a
//! shell reports a process killed by it.

use crate::output::say;
use godwit_migration::Status;
use godwit_vmm::{VmExit, VmHandle};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What a signal has to stop: nothing yet (only files to remove), or a VM.
#[derive(Default)]
pub struct Stopper {
    vm: Mutex<Option<(VmHandle, Arc<Status>)>>,
    files: Mutex<Vec<PathBuf>>,
}

pub fn name(sig: i32) -> &'static str {
    match sig {
        SIGTERM => "SIGTERM",
        SIGINT => "SIGINT",
        SIGHUP => "SIGHUP",
        _ => "a signal",
    }
}

impl Stopper {
    /// Files a signal removes if it comes before the VM exists.
    pub fn remove_on_signal(&self, p: PathBuf) {
        self.files.lock().unwrap_or_else(|e| e.into_inner()).push(p);
    }

    /// From now on a signal stops this VM (and its migration).
    pub fn watch(&self, h: VmHandle, status: Arc<Status>) {
        *self.vm.lock().unwrap_or_else(|e| e.into_inner()) = Some((h, status));
    }

    fn stop(&self, sig: i32) {
        let vm = self.vm.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let Some((h, status)) = vm else {
            say(&format!("{}: stopping before the VM exists", name(sig)));
            for p in self.files.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                let _ = std::fs::remove_file(p);
            }
            std::process::exit(128 + sig);
        };
        if status.active.load(std::sync::atomic::Ordering::SeqCst) {
            let why = format!("godwit was stopped by {}", name(sig));
            match status.request_stop(why, Duration::from_secs(1)) {
                Ok(()) => {
                    say(&format!("{}: cancelling the migration", name(sig)));
                    // Its end resumes the VM; the stop below follows it.
                    for _ in 0..500 {
                        if !status.active.load(std::sync::atomic::Ordering::SeqCst) {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
                Err(m) => {
                    say(&format!("{}: not stopping: {m}", name(sig)));
                    return;
                }
            }
        }
        say(&format!("{}: stopping the VM", name(sig)));
        h.ctl.request_exit(VmExit::Signal(sig));
    }
}

/// Starts the thread that waits for the signals.
pub fn install() -> std::io::Result<Arc<Stopper>> {
    let stopper = Arc::new(Stopper::default());
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    let s = stopper.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                s.stop(sig);
            }
        })?;
    Ok(stopper)
}
