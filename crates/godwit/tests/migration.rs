//! Live migration between real godwit processes over real sockets: guests keep their
//! memory and state, and every failure leaves the source running.

mod common;

use common::mig::*;
use common::*;
use godwit_migration::wire::{self, Kind};
use serde_json::Value;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// The source still runs its guest: state running and the heartbeat still advancing.
fn assert_source_runs(vm: &Vm) {
    assert_eq!(info(vm)["state"], "running", "{}", read(&vm.err));
    let n = seqs(&read(&vm.log)).len();
    assert!(
        wait_for(Duration::from_secs(5), || (seqs(&read(&vm.log)).len()
            > n + 2)
            .then_some(()))
        .is_some(),
        "the source guest stopped beating"
    );
}

#[test]
fn a_dirtier_migrated_while_dirtying_verifies_all_its_memory_on_the_destination() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("mig-dirtier");
    let mut src = source(
        &dir,
        "src",
        &[
            "-m",
            "512",
            "dirtier",
            "--",
            "wss=96",
            "rate=300",
            "seconds=5",
            "report-every=250",
        ],
    );
    let (mut dst, addr) = destination(&dir, "dst", &[]);
    wait_log(&src.log, "rate_mibs=");
    let (out, r) = migrate(&src, &addr, &["--downtime-ms", "100"]);
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert_eq!(r["status"], "completed");
    assert!(r["downtime_ms"].as_f64().unwrap() > 0.0);
    assert!(r["round_count"].as_u64().unwrap() >= 2, "{r}");
    assert!(
        r["bytes"]["memory_data"].as_u64().unwrap() >= 96 << 20,
        "{r}"
    );
    assert!(r["bytes"]["zero_pages"].as_u64().unwrap() > 0, "{r}");
    assert!(r["bytes"]["state"].as_u64().unwrap() > 0);
    assert_eq!(exit_code(&mut src, LIMIT), 0, "{}", read(&src.err));
    assert!(read(&src.err).contains("the VM moved to"));
    assert_eq!(exit_code(&mut dst, LIMIT), 0, "{}", read(&dst.err));
    let log = read(&dst.log);
    assert!(log.contains("verify ok pages=24576"), "{log}");
    assert!(log.contains("result=ok"), "{log}");
    // The guest's own clock saw the pause: the gap it measured is at least the downtime.
    let gap_us: f64 = log
        .lines()
        .rev()
        .find_map(|l| {
            l.split("max_gap_us=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap();
    assert!(
        gap_us / 1e3 + 1.0 >= r["downtime"]["final_pages_ms"].as_f64().unwrap(),
        "{log}"
    );
}

/// The dirty ring instead of the bitmap, with a ring small enough to fill many times a
/// round, then on to a host that uses the bitmap: the tracking is each host's own choice.
#[test]
fn a_dirtier_tracked_by_a_dirty_ring_verifies_all_its_memory_across_hosts() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("mig-ring");
    let mut src = source(
        &dir,
        "src",
        &[
            "-m",
            "512",
            "--dirty-log",
            "ring:512",
            "dirtier",
            "--",
            "wss=96",
            "rate=300",
            "seconds=6",
            "report-every=250",
        ],
    );
    let (mut mid, addr) = destination(&dir, "mid", &["--dirty-log", "bitmap"]);
    wait_log(&src.log, "rate_mibs=");
    assert_eq!(info(&src)["dirty_log"], "ring:512");
    let (out, r) = migrate(&src, &addr, &["--downtime-ms", "100"]);
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert_eq!(r["status"], "completed");
    assert_eq!(r["dirty_log"], "ring", "{r}");
    assert!(r["ring_full_exits"].as_u64().unwrap() > 0, "{r}");
    assert!(r["round_count"].as_u64().unwrap() >= 2, "{r}");
    assert_eq!(exit_code(&mut src, LIMIT), 0, "{}", read(&src.err));

    // And back onto a ring, from the bitmap.
    let (mut end, addr) = destination(&dir, "end", &["--dirty-log", "ring"]);
    wait_log(&mid.log, "rate_mibs=");
    let (out, r) = migrate(&mid, &addr, &["--downtime-ms", "100"]);
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert_eq!(r["dirty_log"], "manual-protect", "{r}");
    assert_eq!(info(&end)["dirty_log"], "ring:65536");
    assert_eq!(exit_code(&mut mid, LIMIT), 0, "{}", read(&mid.err));
    assert_eq!(exit_code(&mut end, LIMIT), 0, "{}", read(&end.err));
    let log = read(&end.log);
    assert!(log.contains("verify ok pages=24576"), "{log}");
    assert!(log.contains("result=ok"), "{log}");
}

#[test]
fn the_heartbeat_carries_on_across_migrations_back_and_forth() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("mig-hops");
    let mut cur = source(&dir, "hop0", &["heartbeat", "--", "period=20", "count=0"]);
    let mut logs = vec![cur.log.clone()];
    for hop in 1..=3 {
        wait_log(&cur.log, "seq=");
        std::thread::sleep(Duration::from_millis(200));
        let (next, addr) = destination(&dir, &format!("hop{hop}"), &[]);
        // Alternate the transport: TCP, then a Unix socket, then TCP with 3 connections.
        let (out, r) = if hop == 2 {
            drop(next);
            let usock = dir.path("mig.sock");
            let (log, err) = (dir.path("hop2.log"), dir.path("hop2.err"));
            let a: Vec<String> = vec![
                "run".into(),
                "--incoming".into(),
                format!("unix:{}", usock.display()),
                "--api-socket".into(),
                dir.path("hop2.sock").display().to_string(),
            ];
            let proc = spawn(&a, &log, &err);
            wait_for(LIMIT, || usock.exists().then_some(())).unwrap();
            let m = migrate(&cur, &format!("unix:{}", usock.display()), &[]);
            assert_eq!(exit_code(&mut cur, LIMIT), 0);
            cur = Vm {
                proc,
                log,
                err,
                sock: dir.path("hop2.sock"),
            };
            m
        } else {
            let conns = if hop == 3 { "3" } else { "1" };
            let m = migrate(&cur, &addr, &["--connections", conns]);
            assert_eq!(exit_code(&mut cur, LIMIT), 0);
            cur = next;
            m
        };
        assert!(out.status.success(), "hop {hop}: {}", stderr(&out));
        assert_eq!(r["status"], "completed");
        logs.push(cur.log.clone());
        wait_log(&cur.log, "seq=");
    }
    std::thread::sleep(Duration::from_millis(200));
    run(
        &["shutdown", "--api-socket", cur.sock.to_str().unwrap()],
        LIMIT,
    );
    // One unbroken sequence over the four processes: nothing lost, nothing repeated.
    let all: Vec<u64> = logs.iter().flat_map(|l| seqs(&read(l))).collect();
    assert!(all.len() > 20, "{all:?}");
    for (i, s) in all.iter().enumerate() {
        assert_eq!(*s, i as u64 + 1, "sequence broken at {i}: {all:?}");
    }
}

#[test]
fn a_two_vcpu_guest_runs_on_after_migration() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("mig-smp");
    let mut src = source(&dir, "src", &["--vcpus", "2", "smp", "--", "ms=2500"]);
    let (mut dst, addr) = destination(&dir, "dst", &["--vcpus", "2"]);
    wait_log(&src.log, "vcpu 1 online");
    std::thread::sleep(Duration::from_millis(500));
    let (out, r) = migrate(&src, &addr, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(r["status"], "completed");
    assert_eq!(exit_code(&mut src, LIMIT), 0);
    // Both vCPUs were mid-loop: the guest finishes on the destination with both counting.
    assert_eq!(exit_code(&mut dst, LIMIT), 0, "{}", read(&dst.log));
    assert!(read(&dst.log).contains("vcpus=2 concurrent=2 result=ok"));
}

#[test]
fn auto_converge_throttles_a_guest_that_outpaces_the_bandwidth_limit() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("mig-converge");
    let mut src = source(
        &dir,
        "src",
        &[
            "-m",
            "256",
            "dirtier",
            "--",
            "wss=32",
            "rate=0",
            "seconds=0",
            "report-every=500",
        ],
    );
    let (mut dst, addr) = destination(&dir, "dst", &[]);
    wait_log(&src.log, "rate_mibs=");
    let (out, r) = migrate(
        &src,
        &addr,
        &["--max-bandwidth", "48M", "--downtime-ms", "30"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(r["status"], "completed", "{r}");
    assert_eq!(r["throttled"], true, "{r}");
    assert!(r["max_throttle_pct"].as_u64().unwrap() >= 20);
    assert!(r["rounds"]
        .as_array()
        .unwrap()
        .iter()
        .any(|x| x["throttle_pct"].as_u64() > Some(0)));
    assert_eq!(exit_code(&mut src, LIMIT), 0);
    // The guest runs on, unthrottled, and its memory is intact.
    wait_log(&dst.log, "window_gap_us");
    run(
        &["shutdown", "--api-socket", dst.sock.to_str().unwrap()],
        LIMIT,
    );
    exit_code(&mut dst, LIMIT);
}

#[test]
fn a_snapshot_file_restores_the_vm_where_it_stopped() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("mig-file");
    let snap = dir.path("vm.snap");
    let mut src = source(&dir, "src", &["heartbeat", "--", "period=20", "count=60"]);
    wait_log(&src.log, "seq=10 ");
    let (out, r) = migrate(&src, &format!("file:{}", snap.display()), &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(r["status"], "completed");
    assert_eq!(exit_code(&mut src, LIMIT), 0);
    let o = run(
        &[
            "run",
            "--incoming",
            &format!("file:{}", snap.display()),
            "--console",
            "stdout",
        ],
        LIMIT,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let all: Vec<u64> = seqs(&read(&src.log))
        .into_iter()
        .chain(seqs(&stdout(&o)))
        .collect();
    assert_eq!(all, (1..=60).collect::<Vec<_>>());
    // A damaged snapshot read eagerly is refused with a clear error, and nothing runs
    // (read lazily, tests/restore.rs).
    let mut bytes = std::fs::read(&snap).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0x55;
    std::fs::write(&snap, &bytes).unwrap();
    let o = run(
        &[
            "run",
            "--incoming",
            &format!("file:{}", snap.display()),
            "--restore",
            "eager",
        ],
        LIMIT,
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("corrupt"), "{}", stderr(&o));
    assert!(seqs(&stdout(&o)).is_empty());
}

/// A snapshot never destroys another: a cancelled one leaves the good file there; a
/// second VM writing to the same path at the same time is refused and keeps running;
/// a file with bytes after its end (damaged, or two snapshots concatenated) is refused.
#[test]
fn snapshots_never_destroy_a_good_one() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("mig-snapfiles");
    let snap = dir.path("vm.snap");
    let to = format!("file:{}", snap.display());
    let mut a = source(&dir, "a", &["heartbeat", "--", "period=20", "count=0"]);
    wait_log(&a.log, "seq=3 ");
    let (out, r) = migrate(&a, &to, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(r["status"], "completed");
    assert_eq!(exit_code(&mut a, LIMIT), 0);
    let good = std::fs::read(&snap).unwrap();

    // B snapshots slowly over A's file; C tries the same path meanwhile.
    let dirtier = [
        "-m",
        "128",
        "dirtier",
        "--",
        "wss=64",
        "rate=20",
        "seconds=0",
    ];
    let b = dirtier_source(&dir, "b", "128", &dirtier);
    let c = dirtier_source(&dir, "c", "128", &dirtier);
    let m = slow_migration(&b, to.clone());
    let partial = dir.path(".vm.snap.godwit-partial");
    wait_for(LIMIT, || {
        (std::fs::metadata(&partial).ok()?.len() > 1 << 20).then_some(())
    })
    .expect("the snapshot never started writing");
    let (out, r) = migrate(&c, &to, &[]);
    assert_eq!(out.status.code(), Some(1), "{r}");
    let e = r["error"].as_str().unwrap_or_default();
    assert!(e.contains("another snapshot is being written"), "{r}");
    assert_eq!(info(&c)["state"], "running");
    let o = run(
        &["migrate-cancel", "--api-socket", b.sock.to_str().unwrap()],
        LIMIT,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let r: Value = serde_json::from_str(&stdout(&m.join().unwrap())).unwrap();
    assert_eq!(r["status"], "cancelled", "{r}");
    assert_eq!(info(&b)["state"], "running");
    assert!(
        std::fs::read(&snap).unwrap() == good,
        "the good snapshot was touched"
    );
    assert!(
        !partial.exists(),
        "the cancelled snapshot's file was left behind"
    );

    // Bytes after the end, or a snapshot twice over: refused, nothing runs.
    for (what, bytes) in [
        ("garbage", [&good[..], b"trailing garbage"].concat()),
        ("twice", [&good[..], &good[..]].concat()),
    ] {
        let p = dir.path(&format!("{what}.snap"));
        std::fs::write(&p, bytes).unwrap();
        let o = run(
            &["run", "--incoming", &format!("file:{}", p.display())],
            LIMIT,
        );
        assert_eq!(o.status.code(), Some(1), "{what}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("bytes after the snapshot's end"),
            "{what}: {}",
            stderr(&o)
        );
        assert!(seqs(&stdout(&o)).is_empty());
    }
    // A snapshot into a directory that does not exist says so.
    let (out, r) = migrate(
        &c,
        &format!("file:{}", dir.path("nodir/x.snap").display()),
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    let e = r["error"].as_str().unwrap_or_default();
    assert!(e.contains("nodir does not exist"), "{r}");
    assert_eq!(info(&c)["state"], "running");
}

#[test]
fn a_refused_configuration_leaves_the_source_running() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("mig-refuse");
    let src = source(
        &dir,
        "src",
        &["-m", "256", "heartbeat", "--", "period=20", "count=0"],
    );
    let (mut dst, addr) = destination(&dir, "dst", &["--memory", "128"]);
    wait_log(&src.log, "seq=");
    // Stop-and-copy of a GPU this VM does not have: refused before anything moves.
    let (out, r) = migrate(&src, &addr, &["--gpu-precopy", "off"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(r["error_kind"], "bad_options", "{r}");
    let e = r["error"].as_str().unwrap();
    assert!(
        e.contains("\"gpu\"") && e.contains("vcpus, ram, platform"),
        "{e}"
    );
    assert_eq!(r["source_running"], true);
    let (out, r) = migrate(&src, &addr, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(r["status"], "failed");
    assert_eq!(r["source_running"], true);
    let e = r["error"].as_str().unwrap();
    assert!(e.contains("refused") && e.contains("--memory 128"), "{e}");
    assert_eq!(exit_code(&mut dst, LIMIT), 1);
    assert!(read(&dst.err).contains("256 MiB"), "{}", read(&dst.err));
    assert_source_runs(&src);
}

#[test]
fn a_destination_killed_mid_stream_leaves_the_source_running_and_intact() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("mig-kill");
    let mut src = source(
        &dir,
        "src",
        &[
            "-m",
            "256",
            "dirtier",
            "--",
            "wss=48",
            "rate=50",
            "seconds=0",
            "verify-every=1",
        ],
    );
    let (mut dst, addr) = destination(&dir, "dst", &[]);
    wait_log(&src.log, "touched");
    let m = slow_migration(&src, addr);
    std::thread::sleep(Duration::from_millis(1500));
    let _ = dst.proc.0.kill();
    let out = m.join().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let r: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(r["status"], "failed");
    assert_eq!(r["source_running"], true);
    // Dirty logging and the throttle are gone and the guest verifies its memory again.
    let before = read(&src.log).matches("verify ok").count();
    assert!(
        wait_for(Duration::from_secs(10), || (read(&src.log)
            .matches("verify ok")
            .count()
            >= before + 2)
            .then_some(()))
        .is_some(),
        "{}",
        read(&src.log)
    );
    assert!(!read(&src.log).contains("FAILED"));
    assert_eq!(info(&src)["state"], "running");
    run(
        &["shutdown", "--api-socket", src.sock.to_str().unwrap()],
        LIMIT,
    );
    assert_eq!(exit_code(&mut src, LIMIT), 0);
}

#[test]
fn a_migration_can_be_cancelled_through_the_api() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("mig-cancel");
    let src = source(
        &dir,
        "src",
        &[
            "-m",
            "256",
            "dirtier",
            "--",
            "wss=64",
            "rate=20",
            "seconds=0",
        ],
    );
    let (mut dst, addr) = destination(&dir, "dst", &[]);
    wait_log(&src.log, "touched");
    let m = slow_migration(&src, addr);
    // While it runs, the API reports progress, and refuses pause and a second migration.
    let sock = src.sock.to_str().unwrap();
    wait_for(LIMIT, || {
        let (c, b) = godwit_vmm::api::call(&src.sock, "GET", "vm.migration").ok()?;
        let v: Value = serde_json::from_str(&b).ok()?;
        (c == 200 && v["active"] == true && v["progress"]["bytes_sent"].as_u64()? > 0).then_some(())
    })
    .expect("no progress");
    let (c, _) = godwit_vmm::api::call(&src.sock, "PUT", "vm.pause").unwrap();
    assert_eq!(c, 409);
    let o = run(
        &["migrate", "--api-socket", sock, "--to", "tcp:127.0.0.1:1"],
        LIMIT,
    );
    assert!(stderr(&o).contains("already running"), "{}", stderr(&o));
    let o = run(&["migrate-cancel", "--api-socket", sock], LIMIT);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = m.join().unwrap();
    let r: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(r["status"], "cancelled", "{r}");
    assert_eq!(r["source_running"], true);
    // What went on the wire before the cancel is counted, mid-round or not.
    assert!(r["bytes"]["total"].as_u64() > Some(0), "{r}");
    assert_eq!(exit_code(&mut dst, LIMIT), 1);
    assert!(read(&dst.err).contains("aborted"), "{}", read(&dst.err));
    assert_eq!(info(&src)["state"], "running");
    let (c, _) = godwit_vmm::api::call(&src.sock, "PUT", "vm.migrate-cancel").unwrap();
    assert_eq!(c, 409);
    // Nobody listens there: the report says so in a few lines, not a table of zeros.
    let o = run(
        &["migrate", "--api-socket", sock, "--to", "tcp:127.0.0.1:1"],
        LIMIT,
    );
    assert!(!o.status.success());
    let said = stdout(&o);
    assert!(said.contains("cannot reach tcp:127.0.0.1:1"), "{said}");
    assert!(said.contains("sent 0.0 MiB in "), "{said}");
    assert!(said.contains("no round completed"), "{said}");
    assert!(said.contains("keeps running on the source"), "{said}");
    assert!(!said.contains("expected ms"), "{said}");
    assert_eq!(info(&src)["state"], "running");
}

/// A destination that takes everything and never confirms: the source must take its VM
/// back; and one that confirms, then vanishes before GO is answered.
#[test]
fn without_the_destination_s_confirmation_the_source_resumes() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("mig-noready");
    let src = source(&dir, "src", &["heartbeat", "--", "period=20", "count=0"]);
    wait_log(&src.log, "seq=");
    let (addr, fake) = unconfirming_destination();
    let (out, r) = migrate(&src, &addr, &[]);
    let kinds = fake.join().unwrap();
    assert!(kinds.contains(&Kind::State), "{kinds:?}");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(r["status"], "failed");
    assert_eq!(r["source_running"], true, "{r}");
    assert_source_runs(&src);
}

#[test]
fn hostile_input_on_the_destination_is_a_clear_error() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("mig-hostile");
    let sections = serde_json::json!([
        {"name": "vcpus", "version": 1, "needs": {"count": "1"}},
        {"name": "ram", "version": 1, "needs": {"memory_mib": "256", "layout": "0x0+0x10000000"}},
        {"name": "platform", "version": 1, "needs": {"guest": "godwit", "pci": "0:host-bridge"}}
    ]);
    let frame = |v: Value| {
        let mut out = Vec::new();
        wire::write_raw(&mut out, Kind::Hello, v.to_string().as_bytes()).unwrap();
        out
    };
    let hello = |version: u32| {
        frame(serde_json::json!({
            "wire_version": version, "guest": "x", "connections": 1, "session": 1,
            "snapshot": false, "sections": sections
        }))
    };
    // A GPU function whose driver interface this godwit does not speak.
    let mut with_gpu = sections.clone();
    with_gpu.as_array_mut().unwrap().insert(
        1,
        serde_json::json!({"name": "gpu", "version": 1, "needs": {
            "profile": "GW8-1C", "abi": "9.9", "backend": "cpu", "vram": "1073741824"}}),
    );
    let gpu_abi = frame(serde_json::json!({
        "wire_version": wire::WIRE_VERSION, "guest": "x", "connections": 1, "session": 1,
        "snapshot": false, "sections": with_gpu
    }));
    let mut garbage = vec![0u8; 64];
    garbage[..4].copy_from_slice(b"HTTP");
    let mut page_outside = hello(wire::WIRE_VERSION);
    let mut p = 1u32.to_le_bytes().to_vec(); // section 1: ram
    p.extend_from_slice(&1u32.to_le_bytes());
    p.extend_from_slice(&(1u64 << 40).to_le_bytes());
    p.extend_from_slice(&[0xaa; 4096]);
    wire::write_raw(&mut page_outside, Kind::Pages, &p).unwrap();
    for (name, bytes, want) in [
        ("garbage", garbage, "not a godwit migration stream"),
        ("version", hello(99), "wire version 99, this godwit takes"),
        (
            "old",
            hello(wire::OLDEST_WIRE_VERSION - 1),
            "godwit takes 4",
        ),
        ("outside", page_outside, "not inside guest RAM"),
        ("gpu-abi", gpu_abi, "gpu: the source has abi 9.9"),
    ] {
        let gpu = dir.path("gpu");
        let extra = ["--gpu-dir", gpu.to_str().unwrap()];
        let (mut dst, addr) = destination(&dir, &format!("dst-{name}"), &extra);
        let mut c = TcpStream::connect(addr.strip_prefix("tcp:").unwrap()).unwrap();
        c.write_all(&bytes).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut sink = Vec::new();
        let _ = c.read_to_end(&mut sink);
        if name == "garbage" {
            // Not a godwit source: dropped, and the destination goes on waiting.
            wait_log(&dst.err, want);
            assert!(dst.proc.0.try_wait().unwrap().is_none(), "it ended");
            continue;
        }
        assert_eq!(exit_code(&mut dst, LIMIT), 1, "{name}");
        let e = read(&dst.err);
        assert!(e.contains(want), "{name}: {e}");
        assert!(!e.contains("panicked"), "{e}");
        assert!(read(&dst.log).is_empty(), "{name}: a guest ran");
    }
}

fn rss_kib(pid: u32) -> u64 {
    read(std::path::Path::new(&format!("/proc/{pid}/status")))
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// A peer cannot make the destination eat the host: a HELLO that claims 2 GiB and a
/// zero run over all of it leave the memory unallocated; a connection that is not a
/// godwit source (a port scan, an idle client, garbage, a trickle) is dropped and the
/// destination goes on waiting for the real one.
#[test]
fn a_peer_cannot_make_the_destination_eat_the_host_or_end_it() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("mig-claims");
    let (mut dst, addr) = destination(&dir, "dst", &[]);
    let tcp = addr.strip_prefix("tcp:").unwrap().to_string();
    // A port scan, garbage, and a first connection that says nothing: each dropped.
    drop(TcpStream::connect(&tcp).unwrap());
    let mut g = TcpStream::connect(&tcp).unwrap();
    g.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let mut sink = Vec::new();
    g.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let _ = g.read_to_end(&mut sink);
    // Idle first connections do not hold the real source back: it is answered while
    // they are still open (each is dropped only at its own deadline).
    let idle: Vec<TcpStream> = (0..5).map(|_| TcpStream::connect(&tcp).unwrap()).collect();
    let sections = serde_json::json!([
        {"name": "vcpus", "version": 1, "needs": {"count": "1"}},
        {"name": "ram", "version": 1, "needs": {"memory_mib": "2048", "layout": "0x0+0x80000000"}},
        {"name": "platform", "version": 1, "needs": {"guest": "godwit", "pci": "0:host-bridge"}}
    ]);
    let mut out = Vec::new();
    let hello = serde_json::json!({
        "wire_version": wire::WIRE_VERSION, "guest": "x", "connections": 1, "session": 1,
        "snapshot": false, "sections": sections
    });
    wire::write_raw(&mut out, Kind::Hello, hello.to_string().as_bytes()).unwrap();
    let mut c = TcpStream::connect(&tcp).unwrap();
    c.write_all(&out).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut buf = Vec::new();
    assert!(matches!(
        wire::read_frame(&mut c, &mut buf).unwrap(),
        wire::Frame::Accept(_)
    ));
    for mut i in &idle {
        i.set_nonblocking(true).unwrap();
        let mut b = [0u8; 1];
        assert!(
            matches!(i.read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "an idle connection was dealt with before the source"
        );
    }
    let before = rss_kib(dst.proc.0.id());
    let mut z = 1u32.to_le_bytes().to_vec(); // section 1: ram
    z.extend_from_slice(&1u32.to_le_bytes());
    z.extend_from_slice(&0u64.to_le_bytes());
    z.extend_from_slice(&((2048u32 << 20) / 4096).to_le_bytes());
    let mut out = Vec::new();
    wire::write_raw(&mut out, Kind::Zero, &z).unwrap();
    wire::write_raw(&mut out, Kind::Sync, &1u64.to_le_bytes()).unwrap();
    c.write_all(&out).unwrap();
    assert!(matches!(
        wire::read_frame(&mut c, &mut buf).unwrap(),
        wire::Frame::Synced(1)
    ));
    let after = rss_kib(dst.proc.0.id());
    assert!(
        after < before + 64 * 1024,
        "a 32-byte frame grew the destination from {before} to {after} KiB"
    );
    drop(c);
    drop(idle);
    assert_eq!(exit_code(&mut dst, LIMIT), 1);
}

/// Migration over TCP with TLS 1.3 and mutual certificates: a stranger (plain TCP
/// replaying a stream, or a source with another CA's certificate) does not get in and
/// the destination goes on waiting; the right source migrates the dirtier, which then
/// verifies all its memory. Plain TCP beyond loopback needs --insecure.
#[test]
fn tls_takes_only_the_right_source() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("mig-tls");
    let creds = dir.path("creds");
    let other = dir.path("other");
    for d in [&creds, &other] {
        let o = run(&["tls-creds", d.to_str().unwrap()], LIMIT);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let c = creds.to_str().unwrap();
    // A source that trusts the destination's CA but whose own certificate another CA
    // signed: only the destination's check of the client can stop it.
    let mixed = dir.path("mixed");
    std::fs::create_dir(&mixed).unwrap();
    std::fs::copy(creds.join("ca-cert.pem"), mixed.join("ca-cert.pem")).unwrap();
    for f in ["client-cert.pem", "client-key.pem"] {
        std::fs::copy(other.join(f), mixed.join(f)).unwrap();
    }
    let (mut dst, addr) = destination(&dir, "dst", &["--tls-dir", c]);
    // A plain stream (what a replayed snapshot would be) is dropped at the handshake.
    let mut s = TcpStream::connect(addr.strip_prefix("tcp:").unwrap()).unwrap();
    let mut out = Vec::new();
    wire::write_raw(&mut out, Kind::Hello, b"{}").unwrap();
    let _ = s.write_all(&out);
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut sink = Vec::new();
    let _ = s.read_to_end(&mut sink);
    let src = dirtier_source(&dir, "src", "128", &["wss=32", "rate=50", "seconds=6"]);
    // Another CA's source, and a source without TLS: refused, and the source runs on.
    for extra in [
        vec!["--tls-dir", mixed.to_str().unwrap()],
        vec!["--tls-dir", other.to_str().unwrap()],
        vec![],
    ] {
        let (out, r) = migrate(&src, &addr, &extra);
        assert_eq!(out.status.code(), Some(1), "{extra:?}: {r}");
        assert_eq!(r["source_running"], true, "{r}");
    }
    assert!(
        dst.proc.0.try_wait().unwrap().is_none(),
        "a stranger ended the destination"
    );
    assert!(
        read(&dst.err).contains("dropped a connection"),
        "{}",
        read(&dst.err)
    );
    // Its page data left to TLS's AEAD (copied into frames, which carry a CRC of their
    // head only).
    let (out, r) = migrate(&src, &addr, &["--tls-dir", c, "--page-checks", "transport"]);
    assert!(out.status.success(), "{r}");
    assert_eq!(r["status"], "completed");
    assert_eq!(r["page_checks"], "transport", "{r}");
    assert_eq!(exit_code(&mut dst, LIMIT), 0, "{}", read(&dst.err));
    assert!(read(&dst.log).contains("verify ok"), "{}", read(&dst.log));
    // Plain TCP beyond loopback: refused on both sides unless --insecure.
    let (out, r) = migrate(&src, "tcp:192.0.2.1:4444", &[]);
    assert_eq!(out.status.code(), Some(1));
    let _ = r;
    assert!(stderr(&out).contains("--insecure"), "{}", stderr(&out));
    let o = run(&["run", "--incoming", "tcp:0.0.0.0:0"], LIMIT);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--tls-dir"), "{}", stderr(&o));
}
