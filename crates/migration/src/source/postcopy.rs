//! Post-copy on the source: the VM runs at the destination, and the memory it still
//! lacks goes two ways. Pages a touch waits for (REQUEST) go at once on the main
//! connection, which carries nothing else now; the rest streams on the other
//! connections in the background, from where the destination last touched on
//! (pre-paging). The source holds every page until the destination says it has them
//! all (DONE); only then does the VM end here.

use super::*;
use crate::lacks;
use crate::outbound::Route;
use crate::wire::Done;

/// Why serving stopped short of DONE.
enum Lost {
    /// The connections failed: recoverable on new ones.
    Link(String),
    Fatal(MigrationError),
}

/// Background pages read between two looks for requests, per background connection:
/// one frame each, so a request waits behind at most that.
const PUSH_PAGES: u64 = wire::PAGES_PER_FRAME as u64;
/// With everything pushed, how long the destination may take to say DONE.
const DONE_TIMEOUT: Duration = Duration::from_secs(60);

impl Driver<'_> {
    /// Pages of the lazy components not yet sent.
    fn lazy_left(&self) -> u64 {
        self.parts
            .iter()
            .filter(|p| p.lazy)
            .filter_map(|p| p.c.precopy_info().ok())
            .map(|i| i.total() / PAGE_SIZE as u64)
            .sum()
    }

    fn broken(&self, why: String) -> MigrationError {
        MigrationError::PostcopyBroken {
            why,
            pages: self.lazy_left(),
        }
    }

    /// Serves the destination until it holds every page. When the connections break,
    /// post-copy pauses until `migrate-recover`, then goes on on new ones.
    pub(super) fn serve_postcopy(&mut self) -> Res<()> {
        self.phase = Phase::Postcopy;
        // This thread answers the touches that wait: it goes ahead of the background.
        let _short = crate::slice::Short::new();
        let switched = self.paused_at.unwrap_or(self.t0);
        // Under a bandwidth cap the background stream waits its turn listening for
        // requests, which go first.
        self.out().pace_by_caller();
        loop {
            match self.serve_some() {
                Ok(done) => {
                    self.finish_postcopy(done, switched);
                    return Ok(());
                }
                Err(Lost::Fatal(e)) => return Err(e),
                Err(Lost::Link(why)) => self.pause(why)?,
            }
        }
    }

    /// Serves the destination on the connections in use until DONE, or until they fail.
    fn serve_some(&mut self) -> Result<Done, Lost> {
        let lanes = self.out.as_ref().expect("connected").lanes() as u64;
        let budget = PUSH_PAGES * (lanes - 1).max(1);
        let mut idle_since: Option<Instant> = None;
        let mut last_progress = Instant::now();
        loop {
            while let Some(a) = self.back.as_mut().expect("live").poll() {
                if let Some(done) = self.on_answer(a)? {
                    return Ok(done);
                }
            }
            if last_progress.elapsed() >= Duration::from_millis(100) {
                self.progress(self.lazy_left(), 0.0);
                last_progress = Instant::now();
            }
            let next = self
                .parts
                .iter()
                .position(|p| p.lazy && p.c.precopy_info().is_ok_and(|i| i.total() > 0));
            let out = self.out.as_ref().expect("connected");
            // The background waits while its connections are still busy with what they
            // were given (a blocked send would hold the answer to a touch behind it),
            // briefly, and listening: a request ends the wait as it arrives. (A sleep
            // here added its 100 us, and the timer's slack, to most remote faults.)
            if next.is_some() && !out.background_room() {
                self.back
                    .as_ref()
                    .expect("live")
                    .until_readable(Duration::from_micros(100));
                continue;
            }
            // And listening for requests while the bandwidth cap says so.
            let due = out.due();
            if next.is_some() && !due.is_zero() {
                if let Some(a) = self.back.as_mut().expect("live").wait(due) {
                    if let Some(done) = self.on_answer(a)? {
                        return Ok(done);
                    }
                }
                continue;
            }
            if let Some((section, addrs)) = self.ahead.pop_front() {
                self.serve_pages(section, &addrs, Route::Background)?;
                continue;
            }
            match next {
                Some(i) => {
                    let c = self.parts[i].c.clone();
                    let cancel = &self.status.cancel;
                    let out = self.out.as_mut().expect("connected");
                    let r = c.read(&mut out.routed(i as u32, cancel, Route::Background), budget);
                    match r {
                        Ok(r) => {
                            let pc = self.report.postcopy.get_or_insert_with(Default::default);
                            pc.background_pages += r.pages + r.zero_sent;
                            self.count_sent(i, &r);
                        }
                        Err(godwit_vmm::migratable::ComponentError::Io(e)) => {
                            return Err(Lost::Link(format!("sending: {e}")))
                        }
                        Err(e) => {
                            return Err(Lost::Fatal(
                                MigrationError::component(&self.parts[i].name)(e),
                            ))
                        }
                    }
                }
                None => {
                    if idle_since.is_none() {
                        if let Err(e) = self.out().flush() {
                            return Err(Lost::Link(format!("sending: {e}")));
                        }
                    }
                    let since = *idle_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > DONE_TIMEOUT {
                        return Err(Lost::Link(format!(
                            "every page went out but the destination has not confirmed them \
                             within {} s",
                            DONE_TIMEOUT.as_secs()
                        )));
                    }
                    let a = self
                        .back
                        .as_mut()
                        .expect("live")
                        .wait(Duration::from_millis(50));
                    if let Some(a) = a {
                        if let Some(done) = self.on_answer(a)? {
                            return Ok(done);
                        }
                    }
                }
            }
        }
    }

    /// A request that came before STARTED (a device touched a missing page while the
    /// VM started): served at once; pages wanted ahead wait for the serving loop.
    pub(super) fn serve_early(&mut self, a: Answer) -> Res<()> {
        match self.on_answer(a) {
            Ok(_) => Ok(()),
            Err(Lost::Fatal(e)) => Err(e),
            Err(Lost::Link(why)) => Err(MigrationError::Unconfirmed(why)),
        }
    }

    /// One answer from the destination during post-copy: DONE ends it.
    fn on_answer(&mut self, a: Answer) -> Result<Option<Done>, Lost> {
        match a {
            Answer::Request { section, addrs } => {
                self.serve_request(section, &addrs)?;
                Ok(None)
            }
            Answer::Ahead { section, addrs } => {
                // Refused at the door when no lazy section has that number; the
                // addresses are checked when served.
                if self.parts.get(section as usize).is_some_and(|p| p.lazy) {
                    self.ahead.push_back((section, addrs));
                } else {
                    tracing::warn!(
                        section,
                        "refused pages asked ahead for a section that is not lazy"
                    );
                    self.report
                        .postcopy
                        .get_or_insert_with(Default::default)
                        .refused_requests += 1;
                }
                Ok(None)
            }
            Answer::Done(d) => Ok(Some(d)),
            // It gave the VM up: nothing left to recover.
            Answer::Abort(m) => Err(Lost::Fatal(
                self.broken(format!("the destination aborted: {m}")),
            )),
            Answer::Closed => Err(Lost::Link("the destination closed the connection".into())),
            Answer::Failed(e) => Err(Lost::Link(e.to_string())),
            a => Err(Lost::Fatal(
                self.broken(format!("the destination sent {a:?}")),
            )),
        }
    }

    /// The connections broke: the VM runs at the destination, this copy keeps the
    /// pages it still lacks, and post-copy waits for `migrate-recover` to say where the
    /// destination is now; a `migrate-cancel` gives up.
    fn pause(&mut self, why: String) -> Res<()> {
        tracing::error!(
            "post-copy paused: {why}; waiting for `godwit migrate-recover` (the VM runs at \
             the destination, this copy keeps {} pages it still lacks)",
            self.lazy_left()
        );
        self.phase = Phase::PostcopyPaused;
        self.shut_connections();
        self.status.set_paused(Some(why.clone()));
        self.progress(self.lazy_left(), 0.0);
        let recovered = loop {
            let Some(to) = self.status.wait_recover() else {
                break Err(self.broken(format!("{why}; given up by migrate-cancel")));
            };
            let to = if to.is_empty() { self.o.to.clone() } else { to };
            match self.reconnect(&to) {
                Ok(()) => break Ok(()),
                Err(e) => {
                    tracing::warn!("post-copy recovery to {to} failed: {e}");
                    self.shut_connections();
                    self.status
                        .set_paused(Some(format!("{why}; recovery to {to}: {e}")));
                }
            }
        };
        self.status.set_paused(None);
        recovered?;
        self.phase = Phase::Postcopy;
        let pc = self.report.postcopy.get_or_insert_with(Default::default);
        pc.recoveries += 1;
        tracing::info!(pages = self.lazy_left(), "post-copy resumed");
        Ok(())
    }

    /// Drops the connections in use (shut down first: a writer blocked on a dead one
    /// returns).
    fn shut_connections(&mut self) {
        let socks = std::mem::take(
            &mut self
                .status
                .interrupt
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .sockets,
        );
        for s in &socks {
            s.shutdown();
        }
        drop(self.back.take());
        if let Some(out) = self.out.take() {
            self.bytes_base += out.bytes;
        }
    }

    /// New connections to `to`: RESUME on the main one, JOIN on the others; the
    /// destination answers with what it still lacks, which is what is left to send.
    fn reconnect(&mut self, to: &str) -> Res<()> {
        let target = Target::parse(to).map_err(MigrationError::BadOptions)?;
        if target.is_file() {
            return Err(MigrationError::BadOptions(
                "post-copy recovers to a live destination, not a file".into(),
            ));
        }
        let resume = Frame::Resume {
            session: self.session,
            connections: self.o.lanes(),
        };
        self.open_main(&target, &resume)?;
        self.out().pace_by_caller();
        self.join_lanes(&target)?;
        self.out().sync().map_err(|e| self.send_error(e))?;
        loop {
            match self.answer("RESUMED")? {
                Answer::Missing { section, missing } => {
                    let Some(p) = self.parts.get(section as usize).filter(|p| p.lazy) else {
                        return Err(MigrationError::Unexpected {
                            want: "what a lazy section lacks",
                            got: format!("section {section}"),
                        });
                    };
                    let missing = lacks::bitmaps(missing, &p.c.lazy_regions()).map_err(|e| {
                        MigrationError::Unexpected {
                            want: "what a lazy section lacks, fitting its memory",
                            got: e,
                        }
                    })?;
                    p.c.postcopy_resume(missing)
                        .map_err(MigrationError::component(&p.name))?;
                }
                Answer::Resumed => return Ok(()),
                a => {
                    return Err(MigrationError::Unexpected {
                        want: "RESUMED",
                        got: format!("{a:?}"),
                    })
                }
            }
        }
    }

    /// Pages a touch at the destination waits for, at once on the main connection.
    /// A request the VM cannot answer (a section that is not lazy, an address outside
    /// it) is counted and refused; it touches nothing else.
    fn serve_request(&mut self, section: u32, addrs: &[u64]) -> Result<(), Lost> {
        self.serve_pages(section, addrs, Route::Main)
    }

    /// Pages asked for, on `route` (the main connection for a touch that waits, the
    /// background ones for pages wanted ahead).
    fn serve_pages(&mut self, section: u32, addrs: &[u64], route: Route) -> Result<(), Lost> {
        let Some(p) = self.parts.get(section as usize).filter(|p| p.lazy) else {
            tracing::warn!(
                section,
                "refused a page request for a section that is not lazy"
            );
            self.report
                .postcopy
                .get_or_insert_with(Default::default)
                .refused_requests += 1;
            return Ok(());
        };
        let (c, name) = (p.c.clone(), p.name.clone());
        let cancel = &self.status.cancel;
        let out = self.out.as_mut().expect("connected");
        let r = c.read_requested(&mut out.routed(section, cancel, route), addrs);
        let flushed = if route == Route::Main {
            out.flush_main()
        } else {
            Ok(())
        };
        match r {
            Ok(r) => {
                let pc = self.report.postcopy.get_or_insert_with(Default::default);
                if route == Route::Main {
                    pc.requested_pages += r.pages + r.zero_sent;
                } else {
                    pc.ahead_pages += r.pages + r.zero_sent;
                    pc.background_pages += r.pages + r.zero_sent;
                }
                self.count_sent(section as usize, &r);
            }
            Err(godwit_vmm::migratable::ComponentError::Io(e)) => {
                return Err(Lost::Link(format!("sending: {e}")))
            }
            Err(e) => {
                tracing::warn!(component = name, "refused a page request: {e}");
                self.report
                    .postcopy
                    .get_or_insert_with(Default::default)
                    .refused_requests += 1;
            }
        }
        flushed.map_err(|e| Lost::Link(format!("sending: {e}")))
    }

    fn finish_postcopy(&mut self, done: Done, switched: Instant) {
        let pc = self.report.postcopy.get_or_insert_with(Default::default);
        pc.window_ms = ms(switched.elapsed());
        pc.vm_ended = done.ended;
        let mut most = 0;
        for (name, s) in done.sections {
            pc.remote_faults += s.remote_faults;
            pc.prepaged_pages += s.prepaged;
            if s.fault_latency.count >= most {
                most = s.fault_latency.count;
                pc.fault_latency = s.fault_latency.clone();
            }
            pc.destination.insert(name, s);
        }
        self.progress(0, 0.0);
    }
}
