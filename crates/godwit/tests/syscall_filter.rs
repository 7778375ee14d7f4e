//! `godwit run`'s system-call filter (seccomp) on real processes: every thread of a VM is
//! under it (each vCPU thread and page reader under its own narrower one too), and a
//! migration that uses most of what godwit does (a guest's vCPU and its memory, the API,
//! TCP, userfaultfd and post-copy's threads at the destination, the background stream
//! and page requests at the source) goes through with both ends in `--seccomp kill`
//! mode, where a single call outside the filter would kill a process, and in
//! `--seccomp log` mode, where one would be named. (The filter's refusals themselves:
//! `seccomp::tests` in the godwit crate.)

mod common;

use common::gpuhost::*;
use common::mig::*;
use common::*;
use serde_json::Value;

/// A field of a /proc status file's `text`.
fn field(text: &str, name: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| panic!("no {name} in {text}"))
}

/// The filters over this test itself (a CI runner may have its own): a godwit started
/// from here has these and its own on top.
fn inherited_filters() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    field(&status, "Seccomp_filters:").parse().unwrap_or(0)
}

/// Each thread of `pid` (but the workers KVM's kernel side runs in the process, such as
/// `kvm-nx-lpage-recovery`, which run no user code and take the filters of whichever
/// vCPU thread made them): its name, seccomp mode, filters and no_new_privs. A thread
/// that ends while it is read is left out; none, if the process has ended.
fn threads(pid: u32) -> Vec<(String, String, u32, String)> {
    let mut v = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return v;
    };
    for t in tasks.flatten() {
        let path = format!("/proc/{pid}/task/{}", t.file_name().to_string_lossy());
        let (Ok(name), Ok(status)) = (
            std::fs::read_to_string(format!("{path}/comm")),
            std::fs::read_to_string(format!("{path}/status")),
        ) else {
            continue;
        };
        if name.starts_with("kvm-") {
            continue;
        }
        v.push((
            name.trim().to_string(),
            field(&status, "Seccomp:"),
            field(&status, "Seccomp_filters:").parse().unwrap(),
            field(&status, "NoNewPrivs:"),
        ));
    }
    v
}

/// Whether a thread adds two filters of its own: a vCPU thread, a page reader, a GPU
/// engine (`gpuN-vfM`), a new connection's reader (`opening`), a destination's
/// post-copy recovery thread, a source's migration thread and those it starts (its
/// connections' writers, post-copy's background stream; not the watcher of the VM's
/// end, started before it).
fn confined(name: &str) -> bool {
    name == "migration"
        || [
            "migration-send",
            "migration-push",
            "vcpu",
            "migration-recv",
            "postcopy-in",
            // postcopy-recovery, cut to 15 bytes by the kernel.
            "postcopy-recov",
            "restore-",
            "gpu",
            "opening",
        ]
        .iter()
        .any(|p| name.starts_with(p))
}

/// A source under `--seccomp mode` whose guest rewrites 32 MiB at 50 MB/s for 10 s
/// (faster than the tests' capped links carry it), once it has touched them.
fn dirtier_under(dir: &TempDir, mode: &str) -> Vm {
    let mut args = vec!["--seccomp", mode, "-m", "256", "dirtier", "--"];
    args.extend(["wss=32", "rate=50", "seconds=10", "report-every=250"]);
    let src = source(dir, "src", &args);
    wait_log(&src.log, "touched");
    src
}

#[test]
fn a_postcopy_migration_with_both_ends_killed_at_any_call_outside_the_filter_verifies() {
    if !kvm_available() || !common::seccomp::available() {
        return;
    }
    let own = inherited_filters();
    let dir = TempDir::new("filter-kill");
    let mut src = dirtier_under(&dir, "kill");
    let (mut dst, addr) = destination(&dir, "dst", &["--seccomp", "kill"]);
    // Slow enough that the guest faults on pages not yet pushed.
    let m = migrating(
        &src,
        &addr,
        &["--mode", "postcopy", "--max-bandwidth", "16M"],
    );
    // While post-copy runs, every thread of both ends (API, migration, userfaultfd and
    // background threads among them) is under godwit's two filters, and each vCPU thread,
    // page reader (the destination's post-copy readers) and the source's migration
    // threads (the one that answers page requests, its writers, its background stream)
    // under its own too.
    wait_for(LIMIT, || info(&dst)["arriving"]["ram"].as_u64())
        .expect("the destination never showed its memory arriving");
    // A thread shows in /proc as it is made, before it adds its own filters: a check
    // that finds one so is made again.
    let check = |end: &str, pid: u32| -> Result<(), String> {
        let threads = threads(pid);
        let has = |p: &str| threads.iter().any(|t| t.0.starts_with(p));
        let whole = if end == "destination" {
            has("postcopy-in")
        } else {
            threads.iter().any(|t| t.0 == "migration")
                && has("migration-send")
                && has("migration-push")
        };
        if !has("vcpu0") || threads.len() < 3 || !whole {
            return Err(format!("{end}: {threads:?}"));
        }
        for t in &threads {
            let n = own + 2 + 2 * u32::from(confined(&t.0));
            if (t.1.as_str(), t.2, t.3.as_str()) != ("2", n, "1") {
                return Err(format!("{end}: {t:?}, not {n} filters"));
            }
        }
        Ok(())
    };
    for (end, pid) in [
        ("source", src.proc.0.id()),
        ("destination", dst.proc.0.id()),
    ] {
        let mut first = None;
        let held = wait_for(LIMIT, || match check(end, pid) {
            Ok(()) => Some(()),
            Err(e) => {
                first.get_or_insert(e);
                None
            }
        });
        assert!(held.is_some(), "first seen: {}", first.unwrap_or_default());
    }
    let out = m.join().unwrap();
    let r: Value = serde_json::from_str(&stdout(&out)).unwrap_or_default();
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert_postcopy_whole(&r);
    assert!(r["postcopy"]["remote_faults"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(exit_code(&mut src, LIMIT), 0, "{}", read(&src.err));
    assert_verified(&mut dst, 8192);
}

#[test]
fn a_vm_is_under_the_filter_by_default_and_under_none_with_seccomp_off() {
    if !kvm_available() || !common::seccomp::available() {
        return;
    }
    let own = inherited_filters();
    let dir = TempDir::new("filter-off");
    for (name, extra, filters) in [("default", None, own + 2), ("off", Some("off"), own)] {
        let mut args = vec![];
        if let Some(mode) = extra {
            args.extend(["--seccomp", mode]);
        }
        args.extend(["heartbeat", "--", "count=0"]);
        let vm = source(&dir, name, &args);
        wait_log(&vm.log, "heartbeat");
        assert_eq!(
            info(&vm)["seccomp"],
            if name == "off" { "off" } else { "refuse" }
        );
        for t in threads(vm.proc.0.id()) {
            let vcpu = 2 * u32::from(filters > own && confined(&t.0));
            assert_eq!(t.2, filters + vcpu, "{name}: {t:?}");
            let mode = if filters == 0 { "0" } else { "2" };
            assert_eq!(t.1, mode, "{name}: {t:?}");
        }
        let off = cli(&vm, &["shutdown"]);
        assert!(off.status.success(), "{}", stderr(&off));
    }
    let bad = run(&["run", "--seccomp", "sometimes"], LIMIT);
    assert!(!bad.status.success());
    assert!(
        stderr(&bad).contains("invalid value 'sometimes' for '--seccomp"),
        "{}",
        stderr(&bad)
    );
}

/// A SIGTERM sent to the process may land on any thread that does not block it, a vCPU
/// thread among them: its handler (which wakes godwit's signal thread with a send(2))
/// runs there under the vCPU's own filter. In kill mode a refusal would kill the
/// process; it must end as a SIGTERM ends it, the VM stopped and the reason said.
#[test]
fn a_sigterm_that_lands_on_a_vcpu_thread_ends_the_vm_cleanly_in_kill_mode() {
    if !kvm_available() || !common::seccomp::available() {
        return;
    }
    let dir = TempDir::new("filter-sigterm");
    let mut vm = source(
        &dir,
        "vm",
        &["--seccomp", "kill", "heartbeat", "--", "count=0"],
    );
    wait_log(&vm.log, "heartbeat");
    let pid = vm.proc.0.id();
    let vcpu = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|t| t.unwrap().file_name().into_string().unwrap())
        .find(|tid| {
            std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm"))
                .is_ok_and(|c| c.trim() == "vcpu0")
        })
        .expect("no vcpu0 thread");
    // SAFETY: a signal to a thread of the child this test started and has not reaped.
    let sent = unsafe {
        libc::syscall(
            libc::SYS_tgkill,
            pid,
            vcpu.parse::<i32>().unwrap(),
            libc::SIGTERM,
        )
    };
    assert_eq!(sent, 0);
    let code = exit_code(&mut vm, LIMIT);
    let err = read(&vm.err);
    assert_eq!(code, 128 + libc::SIGTERM, "{err}");
    assert!(err.contains("SIGTERM: stopping the VM"), "{err}");
}

/// The source's pages, states and rounds are read at the destination by one reader per
/// connection, the main one's too (it loads the states: the vCPUs', the platform's), and
/// sent by the source's migration thread (which hears the destination's answers) and
/// one writer per connection, each under its narrower filters while pre-copy runs; the
/// source dials the destination by name (looked up before its thread may open the
/// resolver's files). In kill mode the dirtier moved over three connections verifies.
#[test]
fn a_precopy_migration_is_sent_and_read_under_the_migration_threads_filters() {
    if !kvm_available() || !common::seccomp::available() {
        return;
    }
    let own = inherited_filters();
    let dir = TempDir::new("filter-readers");
    // Rewriting slower than the link carries: pre-copy converges while the guest runs.
    let kill = ["--seccomp", "kill"];
    let dirty = ["wss=32", "rate=4", "seconds=0", "verify-every=1"];
    let mut src = dirtier_source_under(&dir, "src", &kill, "256", &dirty);
    let (mut dst, addr) = destination(&dir, "dst", &kill);
    let by_name = addr.replace("127.0.0.1", "localhost");
    let m = migrating(
        &src,
        &by_name,
        &[
            "--mode",
            "precopy",
            "--connections",
            "3",
            "--max-bandwidth",
            "16M",
        ],
    );
    // The source's watcher of its VM's end starts before the migration thread holds
    // itself, and reads nothing from the destination.
    for (end, pid, want) in [
        (
            "destination",
            dst.proc.0.id(),
            ["migration-recv0", "migration-recv1", "migration-recv2"],
        ),
        (
            "source",
            src.proc.0.id(),
            ["migration", "migration-send1", "migration-send2"],
        ),
    ] {
        // A thread shows in /proc as it is made, before it adds its filters: waited for.
        let mut first = None;
        let held = wait_for(LIMIT, || {
            let seen: Vec<_> = threads(pid)
                .into_iter()
                .filter(|t| t.0.starts_with("migration") && t.0 != "migration-watch")
                .collect();
            let mut names: Vec<&str> = seen.iter().map(|t| t.0.as_str()).collect();
            names.sort_unstable();
            let filtered = seen
                .iter()
                .all(|t| (t.1.as_str(), t.2, t.3.as_str()) == ("2", own + 4, "1"));
            if names == want && filtered {
                return Some(());
            }
            if !seen.is_empty() {
                first.get_or_insert(seen);
            }
            None
        });
        assert!(held.is_some(), "the {end}'s threads, first seen: {first:?}");
    }
    let out = m.join().unwrap();
    let r: Value = serde_json::from_str(&stdout(&out)).unwrap_or_default();
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert_eq!(
        (&r["status"], &r["mode"]),
        (&"completed".into(), &"precopy".into()),
        "{r}"
    );
    assert_eq!(exit_code(&mut src, LIMIT), 0, "{}", read(&src.err));
    verified_and_shut_down(&mut dst, "verify ok pages=8192");
    assert_eq!(exit_code(&mut dst, LIMIT), 0, "{}", read(&dst.err));
}

/// `--seccomp log` on both ends of a hybrid migration: the listener thread is there,
/// under the filter like the rest, and a migration that goes through pre-copy and
/// post-copy makes no call outside the filter, so neither end names one.
#[test]
fn a_hybrid_migration_with_both_ends_in_log_mode_verifies_and_names_no_call() {
    if !kvm_available() || !common::seccomp::available() {
        return;
    }
    let own = inherited_filters();
    let dir = TempDir::new("filter-log");
    let mut src = dirtier_under(&dir, "log");
    let (mut dst, addr) = destination(&dir, "dst", &["--seccomp", "log"]);
    let m = migrating(&src, &addr, &["--mode", "hybrid", "--max-bandwidth", "16M"]);
    wait_for(LIMIT, || info(&dst)["arriving"]["ram"].as_u64())
        .expect("the destination never showed its memory arriving");
    for (end, vm) in [("source", &src), ("destination", &dst)] {
        assert_eq!(info(vm)["seccomp"], "log", "{end}");
        let threads = threads(vm.proc.0.id());
        let log = threads.iter().find(|t| t.0 == "seccomp-log");
        assert_eq!(log.map(|t| t.2), Some(own + 2), "{end}: {threads:?}");
    }
    let out = m.join().unwrap();
    let r: Value = serde_json::from_str(&stdout(&out)).unwrap_or_default();
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert_eq!(r["mode"], "hybrid", "{r}");
    // A guest rewriting faster than the link: pre-copy rounds, then post-copy.
    assert!(!r["rounds"].as_array().unwrap().is_empty(), "{r}");
    assert_postcopy_whole(&r);
    assert_eq!(exit_code(&mut src, LIMIT), 0, "{}", read(&src.err));
    assert_verified(&mut dst, 8192);
    for (end, err) in [("source", read(&src.err)), ("destination", read(&dst.err))] {
        assert!(err.contains("--seccomp log: calls outside"), "{end}: {err}");
        assert!(!err.contains("godwit: seccomp"), "{end}: {err}");
    }
}

/// A GPU VM moved in post-copy with both ends in kill mode: each end's GPU engine (which
/// runs what the guest's driver submits) is under its own filter too, and at the
/// destination it brings in every page a command touches before running it
/// (`--gpu-prefetch always`) and faults on the rest, all within that filter; gpu-train
/// ends with the answer of a run never moved.
#[test]
fn a_gpu_vm_moved_in_postcopy_with_both_ends_in_kill_mode_ends_right() {
    if !kvm_available() || !common::seccomp::available() {
        return;
    }
    let own = inherited_filters();
    let d = host("filter-gpu", 1, &[]);
    let g = gpu_dir(&d);
    let mut args = vec!["--seccomp", "kill", "--gpu", "GW8-1C", "--gpu-dir", &g];
    args.extend(["gpu-train", "--"]);
    args.extend(TRAIN);
    let mut src = source(&d, "src", &args);
    let (mut dst, addr) = destination(
        &d,
        "dst",
        &[
            "--seccomp",
            "kill",
            "--gpu-dir",
            &g,
            "--gpu-prefetch",
            "always",
        ],
    );
    wait_log(&src.log, "iteration 2000 ");
    let engine = |pid: u32| {
        let threads = threads(pid);
        let t = threads.iter().find(|t| t.0.starts_with("gpu0-vf")).cloned();
        (t.map(|t| t.2), threads)
    };
    let (n, threads) = engine(src.proc.0.id());
    assert_eq!(n, Some(own + 4), "source: {threads:?}");
    let m = migrating(
        &src,
        &addr,
        &["--mode", "postcopy", "--max-bandwidth", "32M"],
    );
    // Its engine starts as the GPU's state arrives, before the VM runs there.
    // A thread shows in /proc as it is made, before it adds its filters: waited for.
    if wait_for(LIMIT, || {
        (engine(dst.proc.0.id()).0 == Some(own + 4)).then_some(())
    })
    .is_none()
    {
        panic!("destination: {:?}", engine(dst.proc.0.id()).1);
    }
    let out = m.join().unwrap();
    let r: Value = serde_json::from_str(&stdout(&out)).unwrap_or_default();
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert_postcopy_whole(&r);
    assert!(
        r["postcopy"]["missing_pages"]["gpu"].as_u64().unwrap() > 0,
        "{r}"
    );
    assert_eq!(exit_code(&mut src, LIMIT), 0, "{}", read(&src.err));
    assert_eq!(exit_code(&mut dst, LIMIT), 0, "{}", read(&dst.err));
    assert_trained(&read(&dst.log));
}

/// Whoever reaches a destination's listener is read first by an `opening` thread (the
/// TLS handshake, the first frame) under the narrower filters: before it says HELLO,
/// nothing shows it is a godwit source. One that says something else is dropped, and a
/// source that comes after it migrates its VM in.
#[test]
fn a_connection_not_yet_shown_to_be_a_source_is_read_under_a_narrower_filter() {
    use std::io::Write;
    if !kvm_available() || !common::seccomp::available() {
        return;
    }
    let own = inherited_filters();
    let dir = TempDir::new("filter-opening");
    let (mut dst, addr) = destination(&dir, "dst", &[]);
    let mut stranger = std::net::TcpStream::connect(addr.strip_prefix("tcp:").unwrap()).unwrap();
    // A thread shows in /proc as it is made, before it adds its filters: waited for.
    let opening = |t: &(String, String, u32, String)| t.0 == "opening";
    let held = wait_for(LIMIT, || {
        let t = threads(dst.proc.0.id()).into_iter().find(opening)?;
        (t.1 == "2" && t.2 == own + 4).then_some(())
    });
    if held.is_none() {
        let seen: Vec<_> = threads(dst.proc.0.id())
            .into_iter()
            .filter(opening)
            .collect();
        panic!("no opening thread under its own filters: {seen:?}");
    }
    stranger.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    wait_log(
        &dst.err,
        "dropped a connection that did not open as a godwit source",
    );
    let mut src = source(&dir, "src", &["heartbeat", "--", "count=0"]);
    wait_log(&src.log, "heartbeat");
    let (out, r) = migrate(&src, &addr, &[]);
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert_eq!(r["status"], "completed", "{r}");
    assert_eq!(exit_code(&mut src, LIMIT), 0, "{}", read(&src.err));
    wait_for(LIMIT, || (info(&dst)["state"] == "running").then_some(()))
        .expect("the VM never ran at the destination");
    let off = cli(&dst, &["shutdown"]);
    assert!(off.status.success(), "{}", stderr(&off));
    exit_code(&mut dst, LIMIT);
}
