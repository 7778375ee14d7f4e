//! The fuzz target for what checks/gpu_engine.rs says must hold. `cargo test` replays the
//! corpus through the same check (crates/godwit/tests/fuzz_corpus.rs).
#![no_main]

#[path = "../checks/gpu_engine.rs"]
mod check;

libfuzzer_sys::fuzz_target!(|data: &[u8]| check::check(data));
