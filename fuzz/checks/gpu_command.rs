//! The GPU command decoder: ring entries a guest wrote.
use godwit_gpu::abi::ENTRY_SIZE;

pub fn check(data: &[u8]) {
    for chunk in data.chunks_exact(ENTRY_SIZE) {
        let e: &[u8; ENTRY_SIZE] = chunk.try_into().expect("exact chunk");
        let _ = godwit_gpu::command::decode(e);
    }
}
