//! Fuzzing the receiving side with hostile streams: random bytes, damaged real streams,
//! and (past the CRC) damaged payloads re-framed with a valid CRC. Every input must give
//! a result or a clear error: never a panic, never a write outside guest RAM. Seeded, so
//! a failure reproduces; GODWIT_FUZZ_ITERS sets the length (default 20000 per shape).

use godwit_migration::destination::{apply, check_hello, drain, Expect};
use godwit_migration::wire::{self, Frame, Hello, Kind, Totals, PAGE_SIZE};
use godwit_vmm::memory::{self, GuestMemory, RamRegion};
use godwit_vmm::state::{GuestKind, VmShape, VmState};
use vm_memory::{Bytes, GuestAddress};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn iters() -> usize {
    std::env::var("GODWIT_FUZZ_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20000)
}

const MEM: u64 = 16 << 20;

fn setup() -> (GuestMemory, Vec<RamRegion>) {
    (memory::create(MEM).unwrap(), memory::layout(MEM))
}

fn hello() -> Hello {
    Hello {
        wire_version: wire::WIRE_VERSION,
        state_version: godwit_vmm::state::STATE_VERSION,
        shape: VmShape {
            ram: memory::layout(MEM),
            vcpus: 1,
            kind: GuestKind::Godwit,
            pci: vec![(0, "host-bridge".into())],
        },
        guest: "fuzz".into(),
        memory_mib: MEM >> 20,
        connections: 1,
        session: 7,
        snapshot: false,
    }
}

/// The payloads of a small valid stream, frame by frame.
fn frames() -> Vec<(Kind, Vec<u8>)> {
    let mut out = Vec::new();
    let mut push = |f: &Frame| {
        let mut b = Vec::new();
        wire::write_frame(&mut b, f).unwrap();
        out.push((f.kind(), b[wire::HEADER_LEN..].to_vec()));
    };
    let data: Vec<u8> = (0..3 * PAGE_SIZE).map(|i| (i * 7) as u8).collect();
    push(&Frame::Pages {
        gpas: vec![0, 8 * 4096, (MEM - 4096)],
        data: &data,
    });
    push(&Frame::Zero(vec![(4096, 3), (1 << 20, 16)]));
    // A state payload as the source encodes it: the version, then postcard bytes (these
    // are truncated, so they never decode: the fuzzer must only never panic on them).
    let mut state = godwit_vmm::state::STATE_VERSION.to_le_bytes().to_vec();
    state.extend_from_slice(&[3, 1, 0, 0, 0, 0, 0, 0, 0, 16, 1, 1]);
    push(&Frame::State(&state));
    push(&Frame::Complete(Totals {
        pages: 3,
        zero_pages: 19,
    }));
    out
}

fn stream(frames: &[(Kind, Vec<u8>)]) -> Vec<u8> {
    let mut s = Vec::new();
    for (k, p) in frames {
        wire::write_raw(&mut s, *k, p).unwrap();
    }
    s
}

fn mutate(rng: &mut Rng, b: &mut Vec<u8>) {
    for _ in 0..1 + rng.below(4) {
        if b.is_empty() {
            b.push(rng.next() as u8);
            continue;
        }
        match rng.below(6) {
            0 => {
                let i = rng.below(b.len());
                b[i] ^= 1 << rng.below(8);
            }
            1 => {
                let i = rng.below(b.len());
                b[i] = [0, 0xff, 0x7f, 0x80][rng.below(4)];
            }
            2 => b.truncate(rng.below(b.len())),
            3 => {
                let i = rng.below(b.len());
                let n = rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                b.splice(i..i, bytes);
            }
            4 => {
                // A 32-bit field set to something extreme.
                if b.len() >= 4 {
                    let i = rng.below(b.len() - 3);
                    let v = [0u32, 1, 64, 65, u32::MAX, 1 << 31][rng.below(6)];
                    b[i..i + 4].copy_from_slice(&v.to_le_bytes());
                }
            }
            _ => {
                let i = rng.below(b.len());
                let j = rng.below(b.len());
                let (lo, hi) = (i.min(j), i.max(j));
                let dup = b[lo..hi].to_vec();
                b.extend_from_slice(&dup);
            }
        }
    }
}

/// What the destination does with a main connection's stream after HELLO.
fn receive(bytes: &[u8]) -> Result<(), String> {
    let (mem, ram) = setup();
    let (_, state) = drain(&mut &bytes[..], &mem, &ram, Kind::Complete)?;
    let state = state.ok_or("no state")?;
    VmState::decode(&state).map(|_| ())
}

#[test]
fn fuzz_state_decoder() {
    let mut rng = Rng(0xD1B5_4A32_D192_ED03);
    let version = godwit_vmm::state::STATE_VERSION.to_le_bytes();
    assert!(VmState::decode(&[]).is_err());
    assert!(VmState::decode(&[9, 0, 0, 0])
        .err()
        .is_some_and(|e| e.contains("version 9")));
    for _ in 0..iters() {
        let mut b = version.to_vec();
        let n = rng.below(4096);
        b.extend((0..n).map(|_| match rng.below(4) {
            // Small values and varint continuation bytes steer postcard into long
            // sequences and deep structures.
            0 => 0,
            1 => 0x80 | rng.next() as u8,
            _ => rng.next() as u8,
        }));
        // Never a panic or a huge allocation; a clear error (a random valid state is
        // not a concern).
        let _ = VmState::decode(&b);
    }
}

#[test]
fn the_valid_stream_is_received() {
    let (mem, ram) = setup();
    let s = stream(&frames());
    let (t, state) = drain(&mut &s[..], &mem, &ram, Kind::Complete).unwrap();
    assert_eq!(
        t,
        Totals {
            pages: 3,
            zero_pages: 19
        }
    );
    assert!(state.is_some());
    let mut b = [0u8; 1];
    mem.read_slice(&mut b, GuestAddress(8 * 4096 + 1)).unwrap();
    assert_eq!(b[0], 7);
}

#[test]
fn fuzz_damaged_streams() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let valid = stream(&frames());
    let mut errors = 0;
    for _ in 0..iters() {
        let mut s = valid.clone();
        mutate(&mut rng, &mut s);
        if receive(&s).is_err() {
            errors += 1;
        }
    }
    assert!(errors > iters() / 2, "mutations should mostly be caught");
}

#[test]
fn fuzz_payloads_behind_a_valid_crc() {
    let mut rng = Rng(0xD1B5_4A32_D192_ED03);
    let base = frames();
    for _ in 0..iters() {
        let mut f = base.clone();
        let i = rng.below(f.len());
        mutate(&mut rng, &mut f[i].1);
        if rng.below(4) == 0 {
            f[i].0 = [Kind::Pages, Kind::Zero, Kind::State, Kind::End, Kind::Join][rng.below(5)];
        }
        let _ = receive(&stream(&f));
        // Page frames alone, straight into apply(): every address is checked first.
        let (mem, ram) = setup();
        if let Ok(fr) = wire::decode(f[i].0, &f[i].1) {
            let _ = apply(&mem, &ram, &fr, &mut Totals::default());
        }
    }
}

#[test]
fn fuzz_random_bytes() {
    let mut rng = Rng(0x1234_5678_9ABC_DEF1);
    for _ in 0..iters() {
        let n = rng.below(256);
        let mut b: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
        if rng.below(2) == 0 && b.len() >= 4 {
            b[..4].copy_from_slice(&wire::MAGIC.to_le_bytes());
        }
        assert!(receive(&b).is_err());
        let mut buf = Vec::new();
        let _ = wire::read_frame(&mut &b[..], &mut buf);
    }
}

#[test]
fn fuzz_hello() {
    let mut rng = Rng(0xA076_1D64_78BD_642F);
    let valid = serde_json::to_vec(&hello()).unwrap();
    let e = Expect::default();
    check_hello(&hello(), &e).unwrap();
    for _ in 0..iters() {
        let mut p = valid.clone();
        mutate(&mut rng, &mut p);
        if let Ok(Frame::Hello(h)) = wire::decode(Kind::Hello, &p) {
            let _ = check_hello(&h, &e);
        }
    }
}

#[test]
fn out_of_range_pages_touch_nothing() {
    let (mem, ram) = setup();
    let page = vec![0xabu8; PAGE_SIZE];
    for gpa in [MEM, MEM - 1, 1, u64::MAX - 4095, 3 << 30, 1 << 40] {
        let f = Frame::Pages {
            gpas: vec![0, gpa],
            data: &[page.clone(), page.clone()].concat(),
        };
        assert!(
            apply(&mem, &ram, &f, &mut Totals::default()).is_err(),
            "{gpa:#x}"
        );
    }
    for (g, n) in [(0, u32::MAX), (MEM - 4096, 2), (u64::MAX - 4095, 1), (0, 0)] {
        assert!(apply(
            &mem,
            &ram,
            &Frame::Zero(vec![(g, n)]),
            &mut Totals::default()
        )
        .is_err());
    }
    // The valid first page of each bad frame was not written either.
    let mut b = [0u8; 1];
    mem.read_slice(&mut b, GuestAddress(0)).unwrap();
    assert_eq!(b[0], 0);
}
