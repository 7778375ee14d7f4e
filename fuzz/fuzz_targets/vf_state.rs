//! The GPU function's saved state decoder on hostile bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = godwit_gpu::VfState::decode(data) {
        // What decodes re-encodes and decodes the same.
        let again = godwit_gpu::VfState::decode(&s.encode()).expect("re-decodes");
        assert_eq!(again.encode(), s.encode());
    }
});
