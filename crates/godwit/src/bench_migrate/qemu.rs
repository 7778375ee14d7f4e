//! QEMU's side of `godwit bench migrate`: the same guest migrated by a QEMU binary in one
//! of its configurations (pre-copy, pre-copy with multifd, post-copy), over QMP.

use super::*;

/// How QEMU migrates in a side of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum QemuCfg {
    Precopy,
    /// Pre-copy with this many multifd channels.
    Multifd(u32),
    /// Switched to post-copy once its first pass is done.
    Postcopy,
}

#[allow(clippy::too_many_arguments)]
pub(super) fn qemu_run(
    dir: &Path,
    qemu: &str,
    image: &Path,
    mem: u64,
    w: &Workload,
    limit: u64,
    cfg: QemuCfg,
    setup: Setup,
) -> Result<Sample, String> {
    let prefault = setup.prefault;
    let postcopy = cfg == QemuCfg::Postcopy;
    let (src_log, dst_log) = (dir.join("q-src.log"), dir.join("q-dst.log"));
    let (src_qmp, dst_qmp) = (dir.join("q-src.qmp"), dir.join("q-dst.qmp"));
    for p in [&src_log, &dst_log, &src_qmp, &dst_qmp] {
        let _ = std::fs::remove_file(p);
    }
    let port = free_port()?;
    let spawn = |log: &Path, qmp: &Path, incoming: Option<u16>| {
        let mut c = qemu_guest(qemu, image, mem, &dirtier_args(w));
        c.arg("-serial").arg(format!("file:{}", log.display()));
        c.arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()));
        // The destination listens only once its capabilities are set (QEMU 10 wants
        // postcopy-preempt before the incoming side starts).
        if incoming.is_some() {
            c.arg("-incoming").arg("defer");
            if prefault {
                c.arg("-mem-prealloc");
            }
        }
        if setup.own_sessions {
            c = in_own_session(&c);
        }
        c.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        c.spawn().map_err(|e| format!("cannot start {qemu}: {e}"))
    };
    let mut procs = Procs(vec![
        spawn(&src_log, &src_qmp, None)?,
        spawn(&dst_log, &dst_qmp, Some(port))?,
    ]);
    let mut sq = Qmp::connect(&src_qmp)?;
    let mut dq = Qmp::connect(&dst_qmp)?;
    // Both answer QMP: each is QEMU by now, no longer `setsid`.
    if setup.own_sessions {
        own_groups(&procs.0.iter().map(|c| c.id()).collect::<Vec<_>>())?;
    }
    // Every capability set explicitly on both sides; auto-converge on, as godwit's.
    let caps = json!({"capabilities": [
        {"capability": "xbzrle", "state": false},
        {"capability": "auto-converge", "state": true},
        {"capability": "postcopy-ram", "state": postcopy},
        {"capability": "multifd", "state": matches!(cfg, QemuCfg::Multifd(_))},
        {"capability": "zero-blocks", "state": false},
        {"capability": "events", "state": false},
    ]});
    sq.cmd("migrate-set-capabilities", caps.clone())?;
    dq.cmd("migrate-set-capabilities", caps)?;
    if let QemuCfg::Multifd(n) = cfg {
        let p = json!({"multifd-channels": n});
        sq.cmd("migrate-set-parameters", p.clone())?;
        dq.cmd("migrate-set-parameters", p)?;
    }
    if postcopy {
        // Urgent pages on a channel of their own, where this QEMU has it (7.1 on).
        let preempt = json!({"capabilities": [{"capability": "postcopy-preempt", "state": true}]});
        if sq.cmd("migrate-set-capabilities", preempt.clone()).is_ok() {
            dq.cmd("migrate-set-capabilities", preempt)?;
        }
    }
    dq.cmd(
        "migrate-incoming",
        json!({"uri": format!("tcp:127.0.0.1:{port}")}),
    )?;
    sq.cmd(
        "migrate-set-parameters",
        json!({"max-bandwidth": 100u64 << 30, "downtime-limit": limit}),
    )?;
    wait_for("the QEMU source guest", STEADY_TIMEOUT, || {
        alive(&mut procs).then(|| steady(&src_log))
    })?;
    // Started source first, then the destination.
    let cpu = crate::guest_cpu::GuestCpu::watch(
        ["source", "destination"]
            .into_iter()
            .zip(procs.0.iter().map(|c| c.id()))
            .collect(),
    );
    let started = Instant::now();
    sq.cmd("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}))?;
    let end = Instant::now() + MIGRATE_TIMEOUT;
    let mut switched = !postcopy;
    // QEMU shows its throttle only while it migrates, not once it has completed.
    let mut throttle = 0;
    let (info, wall_ms) = loop {
        let v = sq.cmd("query-migrate", json!({}))?;
        throttle = throttle.max(v["cpu-throttle-percentage"].as_u64().unwrap_or(0));
        // Post-copy once the first pass is done (its second dirty sync).
        if !switched && v["ram"]["dirty-sync-count"].as_u64().unwrap_or(0) >= 2 {
            sq.cmd("migrate-start-postcopy", json!({}))?;
            switched = true;
        }
        match v["status"].as_str() {
            Some("completed") => break (v, started.elapsed().as_secs_f64() * 1e3),
            Some("failed") | Some("cancelled") => return Err(format!("QEMU migration: {v}")),
            _ if Instant::now() > end => return Err("QEMU migration timed out".into()),
            _ => std::thread::sleep(Duration::from_millis(5)),
        }
    };
    let seen = cpu.share();
    drop(sq);
    let mut src = procs.0.remove(0);
    let _ = src.kill();
    let _ = src.wait();
    let gap = guest_gap(&dst_log, &mut procs)?;
    drop(dq);
    Ok(Sample {
        // QEMU 7.2 sometimes reports 0 for a post-copy migration: then the time it
        // took as seen from here (polled every 5 ms).
        total_ms: info["total-time"]
            .as_f64()
            .filter(|t| *t > 0.0)
            .unwrap_or(wall_ms),
        downtime_ms: info["downtime"].as_f64().unwrap_or(f64::NAN),
        guest_gap_ms: gap,
        bytes: info["ram"]["total"]
            .as_u64()
            .map(|_| info["ram"]["transferred"].as_u64().unwrap_or(0))
            .unwrap_or(0),
        rounds: info["ram"]["dirty-sync-count"].as_u64().map(|n| n as u32),
        throttled: Some(throttle > 0),
        max_throttle_pct: Some(throttle as u32),
        guest_cpu: seen.guest_cpu,
        threads: seen.threads,
        dirty_log_us: None,
        last_dirty_log_us: None,
        ring_full_exits: None,
        ran: Some(if postcopy { "postcopy" } else { "precopy" }.into()),
        postcopy_window_ms: None,
        remote_faults: None,
        fault_latency_us: None,
        prepaged_pages: None,
        round_ms_mib: vec![],
        pause_parts: None,
    })
}
