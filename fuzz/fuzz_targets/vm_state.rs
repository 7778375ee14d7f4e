//! The fuzz target for what checks/vm_state.rs says must hold. `cargo test` replays the
//! corpus through the same check (crates/godwit/tests/fuzz_corpus.rs).
#![no_main]

#[path = "../checks/vm_state.rs"]
mod check;

libfuzzer_sys::fuzz_target!(|data: &[u8]| check::check(data));
