//! What a migration is asked to do (the CLI's flags, the API's body), and the checks
//! that refuse what cannot work before anything starts.

use crate::report::Mode;
use crate::transport::Target;
use crate::wire;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Options {
    /// tcp:HOST:PORT, unix:PATH or file:PATH.
    pub to: String,
    /// How memory moves (post-copy modes need a live destination).
    #[serde(default)]
    pub mode: Mode,
    #[serde(default = "default_downtime")]
    pub downtime_ms: u64,
    /// Bytes per second over all connections; None = as fast as possible.
    #[serde(default)]
    pub max_bandwidth: Option<u64>,
    /// Connections carrying pages in parallel; None: `DEFAULT_CONNECTIONS` to a
    /// live destination, one into a file. Post-copy modes open one more, kept for
    /// the pages a touch waits for.
    #[serde(default)]
    pub connections: Option<u32>,
    /// Components (by section name) that skip pre-copy and keep running until the
    /// switchover: all their data then moves inside the pause (stop-and-copy, the way
    /// VFIO devices without pre-copy migrate). Their data does not count against the
    /// downtime limit, which rounds cannot shorten.
    #[serde(default)]
    pub stop_copy: Vec<String>,
    /// TLS credentials (QEMU's x509 layout: ca-cert.pem, client-cert.pem,
    /// client-key.pem) for a TCP destination.
    #[serde(default)]
    pub tls_dir: Option<std::path::PathBuf>,
    /// Plain TCP to a destination that is not this machine's loopback.
    #[serde(default)]
    pub insecure: bool,
    /// Who checks the pages' data on the way (`wire::PageChecks`).
    #[serde(default)]
    pub page_checks: wire::PageChecks,
    /// The vCPUs' weight while pre-copy runs (`vcpu_priority`).
    #[serde(default)]
    pub vcpu_priority: crate::vcpu_priority::VcpuPriority,
    /// The migration's own threads' weight while pre-copy runs, at both ends
    /// (`migration_priority`).
    #[serde(default)]
    pub migration_priority: crate::migration_priority::MigrationPriority,
}

fn default_downtime() -> u64 {
    300
}

/// Page connections to a live destination unless told: on this 2-core host two cut
/// pre-copy's total time by a quarter against one (a single receiving thread was the
/// limit; docs/benchmarks.md, "One connection or two").
pub const DEFAULT_CONNECTIONS: u32 = 2;

pub const MAX_CONNECTIONS: u32 = 16;

impl Options {
    /// Connections carrying pages (the background stream's, in post-copy).
    pub fn connections(&self) -> u32 {
        self.connections.unwrap_or_else(|| {
            if Target::parse(&self.to).is_ok_and(|t| t.is_file()) {
                1
            } else {
                DEFAULT_CONNECTIONS
            }
        })
    }

    /// Connections to open: post-copy modes keep the main one free for the pages a
    /// touch waits for and open `connections` more for the background stream.
    pub fn lanes(&self) -> u32 {
        match self.mode {
            Mode::Precopy => self.connections(),
            _ => self.connections() + 1,
        }
    }

    pub fn check(&self) -> Result<Target, String> {
        let t = Target::parse(&self.to)?;
        let k = self.connections();
        if k == 0 || self.lanes() > MAX_CONNECTIONS {
            return Err(format!(
                "connections must be 1 to {} (got {k}; post-copy modes open one more)",
                match self.mode {
                    Mode::Precopy => MAX_CONNECTIONS,
                    _ => MAX_CONNECTIONS - 1,
                }
            ));
        }
        if t.is_file() && k != 1 {
            return Err("a file takes one connection".into());
        }
        if t.is_file() && self.page_checks != wire::PageChecks::Crc {
            return Err(
                "a snapshot file keeps a CRC of every page (nothing checks it at rest): \
                 page_checks must be crc"
                    .into(),
            );
        }
        if t.is_file() && self.mode != Mode::Precopy {
            return Err(format!(
                "mode {} runs the VM at the destination before its memory is there: it \
                 needs a live destination, not a file",
                self.mode
            ));
        }
        if self.downtime_ms == 0 {
            return Err("the downtime limit must be at least 1 ms".into());
        }
        if self.max_bandwidth == Some(0) {
            return Err("max bandwidth must be more than 0".into());
        }
        match &t {
            Target::Tcp(a) if self.tls_dir.is_none() && !self.insecure => {
                let host = a.rsplit_once(':').map_or(a.as_str(), |(h, _)| h);
                if !crate::tls::is_loopback(host) {
                    return Err(format!(
                        "plain TCP to {host}, which is not this machine, would carry guest \
                         memory in the clear: give tls_dir (--tls-dir DIR; `godwit tls-creds` \
                         makes one) or, on a network you trust, insecure (--insecure)"
                    ));
                }
            }
            Target::Tcp(_) => {}
            _ if self.tls_dir.is_some() => {
                return Err("TLS is for tcp: destinations (unix: and file: stay local)".into())
            }
            _ => {}
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Options as the API takes them: `body` with everything else at its default.
    fn options(body: serde_json::Value) -> Options {
        serde_json::from_value(body).unwrap()
    }

    #[test]
    fn connections_default_to_two_to_a_live_destination_and_one_into_a_file() {
        let live = options(serde_json::json!({"to": "tcp:127.0.0.1:4444"}));
        assert_eq!((live.connections(), live.lanes()), (DEFAULT_CONNECTIONS, 2));
        assert!(live.check().is_ok());
        let file = options(serde_json::json!({"to": "file:/tmp/vm.snap"}));
        assert_eq!((file.connections(), file.lanes()), (1, 1));
        assert!(file.check().is_ok());
        let told = options(serde_json::json!({"to": "file:/tmp/vm.snap", "connections": 2}));
        assert_eq!(told.check().unwrap_err(), "a file takes one connection");
    }

    #[test]
    fn post_copy_modes_open_one_more_for_the_pages_a_touch_waits_for() {
        for mode in ["postcopy", "hybrid", "auto"] {
            let o = options(serde_json::json!({"to": "unix:/tmp/m.sock", "mode": mode}));
            assert_eq!(o.lanes(), DEFAULT_CONNECTIONS + 1, "{mode}");
            let one = options(
                serde_json::json!({"to": "unix:/tmp/m.sock", "mode": mode, "connections": 1}),
            );
            assert_eq!(one.lanes(), 2, "{mode}");
            // The extra one counts against the most a destination takes.
            let most = |k: u32| {
                options(
                    serde_json::json!({"to": "unix:/tmp/m.sock", "mode": mode, "connections": k}),
                )
                .check()
            };
            assert!(most(MAX_CONNECTIONS - 1).is_ok(), "{mode}");
            assert!(
                most(MAX_CONNECTIONS).unwrap_err().contains("1 to 15"),
                "{mode}"
            );
        }
        let pre = |k: u32| {
            options(serde_json::json!({"to": "unix:/tmp/m.sock", "connections": k})).check()
        };
        assert!(pre(MAX_CONNECTIONS).is_ok());
        assert!(pre(0).unwrap_err().contains("1 to 16"));
        assert!(pre(MAX_CONNECTIONS + 1).is_err());
    }
}
