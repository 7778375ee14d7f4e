//! Command-line arguments.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "godwit",
    version,
    about = "A VMM for live migration of GPU virtual machines"
)]
pub struct Cli {
    /// Log level for godwit's own messages on stderr (error, warn, info, debug, trace);
    /// GODWIT_LOG overrides it.
    #[arg(long, global = true, default_value = "warn")]
    pub log_level: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Start a VM and run it until the guest exits (exit status = the guest's).
    Run(RunArgs),
    /// Show a running VM's state, configuration and counters.
    Info(ApiArgs),
    /// Pause a running VM.
    Pause(ApiArgs),
    /// Resume a paused VM.
    Resume(ApiArgs),
    /// Stop a VM.
    Shutdown(ApiArgs),
    /// The built-in guest images.
    #[command(subcommand)]
    Guests(GuestsCmd),
    /// Benchmarks (side by side with QEMU where there is a peer).
    #[command(subcommand)]
    Bench(BenchCmd),
}

#[derive(Args)]
pub struct RunArgs {
    /// A built-in guest (see `godwit guests list`) or the path of a godwit guest image.
    #[arg(default_value = "heartbeat", conflicts_with = "kernel")]
    pub guest: String,
    /// Guest arguments (key=value words), after `--`.
    #[arg(last = true)]
    pub guest_args: Vec<String>,
    /// Guest memory in MiB.
    #[arg(long, short = 'm', default_value_t = 256)]
    pub memory: u64,
    /// Number of vCPUs (one host thread each).
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// Boot a Linux kernel (ELF vmlinux or bzImage) instead of a godwit guest.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk for --kernel.
    #[arg(long, requires = "kernel")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line for --kernel.
    #[arg(
        long,
        requires = "kernel",
        default_value = "console=ttyS0 earlycon=uart8250,io,0x3f8 reboot=k panic=-1"
    )]
    pub cmdline: String,
    /// Where the serial console goes: stdout, file:PATH or null.
    #[arg(long, default_value = "stdout")]
    pub console: String,
    /// Serve the HTTP/JSON API on this Unix socket.
    #[arg(long)]
    pub api_socket: Option<PathBuf>,
}

#[derive(Args)]
pub struct ApiArgs {
    /// The API socket of the godwit to talk to.
    #[arg(long)]
    pub api_socket: PathBuf,
}

#[derive(Subcommand)]
pub enum GuestsCmd {
    /// List the built-in guest programs.
    List,
    /// Write every built-in guest image to a directory (e.g. for QEMU's -kernel).
    Export {
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
pub enum BenchCmd {
    /// Time from process start to the guest's first console line, godwit vs QEMU.
    Boot(BootBenchArgs),
}

#[derive(Args)]
pub struct BootBenchArgs {
    /// Runs per VMM.
    #[arg(long, default_value_t = 10)]
    pub runs: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// QEMU binary to compare with.
    #[arg(long, default_value = "qemu-system-x86_64")]
    pub qemu: String,
    /// Measure godwit only.
    #[arg(long)]
    pub no_qemu: bool,
    /// Guest memory in MiB for both.
    #[arg(long, default_value_t = 256)]
    pub memory: u64,
}
