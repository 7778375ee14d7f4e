//! A destination that readies its memory before the source connects (`run --incoming
//! --memory M --prefault`): the migration lays its pages on memory that is already
//! there, and every page the guest reads is the source's.

mod common;

use common::mig::*;
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
/// destination gives its memory back when the source says so (HELLO), not page run by
/// page run inside the pause, and the guest verifies.
#[test]
fn a_prefaulted_destination_gives_its_memory_back_for_a_postcopy_from_the_start() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("pc-prefault-post");
    let mut src = dirtier_source(
        &dir,
        "src",
        "512",
        &["wss=64", "rate=200", "seconds=6", "report-every=250"],
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
    assert!(
        read(&dst.err).contains("prefaulted memory given back"),
        "{}",
        read(&dst.err)
    );
    assert_eq!(exit_code(&mut src, LIMIT), 0, "{}", read(&src.err));
    assert_verified(&mut dst, 16384);
}
