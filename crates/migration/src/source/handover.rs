//! After GO: a hand-over the destination did not confirm. The VM stays stopped here
//! until the destination answers late or the user, having checked, takes it back.

use super::*;

/// Takes the VM back after a migration that did not hand it over: every component
/// returns to RUNNING, devices before the vCPUs that drive them.
pub fn take_back(h: &VmHandle) -> Result<(), String> {
    let mut parts: Vec<_> = h.machine.components().to_vec();
    parts.sort_by_key(|c| std::cmp::Reverse(c.stop_order()));
    for c in parts {
        step_to(&*c, MigState::Running).map_err(|e| format!("{}: {e}", c.section().name))?;
    }
    Ok(())
}

/// Listens, after an unconfirmed hand-over, for the destination's late answer:
/// STARTED ends this process as a completed migration; ABORT (it does not run the VM)
/// takes the VM back here. Anything else leaves the decision to the user.
pub(super) fn await_late_answer(
    mut back: BackChannel,
    h: VmHandle,
    status: Arc<Status>,
    to: String,
) {
    let a = back.wait(LATE_ANSWER_WAIT);
    // A forced resume took the VM back meanwhile: whatever came is not acted on.
    if status
        .handover
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
        .is_none()
    {
        if matches!(a, Some(Answer::Started(_))) {
            tracing::error!("the destination started the VM after it was taken back here");
        }
        return;
    }
    match a {
        Some(Answer::Started(_)) => {
            tracing::warn!("the destination confirmed its start late: the VM runs at {to}");
            h.ctl.request_exit(godwit_vmm::VmExit::Migrated(to));
        }
        Some(Answer::Abort(m)) => {
            tracing::warn!("the destination aborted after GO ({m}): the VM runs here again");
            match take_back(&h) {
                Ok(()) => {
                    let _ = h.ctl.set_owner(None);
                }
                Err(e) => tracing::error!("cannot take the VM back: {e}"),
            }
        }
        other => {
            tracing::warn!("no late answer from {to} ({other:?}): the hand-over stays unconfirmed");
            *status.handover.lock().unwrap_or_else(|e| e.into_inner()) =
                Some(Handover { to, socket: None });
        }
    }
}

/// What pause, resume and another migration hear while a hand-over is unconfirmed.
pub fn unconfirmed_message(to: &str) -> String {
    format!(
        "the VM was handed over to {to} (GO sent) and its start there was not confirmed: \
         it stays stopped here so that it never runs twice. Check the destination; if it \
         runs the VM, shut this one down; if it does not, `godwit resume --force` (PUT \
         vm.resume {{\"force\": true}}) takes it back here"
    )
}
