//! `godwit demo`: what godwit is for, on this machine. A VM with a virtual GPU function
//! trains (gpu-train: a Jacobi solve on the GPU) and is live-migrated, mid-training, to
//! a second godwit process; it finishes there with exactly the iteration count and
//! solution hash of a run that was never moved.

use crate::cli::{DemoArgs, MigrateArgs};
use crate::run::fail;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(300);

/// Child processes are killed when the demo ends early.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// Waits until `f` gives a value, the process `child` ends, or the limit passes.
fn wait<T>(what: &str, child: &mut Child, mut f: impl FnMut() -> Option<T>) -> Result<T, String> {
    let end = Instant::now() + LIMIT;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if let Ok(Some(s)) = child.try_wait() {
            if let Some(v) = f() {
                return Ok(v);
            }
            return Err(format!("{what}: the process ended ({s})"));
        }
        if Instant::now() > end {
            return Err(format!("{what}: nothing after {LIMIT:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The answer gpu-train printed: "iterations=N ... hash=0x...".
fn answer(log: &str) -> Option<(String, String)> {
    let l = log.lines().find(|l| l.contains("gpu-train: converged"))?;
    let field = |k: &str| {
        l.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .map(String::from)
    };
    Some((field("iterations=")?, field("hash=")?))
}

fn godwit() -> Result<Command, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find godwit itself: {e}"))?;
    let mut c = Command::new(exe);
    c.stdin(Stdio::null()).stdout(Stdio::null());
    Ok(c)
}

fn demo(a: &DemoArgs) -> Result<bool, String> {
    let dir = std::env::temp_dir().join(format!("godwit-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let p = |name: &str| -> PathBuf { dir.join(name) };
    let gpu_dir = a.gpu_dir.clone().unwrap_or_else(|| p("gpu"));
    let gd = gpu_dir.to_string_lossy().to_string();
    let train = [
        "gpu-train".to_string(),
        "--".into(),
        format!("grid={}", a.grid),
        "tol-exp=10".into(),
    ];
    outln!(
        "godwit demo: a VM with a {} virtual GPU function trains a Jacobi solver on its GPU\n\
         (gpu-train, grid {}x{}) and is live-migrated mid-training to a second godwit process.\n\
         GPU host: {gd}; logs: {}\n",
        a.profile,
        a.grid,
        a.grid,
        dir.display()
    );
    let mut kids = Children(Vec::new());

    // 1. The reference: the same training, never moved.
    let t = Instant::now();
    let mut r = godwit()?
        .args(["run", "--gpu", &a.profile, "--gpu-dir", &gd, "--console"])
        .arg(format!("file:{}", p("reference.log").display()))
        .args(&train)
        .stderr(std::fs::File::create(p("reference.err")).map_err(|e| e.to_string())?)
        .spawn()
        .map_err(|e| format!("cannot start the reference VM: {e}"))?;
    let reference = wait("the reference run", &mut r, || {
        answer(&read(&p("reference.log")))
    })
    .map_err(|e| format!("{e}\n{}", read(&p("reference.err"))))?;
    let _ = r.wait();
    outln!(
        "[1/4] reference run, not migrated: converged iterations={} hash={} ({:.1} s)",
        reference.0,
        reference.1,
        t.elapsed().as_secs_f64()
    );

    // 2. A destination waiting, and the training VM.
    let dst = godwit()?
        .args(["run", "--incoming", "tcp:127.0.0.1:0", "--gpu-dir", &gd])
        .arg("--console")
        .arg(format!("file:{}", p("destination.log").display()))
        .arg("--api-socket")
        .arg(p("destination.sock"))
        .stderr(std::fs::File::create(p("destination.err")).map_err(|e| e.to_string())?)
        .spawn()
        .map_err(|e| format!("cannot start the destination: {e}"))?;
    kids.0.push(dst);
    let addr = wait("the destination", &mut kids.0[0], || {
        read(&p("destination.err"))
            .split_inclusive('\n')
            .find_map(|l| {
                l.strip_suffix('\n')?
                    .strip_prefix("godwit: waiting for a migration on ")
                    .filter(|a| !a.is_empty())
                    .map(String::from)
            })
    })?;
    let src = godwit()?
        .args(["run", "--gpu", &a.profile, "--gpu-dir", &gd, "--api-socket"])
        .arg(p("source.sock"))
        .arg("--console")
        .arg(format!("file:{}", p("source.log").display()))
        .args(&train)
        .stderr(std::fs::File::create(p("source.err")).map_err(|e| e.to_string())?)
        .spawn()
        .map_err(|e| format!("cannot start the source VM: {e}"))?;
    kids.0.push(src);
    outln!(
        "[2/4] source VM (pid {}) training; destination (pid {}) waiting on {addr}",
        kids.0[1].id(),
        kids.0[0].id()
    );
    let progress = wait("the source's training", &mut kids.0[1], || {
        read(&p("source.log"))
            .lines()
            .find(|l| l.contains(&format!("iteration {} ", a.migrate_at)))
            .map(String::from)
    })
    .map_err(|e| format!("{e}\n{}", read(&p("source.err"))))?;
    outln!("      source guest: {progress}");

    // 3. The live migration, with its progress and report.
    outln!(
        "[3/4] live migration to {addr}, downtime limit {} ms:",
        a.downtime_ms
    );
    let code = crate::migrate::migrate(MigrateArgs {
        api_socket: p("source.sock"),
        to: addr,
        downtime_ms: a.downtime_ms,
        mode: "precopy".into(),
        max_bandwidth: None,
        connections: None,
        gpu_precopy: crate::cli::OnOff::On,
        tls_dir: None,
        insecure: false,
        page_checks: Default::default(),
        vcpu_priority: Default::default(),
        migration_priority: Default::default(),
        json: false,
    });
    if code != ExitCode::SUCCESS {
        return Err("the migration failed (see above)".into());
    }

    // 4. Training ends on the destination.
    let arrived = wait("the destination's training", &mut kids.0[0], || {
        answer(&read(&p("destination.log")))
    })
    .map_err(|e| format!("{e}\n{}", read(&p("destination.err"))))?;
    let _ = kids.0[0].wait();
    let resumed = read(&p("destination.log"))
        .lines()
        .next()
        .unwrap_or_default()
        .to_string();
    outln!("[4/4] destination guest, first line: {resumed}");
    outln!(
        "      destination guest: converged iterations={} hash={}",
        arrived.0,
        arrived.1
    );
    let same = arrived == reference;
    outln!(
        "\nresult: {}",
        if same {
            "the migrated training ended with the same iteration count and hash as the run that was never moved"
        } else {
            "MISMATCH: the migrated training ended differently from the reference"
        }
    );
    if a.gpu_dir.is_none() && same {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(same)
}

pub fn run(a: DemoArgs) -> ExitCode {
    match demo(&a) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => fail(e),
    }
}
