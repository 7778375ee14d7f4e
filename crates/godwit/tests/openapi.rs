//! The API against its OpenAPI description (docs/openapi.yaml), checked by schemathesis
//! on a live godwit: every answer must match the description, bad requests must be
//! refused with a 4xx, and nothing may answer 5xx. schemathesis speaks TCP, godwit's
//! API a Unix socket: a forwarder in this test joins them.
//!
//! `./test.sh` installs schemathesis (pinned) into target/test-venv. vm.migrate and
//! vm.shutdown are left out of the generated requests (a generated `file:` target would
//! write files anywhere; a shutdown ends the VM under test); their answers are covered
//! by the other API and migration tests.

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

fn schemathesis() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("GODWIT_SCHEMATHESIS") {
        return Some(p.into());
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/test-venv/bin/st");
    if p.exists() {
        return Some(p);
    }
    if std::env::var("GODWIT_SKIP_SCHEMATHESIS").as_deref() == Ok("1") {
        eprintln!("skipping: no schemathesis (GODWIT_SKIP_SCHEMATHESIS=1)");
        return None;
    }
    panic!(
        "schemathesis not found: run ./test.sh (it installs it into target/test-venv), set \
         GODWIT_SCHEMATHESIS=/path/to/st, or GODWIT_SKIP_SCHEMATHESIS=1 to skip"
    );
}

/// Forwards each TCP connection on a local port to the Unix socket.
fn forward(sock: PathBuf) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(tcp) = c else { continue };
            let Ok(unix) = UnixStream::connect(&sock) else {
                continue;
            };
            let (mut t2, mut u2) = (tcp.try_clone().unwrap(), unix.try_clone().unwrap());
            std::thread::spawn(move || {
                let mut b = [0u8; 8192];
                let (mut t, mut u) = (tcp, unix);
                while let Ok(n) = t.read(&mut b) {
                    if n == 0 || u.write_all(&b[..n]).is_err() {
                        break;
                    }
                }
                let _ = u.shutdown(std::net::Shutdown::Write);
            });
            std::thread::spawn(move || {
                let mut b = [0u8; 8192];
                while let Ok(n) = u2.read(&mut b) {
                    if n == 0 || t2.write_all(&b[..n]).is_err() {
                        break;
                    }
                }
                let _ = t2.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    port
}

#[test]
fn the_api_matches_its_openapi_description() {
    if !kvm_available() {
        return;
    }
    let Some(st) = schemathesis() else { return };
    let dir = TempDir::new("openapi");
    let sock = dir.path("api.sock");
    let child = godwit()
        .args(["run", "--api-socket"])
        .arg(&sock)
        .args(["--console", "null", "heartbeat", "--", "count=0"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut vm = Reaper(child);
    wait_for(Duration::from_secs(10), || {
        godwit_vmm::api::call(&sock, "GET", "vm.info").ok()
    })
    .expect("no API");
    let port = forward(sock.clone());
    let spec = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.yaml");
    let out = std::process::Command::new(&st)
        .arg("run")
        .arg(&spec)
        .args(["--url", &format!("http://127.0.0.1:{port}/api/v1")])
        .args(["--checks", "all", "--max-examples", "25", "--workers", "1"])
        .args([
            "--exclude-path",
            "/vm.migrate",
            "--exclude-path",
            "/vm.shutdown",
        ])
        .args(["--request-timeout", "10", "--no-color", "--seed", "1"])
        .env("SCHEMATHESIS_HOOKS", "")
        .output()
        .expect("run schemathesis");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "schemathesis found problems:\n{text}");
    // The VM lived through it all and still answers.
    let (code, body) = godwit_vmm::api::call(&sock, "GET", "vm.info").unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(vm.0.try_wait().unwrap().is_none());
}
