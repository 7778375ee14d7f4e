//! Post-copy: with pages of its memory possibly missing, the engine brings in what a
//! command touches (its ring entry, the page tables, its operands) before it runs the
//! command, and so before it holds the shared GPU; with nobody else at the engine it
//! does not wait for that.

mod common;

use common::*;
use godwit_gpu::abi::{op, pte, reg};
use godwit_gpu::command::encode;
use godwit_gpu::{Hold, Prefetch};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

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
    // Nothing is here until the gate opens; then all of it is.
    fn vram_here(&self, _off: u64, _len: u64) -> bool {
        self.asked.lock().unwrap().2
    }
    fn ram_here(&self, _gpa: u64, _len: u64) -> bool {
        self.asked.lock().unwrap().2
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

/// The engine takes its next ring entry from a page still at the source (post-copy's
/// missing page, here a userfaultfd that nobody answers yet): while it waits, the VF's
/// registers still answer, as the vCPUs and a paused post-copy's recovery need them to.
#[test]
fn waiting_for_a_missing_ring_page_holds_up_no_register_access() {
    let mut d = Driver::new();
    let page = d.ram.get_host_address(GuestAddress(RING)).unwrap() as usize;
    let uffd = match userfaultfd::UffdBuilder::new()
        .close_on_exec(true)
        .user_mode_only(true)
        .create()
    {
        Ok(u) => u,
        Err(e) => panic!("userfaultfd (as root, or with vm.unprivileged_userfaultfd=1): {e}"),
    };
    // SAFETY: one page of the test's own guest RAM mapping, not written yet.
    unsafe {
        assert_eq!(
            libc::madvise(page as *mut libc::c_void, 4096, libc::MADV_DONTNEED),
            0
        );
    }
    uffd.register(page as *mut libc::c_void, 4096).unwrap();
    // The doorbell rings for an entry whose page is missing.
    let mut entry = [0u8; 4096];
    entry[..64].copy_from_slice(&encode(op::FILL, Some(1), [2 << 20, 4096, 7, 0, 0, 0]));
    d.tail = 1;
    w(&d.vf, reg::RING_TAIL, 1);
    match uffd.read_event().unwrap() {
        Some(userfaultfd::Event::Pagefault { addr, .. }) => assert_eq!(addr as usize, page),
        e => panic!("{e:?}"),
    }
    // The engine waits for the page: a register read must not.
    let (tx, rx) = std::sync::mpsc::channel();
    let vf = d.vf.clone();
    std::thread::spawn(move || tx.send(r(&vf, reg::FENCE)).unwrap());
    let answered = rx.recv_timeout(Duration::from_secs(10));
    // SAFETY: the registered page, filled whole from `entry`.
    unsafe {
        uffd.copy(
            entry.as_ptr() as *const libc::c_void,
            page as *mut libc::c_void,
            4096,
            true,
        )
        .unwrap();
    }
    assert_eq!(
        answered,
        Ok(0),
        "a register read waited for the ring's page"
    );
    d.wait(1).unwrap();
    assert_eq!(r(&d.vf, reg::ERROR), 0);
}

/// Holds an ask that touches one page (of VRAM, or of guest RAM if `system`) until
/// opened; records every ask of that memory.
#[derive(Default)]
struct PageGate {
    page: u64,
    system: bool,
    asked: Mutex<(Vec<(u64, u64)>, bool)>,
    cv: Condvar,
}

impl PageGate {
    fn ask(&self, system: bool, at: u64, len: u64) {
        if system != self.system {
            return;
        }
        let mut g = self.asked.lock().unwrap();
        g.0.push((at, len));
        while at <= self.page && self.page < at + len && !g.1 {
            g = self.cv.wait(g).unwrap();
        }
    }

    fn open(&self) {
        self.asked.lock().unwrap().1 = true;
        self.cv.notify_all();
    }

    /// Every page is here but the gated one, until opened.
    fn here(&self, system: bool, at: u64, len: u64) -> bool {
        system != self.system
            || !(at <= self.page && self.page < at + len)
            || self.asked.lock().unwrap().1
    }
}

impl Prefetch for PageGate {
    fn active(&self) -> bool {
        true
    }
    fn vram(&self, off: u64, len: u64) {
        self.ask(false, off, len)
    }
    fn ram(&self, gpa: u64, len: u64) {
        self.ask(true, gpa, len)
    }
    fn vram_here(&self, off: u64, len: u64) -> bool {
        self.here(false, off, len)
    }
    fn ram_here(&self, gpa: u64, len: u64) -> bool {
        self.here(true, gpa, len)
    }
}

/// Commands rung in one doorbell: each is brought in before it runs, not only the first
/// of those the engine runs in one turn at the GPU.
#[test]
fn every_command_of_a_batch_is_brought_in_before_it_runs() {
    let mut d = Driver::new();
    let gate = Arc::new(PageGate {
        page: 5 << 20,
        ..Default::default()
    });
    d.vf.set_prefetch(Some(gate.clone()), true);
    // Both are in the ring before the engine looks.
    d.vf.pause(Hold::User);
    let first = d.submit(op::FILL, [1 << 20, 4096, 7, 0, 0, 0]);
    // Its source is the gated page: it must not run until that page is "here".
    let second = d.submit(op::COPY, [3 << 20, 5 << 20, 4096, 0, 0, 0]);
    d.vf.resume(Hold::User);
    d.wait(first).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        r(&d.vf, reg::FENCE) < second,
        "the second command ran before its pages were brought in"
    );
    assert!(covers(&gate.asked.lock().unwrap().0, 5 << 20, 4096));
    gate.open();
    d.wait(second).unwrap();
}

/// A COPY whose source runs off the end of what is mapped: the engine copies the chunks
/// before that, then faults. Those chunks are brought in before it runs, as a whole
/// range's are.
#[test]
fn the_part_of_a_range_before_its_fault_is_brought_in_before_it_runs() {
    let mut d = Driver::new();
    // The last 256 KiB of guest RAM (mapped at SYS) and one page past it, unmapped.
    let src = SYS + RAM - (256 << 10);
    let gate = Arc::new(PageGate {
        page: RAM - (256 << 10),
        system: true,
        ..Default::default()
    });
    let x = data(64 << 10, 3);
    d.put_f32(RAM - (256 << 10), &x);
    d.vf.set_prefetch(Some(gate.clone()), true);
    let f = d.submit(op::COPY, [3 << 20, src, (256 << 10) + 4096, 0, 0, 0]);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        r(&d.vf, reg::ERROR),
        0,
        "the command ran into its fault before its first chunk was brought in"
    );
    assert!(covers(
        &gate.asked.lock().unwrap().0,
        RAM - (256 << 10),
        256 << 10
    ));
    gate.open();
    let (_, at) = d.wait(f).unwrap_err();
    assert_eq!(at, SYS + RAM, "the fault is where the mapping ends");
    // The chunk before the fault was copied.
    assert_eq!(d.vram_f32(3 << 20, 64 << 10), x);
}

/// Counts the engine's asks.
#[derive(Default)]
struct Counter {
    vram: Mutex<Vec<(u64, u64)>>,
}

impl Prefetch for Counter {
    fn active(&self) -> bool {
        true
    }
    fn vram(&self, off: u64, len: u64) {
        self.vram.lock().unwrap().push((off, len));
    }
    fn ram(&self, _gpa: u64, _len: u64) {}
    fn vram_here(&self, _off: u64, _len: u64) -> bool {
        true
    }
    fn ram_here(&self, _gpa: u64, _len: u64) -> bool {
        true
    }
}

/// A FILL over 1 GiB of VA that the guest's page tables map, page after page, to one
/// VRAM page: bringing it in walks no further than the VF's memory reaches (a range
/// longer than that goes over pages it has seen), not over each of its 262,144 pages,
/// and the command still runs.
#[test]
fn an_aliased_range_is_walked_no_further_than_the_memory_it_reaches() {
    let mut d = Driver::new();
    // VA 1 GiB..2 GiB: one L1 table whose 512 entries all point at one L0 table whose
    // 512 entries all map VRAM page 8 MiB.
    let (l1, l0, page) = (PT + 0x3000, PT + 0x4000, 8 << 20);
    put(&d.vf, PT + 8, l1 | pte::VALID);
    for i in 0..512 {
        put(&d.vf, l1 + i * 8, l0 | pte::VALID);
        put(&d.vf, l0 + i * 8, page | pte::VALID | pte::WRITE);
    }
    let counter = Arc::new(Counter::default());
    d.vf.set_prefetch(Some(counter.clone()), true);
    d.run(op::FILL, [1 << 30, 1 << 30, 0x5a5a_5a5a, 0, 0, 0])
        .unwrap();
    let asks = counter.vram.lock().unwrap();
    assert!(
        covers(&asks, page, 4096),
        "the aliased page was not asked for"
    );
    // Brought in once, as its entry waits in the ring: not walked again when taken,
    // nor at each of the turns at the GPU that the FILL runs over.
    let reach = (VRAM + RAM) / 4096;
    assert!(
        asks.len() as u64 <= reach,
        "{} asks, more than the {reach} pages the VF reaches",
        asks.len()
    );
    assert_eq!(d.vram_f32(page, 1)[0].to_bits(), 0x5a5a_5a5a);
}

/// Holds every VRAM ask that touches a page it holds, until that page is let go;
/// records every ask.
#[derive(Default)]
struct Holds {
    state: Mutex<HoldsState>,
    cv: Condvar,
}

/// The VRAM ranges asked for; the pages held.
type HoldsState = (Vec<(u64, u64)>, Vec<u64>);

impl Holds {
    fn hold(&self, page: u64) {
        self.state.lock().unwrap().1.push(page);
    }
    fn let_go(&self, page: u64) {
        self.state.lock().unwrap().1.retain(|&p| p != page);
        self.cv.notify_all();
    }
    fn asked(&self, at: u64, len: u64) -> bool {
        covers(&self.state.lock().unwrap().0, at, len)
    }
}

impl Prefetch for Holds {
    fn active(&self) -> bool {
        true
    }
    fn vram(&self, off: u64, len: u64) {
        let mut g = self.state.lock().unwrap();
        g.0.push((off, len));
        while g.1.iter().any(|&p| off <= p && p < off + len) {
            g = self.cv.wait(g).unwrap();
        }
    }
    fn ram(&self, _gpa: u64, _len: u64) {}
    // Every page is here but those held.
    fn vram_here(&self, off: u64, len: u64) -> bool {
        let g = self.state.lock().unwrap();
        !g.1.iter().any(|&p| off <= p && p < off + len)
    }
    fn ram_here(&self, _gpa: u64, _len: u64) -> bool {
        true
    }
}

/// The guest rewrites its queued entry while the engine brings it in: the command the
/// engine then takes is not the one brought in, and it is brought in before it runs.
#[test]
fn a_command_rewritten_while_it_was_brought_in_is_brought_in_again() {
    let mut d = Driver::new();
    let (first, second) = (1 << 20, 5 << 20);
    let holds = Arc::new(Holds::default());
    holds.hold(first);
    d.vf.set_prefetch(Some(holds.clone()), true);
    let f = d.submit(op::FILL, [first, 4096, 7, 0, 0, 0]);
    let end = std::time::Instant::now() + Duration::from_secs(20);
    while !holds.asked(first, 4096) {
        assert!(
            std::time::Instant::now() < end,
            "the FILL was never brought in"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    // The prefetch has read the entry. Now it says FILL another page.
    let e = encode(op::FILL, Some(f), [second, 4096, 9, 0, 0, 0]);
    d.ram.write_slice(&e, GuestAddress(RING)).unwrap();
    holds.hold(second);
    holds.let_go(first);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        r(&d.vf, reg::FENCE) < f,
        "the rewritten command ran before its pages were brought in"
    );
    assert!(
        holds.asked(second, 4096),
        "the rewritten command was not brought in"
    );
    holds.let_go(second);
    d.wait(f).unwrap();
    assert_eq!(d.vram_f32(second, 1)[0].to_bits(), 9);
    assert_eq!(d.vram_f32(first, 1)[0].to_bits(), 0, "the first FILL ran");
}

/// The guest rewrites a page table under a command already brought in: the FILL's last
/// page now maps VRAM that is not here. The engine does not fetch it while it holds
/// the GPU: the step that would touch it stops first, and the page is brought in
/// holding nothing, before the FILL goes on.
#[test]
fn a_page_table_rewritten_under_a_command_brought_in_is_brought_in_before_it_is_touched() {
    let mut d = Driver::new();
    // VA 1 GiB..+2 MiB in 4 KiB pages, onto VRAM 16 MiB..18 MiB.
    let (l1, l0, va, was, now) = (PT + 0x3000, PT + 0x4000, 1 << 30, 16 << 20, 40 << 20);
    put(&d.vf, PT + 8, l1 | pte::VALID);
    put(&d.vf, l1, l0 | pte::VALID);
    for i in 0..512 {
        put(
            &d.vf,
            l0 + i * 8,
            (was + i * 4096) | pte::VALID | pte::WRITE,
        );
    }
    let holds = Arc::new(Holds::default());
    holds.hold(was);
    d.vf.set_prefetch(Some(holds.clone()), true);
    // 2 MiB: eight steps of the engine.
    let f = d.submit(op::FILL, [va, 2 << 20, 7, 0, 0, 0]);
    let waited = |what: &str, done: &dyn Fn() -> bool| {
        let end = std::time::Instant::now() + Duration::from_secs(20);
        while !done() {
            assert!(std::time::Instant::now() < end, "{what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    waited("the FILL was never brought in", &|| holds.asked(was, 4096));
    // The walk has read the tables. Now the last page maps VRAM that is not here.
    let last = was + 511 * 4096;
    put(&d.vf, l0 + 511 * 8, now | pte::VALID | pte::WRITE);
    holds.hold(now);
    holds.let_go(was);
    waited("the FILL neither asked for the page nor wrote it", &|| {
        holds.asked(now, 4096) || d.vram_f32(now, 1)[0].to_bits() == 7
    });
    std::thread::sleep(Duration::from_millis(100));
    // Looked at, then let go: a failed assertion must not leave the engine held.
    let (seen, fence, before) = (
        d.vram_f32(now, 1)[0].to_bits(),
        r(&d.vf, reg::FENCE),
        d.vram_f32(was + 448 * 4096 - 4, 1)[0].to_bits(),
    );
    holds.let_go(now);
    assert_eq!(seen, 0, "the FILL wrote a page before it was brought in");
    assert!(fence < f);
    // The steps before the one that touches it ran.
    assert_eq!(before, 7);
    d.wait(f).unwrap();
    assert_eq!(d.vram_f32(now + 4092, 1)[0].to_bits(), 7);
    assert_eq!(
        d.vram_f32(last, 1)[0].to_bits(),
        0,
        "the old mapping was written"
    );
}
