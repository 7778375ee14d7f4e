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

/// Endpoints served by another part of godwit (migration), plugged in by the CLI.
pub trait Extension: Send + Sync {
    /// The endpoints it serves (under /api/v1/).
    fn endpoints(&self) -> &'static [&'static str];
    /// Handles a request for one of them; may block (each request has its own thread).
    fn route(
        &self,
        h: &VmHandle,
        method: &str,
        endpoint: &str,
        body: &[u8],
    ) -> (u16, serde_json::Value);
}

/// The largest request body accepted.
const MAX_BODY: u64 = 1 << 16;

/// (status, JSON body) for one request.
pub fn route(
    h: &VmHandle,
    ext: Option<&dyn Extension>,
    method: &str,
    url: &str,
    body: &[u8],
) -> (u16, serde_json::Value) {
    let Some(endpoint) = url.strip_prefix(PREFIX) else {
        return (
            404,
            json!({"error": format!("unknown path {url} (endpoints live under {PREFIX})")}),
        );
    };
    let err = |code, m: &str| (code, json!({ "error": m }));
    if let Some(x) = ext.filter(|x| x.endpoints().contains(&endpoint)) {
        return x.route(h, method, endpoint, body);
    }
    let owner = || {
        h.ctl
            .owner()
            .map(|o| err(409, &format!("{o} is in progress")))
    };
    match (method, endpoint) {
        ("GET", "vmm.ping") => (
            200,
            json!({"version": env!("CARGO_PKG_VERSION"), "pid": std::process::id()}),
        ),
        ("GET", "vm.info") => (200, serde_json::to_value(info(h)).unwrap_or_default()),
        ("PUT", "vm.pause" | "vm.resume") if owner().is_some() => owner().expect("checked"),
        ("PUT", "vm.pause") => match h.pause() {
            Ok(()) => (200, json!({"state": "paused"})),
            Err(m) => err(409, m),
        },
        ("PUT", "vm.resume") => match h.resume() {
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

/// The API server thread. Dropping it stops the server, waits for requests in flight
/// (so a last answer, such as a migration report, still goes out) and removes the socket.
pub struct ApiServer {
    server: Arc<tiny_http::Server>,
    thread: Option<JoinHandle<()>>,
    path: PathBuf,
}

fn respond(req: tiny_http::Request, code: u16, body: serde_json::Value) {
    // A plain Content-Length body (never chunked): clients read to the end.
    let resp = tiny_http::Response::from_string(body.to_string())
        .with_chunked_threshold(usize::MAX)
        .with_status_code(code)
        .with_header(
            tiny_http::Header::from_bytes("Content-Type", "application/json")
                .expect("static header"),
        );
    let _ = req.respond(resp);
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

    pub fn start(
        server: Arc<tiny_http::Server>,
        path: &Path,
        h: VmHandle,
        ext: Option<Arc<dyn Extension>>,
    ) -> Result<ApiServer> {
        let s = server.clone();
        let thread = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                // One thread per request: a migration request blocks until it is done,
                // and progress and cancel requests must be served meanwhile.
                let mut inflight: Vec<JoinHandle<()>> = Vec::new();
                for mut req in s.incoming_requests() {
                    inflight.retain(|t| !t.is_finished());
                    let mut body = Vec::new();
                    if req
                        .as_reader()
                        .take(MAX_BODY + 1)
                        .read_to_end(&mut body)
                        .is_err()
                        || body.len() as u64 > MAX_BODY
                    {
                        respond(
                            req,
                            413,
                            json!({"error": "request body too large or unreadable"}),
                        );
                        continue;
                    }
                    let (h, ext) = (h.clone(), ext.clone());
                    let t = std::thread::Builder::new()
                        .name("api-request".into())
                        .spawn(move || {
                            let (code, out) =
                                route(&h, ext.as_deref(), req.method().as_str(), req.url(), &body);
                            respond(req, code, out);
                        });
                    match t {
                        Ok(t) => inflight.push(t),
                        Err(e) => tracing::error!("API: cannot start a request thread: {e}"),
                    }
                }
                for t in inflight {
                    let _ = t.join();
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
    call_with(socket, method, endpoint, "", Some(Duration::from_secs(30)))
}

/// A client call with a JSON body, waiting up to `timeout` for the answer (None = as long
/// as it takes, for a migration).
pub fn call_with(
    socket: &Path,
    method: &str,
    endpoint: &str,
    body: &str,
    timeout: Option<Duration>,
) -> std::result::Result<(u16, String), String> {
    let mut s = UnixStream::connect(socket).map_err(|e| {
        format!(
            "cannot connect to the API socket {}: {e} (is godwit running with --api-socket?)",
            socket.display()
        )
    })?;
    s.set_read_timeout(timeout).map_err(|e| e.to_string())?;
    let req = format!(
        "{method} {PREFIX}{endpoint} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
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
