//! Post-copy and hybrid migration between real godwit processes: the VM runs at the
//! destination before its memory is there, touches fetch pages on demand, the rest
//! follows in the background, and the guest checks every byte of it.

mod common;

use common::mig::*;
use common::*;
use godwit_migration::wire::{self, Frame};
use serde_json::Value;
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

/// A 256 MiB dirtier rewriting 32 MiB slowly and checking all of its memory every
/// second, until shut down.
fn checking_dirtier(dir: &TempDir, name: &str) -> Vm {
    dirtier_source(
        dir,
        name,
        "256",
        &[
            "wss=32",
            "rate=20",
            "seconds=0",
            "verify-every=1",
            "report-every=250",
        ],
    )
}

#[test]
fn a_dirtier_moved_in_postcopy_verifies_all_its_memory() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("pc-dirtier");
    let mut src = dirtier_source(
        &dir,
        "src",
        "512",
        &["wss=64", "rate=200", "seconds=10", "report-every=250"],
    );
    let (mut dst, addr) = destination(&dir, "dst", &[]);
    // The background stream capped well below the guest's pace: the guest must touch
    // pages before they are pushed, so they are fetched on demand.
    let m = migrating(
        &src,
        &addr,
        &["--mode", "postcopy", "--max-bandwidth", "16M"],
    );
    // While its memory arrives, the destination's own API says how much is left.
    let left = wait_for(LIMIT, || info(&dst)["arriving"]["ram"].as_u64())
        .expect("the destination never showed its memory arriving");
    assert!(left > 0 && left <= 16384 + 512, "{left}");
    let out = m.join().unwrap();
    let r: Value = serde_json::from_str(&stdout(&out)).unwrap_or_default();
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert!(info(&dst).get("arriving").is_none(), "{}", info(&dst));
    assert_postcopy_whole(&r);
    assert_eq!(r["round_count"], 0, "{r}");
    assert!(r["postcopy"]["remote_faults"].as_u64().unwrap() > 0, "{r}");
    let lat = &r["postcopy"]["fault_latency"];
    assert!(lat["count"].as_u64().unwrap() > 0, "{r}");
    assert!(lat["min_us"].as_f64().unwrap() <= lat["max_us"].as_f64().unwrap());
    assert!(r["connections"].as_u64().unwrap() >= 2, "{r}");
    assert_eq!(exit_code(&mut src, LIMIT), 0, "{}", read(&src.err));
    assert!(read(&src.err).contains("the VM moved to"));
    assert_verified(&mut dst, 16384);
}

/// The dirtier at 100 MiB/s over a 32 MiB/s link, 50 ms limit, in `mode`: pre-copy
/// alone would throttle it. Post-copy takes over, for the reason `why` names, and the
/// guest's memory checks out.
fn switches_instead_of_throttling(tag: &str, mode: &str, why: &str) {
    switches_instead_of_throttling_with(tag, mode, why, &[], &[]);
}

/// `switches_instead_of_throttling`, with more migrate options and dirtier arguments.
fn switches_instead_of_throttling_with(
    tag: &str,
    mode: &str,
    why: &str,
    options: &[&str],
    guest: &[&str],
) {
    let dir = TempDir::new(tag);
    let mut args = vec!["wss=64", "rate=100", "seconds=8", "report-every=250"];
    args.extend_from_slice(guest);
    let mut src = dirtier_source(&dir, "src", "512", &args);
    let (mut dst, addr) = destination(&dir, "dst", &[]);
    let mut a = vec![
        "--mode",
        mode,
        "--max-bandwidth",
        "32M",
        "--downtime-ms",
        "50",
    ];
    a.extend_from_slice(options);
    let (out, r) = migrate(&src, &addr, &a);
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert_postcopy_whole(&r);
    assert_eq!(r["mode"], mode);
    assert_eq!(r["throttled"], false, "{r}");
    // At least the first pass; usually only it (a second would send the set again), but
    // how much a starved guest writes during it depends on the host's load.
    assert!(r["round_count"].as_u64().unwrap() >= 1, "{r}");
    let reason = r["postcopy"]["reason"].as_str().unwrap();
    assert!(reason.contains(why), "{reason}");
    assert_eq!(exit_code(&mut src, LIMIT), 0, "{}", read(&src.err));
    assert_verified(&mut dst, 16384);
}

#[test]
fn hybrid_switches_to_postcopy_instead_of_throttling() {
    if kvm_available() {
        switches_instead_of_throttling("pc-hybrid", "hybrid", "converging");
    }
}

/// The same with page data left to the transport's checks: pre-copy's pages (some torn
/// on the way, and dirty, so sent again after the switch) and post-copy's, each frame
/// checked only over its head; the guest checks every page before it rewrites it.
#[test]
fn hybrid_with_page_data_left_to_the_transport_verifies() {
    if kvm_available() {
        switches_instead_of_throttling_with(
            "pc-hybrid-transport",
            "hybrid",
            "converging",
            &["--page-checks", "transport"],
            &["check-writes=1"],
        );
    }
}

/// The dirtier flat out (no rate: its vCPU writes as fast as it can), checking each page
/// before it rewrites it, moved in post-copy and in hybrid over a 64 MiB/s link: pre-copy
/// cannot follow it, so hybrid switches, and in both the guest runs on at the
/// destination faulting in the pages it writes, and all of its memory checks out.
#[test]
fn a_dirtier_flat_out_moved_in_postcopy_and_hybrid_verifies() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("pc-flat");
    for mode in ["postcopy", "hybrid"] {
        let mut src = dirtier_source(
            &dir,
            &format!("src-{mode}"),
            "512",
            &[
                "wss=64",
                "rate=0",
                "seconds=6",
                "report-every=250",
                "check-writes=1",
            ],
        );
        let (mut dst, addr) = destination(&dir, &format!("dst-{mode}"), &[]);
        let (out, r) = migrate(
            &src,
            &addr,
            &[
                "--mode",
                mode,
                "--max-bandwidth",
                "64M",
                "--downtime-ms",
                "50",
            ],
        );
        assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
        assert_postcopy_whole(&r);
        assert_eq!(r["mode"], mode, "{r}");
        assert_eq!(r["throttled"], false, "{r}");
        assert!(r["postcopy"]["remote_faults"].as_u64().unwrap() > 0, "{r}");
        assert_eq!(exit_code(&mut src, LIMIT), 0, "{}", read(&src.err));
        assert_verified(&mut dst, 16384);
    }
}

/// Hybrid where pre-copy's first round leaves nothing to send (a paused VM writes
/// nothing): there is no rest to follow the VM, so it stays pre-copy. It used to switch
/// to post-copy with nothing missing, and the destination, with every page in at once,
/// sent DONE before STARTED: the source took the hand-over for unconfirmed and kept the
/// VM stopped.
#[test]
fn hybrid_with_nothing_left_to_send_stays_precopy() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("pc-hybrid-still");
    let mut src = checking_dirtier(&dir, "src");
    let sock = src.sock.to_str().unwrap().to_string();
    assert!(run(&["pause", "--api-socket", &sock], LIMIT)
        .status
        .success());
    let (mut dst, addr) = destination(&dir, "dst", &[]);
    let (out, r) = migrate(&src, &addr, &["--mode", "hybrid"]);
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert_eq!(r["status"], "completed", "{r}");
    assert_eq!(r["ran"], "precopy", "{r}");
    assert_eq!(
        r["rounds"].as_array().unwrap().last().unwrap()["dirty_pages"],
        0
    );
    assert_eq!(exit_code(&mut src, LIMIT), 0, "{}", read(&src.err));
    // It arrives paused, as it left, and runs on once resumed.
    assert_eq!(info(&dst)["state"], "paused");
    let dsock = dst.sock.to_str().unwrap().to_string();
    assert!(run(&["resume", "--api-socket", &dsock], LIMIT)
        .status
        .success());
    gains(&dst.log, "verify ok", 2);
    assert!(!read(&dst.log).contains("FAILED"), "{}", read(&dst.log));
    run(&["shutdown", "--api-socket", &dsock], LIMIT);
    exit_code(&mut dst, LIMIT);
}

/// Hybrid where the rounds converge to a rest the pause carries in a millisecond (32
/// MiB rewritten at 20 MiB/s, no bandwidth cap): pre-copy ends it, and no page is left
/// for the guest to fault on at the destination. How small the rest gets is the host's
/// doing (its load, the bandwidth the driver learnt from it): a last round the guest
/// did not run in leaves none, which says nothing either way, and one the guest wrote
/// in bursts may leave more than a millisecond's worth, which hybrid rightly follows
/// in post-copy; then the driver must have expected more than that rule's bound. The
/// VM moves on until a hop had a rest its pause carried.
#[test]
fn hybrid_with_a_rest_the_pause_carries_at_once_stays_precopy() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("pc-hybrid-small");
    let mut cur = checking_dirtier(&dir, "src");
    let mut carried = false;
    for hop in 1..=4 {
        let (next, addr) = destination(&dir, &format!("hop{hop}"), &[]);
        let (out, r) = migrate(&cur, &addr, &["--mode", "hybrid", "--downtime-ms", "50"]);
        assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
        assert_eq!(r["mode"], "hybrid", "{r}");
        let why = r["switchover_reason"].as_str().unwrap();
        let rounds = r["rounds"].as_array().unwrap();
        let expected = rounds.last().unwrap()["expected_downtime_ms"]
            .as_f64()
            .unwrap();
        if r["ran"] == "postcopy" {
            // A rest carried in 1 ms expects at most that plus the fixed 1 ms.
            assert!(
                expected > 2.0,
                "switched with a rest the pause carries: {r}"
            );
            assert_postcopy_whole(&r);
        } else {
            assert_eq!(r["status"], "completed", "{r}");
            assert_eq!(r["ran"], "precopy", "{r}");
            assert!(r["postcopy"].is_null(), "{r}");
            if r["downtime"]["final_pages"].as_u64().unwrap() > 0 {
                assert!(why.contains("goes in the pause"), "{why}");
                carried = true;
            } else {
                assert_eq!(why, "no dirty pages left", "{r}");
            }
        }
        assert_eq!(exit_code(&mut cur, LIMIT), 0, "{}", read(&cur.err));
        cur = next;
        if carried {
            break;
        }
    }
    assert!(carried, "no hop of four left a rest for the pause to carry");
    // The guest checks all of its memory every second.
    gains(&cur.log, "verify ok", 2);
    assert!(!read(&cur.log).contains("FAILED"), "{}", read(&cur.log));
    let sock = cur.sock.to_str().unwrap().to_string();
    run(&["shutdown", "--api-socket", &sock], LIMIT);
    exit_code(&mut cur, LIMIT);
}

#[test]
fn auto_goes_postcopy_when_precopy_cannot_fit() {
    if kvm_available() {
        switches_instead_of_throttling("pc-auto-post", "auto", "does not fit");
    }
}

#[test]
fn migrate_postcopy_switches_a_running_precopy_over() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("pc-manual");
    // 32 MiB at 8 MiB/s: the pre-copy is still in its first round when switched.
    let mut src = dirtier_source(
        &dir,
        "src",
        "512",
        &["wss=32", "rate=50", "seconds=10", "report-every=250"],
    );
    let (mut dst, addr) = destination(&dir, "dst", &[]);
    // No migration yet: nothing to switch.
    let sock = src.sock.to_str().unwrap().to_string();
    let o = run(&["migrate-postcopy", "--api-socket", &sock], LIMIT);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("no migration is running"),
        "{}",
        stderr(&o)
    );
    let m = slow_migration(&src, addr);
    wait_progress(&src);
    let o = run(&["migrate-postcopy", "--api-socket", &sock], LIMIT);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = m.join().unwrap();
    let r: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_postcopy_whole(&r);
    assert_eq!(r["mode"], "precopy");
    assert!(r["postcopy"]["reason"]
        .as_str()
        .unwrap()
        .contains("migrate-postcopy"));
    assert_eq!(exit_code(&mut src, LIMIT), 0, "{}", read(&src.err));
    assert_verified(&mut dst, 8192);
}

/// Switched in pre-copy's second round: the destination holds a copy of every page,
/// and those the guest rewrote since they were sent are stale. Each must go missing at
/// the switch, never be read. Rewriting 16 MiB at 2 MiB/s, the guest checks all of its
/// memory every second, long before it rewrites the stale pages again (6 s): one read
/// in place would show.
#[test]
fn stale_copies_at_the_switch_are_never_read() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("pc-stale");
    let mut src = dirtier_source(
        &dir,
        "src",
        "512",
        &[
            "wss=16",
            "rate=2",
            "seconds=10",
            "verify-every=1",
            "report-every=250",
        ],
    );
    let (mut dst, addr) = destination(&dir, "dst", &[]);
    // A limit no round can meet at 8 MiB/s: pre-copy goes on until switched.
    let m = migrating(
        &src,
        &addr,
        &["--max-bandwidth", "8M", "--downtime-ms", "1"],
    );
    let sock = src.sock.to_str().unwrap().to_string();
    wait_for(LIMIT, || {
        let (_, b) = godwit_vmm::api::call(&src.sock, "GET", "vm.migration").ok()?;
        let v: Value = serde_json::from_str(&b).ok()?;
        (v["progress"]["round"].as_u64()? >= 2).then_some(())
    })
    .expect("pre-copy never reached its second round");
    let o = run(&["migrate-postcopy", "--api-socket", &sock], LIMIT);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = m.join().unwrap();
    let r: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_postcopy_whole(&r);
    assert!(r["round_count"].as_u64().unwrap() >= 1, "{r}");
    assert!(
        r["postcopy"]["missing_pages"]["ram"].as_u64().unwrap() > 0,
        "{r}"
    );
    assert_eq!(exit_code(&mut src, LIMIT), 0, "{}", read(&src.err));
    assert_verified(&mut dst, 4096);
    assert!(!read(&dst.log).contains("FAILED"), "{}", read(&dst.log));
}

#[test]
fn auto_stays_precopy_when_it_fits_and_files_refuse_postcopy() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("pc-auto");
    let mut src = dirtier_source(
        &dir,
        "src",
        "256",
        &["wss=16", "rate=5", "seconds=5", "report-every=250"],
    );
    let snap = format!("file:{}", dir.path("snap").display());
    let (out, _) = migrate(&src, &snap, &["--mode", "hybrid"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("needs a live destination"),
        "{}",
        stderr(&out)
    );
    let (mut dst, addr) = destination(&dir, "dst", &[]);
    let (out, r) = migrate(&src, &addr, &["--mode", "auto", "--downtime-ms", "300"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(r["status"], "completed", "{r}");
    assert_eq!(r["mode"], "auto");
    assert_eq!(r["ran"], "precopy", "{r}");
    assert!(r["postcopy"].is_null(), "{r}");
    assert_eq!(exit_code(&mut src, LIMIT), 0);
    assert_verified(&mut dst, 4096);
}

#[test]
fn both_vcpus_of_a_guest_fault_and_run_on() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("pc-smp");
    let mut src = source(&dir, "src", &["--vcpus", "2", "smp", "--", "ms=15000"]);
    let (mut dst, addr) = destination(&dir, "dst", &["--vcpus", "2"]);
    wait_log(&src.log, "vcpu 1 online");
    std::thread::sleep(Duration::from_millis(300));
    // Everything follows the VM, slowly: both vCPUs touch missing pages at once (the
    // shared counters, their own stacks) and wait for them. Of the guest's 512 pages
    // 35 to 47 hold data (140-190 KB, the rest go as zero runs), and the pause's
    // states 15 KB: at 32 KiB/s the background's first frame alone holds the next
    // one back for seconds, so the vCPUs of a destination slowed by a loaded host
    // still fault, and everything is there within about 7 s, well within the guest's
    // 15. (Before the background went in place, its data pages waited in one frame
    // that went out whole once the rest had, past the cap, and 8 KiB/s did; paced a
    // frame at a time, 8 KiB/s took longer than the guest lives.)
    let (out, r) = migrate(
        &src,
        &addr,
        &["--mode", "postcopy", "--max-bandwidth", "32K"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_postcopy_whole(&r);
    assert!(r["postcopy"]["remote_faults"].as_u64().unwrap() >= 2, "{r}");
    assert_eq!(exit_code(&mut src, LIMIT), 0);
    assert_eq!(exit_code(&mut dst, LIMIT), 0, "{}", read(&dst.log));
    assert!(read(&dst.log).contains("vcpus=2 concurrent=2 result=ok"));
}

#[test]
fn a_cancel_before_the_switch_leaves_the_source_running() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("pc-cancel");
    let src = dirtier_source(
        &dir,
        "src",
        "256",
        &["wss=64", "rate=20", "seconds=0", "report-every=250"],
    );
    let (mut dst, addr) = destination(&dir, "dst", &[]);
    let m = migrating(&src, &addr, &["--mode", "hybrid", "--max-bandwidth", "8M"]);
    wait_progress(&src);
    let o = run(
        &["migrate-cancel", "--api-socket", src.sock.to_str().unwrap()],
        LIMIT,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = m.join().unwrap();
    let r: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(r["status"], "cancelled", "{r}");
    assert_eq!(r["source_running"], true, "{r}");
    assert_eq!(r["ran"], "precopy", "{r}");
    assert_eq!(exit_code(&mut dst, LIMIT), 1);
    assert_eq!(info(&src)["state"], "running");
    // The guest goes on writing and its memory is whole.
    gains(&src.log, "rate_mibs=", 3);
}

/// A destination that speaks the protocol up to STARTED, then asks for pages outside
/// the VM, of a section that is not lazy, of no section at all, the same page twice, and
/// a flood; it counts the pages that come back, then says DONE.
fn hostile_destination() -> (String, std::thread::JoinHandle<(u64, u64)>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("tcp:{}", l.local_addr().unwrap());
    let fake = std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        let mut buf = Vec::new();
        let sections = match wire::read_frame(&mut c, &mut buf).unwrap() {
            Frame::Hello(h) => h.sections,
            f => panic!("{:?}", f.kind()),
        };
        wire::write_frame(&mut c, &Frame::Accept(Default::default())).unwrap();
        // The background connection: taken in and dropped.
        let (mut lane, _) = l.accept().unwrap();
        std::thread::spawn(move || {
            let mut b = Vec::new();
            while wire::read_frame(&mut lane, &mut b).is_ok() {}
        });
        let ram = sections.iter().position(|s| s.name == "ram").unwrap() as u32;
        let vcpus = sections.iter().position(|s| s.name == "vcpus").unwrap() as u32;
        let mut lazy_pages = 0;
        loop {
            match read_frame_as_destination(&mut c, &mut buf).unwrap() {
                Frame::Sync(n) => wire::write_frame(&mut c, &Frame::Synced(n)).unwrap(),
                Frame::Lacks { regions, .. } => {
                    lazy_pages = regions.iter().map(|r| r.pages()).sum()
                }
                Frame::Complete(_) => break,
                _ => {}
            }
        }
        assert!(lazy_pages > 0);
        wire::write_frame(&mut c, &Frame::Ready(Default::default())).unwrap();
        assert!(matches!(
            wire::read_frame(&mut c, &mut buf).unwrap(),
            Frame::Go
        ));
        wire::write_frame(&mut c, &Frame::Started(Default::default())).unwrap();
        let ask = |c: &mut TcpStream, section: u32, addrs: Vec<u64>| {
            wire::write_frame(c, &Frame::Request { section, addrs }).unwrap()
        };
        ask(&mut c, ram, vec![1 << 50]);
        ask(&mut c, ram, vec![0x1001]);
        ask(&mut c, vcpus, vec![0]);
        ask(&mut c, 99, vec![0]);
        wire::write_frame(
            &mut c,
            &Frame::Ahead {
                section: vcpus,
                addrs: vec![0],
            },
        )
        .unwrap();
        ask(&mut c, ram, vec![0x10000, 0x10000]);
        let flood = 2000u64;
        for i in 0..flood {
            ask(&mut c, ram, vec![(i % 64) * 4096]);
        }
        let want = 2 + flood;
        let mut got = 0;
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        while got < want {
            match wire::read_frame(&mut c, &mut buf).unwrap() {
                Frame::Pages { addrs, .. } => got += addrs.len() as u64,
                Frame::Zero { runs, .. } => got += runs.iter().map(|r| r.1 as u64).sum::<u64>(),
                f => panic!("{:?}", f.kind()),
            }
        }
        wire::write_frame(&mut c, &Frame::Done(Default::default())).unwrap();
        // Asked after DONE: nobody listens any more.
        let _ = wire::write_frame(
            &mut c,
            &Frame::Request {
                section: ram,
                addrs: vec![0],
            },
        );
        (got, lazy_pages)
    });
    (addr, fake)
}

#[test]
fn hostile_page_requests_are_refused_and_the_rest_are_served() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("pc-hostile");
    let mut src = source(&dir, "src", &["heartbeat", "--", "period=20", "count=0"]);
    wait_log(&src.log, "seq=3");
    let (addr, fake) = hostile_destination();
    let (out, r) = migrate(&src, &addr, &["--mode", "postcopy"]);
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    let (got, lazy) = fake.join().unwrap();
    assert_eq!(got, 2002);
    assert_eq!(r["status"], "completed", "{r}");
    let p = &r["postcopy"];
    // Outside the VM, not page-aligned, a section with no pages, no such section, and
    // ahead of a touch for a section with no pages.
    assert_eq!(p["refused_requests"], 5, "{r}");
    assert_eq!(p["requested_pages"], 2002, "{r}");
    assert_eq!(p["missing_pages"]["ram"].as_u64(), Some(lazy), "{r}");
    assert_eq!(exit_code(&mut src, LIMIT), 0, "{}", read(&src.err));
    assert!(
        read(&src.err).contains("refused a page request"),
        "{}",
        read(&src.err)
    );
}

#[test]
fn postcopy_over_tls_with_several_connections_verifies() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("pc-tls");
    let creds = dir.path("creds");
    let o = run(&["tls-creds", creds.to_str().unwrap()], LIMIT);
    assert!(o.status.success(), "{}", stderr(&o));
    let c = creds.to_str().unwrap();
    let mut src = dirtier_source(
        &dir,
        "src",
        "512",
        &["wss=64", "rate=200", "seconds=6", "report-every=250"],
    );
    let (mut dst, addr) = destination(&dir, "dst", &["--tls-dir", c]);
    // Requests, answers and the background stream all through TLS, over 3 connections
    // (the one kept for requests, and 2 for the background).
    let (out, r) = migrate(
        &src,
        &addr,
        &[
            "--mode",
            "postcopy",
            "--tls-dir",
            c,
            "--connections",
            "2",
            "--max-bandwidth",
            "32M",
        ],
    );
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert_postcopy_whole(&r);
    assert_eq!(r["connections"], 3, "{r}");
    assert!(r["postcopy"]["remote_faults"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(exit_code(&mut src, LIMIT), 0, "{}", read(&src.err));
    assert_verified(&mut dst, 16384);
}

/// A VM whose memory is still arriving (post-copy in progress) cannot be read out yet:
/// asked to move on meanwhile, it waits (its progress says how much is still coming)
/// and moves once every page is here; the guest's checks pass where it lands.
#[test]
fn a_vm_still_arriving_moves_on_once_it_is_whole() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("pc-chain");
    let mut a = checking_dirtier(&dir, "a");
    let (mut b, addr_b) = destination(&dir, "b", &[]);
    // Slow on purpose: the window lasts seconds.
    let m = migrating(
        &a,
        &addr_b,
        &["--mode", "postcopy", "--max-bandwidth", "4M"],
    );
    wait_postcopy(&a);
    wait_for(LIMIT, || b.sock.exists().then_some(())).expect("no API on b");
    let (mut c, addr_c) = destination(&dir, "c", &[]);
    let onward = migrating(&b, &addr_c, &[]);
    // b waits for its memory first, and says so.
    let waiting = wait_for(LIMIT, || {
        let p = migration(&b)["progress"].clone();
        (p["phase"] == "setup" && p["arriving_pages"].as_u64() > Some(0)).then_some(p)
    })
    .expect("b never showed its memory arriving");
    assert_eq!(info(&b)["state"], "running", "{waiting}");
    let out = m.join().unwrap();
    let r: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_postcopy_whole(&r);
    assert_eq!(exit_code(&mut a, LIMIT), 0, "{}", read(&a.err));
    // Whole now: b goes on to c by itself, and the guest's checks pass there.
    let out = onward.join().unwrap();
    let r: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert_eq!(r["status"], "completed", "{r}");
    assert_eq!(exit_code(&mut b, LIMIT), 0, "{}", read(&b.err));
    gains(&c.log, "verify ok", 2);
    assert!(!read(&c.log).contains("FAILED"), "{}", read(&c.log));
    run(
        &["shutdown", "--api-socket", c.sock.to_str().unwrap()],
        LIMIT,
    );
    exit_code(&mut c, LIMIT);
}
