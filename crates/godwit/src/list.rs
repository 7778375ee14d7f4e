//! `godwit list DIR`: the godwit processes whose API sockets are in DIR. One godwit
//! runs one VM and outlives whoever started it; a manager that restarts (Nova's compute
//! service) keeps its VMs' sockets in one directory and finds them again here: each
//! socket's VM (id, pid, state, guest), a destination still waiting for its VM, or a
//! socket nobody answers on (left by a godwit that is gone).

use serde::Serialize;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

/// How long one socket has to answer.
const ANSWER: Duration = Duration::from_secs(2);

#[derive(Serialize)]
struct Entry {
    socket: PathBuf,
    /// running, paused, created, stopped; waiting (a destination with no VM yet);
    /// gone (nobody answers).
    state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pid: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    guest: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    memory_mib: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    vcpus: Option<u64>,
    /// The system-call filter's mode over it (`godwit run --seccomp`).
    #[serde(skip_serializing_if = "Option::is_none")]
    seccomp: Option<String>,
    /// The GPU function it holds, as `vm.info` gives it.
    #[serde(skip_serializing_if = "Value::is_null")]
    gpu: Value,
    /// Why it is waiting, or why it does not answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<String>,
    /// Where a waiting destination listens for its source.
    #[serde(skip_serializing_if = "Option::is_none")]
    incoming: Option<String>,
}

fn entry(socket: PathBuf) -> Entry {
    let mut e = Entry {
        socket,
        state: "gone".into(),
        id: None,
        pid: None,
        guest: None,
        memory_mib: None,
        vcpus: None,
        seccomp: None,
        gpu: Value::Null,
        message: None,
        incoming: None,
    };
    match godwit_vmm::api::call_with(&e.socket, "GET", "vm.info", "", Some(ANSWER)) {
        Ok((200, body)) => {
            let v: Value = serde_json::from_str(&body).unwrap_or_default();
            e.state = v["state"].as_str().unwrap_or("unknown").into();
            e.id = v["id"].as_str().map(String::from);
            e.pid = v["pid"].as_u64();
            e.guest = v["guest"].as_str().map(String::from);
            e.memory_mib = v["memory_mib"].as_u64();
            e.vcpus = v["vcpus"].as_u64();
            e.seccomp = v["seccomp"].as_str().map(String::from);
            e.gpu = v["gpu"].clone();
        }
        Ok((code, body)) => {
            let v: Value = serde_json::from_str(&body).unwrap_or_default();
            e.state = if code == 503 { "waiting" } else { "unknown" }.into();
            e.message = Some(v["error"].as_str().unwrap_or(&body).to_string());
            e.incoming = v["incoming"].as_str().map(String::from);
        }
        Err(why) => e.message = Some(format!("nobody answers: {why}")),
    }
    e
}

/// The API sockets in `dir` (sockets named `*.sock`: a migration's listening socket
/// beside them is not asked), by name.
fn sockets(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    use std::os::unix::fs::FileTypeExt;
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|d| d.ok())
        .filter(|d| d.file_type().is_ok_and(|t| t.is_socket()))
        .filter(|d| d.path().extension().is_some_and(|e| e == "sock"))
        .map(|d| d.path())
        .collect();
    v.sort();
    Ok(v)
}

pub fn list(dir: &Path, json: bool) -> ExitCode {
    let socks = match sockets(dir) {
        Ok(s) => s,
        Err(e) => {
            crate::output::say(&format!("list {}: {e}", dir.display()));
            return ExitCode::FAILURE;
        }
    };
    // Each socket on its own thread: one that hangs costs its own wait only.
    let entries: Vec<Entry> = std::thread::scope(|s| {
        let hs: Vec<_> = socks
            .into_iter()
            .map(|p| s.spawn(move || entry(p)))
            .collect();
        hs.into_iter().filter_map(|h| h.join().ok()).collect()
    });
    if json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&entries).expect("plain data")
        );
        return ExitCode::SUCCESS;
    }
    outln!(
        "{:<40} {:<36} {:>8} {:<9} GUEST",
        "SOCKET",
        "ID",
        "PID",
        "STATE"
    );
    for e in &entries {
        outln!(
            "{:<40} {:<36} {:>8} {:<9} {}",
            e.socket.display(),
            e.id.as_deref().unwrap_or("-"),
            e.pid.map(|p| p.to_string()).unwrap_or("-".into()),
            e.state,
            e.guest.as_deref().or(e.message.as_deref()).unwrap_or("")
        );
    }
    ExitCode::SUCCESS
}
