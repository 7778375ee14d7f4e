//! Post-copy when the link or the source fails: neither side exits, the source keeps
//! every page the destination lacks, and `migrate-recover` finishes the transfer on new
//! connections (a link cut, gone silent, a DONE lost on the way); a frame that stalls
//! halfway only delays it; what cannot be saved (the source gone) is said and ends
//! cleanly.

mod common;

use common::mig::*;
use common::*;
use serde_json::Value;
use std::time::Duration;

/// A destination whose memory is in place before the source comes: post-copy places
/// pages through its alias (a frame whose bytes have all arrived straight from the
/// socket), so a cut or a stall lands among those placements.
const PREFAULTED: &[&str] = &["--memory", "512", "--prefault"];

/// A post-copy through `link_proxy` under way, for a test to do something to the link.
struct Linked {
    dir: TempDir,
    src: Vm,
    dst: Vm,
    /// The destination's own address, for a recovery that goes around the proxy.
    direct: String,
    link: Link,
    /// The `migrate` command's thread.
    m: std::thread::JoinHandle<std::process::Output>,
    /// What the guest says when all of its memory checks out.
    verified: String,
}

/// A dirtier that runs until shut down, rewriting `wss_mib` MiB and checking all of it
/// every second, moving in post-copy through a proxy at a 16 MiB/s cap that keeps the
/// background flowing for seconds, into a destination started with `dst` as well;
/// returns once post-copy has begun (None: no KVM here).
fn postcopy_through_a_proxy(
    tag: &str,
    wss_mib: u64,
    both: &[&str],
    dst: &[&str],
) -> Option<Linked> {
    if !kvm_available() {
        return None;
    }
    let dir = TempDir::new(tag);
    let wss = format!("wss={wss_mib}");
    let src = dirtier_source_under(
        &dir,
        "src",
        both,
        "512",
        &[
            &wss,
            "rate=200",
            "seconds=0",
            "verify-every=1",
            "report-every=250",
        ],
    );
    let (dst, direct) = destination(&dir, "dst", &[both, dst].concat());
    let link = link_proxy(direct.clone());
    // Time for a broken link to show (a minute or more at the source), then the rest.
    let m = migrating_within(
        &src,
        &link.addr,
        &["--mode", "postcopy", "--max-bandwidth", "16M"],
        Duration::from_secs(300),
    );
    wait_postcopy(&src);
    // The source's progress moves while the guest faults back to back.
    let elapsed = || migration(&src)["progress"]["elapsed_ms"].as_f64().unwrap();
    let before = elapsed();
    std::thread::sleep(Duration::from_millis(500));
    assert!(elapsed() > before, "vm.migration's progress stood still");
    Some(Linked {
        dir,
        src,
        dst,
        direct,
        link,
        m,
        verified: format!("verify ok pages={}", wss_mib << 8),
    })
}

/// `migrate-recover` straight to the destination; then the migration ends whole after
/// `recoveries` recoveries in all, the source exits, the destination's log says `said`,
/// and the guest verifies.
fn recovered_around_the_proxy(t: Linked, said: &str, recoveries: u64) {
    let to = t.direct.clone();
    recovered_at(t, &to, said, recoveries)
}

/// [`recovered_around_the_proxy`], recovering to `to` (the destination's listener, by
/// another name).
fn recovered_at(mut t: Linked, to: &str, said: &str, recoveries: u64) {
    let sock = t.src.sock.to_str().unwrap().to_string();
    let o = run(
        &["migrate-recover", "--api-socket", &sock, "--to", to],
        LIMIT,
    );
    assert!(o.status.success(), "{}\n{}", stderr(&o), read(&t.dst.err));
    let out = t.m.join().unwrap();
    let r: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_postcopy_whole(&r);
    assert_eq!(r["postcopy"]["recoveries"], recoveries, "{r}");
    assert_eq!(exit_code(&mut t.src, LIMIT), 0, "{}", read(&t.src.err));
    assert!(read(&t.dst.err).contains(said), "{}", read(&t.dst.err));
    // The destination's own account: whole, after one recovery.
    let i = &migration(&t.dst)["incoming"];
    assert_eq!(i["pages_left"], 0, "{i}");
    assert_eq!(i["paused"], Value::Null, "{i}");
    assert_eq!(i["recoveries"], recoveries, "{i}");
    assert!(
        i["sections"]["ram"]["missing_at_start"].as_u64() > Some(0),
        "{i}"
    );
    assert_listener_let_go(&t.direct);
    verified_and_shut_down(&mut t.dst, &t.verified);
}

#[test]
fn a_link_cut_mid_postcopy_is_recovered_and_the_guest_verifies() {
    let Some(t) = postcopy_through_a_proxy("pc-recover", 64, &[], PREFAULTED) else {
        return;
    };
    let cut = t.link.cut.clone();
    // The threads a touch waits on run with a short scheduler slice, so a wake-up
    // preempts the background stream: the destination's fault thread and the reader
    // of its main connection, and the source's serving thread.
    for (vm, name) in [
        (&t.dst, "postcopy-faults"),
        (&t.dst, "postcopy-in0"),
        (&t.src, "migration"),
    ] {
        let short = || {
            let s = thread_slices(vm.proc.0.id(), name)?;
            (!s.is_empty() && s.iter().all(|&x| x == 100_000)).then_some(())
        };
        if thread_slices(vm.proc.0.id(), name).is_some() {
            assert!(
                wait_for(LIMIT, short).is_some(),
                "{name} did not run with a short slice during post-copy (slices now: {:?})",
                thread_slices(vm.proc.0.id(), name)
            );
        }
    }
    // Recovery is refused while nothing is broken.
    let sock = t.src.sock.to_str().unwrap().to_string();
    let o = run(&["migrate-recover", "--api-socket", &sock], LIMIT);
    assert!(stderr(&o).contains("nothing to recover"), "{}", stderr(&o));
    cut.store(true, std::sync::atomic::Ordering::SeqCst);
    wait_source_paused(&t.src);
    assert_eq!(migration(&t.src)["progress"]["phase"], "postcopy_paused");
    // The destination says so too, and how much it still lacks.
    let i = wait_destination_paused(&t.dst);
    assert!(i["pages_left"].as_u64() > Some(0), "{i}");
    assert_eq!(i["recoveries"], 0, "{i}");
    // The source stays stopped and refuses to run its stale copy.
    let (c, _) = godwit_vmm::api::call(&t.src.sock, "PUT", "vm.resume").unwrap();
    assert_eq!(c, 409);
    // Nothing arrives at the destination now: asked to move on, it waits for its
    // memory, then gives up with a clear error and runs on.
    let snap = format!("file:{}", t.dir.path("snap").display());
    let (out, r) = migrate(&t.dst, &snap, &[]);
    assert!(!out.status.success(), "{r}");
    assert_eq!(r["error_kind"], "still_arriving", "{r}");
    assert_eq!(r["source_running"], true, "{r}");
    assert_eq!(info(&t.dst)["state"], "running");
    // A recovery to where no destination listens fails and says so; post-copy stays
    // paused, ready for the next one.
    let o = run(
        &[
            "migrate-recover",
            "--api-socket",
            &sock,
            "--to",
            &t.link.addr,
        ],
        LIMIT,
    );
    assert!(!o.status.success(), "{}", stdout(&o));
    let said = stderr(&o);
    assert!(
        said.contains(&format!("recovery to {}", t.link.addr)),
        "{said}"
    );
    assert!(said.contains("stays paused"), "{said}");
    assert_eq!(migration(&t.src)["progress"]["phase"], "postcopy_paused");
    // The destination runs on; the guest waits only where it touches a missing page.
    recovered_around_the_proxy(t, "post-copy resumed", 1);
}

/// A link cut mid-post-copy and recovered with both ends in `--seccomp kill` mode,
/// where one call outside a thread's filters kills its process: the destination's
/// recovery thread (it accepts the source's new connections and reads their first
/// frames under its own filter) and the readers it starts, and the source's migration
/// thread that dials again (by the destination's name, found by the API thread), stay
/// within theirs, and the guest verifies.
#[test]
fn a_link_cut_mid_postcopy_with_both_ends_in_kill_mode_is_recovered() {
    if !common::seccomp::available() {
        return;
    }
    let kill = ["--seccomp", "kill"];
    let Some(t) = postcopy_through_a_proxy("pc-recover-kill", 64, &kill, PREFAULTED) else {
        return;
    };
    t.link.cut.store(true, std::sync::atomic::Ordering::SeqCst);
    wait_source_paused(&t.src);
    wait_destination_paused(&t.dst);
    // By name: the source's migration thread opens no file, so the resolver's (the
    // hosts file) are read by the API thread that takes the request.
    let by_name = t.direct.replace("127.0.0.1", "localhost");
    recovered_at(t, &by_name, "post-copy resumed", 1);
}

/// A link that fails again after a recovery (a flaky path): post-copy pauses again on
/// both sides, and a second recovery finishes it. Each recovery starts from the
/// destination's own account of what it lacks, so the pages the second link lost on
/// its way are sent again too.
#[test]
fn a_link_cut_again_after_a_recovery_is_recovered_again() {
    use std::sync::atomic::Ordering::SeqCst;
    let Some(t) = postcopy_through_a_proxy("pc-recover-twice", 128, &[], PREFAULTED) else {
        return;
    };
    let sock = t.src.sock.to_str().unwrap().to_string();
    t.link.cut.store(true, SeqCst);
    wait_source_paused(&t.src);
    wait_destination_paused(&t.dst);
    // The second link, through a proxy of its own.
    let second = link_proxy(t.direct.clone());
    let o = run(
        &[
            "migrate-recover",
            "--api-socket",
            &sock,
            "--to",
            &second.addr,
        ],
        LIMIT,
    );
    assert!(o.status.success(), "{}\n{}", stderr(&o), read(&t.dst.err));
    // Recovered. From here nothing more passes, so that the rest is still to come
    // when this link is cut too, however slow the host (at the 16 MiB/s cap, what the
    // link and the sockets hold is a fraction of it).
    second.hold.store(true, SeqCst);
    let resumed = wait_for(LIMIT, || {
        let i = migration(&t.dst)["incoming"].clone();
        (i["recoveries"] == 1 && i["paused"].is_null()).then_some(i)
    })
    .expect("post-copy did not resume at the destination");
    assert!(resumed["pages_left"].as_u64() > Some(0), "{resumed}");
    assert!(migration(&t.src)["postcopy_paused"].is_null());
    second.cut.store(true, SeqCst);
    wait_source_paused(&t.src);
    let i = wait_destination_paused(&t.dst);
    assert!(i["pages_left"].as_u64() > Some(0), "{i}");
    assert_eq!(i["recoveries"], 1, "{i}");
    assert_eq!(info(&t.dst)["state"], "running");
    recovered_around_the_proxy(t, "post-copy resumed", 2);
}

/// A link that stalls inside a frame for longer than the destination waits for one
/// (TCP retransmitting on a lossy link backs off to seconds) delays post-copy but breaks
/// nothing: the frame is waited for, not given up halfway, which would lose the
/// stream's frame boundaries.
#[test]
fn a_frame_that_stalls_halfway_delays_postcopy_but_does_not_break_it() {
    let Some(mut t) = postcopy_through_a_proxy("pc-stall", 64, &[], PREFAULTED) else {
        return;
    };
    t.link
        .stall
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let out = t.m.join().unwrap();
    let r: Value = serde_json::from_str(&stdout(&out)).unwrap_or_default();
    assert!(
        out.status.success(),
        "{}\n{}",
        stderr(&out),
        read(&t.dst.err)
    );
    assert_postcopy_whole(&r);
    assert_eq!(r["postcopy"]["recoveries"], 0, "{r}");
    assert!(
        t.link.stalled.load(std::sync::atomic::Ordering::SeqCst) > 0,
        "no chunk stalled during post-copy"
    );
    assert!(
        !read(&t.dst.err).contains("post-copy paused"),
        "{}",
        read(&t.dst.err)
    );
    assert_eq!(exit_code(&mut t.src, LIMIT), 0, "{}", read(&t.src.err));
    verified_and_shut_down(&mut t.dst, &t.verified);
}

/// A link gone silent during post-copy (nothing passes, nothing is reset): the source
/// pauses when its writes stop making progress (30 s; with 128 MiB to move, the
/// background has plenty left to write when the link goes) or, everything written,
/// when DONE does not come (60 s); the destination, whose connections break neither,
/// when nothing has come for 30 s while pages are missing. Both say so in their API;
/// the source comes back on new connections, and the guest verifies.
#[test]
fn a_link_gone_silent_mid_postcopy_is_recovered_and_the_guest_verifies() {
    let Some(t) = postcopy_through_a_proxy("pc-silent", 128, &[], &[]) else {
        return;
    };
    t.link.hold.store(true, std::sync::atomic::Ordering::SeqCst);
    // No connection breaks: each side must see for itself that nothing comes through.
    let paused = |vm: &Vm, at: &[&str]| -> Option<String> {
        let (_, b) = godwit_vmm::api::call(&vm.sock, "GET", "vm.migration").ok()?;
        let v: Value = serde_json::from_str(&b).ok()?;
        at.iter().fold(&v, |v, k| &v[k]).as_str().map(String::from)
    };
    let both = wait_for(Duration::from_secs(240), || {
        Some((
            paused(&t.dst, &["incoming", "paused"])?,
            paused(&t.src, &["postcopy_paused"])?,
        ))
    });
    let Some((dst_why, _)) = both else {
        let out = t.m.join().unwrap();
        panic!(
            "post-copy did not pause on both sides:\n{}\n{}\nsource:\n{}\ndestination:\n{}",
            stdout(&out),
            stderr(&out),
            read(&t.src.err),
            read(&t.dst.err)
        );
    };
    assert!(dst_why.contains("went silent"), "{dst_why}");
    let i = &migration(&t.dst)["incoming"];
    assert!(i["pages_left"].as_u64() > Some(0), "{i}");
    recovered_around_the_proxy(t, "post-copy paused: nothing came from the source", 1);
}

/// DONE lost on the way: every page reaches the destination, which says DONE, but
/// nothing comes back from it any more (the source's data still goes through). The
/// source, everything written, pauses when DONE does not come within 60 s; the
/// destination, whole, has nothing to report broken. When the source comes back, the
/// destination tells it DONE again: the migration ends whole and the guest verifies.
#[test]
fn a_done_lost_on_the_way_is_told_again_when_the_source_comes_back() {
    let Some(t) = postcopy_through_a_proxy("pc-done-lost", 64, &[], &[]) else {
        return;
    };
    t.link
        .hold_back
        .store(true, std::sync::atomic::Ordering::SeqCst);
    // Requests are lost now: the background stream brings the rest.
    let whole = wait_for(Duration::from_secs(120), || {
        (migration(&t.dst)["incoming"]["pages_left"] == 0).then_some(())
    });
    assert!(whole.is_some(), "{}", migration(&t.dst));
    let paused = wait_for(Duration::from_secs(240), || {
        migration(&t.src)["postcopy_paused"]
            .as_str()
            .map(String::from)
    });
    let Some(why) = paused else {
        let out = t.m.join().unwrap();
        panic!(
            "the source did not pause:\n{}\n{}\n{}",
            stdout(&out),
            stderr(&out),
            read(&t.src.err)
        );
    };
    assert!(why.contains("not confirmed"), "{why}");
    assert_eq!(migration(&t.dst)["incoming"]["paused"], Value::Null);
    recovered_around_the_proxy(t, "DONE was lost with the old connections", 1);
}

/// The source dies mid-post-copy (its process killed, as with its host): what it had
/// not delivered is gone. The destination says post-copy is paused and what it lacks,
/// runs on where the guest does not touch those pages, and still shuts down at once
/// when told, though a vCPU waits on a page that will never come.
#[test]
fn a_source_killed_mid_postcopy_leaves_a_destination_that_says_so_and_shuts_down() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("pc-source-killed");
    let mut src = dirtier_source(
        &dir,
        "src",
        "256",
        &["wss=32", "rate=20", "seconds=0", "verify-every=1"],
    );
    let (mut dst, addr) = destination(&dir, "dst", &[]);
    let m = migrating(
        &src,
        &addr,
        &["--mode", "postcopy", "--max-bandwidth", "4M"],
    );
    wait_postcopy(&src);
    src.proc.0.kill().unwrap();
    let _ = src.proc.0.wait();
    let _ = m.join();
    let i = wait_destination_paused(&dst);
    assert!(i["pages_left"].as_u64() > Some(0), "{i}");
    assert_eq!(info(&dst)["state"], "running");
    let o = run(
        &["shutdown", "--api-socket", dst.sock.to_str().unwrap()],
        LIMIT,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    exit_code(&mut dst, LIMIT);
    assert!(
        read(&dst.err).contains("post-copy paused"),
        "{}",
        read(&dst.err)
    );
}

/// Pages on their way when the link dies are lost with it: the source counted them
/// sent, so only the destination's own account of what it lacks (its answer to
/// RESUME) brings them again. The link holds everything for a second first, so that
/// megabytes of the background are in its buffers when it is cut; the guest rewrites
/// its memory at 1 MiB/s and touches few of them itself, so the migration can only
/// end whole if the source sends them again on its own.
#[test]
fn pages_lost_in_flight_at_a_cut_are_sent_again_after_the_recovery() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("pc-in-flight");
    let mut src = dirtier_source(
        &dir,
        "src",
        "256",
        &["wss=128", "rate=1", "seconds=0", "check-writes=1"],
    );
    let (mut dst, direct) = destination(&dir, "dst", &[]);
    let link = link_proxy(direct.clone());
    let m = migrating(
        &src,
        &link.addr,
        &["--mode", "postcopy", "--max-bandwidth", "16M"],
    );
    wait_postcopy(&src);
    link.hold.store(true, std::sync::atomic::Ordering::SeqCst);
    std::thread::sleep(Duration::from_secs(1));
    link.cut.store(true, std::sync::atomic::Ordering::SeqCst);
    wait_source_paused(&src);
    wait_destination_paused(&dst);
    let sock = src.sock.to_str().unwrap().to_string();
    let o = run(
        &["migrate-recover", "--api-socket", &sock, "--to", &direct],
        LIMIT,
    );
    assert!(o.status.success(), "{}\n{}", stderr(&o), read(&dst.err));
    let out = m.join().unwrap();
    let r: Value = serde_json::from_str(&stdout(&out)).unwrap_or_default();
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert_postcopy_whole(&r);
    assert_eq!(r["postcopy"]["recoveries"], 1, "{r}");
    assert_eq!(exit_code(&mut src, LIMIT), 0, "{}", read(&src.err));
    assert_eq!(migration(&dst)["incoming"]["pages_left"], 0);
    run(
        &["shutdown", "--api-socket", dst.sock.to_str().unwrap()],
        LIMIT,
    );
    exit_code(&mut dst, LIMIT);
    assert!(!read(&dst.log).contains("FAILED"), "{}", read(&dst.log));
}
