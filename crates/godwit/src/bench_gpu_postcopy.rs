//! `godwit bench gpu-postcopy`: what a GPU engine that waits for post-copy costs the
//! VMs it shares its GPU with, and what it costs the moved VM itself.
//!
//! Three godwit processes lease functions of one GPU (a private manager directory with
//! one GPU): a neighbour VM and a source VM, both training-like (SGD steps back to
//! back on gpu-dirtier's weights), and a destination. The source moves in post-copy
//! at once over a capped link, so for the seconds its VRAM takes to follow it the
//! moved VM's commands touch pages still at the source. The destination's engine
//! policy (`run --gpu-prefetch`) is the side: `auto` brings a command's pages in before
//! it runs, holding nothing, while another VF wants the engine; `off` fetches a page
//! as the engine touches it, holding the GPU every VF on it shares.
//!
//! Per run, from the GPU manager's counters (engine time and commands per VF, polled):
//! each VM's engine share and commands per second before the migration and during it
//! (the neighbour throughout; the moved VM at the source before, at the destination
//! during), the post-copy window, the touches that had to fetch a page and their
//! latency. Engine time counts while a VF holds the engine, waiting or not; commands
//! count work done, so the moved VM's commands per second during the window over
//! before is what it kept, whatever it held.

use crate::bench::{summary, Pair, Procs, Summary};
use crate::cli::GpuPostcopyBenchArgs;
use godwit_gpu::Manager;
use godwit_migration::{Options, Report};
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const GUEST_MIB: u64 = 512;
const STEADY_TIMEOUT: Duration = Duration::from_secs(120);
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(600);
/// How long both VMs run side by side before the migration, and how much of that is
/// measured as "before".
const SETTLE: Duration = Duration::from_millis(1500);
const BEFORE: Duration = Duration::from_secs(4);
const POLL: Duration = Duration::from_millis(20);

/// One VF's counters at an instant.
#[derive(Clone, Copy, Default)]
struct Count {
    engine_ms: f64,
    commands: u64,
}

/// The manager's counters of every VF on the GPU, by the pid holding it.
type Reading = BTreeMap<u32, Count>;

fn counts(m: &Manager) -> Result<Reading, String> {
    let st = m.status().map_err(|e| format!("GPU status: {e}"))?;
    Ok(st
        .into_iter()
        .flat_map(|g| g.vfs)
        .map(|v| {
            (
                v.holder.pid,
                Count {
                    engine_ms: v.engine_ms,
                    commands: v.commands,
                },
            )
        })
        .collect())
}

/// A VM's engine share (engine time over wall time) and commands per second between
/// two readings of its counters; a VF that was not leased yet at the first counts from
/// zero (a destination's is leased when the VM arrives).
#[derive(Serialize, Clone, Copy)]
struct Rate {
    engine_share: f64,
    commands_per_s: f64,
}

fn rate(who: &str, a: Option<Count>, b: Option<Count>, secs: f64) -> Result<Rate, String> {
    let b = b.ok_or_else(|| format!("{who}: its GPU function was not in the manager's status"))?;
    let a = a.unwrap_or_default();
    Ok(Rate {
        engine_share: (b.engine_ms - a.engine_ms) / 1e3 / secs,
        commands_per_s: b.commands.saturating_sub(a.commands) as f64 / secs,
    })
}

#[derive(Serialize, Clone)]
struct Sample {
    total_ms: f64,
    downtime_ms: f64,
    /// From the switch to the destination holding every page.
    window_ms: f64,
    /// The interval the "during" rates cover: the migration command, start to end.
    measured_ms: f64,
    neighbour_before: Rate,
    neighbour_during: Rate,
    /// The moved VM at the source, before.
    moved_before: Rate,
    /// The moved VM at the destination, during.
    moved_during: Rate,
    /// The neighbour's and the moved VM's engine shares during, added: how much of the
    /// GPU's time anyone held.
    gpu_held_during: f64,
    /// The neighbour's commands per second during over before (1: it lost nothing).
    neighbour_kept: f64,
    /// The moved VM's commands per second at the destination over before at the source.
    moved_kept: f64,
    remote_faults: u64,
    /// The GPU function's own touches that had to fetch a page (VRAM), and pages asked
    /// for ahead of the engine's commands (or read ahead after faults).
    gpu_remote_faults: u64,
    gpu_fetched_ahead: u64,
    fault_latency_us: Value,
}

#[derive(Serialize)]
struct Side {
    prefetch: String,
    neighbour_engine_share_during: Summary,
    neighbour_kept: Summary,
    moved_engine_share_during: Summary,
    moved_kept: Summary,
    gpu_held_during: Summary,
    window_ms: Summary,
    gpu_remote_faults: Summary,
    samples: Vec<Sample>,
}

#[derive(Serialize)]
struct BenchReport {
    bench: &'static str,
    runs: usize,
    profile: String,
    weights_mib: u64,
    max_bandwidth: u64,
    /// Each byte between the ends held this long, each way (`--link-delay-us`).
    link_delay_us: u64,
    /// What every VM runs (gpu-dirtier's arguments).
    workload: String,
    sides: Vec<Side>,
}

/// Samples the manager's counters every `POLL` on a thread of its own until stopped,
/// so that a reading brackets the migration command closely without delaying it.
struct Poller {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<(Instant, Reading)>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Poller {
    fn start(dir: &Path) -> Result<Poller, String> {
        let m = Manager::open(dir).map_err(|e| e.to_string())?;
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (s, v) = (stop.clone(), seen.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Relaxed) {
                if let Ok(c) = counts(&m) {
                    v.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((Instant::now(), c));
                }
                std::thread::sleep(POLL);
            }
        });
        Ok(Poller {
            stop,
            seen,
            thread: Some(thread),
        })
    }

    /// Returns once a reading was taken after `t`.
    fn wait_past(&self, t: Instant) -> Result<(), String> {
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            let v = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            if v.last().is_some_and(|x| x.0 > t) {
                return Ok(());
            }
            drop(v);
            std::thread::sleep(POLL / 4);
        }
        Err("the GPU manager's status could not be read after the migration".into())
    }

    /// The last reading at or before `t`, and the first at or after it.
    fn around(&self, t: Instant) -> (Option<Reading>, Option<Reading>) {
        let v = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let before = v.iter().rev().find(|x| x.0 <= t).map(|x| x.1.clone());
        let after = v.iter().find(|x| x.0 >= t).map(|x| x.1.clone());
        (before, after)
    }
}

impl Drop for Poller {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn workload(weights_mib: u64) -> String {
    format!("aperture=1 engine=1 dma=1 rate=16 busy={weights_mib} seconds=0 report-every=1000")
}

/// Starts the neighbour VM and returns once its guest runs steadily.
fn neighbour(
    exe: &Path,
    dir: &Path,
    gpu_dir: &Path,
    a: &GpuPostcopyBenchArgs,
) -> Result<Procs, String> {
    let log = dir.join("neighbour.log");
    let _ = std::fs::remove_file(&log);
    let mut c = Command::new(exe);
    c.args([
        "run",
        "--memory",
        &GUEST_MIB.to_string(),
        "--gpu",
        &a.profile,
    ])
    .args(["--gpu-index", "0", "--gpu-dir"])
    .arg(gpu_dir)
    .arg("--console")
    .arg(format!("file:{}", log.display()))
    .args(["gpu-dirtier", "--"])
    .args(workload(a.weights_mib).split(' '))
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    let child: Child = c.spawn().map_err(|e| format!("cannot start godwit: {e}"))?;
    let mut procs = Procs(vec![child]);
    crate::bench::wait_for("the neighbour VM", STEADY_TIMEOUT, || {
        crate::bench::alive(&mut procs).then(|| crate::bench::steady(&log))
    })?;
    Ok(procs)
}

fn one_run(
    dir: &Path,
    gpu_dir: &Path,
    prefetch: &str,
    bandwidth: u64,
    a: &GpuPostcopyBenchArgs,
) -> Result<Sample, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    // Dropped last: the neighbour outlives the pair's processes in every outcome.
    let n = neighbour(&exe, dir, gpu_dir, a)?;
    let n_pid = n.0[0].id();
    let mut pair = Pair::new(dir, "")?;
    let gd = gpu_dir.display().to_string();
    let mut dst = pair.destination_args();
    dst.extend(
        [
            "--gpu-dir",
            &gd,
            "--gpu-index",
            "0",
            "--gpu-prefetch",
            prefetch,
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    let mut src = pair.source_args(GUEST_MIB);
    src.extend(
        ["--gpu", &a.profile, "--gpu-index", "0", "--gpu-dir", &gd]
            .iter()
            .map(|s| s.to_string()),
    );
    src.extend(["gpu-dirtier".to_string(), "--".to_string()]);
    src.extend(workload(a.weights_mib).split(' ').map(String::from));
    pair.start(dst, src, STEADY_TIMEOUT)?;
    let (d_pid, s_pid) = match pair.pids()[..] {
        [d, s] => (d, s),
        _ => return Err("the pair did not start two processes".into()),
    };
    // Between two hosts apart: the source reaches the destination through a relay that
    // holds every byte, each way.
    let link = match a.link_delay_us {
        0 => None,
        us => {
            let to = pair.to();
            let at = to
                .strip_prefix("tcp:")
                .and_then(|x| x.parse().ok())
                .ok_or_else(|| format!("not a TCP address: {to}"))?;
            Some(
                crate::delay_link::DelayLink::start(at, Duration::from_micros(us))
                    .map_err(|e| format!("the delayed link: {e}"))?,
            )
        }
    };
    let poll = Poller::start(gpu_dir)?;
    std::thread::sleep(SETTLE);
    let b0 = Instant::now();
    std::thread::sleep(BEFORE);
    let b1 = Instant::now();
    let o = Options {
        mode: godwit_migration::Mode::Postcopy,
        to: link
            .as_ref()
            .map_or_else(|| pair.to(), |l| format!("tcp:{}", l.addr)),
        downtime_ms: 50,
        max_bandwidth: Some(bandwidth),
        connections: None,
        stop_copy: vec![],
        tls_dir: None,
        insecure: false,
        page_checks: Default::default(),
        vcpu_priority: Default::default(),
        migration_priority: Default::default(),
    };
    let (r, _gap) = pair.migrate(&o, MIGRATE_TIMEOUT)?;
    let m1 = pair.migrated_at.ok_or("the migration's end was not seen")?;
    // In post-copy the guest's reports after the move were out before the migration
    // ended, so `migrate` may return within one poll of its end.
    poll.wait_past(m1)?;
    let at = |t: Instant, pid: u32, after: bool| {
        let (x, y) = poll.around(t);
        let m = if after { y } else { x };
        m.and_then(|m| m.get(&pid).copied())
    };
    let secs = |a: Instant, b: Instant| (b - a).as_secs_f64();
    let (nb, mb) = (
        "the neighbour before",
        "the moved VM before (at the source)",
    );
    let (nd, md) = (
        "the neighbour during",
        "the moved VM during (at the destination)",
    );
    let neighbour_before = rate(nb, at(b0, n_pid, false), at(b1, n_pid, true), secs(b0, b1))?;
    let moved_before = rate(mb, at(b0, s_pid, false), at(b1, s_pid, true), secs(b0, b1))?;
    let neighbour_during = rate(nd, at(b1, n_pid, false), at(m1, n_pid, true), secs(b1, m1))?;
    let moved_during = rate(md, at(b1, d_pid, false), at(m1, d_pid, true), secs(b1, m1))?;
    drop(poll);
    sample(
        &r,
        secs(b1, m1),
        neighbour_before,
        neighbour_during,
        moved_before,
        moved_during,
    )
}

fn sample(
    r: &Report,
    secs: f64,
    neighbour_before: Rate,
    neighbour_during: Rate,
    moved_before: Rate,
    moved_during: Rate,
) -> Result<Sample, String> {
    let p = r
        .postcopy
        .as_ref()
        .ok_or("the migration ran no post-copy (the report has none)")?;
    let gpu = p.destination.get("gpu");
    let kept = |a: &Rate, b: &Rate| {
        if a.commands_per_s > 0.0 {
            b.commands_per_s / a.commands_per_s
        } else {
            f64::NAN
        }
    };
    Ok(Sample {
        total_ms: r.total_ms,
        downtime_ms: r.downtime_ms,
        window_ms: p.window_ms,
        measured_ms: secs * 1e3,
        gpu_held_during: neighbour_during.engine_share + moved_during.engine_share,
        neighbour_kept: kept(&neighbour_before, &neighbour_during),
        moved_kept: kept(&moved_before, &moved_during),
        neighbour_before,
        neighbour_during,
        moved_before,
        moved_during,
        remote_faults: p.remote_faults,
        gpu_remote_faults: gpu.map_or(0, |g| g.remote_faults),
        gpu_fetched_ahead: gpu.map_or(0, |g| g.fetched_ahead),
        fault_latency_us: serde_json::to_value(&p.fault_latency).expect("plain data"),
    })
}

fn side(prefetch: &str, samples: Vec<Sample>) -> Side {
    let f = |g: fn(&Sample) -> f64| summary(&samples.iter().map(g).collect::<Vec<_>>());
    Side {
        prefetch: prefetch.into(),
        neighbour_engine_share_during: f(|s| s.neighbour_during.engine_share),
        neighbour_kept: f(|s| s.neighbour_kept),
        moved_engine_share_during: f(|s| s.moved_during.engine_share),
        moved_kept: f(|s| s.moved_kept),
        gpu_held_during: f(|s| s.gpu_held_during),
        window_ms: f(|s| s.window_ms),
        gpu_remote_faults: f(|s| s.gpu_remote_faults as f64),
        samples,
    }
}

fn bench(a: GpuPostcopyBenchArgs) -> Result<BenchReport, String> {
    if a.runs == 0 {
        return Err("--runs must be at least 1".into());
    }
    let prof = godwit_gpu::profile::profile(&a.profile)
        .ok_or_else(|| format!("unknown GPU profile {:?}", a.profile))?;
    if a.weights_mib == 0 || a.weights_mib << 20 > prof.framebuffer / 2 {
        return Err(format!(
            "--weights-mib {} does not fit {} (1 to {} MiB)",
            a.weights_mib,
            prof.name,
            (prof.framebuffer / 2) >> 20
        ));
    }
    let bandwidth = crate::migrate::parse_bandwidth(&a.max_bandwidth)?;
    let mut sides = Vec::new();
    for &p in &a.prefetch {
        if !sides.contains(&p) {
            sides.push(p);
        }
    }
    if sides.is_empty() {
        return Err("--prefetch: name at least one of auto, always, off".into());
    }
    let dir: PathBuf =
        std::env::temp_dir().join(format!("godwit-bench-gpu-pc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let r = measure(&dir, &sides, bandwidth, &a);
    let _ = std::fs::remove_dir_all(&dir);
    let by_side = r?;
    Ok(BenchReport {
        bench: "gpu-postcopy",
        runs: a.runs,
        profile: a.profile.clone(),
        weights_mib: a.weights_mib,
        max_bandwidth: bandwidth,
        link_delay_us: a.link_delay_us,
        workload: workload(a.weights_mib),
        sides: sides
            .iter()
            .zip(by_side)
            .map(|(p, v)| side(&p.to_string(), v))
            .collect(),
    })
}

fn measure(
    dir: &Path,
    sides: &[godwit_vmm::config::GpuPrefetch],
    bandwidth: u64,
    a: &GpuPostcopyBenchArgs,
) -> Result<Vec<Vec<Sample>>, String> {
    let gpu_dir = dir.join("gpu");
    // One GPU: every VF shares its engine.
    crate::bench::gpu_host(&gpu_dir, 1)?;
    let mut by_side: Vec<Vec<Sample>> = vec![Vec::new(); sides.len()];
    let total = a.runs * sides.len();
    for i in 0..a.runs {
        // Alternate which side goes first.
        for k in 0..sides.len() {
            let s = (k + i) % sides.len();
            let p = sides[s].to_string();
            let x = one_run(dir, &gpu_dir, &p, bandwidth, a)
                .map_err(|e| format!("--gpu-prefetch {p}: {e}"))?;
            by_side[s].push(x);
            if !a.json {
                let done = i * sides.len() + k + 1;
                crate::output::progress(&format!("\rrun {done}/{total}"));
            }
        }
    }
    if !a.json {
        crate::output::progress("\n");
    }
    Ok(by_side)
}

fn print_table(r: &BenchReport) {
    outln!(
        "GPU post-copy beside a busy neighbour: {} ({} MiB of weights), link capped at {} MiB/s, delayed {} us each way, {} runs per side (min/median/max)",
        r.profile,
        r.weights_mib,
        r.max_bandwidth >> 20,
        r.link_delay_us,
        r.runs
    );
    outln!(
        "{:<8} {:>18} {:>18} {:>18} {:>18} {:>18} {:>18} {:>14}",
        "prefetch",
        "neighbour share",
        "neighbour kept",
        "moved share",
        "moved kept",
        "GPU held",
        "window ms",
        "GPU faults"
    );
    for s in &r.sides {
        outln!(
            "{:<8} {:>18} {:>18} {:>18} {:>18} {:>18} {:>18} {:>14}",
            s.prefetch,
            s.neighbour_engine_share_during.mmm(3),
            s.neighbour_kept.mmm(3),
            s.moved_engine_share_during.mmm(3),
            s.moved_kept.mmm(3),
            s.gpu_held_during.mmm(3),
            s.window_ms.mmm(0),
            s.gpu_remote_faults.mmm(0)
        );
    }
    outln!("share: engine time over wall time during the window; kept: commands per second during it over before the migration");
}

pub fn run(a: GpuPostcopyBenchArgs) -> std::process::ExitCode {
    let json = a.json;
    crate::bench::finish("gpu-postcopy", json, bench(a), print_table)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_counts_a_function_leased_in_between_from_zero() {
        let c = |e, n| {
            Some(Count {
                engine_ms: e,
                commands: n,
            })
        };
        let r = rate("a", None, c(500.0, 40), 2.0).unwrap();
        assert_eq!((r.engine_share, r.commands_per_s), (0.25, 20.0));
        let r = rate("a", c(100.0, 10), c(600.0, 30), 1.0).unwrap();
        assert_eq!((r.engine_share, r.commands_per_s), (0.5, 20.0));
        assert!(rate("a", c(1.0, 1), None, 1.0).is_err());
    }
}
