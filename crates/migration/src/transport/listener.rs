//! The destination's end of a migration: the socket it listens on (or the snapshot it
//! reads), and how it takes connections.

use super::*;
use std::net::TcpListener;
use std::os::unix::net::UnixListener;

/// The destination's end: a listening socket, or a snapshot to read.
pub enum Listener {
    Tcp(TcpListener, Option<crate::tls::Creds>),
    Unix(UnixListener, PathBuf),
    File(PathBuf),
}

impl Listener {
    pub fn bind(t: &Target) -> io::Result<Listener> {
        Listener::bind_with(t, None)
    }

    /// Listens; TCP peers must pass a TLS handshake with `tls` when it is given.
    pub fn bind_with(t: &Target, tls: Option<crate::tls::Creds>) -> io::Result<Listener> {
        match t {
            Target::Tcp(a) => TcpListener::bind(a.as_str()).map(|l| Listener::Tcp(l, tls)),
            Target::Unix(p) => {
                // A stale socket from a dead process is replaced; a live one, or
                // anything that is not a socket, is not.
                godwit_vmm::files::claim_socket_path(p)?;
                UnixListener::bind(p).map(|l| Listener::Unix(l, p.clone()))
            }
            Target::File(p) => {
                godwit_vmm::files::open_regular(p, u64::MAX)?;
                Ok(Listener::File(p.clone()))
            }
        }
    }

    /// The address a source should use (with the real port when asked for port 0).
    pub fn local(&self) -> String {
        match self {
            Listener::Tcp(l, _) => l
                .local_addr()
                .map(|a| format!("tcp:{a}"))
                .unwrap_or_default(),
            Listener::Unix(_, p) => format!("unix:{}", p.display()),
            Listener::File(p) => format!("file:{}", p.display()),
        }
    }

    /// The next connection, waiting at most `timeout` (None = forever). A peer that
    /// fails the TLS handshake is an error of kind ConnectionAborted: that peer's, not
    /// the listener's.
    pub fn accept(&self, timeout: Option<Duration>) -> io::Result<Stream> {
        let s = self.accept_raw(timeout)?;
        secure(self.tls().as_ref(), s)
    }

    /// The TLS credentials peers must pass, if any.
    pub fn tls(&self) -> Option<crate::tls::Creds> {
        match self {
            Listener::Tcp(_, c) => c.clone(),
            _ => None,
        }
    }

    /// The next connection as accepted, before any TLS handshake (`secure` does it, so
    /// that a slow peer's handshake can run apart from the accepting thread).
    pub fn accept_raw(&self, timeout: Option<Duration>) -> io::Result<Stream> {
        self.accept_until(timeout, None)?
            .ok_or_else(|| io::Error::other("stopped"))
    }

    /// `accept_raw` with no deadline, given up (None) as soon as `stop` is readable or
    /// its peer is closed: how another thread ends the wait at once.
    pub fn accept_raw_unless(&self, stop: &UnixStream) -> io::Result<Option<Stream>> {
        self.accept_until(None, Some(stop))
    }

    fn accept_until(
        &self,
        timeout: Option<Duration>,
        stop: Option<&UnixStream>,
    ) -> io::Result<Option<Stream>> {
        use std::os::fd::AsRawFd;
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        // Non-blocking, and the waits are polls: a connection is taken the moment it
        // comes, and a stop or a deadline ends the wait just as soon.
        let fd = match self {
            Listener::Tcp(l, _) => {
                l.set_nonblocking(true)?;
                l.as_raw_fd()
            }
            Listener::Unix(l, _) => {
                l.set_nonblocking(true)?;
                l.as_raw_fd()
            }
            Listener::File(p) => {
                return File::open(p)
                    .map(|f| Some(Stream::FileIn(io::BufReader::with_capacity(1 << 20, f))))
            }
        };
        loop {
            let r = match self {
                Listener::Tcp(l, _) => l.accept().map(|(s, _)| {
                    let _ = s.set_nodelay(true);
                    Stream::Tcp(s)
                }),
                Listener::Unix(l, _) => l.accept().map(|(s, _)| Stream::Unix(s)),
                Listener::File(_) => unreachable!("a file was opened above"),
            };
            match r {
                Ok(s) => {
                    // Accepted sockets may inherit non-blocking mode: undo it.
                    match &s {
                        Stream::Tcp(t) => t.set_nonblocking(false)?,
                        Stream::Unix(u) => u.set_nonblocking(false)?,
                        _ => {}
                    }
                    return Ok(Some(s));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            let left = deadline.map(|d| d.saturating_duration_since(std::time::Instant::now()));
            if left == Some(Duration::ZERO) {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no connection came in time",
                ));
            }
            if wait_readable(fd, stop.map(|s| s.as_raw_fd()), left)? {
                return Ok(None);
            }
        }
    }
}

/// Waits until `fd` is readable, `stop` is, or `d` (None: no limit) has passed; true when
/// it was `stop`.
fn wait_readable(
    fd: std::os::fd::RawFd,
    stop: Option<std::os::fd::RawFd>,
    d: Option<Duration>,
) -> io::Result<bool> {
    let mut p = [
        libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop.unwrap_or(-1),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let t = d.map(|d| libc::timespec {
        tv_sec: d.as_secs() as libc::time_t,
        tv_nsec: d.subsec_nanos() as libc::c_long,
    });
    let tp = t
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: two pollfds this function owns (a negative fd is ignored by the kernel),
    // descriptors the caller holds open, and a valid or null timeout; no signal mask
    // is changed.
    let r = unsafe { libc::ppoll(p.as_mut_ptr(), 2, tp, std::ptr::null()) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted {
            Ok(false)
        } else {
            Err(e)
        };
    }
    Ok(stop.is_some() && p[1].revents != 0)
}

/// The TLS handshake of an accepted TCP connection, when the listener asks for one. A
/// peer that fails it is an error of kind ConnectionAborted: that peer's, not the
/// listener's.
pub fn secure(tls: Option<&crate::tls::Creds>, s: Stream) -> io::Result<Stream> {
    let (Some(creds), Stream::Tcp(t)) = (tls, &s) else {
        return Ok(s);
    };
    let peer = t.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let aborted = |e: io::Error| {
        io::Error::new(
            io::ErrorKind::ConnectionAborted,
            format!("TLS handshake with {peer}: {e}"),
        )
    };
    let Stream::Tcp(t) = s else { unreachable!() };
    t.set_read_timeout(Some(TLS_HANDSHAKE_TIMEOUT))
        .map_err(aborted)?;
    t.set_write_timeout(Some(TLS_HANDSHAKE_TIMEOUT))
        .map_err(aborted)?;
    let t = creds.accept(t).map_err(aborted)?;
    t.sock.set_write_timeout(None).map_err(aborted)?;
    Ok(Stream::Tls(t))
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp() -> (Listener, String) {
        let l = Listener::bind(&Target::parse("tcp:127.0.0.1:0").unwrap()).unwrap();
        let a = l.local();
        (l, a.strip_prefix("tcp:").unwrap().to_string())
    }

    /// A connection is taken, a wait with a deadline ends with TimedOut, and a wait
    /// without one ends when its stop is closed, with no connection.
    #[test]
    fn a_wait_for_a_connection_ends_with_one_its_deadline_or_its_stop() {
        let (l, addr) = tcp();
        let e = l.accept_raw(Some(Duration::from_millis(20))).err().unwrap();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        let _c = TcpStream::connect(&addr).unwrap();
        assert!(matches!(
            l.accept_raw(Some(Duration::from_secs(10))),
            Ok(Stream::Tcp(_))
        ));
        let (stop_tx, stop_rx) = UnixStream::pair().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(l.accept_raw_unless(&stop_rx).map(|c| c.is_some()));
        });
        drop(stop_tx);
        let got = rx.recv_timeout(Duration::from_secs(10));
        assert!(matches!(got, Ok(Ok(false))), "{got:?}");
    }
}
