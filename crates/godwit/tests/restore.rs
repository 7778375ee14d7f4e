//! Restoring snapshots: lazily (the VM runs before its memory is read; touches are
//! filled from the file and the rest follows in the background) and eagerly, with the
//! guest checking every byte of its memory either way, and damage found before the
//! guest could see it.

mod common;

use common::mig::*;
use common::*;
use godwit_migration::snapshot_index::{Found, Index};
use godwit_migration::wire::{self, Frame};
use std::path::Path;

const LOG: [(&str, &str); 1] = [("GODWIT_LOG", "info")];

/// Restores `snap` (`how`: lazy or eager) and returns its output.
fn restore(snap: &Path, how: &str) -> std::process::Output {
    restore_with(snap, how, &[])
}

/// The same, with more arguments for `run`.
fn restore_with(snap: &Path, how: &str, more: &[&str]) -> std::process::Output {
    let f = format!("file:{}", snap.display());
    let mut args = vec![
        "run",
        "--incoming",
        &f,
        "--restore",
        how,
        "--console",
        "stdout",
    ];
    args.extend_from_slice(more);
    run_env(&args, &LOG, LIMIT)
}

fn index(snap: &Path) -> Index {
    match Index::open(std::fs::File::open(snap).unwrap()).unwrap() {
        Found::Index(ix) => ix,
        _ => panic!("{} has no page index", snap.display()),
    }
}

/// The dirtier saved while it rewrites its pages: pre-copy rounds leave several copies
/// of some pages in the file, and only the last may come back. The guest's clock runs
/// on while it is saved: by the time it is restored its time is up, and it checks every
/// page before it rewrites more than a few (a rewrite would hide a stale copy). Its
/// time leaves the snapshot seconds to be written: a guest that ends first fails the
/// migration, and on a loaded host 2 s were once not enough.
fn dirtier_snapshot(dir: &TempDir) -> std::path::PathBuf {
    let snap = dir.path("vm.snap");
    let t0 = std::time::Instant::now();
    let mut src = dirtier_source(
        dir,
        "src",
        "256",
        &["wss=64", "rate=100", "seconds=5", "report-every=250"],
    );
    let (out, r) = migrate(&src, &format!("file:{}", snap.display()), &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(r["status"], "completed", "{r}");
    let first = r["rounds"][0]["pages_sent"].as_u64().unwrap();
    assert!(
        r["bytes"]["pages_sent"].as_u64().unwrap() > first,
        "no page was sent twice: {r}"
    );
    assert_eq!(exit_code(&mut src, LIMIT), 0);
    std::thread::sleep(std::time::Duration::from_secs(6).saturating_sub(t0.elapsed()));
    snap
}

fn assert_verified(o: &std::process::Output) {
    assert!(o.status.success(), "{}\n{}", stdout(o), stderr(o));
    let out = stdout(o);
    assert!(out.contains("verify ok pages=16384"), "{out}");
    assert!(out.contains("result=ok"), "{out}");
}

#[test]
fn a_snapshot_restored_lazily_or_eagerly_gives_back_every_page() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("restore-dirtier");
    let snap = dirtier_snapshot(&dir);
    let o = restore(&snap, "lazy");
    assert_verified(&o);
    const LAZY: &str = "the VM runs before its memory is read";
    assert!(stderr(&o).contains(LAZY), "{}", stderr(&o));
    let o = restore(&snap, "eager");
    assert_verified(&o);
    assert!(!stderr(&o).contains(LAZY), "{}", stderr(&o));
    // Into prefaulted memory, lazily: every page goes in through the memory's alias.
    let o = restore_with(&snap, "lazy", &["--memory", "256", "--prefault"]);
    assert_verified(&o);
    let err = stderr(&o);
    assert!(err.contains(LAZY), "{err}");
    assert!(
        err.contains("guest RAM: post-copy places pages through the alias"),
        "{err}"
    );
    // A snapshot without an index (written before godwit had them) is read whole.
    let old = dir.path("old.snap");
    let bytes = std::fs::read(&snap).unwrap();
    std::fs::write(&old, &bytes[..index(&snap).stream_len() as usize]).unwrap();
    let o = restore(&old, "lazy");
    assert_verified(&o);
    assert!(stderr(&o).contains("no page index"), "{}", stderr(&o));
}

/// A snapshot's pages carry a CRC each, so that a lazy restore's touch reads and
/// checks its page alone; one written before they did (every frame checked whole by
/// one CRC) is restored as well, lazily and eagerly.
#[test]
fn a_snapshot_whose_frames_are_checked_whole_is_restored_too() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("restore-whole-frames");
    let snap = dirtier_snapshot(&dir);
    let ix = index(&snap);
    let t = ix.tables()[0].clone();
    let mut e = vec![0u64; t.pages as usize];
    ix.entries(&t, 0, &mut e).unwrap();
    let named: Vec<u64> = e.iter().copied().filter(|&a| a != 0).collect();
    assert!(!named.is_empty());
    for &at in &named {
        assert!(
            ix.pages_at(at).unwrap().is_some(),
            "the frame at {at} has no CRC of each page"
        );
    }
    // The same stream, every frame written again as before (PAGES checked whole), and
    // its index built anew.
    let bytes = std::fs::read(&snap).unwrap();
    let mut r = &bytes[..ix.stream_len() as usize];
    let mut out = Vec::new();
    let mut buf = Vec::new();
    while !r.is_empty() {
        let f = wire::read_frame(&mut r, &mut buf).unwrap();
        wire::write_frame(&mut out, &f).unwrap();
    }
    let old = dir.path("whole.snap");
    std::fs::write(&old, &out).unwrap();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&old)
        .unwrap();
    godwit_migration::snapshot_index::append(&f, out.len() as u64).unwrap();
    drop(f);
    let ix = index(&old);
    let t = ix.tables()[0].clone();
    ix.entries(&t, 0, &mut e).unwrap();
    assert!(e
        .iter()
        .filter(|&&a| a != 0)
        .all(|&at| ix.pages_at(at).unwrap().is_none()));
    let o = restore(&old, "lazy");
    assert_verified(&o);
    assert!(
        stderr(&o).contains("the VM runs before its memory is read"),
        "{}",
        stderr(&o)
    );
    assert_verified(&restore(&old, "eager"));
}

/// A snapshot file outlives the godwit that wrote it: one whose HELLO names the oldest
/// wire version this godwit takes is restored, lazily and eagerly; one older than
/// that is refused with both versions named, before any guest runs.
#[test]
fn a_snapshot_of_an_older_wire_version_is_restored_or_refused_clearly() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("restore-version");
    let snap = dirtier_snapshot(&dir);
    let bytes = std::fs::read(&snap).unwrap();
    // The same file with another version in its HELLO (the same length, so the page
    // index's offsets still hold).
    let with_version = |v: u32| {
        let mut buf = Vec::new();
        let Ok(Frame::Hello(mut h)) = wire::read_frame(&mut &bytes[..], &mut buf) else {
            panic!("a snapshot starts with HELLO")
        };
        assert_eq!(h.wire_version, wire::WIRE_VERSION);
        h.wire_version = v;
        let mut out = Vec::new();
        wire::write_frame(&mut out, &Frame::Hello(h)).unwrap();
        assert_eq!(out.len(), wire::HEADER_LEN + buf.len());
        out.extend_from_slice(&bytes[out.len()..]);
        let p = dir.path(&format!("v{v}.snap"));
        std::fs::write(&p, out).unwrap();
        p
    };
    let old = with_version(wire::OLDEST_WIRE_VERSION);
    assert_verified(&restore(&old, "lazy"));
    assert_verified(&restore(&old, "eager"));
    let older = with_version(wire::OLDEST_WIRE_VERSION - 1);
    for how in ["lazy", "eager"] {
        let o = restore(&older, how);
        assert_eq!(o.status.code(), Some(1), "{how}: {}", stderr(&o));
        let want = format!(
            "wire version {}, this godwit takes {} to {}",
            wire::OLDEST_WIRE_VERSION - 1,
            wire::OLDEST_WIRE_VERSION,
            wire::WIRE_VERSION
        );
        assert!(stderr(&o).contains(&want), "{how}: {}", stderr(&o));
        assert!(stdout(&o).is_empty(), "{how}: a guest ran: {}", stdout(&o));
    }
}

/// A page whose copy in the file is damaged stops a lazy restore with the reason when
/// it is read, before anything is placed from it; an eager restore refuses the file
/// before the VM runs at all.
#[test]
fn a_damaged_page_is_never_placed() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("restore-damaged");
    let snap = dirtier_snapshot(&dir);
    // A byte inside the data of a frame the index names as some page's latest copy.
    let ix = index(&snap);
    let t = ix.tables()[0].clone();
    let mut e = vec![0u64; t.pages as usize];
    ix.entries(&t, 0, &mut e).unwrap();
    let at = *e.iter().find(|&&x| x != 0).unwrap();
    let mut buf = Vec::new();
    let Ok(Frame::Pages { .. }) = ix.frame_at(at, &mut buf) else {
        panic!("the index does not name a PAGES frame")
    };
    let mut bytes = std::fs::read(&snap).unwrap();
    let at = at as usize;
    let h = wire::parse_header(bytes[at..at + wire::HEADER_LEN].try_into().unwrap()).unwrap();
    let data_at = at + wire::HEADER_LEN + wire::pages_head_len(h.len, h.checked).unwrap();
    bytes[data_at + 100] ^= 0x55;
    std::fs::write(&snap, &bytes).unwrap();
    let o = restore(&snap, "lazy");
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("corrupt"), "{err}");
    assert!(err.contains("cannot run without that memory"), "{err}");
    assert!(!stdout(&o).contains("result="), "{}", stdout(&o));
    let o = restore(&snap, "eager");
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("corrupt"), "{}", stderr(&o));
    assert!(stdout(&o).is_empty(), "{}", stdout(&o));
}

/// Both vCPUs of a guest restored lazily touch missing memory at once (the shared
/// counters, their own stacks) and run on.
#[test]
fn a_two_vcpu_guest_restores_lazily() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("restore-smp");
    let snap = dir.path("smp.snap");
    let mut src = source(&dir, "src", &["--vcpus", "2", "smp", "--", "ms=3000"]);
    wait_log(&src.log, "vcpu 1 online");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let (out, r) = migrate(&src, &format!("file:{}", snap.display()), &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(r["status"], "completed", "{r}");
    assert_eq!(exit_code(&mut src, LIMIT), 0);
    let o = restore(&snap, "lazy");
    assert!(o.status.success(), "{}\n{}", stdout(&o), stderr(&o));
    assert!(
        stdout(&o).contains("vcpus=2 concurrent=2 result=ok"),
        "{}",
        stdout(&o)
    );
    assert!(stderr(&o).contains("every page is in"), "{}", stderr(&o));
}

/// A VM restored lazily and moved on at once: its memory is still coming from the file
/// when the migration asks for it, so the migration waits until every page is in (a
/// page read out before it arrived would be a hole in the guest's memory where it
/// lands), then moves it; the guest's checks pass there.
#[test]
fn a_vm_restored_lazily_moves_on_at_once() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("restore-onward");
    let snap = dir.path("vm.snap");
    let mut src = dirtier_source(
        &dir,
        "src",
        "256",
        &[
            "wss=128",
            "rate=4",
            "seconds=0",
            "verify-every=1",
            "report-every=250",
        ],
    );
    let (out, r) = migrate(&src, &format!("file:{}", snap.display()), &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(r["status"], "completed", "{r}");
    assert_eq!(exit_code(&mut src, LIMIT), 0);
    let f = format!("file:{}", snap.display());
    let b_args = ["--incoming", &f, "--restore", "lazy", "--log-level", "info"];
    let mut b = source(&dir, "b", &b_args);
    // Its API answers before the snapshot is read (503, no VM yet): wait for the VM.
    wait_for(LIMIT, || {
        let (c, _) = godwit_vmm::api::call(&b.sock, "GET", "vm.info").ok()?;
        (c == 200).then_some(())
    })
    .expect("the restored VM never came up");
    let (mut c, addr_c) = destination(&dir, "c", &[]);
    let (out, r) = migrate(&b, &addr_c, &[]);
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert_eq!(r["status"], "completed", "{r}");
    assert_eq!(exit_code(&mut b, LIMIT), 0, "{}", read(&b.err));
    assert!(
        read(&b.err).contains("the VM runs before its memory is read"),
        "{}",
        read(&b.err)
    );
    gains(&c.log, "verify ok pages=32768", 2);
    assert!(!read(&c.log).contains("FAILED"), "{}", read(&c.log));
    run(
        &["shutdown", "--api-socket", c.sock.to_str().unwrap()],
        LIMIT,
    );
    exit_code(&mut c, LIMIT);
}

/// A VM restored lazily and stopped at once, while its first touches still wait for
/// pages, ends: whatever waits on a page is let go. A kick alone did not free a vCPU
/// whose touch was a walk of the guest's page tables under PVM (it spun in the host's
/// shadow paging with the kick pending): about 1 in 15 such stops hung there before.
/// The stops land in the first 6 ms after the vCPUs start, among the first touches.
#[test]
fn a_vm_stopped_in_its_first_lazy_touches_ends() {
    use std::io::BufRead;
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("restore-stopped");
    let snap = dirtier_snapshot(&dir);
    let f = format!("file:{}", snap.display());
    for i in 0..60u64 {
        let mut c = godwit()
            .args(["run", "--incoming", &f, "--restore", "lazy"])
            .args(["--console", "stdout"])
            .env("GODWIT_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut err = std::io::BufReader::new(c.stderr.take().unwrap());
        let mut line = String::new();
        while err.read_line(&mut line).unwrap_or(0) > 0 && !line.contains("the VM runs before") {
            line.clear();
        }
        // The rest of its log is drained meanwhile, so that no write of it can block.
        std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
        let after = std::time::Duration::from_micros(200 * (i % 30));
        std::thread::sleep(after);
        // SAFETY: signals the child just spawned, not yet reaped.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        if wait_for(LIMIT, || c.try_wait().unwrap()).is_none() {
            let _ = c.kill();
            let _ = c.wait();
            panic!("stopped {after:?} after its vCPUs started, the VM did not end");
        }
    }
}
