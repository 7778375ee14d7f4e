//! Helpers shared by the VMM's integration tests: real VMs built in-process.
#![allow(dead_code)] // each test file uses its own subset

use godwit_vmm::dirty::DirtyLogMode;
use godwit_vmm::{Console, Payload, Vm, VmConfig};
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Collects a guest's console output in memory.
#[derive(Clone, Default)]
pub struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Sink {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

pub fn kvm_available() -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(_) if std::env::var("GODWIT_SKIP_KVM_TESTS").as_deref() == Ok("1") => false,
        Err(e) => panic!("/dev/kvm: {e}; set GODWIT_SKIP_KVM_TESTS=1 to skip KVM tests"),
    }
}

pub fn vm(program: &str, args: &str, vcpus: u32, memory_mib: u64, sink: &Sink) -> Vm {
    vm_tracked(
        program,
        args,
        vcpus,
        memory_mib,
        sink,
        DirtyLogMode::default(),
    )
}

/// A VM of a built-in guest whose writes are tracked the `dirty_log` way.
pub fn vm_tracked(
    program: &str,
    args: &str,
    vcpus: u32,
    memory_mib: u64,
    sink: &Sink,
    dirty_log: DirtyLogMode,
) -> Vm {
    Vm::create(VmConfig {
        memory_mib,
        vcpus,
        payload: Payload::Guest {
            name: program.into(),
            image: godwit_guest::image(program).unwrap().to_vec(),
            args: args.into(),
        },
        console: Console::Writer(Box::new(sink.clone())),
        gpu: None,
        dirty_log,
        id: None,
        prefaulted: Default::default(),
    })
    .unwrap()
}

pub fn wait_until(limit: Duration, f: impl Fn() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

/// Stops every component of `vm` (in stop order) and reads their states.
pub fn save(vm: &Vm) -> Vec<Vec<u8>> {
    vm.components()
        .iter()
        .map(|c| {
            godwit_vmm::migratable::step_to(&**c, godwit_vmm::migratable::MigState::StopCopy)
                .unwrap();
            c.save().unwrap()
        })
        .collect()
}

/// Loads states into a fresh VM (same shape, threads parked), up to STOP.
pub fn load(vm: &mut Vm, states: &[Vec<u8>]) {
    use godwit_vmm::migratable::{step_to, MigState};
    vm.start_paused().unwrap();
    for (c, s) in vm.components().iter().zip(states) {
        step_to(&**c, MigState::Resuming).unwrap();
        c.load(s).unwrap();
        step_to(&**c, MigState::Stop).unwrap();
    }
}
