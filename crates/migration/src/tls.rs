//! Migration over TCP is authenticated and encrypted: TLS 1.3 (rustls) with mutual
//! certificates. The credentials are a directory laid out as QEMU's `tls-creds-x509`
//! expects: `ca-cert.pem`, and `server-cert.pem`/`server-key.pem` for the destination,
//! `client-cert.pem`/`client-key.pem` for the source. The destination takes only a
//! source whose certificate the CA signed; the source checks that the destination's
//! certificate names the host it dials. (A pre-shared key, QEMU's other option, is not
//! offered: rustls has no external-PSK support.) `generate` writes such a directory.
//!
//! A TLS connection is one state machine, but the migration reads and writes a
//! connection from different threads (the back channel, the destination's answers), as
//! it does with a plain socket's clones. `TlsStream` shares the rustls connection
//! behind a lock that is never held across socket I/O: a reader blocked on the socket
//! does not stop a writer.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The two ends' configurations from one credentials directory.
#[derive(Clone)]
pub struct Creds {
    pub dir: PathBuf,
    client: Option<Arc<rustls::ClientConfig>>,
    server: Option<Arc<rustls::ServerConfig>>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn bad(path: &Path, e: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{}: {e}", path.display()),
    )
}

fn certs(path: &Path) -> io::Result<Vec<CertificateDer<'static>>> {
    let v: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(path, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| bad(path, e))?;
    if v.is_empty() {
        return Err(bad(path, "no certificate in it"));
    }
    Ok(v)
}

fn key(path: &Path) -> io::Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| bad(path, e))
}

fn roots(dir: &Path) -> io::Result<Arc<rustls::RootCertStore>> {
    let mut roots = rustls::RootCertStore::empty();
    let ca = dir.join("ca-cert.pem");
    for c in certs(&ca)? {
        roots.add(c).map_err(|e| bad(&ca, e))?;
    }
    Ok(Arc::new(roots))
}

impl Creds {
    /// The source's side (client): needs ca-cert.pem, client-cert.pem, client-key.pem.
    pub fn client(dir: &Path) -> io::Result<Creds> {
        let cfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(io::Error::other)?
            .with_root_certificates(roots(dir)?)
            .with_client_auth_cert(
                certs(&dir.join("client-cert.pem"))?,
                key(&dir.join("client-key.pem"))?,
            )
            .map_err(|e| bad(&dir.join("client-key.pem"), e))?;
        Ok(Creds {
            dir: dir.into(),
            client: Some(Arc::new(cfg)),
            server: None,
        })
    }

    /// The destination's side (server): needs ca-cert.pem, server-cert.pem,
    /// server-key.pem; a client certificate signed by the CA is required.
    pub fn server(dir: &Path) -> io::Result<Creds> {
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots(dir)?, provider())
                .build()
                .map_err(io::Error::other)?;
        let cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(io::Error::other)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                certs(&dir.join("server-cert.pem"))?,
                key(&dir.join("server-key.pem"))?,
            )
            .map_err(|e| bad(&dir.join("server-key.pem"), e))?;
        Ok(Creds {
            dir: dir.into(),
            client: None,
            server: Some(Arc::new(cfg)),
        })
    }

    /// Dials: the TLS handshake over `sock` (already connected to `host`), within the
    /// socket's timeouts.
    pub fn connect(&self, host: &str, sock: TcpStream) -> io::Result<TlsStream> {
        let cfg = self
            .client
            .clone()
            .ok_or_else(|| io::Error::other("server credentials used to dial"))?;
        let name = ServerName::try_from(host.trim_matches(['[', ']']).to_string())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{host}: {e}")))?;
        let conn = rustls::ClientConnection::new(cfg, name).map_err(io::Error::other)?;
        TlsStream::handshake(rustls::Connection::Client(conn), sock)
    }

    /// Accepts: the TLS handshake over an accepted socket, within its timeouts.
    pub fn accept(&self, sock: TcpStream) -> io::Result<TlsStream> {
        let cfg = self
            .server
            .clone()
            .ok_or_else(|| io::Error::other("client credentials used to accept"))?;
        let conn = rustls::ServerConnection::new(cfg).map_err(io::Error::other)?;
        TlsStream::handshake(rustls::Connection::Server(conn), sock)
    }
}

struct State {
    conn: rustls::Connection,
    /// Bytes read off the socket that rustls has not taken yet.
    pending: Vec<u8>,
}

/// One TLS connection, shared by its clones (like a socket's).
#[derive(Clone)]
pub struct TlsStream {
    state: Arc<Mutex<State>>,
    /// One reader and one writer at a time; the writer lock also keeps the records in
    /// the order rustls made them. Order: `wr` before `state`.
    rd: Arc<Mutex<()>>,
    wr: Arc<Mutex<()>>,
    pub sock: Arc<TcpStream>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl TlsStream {
    fn handshake(mut conn: rustls::Connection, mut sock: TcpStream) -> io::Result<TlsStream> {
        while conn.is_handshaking() {
            conn.complete_io(&mut sock)?;
        }
        // The last flight (a client's Finished, a server's tickets) goes out now.
        while conn.wants_write() {
            conn.write_tls(&mut sock)?;
        }
        Ok(TlsStream {
            state: Arc::new(Mutex::new(State {
                conn,
                pending: Vec::new(),
            })),
            rd: Arc::new(Mutex::new(())),
            wr: Arc::new(Mutex::new(())),
            sock: Arc::new(sock),
        })
    }

    /// Whether decrypted or undecrypted bytes wait here, beyond what the socket holds.
    pub fn buffered(&self) -> bool {
        let s = lock(&self.state);
        !s.pending.is_empty() || !s.conn.wants_read()
    }

    /// Sends whatever TLS records rustls has queued.
    fn flush_records(&self) -> io::Result<()> {
        let _w = lock(&self.wr);
        let mut out = Vec::new();
        {
            let mut s = lock(&self.state);
            while s.conn.wants_write() {
                s.conn.write_tls(&mut out)?;
            }
        }
        (&*self.sock).write_all(&out)
    }
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let _r = lock(&self.rd);
        let mut chunk = vec![0u8; 32 << 10];
        loop {
            let (got, reply) = {
                let mut s = lock(&self.state);
                // Feed what has arrived while rustls wants it (it stops taking when
                // its plaintext buffer is full).
                while !s.pending.is_empty() && s.conn.wants_read() {
                    let State { conn, pending } = &mut *s;
                    let mut p = &pending[..];
                    let n = conn.read_tls(&mut p)?;
                    pending.drain(..n);
                    conn.process_new_packets()
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                    if n == 0 {
                        break;
                    }
                }
                let got = match s.conn.reader().read(buf) {
                    Ok(n) => Some(Ok(n)),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
                    Err(e) => Some(Err(e)),
                };
                (got, s.conn.wants_write())
            };
            if reply {
                self.flush_records()?;
            }
            if let Some(r) = got {
                return r;
            }
            let n = (&*self.sock).read(&mut chunk)?;
            if n == 0 {
                // Closed without close_notify: end of stream all the same (the frames
                // above are checked whole).
                return Ok(0);
            }
            lock(&self.state).pending.extend_from_slice(&chunk[..n]);
        }
    }
}

impl Write for TlsStream {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        let _w = lock(&self.wr);
        let mut out = Vec::new();
        let n = {
            let mut s = lock(&self.state);
            let n = s.conn.writer().write(b)?;
            while s.conn.wants_write() {
                s.conn.write_tls(&mut out)?;
            }
            n
        };
        (&*self.sock).write_all(&out)?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes a fresh credentials directory: a CA, a server certificate naming `hosts`
/// (IP addresses or DNS names) and a client certificate, all signed by the CA. Both
/// ends of a migration can use the same directory (or copies of it).
pub fn generate(dir: &Path, hosts: &[String]) -> io::Result<()> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let err = |e: rcgen::Error| io::Error::other(e.to_string());
    std::fs::create_dir_all(dir)?;
    let ca_key = KeyPair::generate().map_err(err)?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    ca.distinguished_name
        .push(DnType::CommonName, "godwit migration CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).map_err(err)?;
    let write = |name: &str, data: String, secret: bool| -> io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(if secret { 0o600 } else { 0o644 })
            .open(dir.join(name))?;
        f.write_all(data.as_bytes())
    };
    write("ca-cert.pem", ca_cert.pem(), false)?;
    write("ca-key.pem", ca_key.serialize_pem(), true)?;
    for (who, names) in [
        ("server", hosts.to_vec()),
        ("client", vec!["godwit-source".to_string()]),
    ] {
        let key = KeyPair::generate().map_err(err)?;
        let mut p = CertificateParams::new(names).map_err(err)?;
        p.distinguished_name
            .push(DnType::CommonName, format!("godwit {who}"));
        let cert = p.signed_by(&key, &ca_cert, &ca_key).map_err(err)?;
        write(&format!("{who}-cert.pem"), cert.pem(), false)?;
        write(&format!("{who}-key.pem"), key.serialize_pem(), true)?;
    }
    Ok(())
}

/// Whether `host` (of tcp:HOST:PORT) is this machine's loopback, where plain TCP is
/// allowed without TLS.
pub fn is_loopback(host: &str) -> bool {
    use std::net::ToSocketAddrs;
    let h = host.trim_matches(['[', ']']);
    if h == "localhost" {
        return true;
    }
    match (h, 0u16).to_socket_addrs() {
        Ok(addrs) => {
            let v: Vec<_> = addrs.collect();
            !v.is_empty() && v.iter().all(|a| a.ip().is_loopback())
        }
        Err(_) => false,
    }
}
