//! The VM's state decoders (vCPUs, platform devices) on hostile bytes.

pub fn check(data: &[u8]) {
    let _ = godwit_vmm::migratable::fuzz_decode_states(data);
}
