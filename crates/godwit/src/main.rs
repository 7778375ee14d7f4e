//! godwit: the command line. `godwit run` is one VM in this process; the other commands
//! talk to a running godwit through its API socket, or measure.

#[macro_use]
mod output;

mod bench;
mod bench_gpu;
mod bench_gpu_migrate;
mod bench_gpu_postcopy;
mod bench_migrate;
mod bench_restore;
mod cli;
mod delay_link;
mod demo;
mod gpu;
mod guest_cpu;
mod list;
mod migrate;
mod run;
mod seccomp;
mod signals;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("GODWIT_LOG")
        .unwrap_or_else(|_| cli.log_level.clone().into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // A log line that cannot be written (nobody reads stderr any more) is lost;
        // reporting that with eprintln! would panic in whichever thread logged it.
        .log_internal_errors(false)
        .init();
    match cli.command {
        cli::Command::Run(args) => run::run(args),
        cli::Command::Demo(a) => demo::run(a),
        cli::Command::Info(a) => run::api_call(&a.api_socket, "GET", "vm.info"),
        cli::Command::List(a) => list::list(&a.dir, a.json),
        cli::Command::Pause(a) => run::api_call(&a.api_socket, "PUT", "vm.pause"),
        cli::Command::Resume(a) => run::api_call_with(
            &a.api_socket,
            "PUT",
            "vm.resume",
            if a.force { r#"{"force": true}"# } else { "" },
        ),
        cli::Command::Shutdown(a) => run::api_call(&a.api_socket, "PUT", "vm.shutdown"),
        cli::Command::Migrate(a) => migrate::migrate(a),
        cli::Command::MigrateCancel(a) => run::api_call(&a.api_socket, "PUT", "vm.migrate-cancel"),
        cli::Command::MigrateRecover(a) => run::api_call_with(
            &a.api_socket,
            "PUT",
            "vm.migrate-recover",
            &serde_json::json!({ "to": a.to }).to_string(),
        ),
        cli::Command::MigratePostcopy(a) => {
            run::api_call(&a.api_socket, "PUT", "vm.migrate-postcopy")
        }
        cli::Command::TlsCreds(a) => match godwit_migration::tls::generate(&a.dir, &a.hosts) {
            Ok(()) => {
                outln!(
                    "{}: ca-cert.pem, server-cert.pem/-key.pem (for {}), client-cert.pem/-key.pem",
                    a.dir.display(),
                    a.hosts.join(", ")
                );
                std::process::ExitCode::SUCCESS
            }
            Err(e) => run::fail(format!("{}: {e}", a.dir.display())),
        },
        cli::Command::Guests(g) => run::guests(g),
        cli::Command::Gpu(g) => gpu::gpu(g),
        cli::Command::Bench(b) => bench::bench(b),
    }
}
