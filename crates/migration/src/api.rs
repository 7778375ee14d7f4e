//! The migration endpoints of a godwit's API: `PUT vm.migrate` (body: `Options`; answers
//! with the report once the migration ends), `GET vm.migration` (progress and the last
//! report), `PUT vm.migrate-cancel`.

use crate::report::Status;
use crate::source::{migrate, Options};
use godwit_vmm::api::Extension;
use godwit_vmm::{VmExit, VmHandle};
use serde_json::json;
use std::sync::atomic::Ordering;

#[derive(Default)]
pub struct MigrationApi {
    pub status: Status,
}

const OWNER: &str = "a migration";

impl Extension for MigrationApi {
    fn endpoints(&self) -> &'static [&'static str] {
        &["vm.migrate", "vm.migration", "vm.migrate-cancel"]
    }

    fn route(
        &self,
        h: &VmHandle,
        method: &str,
        endpoint: &str,
        body: &[u8],
    ) -> (u16, serde_json::Value) {
        let err = |code, m: String| (code, json!({ "error": m }));
        match (method, endpoint) {
            ("PUT", "vm.migrate") => {
                let o: Options = match serde_json::from_slice(body) {
                    Ok(o) => o,
                    Err(e) => return err(400, format!("bad migration request: {e}")),
                };
                if let Err(e) = o.check() {
                    return err(400, e);
                }
                if self
                    .status
                    .active
                    .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
                    .is_err()
                {
                    return err(409, "a migration is already running".into());
                }
                if let Err(e) = h.ctl.set_owner(Some(OWNER)) {
                    self.status.active.store(false, Ordering::SeqCst);
                    return err(409, e);
                }
                self.status.cancel.store(false, Ordering::SeqCst);
                *self
                    .status
                    .progress
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = None;
                let report = migrate(h, &o, &self.status);
                let _ = h.ctl.set_owner(None);
                self.status.active.store(false, Ordering::SeqCst);
                let body = serde_json::to_value(&report).unwrap_or_default();
                if report.status == "completed" {
                    // The VM lives elsewhere now; this process ends once this answer is out.
                    h.ctl.request_exit(VmExit::Migrated(o.to.clone()));
                    (200, body)
                } else {
                    let code = if report.status == "cancelled" {
                        409
                    } else {
                        500
                    };
                    let msg = report.error.clone().unwrap_or_default();
                    (code, json!({"error": msg, "report": body}))
                }
            }
            ("GET", "vm.migration") => (
                200,
                json!({
                    "active": self.status.active.load(Ordering::SeqCst),
                    "progress": self.status.progress(),
                    "last": *self.status.last.lock().unwrap_or_else(|e| e.into_inner()),
                }),
            ),
            ("PUT", "vm.migrate-cancel") => {
                if self.status.active.load(Ordering::SeqCst) {
                    self.status.cancel.store(true, Ordering::SeqCst);
                    (200, json!({"cancelling": true}))
                } else {
                    err(409, "no migration is running".into())
                }
            }
            _ => err(405, format!("{method} is not allowed on {endpoint}")),
        }
    }
}
