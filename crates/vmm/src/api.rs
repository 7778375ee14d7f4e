//! The HTTP/JSON API on a Unix socket, in the style of Cloud Hypervisor's:
//! `GET /api/v1/vmm.ping`, `GET /api/v1/vm.info`, `PUT /api/v1/vm.pause`,
//! `PUT /api/v1/vm.resume`, `PUT /api/v1/vm.shutdown`. Errors come back as
//! `{"error": "..."}` with a 4xx status.

use crate::control::VmExit;
use crate::error::{Error, Result};
use crate::vm::VmHandle;
use serde::Serialize;
use serde_json::json;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

pub const PREFIX: &str = "/api/v1/";

#[derive(Serialize)]
pub struct VcpuInfo {
    pub index: usize,
    pub exits: u64,
    pub mmio_exits: u64,
    pub pio_exits: u64,
    pub sleeps: u64,
}

#[derive(Serialize)]
pub struct VmInfo {
    pub state: crate::control::RunState,
    pub pid: u32,
    pub uptime_ms: u64,
    #[serde(flatten)]
    pub desc: crate::vm::VmDescription,
    pub vcpu_stats: Vec<VcpuInfo>,
}

pub fn info(h: &VmHandle) -> VmInfo {
    VmInfo {
        state: h.state(),
        pid: std::process::id(),
        uptime_ms: h.started.elapsed().as_millis() as u64,
        desc: (*h.desc).clone(),
        vcpu_stats: h
            .stats
            .iter()
            .enumerate()
            .map(|(index, s)| VcpuInfo {
                index,
                exits: s.exits.load(Ordering::Relaxed),
                mmio_exits: s.mmio.load(Ordering::Relaxed),
                pio_exits: s.pio.load(Ordering::Relaxed),
                sleeps: s.sleeps.load(Ordering::Relaxed),
            })
            .collect(),
    }
}

/// (status, JSON body) for one request.
pub fn route(h: &VmHandle, method: &str, url: &str) -> (u16, serde_json::Value) {
    let Some(endpoint) = url.strip_prefix(PREFIX) else {
        return (
            404,
            json!({"error": format!("unknown path {url} (endpoints live under {PREFIX})")}),
        );
    };
    let err = |code, m: &str| (code, json!({ "error": m }));
    match (method, endpoint) {
        ("GET", "vmm.ping") => (
            200,
            json!({"version": env!("CARGO_PKG_VERSION"), "pid": std::process::id()}),
        ),
        ("GET", "vm.info") => (200, serde_json::to_value(info(h)).unwrap_or_default()),
        ("PUT", "vm.pause") => match h.ctl.pause() {
            Ok(()) => (200, json!({"state": "paused"})),
            Err(m) => err(409, m),
        },
        ("PUT", "vm.resume") => match h.ctl.resume() {
            Ok(()) => (200, json!({"state": "running"})),
            Err(m) => err(409, m),
        },
        ("PUT", "vm.shutdown") => {
            h.ctl.request_exit(VmExit::Shutdown);
            (200, json!({"state": "stopped"}))
        }
        (_, "vmm.ping" | "vm.info" | "vm.pause" | "vm.resume" | "vm.shutdown") => {
            err(405, &format!("{method} is not allowed on {endpoint}"))
        }
        _ => err(404, &format!("unknown endpoint {endpoint}")),
    }
}

/// The API server thread. Dropping it stops the server and removes the socket.
pub struct ApiServer {
    server: Arc<tiny_http::Server>,
    thread: Option<JoinHandle<()>>,
    path: PathBuf,
}

/// Refuses a socket that another live process answers on; removes a stale one.
fn claim_socket(path: &Path) -> Result<()> {
    let fail = |msg: String| Error::ApiSocket {
        path: path.into(),
        msg,
    };
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(fail(
                "already in use by a running process (another godwit?)".into(),
            ));
        }
        std::fs::remove_file(path)
            .map_err(|e| fail(format!("stale socket cannot be removed: {e}")))?;
    }
    Ok(())
}

impl ApiServer {
    pub fn bind(path: &Path) -> Result<Arc<tiny_http::Server>> {
        claim_socket(path)?;
        tiny_http::Server::http_unix(path)
            .map(Arc::new)
            .map_err(|e| Error::ApiSocket {
                path: path.into(),
                msg: e.to_string(),
            })
    }

    pub fn start(server: Arc<tiny_http::Server>, path: &Path, h: VmHandle) -> Result<ApiServer> {
        let s = server.clone();
        let thread = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                for mut req in s.incoming_requests() {
                    // Bodies are not used by these endpoints; drain what was sent.
                    let mut sink = Vec::new();
                    let _ = req.as_reader().take(1 << 16).read_to_end(&mut sink);
                    let (code, body) = route(&h, req.method().as_str(), req.url());
                    let resp = tiny_http::Response::from_string(body.to_string())
                        .with_status_code(code)
                        .with_header(
                            tiny_http::Header::from_bytes("Content-Type", "application/json")
                                .expect("static header"),
                        );
                    let _ = req.respond(resp);
                }
            })
            .map_err(Error::Thread)?;
        Ok(ApiServer {
            server,
            thread: Some(thread),
            path: path.into(),
        })
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A client call: returns (status, body). Errors say what to check.
pub fn call(
    socket: &Path,
    method: &str,
    endpoint: &str,
) -> std::result::Result<(u16, String), String> {
    let mut s = UnixStream::connect(socket).map_err(|e| {
        format!(
            "cannot connect to the API socket {}: {e} (is godwit running with --api-socket?)",
            socket.display()
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    let req = format!("{method} {PREFIX}{endpoint} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes())
        .map_err(|e| format!("API request: {e}"))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .map_err(|e| format!("API response: {e}"))?;
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(&raw) {
        Ok(httparse::Status::Complete(n)) => Ok((
            resp.code.unwrap_or(0),
            String::from_utf8_lossy(&raw[n..]).into_owned(),
        )),
        _ => Err(format!("malformed API response ({} bytes)", raw.len())),
    }
}
