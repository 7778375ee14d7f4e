#!/usr/bin/env bash
# Coverage-guided fuzzing of godwit's parsers of hostile input (cargo fuzz, libFuzzer):
#   wire_frame    the migration stream decoder (crates/migration/src/wire.rs)
#   vm_state      the VM's state decoders: vCPUs, platform devices
#   vf_state      the GPU function's saved state decoder
#   gpu_command   the GPU command decoder (ring entries a guest writes)
#   http_request  the API server's request reading and limits
#   postcopy      post-copy page requests (source) and page placement (destination)
#   snapshot_index  a snapshot's page index as a lazy restore reads it
# Usage: fuzz/run.sh [SECONDS per target, default 60] [TARGET...]
# Seeds are in fuzz/corpus/TARGET (from a real GPU VM's snapshot and real requests);
# what the fuzzer finds goes to target/fuzz-corpus/TARGET, crashes to
# fuzz/artifacts/TARGET (turn each into a regression test). Needs cargo-fuzz
# (`cargo install cargo-fuzz`); RUSTC_BOOTSTRAP lets the stable toolchain take the
# sanitizer flags.
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(wire_frame vm_state vf_state gpu_command http_request postcopy snapshot_index)
export RUSTC_BOOTSTRAP=1
cargo fuzz build -O
for t in "${targets[@]}"; do
    mkdir -p "../target/fuzz-corpus/$t"
    echo "== $t: $secs s"
    cargo fuzz run -O "$t" "../target/fuzz-corpus/$t" "corpus/$t" -- \
        -max_total_time="$secs" -max_len=65536 -print_final_stats=1 2>&1 |
        grep -E "^(#[0-9]+.*DONE|stat::|==[0-9]+==|SUMMARY|Done)" || true
done
