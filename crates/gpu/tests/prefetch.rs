//! Post-copy: with pages of its memory possibly missing, the engine brings in what a
//! command touches (its ring entry, the page tables, its operands) before it runs the
//! command, and so before it holds the shared GPU; with nobody else at the engine it
//! does not wait for that.

mod common;

use common::*;
use godwit_gpu::abi::{op, reg};
use godwit_gpu::Prefetch;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// What the engine asked for: VRAM ranges, guest RAM ranges; and whether it may go on.
type Asked = (Vec<(u64, u64)>, Vec<(u64, u64)>, bool);

/// Records what the engine asks for and holds it until let go.
#[derive(Default)]
struct Gate {
    asked: Mutex<Asked>,
    cv: Condvar,
}

impl Gate {
    fn open(&self) {
        self.asked.lock().unwrap().2 = true;
        self.cv.notify_all();
    }
    fn wait_open(&self) {
        let mut g = self.asked.lock().unwrap();
        while !g.2 {
            g = self.cv.wait(g).unwrap();
        }
    }
}

impl Prefetch for Gate {
    fn active(&self) -> bool {
        true
    }
    fn vram(&self, off: u64, len: u64) {
        self.asked.lock().unwrap().0.push((off, len));
        self.wait_open();
    }
    fn ram(&self, gpa: u64, len: u64) {
        self.asked.lock().unwrap().1.push((gpa, len));
        self.wait_open();
    }
}

fn covers(ranges: &[(u64, u64)], at: u64, len: u64) -> bool {
    (at..at + len)
        .step_by(4096)
        .all(|p| ranges.iter().any(|&(o, l)| p >= o && p < o + l))
}

#[test]
fn a_command_runs_only_once_its_pages_are_brought_in() {
    let mut d = Driver::new();
    let gate = Arc::new(Gate::default());
    d.vf.set_prefetch(Some(gate.clone()), true);
    // VRAM 1 MiB -> VRAM 3 MiB, 64 KiB.
    let f = d.submit(op::COPY, [3 << 20, 1 << 20, 64 << 10, 0, 0, 0]);
    std::thread::sleep(Duration::from_millis(300));
    // Held at the gate: the command has not run.
    assert!(r(&d.vf, reg::FENCE) < f);
    gate.open();
    d.wait(f).unwrap();
    let g = gate.asked.lock().unwrap();
    // Its ring entry (guest RAM), then both operands (VRAM).
    assert!(covers(&g.1, RING, 64), "{:?}", g.1);
    assert!(covers(&g.0, 1 << 20, 64 << 10), "{:?}", g.0);
    assert!(covers(&g.0, 3 << 20, 64 << 10), "{:?}", g.0);
}

#[test]
fn alone_at_the_engine_a_command_does_not_wait_for_its_pages() {
    let mut d = Driver::new();
    let gate = Arc::new(Gate::default());
    // Only while another VF wants the engine (never, here: the engine is not shared).
    d.vf.set_prefetch(Some(gate.clone()), false);
    d.run(op::FILL, [2 << 20, 4096, 7, 0, 0, 0]).unwrap();
    let g = gate.asked.lock().unwrap();
    assert!(g.0.is_empty() && g.1.is_empty(), "{:?}", *g);
}
