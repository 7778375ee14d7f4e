//! Pre-copy: rounds over the components' data while the VM runs, each ending once the
//! destination has taken it in, until the expected downtime fits the limit (holding
//! back what writes when rounds alone would not get there).

use super::*;

impl Driver<'_> {
    pub(super) fn precopy(&mut self) -> Res<()> {
        let limit = self.o.downtime_ms as f64;
        let mut last_sync = Instant::now();
        let untouched = self.untouched(|p| p.precopy);
        let mut rounds_at_max = 0;
        let mut trend = Trend::default();
        loop {
            let index = self.report.rounds.len() as u32;
            let (pct, held) = (self.converge.max_pct(), self.converge.held());
            self.progress(self.pending(), 0.0);
            let bytes_before = self.out.as_ref().expect("connected").bytes;
            let t = Instant::now();
            let sent = self.send_all()?;
            self.round_end(index as u64 + 1)?;
            let d = t.elapsed();
            let bytes = self.out.as_ref().expect("connected").bytes - bytes_before;
            self.learn_bandwidth(bytes, d);
            let since = last_sync.elapsed();
            let mut round = Round {
                index,
                duration_ms: ms(d),
                bytes,
                throughput_mib_s: mib_s(bytes, d),
                throttle_pct: pct,
                throttle: held,
                ..Default::default()
            };
            for (p, (r, _)) in self.parts.iter().zip(&sent) {
                if !p.precopy {
                    continue;
                }
                let s = p.c.sync().map_err(MigrationError::component(&p.name))?;
                round.pages_sent += r.pages;
                round.zero_pages += r.zero_pages;
                round.skipped_redirtied += r.skipped;
                round.peek_us += r.peek_us;
                round.dirty_pages += s.dirty_pages;
                round.dirty_log_us += s.log_us;
                if r.pages + r.zero_pages + s.dirty_pages > 0 || !s.extra.is_empty() {
                    round.components.insert(
                        p.name.clone(),
                        RoundPart {
                            pages_sent: r.pages,
                            zero_pages: r.zero_pages,
                            dirty_pages: s.dirty_pages,
                            dirty_rate_mib_s: mib_s(s.dirty_pages * PAGE_SIZE as u64, since),
                            skipped_redirtied: r.skipped,
                            dirty_log_us: s.log_us,
                            peek_us: r.peek_us,
                            extra: s.extra,
                        },
                    );
                }
            }
            last_sync = Instant::now();
            if index == 0 {
                round.zero_pages += untouched;
                self.report.bytes.zero_pages += untouched;
            }
            let n = round.dirty_pages;
            round.dirty_rate_mib_s = mib_s(n * PAGE_SIZE as u64, since);
            let expected = self.expected_ms(n);
            round.expected_downtime_ms = expected;
            self.expected_ms = expected;
            // Fitting the limit is enough to stop, but while rounds still shrink the
            // dirty set well another one is cheap and shortens the pause (the limit is a
            // ceiling, not a target); below a couple of ms the fixed costs dominate and
            // further rounds gain nothing. The next round lasts about n pages /
            // bandwidth and the guest dirties at its rate meanwhile, so each round
            // leaves rate / bandwidth of the set before it.
            let measured = n as f64 * PAGE_SIZE as f64 / since.as_secs_f64().max(1e-6);
            let rate = trend.rate(n, measured, self.bandwidth_cap());
            let shrinking = trend.round(n, rate, self.bandwidth_cap());
            // Rounds shrink only the transfer; the fixed part and the round trips stay.
            let good_enough = self.transfer_ms(n) <= SMALL_DOWNTIME_MS - FIXED_DOWNTIME_MS;
            let reason = if n == 0 {
                Some("no dirty pages left".into())
            } else if expected <= limit && (good_enough || trend.stalled()) {
                Some(format!(
                    "expected downtime {expected:.1} ms fits the {limit} ms limit"
                ))
            } else if rounds_at_max >= ROUNDS_AT_MAX_THROTTLE {
                Some(format!(
                    "forced: still {expected:.1} ms expected after {rounds_at_max} rounds with everything held back as far as it goes"
                ))
            } else if index + 1 >= MAX_ROUNDS {
                Some(format!("forced: {MAX_ROUNDS} rounds"))
            } else {
                None
            };
            // Post-copy instead of holding the guest back: hybrid switches where
            // pre-copy would stop or throttle, auto only where it would throttle (or
            // give up) without fitting the limit. `migrate-postcopy` switches now.
            // Already after the first pass (as QEMU's postcopy-after-precopy is used):
            // a guest that dirtied faster than the rounds can follow during it will
            // not be caught by a second pass, which only sends its set again.
            // One round that did not converge is enough to switch: post-copy does not
            // lengthen the pause, only the rounds still to come would.
            let stalled = reason.is_none() && !shrinking;
            let fits = expected <= limit;
            let post = if self.status.postcopy_now.load(Ordering::SeqCst) {
                Some("asked for (migrate-postcopy)".to_string())
            } else {
                match self.o.mode {
                    Mode::Hybrid if stalled => Some(format!(
                        "rounds stopped converging ({expected:.1} ms expected): post-copy \
                         instead of throttling"
                    )),
                    // With nothing left to send there is no rest to follow the VM; with
                    // a rest that the pause carries in a millisecond or less, pre-copy
                    // ends it too. Left to post-copy, those pages were the ones the
                    // guest was writing as it stopped: the vCPU touched two or three of
                    // them at once at the destination, one remote fault after another
                    // (100-300 us each here), and the switch itself costs the pause
                    // about what sending them does.
                    Mode::Hybrid if n > 0 && !(good_enough && fits) => reason.as_ref().map(|r| {
                        format!("pre-copy would stop here ({r}): the rest follows the VM")
                    }),
                    Mode::Auto
                        if (stalled || reason.is_some()) && !fits && self.postcopy_comes() =>
                    {
                        Some(format!(
                            "expected downtime {expected:.1} ms does not fit the {limit} ms limit \
                             and rounds stopped converging: post-copy instead of throttling"
                        ))
                    }
                    _ => None,
                }
            };
            if let Some(why) = post {
                self.report.rounds.push(round);
                self.progress(n, expected);
                self.check_in()?;
                self.report.switchover_reason = why.clone();
                self.postcopy = Some(why);
                return Ok(());
            }
            if reason.is_none() && index > 0 && self.throttles() {
                // The VM may dirty its memory faster than more rounds alone can follow:
                // hold back what writes (see `converge`).
                let changes = self.converge.round(rate, self.bandwidth_cap());
                self.throttle(changes);
                self.report.max_throttle_pct =
                    self.report.max_throttle_pct.max(self.converge.max_pct());
                self.report.throttled = self.report.max_throttle_pct > 0;
                if self.converge.exhausted() && rate > self.bandwidth_cap() / 2.0 {
                    rounds_at_max += 1;
                }
            }
            self.report.rounds.push(round);
            self.progress(n, expected);
            self.check_in()?;
            if let Some(r) = reason {
                self.report.switchover_reason = match self.o.mode {
                    Mode::Hybrid if n > 0 => {
                        format!("{r}; hybrid: a rest this small goes in the pause")
                    }
                    _ => r,
                };
                return Ok(());
            }
        }
    }

    /// Post-copy may follow these rounds: the destination did not say it cannot.
    fn postcopy_comes(&self) -> bool {
        self.report.postcopy_unavailable.is_none()
    }

    /// Rounds that stop converging hold back what writes: in pre-copy, and in auto
    /// where post-copy cannot come (elsewhere post-copy takes over instead).
    fn throttles(&self) -> bool {
        match self.o.mode {
            Mode::Precopy => true,
            Mode::Auto => !self.postcopy_comes(),
            Mode::Hybrid | Mode::Postcopy => false,
        }
    }

    /// Pages of the components `which` picks that their first pass skips (never
    /// written, so zero on both sides).
    pub(super) fn untouched(&self, which: impl Fn(&Part) -> bool) -> u64 {
        self.parts
            .iter()
            .filter(|p| which(p))
            .map(|p| {
                let first = p.c.precopy_info().map_or(0, |i| i.initial_bytes);
                p.c.pages().saturating_sub(first / PAGE_SIZE as u64)
            })
            .sum()
    }

    /// Pages the components have left to send.
    pub(super) fn pending(&self) -> u64 {
        self.parts
            .iter()
            .filter_map(|p| p.c.precopy_info().ok())
            .map(|i| i.total() / PAGE_SIZE as u64)
            .sum()
    }
}

/// Whether pre-copy's rounds still shrink the dirty set well.
#[derive(Default)]
struct Trend {
    last: Option<u64>,
    /// Rounds in a row that did not.
    stalls: u32,
}

impl Trend {
    /// The rate to judge a round that left `n` dirty pages by: the `measured` one, or
    /// the one implied at `bandwidth` (bytes/s) by the share of the set before it that
    /// the round left, whichever is lower. The two say the same over a long view, but
    /// over a round of a few ms the measured rate is the guest's bursts (a paced writer
    /// catching up after a stall wrote 108 pages in a 2 ms round, "194 MiB/s" against
    /// 228 learnt from the first pass, while the round took 762 pages down to 108) and
    /// the bandwidth was learnt from large rounds, not this one: taken alone they had
    /// hybrid switch to post-copy, and would have had pre-copy hold the guest back,
    /// with the set going down sevenfold. The first pass has no set before it.
    fn rate(&self, n: u64, measured: f64, bandwidth: f64) -> f64 {
        match self.last {
            Some(last) if last > 0 => measured.min(n as f64 / last as f64 * bandwidth),
            _ => measured,
        }
    }

    /// A round left `n` dirty pages, written at `rate` (`Trend::rate`) against a link
    /// of `bandwidth` (bytes/s): true if it shrank the set well.
    fn round(&mut self, n: u64, rate: f64, bandwidth: f64) -> bool {
        let shrank = self.last.is_none_or(|last| n < last);
        self.last = Some(n);
        let shrinking = shrank && rate <= bandwidth * CONVERGING;
        self.stalls = if shrinking { 0 } else { self.stalls + 1 };
        shrinking
    }

    /// Whether another round will not shrink the set either. A set that stays the same
    /// (a few pages the guest writes all the time) will not; one round that did not
    /// shrink it well (the guest's or the host's scheduling made it slow) says little,
    /// and stopping on it had pre-copy pause for 30 to 280 MiB where one more round
    /// (held back, in pre-copy) would have left a few.
    fn stalled(&self) -> bool {
        self.stalls >= STALLS
    }
}

/// Rounds in a row that do not converge after which pre-copy stops as soon as it fits.
const STALLS: u32 = 2;

#[cfg(test)]
mod tests {
    use super::*;

    const LINK: f64 = 1e9;

    #[test]
    fn one_slow_round_is_not_a_stall_two_are() {
        let mut t = Trend::default();
        assert!(t.round(100_000, 0.4 * LINK, LINK));
        assert!(t.round(40_000, 0.4 * LINK, LINK));
        // The guest dirtied most of what the link carried: not converging, once.
        assert!(!t.round(30_000, 0.8 * LINK, LINK));
        assert!(!t.stalled());
        // The next round shrinks well again: the count starts over.
        assert!(t.round(8_000, 0.3 * LINK, LINK));
        assert!(!t.round(7_000, 0.8 * LINK, LINK));
        assert!(!t.stalled());
        assert!(!t.round(6_500, 0.9 * LINK, LINK));
        assert!(t.stalled());
    }

    /// `Trend::rate`, then `Trend::round` with it, as the rounds do.
    fn judge(t: &mut Trend, n: u64, measured: f64) -> (f64, bool) {
        let rate = t.rate(n, measured, LINK);
        (rate, t.round(n, rate, LINK))
    }

    #[test]
    fn a_round_that_left_little_of_its_set_converged_whatever_the_rate() {
        let mut t = Trend::default();
        // The first pass has nothing before it: its rate is the one measured.
        assert_eq!(judge(&mut t, 8_000, 0.9 * LINK), (0.9 * LINK, false));
        assert!(judge(&mut t, 762, 0.3 * LINK).1);
        // A burst in a short round reads as a high rate; the set still went down 7x,
        // and that is the rate the round is judged (and the guest held back) by.
        let (rate, converged) = judge(&mut t, 108, 0.85 * LINK);
        assert!(converged);
        assert!((rate - 108.0 / 762.0 * LINK).abs() < 1.0, "{rate}");
        // Not down by a quarter and written fast: that one did not.
        assert!(!judge(&mut t, 100, 0.85 * LINK).1);
        assert!(!t.stalled());
        // A round that measured slow keeps its measured rate.
        assert_eq!(judge(&mut t, 90, 0.01 * LINK), (0.01 * LINK, true));
    }

    #[test]
    fn a_set_that_stays_the_same_stalls_whatever_the_rate() {
        let mut t = Trend::default();
        assert!(t.round(500, 0.01 * LINK, LINK));
        assert!(!t.round(500, 0.01 * LINK, LINK));
        assert!(!t.stalled());
        assert!(!t.round(520, 0.01 * LINK, LINK));
        assert!(t.stalled());
    }
}
