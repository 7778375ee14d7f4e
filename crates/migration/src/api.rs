//! The migration endpoints of a godwit's API: `PUT vm.migrate` (body: `Options`; starts
//! the migration on its own thread and answers with the report once it ends), `GET
//! vm.migration` (progress, the last report, and how a post-copy into this VM stands),
//! `PUT vm.migrate-cancel`. It also answers for the VM's own endpoints while a
//! migration holds the VM:
//!
//! | request        | migrating, before GO | after GO, unconfirmed            |
//! |----------------|----------------------|----------------------------------|
//! | vm.pause       | 409                  | 409                              |
//! | vm.resume      | 409                  | 409; `{"force": true}` takes back |
//! | vm.shutdown    | 409 (cancel first)   | 200 (the user has checked)       |
//! | vm.migrate     | 409                  | 409                              |
//! | vm.migrate-cancel | 200, cancels      | 409 too late                     |
//! | vm.migrate-postcopy | 200, switches at the next chance | 409          |
//! | vm.migrate-recover | 409                | once post-copy is paused (body `{"to"}`, optional): 200 when it goes on, 502 when the attempt failed |

use crate::postcopy_in::PostcopyIn;
use crate::report::{Outcome, Status};
use crate::source::{self, Options};
use godwit_vmm::api::Extension;
use godwit_vmm::{VmExit, VmHandle};
use serde_json::json;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// How long `migrate-postcopy` waits for a connecting migration's destination to say
/// whether it takes post-copy (within the CLI's 30 s wait for an answer).
const POSTCOPY_WAIT: std::time::Duration = std::time::Duration::from_secs(20);
/// How long `vm.migrate-recover` waits for the attempt's outcome before it answers
/// that it still runs (within the CLI's 30 s wait for an answer).
const RECOVER_WAIT: std::time::Duration = std::time::Duration::from_secs(20);

#[derive(Default)]
pub struct MigrationApi {
    pub status: Arc<Status>,
    /// A post-copy into this VM (it came here that way), for `GET vm.migration`.
    incoming: std::sync::Mutex<Option<Arc<PostcopyIn>>>,
}

impl MigrationApi {
    /// This VM arrived in post-copy: `GET vm.migration` says how it stands from now on.
    pub fn set_incoming(&self, pc: Arc<PostcopyIn>) {
        *self.incoming.lock().unwrap_or_else(|e| e.into_inner()) = Some(pc);
    }
}

const OWNER: &str = "a migration is in progress";

impl Extension for MigrationApi {
    fn route(
        &self,
        h: &VmHandle,
        method: &str,
        endpoint: &str,
        body: &[u8],
    ) -> Option<(u16, serde_json::Value)> {
        let err = |code, m: String| (code, json!({ "error": m }));
        let handover = self
            .status
            .handover
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|x| x.to.clone());
        Some(match (method, endpoint) {
            ("PUT", "vm.migrate") if handover.is_some() => err(
                409,
                crate::source::unconfirmed_message(&handover.unwrap_or_default()),
            ),
            ("PUT", "vm.resume") if handover.is_some() => {
                let force = godwit_vmm::api::resume_body(body).is_ok_and(|b| b.force);
                if !force {
                    return Some(err(
                        409,
                        crate::source::unconfirmed_message(&handover.unwrap_or_default()),
                    ));
                }
                let taken = self
                    .status
                    .handover
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take();
                if let Some(s) = taken.and_then(|t| t.socket) {
                    s.shutdown();
                }
                match crate::source::take_back(h) {
                    Ok(()) => {
                        let _ = h.ctl.set_owner(None);
                        tracing::warn!("the VM was taken back by a forced resume");
                        (200, json!({"state": "running", "forced": true}))
                    }
                    Err(e) => err(500, format!("cannot take the VM back: {e}")),
                }
            }
            ("PUT", "vm.shutdown") if self.status.active.load(Ordering::SeqCst) => err(
                409,
                "a migration is in progress: cancel it first (migrate-cancel), or wait \
                 for its end"
                    .into(),
            ),
            ("PUT", "vm.migrate") => {
                let o: Options = match serde_json::from_slice(body) {
                    Ok(o) => o,
                    Err(e) => return Some(err(400, format!("bad migration request: {e}"))),
                };
                if let Err(e) = o.check() {
                    return Some(err(400, e));
                }
                if self
                    .status
                    .active
                    .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
                    .is_err()
                {
                    return Some(err(409, "a migration is already running".into()));
                }
                if let Err(e) = h.ctl.set_owner(Some(OWNER)) {
                    self.status.active.store(false, Ordering::SeqCst);
                    return Some(err(409, e));
                }
                self.status.cancel.store(false, Ordering::SeqCst);
                *self
                    .status
                    .progress
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = None;
                let worker = match source::start(h.clone(), o.clone(), self.status.clone()) {
                    Ok(w) => w,
                    Err(e) => {
                        let _ = h.ctl.set_owner(None);
                        self.status.active.store(false, Ordering::SeqCst);
                        return Some(err(500, format!("cannot start the migration: {e}")));
                    }
                };
                // This request answers when the migration ends; progress and cancel are
                // served by other requests meanwhile.
                let report = match worker.join() {
                    Ok(r) => r,
                    Err(_) => {
                        let _ = h.ctl.set_owner(None);
                        self.status.active.store(false, Ordering::SeqCst);
                        return Some(err(500, "the migration thread failed".into()));
                    }
                };
                // An unconfirmed hand-over, or a post-copy that broke, keeps the VM owned
                // (see `source::start`).
                if !matches!(
                    report.error_kind.as_deref(),
                    Some("unconfirmed" | "postcopy_broken")
                ) {
                    let _ = h.ctl.set_owner(None);
                }
                let body = serde_json::to_value(&report).unwrap_or_default();
                match report.status {
                    Outcome::Completed => {
                        // The VM lives elsewhere now; this process ends once this answer
                        // is out.
                        h.ctl.request_exit(VmExit::Migrated(o.to.clone()));
                        (200, body)
                    }
                    outcome => {
                        let code = if outcome == Outcome::Cancelled {
                            409
                        } else {
                            500
                        };
                        let msg = report.error.clone().unwrap_or_default();
                        (code, json!({"error": msg, "report": body}))
                    }
                }
            }
            ("GET", "vm.migration") => (
                200,
                json!({
                    "active": self.status.active.load(Ordering::SeqCst),
                    "postcopy_paused": self.status.paused(),
                    "progress": self.status.progress(),
                    "last": *self.status.last.lock().unwrap_or_else(|e| e.into_inner()),
                    "incoming": self
                        .incoming
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .as_ref()
                        .map(|pc| pc.incoming()),
                }),
            ),
            ("PUT", "vm.migrate-cancel") => {
                if handover.is_some() {
                    return Some(err(
                        409,
                        "too late to cancel: GO was sent and the hand-over is unconfirmed".into(),
                    ));
                }
                if !self.status.active.load(Ordering::SeqCst) {
                    return Some(err(409, "no migration is running".into()));
                }
                match self
                    .status
                    .request_cancel(std::time::Duration::from_secs(1))
                {
                    Ok(()) => (200, json!({"cancelling": true})),
                    Err(m) => err(409, m.into()),
                }
            }
            ("PUT", "vm.migrate-recover") => {
                #[derive(serde::Deserialize)]
                #[serde(deny_unknown_fields)]
                struct Body {
                    #[serde(default)]
                    to: Option<String>,
                }
                let b: Body = if body.iter().all(|c| c.is_ascii_whitespace()) {
                    Body { to: None }
                } else {
                    match serde_json::from_slice(body) {
                        Ok(b) => b,
                        Err(e) => return Some(err(400, format!("bad recovery request: {e}"))),
                    }
                };
                if !self.status.active.load(Ordering::SeqCst) {
                    return Some(err(409, "no migration is running".into()));
                }
                if let Some(t) = &b.to {
                    if let Err(e) = crate::transport::Target::parse(t) {
                        return Some(err(400, e));
                    }
                }
                // Answers with the attempt's outcome, unless it takes longer (a
                // destination slow to accept): then `vm.migration` tells.
                let to = crate::report::RecoverTo::resolve(b.to.unwrap_or_default());
                match self.status.ask_recover(to) {
                    Ok(n) => match self.status.wait_recovered(n, RECOVER_WAIT) {
                        Some(Ok(())) => (200, json!({"recovered": true})),
                        Some(Err(e)) => {
                            err(502, format!("{e}; post-copy stays paused: recover again"))
                        }
                        None => (200, json!({"recovered": false})),
                    },
                    Err(m) => err(409, m),
                }
            }
            ("PUT", "vm.migrate-postcopy") => {
                if !self.status.active.load(Ordering::SeqCst) {
                    return Some(err(409, "no migration is running".into()));
                }
                match self.status.ask_postcopy(POSTCOPY_WAIT) {
                    Ok(()) => (200, json!({"switching": true})),
                    Err(m) => err(409, m),
                }
            }
            (
                _,
                "vm.migrate"
                | "vm.migration"
                | "vm.migrate-cancel"
                | "vm.migrate-postcopy"
                | "vm.migrate-recover",
            ) => err(405, format!("{method} is not allowed on {endpoint}")),
            _ => return None,
        })
    }
}
