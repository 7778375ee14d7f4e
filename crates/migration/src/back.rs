//! The destination's side of the main connection, as the source hears it: a reader
//! thread takes every frame the destination sends, whenever it sends it, and hands it
//! to the driver. The driver waits for an answer with a deadline, or just looks between
//! two slices of pages, so an ABORT mid-round ends the migration at once instead of at
//! the next failed write. (Post-copy's page requests will come this way too.)

use crate::transport::Stream;
use crate::wire::{self, Frame, Kind, Ready, Started, WireError};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::Duration;

#[derive(Debug)]
pub enum Answer {
    Accept,
    Refuse(String),
    Ready(Ready),
    Started(Started),
    Abort(String),
    /// A frame the destination should not send.
    Other(Kind),
    /// The destination closed the connection.
    Closed,
    Failed(WireError),
}

pub struct BackChannel {
    rx: Receiver<Answer>,
    /// Shut down on drop so the reader's blocked read ends.
    socket: Stream,
    thread: Option<JoinHandle<()>>,
}

impl BackChannel {
    /// Starts reading `main` (a second handle on the main connection).
    pub fn start(main: Stream) -> std::io::Result<BackChannel> {
        let socket = main
            .try_clone()
            .ok_or_else(|| std::io::Error::other("the connection cannot be shared"))?;
        let (tx, rx) = channel();
        let mut r = main;
        let thread = std::thread::Builder::new()
            .name("migration-back".into())
            .spawn(move || {
                let _ = r.set_read_timeout(None);
                let mut buf = Vec::new();
                loop {
                    let a = match wire::read_frame(&mut r, &mut buf) {
                        Ok(Frame::Accept) => Answer::Accept,
                        Ok(Frame::Refuse(m)) => Answer::Refuse(m),
                        Ok(Frame::Ready(x)) => Answer::Ready(x),
                        Ok(Frame::Started(x)) => Answer::Started(x),
                        Ok(Frame::Abort(m)) => Answer::Abort(m),
                        Ok(f) => Answer::Other(f.kind()),
                        Err(WireError::Closed) => Answer::Closed,
                        Err(e) => Answer::Failed(e),
                    };
                    let end = matches!(a, Answer::Closed | Answer::Failed(_));
                    if tx.send(a).is_err() || end {
                        return;
                    }
                }
            })?;
        Ok(BackChannel {
            rx,
            socket,
            thread: Some(thread),
        })
    }

    /// The next answer, waiting at most `d` (None: nothing came in time).
    pub fn wait(&self, d: Duration) -> Option<Answer> {
        match self.rx.recv_timeout(d) {
            Ok(a) => Some(a),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => Some(Answer::Closed),
        }
    }

    /// An answer that has already arrived, if any.
    pub fn poll(&self) -> Option<Answer> {
        self.rx.try_recv().ok()
    }
}

impl Drop for BackChannel {
    fn drop(&mut self) {
        self.socket.shutdown();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
