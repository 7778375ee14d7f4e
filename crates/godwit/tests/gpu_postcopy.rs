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
    if !kvm_available() {
        return;
    }
    let d = host("gpc-train", 1, &[]);
    let g = gpu_dir(&d);
    let mut src = source(
        &d,
        "src",
        &gpu_vm(&g, "GW8-1C", "gpu-train", &["grid=96", "tol-exp=10"]),
    );
    let (mut dst, addr) = destination(&d, "dst", &["--gpu-dir", &g]);
    wait_log(&src.log, "iteration 2000 ");
    // The VM and its GPU start at the destination at once; VRAM and RAM follow, the
    // background slowly.
    let (out, r) = migrate(
        &src,
        &addr,
        &["--mode", "postcopy", "--max-bandwidth", "32M"],
    );
    whole(&out, &r, &["ram", "gpu"]);
    assert!(
        r["postcopy"]["missing_pages"]["gpu"].as_u64().unwrap() > 0,
        "{r}"
    );
    assert_eq!(exit_code(&mut src, LIMIT), 0, "{}", read(&src.err));
    assert_eq!(exit_code(&mut dst, LIMIT), 0, "{}", read(&dst.err));
    let (iters, hash) = jacobi(96, 1e-10);
    let log = read(&dst.log);
    assert!(
        log.contains(&format!("converged iterations={iters} "))
            && log.contains(&format!("hash={hash:#018x}")),
        "expected {iters} iterations and hash {hash:#018x}:\n{log}"
    );
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
