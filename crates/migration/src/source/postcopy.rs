//! Post-copy on the source: the VM runs at the destination, and the memory it still
//! lacks goes two ways. Pages a touch waits for (REQUEST) go at once on the main
//! connection, which carries nothing else now; the rest streams on the other
//! connections in the background, from where the destination last touched on
//! (pre-paging). The source holds every page until the destination says it has them
//! all (DONE); only then does the VM end here.

use super::push;
use super::*;
use crate::lacks;
use crate::outbound::Route;
use crate::report::RecoverTo;
use crate::wire::Done;

/// Why serving stopped short of DONE.
enum Lost {
    /// The connections failed: recoverable on new ones.
    Link(String),
    Fatal(MigrationError),
}

/// How long the answering thread waits for the destination before it looks at the
/// pusher and the progress again.
const ANSWER_WAIT: Duration = Duration::from_millis(10);
/// How often post-copy's progress is given to `vm.migration`.
const PROGRESS_EVERY: Duration = Duration::from_millis(100);
/// With everything pushed, how long the destination may take to say DONE.
const DONE_TIMEOUT: Duration = Duration::from_secs(60);

/// Every page went out at `since`: a destination that has not said DONE within
/// DONE_TIMEOUT is taken for lost (recoverable).
fn confirmed_in_time(since: Instant) -> Result<(), Lost> {
    if since.elapsed() > DONE_TIMEOUT {
        return Err(Lost::Link(format!(
            "every page went out but the destination has not confirmed them within {} s",
            DONE_TIMEOUT.as_secs()
        )));
    }
    Ok(())
}

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

    /// Post-copy's progress for `vm.migration`, at most every PROGRESS_EVERY (`last`:
    /// when it was last given).
    fn progress_every(&self, last: &mut Instant) {
        if last.elapsed() >= PROGRESS_EVERY {
            self.progress(self.lazy_left(), 0.0);
            *last = Instant::now();
        }
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
        let _urgent = crate::priority::Urgent::fair("the source's post-copy answers");
        self.progress(self.lazy_left(), 0.0);
        let switched = self.paused_at.unwrap_or(self.t0);
        // Under a bandwidth cap the background stream waits its turn listening for
        // requests, which go first.
        self.out().pace_by_caller();
        loop {
            match self.serve_some() {
                Ok(done) => {
                    if done.answer_released {
                        self.release();
                    }
                    self.finish_postcopy(done, switched);
                    return Ok(());
                }
                Err(Lost::Fatal(e)) => return Err(e),
                Err(Lost::Link(why)) => self.pause(why)?,
            }
        }
    }

    /// Serves the destination on the connections in use until DONE, or until they fail:
    /// this thread answers requests on the main connection while a thread of its own
    /// pushes the rest on the others (see `push`).
    fn serve_some(&mut self) -> Result<Done, Lost> {
        let Some(mut bg) = self.out.as_mut().expect("connected").split_background() else {
            return self.serve_alone();
        };
        let lazy: Vec<push::LazyPart> = self
            .parts
            .iter()
            .enumerate()
            .filter(|(_, p)| p.lazy)
            .map(|(i, p)| (i, p.name.clone(), p.c.clone()))
            .collect();
        let (ahead, wanted) = std::sync::mpsc::channel();
        let shared = push::Shared::default();
        let status = self.status;
        let (answered, pushed) = std::thread::scope(|s| {
            let (lazy, out, shared) = (&lazy, &mut bg, &shared);
            let pusher = std::thread::Builder::new()
                .name("migration-push".into())
                .spawn_scoped(s, move || {
                    push::push(lazy, out, &wanted, shared, &status.cancel)
                });
            match pusher {
                Ok(h) => {
                    let answered = self.answer_requests(&ahead, shared);
                    shared.stop.store(true, Ordering::SeqCst);
                    // Wakes a pusher waiting for pages wanted ahead.
                    drop(ahead);
                    (answered, Some(h.join()))
                }
                Err(e) => (
                    Err(Lost::Fatal(
                        self.broken(format!("cannot start the background stream: {e}")),
                    )),
                    None,
                ),
            }
        });
        // Kept until the connections are given up, which shuts them down first (a
        // writer blocked on a dead connection returns).
        self.bg = Some(bg);
        let pushed = match pushed {
            Some(Ok(p)) => p,
            Some(Err(_)) => {
                return Err(Lost::Fatal(
                    self.broken("the background stream's thread failed".into()),
                ))
            }
            None => push::Pushed::default(),
        };
        for (i, r) in &pushed.sent {
            self.count_sent(*i, r);
        }
        let pc = self.report.postcopy.get_or_insert_with(Default::default);
        pc.background_pages += pushed.background_pages;
        pc.ahead_pages += pushed.ahead_pages;
        pc.refused_requests += pushed.refused;
        let failed = shared
            .failed
            .into_inner()
            .unwrap_or_else(|e| e.into_inner());
        match (answered, failed) {
            (Err(Lost::Fatal(e)), _) => Err(Lost::Fatal(e)),
            (_, Some(push::Stopped::Component(name, e))) => {
                Err(Lost::Fatal(MigrationError::component(&name)(e)))
            }
            (Ok(done), _) => Ok(done),
            (Err(Lost::Link(why)), _) => Err(Lost::Link(why)),
        }
    }

    /// Answers requests until DONE, or until the connections fail (this one, or the
    /// pusher's). Pages wanted ahead go to the pusher.
    fn answer_requests(
        &mut self,
        ahead: &std::sync::mpsc::Sender<(u32, Vec<u64>)>,
        shared: &push::Shared,
    ) -> Result<Done, Lost> {
        let mut idle_since: Option<Instant> = None;
        let mut last_progress = Instant::now();
        loop {
            // Asked ahead before STARTED, or just now.
            for a in self.ahead.drain(..) {
                shared.wanted_ahead.store(true, Ordering::SeqCst);
                let _ = ahead.send(a);
            }
            // Also while requests come back to back (a guest that faults without a
            // pause would otherwise leave `vm.migration` where post-copy began).
            self.progress_every(&mut last_progress);
            if let Some(a) = self.back.as_mut().expect("live").wait(ANSWER_WAIT) {
                let urgent = matches!(a, Answer::Request { .. });
                if urgent {
                    shared.requests.fetch_add(1, Ordering::SeqCst);
                }
                shared.answering.store(urgent, Ordering::SeqCst);
                let r = self.on_answer(a);
                shared.answering.store(false, Ordering::SeqCst);
                if let Some(done) = r? {
                    return Ok(done);
                }
                continue;
            }
            if let Some(why) = shared
                .failed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
            {
                return Err(match why {
                    push::Stopped::Link(why) => Lost::Link(why.clone()),
                    // Reported by the caller, with the component's error.
                    push::Stopped::Component(..) => Lost::Link(String::new()),
                });
            }
            if shared.all_out.load(Ordering::SeqCst) {
                confirmed_in_time(*idle_since.get_or_insert_with(Instant::now))?;
            } else {
                idle_since = None;
            }
        }
    }

    /// `serve_some` on the main connection alone (a pre-copy of one connection
    /// switched to post-copy by hand): requests and the background share it and this
    /// thread, the background one frame at a time between two looks for requests.
    fn serve_alone(&mut self) -> Result<Done, Lost> {
        let mut idle_since: Option<Instant> = None;
        let mut last_progress = Instant::now();
        loop {
            while let Some(a) = self.back.as_mut().expect("live").poll() {
                if let Some(done) = self.on_answer(a)? {
                    return Ok(done);
                }
            }
            self.progress_every(&mut last_progress);
            let next = self
                .parts
                .iter()
                .position(|p| p.lazy && p.c.precopy_info().is_ok_and(|i| i.total() > 0));
            // The background waits, listening for requests, while the bandwidth cap says
            // so.
            let due = self.out.as_ref().expect("connected").due();
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
                    let r = c.read(
                        &mut out.routed(i as u32, cancel, Route::Background),
                        push::PUSH_PAGES,
                    );
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
                    confirmed_in_time(*idle_since.get_or_insert_with(Instant::now))?;
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
             the destination; this copy keeps every page until the destination confirms \
             it holds them all, {} not sent yet)",
            self.lazy_left()
        );
        self.phase = Phase::PostcopyPaused;
        self.shut_connections();
        self.status.set_paused(Some(why.clone()));
        self.progress(self.lazy_left(), 0.0);
        let recovered = loop {
            let Some(asked) = self.status.wait_recover() else {
                break Err(self.broken(format!("{why}; given up by migrate-cancel")));
            };
            let to = if asked.to.is_empty() {
                self.o.to.clone()
            } else {
                asked.to.clone()
            };
            // `vm.migration` says how it ended before `migrate-recover` does.
            match self.reconnect(asked) {
                Ok(()) => {
                    self.status.set_paused(None);
                    self.phase = Phase::Postcopy;
                    self.progress(self.lazy_left(), 0.0);
                    self.status.recovery_ended(Ok(()));
                    break Ok(());
                }
                Err(e) => {
                    tracing::warn!("post-copy recovery to {to} failed: {e}");
                    self.shut_connections();
                    self.status
                        .still_paused(format!("{why}; recovery to {to}: {e}"));
                    self.status
                        .recovery_ended(Err(format!("recovery to {to}: {e}")));
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
        for out in [self.out.take(), self.bg.take()].into_iter().flatten() {
            self.bytes_base += out.bytes;
        }
    }

    /// New connections to where `asked` says: RESUME on the main one, JOIN on the
    /// others; the destination answers with what it still lacks, which is what is left
    /// to send.
    fn reconnect(&mut self, asked: RecoverTo) -> Res<()> {
        let (target, addrs) = if asked.to.is_empty() {
            (self.target.clone(), self.addrs.clone())
        } else {
            let target = Target::parse(&asked.to).map_err(MigrationError::BadOptions)?;
            if target.is_file() {
                return Err(MigrationError::BadOptions(
                    "post-copy recovers to a live destination, not a file".into(),
                ));
            }
            let addrs = asked
                .addrs
                .map_err(|e| unreachable_at(&target)(std::io::Error::other(e)))?;
            (target, addrs)
        };
        let resume = Frame::Resume {
            session: self.session,
            connections: self.o.lanes(),
        };
        self.open_main(&target, &addrs, &resume)?;
        self.out().pace_by_caller();
        self.join_lanes(&target, &addrs)?;
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

    /// Tells the destination DONE reached us (RELEASED), so that it stops listening
    /// for a source coming back for a lost one. Only a courtesy: should it be lost
    /// too, the destination listens on for a while, then stops anyway.
    fn release(&mut self) {
        let out = self.out();
        if let Err(e) = out.control(&Frame::Released).and_then(|_| out.sync()) {
            tracing::debug!("post-copy: telling the destination RELEASED: {e}");
        }
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
