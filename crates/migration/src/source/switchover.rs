//! The switchover: the VM stops in order, its states and last pages go out, and the
//! handshake (COMPLETE, READY, commit, GO, STARTED) hands it over, with the pause
//! bounded by a watchdog until GO.

use super::*;
use crate::lacks::Lacks;
use crate::priority::Urgent;

impl Driver<'_> {
    pub(super) fn part(&mut self, name: &str) -> &mut DowntimePart {
        self.report
            .downtime
            .components
            .entry(name.to_string())
            .or_default()
    }

    /// What the pause may last: the downtime limit (or what the last round expected,
    /// when the driver switched over above it), three times the time the stop-and-copy
    /// components' memory takes at the measured bandwidth, and the handshake allowance.
    pub(super) fn pause_budget(&self) -> Duration {
        let bw = self.bandwidth_cap().max(64.0 * (1 << 20) as f64);
        let stop_copy: u64 = self
            .parts
            .iter()
            .filter(|p| !p.precopy)
            .map(|p| p.c.pages() * PAGE_SIZE as u64)
            .sum();
        let ms = (self.o.downtime_ms as f64).max(self.expected_ms);
        Duration::from_secs_f64(ms / 1e3 + 3.0 * stop_copy as f64 / bw) + HANDSHAKE_ALLOWANCE
    }

    /// Stops the VM and hands it over. Until GO, a watchdog bounds the pause: at the
    /// budget's end it shuts the connection down (whatever blocks returns) and the VM
    /// resumes here; the destination, which starts only on GO, never runs it.
    pub(super) fn switchover(&mut self) -> Res<()> {
        self.phase = Phase::Switchover;
        self.status
            .postcopy_possible
            .store(false, std::sync::atomic::Ordering::SeqCst);
        // What is held back stays held until it stops: each component lets go by itself
        // as it leaves pre-copy. Let go here, before the pause, a held GPU engine ran
        // flat out until its stop and wrote VRAM (1 to 3k pages in a busy GW8-8C's
        // pauses) that the last round's estimate never counted. Only the report's
        // account of the throttle ends now.
        self.converge.release();
        // The vCPUs must run to stop: at the lowest weight, on a host with other work,
        // they waited up to 88 ms for a core to park on. The migration's threads need
        // no weight once the guest stops.
        self.give_weights_back();
        self.progress(self.pending(), 0.0);
        self.pause_budget = self.pause_budget();
        let status = self.status;
        let budget = self.pause_budget;
        // The watchdog's thread starts before the pause (a thread's start is not on the
        // switchover's critical path) and learns its deadline once the pause begins.
        let watch = (
            std::sync::Mutex::new((true, None::<Instant>)),
            std::sync::Condvar::new(),
        );
        let (handed, tp) = std::thread::scope(|s| {
            s.spawn(|| {
                let (lock, cv) = &watch;
                let mut w = lock.lock().unwrap_or_else(|e| e.into_inner());
                while w.0 {
                    let wait = match w.1 {
                        None => Duration::from_secs(3600),
                        Some(d) => {
                            let left = d.saturating_duration_since(Instant::now());
                            if left.is_zero() {
                                status.expire();
                                return;
                            }
                            left
                        }
                    };
                    w = cv
                        .wait_timeout(w, wait)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            });
            let tp = Instant::now();
            self.paused_at = Some(tp);
            let deadline = tp + budget;
            watch.0.lock().unwrap_or_else(|e| e.into_inner()).1 = Some(deadline);
            watch.1.notify_all();
            let r = self.stop_and_send(tp, deadline);
            // A failure at or past the deadline is the budget spent, whether or not the
            // watchdog has woken to say so: on a busy host it may not have (this thread
            // is in the real-time class after COMPLETE, it is not), and once told to
            // stand down it never would.
            if r.is_err() && Instant::now() >= deadline {
                status.expire();
            }
            watch.0.lock().unwrap_or_else(|e| e.into_inner()).0 = false;
            watch.1.notify_all();
            (r, tp)
        });
        let urgent = match handed {
            Ok(u) => u,
            Err(e) => {
                return Err(
                    if status.expired() && !matches!(e, MigrationError::Cancelled) {
                        MigrationError::PauseExceeded {
                            budget: self.pause_budget,
                        }
                    } else {
                        e
                    },
                )
            }
        };
        if self.target.is_file() {
            return Ok(());
        }
        let r = self.go(tp);
        drop(urgent);
        r
    }

    /// The pause up to the point of no return: stop in order, states, last pages,
    /// COMPLETE, the destination's READY, commit. Past COMPLETE this thread is urgent
    /// while the guard returned lives: what is left of the pause is round trips, each a
    /// wake-up of this thread.
    pub(super) fn stop_and_send(&mut self, tp: Instant, deadline: Instant) -> Res<Option<Urgent>> {
        // Stop in order: nothing that starts work runs once what does it has stopped.
        for i in 0..self.parts.len() {
            let t = Instant::now();
            let (c, name) = (self.parts[i].c.clone(), self.parts[i].name.clone());
            step_to(&*c, MigState::StopCopy).map_err(MigrationError::component(&name))?;
            self.part(&name).stop_ms = ms(t.elapsed());
        }
        self.report.downtime.pause_ms = ms(tp.elapsed());
        for i in 0..self.parts.len() {
            let p = &self.parts[i];
            if !p.precopy {
                let (n, name) = (self.untouched(|q| q.name == p.name), p.name.clone());
                self.report.bytes.zero_pages += n;
                self.report
                    .bytes
                    .components
                    .entry(name)
                    .or_default()
                    .zero_pages += n;
            }
        }
        // The states first: the destination loads them while the last pages arrive.
        let t = Instant::now();
        for i in 0..self.parts.len() {
            let ts = Instant::now();
            let (c, name) = (self.parts[i].c.clone(), self.parts[i].name.clone());
            let bytes = c.save().map_err(MigrationError::component(&name))?;
            if bytes.len() > wire::MAX_PAYLOAD - 4 {
                return Err(MigrationError::component(&name)(
                    godwit_vmm::migratable::ComponentError::Refused(format!(
                        "a state of {} bytes is too large",
                        bytes.len()
                    )),
                ));
            }
            let f = Frame::State {
                section: i as u32,
                data: &bytes,
            };
            self.out().control(&f).map_err(|e| self.send_error(e))?;
            let p = self.part(&name);
            p.state_ms = ms(ts.elapsed());
            p.state_bytes = bytes.len() as u64;
            self.report.bytes.state += bytes.len() as u64;
            self.report.bytes.components.entry(name).or_default().state = bytes.len() as u64;
        }
        self.report.downtime.state_ms = ms(t.elapsed());
        // The last dirty-log reads, then the last pages.
        let t = Instant::now();
        for i in 0..self.parts.len() {
            let (c, name) = (self.parts[i].c.clone(), self.parts[i].name.clone());
            let s = c.sync().map_err(MigrationError::component(&name))?;
            let p = self.part(&name);
            p.dirty_log_ms = s.log_us / 1e3;
            p.extra = s.extra;
            self.report.downtime.dirty_log_ms += s.log_us / 1e3;
        }
        if let Some(reason) = self.postcopy.clone() {
            self.lazy_switch(tp, reason)?;
        }
        let sent = self.send_all()?;
        for (i, (r, d)) in sent.iter().enumerate() {
            let name = self.parts[i].name.clone();
            let p = self.part(&name);
            p.final_pages = r.pages + r.zero_sent;
            p.final_pages_ms = ms(*d);
            self.report.downtime.final_pages += r.pages + r.zero_sent;
        }
        self.out().complete().map_err(|e| self.send_error(e))?;
        self.report.downtime.final_pages_ms = ms(t.elapsed());
        self.report.bytes.total = self.wire_bytes();
        if self.target.is_file() {
            self.out().seal().map_err(|e| self.send_error(e))?;
            self.report.downtime_ms = ms(tp.elapsed());
            return Ok(None);
        }
        // Where the destination shares the host (the benchmark; any busy host), the
        // wake-ups left in the pause lost this thread cores: the destination woken by
        // GO took the core from it, woke its vCPU on the same core, and this thread,
        // still runnable there, read STARTED only once the scheduler moved it to the
        // idle core, 2 ms later in a trace of the kernel's scheduler events (2-5 ms in
        // 1 of 3 pre-copy runs, while the guest already ran). In the real-time class it
        // keeps its core and runs as soon as an answer wakes it. Not before COMPLETE:
        // sending the last pages it would hold a core the destination needs to take
        // them in.
        let urgent = Urgent::new("the source's migration thread at the end of the pause");
        let t = Instant::now();
        let left = deadline.saturating_duration_since(t);
        let ready: Ready = match self.answer_within("READY", left)? {
            Answer::Ready(r) => r,
            a => {
                return Err(MigrationError::Unexpected {
                    want: "READY",
                    got: format!("{a:?}"),
                })
            }
        };
        self.report.downtime.confirm_ms = ms(t.elapsed());
        self.report.downtime.restore_ms = ready.restore_ms;
        self.report.migration_priority = crate::migration_priority::MigrationPriority::of(
            self.report.migration_priority.source(),
            ready.readers_raised,
        );
        // The destination holds everything: from here the VM is the destination's.
        if !self.status.commit() {
            return Err(if self.status.expired() {
                MigrationError::PauseExceeded {
                    budget: self.pause_budget,
                }
            } else {
                MigrationError::Cancelled
            });
        }
        Ok(Some(urgent))
    }

    /// Post-copy: each component that can run ahead of its data says what the
    /// destination still lacks, which then follows the VM instead of moving inside the
    /// pause.
    fn lazy_switch(&mut self, tp: Instant, reason: String) -> Res<()> {
        let mut pc = crate::report::Postcopy {
            switched_at_ms: ms(tp.duration_since(self.t0)),
            reason,
            ..Default::default()
        };
        for i in 0..self.parts.len() {
            let (c, name) = (self.parts[i].c.clone(), self.parts[i].name.clone());
            let Some(missing) = c
                .postcopy_switch()
                .map_err(MigrationError::component(&name))?
            else {
                continue;
            };
            let n = godwit_vmm::migratable::paged::count(&missing);
            let f = Frame::Lacks {
                section: i as u32,
                regions: missing.into_iter().map(Lacks::of).collect(),
            };
            self.out().control(&f).map_err(|e| self.send_error(e))?;
            self.parts[i].lazy = true;
            pc.missing_pages.insert(name, n);
        }
        self.report.postcopy = Some(pc);
        Ok(())
    }

    /// GO and STARTED: past the point of no return. Without STARTED the hand-over is
    /// unconfirmed and the VM stays stopped here.
    pub(super) fn go(&mut self, tp: Instant) -> Res<()> {
        self.phase = Phase::Handover;
        self.progress(0, 0.0);
        let t = Instant::now();
        if let Err(e) = self
            .out()
            .control(&Frame::Go)
            .and_then(|_| self.out().sync())
        {
            // GO never left: the destination will not start, so the VM stays here.
            return Err(self.send_error(e));
        }
        let end = Instant::now() + STARTED_TIMEOUT;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.answer_within("STARTED", left) {
                Ok(Answer::Started(s)) => {
                    self.report.downtime.vm_start_ms = s.start_ms;
                    break;
                }
                // In post-copy a device may touch a missing page while it starts.
                Ok(a @ (Answer::Request { .. } | Answer::Ahead { .. }))
                    if self.report.postcopy.is_some() =>
                {
                    self.serve_early(a)?
                }
                // It said so: it does not run the VM, so the VM comes back here.
                Err(MigrationError::Aborted(m)) => return Err(MigrationError::Aborted(m)),
                Ok(a) => return Err(MigrationError::Unconfirmed(format!("it answered {a:?}"))),
                Err(e) => return Err(MigrationError::Unconfirmed(e.to_string())),
            }
        }
        self.report.downtime.start_ms = ms(t.elapsed());
        self.report.downtime_ms = ms(tp.elapsed());
        if self.report.postcopy.is_some() {
            self.report.ran = "postcopy".into();
        }
        Ok(())
    }
}
