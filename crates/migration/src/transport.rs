//! Where a migration goes: `tcp:HOST:PORT`, `unix:PATH` or `file:PATH`, and the byte
//! streams that carry it. Nothing here knows about frames or policy.

#[cfg(test)]
use crate::wire;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;
use vm_memory::VolatileSlice;

mod listener;
pub use listener::{secure, Listener};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Tcp(String),
    Unix(PathBuf),
    File(PathBuf),
}

impl Target {
    pub fn parse(s: &str) -> Result<Target, String> {
        let bad = || {
            format!("{s:?} is not a migration address (use tcp:HOST:PORT, unix:PATH or file:PATH)")
        };
        let (scheme, rest) = s.split_once(':').ok_or_else(bad)?;
        if rest.is_empty() {
            return Err(bad());
        }
        match scheme {
            "tcp" => {
                let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
                if host.is_empty() || port.parse::<u16>().is_err() {
                    return Err(bad());
                }
                Ok(Target::Tcp(rest.to_string()))
            }
            "unix" => Ok(Target::Unix(rest.into())),
            "file" => Ok(Target::File(rest.into())),
            _ => Err(bad()),
        }
    }

    pub fn is_file(&self) -> bool {
        matches!(self, Target::File(_))
    }

    /// A TCP target's addresses (none for the others). A host name is looked up here, by
    /// the C library's resolver, which reads /etc/hosts and the like: a thread that may
    /// open no file dials the addresses found before it was held to that.
    pub fn resolve(&self) -> io::Result<Vec<SocketAddr>> {
        match self {
            Target::Tcp(a) => Ok(a.to_socket_addrs()?.collect()),
            _ => Ok(Vec::new()),
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Tcp(a) => write!(f, "tcp:{a}"),
            Target::Unix(p) => write!(f, "unix:{}", p.display()),
            Target::File(p) => write!(f, "file:{}", p.display()),
        }
    }
}

/// Time a peer has for the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// One byte stream of a migration.
pub enum Stream {
    Tcp(TcpStream),
    Tls(crate::tls::TlsStream),
    Unix(UnixStream),
    /// A snapshot file, written or read once from start to end.
    File(crate::snapshot_file::SnapshotOut),
    FileIn(io::BufReader<File>),
}

impl Stream {
    /// Connects to a destination (a file is written beside the path, and replaces it
    /// when sealed).
    pub fn connect(t: &Target, timeout: Duration) -> io::Result<Stream> {
        Stream::dial(t, &t.resolve()?, timeout, None)
    }

    /// Connects to `t`, over TLS when `tls` is given (TCP only), at `addrs` if it is a
    /// TCP target (its [`Target::resolve`]; the host name still names the peer that TLS
    /// must find).
    pub fn dial(
        t: &Target,
        addrs: &[SocketAddr],
        timeout: Duration,
        tls: Option<&crate::tls::Creds>,
    ) -> io::Result<Stream> {
        match t {
            Target::Tcp(a) => {
                let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
                for addr in addrs {
                    match TcpStream::connect_timeout(addr, timeout) {
                        Ok(s) => {
                            s.set_nodelay(true)?;
                            let Some(creds) = tls else {
                                return Ok(Stream::Tcp(s));
                            };
                            s.set_read_timeout(Some(TLS_HANDSHAKE_TIMEOUT))?;
                            s.set_write_timeout(Some(TLS_HANDSHAKE_TIMEOUT))?;
                            let host = a.rsplit_once(':').map_or(a.as_str(), |(h, _)| h);
                            let t = creds.connect(host, s).map_err(|e| {
                                io::Error::new(e.kind(), format!("TLS handshake: {e}"))
                            })?;
                            t.sock.set_read_timeout(None)?;
                            t.sock.set_write_timeout(None)?;
                            return Ok(Stream::Tls(t));
                        }
                        Err(e) => last = e,
                    }
                }
                Err(last)
            }
            Target::Unix(p) => UnixStream::connect(p)
                .map(Stream::Unix)
                .map_err(|e| io::Error::new(e.kind(), godwit_vmm::files::socket_problem(p, &e))),
            Target::File(p) => crate::snapshot_file::SnapshotOut::create(p).map(Stream::File),
        }
    }

    /// How long a read may wait (None = forever); files never wait.
    pub fn set_read_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(d),
            Stream::Tls(s) => s.sock.set_read_timeout(d),
            Stream::Unix(s) => s.set_read_timeout(d),
            _ => Ok(()),
        }
    }

    /// Makes a blocked write give up after `d` (a stalled peer).
    pub fn set_write_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_write_timeout(d),
            Stream::Tls(s) => s.sock.set_write_timeout(d),
            Stream::Unix(s) => s.set_write_timeout(d),
            _ => Ok(()),
        }
    }

    /// A second handle on the same socket (None for files).
    pub fn try_clone(&self) -> Option<Stream> {
        match self {
            Stream::Tcp(s) => s.try_clone().ok().map(Stream::Tcp),
            Stream::Tls(s) => Some(Stream::Tls(s.clone())),
            Stream::Unix(s) => s.try_clone().ok().map(Stream::Unix),
            _ => None,
        }
    }

    /// Makes a read blocked on this socket (in any thread) return end-of-stream.
    pub fn shutdown_read(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Read),
            Stream::Tls(s) => s.sock.shutdown(std::net::Shutdown::Read),
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Read),
            _ => Ok(()),
        };
    }

    /// Whether a read would return at once (data, end of stream or an error): a look
    /// that never waits and leaves the socket blocking for everyone else. Files and
    /// streams without a socket say false.
    pub fn readable(&self) -> bool {
        self.readable_within(Duration::ZERO)
    }

    /// `readable`, waiting up to `d` for it: returns as soon as something arrives. The
    /// wait is as precise as the kernel's high-resolution timers, where a socket's read
    /// timeout is rounded up to a scheduler tick (4 ms here).
    pub fn readable_within(&self, d: Duration) -> bool {
        use std::os::fd::AsRawFd;
        let fd = match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Tls(s) if s.buffered() => return true,
            Stream::Tls(s) => s.sock.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
            _ => return false,
        };
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let t = libc::timespec {
            tv_sec: d.as_secs() as libc::time_t,
            tv_nsec: d.subsec_nanos() as libc::c_long,
        };
        // SAFETY: one pollfd for a descriptor this stream owns and a valid timeout; no
        // signal mask is changed.
        let r = unsafe { libc::ppoll(&mut p, 1, &t, std::ptr::null()) };
        r > 0 && p.revents != 0
    }

    /// Whether the peer has shut its side down (or the connection broke), whatever data
    /// of its is still queued here: a look that never waits and reads nothing, so the
    /// stream is left as it was for its reader. Files say false.
    pub fn peer_closed(&self) -> bool {
        use std::os::fd::AsRawFd;
        let fd = match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Tls(s) => s.sock.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
            _ => return false,
        };
        // POLLRDHUP is raised by the peer's FIN even with data ahead of it, where
        // POLLIN cannot tell the end from more data.
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one pollfd for a descriptor this stream owns; a timeout of 0 never
        // waits.
        let r = unsafe { libc::poll(&mut p, 1, 0) };
        r > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
    }

    /// The TCP socket under this stream, if there is one.
    fn tcp_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        match self {
            Stream::Tcp(s) => Some(s.as_raw_fd()),
            Stream::Tls(s) => Some(s.sock.as_raw_fd()),
            _ => None,
        }
    }

    /// Whether every byte written to this stream has reached the peer (its TCP stack
    /// acknowledged it), waiting up to `d` for that. A close queues behind what is not:
    /// a peer that does not read hears neither. Sockets whose close the peer sees at
    /// once (Unix) say true; files too.
    pub fn delivered_within(&self, d: Duration) -> bool {
        let Some(fd) = self.tcp_fd() else {
            return true;
        };
        let end = std::time::Instant::now() + d;
        loop {
            let mut n: libc::c_int = 0;
            // SAFETY: SIOCOUTQ on a socket this stream owns writes one int.
            if unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut n) } != 0 {
                return false;
            }
            if n == 0 {
                return true;
            }
            if std::time::Instant::now() >= end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Makes the socket's last close reset the connection (SO_LINGER with no time)
    /// instead of ending it in order: what is still queued is dropped, and the peer
    /// hears of the end at once instead of after bytes it is not reading. For a peer
    /// that cannot be told otherwise; Unix sockets (whose close the peer sees at once)
    /// and files are left as they are.
    pub fn reset_on_close(&self) {
        let Some(fd) = self.tcp_fd() else { return };
        let l = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: SO_LINGER on a socket this stream owns, from a linger of its size.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                &l as *const libc::linger as *const libc::c_void,
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            tracing::debug!("SO_LINGER for a reset: {}", std::io::Error::last_os_error());
        }
    }

    /// Bytes that reads return now without waiting: what the socket holds (FIONREAD).
    /// 0 for TLS, whose plaintext is not known before it is decrypted, and for files.
    pub fn queued(&self) -> usize {
        use std::os::fd::AsRawFd;
        let fd = match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
            _ => return 0,
        };
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD on a socket this stream owns writes one int.
        let rc = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) };
        if rc == 0 {
            n.max(0) as usize
        } else {
            0
        }
    }

    /// Shuts a socket down both ways: reads and writes blocked on it (in any thread)
    /// return at once.
    pub fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Stream::Tls(s) => s.sock.shutdown(std::net::Shutdown::Both),
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Both),
            _ => Ok(()),
        };
    }

    /// Ends the stream: data is flushed, and for a file made durable.
    pub fn finish(&mut self) -> io::Result<()> {
        match self {
            Stream::File(f) => f.finish(),
            Stream::Tcp(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
            Stream::FileIn(_) => Ok(()),
        }
    }

    /// A snapshot being read: how far it has been read, and its file.
    pub fn file_in(&mut self) -> Option<(u64, File)> {
        match self {
            Stream::FileIn(f) => {
                let at = io::Seek::stream_position(f).ok()?;
                Some((at, f.get_ref().try_clone().ok()?))
            }
            _ => None,
        }
    }

    /// Whether the transport checks what it carries (TCP's checksum, TLS's AEAD; a
    /// local socket is a copy in the kernel): page data on it goes without a CRC of its
    /// own (`wire::HEAD_ONLY`). Nothing checks a file at rest.
    pub fn checks_in_transit(&self) -> bool {
        matches!(self, Stream::Tcp(_) | Stream::Tls(_) | Stream::Unix(_))
    }

    /// Whether `write_pages` writes from memory with no copy of godwit's own.
    pub fn writes_in_place(&self) -> bool {
        matches!(self, Stream::Tcp(_) | Stream::Unix(_))
    }

    /// Writes `head` (a PAGES frame's header and head, `wire::pages_head`), then
    /// `pages` straight from the memory they are in: the kernel copies them into the
    /// socket, in as few system calls as it takes them. Only where `writes_in_place`.
    pub fn write_pages(&mut self, head: &[u8], pages: &[VolatileSlice<'_>]) -> io::Result<()> {
        let guards: Vec<_> = pages.iter().map(|p| p.ptr_guard()).collect();
        let runs = PageRuns::new(guards.iter().zip(pages).map(|(g, p)| (g.as_ptr(), p.len())));
        // SAFETY: the guards keep every page mapped until after the write.
        let r = unsafe { self.write_runs(head, &runs) };
        drop(guards);
        r
    }

    /// `write_pages` for pages whose borrow is held elsewhere (a writer thread's).
    ///
    /// # Safety
    /// Every run of `runs` must stay mapped, readable memory until this returns.
    pub(crate) unsafe fn write_runs(&mut self, head: &[u8], runs: &PageRuns) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let fd = match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "pages are written in place only to a socket",
                ))
            }
        };
        let mut iov: Vec<libc::iovec> = Vec::with_capacity(1 + runs.0.len());
        iov.push(libc::iovec {
            iov_base: head.as_ptr() as *mut libc::c_void,
            iov_len: head.len(),
        });
        iov.extend(runs.0.iter().map(|&(base, len)| libc::iovec {
            iov_base: base as *mut libc::c_void,
            iov_len: len,
        }));
        let mut at = 0;
        while at < iov.len() {
            let count = (iov.len() - at).min(1024) as libc::c_int;
            // SAFETY: every entry points into memory that stays mapped for this call:
            // `head`, and the runs, as the caller promises. The kernel only reads it;
            // no Rust reference to the pages exists, so a guest that writes one
            // meanwhile races with nothing here (the page is then dirty, and goes
            // again).
            let n = unsafe { libc::writev(fd, iov[at..].as_ptr(), count) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            advance(&mut iov, &mut at, n as usize);
        }
        Ok(())
    }

    /// The stream is whole: a snapshot file replaces its path (sockets: nothing to do).
    pub fn seal(&mut self) -> io::Result<()> {
        match self {
            Stream::File(f) => f.seal(),
            _ => Ok(()),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(b),
            Stream::Tls(s) => s.read(b),
            Stream::Unix(s) => s.read(b),
            Stream::FileIn(f) => f.read(b),
            Stream::File(_) => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "a snapshot being written is not read",
            )),
        }
    }
}

/// Page data read straight into guest memory: from a socket with no copy between, from
/// anything else (TLS decrypts into a buffer of its own) through a small one.
impl vm_memory::ReadVolatile for Stream {
    fn read_volatile<B: vm_memory::bitmap::BitmapSlice>(
        &mut self,
        buf: &mut vm_memory::VolatileSlice<B>,
    ) -> Result<usize, vm_memory::VolatileMemoryError> {
        match self {
            Stream::Tcp(s) => s.read_volatile(buf),
            Stream::Unix(s) => s.read_volatile(buf),
            _ => {
                let mut tmp = [0u8; 4096];
                let n = buf.len().min(tmp.len());
                let got = self
                    .read(&mut tmp[..n])
                    .map_err(vm_memory::VolatileMemoryError::IOError)?;
                buf.copy_from(&tmp[..got]);
                Ok(got)
            }
        }
    }
}

impl Write for Stream {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(b),
            Stream::Tls(s) => s.write(b),
            Stream::Unix(s) => s.write(b),
            Stream::File(f) => f.write(b),
            Stream::FileIn(_) => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "a snapshot being read is not written",
            )),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
            Stream::File(f) => f.flush(),
            Stream::FileIn(_) => Ok(()),
        }
    }
}

/// Moves `iov[*at..]` past `n` bytes written from it: a write may stop anywhere, inside
/// an entry too.
/// Where pages lie in memory, as (address, length) runs: pages next to each other in
/// memory as in the frame make one run. Addresses without the borrow that keeps them
/// mapped, so that another thread may write them (`Stream::write_runs` says who keeps
/// them mapped).
#[derive(Debug, Default)]
pub(crate) struct PageRuns(Vec<(usize, usize)>);

impl PageRuns {
    pub(crate) fn new(pages: impl IntoIterator<Item = (*const u8, usize)>) -> PageRuns {
        let mut runs: Vec<(usize, usize)> = Vec::new();
        for (p, len) in pages {
            let base = p as usize;
            match runs.last_mut() {
                Some(l) if l.0 + l.1 == base => l.1 += len,
                _ => runs.push((base, len)),
            }
        }
        PageRuns(runs)
    }

    /// The CRC32 of each page of the runs (`PAGE_SIZE` each, in order), read where it
    /// is: a page the guest writes meanwhile gets a CRC of some mix of old and new, and
    /// arrives failing it or not, as `crate::inplace::crc_in_place` says.
    ///
    /// # Safety
    /// Every run must stay mapped, readable memory until this returns.
    pub(crate) unsafe fn page_crcs(&self) -> Vec<u32> {
        let mut crcs = Vec::new();
        for &(base, len) in &self.0 {
            // SAFETY: mapped and readable (the caller's word); only hashed, so a byte
            // that changes under the read changes nothing but the result.
            let bytes = unsafe { std::slice::from_raw_parts(base as *const u8, len) };
            crcs.extend(bytes.chunks(crate::wire::PAGE_SIZE).map(crc32fast::hash));
        }
        crcs
    }
}

fn advance(iov: &mut [libc::iovec], at: &mut usize, mut n: usize) {
    while n > 0 && *at < iov.len() {
        let e = &mut iov[*at];
        if n >= e.iov_len {
            n -= e.iov_len;
            *at += 1;
        } else {
            e.iov_base = (e.iov_base as usize + n) as *mut libc::c_void;
            e.iov_len -= n;
            n = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// However writes split it, what is left of a vectored write is the rest of its
    /// bytes, in order.
    #[test]
    fn a_vectored_write_goes_on_where_the_last_one_stopped() {
        let lens = [5usize, 4096, 3, 8192, 1];
        let total: usize = lens.iter().sum();
        let base = 0x10000usize;
        // Entry k starts at base + 0x10000 * k: what is left says where it is.
        let fresh = || -> Vec<libc::iovec> {
            lens.iter()
                .enumerate()
                .map(|(k, &l)| libc::iovec {
                    iov_base: (base * (k + 1)) as *mut libc::c_void,
                    iov_len: l,
                })
                .collect()
        };
        for step in [1, 2, 3, 4095, 4096, 4097, 5000, total] {
            let (mut iov, mut at, mut done) = (fresh(), 0, 0);
            while done < total {
                let n = step.min(total - done);
                advance(&mut iov, &mut at, n);
                done += n;
                // Where byte `done` lies: entry k, offset o.
                let (mut k, mut o) = (0, done);
                while k < lens.len() && o >= lens[k] {
                    o -= lens[k];
                    k += 1;
                }
                assert_eq!(at, k, "step {step}, done {done}");
                if k < lens.len() {
                    assert_eq!(iov[k].iov_base as usize, base * (k + 1) + o);
                    assert_eq!(iov[k].iov_len, lens[k] - o);
                }
            }
        }
    }

    /// A peer that shut its side down is seen at once, though its last bytes are still
    /// queued, and the look leaves them for the reader.
    #[test]
    fn a_closed_peer_is_seen_ahead_of_its_last_bytes() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut a, mut b) = (Stream::Unix(a), Stream::Unix(b));
        assert!(!b.peer_closed());
        a.write_all(b"last words").unwrap();
        assert!(!b.peer_closed(), "data alone is not a close");
        a.shutdown();
        assert!(b.peer_closed());
        let mut got = Vec::new();
        b.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"last words");
        let t = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(t.local_addr().unwrap()).unwrap();
        let (d, _) = t.accept().unwrap();
        let d = Stream::Tcp(d);
        assert!(!d.peer_closed());
        drop(c);
        assert!(wait_until(|| d.peer_closed()), "a TCP close is not seen");
    }

    /// Bytes a peer has taken count as delivered; bytes queued behind a full connection
    /// do not, and neither would a close behind them. A reset gets through at once.
    #[test]
    fn a_peer_that_reads_nothing_hears_a_reset_but_not_a_close() {
        let t = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = Stream::Tcp(TcpStream::connect(t.local_addr().unwrap()).unwrap());
        let (d, _) = t.accept().unwrap();
        let mut d = Stream::Tcp(d);
        let Stream::Tcp(mut w) = c.try_clone().unwrap() else {
            unreachable!()
        };
        w.write_all(b"hello").unwrap();
        assert!(c.delivered_within(Duration::from_secs(10)));
        // Fill both ends' buffers: the peer reads nothing.
        w.set_nonblocking(true).unwrap();
        let chunk = vec![7u8; 64 << 10];
        let mut stuck = 0;
        while stuck < 20 {
            match w.write(&chunk) {
                Ok(_) => stuck = 0,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    stuck += 1;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert!(!c.delivered_within(Duration::from_millis(50)));
        assert!(!d.peer_closed());
        c.reset_on_close();
        drop((c, w));
        assert!(wait_until(|| d.peer_closed()), "the reset is not seen");
        let mut sink = vec![0u8; 1 << 20];
        let e = loop {
            match d.read(&mut sink) {
                Ok(0) => panic!("an orderly end where a reset was sent"),
                Ok(_) => {}
                Err(e) => break e,
            }
        };
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}");
    }

    fn wait_until(f: impl Fn() -> bool) -> bool {
        let end = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < end {
            if f() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }

    /// Pages written straight from memory arrive as the frame the reader expects,
    /// whether they lie apart or next to each other, out of order, and however the
    /// socket splits the write (a frame is larger than a socket's buffer).
    #[test]
    fn pages_written_in_place_arrive_as_one_frame() {
        // No byte where another was (a write resumed from the wrong place shows).
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut mem: Vec<u8> = (0..64 * wire::PAGE_SIZE)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let expect = mem.clone();
        let (a, b) = UnixStream::pair().unwrap();
        assert!(Stream::Unix(a.try_clone().unwrap()).writes_in_place());
        assert!(Stream::Unix(a.try_clone().unwrap()).checks_in_transit());
        let sets: [Vec<u64>; 3] = [
            vec![5, 6, 7, 2, 40, 41, 63],
            (0..64).collect(),
            (0..64).rev().collect(),
        ];
        let mut w = Stream::Unix(a);
        // A slow reader: the writer finds the socket full.
        struct Slow(UnixStream);
        impl Read for Slow {
            fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
                std::thread::sleep(Duration::from_micros(100));
                let n = b.len().min(8192);
                self.0.read(&mut b[..n])
            }
        }
        let reader = {
            let sets = sets.clone();
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let mut b = Slow(b);
                for set in sets {
                    match wire::read_frame(&mut b, &mut buf).unwrap() {
                        wire::Frame::Pages {
                            section,
                            addrs,
                            data,
                        } => {
                            assert_eq!(section, 3);
                            assert_eq!(addrs, set.iter().map(|p| p << 12).collect::<Vec<_>>());
                            for (k, p) in set.iter().enumerate() {
                                let at = *p as usize * wire::PAGE_SIZE;
                                let got = &data[k * wire::PAGE_SIZE..(k + 1) * wire::PAGE_SIZE];
                                assert!(got == &expect[at..at + wire::PAGE_SIZE], "page {p}");
                            }
                        }
                        other => panic!("{other:?}"),
                    }
                }
            })
        };
        let whole = VolatileSlice::from(&mut mem[..]);
        for set in &sets {
            let addrs: Vec<u64> = set.iter().map(|p| p << 12).collect();
            let pages: Vec<_> = set
                .iter()
                .map(|p| {
                    whole
                        .subslice(*p as usize * wire::PAGE_SIZE, wire::PAGE_SIZE)
                        .unwrap()
                })
                .collect();
            w.write_pages(&wire::pages_head(3, &addrs, None), &pages)
                .unwrap();
        }
        reader.join().unwrap();
        // A file copies: it is not written in place, and its pages are checked whole.
        let path = std::env::temp_dir().join(format!("godwit-inplace-{}", std::process::id()));
        let mut f = Stream::connect(&Target::File(path.clone()), Duration::from_secs(1)).unwrap();
        assert!(!f.writes_in_place() && !f.checks_in_transit());
        assert!(f.write_pages(&[], &[]).is_err());
        drop(f);
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn targets_parse() {
        assert_eq!(
            Target::parse("tcp:127.0.0.1:4444").unwrap(),
            Target::Tcp("127.0.0.1:4444".into())
        );
        assert_eq!(
            Target::parse("unix:/tmp/x").unwrap(),
            Target::Unix("/tmp/x".into())
        );
        assert_eq!(
            Target::parse("file:/tmp/snap").unwrap(),
            Target::File("/tmp/snap".into())
        );
        for bad in [
            "",
            "tcp:",
            "tcp:host",
            "tcp:host:99999",
            "udp:x:1",
            "file:",
            "x",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }

    /// The post-copy source waits for a request this way between background frames: it
    /// must end when the request arrives, not when the wait does.
    #[test]
    fn a_wait_for_data_ends_when_it_arrives() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let a = Stream::Unix(a);
        assert!(!a.readable_within(Duration::from_millis(5)));
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            b.write_all(b"x").unwrap();
            b
        });
        let t = std::time::Instant::now();
        assert!(a.readable_within(Duration::from_secs(60)));
        assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
        let _b = writer.join().unwrap();
        assert!(a.readable());
    }
}
