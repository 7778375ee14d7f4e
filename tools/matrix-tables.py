#!/usr/bin/env python3
"""The README's tables and goal count from `godwit bench migrate --modes ... --json`.

Usage: tools/matrix-tables.py FILE.json
Prints the downtime and total tables (median (min-max) per side) in Markdown, and the
guest's CPU where the report has it, then per
godwit mode-cell what the issue's goal asks: median downtime at most 5 ms, no run above
10 ms, every run's total at most the best QEMU side's median; and the fault-latency
medians of post-copy runs, split at 10 faults.
"""
import json
import sys


def fmt(v):
    return f"{v:.1f}" if v < 100 else f"{v:.0f}"


def cell_name(c):
    mem = f"{c['memory_mib'] // 1024} GiB" if c["memory_mib"] >= 1024 else f"{c['memory_mib']} MiB"
    return f"{mem}, {c['workload']}, {c['downtime_limit_ms']} ms"


def short(version):
    return "QEMU " + version.split("version ")[1].split()[0]


def sides(c, first_qemu):
    out = [("godwit pre-copy" if True else "", c["godwit"])]
    for a in c.get("godwit_alternatives", []):
        out.append((f"godwit {a['mode'].replace('postcopy', 'post-copy').replace('precopy', 'pre-copy')}", a["side"]))
    q = [(f"{first_qemu} pre-copy", c["qemu"])]
    if c.get("qemu_multifd"):
        q.append((f"{first_qemu} multifd", c["qemu_multifd"]))
    if c.get("qemu_postcopy"):
        q.append((f"{first_qemu} post-copy", c["qemu_postcopy"]))
    for o in c.get("other_qemus", []):
        q.append((f"{short(o['version'])} pre-copy", o["precopy"]))
        if o.get("multifd"):
            q.append((f"{short(o['version'])} multifd", o["multifd"]))
        if o.get("postcopy"):
            q.append((f"{short(o['version'])} post-copy", o["postcopy"]))
    return out, q


def main():
    d = json.load(open(sys.argv[1]))
    first_qemu = short(d["qemu"])
    cells = d["cells"]
    g0, q0 = sides(cells[0], first_qemu)
    names = [n for n, _ in g0 + q0]
    metrics = [("downtime_ms", "Downtime ms"), ("total_ms", "Total ms")]
    # Reports from 2026-12-04 on also say how much of a CPU the guest had meanwhile.
    if "guest_cpu" in cells[0]["godwit"]:
        metrics.append(("guest_cpu", "Guest CPU while migrating (1.0: one whole CPU)"))
    for metric, title in metrics:
        print(f"{title}, median (min-max):\n")
        print("| cell (RAM, workload, limit) | " + " | ".join(names) + " |")
        print("|---" * (len(names) + 1) + "|")
        for c in cells:
            g, q = sides(c, first_qemu)
            f = (lambda v: f"{v:.2f}") if metric == "guest_cpu" else fmt
            row = [f"{f(s[metric]['median'])} ({f(s[metric]['min'])}-{f(s[metric]['max'])})" for _, s in g + q]
            print(f"| {cell_name(c)} | " + " | ".join(row) + " |")
        print()
    ok = {"median": 0, "max": 0, "total": 0}
    n = 0
    misses = []
    few, many = [], []
    for c in cells:
        g, q = sides(c, first_qemu)
        best = min(s["total_ms"]["median"] for _, s in q)
        for name, s in g:
            n += 1
            ok["median"] += s["downtime_ms"]["median"] <= 5
            ok["max"] += s["downtime_ms"]["max"] <= 10
            totals = [x["total_ms"] for x in s["samples"]]
            if all(t <= best for t in totals):
                ok["total"] += 1
            else:
                misses.append(f"{cell_name(c)}, {name}: runs {', '.join(fmt(t) for t in totals)} against {fmt(best)}")
            for x in s["samples"]:
                fl = x.get("fault_latency_us")
                if fl and fl.get("count"):
                    (many if fl["count"] > 10 else few).append(fl["median_us"])
    print(f"mode-cells: {n}; median downtime <= 5 ms: {ok['median']}; no run > 10 ms: {ok['max']}; every total <= best QEMU median: {ok['total']}")
    for m in misses:
        print("  miss:", m)
    if many:
        print(f"fault-latency medians, runs with > 10 faults: {len(many)} runs, {min(many):.0f}-{max(many):.0f} us, over 200 us: {sum(x > 200 for x in many)}")
    if few:
        over = sorted(x for x in few if x > 200)
        print(f"fault-latency medians, runs with 1-10 faults: {len(few)} runs, over 200 us: {len(over)} ({', '.join(f'{x:.0f}' for x in over)})")


main()
