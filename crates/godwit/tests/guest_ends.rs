//! A guest that ends while its VM migrates, by exiting or by crashing: the migration
//! fails and says why, nothing half-made is left behind (no VM at the destination, no
//! snapshot file), and the source ends as the guest did, with the guest's own status or
//! the crash's report.

mod common;

use common::mig::*;
use common::*;

/// How the guest ends, and what that looks like from outside.
struct End {
    tag: &'static str,
    /// Extra dirtier arguments.
    args: &'static [&'static str],
    /// What the migration's error says.
    why: &'static str,
    /// The source's exit status, and what its stderr says.
    code: i32,
    says: &'static str,
}

fn ends_mid_migration(end: End) {
    let dir = TempDir::new(&format!("guest-ends-{}", end.tag));
    for live in [true, false] {
        let name = format!("{}-{}", end.tag, if live { "live" } else { "file" });
        // Its time is up two seconds after it starts; at 8 MiB/s its 64 MiB of data
        // take eight.
        let mut args = vec!["wss=64", "rate=50", "seconds=2", "report-every=250"];
        args.extend(end.args);
        let mut src = dirtier_source(&dir, &format!("src-{name}"), "256", &args);
        let snap = dir.path(&format!("{name}.snap"));
        let (dst, to) = if live {
            let (d, a) = destination(&dir, &format!("dst-{name}"), &[]);
            (Some(d), a)
        } else {
            (None, format!("file:{}", snap.display()))
        };
        let out = slow_migration(&src, to).join().unwrap();
        assert!(!out.status.success(), "{name}: {}", stdout(&out));
        let want = format!("the VM ended while it migrated ({}", end.why);
        assert!(stderr(&out).contains(&want), "{name}: {}", stderr(&out));
        let r: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
        assert_eq!(r["error_kind"], "vm_ended", "{r}");
        assert_eq!(r["source_running"], false, "{r}");
        // It stopped when the guest did, not once the memory of a VM that is gone had
        // gone too: at 8 MiB/s, a guest that ends two seconds after it started leaves
        // time for about 16 MiB (it went on to 63 while the slice being read lasted).
        let sent = r["bytes"]["total"].as_u64().unwrap();
        assert!(sent < 32 << 20, "{name}: {sent} bytes sent: {r}");
        assert_eq!(
            exit_code(&mut src, LIMIT),
            end.code,
            "{name}: {}",
            read(&src.err)
        );
        assert!(read(&src.log).contains("result=ok"), "{}", read(&src.log));
        assert!(
            read(&src.err).contains(end.says),
            "{name}: {}",
            read(&src.err)
        );
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

#[test]
fn a_guest_that_ends_mid_migration_fails_it_clearly_and_leaves_nothing_behind() {
    if !kvm_available() {
        return;
    }
    ends_mid_migration(End {
        tag: "exits",
        args: &[],
        why: "its guest exited with status 0",
        code: 0,
        says: "",
    });
}

/// A crash takes the same way out, and the crash is reported as it would be without a
/// migration (godwit's status 125, the exception and where).
#[test]
fn a_guest_that_crashes_mid_migration_fails_it_clearly_and_leaves_nothing_behind() {
    if !kvm_available() {
        return;
    }
    ends_mid_migration(End {
        tag: "crashes",
        args: &["end=crash"],
        why: "its guest crashed: ",
        code: 125,
        says: "exception 6 (#UD invalid opcode) at rip=",
    });
}
