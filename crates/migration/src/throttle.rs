//! Auto-converge: when a guest dirties memory faster than the link carries it, hold its
//! vCPUs out of the guest for a share of every time slice (QEMU's cpu-throttle idea, with
//! the same 10 ms slice). The driver chooses the share; this only applies it.

use godwit_vmm::control::Control;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

const SLICE: Duration = Duration::from_millis(10);

pub struct Throttle {
    pct: Arc<AtomicU32>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Throttle {
    pub fn start(ctl: Arc<Control>) -> std::io::Result<Throttle> {
        let pct = Arc::new(AtomicU32::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (pct.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("throttle".into())
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    let pct = p.load(Ordering::Relaxed).min(99);
                    if pct == 0 {
                        std::thread::sleep(SLICE);
                        continue;
                    }
                    let held = SLICE * pct / 100;
                    ctl.hold(held);
                    std::thread::sleep(SLICE);
                }
            })?;
        Ok(Throttle {
            pct,
            stop,
            thread: Some(thread),
        })
    }

    pub fn set(&self, pct: u32) {
        self.pct.store(pct.min(99), Ordering::Relaxed);
    }

    pub fn get(&self) -> u32 {
        self.pct.load(Ordering::Relaxed)
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
