//! The source's scheduling while pre-copy's rounds run: its vCPUs lowered where asked
//! (`vcpu_priority`), the migration's own threads raised (`migration_priority`). Both
//! are given back before the pause, where the vCPUs must run to stop and nothing else
//! competes, and whatever the outcome.

use super::Driver;
use crate::migration_priority::{self, MigrationPriority};
use crate::nice::Reniced;
use crate::report::Mode;
use crate::vcpu_priority::{self, VcpuPriority};
use godwit_vmm::VmHandle;

/// What is held while pre-copy runs; dropped, everything comes back.
#[derive(Default)]
pub(super) struct Weights {
    lowered: Option<Reniced>,
    raised: Option<Reniced>,
}

impl Driver<'_> {
    /// Whether this migration raises the source's threads: pre-copy runs (post-copy
    /// moves the VM first), and it was asked.
    fn raises_here(&self) -> bool {
        self.o.migration_priority.source() && self.o.mode != Mode::Postcopy
    }

    /// Whether HELLO asks the destination to raise its readers: asked, pre-copy runs,
    /// and a live destination reads it.
    pub(super) fn raises_readers(&self) -> bool {
        self.o.migration_priority.destination()
            && self.o.mode != Mode::Postcopy
            && !self.target.is_file()
    }

    /// Lowers the vCPUs and raises this thread and the connections' writers, as asked;
    /// the report says what each got. Once the connections are ready.
    pub(super) fn take_weights(&mut self, h: &VmHandle) {
        let lowered = match (self.o.vcpu_priority, self.o.mode) {
            (VcpuPriority::Normal, _) | (_, Mode::Postcopy) => None,
            (VcpuPriority::Low, _) => vcpu_priority::lower(&h.ctl.vcpu_tids())
                .map_err(|why| tracing::warn!("the vCPUs keep their weight: {why}"))
                .ok(),
        };
        if lowered.as_ref().is_some_and(|l| l.count() > 0) {
            self.report.vcpu_priority = VcpuPriority::Low;
        }
        let raised = self.raises_here().then(|| {
            let mut tids = vec![crate::nice::this_thread()];
            tids.extend(
                self.out
                    .as_ref()
                    .map(|o| o.writer_tids())
                    .unwrap_or_default(),
            );
            migration_priority::raise(&tids)
                .map_err(|why| tracing::info!("the migration's threads keep their weight: {why}"))
                .ok()
        });
        self.weights.raised = raised.flatten().filter(|r| r.count() > 0);
        // The destination's part comes with READY.
        self.report.migration_priority =
            MigrationPriority::of(self.weights.raised.is_some(), false);
        self.weights.lowered = lowered;
    }

    /// Gives every weight back.
    pub(super) fn give_weights_back(&mut self) {
        self.weights = Weights::default();
    }
}
