//! Exactly one running VM under any delay: a man in the middle holds back, trickles or
//! stalls each step of the handshake, and whatever the user then asks, the VM never
//! runs twice, the pause stays bounded, and a cancel before GO works.

mod common;
use common::mig::*;
use common::*;
use godwit_migration::wire::Kind;
use serde_json::Value;
use std::sync::atomic::Ordering;
use std::time::Duration;

fn heartbeat_source(dir: &TempDir) -> Vm {
    let src = source(dir, "src", &["heartbeat", "--", "period=20", "count=0"]);
    wait_log(&src.log, "seq=3 ");
    src
}

fn still_running(vm: &mut Vm) -> bool {
    vm.proc.0.try_wait().unwrap().is_none()
}

/// GO held back past the destination's window: the destination refuses it and says so,
/// and the source takes the VM back; the VM never runs there.
#[test]
fn a_late_go_is_refused_and_the_source_takes_the_vm_back() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("handover-go");
    let src = heartbeat_source(&dir);
    let (mut dst, addr) = destination(&dir, "dst", &[]);
    let (via, go_passed) = handshake_proxy(addr, true, Kind::Go, Hold::Delay(LATE));
    let (out, r) = migrate(&src, &via, &[]);
    assert_eq!(out.status.code(), Some(1), "{r}");
    assert!(!go_passed.load(Ordering::SeqCst), "GO was not held: {r}");
    assert_eq!(r["error_kind"], "aborted", "{r}");
    assert_eq!(r["source_running"], true, "{r}");
    let e = r["error"].as_str().unwrap_or_default();
    assert!(e.contains("no GO within"), "{r}");
    let n = seqs(&read(&src.log)).len();
    wait_for(LIMIT, || {
        (seqs(&read(&src.log)).len() > n + 3).then_some(())
    })
    .expect("the source did not run again");
    assert_ne!(exit_code(&mut dst, LIMIT), 0);
    assert!(seqs(&read(&dst.log)).is_empty(), "the destination ran it");
}

/// Longer than the destination waits for GO and the source for STARTED.
const LATE: Duration = Duration::from_secs(13);

/// STARTED held back past the source's wait: the source reports the hand-over
/// unconfirmed, stays stopped and refuses resume, pause and another migration; when
/// STARTED arrives it ends as migrated. A second destination never gets the VM.
#[test]
fn a_late_started_never_yields_two_running_copies() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("handover-started");
    let mut src = heartbeat_source(&dir);
    let (mut dst, addr) = destination(&dir, "dst", &[]);
    let (mut other, other_addr) = destination(&dir, "other", &[]);
    let (via, started_passed) = handshake_proxy(addr, false, Kind::Started, Hold::Delay(LATE));
    let (out, r) = migrate(&src, &via, &[]);
    assert_eq!(out.status.code(), Some(1), "{r}");
    assert_eq!(r["error_kind"], "unconfirmed", "{r}");
    assert_eq!(r["source_running"], false, "{r}");
    assert!(
        !started_passed.load(Ordering::SeqCst),
        "STARTED was not held: {r}"
    );
    // Nothing the user does without --force runs it here again.
    let o = cli(&src, &["resume"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("not confirmed"), "{}", stderr(&o));
    let (out, r2) = migrate(&src, &other_addr, &[]);
    assert_eq!(out.status.code(), Some(1), "{r2}");
    assert!(stderr(&out).contains("not confirmed"), "{}", stderr(&out));
    let o = cli(&src, &["pause"]);
    assert_eq!(o.status.code(), Some(1));
    let beats = seqs(&read(&src.log)).len();
    // The destination runs it; its late STARTED ends the source as migrated.
    wait_for(LIMIT, || (seqs(&read(&dst.log)).len() > 3).then_some(()))
        .expect("the destination does not run the VM");
    assert_eq!(exit_code(&mut src, Duration::from_secs(120)), 0);
    assert!(started_passed.load(Ordering::SeqCst));
    assert!(read(&src.err).contains("moved to"), "{}", read(&src.err));
    assert_eq!(
        seqs(&read(&src.log)).len(),
        beats,
        "the source ran after GO"
    );
    assert_eq!(info(&dst)["state"], "running");
    assert!(still_running(&mut other));
    assert!(seqs(&read(&other.log)).is_empty(), "the VM ran twice");
    let _ = run(
        &["shutdown", "--api-socket", dst.sock.to_str().unwrap()],
        LIMIT,
    );
    exit_code(&mut dst, LIMIT);
}

/// The link dies as GO goes out: neither side can know what the other did. The source
/// stays stopped and unconfirmed until the user, having checked that the destination
/// does not run the VM (it never got GO), forces it back.
#[test]
fn a_link_cut_at_go_leaves_the_choice_to_the_user() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("handover-cut");
    let src = heartbeat_source(&dir);
    let (mut dst, addr) = destination(&dir, "dst", &[]);
    let (via, _) = handshake_proxy(addr, true, Kind::Go, Hold::Cut);
    let (out, r) = migrate(&src, &via, &[]);
    assert_eq!(out.status.code(), Some(1), "{r}");
    assert_eq!(r["error_kind"], "unconfirmed", "{r}");
    let o = cli(&src, &["migrate-cancel"]);
    assert!(stderr(&o).contains("too late"), "{}", stderr(&o));
    let o = cli(&src, &["resume"]);
    assert!(stderr(&o).contains("--force"), "{}", stderr(&o));
    // The user checks: the destination did not start it.
    assert_ne!(exit_code(&mut dst, LIMIT), 0);
    assert!(seqs(&read(&dst.log)).is_empty(), "the destination ran it");
    let n = seqs(&read(&src.log)).len();
    let o = cli(&src, &["resume", "--force"]);
    assert!(o.status.success(), "{}", stderr(&o));
    wait_for(LIMIT, || {
        (seqs(&read(&src.log)).len() > n + 3).then_some(())
    })
    .expect("the source did not run again");
    assert_eq!(info(&src)["state"], "running");
    // Taken back for good: it can pause and migrate again.
    assert!(cli(&src, &["pause"]).status.success());
    assert!(cli(&src, &["resume"]).status.success());
}

/// A destination that trickles READY cannot hold the VM paused: the source resumes
/// once the pause's budget is spent, before READY has even arrived, reports the real
/// pause, and the destination never starts.
#[test]
fn a_trickling_destination_cannot_hold_the_pause() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("handover-trickle");
    let src = heartbeat_source(&dir);
    let (mut dst, addr) = destination(&dir, "dst", &[]);
    let (via, ready_passed) = handshake_proxy(
        addr,
        false,
        Kind::Ready,
        Hold::Trickle(Duration::from_millis(500)),
    );
    let (out, r) = migrate(&src, &via, &["--downtime-ms", "50"]);
    assert!(!ready_passed.load(Ordering::SeqCst), "READY arrived: {r}");
    assert_eq!(out.status.code(), Some(1), "{r}");
    assert_eq!(r["error_kind"], "pause_exceeded", "{r}");
    assert_eq!(r["source_running"], true, "{r}");
    assert!(r["downtime_ms"].as_f64().unwrap() >= 50.0, "{r}");
    let n = seqs(&read(&src.log)).len();
    wait_for(LIMIT, || {
        (seqs(&read(&src.log)).len() > n + 3).then_some(())
    })
    .expect("the source did not run again");
    assert_ne!(exit_code(&mut dst, LIMIT), 0);
    assert!(seqs(&read(&dst.log)).is_empty(), "the destination ran it");
}

/// A destination that stops reading in the middle of the last pages (a SIGSTOPped
/// process): the same bound holds though the source is blocked writing.
#[test]
fn a_stalled_destination_at_switchover_cannot_hold_the_pause() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("handover-stall");
    let src = dirtier_source(&dir, "src", "256", &["wss=96", "rate=flat", "seconds=0"]);
    let (mut dst, addr) = destination(&dir, "dst", &[]);
    let (via, _) = handshake_proxy(addr, true, Kind::State, Hold::Stall);
    let (out, r) = migrate(&src, &via, &["--downtime-ms", "50"]);
    assert_eq!(out.status.code(), Some(1), "{r}");
    assert_eq!(r["error_kind"], "pause_exceeded", "{r}");
    assert_eq!(r["source_running"], true, "{r}");
    assert!(r["downtime_ms"].as_f64().unwrap() > 0.0, "{r}");
    assert_eq!(info(&src)["state"], "running");
    let _ = dst.proc.0.kill();
    assert!(!read(&dst.log).contains("verify"), "the destination ran it");
}

/// A cancel ends a migration blocked on a destination that takes nothing more (pre-copy
/// writes stalled) or answers a byte at a time (a round's SYNCED): it reports
/// cancelled, not a timeout, and the VM runs on. Shutdown is refused meanwhile.
#[test]
fn cancel_interrupts_a_blocked_migration() {
    if !kvm_available() {
        return;
    }
    for (tag, downstream, kind, how) in [
        ("pages", true, Kind::Pages, Hold::Stall),
        (
            "synced",
            false,
            Kind::Synced,
            Hold::Trickle(Duration::from_secs(2)),
        ),
    ] {
        let dir = TempDir::new(&format!("handover-cancel-{tag}"));
        let src = dirtier_source(&dir, "src", "256", &["wss=96", "rate=20", "seconds=0"]);
        let (mut dst, addr) = destination(&dir, "dst", &[]);
        let (via, _) = handshake_proxy(addr, downstream, kind, how);
        let sock = src.sock.clone();
        let m = std::thread::spawn(move || {
            run(
                &[
                    "migrate",
                    "--api-socket",
                    sock.to_str().unwrap(),
                    "--to",
                    &via,
                    "--json",
                ],
                Duration::from_secs(120),
            )
        });
        wait_progress(&src);
        let o = cli(&src, &["shutdown"]);
        assert_eq!(o.status.code(), Some(1), "{tag}");
        assert!(
            stderr(&o).contains("migration is in progress"),
            "{tag}: {}",
            stderr(&o)
        );
        let o = cli(&src, &["migrate-cancel"]);
        assert!(o.status.success(), "{tag}: {}", stderr(&o));
        let out = m.join().unwrap();
        let r: Value = serde_json::from_str(&stdout(&out)).unwrap_or_default();
        assert_eq!(r["status"], "cancelled", "{tag}: {r} {}", stderr(&out));
        assert_eq!(r["source_running"], true, "{tag}: {r}");
        assert_eq!(info(&src)["state"], "running", "{tag}");
        let _ = dst.proc.0.kill();
    }
}

/// A source cancelled while its destination still waits for its data connections: the
/// destination learns why from the main connection and ends on that, rather than
/// waiting out its deadline for them and blaming the connections that never came.
/// The migration is capped at 8 MiB/s so that the main connection, which that
/// destination does not read yet, still has room for the end when the cancel comes:
/// a TCP close queues behind the bytes before it (README, "Live migration").
#[test]
fn a_destination_awaiting_its_data_connections_hears_the_source_end() {
    // An ABORT gets through unless the pages ahead of it filled the connection; the
    // close does in any case.
    cancelled_during_the_joins(
        "handover-joins",
        false,
        &["--max-bandwidth", "8M"],
        wait_progress,
        &[
            "the source aborted: cancelled",
            "the source closed the connection before its data connections came",
        ],
    );
}

/// As above, with nothing to slow the migration and the data connections drained
/// (so writing to them never holds the source back): the pages fill the main
/// connection, which that destination does not read yet, before the cancel comes, so
/// neither the ABORT nor a close can reach it. The source resets the connection
/// instead, and the destination hears that at once rather than waiting out its
/// deadline for the data connections (and blaming them).
#[test]
fn a_destination_that_reads_nothing_yet_hears_a_reset_of_the_source() {
    cancelled_during_the_joins(
        "handover-joins-full",
        true,
        &[],
        wait_stalled,
        &[
            "the source reset the connection before its data connections came",
            "the source aborted: cancelled",
        ],
    );
}

/// A migration through `main_only_proxy` (`drain`, `extra` options for `migrate`),
/// cancelled once `wait` returns: the source runs on, and the destination, still
/// waiting for the data connections, ends with one of `said`.
fn cancelled_during_the_joins(
    name: &str,
    drain: bool,
    extra: &[&str],
    wait: fn(&Vm),
    said: &[&str],
) {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new(name);
    let src = dirtier_source(&dir, "src", "256", &["wss=96", "rate=20", "seconds=0"]);
    let (mut dst, addr) = destination(&dir, "dst", &[]);
    let m = migrating(&src, &main_only_proxy(addr, drain), extra);
    wait(&src);
    let o = cli(&src, &["migrate-cancel"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = m.join().unwrap();
    let r: Value = serde_json::from_str(&stdout(&out)).unwrap_or_default();
    assert_eq!(r["status"], "cancelled", "{r} {}", stderr(&out));
    assert_eq!(r["source_running"], true, "{r}");
    assert_ne!(exit_code(&mut dst, LIMIT), 0);
    let e = read(&dst.err);
    assert!(said.iter().any(|s| e.contains(s)), "{e}");
    assert!(!read(&dst.log).contains("verify"), "the destination ran it");
    assert_eq!(info(&src)["state"], "running");
}

/// The nice value of `vm`'s vCPU 0 thread, from /proc.
/// Waits until `src`'s migration has sent some MiB and then sent nothing more for a
/// while: its connections are full.
fn wait_stalled(src: &Vm) {
    let sent = || -> Option<u64> {
        let (_, b) = godwit_vmm::api::call(&src.sock, "GET", "vm.migration").ok()?;
        let v: Value = serde_json::from_str(&b).ok()?;
        v["progress"]["bytes_sent"].as_u64()
    };
    let (mut last, mut same) = (0, 0);
    wait_for(LIMIT, || {
        std::thread::sleep(Duration::from_millis(100));
        let now = sent()?;
        same = if now == last { same + 1 } else { 0 };
        last = now;
        (now > 4 << 20 && same >= 3).then_some(())
    })
    .expect("the migration never stalled");
}

fn signal(vm: &Vm, sig: i32) {
    // SAFETY: kill(2) on a child this test spawned and still reaps.
    assert_eq!(unsafe { libc::kill(vm.proc.0.id() as i32, sig) }, 0);
}

/// SIGTERM, SIGINT and SIGHUP end godwit cleanly: a migration in progress is cancelled
/// (the destination never runs the VM), the sockets go, the reason is said, and the
/// status is 128 + the signal.
#[test]
fn signals_end_godwit_cleanly() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("handover-signals");
    for (sig, name) in [(libc::SIGINT, "SIGINT"), (libc::SIGHUP, "SIGHUP")] {
        let mut vm = source(&dir, name, &["heartbeat", "--", "period=20", "count=0"]);
        wait_log(&vm.log, "seq=3 ");
        signal(&vm, sig);
        assert_eq!(exit_code(&mut vm, LIMIT), 128 + sig, "{name}");
        assert!(
            read(&vm.err).contains(&format!("stopped by {name}")),
            "{}",
            read(&vm.err)
        );
        assert!(!vm.sock.exists(), "{name}: socket left behind");
    }
    // A destination still waiting for its source: both its sockets go.
    let incoming = dir.path("in.sock");
    let api = dir.path("dst.sock");
    let mut dst = Vm {
        proc: spawn(
            &[
                "run".into(),
                "--incoming".into(),
                format!("unix:{}", incoming.display()),
                "--api-socket".into(),
                api.display().to_string(),
            ],
            &dir.path("dst.log"),
            &dir.path("dst.err"),
        ),
        log: dir.path("dst.log"),
        err: dir.path("dst.err"),
        sock: api.clone(),
    };
    wait_for(LIMIT, || (incoming.exists() && api.exists()).then_some(())).expect("not listening");
    signal(&dst, libc::SIGTERM);
    assert_eq!(exit_code(&mut dst, LIMIT), 128 + libc::SIGTERM);
    assert!(!incoming.exists() && !api.exists(), "sockets left behind");
    // During a migration: it is cancelled first, and the destination never runs it.
    let mut src = dirtier_source(&dir, "src", "256", &["wss=96", "rate=20", "seconds=0"]);
    let (mut dst, addr) = destination(&dir, "dst2", &[]);
    let m = slow_migration(&src, addr);
    wait_progress(&src);
    signal(&src, libc::SIGTERM);
    assert_eq!(exit_code(&mut src, LIMIT), 128 + libc::SIGTERM);
    let e = read(&src.err);
    assert!(
        e.contains("cancelling the migration") && e.contains("stopped by SIGTERM"),
        "{e}"
    );
    let r: Value = serde_json::from_str(&stdout(&m.join().unwrap())).unwrap_or_default();
    assert_eq!(r["status"], "cancelled", "{r}");
    assert_eq!(r["error_kind"], "cancelled", "{r}");
    // The report is the last word on the VM: it does not run on here.
    assert_eq!(r["source_running"], false, "{r}");
    let why = r["error"].as_str().unwrap_or_default();
    assert!(
        why.contains("godwit was stopped by SIGTERM, and the VM stops with it"),
        "{r}"
    );
    assert_ne!(exit_code(&mut dst, LIMIT), 0);
    assert!(!read(&dst.log).contains("verify"), "the destination ran it");
    assert!(!src.sock.exists());
}

/// godwit run with `args`, logging at `level`, whose stderr is read up to the first
/// line holding `until` and then closed: nobody reads it from then on. The process, and
/// what it said until then.
fn deaf(args: &[String], level: &str, until: &str) -> (Reaper, String) {
    use std::io::BufRead;
    let mut child = Reaper(
        godwit()
            .args(args)
            .env("GODWIT_LOG", level)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn godwit"),
    );
    let mut err = std::io::BufReader::new(child.0.stderr.take().unwrap());
    let mut said = String::new();
    while !said.contains(until) {
        let mut l = String::new();
        assert!(
            err.read_line(&mut l).unwrap() > 0,
            "no {until:?} in: {said}"
        );
        said += &l;
    }
    (child, said)
}

/// A godwit whose stderr nobody reads any more (a manager that started it and went
/// away, a pipe whose reader exited) still ends on a signal: what it would say is lost,
/// not the stop. A destination still waiting and a running VM, each after the reader of
/// its stderr closed it.
#[test]
fn a_signal_ends_godwit_when_nobody_reads_its_stderr() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("handover-deaf");
    let incoming = dir.path("in.sock");
    for (what, args, line) in [
        (
            "a waiting destination",
            vec![
                "run".to_string(),
                "--incoming".into(),
                format!("unix:{}", incoming.display()),
            ],
            "waiting for a migration",
        ),
        (
            "a running VM",
            vec![
                "run".to_string(),
                "--prefault".into(),
                "heartbeat".into(),
                "--".into(),
                "period=20".into(),
                "count=0".into(),
            ],
            "guest memory prefaulted",
        ),
    ] {
        // Its log goes to stderr too, and says more as it stops.
        let (mut child, said) = deaf(&args, "debug", line);
        std::thread::sleep(Duration::from_millis(200));
        // SAFETY: kill(2) on a child this test spawned and still reaps.
        assert_eq!(unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) }, 0);
        let status = wait_for(LIMIT, || child.0.try_wait().unwrap());
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(128 + libc::SIGTERM),
            "{what}: {said}"
        );
    }
    assert!(
        !incoming.exists(),
        "the destination's socket was left behind"
    );
}

/// A destination whose stderr nobody reads any more, logging at info, takes a VM in
/// post-copy (whose threads log as they go) and runs it to its end: a line it cannot
/// write is lost, never a thread of the migration.
#[test]
fn a_destination_whose_stderr_nobody_reads_takes_a_vm_in_postcopy() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("handover-deaf-dst");
    let mut src = dirtier_source(
        &dir,
        "src",
        "256",
        &["wss=32", "rate=50", "seconds=8", "report-every=250"],
    );
    let log = dir.path("dst.log");
    let args: Vec<String> = ["run", "--incoming", "tcp:127.0.0.1:0", "--console"]
        .iter()
        .map(|a| a.to_string())
        .chain([format!("file:{}", log.display())])
        .collect();
    let (proc, said) = deaf(&args, "info", "godwit: waiting for a migration on ");
    let addr = said
        .lines()
        .find_map(|l| l.strip_prefix("godwit: waiting for a migration on "))
        .expect("the address")
        .to_string();
    let mut dst = Vm {
        proc,
        log,
        err: dir.path("dst.err"),
        sock: dir.path("dst.sock"),
    };
    let (out, r) = migrate(
        &src,
        &addr,
        &["--mode", "postcopy", "--max-bandwidth", "32M"],
    );
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert_postcopy_whole(&r);
    assert_eq!(exit_code(&mut src, LIMIT), 0, "{}", read(&src.err));
    assert_verified(&mut dst, 8192);
}

/// A paused VM arrives paused (and resumes there on demand).
#[test]
fn a_paused_vm_arrives_paused() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("handover-paused");
    let mut src = heartbeat_source(&dir);
    assert!(cli(&src, &["pause"]).status.success());
    let (mut dst, addr) = destination(&dir, "dst", &[]);
    let (out, r) = migrate(&src, &addr, &[]);
    assert!(out.status.success(), "{r}");
    assert_eq!(exit_code(&mut src, LIMIT), 0);
    wait_for(LIMIT, || (info(&dst)["state"] != Value::Null).then_some(())).unwrap();
    assert_eq!(info(&dst)["state"], "paused");
    std::thread::sleep(Duration::from_millis(200));
    assert!(seqs(&read(&dst.log)).is_empty(), "it ran while paused");
    assert!(cli(&dst, &["resume"]).status.success());
    wait_log(&dst.log, "heartbeat seq=");
    assert!(cli(&dst, &["shutdown"]).status.success());
    assert_eq!(exit_code(&mut dst, LIMIT), 0);
}
