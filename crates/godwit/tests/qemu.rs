//! The very same guest images boot under QEMU 7.2 through their PVH entry, so that
//! benchmarks compare the two VMMs on one image.

mod common;
use common::*;
use std::process::Command;
use std::time::Duration;

fn qemu(image: &std::path::Path, append: &str) -> std::process::Output {
    let out = Command::new("timeout")
        .args([
            "120",
            "qemu-system-x86_64",
            "-enable-kvm",
            "-cpu",
            "host,-arch-capabilities",
            "-m",
            "256",
        ])
        .args([
            "-nodefaults",
            "-nographic",
            "-serial",
            "stdio",
            "-monitor",
            "none",
        ])
        .args([
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=4",
            "-append",
            append,
            "-kernel",
        ])
        .arg(image)
        .output()
        .expect("qemu-system-x86_64 (apt qemu-system-x86; the README's test command installs it)");
    assert_ne!(out.status.code(), Some(124), "QEMU timed out");
    out
}

#[test]
fn guest_images_boot_under_qemu_too() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("qemu");
    assert!(run(
        &["guests", "export", "--out", dir.0.to_str().unwrap()],
        Duration::from_secs(30)
    )
    .status
    .success());

    let o = qemu(&dir.path("heartbeat.elf"), "period=20 count=5");
    let out = stdout(&o);
    // isa-debug-exit: QEMU's status is (guest code << 1) | 1.
    assert_eq!(o.status.code(), Some(1), "{out}\n{}", stderr(&o));
    assert!(
        out.contains("godwit-rt: heartbeat starting (platform=pvh"),
        "{out}"
    );
    assert!(out.contains("heartbeat seq=5 "), "{out}");

    let o = qemu(&dir.path("dirtier.elf"), "wss=16 rate=flat seconds=1");
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert!(stdout(&o).contains("result=ok"));

    let o = qemu(&dir.path("pci-scan.elf"), "");
    assert!(
        stdout(&o).contains("pci: 00:00.0 vendor=8086"),
        "{}",
        stdout(&o)
    );

    // A crash is reported through the PVH fault stubs: exit code 0x80 + vector.
    let o = qemu(&dir.path("fault.elf"), "kind=ud");
    assert_eq!(o.status.code(), Some(((0x80 + 6) << 1 | 1) & 0xff));
}

/// `bench migrate`, one run of 256 MiB at a 300 ms limit, with `args` besides, as JSON.
fn bench_migrate(args: &[&str]) -> std::process::Output {
    let mut a = vec![
        "bench",
        "migrate",
        "--runs",
        "1",
        "--memory",
        "256",
        "--downtime-ms",
        "300",
        "--json",
    ];
    a.extend(args);
    run(&a, Duration::from_secs(300))
}

/// `bench migrate` migrates the same guest with godwit and with QEMU and reports, for
/// each run of each, how much of a CPU the guest's vCPU got meanwhile: something for
/// a guest that keeps writing, and never more than its one vCPU can take, whichever
/// VMM's threads it had to find by name.
#[test]
fn the_migration_bench_sees_the_guests_cpu_under_both_vmms() {
    if !kvm_available() {
        return;
    }
    let o = bench_migrate(&["--workloads", "64m@100m", "--qemu-multifd", "0"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("JSON");
    let cell = &r["cells"][0];
    for side in ["godwit", "qemu"] {
        let s = &cell[side]["samples"];
        assert_eq!(s.as_array().map(Vec::len), Some(1), "{side}: {cell}");
        let cpu = s[0]["guest_cpu"].as_f64().unwrap_or(f64::NAN);
        assert!(cpu > 0.0 && cpu <= 1.05, "{side}: guest_cpu {cpu}");
    }
}

/// `bench migrate --own-sessions` starts every VMM process, godwit's and QEMU's, source
/// and destination, in a scheduling group of its own (the bench checks each one's
/// autogroup and fails if any shares one); where sessions are no scheduling groups
/// (autogroup off) it refuses at once and says why.
#[test]
fn the_migration_bench_can_give_each_vmm_a_scheduling_group_of_its_own() {
    if !kvm_available() {
        return;
    }
    let o = bench_migrate(&["--workloads", "idle", "--own-sessions"]);
    let autogroup = std::fs::read_to_string("/proc/sys/kernel/sched_autogroup_enabled").ok();
    if autogroup.as_deref().map(str::trim) != Some("1") {
        assert!(!o.status.success());
        assert!(
            stderr(&o).contains("no scheduling group of its own"),
            "{}",
            stderr(&o)
        );
        return;
    }
    assert!(o.status.success(), "{}", stderr(&o));
    let r: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("JSON");
    assert_eq!(r["own_sessions"], true, "{r}");
    let cell = &r["cells"][0];
    for side in ["godwit", "qemu", "qemu_multifd"] {
        let s = &cell[side]["samples"];
        assert_eq!(s.as_array().map(Vec::len), Some(1), "{side}: {cell}");
    }
}
