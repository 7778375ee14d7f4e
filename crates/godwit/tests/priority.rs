//! Who comes first on a shared core while pre-copy runs: the source's vCPUs lowered
//! when asked (`--vcpu-priority low`), the migration's own threads raised when asked
//! (`--migration-priority`), and every thread's weight given back whatever the outcome,
//! none of it inherited by the VM's threads.

mod common;
use common::mig::*;
use common::*;
use serde_json::Value;

/// Every thread of `vm`'s process: its name and its nice value.
fn nices(vm: &Vm) -> Vec<(String, i64)> {
    let pid = vm.proc.0.id();
    let mut all = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let t = t.unwrap().path();
        // A thread that ended since the listing.
        let (Ok(comm), Ok(stat)) = (
            std::fs::read_to_string(t.join("comm")),
            std::fs::read_to_string(t.join("stat")),
        ) else {
            continue;
        };
        // After the command's closing parenthesis: state is field 3, nice field 19.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        all.push((
            comm.trim().to_string(),
            rest.split(' ').nth(16).unwrap().parse().unwrap(),
        ));
    }
    all
}

/// The nice value of `vm`'s thread named `name`.
fn nice(vm: &Vm, name: &str) -> i64 {
    nices(vm)
        .into_iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no thread {name} in {:?}", nices(vm)))
        .1
}

/// Whether a thread of this process may go to `to` and back to 0 (CAP_SYS_NICE where
/// either way lowers a nice value), tried on a scratch thread.
fn may_go_and_come_back(to: i32) -> bool {
    std::thread::spawn(move || {
        // SAFETY: setpriority on this scratch thread alone (who 0: the caller).
        unsafe {
            libc::setpriority(libc::PRIO_PROCESS, 0, to) == 0
                && libc::setpriority(libc::PRIO_PROCESS, 0, 0) == 0
        }
    })
    .join()
    .unwrap()
}

/// Waits until `src`'s pre-copy has sent a MiB (the weights are taken before its
/// first page; a migration before it ended in another phase).
fn wait_precopy_pages(src: &Vm) {
    wait_for(LIMIT, || {
        let (_, b) = godwit_vmm::api::call(&src.sock, "GET", "vm.migration").ok()?;
        let v: Value = serde_json::from_str(&b).ok()?;
        let p = &v["progress"];
        (v["active"] == true && p["phase"] == "precopy" && p["bytes_sent"].as_u64()? > 1 << 20)
            .then_some(())
    })
    .expect("no pages sent");
}

/// Cancels `src`'s migration `m`; the VM runs on at the source, the destination ends.
fn cancel(src: &Vm, m: std::thread::JoinHandle<std::process::Output>, dst: &mut Vm) -> Value {
    let o = cli(src, &["migrate-cancel"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = m.join().unwrap();
    let r: Value = serde_json::from_str(&stdout(&out)).unwrap_or_default();
    assert_eq!(r["status"], "cancelled", "{r} {}", stderr(&out));
    assert_ne!(exit_code(dst, LIMIT), 0);
    assert_eq!(info(src)["state"], "running");
    r
}

/// With `--vcpu-priority low` the source's vCPUs run at the lowest fair weight while
/// pre-copy runs, and a migration that ends without moving the VM (here a cancel) gives
/// them their weight back; `normal` (the default) leaves them alone. A process that may
/// not give the weight back (no CAP_SYS_NICE) keeps its vCPUs as they are, and its
/// report says `normal`.
#[test]
fn the_vcpus_yield_to_pre_copy_and_get_their_weight_back() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("priority-vcpus");
    let src = dirtier_source(&dir, "src", "256", &["wss=96", "rate=20", "seconds=0"]);
    assert_eq!(nice(&src, "vcpu0"), 0);
    for (asked, nth) in [("normal", 1), ("low", 2)] {
        let (mut dst, addr) = destination(&dir, &format!("dst{nth}"), &[]);
        let m = migrating(
            &src,
            &addr,
            &["--max-bandwidth", "8M", "--vcpu-priority", asked],
        );
        wait_precopy_pages(&src);
        let during = nice(&src, "vcpu0");
        let r = cancel(&src, m, &mut dst);
        let got = r["vcpu_priority"].as_str().unwrap();
        let expected = if asked == "low" && may_go_and_come_back(19) {
            "low"
        } else {
            "normal"
        };
        assert_eq!(got, expected, "{asked}: {r}");
        assert_eq!(during, if got == "low" { 19 } else { 0 }, "{asked}: {r}");
        assert_eq!(
            nice(&src, "vcpu0"),
            0,
            "{asked}: the weight did not come back"
        );
    }
}

/// With `--migration-priority destination` the destination's readers run at the
/// highest fair weight while pre-copy runs; with `both` (or `source`), so do the
/// source's migration thread and its connection's writer, the guest's vCPU at its own
/// weight either way. A cancel gives every thread of the source its weight back, and a
/// VM that arrives runs with no thread raised (none of its threads inherited the
/// readers' weight). `normal`, the default, raises none. Without CAP_SYS_NICE nothing
/// is raised and the report says `normal`.
#[test]
fn the_migration_threads_go_first_in_pre_copy_and_get_their_weight_back() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("priority-migration");
    let src = dirtier_source(&dir, "src", "256", &["wss=96", "rate=20", "seconds=0"]);
    let allowed = may_go_and_come_back(-20);
    for (asked, nth) in [("normal", 1), ("destination", 2), ("both", 3)] {
        let (mut dst, addr) = destination(&dir, &format!("dst{nth}"), &[]);
        // `normal` as the default: not named.
        let mut args = vec!["--max-bandwidth", "8M"];
        if asked != "normal" {
            args.extend(["--migration-priority", asked]);
        }
        let m = migrating(&src, &addr, &args);
        wait_precopy_pages(&src);
        let here = allowed && asked == "both";
        let there = allowed && asked != "normal";
        let want = if here { -20 } else { 0 };
        let (thread, writer) = (nice(&src, "migration"), nice(&src, "migration-send1"));
        let readers = nices(&dst).iter().filter(|(_, n)| *n == -20).count();
        assert_eq!(
            (thread, writer, nice(&src, "vcpu0")),
            (want, want, 0),
            "{asked}"
        );
        // The main connection's reader and the second's.
        assert_eq!(
            readers,
            if there { 2 } else { 0 },
            "{asked}: {:?}",
            nices(&dst)
        );
        let r = cancel(&src, m, &mut dst);
        // The destination's part comes with READY, which a cancel never sees.
        let got = if here { "source" } else { "normal" };
        assert_eq!(r["migration_priority"], got, "{asked}: {r}");
        let left: Vec<_> = nices(&src).into_iter().filter(|(_, n)| *n != 0).collect();
        assert!(
            left.is_empty(),
            "{asked}: the weight did not come back: {left:?}"
        );
    }
    // Moved for good: what runs at the destination has its own weight.
    let (dst, addr) = destination(&dir, "dst4", &[]);
    let (out, r) = migrate(&src, &addr, &["--migration-priority", "destination"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let got = if allowed { "destination" } else { "normal" };
    assert_eq!(r["migration_priority"], got, "{r}");
    wait_for(LIMIT, || (info(&dst)["state"] == "running").then_some(()))
        .expect("the VM runs at the destination");
    assert_eq!(nice(&dst, "vcpu0"), 0);
    let left: Vec<_> = nices(&dst).into_iter().filter(|(_, n)| *n != 0).collect();
    assert!(left.is_empty(), "raised at the destination: {left:?}");
}
