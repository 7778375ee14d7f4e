//! A VM's state image is complete: pause a running guest, save everything (vCPUs,
//! irqchip, clock, devices) and its memory, load both into a brand-new VM, and the guest
//! carries on exactly where it stopped, on every vCPU.

mod common;

use common::{kvm_available, vm, wait_until, Sink};
use godwit_vmm::state::VmState;
use godwit_vmm::{Vm, VmExit};
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
    a.handle().ctl.pause().unwrap();
    let saved = a.save_state().unwrap();
    let seq_at_pause = last_seq(&a_out.text());

    // Through JSON, as it would cross a wire or sit in a file.
    let json = serde_json::to_vec(&saved).unwrap();
    let back: VmState = serde_json::from_slice(&json).unwrap();
    assert_eq!(back.vcpus.len(), 2);
    assert!(back.vcpus[0].msrs.len() > 10, "MSRs are saved");
    assert_eq!(
        back.vcpus[0].sregs.cs.dpl, 3,
        "vCPU 0 was stopped in ring 3"
    );

    let b_out = Sink::default();
    let mut b = vm("heartbeat", "period=5 count=40", 2, 64, &b_out);
    copy_memory(&a, &b);
    b.restore_state(&back).unwrap();
    // The source is gone for good before the copy runs.
    a.handle().ctl.request_exit(VmExit::Shutdown);
    assert_eq!(a.wait(), VmExit::Shutdown);

    b.start().unwrap();
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
    a.handle().ctl.pause().unwrap();
    let saved = a.save_state().unwrap();
    let b_out = Sink::default();
    let mut b = vm("dirtier", args, 1, 64, &b_out);
    copy_memory(&a, &b);
    b.restore_state(&saved).unwrap();
    a.handle().ctl.request_exit(VmExit::Shutdown);
    a.wait();
    b.start().unwrap();
    assert_eq!(b.wait(), VmExit::Guest(0), "{}", b_out.text());
    assert!(
        b_out.text().contains("verify ok pages=4096"),
        "{}",
        b_out.text()
    );
}

#[test]
fn restore_refuses_a_different_vm_or_version() {
    if !kvm_available() {
        return;
    }
    let out = Sink::default();
    let a = vm("heartbeat", "", 1, 64, &out);
    let saved = a.save_state().unwrap();
    let bigger = vm("heartbeat", "", 1, 128, &out);
    let e = bigger.restore_state(&saved).unwrap_err().to_string();
    assert!(e.contains("does not match"), "{e}");
    let two = vm("heartbeat", "", 2, 64, &out);
    assert!(two.restore_state(&saved).is_err());
    let mut foreign = saved;
    foreign.version += 1;
    let e = a.restore_state(&foreign).unwrap_err().to_string();
    assert!(e.contains("state version"), "{e}");
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
    assert!(a.save_state().is_err());
    a.handle().ctl.request_exit(VmExit::Shutdown);
    a.wait();
}
