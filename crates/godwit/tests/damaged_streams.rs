//! Migration streams damaged on the way (a man in the middle flips or cuts bytes, or
//! damages page data past the frames' checks): the destination refuses them with a
//! clear error, never runs the VM, and the source runs on.

mod common;

use common::mig::*;
use common::*;
use std::time::Duration;

/// A guest rewriting 32 MiB at 10 MB/s and checking all of it every second, until shut
/// down: a stream that keeps going while a man in the middle damages it.
const DIRTY: &[&str] = &["wss=32", "rate=10", "seconds=0", "verify-every=1"];

#[test]
fn corrupt_and_truncated_streams_are_refused_and_the_source_runs_on() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("mig-mitm");
    let src = dirtier_source(&dir, "src", "128", DIRTY);
    for (i, (how, keep, want)) in [
        ("flip", 3 << 20, "corrupt"),
        ("cut", 2 << 20, "closed"),
        ("cut", 100, "closed"),
    ]
    .into_iter()
    .enumerate()
    {
        let (mut dst, addr) = destination(&dir, &format!("dst{i}"), &[]);
        let via = proxy(addr, keep, how);
        // One connection: the proxy damages the one stream.
        let (out, r) = migrate(&src, &via, &["--connections", "1"]);
        assert_eq!(out.status.code(), Some(1), "{how}: {}", stdout(&out));
        assert_eq!(r["status"], "failed");
        assert_eq!(r["source_running"], true);
        if keep < 1000 {
            // Cut inside HELLO: not a godwit source yet; dropped, and the destination
            // goes on waiting for one.
            wait_log(&dst.err, "dropped a connection");
            assert!(dst.proc.0.try_wait().unwrap().is_none(), "it ended");
            assert_eq!(info(&src)["state"], "running");
            continue;
        }
        assert_eq!(exit_code(&mut dst, LIMIT), 1, "{how}");
        let e = read(&dst.err);
        // A flipped byte in a page's data is held until the end ("arrived corrupt"), so
        // a later flip may be the one refused first: a header's magic or length, a
        // frame's CRC.
        let also: &[&str] = match how {
            "flip" => &["truncated", "bad magic", "malformed"],
            _ => &["truncated"],
        };
        assert!(
            e.contains(want) || also.iter().any(|a| e.contains(a)),
            "{how}: {e}"
        );
        assert!(!e.contains("panicked"), "{e}");
        assert_eq!(info(&src)["state"], "running");
    }
    // Page data damaged past the frame's checks (each page carries its own CRC, the
    // frame's covers the head): a damaged page that is not sent again (the guest did
    // not rewrite it) is found before the destination runs the VM, which it refuses.
    let (mut dst, addr) = destination(&dir, "dst-pages", &[]);
    let (via, proxy) = page_damaging_proxy(addr);
    // Pages with a CRC each travel on one connection, straight from guest memory.
    let (out, r) = migrate(&src, &via, &["--connections", "1"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert_eq!(r["source_running"], true);
    assert_eq!(exit_code(&mut dst, LIMIT), 1);
    let e = read(&dst.err);
    assert!(e.contains("arrived corrupt"), "{e}");
    assert!(!e.contains("panicked"), "{e}");
    assert!(read(&dst.log).is_empty(), "a guest ran on the destination");
    assert!(proxy.join().unwrap() > 0);
    assert_eq!(info(&src)["state"], "running");
    let n = read(&src.log).matches("verify ok").count();
    wait_for(Duration::from_secs(10), || {
        (read(&src.log).matches("verify ok").count() > n).then_some(())
    })
    .expect("the source guest stopped verifying");
    assert!(!read(&src.log).contains("FAILED"));
}

/// A main connection that goes bad while the data connection is sound: the destination
/// ends the data connection's reader too and says why at once, instead of waiting for
/// it to go idle (a minute) or for the source to give up (after 20 s without SYNCED):
/// before, the receive ended 21 to 52 s in here, the source timing out.
#[test]
fn a_corrupt_main_connection_ends_the_receive_without_waiting_for_the_data_connections() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("mig-mitm-main");
    let src = dirtier_source(&dir, "src", "128", DIRTY);
    let (mut dst, addr) = destination(&dir, "dst", &[]);
    // The proxy damages the first connection (the main one) only.
    let via = proxy(addr, 3 << 20, "flip");
    let t = std::time::Instant::now();
    let (out, r) = migrate(&src, &via, &["--connections", "2"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert_eq!(r["error_kind"], "aborted", "{r}");
    assert_eq!(r["source_running"], true, "{r}");
    assert_eq!(exit_code(&mut dst, LIMIT), 1);
    // Half the data connection's idle timeout: not waited out.
    let waited = t.elapsed();
    assert!(waited < Duration::from_secs(30), "it took {waited:?}");
    let e = read(&dst.err);
    let why = ["corrupt", "bad magic", "truncated", "malformed"];
    assert!(why.iter().any(|w| e.contains(w)), "{e}");
    assert!(!e.contains("panicked"), "{e}");
    assert_eq!(info(&src)["state"], "running");
}
