//! Command-line arguments.

use clap::{Args, Parser, Subcommand};
use godwit_vmm::dirty::DirtyLogMode;
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
    /// What godwit is for: a VM with a virtual GPU trains on it and is live-migrated
    /// mid-training to a second godwit process, ending with the same answer as a run
    /// that was never moved.
    Demo(DemoArgs),
    /// Show a running VM's state, configuration and counters.
    Info(ApiArgs),
    /// The godwit processes whose API sockets (named *.sock) are in a directory: each
    /// one's id, pid, state and guest, or why it does not answer (a socket left by one
    /// that is gone). How a manager finds its VMs again after it restarts.
    List(ListArgs),
    /// Pause a running VM.
    Pause(ApiArgs),
    /// Resume a paused VM.
    Resume(ResumeArgs),
    /// Stop a VM.
    Shutdown(ApiArgs),
    /// Live-migrate a running VM to a godwit started with --incoming, or save it to a file.
    Migrate(MigrateArgs),
    /// Cancel the migration in progress (the VM keeps running where it is).
    MigrateCancel(ApiArgs),
    /// Switch the migration in progress to post-copy now: the VM starts at the
    /// destination and the memory it has not got yet follows it.
    MigratePostcopy(ApiArgs),
    /// Go on with a post-copy whose connections broke, on new ones (to the same
    /// destination address unless --to names another way to reach it). Waits for the
    /// attempt's outcome (up to 20 s): a failed attempt exits non-zero and post-copy
    /// stays paused for the next one.
    MigrateRecover(RecoverArgs),
    /// Write TLS credentials for migration into DIR (QEMU's x509 layout): a new CA, a
    /// server certificate for the destination's names, a client certificate.
    TlsCreds(TlsCredsArgs),
    /// The built-in guest images.
    #[command(subcommand)]
    Guests(GuestsCmd),
    /// The host's virtual GPUs: profiles, status, scheduling policy.
    #[command(subcommand)]
    Gpu(GpuCmd),
    /// Benchmarks (side by side with QEMU where there is a peer).
    #[command(subcommand)]
    Bench(BenchCmd),
}

#[derive(Args)]
pub struct ListArgs {
    /// The directory holding the API sockets.
    pub dir: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct RunArgs {
    /// A built-in guest (see `godwit guests list`) or the path of a godwit guest image
    /// [default: heartbeat].
    #[arg(conflicts_with_all = ["kernel", "incoming"])]
    pub guest: Option<String>,
    /// Guest arguments (key=value words), after `--`.
    #[arg(last = true)]
    pub guest_args: Vec<String>,
    /// Guest memory in MiB [default: 256; with --incoming: the source's].
    #[arg(long, short = 'm')]
    pub memory: Option<u64>,
    /// Number of vCPUs, one host thread each [default: 1; with --incoming: the source's].
    #[arg(long)]
    pub vcpus: Option<u32>,
    /// Receive the VM from a migration instead of booting one: wait on tcp:HOST:PORT or
    /// unix:PATH for a source, or restore a snapshot from file:PATH. --memory and
    /// --vcpus, when given, must match the source's.
    #[arg(long, conflicts_with = "kernel")]
    pub incoming: Option<String>,
    /// With --incoming tcp: take only a source that passes TLS 1.3 with a client
    /// certificate signed by DIR/ca-cert.pem; this side shows DIR/server-cert.pem
    /// (server-key.pem). QEMU's x509 layout; `godwit tls-creds DIR` makes one.
    #[arg(long, value_name = "DIR", requires = "incoming")]
    pub tls_dir: Option<PathBuf>,
    /// With --incoming file: how the snapshot is read. lazy (the default): the VM starts
    /// once its device states are loaded, and its memory is read from the file as the
    /// guest touches it and in the background. eager: all of it is read and checked
    /// before the VM starts. A snapshot without a page index is read eagerly.
    #[arg(long, value_enum, requires = "incoming")]
    pub restore: Option<RestoreArg>,
    /// With --incoming tcp: listen for plain TCP on an address that is not loopback
    /// (guest memory then crosses the network in the clear).
    #[arg(long, requires = "incoming")]
    pub insecure: bool,
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
    /// The VM's id (a manager's name for it, such as Nova's instance UUID): shown in
    /// `vm.info`, `godwit list` and as the holder of its GPU function in `gpu status`.
    #[arg(long)]
    pub id: Option<String>,
    /// Attach a virtual GPU function of this profile (see `godwit gpu profiles`). With
    /// --incoming the profile comes from the source, and a free VF of it is leased from
    /// this host's GPU manager (--gpu-dir) when it arrives; --gpu then names the profile
    /// the source must bring (and with --prefault, the VRAM readied for it).
    #[arg(long)]
    pub gpu: Option<String>,
    /// Lease the GPU function on this GPU (numbered as in `gpu status`) instead of where
    /// the host's placement rule puts it: for a manager that chose the GPU (Nova with
    /// Placement). With --gpu, or with --incoming for a source that brings one.
    #[arg(long, value_name = "N")]
    pub gpu_index: Option<usize>,
    /// With --incoming, in post-copy: how the GPU engine meets pages still at the
    /// source. auto: while another VF wants the shared GPU, a command's pages are
    /// brought in before it runs, holding nothing; alone, it runs at once. always: they
    /// are brought in first even alone. off: the engine fetches a page as it touches
    /// it, holding the GPU every VF on it shares (to measure what the others lose).
    #[arg(long, default_value = "auto", requires = "incoming")]
    pub gpu_prefetch: godwit_vmm::config::GpuPrefetch,
    #[command(flatten)]
    pub gpu_dir: GpuDirArg,
    /// How guest writes are tracked when this VM migrates: bitmap (KVM's dirty bitmap,
    /// manual re-protect) or ring[:ENTRIES] (KVM's per-vCPU dirty ring, power of two,
    /// 256 to 65536 entries, 16 bytes each). A host-local choice: both ends may differ.
    #[arg(long, default_value = "bitmap")]
    pub dirty_log: DirtyLogMode,
    /// Allocate and touch all guest memory, and the VRAM of a --gpu profile, before the
    /// VM starts (with --incoming: before waiting for the source, which needs --memory;
    /// the VRAM too with --gpu), so that neither the guest nor an incoming migration pays
    /// for first touches later. Commits the memory up front.
    #[arg(long)]
    pub prefault: bool,
    /// The system-call filter (seccomp) over this process, on before it reads anything a
    /// guest, a client or a peer sends: a call godwit never makes is refused (it fails
    /// with EPERM and godwit names it on stderr), or kills the process (kill, as
    /// Firecracker does); log lets every call run and names those outside the filter
    /// (to find what another kernel or C library needs; it protects nothing); off runs
    /// without a filter.
    #[arg(long, value_enum, default_value_t = crate::seccomp::Seccomp::Refuse)]
    pub seccomp: crate::seccomp::Seccomp,
}

#[derive(Args, Clone)]
pub struct GpuDirArg {
    /// The host's GPU manager directory, shared by every godwit on the host
    /// [default: $GODWIT_GPU_DIR or /run/godwit/gpu].
    #[arg(long)]
    pub gpu_dir: Option<PathBuf>,
}

impl GpuDirArg {
    pub fn dir(&self) -> PathBuf {
        self.gpu_dir
            .clone()
            .unwrap_or_else(godwit_gpu::Manager::default_dir)
    }
}

#[derive(Subcommand)]
pub enum GpuCmd {
    /// The vGPU profiles: frame buffer, instances per GPU, fixed scheduling share.
    Profiles {
        #[arg(long)]
        json: bool,
    },
    /// Each GPU, its VFs, which VM holds them, VRAM, engine time per VF.
    Status {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        dir: GpuDirArg,
    },
    /// Set a GPU's scheduling policy: best-effort, equal-share or fixed-share.
    Policy {
        gpu: usize,
        policy: String,
        #[command(flatten)]
        dir: GpuDirArg,
    },
    /// (Re)define the host's GPUs; refused while any VF is in use.
    Init {
        /// Number of GPUs.
        #[arg(long, default_value_t = 2)]
        gpus: usize,
        /// GPU model (see `godwit gpu profiles`).
        #[arg(long, default_value = "GW-8")]
        model: String,
        /// breadth-first (spread, for performance) or depth-first (pack, for density).
        #[arg(long, default_value = "breadth-first")]
        placement: String,
        /// Scheduling policy of every GPU.
        #[arg(long, default_value = "best-effort")]
        policy: String,
        #[command(flatten)]
        dir: GpuDirArg,
    },
}

#[derive(Args)]
pub struct DemoArgs {
    /// The VM's vGPU profile.
    #[arg(long, default_value = "GW8-1C")]
    pub profile: String,
    /// gpu-train's grid size (its run time grows with the square of it).
    #[arg(long, default_value_t = 96)]
    pub grid: u64,
    /// Migrate once the guest reports this iteration (a multiple of 2000).
    #[arg(long, default_value_t = 4000)]
    pub migrate_at: u64,
    /// The migration's downtime limit, in ms.
    #[arg(long, default_value_t = 50)]
    pub downtime_ms: u64,
    /// The GPU manager directory both VMs lease from [default: a private one].
    #[arg(long)]
    pub gpu_dir: Option<PathBuf>,
}

#[derive(Args)]
pub struct ApiArgs {
    /// The API socket of the godwit to talk to.
    #[arg(long)]
    pub api_socket: PathBuf,
}

#[derive(Args)]
pub struct TlsCredsArgs {
    pub dir: PathBuf,
    /// Names the destination is dialled by (IP addresses or DNS names), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1,localhost")]
    pub hosts: Vec<String>,
}

#[derive(Args)]
pub struct ResumeArgs {
    /// The API socket of the godwit to talk to.
    #[arg(long)]
    pub api_socket: PathBuf,
    /// Take back a VM whose hand-over to a destination was not confirmed (GO sent, no
    /// answer). Only after checking that the destination does not run it: if it does,
    /// the VM would run twice.
    #[arg(long)]
    pub force: bool,
}

#[derive(Args)]
pub struct RecoverArgs {
    /// The API socket of the source godwit.
    #[arg(long)]
    pub api_socket: PathBuf,
    /// The destination's address now (default: the one the migration started with).
    #[arg(long)]
    pub to: Option<String>,
}

#[derive(Args)]
pub struct MigrateArgs {
    /// The API socket of the godwit whose VM moves.
    #[arg(long)]
    pub api_socket: PathBuf,
    /// Where to: tcp:HOST:PORT or unix:PATH (a godwit run --incoming there), or file:PATH.
    #[arg(long)]
    pub to: String,
    /// Longest acceptable pause of the guest, in ms.
    #[arg(long, default_value_t = 300)]
    pub downtime_ms: u64,
    /// How memory moves: precopy (rounds while the VM runs, the rest in the pause),
    /// postcopy (the VM moves first, its memory follows: fetched where touched, pushed
    /// in the background), hybrid (pre-copy rounds while they converge, then
    /// post-copy instead of throttling the guest; a rest the pause carries in a
    /// millisecond ends it as pre-copy), auto (pre-copy when it fits the downtime
    /// limit, else hybrid).
    #[arg(long, default_value = "precopy", value_parser = ["precopy", "postcopy", "hybrid", "auto"])]
    pub mode: String,
    /// Bandwidth cap over all connections, bytes per second (suffixes K, M, G: KiB, MiB,
    /// GiB per second).
    #[arg(long)]
    pub max_bandwidth: Option<String>,
    /// TCP or Unix connections carrying pages in parallel [default: 2; 1 into a file].
    /// With one, pages go from guest memory to the socket with no copy; with two, each
    /// end takes them in on two threads (faster where one receiving thread is the
    /// limit, see docs/benchmarks.md). Post-copy modes open one more, kept for the pages a
    /// touch waits for.
    #[arg(long)]
    pub connections: Option<u32>,
    /// off: the GPU function skips pre-copy and keeps computing until the switchover;
    /// all its VRAM then moves inside the pause (stop-and-copy, the way VFIO GPUs
    /// without pre-copy migrate).
    #[arg(long, value_enum, default_value_t = OnOff::On)]
    pub gpu_precopy: OnOff,
    /// To a tcp: destination over TLS 1.3, with DIR/client-cert.pem (client-key.pem) and
    /// the destination checked against DIR/ca-cert.pem and the host dialled.
    #[arg(long, value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,
    /// Plain TCP to a destination that is not this machine's loopback.
    #[arg(long)]
    pub insecure: bool,
    /// Who checks the pages' data on the way: crc (godwit, every byte, end to end: a
    /// CRC per page, checked where it lands) or transport (TCP's checksum, TLS's AEAD:
    /// faster, the destination reads nothing back). On one TCP or Unix connection the
    /// pages go from guest memory to the socket with no copy either way. A file always
    /// keeps crc.
    #[arg(long, value_enum, default_value_t = PageChecksArg::Crc)]
    pub page_checks: PageChecksArg,
    /// The vCPUs' weight while pre-copy runs: normal, or low (the lowest of the fair
    /// scheduler, nice 19: on cores they share, the migration's threads come first and
    /// the guest gets what they leave idle; so does every other process of their
    /// scheduling group, the cgroup or with autogroup the session;
    /// given back before the pause and at the end, which takes CAP_SYS_NICE: without it
    /// the vCPUs keep their weight).
    #[arg(long, value_enum, default_value_t = VcpuPriorityArg::Normal)]
    pub vcpu_priority: VcpuPriorityArg,
    /// Which ends' migration threads have the fair scheduler's highest weight (nice
    /// -20) while pre-copy runs, so that a woken one runs at once on a core it shares:
    /// normal (neither, the default), destination (its readers; its VM does not run
    /// yet), source (the migration thread and its writers: they take the CPU from the
    /// guest), or both. Given back before the pause, on the destination once the
    /// pause's last frame is in, and at the end; an end without CAP_SYS_NICE keeps its
    /// threads' weight. Post-copy raises nothing.
    #[arg(long, value_enum, default_value_t = MigrationPriorityArg::Normal)]
    pub migration_priority: MigrationPriorityArg,
    /// Print the final report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RestoreArg {
    Lazy,
    Eager,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

/// Who checks the page data of a migration on the way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum PageChecksArg {
    /// godwit's CRC over every byte, end to end: a CRC per page, checked where it lands (on
    /// one TCP or Unix connection pages still go from guest memory to the socket with no
    /// copy).
    #[default]
    Crc,
    /// The transport's own (TCP's checksum, TLS's AEAD), as QEMU's stream: the destination
    /// reads nothing back.
    Transport,
}

/// The vCPUs' weight while pre-copy runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum VcpuPriorityArg {
    /// As they are.
    #[default]
    Normal,
    /// The lowest of the fair scheduler while pre-copy runs: the migration first (and
    /// every other process of the vCPUs' scheduling group too).
    Low,
}

impl From<VcpuPriorityArg> for godwit_migration::vcpu_priority::VcpuPriority {
    fn from(a: VcpuPriorityArg) -> Self {
        match a {
            VcpuPriorityArg::Low => Self::Low,
            VcpuPriorityArg::Normal => Self::Normal,
        }
    }
}

/// Which ends' migration threads go first while pre-copy runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum MigrationPriorityArg {
    /// Neither end's: as they are.
    #[default]
    Normal,
    /// The destination's readers (its VM does not run yet).
    Destination,
    /// The source's migration thread and writers (taken from the guest).
    Source,
    /// Both ends'.
    Both,
}

impl From<MigrationPriorityArg> for godwit_migration::migration_priority::MigrationPriority {
    fn from(a: MigrationPriorityArg) -> Self {
        match a {
            MigrationPriorityArg::Normal => Self::Normal,
            MigrationPriorityArg::Destination => Self::Destination,
            MigrationPriorityArg::Source => Self::Source,
            MigrationPriorityArg::Both => Self::Both,
        }
    }
}

impl From<PageChecksArg> for godwit_migration::wire::PageChecks {
    fn from(a: PageChecksArg) -> Self {
        match a {
            PageChecksArg::Crc => Self::Crc,
            PageChecksArg::Transport => Self::Transport,
        }
    }
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
    /// Live migration of the same guest by godwit and by QEMU, side by side.
    Migrate(MigrateBenchArgs),
    /// The virtual GPU from a guest: copy bandwidth, kernel throughput, fence latency,
    /// and the engine share of two busy VFs under each scheduling policy.
    Gpu(GpuBenchArgs),
    /// Live migration of a VM with a GPU function: VRAM pre-copied against stopped and
    /// copied, over VRAM profiles and GPU loads.
    GpuMigrate(GpuMigrateBenchArgs),
    /// What a GPU engine waiting for post-copy costs the VMs it shares its GPU with:
    /// two busy VMs on one GPU, one moved in post-copy over a capped link; the other
    /// VM's engine share and the moved VM's own progress while its pages follow it, with
    /// a command's pages brought in before it runs against fetched as they are touched.
    GpuPostcopy(GpuPostcopyBenchArgs),
    /// Restoring a snapshot: time to the guest's first line against memory size, lazy
    /// against eager, beside QEMU restoring its own snapshot of the same guest.
    Restore(RestoreBenchArgs),
}

/// The peer VMM a benchmark runs side by side with godwit.
#[derive(Args)]
pub struct PeerArgs {
    /// QEMU binary to compare with.
    #[arg(long, default_value = "qemu-system-x86_64")]
    pub qemu: String,
    /// Measure godwit only.
    #[arg(long)]
    pub no_qemu: bool,
}

#[derive(Args)]
pub struct RestoreBenchArgs {
    /// Repetitions per size and side.
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Guest RAM sizes in MiB (comma separated); the guest fills half of it with data.
    #[arg(long, value_delimiter = ',', default_values_t = [256u64, 1024, 4096])]
    pub memory: Vec<u64>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub peer: PeerArgs,
}

#[derive(Args)]
pub struct GpuMigrateBenchArgs {
    /// Repetitions per cell and mode.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Only the smallest and the largest profile that fit this host.
    #[arg(long)]
    pub quick: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// VRAM profiles (comma separated); those the host's memory cannot hold twice are
    /// skipped.
    #[arg(long, value_delimiter = ',', default_values_t = ["GW8-1C".to_string(), "GW8-2C".to_string(), "GW8-4C".to_string(), "GW8-8C".to_string()])]
    pub profiles: Vec<String>,
    /// GPU loads (comma separated): idle, busy, 256m, flat.
    #[arg(long, value_delimiter = ',', default_values_t = ["idle".to_string(), "busy".to_string(), "256m".to_string(), "flat".to_string()])]
    pub workloads: Vec<String>,
    #[arg(long, default_value_t = 50)]
    pub downtime_ms: u64,
    /// Pre-copy only (no stop-and-copy runs beside it).
    #[arg(long)]
    pub no_stop_copy: bool,
    /// More modes, each a side of its own (comma separated): postcopy, hybrid.
    #[arg(long, value_delimiter = ',')]
    pub modes: Vec<String>,
    /// Every destination gets its guest memory and its VRAM, touched, before the
    /// migration starts (`run --incoming --memory M --gpu PROFILE --prefault`): takes the
    /// first touch of the host's memory out of the total time.
    #[arg(long)]
    pub prefault: bool,
    /// Which ends' godwit migration threads go first while pre-copy runs (`godwit
    /// migrate --migration-priority`).
    #[arg(long, value_enum, default_value_t = MigrationPriorityArg::Normal)]
    pub migration_priority: MigrationPriorityArg,
}

#[derive(Args)]
pub struct GpuPostcopyBenchArgs {
    /// Repetitions per side.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// The VMs' vGPU profile (all three on one GPU).
    #[arg(long, default_value = "GW8-1C")]
    pub profile: String,
    /// The moved VM's weights in MiB of VRAM (gpu-dirtier busy=N): what its commands
    /// touch, and so what post-copy has to bring.
    #[arg(long, default_value_t = 256)]
    pub weights_mib: u64,
    /// The migration's bandwidth cap (K, M or G per second): long enough a window to
    /// measure the shares in.
    #[arg(long, default_value = "64M")]
    pub max_bandwidth: String,
    /// Each byte between the two ends held this long, each way (a relay on loopback):
    /// a fault's round trip then takes at least twice it, as between two hosts apart.
    #[arg(long, default_value_t = 0)]
    pub link_delay_us: u64,
    /// The destination's engine policies to compare, each a side of its own (`run
    /// --gpu-prefetch`; comma separated).
    #[arg(long, value_delimiter = ',', default_values_t = [godwit_vmm::config::GpuPrefetch::Auto, godwit_vmm::config::GpuPrefetch::Off])]
    pub prefetch: Vec<godwit_vmm::config::GpuPrefetch>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct GpuBenchArgs {
    /// Repetitions of each guest measurement.
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Seconds each scheduling-policy measurement lasts.
    #[arg(long, default_value_t = 4)]
    pub seconds: u64,
    /// Skip the scheduling-share measurements.
    #[arg(long)]
    pub no_shares: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct MigrateBenchArgs {
    /// Repetitions per cell.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// A small subset for development: 1 GiB, idle and 512 MiB at 1 GiB/s, 300 ms, 1 run.
    #[arg(long)]
    pub quick: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub peer: PeerArgs,
    /// More QEMU binaries, each a side of its own beside the first (comma separated),
    /// e.g. QEMU 10.0 from `bench/qemu-10.sh`. A binary unpacked beside its data
    /// (../share/qemu) is given that directory with -L.
    #[arg(long, value_delimiter = ',')]
    pub qemu_extra: Vec<String>,
    /// Each QEMU binary also migrates with multifd on this many channels, a side of its
    /// own (0: not).
    #[arg(long, default_value_t = 2)]
    pub qemu_multifd: u32,
    /// Guest RAM sizes in MiB (comma separated).
    #[arg(long, value_delimiter = ',', default_values_t = [1024u64, 4096])]
    pub memory: Vec<u64>,
    /// Downtime limits in ms (comma separated).
    #[arg(long, value_delimiter = ',', default_values_t = [300u64, 50])]
    pub downtime_ms: Vec<u64>,
    /// Workloads (comma separated): idle, 64m@100m, 512m@1g.
    #[arg(long, value_delimiter = ',', default_values_t = ["idle".to_string(), "64m@100m".to_string(), "512m@1g".to_string()])]
    pub workloads: Vec<String>,
    /// godwit's page connections [default: 2] (post-copy modes open one more).
    #[arg(long)]
    pub connections: Option<u32>,
    /// Who checks godwit's page data on the way (`godwit migrate --page-checks`).
    #[arg(long, value_enum, default_value_t = PageChecksArg::Crc)]
    pub page_checks: PageChecksArg,
    /// godwit's vCPUs' weight while pre-copy runs (`godwit migrate --vcpu-priority`).
    #[arg(long, value_enum, default_value_t = VcpuPriorityArg::Normal)]
    pub vcpu_priority: VcpuPriorityArg,
    /// Which ends' godwit migration threads go first while pre-copy runs (`godwit
    /// migrate --migration-priority`).
    #[arg(long, value_enum, default_value_t = MigrationPriorityArg::Normal)]
    pub migration_priority: MigrationPriorityArg,
    /// godwit's dirty tracking, one side per mode (comma separated): bitmap, ring,
    /// ring:ENTRIES. The first is the one held against QEMU; the others are compared
    /// with it.
    #[arg(long, value_delimiter = ',', default_values_t = [DirtyLogMode::default()])]
    pub dirty_log: Vec<DirtyLogMode>,
    /// Also run godwit (first dirty-log mode) over TLS 1.3, beside the plain run.
    #[arg(long)]
    pub tls: bool,
    /// godwit's migration modes, one side each (comma separated): precopy, postcopy,
    /// hybrid, auto. With post-copy among them QEMU also runs post-copy (switched after
    /// its first pass, with postcopy-preempt where it has it).
    #[arg(long, value_delimiter = ',', default_values_t = ["precopy".to_string()])]
    pub modes: Vec<String>,
    /// Every destination gets its memory, touched, before the migration starts: godwit
    /// `run --incoming --memory M --prefault`, QEMU `-mem-prealloc`. Takes what the
    /// host's memory happens to be (fresh, reused, handed back to the hypervisor
    /// beneath) out of the total time, for both.
    #[arg(long)]
    pub prefault: bool,
    /// Every VMM process (godwit's and QEMU's, source and destination) starts in a
    /// session of its own, which with the kernel's autogroup on is a scheduling group
    /// of its own, as a VM in a cgroup of its own is: the fair scheduler then shares a
    /// core between the two ends before it weighs their threads. Without it both ends
    /// share the bench's group.
    #[arg(long)]
    pub own_sessions: bool,
}

#[derive(Args)]
pub struct BootBenchArgs {
    /// Runs per VMM.
    #[arg(long, default_value_t = 10)]
    pub runs: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub peer: PeerArgs,
    /// Guest memory in MiB for both.
    #[arg(long, default_value_t = 256)]
    pub memory: u64,
}
