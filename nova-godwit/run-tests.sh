#!/usr/bin/env bash
# The Nova driver's tests: Nova's own functional harness (API, conductor, scheduler,
# sqlite, Placement) with compute services on the godwit driver and real godwit VMs.
# Makes a Python 3.11 venv in ../target/nova-venv with every package pinned
# (requirements.txt; made again when that file changes), installs the driver into
# Nova's tree there, and runs the tests with stestr (arguments go to `stestr run`).
# GODWIT_BIN: the godwit to drive (default: the workspace's debug build).
set -euo pipefail
cd "$(dirname "$0")"
venv=../target/nova-venv
py=python3.11
command -v "$py" >/dev/null || py=python3
"$py" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' || {
    echo "nova-godwit: the tests are pinned for Python 3.11" >&2
    exit 1
}
if ! cmp -s requirements.txt "$venv/requirements.txt"; then
    echo "== nova-godwit: installing nova, openstack-placement and their test tools (requirements.txt) into target/nova-venv"
    rm -rf "$venv"
    "$py" -m venv "$venv"
    # wheel: to build the driver's own package without network (--no-build-isolation).
    "$venv/bin/pip" install -q wheel==0.48.0
    "$venv/bin/pip" install -q -r requirements.txt
    cp requirements.txt "$venv/requirements.txt"
fi
"$venv/bin/pip" install -q --no-deps --no-build-isolation --force-reinstall . 2>&1 |
    grep -v -i 'warn' >&2 || true
rm -rf build ./*.egg-info
echo "== nova-godwit: pycodestyle, pyflakes"
"$venv/bin/python" -m pycodestyle --max-line-length=79 nova godwit_nova_tests
"$venv/bin/python" -m pyflakes nova godwit_nova_tests
export GODWIT_BIN="${GODWIT_BIN:-$PWD/../target/debug/godwit}"
[ -x "$GODWIT_BIN" ] || (cd .. && cargo build -p godwit --locked)
start=$(date +%s)
"$venv/bin/python" -m stestr run "$@"
echo "== nova-godwit: tests took $(( $(date +%s) - start )) s"
