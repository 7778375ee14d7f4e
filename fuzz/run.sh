#!/usr/bin/env bash
# Coverage-guided fuzzing of godwit's parsers of hostile input (cargo fuzz, libFuzzer):
#   wire_frame    the migration stream decoder (crates/migration/src/wire.rs)
#   vm_state      the VM's state decoders: vCPUs, platform devices
#   vf_state      the GPU function's saved state decoder
#   gpu_command   the GPU command decoder (ring entries a guest writes)
#   gpu_engine    the GPU function driven by a hostile guest, migrated mid-command
#   http_request  the API server's request reading and limits
#   postcopy      post-copy page requests (source) and page placement (destination)
#   snapshot_index  a snapshot's page index as a lazy restore reads it
# What must hold for each is in fuzz/checks/TARGET.rs.
# Usage: fuzz/run.sh [SECONDS per target, default 60] [TARGET...]
#        fuzz/run.sh --keep [TARGET...]
# The corpus in fuzz/corpus/TARGET (seeds from a real GPU VM's snapshot and real
# requests; gpu_engine's are built by code, and `GODWIT_WRITE_SEEDS=1 cargo test -p
# godwit --test fuzz_corpus` rewrites them; and what earlier runs found that reached
# new code) is what `cargo test` replays (crates/godwit/tests/fuzz_corpus.rs). A run
# adds what it finds to target/fuzz-corpus/TARGET and crashes to
# fuzz/artifacts/TARGET (copy each into fuzz/corpus/TARGET once fixed: it stays as a
# regression test). `--keep` merges into fuzz/corpus/TARGET only those found inputs
# that reach code the corpus does not (libFuzzer's -merge=1), for committing. Builds are optimised with debug assertions
# and overflow checks on (-O -a), as `cargo test` builds are: an overflow a hostile
# input causes is a crash here, not a silent wrap. Needs cargo-fuzz (`cargo install
# cargo-fuzz`); RUSTC_BOOTSTRAP lets the stable toolchain take the sanitizer flags.
set -euo pipefail
cd "$(dirname "$0")"
keep=false
if [ "${1:-}" = --keep ]; then
    keep=true
    shift
else
    secs=${1:-60}
    shift || true
fi
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(wire_frame vm_state vf_state gpu_command gpu_engine http_request postcopy snapshot_index)
export RUSTC_BOOTSTRAP=1
cargo fuzz build -O -a
for t in "${targets[@]}"; do
    mkdir -p "../target/fuzz-corpus/$t"
    if $keep; then
        echo "== $t: merging target/fuzz-corpus/$t into corpus/$t"
        cargo fuzz run -O -a "$t" "corpus/$t" "../target/fuzz-corpus/$t" -- \
            -merge=1 -max_len=65536 2>&1 | grep -E "MERGE-OUTER: [0-9]+ new files" || true
        continue
    fi
    echo "== $t: $secs s"
    cargo fuzz run -O -a "$t" "../target/fuzz-corpus/$t" "corpus/$t" -- \
        -max_total_time="$secs" -max_len=65536 -print_final_stats=1 2>&1 |
        grep -E "^(#[0-9]+.*DONE|stat::|==[0-9]+==|SUMMARY|Done)" || true
done
