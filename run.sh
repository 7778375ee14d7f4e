#!/usr/bin/env bash
# godwit's main job on its built-in default: build, boot the default guest (heartbeat,
# ten beats) and show its console. Any `godwit run` arguments may follow, e.g.
#   ./run.sh --vcpus 2 smp        ./run.sh dirtier -- wss=64 rate=100 seconds=5
set -euo pipefail
cd "$(dirname "$0")"
command -v cargo >/dev/null || { echo "cargo not found: install Rust (rustup) first" >&2; exit 1; }
cargo build --release --locked -p godwit >&2
exec target/release/godwit run "$@"
