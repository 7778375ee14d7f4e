//! Post-copy on a destination: pages a vCPU waits for come in on one connection while
//! the background's come in on another, each placed by its own thread. A placement can
//! take a while (fresh host memory faults in underneath), and one must never wait for
//! another.

mod common;

use common::{kvm_available, load, save, vm, Sink};
use godwit_vmm::migratable::fuzz_postcopy::AnonMap;
use std::sync::mpsc;
use std::time::Duration;
use vm_memory::{Bytes, GuestAddress};

const PAGE: usize = 4096;

#[test]
fn a_slow_placement_holds_up_no_other() {
    if !kvm_available() {
        return;
    }
    let out = Sink::default();
    let mut a = vm("heartbeat", "", 1, 64, &out);
    a.start_paused().unwrap();
    let states = save(&a);
    let mut b = vm("heartbeat", "", 1, 64, &out);
    load(&mut b, &states);
    let ram = b
        .components()
        .iter()
        .find(|c| c.section().name == "ram")
        .unwrap()
        .clone();
    // Every page of the 64 MiB still at the source.
    let pages = (64 << 20) / PAGE;
    let _faults = ram
        .postcopy_expect(vec![vec![u64::MAX; pages / 64]])
        .unwrap();

    // A placement whose data is itself still missing here (a page of a mapping
    // registered with a userfaultfd that nobody answers yet): its copy waits inside the
    // kernel until the test lets it go, as a copy into cold host memory waits for it.
    let uffd = userfaultfd::UffdBuilder::new()
        .close_on_exec(true)
        .user_mode_only(false)
        .create()
        .expect("userfaultfd for kernel-mode faults (as root, or vm.unprivileged_userfaultfd=1)");
    let map = AnonMap::new(1).unwrap();
    let src = map.host as *mut libc::c_void;
    uffd.register(src, PAGE).unwrap();
    let slow = {
        let ram = ram.clone();
        let at = src as usize;
        std::thread::spawn(move || {
            // SAFETY: one page of the mapping above, alive until this thread is joined.
            let data = unsafe { std::slice::from_raw_parts(at as *const u8, PAGE) };
            ram.load_pages(&[0x10_0000], data)
        })
    };
    let mut p = libc::pollfd {
        fd: std::os::fd::AsRawFd::as_raw_fd(&uffd),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd for the userfaultfd above.
    let ready = unsafe { libc::poll(&mut p, 1, 10_000) };
    assert_eq!(ready, 1, "the placement never waited for its data");
    match uffd.read_event().unwrap() {
        Some(userfaultfd::Event::Pagefault { addr, .. }) => assert_eq!(addr, src),
        e => panic!("{e:?}"),
    }
    // Meanwhile a page a vCPU waits for arrives on another connection.
    let (tx, rx) = mpsc::channel();
    {
        let ram = ram.clone();
        std::thread::spawn(move || tx.send(ram.load_pages(&[0x20_0000], &[7u8; PAGE])));
    }
    let answered = rx.recv_timeout(Duration::from_secs(10));
    let fill = [9u8; PAGE];
    // SAFETY: the registered page, filled whole from `fill`.
    unsafe {
        uffd.copy(fill.as_ptr() as *const libc::c_void, src, PAGE, true)
            .unwrap();
    }
    slow.join().unwrap().unwrap();
    assert!(
        matches!(answered, Ok(Ok(()))),
        "a placement waited for another: {answered:?}"
    );
    let mut got = [0u8; 2];
    b.memory()
        .read_slice(&mut got[..1], GuestAddress(0x20_0000))
        .unwrap();
    b.memory()
        .read_slice(&mut got[1..], GuestAddress(0x10_0000))
        .unwrap();
    assert_eq!(got, [7, 9]);
}
