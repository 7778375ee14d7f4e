//! `godwit bench restore`: how long a snapshot takes to come back, against memory size.
//! Per size, the dirtier (half of its RAM filled with data, rewritten slowly) is saved
//! once by godwit and once by QEMU (`migrate` to `exec:cat > FILE`); then each run
//! restores it and times process start to the guest's first console line: godwit
//! eager (everything read and checked before the VM starts), godwit lazy (the VM starts
//! once its device states are loaded; memory is read as it is touched and in the
//! background, whose end is reported too) and QEMU (`-incoming exec:cat FILE`, which
//! reads everything first). The snapshot files sit in the page cache, as right after
//! they were written: what is measured is the VMM, not the disk.

use crate::bench::{
    alive, peer_qemu, qemu_guest, scratch, steady, summary, wait_for, Procs, Summary,
};
use crate::bench_migrate::Qmp;
use crate::cli::RestoreBenchArgs;
use serde::Serialize;
use serde_json::json;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const STEADY_TIMEOUT: Duration = Duration::from_secs(120);
const LINE_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Serialize)]
struct Side {
    first_line_ms: Summary,
    samples_ms: Vec<f64>,
    /// Lazy restore: from process start to every page in.
    #[serde(skip_serializing_if = "Option::is_none")]
    whole_ms: Option<Summary>,
}

#[derive(Serialize)]
struct Cell {
    memory_mib: u64,
    data_mib: u64,
    godwit_snapshot_bytes: u64,
    godwit_eager: Side,
    godwit_lazy: Side,
    #[serde(skip_serializing_if = "Option::is_none")]
    qemu_snapshot_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    qemu: Option<Side>,
    /// Lazy's first line against eager's, and against QEMU's (min/median/max).
    eager_over_lazy: Summary,
    #[serde(skip_serializing_if = "Option::is_none")]
    qemu_over_lazy: Option<Summary>,
    /// Lazy restore to first line under 10 ms in every run.
    fast_goal: bool,
}

#[derive(Serialize)]
struct Report {
    bench: &'static str,
    guest: &'static str,
    runs: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    qemu: Option<String>,
    cells: Vec<Cell>,
}

fn ratio(a: &Summary, b: &Summary) -> Summary {
    Summary {
        min: a.min / b.min,
        median: a.median / b.median,
        max: a.max / b.max,
    }
}

fn dirtier_args(mem: u64) -> String {
    format!("wss={} rate=1 seconds=0 report-every=20", mem / 2)
}

/// The ms from spawning `cmd` to its first stdout line, and the child, still running.
fn first_line(cmd: Command) -> Result<(f64, std::process::Child), String> {
    crate::bench::time_to_line(cmd, |_| true, LINE_TIMEOUT)
}

fn stop(mut c: std::process::Child) {
    let _ = c.kill();
    let _ = c.wait();
}

/// Saves the dirtier with `mem` MiB to `snap` through godwit.
fn godwit_snapshot(dir: &Path, exe: &Path, mem: u64, snap: &Path) -> Result<(), String> {
    let (log, sock) = (dir.join("g-src.log"), dir.join("g-src.sock"));
    let _ = std::fs::remove_file(&log);
    let _ = std::fs::remove_file(&sock);
    let mut src = Command::new(exe);
    src.args(["run", "--memory", &mem.to_string(), "--api-socket"])
        .arg(&sock)
        .arg("--console")
        .arg(format!("file:{}", log.display()))
        .args(["dirtier", "--"])
        .args(dirtier_args(mem).split(' '))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut procs = Procs(vec![src
        .spawn()
        .map_err(|e| format!("cannot start godwit: {e}"))?]);
    wait_for("the godwit guest", STEADY_TIMEOUT, || {
        alive(&mut procs).then(|| steady(&log))
    })?;
    let body = json!({"to": format!("file:{}", snap.display())}).to_string();
    let (code, out) = godwit_vmm::api::call_with(
        &sock,
        "PUT",
        "vm.migrate",
        &body,
        Some(Duration::from_secs(300)),
    )?;
    if code != 200 {
        return Err(format!("godwit snapshot failed (HTTP {code}): {out}"));
    }
    let _ = procs.0[0].wait();
    Ok(())
}

fn qemu_cmd(qemu: &str, image: &Path, mem: u64) -> Command {
    qemu_guest(qemu, image, mem, &dirtier_args(mem))
}

/// Saves the same guest to `snap` through QEMU.
fn qemu_snapshot(
    dir: &Path,
    qemu: &str,
    image: &Path,
    mem: u64,
    snap: &Path,
) -> Result<(), String> {
    let (log, qmp) = (dir.join("q-src.log"), dir.join("q-src.qmp"));
    let _ = std::fs::remove_file(&log);
    let _ = std::fs::remove_file(&qmp);
    let mut c = qemu_cmd(qemu, image, mem);
    c.arg("-serial").arg(format!("file:{}", log.display()));
    c.arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()));
    c.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut procs = Procs(vec![c
        .spawn()
        .map_err(|e| format!("cannot start {qemu}: {e}"))?]);
    let mut q = Qmp::connect(&qmp)?;
    wait_for("the QEMU guest", STEADY_TIMEOUT, || {
        alive(&mut procs).then(|| steady(&log))
    })?;
    q.cmd(
        "migrate-set-parameters",
        json!({"max-bandwidth": 100u64 << 30, "downtime-limit": 300}),
    )?;
    q.cmd(
        "migrate",
        json!({"uri": format!("exec:cat > {}", snap.display())}),
    )?;
    let end = Instant::now() + Duration::from_secs(300);
    loop {
        let v = q.cmd("query-migrate", json!({}))?;
        match v["status"].as_str() {
            Some("completed") => break,
            Some("failed") | Some("cancelled") => return Err(format!("QEMU snapshot: {v}")),
            _ if Instant::now() > end => return Err("QEMU snapshot timed out".into()),
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    Ok(())
}

/// From godwit's log: the ms at which a lazy restore had every page in.
fn whole_ms(stderr: &str) -> Option<f64> {
    stderr
        .lines()
        .find(|l| l.contains("restore: every page is in"))
        .and_then(|l| l.split("every page is in after ").nth(1))
        .and_then(|v| v.split(' ').next()?.parse().ok())
}

fn bench(a: RestoreBenchArgs) -> Result<Report, String> {
    if a.runs == 0 {
        return Err("--runs must be at least 1".into());
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let qemu = peer_qemu(&a.peer)?;
    let (dir, image) = scratch("restore-", "dirtier")?;
    let mut cells = Vec::new();
    let result = (|| -> Result<(), String> {
        for &mem in &a.memory {
            let gsnap = dir.join("g.snap");
            let qsnap = dir.join("q.snap");
            godwit_snapshot(&dir, &exe, mem, &gsnap)?;
            if qemu.is_some() {
                qemu_snapshot(&dir, &a.peer.qemu, &image, mem, &qsnap)?;
            }
            let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
            let (mut eager, mut lazy, mut whole, mut q) = (vec![], vec![], vec![], vec![]);
            let restore = |how: &str| {
                let mut c = Command::new(&exe);
                c.args(["run", "--incoming"])
                    .arg(format!("file:{}", gsnap.display()))
                    .args(["--restore", how, "--console", "stdout"])
                    .env("GODWIT_LOG", "info")
                    .stderr(if how == "lazy" {
                        Stdio::piped()
                    } else {
                        Stdio::null()
                    });
                c
            };
            for i in 0..a.runs {
                let (ms, c) = first_line(restore("eager"))?;
                eager.push(ms);
                stop(c);
                let (ms, mut c) = first_line(restore("lazy"))?;
                lazy.push(ms);
                // Until every page is in (logged), then stop it.
                let err = c.stderr.take().expect("piped");
                let (tx, rx) = mpsc::channel();
                std::thread::spawn(move || {
                    for l in BufReader::new(err).lines().map_while(Result::ok) {
                        if l.contains("restore: every page is in") {
                            let _ = tx.send(l);
                            return;
                        }
                    }
                });
                let got = rx.recv_timeout(LINE_TIMEOUT);
                stop(c);
                if let Some(w) = got.ok().as_deref().and_then(whole_ms) {
                    whole.push(w);
                }
                if qemu.is_some() {
                    let mut c = qemu_cmd(&a.peer.qemu, &image, mem);
                    c.args(["-serial", "stdio"])
                        .arg("-incoming")
                        .arg(format!("exec:cat {}", qsnap.display()))
                        .stderr(Stdio::null());
                    let (ms, c) = first_line(c)?;
                    q.push(ms);
                    stop(c);
                }
                if !a.json {
                    crate::output::progress(&format!("\r{mem} MiB: run {}/{}", i + 1, a.runs));
                }
            }
            if !a.json {
                crate::output::progress("\n");
            }
            let side = |v: Vec<f64>, whole: Option<Vec<f64>>| Side {
                first_line_ms: summary(&v),
                samples_ms: v,
                whole_ms: whole.filter(|w| !w.is_empty()).map(|w| summary(&w)),
            };
            let (ge, gl) = (side(eager, None), side(lazy, Some(whole)));
            let qs = qemu.as_ref().map(|_| side(q, None));
            cells.push(Cell {
                memory_mib: mem,
                data_mib: mem / 2,
                godwit_snapshot_bytes: size(&gsnap),
                eager_over_lazy: ratio(&ge.first_line_ms, &gl.first_line_ms),
                qemu_over_lazy: qs
                    .as_ref()
                    .map(|q| ratio(&q.first_line_ms, &gl.first_line_ms)),
                fast_goal: gl.first_line_ms.max < 10.0,
                qemu_snapshot_bytes: qemu.as_ref().map(|_| size(&qsnap)),
                godwit_eager: ge,
                godwit_lazy: gl,
                qemu: qs,
            });
            let _ = std::fs::remove_file(&gsnap);
            let _ = std::fs::remove_file(&qsnap);
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result?;
    Ok(Report {
        bench: "restore",
        guest: "dirtier",
        runs: a.runs,
        qemu,
        cells,
    })
}

fn print_table(r: &Report) {
    let s = |x: &Summary| format!("{:.1}/{:.1}/{:.1}", x.min, x.median, x.max);
    outln!(
        "restore to the guest's first line, ms (min/median/max), {} runs; the guest's data is \
         half its RAM",
        r.runs
    );
    outln!(
        "{:>8} {:>20} {:>20} {:>20} {:>20} {:>6}",
        "MiB",
        "godwit eager",
        "godwit lazy",
        "lazy: all in",
        "QEMU",
        "<10ms"
    );
    for c in &r.cells {
        outln!(
            "{:>8} {:>20} {:>20} {:>20} {:>20} {:>6}",
            c.memory_mib,
            s(&c.godwit_eager.first_line_ms),
            s(&c.godwit_lazy.first_line_ms),
            c.godwit_lazy.whole_ms.as_ref().map(s).unwrap_or("-".into()),
            c.qemu
                .as_ref()
                .map(|q| s(&q.first_line_ms))
                .unwrap_or("-".into()),
            if c.fast_goal { "yes" } else { "no" }
        );
    }
}

pub fn run(a: RestoreBenchArgs) -> ExitCode {
    let json = a.json;
    crate::bench::finish("restore", json, bench(a), print_table)
}
