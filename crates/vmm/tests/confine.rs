//! A thread that cannot be held to its calls does no work: a vCPU thread whose role's
//! hook fails (as `godwit run`'s does when the kernel refuses the thread's filters)
//! ends its VM with why before the guest runs an instruction. (The hook is once per
//! process: this file is a test binary of its own.)

mod common;

use common::{kvm_available, vm, Sink};
use godwit_vmm::confine::{self, Role};
use godwit_vmm::VmExit;

#[test]
fn a_vcpu_thread_that_cannot_be_confined_ends_its_vm_before_the_guest_runs() {
    if !kvm_available() {
        return;
    }
    assert!(confine::on_thread_start(|role| match role {
        Role::Vcpu => Err("cannot add its system-call filters: refused".into()),
        _ => Ok(()),
    }));
    for vcpus in [1, 2] {
        let out = Sink::default();
        let mut vm = vm("smp", "", vcpus, 64, &out);
        vm.start().unwrap();
        let exit = vm.wait();
        let VmExit::Error(why) = &exit else {
            panic!("{vcpus} vCPUs: {exit:?}\n{}", out.text());
        };
        assert!(
            why.ends_with("'s thread: cannot add its system-call filters: refused"),
            "{why}"
        );
        assert_eq!(out.text(), "", "{vcpus} vCPUs: the guest ran");
    }
}
