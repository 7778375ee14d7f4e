//! A VM's state is complete: pause a running guest, stop every migration component and
//! save their states, load them (and a copy of memory) into a brand-new VM, and the
//! guest carries on exactly where it stopped, on every vCPU.

mod common;

use common::{kvm_available, load, save, vm, wait_until, Sink};
use godwit_vmm::migratable::{incoming, step_to, MigState};
use godwit_vmm::{RunState, Vm, VmExit};
use std::time::Duration;
use vm_memory::{Bytes, GuestAddress};

fn copy_memory(from: &Vm, to: &Vm) {
    for r in &from.handle().desc.ram {
        let mut buf = vec![0u8; r.size as usize];
        from.memory()
            .read_slice(&mut buf, GuestAddress(r.start))
            .unwrap();
        to.memory()
            .write_slice(&buf, GuestAddress(r.start))
            .unwrap();
    }
}

fn last_seq(text: &str) -> u64 {
    text.lines()
        .rev()
        .find_map(|l| {
            l.strip_prefix("heartbeat seq=")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// Loads states into a fresh VM (same shape, threads parked) and starts it.
fn restore(vm: &mut Vm, states: &[Vec<u8>]) {
    load(vm, states);
    for c in vm.components().iter().rev() {
        step_to(&**c, MigState::Running).unwrap();
    }
}

#[test]
fn a_restored_vm_continues_where_the_saved_one_stopped() {
    if !kvm_available() {
        return;
    }
    // Two vCPUs: vCPU 1 sits in the runtime's idle loop (sleep exits), vCPU 0 beats.
    let a_out = Sink::default();
    let mut a = vm("heartbeat", "period=5 count=40", 2, 64, &a_out);
    a.start().unwrap();
    assert!(wait_until(Duration::from_secs(10), || last_seq(
        &a_out.text()
    ) >= 10));
    let states = save(&a);
    assert_eq!(a.handle().state(), RunState::Paused);
    let seq_at_pause = last_seq(&a_out.text());

    let b_out = Sink::default();
    let mut b = vm("heartbeat", "period=5 count=40", 2, 64, &b_out);
    copy_memory(&a, &b);
    // The source is gone for good before the copy runs.
    a.handle().ctl.request_exit(VmExit::Shutdown);
    assert_eq!(a.wait(), VmExit::Shutdown);
    restore(&mut b, &states);
    assert_eq!(b.wait(), VmExit::Guest(0));
    let text = b_out.text();
    let seqs: Vec<u64> = text
        .lines()
        .filter_map(|l| {
            l.strip_prefix("heartbeat seq=")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    // No banner: the copy did not boot, it resumed; and no beat is lost or repeated.
    assert!(!text.contains("godwit-rt:"), "{text}");
    assert_eq!(seqs, (seq_at_pause + 1..=40).collect::<Vec<_>>(), "{text}");
}

#[test]
fn a_dirtier_restored_mid_write_verifies_all_of_its_memory() {
    if !kvm_available() {
        return;
    }
    let a_out = Sink::default();
    let args = "wss=16 rate=flat seconds=3 report-every=100";
    let mut a = vm("dirtier", args, 1, 64, &a_out);
    a.start().unwrap();
    assert!(wait_until(Duration::from_secs(10), || a_out
        .text()
        .contains("written_mib=")));
    let states = save(&a);
    let b_out = Sink::default();
    let mut b = vm("dirtier", args, 1, 64, &b_out);
    copy_memory(&a, &b);
    a.handle().ctl.request_exit(VmExit::Shutdown);
    a.wait();
    restore(&mut b, &states);
    assert_eq!(b.wait(), VmExit::Guest(0), "{}", b_out.text());
    assert!(
        b_out.text().contains("verify ok pages=4096"),
        "{}",
        b_out.text()
    );
}

/// A destination says STARTED between RUNNING_P2P and RUNNING, so its vCPUs must not
/// run before RUNNING (a woken vCPU would preempt the thread that says it).
#[test]
fn restored_vcpus_wait_at_running_p2p_and_run_at_running() {
    if !kvm_available() {
        return;
    }
    let a_out = Sink::default();
    let mut a = vm("heartbeat", "period=5 count=30", 1, 64, &a_out);
    a.start().unwrap();
    assert!(wait_until(Duration::from_secs(10), || last_seq(
        &a_out.text()
    ) >= 5));
    let states = save(&a);
    let seq_at_pause = last_seq(&a_out.text());
    let b_out = Sink::default();
    let mut b = vm("heartbeat", "period=5 count=30", 1, 64, &b_out);
    copy_memory(&a, &b);
    a.handle().ctl.request_exit(VmExit::Shutdown);
    a.wait();
    load(&mut b, &states);
    for c in b.components().iter().rev() {
        step_to(&**c, MigState::RunningP2p).unwrap();
    }
    assert_eq!(b.handle().state(), RunState::Paused);
    // Ten beats' time: a vCPU let go here would have beaten.
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(last_seq(&b_out.text()), 0, "{}", b_out.text());
    for c in b.components().iter().rev() {
        step_to(&**c, MigState::Running).unwrap();
    }
    assert_eq!(b.wait(), VmExit::Guest(0));
    assert_eq!(last_seq(&b_out.text()), 30);
    assert!(b_out
        .text()
        .contains(&format!("heartbeat seq={} ", seq_at_pause + 1)));
}

/// A started VM says so at once, not once its first vCPU thread happens to be
/// scheduled: an orchestrator asking in between (Nova, right after the boot) took the
/// VM for one that had not started.
#[test]
fn a_started_vm_runs_as_soon_as_start_returns() {
    if !kvm_available() {
        return;
    }
    let out = Sink::default();
    let mut a = vm("heartbeat", "period=5 count=0", 2, 64, &out);
    assert_eq!(a.handle().state(), RunState::Created);
    a.start().unwrap();
    assert_eq!(a.handle().state(), RunState::Running);
    a.handle().ctl.request_exit(VmExit::Shutdown);
    assert_eq!(a.wait(), VmExit::Shutdown);
}

#[test]
fn a_paused_vm_stays_paused_where_it_is_restored() {
    if !kvm_available() {
        return;
    }
    let out = Sink::default();
    let mut a = vm("heartbeat", "period=5 count=0", 1, 64, &out);
    a.start().unwrap();
    assert!(wait_until(Duration::from_secs(10), || last_seq(
        &out.text()
    ) >= 1));
    a.handle().pause().unwrap();
    let states = save(&a);
    let b_out = Sink::default();
    let mut b = vm("heartbeat", "period=5 count=0", 1, 64, &b_out);
    copy_memory(&a, &b);
    a.handle().ctl.request_exit(VmExit::Shutdown);
    a.wait();
    restore(&mut b, &states);
    assert_eq!(b.handle().state(), RunState::Paused);
    b.handle().resume().unwrap();
    assert_eq!(b.handle().state(), RunState::Running);
    let n = last_seq(&b_out.text());
    assert!(wait_until(Duration::from_secs(10), || last_seq(
        &b_out.text()
    ) > n));
    b.handle().ctl.request_exit(VmExit::Shutdown);
    b.wait();
}

#[test]
fn restore_refuses_a_different_vm_or_version() {
    if !kvm_available() {
        return;
    }
    let out = Sink::default();
    let mut a = vm("heartbeat", "", 1, 64, &out);
    a.start_paused().unwrap();
    let states = save(&a);
    let sections: Vec<_> = a.components().iter().map(|c| c.section()).collect();
    // Another memory size or vCPU count is named before any data moves.
    let bigger = vm("heartbeat", "", 1, 128, &out);
    let theirs: Vec<_> = bigger.components().iter().map(|c| c.section()).collect();
    let e = incoming::mismatch(&sections, &theirs).unwrap();
    assert!(e.starts_with("ram:"), "{e}");
    // And the states themselves are checked.
    let mut two = vm("heartbeat", "", 2, 64, &out);
    two.start_paused().unwrap();
    let c = &two.components()[0];
    assert_eq!(c.section().name, "vcpus");
    step_to(&**c, MigState::Resuming).unwrap();
    let e = c.load(&states[0]).unwrap_err().to_string();
    assert!(e.contains("state of 1 vCPUs for a VM of 2"), "{e}");
    let mut foreign = states[0].clone();
    foreign[0] += 1;
    let e = c.load(&foreign).unwrap_err().to_string();
    assert!(e.contains("version"), "{e}");
    // Leaving RESUMING needs a state that was taken.
    assert!(step_to(&**c, MigState::Stop).is_err());
}

#[test]
fn saving_a_running_vm_is_refused() {
    if !kvm_available() {
        return;
    }
    let out = Sink::default();
    let mut a = vm("heartbeat", "period=10 count=0", 1, 64, &out);
    a.start().unwrap();
    assert!(wait_until(Duration::from_secs(10), || last_seq(
        &out.text()
    ) >= 1));
    for c in a.components() {
        assert!(c.save().is_err(), "{}", c.section().name);
    }
    a.handle().ctl.request_exit(VmExit::Shutdown);
    a.wait();
}
