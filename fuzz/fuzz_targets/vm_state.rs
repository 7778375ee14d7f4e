//! The VM's state decoders (vCPUs, platform devices) on hostile bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = godwit_vmm::migratable::fuzz_decode_states(data);
});
