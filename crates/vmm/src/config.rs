//! What a user asks for: memory, vCPUs, what to boot, where the console goes.

use crate::error::{Error, Result};
use std::io::Write;
use std::path::PathBuf;

/// What the VM boots.
#[derive(Clone, Debug)]
pub enum Payload {
    /// One of godwit's ring-3 guest images (built-in or from a file) and its arguments.
    Guest {
        name: String,
        image: Vec<u8>,
        args: String,
    },
    /// A Linux kernel (ELF vmlinux or bzImage).
    Linux {
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        cmdline: String,
    },
    /// Nothing: memory and state will arrive from a migration stream or snapshot.
    Incoming {
        kind: crate::state::GuestKind,
        guest: String,
    },
}

pub enum Console {
    Stdout,
    File(PathBuf),
    Null,
    /// Anything else (tests collect output in memory this way).
    Writer(Box<dyn Write + Send>),
}

impl Console {
    pub fn describe(&self) -> String {
        match self {
            Console::Stdout => "stdout".into(),
            Console::File(p) => format!("file:{}", p.display()),
            Console::Null => "null".into(),
            Console::Writer(_) => "writer".into(),
        }
    }

    pub fn open(self) -> Result<Box<dyn Write + Send>> {
        Ok(match self {
            Console::Stdout => Box::new(std::io::stdout()),
            Console::File(p) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&p)
                    .map_err(|e| Error::Console(format!("{}: {e}", p.display())))?,
            ),
            Console::Null => Box::new(std::io::sink()),
            Console::Writer(w) => w,
        })
    }
}

/// A virtual GPU function to attach.
#[derive(Clone, Debug)]
pub struct GpuRequest {
    /// A vGPU profile (see `godwit gpu profiles`).
    pub profile: String,
    /// The host's GPU manager directory.
    pub manager_dir: PathBuf,
    /// How the VM is named in `godwit gpu status`.
    pub vm_name: String,
    /// Lease on this GPU only (a manager such as Nova's Placement chose it), instead of
    /// by the host's placement rule.
    pub gpu_index: Option<usize>,
    /// In post-copy, how the GPU engine meets VRAM and RAM still at the source.
    pub prefetch: GpuPrefetch,
}

/// What an incoming VM's GPU engine does in post-copy about the pages a command will
/// touch that are still at the source. The engine is one GPU that every VF on it
/// shares, so a command that waits for the network while it holds the engine stalls
/// every other VM there: bringing its pages in first, holding nothing, spares them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GpuPrefetch {
    /// Brings a command's pages in before it runs while another VF wants the engine;
    /// alone at the engine, it runs at once and fetches what it touches as it goes.
    #[default]
    Auto,
    /// Brings them in first whatever the other VFs do.
    Always,
    /// Never: the engine fetches a missing page as it touches it, holding the GPU, as
    /// a GPU meets a TLB miss. For measuring what bringing them in first saves.
    Off,
}

impl std::str::FromStr for GpuPrefetch {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(GpuPrefetch::Auto),
            "always" => Ok(GpuPrefetch::Always),
            "off" => Ok(GpuPrefetch::Off),
            _ => Err(format!("GPU prefetch {s:?}: use auto, always or off")),
        }
    }
}

impl std::fmt::Display for GpuPrefetch {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(match self {
            GpuPrefetch::Auto => "auto",
            GpuPrefetch::Always => "always",
            GpuPrefetch::Off => "off",
        })
    }
}

pub struct VmConfig {
    pub memory_mib: u64,
    pub vcpus: u32,
    pub payload: Payload,
    pub console: Console,
    pub gpu: Option<GpuRequest>,
    /// How guest writes are tracked while the VM migrates.
    pub dirty_log: crate::dirty::DirtyLogMode,
    /// The name a manager gives the VM (Nova's instance UUID), in `vm.info`.
    pub id: Option<String>,
    /// Memory made and touched beforehand (`--prefault`); when empty, the VM maps its
    /// own, touched as the guest (or an incoming migration) first writes it.
    pub prefaulted: crate::memory::Prefaulted,
}

/// Checks a VM's id: 1 to 64 letters, digits and `.`, `_`, `-`, `:` (a UUID, a name).
pub fn check_id(id: &str) -> std::result::Result<(), String> {
    let ok = (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-:".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "a VM id is 1 to 64 letters, digits, '.', '_', '-' or ':' (got {id:?})"
        ))
    }
}

impl VmConfig {
    pub fn validate(&self) -> Result<()> {
        if let Some(id) = &self.id {
            check_id(id).map_err(Error::Config)?;
        }
        if self.vcpus == 0 || self.vcpus > crate::arch::ring3::MAX_VCPUS {
            return Err(Error::Config(format!(
                "vCPU count must be 1 to {} (got {})",
                crate::arch::ring3::MAX_VCPUS,
                self.vcpus
            )));
        }
        Ok(())
    }
}
