//! The virtual GPU from the outside: real VMs under KVM drive their VFs; VMs share a
//! GPU through the host manager; bad guests are contained; a crashed VM frees its VF.

mod common;
use common::gpuhost::*;
use common::*;
use std::process::Stdio;
use std::time::Duration;

fn spawn(
    d: &TempDir,
    name: &str,
    profile: &str,
    guest: &str,
    args: &[&str],
) -> (Reaper, std::path::PathBuf) {
    let log = d.path(&format!("{name}.log"));
    let child = godwit()
        .args([
            "run",
            "--gpu",
            profile,
            "--gpu-dir",
            &gpu_dir(d),
            "--console",
        ])
        .arg(format!("file:{}", log.display()))
        .arg("--api-socket")
        .arg(d.path(&format!("{name}.sock")))
        .arg(guest)
        .arg("--")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    (Reaper(child), log)
}

fn finish(vm: &mut Reaper, limit: Duration) -> (Option<i32>, String) {
    let end = std::time::Instant::now() + limit;
    loop {
        if let Some(s) = vm.0.try_wait().unwrap() {
            let mut err = String::new();
            if let Some(mut e) = vm.0.stderr.take() {
                use std::io::Read;
                let _ = e.read_to_string(&mut err);
            }
            return (s.code(), err);
        }
        assert!(
            std::time::Instant::now() < end,
            "VM did not finish within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `godwit run --gpu PROFILE --gpu-dir DIR ARGS...` to completion.
fn run_vm(dir: &str, profile: &str, args: &[&str], secs: u64) -> std::process::Output {
    let mut all = vec!["run", "--gpu", profile, "--gpu-dir", dir];
    all.extend(args);
    run(&all, Duration::from_secs(secs))
}

#[test]
fn gpu_verify_and_gpu_train_pass_with_the_known_answer() {
    if !kvm_available() {
        return;
    }
    let d = host("gpu-run", 1, &[]);
    let g = gpu_dir(&d);
    let o = run_vm(&g, "GW8-1C", &["gpu-verify", "--", "rounds=4", "mib=4"], 60);
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{out}\n{}", stderr(&o));
    assert!(
        out.contains("gpu-verify: done rounds=4 checks=48 errors=0"),
        "{out}"
    );

    let o = run_vm(
        &g,
        "gw8-2c",
        &["gpu-train", "--", "grid=48", "tol-exp=9"],
        60,
    );
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{out}\n{}", stderr(&o));
    let (iters, hash) = jacobi(48, 1e-9);
    assert!(
        out.contains(&format!("converged iterations={iters} "))
            && out.contains(&format!("hash={hash:#018x}")),
        "expected {iters} iterations and hash {hash:#018x}:\n{out}"
    );
    // Both VMs gave their VF back when they ended.
    assert_eq!(status(&d)[0]["vfs"].as_array().unwrap().len(), 0);
}

#[test]
fn two_vms_share_one_gpu_both_pass_and_cannot_see_each_other() {
    if !kvm_available() {
        return;
    }
    let d = host("gpu-share", 1, &[]);
    // Both compute at once on the one GPU.
    let (mut a, la) = spawn(&d, "a", "GW8-1C", "gpu-verify", &["rounds=15", "mib=4"]);
    let (mut b, lb) = spawn(&d, "b", "GW8-1C", "gpu-verify", &["rounds=15", "mib=4"]);
    let both = wait_for(Duration::from_secs(30), || {
        let s = status(&d);
        let vfs = s[0]["vfs"].as_array().unwrap().clone();
        (vfs.len() == 2 && vfs.iter().all(|v| v["engine_ms"].as_f64().unwrap() > 0.0))
            .then_some(vfs)
    });
    let vfs = both.expect("two VFs on gpu0, both using the engine");
    assert_ne!(vfs[0]["slot"], vfs[1]["slot"]);
    assert_ne!(vfs[0]["vram_offset"], vfs[1]["vram_offset"]);
    for (vm, log) in [(&mut a, &la), (&mut b, &lb)] {
        let (code, err) = finish(vm, Duration::from_secs(90));
        assert_eq!(code, Some(0), "{}\n{err}", read(log));
        assert!(read(log).contains("done rounds=15"), "{}", read(log));
    }

    // A fills its VRAM with a secret and holds it; B, on the same GPU, scans all of its
    // own VRAM and tries to map beyond it.
    let (_a, la) = spawn(
        &d,
        "secret",
        "GW8-1C",
        "gpu-probe",
        &["mode=secret", "secret=1589831661", "mib=256"],
    );
    assert!(
        wait_for(Duration::from_secs(30), || read(&la)
            .contains("verified")
            .then_some(()))
        .is_some(),
        "{}",
        read(&la)
    );
    let o = run_vm(
        &gpu_dir(&d),
        "GW8-1C",
        &["gpu-probe", "--", "mode=scan"],
        60,
    );
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{out}\n{}", stderr(&o));
    assert!(out.contains("0 non-zero words"), "{out}");
    assert!(out.contains("unreachable (GPU fault)"), "{out}");
    let s = status(&d);
    assert_eq!(
        s[0]["vfs"].as_array().unwrap().len(),
        1,
        "the scanner's VF is back"
    );
}

#[test]
fn bad_commands_are_contained_while_a_neighbour_computes() {
    if !kvm_available() {
        return;
    }
    let d = host("gpu-hostile", 1, &[]);
    let (mut good, lg) = spawn(&d, "good", "GW8-1C", "gpu-verify", &["rounds=20", "mib=4"]);
    let o = run_vm(
        &gpu_dir(&d),
        "GW8-1C",
        &["gpu-probe", "--", "mode=hostile"],
        60,
    );
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{out}\n{}", stderr(&o));
    assert!(out.contains("15 of 15 contained, canary intact"), "{out}");
    assert!(!stderr(&o).contains("panick"), "{}", stderr(&o));
    let (code, err) = finish(&mut good, Duration::from_secs(90));
    assert_eq!(code, Some(0), "{}\n{err}", read(&lg));
}

#[test]
fn a_crashed_vm_frees_its_vf_and_a_full_gpu_refuses_clearly() {
    if !kvm_available() {
        return;
    }
    let d = host("gpu-crash", 1, &[]);
    // GW8-8C: one per GPU.
    let (mut a, la) = spawn(&d, "a", "GW8-8C", "gpu-probe", &["mode=secret", "mib=64"]);
    assert!(wait_for(Duration::from_secs(30), || read(&la)
        .contains("verified")
        .then_some(()))
    .is_some());
    let o = run_vm(&gpu_dir(&d), "GW8-8C", &["gpu-verify"], 30);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("no GPU can take a GW8-8C VF: GPU 0 is full (1 of 1)"),
        "{}",
        stderr(&o)
    );
    let o = run_vm(&gpu_dir(&d), "GW8-1C", &["gpu-verify"], 30);
    assert!(
        stderr(&o).contains("GPU 0 runs GW8-8C VFs"),
        "{}",
        stderr(&o)
    );
    let o = run(
        &["run", "--gpu", "GW9-1Q", "--gpu-dir", &gpu_dir(&d)],
        Duration::from_secs(30),
    );
    assert!(stderr(&o).contains("unknown GPU profile"), "{}", stderr(&o));

    // Crash: SIGKILL, no chance to clean up. The VF is free at once.
    a.0.kill().unwrap();
    a.0.wait().unwrap();
    assert_eq!(status(&d)[0]["vfs"].as_array().unwrap().len(), 0);
    let o = run_vm(
        &gpu_dir(&d),
        "GW8-8C",
        &["gpu-probe", "--", "mode=scan"],
        120,
    );
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{out}\n{}", stderr(&o));
    assert!(out.contains(" 0 non-zero words"), "{out}");
}

#[test]
fn gpu_cli_profiles_status_and_policy() {
    if !kvm_available() {
        return;
    }
    let d = host("gpu-cli", 2, &["--placement", "depth-first"]);
    let g = gpu_dir(&d);
    let o = run(&["gpu", "profiles"], Duration::from_secs(10));
    assert!(
        stdout(&o).contains("GW8-2C") && stdout(&o).contains("25.0%"),
        "{}",
        stdout(&o)
    );
    let o = run(
        &["gpu", "policy", "1", "fixed-share", "--gpu-dir", &g],
        Duration::from_secs(10),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(
        &["gpu", "policy", "7", "fixed-share", "--gpu-dir", &g],
        Duration::from_secs(10),
    );
    assert!(stderr(&o).contains("no GPU 7"), "{}", stderr(&o));
    let o = run(
        &["gpu", "policy", "0", "fastest", "--gpu-dir", &g],
        Duration::from_secs(10),
    );
    assert!(stderr(&o).contains("unknown policy"), "{}", stderr(&o));
    let s = status(&d);
    assert_eq!(s[1]["policy"], "fixed-share");

    let (_vm, log) = spawn(
        &d,
        "m",
        "GW8-2C",
        "gpu-verify",
        &["rounds=0", "mib=1", "report-every=50"],
    );
    assert!(wait_for(Duration::from_secs(30), || read(&log)
        .contains("round 50 ok")
        .then_some(()))
    .is_some());
    let sock = d.path("m.sock");
    let o = run(
        &["info", "--api-socket", sock.to_str().unwrap()],
        Duration::from_secs(10),
    );
    let info: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(info["gpu"]["profile"], "GW8-2C");
    assert_eq!(info["gpu"]["gpu"], 0, "depth-first starts at GPU 0");
    let o = run(&["gpu", "status", "--gpu-dir", &g], Duration::from_secs(10));
    assert!(
        stdout(&o).contains("gpu0 GW-8 policy=best-effort profile=GW8-2C"),
        "{}",
        stdout(&o)
    );
    assert!(!read(&log).contains("MISMATCH"));
}

#[test]
fn vf_interrupts_wake_halted_vcpus_and_survive_pause() {
    if !kvm_available() {
        return;
    }
    let d = host("gpu-irq", 1, &[]);
    let g = gpu_dir(&d);
    // MSI off, masked, unmasked while pending, turned off again; fences and errors wake.
    let o = run_vm(&g, "GW8-1C", &["gpu-probe", "--", "mode=irq"], 60);
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{out}\n{}", stderr(&o));
    assert!(out.contains("gpu-probe: irq 6/6 ok"), "{out}");

    // A whole workload on interrupts, paused and resumed while it waits on them: no
    // wake-up is lost (the guest would hang) and every result still checks.
    let (mut vm, log) = spawn(
        &d,
        "v",
        "GW8-1C",
        "gpu-verify",
        &["rounds=150", "mib=2", "irq=200", "report-every=5"],
    );
    let sock = d.path("v.sock");
    let sock = sock.to_str().unwrap();
    assert!(wait_for(Duration::from_secs(30), || read(&log)
        .contains("round 5 ok")
        .then_some(()))
    .is_some());
    for _ in 0..8 {
        let o = run(&["pause", "--api-socket", sock], Duration::from_secs(10));
        assert!(o.status.success(), "{}", stderr(&o));
        std::thread::sleep(Duration::from_millis(30));
        let o = run(&["resume", "--api-socket", sock], Duration::from_secs(10));
        assert!(o.status.success(), "{}", stderr(&o));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !read(&log).contains("done rounds"),
        "the guest finished before the pauses ended: make it run longer"
    );
    let (code, err) = finish(&mut vm, Duration::from_secs(60));
    let out = read(&log);
    assert_eq!(code, Some(0), "{out}\n{err}");
    let irqs: u64 = out
        .split("errors=0 interrupts=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no interrupt count: {out}"));
    assert!(
        out.contains("done rounds=150 checks=1800") && irqs >= 150,
        "{out}"
    );
}

/// A stale scheduler never hangs the GPU: an engine owner left with a stamp from the
/// future (a holder killed before a reboot) is shown as stuck by `gpu status`, cleared
/// by `gpu init`, and never blocks a new VM; a VF whose lease file was replaced by a
/// directory is skipped while another VF is free.
#[test]
fn a_stale_scheduler_never_hangs_the_gpu() {
    if !kvm_available() {
        return;
    }
    let d = host("gpu-stale", 1, &[]);
    let dir = gpu_dir(&d);
    let poison = || {
        let shm = godwit_gpu::shm::GpuShm::open(&d.path("gpu").join("gpu0.shm")).unwrap();
        let p = shm.page();
        p.owner.store(3, std::sync::atomic::Ordering::SeqCst);
        p.owner_beat_ns.store(
            godwit_gpu::sched::now_ns() + 3600 * 1_000_000_000,
            std::sync::atomic::Ordering::SeqCst,
        );
    };
    poison();
    let st = status(&d);
    assert_eq!(st[0]["engine_owner"], 2, "{st}");
    assert_eq!(st[0]["engine_owner_stuck"], true, "{st}");
    let o = run(
        &["gpu", "status", "--gpu-dir", &dir],
        Duration::from_secs(10),
    );
    assert!(stdout(&o).contains("gone or stale"), "{}", stdout(&o));
    let o = run(
        &["gpu", "init", "--gpus", "1", "--gpu-dir", &dir],
        Duration::from_secs(10),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let st = status(&d);
    assert_eq!(st[0]["engine_owner"], serde_json::Value::Null, "{st}");
    // Poisoned again, with a VF lease path that is a directory: a VM still runs.
    poison();
    std::fs::create_dir(d.path("gpu").join("gpu0-vf0.lock")).unwrap();
    let o = run_vm(
        &dir,
        "GW8-1C",
        &["gpu-verify", "--", "rounds=2", "mib=4"],
        120,
    );
    assert!(o.status.success(), "{}", stderr(&o));
}

/// Another process holds the manager's lock for good (a `godwit gpu status` stopped in
/// a debugger, say): a GPU VM's start and a status each wait their bound, then fail
/// naming the lock, and the start leaves nothing behind (no VF held, no API socket);
/// once the lock is let go, VMs start again.
#[test]
fn a_manager_lock_held_elsewhere_fails_a_start_clearly_and_leaves_nothing() {
    use std::os::fd::AsRawFd;
    if !kvm_available() {
        return;
    }
    let d = host("gpu-busy", 1, &[]);
    let g = gpu_dir(&d);
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(d.path("gpu").join("manager.lock"))
        .unwrap();
    // SAFETY: flock on a descriptor this test owns.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    let sock = d.path("busy.sock");
    let start = {
        let (g, sock) = (g.clone(), sock.clone());
        std::thread::spawn(move || {
            let s = sock.to_str().unwrap();
            let args = ["--api-socket", s, "gpu-verify", "--", "rounds=1", "mib=1"];
            run_vm(&g, "GW8-1C", &args, 120)
        })
    };
    let o = run(
        &["gpu", "status", "--gpu-dir", &g],
        Duration::from_secs(120),
    );
    let o2 = start.join().unwrap();
    for (what, o) in [("status", &o), ("run", &o2)] {
        assert_eq!(o.status.code(), Some(1), "{what}: {}", stderr(o));
        assert!(
            stderr(o).contains("its lock (manager.lock) was held by another process for 30 s"),
            "{what}: {}",
            stderr(o)
        );
        assert!(!stderr(o).contains("panick"), "{what}: {}", stderr(o));
    }
    assert!(!sock.exists(), "the refused VM left its API socket");
    drop(lock);
    assert_eq!(status(&d)[0]["vfs"].as_array().unwrap().len(), 0);
    let o = run_vm(&g, "GW8-1C", &["gpu-verify", "--", "rounds=1", "mib=1"], 60);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}
