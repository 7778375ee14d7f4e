//! Fuzzing the receiving side with hostile streams: random bytes, damaged real streams,
//! and (past the CRC) damaged payloads re-framed with a valid CRC, fed to the
//! components of a real incoming VM (guest RAM, vCPUs, platform devices, a GPU
//! function). Every input must give a result or a clear error: never a panic, never a
//! write outside the VM's memory. Seeded, so a failure reproduces; GODWIT_FUZZ_ITERS
//! sets the length (default 20000 per shape; the stream shapes run a tenth of that,
//! each feeding a VM).

mod common;

use common::kvm_available;
use godwit_migration::damaged::Damaged;
use godwit_migration::destination::{drain, in_order, Event};
use godwit_migration::lacks;
use godwit_migration::wire::{self, Frame, Hello, Kind, Totals, PAGE_SIZE};
use godwit_vmm::config::GpuRequest;
use godwit_vmm::migratable::{incoming, step_to, Component, MigState, PageSource};
use godwit_vmm::state::GuestKind;
use godwit_vmm::{Console, Payload, Vm, VmConfig};
use std::path::{Path, PathBuf};
use std::sync::Arc;
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

const MEM_MIB: u64 = 16;

/// A GPU manager directory of its own, removed at the end.
struct GpuDir(PathBuf);

impl GpuDir {
    fn new(tag: &str) -> GpuDir {
        let p = std::env::temp_dir().join(format!("godwit-fuzz-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        GpuDir(p)
    }
}

impl Drop for GpuDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A VM waiting for a migration's data (as a destination builds it), with a GPU.
fn vm(gpu_dir: &Path) -> Vm {
    let mut vm = Vm::create(VmConfig {
        memory_mib: MEM_MIB,
        vcpus: 1,
        payload: Payload::Incoming {
            kind: GuestKind::Godwit,
            guest: "fuzz".into(),
        },
        console: Console::Null,
        gpu: Some(GpuRequest {
            profile: "GW8-1C".into(),
            manager_dir: gpu_dir.into(),
            vm_name: "fuzz".into(),
            gpu_index: None,
            prefetch: Default::default(),
        }),
        dirty_log: Default::default(),
        id: None,
        prefaulted: Default::default(),
    })
    .unwrap();
    vm.start_paused().unwrap();
    vm
}

/// Real section states, from a stopped VM's components; and their names.
fn states(source: &Vm) -> Vec<(String, Vec<u8>)> {
    source
        .components()
        .iter()
        .map(|c| {
            step_to(&**c, MigState::StopCopy).unwrap();
            (c.section().name, c.save().unwrap())
        })
        .collect()
}

/// A valid main-connection stream after HELLO, frame by frame: some RAM and VRAM pages,
/// zero runs, every state, COMPLETE.
fn frames(states: &[(String, Vec<u8>)]) -> Vec<(Kind, Vec<u8>)> {
    let idx = |n: &str| states.iter().position(|s| s.0 == n).unwrap() as u32;
    let mut out = Vec::new();
    let mut push = |f: &Frame| {
        let mut b = Vec::new();
        wire::write_frame(&mut b, f).unwrap();
        out.push((f.kind(), b[wire::HEADER_LEN..].to_vec()));
    };
    let data: Vec<u8> = (0..3 * PAGE_SIZE).map(|i| (i * 7) as u8).collect();
    let mem = MEM_MIB << 20;
    push(&Frame::Pages {
        section: idx("ram"),
        addrs: vec![0, 8 * 4096, mem - 4096],
        data: &data,
    });
    push(&Frame::Pages {
        section: idx("gpu"),
        addrs: vec![4096, 1 << 20],
        data: &data[..2 * PAGE_SIZE],
    });
    push(&Frame::Zero {
        section: idx("ram"),
        runs: vec![(4096, 3), (1 << 20, 16)],
    });
    for (i, (_, s)) in states.iter().enumerate() {
        push(&Frame::State {
            section: i as u32,
            data: s,
        });
    }
    push(&Frame::Complete(Totals {
        pages: 5,
        zero_pages: 19,
        data: 0,
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

/// A destination VM's components, ready to take data, in the stream's section order.
struct Dest {
    _vm: Vm,
    parts: Vec<Arc<dyn Component>>,
    names: Vec<String>,
    damaged: Damaged,
}

impl Dest {
    fn new(gpu: &Path, order: &[(String, Vec<u8>)]) -> Dest {
        let vm = vm(gpu);
        let names: Vec<String> = order.iter().map(|s| s.0.clone()).collect();
        let parts = in_order(&vm, &names).unwrap();
        for c in &parts {
            step_to(&**c, MigState::Resuming).unwrap();
        }
        Dest {
            _vm: vm,
            parts,
            names,
            damaged: Damaged::default(),
        }
    }

    /// What the destination does with a main connection's stream after HELLO.
    fn receive(&self, bytes: &[u8]) -> Result<(), String> {
        drain(
            &mut &bytes[..],
            &self.parts,
            &self.names,
            &self.damaged,
            Kind::Complete,
            &mut |e| match e {
                Event::State(i, b) => self.parts[i].load(b).map_err(|e| e.to_string()),
                Event::Sync(_) => Ok(()),
                // Taken only once the states are loaded (STOP): refused while RESUMING.
                Event::Postcopy(i, m) => {
                    let m = lacks::bitmaps(m, &self.parts[i].lazy_regions())?;
                    self.parts[i]
                        .postcopy_expect(m)
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                }
            },
        )
        .map(|_| ())
        .map_err(String::from)
    }
}

/// One source (stopped, its states read) and one destination, on one GPU host.
fn pair(tag: &str) -> (GpuDir, Vec<(String, Vec<u8>)>, Dest) {
    let dir = GpuDir::new(tag);
    let source = vm(&dir.0);
    let s = states(&source);
    drop(source);
    let d = Dest::new(&dir.0, &s);
    (dir, s, d)
}

#[test]
fn the_valid_stream_is_received_into_every_component() {
    if !kvm_available() {
        return;
    }
    let (_dir, s, d) = pair("valid");
    d.receive(&stream(&frames(&s))).unwrap();
    let mut b = [0u8; 1];
    let ram = d._vm.memory();
    ram.read_slice(&mut b, GuestAddress(8 * 4096 + 1)).unwrap();
    assert_eq!(b[0], 7);
    let gpu = d._vm.machine().gpu().unwrap();
    gpu.vf.backend().read((1 << 20) + 1, &mut b).unwrap();
    assert_eq!(b[0], ((PAGE_SIZE + 1) * 7) as u8);
    // Every component has what it needs to leave RESUMING.
    for c in &d.parts {
        step_to(&**c, MigState::Stop).unwrap();
    }
}

/// A destination says STARTED between RUNNING_P2P and RUNNING: the GPU's engine, like
/// the vCPUs, must still be held at RUNNING_P2P (let go, it took a core from the thread
/// that says STARTED) and run at RUNNING.
#[test]
fn the_gpu_engine_goes_only_at_running() {
    if !kvm_available() {
        return;
    }
    let (_dir, s, d) = pair("order");
    d.receive(&stream(&frames(&s))).unwrap();
    let mut order: Vec<&Arc<dyn Component>> = d.parts.iter().collect();
    order.sort_by_key(|c| std::cmp::Reverse(c.stop_order()));
    for c in &order {
        step_to(&***c, MigState::Stop).unwrap();
    }
    let vf = &d._vm.machine().gpu().unwrap().vf;
    for c in &order {
        step_to(&***c, MigState::RunningP2p).unwrap();
    }
    assert!(vf.held_by(godwit_gpu::Hold::Migration));
    for c in &order {
        step_to(&***c, MigState::Running).unwrap();
    }
    assert!(!vf.held_by(godwit_gpu::Hold::Migration));
}

#[test]
fn fuzz_damaged_streams() {
    if !kvm_available() {
        return;
    }
    let (_dir, s, d) = pair("damaged");
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let valid = stream(&frames(&s));
    let mut errors = 0;
    let n = iters() / 10;
    for _ in 0..n {
        let mut b = valid.clone();
        mutate(&mut rng, &mut b);
        if d.receive(&b).is_err() {
            errors += 1;
        }
    }
    assert!(
        errors > n / 2,
        "mutations should mostly be caught ({errors} of {n})"
    );
}

#[test]
fn fuzz_payloads_behind_a_valid_crc() {
    if !kvm_available() {
        return;
    }
    let (_dir, s, d) = pair("payloads");
    let mut rng = Rng(0xD1B5_4A32_D192_ED03);
    let base = frames(&s);
    let mut refused = 0;
    let n = iters() / 10;
    for _ in 0..n {
        let mut f = base.clone();
        let i = rng.below(f.len());
        mutate(&mut rng, &mut f[i].1);
        if rng.below(4) == 0 {
            f[i].0 = [Kind::Pages, Kind::Zero, Kind::State, Kind::End, Kind::Join][rng.below(5)];
        }
        if d.receive(&stream(&f)).is_err() {
            refused += 1;
        }
    }
    assert!(refused > n / 4, "{refused} of {n} refused");
}

/// Each component's state decoder and restore, with random and damaged states.
#[test]
fn fuzz_component_states() {
    if !kvm_available() {
        return;
    }
    let (_dir, s, d) = pair("states");
    let mut rng = Rng(0xA076_1D64_78BD_642F);
    for (i, (name, good)) in s.iter().enumerate() {
        let c = &d.parts[i];
        c.load(good).unwrap_or_else(|e| panic!("{name}: {e}"));
        let mut refused = 0;
        for k in 0..iters() / 10 {
            let mut b = good.clone();
            if k % 4 == 0 {
                // Random bodies behind the right version: postcard's varints steer into
                // long sequences and deep structures.
                b.truncate(4);
                b.extend((0..rng.below(2048)).map(|_| match rng.below(4) {
                    0 => 0,
                    1 => 0x80 | rng.next() as u8,
                    _ => rng.next() as u8,
                }));
            } else {
                mutate(&mut rng, &mut b);
            }
            if c.load(&b).is_err() {
                refused += 1;
            }
        }
        if !good.is_empty() {
            assert!(refused > 0, "{name}: nothing refused");
        }
        // It still takes the real thing.
        c.load(good)
            .unwrap_or_else(|e| panic!("{name} after fuzzing: {e}"));
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
        let mut buf = Vec::new();
        let _ = wire::read_frame(&mut &b[..], &mut buf);
    }
}

fn hello() -> Hello {
    use godwit_vmm::migratable::Section;
    Hello {
        wire_version: wire::WIRE_VERSION,
        guest: "fuzz".into(),
        sections: vec![
            Section::new("vcpus", 1, &[("count", "1".into())]),
            Section::new("gpu", 1, &[("profile", "GW8-1C".into())]),
            Section::new("ram", 1, &[("memory_mib", "16".into())]),
            Section::new("platform", 1, &[("guest", "godwit".into())]),
        ],
        connections: 1,
        session: 7,
        snapshot: false,
        postcopy_first: false,
        raise_readers: true,
        asks_postcopy: true,
    }
}

#[test]
fn fuzz_hello() {
    let mut rng = Rng(0xA076_1D64_78BD_642F);
    let valid = serde_json::to_vec(&hello()).unwrap();
    let host = incoming::Host::default();
    incoming::config(&hello().sections, "g", &host, Console::Null).unwrap();
    for _ in 0..iters() {
        let mut p = valid.clone();
        mutate(&mut rng, &mut p);
        if let Ok(Frame::Hello(h)) = wire::decode(Kind::Hello, &p) {
            let _ = incoming::config(&h.sections, &h.guest, &host, Console::Null);
        }
    }
}

#[test]
fn out_of_range_pages_touch_nothing() {
    if !kvm_available() {
        return;
    }
    let (_dir, s, d) = pair("range");
    let mem = MEM_MIB << 20;
    let idx = |n: &str| s.iter().position(|x| x.0 == n).unwrap();
    let (ram, gpu) = (&d.parts[idx("ram")], &d.parts[idx("gpu")]);
    let page = vec![0xabu8; PAGE_SIZE];
    let two = [page.clone(), page.clone()].concat();
    for a in [mem, mem - 1, 1, u64::MAX - 4095, 3 << 30, 1 << 40] {
        assert!(ram.load_pages(&[0, a], &two).is_err(), "{a:#x}");
    }
    for a in [1 << 30, (1 << 30) - 1, u64::MAX - 4095] {
        assert!(gpu.load_pages(&[0, a], &two).is_err(), "{a:#x}");
    }
    for (g, n) in [(0, u32::MAX), (mem - 4096, 2), (u64::MAX - 4095, 1), (0, 0)] {
        assert!(ram.load_zero(&[(g, n)]).is_err());
    }
    assert!(gpu.load_zero(&[(0, u32::MAX)]).is_err());
    // Nor read straight into place: refused before a byte of the stream is read.
    for a in [mem, mem - 1, 1, u64::MAX - 4095, 1 << 40] {
        let mut src = Counted(0);
        assert!(ram.load_pages_from(&[0, a], &mut src).is_err(), "{a:#x}");
        assert_eq!(src.0, 0, "{a:#x}");
    }
    // The valid first page of each bad frame was not written either.
    let mut b = [0u8; 1];
    d._vm.memory().read_slice(&mut b, GuestAddress(0)).unwrap();
    assert_eq!(b[0], 0);
    d._vm
        .machine()
        .gpu()
        .unwrap()
        .vf
        .backend()
        .read(0, &mut b)
        .unwrap();
    assert_eq!(b[0], 0);
}

/// A page source that counts what it is asked for and fills it with a mark.
struct Counted(usize);

impl PageSource for Counted {
    fn fill(&mut self, pages: &mut vm_memory::VolatileSlice<'_>) -> std::io::Result<()> {
        self.0 += pages.len();
        pages.write_slice(&vec![0x5a; pages.len()], 0).unwrap();
        Ok(())
    }

    fn verify(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The main stream with its RAM pages (`which` 0, three pages) or VRAM pages (1, two)
/// replaced by `pages`.
fn with_pages(s: &[(String, Vec<u8>)], which: usize, pages: &Frame) -> Vec<u8> {
    let mut f = frames(s);
    let mut b = Vec::new();
    wire::write_frame(&mut b, pages).unwrap();
    f[which] = (pages.kind(), b[wire::HEADER_LEN..].to_vec());
    if let Frame::Pages { addrs, .. } = pages {
        let n = f.len();
        f[n - 1].1 = serde_json::to_vec(&Totals {
            pages: addrs.len() as u64 + [2, 3][which],
            zero_pages: 19,
            data: 0,
        })
        .unwrap();
    }
    stream(&f)
}

/// `pages` page numbers' worth of distinct data, and their addresses.
fn marked(pages: &[u64]) -> (Vec<u64>, Vec<u8>) {
    let data = (0..pages.len() * PAGE_SIZE)
        .map(|i| (i / PAGE_SIZE * 31 + i % 251) as u8)
        .collect();
    (pages.iter().map(|p| p * PAGE_SIZE as u64).collect(), data)
}

/// Pre-copy's pages go from the stream straight into guest RAM: runs of neighbours
/// together, the others one by one, each where its address says, whole.
#[test]
fn pages_read_in_place_land_where_their_addresses_say() {
    if !kvm_available() {
        return;
    }
    let (dir, s, d) = pair("inplace");
    let section = |n: &str| s.iter().position(|x| x.0 == n).unwrap() as u32;
    let (addrs, data) = marked(&[12, 13, 14, 40, 52, 53, 30]);
    let f = Frame::Pages {
        section: section("ram"),
        addrs: addrs.clone(),
        data: &data,
    };
    d.receive(&with_pages(&s, 0, &f)).unwrap();
    let mem = d._vm.memory();
    let mut b = vec![0u8; PAGE_SIZE];
    for (k, &a) in addrs.iter().enumerate() {
        mem.read_slice(&mut b, GuestAddress(a)).unwrap();
        assert!(
            b == data[k * PAGE_SIZE..(k + 1) * PAGE_SIZE],
            "page {a:#x} is not what the frame carried"
        );
    }
    // Its neighbours were left alone.
    for p in [11u64, 15, 29, 31, 39, 41, 51, 54] {
        mem.read_slice(&mut b, GuestAddress(p * PAGE_SIZE as u64))
            .unwrap();
        assert!(b.iter().all(|&x| x == 0), "page {p} was written");
    }
    // VRAM the same way, through the backend's mapping.
    let d = Dest::new(&dir.0, &s);
    let (addrs, data) = marked(&[7, 8, 100, 3, 4, 5]);
    let f = Frame::Pages {
        section: section("gpu"),
        addrs: addrs.clone(),
        data: &data,
    };
    d.receive(&with_pages(&s, 1, &f)).unwrap();
    let vram = d._vm.machine().gpu().unwrap().vf.backend();
    for (k, &a) in addrs.iter().enumerate() {
        vram.read(a, &mut b).unwrap();
        assert!(
            b == data[k * PAGE_SIZE..(k + 1) * PAGE_SIZE],
            "VRAM page {a:#x} is not what the frame carried"
        );
    }
    for p in [2u64, 6, 9, 99, 101] {
        vram.read(p * PAGE_SIZE as u64, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 0), "VRAM page {p} was written");
    }
}

/// A page damaged on the way fails the frame's CRC after it was read in place: the
/// stream is refused as any corrupt frame is.
#[test]
fn a_page_damaged_on_the_way_is_refused_after_it_was_read_in_place() {
    if !kvm_available() {
        return;
    }
    let (_dir, s, d) = pair("inplace-crc");
    let ram = s.iter().position(|x| x.0 == "ram").unwrap() as u32;
    let data = vec![0x11u8; 2 * PAGE_SIZE];
    let f = Frame::Pages {
        section: ram,
        addrs: vec![5 * PAGE_SIZE as u64, 6 * PAGE_SIZE as u64],
        data: &data,
    };
    let mut bytes = with_pages(&s, 0, &f);
    d.receive(&bytes).unwrap();
    let d = Dest::new(&_dir.0, &s);
    // Header, section, count, two addresses; then the second page's data.
    bytes[wire::HEADER_LEN + 8 + 16 + PAGE_SIZE + 100] ^= 0x40;
    let e = d.receive(&bytes).unwrap_err();
    assert!(e.contains("CRC"), "{e}");
}

/// Pages sent straight from guest memory, each with its own CRC (`PAGE_CRCS`): one
/// that fails it (torn by a guest write, or damaged) is read into place but kept as
/// damaged until a later copy of it lands whole; a damaged head is refused.
#[test]
fn a_page_that_fails_its_own_crc_stays_damaged_until_a_whole_copy_lands() {
    if !kvm_available() {
        return;
    }
    let (dir, s, d) = pair("page-crcs");
    let ram = s.iter().position(|x| x.0 == "ram").unwrap() as u32;
    let (addrs, data) = marked(&[5, 6, 7]);
    let crcs: Vec<u32> = data.chunks(PAGE_SIZE).map(crc32fast::hash).collect();
    let mut torn = wire::pages_head(ram, &addrs, Some(&crcs));
    let head = torn.len();
    torn.extend_from_slice(&data);
    // The second page changed after its CRC was taken.
    torn[head + PAGE_SIZE + 100] ^= 0x40;
    let mut mend = Vec::new();
    wire::write_frame(
        &mut mend,
        &Frame::Pages {
            section: ram,
            addrs: vec![addrs[1]],
            data: &data[PAGE_SIZE..2 * PAGE_SIZE],
        },
    )
    .unwrap();
    let with = |extra: &[&[u8]], pages: u64| {
        let mut f = frames(&s);
        let n = f.len();
        f[n - 1].1 = serde_json::to_vec(&Totals {
            pages: 5 + pages,
            zero_pages: 19,
            data: 0,
        })
        .unwrap();
        [extra.concat(), stream(&f)].concat()
    };
    let page = |d: &Dest, p: u64| {
        let mut b = vec![0u8; PAGE_SIZE];
        d._vm
            .memory()
            .read_slice(&mut b, GuestAddress(p * PAGE_SIZE as u64))
            .unwrap();
        b
    };
    d.receive(&with(&[&torn], 3)).unwrap();
    assert_eq!(d.damaged.left(), [(ram, vec![addrs[1]])].into());
    assert_eq!(page(&d, 5), data[..PAGE_SIZE]);
    assert_eq!(page(&d, 7), data[2 * PAGE_SIZE..]);
    // Sent again whole: mended.
    let d = Dest::new(&dir.0, &s);
    d.receive(&with(&[&torn, &mend], 4)).unwrap();
    assert!(d.damaged.left().is_empty());
    assert_eq!(page(&d, 6), data[PAGE_SIZE..2 * PAGE_SIZE]);
    // Torn again after that: damaged again.
    let d = Dest::new(&dir.0, &s);
    d.receive(&with(&[&mend, &torn], 4)).unwrap();
    assert_eq!(d.damaged.left().len(), 1);
    // A CRC in the head damaged: the head's own CRC refuses the frame.
    let d = Dest::new(&dir.0, &s);
    let mut bad = torn.clone();
    bad[head - 2] ^= 1;
    let e = d.receive(&with(&[&bad], 3)).unwrap_err();
    assert!(e.contains("CRC"), "{e}");
    assert!(d.damaged.left().is_empty());
}

/// Bytes a Unix socket has sent that its peer has not read yet.
fn unread(s: &std::os::unix::net::UnixStream) -> i32 {
    use std::os::fd::AsRawFd;
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (SIOCOUTQ) writes one int.
    assert_eq!(
        unsafe { libc::ioctl(s.as_raw_fd(), libc::TIOCOUTQ, &mut n) },
        0
    );
    n
}

/// A connection waiting for the rest of a frame it reads in place holds up no other:
/// the component's lock is not held across the read.
#[test]
fn a_connection_waiting_inside_a_frame_holds_up_no_other() {
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    use std::time::{Duration, Instant};
    if !kvm_available() {
        return;
    }
    let (_dir, s, d) = pair("lanes");
    let ram = s.iter().position(|x| x.0 == "ram").unwrap() as u32;
    let lane = |addrs: Vec<u64>, v: u8| {
        let data = vec![v; addrs.len() * PAGE_SIZE];
        let mut b = Vec::new();
        let n = addrs.len() as u64;
        wire::write_frame(
            &mut b,
            &Frame::Pages {
                section: ram,
                addrs,
                data: &data,
            },
        )
        .unwrap();
        wire::write_frame(
            &mut b,
            &Frame::End(Totals {
                pages: n,
                zero_pages: 0,
                data: 0,
            }),
        )
        .unwrap();
        b
    };
    let a = lane(vec![20 << 12, 21 << 12], 1);
    let b = lane(vec![40 << 12], 2);
    let (mut a_tx, mut a_rx) = UnixStream::pair().unwrap();
    let (mut b_tx, mut b_rx) = UnixStream::pair().unwrap();
    let half = wire::HEADER_LEN + 8 + 16 + PAGE_SIZE / 2;
    a_tx.write_all(&a[..half]).unwrap();
    b_tx.write_all(&b).unwrap();
    let drain_lane = |r: &mut UnixStream| {
        drain(
            r,
            &d.parts,
            &d.names,
            &d.damaged,
            Kind::End,
            &mut |_| Ok(()),
        )
        .map(|t| t.pages)
    };
    std::thread::scope(|sc| {
        let ha = sc.spawn(|| drain_lane(&mut a_rx));
        // A has read all it was given: it waits inside its frame, in place.
        let t = Instant::now();
        while unread(&a_tx) > 0 {
            assert!(t.elapsed() < Duration::from_secs(30), "lane A never read");
            std::thread::sleep(Duration::from_millis(1));
        }
        let (tx, rx) = std::sync::mpsc::channel();
        sc.spawn(move || tx.send(drain_lane(&mut b_rx)).unwrap());
        let got_b = rx.recv_timeout(Duration::from_secs(30));
        // Let A finish either way, so a failure reports rather than hangs.
        a_tx.write_all(&a[half..]).unwrap();
        assert_eq!(ha.join().unwrap(), Ok(2));
        assert_eq!(got_b.expect("lane B waited behind lane A's frame"), Ok(1));
    });
    let mut p = vec![0u8; PAGE_SIZE];
    for (page, v) in [(20u64, 1u8), (21, 1), (40, 2)] {
        d._vm
            .memory()
            .read_slice(&mut p, GuestAddress(page << 12))
            .unwrap();
        assert!(p.iter().all(|&x| x == v), "page {page}");
    }
}

/// A stream that claims all of RAM and VRAM is zero does not make the destination
/// allocate them: never-touched memory stays untouched.
#[test]
fn zero_runs_leave_untouched_memory_unallocated() {
    if !kvm_available() {
        return;
    }
    let (_dir, s, d) = pair("zeros");
    let idx = |n: &str| s.iter().position(|x| x.0 == n).unwrap();
    let rss = || -> u64 {
        let s = std::fs::read_to_string("/proc/self/statm").unwrap();
        s.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 4096
    };
    let before = rss();
    d.parts[idx("ram")]
        .load_zero(&[(0, (MEM_MIB << 20) as u32 / 4096)])
        .unwrap();
    d.parts[idx("gpu")]
        .load_zero(&[(0, (1u32 << 30) / 4096)])
        .unwrap();
    let grown = rss().saturating_sub(before);
    assert!(grown < 64 << 20, "zero runs allocated {} MiB", grown >> 20);
}
