//! A VF's state is one a destination takes whatever its guest did: a migration that
//! the guest's own register writes could make fail would leave its VM unmovable.

mod common;

use common::*;
use godwit_gpu::abi::{control, err, kernel, op, reg};
use godwit_gpu::cpu::CpuBackend;
use godwit_gpu::sched::Unshared;
use godwit_gpu::{Hold, Vf};
use std::time::Duration;

/// A doorbell outside the ring while a command is in flight stops the ring with the
/// command still in flight (it goes on after CLEAR_ERROR). A migration then must take
/// that state as it is: once, the destination refused it, so a guest could make its own
/// VM unmovable (found by the gpu_engine fuzz target).
#[test]
fn a_bad_doorbell_during_a_command_still_migrates() {
    let n = 4_000_000u64;
    // Whole numbers: every sum of them below is exact.
    let x: Vec<f32> = (0..n).map(|i| (i * 7919 % 1000) as f32 - 500.0).collect();
    let mut d = Driver::new();
    d.put_f32(0, &x);
    d.run(op::COPY, [0, SYS, n * 4, 0, 0, 0]).unwrap();
    d.run(op::FILL, [n * 4, n * 4, 0, 0, 0, 0]).unwrap();
    let axpy = [kernel::AXPY, 0, n * 4, n, 2.0f32.to_bits() as u64, 0];
    let mut fence = d.submit(op::KERNEL, axpy);
    let mut runs = 1;
    // Catch it in flight (how far it gets in a given time depends on the host's load).
    let state = loop {
        std::thread::sleep(Duration::from_micros(300));
        d.vf.pause(Hold::Migration);
        w(&d.vf, reg::RING_TAIL, 999);
        let s = d.vf.save_state().unwrap();
        if s.in_flight.is_some() {
            break s;
        }
        w(&d.vf, reg::CONTROL, control::CLEAR_ERROR);
        d.vf.resume(Hold::Migration);
        if d.wait(fence).is_ok() {
            // Done before the catch (each adds 2x to y): once more.
            fence = d.submit(op::KERNEL, axpy);
            runs += 1;
        }
    };
    assert_eq!(state.regs.error as u32, err::BAD_TAIL);
    let fresh = Vf::new(
        Box::new(CpuBackend::new(VRAM).unwrap()),
        d.ram.clone(),
        Box::new(Unshared),
    );
    let mut buf = vec![0u8; VRAM as usize];
    d.vf.backend().read(0, &mut buf).unwrap();
    fresh.backend().write(0, &buf).unwrap();
    fresh.restore_state(&state).unwrap();
    let mut to = Driver::with(fresh, d.ram.clone(), false);
    (to.tail, to.fence) = (d.tail, d.fence);
    w(&to.vf, reg::CONTROL, control::CLEAR_ERROR);
    to.wait(fence).unwrap();
    let y = to.vram_f32(n * 4, n as usize);
    for i in (0..n as usize).step_by(7919) {
        assert_eq!(
            y[i],
            2.0 * runs as f32 * x[i],
            "element {i} after {runs} AXPYs"
        );
    }
}
