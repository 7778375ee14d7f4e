//! A guest that ends while its VM migrates: the migration fails and says why, nothing
//! half-made is left behind (no VM at the destination, no snapshot file), and the
//! source ends as the guest asked, with the guest's own status.

mod common;

use common::mig::*;
use common::*;

#[test]
fn a_guest_that_ends_mid_migration_fails_it_clearly_and_leaves_nothing_behind() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("guest-ends");
    for live in [true, false] {
        let name = if live { "live" } else { "file" };
        // Its time is up two seconds after it starts; at 8 MiB/s its 64 MiB of data
        // take eight.
        let mut src = dirtier_source(
            &dir,
            &format!("src-{name}"),
            "256",
            &["wss=64", "rate=50", "seconds=2", "report-every=250"],
        );
        let snap = dir.path("ended.snap");
        let (dst, to) = if live {
            let (d, a) = destination(&dir, "dst", &[]);
            (Some(d), a)
        } else {
            (None, format!("file:{}", snap.display()))
        };
        let out = slow_migration(&src, to).join().unwrap();
        assert!(!out.status.success(), "{name}: {}", stdout(&out));
        assert!(
            stderr(&out)
                .contains("the VM ended while it migrated (its guest exited with status 0)"),
            "{name}: {}",
            stderr(&out)
        );
        let r: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
        assert_eq!(r["error_kind"], "vm_ended", "{r}");
        assert_eq!(r["source_running"], false, "{r}");
        // It stopped when the guest did, not once the memory of a VM that is gone had
        // gone too: at 8 MiB/s, a guest that ends two seconds after it started leaves
        // time for about 16 MiB (it went on to 63 while the slice being read lasted).
        let sent = r["bytes"]["total"].as_u64().unwrap();
        assert!(sent < 32 << 20, "{name}: {sent} bytes sent: {r}");
        assert_eq!(exit_code(&mut src, LIMIT), 0, "{name}: {}", read(&src.err));
        assert!(read(&src.log).contains("result=ok"), "{}", read(&src.log));
        match dst {
            Some(mut d) => {
                assert_ne!(exit_code(&mut d, LIMIT), 0, "{}", read(&d.err));
                assert!(
                    !read(&d.log).contains("dirtier"),
                    "the guest ran at the destination: {}",
                    read(&d.log)
                );
            }
            None => assert!(!snap.exists(), "a snapshot of a VM that ended is left"),
        }
    }
}
