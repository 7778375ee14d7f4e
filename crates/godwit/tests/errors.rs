//! Everything a user can get wrong ends in a clear message and a non-zero exit, never a
//! panic or a hang.

mod common;
use common::*;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(60);

fn fails_with(args: &[&str], code: i32, needle: &str) {
    let o = run(args, LIMIT);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(code), "godwit {args:?}: {err}");
    assert!(
        err.contains(needle),
        "godwit {args:?}: expected {needle:?} in:\n{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn bad_arguments() {
    if !kvm_available() {
        return;
    }
    fails_with(
        &["run", "no-such-guest"],
        1,
        "no built-in guest or file named \"no-such-guest\"",
    );
    fails_with(&["run", "--vcpus", "0"], 1, "vCPU count must be 1 to 8");
    fails_with(&["run", "--vcpus", "9"], 1, "vCPU count must be 1 to 8");
    fails_with(&["run", "--memory", "8"], 1, "at least 16 MiB");
    fails_with(
        &["run", "--console", "tty"],
        1,
        "--console must be stdout, null or file:PATH",
    );
    fails_with(&["run", "--memory", "lots"], 2, "invalid value");
    fails_with(&["run", "--initrd", "/x"], 2, "--kernel");
    fails_with(
        &["run", "--dirty-log", "rings"],
        2,
        "use bitmap, ring or ring:ENTRIES",
    );
    fails_with(
        &["run", "--dirty-log", "ring:1000"],
        2,
        "must be a power of two",
    );
    fails_with(
        &["run", "--incoming", "tcp:127.0.0.1:0", "--prefault"],
        1,
        "--prefault with --incoming needs --memory",
    );
    for at in [
        &["run", "--gpu", "GW8-3C"][..],
        &["run", "--incoming", "tcp:127.0.0.1:0", "--gpu", "GW8-3C"],
    ] {
        fails_with(
            at,
            1,
            "--gpu: unknown GPU profile \"GW8-3C\" (see `godwit gpu profiles`)",
        );
    }
}

#[test]
fn more_memory_than_the_host_has() {
    if !kvm_available() {
        return;
    }
    // 50 GiB: within what godwit supports, beyond this 24 GiB machine.
    let host_mib: u64 = read(std::path::Path::new("/proc/meminfo"))
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap()
        / 1024;
    let ask = (host_mib + 1024).to_string();
    if host_mib + 1024 <= 60 * 1024 {
        fails_with(&["run", "--memory", &ask], 1, "but this host has only");
        // Checked before a page is touched.
        fails_with(
            &["run", "--memory", &ask, "--prefault"],
            1,
            "but this host has only",
        );
    }
    // All of the host's memory: within what it has, never all available at once (the
    // kernel's own is not). Touching it would end in the OOM killer, not an error.
    if host_mib <= 60 * 1024 {
        let all = host_mib.to_string();
        fails_with(
            &["run", "--memory", &all, "--prefault"],
            1,
            &format!("cannot prefault {host_mib} MiB of guest memory: this host has"),
        );
    }
    fails_with(
        &["run", "--memory", "1000000"],
        1,
        "more than godwit supports",
    );
}

#[test]
fn missing_and_malformed_images() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("images");
    let junk = dir.path("junk.bin");
    std::fs::write(&junk, vec![0x5a; 100_000]).unwrap();
    let j = junk.to_str().unwrap();
    fails_with(&["run", j], 1, "is not a godwit guest image");
    fails_with(
        &["run", "--kernel", j],
        1,
        "neither an ELF vmlinux nor a bzImage",
    );
    fails_with(
        &["run", "--kernel", "/nonexistent/vmlinux"],
        1,
        "cannot read image /nonexistent/vmlinux",
    );
    let empty = dir.path("empty");
    std::fs::write(&empty, b"").unwrap();
    fails_with(
        &["run", "--kernel", empty.to_str().unwrap()],
        1,
        "too short",
    );
    // A godwit image cut in half: recognised by its note, refused by the loader.
    let img = godwit_guest::image("heartbeat").unwrap();
    let cut = dir.path("cut.elf");
    std::fs::write(&cut, &img[..0x8000]).unwrap();
    fails_with(&["run", cut.to_str().unwrap()], 1, "cannot load");
    // A directory is not an image.
    fails_with(&["run", "--kernel", dir.0.to_str().unwrap()], 1, "");
}

#[test]
fn guest_faults_end_the_vm_with_a_report() {
    if !kvm_available() {
        return;
    }
    for (kind, what) in [
        ("ud", "exception 6 (#UD invalid opcode) at rip="),
        ("pf", "exception 14 (#PF page fault) at rip="),
        ("gp", "exception 13 (#GP general protection)"),
        ("div", "exception 0 (#DE divide error)"),
        ("triple", "triple fault (KVM_EXIT_SHUTDOWN)"),
    ] {
        let arg = format!("kind={kind}");
        fails_with(&["run", "fault", "--", &arg], 125, what);
    }
    let o = run(&["run", "fault", "--", "kind=pf"], LIMIT);
    assert!(
        stderr(&o).contains("address=0x4000000000"),
        "{}",
        stderr(&o)
    );
}

/// Runs godwit in a private mount namespace where /dev/kvm is missing, then as a user who
/// may not open it.
#[test]
fn no_kvm_device_or_no_permission() {
    if !kvm_available() {
        return;
    }
    let exe = env!("CARGO_BIN_EXE_godwit");
    let has = |tool: &str| {
        std::process::Command::new("which")
            .arg(tool)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    assert!(
        has("unshare") && has("setpriv"),
        "util-linux (unshare, setpriv) is needed for this test"
    );
    let o = std::process::Command::new("unshare")
        .args(["--mount", "sh", "-c"])
        .arg(format!("mount -t tmpfs none /dev && exec {exe} run"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot open /dev/kvm") && err.contains("No such file"),
        "{err}"
    );

    let o = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            exe,
            "run",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot open /dev/kvm") && err.contains("ermission denied"),
        "{err}"
    );
}

/// Inputs are checked before they are read: a device that never ends, a FIFO nobody
/// writes, a directory; and a path given for a socket is never a user's file deleted.
#[test]
fn endless_blocking_and_wrong_kind_inputs_are_refused() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("inputs");
    let fifo = dir.fifo("fifo");
    let f = fifo.to_str().unwrap();
    fails_with(
        &["run", "/dev/zero"],
        1,
        "a character device, not a regular file",
    );
    fails_with(&["run", f], 1, "a FIFO, not a regular file");
    fails_with(
        &["run", "--kernel", "/dev/zero"],
        1,
        "a character device, not a regular file",
    );
    fails_with(&["run", "--kernel", f], 1, "a FIFO, not a regular file");
    let kernel = std::fs::read_dir("/boot")
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .expect("no /boot/vmlinuz-*: install linux-image-amd64 (the README's test command does)");
    let k = kernel.to_str().unwrap();
    for initrd in ["/dev/zero", f] {
        fails_with(
            &["run", "--memory", "64", "--kernel", k, "--initrd", initrd],
            1,
            "not a regular file",
        );
    }
    let big = dir.path("big.img");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(128 << 20)
        .unwrap();
    fails_with(
        &[
            "run",
            "--memory",
            "64",
            "--kernel",
            k,
            "--initrd",
            big.to_str().unwrap(),
        ],
        1,
        "the limit here is",
    );

    // Receiving: a snapshot path that is a FIFO is refused, not waited on; a Unix
    // socket path holding a file is refused and the file kept.
    fails_with(
        &["run", "--incoming", &format!("file:{f}")],
        1,
        "a FIFO, not a regular file",
    );
    let notes = dir.path("notes.txt");
    std::fs::write(&notes, "precious").unwrap();
    fails_with(
        &["run", "--incoming", &format!("unix:{}", notes.display())],
        1,
        "not a socket; refusing to replace it",
    );
    assert_eq!(read(&notes), "precious");
    // How a snapshot is read is said only for a snapshot.
    fails_with(
        &["run", "--incoming", "tcp:127.0.0.1:0", "--restore", "eager"],
        1,
        "--restore is for --incoming file:",
    );
}

/// Errors name the path and say what is wrong with it.
#[test]
fn errors_name_what_is_wrong_with_a_path() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("paths");
    let file = dir.path("file");
    std::fs::write(&file, "x").unwrap();
    let f = file.to_str().unwrap();
    fails_with(
        &["run", "--gpu", "GW8-1C", "--gpu-dir", f, "heartbeat"],
        1,
        "is not a directory",
    );
    let missing = dir.path("no/such/console.log");
    fails_with(
        &[
            "run",
            "--console",
            &format!("file:{}", missing.display()),
            "heartbeat",
        ],
        1,
        &format!("console: {}", missing.display()),
    );
    // A source migrating to a Unix path that is a directory.
    let sock = dir.path("api.sock");
    let _vm = api_vm(&sock);
    let to = format!("unix:{}", dir.0.display());
    let o = run(
        &[
            "migrate",
            "--api-socket",
            sock.to_str().unwrap(),
            "--to",
            &to,
        ],
        LIMIT,
    );
    assert!(
        stderr(&o).contains("a directory, not a socket"),
        "{}",
        stderr(&o)
    );
}
