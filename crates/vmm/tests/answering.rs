//! Post-copy on a source: the background stream sends what is left while another
//! thread answers the pages a vCPU waits for at the destination. A background send can
//! take a while (a full connection, or its thread preempted on a busy host), and an
//! answer must never wait for it.

mod common;

use common::{kvm_available, save, vm, Sink};
use godwit_vmm::migratable::Sink as PageSink;
use std::sync::mpsc;
use std::time::Duration;

const PAGE: usize = 4096;

/// Sends nothing; the first page waits until the test lets it go.
struct Stuck {
    buf: Vec<u8>,
    entered: Option<mpsc::Sender<()>>,
    release: mpsc::Receiver<()>,
}

impl Stuck {
    fn wait(&mut self) -> std::io::Result<()> {
        if let Some(tx) = self.entered.take() {
            tx.send(()).unwrap();
            self.release.recv().unwrap();
        }
        Ok(())
    }
}

impl PageSink for Stuck {
    fn slot(&mut self, _addr: u64) -> &mut [u8] {
        self.buf.resize(PAGE, 0);
        &mut self.buf
    }
    fn page(&mut self) -> std::io::Result<()> {
        self.wait()
    }
    fn zero(&mut self) -> std::io::Result<()> {
        self.wait()
    }
    fn data(&mut self, _bytes: &[u8]) -> std::io::Result<()> {
        Ok(())
    }
}

/// Keeps the addresses and first bytes of what it is given.
#[derive(Default)]
struct Kept {
    buf: Vec<u8>,
    at: u64,
    got: Vec<(u64, u8)>,
}

impl PageSink for Kept {
    fn slot(&mut self, addr: u64) -> &mut [u8] {
        self.at = addr;
        self.buf.resize(PAGE, 0);
        &mut self.buf
    }
    fn page(&mut self) -> std::io::Result<()> {
        self.got.push((self.at, self.buf[0]));
        Ok(())
    }
    fn zero(&mut self) -> std::io::Result<()> {
        self.got.push((self.at, 0));
        Ok(())
    }
    fn data(&mut self, _bytes: &[u8]) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_request_is_answered_while_the_background_send_waits() {
    if !kvm_available() {
        return;
    }
    let out = Sink::default();
    let mut a = vm("heartbeat", "", 1, 64, &out);
    a.start_paused().unwrap();
    let at = 0x20_0000u64;
    vm_memory::Bytes::write_slice(a.memory(), &[0x5a; PAGE], vm_memory::GuestAddress(at)).unwrap();
    save(&a);
    let ram = a
        .components()
        .iter()
        .find(|c| c.section().name == "ram")
        .unwrap()
        .clone();
    ram.postcopy_switch().unwrap().unwrap();

    // The background's send of its first page waits (a full connection, a preempted
    // thread) until the test lets it go.
    let (entered_tx, entered) = mpsc::channel();
    let (release, release_rx) = mpsc::channel();
    let background = {
        let ram = ram.clone();
        std::thread::spawn(move || {
            let mut s = Stuck {
                buf: Vec::new(),
                entered: Some(entered_tx),
                release: release_rx,
            };
            ram.read(&mut s, 64)
        })
    };
    entered
        .recv_timeout(Duration::from_secs(10))
        .expect("the background never sent");
    // Meanwhile a vCPU at the destination waits for a page.
    let (tx, rx) = mpsc::channel();
    {
        let ram = ram.clone();
        std::thread::spawn(move || {
            let mut k = Kept::default();
            let r = ram.read_requested(&mut k, &[at]);
            tx.send(r.map(|_| k.got)).unwrap();
        });
    }
    let answered = rx.recv_timeout(Duration::from_secs(10));
    release.send(()).unwrap();
    background.join().unwrap().unwrap();
    match answered {
        Ok(Ok(got)) => assert_eq!(got, [(at, 0x5a)]),
        e => panic!("the answer waited for the background's send: {e:?}"),
    }
}
