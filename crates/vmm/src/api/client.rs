//! The API's client side, used by the CLI's commands.

use super::PREFIX;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// A client call: returns (status, body). Errors say what to check.
pub fn call(
    socket: &Path,
    method: &str,
    endpoint: &str,
) -> std::result::Result<(u16, String), String> {
    call_with(socket, method, endpoint, "", Some(Duration::from_secs(30)))
}

/// A client call with a JSON body, waiting up to `timeout` for the answer (None = as long
/// as it takes, for a migration).
pub fn call_with(
    socket: &Path,
    method: &str,
    endpoint: &str,
    body: &str,
    timeout: Option<Duration>,
) -> std::result::Result<(u16, String), String> {
    let mut s = UnixStream::connect(socket).map_err(|e| connect_error(socket, &e))?;
    s.set_read_timeout(timeout).map_err(|e| e.to_string())?;
    let req = format!(
        "{method} {PREFIX}{endpoint} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    // A server that answers before reading (503: too many connections) may close
    // before the request is written, or reset after its answer: the answer, if one
    // came, is what counts.
    let sent = s.write_all(req.as_bytes());
    let mut raw = Vec::new();
    let got = s.read_to_end(&mut raw);
    match (got, sent) {
        (Err(e), _) if raw.is_empty() && is_timeout(&e) => {
            return Err(format!(
                "no answer from godwit on {} within {} s",
                socket.display(),
                timeout.unwrap_or_default().as_secs()
            ))
        }
        (Err(e), _) if raw.is_empty() => {
            return Err(format!("API response from {}: {e}", socket.display()))
        }
        (Ok(_), Err(e)) if raw.is_empty() => {
            return Err(format!("API request to {}: {e}", socket.display()))
        }
        _ => {}
    }
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(&raw) {
        Ok(httparse::Status::Complete(n)) => Ok((
            resp.code.unwrap_or(0),
            String::from_utf8_lossy(&raw[n..]).into_owned(),
        )),
        _ if raw.is_empty() => Err(format!(
            "godwit on {} closed the connection without answering (did its VM process exit?)",
            socket.display()
        )),
        _ => Err(format!(
            "malformed API response from {} ({} bytes)",
            socket.display(),
            raw.len()
        )),
    }
}

/// Says what is at `socket` when nothing answers there.
fn connect_error(socket: &Path, e: &std::io::Error) -> String {
    let p = socket.display();
    let why = crate::files::socket_problem(socket, e);
    let hint = if std::fs::metadata(socket).is_err() {
        format!(" (is godwit running with --api-socket {p}?)")
    } else {
        String::new()
    };
    format!("cannot connect to the API socket {p}: {why}{hint}")
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}
