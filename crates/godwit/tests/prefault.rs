//! A destination that readies its memory before the source connects (`run --incoming
//! --memory M --prefault`): the migration lays its pages on memory that is already
//! there, and every page the guest reads is the source's. With `--gpu PROFILE` the
//! destination also readies that profile's VRAM, and takes only a source that brings it.

mod common;

use common::gpuhost::*;
use common::mig::*;
use common::seccomp;
use common::*;
use serde_json::Value;

/// A process's resident memory in MiB.
fn resident_mib(vm: &Vm) -> u64 {
    let status = read(std::path::Path::new(&format!(
        "/proc/{}/status",
        vm.proc.0.id()
    )));
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kib| kib / 1024)
}

/// A destination that readied its memory (`--prefault`) holds a zero in every page the
/// source has not sent yet, where a fresh one holds nothing. Switched in the first
/// round, those pages must go missing like stale copies, never be read as zeros.
#[test]
fn a_prefaulted_destination_switched_in_the_first_round_reads_no_page_it_lacks() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("pc-prefault-switch");
    let mut src = dirtier_source(
        &dir,
        "src",
        "512",
        &["wss=32", "rate=50", "seconds=10", "report-every=250"],
    );
    let (mut dst, addr) = destination(&dir, "dst", &["--memory", "512", "--prefault"]);
    // Listening means the memory is in place.
    let rss = resident_mib(&dst);
    assert!(
        rss >= 500,
        "the destination holds {rss} MiB before the source connects"
    );
    let m = slow_migration(&src, addr);
    wait_progress(&src);
    let sock = src.sock.to_str().unwrap().to_string();
    let o = run(&["migrate-postcopy", "--api-socket", &sock], LIMIT);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = m.join().unwrap();
    let r: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_postcopy_whole(&r);
    assert_eq!(exit_code(&mut src, LIMIT), 0, "{}", read(&src.err));
    assert_verified(&mut dst, 8192);
}

/// Post-copy from the start places every page through userfaultfd: a prefaulted
/// destination unmaps its memory from the guest when the source says so (HELLO), not
/// page run by page run inside the pause, keeps the pages, places each by writing it
/// through the memory's alias (UFFDIO_CONTINUE, no page allocated on the way), and the
/// guest verifies.
#[test]
fn a_prefaulted_destination_places_a_postcopy_from_the_start_through_its_alias() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("pc-prefault-post");
    let mut src = dirtier_source(
        &dir,
        "src",
        "512",
        &["wss=64", "rate=200", "seconds=10", "report-every=250"],
    );
    let (mut dst, addr) = destination_with(
        &dir,
        "dst",
        &["--memory", "512", "--prefault"],
        &[("GODWIT_LOG", "info")],
    );
    assert!(
        read(&dst.err).contains("guest memory prefaulted"),
        "{}",
        read(&dst.err)
    );
    let m = migrating(
        &src,
        &addr,
        &["--mode", "postcopy", "--max-bandwidth", "16M"],
    );
    let out = m.join().unwrap();
    let r: Value = serde_json::from_str(&stdout(&out)).unwrap_or_default();
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert_postcopy_whole(&r);
    let log = read(&dst.err);
    assert!(
        log.contains("prefaulted memory readied for post-copy"),
        "{log}"
    );
    assert!(
        log.contains("guest RAM: post-copy places pages through the alias"),
        "{log}"
    );
    assert_eq!(exit_code(&mut src, LIMIT), 0, "{}", read(&src.err));
    assert_verified(&mut dst, 16384);
}

/// A destination started with `--gpu PROFILE` takes only a source whose GPU function
/// has that profile; with `--prefault` it readies the profile's VRAM before it listens.
/// A GPU VM moved into such a destination in pre-copy, then on into another one in
/// post-copy from the start (which maps the VRAM anew and places every page of it
/// through its alias), checks out every region after each move.
#[test]
fn a_destination_readied_for_a_gpu_vm_takes_only_that_profile_and_its_vram() {
    if !kvm_available() {
        return;
    }
    let d = host("pf-gpu", 1, &[]);
    let g = gpu_dir(&d);
    let mut args = vec!["--gpu", "GW8-1C", "--gpu-dir", &g, "gpu-dirtier", "--"];
    args.extend(DIRTIER_ARGS);
    let mut cur = source(&d, "src", &args);
    wait_log(&cur.log, "verify ok");

    // Another profile than the source's: refused before anything stops.
    let (mut other, addr) = destination(&d, "other", &["--gpu-dir", &g, "--gpu", "GW8-2C"]);
    let (out, _) = migrate(&cur, &addr, &[]);
    assert!(!out.status.success(), "{}", stdout(&out));
    let why = stderr(&out);
    assert!(
        why.contains("profile GW8-1C") && why.contains("--gpu GW8-2C"),
        "{why}"
    );
    assert_ne!(exit_code(&mut other, LIMIT), 0);
    gains(&cur.log, "verify ok", 1);

    let ready = [
        "--gpu-dir",
        &g,
        "--memory",
        "256",
        "--gpu",
        "GW8-1C",
        "--prefault",
    ];
    for (hop, mode) in [(1, "precopy"), (2, "postcopy")] {
        let (next, addr) =
            destination_with(&d, &format!("hop{hop}"), &ready, &[("GODWIT_LOG", "info")]);
        let err = read(&next.err);
        assert!(err.contains("VRAM prefaulted: 1024 MiB (GW8-1C)"), "{err}");
        // Listening means the memory and the VRAM are in place.
        let rss = resident_mib(&next);
        assert!(
            rss >= 1024 + 250,
            "hop {hop}: the destination holds {rss} MiB before the source connects"
        );
        let (out, r) = migrate(&cur, &addr, &["--mode", mode, "--max-bandwidth", "64M"]);
        assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
        assert_eq!(r["ran"], mode, "{r}");
        if mode == "postcopy" {
            assert_postcopy_whole(&r);
            let p = &r["postcopy"];
            let missing = p["missing_pages"]["gpu"].as_u64().unwrap();
            let v = &p["destination"]["gpu"];
            let placed = v["remote_faults"].as_u64().unwrap()
                + v["prepaged"].as_u64().unwrap()
                + v["fetched_ahead"].as_u64().unwrap();
            assert!(missing > 0 && placed == missing, "{r}");
            let log = read(&next.err);
            assert!(
                log.contains("prefaulted memory readied for post-copy")
                    && log.contains("this VF's VRAM: post-copy places pages through the alias"),
                "{log}"
            );
        }
        if mode == "precopy" {
            assert!(
                read(&next.err).contains("the GPU function's VRAM is the one prefaulted"),
                "{}",
                read(&next.err)
            );
        }
        dirtier_arrived(&mut cur, &next, hop);
        cur = next;
    }
    dirtier_shut_down(cur);
}

/// UFFDIO_REGISTER's request number (_IOWR(0xAA, 0x00, struct uffdio_register)).
const UFFDIO_REGISTER: u32 = 0xc020_aa00;

/// A kernel that cannot catch minor faults in shared memory (before Linux 5.14), as a
/// seccomp filter makes this one look: UFFDIO_REGISTER fails with EINVAL, as those
/// kernels answer a registration for minor faults. A prefaulted destination says at
/// once that post-copy cannot come there and what to change; `--mode postcopy` is
/// refused before the VM pauses (it runs on at the source), and `--mode auto` moves it
/// in pre-copy onto the prefaulted memory, where the guest checks all of its memory.
#[test]
fn a_prefaulted_destination_on_a_kernel_without_minor_faults_takes_pre_copy_only() {
    if !kvm_available() || !seccomp::available() {
        return;
    }
    let dir = TempDir::new("pc-prefault-no-minor");
    // Running long enough for a refusal and a second destination on a busy host.
    let mut src = dirtier_source(
        &dir,
        "src",
        "256",
        &["wss=16", "rate=10", "seconds=12", "report-every=250"],
    );
    let old_kernel = |name: &str| {
        seccomp::under_filter(
            seccomp::Refuse::Ioctl(UFFDIO_REGISTER),
            libc::EINVAL,
            || destination(&dir, name, &["--memory", "256", "--prefault"]),
        )
    };
    const WAY_OUT: &str = "(Linux 5.14 or later can): run the destination without --prefault";
    let (mut dst, addr) = old_kernel("dst-postcopy");
    wait_log(&dst.err, "post-copy cannot come here, pre-copy can: ");
    assert!(read(&dst.err).contains(WAY_OUT), "{}", read(&dst.err));
    let (out, r) = migrate(&src, &addr, &["--mode", "postcopy"]);
    assert!(!out.status.success(), "{r}");
    assert_eq!(r["error_kind"], "refused", "{r}");
    assert!(r["error"].as_str().unwrap().contains(WAY_OUT), "{r}");
    assert_eq!(r["downtime_ms"].as_f64(), Some(0.0), "{r}");
    assert_eq!(r["source_running"], true, "{r}");
    assert_ne!(exit_code(&mut dst, LIMIT), 0);
    gains(&src.log, "dirtier: t_ms=", 2);

    let (mut dst, addr) = old_kernel("dst-auto");
    let (out, r) = migrate(&src, &addr, &["--mode", "auto"]);
    assert!(out.status.success(), "{r}");
    assert_eq!(r["ran"], "precopy", "{r}");
    assert!(
        r["postcopy_unavailable"]
            .as_str()
            .unwrap()
            .contains(WAY_OUT),
        "{r}"
    );
    assert_eq!(exit_code(&mut src, LIMIT), 0, "{}", read(&src.err));
    assert_verified(&mut dst, 4096);
}
