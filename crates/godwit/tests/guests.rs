//! godwit's own guests under KVM: each program does its job and exits with its code.

mod common;
use common::*;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(60);

#[test]
fn heartbeat_reaches_n_beats_in_order() {
    if !kvm_available() {
        return;
    }
    let o = run(&["run", "heartbeat", "--", "period=20", "count=12"], LIMIT);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.starts_with("godwit-rt: heartbeat starting (platform=godwit vcpus=1 ram=256MiB"),
        "{out}"
    );
    let seqs: Vec<u64> = out
        .lines()
        .filter_map(|l| {
            l.strip_prefix("heartbeat seq=")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    assert_eq!(seqs, (1..=12).collect::<Vec<_>>());
    // Guest time advances by about one period per beat.
    let times: Vec<f64> = out
        .lines()
        .filter_map(|l| l.split("guest_ms=").nth(1)?.parse().ok())
        .collect();
    let span = times.last().unwrap() - times[0];
    assert!(
        (200.0..2000.0).contains(&span),
        "11 periods of 20 ms took {span} ms of guest time"
    );
}

#[test]
fn dirtier_verifies_all_of_its_memory() {
    if !kvm_available() {
        return;
    }
    let o = run(
        &[
            "run",
            "--memory",
            "256",
            "dirtier",
            "--",
            "wss=32",
            "rate=flat",
            "seconds=2",
            "verify-every=1",
        ],
        LIMIT,
    );
    let out = stdout(&o);
    assert!(o.status.success(), "{out}\n{}", stderr(&o));
    assert!(
        out.contains("dirtier: touched wss=32MiB pages=8192"),
        "{out}"
    );
    assert!(
        out.matches("dirtier: verify ok pages=8192").count() >= 2,
        "{out}"
    );
    assert!(out.contains("result=ok"), "{out}");
}

#[test]
fn dirtier_rate_limit_holds() {
    if !kvm_available() {
        return;
    }
    let o = run(
        &["run", "dirtier", "--", "wss=16", "rate=50", "seconds=2"],
        LIMIT,
    );
    let out = stdout(&o);
    assert!(o.status.success(), "{out}");
    let rates: Vec<u64> = out
        .lines()
        .filter_map(|l| {
            l.split("rate_mibs=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    assert!(!rates.is_empty(), "{out}");
    assert!(
        rates.iter().all(|r| (40..=60).contains(r)),
        "asked 50 MiB/s, saw {rates:?}"
    );
}

#[test]
fn dirtier_refuses_a_working_set_larger_than_memory() {
    if !kvm_available() {
        return;
    }
    let o = run(
        &["run", "--memory", "64", "dirtier", "--", "wss=128"],
        LIMIT,
    );
    assert_eq!(o.status.code(), Some(2), "{}", stdout(&o));
    assert!(stdout(&o).contains("not enough guest memory for wss=128MiB"));
}

#[test]
fn two_vcpus_run_at_the_same_time() {
    if !kvm_available() {
        return;
    }
    let o = run(&["run", "--vcpus", "2", "smp", "--", "ms=300"], LIMIT);
    let out = stdout(&o);
    assert!(o.status.success(), "{out}\n{}", stderr(&o));
    assert!(out.contains("smp: vcpu 1 online"), "{out}");
    assert!(out.contains("smp: vcpus=2 concurrent=2 result=ok"), "{out}");
}

#[test]
fn pci_enumeration_finds_the_host_bridge_through_ecam() {
    if !kvm_available() {
        return;
    }
    let o = run(&["run", "pci-scan"], LIMIT);
    let out = stdout(&o);
    assert!(o.status.success(), "{out}");
    assert!(
        out.contains("pci: 00:00.0 vendor=8086 device=0d57 class=060000 header=0"),
        "{out}"
    );
    assert!(out.contains("pci: 1 functions"), "{out}");
}

#[test]
fn console_goes_to_a_file_and_exit_codes_pass_through() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("console");
    let log = dir.path("console.log");
    let spec = format!("file:{}", log.display());
    let o = run(
        &[
            "run",
            "--console",
            &spec,
            "heartbeat",
            "--",
            "count=3",
            "period=1",
        ],
        LIMIT,
    );
    assert!(o.status.success());
    assert!(stdout(&o).is_empty());
    assert_eq!(read(&log).matches("heartbeat seq=").count(), 3);
    // A guest argument error is the guest's own exit code 2.
    let o = run(&["run", "heartbeat", "--", "count=lots"], LIMIT);
    assert_eq!(o.status.code(), Some(2));
    assert!(stdout(&o).contains("bad value for count"));
}

#[test]
fn guest_images_can_be_exported_and_booted_from_a_file() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("export");
    let o = run(
        &["guests", "export", "--out", dir.0.to_str().unwrap()],
        LIMIT,
    );
    assert!(o.status.success());
    let img = dir.path("heartbeat.elf");
    let o = run(
        &["run", img.to_str().unwrap(), "--", "count=2", "period=1"],
        LIMIT,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).matches("heartbeat seq=").count(), 2);
}
