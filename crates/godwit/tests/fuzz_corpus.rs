//! The fuzzers' corpora, replayed through the checks their targets run (fuzz/checks):
//! the seeds and every input the fuzzers kept because it reached new code (merged in
//! with `fuzz/run.sh --keep`). An input that once found a bug stays here as its
//! regression test, and a parser change that breaks what held on any of them fails
//! `cargo test`, with no fuzzer or nightly flags needed.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

#[path = "../../../fuzz/checks/gpu_command.rs"]
mod gpu_command;
#[path = "../../../fuzz/checks/gpu_engine.rs"]
mod gpu_engine;
#[path = "../../../fuzz/checks/http_request.rs"]
mod http_request;
#[path = "../../../fuzz/checks/postcopy.rs"]
mod postcopy;
#[path = "../../../fuzz/checks/snapshot_index.rs"]
mod snapshot_index;
#[path = "../../../fuzz/checks/vf_state.rs"]
mod vf_state;
#[path = "../../../fuzz/checks/vm_state.rs"]
mod vm_state;
#[path = "../../../fuzz/checks/wire_frame.rs"]
mod wire_frame;

/// Every input in fuzz/corpus/TARGET through `check`; fails naming each input on which
/// it panicked. A corpus that shrank below `at_least` inputs fails too, so the replay
/// cannot pass by finding nothing to replay.
fn replay(target: &str, at_least: usize, check: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
    let mut inputs: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    inputs.sort();
    assert!(
        inputs.len() >= at_least,
        "{} inputs in {}, expected at least {at_least}",
        inputs.len(),
        dir.display()
    );
    let failed: Vec<String> = inputs
        .iter()
        .filter(|p| {
            let data = std::fs::read(p).unwrap();
            catch_unwind(AssertUnwindSafe(|| check(&data))).is_err()
        })
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert!(
        failed.is_empty(),
        "{target}: {} of {} inputs broke what must hold: {failed:?}",
        failed.len(),
        inputs.len()
    );
}

#[test]
fn the_migration_stream_corpus_holds() {
    replay("wire_frame", 300, wire_frame::check);
}

#[test]
fn the_vm_state_corpus_holds() {
    replay("vm_state", 300, vm_state::check);
}

#[test]
fn the_gpu_function_state_corpus_holds() {
    replay("vf_state", 200, vf_state::check);
}

#[test]
fn the_gpu_command_corpus_holds() {
    replay("gpu_command", 200, gpu_command::check);
}

#[test]
fn the_api_request_corpus_holds() {
    replay("http_request", 500, http_request::check);
}

/// Among them a request for a page near the top of the address space, whose offset into
/// this memory the harness once added to the mapping's address before checking it.
#[test]
fn the_postcopy_page_traffic_corpus_holds() {
    replay("postcopy", 200, postcopy::check);
}

#[test]
fn the_snapshot_index_corpus_holds() {
    replay("snapshot_index", 100, snapshot_index::check);
}

/// Among them a FILL that the guest's page tables alias past all of the VF's memory,
/// migrated mid-way to a post-copy destination, whose engine once stopped at the same
/// missing page forever: its prefetch walked less than one step's chunk.
#[test]
fn the_gpu_engine_corpus_holds() {
    replay("gpu_engine", 1000, gpu_engine::check);
}

/// The GPU engine's seeds are built by code (`godwit_gpu::vf::fuzz::seeds`), so they
/// follow its input format: each must be in the corpus as built (GODWIT_WRITE_SEEDS=1
/// writes them there) and reach what it is there for.
#[test]
fn the_gpu_engine_seeds_are_in_the_corpus_and_reach_their_commands() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/gpu_engine");
    for (name, data) in godwit_gpu::vf::fuzz::seeds() {
        let file = dir.join(name);
        if std::env::var_os("GODWIT_WRITE_SEEDS").is_some() {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(&file, &data).unwrap();
        }
        let kept = std::fs::read(&file).unwrap_or_default();
        assert!(
            kept == data,
            "{name} in {} is not the seed as built",
            dir.display()
        );
        let out = godwit_gpu::vf::fuzz::engine(&data);
        // (commands completed, migrations, hostile states taken, a command failed,
        // steps of a migrated VF checked for what post-copy brought in first): the
        // engine runs on the test's thread, so these are exact.
        let want = match name {
            "seed_aliased" => (1, 1, 0, false, 6),
            "seed_postcopy" => (8, 1, 0, false, 20),
            "seed_postcopy_rewrite" => (2, 1, 0, false, 5),
            "seed_postcopy_retable" => (1, 1, 0, false, 4),
            "seed_postcopy_retable_ram" => (1, 1, 0, false, 4),
            "seed_fill_copy" => (7, 0, 0, false, 0),
            "seed_kernels" => (10, 0, 0, false, 0),
            "seed_migrate" => (3, 2, 0, false, 6),
            "seed_tamper" => (2, 0, 4, false, 0),
            _ => (0, 0, 0, true, 0),
        };
        assert_eq!(
            (
                out.completed,
                out.migrations,
                out.tampered,
                out.errors > 0,
                out.brought_in
            ),
            want,
            "{name}: {out:?}"
        );
    }
}
