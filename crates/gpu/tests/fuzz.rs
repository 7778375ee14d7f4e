//! Fuzzing the command decoder and the engine with hostile ring entries (seeded, so a
//! failure reproduces; GODWIT_FUZZ_ITERS sets the count).

mod common;

use common::*;
use godwit_gpu::abi::{control, err, kernel, op, reg, ENTRY_SIZE};
use godwit_gpu::command::{decode, encode, Command};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn iters(default: u64) -> u64 {
    std::env::var("GODWIT_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn decoder_never_panics_and_accepts_only_sane_entries() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut accepted = 0;
    for i in 0..iters(200_000) {
        let mut e = [0u8; ENTRY_SIZE];
        if i % 2 == 0 {
            for b in e.iter_mut() {
                *b = rng.next() as u8;
            }
        } else {
            // Near-valid: a real opcode and kernel id, random arguments, some flipped bits.
            let opc = (rng.next() % 8) as u16;
            let mut a = [0u64; 6];
            for v in a.iter_mut() {
                *v = match rng.next() % 4 {
                    0 => rng.next(),
                    1 => rng.next() % 64,
                    2 => (rng.next() % 4096) << 12,
                    _ => u64::MAX - rng.next() % 8,
                };
            }
            a[0] = if opc == op::KERNEL {
                rng.next() % 11
            } else {
                a[0]
            };
            e = encode(opc, Some(rng.next()), a);
            if rng.next().is_multiple_of(4) {
                let bit = rng.next() % 512;
                e[(bit / 8) as usize] ^= 1 << (bit % 8);
            }
        }
        if let Ok(entry) = decode(&e) {
            accepted += 1;
            match entry.cmd {
                Command::Copy { bytes, .. } => assert!(bytes > 0 && bytes <= 1 << 39),
                Command::Fill { bytes, .. } => assert!(bytes > 0 && bytes % 4 == 0),
                Command::Kernel(k) => {
                    assert!(k.units() > 0 && k.chunk() > 0);
                    for o in k.operands() {
                        assert!(o.bytes > 0 && o.bytes <= 1 << 41);
                    }
                }
                _ => {}
            }
        }
    }
    assert!(
        accepted > 1000,
        "the near-valid half should often decode ({accepted})"
    );
}

#[test]
fn hostile_rings_are_contained_to_the_vf() {
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let mut d = Driver::new();
    // A canary in VRAM and in guest RAM that no mapped VA in the commands below reaches:
    // commands only use VAs inside the first 4 MiB of VRAM, or wild ones.
    d.run(op::FILL, [32 << 20, 1 << 20, 0xa5a5_a5a5, 0, 0, 0])
        .unwrap();
    let mut errors = 0;
    for _ in 0..iters(20_000) / 10 {
        let opc = (rng.next() % 9) as u16;
        let mut a = [0u64; 6];
        for v in a.iter_mut() {
            *v = match rng.next() % 5 {
                0 => rng.next(),
                1 => rng.next() % (4 << 20),
                2 => rng.next() % 4096,
                3 => (1 << 30) + rng.next() % 4096,
                _ => 0,
            };
        }
        if opc == op::KERNEL {
            a[0] = 1 + rng.next() % 9;
            // Keep sizes small so the run stays short.
            for v in a[1..].iter_mut() {
                if *v > 4 << 20 {
                    *v %= 1 << 22;
                }
            }
        }
        if opc == op::COPY || opc == op::FILL {
            a[if opc == op::COPY { 2 } else { 1 }] %= 1 << 16;
        }
        let f = d.submit(opc, a);
        if d.wait(f).is_err() {
            errors += 1;
            w(&d.vf, reg::CONTROL, control::CLEAR_ERROR);
        }
    }
    assert!(
        errors > 100,
        "hostile commands should fail often ({errors})"
    );
    let mut b = vec![0u8; 1 << 20];
    d.vf.backend().read(32 << 20, &mut b).unwrap();
    assert!(
        b.iter().all(|&x| x == 0xa5),
        "VRAM outside the reachable range changed"
    );
    // The VF still computes correctly.
    d.run(op::FILL, [0, 4096, 0x3f80_0000, 0, 0, 0]).unwrap();
    d.run(op::KERNEL, [kernel::REDUCE_SUM, 0, 1024, 8192, 0, 0])
        .unwrap();
    let mut s = [0u8; 8];
    d.vf.backend().read(8192, &mut s).unwrap();
    assert_eq!(f64::from_le_bytes(s), 1024.0);
    assert_eq!(r(&d.vf, reg::ERROR) as u32, err::NONE);
}

/// Saved VF states from a hostile migration stream: bytes flipped in the encoding and
/// fields set to random or edge values. Each is refused with an error, or restores into
/// a state the engine then runs without panicking (and which RESET clears).
#[test]
fn hostile_saved_states_never_crash_the_engine() {
    use godwit_gpu::{Hold, VfState};
    let mut rng = Rng(0x0bad_5eed_cafe_f00d);
    let mut d = Driver::new();
    // A state with a command in flight: a long AXPY paused mid-way. How far the engine
    // got in a given time depends on the host's load: pause until it is caught mid-way
    // (and submit again if it finished).
    let n = 4_000_000u64;
    let mut fence = d.submit(op::KERNEL, [kernel::AXPY, 0, n * 4, n, 0x3f00_0000, 0]);
    let mut good = None;
    for _ in 0..1000 {
        std::thread::sleep(std::time::Duration::from_micros(500));
        d.vf.pause(Hold::Migration);
        let s = d.vf.save_state().unwrap();
        if s.in_flight.is_some() {
            good = Some(s);
            break;
        }
        d.vf.resume(Hold::Migration);
        if d.wait(fence).is_ok() {
            fence = d.submit(op::KERNEL, [kernel::AXPY, 0, n * 4, n, 0x3f00_0000, 0]);
        }
    }
    let good = good.expect("never caught the AXPY in flight");
    let bytes = good.encode();
    let edge = |rng: &mut Rng| match rng.next() % 6 {
        0 => 0,
        1 => u64::MAX,
        2 => rng.next() % 128,
        3 => 1 << (rng.next() % 64),
        4 => VRAM - 4096 + rng.next() % 8192,
        _ => rng.next(),
    };
    let (mut refused, mut taken) = (0, 0);
    for i in 0..iters(20_000) / 10 {
        let s = if i % 2 == 0 {
            let mut b = bytes.clone();
            for _ in 0..1 + rng.next() % 4 {
                let at = (rng.next() % b.len() as u64) as usize;
                b[at] ^= 1 << (rng.next() % 8);
            }
            match VfState::decode(&b) {
                Ok(s) => s,
                Err(_) => {
                    refused += 1;
                    continue;
                }
            }
        } else {
            let mut s = good.clone();
            let r = &mut s.regs;
            match rng.next() % 9 {
                0 => r.ring_size = edge(&mut rng),
                1 => r.ring_base = edge(&mut rng),
                2 => r.head = edge(&mut rng),
                3 => r.pt_root = edge(&mut rng),
                4 => r.error = edge(&mut rng),
                5 => r.enabled = !r.enabled,
                _ => {
                    let f = s.in_flight.as_mut().expect("in flight");
                    match rng.next() % 3 {
                        0 => f.done = edge(&mut rng),
                        1 => f.entry[(rng.next() % 8) as usize] = edge(&mut rng),
                        _ => f.index = edge(&mut rng),
                    }
                }
            }
            s
        };
        match d.vf.restore_state(&s) {
            Err(_) => refused += 1,
            Ok(()) => {
                taken += 1;
                // Let the engine take whatever this is for a moment, then drop it.
                d.vf.resume(Hold::Migration);
                std::thread::sleep(std::time::Duration::from_micros(200));
                w(&d.vf, reg::CONTROL, control::RESET);
                d.vf.pause(Hold::Migration);
            }
        }
        assert!(
            !d.thread.as_ref().unwrap().is_finished(),
            "the engine thread died on case {i}"
        );
    }
    assert!(
        refused > 100 && taken > 10,
        "{refused} refused, {taken} taken"
    );
    // The VF still works from a clean state.
    d.vf.restore_state(&good).unwrap();
    w(&d.vf, reg::CONTROL, control::RESET);
    w(&d.vf, reg::CONTROL, control::ENABLE);
    d.vf.resume(Hold::Migration);
    d.tail = 0;
    d.run(op::FILL, [0, 4096, 0x3f80_0000, 0, 0, 0]).unwrap();
    assert_eq!(r(&d.vf, reg::ERROR) as u32, err::NONE);
}
