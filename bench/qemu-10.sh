#!/usr/bin/env bash
# Finds or fetches QEMU 10.0 for the migration benchmarks, beside the QEMU 7.2 that
# test.sh installs (both are the package qemu-system-x86, so apt cannot hold both).
# It downloads qemu-system-x86, -common and -data from Debian's bookworm-backports with
# apt (a private source list and cache: the machine's apt setup is left alone), unpacks
# them into target/qemu-10 with dpkg -x, and prints the binary's path. The libraries it
# needs are those QEMU 7.2 already pulled in. Usage:
#   target/release/godwit bench migrate --modes precopy,postcopy --qemu-extra "$(bench/qemu-10.sh)"
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD/target/qemu-10"
bin="$root/usr/bin/qemu-system-x86_64"
if [ -x "$bin" ] && "$bin" --version | grep -q "version 10\."; then
    echo "$bin"
    exit 0
fi
work="$PWD/target/qemu-10-apt"
mkdir -p "$work/parts" "$work/lists/partial" "$work/cache/archives/partial" "$work/debs"
cat >"$work/parts/backports.sources" <<SRC
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
apt=(-o Dir::Etc::SourceList=/dev/null -o "Dir::Etc::SourceParts=$work/parts"
    -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache")
apt-get "${apt[@]}" update -qq >&2
(cd "$work/debs" && apt-get "${apt[@]}" download -qq \
    qemu-system-x86/bookworm-backports qemu-system-common/bookworm-backports \
    qemu-system-data/bookworm-backports >&2 2>/dev/null)
rm -rf "$root"
for d in "$work"/debs/*.deb; do dpkg -x "$d" "$root"; done
if ! out=$("$bin" --version 2>&1) || ! grep -q "version 10\." <<<"$out"; then
    echo "no working QEMU 10 in $root: $out" >&2
    # The usual cause: the libraries it links come with QEMU 7.2, not yet installed.
    if grep -q "error while loading shared libraries" <<<"$out"; then
        echo "install QEMU 7.2 first (./test.sh does: apt-get install qemu-system-x86)" >&2
    fi
    exit 1
fi
echo "$bin"
