//! `godwit run` and the API client commands.

use crate::cli::{GuestsCmd, RunArgs};
use godwit_vmm::api::ApiServer;
use godwit_vmm::{Console, Payload, Vm, VmConfig, VmExit};
use std::path::Path;
use std::process::ExitCode;

/// Exit status when the guest crashed (its own codes are 0..=255 and pass through).
pub const EXIT_GUEST_CRASH: u8 = 125;
/// Exit status when godwit itself failed.
pub const EXIT_VMM_ERROR: u8 = 1;

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("godwit: error: {msg}");
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
    if let Some(image) = godwit_guest::image(&a.guest) {
        return Ok(Payload::Guest {
            name: a.guest.clone(),
            image: image.to_vec(),
            args,
        });
    }
    let path = Path::new(&a.guest);
    if !path.exists() {
        let names: Vec<_> = godwit_guest::names().collect();
        return Err(format!(
            "no built-in guest or file named {:?} (built-in: {})",
            a.guest,
            names.join(", ")
        ));
    }
    let image =
        std::fs::read(path).map_err(|e| format!("cannot read image {}: {e}", path.display()))?;
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

pub fn run(a: RunArgs) -> ExitCode {
    let (payload, console) = match (payload(&a), console(&a.console)) {
        (Ok(p), Ok(c)) => (p, c),
        (Err(e), _) | (_, Err(e)) => return fail(e),
    };
    // Claim the API socket before building anything: a second godwit on the same socket
    // must fail before it creates a VM.
    let server = match &a.api_socket {
        Some(p) => match ApiServer::bind(p) {
            Ok(s) => Some(s),
            Err(e) => return fail(e),
        },
        None => None,
    };
    let cfg = VmConfig {
        memory_mib: a.memory,
        vcpus: a.vcpus,
        payload,
        console,
    };
    let mut vm = match Vm::create(cfg) {
        Ok(vm) => vm,
        Err(e) => {
            if let Some(p) = &a.api_socket {
                let _ = std::fs::remove_file(p);
            }
            return fail(e);
        }
    };
    let _api = match (server, &a.api_socket) {
        (Some(s), Some(p)) => match ApiServer::start(s, p, vm.handle()) {
            Ok(api) => Some(api),
            Err(e) => return fail(e),
        },
        _ => None,
    };
    if let Err(e) = vm.start() {
        vm.wait();
        return fail(e);
    }
    match vm.wait() {
        VmExit::Guest(code) => ExitCode::from(code as u8),
        VmExit::Shutdown => ExitCode::SUCCESS,
        VmExit::Crash(m) => {
            eprintln!("godwit: guest crashed: {m}");
            ExitCode::from(EXIT_GUEST_CRASH)
        }
        VmExit::Error(m) => fail(m),
    }
}

pub fn api_call(socket: &Path, method: &str, endpoint: &str) -> ExitCode {
    match godwit_vmm::api::call(socket, method, endpoint) {
        Ok((200, body)) => {
            match serde_json::from_str::<serde_json::Value>(&body) {
                Ok(v) => println!("{}", serde_json::to_string_pretty(&v).unwrap_or(body)),
                Err(_) => println!("{body}"),
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
                println!("{name:<12} {} bytes", image.len());
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
                println!("{}", p.display());
            }
            ExitCode::SUCCESS
        }
    }
}
