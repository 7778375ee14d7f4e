#!/usr/bin/env bash
# Live post-copy between two godwit builds, with the link cut mid-way and recovered:
#   tools/cross-version.sh OLD_GODWIT NEW_GODWIT
# OLD runs the source (a dirtier that checks all its memory every second), NEW the
# destination. A proxy between them is cut once post-copy runs; `migrate-recover` then
# goes on directly. Passes when the migration completes after one recovery and the
# guest's next two full checks at the destination pass. Then the other way round, a
# NEW source to an OLD destination, which must either work the same or be refused
# with both wire versions named. Needs /dev/kvm, python3, curl and ss.
set -euo pipefail
OLD=$(readlink -f "$1"); NEW=$(readlink -f "$2")
D=$(mktemp -d /tmp/godwit-xver.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
fail() { echo "FAIL: $*" >&2; echo "logs in $D" >&2; exit 1; }

# A TCP proxy that closes everything once the file $3 exists.
cat > "$D/proxy.py" <<'PY'
import os, socket, sys, threading, time
lport, dport, cut = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("127.0.0.1", lport)); ls.listen(16)
conns = []
def pump(a, b):
    try:
        while True:
            d = a.recv(65536)
            if not d: break
            b.sendall(d)
    except OSError: pass
    for s in (a, b):
        try: s.shutdown(socket.SHUT_RDWR)
        except OSError: pass
def cutter():
    while not os.path.exists(cut): time.sleep(0.01)
    for s in conns:
        try: s.shutdown(socket.SHUT_RDWR)
        except OSError: pass
    ls.close()
threading.Thread(target=cutter, daemon=True).start()
while True:
    try: c, _ = ls.accept()
    except OSError: break
    u = socket.create_connection(("127.0.0.1", dport))
    conns += [c, u]
    threading.Thread(target=pump, args=(c, u), daemon=True).start()
    threading.Thread(target=pump, args=(u, c), daemon=True).start()
while True: time.sleep(1)
PY

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
phase() {
  curl -s --unix-socket "$1" http://localhost/api/v1/vm.migration |
    python3 -c 'import json,sys; print(json.load(sys.stdin).get("progress",{}).get("phase"))' 2>/dev/null || true
}
wait_for() { # seconds, command...
  local n=$(( $1 * 20 )); shift
  for _ in $(seq "$n"); do "$@" && return 0; sleep 0.05; done; return 1
}
is_phase() { test "$(phase "$1")" = "$2"; }
checks() { grep -c "verify ok pages=16384" "$1" 2>/dev/null || true; }
checked() { test "$(checks "$1")" -ge "$2"; }
started() { grep -q touched "$1" 2>/dev/null; }
listening() { ss -ltn "sport = :$1" | grep -q LISTEN; }

echo "== $OLD (source) -> $NEW (destination): post-copy, link cut, recovered"
P=$(port); Q=$(port)
"$OLD" run --api-socket "$D/src.sock" -m 512 --console "file:$D/src.log" dirtier -- \
  wss=64 rate=200 seconds=0 verify-every=1 report-every=250 2>"$D/src.err" & pids+=($!)
SRC=$!
"$NEW" run --incoming "tcp:127.0.0.1:$P" --api-socket "$D/dst.sock" --console "file:$D/dst.log" \
  2>"$D/dst.err" & pids+=($!)
DST=$!
python3 "$D/proxy.py" "$Q" "$P" "$D/cut" & pids+=($!)
wait_for 10 started "$D/src.log" || fail "the source guest never started"
wait_for 10 listening "$P" || fail "the destination is not listening"
wait_for 10 listening "$Q" || fail "the proxy is not listening"
"$OLD" migrate --api-socket "$D/src.sock" --to "tcp:127.0.0.1:$Q" --mode postcopy \
  --max-bandwidth 16M --json >"$D/migrate.json" 2>"$D/migrate.err" &
MIG=$!
wait_for 20 is_phase "$D/src.sock" postcopy || fail "post-copy never began"
touch "$D/cut"
wait_for 20 is_phase "$D/src.sock" postcopy_paused || fail "post-copy did not pause"
"$OLD" migrate-recover --api-socket "$D/src.sock" --to "tcp:127.0.0.1:$P" >/dev/null \
  || fail "migrate-recover"
wait "$MIG" || fail "the migration failed: $(cat "$D/migrate.err")"
python3 - "$D/migrate.json" <<'PY' || fail "report"
import json, sys
r = json.load(open(sys.argv[1]))
p = r["postcopy"]
assert r["status"] == "completed" and r["ran"] == "postcopy", r
assert p["recoveries"] == 1, p
print(f"   completed: {sum(p['missing_pages'].values())} pages missing at the switch, "
      f"{p['remote_faults']} remote faults, 1 recovery")
PY
n0=$(checks "$D/dst.log")
wait_for 20 checked "$D/dst.log" $((n0 + 2)) || fail "the guest's checks stopped"
grep -q FAILED "$D/dst.log" && fail "the guest found damaged memory"
echo "   the guest verified all of its memory at the destination ($(checks "$D/dst.log") checks)"
wait "$SRC" || fail "the source did not end cleanly"
"$NEW" shutdown --api-socket "$D/dst.sock" >/dev/null; wait "$DST" || true

echo "== $NEW (source) -> $OLD (destination)"
P=$(port)
"$OLD" run --incoming "tcp:127.0.0.1:$P" --api-socket "$D/dst2.sock" \
  --console "file:$D/dst2.log" 2>"$D/dst2.err" & pids+=($!)
DST=$!
"$NEW" run --api-socket "$D/src2.sock" -m 256 --console "file:$D/src2.log" dirtier -- \
  wss=16 rate=20 seconds=0 verify-every=1 2>"$D/src2.err" & pids+=($!)
SRC=$!
wait_for 10 started "$D/src2.log" || fail "the second source guest never started"
wait_for 10 listening "$P" || fail "the second destination is not listening"
if "$NEW" migrate --api-socket "$D/src2.sock" --to "tcp:127.0.0.1:$P" --mode postcopy \
  >"$D/migrate2.out" 2>&1; then
  echo "   accepted and completed"
  wait "$SRC" || true
  "$OLD" shutdown --api-socket "$D/dst2.sock" >/dev/null
else
  grep -q "wire version" "$D/migrate2.out" || fail "refused without naming the versions"
  echo "   refused: $(grep -o 'the source speaks.*' "$D/migrate2.out" | head -1)"
  test "$(curl -s --unix-socket "$D/src2.sock" http://localhost/api/v1/vm.info |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["state"])')" = running ||
    fail "the source VM is not running after the refusal"
  echo "   the source VM runs on"
  "$NEW" shutdown --api-socket "$D/src2.sock" >/dev/null
fi
echo "PASS"
rm -rf "$D"
