//! `godwit bench ...`: measurements, side by side with QEMU in the same run.

use crate::cli::{BenchCmd, BootBenchArgs};
use serde::Serialize;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The guest's first console line starts with this.
const BANNER: &str = "godwit-rt:";
const BANNER_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Serialize, Clone, Copy)]
pub struct Summary {
    pub min: f64,
    pub median: f64,
    pub max: f64,
}

impl Summary {
    /// "min/median/max" with `digits` decimals, for a table's cell.
    pub fn mmm(&self, digits: usize) -> String {
        format!(
            "{:.d$}/{:.d$}/{:.d$}",
            self.min,
            self.median,
            self.max,
            d = digits
        )
    }
}

pub fn summary(samples: &[f64]) -> Summary {
    let mut s = samples.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    let median = if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    };
    Summary {
        min: s[0],
        median,
        max: s[n - 1],
    }
}

/// Spawns `cmd` (stdin closed, stdout piped) and waits for the first whole stdout line
/// that `wanted` takes: the ms from the spawn to it, and the child, still running, its
/// stdout drained on (a full pipe would stop the guest). On failure the child is stopped.
pub(crate) fn time_to_line(
    mut cmd: Command,
    wanted: impl Fn(&str) -> bool + Send + 'static,
    timeout: Duration,
) -> Result<(f64, Child), String> {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped());
    let t0 = Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {:?}: {e}", cmd.get_program()))?;
    let out = child.stdout.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(out).lines() {
            match line {
                Ok(l) if !sent && wanted(&l) => {
                    sent = true;
                    let _ = tx.send(Ok(t0.elapsed()));
                }
                Ok(_) => {}
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                    return;
                }
            }
        }
        let _ = tx.send(Err(
            "the guest ended before the line it was waited for".into()
        ));
    });
    match rx.recv_timeout(timeout) {
        Ok(Ok(d)) => Ok((d.as_secs_f64() * 1e3, child)),
        Ok(Err(e)) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(e)
        }
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            Err("timed out waiting for the guest's line".into())
        }
    }
}

/// Milliseconds from spawning `cmd` to a complete stdout line containing the banner.
fn time_to_banner(mut cmd: Command) -> Result<f64, String> {
    cmd.stderr(Stdio::null());
    let (ms, mut child) = time_to_line(cmd, |l| l.contains(BANNER), BANNER_TIMEOUT)?;
    let _ = child.kill();
    let _ = child.wait();
    Ok(ms)
}

pub(crate) fn qemu_version(qemu: &str) -> Option<String> {
    let out = Command::new(qemu).arg("--version").output().ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .map(str::to_string)
}

#[derive(Serialize)]
struct BootReport {
    bench: &'static str,
    guest: &'static str,
    runs: usize,
    memory_mib: u64,
    godwit_ms: Summary,
    godwit_samples_ms: Vec<f64>,
    qemu: Option<String>,
    qemu_ms: Option<Summary>,
    qemu_samples_ms: Option<Vec<f64>>,
    /// QEMU's time over godwit's, per statistic.
    qemu_over_godwit: Option<Summary>,
}

fn boot(a: BootBenchArgs) -> Result<BootReport, String> {
    if a.runs == 0 {
        return Err("--runs must be at least 1".into());
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let qemu = peer_qemu(&a.peer)?;
    let (dir, image) = scratch("boot-", "heartbeat")?;

    let godwit_cmd = || {
        let mut c = Command::new(&exe);
        c.args([
            "run",
            "--memory",
            &a.memory.to_string(),
            "heartbeat",
            "--",
            "count=1",
        ]);
        c
    };
    let qemu_cmd = || {
        let mut c = qemu_guest(&a.peer.qemu, &image, a.memory, "count=1");
        c.args(["-serial", "stdio"]);
        c
    };
    // One unmeasured run each warms the page cache.
    time_to_banner(godwit_cmd())?;
    if qemu.is_some() {
        time_to_banner(qemu_cmd())?;
    }
    let (mut g, mut q) = (Vec::new(), Vec::new());
    for i in 0..a.runs {
        g.push(time_to_banner(godwit_cmd())?);
        if qemu.is_some() {
            q.push(time_to_banner(qemu_cmd())?);
        }
        if !a.json {
            crate::output::progress(&format!("\rrun {}/{}", i + 1, a.runs));
        }
    }
    if !a.json {
        crate::output::progress("\n");
    }
    let _ = std::fs::remove_dir_all(&dir);
    let gs = summary(&g);
    let qs = qemu.as_ref().map(|_| summary(&q));
    Ok(BootReport {
        bench: "boot",
        guest: "heartbeat",
        runs: a.runs,
        memory_mib: a.memory,
        godwit_ms: gs,
        godwit_samples_ms: g,
        qemu_over_godwit: qs.map(|q| Summary {
            min: q.min / gs.min,
            median: q.median / gs.median,
            max: q.max / gs.max,
        }),
        qemu,
        qemu_ms: qs,
        qemu_samples_ms: qs.map(|_| q),
    })
}

// Shared by the benchmarks: the QEMU to compare with, a scratch directory, QEMU's
// command for a godwit guest, processes, waiting, the guest's gap witness.

/// The version of the QEMU to compare with, or None with --no-qemu; an error when it
/// is asked for and not there.
pub(crate) fn peer_qemu(p: &crate::cli::PeerArgs) -> Result<Option<String>, String> {
    if p.no_qemu {
        return Ok(None);
    }
    let qemu = &p.qemu;
    qemu_version(qemu)
        .map(Some)
        .ok_or_else(|| format!("{qemu} not found: install qemu-system-x86 or pass --no-qemu"))
}

/// A fresh scratch directory for one benchmark and the built-in `guest`'s image in it
/// (QEMU boots it with -kernel).
pub(crate) fn scratch(tag: &str, guest: &str) -> Result<(PathBuf, PathBuf), String> {
    let dir = std::env::temp_dir().join(format!("godwit-bench-{tag}{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let image = dir.join(format!("{guest}.elf"));
    std::fs::write(&image, godwit_guest::image(guest).expect("built in"))
        .map_err(|e| e.to_string())?;
    Ok((dir, image))
}

/// QEMU running a godwit guest image as godwit does (KVM, the host's CPU, no default
/// devices, the debug-exit port the guest leaves by), with `append` as its arguments.
/// A QEMU unpacked beside its own data (bench/qemu-10.sh) uses its own firmware.
pub(crate) fn qemu_guest(qemu: &str, image: &Path, mem: u64, append: &str) -> Command {
    let mut c = Command::new(qemu);
    c.args([
        "-enable-kvm",
        "-cpu",
        "host,-arch-capabilities",
        "-m",
        &mem.to_string(),
    ]);
    c.args(["-nodefaults", "-nographic", "-monitor", "none"]);
    // Threads named for what they run ("CPU 0/KVM"), for `crate::guest_cpu`.
    c.args(["-name", "guest,debug-threads=on"]);
    c.args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"]);
    c.arg("-append").arg(append);
    c.arg("-kernel").arg(image);
    if let Some(data) = Path::new(qemu)
        .parent()
        .map(|b| b.join("../share/qemu"))
        .filter(|d| d.join("pvh.bin").exists())
    {
        c.arg("-L").arg(data);
    }
    c
}

/// `c` in a session of its own: util-linux's `setsid`, which executes it in place (a
/// freshly spawned child leads no process group, so it does not fork), so the child's
/// pid is the VMM's. With the kernel's autogroup on, a session is a scheduling group of
/// its own, as a VM in a cgroup of its own is: the fair scheduler shares a core between
/// groups first, and weights rank threads only within one.
pub(crate) fn in_own_session(c: &Command) -> Command {
    let mut s = Command::new("setsid");
    s.arg(c.get_program()).args(c.get_args());
    for (k, v) in c.get_envs() {
        match v {
            Some(v) => s.env(k, v),
            None => s.env_remove(k),
        };
    }
    if let Some(d) = c.get_current_dir() {
        s.current_dir(d);
    }
    s
}

/// Whether sessions are scheduling groups here and `setsid` is there
/// (`in_own_session`).
pub(crate) fn sessions_are_groups() -> Result<(), String> {
    let f = "/proc/sys/kernel/sched_autogroup_enabled";
    let no = "a session of its own is no scheduling group of its own here";
    match std::fs::read_to_string(f) {
        Ok(v) if v.trim() == "1" => {}
        Ok(v) => return Err(format!("{no}: {f} is {}", v.trim())),
        Err(e) => return Err(format!("{no}: {f}: {e}")),
    }
    match Command::new("setsid").arg("--version").output() {
        Ok(o) if o.status.success() => Ok(()),
        _ => Err("setsid not found (util-linux)".into()),
    }
}

/// Checks that each of `pids` is in a scheduling group (autogroup) of its own, none of
/// them this process's.
pub(crate) fn own_groups(pids: &[u32]) -> Result<(), String> {
    let group = |pid: String| -> Result<String, String> {
        let f = format!("/proc/{pid}/autogroup");
        let s = std::fs::read_to_string(&f).map_err(|e| format!("{f}: {e}"))?;
        Ok(s.split_whitespace().next().unwrap_or_default().to_string())
    };
    let mut seen = vec![group("self".into())?];
    for &p in pids {
        let g = group(p.to_string())?;
        if seen.contains(&g) {
            return Err(format!("process {p} shares its scheduling group {g}"));
        }
        seen.push(g);
    }
    Ok(())
}

pub(crate) fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

/// Whether something listens on TCP `port` (IPv4), from /proc/net/tcp: a destination
/// that prefaults its memory listens only once that is done, and a probe connection
/// would count as a stranger's.
pub(crate) fn listening(port: u16) -> bool {
    let want = format!(":{port:04X}");
    read(Path::new("/proc/net/tcp")).lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        // local address, remote address, state (0A: LISTEN)
        f.len() > 3 && f[1].ends_with(&want) && f[3] == "0A"
    })
}

/// A private GPU manager directory at `dir` with `gpus` GPUs, for a benchmark's VMs.
pub(crate) fn gpu_host(dir: &Path, gpus: usize) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let init = Command::new(&exe)
        .args(["gpu", "init", "--gpus", &gpus.to_string(), "--gpu-dir"])
        .arg(dir)
        .output()
        .map_err(|e| e.to_string())?;
    if !init.status.success() {
        return Err(String::from_utf8_lossy(&init.stderr).into());
    }
    Ok(())
}

/// Kills the processes of one run whatever happens.
pub(crate) struct Procs(pub Vec<Child>);

/// One benchmark migration's scratch: the source's and destination's console logs and
/// the source's API socket under `dir` (named with `prefix`, cleared), a free loopback
/// port for the destination, and the processes started so far.
pub(crate) struct Pair {
    src_log: std::path::PathBuf,
    dst_log: std::path::PathBuf,
    sock: std::path::PathBuf,
    port: u16,
    procs: Procs,
    exe: std::path::PathBuf,
    /// Each end starts in a session of its own (`in_own_session`).
    pub own_sessions: bool,
    /// The guest's CPU over the last migration (`crate::guest_cpu`).
    pub guest_cpu: f64,
    /// Both ends' threads over the last migration (`crate::guest_cpu`).
    pub threads: Vec<crate::guest_cpu::ThreadTime>,
    /// When the last migration's command returned (before the guest's reports after
    /// it were waited for).
    pub migrated_at: Option<Instant>,
}

impl Pair {
    pub fn new(dir: &Path, prefix: &str) -> Result<Pair, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let p = |n: &str| dir.join(format!("{prefix}{n}"));
        let (src_log, dst_log, sock) = (p("src.log"), p("dst.log"), p("src.sock"));
        for f in [&src_log, &dst_log, &sock] {
            let _ = std::fs::remove_file(f);
        }
        Ok(Pair {
            src_log,
            dst_log,
            sock,
            port: free_port()?,
            procs: Procs(vec![]),
            exe,
            own_sessions: false,
            guest_cpu: f64::NAN,
            threads: vec![],
            migrated_at: None,
        })
    }

    /// Migrates the source (its API socket) as `o` says and waits for the source to end;
    /// returns the report and the guest's own largest gap on the destination.
    pub fn migrate(
        &mut self,
        o: &godwit_migration::Options,
        limit: std::time::Duration,
    ) -> Result<(godwit_migration::Report, f64), String> {
        let body = serde_json::to_string(o).expect("plain data");
        // Started destination first, then the source.
        let ends = ["destination", "source"];
        let cpu = crate::guest_cpu::GuestCpu::watch(
            ends.into_iter()
                .zip(self.procs.0.iter().map(|c| c.id()))
                .collect(),
        );
        let (code, out) =
            godwit_vmm::api::call_with(&self.sock, "PUT", "vm.migrate", &body, Some(limit))?;
        self.migrated_at = Some(Instant::now());
        let seen = cpu.share();
        self.guest_cpu = seen.guest_cpu;
        self.threads = seen.threads;
        if code != 200 {
            return Err(format!("godwit migration failed (HTTP {code}): {out}"));
        }
        let r: godwit_migration::Report =
            serde_json::from_str(&out).map_err(|e| format!("report: {e}"))?;
        // The source process ends by design; keep only the destination.
        let _ = self.procs.0[1].wait();
        self.procs.0.truncate(1);
        let gap = guest_gap(&self.dst_log, &mut self.procs)?;
        Ok((r, gap))
    }

    /// The destination's command line up to what a benchmark adds: incoming on this
    /// pair's port, its console into its log.
    pub fn destination_args(&self) -> Vec<String> {
        vec![
            "run".into(),
            "--incoming".into(),
            self.to(),
            "--console".into(),
            format!("file:{}", self.dst_log.display()),
        ]
    }

    /// The source's: `memory` MiB, its API socket and its console into its log.
    pub fn source_args(&self, memory: u64) -> Vec<String> {
        vec![
            "run".into(),
            "--memory".into(),
            memory.to_string(),
            "--api-socket".into(),
            self.sock.display().to_string(),
            "--console".into(),
            format!("file:{}", self.src_log.display()),
        ]
    }

    /// The processes started so far, by pid: the destination, then the source.
    pub fn pids(&self) -> Vec<u32> {
        self.procs.0.iter().map(Child::id).collect()
    }

    /// Where the source migrates to.
    pub fn to(&self) -> String {
        format!("tcp:127.0.0.1:{}", self.port)
    }

    /// Starts the destination, then the source, and returns once the source's guest
    /// runs steadily and the destination listens (a prefaulting one only once its
    /// memory is in place), each within `wait`.
    pub fn start(
        &mut self,
        dst: Vec<String>,
        src: Vec<String>,
        wait: std::time::Duration,
    ) -> Result<(), String> {
        self.spawn(dst)?;
        self.spawn(src)?;
        let (procs, log, port) = (&mut self.procs, &self.src_log, self.port);
        wait_for("the godwit source guest", wait, || {
            alive(procs).then(|| steady(log))
        })?;
        wait_for("the godwit destination", wait, || {
            alive(procs).then(|| listening(port))
        })?;
        // Both have long since left `setsid` for godwit.
        if self.own_sessions {
            own_groups(&self.procs.0.iter().map(Child::id).collect::<Vec<_>>())?;
        }
        Ok(())
    }

    /// Starts a godwit with `args`, quiet, kept until the pair drops.
    fn spawn(&mut self, args: Vec<String>) -> Result<(), String> {
        let mut c = std::process::Command::new(&self.exe);
        c.args(args);
        if self.own_sessions {
            c = in_own_session(&c);
        }
        let c = c
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start godwit: {e}"))?;
        self.procs.0.push(c);
        Ok(())
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub(crate) fn wait_for(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Option<bool>,
) -> Result<(), String> {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        match f() {
            Some(true) => return Ok(()),
            None => return Err(format!("{what}: a process ended early")),
            Some(false) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    Err(format!("timed out waiting for {what}"))
}

pub(crate) fn alive(p: &mut Procs) -> bool {
    p.0.iter_mut().all(|c| matches!(c.try_wait(), Ok(None)))
}

pub(crate) fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

pub(crate) fn report_lines(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains("window_gap_us="))
        .collect()
}

pub(crate) fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.parse().ok())
}

/// The source guest is in its steady state: working set touched and one report out.
pub(crate) fn steady(log: &Path) -> bool {
    let s = read(log);
    s.contains("touched") && !report_lines(&s).is_empty()
}

/// The guest's largest gap in the destination's first two report windows, in ms.
pub(crate) fn guest_gap(dst_log: &Path, procs: &mut Procs) -> Result<f64, String> {
    wait_for(
        "the guest's reports after migration",
        Duration::from_secs(30),
        || {
            if !alive(procs) {
                return None;
            }
            Some(report_lines(&read(dst_log)).len() >= 2)
        },
    )?;
    let s = read(dst_log);
    Ok(report_lines(&s)
        .iter()
        .take(2)
        .filter_map(|l| field(l, "window_gap_us="))
        .max()
        .unwrap_or(0) as f64
        / 1e3)
}

pub fn bench(cmd: BenchCmd) -> ExitCode {
    match cmd {
        BenchCmd::Migrate(a) => crate::bench_migrate::run(a),
        BenchCmd::Gpu(a) => crate::bench_gpu::run(a),
        BenchCmd::GpuMigrate(a) => crate::bench_gpu_migrate::run(a),
        BenchCmd::GpuPostcopy(a) => crate::bench_gpu_postcopy::run(a),
        BenchCmd::Restore(a) => crate::bench_restore::run(a),
        BenchCmd::Boot(a) => {
            let json = a.json;
            finish("boot", json, boot(a), print_boot)
        }
    }
}

/// How a benchmark ends: its report as JSON (`--json`) or as `table` prints it, and
/// exit status 0; or its error on stderr and exit status 1.
pub(crate) fn finish<R: Serialize>(
    name: &str,
    json: bool,
    result: Result<R, String>,
    table: impl FnOnce(&R),
) -> ExitCode {
    match result {
        Ok(r) => {
            if json {
                outln!("{}", serde_json::to_string_pretty(&r).expect("plain data"));
            } else {
                table(&r);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            crate::output::say(&format!("bench {name}: {e}"));
            ExitCode::from(1)
        }
    }
}

fn print_boot(r: &BootReport) {
    outln!(
        "time from process start to the guest's first console line ({} runs, {} MiB):",
        r.runs,
        r.memory_mib
    );
    outln!(
        "{:<8} {:>10} {:>10} {:>10}",
        "",
        "min ms",
        "median ms",
        "max ms"
    );
    let row =
        |n: &str, s: &Summary| outln!("{n:<8} {:>10.1} {:>10.1} {:>10.1}", s.min, s.median, s.max);
    row("godwit", &r.godwit_ms);
    if let (Some(q), Some(ratio)) = (&r.qemu_ms, &r.qemu_over_godwit) {
        row("qemu", q);
        outln!(
            "qemu/godwit: median {:.0}x (min {:.0}x, max {:.0}x)",
            ratio.median,
            ratio.min,
            ratio.max
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_takes_min_median_max() {
        let s = summary(&[5.0, 1.0, 3.0]);
        assert_eq!((s.min, s.median, s.max), (1.0, 3.0, 5.0));
        assert_eq!(summary(&[4.0, 1.0, 2.0, 3.0]).median, 2.5);
    }
}
