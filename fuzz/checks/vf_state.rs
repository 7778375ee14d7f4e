//! The GPU function's saved state decoder on hostile bytes: what decodes re-encodes and
//! decodes the same.

pub fn check(data: &[u8]) {
    if let Ok(s) = godwit_gpu::VfState::decode(data) {
        let again = godwit_gpu::VfState::decode(&s.encode()).expect("re-decodes");
        assert_eq!(again.encode(), s.encode());
    }
}
