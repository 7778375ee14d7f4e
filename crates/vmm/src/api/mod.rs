//! The HTTP/JSON API on a Unix socket, in the style of Cloud Hypervisor's:
//! `GET /api/v1/vmm.ping`, `GET /api/v1/vm.info`, `PUT /api/v1/vm.pause`,
//! `PUT /api/v1/vm.resume`, `PUT /api/v1/vm.shutdown`. Errors come back as
//! `{"error": "..."}` with a 4xx status.

use crate::control::VmExit;
use crate::vm::VmHandle;
use serde::Serialize;
use serde_json::json;
use std::sync::atomic::Ordering;

mod client;
mod server;
pub use client::{call, call_with};
pub use server::{parse_request, ApiServer, Limits};

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
    /// The system-call filter's mode over this process (`godwit run --seccomp`).
    pub seccomp: &'static str,
    /// Pages per memory still arriving (post-copy, or a snapshot restored lazily);
    /// absent once the VM's memory is whole here.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub arriving: std::collections::BTreeMap<String, u64>,
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
        seccomp: crate::confine::mode(),
        arriving: h
            .machine
            .components()
            .iter()
            .filter_map(|c| Some((c.section().name, c.arriving()?)))
            .collect(),
    }
}

/// Another part of godwit (migration) that serves endpoints of its own and may answer
/// for the VM's while it holds the VM (a migration in progress, a hand-over not yet
/// confirmed). Plugged in by the CLI.
pub trait Extension: Send + Sync {
    /// Answers a request it takes (None: not its, the VM's own routes answer). May block
    /// (each request has its own thread).
    fn route(
        &self,
        h: &VmHandle,
        method: &str,
        endpoint: &str,
        body: &[u8],
    ) -> Option<(u16, serde_json::Value)>;
}

/// vm.resume's body: none, or `{"force": true|false}`.
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ResumeBody {
    #[serde(default)]
    pub force: bool,
}

pub fn resume_body(body: &[u8]) -> std::result::Result<ResumeBody, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(ResumeBody::default());
    }
    serde_json::from_slice(body).map_err(|e| e.to_string())
}

/// The method an endpoint takes (for the Allow header of a 405).
pub fn allowed(url: &str) -> &'static str {
    match url.strip_prefix(PREFIX) {
        Some("vmm.ping" | "vm.info" | "vm.migration") => "GET",
        _ => "PUT",
    }
}

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
    if (method, endpoint) == ("PUT", "vm.resume") {
        if let Err(e) = resume_body(body) {
            return err(400, &format!("bad vm.resume body: {e}"));
        }
    }
    if let Some(answer) = ext.and_then(|x| x.route(h, method, endpoint, body)) {
        return answer;
    }
    let owner = || h.ctl.owner().map(|o| err(409, &o));
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
