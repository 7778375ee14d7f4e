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
