//! A godwit that may not catch page faults with userfaultfd: run by an unprivileged
//! user (here `nobody`, with /dev/kvm's group) where /dev/userfaultfd is root's, as
//! Linux makes it. Post-copy cannot come to such a destination, and a snapshot cannot
//! be restored lazily there. Each says so before anything is paused or built, and
//! what can go on does: a pre-copy, an eager restore.
//!
//! Run as root only (the test drops to `nobody` with setpriv), and only where `nobody`
//! may really not catch them; elsewhere each test says why it skips.

mod common;

use common::gpuhost::*;
use common::mig::*;
use common::seccomp;
use common::*;
use godwit_migration::wire::Kind;
use serde_json::Value;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// How long the proxy holds the destination's ACCEPT back from the source.
const ACCEPT_LATE: Duration = Duration::from_secs(3);

/// `setpriv` arguments that run the rest as `nobody` with /dev/kvm's group and no
/// capabilities, where that user may open /dev/kvm but not catch page faults; None
/// (said) where this cannot be shown here.
fn as_nobody() -> Option<Vec<String>> {
    if !kvm_available() {
        return None;
    }
    let skip = |why: &str| {
        eprintln!("skipping: {why}");
        None
    };
    if !std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0) {
        return skip("not root: cannot run a process as another user");
    }
    if !Path::new("/usr/bin/setpriv").exists() {
        return skip("no setpriv (util-linux)");
    }
    let kvm = std::fs::metadata("/dev/kvm").unwrap().gid();
    // The device, where its user may open it; else the system call (godwit falls back
    // to it), which the sysctl may open to all.
    let may_catch = std::fs::metadata("/dev/userfaultfd")
        .is_ok_and(|m| m.mode() & 0o006 == 0o006 || (m.gid() == kvm && m.mode() & 0o060 == 0o060))
        || read(Path::new("/proc/sys/vm/unprivileged_userfaultfd")).trim() == "1";
    if may_catch {
        return skip("an unprivileged user may catch page faults on this host");
    }
    Some(
        [
            "/usr/bin/setpriv",
            "--reuid=65534",
            "--regid=65534",
            &format!("--groups={kvm}"),
            "--inh-caps=-all",
        ]
        .map(String::from)
        .to_vec(),
    )
}

/// A test directory the unprivileged godwit can write its console and socket into.
fn shared_dir(tag: &str) -> TempDir {
    let d = TempDir::new(tag);
    std::fs::set_permissions(&d.0, std::fs::Permissions::from_mode(0o777)).unwrap();
    d
}

/// The report of a migration refused before the VM paused: nothing sent, the VM
/// still running here, the error of `kind` naming userfaultfd and what to change.
fn refused_up_front(out: &std::process::Output, r: &Value, kind: &str) {
    assert!(!out.status.success(), "{r}");
    assert_eq!(r["error_kind"], kind, "{r}");
    let e = r["error"].as_str().unwrap();
    assert!(
        e.contains("/dev/userfaultfd") && e.contains("run godwit as root"),
        "{e}"
    );
    assert_eq!(r["downtime_ms"].as_f64(), Some(0.0), "{r}");
    assert_eq!(r["rounds"].as_array().map(Vec::len), Some(0), "{r}");
    assert_eq!(r["source_running"], true, "{r}");
}

/// The report of `--mode auto` to such a destination: it moved the VM in pre-copy and
/// says why post-copy could not come.
fn moved_in_precopy(out: &std::process::Output, r: &Value) {
    assert!(out.status.success(), "{r}");
    assert_eq!(r["mode"], "auto", "{r}");
    assert_eq!(r["ran"], "precopy", "{r}");
    assert!(
        r["postcopy_unavailable"]
            .as_str()
            .unwrap()
            .contains("/dev/userfaultfd"),
        "{r}"
    );
}

/// `--mode postcopy` is refused by the destination at the handshake, `--mode hybrid`
/// by the source once ACCEPT says post-copy cannot come: neither pauses the VM, which
/// runs on here. `--mode auto` then moves it in pre-copy, where `migrate-postcopy` is
/// refused with the destination's reason, and the guest checks all of its memory at
/// the destination.
#[test]
fn post_copy_to_a_destination_that_cannot_take_it_is_refused_before_the_vm_pauses() {
    let Some(nobody) = as_nobody() else {
        return;
    };
    let dir = shared_dir("uf-modes");
    // 16 MiB rewritten at 10 MiB/s over a link of 8: auto must hold the guest back
    // (or would have switched), and is slow enough to be asked to switch by hand.
    let mut src = dirtier_source(
        &dir,
        "src",
        "256",
        &["wss=16", "rate=10", "seconds=25", "report-every=250"],
    );
    let (mut dst, addr) = destination_through(&nobody, &dir, "dst-postcopy", &[], &[]);
    // Whoever started it is told at once.
    wait_log(&dst.err, "post-copy cannot come here, pre-copy can: ");
    let (out, r) = migrate(&src, &addr, &["--mode", "postcopy"]);
    refused_up_front(&out, &r, "refused");
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("post-copy cannot come here"),
        "{r}"
    );
    assert_ne!(exit_code(&mut dst, LIMIT), 0);

    let (mut dst, addr) = destination_through(&nobody, &dir, "dst-hybrid", &[], &[]);
    let (out, r) = migrate(&src, &addr, &["--mode", "hybrid"]);
    refused_up_front(&out, &r, "no_postcopy");
    assert_ne!(exit_code(&mut dst, LIMIT), 0);
    // Still running here, and writing.
    gains(&src.log, "dirtier: t_ms=", 2);

    let (mut dst, addr) = destination_through(&nobody, &dir, "dst-auto", &[], &[]);
    // ACCEPT held back on its way to the source: `migrate-postcopy` comes while the
    // migration still connects, and waits to hear why post-copy cannot come.
    let (via, accepted) = handshake_proxy(addr, false, Kind::Accept, Hold::Delay(ACCEPT_LATE));
    let m = migrating(
        &src,
        &via,
        &[
            "--mode",
            "auto",
            "--max-bandwidth",
            "8M",
            "--downtime-ms",
            "50",
        ],
    );
    wait_progress(&src);
    let sock = src.sock.to_str().unwrap().to_string();
    assert!(!accepted.load(Ordering::SeqCst), "ACCEPT came too early");
    let o = run(&["migrate-postcopy", "--api-socket", &sock], LIMIT);
    // The reason came with ACCEPT: the answer waited for it.
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("the destination cannot take post-copy")
            && stderr(&o).contains("/dev/userfaultfd"),
        "{}",
        stderr(&o)
    );
    // And in its rounds, the same.
    wait_for(LIMIT, || {
        (migration(&src)["progress"]["phase"] == "precopy").then_some(())
    })
    .expect("the migration never reached its rounds");
    let o = run(&["migrate-postcopy", "--api-socket", &sock], LIMIT);
    assert!(
        !o.status.success() && stderr(&o).contains("the destination cannot take post-copy"),
        "{}",
        stderr(&o)
    );
    let out = m.join().unwrap();
    let r: Value = serde_json::from_str(&stdout(&out)).unwrap();
    moved_in_precopy(&out, &r);
    assert_eq!(exit_code(&mut src, LIMIT), 0, "{}", read(&src.err));
    assert_verified(&mut dst, 4096);
}

/// A snapshot restored where page faults cannot be caught: read whole first (said on
/// stderr) when no way was asked for, the guest then checking all of its memory; with
/// `--restore lazy` refused at once, nothing started.
#[test]
fn a_snapshot_restored_without_userfaultfd_is_read_eagerly_or_refused_if_lazy_is_asked() {
    let Some(nobody) = as_nobody() else {
        return;
    };
    let dir = shared_dir("uf-restore");
    let incoming = dirtier_snapshot(&dir);
    let mut lazy = restored_through(&nobody, &dir, "lazy", &incoming, &["--restore", "lazy"]);
    assert_eq!(exit_code(&mut lazy, LIMIT), 1);
    let e = read(&lazy.err);
    assert!(
        e.contains("--restore lazy:")
            && e.contains("/dev/userfaultfd")
            && e.contains("--restore eager"),
        "{e}"
    );
    assert!(read(&lazy.log).is_empty(), "{}", read(&lazy.log));

    let mut dst = restored_through(&nobody, &dir, "dst", &incoming, &[]);
    assert_verified(&mut dst, 4096);
    assert!(
        read(&dst.err).contains("restoring eagerly (all memory read first)"),
        "{}",
        read(&dst.err)
    );
}

/// A snapshot of the dirtier (16 MiB rewritten) in `dir`, readable by all: the address
/// to restore it from.
fn dirtier_snapshot(dir: &TempDir) -> String {
    let src = dirtier_source(
        dir,
        "src",
        "256",
        &["wss=16", "rate=10", "seconds=4", "report-every=250"],
    );
    let snap = dir.path("vm.snap");
    let (out, r) = migrate(&src, &format!("file:{}", snap.display()), &[]);
    assert!(out.status.success(), "{r}");
    std::fs::set_permissions(&snap, std::fs::Permissions::from_mode(0o644)).unwrap();
    format!("file:{}", snap.display())
}

/// `godwit run --incoming <incoming> <extra>` started by `who`, its console and stderr
/// in `dir` as `name`.
fn restored_through(
    who: &[String],
    dir: &TempDir,
    name: &str,
    incoming: &str,
    extra: &[&str],
) -> Vm {
    let (log, err) = (
        dir.path(&format!("{name}.log")),
        dir.path(&format!("{name}.err")),
    );
    let mut a = vec!["run".to_string(), "--incoming".into(), incoming.into()];
    a.extend(extra.iter().map(|x| x.to_string()));
    Vm {
        proc: spawn_through(who, &a, &log, &err, &[]),
        log,
        err,
        sock: dir.path("none"),
    }
}

/// A VM with a GPU function, gpu-train mid-job, moved to such a destination (its own
/// GPU host, which `nobody` runs too): hybrid is refused before anything pauses (the
/// job runs on here), `auto` moves RAM and VRAM in pre-copy, and the job ends at the
/// destination with the answer of a run that never moved; no GPU function is left
/// leased on either host.
#[test]
fn a_gpu_vm_moves_in_pre_copy_to_a_destination_that_cannot_take_post_copy() {
    let Some(nobody) = as_nobody() else {
        return;
    };
    let dir = shared_dir("uf-gpu");
    let (src_host, mut src) = gpu_train_source("uf-gpu-src");
    let dst_gpu = gpu_host_of(&nobody, &dir);
    wait_log(&src.log, "iteration 2000 ");

    let (mut dst, addr) =
        destination_through(&nobody, &dir, "dst-hybrid", &["--gpu-dir", &dst_gpu], &[]);
    let (out, r) = migrate(&src, &addr, &["--mode", "hybrid"]);
    refused_up_front(&out, &r, "no_postcopy");
    assert_ne!(exit_code(&mut dst, LIMIT), 0);
    // The job runs on here.
    gains(&src.log, "iteration ", 2);

    let (mut dst, addr) =
        destination_through(&nobody, &dir, "dst-auto", &["--gpu-dir", &dst_gpu], &[]);
    let (out, r) = migrate(&src, &addr, &["--mode", "auto", "--max-bandwidth", "32M"]);
    moved_in_precopy(&out, &r);
    assert_eq!(exit_code(&mut src, LIMIT), 0, "{}", read(&src.err));
    assert_eq!(exit_code(&mut dst, LIMIT), 0, "{}", read(&dst.err));
    assert_trained(&read(&dst.log));
    assert_eq!(status(&src_host)[0]["vfs"].as_array().unwrap().len(), 0);
    assert_no_vf_leased(&dst_gpu);
}

/// gpu-train on a GPU host of its own, past its first 2000 iterations.
fn gpu_train_source(tag: &str) -> (TempDir, Vm) {
    let d = host(tag, 1, &[]);
    let g = gpu_dir(&d);
    let src = source(
        &d,
        "src",
        &[
            &["--gpu", "GW8-1C", "--gpu-dir", &g, "gpu-train", "--"],
            TRAIN,
        ]
        .concat(),
    );
    wait_log(&src.log, "iteration 2000 ");
    (d, src)
}

/// A GPU host in `dir` made by the user `who` runs as (`gpu init` through it), which
/// that user's destination then leases from.
fn gpu_host_of(who: &[String], dir: &TempDir) -> String {
    let g = dir.path("gpu").display().to_string();
    let o = std::process::Command::new(&who[0])
        .args(&who[1..])
        .arg(env!("CARGO_BIN_EXE_godwit"))
        .args(["gpu", "init", "--gpus", "1", "--gpu-dir", &g])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    g
}

fn assert_no_vf_leased(gpu_dir: &str) {
    let o = run(&["gpu", "status", "--json", "--gpu-dir", gpu_dir], LIMIT);
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v[0]["vfs"].as_array().unwrap().len(), 0, "{v}");
}

/// `as_nobody`'s user, given CAP_SYS_PTRACE (and still no access to /dev/userfaultfd).
fn with_ptrace(nobody: &[String]) -> Vec<String> {
    nobody
        .iter()
        .map(|a| match a.as_str() {
            "--inh-caps=-all" => "--inh-caps=-all,+sys_ptrace".into(),
            a => a.into(),
        })
        .chain(["--ambient-caps=-all,+sys_ptrace".to_string()])
        .collect()
}

/// The same user with CAP_SYS_PTRACE, and still no access to /dev/userfaultfd: the
/// system call gives it a userfaultfd for faults from inside KVM (godwit falls back to
/// it as QEMU does), so post-copy comes (into prefaulted memory too), and a snapshot is
/// restored lazily.
#[test]
fn with_cap_sys_ptrace_post_copy_comes_through_the_system_call() {
    let Some(nobody) = as_nobody() else {
        return;
    };
    let ptrace = with_ptrace(&nobody);
    // Into private memory, and into prefaulted (shared) memory, whose pages are
    // placed through minor faults.
    for (tag, extra) in [
        ("uf-ptrace", &[][..]),
        ("uf-ptrace-prefault", &["--memory", "256", "--prefault"][..]),
    ] {
        let dir = shared_dir(tag);
        let mut src = dirtier_source(
            &dir,
            "src",
            "256",
            &["wss=16", "rate=10", "seconds=4", "report-every=250"],
        );
        let (mut dst, addr) = destination_through(&ptrace, &dir, "dst", extra, &[]);
        let (out, r) = migrate(&src, &addr, &["--mode", "postcopy"]);
        assert!(out.status.success(), "{tag}: {r}");
        assert_postcopy_whole(&r);
        assert_eq!(exit_code(&mut src, LIMIT), 0, "{}", read(&src.err));
        assert_verified(&mut dst, 4096);
        let e = read(&dst.err);
        assert!(!e.contains("cannot come"), "{e}");
        assert_eq!(
            e.contains("guest memory prefaulted"),
            !extra.is_empty(),
            "{e}"
        );
    }

    let dir = shared_dir("uf-ptrace-restore");
    let incoming = dirtier_snapshot(&dir);
    let mut lazy = restored_through(&ptrace, &dir, "lazy", &incoming, &["--restore", "lazy"]);
    assert_verified(&mut lazy, 4096);
}

/// A VM with a GPU function, gpu-train mid-job, moved in post-copy to a destination run
/// as that user with CAP_SYS_PTRACE on its own GPU host: VRAM still at the source is
/// fetched as the guest and its GPU engine touch it (6 remote faults and 32 pages
/// fetched ahead of 1,024 in the run that added this), the job ends with the reference
/// answer, and every page the destination lacked reached it.
#[test]
fn a_gpu_vm_moves_in_post_copy_to_a_destination_with_cap_sys_ptrace() {
    let Some(nobody) = as_nobody() else {
        return;
    };
    let ptrace = with_ptrace(&nobody);
    let dir = shared_dir("uf-gpu-ptrace");
    let (src_host, mut src) = gpu_train_source("uf-gpu-ptrace-src");
    let dst_gpu = gpu_host_of(&ptrace, &dir);
    let (mut dst, addr) = destination_through(&ptrace, &dir, "dst", &["--gpu-dir", &dst_gpu], &[]);
    let (out, r) = migrate(
        &src,
        &addr,
        &["--mode", "postcopy", "--max-bandwidth", "32M"],
    );
    assert!(out.status.success(), "{r}");
    assert_postcopy_whole(&r);
    let p = &r["postcopy"];
    let vram = p["missing_pages"]["gpu"].as_u64().unwrap();
    assert!(vram > 0, "{r}");
    let d = &p["destination"]["gpu"];
    let placed = d["remote_faults"].as_u64().unwrap()
        + d["prepaged"].as_u64().unwrap()
        + d["fetched_ahead"].as_u64().unwrap();
    assert_eq!(placed, vram, "{r}");
    assert_eq!(exit_code(&mut src, LIMIT), 0, "{}", read(&src.err));
    assert_eq!(exit_code(&mut dst, LIMIT), 0, "{}", read(&dst.err));
    assert_trained(&read(&dst.log));
    assert_eq!(status(&src_host)[0]["vfs"].as_array().unwrap().len(), 0);
    assert_no_vf_leased(&dst_gpu);
}

/// The same user with CAP_SYS_PTRACE, under a seccomp filter that refuses
/// userfaultfd(2) with EPERM, as a container runtime's default profile does: neither
/// the device nor the system call gives it a userfaultfd, so post-copy is refused
/// before the VM pauses and a lazy restore at once, each naming the filter among the
/// causes; `--mode auto` moves the VM in pre-copy and the guest checks all of its
/// memory.
#[test]
fn under_a_seccomp_filter_that_refuses_userfaultfd_post_copy_is_refused_up_front() {
    let Some(nobody) = as_nobody().filter(|_| seccomp::available()) else {
        return;
    };
    let ptrace = with_ptrace(&nobody);
    // The refusal is the filter's: under it, the user still has CAP_SYS_PTRACE (which
    // grants the call without it, as the test above shows).
    let status = seccomp_without_userfaultfd(|| {
        std::process::Command::new(&ptrace[0])
            .args(&ptrace[1..])
            .args(["cat", "/proc/self/status"])
            .output()
            .unwrap()
    });
    let status = stdout(&status);
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {status}"))
            .trim()
            .to_string()
    };
    // CAP_SYS_PTRACE is capability 19.
    let cap_eff = u64::from_str_radix(&field("CapEff:"), 16).unwrap();
    assert_ne!(cap_eff & 1 << 19, 0, "{status}");
    assert_eq!(field("Seccomp:"), "2", "{status}");

    let dir = shared_dir("uf-seccomp");
    // Running long enough for a refusal and a second destination on a busy host.
    let mut src = dirtier_source(
        &dir,
        "src",
        "256",
        &["wss=16", "rate=10", "seconds=12", "report-every=250"],
    );
    let named_filter = |e: &str| {
        assert!(
            e.contains("a seccomp filter") && e.contains("CAP_SYS_PTRACE"),
            "{e}"
        )
    };
    let (mut dst, addr) = seccomp_without_userfaultfd(|| {
        destination_through(&ptrace, &dir, "dst-postcopy", &[], &[])
    });
    wait_log(&dst.err, "post-copy cannot come here, pre-copy can: ");
    named_filter(&read(&dst.err));
    let (out, r) = migrate(&src, &addr, &["--mode", "postcopy"]);
    refused_up_front(&out, &r, "refused");
    named_filter(r["error"].as_str().unwrap());
    assert_ne!(exit_code(&mut dst, LIMIT), 0);

    let (mut dst, addr) =
        seccomp_without_userfaultfd(|| destination_through(&ptrace, &dir, "dst-auto", &[], &[]));
    let (out, r) = migrate(&src, &addr, &["--mode", "auto"]);
    moved_in_precopy(&out, &r);
    assert_eq!(exit_code(&mut src, LIMIT), 0, "{}", read(&src.err));
    assert_verified(&mut dst, 4096);

    let incoming = dirtier_snapshot(&dir);
    let mut lazy = seccomp_without_userfaultfd(|| {
        restored_through(&ptrace, &dir, "lazy", &incoming, &["--restore", "lazy"])
    });
    assert_eq!(exit_code(&mut lazy, LIMIT), 1);
    let e = read(&lazy.err);
    assert!(e.contains("--restore lazy:"), "{e}");
    named_filter(&e);
}

/// `f` where userfaultfd(2) fails with EPERM, as a seccomp profile that forbids it
/// answers.
fn seccomp_without_userfaultfd<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    seccomp::under_filter(seccomp::Refuse::Call(libc::SYS_userfaultfd), libc::EPERM, f)
}
