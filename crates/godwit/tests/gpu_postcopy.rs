//! Post-copy and hybrid migration of a VM with a GPU function: its VRAM follows the VM
//! like guest RAM (the engine's touches of missing VRAM fetch it), and GPU work ends
//! exactly as it would have without the move.

mod common;

use common::gpuhost::*;
use common::mig::*;
use common::*;
use serde_json::Value;

fn gpu_vm<'a>(g: &'a str, profile: &'a str, guest: &'a str, args: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec!["--gpu", profile, "--gpu-dir", g, guest, "--"];
    a.extend_from_slice(args);
    a
}

/// Post-copy ran and every page each lazy component lacked reached the destination.
fn whole(out: &std::process::Output, r: &Value, lazy: &[&str]) {
    assert!(out.status.success(), "{}\n{}", stdout(out), stderr(out));
    assert_eq!(r["status"], "completed", "{r}");
    assert_eq!(r["ran"], "postcopy", "{r}");
    let p = &r["postcopy"];
    assert!(p["vm_ended"].is_null(), "{r}");
    for name in lazy {
        let missing = p["missing_pages"][name].as_u64().unwrap_or(0);
        let d = &p["destination"][name];
        let placed = d["remote_faults"].as_u64().unwrap()
            + d["prepaged"].as_u64().unwrap()
            + d["fetched_ahead"].as_u64().unwrap();
        assert_eq!(placed, missing, "{name}: {r}");
    }
}

#[test]
fn gpu_train_moved_in_postcopy_ends_with_the_reference_answer() {
    if kvm_available() {
        gpu_train_moved(
            "gpc-train",
            &["--mode", "postcopy", "--max-bandwidth", "32M"],
        );
    }
}

/// The same in hybrid: pre-copy's rounds first, then post-copy, since at 4 MiB/s no
/// rest of even one page fits a pause of 1 ms. (At 32 MiB/s a host loaded enough to
/// starve the guest let a round find so few pages that pre-copy ended it.)
#[test]
fn gpu_train_moved_in_hybrid_ends_with_the_reference_answer() {
    if kvm_available() {
        gpu_train_moved(
            "gpc-train-hybrid",
            &[
                "--mode",
                "hybrid",
                "--max-bandwidth",
                "4M",
                "--downtime-ms",
                "1",
            ],
        );
    }
}

/// gpu-train moved with `options` (a post-copy among them): the VM and its GPU start at
/// the destination before their VRAM and RAM are all there, and the training ends with
/// the iteration count and hash of a run that was never moved. Hybrid may end in
/// pre-copy only if a round found nothing dirty (the guest starved for all of it),
/// which leaves no rest to follow the VM.
fn gpu_train_moved(tag: &str, options: &[&str]) {
    let d = host(tag, 1, &[]);
    let g = gpu_dir(&d);
    let mut src = source(&d, "src", &gpu_vm(&g, "GW8-1C", "gpu-train", TRAIN));
    let (mut dst, addr) = destination(&d, "dst", &["--gpu-dir", &g]);
    wait_log(&src.log, "iteration 2000 ");
    let (out, r) = migrate(&src, &addr, options);
    if r["mode"] == "hybrid" && r["ran"] == "precopy" {
        assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
        let why = r["switchover_reason"].as_str().unwrap_or_default();
        assert!(why.contains("no dirty pages left"), "{r}");
    } else {
        whole(&out, &r, &["ram", "gpu"]);
        assert!(
            r["postcopy"]["missing_pages"]["gpu"].as_u64().unwrap() > 0,
            "{r}"
        );
    }
    assert_eq!(exit_code(&mut src, LIMIT), 0, "{}", read(&src.err));
    assert_eq!(exit_code(&mut dst, LIMIT), 0, "{}", read(&dst.err));
    assert_trained(&read(&dst.log));
    assert_eq!(status(&d)[0]["vfs"].as_array().unwrap().len(), 0);
}

/// The VRAM dirtier writes VRAM through the aperture and with the engine, and guest RAM
/// by the GPU's DMA (pages only the GPU wrote, which the guest then reads): moved once
/// in post-copy and once in hybrid, every region checks out.
#[test]
fn a_vram_dirtier_verifies_after_postcopy_and_hybrid() {
    if !kvm_available() {
        return;
    }
    let d = host("gpc-dirtier", 1, &[]);
    let g = gpu_dir(&d);
    let args = DIRTIER_ARGS;
    let mut cur = source(&d, "src", &gpu_vm(&g, "GW8-1C", "gpu-dirtier", &args));
    wait_log(&cur.log, "verify ok");
    for (hop, extra) in [
        (1, vec!["--mode", "postcopy", "--max-bandwidth", "16M"]),
        (
            2,
            vec![
                "--mode",
                "hybrid",
                "--max-bandwidth",
                "16M",
                "--downtime-ms",
                "20",
            ],
        ),
    ] {
        let (next, addr) = destination(&d, &format!("hop{hop}"), &["--gpu-dir", &g]);
        let (out, r) = migrate(&cur, &addr, &extra);
        whole(&out, &r, &["ram", "gpu"]);
        let missing = r["postcopy"]["missing_pages"]["gpu"].as_u64().unwrap();
        assert!(missing > 0, "{r}");
        // Into memory nothing was loaded into (post-copy from the start, to a VM made
        // for it), the switch has no stale copies to drop; after pre-copy rounds, every
        // missing page's copy is stale and goes.
        let dropped = |name: &str| r["postcopy"]["destination"][name]["dropped_at_start"].as_u64();
        if hop == 1 {
            assert_eq!(dropped("gpu"), Some(0), "{r}");
            assert_eq!(dropped("ram"), Some(0), "{r}");
        } else {
            assert_eq!(dropped("gpu"), Some(missing), "{r}");
        }
        dirtier_arrived(&mut cur, &next, hop);
        cur = next;
    }
    dirtier_shut_down(cur);
}

/// Pages a lazily filled component still lacks, as the destination's API counts them.
fn left(incoming: &Value, name: &str) -> u64 {
    let s = &incoming["sections"][name];
    let placed = ["remote_faults", "prepaged", "fetched_ahead"]
        .iter()
        .map(|k| s[k].as_u64().unwrap())
        .sum::<u64>();
    s["missing_at_start"].as_u64().unwrap() - placed
}

/// The link dies while the VRAM dirtier's GPU function runs at the destination with
/// VRAM still at the source: neither side exits, the engine's work waits for its pages
/// where it touches them, `migrate-recover` on a new connection brings the rest, and
/// every region (VRAM written by the engine and through the aperture, RAM written by
/// the GPU's DMA) checks out.
#[test]
fn a_link_cut_mid_postcopy_with_vram_missing_is_recovered_and_the_gpu_work_verifies() {
    if !kvm_available() {
        return;
    }
    let d = host("gpc-recover", 1, &[]);
    let g = gpu_dir(&d);
    let mut src = source(
        &d,
        "src",
        &gpu_vm(&g, "GW8-1C", "gpu-dirtier", &DIRTIER_ARGS),
    );
    wait_log(&src.log, "verify ok");
    let (dst, direct) = destination(&d, "dst", &["--gpu-dir", &g]);
    let link = link_proxy(direct.clone());
    // 4 MiB/s: the 36 MiB the dirtier wrote take seconds to follow, so the cut below
    // falls well inside post-copy.
    let m = migrating(
        &src,
        &link.addr,
        &["--mode", "postcopy", "--max-bandwidth", "4M"],
    );
    wait_postcopy(&src);
    link.cut.store(true, std::sync::atomic::Ordering::SeqCst);
    wait_source_paused(&src);
    let i = wait_destination_paused(&dst);
    assert!(left(&i, "gpu") > 0, "no VRAM was missing at the cut: {i}");
    // The destination's GPU function waits where it touches what is missing; the
    // source keeps its copy and refuses to run it.
    let (c, _) = godwit_vmm::api::call(&src.sock, "PUT", "vm.resume").unwrap();
    assert_eq!(c, 409);
    assert_eq!(info(&dst)["state"], "running");
    let sock = src.sock.to_str().unwrap().to_string();
    let o = run(
        &["migrate-recover", "--api-socket", &sock, "--to", &direct],
        LIMIT,
    );
    assert!(o.status.success(), "{}\n{}", stderr(&o), read(&dst.err));
    let out = m.join().unwrap();
    let r: Value = serde_json::from_str(&stdout(&out)).unwrap_or_default();
    whole(&out, &r, &["ram", "gpu"]);
    assert_eq!(r["postcopy"]["recoveries"], 1, "{r}");
    let i = &migration(&dst)["incoming"];
    assert_eq!(i["pages_left"], 0, "{i}");
    assert_eq!(i["recoveries"], 1, "{i}");
    assert_listener_let_go(&direct);
    dirtier_arrived(&mut src, &dst, 1);
    dirtier_shut_down(dst);
    assert_eq!(status(&d)[0]["vfs"].as_array().unwrap().len(), 0);
}

/// The pages a GPU command waits for are not held to the migration's bandwidth cap,
/// as the pages a touch waits for are not: with a command's operands brought in before
/// it runs (`--gpu-prefetch always`), the moved VM's training steps run at the
/// destination long before the cap alone would have let their weights through. (Until
/// 2026-12-06 they went in the background's turn, under the cap, and the moved VM's
/// GPU all but stopped for the window: `godwit bench gpu-postcopy`.)
#[test]
fn a_gpu_command_brought_in_first_is_not_held_to_the_bandwidth_cap() {
    if !kvm_available() {
        return;
    }
    let d = host("gpc-ahead", 1, &[]);
    let g = gpu_dir(&d);
    // 16 MiB of weights and gradients, which every SGD step's AXPY reads whole: under a
    // 1 MiB/s cap they would take 16 s.
    let work = [
        "aperture=1",
        "engine=1",
        "dma=1",
        "rate=16",
        "busy=16",
        "seconds=0",
        "report-every=250",
    ];
    let src = source(&d, "src", &gpu_vm(&g, "GW8-1C", "gpu-dirtier", &work));
    wait_log(&src.log, "window_gap_us=");
    let (dst, addr) = destination(&d, "dst", &["--gpu-dir", &g, "--gpu-prefetch", "always"]);
    let m = migrating(
        &src,
        &addr,
        &["--mode", "postcopy", "--max-bandwidth", "1M"],
    );
    wait_postcopy(&src);
    let t0 = std::time::Instant::now();
    let pid = dst.proc.0.id();
    let commands = || {
        status(&d)[0]["vfs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["holder"]["pid"] == pid)
            .and_then(|v| v["commands"].as_u64())
    };
    let base = wait_for(LIMIT, commands).expect("the destination leased no GPU function");
    // Four SGD steps: each AXPY needs all 16 MiB here. Half the time the cap would take.
    let ran = wait_for(std::time::Duration::from_secs(8), || {
        commands().filter(|&n| n >= base + 8)
    });
    assert!(
        ran.is_some(),
        "the moved VM's GPU ran {} commands in {:?} of post-copy: its operands waited \
         for the bandwidth cap",
        commands().unwrap_or(base) - base,
        t0.elapsed()
    );
    let out = m.join().unwrap();
    let r: Value = serde_json::from_str(&stdout(&out)).unwrap_or_default();
    whole(&out, &r, &["ram", "gpu"]);
    assert!(
        r["postcopy"]["destination"]["gpu"]["fetched_ahead"]
            .as_u64()
            .unwrap()
            > 0,
        "{r}"
    );
    let mut src = src;
    assert_eq!(exit_code(&mut src, LIMIT), 0, "{}", read(&src.err));
    dirtier_shut_down(dst);
    assert_eq!(status(&d)[0]["vfs"].as_array().unwrap().len(), 0);
}

/// `godwit bench gpu-postcopy` end to end, one run a side: with the destination's engine
/// bringing a command's pages in first (a neighbour wants the GPU, so `auto` does), the
/// GPU function's pages are asked for ahead; with `off` (`run --gpu-prefetch off`) its
/// engine faults on them. Both VMs' shares of the engine are measured (asserting what
/// ran, never how fast).
#[test]
fn the_gpu_postcopy_benchmark_measures_both_engine_policies() {
    if !kvm_available() {
        return;
    }
    let o = run(
        &[
            "bench",
            "gpu-postcopy",
            "--runs",
            "1",
            "--prefetch",
            "auto,off",
            "--weights-mib",
            "64",
            "--max-bandwidth",
            "32M",
            "--json",
        ],
        std::time::Duration::from_secs(300),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let r: Value = serde_json::from_str(&stdout(&o)).unwrap();
    let sides = r["sides"].as_array().unwrap();
    let names: Vec<_> = sides.iter().map(|s| s["prefetch"].as_str()).collect();
    assert_eq!(names, [Some("auto"), Some("off")], "{r}");
    for s in sides {
        let x = &s["samples"][0];
        assert!(x["window_ms"].as_f64().unwrap() > 0.0, "{x}");
        for who in [
            "neighbour_before",
            "neighbour_during",
            "moved_before",
            "moved_during",
        ] {
            let share = x[who]["engine_share"].as_f64().unwrap();
            assert!((0.0..=1.05).contains(&share), "{who}: {x}");
        }
        // Both VMs had work done on the GPU before and during the window.
        assert!(
            x["moved_before"]["commands_per_s"].as_f64().unwrap() > 0.0,
            "{x}"
        );
        assert!(
            x["neighbour_during"]["commands_per_s"].as_f64().unwrap() > 0.0,
            "{x}"
        );
    }
    let ahead = |i: usize| {
        sides[i]["samples"][0]["gpu_fetched_ahead"]
            .as_u64()
            .unwrap()
    };
    let faults = |i: usize| {
        sides[i]["samples"][0]["gpu_remote_faults"]
            .as_u64()
            .unwrap()
    };
    assert!(ahead(0) > 0, "auto asked for nothing ahead: {r}");
    // The engine faulting on what it touches meets most of the 64 MiB it works on
    // missing (with read-ahead, about 1,800 faults here): far more than the few pages
    // the vCPU's aperture stores meet in both (2-30 here).
    assert!(
        faults(1) >= 200 && faults(1) > 4 * faults(0),
        "off: the engine did not fault on what it touched: {r}"
    );
}
