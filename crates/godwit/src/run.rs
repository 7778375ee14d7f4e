//! `godwit run` and the API client commands.

use crate::cli::{GuestsCmd, RunArgs};
use crate::output::say;
use godwit_migration::api::MigrationApi;
use godwit_migration::destination::RestoreMode;
use godwit_migration::{Host, Incoming, Listener, Target};
use godwit_vmm::api::{ApiServer, Extension, Limits};
use godwit_vmm::{Console, Payload, Vm, VmConfig, VmExit};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

const DEFAULT_MEMORY_MIB: u64 = 256;
/// The largest godwit guest image read (built-in ones are tens of KiB).
const MAX_IMAGE: u64 = 64 << 20;

/// Exit status when the guest crashed (its own codes are 0..=255 and pass through).
pub const EXIT_GUEST_CRASH: u8 = 125;
/// Exit status when godwit itself failed.
pub const EXIT_VMM_ERROR: u8 = 1;

pub fn fail(msg: impl std::fmt::Display) -> ExitCode {
    say(&format!("error: {msg}"));
    ExitCode::from(EXIT_VMM_ERROR)
}

fn console(spec: &str) -> Result<Console, String> {
    match spec {
        "stdout" => Ok(Console::Stdout),
        "null" => Ok(Console::Null),
        s => match s.strip_prefix("file:") {
            Some(p) if !p.is_empty() => Ok(Console::File(p.into())),
            _ => Err(format!(
                "--console must be stdout, null or file:PATH (got {s:?})"
            )),
        },
    }
}

fn payload(a: &RunArgs) -> Result<Payload, String> {
    if let Some(kernel) = &a.kernel {
        return Ok(Payload::Linux {
            kernel: kernel.clone(),
            initrd: a.initrd.clone(),
            cmdline: a.cmdline.clone(),
        });
    }
    let args = a.guest_args.join(" ");
    let guest = a.guest.as_deref().unwrap_or("heartbeat");
    if let Some(image) = godwit_guest::image(guest) {
        return Ok(Payload::Guest {
            name: guest.to_string(),
            image: image.to_vec(),
            args,
        });
    }
    let path = Path::new(guest);
    if !path.exists() {
        let names: Vec<_> = godwit_guest::names().collect();
        return Err(format!(
            "no built-in guest or file named {guest:?} (built-in: {})",
            names.join(", ")
        ));
    }
    let image = godwit_vmm::files::read_regular(path, MAX_IMAGE)
        .map_err(|e| format!("cannot read image {}: {e}", path.display()))?;
    if !godwit_vmm::loader::is_godwit_guest(&image) {
        return Err(format!(
            "{} is not a godwit guest image (for a Linux kernel use --kernel)",
            path.display()
        ));
    }
    Ok(Payload::Guest {
        name: path.display().to_string(),
        image,
        args,
    })
}

/// Removes the API socket if this process claimed it and fails before serving it.
struct SocketGuard(Option<std::path::PathBuf>);

impl Drop for SocketGuard {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

pub fn run(a: RunArgs) -> ExitCode {
    if let Err(e) = crate::seccomp::install(a.seccomp) {
        return fail(e);
    }
    let stopper = match crate::signals::install() {
        Ok(s) => s,
        Err(e) => return fail(format!("cannot watch for signals: {e}")),
    };
    let console = match console(&a.console) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let incoming = match a.incoming.as_deref().map(Target::parse).transpose() {
        Ok(t) => t,
        Err(e) => return fail(format!("--incoming: {e}")),
    };
    if let Some(Err(e)) = a.id.as_deref().map(godwit_vmm::config::check_id) {
        return fail(format!("--id: {e}"));
    }
    if a.gpu_index.is_some() && a.gpu.is_none() && incoming.is_none() {
        return fail("--gpu-index is for --gpu PROFILE or --incoming");
    }
    if incoming.is_some() && !a.guest_args.is_empty() {
        return fail("guest arguments come from the source with --incoming");
    }
    if let Some(p) = a.gpu.as_deref() {
        if godwit_gpu::profile::profile(p).is_none() {
            return fail(format!(
                "--gpu: unknown GPU profile {p:?} (see `godwit gpu profiles`)"
            ));
        }
    }
    if a.prefault && incoming.is_some() && a.memory.is_none() {
        return fail(
            "--prefault with --incoming needs --memory: the memory is made before the source \
             says how much it has",
        );
    }
    let payload = match &incoming {
        Some(_) => None,
        None => match payload(&a) {
            Ok(p) => Some(p),
            Err(e) => return fail(e),
        },
    };
    // Claim the API socket before building anything: a second godwit on the same socket
    // must fail before it creates a VM. A booted VM's API is served once the VM has
    // started (requests wait in the socket's queue meanwhile, a short time); a destination's
    // from the start, answering 503 with the reason until the source has sent the VM,
    // so that a client never hangs on a godwit that waits for a source.
    let listener = match &a.api_socket {
        Some(p) => match ApiServer::bind(p) {
            Ok(l) => {
                stopper.remove_on_signal(p.clone());
                Some((l, p.clone()))
            }
            Err(e) => return fail(e),
        },
        None => None,
    };
    if let Some(Target::Unix(p)) = &incoming {
        stopper.remove_on_signal(p.clone());
    }
    let mut api = None;
    let mut listener = listener;
    if let (Some(t), Some((l, p))) = (&incoming, listener.take_if(|_| incoming.is_some())) {
        let why = format!("no VM yet: this godwit is waiting for an incoming migration on {t}");
        match ApiServer::start(l, &p, Limits::default(), &why) {
            Ok(s) => api = Some(s),
            Err(e) => return fail(e.to_string()),
        }
    }
    // Until a server owns the socket, this removes it on every early return.
    let guard = SocketGuard(listener.as_ref().map(|(_, p)| p.clone()));
    let pending = match (incoming, payload) {
        (Some(t), _) => {
            receive(&t, &a, console, api.as_ref()).map(|i| Pending::Incoming(Box::new(i)))
        }
        (None, Some(payload)) => {
            let memory_mib = a.memory.unwrap_or(DEFAULT_MEMORY_MIB);
            prefault(&a, memory_mib).and_then(|prefaulted| {
                Vm::create(VmConfig {
                    memory_mib,
                    vcpus: a.vcpus.unwrap_or(1),
                    payload,
                    console,
                    gpu: a
                        .gpu
                        .as_ref()
                        .map(|profile| godwit_vmm::config::GpuRequest {
                            profile: profile.clone(),
                            manager_dir: a.gpu_dir.dir(),
                            vm_name: vm_name(&a),
                            gpu_index: a.gpu_index,
                            prefetch: a.gpu_prefetch,
                        }),
                    dirty_log: a.dirty_log,
                    id: a.id.clone(),
                    prefaulted,
                })
                .map_err(|e| e.to_string())
                .map(Pending::Booted)
            })
        }
        (None, None) => Err("nothing to run".into()),
    };
    let pending = match pending {
        Ok(p) => p,
        Err(e) => return fail(e),
    };
    let handle = match &pending {
        Pending::Booted(vm) => vm.handle(),
        Pending::Incoming(inc) => inc.vm.handle(),
    };
    let migration = Arc::new(MigrationApi::default());
    stopper.watch(handle.clone(), migration.status.clone());
    let ext: Arc<dyn Extension> = migration.clone();
    // A booted VM starts before its API serves (requests wait in the socket's queue
    // meanwhile), so that no client is ever told it has not started: Nova read such an
    // answer as a power state of "pending" and refused to live-migrate the VM.
    let mut pending = pending;
    if let Pending::Booted(vm) = &mut pending {
        if let Err(e) = vm.start() {
            vm.wait();
            return fail(e);
        }
    }
    // Kept to the end: dropping the server stops it.
    let _api = match (api, listener) {
        // A destination's server runs already: from now on it answers for the VM.
        (Some(api), _) => {
            api.serve(handle, Some(ext));
            Some(api)
        }
        // A booted VM's is started with the VM to serve.
        (None, Some((l, p))) => {
            match ApiServer::start_serving(l, &p, Limits::default(), handle, Some(ext)) {
                Ok(s) => Some(s),
                Err(e) => {
                    if let Pending::Booted(vm) = &mut pending {
                        vm.handle().ctl.request_exit(VmExit::Error(e.to_string()));
                        vm.wait();
                    }
                    return fail(e.to_string());
                }
            }
        }
        (None, None) => None,
    };
    // The server owns the socket from here, and removes it when it stops.
    std::mem::forget(guard);
    let (mut vm, postcopy) = match pending {
        Pending::Booted(vm) => (vm, None),
        Pending::Incoming(inc) => match inc.start() {
            Ok(x) => x,
            Err(e) => return fail(e),
        },
    };
    if let Some(pc) = &postcopy {
        migration.set_incoming(pc.clone());
    }
    if let Some(pc) = &postcopy {
        // A vCPU that waits on a page still at the source leaves only once it stops
        // waiting: the source may be gone for good, and the VM ends either way.
        vm.handle().ctl.wait_exit_requested();
        if pc.left() > 0 {
            pc.abandon();
        }
    }
    let exit = vm.wait();
    if let Some(pc) = postcopy.filter(|pc| pc.left() > 0) {
        // The VM ended before all of its memory arrived: the source keeps nothing.
        pc.vm_ended(&format!("{exit:?}"));
    }
    match exit {
        VmExit::Guest(code) => ExitCode::from(code as u8),
        VmExit::Shutdown => ExitCode::SUCCESS,
        VmExit::Migrated(to) => {
            say(&format!("the VM moved to {to}"));
            ExitCode::SUCCESS
        }
        VmExit::Crash(m) => {
            say(&format!("guest crashed: {m}"));
            ExitCode::from(EXIT_GUEST_CRASH)
        }
        VmExit::Error(m) => fail(m),
        VmExit::Signal(s) => {
            say(&format!("stopped by {}", crate::signals::name(s)));
            ExitCode::from((128 + s) as u8)
        }
    }
}

/// How this process's VM is named in `godwit gpu status`: its id when it has one.
fn vm_name(a: &RunArgs) -> String {
    if let Some(id) = &a.id {
        return id.clone();
    }
    match &a.api_socket {
        Some(p) => format!("{} (pid {})", p.display(), std::process::id()),
        None => format!("pid {}", std::process::id()),
    }
}

/// A VM built but not started: booted from a payload, or received from a source.
enum Pending {
    Booted(Vm),
    Incoming(Box<Incoming>),
}

/// `--prefault`: `mib` of guest memory, every page touched, and with `--gpu` the VRAM
/// of its profile; nothing without the flag.
fn prefault(a: &RunArgs, mib: u64) -> Result<godwit_vmm::memory::Prefaulted, String> {
    if !a.prefault {
        return Ok(Default::default());
    }
    let t = std::time::Instant::now();
    let bytes = mib
        .checked_mul(godwit_vmm::memory::MIB)
        .ok_or("--memory: the size overflows")?;
    let p = godwit_vmm::memory::Prefaulted::new(bytes).map_err(|e| format!("--prefault: {e}"))?;
    // Always said (as the line a destination waits on): asked for, it can take seconds.
    say(&format!(
        "guest memory prefaulted: {mib} MiB in {:.0} ms",
        t.elapsed().as_secs_f64() * 1e3
    ));
    let Some(profile) = a.gpu.as_deref().and_then(godwit_gpu::profile::profile) else {
        return Ok(p);
    };
    let t = std::time::Instant::now();
    let p = p
        .with_vram(profile.framebuffer)
        .map_err(|e| format!("--prefault: {e}"))?;
    say(&format!(
        "VRAM prefaulted: {} MiB ({}) in {:.0} ms",
        profile.framebuffer / godwit_vmm::memory::MIB,
        profile.name,
        t.elapsed().as_secs_f64() * 1e3
    ));
    Ok(p)
}

/// Waits on `t` for a source and loads the VM it sends.
fn receive(
    t: &Target,
    a: &RunArgs,
    console: Console,
    api: Option<&ApiServer>,
) -> Result<Incoming, String> {
    let tls = match (t, &a.tls_dir) {
        (Target::Tcp(_), Some(d)) => Some(
            godwit_migration::tls::Creds::server(d)
                .map_err(|e| format!("--tls-dir {}: {e}", d.display()))?,
        ),
        (_, Some(_)) => return Err("--tls-dir is for --incoming tcp:".into()),
        (Target::Tcp(addr), None) if !a.insecure => {
            let host = addr.rsplit_once(':').map_or(addr.as_str(), |(h, _)| h);
            if !godwit_migration::tls::is_loopback(host) {
                return Err(format!(
                    "--incoming {t}: plain TCP on an address that is not loopback would let \
                     anyone who reaches it send a VM, and carry guest memory in the clear; give \
                     --tls-dir DIR (`godwit tls-creds` makes one) or, on a network you trust, \
                     --insecure"
                ));
            }
            None
        }
        _ => None,
    };
    use crate::cli::RestoreArg;
    // Prefaulted memory is shared: pages go there through minor faults.
    let lazy = || godwit_vmm::migratable::lazy::postcopy_support(a.prefault);
    let how = match (t, a.restore) {
        (Target::File(_), Some(RestoreArg::Eager)) => RestoreMode::Eager,
        (Target::File(_), Some(RestoreArg::Lazy)) => {
            lazy().map_err(|why| format!("--restore lazy: {why}; or --restore eager"))?;
            RestoreMode::Lazy
        }
        // Lazy where it can be: a restore that cannot catch page faults reads the whole
        // snapshot first rather than fail once it has built the VM.
        (Target::File(_), None) => match lazy() {
            Ok(()) => RestoreMode::Lazy,
            Err(why) => {
                say(&format!("restoring eagerly (all memory read first): {why}"));
                RestoreMode::Eager
            }
        },
        (_, Some(_)) => return Err("--restore is for --incoming file:".into()),
        (_, None) => RestoreMode::Lazy,
    };
    // Before listening: whoever waits for the address (a manager, the bench) then knows
    // the memory is in place.
    let prefaulted = match a.memory {
        Some(m) => prefault(a, m)?,
        None => Default::default(),
    };
    let l = Listener::bind_with(t, tls).map_err(|e| format!("--incoming {t}: {e}"))?;
    if let Some(api) = api {
        api.set_waiting(&format!(
            "no VM yet: this godwit is waiting for an incoming migration on {}",
            l.local()
        ));
        api.set_incoming(&l.local().to_string());
    }
    if !t.is_file() {
        say(&format!("waiting for a migration on {}", l.local()));
        // Said now, where whoever runs it looks: a source learns it at the handshake.
        if let Err(why) = lazy() {
            say(&format!("post-copy cannot come here, pre-copy can: {why}"));
        }
    }
    let host = Host {
        memory_mib: a.memory,
        vcpus: a.vcpus,
        dirty_log: a.dirty_log,
        gpu_dir: Some(a.gpu_dir.dir()),
        name: vm_name(a),
        id: a.id.clone(),
        gpu_index: a.gpu_index,
        gpu_profile: a.gpu.clone(),
        gpu_prefetch: a.gpu_prefetch,
        prefaulted,
    };
    let mut inc = godwit_migration::destination::receive_with(&l, &host, console, how)
        .map_err(|e| e.to_string())?;
    tracing::info!(guest = inc.source_guest, ms = inc.receive_ms, "VM received");
    // In post-copy a source that loses its connections comes back here.
    inc.keep_for_recovery(l);
    Ok(inc)
}

pub fn api_call(socket: &Path, method: &str, endpoint: &str) -> ExitCode {
    api_call_with(socket, method, endpoint, "")
}

pub fn api_call_with(socket: &Path, method: &str, endpoint: &str, body: &str) -> ExitCode {
    let answer = godwit_vmm::api::call_with(
        socket,
        method,
        endpoint,
        body,
        Some(std::time::Duration::from_secs(30)),
    );
    match answer {
        Ok((200, body)) => {
            match serde_json::from_str::<serde_json::Value>(&body) {
                Ok(v) => outln!("{}", serde_json::to_string_pretty(&v).unwrap_or(body)),
                Err(_) => outln!("{body}"),
            }
            ExitCode::SUCCESS
        }
        Ok((code, body)) => {
            let msg = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(String::from))
                .unwrap_or(body);
            fail(format!("{endpoint}: {msg} (HTTP {code})"))
        }
        Err(e) => fail(e),
    }
}

pub fn guests(cmd: GuestsCmd) -> ExitCode {
    match cmd {
        GuestsCmd::List => {
            for (name, image) in godwit_guest::IMAGES {
                outln!("{name:<12} {} bytes", image.len());
            }
            ExitCode::SUCCESS
        }
        GuestsCmd::Export { out } => {
            if let Err(e) = std::fs::create_dir_all(&out) {
                return fail(format!("{}: {e}", out.display()));
            }
            for (name, image) in godwit_guest::IMAGES {
                let p = out.join(format!("{name}.elf"));
                if let Err(e) = std::fs::write(&p, image) {
                    return fail(format!("{}: {e}", p.display()));
                }
                outln!("{}", p.display());
            }
            ExitCode::SUCCESS
        }
    }
}
