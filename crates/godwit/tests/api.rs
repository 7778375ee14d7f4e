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

/// Sends raw bytes, then reads whatever comes back until the server closes.
fn raw(sock: &std::path::Path, bytes: &[u8]) -> String {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn threads(pid: u32) -> usize {
    read(std::path::Path::new(&format!("/proc/{pid}/status")))
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// No client can hold another's request, grow the process or hold its exit: a stalled
/// request, an endless header, a flood of connections, bytes that are not HTTP.
#[test]
fn no_client_can_block_the_api_or_the_exit() {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("api-hostile");
    let sock = dir.path("api.sock");
    let mut vm = api_vm(&sock);
    let pid = vm.0.id();

    // A client announces a body and sends nothing. Others are served meanwhile: the
    // staller has still heard nothing when they have their answers.
    let mut staller = UnixStream::connect(&sock).unwrap();
    staller
        .write_all(b"PUT /api/v1/vm.pause HTTP/1.1\r\nContent-Length: 1025\r\n\r\n")
        .unwrap();
    for _ in 0..3 {
        let (code, body) = godwit_vmm_call(&sock, "GET", "vm.info");
        assert_eq!(code, 200, "{body}");
    }
    staller.set_nonblocking(true).unwrap();
    let mut b = [0u8; 1];
    assert!(
        matches!(staller.read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the stalled request was answered or closed before the others"
    );
    staller.set_nonblocking(false).unwrap();

    // An endless head is cut off at the limit and answered, whatever follows.
    let mut huge = b"GET /api/v1/vm.info HTTP/1.1\r\nX-Long: ".to_vec();
    huge.resize(100 << 10, b'a');
    let out = raw(&sock, &huge);
    assert!(out.starts_with("HTTP/1.1 431"), "{out}");
    // A body above the limit is refused from its Content-Length, unread.
    let out = raw(
        &sock,
        b"PUT /api/v1/vm.migrate HTTP/1.1\r\nContent-Length: 209715200\r\n\r\n",
    );
    assert!(out.starts_with("HTTP/1.1 413"), "{out}");
    // Bytes that are not HTTP, and a header that is not UTF-8, get an answer.
    let out = raw(&sock, b"\x00\xff\xfe garbage\r\n\r\n");
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    let out = raw(
        &sock,
        b"GET /api/v1/vm.info HTTP/1.1\r\nX-Name: \xff\xfe\r\n\r\n",
    );
    assert!(out.starts_with("HTTP/1.1 "), "no answer: {out:?}");
    let out = raw(
        &sock,
        b"PUT /api/v1/vm.pause HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    );
    assert!(out.starts_with("HTTP/1.1 411"), "{out}");

    // A flood of idle connections: beyond the limit they are turned away at once, the
    // process does not grow a thread each, and a request still gets an answer or a 503.
    let flood: Vec<UnixStream> = (0..200)
        .filter_map(|_| UnixStream::connect(&sock).ok())
        .collect();
    assert!(flood.len() >= 100, "only {} connections", flood.len());
    // Accepted in order: once this request is answered, the flood has been taken in.
    let (code, body) = godwit_vmm::api::call(&sock, "GET", "vm.info").unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("too many API connections"), "{body}");
    let t = threads(pid);
    assert!(t < 100, "{t} threads for {} connections", flood.len());
    drop(flood);

    // The exit is not held by the staller: it is cut off (no answer at all, where its
    // own deadline would have brought a 408) and the process ends.
    // (The flood's connections free their slots as their threads see them closed;
    // until then a request may still hear 503.)
    let (code, body) = wait_for(Duration::from_secs(30), || {
        Some(godwit_vmm_call(&sock, "PUT", "vm.shutdown")).filter(|(c, _)| *c != 503)
    })
    .expect("the API stayed full after the flood left");
    assert_eq!(code, 200, "{body}");
    let status = wait_for(Duration::from_secs(30), || vm.0.try_wait().unwrap())
        .expect("godwit did not exit");
    assert!(status.success());
    let mut rest = Vec::new();
    let _ = staller.read_to_end(&mut rest);
    assert!(
        rest.is_empty(),
        "the staller was answered before the exit: {}",
        String::from_utf8_lossy(&rest)
    );
    assert!(!sock.exists(), "socket left behind");
}

/// `--api-socket` never deletes what is not a stale socket: a regular file, a FIFO, a
/// directory are refused and left as they were.
#[test]
fn the_api_socket_never_replaces_a_file() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("api-files");
    let file = dir.path("notes.txt");
    std::fs::write(&file, "precious").unwrap();
    let fifo = dir.fifo("fifo");
    let sub = dir.path("sub");
    std::fs::create_dir(&sub).unwrap();
    for p in [&file, &fifo, &sub] {
        let o = run(
            &[
                "run",
                "--api-socket",
                p.to_str().unwrap(),
                "--console",
                "null",
                "heartbeat",
                "--",
                "count=1",
            ],
            Duration::from_secs(30),
        );
        assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
        assert!(stderr(&o).contains("not a socket"), "{}", stderr(&o));
        assert!(p.exists(), "{} was removed", p.display());
    }
    assert_eq!(read(&file), "precious");
    // The client says what the path is instead of "Connection refused".
    let o = cli(sub.to_str().unwrap(), "info");
    assert!(stderr(&o).contains("is a directory"), "{}", stderr(&o));
    let o = cli(file.to_str().unwrap(), "info");
    assert!(stderr(&o).contains("is a file"), "{}", stderr(&o));
}

/// A destination waiting for its source answers at once, saying so, instead of leaving
/// clients hanging until the source comes.
#[test]
fn a_waiting_destination_answers_its_api() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("api-waiting");
    let sock = dir.path("api.sock");
    let child = godwit()
        .args(["run", "--incoming", "tcp:127.0.0.1:0", "--api-socket"])
        .arg(&sock)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _vm = Reaper(child);
    let (code, body) = wait_for(Duration::from_secs(10), || {
        godwit_vmm::api::call(&sock, "GET", "vmm.ping").ok()
    })
    .expect("no answer");
    assert_eq!(code, 200, "{body}");
    // The address it bound (the port the kernel chose), for a manager to hand to the
    // source: in vmm.ping and beside the 503 of every other endpoint. The API answers
    // before the address is bound (while the memory is prefaulted), so a manager asks
    // until it is there, as the Nova driver does.
    let body = wait_for(Duration::from_secs(10), || {
        let (_, body) = godwit_vmm::api::call(&sock, "GET", "vmm.ping").ok()?;
        body.contains("\"incoming\"").then_some(body)
    })
    .unwrap_or_else(|| panic!("no incoming address in vmm.ping: {body}"));
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["vm"], "none yet", "{body}");
    let at = v["incoming"].as_str().expect("incoming").to_string();
    assert!(
        at.starts_with("tcp:127.0.0.1:") && !at.ends_with(":0"),
        "{body}"
    );
    let (code, body) = godwit_vmm::api::call(&sock, "GET", "vm.info").unwrap();
    assert_eq!(code, 503);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["incoming"].as_str(), Some(at.as_str()), "{body}");
    let o = cli(sock.to_str().unwrap(), "info");
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("waiting for an incoming migration on tcp:127.0.0.1:")
            && !stderr(&o).contains("127.0.0.1:0 "),
        "{}",
        stderr(&o)
    );
    assert!(stderr(&o).contains("HTTP 503"), "{}", stderr(&o));
}

/// A manager that restarts finds its VMs again: `godwit list DIR` names each socket's
/// VM by the id it was started with (and its pid and state), a destination still
/// waiting for its VM, and a socket nobody answers on; the id is the holder of the VM's
/// GPU function in `gpu status`. A malformed id is refused before anything starts.
/// `--gpu-index` takes the VF on the GPU a manager chose, not where placement would.
#[test]
fn list_finds_vms_by_id_and_sockets_left_behind() {
    if !kvm_available() {
        return;
    }
    let d = common::gpuhost::host("api-list", 2, &[]);
    let g = common::gpuhost::gpu_dir(&d);
    let vms = d.path("vms");
    std::fs::create_dir_all(&vms).unwrap();
    let id = "0b6f5a0e-1c2d-4e5f-9a8b-7c6d5e4f3a2b";
    let sock = |n: &str| vms.join(n).display().to_string();
    let spawn = |args: &[&str]| {
        Reaper(
            godwit()
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        )
    };
    let _vm = spawn(&[
        "run",
        "--api-socket",
        &sock("a.sock"),
        "--id",
        id,
        "--gpu",
        "GW8-1C",
        "--gpu-index",
        "1",
        "--gpu-dir",
        &g,
        "heartbeat",
        "--",
        "count=0",
    ]);
    let mig = sock("in.mig");
    let _dst = spawn(&[
        "run",
        "--api-socket",
        &sock("b.sock"),
        "--id",
        "dst-1",
        "--incoming",
        &format!("unix:{mig}"),
    ]);
    // A socket whose process is gone.
    drop(std::os::unix::net::UnixListener::bind(sock("c.sock")).unwrap());
    // The destination says where it listens once it is bound (not merely once its socket
    // file exists: it says so just after).
    assert!(wait_for(Duration::from_secs(10), || {
        let (c, _) =
            godwit_vmm::api::call(std::path::Path::new(&sock("a.sock")), "GET", "vm.info").ok()?;
        let (_, ping) =
            godwit_vmm::api::call(std::path::Path::new(&sock("b.sock")), "GET", "vmm.ping").ok()?;
        (c == 200 && ping.contains("\"incoming\"")).then_some(())
    })
    .is_some());
    let o = run(
        &["list", vms.to_str().unwrap(), "--json"],
        Duration::from_secs(30),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let l: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let l = l.as_array().unwrap();
    assert_eq!(
        l.len(),
        3,
        "the migration socket is not an API socket: {l:?}"
    );
    assert_eq!(l[0]["id"], id);
    assert_eq!(l[0]["state"], "running");
    assert!(l[0]["pid"].as_u64().unwrap() > 0);
    assert_eq!(l[0]["gpu"]["profile"], "GW8-1C", "{l:?}");
    assert_eq!(l[0]["seccomp"], "refuse", "{l:?}");
    assert_eq!(l[1]["state"], "waiting");
    assert_eq!(
        l[1]["incoming"].as_str(),
        Some(format!("unix:{mig}").as_str())
    );
    assert!(l[1]["message"]
        .as_str()
        .unwrap()
        .contains("waiting for an incoming migration"));
    assert_eq!(l[2]["state"], "gone");
    assert!(
        l[2]["message"].as_str().unwrap().contains("nobody"),
        "{l:?}"
    );
    let info = run(
        &["info", "--api-socket", &sock("a.sock")],
        Duration::from_secs(30),
    );
    let v: serde_json::Value = serde_json::from_str(&stdout(&info)).unwrap();
    assert_eq!(v["id"], id);
    let s = common::gpuhost::status(&d);
    assert_eq!(s[1]["vfs"][0]["holder"]["vm"], id, "{s}");
    assert_eq!(s[0]["vfs"].as_array().unwrap().len(), 0, "{s}");
    let o = run(
        &["run", "--id", "not an id", "heartbeat"],
        Duration::from_secs(30),
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--id: a VM id is"), "{}", stderr(&o));
}
