//! Pages sent from guest memory straight to the socket while the guest writes them, with
//! each page's own CRC (the default) or with their data left to the transport: a page
//! torn on the way is sent again, and the guest verifies all of its memory after the
//! move.

mod common;

use common::mig::*;
use common::*;

/// Pages go from guest memory straight to the socket while the guest writes them, each
/// with its own CRC (the default) or with their data left to the transport's checks
/// (`--page-checks transport`). A page torn on the way is dirty, so it goes again; with
/// its own CRC the destination also holds it as damaged until then. A dirtier writing
/// flat out, and checking each page before it rewrites it, verifies all of its memory
/// after the move, either way (with `transport` over two connections, the second one's
/// pages written from guest memory by its writer thread). A snapshot file keeps every
/// page's CRC: `transport` is refused there.
#[test]
fn pages_sent_straight_from_guest_memory_while_it_is_written_arrive_whole() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("mig-inplace");
    for (checks, says) in [
        ("crc", "each with its own CRC"),
        ("transport", "the transport checks their data"),
    ] {
        let mut src = source(
            &dir,
            &format!("src-{checks}"),
            &[
                "--log-level",
                "info",
                "-m",
                "512",
                "dirtier",
                "--",
                "wss=96",
                "rate=0",
                "seconds=6",
                "report-every=250",
                "check-writes=1",
            ],
        );
        let dst_name = format!("dst-{checks}");
        let (mut dst, addr) = destination(&dir, &dst_name, &["--log-level", "info"]);
        wait_log(&src.log, "rate_mibs=");
        if checks == "transport" {
            let snap = format!("file:{}", dir.path("snap").display());
            let (out, _) = migrate(&src, &snap, &["--page-checks", checks]);
            assert_eq!(out.status.code(), Some(1));
            assert!(
                stderr(&out).contains("keeps a CRC of every page"),
                "{}",
                stderr(&out)
            );
            assert_eq!(info(&src)["state"], "running");
        }
        // The connections whose pages go from guest memory to the socket: with CRCs,
        // the main one alone; with the transport's checks, two, the second written
        // by its own thread.
        let connections = if checks == "crc" { "1" } else { "2" };
        let (out, r) = migrate(
            &src,
            &addr,
            &[
                "--downtime-ms",
                "100",
                "--page-checks",
                checks,
                "--connections",
                connections,
            ],
        );
        assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
        assert_eq!(r["status"], "completed");
        assert_eq!(r["page_checks"], checks, "{r}");
        assert_eq!(r["connections"].to_string(), connections, "{r}");
        assert!(r["round_count"].as_u64().unwrap() >= 2, "{r}");
        assert_eq!(exit_code(&mut src, LIMIT), 0, "{}", read(&src.err));
        let said = read(&src.err);
        assert!(
            said.contains("pages go from guest memory to the socket"),
            "{said}"
        );
        assert!(said.contains(says), "{said}");
        assert_eq!(exit_code(&mut dst, LIMIT), 0, "{}", read(&dst.err));
        let log = read(&dst.log);
        assert!(log.contains("verify ok pages=24576"), "{checks}: {log}");
        assert!(log.contains("result=ok"), "{checks}: {log}");
        // How many copies were torn is the host's timing: shown, not asserted.
        let err = read(&dir.path(&format!("{dst_name}.err")));
        if let Some(l) = err.lines().find(|l| l.contains("failing their CRC")) {
            eprintln!("{checks}: {l}");
        }
    }
}
