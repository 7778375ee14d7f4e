//! Shared by the migration tests: real godwit processes as sources and destinations,
//! a man in the middle, a destination that never confirms.

use super::*;
use godwit_migration::wire::{self, Frame, Kind};
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

pub const LIMIT: Duration = Duration::from_secs(60);

pub struct Vm {
    pub proc: Reaper,
    pub log: PathBuf,
    pub err: PathBuf,
    pub sock: PathBuf,
}

pub fn spawn(args: &[String], log: &Path, err: &Path) -> Reaper {
    spawn_with(args, log, err, &[])
}

/// `spawn` with environment variables set for the process.
pub fn spawn_with(args: &[String], log: &Path, err: &Path, env: &[(&str, &str)]) -> Reaper {
    spawn_through(&[], args, log, err, env)
}

/// `spawn_with`, godwit started by `wrapper` where it names a command (one that runs
/// the rest of its arguments as `setpriv` does).
pub fn spawn_through(
    wrapper: &[String],
    args: &[String],
    log: &Path,
    err: &Path,
    env: &[(&str, &str)],
) -> Reaper {
    // The console option goes before any guest arguments (which follow `--`).
    let i = args.iter().position(|x| x == "--").unwrap_or(args.len());
    let mut a = args[..i].to_vec();
    a.push("--console".into());
    a.push(format!("file:{}", log.display()));
    a.extend_from_slice(&args[i..]);
    let mut cmd = match wrapper.split_first() {
        None => godwit(),
        Some((w, rest)) => {
            let mut c = std::process::Command::new(w);
            c.args(rest).arg(env!("CARGO_BIN_EXE_godwit"));
            c
        }
    };
    Reaper(
        cmd.args(&a)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(err).unwrap())
            .spawn()
            .expect("spawn godwit"),
    )
}

/// A source VM with an API socket.
pub fn source(dir: &TempDir, name: &str, args: &[&str]) -> Vm {
    let (log, err, sock) = (
        dir.path(&format!("{name}.log")),
        dir.path(&format!("{name}.err")),
        dir.path(&format!("{name}.sock")),
    );
    let mut a: Vec<String> = vec![
        "run".into(),
        "--api-socket".into(),
        sock.display().to_string(),
    ];
    a.extend(args.iter().map(|s| s.to_string()));
    let proc = spawn(&a, &log, &err);
    assert!(
        wait_for(LIMIT, || sock.exists().then_some(())).is_some(),
        "no API socket: {}",
        read(&err)
    );
    Vm {
        proc,
        log,
        err,
        sock,
    }
}

/// A destination waiting on a TCP port of its choosing; returns it and its address.
pub fn destination(dir: &TempDir, name: &str, extra: &[&str]) -> (Vm, String) {
    destination_with(dir, name, extra, &[])
}

/// `destination` with environment variables set for its process.
pub fn destination_with(
    dir: &TempDir,
    name: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> (Vm, String) {
    destination_through(&[], dir, name, extra, env)
}

/// `destination_with`, started by `wrapper` (see `spawn_through`).
pub fn destination_through(
    wrapper: &[String],
    dir: &TempDir,
    name: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> (Vm, String) {
    let (log, err, sock) = (
        dir.path(&format!("{name}.log")),
        dir.path(&format!("{name}.err")),
        dir.path(&format!("{name}.sock")),
    );
    let mut a: Vec<String> = vec![
        "run".into(),
        "--incoming".into(),
        "tcp:127.0.0.1:0".into(),
        "--api-socket".into(),
        sock.display().to_string(),
    ];
    a.extend(extra.iter().map(|s| s.to_string()));
    let proc = spawn_through(wrapper, &a, &log, &err, env);
    // Whole lines only: stderr is unbuffered, and a line may be read half written.
    let addr = wait_for(LIMIT, || {
        read(&err).split_inclusive('\n').find_map(|l| {
            l.strip_suffix('\n')?
                .strip_prefix("godwit: waiting for a migration on ")
                .filter(|a| !a.is_empty())
                .map(String::from)
        })
    })
    .unwrap_or_else(|| panic!("destination did not listen: {}", read(&err)));
    (
        Vm {
            proc,
            log,
            err,
            sock,
        },
        addr,
    )
}

/// `godwit ARGS --api-socket` of `vm`, to completion.
pub fn cli(vm: &Vm, args: &[&str]) -> Output {
    let mut a = args.to_vec();
    a.extend_from_slice(&["--api-socket", vm.sock.to_str().unwrap()]);
    run(&a, LIMIT)
}

pub fn migrate(src: &Vm, to: &str, extra: &[&str]) -> (Output, Value) {
    let mut a = vec![
        "migrate",
        "--api-socket",
        src.sock.to_str().unwrap(),
        "--to",
        to,
        "--json",
    ];
    a.extend_from_slice(extra);
    let out = run(&a, Duration::from_secs(120));
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap_or_default();
    (out, v)
}

/// A migration capped at 8 MiB/s (several seconds for these guests), in the background.
pub fn slow_migration(src: &Vm, to: String) -> std::thread::JoinHandle<Output> {
    migrating(src, &to, &["--max-bandwidth", "8M"])
}

/// `godwit migrate --json` of `src` to `to` with `extra` options, in the background.
pub fn migrating(src: &Vm, to: &str, extra: &[&str]) -> std::thread::JoinHandle<Output> {
    migrating_within(src, to, extra, Duration::from_secs(120))
}

/// `migrating`, given `limit` to end.
pub fn migrating_within(
    src: &Vm,
    to: &str,
    extra: &[&str],
    limit: Duration,
) -> std::thread::JoinHandle<Output> {
    let sock = src.sock.to_str().unwrap().to_string();
    let mut a: Vec<String> = ["migrate", "--api-socket", &sock, "--to", to, "--json"]
        .iter()
        .map(|x| x.to_string())
        .collect();
    a.extend(extra.iter().map(|x| x.to_string()));
    std::thread::spawn(move || {
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        run(&a, limit)
    })
}

pub fn exit_code(vm: &mut Vm, limit: Duration) -> i32 {
    let c = &mut vm.proc.0;
    wait_for(limit, || c.try_wait().unwrap())
        .expect("process did not end")
        .code()
        .unwrap_or(-1)
}

pub fn wait_log(p: &Path, what: &str) {
    assert!(
        wait_for(LIMIT, || read(p).contains(what).then_some(())).is_some(),
        "{what:?} never appeared in {}:\n{}",
        p.display(),
        read(p)
    );
}

pub fn seqs(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| {
            l.strip_prefix("heartbeat seq=")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

pub fn info(vm: &Vm) -> Value {
    let out = run(&["info", "--api-socket", vm.sock.to_str().unwrap()], LIMIT);
    serde_json::from_str(&stdout(&out)).unwrap_or_default()
}

/// A man in the middle that forwards the first `keep` bytes from source to destination
/// and then damages the stream as `how` says: "flip" changes a byte in every read from
/// there on (one byte of page data alone might be mended: a page torn or damaged is
/// held until the source sends it again, which it does if the guest rewrote it), "cut"
/// ends it; the other direction passes untouched.
pub fn proxy(to: String, keep: usize, how: &'static str) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("tcp:{}", l.local_addr().unwrap());
    std::thread::spawn(move || {
        let (mut a, _) = l.accept().unwrap();
        let mut b = TcpStream::connect(to.strip_prefix("tcp:").unwrap()).unwrap();
        relay_the_rest(l, to.clone());
        let (mut a2, mut b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = b2.read(&mut buf) {
                if n == 0 || a2.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
        let mut buf = vec![0u8; 65536];
        let mut passed = 0usize;
        loop {
            let n = match a.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let chunk = &mut buf[..n];
            if passed + n > keep {
                let at = keep.saturating_sub(passed);
                match how {
                    "flip" => {
                        chunk[at] ^= 0x40;
                        let _ = b.write_all(chunk);
                        passed += n;
                        continue;
                    }
                    _ => {
                        let _ = b.write_all(&chunk[..at]);
                        break;
                    }
                }
            }
            if b.write_all(chunk).is_err() {
                break;
            }
            passed += n;
        }
        let _ = a.shutdown(std::net::Shutdown::Both);
        let _ = b.shutdown(std::net::Shutdown::Both);
    });
    addr
}

/// Passes every further connection to `l` on to `to` as it is, both ways: the data
/// connections a migration opens after its main one (`--connections`), which a man in
/// the middle that watches the main one leaves alone.
pub fn relay_the_rest(l: TcpListener, to: String) {
    std::thread::spawn(move || {
        while let Ok((a, _)) = l.accept() {
            let Ok(b) = TcpStream::connect(to.strip_prefix("tcp:").unwrap()) else {
                continue;
            };
            for (mut from, mut into) in [(a.try_clone().unwrap(), b.try_clone().unwrap()), (b, a)] {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut into);
                    let _ = into.shutdown(std::net::Shutdown::Write);
                });
            }
        }
    });
}

/// A man in the middle that passes the first connection (a migration's main one) both
/// ways, as it is (a reset too), and takes every later one (its data connections)
/// without passing it on: a destination whose data connections never come. With
/// `drain` it reads them (and drops what it reads), so that the source's writes to
/// them never block; else it reads nothing.
pub fn main_only_proxy(to: String, drain: bool) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("tcp:{}", l.local_addr().unwrap());
    std::thread::spawn(move || {
        let Ok((a, _)) = l.accept() else { return };
        let b = TcpStream::connect(to.strip_prefix("tcp:").unwrap()).unwrap();
        pass_resets(&a, &b);
        for (from, into) in [(a.try_clone().unwrap(), b.try_clone().unwrap()), (b, a)] {
            std::thread::spawn(move || relay(from, into));
        }
        let mut held = Vec::new();
        while let Ok((c, _)) = l.accept() {
            if drain {
                let mut c = c;
                std::thread::spawn(move || std::io::copy(&mut c, &mut std::io::sink()));
            } else {
                held.push(c);
            }
        }
    });
    addr
}

/// Resets `into` (once every handle on it is gone) and stops whatever blocks on it.
fn reset(into: &TcpStream) {
    // SO_LINGER holds for the socket, whichever of its handles sets it.
    godwit_migration::transport::Stream::Tcp(into.try_clone().unwrap()).reset_on_close();
    let _ = into.shutdown(std::net::Shutdown::Both);
}

/// Copies `from` into `into` until `from` ends, which ends `into` the same way: a close
/// with a close, a reset with a reset.
fn relay(mut from: TcpStream, mut into: TcpStream) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match from.read(&mut buf) {
            Ok(0) => {
                let _ = into.shutdown(std::net::Shutdown::Write);
                return;
            }
            Ok(n) => {
                if into.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                if e.kind() == std::io::ErrorKind::ConnectionReset {
                    reset(&into);
                }
                return;
            }
        }
    }
}

/// A reset of `a` resets `b` even while the relay into `b` is blocked on a full `b`
/// (it then reads nothing from `a` to find it).
fn pass_resets(a: &TcpStream, b: &TcpStream) {
    use std::os::fd::AsRawFd;
    let (a, b) = (a.try_clone().unwrap(), b.try_clone().unwrap());
    std::thread::spawn(move || {
        // No events asked for: poll returns on an error or a hang-up only.
        let mut p = libc::pollfd {
            fd: a.as_raw_fd(),
            events: 0,
            revents: 0,
        };
        // SAFETY: one pollfd for a socket this thread holds; no timeout.
        while unsafe { libc::poll(&mut p, 1, -1) } <= 0 {}
        if matches!(a.take_error(), Ok(Some(e)) if e.kind() == std::io::ErrorKind::ConnectionReset)
        {
            reset(&b);
        }
    });
}

/// A man in the middle that damages one byte of the first page of every PAGES frame
/// whose pages carry their own CRCs (`wire::PAGE_CRCS`), as a link whose damage slips
/// past its own checks would, and forwards everything else as it came; returns the
/// address to migrate to and the number of pages it damaged (once the source closes).
pub fn page_damaging_proxy(to: String) -> (String, std::thread::JoinHandle<u64>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("tcp:{}", l.local_addr().unwrap());
    let t = std::thread::spawn(move || {
        let (mut a, _) = l.accept().unwrap();
        let mut b = TcpStream::connect(to.strip_prefix("tcp:").unwrap()).unwrap();
        let (mut a2, mut b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut b2, &mut a2);
            let _ = a2.shutdown(std::net::Shutdown::Both);
        });
        let mut damaged = 0;
        let mut h = [0u8; wire::HEADER_LEN];
        let mut p = Vec::new();
        while a.read_exact(&mut h).is_ok() {
            let Ok(head) = wire::parse_header(&h) else {
                break;
            };
            p.resize(head.len, 0);
            if a.read_exact(&mut p).is_err() {
                break;
            }
            if head.kind == Kind::Pages && head.checked == wire::Checked::Pages {
                let at = wire::pages_head_len(head.len, head.checked).unwrap();
                p[at + 100] ^= 0x40;
                damaged += 1;
            }
            if b.write_all(&h).and_then(|_| b.write_all(&p)).is_err() {
                break;
            }
        }
        let _ = b.shutdown(std::net::Shutdown::Both);
        damaged
    });
    (addr, t)
}

/// Reads one frame as a destination that reads pages into place does: the pages of a
/// frame that carries their own CRCs (`wire::PAGE_CRCS`) may be torn by the guest's
/// writes, and a destination holds such a page until its next copy, so only the frame
/// itself is read here; every other frame is checked whole.
pub fn read_frame_as_destination<'a>(
    r: &mut impl Read,
    buf: &'a mut Vec<u8>,
) -> Result<Frame<'a>, wire::WireError> {
    let h = wire::read_header(r)?;
    if h.checked != wire::Checked::Pages {
        return wire::read_payload(r, &h, buf);
    }
    buf.resize(h.len, 0);
    r.read_exact(buf).map_err(wire::WireError::Io)?;
    wire::decode_checked(h.kind, h.checked, buf)
}

/// A destination that takes everything (it answers each round's SYNC) and never
/// confirms the end (no READY); returns its address and the frame kinds it saw.
pub fn unconfirming_destination() -> (String, std::thread::JoinHandle<Vec<Kind>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("tcp:{}", l.local_addr().unwrap());
    let fake = std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        // The data connections (`--connections`): taken in and read to their end.
        std::thread::spawn(move || {
            while let Ok((mut d, _)) = l.accept() {
                std::thread::spawn(move || std::io::copy(&mut d, &mut std::io::sink()));
            }
        });
        let mut buf = Vec::new();
        let mut kinds = Vec::new();
        loop {
            match read_frame_as_destination(&mut c, &mut buf) {
                Ok(Frame::Hello(_)) => {
                    wire::write_frame(&mut c, &Frame::Accept(Default::default())).unwrap();
                    kinds.push(Kind::Hello);
                }
                Ok(Frame::Sync(n)) => {
                    wire::write_frame(&mut c, &Frame::Synced(n)).unwrap();
                    kinds.push(Kind::Sync);
                }
                Ok(f) => {
                    let k = f.kind();
                    kinds.push(k);
                    if k == Kind::Complete {
                        break;
                    }
                }
                Err(e) => panic!("{e}"),
            }
        }
        drop(c); // no READY
        kinds
    });
    (addr, fake)
}

/// What a handshake proxy does to the frame it watches for.
#[derive(Clone, Copy, Debug)]
pub enum Hold {
    /// Holds it back this long, then passes it (and everything after).
    Delay(Duration),
    /// Passes it one byte at a time, this long apart.
    Trickle(Duration),
    /// Never passes it, nor anything after it in that direction; the connection stays
    /// open.
    Stall,
    /// Drops it and cuts the connection both ways (a link that dies at that moment).
    Cut,
}

/// A man in the middle that passes every frame both ways, except the first frame of
/// `kind` going toward the destination (`downstream`) or back to the source, which it
/// holds as `how` says. Returns its address and a flag raised once that frame has
/// passed whole.
pub fn handshake_proxy(
    to: String,
    downstream: bool,
    kind: Kind,
    how: Hold,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicBool>) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("tcp:{}", l.local_addr().unwrap());
    let passed = Arc::new(AtomicBool::new(false));
    let flag = passed.clone();
    std::thread::spawn(move || {
        let Ok((a, _)) = l.accept() else { return };
        let b = TcpStream::connect(to.strip_prefix("tcp:").unwrap()).unwrap();
        relay_the_rest(l, to.clone());
        let _ = a.set_nodelay(true);
        let _ = b.set_nodelay(true);
        let (a2, b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
        let pump = move |mut from: TcpStream, mut into: TcpStream, watch: bool| {
            let mut held = false;
            loop {
                let mut h = [0u8; wire::HEADER_LEN];
                if from.read_exact(&mut h).is_err() {
                    break;
                }
                let (k, len) = match wire::check_header(&h) {
                    Ok(x) => x,
                    Err(_) => break,
                };
                let mut frame = h.to_vec();
                frame.resize(wire::HEADER_LEN + len, 0);
                if from.read_exact(&mut frame[wire::HEADER_LEN..]).is_err() {
                    break;
                }
                let ok = if watch && !held && k == kind {
                    held = true;
                    match how {
                        Hold::Delay(d) => {
                            std::thread::sleep(d);
                            into.write_all(&frame).is_ok()
                        }
                        Hold::Trickle(d) => frame.iter().all(|byte| {
                            std::thread::sleep(d);
                            into.write_all(&[*byte]).is_ok()
                        }),
                        Hold::Stall => {
                            // Keep both sockets open and silent in this direction.
                            std::thread::sleep(Duration::from_secs(3600));
                            false
                        }
                        Hold::Cut => {
                            let _ = from.shutdown(std::net::Shutdown::Both);
                            let _ = into.shutdown(std::net::Shutdown::Both);
                            false
                        }
                    }
                } else {
                    into.write_all(&frame).is_ok()
                };
                if !ok {
                    break;
                }
                if watch && held {
                    passed.store(true, Ordering::SeqCst);
                }
            }
            let _ = into.shutdown(std::net::Shutdown::Write);
        };
        let pump2 = pump.clone();
        let up = std::thread::spawn(move || pump2(b2, a2, !downstream));
        pump(a, b, downstream);
        let _ = up.join();
    });
    (addr, flag)
}

/// A source running the dirtier in `mib` MiB with the dirtier's arguments `args`, once
/// it has touched its working set.
pub fn dirtier_source(dir: &TempDir, name: &str, mib: &str, args: &[&str]) -> Vm {
    dirtier_source_under(dir, name, &[], mib, args)
}

/// `dirtier_source` with `run`'s options for `godwit run` as well.
pub fn dirtier_source_under(
    dir: &TempDir,
    name: &str,
    run: &[&str],
    mib: &str,
    args: &[&str],
) -> Vm {
    let mut a = run.to_vec();
    a.extend(["-m", mib, "dirtier", "--"]);
    a.extend_from_slice(args);
    let src = source(dir, name, &a);
    wait_log(&src.log, "touched");
    src
}

/// Every page is there: the guest's next two full checks (`verified`) pass. Then the
/// VM ends.
pub fn verified_and_shut_down(dst: &mut Vm, verified: &str) {
    gains(&dst.log, verified, 2);
    assert!(!read(&dst.log).contains("FAILED"), "{}", read(&dst.log));
    run(
        &["shutdown", "--api-socket", dst.sock.to_str().unwrap()],
        LIMIT,
    );
    exit_code(dst, LIMIT);
}

pub fn count(p: &Path, what: &str) -> usize {
    read(p).matches(what).count()
}

/// The log gains `n` more lines containing `what` within the limit.
pub fn gains(p: &Path, what: &str, n: usize) {
    let before = count(p, what);
    assert!(
        wait_for(LIMIT, || (count(p, what) >= before + n).then_some(())).is_some(),
        "{what:?} stopped appearing in {}:\n{}",
        p.display(),
        read(p)
    );
}

/// Waits until the migration in progress on `src` has sent something.
pub fn wait_progress(src: &Vm) {
    wait_for(LIMIT, || {
        let (_, b) = godwit_vmm::api::call(&src.sock, "GET", "vm.migration").ok()?;
        let v: Value = serde_json::from_str(&b).ok()?;
        (v["active"] == true && v["progress"]["bytes_sent"].as_u64()? > 0).then_some(())
    })
    .expect("no progress");
}

/// A man in the middle for any number of connections (`link_proxy`), and what a test does
/// to the link through it.
pub struct Link {
    /// Where the source connects.
    pub addr: String,
    /// Raised: every connection is cut and no more are taken (a link that dies for
    /// good).
    pub cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Raised: each connection's next chunk toward the destination comes in two
    /// halves STALL apart, once (a lossy link whose TCP retransmits: a frame stalls
    /// halfway).
    pub stall: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// The chunks that came in two halves.
    pub stalled: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// Raised: nothing more passes either way and nothing is closed (a link gone
    /// silent: a host or a path lost without a reset).
    pub hold: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Raised: nothing more passes from the destination to the source (its answers
    /// are lost), while the source's data still goes through.
    pub hold_back: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// How long a stalled chunk's second half waits: longer than the destination's wait
/// for a frame (1 s) before it looks at the state of post-copy again, by enough that
/// a reader slowed by a loaded host still times out inside the frame.
pub const STALL: Duration = Duration::from_millis(2500);

/// A proxy to `to` that passes everything both ways until told otherwise (`Link`).
pub fn link_proxy(to: String) -> Link {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.set_nonblocking(true).unwrap();
    let link = Link {
        addr: format!("tcp:{}", l.local_addr().unwrap()),
        cut: Arc::new(AtomicBool::new(false)),
        stall: Arc::new(AtomicBool::new(false)),
        stalled: Arc::new(AtomicUsize::new(0)),
        hold: Arc::new(AtomicBool::new(false)),
        hold_back: Arc::new(AtomicBool::new(false)),
    };
    let (cut, stall, stalled, hold, hold_back) = (
        link.cut.clone(),
        link.stall.clone(),
        link.stalled.clone(),
        link.hold.clone(),
        link.hold_back.clone(),
    );
    std::thread::spawn(move || {
        let socks: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        while !cut.load(Ordering::SeqCst) {
            let a = match l.accept() {
                Ok((a, _)) => a,
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
            };
            a.set_nonblocking(false).unwrap();
            let b = TcpStream::connect(to.strip_prefix("tcp:").unwrap()).unwrap();
            for s in [&a, &b] {
                let _ = s.set_nodelay(true);
                socks.lock().unwrap().push(s.try_clone().unwrap());
            }
            // `stall`: the flag that splits a chunk in this direction, once; `held`:
            // the flag that holds this direction alone.
            let pump = |mut from: TcpStream,
                        mut into: TcpStream,
                        stall: Option<Arc<AtomicBool>>,
                        held: Option<Arc<AtomicBool>>| {
                let (stalled, hold) = (stalled.clone(), hold.clone());
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 65536];
                    let mut split = stall;
                    let held = || held.as_ref().is_some_and(|f| f.load(Ordering::SeqCst));
                    while let Ok(n) = from.read(&mut buf) {
                        while hold.load(Ordering::SeqCst) || held() {
                            std::thread::sleep(Duration::from_millis(10));
                        }
                        if n == 0 {
                            break;
                        }
                        // Where the rest of the chunk begins.
                        let mut at = 0;
                        if n > 1 && split.as_ref().is_some_and(|f| f.load(Ordering::SeqCst)) {
                            split = None;
                            at = n / 2;
                            if into.write_all(&buf[..at]).is_err() {
                                break;
                            }
                            std::thread::sleep(STALL);
                            stalled.fetch_add(1, Ordering::SeqCst);
                        }
                        if into.write_all(&buf[at..n]).is_err() {
                            break;
                        }
                    }
                    let _ = into.shutdown(std::net::Shutdown::Write);
                });
            };
            pump(
                a.try_clone().unwrap(),
                b.try_clone().unwrap(),
                Some(stall.clone()),
                None,
            );
            pump(b, a, None, Some(hold_back.clone()));
        }
        for s in socks.lock().unwrap().iter() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    });
    link
}

/// The dirtier's own verdict on the destination: every page it wrote is intact.
pub fn assert_verified(dst: &mut Vm, pages: u64) {
    assert_eq!(exit_code(dst, LIMIT), 0, "{}", read(&dst.err));
    let log = read(&dst.log);
    assert!(log.contains(&format!("verify ok pages={pages}")), "{log}");
    assert!(log.contains("result=ok"), "{log}");
}

/// What every post-copy report must say: the VM ran ahead of its memory, and every
/// page the destination lacked reached it.
pub fn assert_postcopy_whole(r: &Value) {
    assert_eq!(r["status"], "completed", "{r}");
    assert_eq!(r["ran"], "postcopy", "{r}");
    let p = &r["postcopy"];
    // First: a guest whose time ran out at the destination before every page arrived
    // (a test's budget too short for a loaded host) leaves the counts below short.
    assert!(p["vm_ended"].is_null(), "{r}");
    let missing = p["missing_pages"]["ram"].as_u64().unwrap();
    assert!(missing > 0, "{r}");
    let d = &p["destination"]["ram"];
    assert_eq!(d["missing_at_start"].as_u64(), Some(missing), "{r}");
    // Each missing page arrived once as asked for or pushed (duplicates aside).
    let placed = d["remote_faults"].as_u64().unwrap()
        + d["prepaged"].as_u64().unwrap()
        + d["fetched_ahead"].as_u64().unwrap();
    assert_eq!(placed, missing, "{r}");
    assert!(
        p["requested_pages"].as_u64().unwrap() + p["background_pages"].as_u64().unwrap() >= missing,
        "{r}"
    );
    assert!(p["window_ms"].as_f64().unwrap() > 0.0, "{r}");
    assert_eq!(p["refused_requests"], 0, "{r}");
}

/// A migration as a VM's API reports it (`GET vm.migration`): its progress on a
/// source, `incoming` on a destination.
pub fn migration(vm: &Vm) -> Value {
    let (_, b) = godwit_vmm::api::call(&vm.sock, "GET", "vm.migration").unwrap();
    serde_json::from_str(&b).unwrap()
}

/// Once post-copy has ended (the source answered DONE with RELEASED), the destination
/// no longer listens for the source to come back: its port is free for another
/// migration. (It would listen for minutes after DONE otherwise.)
pub fn assert_listener_let_go(addr: &str) {
    let a = addr.strip_prefix("tcp:").unwrap_or(addr);
    let free = wait_for(Duration::from_secs(30), || TcpListener::bind(a).ok());
    assert!(free.is_some(), "the destination still listens on {a}");
}

/// Waits until the migration out of `src` is in post-copy (the VM runs at the
/// destination).
pub fn wait_postcopy(src: &Vm) {
    wait_for(LIMIT, || {
        (migration(src)["progress"]["phase"] == "postcopy").then_some(())
    })
    .expect("post-copy never began");
}

/// Waits until the source says its post-copy is paused (broken connections).
pub fn wait_source_paused(src: &Vm) {
    wait_for(LIMIT, || {
        migration(src)["postcopy_paused"].as_str().map(|_| ())
    })
    .expect("post-copy did not pause at the source");
}

/// Waits until the destination says its post-copy is paused; returns its account
/// (`incoming`: pages left, why, recoveries, per component).
pub fn wait_destination_paused(dst: &Vm) -> Value {
    wait_for(LIMIT, || {
        let i = migration(dst)["incoming"].clone();
        i["paused"].is_string().then_some(i)
    })
    .expect("the destination did not say post-copy paused")
}
