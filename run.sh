#!/usr/bin/env bash
# godwit's main job on its built-in default: build, then boot a VM with a virtual GPU
# function that trains a Jacobi solver on it (gpu-train), live-migrate it mid-training
# to a second godwit process on this machine, show the migration's progress and
# report, and check that training ends with the same iteration count and hash as a run
# that was never moved (`godwit demo`).
#
# With arguments, they go to `godwit run` instead, e.g.
#   ./run.sh heartbeat            ./run.sh --vcpus 2 smp
#   ./run.sh dirtier -- wss=64 rate=100 seconds=5
#   ./run.sh --gpu GW8-1C --gpu-dir /tmp/gpu gpu-verify -- rounds=10
set -euo pipefail
cd "$(dirname "$0")"
command -v cargo >/dev/null || { echo "cargo not found: install Rust (rustup) first" >&2; exit 1; }
# The userfaultfd crate (post-copy) generates its bindings with libclang at build time.
if ! dpkg -s libclang-dev >/dev/null 2>&1; then
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
    echo "== installing libclang-dev" >&2
    $sudo apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq libclang-dev >/dev/null
fi
cargo build --release --locked -p godwit >&2
if [ $# -eq 0 ]; then
    exec target/release/godwit demo
fi
exec target/release/godwit run "$@"
