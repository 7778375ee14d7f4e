//! Live migration of VMs with a virtual GPU function, between real godwit processes:
//! VRAM, GPU page tables, the ring, fences, interrupts, DMA into guest RAM and the
//! command in flight all arrive, each guest checks its own results, and every failure
//! leaves the source VM and its GPU running.

mod common;

use common::gpuhost::*;
use common::mig::*;
use common::*;
use serde_json::Value;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(90);

/// `run` arguments for a VM with a `profile` function from host `g`.
fn gpu_vm<'a>(g: &'a str, profile: &'a str, guest: &'a str, args: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["--gpu", profile, "--gpu-dir", g, guest, "--"];
    v.extend_from_slice(args);
    v
}

fn completed(out: &std::process::Output, r: &Value) {
    assert!(out.status.success(), "{}\n{}", stdout(out), stderr(out));
    assert_eq!(r["status"], "completed", "{r}");
}

/// What a report says a component did, summed over the rounds: `extra` counters.
fn round_extra(r: &Value, component: &str, key: &str) -> u64 {
    r["rounds"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|x| x["components"][component]["extra"][key].as_u64())
        .sum()
}

#[test]
fn gpu_train_migrated_mid_run_ends_with_the_reference_answer() {
    if !kvm_available() {
        return;
    }
    let d = host("gm-train", 1, &[]);
    let g = gpu_dir(&d);
    let mut src = source(&d, "src", &gpu_vm(&g, "GW8-1C", "gpu-train", TRAIN));
    let (mut dst, addr) = destination(&d, "dst", &["--gpu-dir", &g]);
    wait_log(&src.log, "iteration 2000 ");
    let (out, r) = migrate(&src, &addr, &["--downtime-ms", "50"]);
    completed(&out, &r);
    assert_eq!(
        r["sections"],
        serde_json::json!(["vcpus", "gpu", "ram", "platform"])
    );
    assert!(
        r["bytes"]["components"]["gpu"]["pages_sent"]
            .as_u64()
            .unwrap()
            > 0,
        "{r}"
    );
    assert!(
        r["bytes"]["components"]["gpu"]["state"].as_u64().unwrap() > 0,
        "{r}"
    );
    let parts = &r["downtime"]["components"];
    assert!(parts["vcpus"]["stop_ms"].as_f64().is_some(), "{r}");
    assert!(parts["gpu"]["stop_ms"].as_f64().is_some(), "{r}");
    assert_eq!(exit_code(&mut src, LIMIT), 0, "{}", read(&src.err));
    assert_eq!(exit_code(&mut dst, LIMIT), 0, "{}", read(&dst.err));
    // Training went on where it was: the destination finishes with exactly the answer
    // of an uninterrupted run (recomputed here), and never started over.
    let log = read(&dst.log);
    assert_trained(&log);
    assert!(!log.contains("starting"), "{log}");
    // Both VFs are free again.
    assert_eq!(status(&d)[0]["vfs"].as_array().unwrap().len(), 0);
}

/// gpu-verify waits on the VF's interrupts (MSI + halt) and checks every result; it is
/// moved four times between VFs of one host, over TCP, a Unix socket and 3 connections.
#[test]
fn gpu_verify_passes_through_migrations_there_and_back() {
    if !kvm_available() {
        return;
    }
    let d = host("gm-verify", 1, &[]);
    let g = gpu_dir(&d);
    let args = ["rounds=0", "mib=2", "irq=200", "report-every=5"];
    let mut cur = source(&d, "hop0", &gpu_vm(&g, "GW8-1C", "gpu-verify", &args));
    let mut logs = vec![cur.log.clone()];
    wait_log(&cur.log, "round 5 ok");
    for hop in 1..=4 {
        let (mut next, mut addr) = destination(&d, &format!("hop{hop}"), &["--gpu-dir", &g]);
        let extra: Vec<&str> = match hop {
            3 => vec!["--connections", "3"],
            _ => vec![],
        };
        if hop == 2 {
            // Over a Unix socket instead.
            drop(next);
            let usock = d.path("mig.sock");
            let (log, err, sock) = (d.path("hop2.log"), d.path("hop2.err"), d.path("hop2.sock"));
            let a: Vec<String> = [
                "run",
                "--incoming",
                &format!("unix:{}", usock.display()),
                "--gpu-dir",
                &g,
                "--api-socket",
                sock.to_str().unwrap(),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let proc = spawn(&a, &log, &err);
            wait_for(LIMIT, || usock.exists().then_some(())).unwrap();
            next = Vm {
                proc,
                log,
                err,
                sock,
            };
            addr = format!("unix:{}", usock.display());
        }
        let (out, r) = migrate(&cur, &addr, &extra);
        completed(&out, &r);
        assert_eq!(
            exit_code(&mut cur, LIMIT),
            0,
            "hop {hop}: {}",
            read(&cur.err)
        );
        cur = next;
        logs.push(cur.log.clone());
        // It goes on checking, woken by interrupts, on the new VF.
        gains(&cur.log, "ok checks", 3);
    }
    run(
        &["shutdown", "--api-socket", cur.sock.to_str().unwrap()],
        LIMIT,
    );
    assert_eq!(exit_code(&mut cur, LIMIT), 0);
    let all: String = logs.iter().map(|l| read(l)).collect();
    assert!(
        !all.contains("MISMATCH") && !all.contains("GPU error"),
        "{all}"
    );
    // One run of rounds across the five processes, none repeated or skipped.
    let rounds: Vec<u64> = all
        .lines()
        .filter_map(|l| {
            l.strip_prefix("gpu-verify: round ")?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .collect();
    // The first report before the hops, and at least three after each of the four.
    assert!(rounds.len() >= 13, "{all}");
    for w in rounds.windows(2) {
        assert_eq!(w[1], w[0] + 5, "{rounds:?}");
    }
}

/// Every way a guest and its GPU write memory, migrated while it happens: stores
/// through the aperture (KVM's log of the aperture slot, bitmap and ring), engine
/// fills of VRAM, GPU DMA into RAM pages the CPU never writes, and page-table updates.
/// The guest checks all of it after each hop.
#[test]
fn a_vram_dirtier_verifies_every_kind_of_write_after_migration() {
    if !kvm_available() {
        return;
    }
    let d = host("gm-dirtier", 1, &[]);
    let g = gpu_dir(&d);
    let args = DIRTIER_ARGS;
    let src = source(&d, "src", &gpu_vm(&g, "GW8-1C", "gpu-dirtier", &args));
    wait_log(&src.log, "verify ok");
    // To a host that tracks writes with the dirty ring, and on to one with the bitmap;
    // the second hop leaves page data to the transport, so that VRAM and RAM go from
    // memory to both connections (the second one's by its writer thread).
    let mut cur = src;
    for (hop, mode, checks) in [(1, "ring:512", "crc"), (2, "bitmap", "transport")] {
        let (next, addr) = destination(
            &d,
            &format!("hop{hop}"),
            &["--gpu-dir", &g, "--dirty-log", mode],
        );
        let (out, r) = migrate(
            &cur,
            &addr,
            &["--downtime-ms", "50", "--page-checks", checks],
        );
        completed(&out, &r);
        assert_eq!(r["page_checks"], checks, "{r}");
        assert!(r["round_count"].as_u64().unwrap() >= 2, "{r}");
        // Each kind of write was seen while the VM ran.
        assert!(round_extra(&r, "gpu", "aperture_pages") > 0, "{r}");
        assert!(round_extra(&r, "gpu", "engine_pages") > 0, "{r}");
        assert!(round_extra(&r, "ram", "dma_pages") > 0, "{r}");
        dirtier_arrived(&mut cur, &next, hop);
        cur = next;
    }
    dirtier_shut_down(cur);
}

/// Stop-and-copy for the GPU (`--gpu-precopy off`): the VF computes on through
/// pre-copy unwatched and all its VRAM moves inside the pause, while RAM still moves in
/// rounds with the GPU's DMA merged in. The guest verifies every kind of write after.
#[test]
fn stop_and_copy_moves_all_vram_inside_the_pause() {
    if !kvm_available() {
        return;
    }
    let d = host("gm-stopcopy", 1, &[]);
    let g = gpu_dir(&d);
    let args = DIRTIER_ARGS;
    let mut src = source(&d, "src", &gpu_vm(&g, "GW8-1C", "gpu-dirtier", &args));
    wait_log(&src.log, "verify ok");
    let (mut dst, addr) = destination(&d, "dst", &["--gpu-dir", &g]);
    let (out, r) = migrate(
        &src,
        &addr,
        &["--downtime-ms", "50", "--gpu-precopy", "off"],
    );
    completed(&out, &r);
    assert_eq!(r["stop_copy"], serde_json::json!(["gpu"]), "{r}");
    // Nothing of the GPU moved in the rounds; all its written VRAM (both 16 MiB
    // regions, at least) in the pause.
    for round in r["rounds"].as_array().unwrap() {
        assert!(round["components"]["gpu"].is_null(), "{round}");
    }
    assert!(round_extra(&r, "ram", "dma_pages") > 0, "{r}");
    let last = r["downtime"]["components"]["gpu"]["final_pages"]
        .as_u64()
        .unwrap();
    assert!(last >= 2 * 4096, "{r}");
    assert_eq!(exit_code(&mut src, LIMIT), 0, "{}", read(&src.err));
    gains(&dst.log, "verify ok", 2);
    run(
        &["shutdown", "--api-socket", dst.sock.to_str().unwrap()],
        LIMIT,
    );
    assert_eq!(exit_code(&mut dst, LIMIT), 0);
    assert!(!read(&dst.log).contains("FAILED"), "{}", read(&dst.log));
}

/// The cap a migration puts on the source VF's engine, as the GPU manager shows it.
fn engine_cap(d: &TempDir) -> u64 {
    status(d)
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["vfs"].as_array().unwrap().clone())
        .map(|v| v["engine_cap_pct"].as_u64().unwrap())
        .max()
        .unwrap_or(0)
}

/// A GPU that writes VRAM faster than the link carries it: holding the vCPUs back does
/// not slow an engine, so auto-converge holds the VF's engine back first; the cap goes
/// when the migration ends, cancelled or completed, and the guest verifies throughout.
#[test]
fn a_gpu_that_outruns_the_link_is_held_back_then_let_go() {
    if !kvm_available() {
        return;
    }
    let d = host("gm-throttle", 1, &[]);
    let g = gpu_dir(&d);
    let args = ["rate=0", "seconds=0", "verify-every=1", "report-every=250"];
    let src = source(&d, "src", &gpu_vm(&g, "GW8-1C", "gpu-dirtier", &args));
    wait_log(&src.log, "verify ok");
    // 8 MiB/s: far below what it writes. Cancelled once the engine is held back.
    let (mut dst, addr) = destination(&d, "cancelled", &["--gpu-dir", &g]);
    let m = slow_migration(&src, addr);
    wait_for(LIMIT, || (engine_cap(&d) > 0).then_some(())).expect("the engine was never held back");
    let o = run(
        &["migrate-cancel", "--api-socket", src.sock.to_str().unwrap()],
        LIMIT,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let r: Value = serde_json::from_str(&stdout(&m.join().unwrap())).unwrap();
    assert_eq!(r["status"], "cancelled", "{r}");
    assert!(r["throttle"]["gpu"]["max_pct"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(engine_cap(&d), 0);
    assert_eq!(exit_code(&mut dst, LIMIT), 1);
    gains(&src.log, "verify ok", 2);
    // Completed: held back as far as it took, let go on the destination's side too.
    let (mut dst, addr) = destination(&d, "dst", &["--gpu-dir", &g]);
    let (out, r) = migrate(
        &src,
        &addr,
        &["--downtime-ms", "50", "--max-bandwidth", "32M"],
    );
    completed(&out, &r);
    let gpu = &r["throttle"]["gpu"];
    assert!(gpu["max_pct"].as_u64().unwrap() > 0, "{r}");
    // Still held back when it stopped: let go before the pause, the engine would write
    // VRAM at full speed until its stop, pages the last round's estimate never counted.
    let stop = &r["downtime"]["components"]["gpu"]["extra"];
    assert!(stop["held_at_stop_pct"].as_u64().unwrap() > 0, "{r}");
    assert!(gpu["ms"].as_f64().unwrap() > 0.0, "{r}");
    assert!(
        r["rounds"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["throttle"]["gpu"].as_u64().unwrap_or(0) > 0),
        "{r}"
    );
    assert_eq!(engine_cap(&d), 0);
    gains(&dst.log, "verify ok", 2);
    run(
        &["shutdown", "--api-socket", dst.sock.to_str().unwrap()],
        LIMIT,
    );
    assert_eq!(exit_code(&mut dst, LIMIT), 0);
    assert!(!read(&dst.log).contains("FAILED"), "{}", read(&dst.log));
}

#[test]
fn migration_during_one_long_kernel_resumes_it_exactly() {
    if !kvm_available() {
        return;
    }
    let d = host("gm-long", 1, &[]);
    let g = gpu_dir(&d);
    // One SGEMM of seconds (longer on a slower host, never shorter), checked bit for bit.
    let mut src = source(&d, "src", &gpu_vm(&g, "GW8-1C", "gpu-long", &["k=512"]));
    let (mut dst, addr) = destination(&d, "dst", &["--gpu-dir", &g]);
    wait_log(&src.log, "submitted sgemm");
    std::thread::sleep(Duration::from_millis(300));
    let (out, r) = migrate(&src, &addr, &["--downtime-ms", "50"]);
    completed(&out, &r);
    // The engine was stopped mid-command at a chunk boundary, and the command moved.
    assert_eq!(
        r["downtime"]["components"]["gpu"]["extra"]["preempted"], 1,
        "{r}"
    );
    assert_eq!(exit_code(&mut src, LIMIT), 0);
    assert_eq!(exit_code(&mut dst, LIMIT), 0, "{}", read(&dst.log));
    assert!(
        read(&dst.log).contains("gpu-long: ok"),
        "{}",
        read(&dst.log)
    );
}

#[test]
fn two_vms_on_one_gpu_one_migrated_the_other_undisturbed() {
    if !kvm_available() {
        return;
    }
    let d = host("gm-two", 1, &[]);
    let g = gpu_dir(&d);
    let args = ["rounds=0", "mib=2", "report-every=10"];
    let a = source(&d, "a", &gpu_vm(&g, "GW8-1C", "gpu-verify", &args));
    let b = source(&d, "b", &gpu_vm(&g, "GW8-1C", "gpu-verify", &args));
    wait_log(&a.log, "round 10 ok");
    wait_log(&b.log, "round 10 ok");
    let (mut dst, addr) = destination(&d, "dst", &["--gpu-dir", &g]);
    let mut a = a;
    let (out, r) = migrate(&a, &addr, &[]);
    completed(&out, &r);
    assert_eq!(exit_code(&mut a, LIMIT), 0);
    // Both go on computing and checking on the one GPU.
    gains(&b.log, "ok checks", 3);
    gains(&dst.log, "ok checks", 3);
    let vfs = status(&d)[0]["vfs"].as_array().unwrap().len();
    assert_eq!(vfs, 2, "the source's VF was not given back");
    for vm in [&b, &dst] {
        run(
            &["shutdown", "--api-socket", vm.sock.to_str().unwrap()],
            LIMIT,
        );
    }
    let _ = exit_code(&mut dst, LIMIT);
    for l in [&a.log, &b.log, &dst.log] {
        assert!(!read(l).contains("MISMATCH"), "{}", read(l));
    }
}

/// A destination that cannot take the VM (no VF of its profile free) refuses it before
/// anything moves, and the source's guest and GPU carry on.
#[test]
fn refused_destinations_leave_the_source_running_and_verifying() {
    if !kvm_available() {
        return;
    }
    let d = host("gm-refuse", 2, &[]);
    let g = gpu_dir(&d);
    let args = ["rounds=0", "mib=1", "report-every=10"];
    let big = source(&d, "big", &gpu_vm(&g, "GW8-4C", "gpu-verify", &args));
    // `big` leases GPU 0 before `small` asks: its API socket is there before its VM
    // (and its lease), and a `small` that leased first would take GPU 0 itself (a
    // loaded CI host once did), leaving room there for the pinned GW8-1C below.
    wait_log(&big.log, "round 10 ok");
    let small = source(&d, "small", &gpu_vm(&g, "GW8-1C", "gpu-verify", &args));
    // Another host, whose one GPU runs two GW8-4C VMs: full for that profile, and
    // busy with another profile for GW8-1C.
    let other = host("gm-refuse-other", 1, &[]);
    let og = gpu_dir(&other);
    let hb = ["period=50", "count=0"];
    let fill: Vec<Vm> = (0..2)
        .map(|i| {
            source(
                &other,
                &format!("fill{i}"),
                &gpu_vm(&og, "GW8-4C", "heartbeat", &hb),
            )
        })
        .collect();
    for f in &fill {
        wait_log(&f.log, "seq=");
    }
    for (src, want) in [
        (&big, "GPU 0 is full (2 of 2)"),
        (&small, "GPU 0 runs GW8-4C VFs"),
    ] {
        wait_log(&src.log, "round 10 ok");
        let (mut dst, addr) = destination(&other, "dst", &["--gpu-dir", &og]);
        let (out, r) = migrate(src, &addr, &[]);
        assert_eq!(out.status.code(), Some(1), "{r}");
        assert_eq!(r["status"], "failed");
        assert_eq!(r["source_running"], true);
        assert_eq!(r["error_kind"], "refused", "{r}");
        assert!(r["error"].as_str().unwrap().contains(want), "{r}");
        assert_eq!(exit_code(&mut dst, LIMIT), 1);
        assert!(read(&dst.err).contains(want), "{}", read(&dst.err));
        gains(&src.log, "ok checks", 3);
        assert!(!read(&src.log).contains("MISMATCH"), "{}", read(&src.log));
    }
    // A destination told which GPU to lease on (a manager's scheduler chose it) takes
    // that GPU or refuses, never another: on this host GPU 0 runs `big`'s GW8-4C VF,
    // and GPU 1 (where `small` runs) would have room for a GW8-1C one.
    let (mut dst, addr) = destination(&d, "pinned", &["--gpu-dir", &g, "--gpu-index", "0"]);
    let (out, r) = migrate(&small, &addr, &[]);
    assert_eq!(out.status.code(), Some(1), "{r}");
    assert_eq!(r["error_kind"], "refused", "{r}");
    let e = r["error"].as_str().unwrap();
    assert!(
        e.contains("GPU 0 runs GW8-4C VFs") && !e.contains("GPU 1"),
        "{r}"
    );
    assert_eq!(exit_code(&mut dst, LIMIT), 1);
    gains(&small.log, "ok checks", 3);
}

/// The pre-copy failure cases, with a GPU computing throughout: the source VM and its
/// GPU run on and their memory (VRAM, DMA pages, page tables) verifies afterwards.
#[test]
fn every_failure_leaves_the_source_vm_and_its_gpu_running() {
    if !kvm_available() {
        return;
    }
    let d = host("gm-fail", 1, &[]);
    let g = gpu_dir(&d);
    let args = [
        "aperture=8",
        "engine=8",
        "dma=2",
        "rate=16",
        "seconds=0",
        "verify-every=1",
        "report-every=500",
    ];
    let mut src = source(&d, "src", &gpu_vm(&g, "GW8-1C", "gpu-dirtier", &args));
    wait_log(&src.log, "verify ok");
    let runs_on = |src: &Vm, what: &str| {
        assert_eq!(info(src)["state"], "running", "{what}: {}", read(&src.err));
        gains(&src.log, "verify ok", 2);
        assert!(
            !read(&src.log).contains("FAILED"),
            "{what}: {}",
            read(&src.log)
        );
    };
    // The destination killed mid-stream.
    let (mut dst, addr) = destination(&d, "killed", &["--gpu-dir", &g]);
    let m = slow_migration(&src, addr);
    std::thread::sleep(Duration::from_millis(1500));
    let _ = dst.proc.0.kill();
    let out = m.join().unwrap();
    let r: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(
        (r["status"].as_str(), r["source_running"].as_bool()),
        (Some("failed"), Some(true)),
        "{r}"
    );
    runs_on(&src, "killed");
    // The link cut, and a frame damaged, by a man in the middle.
    for (i, (how, keep)) in [("cut", 4 << 20), ("flip", 6 << 20)]
        .into_iter()
        .enumerate()
    {
        let (mut dst, addr) = destination(&d, &format!("mitm{i}"), &["--gpu-dir", &g]);
        let via = proxy(addr, keep, how);
        let (out, r) = migrate(&src, &via, &[]);
        assert_eq!(out.status.code(), Some(1), "{how}: {r}");
        assert_eq!(r["source_running"], true, "{how}");
        assert_eq!(exit_code(&mut dst, LIMIT), 1, "{how}");
        assert!(!read(&dst.err).contains("panicked"));
        runs_on(&src, how);
    }
    // Cancelled mid-way.
    let (mut dst, addr) = destination(&d, "cancelled", &["--gpu-dir", &g]);
    let m = slow_migration(&src, addr);
    wait_for(LIMIT, || {
        let (c, b) = godwit_vmm::api::call(&src.sock, "GET", "vm.migration").ok()?;
        let v: Value = serde_json::from_str(&b).ok()?;
        // This migration's progress, not what the last one left.
        let p = &v["progress"];
        (c == 200
            && v["active"] == true
            && p["phase"] == "precopy"
            && p["bytes_sent"].as_u64()? > 0)
            .then_some(())
    })
    .expect("no progress");
    let o = run(
        &["migrate-cancel", "--api-socket", src.sock.to_str().unwrap()],
        LIMIT,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let r: Value = serde_json::from_str(&stdout(&m.join().unwrap())).unwrap();
    assert_eq!(r["status"], "cancelled", "{r}");
    assert_eq!(exit_code(&mut dst, LIMIT), 1);
    runs_on(&src, "cancelled");
    // A destination that takes everything and never confirms.
    let (addr, fake) = unconfirming_destination();
    let (out, r) = migrate(&src, &addr, &[]);
    fake.join().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(r["source_running"], true, "{r}");
    runs_on(&src, "unconfirmed");
    run(
        &["shutdown", "--api-socket", src.sock.to_str().unwrap()],
        LIMIT,
    );
    assert_eq!(exit_code(&mut src, LIMIT), 0);
}

/// A snapshot of a GPU VM holds its VF (state and VRAM) and restores on a host that
/// offers the same profile; one that cannot is refused.
#[test]
fn a_snapshot_with_a_gpu_restores_on_a_host_with_that_profile() {
    if !kvm_available() {
        return;
    }
    let d = host("gm-snap", 1, &[]);
    let g = gpu_dir(&d);
    let snap = d.path("vm.snap");
    // Enough rounds left after the tenth that the guest cannot end during the snapshot
    // (its pre-copy rounds to a file take a few hundred ms).
    let args = ["rounds=400", "mib=2", "report-every=5"];
    let mut src = source(&d, "src", &gpu_vm(&g, "GW8-2C", "gpu-verify", &args));
    wait_log(&src.log, "round 10 ok");
    let (out, r) = migrate(&src, &format!("file:{}", snap.display()), &[]);
    completed(&out, &r);
    assert_eq!(exit_code(&mut src, LIMIT), 0);
    // Another host, with the profile free.
    let other = host("gm-snap-other", 1, &[]);
    let og = gpu_dir(&other);
    let o = run(
        &[
            "run",
            "--incoming",
            &format!("file:{}", snap.display()),
            "--gpu-dir",
            &og,
            "--console",
            "stdout",
        ],
        LIMIT,
    );
    assert!(o.status.success(), "{}\n{}", stdout(&o), stderr(&o));
    let all = read(&src.log) + &stdout(&o);
    assert!(
        all.contains("done rounds=400 checks=4800 errors=0"),
        "{all}"
    );
    assert!(!stdout(&o).contains("starting"), "restored, not booted");
    // A host whose GPU runs another profile refuses it.
    let busy = source(
        &other,
        "busy",
        &gpu_vm(&og, "GW8-4C", "heartbeat", &["count=0"]),
    );
    wait_log(&busy.log, "seq=");
    let o = run(
        &[
            "run",
            "--incoming",
            &format!("file:{}", snap.display()),
            "--gpu-dir",
            &og,
        ],
        LIMIT,
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("runs GW8-4C VFs"), "{}", stderr(&o));
}

/// `vm.pause` stops the GPU as well as the vCPUs: no engine time passes while paused,
/// even in the middle of a long command; and a paused VM migrated arrives paused, its
/// GPU too, until it is resumed there, where the command completes exactly.
#[test]
fn pause_stops_the_gpu_too() {
    if !kvm_available() {
        return;
    }
    let d = host("gm-pause", 1, &[]);
    let g = gpu_dir(&d);
    let mut vm = source(&d, "v", &gpu_vm(&g, "GW8-1C", "gpu-long", &["k=512"]));
    wait_log(&vm.log, "submitted sgemm");
    let engine = || {
        let s = status(&d);
        let vfs = s[0]["vfs"].as_array().unwrap().clone();
        assert_eq!(vfs.len(), 1, "{s}");
        vfs[0]["engine_ms"].as_f64().unwrap()
    };
    let still = |what: &str| {
        let t0 = engine();
        std::thread::sleep(Duration::from_millis(400));
        assert_eq!(
            engine(),
            t0,
            "the GPU computed while the VM was paused ({what})"
        );
    };
    let sock = vm.sock.to_str().unwrap().to_string();
    let o = run(&["pause", "--api-socket", &sock], LIMIT);
    assert!(o.status.success(), "{}", stderr(&o));
    still("here");
    let o = run(&["resume", "--api-socket", &sock], LIMIT);
    assert!(o.status.success(), "{}", stderr(&o));
    let t0 = engine();
    assert!(wait_for(LIMIT, || (engine() > t0).then_some(())).is_some());
    // Paused again, then moved.
    let o = run(&["pause", "--api-socket", &sock], LIMIT);
    assert!(o.status.success(), "{}", stderr(&o));
    let (mut dst, addr) = destination(&d, "dst", &["--gpu-dir", &g]);
    let (out, r) = migrate(&vm, &addr, &[]);
    completed(&out, &r);
    assert_eq!(
        r["downtime"]["components"]["gpu"]["extra"]["preempted"], 1,
        "the SGEMM finished before the migration: make it longer\n{r}"
    );
    assert_eq!(exit_code(&mut vm, LIMIT), 0);
    assert_eq!(info(&dst)["state"], "paused");
    still("after the migration");
    let o = run(
        &["resume", "--api-socket", dst.sock.to_str().unwrap()],
        LIMIT,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(exit_code(&mut dst, LIMIT), 0, "{}", read(&dst.log));
    assert!(
        read(&dst.log).contains("gpu-long: ok"),
        "{}",
        read(&dst.log)
    );
}

/// `godwit bench gpu-migrate` end to end on its smallest cell: both modes migrate, and
/// the report says where the VRAM went (asserting bytes, never speed).
#[test]
fn the_gpu_migration_benchmark_runs_both_modes() {
    if !kvm_available() {
        return;
    }
    let o = run(
        &[
            "bench",
            "gpu-migrate",
            "--profiles",
            "GW8-1C",
            "--workloads",
            "256m",
            "--runs",
            "1",
            "--json",
        ],
        Duration::from_secs(300),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let r: Value = serde_json::from_str(&stdout(&o)).unwrap();
    let c = &r["cells"][0];
    assert_eq!(
        (c["profile"].as_str(), c["workload"].as_str()),
        (Some("GW8-1C"), Some("256m"))
    );
    let pre = &c["precopy"]["samples"][0];
    let stop = &c["stop_copy"]["samples"][0];
    // 64 MiB of aperture and 192 MiB of engine region, touched.
    let touched = pre["vram_touched_bytes"].as_u64().unwrap();
    assert!(touched >= 256 << 20, "{pre}");
    // Stop-and-copy moved all of it inside the pause, pre-copy in its rounds.
    let last = |s: &Value| {
        s["downtime"]["components"]["gpu"]["final_pages"]
            .as_u64()
            .unwrap()
            * 4096
    };
    assert!(last(stop) >= touched, "{stop}");
    assert!(pre["vram_bytes"].as_u64().unwrap() >= touched, "{pre}");
    // The guest's share of a CPU was measured (null where it was not).
    for s in [pre, stop] {
        let cpu = s["guest_cpu"].as_f64();
        assert!(cpu.is_some_and(|x| (0.0..=2.0).contains(&x)), "{s}");
    }
    assert!(
        c["precopy_over_stop_copy"]["downtime_ms"]["median"].is_number(),
        "{c}"
    );
}
