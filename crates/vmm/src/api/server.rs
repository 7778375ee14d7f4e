//! The API's HTTP/1.1 server on a Unix socket: one short-lived connection per request
//! (`Connection: close`), each on its own thread, with every resource a client could hold
//! bounded. A client that connects and trickles or stalls holds one connection slot until
//! its request deadline, never another client's request and never the process's exit; a
//! client that sends a huge header or body is answered 431/413 after reading at most the
//! limit; connections beyond the limit are answered 503 at once.
//!
//! httparse does the parsing; what lives here is the part no small crate offered with
//! these bounds (tiny_http, used before, read unbounded header lines, read bodies on its
//! accept thread and spawned a thread per connection without limit).

use super::{route, Extension};
use crate::error::{Error, Result};
use crate::vm::VmHandle;
use serde_json::json;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What one client may take. Documented in the README's API section.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections served at once; more are answered 503.
    pub connections: usize,
    /// Time a client has to send its whole request, from accept.
    pub request_deadline: Duration,
    /// Request line plus headers.
    pub max_head: usize,
    /// Request body.
    pub max_body: usize,
    /// Time an answer may take to be taken by the client.
    pub write_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connections: 32,
            request_deadline: Duration::from_secs(5),
            max_head: 16 << 10,
            max_body: 64 << 10,
            write_timeout: Duration::from_secs(5),
        }
    }
}

/// The VM a server answers for, once there is one.
type Target = (VmHandle, Option<Arc<dyn Extension>>);

struct Shared {
    limits: Limits,
    stop: AtomicBool,
    target: RwLock<Option<Target>>,
    /// Connections: their threads, and a second handle to the socket of those still
    /// reading their request (shut down at stop so that a stalled client cannot hold
    /// the exit).
    conns: Mutex<HashMap<u64, Conn>>,
    next_id: AtomicU64,
    /// Why the VM is not served yet, for requests that come before it is.
    waiting: Mutex<String>,
    /// Where a destination waits for its source (the address it bound, e.g. a port the
    /// kernel chose), for a manager that must tell the source.
    incoming: Mutex<Option<String>>,
}

struct Conn {
    thread: Option<JoinHandle<()>>,
    reading: Option<UnixStream>,
}

/// The API server. Dropping it stops accepting, cuts off clients still sending their
/// request, waits for requests in flight (so a last answer, such as a migration report,
/// still goes out) and removes the socket.
pub struct ApiServer {
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
    path: PathBuf,
}

impl ApiServer {
    /// Claims the socket path and listens on it; nothing is served until `start`.
    pub fn bind(path: &Path) -> Result<UnixListener> {
        crate::files::claim_socket_path(path).map_err(|e| Error::ApiSocket {
            path: path.into(),
            msg: e.to_string(),
        })?;
        UnixListener::bind(path).map_err(|e| Error::ApiSocket {
            path: path.into(),
            msg: e.to_string(),
        })
    }

    /// Serves `listener`. Until `serve` names the VM, `vmm.ping` answers and every VM
    /// endpoint answers 503 with `waiting` as the reason.
    pub fn start(
        listener: UnixListener,
        path: &Path,
        limits: Limits,
        waiting: &str,
    ) -> Result<ApiServer> {
        Self::start_with(listener, path, limits, waiting, None)
    }

    /// Serves `listener` for a VM that exists already: no request is ever answered
    /// that it is missing.
    pub fn start_serving(
        listener: UnixListener,
        path: &Path,
        limits: Limits,
        h: VmHandle,
        ext: Option<Arc<dyn Extension>>,
    ) -> Result<ApiServer> {
        Self::start_with(listener, path, limits, "", Some((h, ext)))
    }

    fn start_with(
        listener: UnixListener,
        path: &Path,
        limits: Limits,
        waiting: &str,
        target: Option<(VmHandle, Option<Arc<dyn Extension>>)>,
    ) -> Result<ApiServer> {
        let shared = Arc::new(Shared {
            limits,
            stop: AtomicBool::new(false),
            target: RwLock::new(target),
            conns: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            waiting: Mutex::new(waiting.into()),
            incoming: Mutex::new(None),
        });
        let s = shared.clone();
        let acceptor = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || accept_loop(&s, listener))
            .map_err(Error::Thread)?;
        Ok(ApiServer {
            shared,
            acceptor: Some(acceptor),
            path: path.into(),
        })
    }

    /// From now on requests are answered for this VM.
    pub fn serve(&self, h: VmHandle, ext: Option<Arc<dyn Extension>>) {
        *self
            .shared
            .target
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Some((h, ext));
    }

    /// Changes what requests hear while no VM is served.
    pub fn set_waiting(&self, why: &str) {
        *self
            .shared
            .waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = why.into();
    }

    /// Says where this destination waits for its source (answered by `vmm.ping` and
    /// with the 503 of every other endpoint until the VM arrives).
    pub fn set_incoming(&self, addr: &str) {
        *self
            .shared
            .incoming
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(addr.into());
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wakes the acceptor, which sees `stop` and returns.
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
        let threads: Vec<JoinHandle<()>> = {
            let mut conns = self.shared.conns.lock().unwrap_or_else(|e| e.into_inner());
            conns
                .values_mut()
                .filter_map(|c| {
                    if let Some(s) = c.reading.take() {
                        let _ = s.shutdown(std::net::Shutdown::Both);
                    }
                    c.thread.take()
                })
                .collect()
        };
        for t in threads {
            let _ = t.join();
        }
    }
}

fn accept_loop(s: &Arc<Shared>, listener: UnixListener) {
    for conn in listener.incoming() {
        if s.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = conn else { continue };
        let mut conns = s.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns.retain(|_, c| c.thread.as_ref().is_some_and(|t| !t.is_finished()));
        if conns.len() >= s.limits.connections {
            drop(conns);
            // The answer is small enough for the socket buffer: this does not wait on the
            // client.
            let _ = stream.set_nonblocking(true);
            answer(
                stream,
                503,
                &json!({"error": "too many API connections at once; try again"}),
                None,
            );
            continue;
        }
        let id = s.next_id.fetch_add(1, Ordering::Relaxed);
        let reading = stream.try_clone().ok();
        let sh = s.clone();
        let t = std::thread::Builder::new()
            .name("api-request".into())
            .spawn(move || connection(&sh, id, stream));
        match t {
            Ok(t) => {
                conns.insert(
                    id,
                    Conn {
                        thread: Some(t),
                        reading,
                    },
                );
            }
            Err(e) => tracing::error!("API: cannot start a request thread: {e}"),
        }
    }
}

fn connection(s: &Shared, id: u64, mut stream: UnixStream) {
    let req = read_request(&mut stream, &s.limits);
    // Done reading: a stop no longer needs to cut this client off.
    if let Some(c) = s
        .conns
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get_mut(&id)
    {
        c.reading = None;
    }
    let _ = stream.set_write_timeout(Some(s.limits.write_timeout));
    let mut path = String::new();
    let (code, body) = match req {
        Ok(r) => {
            path.clone_from(&r.path);
            let target = s.target.read().unwrap_or_else(|e| e.into_inner()).clone();
            match target {
                Some((h, ext)) => route(&h, ext.as_deref(), &r.method, &r.path, &r.body),
                None => {
                    let incoming = s.incoming.lock().unwrap_or_else(|e| e.into_inner()).clone();
                    if r.path == format!("{}vmm.ping", super::PREFIX) {
                        let mut v = json!({"version": env!("CARGO_PKG_VERSION"),
                                           "pid": std::process::id(), "vm": "none yet"});
                        if let Some(a) = incoming {
                            v["incoming"] = a.into();
                        }
                        (200, v)
                    } else {
                        let why = s.waiting.lock().unwrap_or_else(|e| e.into_inner()).clone();
                        let mut v = json!({ "error": why });
                        if let Some(a) = incoming {
                            v["incoming"] = a.into();
                        }
                        (503, v)
                    }
                }
            }
        }
        Err(RequestError::Gone) => return,
        Err(RequestError::Answer(code, msg)) => (code, json!({ "error": msg })),
    };
    let allow = (code == 405).then(|| super::allowed(&path));
    answer(stream, code, &body, allow);
}

struct Request {
    method: String,
    path: String,
    body: Vec<u8>,
}

enum RequestError {
    /// The client left or never finished: nobody to answer.
    Gone,
    Answer(u16, String),
}

/// Where a request is read from: a client's socket, or (for fuzzing and tests) bytes.
trait Source: Read {
    fn set_timeout(&mut self, d: Duration) -> std::io::Result<()>;
}

impl Source for UnixStream {
    fn set_timeout(&mut self, d: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(d))
    }
}

impl Source for &[u8] {
    fn set_timeout(&mut self, _: Duration) -> std::io::Result<()> {
        Ok(())
    }
}

/// A request read: method, path, body.
pub type Parsed = (String, String, Vec<u8>);
/// A request refused: the status and message answered, or None (nothing to answer).
pub type Refused = Option<(u16, String)>;

/// Reads one request from `data` as the server reads one from a client: (method, path,
/// body), or the status and message it would answer. For the HTTP fuzz target.
pub fn parse_request(mut data: &[u8], l: &Limits) -> std::result::Result<Parsed, Refused> {
    match read_request(&mut data, l) {
        Ok(r) => Ok((r.method, r.path, r.body)),
        Err(RequestError::Gone) => Err(None),
        Err(RequestError::Answer(code, m)) => Err(Some((code, m))),
    }
}

/// Reads one request within the limits: the head up to `max_head` bytes, then the body
/// its Content-Length announces, all before `request_deadline`.
fn read_request<S: Source>(
    stream: &mut S,
    l: &Limits,
) -> std::result::Result<Request, RequestError> {
    let deadline = Instant::now() + l.request_deadline;
    let late = || {
        RequestError::Answer(
            408,
            format!(
                "request not received within {} s",
                l.request_deadline.as_secs_f64()
            ),
        )
    };
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let (head_len, method, path, body_len) = loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(n)) => {
                let method = req.method.unwrap_or_default().to_string();
                let path = req.path.unwrap_or_default().to_string();
                let body_len = body_length(req.headers, l)?;
                break (n, method, path, body_len);
            }
            Ok(httparse::Status::Partial) if buf.len() >= l.max_head => {
                return Err(RequestError::Answer(
                    431,
                    format!("request head larger than {} bytes", l.max_head),
                ))
            }
            Ok(httparse::Status::Partial) => {}
            Err(httparse::Error::TooManyHeaders) => {
                return Err(RequestError::Answer(431, "more than 32 headers".into()))
            }
            Err(e) => {
                return Err(RequestError::Answer(
                    400,
                    format!("malformed HTTP request: {e}"),
                ))
            }
        }
        let room = (l.max_head - buf.len().min(l.max_head)).clamp(1, chunk.len());
        match read_until(stream, &mut chunk[..room], deadline) {
            Ok(0) if buf.is_empty() => return Err(RequestError::Gone),
            Ok(0) => {
                return Err(RequestError::Answer(
                    400,
                    "request ended inside its head".into(),
                ))
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if is_timeout(&e) => return Err(late()),
            Err(_) => return Err(RequestError::Gone),
        }
    };
    let mut body = buf.split_off(head_len);
    if body.len() > body_len {
        return Err(RequestError::Answer(
            400,
            "more bytes than Content-Length (one request per connection)".into(),
        ));
    }
    while body.len() < body_len {
        let want = (body_len - body.len()).min(chunk.len());
        match read_until(stream, &mut chunk[..want], deadline) {
            Ok(0) => return Err(RequestError::Gone),
            Ok(n) => body.extend_from_slice(&chunk[..n]),
            Err(e) if is_timeout(&e) => return Err(late()),
            Err(_) => return Err(RequestError::Gone),
        }
    }
    Ok(Request { method, path, body })
}

fn body_length(
    headers: &[httparse::Header],
    l: &Limits,
) -> std::result::Result<usize, RequestError> {
    let bad = |code, m: String| Err(RequestError::Answer(code, m));
    let mut len = 0usize;
    for h in headers {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return bad(
                411,
                "chunked bodies are not accepted: send Content-Length".into(),
            );
        }
        if h.name.eq_ignore_ascii_case("content-length") {
            let v = std::str::from_utf8(h.value).ok().map(str::trim);
            match v.and_then(|v| v.parse::<u64>().ok()) {
                Some(n) if n > l.max_body as u64 => {
                    return bad(
                        413,
                        format!("request body of {n} bytes; the limit is {}", l.max_body),
                    )
                }
                Some(n) => len = n as usize,
                None => return bad(400, "Content-Length is not a number".into()),
            }
        }
    }
    Ok(len)
}

/// One read that gives up at `deadline`.
fn read_until<S: Source>(s: &mut S, buf: &mut [u8], deadline: Instant) -> std::io::Result<usize> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(std::io::ErrorKind::TimedOut.into());
    }
    s.set_timeout(left)?;
    s.read(buf)
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

fn reason(code: u16) -> &'static str {
    match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// Writes the whole answer with Content-Length (never chunked: clients read to the end)
/// and closes.
fn answer(mut stream: UnixStream, code: u16, body: &serde_json::Value, allow: Option<&str>) {
    let body = body.to_string();
    let allow = allow.map_or(String::new(), |m| format!("Allow: {m}\r\n"));
    let msg = format!(
        "HTTP/1.1 {code} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n{body}",
        reason(code),
        body.len()
    );
    let _ = stream.write_all(msg.as_bytes());
    let _ = stream.shutdown(std::net::Shutdown::Write);
    // Closing with unread request bytes would reset the connection, and the client could
    // lose the answer; take what has arrived (bounded, without waiting).
    let _ = stream.set_nonblocking(true);
    let mut sink = [0u8; 4096];
    for _ in 0..16 {
        if !matches!(stream.read(&mut sink), Ok(n) if n > 0) {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_read_within_their_limits() {
        let l = Limits::default();
        let (m, p, b) = parse_request(
            b"PUT /api/v1/vm.resume HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
            &l,
        )
        .unwrap();
        assert_eq!(
            (m.as_str(), p.as_str(), &b[..]),
            ("PUT", "/api/v1/vm.resume", &b"{}"[..])
        );
        let code = |d: &[u8]| parse_request(d, &l).err().flatten().map(|(c, _)| c);
        let mut huge = b"GET / HTTP/1.1\r\nX: ".to_vec();
        huge.resize(l.max_head + 10, b'a');
        assert_eq!(code(&huge), Some(431));
        assert_eq!(
            code(b"GET / HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n"),
            Some(413)
        );
        assert_eq!(
            code(b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n"),
            Some(400)
        );
        assert_eq!(
            code(b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Some(411)
        );
        assert_eq!(code(b"\x00\x01 nonsense\r\n\r\n"), Some(400));
        assert_eq!(
            code(b"GET / HTTP/1.1\r\nContent-Length: 1\r\n\r\nab"),
            Some(400)
        );
        assert_eq!(parse_request(b"", &l).err(), Some(None));
    }
}
