//! The GPU function driven by a hostile guest: register writes, ring entries, page
//! tables, engine runs cut short and migrations mid-command (the operations and what
//! must hold are in crates/gpu/src/vf/fuzz.rs).

pub fn check(data: &[u8]) {
    godwit_gpu::vf::fuzz::engine(data);
}
