//! The destination's side of the main connection, as the source hears it: whatever the
//! destination sends, whenever it sends it. The driver looks between two slices of
//! work without waiting (`poll`), so an ABORT mid-round ends the migration at once
//! rather than at the next failed write, and waits with a deadline where an answer is
//! due (`wait`). It reads on the driver's own thread: a hand-off to a reader thread
//! would cost a wake-up on the switchover's critical path. Post-copy's page requests
//! come this way too.

use crate::transport::Stream;
use crate::wire::{self, Frame, Kind, Lacks, Ready, Started, WireError, HEADER_LEN};
use std::io::Read;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub enum Answer {
    Accept(crate::wire::Accept),
    Refuse(String),
    Ready(Ready),
    Started(Started),
    Synced(u64),
    Abort(String),
    /// Post-copy: pages the destination waits for.
    Request {
        section: u32,
        addrs: Vec<u64>,
    },
    /// Post-copy: pages a device will touch soon.
    Ahead {
        section: u32,
        addrs: Vec<u64>,
    },
    /// Post-copy: the destination holds every page.
    Done(crate::wire::Done),
    /// Post-copy recovery: what the destination still lacks of one section.
    Missing {
        section: u32,
        missing: Vec<Lacks>,
    },
    Resumed,
    /// A frame the destination should not send.
    Other(Kind),
    /// The destination closed the connection.
    Closed,
    Failed(WireError),
}

/// What one read brought.
enum Got {
    Bytes,
    /// The read timed out.
    Nothing,
    End(Answer),
}

pub struct BackChannel {
    s: Stream,
    /// Bytes read and not yet made into an answer (a frame arrives in pieces).
    buf: Vec<u8>,
    ended: bool,
}

impl BackChannel {
    /// Hears `main` (a second handle on the main connection).
    pub fn new(main: Stream) -> BackChannel {
        BackChannel {
            s: main,
            buf: Vec::new(),
            ended: false,
        }
    }

    /// A whole frame already read, as an answer.
    fn take(&mut self) -> Option<Answer> {
        let h: &[u8; HEADER_LEN] = self.buf.get(..HEADER_LEN)?.try_into().ok()?;
        let len = match wire::check_header(h) {
            Ok((_, len)) => HEADER_LEN + len,
            Err(e) => {
                self.ended = true;
                return Some(Answer::Failed(e));
            }
        };
        if self.buf.len() < len {
            return None;
        }
        let mut payload = Vec::new();
        let a = match wire::read_frame(&mut &self.buf[..len], &mut payload) {
            Ok(Frame::Accept(a)) => Answer::Accept(a),
            Ok(Frame::Refuse(m)) => Answer::Refuse(m),
            Ok(Frame::Ready(x)) => Answer::Ready(x),
            Ok(Frame::Started(x)) => Answer::Started(x),
            Ok(Frame::Synced(n)) => Answer::Synced(n),
            Ok(Frame::Abort(m)) => Answer::Abort(m),
            Ok(Frame::Request { section, addrs }) => Answer::Request { section, addrs },
            Ok(Frame::Done(d)) => Answer::Done(d),
            Ok(Frame::Ahead { section, addrs }) => Answer::Ahead { section, addrs },
            Ok(Frame::Postcopy { section, missing }) => Answer::Missing {
                section,
                missing: missing.into_iter().map(Lacks::Bitmap).collect(),
            },
            Ok(Frame::Lacks { section, regions }) => Answer::Missing {
                section,
                missing: regions,
            },
            Ok(Frame::Resumed) => Answer::Resumed,
            Ok(f) => Answer::Other(f.kind()),
            Err(e) => {
                self.ended = true;
                Answer::Failed(e)
            }
        };
        self.buf.drain(..len);
        Some(a)
    }

    /// One read of whatever has arrived (blocking up to the socket's read timeout).
    fn read_some(&mut self) -> Got {
        let mut chunk = [0u8; 4096];
        match self.s.read(&mut chunk) {
            Ok(0) => {
                self.ended = true;
                Got::End(Answer::Closed)
            }
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Got::Bytes
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Got::Bytes,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Got::Nothing
            }
            Err(e) => {
                self.ended = true;
                Got::End(Answer::Failed(WireError::Io(e)))
            }
        }
    }

    /// A second handle on the connection (to shut it down from elsewhere).
    pub fn socket(&self) -> Option<Stream> {
        self.s.try_clone()
    }

    /// An answer that has already arrived, if any; never waits.
    pub fn poll(&mut self) -> Option<Answer> {
        if let Some(a) = self.take() {
            return Some(a);
        }
        if self.ended {
            return Some(Answer::Closed);
        }
        while self.s.readable() {
            match self.read_some() {
                Got::Bytes => {
                    if let Some(a) = self.take() {
                        return Some(a);
                    }
                }
                Got::Nothing => return None,
                Got::End(a) => return Some(a),
            }
        }
        None
    }

    /// The next answer, waiting at most `d` (None: nothing came in time).
    pub fn wait(&mut self, d: Duration) -> Option<Answer> {
        let end = Instant::now() + d;
        loop {
            if let Some(a) = self.take() {
                return Some(a);
            }
            if self.ended {
                return Some(Answer::Closed);
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() || self.s.set_read_timeout(Some(left)).is_err() {
                return None;
            }
            match self.read_some() {
                Got::Bytes => {}
                Got::Nothing => return None,
                Got::End(a) => return Some(a),
            }
        }
    }
}
