//! `godwit bench migrate`: the dirtier guest migrated by godwit and by QEMU 7.2 side by
//! side (each to a second process on this machine over TCP loopback, same downtime limit,
//! QEMU's bandwidth cap lifted), over RAM sizes x workloads x downtime limits.
//!
//! Per run: total time, the VMM's downtime, the guest's own largest gap around the
//! switchover (the dirtier's window_gap_us on the destination's first report lines), and
//! bytes sent. godwit can run once per dirty-tracking mode (`--dirty-log bitmap,ring`):
//! the modes then sit side by side, with the time spent reading the dirty log; with
//! `--tls` the first mode also runs over TLS 1.3 (mutual certificates), so that what
//! encryption costs sits beside the plain run. With `--modes` godwit runs each migration
//! mode (pre-copy, post-copy, hybrid, auto) as a side of its own, and when post-copy is
//! among them QEMU runs post-copy too (postcopy-ram, switched once its first pass is
//! done, postcopy-preempt where the binary has it); post-copy runs also report their
//! window (switch to last page), remote faults and their latency, and pages pre-paged.
//! Each QEMU binary also runs pre-copy with multifd (`--qemu-multifd N` channels, 0 for
//! none), the configuration QEMU offers for more than one stream of pages. Both ends
//! of every run share the bench's scheduling group unless `--own-sessions` gives each
//! VMM process one of its own, as VMs in cgroups of their own have.

use crate::bench::{
    alive, free_port, guest_gap, in_own_session, own_groups, qemu_guest, steady, summary, wait_for,
    Pair, Procs, Summary,
};
use crate::cli::MigrateBenchArgs;
use godwit_migration::migration_priority::MigrationPriority;
use godwit_migration::vcpu_priority::VcpuPriority;
use godwit_migration::wire::PageChecks;
use godwit_migration::{Mode, Options, DEFAULT_CONNECTIONS};
use godwit_vmm::dirty::DirtyLogMode;
use serde::Serialize;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

mod qemu;
use qemu::{qemu_run, QemuCfg};

const STEADY_TIMEOUT: Duration = Duration::from_secs(90);
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(300);

/// How both ends of every run start, whichever VMM.
#[derive(Clone, Copy, Debug)]
struct Setup {
    /// The destination gets its memory, touched, before the migration (`--prefault`).
    prefault: bool,
    /// Each VMM process in a session, so a scheduling group, of its own
    /// (`--own-sessions`).
    own_sessions: bool,
}

#[derive(Clone, Debug)]
struct Workload {
    name: String,
    wss_mib: u64,
    rate_mib_s: u64,
}

fn parse_size(s: &str) -> Option<u64> {
    let s = s.to_ascii_lowercase();
    let (n, m) = match s.chars().last()? {
        'm' => (&s[..s.len() - 1], 1),
        'g' => (&s[..s.len() - 1], 1024),
        _ => (&s[..], 1),
    };
    n.parse::<u64>().ok().map(|n| n * m)
}

fn workload(s: &str) -> Result<Workload, String> {
    if s == "idle" {
        // A 1 MiB working set rewritten at 1 MiB/s: no real dirtying, but the loop that
        // measures the guest's gaps runs.
        return Ok(Workload {
            name: s.into(),
            wss_mib: 1,
            rate_mib_s: 1,
        });
    }
    let (w, r) = s
        .split_once('@')
        .ok_or_else(|| format!("workload {s:?}: use idle or WSS@RATE, e.g. 512m@1g"))?;
    match (parse_size(w), parse_size(r)) {
        (Some(wss_mib), Some(rate_mib_s)) if wss_mib > 0 && rate_mib_s > 0 => Ok(Workload {
            name: s.into(),
            wss_mib,
            rate_mib_s,
        }),
        _ => Err(format!(
            "workload {s:?}: use idle or WSS@RATE, e.g. 512m@1g"
        )),
    }
}

#[derive(Serialize, Clone, Debug, Default)]
struct Sample {
    total_ms: f64,
    downtime_ms: f64,
    guest_gap_ms: f64,
    bytes: u64,
    rounds: Option<u32>,
    throttled: Option<bool>,
    /// The most the guest's vCPUs were held back (auto-converge), in percent: godwit's
    /// report, or the most QEMU's `cpu-throttle-percentage` showed while it was polled.
    /// What a longer pause does not show: how much of the guest's CPU the migration
    /// took instead.
    max_throttle_pct: Option<u32>,
    /// The guest's vCPU time while it migrated, over the migration's wall time (1.0: a
    /// whole CPU throughout; `crate::guest_cpu`): how much of its CPU the migration's
    /// threads and pause took, which no throttle figure shows.
    guest_cpu: f64,
    /// Both ends' threads while it migrated, by name: time on a CPU and time runnable
    /// but waiting for one (`crate::guest_cpu`), to tell which thread the sharing of
    /// the cores held up from the JSON alone.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    threads: Vec<crate::guest_cpu::ThreadTime>,
    /// godwit only: reading the dirty log at the end of a round (median over the
    /// migration's rounds), the last read at the switchover, and full dirty rings.
    #[serde(skip_serializing_if = "Option::is_none")]
    dirty_log_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_dirty_log_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ring_full_exits: Option<u64>,
    /// Post-copy only: what ran, the window in which the VM's memory was split over the
    /// hosts, the touches that had to fetch a page, their latency and the pages pushed
    /// before anything touched them.
    #[serde(skip_serializing_if = "Option::is_none")]
    ran: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    postcopy_window_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    remote_faults: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    fault_latency_us: Option<godwit_vmm::migratable::Latency>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prepaged_pages: Option<u64>,
    /// godwit only: each pre-copy round's length in ms and the MiB it sent, to tell a
    /// slow run's cause (a slow first pass, or more rounds) from the JSON alone.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    round_ms_mib: Vec<(f64, f64)>,
    /// godwit only: where the pause went (the report's downtime, less the
    /// per-component parts).
    #[serde(skip_serializing_if = "Option::is_none")]
    pause_parts: Option<Value>,
}

#[derive(Serialize)]
struct Side {
    total_ms: Summary,
    downtime_ms: Summary,
    guest_gap_ms: Summary,
    bytes: Summary,
    guest_cpu: Summary,
    #[serde(skip_serializing_if = "Option::is_none")]
    dirty_log_us: Option<Summary>,
    samples: Vec<Sample>,
}

/// godwit with another migration mode, dirty-tracking mode, or over TLS, against the
/// first.
#[derive(Serialize)]
struct Alternative {
    mode: String,
    dirty_log: String,
    tls: bool,
    side: Side,
    /// The first mode's figure over this one's (above 1: this one is better).
    first_over_this: Value,
}

#[derive(Serialize)]
struct Cell {
    memory_mib: u64,
    workload: String,
    downtime_limit_ms: u64,
    godwit_dirty_log: String,
    godwit: Side,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    godwit_alternatives: Vec<Alternative>,
    qemu: Option<Side>,
    /// QEMU in pre-copy with multifd.
    #[serde(skip_serializing_if = "Option::is_none")]
    qemu_multifd: Option<Side>,
    /// QEMU in post-copy (when godwit runs a post-copy mode).
    #[serde(skip_serializing_if = "Option::is_none")]
    qemu_postcopy: Option<Side>,
    /// The other QEMU binaries (`--qemu-extra`), pre-copy (also with multifd) and
    /// post-copy.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    other_qemus: Vec<OtherQemu>,
    /// QEMU's figure over godwit's (above 1: godwit is better), per statistic.
    qemu_over_godwit: Option<Value>,
    /// Per godwit side (mode, dirty log, TLS): median downtime at most 5 ms, no run
    /// above 10 ms, and every run's total time at most the best QEMU configuration's
    /// median.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    fast_goal: Vec<Value>,
    /// godwit's median downtime within the limit, and median total time, downtime and
    /// bytes at or below QEMU's (`meets_goal`).
    godwit_meets_goal: Option<bool>,
}

#[derive(Serialize)]
struct OtherQemu {
    version: String,
    precopy: Side,
    #[serde(skip_serializing_if = "Option::is_none")]
    multifd: Option<Side>,
    #[serde(skip_serializing_if = "Option::is_none")]
    postcopy: Option<Side>,
}

#[derive(Serialize)]
struct BenchReport {
    bench: &'static str,
    runs: usize,
    qemu: Option<String>,
    /// godwit's page connections (pre-copy's; post-copy modes open one more).
    connections: u32,
    /// Who checked godwit's page data (`--page-checks`).
    page_checks: PageChecks,
    /// godwit's vCPUs' weight while pre-copy ran (`--vcpu-priority`; each run's
    /// report says what it got).
    vcpu_priority: VcpuPriority,
    /// godwit's migration threads' weight while pre-copy ran (`--migration-priority`;
    /// each run's report says what it got).
    migration_priority: MigrationPriority,
    /// Destinations got their memory before each migration (`--prefault`).
    prefault: bool,
    /// Each VMM process ran in a session, so a scheduling group, of its own
    /// (`--own-sessions`).
    own_sessions: bool,
    cells: Vec<Cell>,
}

fn side(samples: Vec<Sample>) -> Side {
    let f = |g: fn(&Sample) -> f64| summary(&samples.iter().map(g).collect::<Vec<_>>());
    Side {
        total_ms: f(|s| s.total_ms),
        downtime_ms: f(|s| s.downtime_ms),
        guest_gap_ms: f(|s| s.guest_gap_ms),
        bytes: f(|s| s.bytes as f64),
        guest_cpu: f(|s| s.guest_cpu),
        dirty_log_us: samples
            .iter()
            .map(|s| s.dirty_log_us)
            .collect::<Option<Vec<_>>>()
            .map(|v| summary(&v)),
        samples,
    }
}

/// How finely QEMU reports a pause: `downtime` in query-migrate is the difference of
/// two clock readings in whole milliseconds, so a true pause of 1.9 ms may read 1, as
/// may one of 0.1 ms.
const QEMU_DOWNTIME_RESOLUTION_MS: f64 = 1.0;

/// The goal against QEMU pre-copy (`godwit_meets_goal`): godwit's median pause within
/// the limit, and its median total time, pause and bytes at or below QEMU's. A pause
/// counts as longer than QEMU's only beyond the resolution QEMU reports it in: godwit's
/// 1.13 ms against a QEMU "1" (whose guest saw 2.9-4.9 ms gaps in that cell, 4 GiB,
/// 64m@100m, 2026-12-06) says nothing about which paused longer.
fn meets_goal(g: &Side, q: &Side, limit_ms: u64) -> bool {
    g.downtime_ms.median <= limit_ms as f64
        && g.downtime_ms.median <= q.downtime_ms.median + QEMU_DOWNTIME_RESOLUTION_MS
        && g.total_ms.median <= q.total_ms.median
        && g.bytes.median <= q.bytes.median
}

fn ratios(q: &Side, g: &Side) -> Value {
    json!({
        "total_ms": ratio(&q.total_ms, &g.total_ms),
        "downtime_ms": ratio(&q.downtime_ms, &g.downtime_ms),
        "guest_gap_ms": ratio(&q.guest_gap_ms, &g.guest_gap_ms),
        "bytes": ratio(&q.bytes, &g.bytes),
    })
}

fn ratio(q: &Summary, g: &Summary) -> Value {
    let r = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    json!({"min": r(q.min, g.min), "median": r(q.median, g.median), "max": r(q.max, g.max)})
}

fn dirtier_args(w: &Workload) -> String {
    format!(
        "wss={} rate={} seconds=0 report-every=100",
        w.wss_mib, w.rate_mib_s
    )
}

#[allow(clippy::too_many_arguments)]
fn godwit_run(
    dir: &Path,
    mem: u64,
    w: &Workload,
    limit: u64,
    mode: Mode,
    dirty_log: DirtyLogMode,
    tls: Option<&Path>,
    setup: Setup,
    // What every run asks for besides (connections, page checks, weights).
    base: &Options,
) -> Result<Sample, String> {
    let prefault = setup.prefault;
    let mut pair = Pair::new(dir, "g-")?;
    pair.own_sessions = setup.own_sessions;
    let mut dst = pair.destination_args();
    dst.extend(["--dirty-log".into(), dirty_log.to_string()]);
    if let Some(d) = tls {
        dst.extend(["--tls-dir".into(), d.display().to_string()]);
    }
    if prefault {
        dst.extend(["--memory".into(), mem.to_string(), "--prefault".into()]);
    }
    let mut src = pair.source_args(mem);
    src.extend([
        "--dirty-log".into(),
        dirty_log.to_string(),
        "dirtier".into(),
        "--".into(),
    ]);
    src.extend(dirtier_args(w).split(' ').map(String::from));
    pair.start(dst, src, STEADY_TIMEOUT)?;
    let o = Options {
        mode,
        to: pair.to(),
        downtime_ms: limit,
        tls_dir: tls.map(Path::to_path_buf),
        ..base.clone()
    };
    let (r, gap) = pair.migrate(&o, MIGRATE_TIMEOUT)?;
    Ok(Sample {
        total_ms: r.total_ms,
        downtime_ms: r.downtime_ms,
        guest_gap_ms: gap,
        bytes: r.bytes.total,
        rounds: Some(r.round_count),
        throttled: Some(r.throttled),
        max_throttle_pct: Some(r.max_throttle_pct),
        guest_cpu: pair.guest_cpu,
        threads: std::mem::take(&mut pair.threads),
        dirty_log_us: Some(if r.rounds.is_empty() {
            0.0
        } else {
            summary(&r.rounds.iter().map(|x| x.dirty_log_us).collect::<Vec<_>>()).median
        }),
        last_dirty_log_us: Some(r.downtime.dirty_log_ms * 1e3),
        ring_full_exits: Some(r.ring_full_exits),
        ran: Some(r.ran.clone()),
        postcopy_window_ms: r.postcopy.as_ref().map(|p| p.window_ms),
        remote_faults: r.postcopy.as_ref().map(|p| p.remote_faults),
        fault_latency_us: r.postcopy.as_ref().map(|p| p.fault_latency.clone()),
        prepaged_pages: r.postcopy.as_ref().map(|p| p.prepaged_pages),
        round_ms_mib: r
            .rounds
            .iter()
            .map(|x| (x.duration_ms, x.bytes as f64 / (1 << 20) as f64))
            .collect(),
        pause_parts: serde_json::to_value(&r.downtime).ok().map(|mut v| {
            if let Some(o) = v.as_object_mut() {
                // Of each component only what stopping it took: which one held the
                // pause up.
                let stops: serde_json::Map<String, Value> = r
                    .downtime
                    .components
                    .iter()
                    .map(|(name, p)| (name.clone(), json!(p.stop_ms)))
                    .collect();
                o.remove("components");
                o.insert("stop_ms".into(), Value::Object(stops));
            }
            v
        }),
    })
}

/// A QMP connection (QEMU's JSON monitor).
pub(crate) struct Qmp {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Qmp {
    pub(crate) fn connect(p: &Path) -> Result<Qmp, String> {
        let end = Instant::now() + Duration::from_secs(30);
        let s = loop {
            match UnixStream::connect(p) {
                Ok(s) => break s,
                Err(e) if Instant::now() > end => return Err(format!("QMP {}: {e}", p.display())),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(|e| e.to_string())?;
        let mut q = Qmp {
            r: BufReader::new(s.try_clone().map_err(|e| e.to_string())?),
            w: s,
        };
        q.line()?; // greeting
        q.cmd("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn line(&mut self) -> Result<Value, String> {
        let mut l = String::new();
        self.r.read_line(&mut l).map_err(|e| format!("QMP: {e}"))?;
        if l.is_empty() {
            return Err("QMP: QEMU closed the monitor".into());
        }
        serde_json::from_str(&l).map_err(|e| format!("QMP: {e}: {l}"))
    }

    pub(crate) fn cmd(&mut self, name: &str, args: Value) -> Result<Value, String> {
        let msg = json!({"execute": name, "arguments": args});
        writeln!(self.w, "{msg}").map_err(|e| format!("QMP: {e}"))?;
        loop {
            let v = self.line()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(format!("QMP {name}: {e}"));
            }
            // An asynchronous event: skip it.
        }
    }
}

fn bench(a: MigrateBenchArgs) -> Result<BenchReport, String> {
    let (mems, limits, workloads, runs) = if a.quick {
        (
            vec![1024],
            vec![300],
            vec!["idle".to_string(), "512m@1g".to_string()],
            1,
        )
    } else {
        (
            a.memory.clone(),
            a.downtime_ms.clone(),
            a.workloads.clone(),
            a.runs,
        )
    };
    if runs == 0 {
        return Err("--runs must be at least 1".into());
    }
    if a.dirty_log.is_empty() {
        return Err("--dirty-log needs at least one mode".into());
    }
    let workloads = workloads
        .iter()
        .map(|w| workload(w))
        .collect::<Result<Vec<_>, _>>()?;
    let version = |bin: &str| -> Result<String, String> {
        let out = Command::new(bin)
            .arg("--version")
            .output()
            .map_err(|_| format!("{bin} not found: install qemu-system-x86 or pass --no-qemu"))?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .to_string())
    };
    let qemu = if a.peer.no_qemu {
        None
    } else {
        Some(version(&a.peer.qemu)?)
    };
    let extras: Vec<(String, String)> = a
        .qemu_extra
        .iter()
        .map(|b| Ok((b.clone(), version(b)?)))
        .collect::<Result<_, String>>()?;
    let setup = Setup {
        prefault: a.prefault,
        own_sessions: a.own_sessions,
    };
    if setup.own_sessions {
        crate::bench::sessions_are_groups()?;
    }
    let (dir, image) = crate::bench::scratch("migrate-", "dirtier")?;
    let modes = a
        .modes
        .iter()
        .map(|m| m.parse::<Mode>())
        .collect::<Result<Vec<_>, _>>()?;
    let first_mode = *modes.first().ok_or("--modes needs at least one mode")?;
    // godwit's sides: each migration mode, then each other dirty-log mode, over plain
    // TCP; then the first over TLS.
    let mut variants: Vec<(Mode, DirtyLogMode, bool)> =
        modes.iter().map(|&m| (m, a.dirty_log[0], false)).collect();
    variants.extend(a.dirty_log[1..].iter().map(|&d| (first_mode, d, false)));
    let creds = dir.join("tls");
    let base = Options {
        to: String::new(),
        mode: first_mode,
        downtime_ms: 0,
        max_bandwidth: None,
        connections: Some(a.connections.unwrap_or(DEFAULT_CONNECTIONS)),
        stop_copy: vec![],
        tls_dir: None,
        insecure: false,
        page_checks: a.page_checks.into(),
        vcpu_priority: a.vcpu_priority.into(),
        migration_priority: a.migration_priority.into(),
    };
    if a.tls {
        godwit_migration::tls::generate(&creds, &["127.0.0.1".into()])
            .map_err(|e| format!("TLS credentials: {e}"))?;
        variants.push((first_mode, a.dirty_log[0], true));
    }
    let qemu_postcopy = qemu.is_some() && modes.iter().any(|m| *m != Mode::Precopy);
    // QEMU's sides: each binary (the first, then the extras) in each configuration.
    let mut cfgs = vec![QemuCfg::Precopy];
    if a.qemu_multifd > 0 {
        cfgs.push(QemuCfg::Multifd(a.qemu_multifd));
    }
    if qemu_postcopy {
        cfgs.push(QemuCfg::Postcopy);
    }
    let bins: Vec<&str> = qemu
        .iter()
        .map(|_| a.peer.qemu.as_str())
        .chain(extras.iter().map(|(b, _)| b.as_str()))
        .collect();
    let qsides: Vec<(usize, QemuCfg)> = (0..bins.len())
        .flat_map(|b| cfgs.iter().map(move |&c| (b, c)))
        .collect();
    let mut cells = Vec::new();
    let total = mems.len() * workloads.len() * limits.len();
    for &mem in &mems {
        for w in &workloads {
            if w.wss_mib + 64 > mem {
                return Err(format!("workload {} does not fit {mem} MiB", w.name));
            }
            for &limit in &limits {
                // One list of samples per godwit side, and per QEMU side.
                let mut g: Vec<Vec<Sample>> = variants.iter().map(|_| Vec::new()).collect();
                let mut q: Vec<Vec<Sample>> = qsides.iter().map(|_| Vec::new()).collect();
                let sides = variants.len() + qsides.len();
                for i in 0..runs {
                    if !a.json {
                        crate::output::progress(&format!(
                            "\rcell {}/{total}: {mem} MiB, {}, {limit} ms, run {}/{runs}   ",
                            cells.len() + 1,
                            w.name,
                            i + 1
                        ));
                    }
                    // Rotate which side goes first, against drift in the host's state,
                    // and on from cell to cell: the first run of a cell inherits the
                    // last cell's host memory (a cell that needs more than the one
                    // before it starts on memory freed long ago, slow to touch on this
                    // host), and no side should always be that run.
                    let start = cells.len() * runs + i;
                    for k in 0..sides {
                        let turn = (k + start) % sides;
                        match variants.get(turn) {
                            Some(&(mode, log, tls)) => g[turn].push(godwit_run(
                                &dir,
                                mem,
                                w,
                                limit,
                                mode,
                                log,
                                tls.then_some(creds.as_path()),
                                setup,
                                &base,
                            )?),
                            None => {
                                let j = turn - variants.len();
                                let (b, cfg) = qsides[j];
                                q[j].push(qemu_run(
                                    &dir, bins[b], &image, mem, w, limit, cfg, setup,
                                )?)
                            }
                        }
                    }
                }
                // Back to each binary's configurations.
                let mut per_bin: Vec<Vec<(QemuCfg, Side)>> =
                    bins.iter().map(|_| Vec::new()).collect();
                for ((b, cfg), samples) in qsides.iter().zip(q) {
                    per_bin[*b].push((*cfg, side(samples)));
                }
                let take = |v: &mut Vec<(QemuCfg, Side)>, want: fn(QemuCfg) -> bool| {
                    v.iter().position(|(c, _)| want(*c)).map(|i| v.remove(i).1)
                };
                let is_pre: fn(QemuCfg) -> bool = |c| c == QemuCfg::Precopy;
                let is_multifd: fn(QemuCfg) -> bool = |c| matches!(c, QemuCfg::Multifd(_));
                let is_post: fn(QemuCfg) -> bool = |c| c == QemuCfg::Postcopy;
                let mut per_bin = per_bin.into_iter();
                let (qs, qms, qps) = match qemu {
                    Some(_) => {
                        let mut v = per_bin.next().expect("the first QEMU's sides");
                        (
                            take(&mut v, is_pre),
                            take(&mut v, is_multifd),
                            take(&mut v, is_post),
                        )
                    }
                    None => (None, None, None),
                };
                let others: Vec<OtherQemu> = per_bin
                    .zip(&extras)
                    .map(|(mut v, (_, version))| OtherQemu {
                        version: version.clone(),
                        precopy: take(&mut v, is_pre).expect("pre-copy runs for every binary"),
                        multifd: take(&mut v, is_multifd),
                        postcopy: take(&mut v, is_post),
                    })
                    .collect();
                // The best QEMU configuration's median total time in this cell.
                let best_qemu = [&qs, &qms, &qps]
                    .iter()
                    .filter_map(|s| s.as_ref().map(|s| s.total_ms.median))
                    .chain(others.iter().flat_map(|o| {
                        std::iter::once(o.precopy.total_ms.median)
                            .chain(o.multifd.as_ref().map(|p| p.total_ms.median))
                            .chain(o.postcopy.as_ref().map(|p| p.total_ms.median))
                    }))
                    .fold(f64::INFINITY, f64::min);
                let fast_goal: Vec<Value> = g
                    .iter()
                    .zip(&variants)
                    .map(|(samples, (mode, log, tls))| {
                        let d = summary(&samples.iter().map(|s| s.downtime_ms).collect::<Vec<_>>());
                        let totals_ok = samples.iter().all(|s| s.total_ms <= best_qemu);
                        json!({
                            "mode": mode.to_string(),
                            "dirty_log": log.to_string(),
                            "tls": tls,
                            "downtime_median_at_most_5_ms": d.median <= 5.0,
                            "no_downtime_above_10_ms": d.max <= 10.0,
                            "every_total_at_most_best_qemu_median": best_qemu.is_finite().then_some(totals_ok),
                        })
                    })
                    .collect();
                let mut g = g.into_iter().map(side);
                let gs = g.next().expect("at least one mode");
                let alternatives = g
                    .zip(&variants[1..])
                    .map(|(side, (mode, log, tls))| Alternative {
                        mode: mode.to_string(),
                        dirty_log: log.to_string(),
                        tls: *tls,
                        first_over_this: ratios(&gs, &side),
                        side,
                    })
                    .collect();
                let ratios = qs.as_ref().map(|q| ratios(q, &gs));
                let goal = qs.as_ref().map(|q| meets_goal(&gs, q, limit));
                cells.push(Cell {
                    memory_mib: mem,
                    workload: w.name.clone(),
                    downtime_limit_ms: limit,
                    godwit_dirty_log: a.dirty_log[0].to_string(),
                    godwit: gs,
                    godwit_alternatives: alternatives,
                    qemu: qs,
                    qemu_multifd: qms,
                    qemu_postcopy: qps,
                    other_qemus: others,
                    qemu_over_godwit: ratios,
                    fast_goal,
                    godwit_meets_goal: goal,
                });
            }
        }
    }
    if !a.json {
        crate::output::progress("\n");
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(BenchReport {
        bench: "migrate",
        runs,
        qemu,
        connections: a.connections.unwrap_or(DEFAULT_CONNECTIONS),
        page_checks: a.page_checks.into(),
        vcpu_priority: a.vcpu_priority.into(),
        migration_priority: a.migration_priority.into(),
        prefault: a.prefault,
        own_sessions: a.own_sessions,
        cells,
    })
}

fn print_table(r: &BenchReport) {
    outln!(
        "live migration over TCP loopback, dirtier guest, {} run(s) per cell; min/median/max{}{}",
        r.runs,
        if r.prefault {
            "; destinations prefaulted"
        } else {
            ""
        },
        if r.own_sessions {
            "; each VMM in a scheduling group of its own"
        } else {
            ""
        }
    );
    outln!(
        "{:>6} {:>9} {:>6} {:>12} | {:>20} {:>20} {:>20} {:>9} {:>12} {:>15}",
        "MiB",
        "workload",
        "limit",
        "vmm",
        "total ms",
        "downtime ms",
        "guest gap ms",
        "MiB sent",
        "log read us",
        "guest CPU"
    );
    let s3 = |s: &Summary| format!("{:.0}/{:.0}/{:.0}", s.min, s.median, s.max);
    let s3f = |s: &Summary| format!("{:.1}/{:.1}/{:.1}", s.min, s.median, s.max);
    let med = |x: &Value, k: &str| x[k]["median"].as_f64().unwrap_or(f64::NAN);
    for c in &r.cells {
        let row = |name: &str, s: &Side| {
            outln!(
                "{:>6} {:>9} {:>6} {:>12} | {:>20} {:>20} {:>20} {:>9.0} {:>12} {:>15}",
                c.memory_mib,
                c.workload,
                c.downtime_limit_ms,
                name,
                s3(&s.total_ms),
                s3f(&s.downtime_ms),
                s3f(&s.guest_gap_ms),
                s.bytes.median / (1 << 20) as f64,
                s.dirty_log_us
                    .as_ref()
                    .map_or(String::new(), |d| format!("{:.0}", d.median)),
                format!(
                    "{:.2}/{:.2}/{:.2}",
                    s.guest_cpu.min, s.guest_cpu.median, s.guest_cpu.max
                )
            )
        };
        let first = if c.godwit_alternatives.is_empty() {
            "godwit".to_string()
        } else {
            format!("g-{}", c.godwit_dirty_log)
        };
        row(&first, &c.godwit);
        for alt in &c.godwit_alternatives {
            let name = format!(
                "g-{}{}{}",
                if alt.mode == "precopy" {
                    String::new()
                } else {
                    format!("{}-", alt.mode)
                },
                alt.dirty_log,
                if alt.tls { "+tls" } else { "" }
            );
            row(&name, &alt.side);
            let x = &alt.first_over_this;
            outln!(
                "{:>38} {}/{} medians: total {:.2}x, downtime {:.2}x, guest gap {:.2}x, bytes {:.2}x",
                "",
                c.godwit_dirty_log,
                &name[2..],
                med(x, "total_ms"),
                med(x, "downtime_ms"),
                med(x, "guest_gap_ms"),
                med(x, "bytes"),
            );
        }
        if let Some(q) = &c.qemu {
            row("qemu", q);
        }
        if let Some(q) = &c.qemu_multifd {
            row("qemu-multifd", q);
        }
        if let Some(q) = &c.qemu_postcopy {
            row("qemu-postcopy", q);
        }
        for o in &c.other_qemus {
            let v = o
                .version
                .split_whitespace()
                .nth(3)
                .unwrap_or("?")
                .to_string();
            row(&format!("qemu-{v}"), &o.precopy);
            if let Some(p) = &o.multifd {
                row(&format!("qemu-{v}-mfd"), p);
            }
            if let Some(p) = &o.postcopy {
                row(&format!("qemu-{v}-pc"), p);
            }
        }
        if let Some(x) = &c.qemu_over_godwit {
            outln!(
                "{:>38} qemu/godwit medians: total {:.2}x, downtime {:.2}x, guest gap {:.2}x, bytes {:.2}x{}",
                "",
                med(x, "total_ms"),
                med(x, "downtime_ms"),
                med(x, "guest_gap_ms"),
                med(x, "bytes"),
                match c.godwit_meets_goal {
                    Some(true) => "  (goal met)",
                    Some(false) => "  (goal NOT met)",
                    None => "",
                }
            );
        }
    }
}

pub fn run(a: MigrateBenchArgs) -> ExitCode {
    let json = a.json;
    crate::bench::finish("migrate", json, bench(a), print_table)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workloads_parse() {
        let w = workload("512m@1g").unwrap();
        assert_eq!((w.wss_mib, w.rate_mib_s), (512, 1024));
        assert_eq!(workload("idle").unwrap().wss_mib, 1);
        assert!(workload("512m").is_err());
        assert!(workload("0@1").is_err());
    }

    /// One run a side with these figures: (total ms, downtime ms, bytes).
    fn one(total: f64, downtime: f64, bytes: u64) -> Side {
        side(vec![Sample {
            total_ms: total,
            downtime_ms: downtime,
            bytes,
            ..Default::default()
        }])
    }

    #[test]
    fn a_pause_is_longer_than_qemus_only_beyond_the_millisecond_qemu_reports_in() {
        let qemu = one(600.0, 1.0, 140 << 20);
        assert!(meets_goal(&one(28.0, 1.13, 70 << 20), &qemu, 50));
        assert!(meets_goal(&one(28.0, 2.0, 70 << 20), &qemu, 50));
        assert!(!meets_goal(&one(28.0, 2.2, 70 << 20), &qemu, 50));
        // The other counts as they were: total, bytes, and the limit itself.
        assert!(!meets_goal(&one(601.0, 0.5, 70 << 20), &qemu, 50));
        assert!(!meets_goal(&one(28.0, 0.5, 141 << 20), &qemu, 50));
        assert!(!meets_goal(
            &one(28.0, 1.5, 70 << 20),
            &one(600.0, 3.0, 140 << 20),
            1
        ));
    }
}
