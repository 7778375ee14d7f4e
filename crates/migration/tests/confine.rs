//! A source's migration thread that cannot be held to a source's system calls (as
//! `godwit run`'s hook fails when the kernel refuses the thread's filters) sends
//! nothing: it fails before it dials, says why, and the VM runs on where it was. (The
//! hook is once per process: this file is a test binary of its own.)

mod common;

use common::kvm_available;
use godwit_migration::{source, Options, Outcome, Status};
use godwit_vmm::confine::{self, Role};
use godwit_vmm::{Console, Payload, RunState, Vm, VmConfig};
use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[test]
fn a_source_that_cannot_be_confined_sends_nothing_and_its_vm_runs_on() {
    if !kvm_available() {
        return;
    }
    assert!(confine::on_thread_start(|role| match role {
        Role::Source => Err("cannot add its system-call filters: refused".into()),
        _ => Ok(()),
    }));
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let mut vm = Vm::create(VmConfig {
        memory_mib: 64,
        vcpus: 1,
        payload: Payload::Guest {
            name: "dirtier".into(),
            image: godwit_guest::image("dirtier").unwrap().to_vec(),
            args: "wss=8 rate=1 seconds=0 report-every=100".into(),
        },
        console: Console::Null,
        gpu: None,
        dirty_log: Default::default(),
        id: None,
        prefaulted: Default::default(),
    })
    .unwrap();
    vm.start().unwrap();
    let h = vm.handle();
    let o: Options = serde_json::from_value(serde_json::json!({
        "to": format!("tcp:{}", listener.local_addr().unwrap()),
    }))
    .unwrap();
    let status = Arc::new(Status::default());
    // The caller (the API) owns `active`.
    status
        .active
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let r = source::start(h.clone(), o, status).unwrap().join().unwrap();
    assert_eq!(r.status, Outcome::Failed, "{r:?}");
    assert_eq!(r.error_kind.as_deref(), Some("confine"), "{r:?}");
    assert_eq!(
        r.error.as_deref(),
        Some("the migration thread cannot add its system-call filters: refused")
    );
    assert!(r.source_running, "{r:?}");
    // Nothing reached the destination, and the guest still runs here.
    assert_eq!(
        listener.accept().map(drop).unwrap_err().kind(),
        std::io::ErrorKind::WouldBlock
    );
    let end = Instant::now() + Duration::from_secs(1);
    while Instant::now() < end {
        assert_eq!(h.state(), RunState::Running);
        std::thread::sleep(Duration::from_millis(50));
    }
    h.ctl.request_exit(godwit_vmm::VmExit::Shutdown);
    vm.wait();
}
