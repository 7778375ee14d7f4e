//! Linux guests. On this PVM host the kernel's ring-0 code is emulated, so what is checked
//! here is that Debian's kernel loads and prints its banner on the serial console; a full
//! boot needs a host with VMX/SVM (see README).

mod common;
use common::*;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// Debian's installed kernel (apt linux-image-amd64; the README's test command installs it).
fn debian_kernel() -> PathBuf {
    let mut k: Vec<PathBuf> = std::fs::read_dir("/boot")
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    k.retain(|p| {
        p.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
    });
    k.sort();
    k.pop()
        .expect("no /boot/vmlinuz-*: install linux-image-amd64 (the README's test command does)")
}

/// The uncompressed vmlinux inside a bzImage: the xz stream after the setup code.
fn extract_vmlinux(bz: &std::path::Path, out: &std::path::Path) {
    let data = std::fs::read(bz).unwrap();
    let magic = b"\xfd7zXZ\x00";
    let at = data
        .windows(magic.len())
        .position(|w| w == magic)
        .expect("the kernel is not xz-compressed");
    let mut xz = std::process::Command::new("xz")
        .args(["-dc", "--single-stream"])
        .stdin(Stdio::piped())
        .stdout(std::fs::File::create(out).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .expect("xz (apt xz-utils)");
    use std::io::Write;
    let _ = xz.stdin.take().unwrap().write_all(&data[at..]);
    xz.wait().unwrap();
    let elf = std::fs::read(out).unwrap();
    assert_eq!(&elf[..4], b"\x7fELF", "extracted kernel is not an ELF");
}

const CMDLINE: &str = "console=ttyS0 earlycon=uart8250,io,0x3f8 clearcpuid=cx16,smap,smep noxsave mitigations=off nopti";

#[test]
fn debian_kernel_prints_its_banner() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("linux");
    let vmlinux = dir.path("vmlinux");
    extract_vmlinux(&debian_kernel(), &vmlinux);
    let log = dir.path("console.log");
    let sock = dir.path("api.sock");
    let child = godwit()
        .args(["run", "--memory", "512", "--kernel"])
        .arg(&vmlinux)
        .args(["--cmdline", CMDLINE, "--api-socket"])
        .arg(&sock)
        .arg("--console")
        .arg(format!("file:{}", log.display()))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut vm = Reaper(child);
    let t0 = Instant::now();
    let found = wait_for(Duration::from_secs(240), || {
        let text = read(&log);
        if let Some(status) = vm.0.try_wait().unwrap() {
            panic!("godwit exited early ({status}):\n{text}");
        }
        let banner = text
            .lines()
            .find(|l| l.contains("Linux version ") && l.contains("debian"))?;
        text.contains("Command line: console=ttyS0")
            .then(|| banner.to_string())
    });
    let banner = found.unwrap_or_else(|| panic!("no Linux banner within 240 s:\n{}", read(&log)));
    eprintln!("banner after {:?}: {banner}", t0.elapsed());
    // The VM answers its API while Linux runs, and stops cleanly.
    let o = run(
        &["info", "--api-socket", sock.to_str().unwrap()],
        Duration::from_secs(30),
    );
    assert!(stdout(&o).contains("\"kind\": \"Linux\""), "{}", stdout(&o));
    assert!(run(
        &["shutdown", "--api-socket", sock.to_str().unwrap()],
        Duration::from_secs(30)
    )
    .status
    .success());
    assert!(wait_for(Duration::from_secs(10), || vm.0.try_wait().unwrap()).is_some());
}

#[test]
fn debian_bzimage_loads_and_starts() {
    if !kvm_available() {
        return;
    }
    // A bzImage decompresses itself in ring 0: minutes under PVM. Check that it loads and
    // runs without a fault for a few seconds.
    let dir = TempDir::new("bzimage");
    let sock = dir.path("api.sock");
    let child = godwit()
        .args(["run", "--memory", "512", "--console", "null", "--kernel"])
        .arg(debian_kernel())
        .arg("--api-socket")
        .arg(&sock)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut vm = Reaper(child);
    assert!(wait_for(Duration::from_secs(10), || sock.exists().then_some(())).is_some());
    std::thread::sleep(Duration::from_secs(3));
    assert!(vm.0.try_wait().unwrap().is_none(), "godwit stopped");
    let o = run(
        &["info", "--api-socket", sock.to_str().unwrap()],
        Duration::from_secs(30),
    );
    assert!(stdout(&o).contains("BzImage"), "{}", stdout(&o));
    assert!(stdout(&o).contains("\"state\": \"running\""));
    assert!(run(
        &["shutdown", "--api-socket", sock.to_str().unwrap()],
        Duration::from_secs(30)
    )
    .status
    .success());
    let status =
        wait_for(Duration::from_secs(10), || vm.0.try_wait().unwrap()).expect("did not stop");
    assert!(status.success());
}
