//! `godwit bench gpu`: the virtual GPU measured from inside a guest (copy bandwidth, kernel
//! throughput, submission-to-fence latency), the same operations run natively on the host
//! in the same run as the reference (there is no QEMU peer for a virtual GPU), and the
//! engine share two busy VFs get under each scheduling policy.

use crate::bench::{summary, Summary};
use crate::cli::GpuBenchArgs;
use godwit_gpu::manager::{GpuSpec, HostConfig, Placement};
use godwit_gpu::sched::Policy;
use godwit_gpu::Manager;
use serde::Serialize;
use serde_json::{json, Map, Value};
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

const PROFILE: &str = "GW8-2C";

#[derive(Serialize)]
struct Measure {
    unit: String,
    #[serde(flatten)]
    s: Summary,
}

fn exe() -> Result<std::path::PathBuf, String> {
    std::env::current_exe().map_err(|e| e.to_string())
}

fn vm(dir: &Path, guest_args: &[String]) -> Result<Command, String> {
    let mut c = Command::new(exe()?);
    c.args(["run", "--memory", "512", "--gpu", PROFILE, "--gpu-dir"])
        .arg(dir)
        .args(["gpu-bench", "--"])
        .args(guest_args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    Ok(c)
}

/// Parses `bench: NAME unit=U min=A median=B max=C` lines.
fn parse(out: &str) -> Map<String, Value> {
    let mut m = Map::new();
    for l in out.lines() {
        let Some(rest) = l.strip_prefix("bench: ") else {
            continue;
        };
        let mut it = rest.split_whitespace();
        let Some(name) = it.next() else { continue };
        let kv: Map<String, Value> = it
            .filter_map(|w| w.split_once('='))
            .map(|(k, v)| {
                (
                    k.to_string(),
                    v.parse::<f64>()
                        .map(Value::from)
                        .unwrap_or_else(|_| Value::from(v)),
                )
            })
            .collect();
        m.insert(name.to_string(), Value::Object(kv));
    }
    m
}

fn host_baseline(reps: usize) -> Map<String, Value> {
    let bytes = 64usize << 20;
    let src: Vec<u8> = (0..bytes).map(|i| i as u8).collect();
    let mut dst = vec![0u8; bytes];
    let times = |f: &mut dyn FnMut()| -> Vec<f64> {
        (0..reps)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .collect()
    };
    let mut m = Map::new();
    let t = times(&mut || dst.copy_from_slice(std::hint::black_box(&src)));
    let rate = |t: &[f64], amount: f64| summary(&t.iter().map(|s| amount / s).collect::<Vec<_>>());
    m.insert(
        "memcpy".into(),
        json!(Measure {
            unit: "MiB/s".into(),
            s: rate(&t, 64.0)
        }),
    );
    let n = 256usize;
    let a = vec![1.0f32; n * n];
    let b = vec![1.0f32; n * n];
    let mut c = vec![1.0f32; n * n];
    let mut tmp = Vec::new();
    let t = times(&mut || {
        for (i, row) in c.chunks_exact_mut(n).enumerate() {
            godwit_gpu::kernels::sgemm_piece(
                &a[i * n..(i + 1) * n],
                std::hint::black_box(&b),
                n,
                row,
                1.0,
                1.0,
                &mut tmp,
            )
        }
    });
    m.insert(
        "sgemm_256".into(),
        json!(Measure {
            unit: "GFLOP/s".into(),
            s: rate(&t, 2.0 * (n * n * n) as f64 / 1e9)
        }),
    );
    let elems = bytes / 8;
    let x = vec![1.0f32; elems];
    let mut y = vec![1.0f32; elems];
    let t = times(&mut || godwit_gpu::kernels::axpy(1.0, std::hint::black_box(&x), &mut y));
    m.insert(
        "axpy".into(),
        json!(Measure {
            unit: "GB/s".into(),
            s: rate(&t, (elems * 12) as f64 / 1e9)
        }),
    );
    m
}

/// Two busy VMs on one GPU under `policy`: each VF's share of wall-clock engine time.
fn shares(dir: &Path, policy: Policy, seconds: u64) -> Result<Value, String> {
    let mut m = Manager::open(dir).map_err(|e| e.to_string())?;
    m.set_policy(0, policy).map_err(|e| e.to_string())?;
    let args = vec!["mode=busy".to_string(), format!("seconds={}", seconds + 3)];
    let mut kids = Vec::new();
    for _ in 0..2 {
        kids.push(crate::bench_gpu::Kid(
            vm(dir, &args)?.spawn().map_err(|e| e.to_string())?,
        ));
    }
    // Wait until both VFs run, then measure a window in the middle.
    let end = Instant::now() + Duration::from_secs(30);
    let slots = loop {
        let st = m.status().map_err(|e| e.to_string())?;
        let live: Vec<usize> = st[0]
            .vfs
            .iter()
            .filter(|v| v.engine_ms > 0.0)
            .map(|v| v.slot)
            .collect();
        if live.len() == 2 {
            break live;
        }
        if Instant::now() > end {
            return Err("the two busy VMs did not both start".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    std::thread::sleep(Duration::from_millis(500));
    let (t1, e1) = (Instant::now(), m.engine_ns(0).map_err(|e| e.to_string())?);
    std::thread::sleep(Duration::from_secs(seconds));
    let (t2, e2) = (Instant::now(), m.engine_ns(0).map_err(|e| e.to_string())?);
    let wall = (t2 - t1).as_nanos() as f64;
    let vfs: Vec<Value> = slots
        .iter()
        .map(|&s| json!({"slot": s, "share": (e2[s] - e1[s]) as f64 / wall}))
        .collect();
    let total: f64 = slots.iter().map(|&s| (e2[s] - e1[s]) as f64 / wall).sum();
    for k in kids.iter_mut() {
        let _ = k.0.wait();
    }
    Ok(json!({
        "policy": policy.name(),
        "profile": PROFILE,
        "window_s": wall / 1e9,
        "vfs": vfs,
        "engine_busy": total,
        "expected_share": match policy {
            Policy::BestEffort => "all of the engine, split evenly between the two",
            Policy::EqualShare => "1/2 each (2 VFs attached)",
            Policy::FixedShare => "1/4 each (GW8-2C: 4 per GPU), the rest idle",
        },
    }))
}

/// Kills a benchmark VM on drop.
struct Kid(std::process::Child);
impl Drop for Kid {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn bench(a: &GpuBenchArgs) -> Result<Value, String> {
    let tmp = std::env::temp_dir().join(format!("godwit-bench-gpu-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let cfg = HostConfig {
        gpus: vec![GpuSpec {
            model: "GW-8".into(),
            policy: Policy::BestEffort,
        }],
        placement: Placement::BreadthFirst,
    };
    Manager::init(&tmp, cfg).map_err(|e| e.to_string())?;
    let result = (|| {
        let reps = a.runs.clamp(1, 64);
        let out = vm(&tmp, &[format!("reps={reps}"), "mib=64".into()])?
            .output()
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            return Err(format!(
                "the benchmark guest failed: {}\n{text}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let guest = parse(&text);
        let host = host_baseline(reps);
        let med = |m: &Map<String, Value>, k: &str| {
            m.get(k)
                .and_then(|v| v["median"].as_f64())
                .unwrap_or(f64::NAN)
        };
        let ratios = json!({
            "copy_ram_to_vram_over_host_memcpy": med(&guest, "copy_ram_to_vram") / med(&host, "memcpy"),
            "copy_vram_to_ram_over_host_memcpy": med(&guest, "copy_vram_to_ram") / med(&host, "memcpy"),
            "copy_vram_to_vram_over_host_memcpy": med(&guest, "copy_vram_to_vram") / med(&host, "memcpy"),
            "sgemm_over_host": med(&guest, "sgemm_256") / med(&host, "sgemm_256"),
            "axpy_over_host": med(&guest, "axpy") / med(&host, "axpy"),
        });
        let mut sh = Vec::new();
        if !a.no_shares {
            for p in Policy::ALL {
                sh.push(shares(&tmp, p, a.seconds)?);
            }
        }
        Ok(json!({
            "profile": PROFILE,
            "backend": "cpu",
            "reps": reps,
            "guest": guest,
            "host_native": host,
            "median_ratios_guest_over_host": ratios,
            "shares": sh,
        }))
    })();
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

pub fn run(a: GpuBenchArgs) -> ExitCode {
    crate::bench::finish("gpu", a.json, bench(&a), print_table)
}

fn print_table(v: &Value) {
    outln!("virtual GPU ({PROFILE}, cpu backend), measured in the guest; host-native reference in the same run");
    outln!(
        "{:<28} {:>8} {:>10} {:>10} {:>10} {:>12}",
        "",
        "unit",
        "min",
        "median",
        "max",
        "host median"
    );
    let host = &v["host_native"];
    for (k, base) in [
        ("copy_ram_to_vram", "memcpy"),
        ("copy_vram_to_ram", "memcpy"),
        ("copy_vram_to_vram", "memcpy"),
        ("sgemm_256", "sgemm_256"),
        ("axpy", "axpy"),
        ("submit_to_fence_latency", ""),
        ("submit_to_fence_latency_irq", ""),
        ("fill_4m_wait_fence", ""),
        ("fill_4m_wait_irq", ""),
    ] {
        let g = &v["guest"][k];
        outln!(
            "{:<28} {:>8} {:>10.1} {:>10.1} {:>10.1} {:>12}",
            k,
            g["unit"].as_str().unwrap_or(""),
            g["min"].as_f64().unwrap_or(f64::NAN),
            g["median"].as_f64().unwrap_or(f64::NAN),
            g["max"].as_f64().unwrap_or(f64::NAN),
            host[base]["median"]
                .as_f64()
                .map(|m| format!("{m:.1}"))
                .unwrap_or_default()
        );
    }
    for s in v["shares"].as_array().into_iter().flatten() {
        let parts: Vec<String> = s["vfs"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|x| {
                format!(
                    "vf{} {:.1}%",
                    x["slot"],
                    x["share"].as_f64().unwrap_or(0.0) * 100.0
                )
            })
            .collect();
        outln!(
            "two busy VFs, {:<12} {} (engine busy {:.1}%; expected: {})",
            s["policy"].as_str().unwrap_or(""),
            parts.join(", "),
            s["engine_busy"].as_f64().unwrap_or(0.0) * 100.0,
            s["expected_share"].as_str().unwrap_or("")
        );
    }
}
