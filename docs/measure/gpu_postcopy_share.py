import json, os, subprocess, sys, time, signal
G = "/work/main/target/release/godwit"
D = "/tmp/gm"
def status():
    return json.loads(subprocess.check_output([G, "gpu", "status", "--gpu-dir", f"{D}/gpu", "--json"]))
def engine_of(pid):
    for v in status()[0]["vfs"]:
        if f"pid {pid}" in json.dumps(v):
            return v
    return None
def run(prefetch, port):
    env = dict(os.environ)
    if not prefetch: env["GODWIT_GPU_PREFETCH"] = "off"
    wl = "aperture=1 engine=1 dma=1 rate=16 busy=256 seconds=0 report-every=1000".split()
    b = subprocess.Popen([G, "run", "-m", "512", "--gpu", "GW8-1C", "--gpu-index", "0", "--gpu-dir", f"{D}/gpu", "--console", f"file:{D}/b.log", "gpu-dirtier", "--"] + wl, stderr=subprocess.DEVNULL)
    a = subprocess.Popen([G, "run", "-m", "512", "--api-socket", f"{D}/a.sock", "--gpu", "GW8-1C", "--gpu-index", "0", "--gpu-dir", f"{D}/gpu", "--console", f"file:{D}/a.log", "gpu-dirtier", "--"] + wl, stderr=subprocess.DEVNULL)
    d = subprocess.Popen([G, "run", "--incoming", f"tcp:127.0.0.1:{port}", "--gpu-index", "0", "--gpu-dir", f"{D}/gpu", "--console", f"file:{D}/d.log"], env=env, stderr=subprocess.DEVNULL)
    try:
        time.sleep(8)
        def ns():
            v = engine_of(b.pid)
            return json.dumps(v)
        def b_ns():
            for v in status()[0]["vfs"]:
                s = json.dumps(v)
                if f"pid {b.pid}" in s:
                    return v["engine_ms"] * 1e6
        # baseline: both busy
        e0, t0 = b_ns(), time.time(); time.sleep(3); e1, t1 = b_ns(), time.time()
        base = (e1 - e0) / 1e9 / (t1 - t0)
        e0, t0 = b_ns(), time.time()
        out = subprocess.run([G, "migrate", "--api-socket", f"{D}/a.sock", "--to", f"tcp:127.0.0.1:{port}", "--mode", "postcopy", "--max-bandwidth", "64M", "--json"], capture_output=True, text=True)
        e1, t1 = b_ns(), time.time()
        r = json.loads(out.stdout)
        p = r["postcopy"]
        during = (e1 - e0) / 1e9 / (t1 - t0)
        res = dict(prefetch=prefetch, b_share_before=round(base, 3), b_share_during_window=round(during, 3), window_ms=round(p["window_ms"]), total_ms=round(r["total_ms"]), remote_faults=p["remote_faults"], fetched_ahead=p["destination"]["gpu"]["fetched_ahead"] + p["destination"]["ram"]["fetched_ahead"], fault_latency_us={k: round(v) for k, v in p["fault_latency"].items()})
    finally:
        # Whatever failed, no VM is left running (one left would hold its VF).
        for x in (a, b, d):
            x.send_signal(signal.SIGTERM)
        for x in (a, b, d):
            x.wait()
    return res
print(json.dumps(status()[0]["vfs"]))
results = []
for i in range(int(sys.argv[1]) if len(sys.argv) > 1 else 2):
    for pf in (True, False):
        r = run(pf, 47200 + i * 2 + pf)
        print(json.dumps(r), flush=True)
        results.append(r)
json.dump(results, open(f"{D}/results.json", "w"), indent=1)
