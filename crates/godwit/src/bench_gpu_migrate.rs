//! `godwit bench gpu-migrate`: a VM with a GPU function migrated to a second godwit
//! process on this machine (TCP loopback, one connection, downtime limit 50 ms), with
//! the GPU pre-copied against the same migration with the GPU stopped and copied
//! (`stop_copy: ["gpu"]`, the way VFIO GPUs without pre-copy move), interleaved, over
//! VRAM profiles x GPU workloads.
//!
//! Per run: total time, the VMM's downtime and what it was made of, the guest's own
//! largest gap around the switchover (the gpu-dirtier's window_gap_us in the
//! destination's first report windows), GPU quiesce, VRAM and RAM bytes, auto-converge
//! (how far the GPU and the vCPUs were held back, and the GPU's engine time per second
//! while held against before), and the link speed the pre-copy rounds showed.

use crate::bench::{summary, Pair, Summary};
use crate::cli::GpuMigrateBenchArgs;
use godwit_gpu::profile;
use godwit_migration::{Options, Report};
use serde::Serialize;
use serde_json::{json, Value};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

/// Filling 8 GiB of VRAM on a host that backs memory on first touch takes a while.
const STEADY_TIMEOUT: Duration = Duration::from_secs(300);
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(600);
const GUEST_MIB: u64 = 256;
const MIB: f64 = (1u64 << 20) as f64;

/// A GPU load, as gpu-dirtier arguments.
struct Workload {
    name: &'static str,
    what: &'static str,
    args: &'static str,
}

const WORKLOADS: &[Workload] = &[
    Workload {
        name: "idle",
        what: "VRAM filled (engine writes every byte once), then untouched",
        args: "aperture=1 engine=0 dma=1 rate=1 idle=1",
    },
    Workload {
        name: "busy",
        what: "training-like: SGD steps (SGEMM 256^3, then AXPY over 256 MiB of weights) back to back",
        args: "aperture=1 engine=1 dma=1 rate=16 busy=512",
    },
    Workload {
        name: "256m",
        what: "VRAM dirtier: 128 MiB/s aperture stores + 128 MiB/s engine fills (+128 MiB/s DMA to RAM)",
        args: "aperture=64 engine=192 dma=16 rate=128",
    },
    Workload {
        name: "flat",
        what: "VRAM dirtier flat out (aperture, engine, DMA)",
        args: "aperture=64 engine=192 dma=16 rate=0",
    },
];

#[derive(Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Mode {
    Precopy,
    StopCopy,
    Postcopy,
    Hybrid,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Precopy => "pre-copy",
            Mode::StopCopy => "stop-copy",
            Mode::Postcopy => "post-copy",
            Mode::Hybrid => "hybrid",
        }
    }
}

#[derive(Serialize, Clone)]
struct Sample {
    total_ms: f64,
    downtime_ms: f64,
    guest_gap_ms: f64,
    gpu_quiesce_ms: f64,
    vram_bytes: u64,
    ram_bytes: u64,
    /// The guest's vCPUs' time on a CPU over the migration's wall time, both hosts'
    /// processes together (`crate::guest_cpu`); the GPU's engine is not in it.
    guest_cpu: f64,
    /// VRAM the first pass found written (sent, or left for the next round because
    /// it was written again meanwhile): what a migration must send at least.
    vram_touched_bytes: u64,
    rounds: u32,
    /// Pre-copy throughput over the rounds (MiB/s).
    link_mib_s: f64,
    gpu_throttle_pct: u32,
    gpu_throttle_ms: f64,
    vcpu_throttle_pct: u32,
    /// The GPU's engine time per second of wall time while it was held back, over the
    /// same in the rounds before (1: nothing lost; none if never held back).
    gpu_throughput_while_held: Option<f64>,
    switchover_reason: String,
    /// The pause's parts, as the report gives them.
    downtime: Value,
    /// Post-copy and hybrid: the window (switch to last page), the touches that had
    /// to fetch a page (RAM and VRAM) and their latency, pages pre-paged.
    #[serde(skip_serializing_if = "Option::is_none")]
    postcopy: Option<Value>,
}

#[derive(Serialize)]
struct Side {
    total_ms: Summary,
    downtime_ms: Summary,
    guest_gap_ms: Summary,
    gpu_quiesce_ms: Summary,
    vram_mib: Summary,
    ram_mib: Summary,
    guest_cpu: Summary,
    samples: Vec<Sample>,
}

#[derive(Serialize)]
struct Cell {
    profile: String,
    vram_mib: u64,
    workload: String,
    precopy: Side,
    stop_copy: Option<Side>,
    #[serde(skip_serializing_if = "Option::is_none")]
    postcopy: Option<Side>,
    #[serde(skip_serializing_if = "Option::is_none")]
    hybrid: Option<Side>,
    /// Pre-copy's figure over stop-and-copy's (below 1: pre-copy is better).
    precopy_over_stop_copy: Option<Value>,
    /// Pre-copy's total time over the time to send the touched VRAM once at the link
    /// speed the rounds showed (medians).
    total_over_vram_once: f64,
}

#[derive(Serialize)]
struct Goal {
    /// Busy GPU: median downtime at most 10 ms at every size.
    busy_median_downtime_ms: Vec<(String, f64)>,
    /// The largest size's median over the smallest's (at most 1.5).
    busy_largest_over_smallest: Option<f64>,
    /// Pre-copy runs above 50 ms, any workload.
    runs_above_50_ms: usize,
    /// Busy GPU: total time over sending its touched VRAM once (at most 2).
    busy_total_over_vram_once: Vec<(String, f64)>,
    met: bool,
}

#[derive(Serialize)]
struct BenchReport {
    bench: &'static str,
    runs: usize,
    /// Destinations got their memory and VRAM before each migration (`--prefault`).
    prefault: bool,
    /// Which ends' migration threads went first while pre-copy ran
    /// (`--migration-priority`; each run's report says what it got).
    migration_priority: godwit_migration::migration_priority::MigrationPriority,
    downtime_limit_ms: u64,
    workloads: Value,
    skipped: Vec<String>,
    cells: Vec<Cell>,
    goal: Goal,
}

fn side(samples: Vec<Sample>) -> Side {
    let f = |g: fn(&Sample) -> f64| summary(&samples.iter().map(g).collect::<Vec<_>>());
    Side {
        total_ms: f(|s| s.total_ms),
        downtime_ms: f(|s| s.downtime_ms),
        guest_gap_ms: f(|s| s.guest_gap_ms),
        gpu_quiesce_ms: f(|s| s.gpu_quiesce_ms),
        vram_mib: f(|s| s.vram_bytes as f64 / MIB),
        ram_mib: f(|s| s.ram_bytes as f64 / MIB),
        guest_cpu: f(|s| s.guest_cpu),
        samples,
    }
}

fn ratio(a: &Summary, b: &Summary) -> Value {
    let r = |x: f64, y: f64| if y > 0.0 { x / y } else { f64::NAN };
    json!({"min": r(a.min, b.min), "median": r(a.median, b.median), "max": r(a.max, b.max)})
}

/// Host memory still available, in MiB.
fn available_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib / 1024)
}

/// What the report says of the GPU's engine while held back, against before.
fn throughput_while_held(r: &Report) -> Option<f64> {
    let rate = |held: bool| {
        let (us, ms) = r
            .rounds
            .iter()
            .filter(|x| x.throttle.contains_key("gpu") == held)
            .filter_map(|x| {
                let us = *x.components.get("gpu")?.extra.get("engine_us")?;
                Some((us as f64, x.duration_ms))
            })
            .fold((0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
        (ms > 0.0).then(|| us / 1e3 / ms)
    };
    Some(rate(true)? / rate(false)?)
}

fn sample(r: &Report, gap: f64, guest_cpu: f64) -> Sample {
    let part = |name: &str| r.bytes.components.get(name).map_or(0, |c| c.page_bytes);
    let touched = r
        .rounds
        .first()
        .and_then(|x| x.components.get("gpu"))
        .map_or(0, |c| (c.pages_sent + c.skipped_redirtied) * 4096)
        .max(
            r.downtime
                .components
                .get("gpu")
                .filter(|_| !r.stop_copy.is_empty())
                .map_or(0, |c| c.final_pages * 4096),
        );
    let held = |name: &str| r.throttle.get(name).map_or((0, 0.0), |t| (t.max_pct, t.ms));
    Sample {
        total_ms: r.total_ms,
        downtime_ms: r.downtime_ms,
        guest_gap_ms: gap,
        gpu_quiesce_ms: r.downtime.components.get("gpu").map_or(0.0, |c| c.stop_ms),
        vram_bytes: part("gpu"),
        ram_bytes: part("ram"),
        guest_cpu,
        vram_touched_bytes: touched,
        rounds: r.round_count,
        link_mib_s: r.throughput_mib_s,
        gpu_throttle_pct: held("gpu").0,
        gpu_throttle_ms: held("gpu").1,
        vcpu_throttle_pct: held("vcpus").0,
        gpu_throughput_while_held: throughput_while_held(r),
        switchover_reason: r.switchover_reason.clone(),
        downtime: serde_json::to_value(&r.downtime).expect("plain data"),
        postcopy: r.postcopy.as_ref().map(|p| {
            json!({
                "ran": r.ran,
                "window_ms": p.window_ms,
                "missing_pages": p.missing_pages,
                "remote_faults": p.remote_faults,
                "fault_latency_us": p.fault_latency,
                "prepaged_pages": p.prepaged_pages,
                "destination": p.destination,
            })
        }),
    }
}

fn one_run(
    dir: &Path,
    gpu_dir: &Path,
    prof: &str,
    w: &Workload,
    mode: Mode,
    a: &GpuMigrateBenchArgs,
) -> Result<Sample, String> {
    let (limit, prefault) = (a.downtime_ms, a.prefault);
    let mut pair = Pair::new(dir, "")?;
    let gd = gpu_dir.display().to_string();
    let mut dst = pair.destination_args();
    dst.extend(["--gpu-dir".into(), gd.clone()]);
    if prefault {
        dst.extend([
            "--memory".into(),
            GUEST_MIB.to_string(),
            "--gpu".into(),
            prof.into(),
            "--prefault".into(),
        ]);
    }
    let mut src = pair.source_args(GUEST_MIB);
    src.extend(
        [
            "--gpu",
            prof,
            "--gpu-dir",
            &gd,
            "gpu-dirtier",
            "--",
            "seconds=0",
            "report-every=100",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    src.extend(w.args.split(' ').map(String::from));
    // A prefaulting destination listens once its memory and VRAM are in place.
    pair.start(dst, src, STEADY_TIMEOUT)?;
    // Let a busy GPU reach its steady state (a few SGD steps).
    std::thread::sleep(Duration::from_millis(500));
    let o = Options {
        mode: match mode {
            Mode::Postcopy => godwit_migration::Mode::Postcopy,
            Mode::Hybrid => godwit_migration::Mode::Hybrid,
            _ => godwit_migration::Mode::Precopy,
        },
        to: pair.to(),
        downtime_ms: limit,
        max_bandwidth: None,
        connections: None,
        stop_copy: match mode {
            Mode::StopCopy => vec!["gpu".into()],
            _ => vec![],
        },
        tls_dir: None,
        insecure: false,
        page_checks: Default::default(),
        vcpu_priority: Default::default(),
        migration_priority: a.migration_priority.into(),
    };
    let (r, gap) = pair.migrate(&o, MIGRATE_TIMEOUT)?;
    Ok(sample(&r, gap, pair.guest_cpu))
}

fn bench(a: GpuMigrateBenchArgs) -> Result<BenchReport, String> {
    if a.runs == 0 {
        return Err("--runs must be at least 1".into());
    }
    let mut profiles = Vec::new();
    for p in &a.profiles {
        let pr = profile::profile(p).ok_or_else(|| format!("unknown GPU profile {p:?}"))?;
        profiles.push(pr);
    }
    let workloads: Vec<&Workload> = a
        .workloads
        .iter()
        .map(|n| {
            WORKLOADS.iter().find(|w| w.name == n).ok_or_else(|| {
                let names: Vec<_> = WORKLOADS.iter().map(|w| w.name).collect();
                format!("unknown workload {n:?} (use {})", names.join(", "))
            })
        })
        .collect::<Result<_, _>>()?;
    let dir = std::env::temp_dir().join(format!("godwit-bench-gpu-mig-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let gpu_dir = dir.join("gpu");
    crate::bench::gpu_host(&gpu_dir, 2)?;
    // Both sides hold a filled VRAM at once, and each guest's RAM.
    let mut skipped = Vec::new();
    let avail = available_mib();
    profiles.retain(|p| {
        let need = 2 * (p.framebuffer >> 20) + 2 * GUEST_MIB + 1024;
        let ok = need <= avail;
        if !ok {
            skipped.push(format!(
                "{}: needs about {need} MiB of host memory, {avail} MiB available",
                p.name
            ));
        }
        ok
    });
    if profiles.is_empty() {
        return Err(format!("no profile fits this host: {}", skipped.join("; ")));
    }
    if a.quick && profiles.len() > 2 {
        profiles = vec![profiles[0], profiles[profiles.len() - 1]];
    }
    let mut modes = vec![Mode::Precopy];
    if !a.no_stop_copy {
        modes.push(Mode::StopCopy);
    }
    for m in &a.modes {
        modes.push(match m.as_str() {
            "postcopy" => Mode::Postcopy,
            "hybrid" => Mode::Hybrid,
            m => return Err(format!("--modes: {m:?} (use postcopy, hybrid)")),
        });
    }
    let modes = &modes[..];
    let total = profiles.len() * workloads.len() * a.runs * modes.len();
    let mut done = 0;
    let mut cells = Vec::new();
    for p in &profiles {
        for w in &workloads {
            let mut by_mode: Vec<Vec<Sample>> = vec![Vec::new(); modes.len()];
            for i in 0..a.runs {
                // Alternate which mode goes first.
                for k in 0..modes.len() {
                    let m = (k + i) % modes.len();
                    let s = one_run(&dir, &gpu_dir, p.name, w, modes[m], &a)
                        .map_err(|e| format!("{} {} {}: {e}", p.name, w.name, modes[m].name()))?;
                    by_mode[m].push(s);
                    done += 1;
                    if !a.json {
                        crate::output::progress(&format!("\rrun {done}/{total}"));
                    }
                }
            }
            let mut sides: Vec<Option<Side>> = by_mode.into_iter().map(|v| Some(side(v))).collect();
            let mut take = |m: Mode| {
                modes
                    .iter()
                    .position(|x| *x == m)
                    .and_then(|i| sides[i].take())
            };
            let pre = take(Mode::Precopy).expect("pre-copy always runs");
            let stop = take(Mode::StopCopy);
            let (postcopy, hybrid) = (take(Mode::Postcopy), take(Mode::Hybrid));
            let link = pre.samples.iter().map(|s| s.link_mib_s).collect::<Vec<_>>();
            let touched = pre
                .samples
                .iter()
                .map(|s| s.vram_touched_bytes as f64)
                .collect::<Vec<_>>();
            let once_ms = summary(&touched).median / MIB / summary(&link).median.max(1.0) * 1e3;
            cells.push(Cell {
                profile: p.name.into(),
                vram_mib: p.framebuffer >> 20,
                workload: w.name.into(),
                precopy_over_stop_copy: stop.as_ref().map(|s| {
                    json!({
                        "total_ms": ratio(&pre.total_ms, &s.total_ms),
                        "downtime_ms": ratio(&pre.downtime_ms, &s.downtime_ms),
                        "guest_gap_ms": ratio(&pre.guest_gap_ms, &s.guest_gap_ms),
                    })
                }),
                total_over_vram_once: pre.total_ms.median / once_ms.max(1e-3),
                precopy: pre,
                stop_copy: stop,
                postcopy,
                hybrid,
            });
        }
    }
    if !a.json {
        crate::output::progress("\n");
    }
    let _ = std::fs::remove_dir_all(&dir);
    let busy: Vec<&Cell> = cells.iter().filter(|c| c.workload == "busy").collect();
    let busy_dt: Vec<(String, f64)> = busy
        .iter()
        .map(|c| (c.profile.clone(), c.precopy.downtime_ms.median))
        .collect();
    let largest_over_smallest = match (busy_dt.first(), busy_dt.last()) {
        (Some(s), Some(l)) if busy_dt.len() > 1 => Some(l.1 / s.1),
        _ => None,
    };
    let above = cells
        .iter()
        .flat_map(|c| &c.precopy.samples)
        .filter(|s| s.downtime_ms > 50.0)
        .count();
    let busy_total: Vec<(String, f64)> = busy
        .iter()
        .map(|c| (c.profile.clone(), c.total_over_vram_once))
        .collect();
    let met = !busy.is_empty()
        && busy_dt.iter().all(|x| x.1 <= 10.0)
        && largest_over_smallest.is_none_or(|r| r <= 1.5)
        && above == 0
        && busy_total.iter().all(|x| x.1 <= 2.0);
    Ok(BenchReport {
        bench: "gpu-migrate",
        runs: a.runs,
        prefault: a.prefault,
        migration_priority: a.migration_priority.into(),
        downtime_limit_ms: a.downtime_ms,
        workloads: workloads
            .iter()
            .map(|w| {
                (
                    w.name.to_string(),
                    json!({"what": w.what, "gpu-dirtier": w.args}),
                )
            })
            .collect::<serde_json::Map<_, _>>()
            .into(),
        skipped,
        cells,
        goal: Goal {
            busy_median_downtime_ms: busy_dt,
            busy_largest_over_smallest: largest_over_smallest,
            runs_above_50_ms: above,
            busy_total_over_vram_once: busy_total,
            met,
        },
    })
}

fn print_table(r: &BenchReport) {
    outln!(
        "GPU live migration, downtime limit {} ms, {} runs per cell (min/median/max){}",
        r.downtime_limit_ms,
        r.runs,
        if r.prefault {
            "; destinations prefaulted"
        } else {
            ""
        }
    );
    for s in &r.skipped {
        outln!("skipped {s}");
    }
    outln!(
        "{:<8} {:<5} {:<10} {:>20} {:>18} {:>18} {:>14} {:>16} {:>9} {:>10}",
        "profile",
        "load",
        "mode",
        "total ms",
        "downtime ms",
        "guest gap ms",
        "GPU stop ms",
        "VRAM MiB",
        "held %",
        "total/once"
    );
    for c in &r.cells {
        let row = |mode: &str, s: &Side, extra: String| {
            let most = |f: fn(&Sample) -> u32| s.samples.iter().map(f).max().unwrap_or(0);
            let held = format!(
                "{}/{}",
                most(|x| x.gpu_throttle_pct),
                most(|x| x.vcpu_throttle_pct)
            );
            outln!(
                "{:<8} {:<5} {:<10} {:>20} {:>18} {:>18} {:>14} {:>16} {:>9} {:>10}",
                c.profile,
                c.workload,
                mode,
                s.total_ms.mmm(0),
                s.downtime_ms.mmm(1),
                s.guest_gap_ms.mmm(1),
                s.gpu_quiesce_ms.mmm(2),
                s.vram_mib.mmm(0),
                held,
                extra
            );
        };
        row(
            "pre-copy",
            &c.precopy,
            format!("{:.2}", c.total_over_vram_once),
        );
        if let Some(s) = &c.stop_copy {
            row("stop-copy", s, String::new());
        }
        for (name, side) in [("post-copy", &c.postcopy), ("hybrid", &c.hybrid)] {
            if let Some(s) = side {
                row(name, s, String::new());
            }
        }
    }
    let g = &r.goal;
    outln!(
        "goal (busy GPU: median downtime <= 10 ms at every size, largest/smallest <= 1.5, no run > 50 ms, total <= 2x sending the touched VRAM once): {}",
        if g.met { "met" } else { "not met" }
    );
    outln!(
        "  busy median downtime {:?}, largest/smallest {:?}, runs above 50 ms {}, total/once {:?}",
        g.busy_median_downtime_ms,
        g.busy_largest_over_smallest,
        g.runs_above_50_ms,
        g.busy_total_over_vram_once
    );
}

pub fn run(a: GpuMigrateBenchArgs) -> ExitCode {
    let json = a.json;
    crate::bench::finish("gpu-migrate", json, bench(a), print_table)
}
