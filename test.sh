#!/usr/bin/env bash
# godwit's whole test suite, from a fresh Debian 12 machine: installs what the tests need
# (QEMU 7.2 as the peer VMM, Debian's kernel for the Linux test, xz, util-linux, a Python
# venv with schemathesis for the API's OpenAPI check, another with Nova and Placement for
# the Nova driver's tests), then
# checks formatting and lints and runs every test. Real guests run under /dev/kvm.
set -euo pipefail
cd "$(dirname "$0")"

# Installs the Debian packages listed in `need`, if any.
install_needed() {
    [ ${#need[@]} -gt 0 ] || return 0
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    echo "== installing ${need[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
}

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
compgen -G '/boot/vmlinuz-*' >/dev/null || need+=(linux-image-amd64)
command -v xz >/dev/null || need+=(xz-utils)
{ command -v unshare && command -v setpriv; } >/dev/null || need+=(util-linux)
# The Nova driver's tests give each compute host a network namespace (ip netns).
command -v ip >/dev/null || need+=(iproute2)
# The userfaultfd crate (post-copy) generates its bindings with libclang at build time.
dpkg -s libclang-dev >/dev/null 2>&1 || need+=(libclang-dev)
install_needed
# schemathesis (PyPI, pinned) checks the API against docs/openapi.yaml.
need=()
command -v python3 >/dev/null || need+=(python3)
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
install_needed
# Every package pinned (tests-requirements.txt, from pip freeze); reinstalled when it changes.
if ! cmp -s tests-requirements.txt target/test-venv/requirements.txt; then
    echo "== installing schemathesis (tests-requirements.txt) into target/test-venv"
    mkdir -p target
    python3 -m venv target/test-venv
    target/test-venv/bin/pip install -q -r tests-requirements.txt
    cp tests-requirements.txt target/test-venv/requirements.txt
fi
export GODWIT_SCHEMATHESIS="$PWD/target/test-venv/bin/st"
command -v cargo >/dev/null || { echo "cargo not found: install Rust (rustup) first" >&2; exit 1; }
rustup component list --installed 2>/dev/null | grep -q rustfmt || rustup component add rustfmt clippy

echo "== format"
cargo fmt --all -- --check
rustfmt --edition 2021 --check crates/guest/rt/lib.rs crates/guest/programs/*.rs fuzz/fuzz_targets/*.rs fuzz/checks/*.rs
echo "== lint"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== test"
cargo test --workspace --locked
if [ "${GODWIT_SKIP_NOVA:-}" = 1 ]; then
    echo "== Nova driver: skipped (GODWIT_SKIP_NOVA=1)"
else
    echo "== Nova driver (nova-godwit): Nova's functional harness, godwit compute hosts"
    cargo build -p godwit --locked
    GODWIT_BIN="$PWD/target/debug/godwit" ./nova-godwit/run-tests.sh
fi
