//! A link with a one-way delay, for benchmarks on one host: a TCP relay on loopback that
//! holds every byte it reads for `delay` before it passes it on, in both directions of
//! every connection, so that a round trip across it takes at least twice that (as
//! between two hosts a few hundred kilometres or a few switches apart). Bytes keep
//! their order; throughput is what loopback and the relay's threads give.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub(crate) struct DelayLink {
    /// Where to connect instead of the destination.
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl DelayLink {
    /// Relays connections to `to`, each byte held `delay`; until dropped.
    pub fn start(to: SocketAddr, delay: Duration) -> std::io::Result<DelayLink> {
        let l = TcpListener::bind("127.0.0.1:0")?;
        let addr = l.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        std::thread::Builder::new()
            .name("delay-link".into())
            .spawn(move || {
                for c in l.incoming() {
                    if s.load(Relaxed) {
                        return;
                    }
                    let Ok(a) = c else { continue };
                    let Ok(b) = TcpStream::connect(to) else {
                        continue;
                    };
                    for x in [&a, &b] {
                        let _ = x.set_nodelay(true);
                    }
                    let (a2, b2) = match (a.try_clone(), b.try_clone()) {
                        (Ok(a2), Ok(b2)) => (a2, b2),
                        _ => continue,
                    };
                    pipe(a, b2, delay);
                    pipe(b, a2, delay);
                }
            })?;
        Ok(DelayLink { addr, stop })
    }
}

impl Drop for DelayLink {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        // Wakes the accepting thread, which then ends.
        let _ = TcpStream::connect(self.addr);
    }
}

/// `from` into `to`, each chunk held until `delay` after it was read; `to`'s writing
/// half is shut once `from` ends.
fn pipe(mut from: TcpStream, mut to: TcpStream, delay: Duration) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    let _ = std::thread::Builder::new()
        .name("delay-read".into())
        .spawn(move || {
            let mut buf = vec![0u8; 64 << 10];
            loop {
                match from.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if tx
                            .send((Instant::now() + delay, buf[..n].to_vec()))
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            }
        });
    let _ = std::thread::Builder::new()
        .name("delay-write".into())
        .spawn(move || {
            for (due, bytes) in rx {
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                if to.write_all(&bytes).is_err() {
                    return;
                }
            }
            let _ = to.shutdown(Shutdown::Write);
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_cross_in_order_and_a_round_trip_takes_twice_the_delay() {
        let echo = TcpListener::bind("127.0.0.1:0").unwrap();
        let to = echo.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut c, _) = echo.accept().unwrap();
            let mut buf = [0u8; 4096];
            loop {
                match c.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => c.write_all(&buf[..n]).unwrap(),
                }
            }
        });
        let link = DelayLink::start(to, Duration::from_millis(20)).unwrap();
        let mut c = TcpStream::connect(link.addr).unwrap();
        let msg: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let t0 = Instant::now();
        c.write_all(&msg).unwrap();
        let mut back = vec![0u8; msg.len()];
        c.read_exact(&mut back).unwrap();
        // A lower bound only: what the delay guarantees, whatever the host's speed.
        assert!(
            t0.elapsed() >= Duration::from_millis(40),
            "{:?}",
            t0.elapsed()
        );
        assert_eq!(back, msg);
    }
}
