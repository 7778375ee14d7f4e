//! `godwit gpu ...`: the host's GPU manager from the command line.

use crate::cli::GpuCmd;
use crate::run::fail;
use godwit_gpu::manager::{GpuSpec, HostConfig, Placement};
use godwit_gpu::profile::{MODELS, PROFILES};
use godwit_gpu::sched::Policy;
use godwit_gpu::Manager;
use std::process::ExitCode;

const GIB: f64 = (1u64 << 30) as f64;

pub fn gpu(cmd: GpuCmd) -> ExitCode {
    match run(cmd) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

fn run(cmd: GpuCmd) -> Result<(), String> {
    match cmd {
        GpuCmd::Profiles { json } => {
            if json {
                let v = serde_json::json!({ "models": MODELS, "profiles": PROFILES });
                outln!("{}", serde_json::to_string_pretty(&v).expect("plain data"));
                return Ok(());
            }
            for m in MODELS {
                outln!(
                    "model {}: {:.0} GiB VRAM, one engine time-sliced among its VFs",
                    m.name,
                    m.vram as f64 / GIB
                );
            }
            outln!(
                "{:<10} {:>8} {:>14} {:>12}",
                "PROFILE",
                "VRAM",
                "MAX PER GPU",
                "FIXED SHARE"
            );
            for p in PROFILES {
                outln!(
                    "{:<10} {:>6.0}Gi {:>14} {:>11.1}%",
                    p.name,
                    p.framebuffer as f64 / GIB,
                    p.max_instances,
                    p.fixed_share() * 100.0
                );
            }
            Ok(())
        }
        GpuCmd::Status { json, dir } => {
            let m = Manager::open(&dir.dir()).map_err(|e| e.to_string())?;
            let st = m.status().map_err(|e| e.to_string())?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&st).expect("plain data"));
                return Ok(());
            }
            outln!(
                "GPU manager: {} (placement {:?})",
                dir.dir().display(),
                m.config().placement
            );
            for g in st {
                outln!(
                    "gpu{} {} policy={} profile={} VRAM {:.1}/{:.0} GiB allocated, {} VF(s)",
                    g.id,
                    g.model,
                    g.policy.name(),
                    g.profile.as_deref().unwrap_or("-"),
                    g.vram_allocated as f64 / GIB,
                    g.vram as f64 / GIB,
                    g.vfs.len()
                );
                if g.engine_owner_stuck {
                    outln!(
                        "  engine held by vf{} which is gone or stale: the next VF takes it \
                         over; `godwit gpu init` clears it when no VF is held",
                        g.engine_owner.unwrap_or_default()
                    );
                }
                for v in g.vfs {
                    outln!(
                        "  vf{} pid {} {}: {:.0} GiB at {:.0} GiB, {:.0} MiB resident, engine {:.1} ms ({:.1}%), {} commands, {} errors",
                        v.slot,
                        v.holder.pid,
                        v.holder.vm,
                        v.framebuffer as f64 / GIB,
                        v.vram_offset as f64 / GIB,
                        v.vram_resident as f64 / (1 << 20) as f64,
                        v.engine_ms,
                        v.engine_share * 100.0,
                        v.commands,
                        v.errors
                    );
                }
            }
            Ok(())
        }
        GpuCmd::Policy { gpu, policy, dir } => {
            let p = Policy::parse(&policy).ok_or_else(|| {
                format!("unknown policy {policy:?} (best-effort, equal-share, fixed-share)")
            })?;
            let mut m = Manager::open(&dir.dir()).map_err(|e| e.to_string())?;
            m.set_policy(gpu, p).map_err(|e| e.to_string())?;
            outln!("gpu{gpu}: {}", p.name());
            Ok(())
        }
        GpuCmd::Init {
            gpus,
            model,
            placement,
            policy,
            dir,
        } => {
            let placement = Placement::parse(&placement).ok_or_else(|| {
                format!("unknown placement {placement:?} (breadth-first, depth-first)")
            })?;
            let policy = Policy::parse(&policy).ok_or_else(|| {
                format!("unknown policy {policy:?} (best-effort, equal-share, fixed-share)")
            })?;
            let cfg = HostConfig {
                gpus: (0..gpus)
                    .map(|_| GpuSpec {
                        model: model.clone(),
                        policy,
                    })
                    .collect(),
                placement,
            };
            Manager::init(&dir.dir(), cfg).map_err(|e| e.to_string())?;
            outln!("{gpus} x {model}, {placement:?}, {}", policy.name());
            Ok(())
        }
    }
}
