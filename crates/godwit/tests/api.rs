//! The HTTP/JSON API on a Unix socket, driven through the CLI like a user would.

mod common;
use common::*;
use std::process::Stdio;
use std::time::Duration;

fn beats(log: &std::path::Path) -> usize {
    read(log).matches("heartbeat seq=").count()
}

fn cli(socket: &str, cmd: &str) -> std::process::Output {
    run(&[cmd, "--api-socket", socket], Duration::from_secs(30))
}

#[test]
fn pause_resume_info_and_shutdown() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("api");
    let sock = dir.path("api.sock");
    let log = dir.path("console.log");
    let s = sock.to_str().unwrap();
    let child = godwit()
        .args(["run", "--vcpus", "2", "--api-socket", s, "--console"])
        .arg(format!("file:{}", log.display()))
        .args(["heartbeat", "--", "period=10", "count=0"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut vm = Reaper(child);
    assert!(
        wait_for(Duration::from_secs(10), || (beats(&log) >= 5).then_some(())).is_some(),
        "no heartbeat"
    );

    let o = cli(s, "info");
    assert!(o.status.success(), "{}", stderr(&o));
    let info: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(info["state"], "running");
    assert_eq!(info["vcpus"], 2);
    assert_eq!(info["memory_mib"], 256);
    assert_eq!(info["guest"], "heartbeat");
    assert!(info["vcpu_stats"][0]["exits"].as_u64().unwrap() > 0);

    // Paused: no beat for a while, and the API says so.
    assert!(cli(s, "pause").status.success());
    let n = beats(&log);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(beats(&log), n, "the guest ran while paused");
    let o = cli(s, "info");
    let info: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(info["state"], "paused");
    // Pausing twice is a clear error, not a hang.
    let o = cli(s, "pause");
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("already paused"), "{}", stderr(&o));

    assert!(cli(s, "resume").status.success());
    assert!(
        wait_for(Duration::from_secs(10), || (beats(&log) >= n + 5)
            .then_some(()))
        .is_some(),
        "no heartbeat after resume"
    );
    let o = cli(s, "resume");
    assert!(stderr(&o).contains("not paused"));

    // A second godwit on the same socket must refuse before creating a VM, and must not
    // disturb the first.
    let o = run(
        &["run", "--api-socket", s, "heartbeat"],
        Duration::from_secs(30),
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("already in use"), "{}", stderr(&o));
    assert!(stdout(&o).is_empty(), "a duplicate VM started");
    assert!(cli(s, "info").status.success());

    assert!(cli(s, "shutdown").status.success());
    let status = wait_for(Duration::from_secs(10), || vm.0.try_wait().unwrap())
        .expect("godwit did not exit");
    assert!(status.success());
    assert!(!sock.exists(), "socket left behind");
    // The console shows whole lines only.
    assert!(read(&log)
        .lines()
        .all(|l| l.starts_with("heartbeat seq=") || l.starts_with("godwit-rt:")));
}

#[test]
fn api_errors_are_clear() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("api-errors");
    let sock = dir.path("api.sock");
    let s = sock.to_str().unwrap();
    // Nobody listening.
    let o = cli(s, "info");
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("cannot connect to the API socket"),
        "{}",
        stderr(&o)
    );

    let child = godwit()
        .args([
            "run",
            "--api-socket",
            s,
            "--console",
            "null",
            "heartbeat",
            "--",
            "count=0",
        ])
        .spawn()
        .unwrap();
    let _vm = Reaper(child);
    assert!(wait_for(Duration::from_secs(10), || sock.exists().then_some(())).is_some());
    let (code, body) = godwit_vmm_call(&sock, "GET", "vm.nothing");
    assert_eq!(code, 404, "{body}");
    let (code, body) = godwit_vmm_call(&sock, "GET", "vm.pause");
    assert_eq!(code, 405, "{body}");
    assert!(body.contains("not allowed"));
    let (code, _) = godwit_vmm_call(&sock, "GET", "vmm.ping");
    assert_eq!(code, 200);
    // A stale socket file (no process behind it) is taken over.
    let stale = dir.path("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let o = run(
        &[
            "run",
            "--api-socket",
            stale.to_str().unwrap(),
            "--console",
            "null",
            "heartbeat",
            "--",
            "count=1",
        ],
        Duration::from_secs(30),
    );
    assert!(o.status.success(), "{}", stderr(&o));
}

fn godwit_vmm_call(sock: &std::path::Path, method: &str, endpoint: &str) -> (u16, String) {
    godwit_vmm::api::call(sock, method, endpoint).unwrap()
}
