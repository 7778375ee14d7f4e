//! Shared by the integration tests: run the real godwit binary against real KVM.
#![allow(dead_code)]

pub mod gpuhost;
pub mod mig;
pub mod seccomp;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn godwit() -> Command {
    Command::new(env!("CARGO_BIN_EXE_godwit"))
}

/// KVM tests fail loudly without /dev/kvm, unless GODWIT_SKIP_KVM_TESTS=1 says to skip.
pub fn kvm_available() -> bool {
    match std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => true,
        Err(e) if std::env::var("GODWIT_SKIP_KVM_TESTS").as_deref() == Ok("1") => {
            eprintln!("skipping: /dev/kvm: {e} (GODWIT_SKIP_KVM_TESTS=1)");
            false
        }
        Err(e) => panic!("/dev/kvm is not usable: {e}. These tests need KVM; set GODWIT_SKIP_KVM_TESTS=1 to skip them."),
    }
}

/// Runs godwit to completion with a time limit. Its output is read while it runs, so a
/// report larger than a pipe's buffer cannot stall it.
pub fn run(args: &[&str], limit: Duration) -> Output {
    run_env(args, &[], limit)
}

/// `run` with more environment variables.
pub fn run_env(args: &[&str], env: &[(&str, &str)], limit: Duration) -> Output {
    let mut child = godwit()
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn godwit");
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            buf
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("piped")));
    let err = drain(Box::new(child.stderr.take().expect("piped")));
    let end = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break Some(s);
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let (stdout, stderr) = (out.join().unwrap(), err.join().unwrap());
    match status {
        Some(status) => Output {
            status,
            stdout,
            stderr,
        },
        None => panic!(
            "godwit {args:?} did not finish within {limit:?}\nstdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        ),
    }
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A scratch directory removed at the end of the test.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("godwit-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
    /// A FIFO named `name` in the directory (nobody writes it).
    pub fn fifo(&self, name: &str) -> PathBuf {
        let p = self.path(name);
        let ok = Command::new("mkfifo").arg(&p).status().unwrap().success();
        assert!(ok, "mkfifo {}", p.display());
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Polls `f` until it returns Some or `limit` passes.
pub fn wait_for<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// Kills a child on drop so that a failed test leaves no VM behind.
pub struct Reaper(pub Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts a heartbeat VM serving `sock`; returns it once the socket answers.
pub fn api_vm(sock: &std::path::Path) -> Reaper {
    let child = godwit()
        .args(["run", "--api-socket"])
        .arg(sock)
        .args(["--console", "null", "heartbeat", "--", "count=0"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let vm = Reaper(child);
    assert!(
        wait_for(Duration::from_secs(10), || godwit_vmm::api::call(
            sock, "GET", "vmm.ping"
        )
        .ok())
        .is_some(),
        "the API never answered"
    );
    vm
}

/// The scheduler slice (ns) of each thread of process `pid` named `name`, as
/// /proc/PID/task/TID/sched reports it. None where the kernel cannot set a thread's
/// slice (before Linux 6.12) or does not report it (no scheduler debug info).
pub fn thread_slices(pid: u32, name: &str) -> Option<Vec<u64>> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    let mut v = release
        .trim()
        .split(['.', '-'])
        .map(|x| x.parse::<u32>().ok());
    if (v.next()??, v.next()??) < (6, 12) {
        return None;
    }
    if !std::fs::read_to_string("/proc/self/sched")
        .ok()?
        .contains("se.slice")
    {
        return None;
    }
    let mut slices = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let t = t.ok()?.path();
        let comm = std::fs::read_to_string(t.join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let sched = std::fs::read_to_string(t.join("sched")).ok()?;
        let slice = sched
            .lines()
            .find(|l| l.starts_with("se.slice"))?
            .split(':')
            .nth(1)?
            .trim()
            .parse()
            .ok()?;
        slices.push(slice);
    }
    Some(slices)
}
