//! The host's GPU manager, shared by every godwit process on the host without a daemon:
//! a directory (default /run/godwit/gpu, or $GODWIT_GPU_DIR) holding
//! - `host.json`: the GPUs (model), the placement rule and each GPU's policy;
//! - `manager.lock`: flock'd around every placement, every look at the leases and every
//!   lease let go, so two VMs never take one VF and no look sees a lease half made or
//!   half gone;
//! - `gpuG.shm`: each GPU's shared scheduler page (see `shm`, `sched`);
//! - `gpuG-vfS.lock`/`.json`: a VF lease. The owning process holds an flock on the lock
//!   file for as long as it lives; the kernel drops it when the process exits or
//!   crashes, so a dead VM's VF is free at once with nothing to clean up (a stale .json
//!   beside an unlocked .lock is ignored and overwritten).

use crate::profile::{self, Profile};
use crate::sched::{self, Policy, Seat};
use crate::shm::{GpuShm, MAX_VFS};
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::{Relaxed, Release};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("unknown GPU profile {0:?} (see `godwit gpu profiles`)")]
    UnknownProfile(String),
    #[error("no GPU can take a {profile} VF: {why}")]
    NoCapacity { profile: String, why: String },
    #[error("GPU manager directory {dir}: {err}")]
    Io { dir: PathBuf, err: std::io::Error },
    #[error("GPU manager: {0}")]
    Config(String),
    #[error(
        "GPU manager directory {}: its lock (manager.lock) was held by another process for {} s; \
         a placement or a status holds it for milliseconds, so that process is stopped or \
         stuck (`lslocks` names it)",
        dir.display(),
        waited.as_secs()
    )]
    Busy {
        dir: PathBuf,
        waited: std::time::Duration,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Placement {
    /// Spread VFs over GPUs: the least loaded GPU first (performance).
    #[default]
    BreadthFirst,
    /// Fill one GPU before the next: the most loaded GPU with room first (density).
    DepthFirst,
}

impl Placement {
    pub fn parse(s: &str) -> Option<Placement> {
        match s {
            "breadth-first" | "breadth" => Some(Placement::BreadthFirst),
            "depth-first" | "depth" => Some(Placement::DepthFirst),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct GpuSpec {
    pub model: String,
    pub policy: Policy,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct HostConfig {
    pub gpus: Vec<GpuSpec>,
    pub placement: Placement,
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig {
            gpus: (0..2)
                .map(|_| GpuSpec {
                    model: "GW-8".into(),
                    policy: Policy::BestEffort,
                })
                .collect(),
            placement: Placement::BreadthFirst,
        }
    }
}

/// Who holds a VF (written into its lease for `godwit gpu status`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Holder {
    pub pid: u32,
    pub vm: String,
    pub profile: String,
    pub since_unix: u64,
}

pub struct Manager {
    dir: PathBuf,
    cfg: HostConfig,
    /// How long a placement or a look waits for the manager's lock (`LOCK_WAIT`).
    lock_wait: std::time::Duration,
}

/// A VF held by this process; dropping it (or dying) frees the VF.
pub struct Lease {
    pub gpu: usize,
    pub slot: usize,
    pub profile: &'static Profile,
    shm: Arc<GpuShm>,
    json: PathBuf,
    /// The manager's lock file, taken again to let the lease go.
    manager_lock: PathBuf,
    lock: File,
}

impl Lease {
    /// This VF's seat at its GPU's scheduler. Dropping the seat marks it detached.
    pub fn seat(&self) -> Seat {
        Seat {
            shm: self.shm.clone(),
            slot: self.slot,
        }
    }

    /// Where this VF's slice starts in its GPU's VRAM.
    pub fn vram_offset(&self) -> u64 {
        self.slot as u64 * self.profile.framebuffer
    }
}

impl Drop for Lease {
    /// The record goes and the slot's lock is let go together, under the manager's
    /// lock: a look between the two took the VF for held by nobody known, and an
    /// allocation then took it for a VF of another profile and refused the GPU. If the
    /// manager's lock cannot be had (its directory removed, or a holder stopped with
    /// it: a VM's exit must not wait on a `godwit gpu status` held in a debugger), the
    /// lease is let go all the same after `DROP_WAIT`: the slot's lock alone says who
    /// holds it, and a look may then see the moment between the two.
    fn drop(&mut self) {
        let _manager = lock_manager_within(&self.manager_lock, DROP_WAIT)
            .ok()
            .flatten();
        self.shm.page().vf[self.slot].attached.store(0, Release);
        let _ = std::fs::remove_file(&self.json);
        let _ = flock(&self.lock, libc::LOCK_UN);
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct VfStatus {
    pub slot: usize,
    pub vram_offset: u64,
    pub framebuffer: u64,
    pub holder: Holder,
    pub engine_ms: f64,
    /// Share of the engine time used by this GPU's VFs since they attached.
    pub engine_share: f64,
    pub commands: u64,
    pub errors: u64,
    pub vram_resident: u64,
    /// Percent of the time a migration holds this VF's engine back (0: not capped).
    pub engine_cap_pct: u32,
}

#[derive(Clone, Debug, Serialize)]
pub struct GpuStatus {
    pub id: usize,
    pub model: String,
    pub vram: u64,
    pub policy: Policy,
    pub profile: Option<String>,
    pub vram_allocated: u64,
    pub vfs: Vec<VfStatus>,
    /// Who holds the engine now (a VF slot), if anyone.
    pub engine_owner: Option<usize>,
    /// The engine's holder is no live VF or its stamp is stale or from the future: the
    /// next VF that asks takes the engine over (`gpu init` clears it when no VF is held).
    pub engine_owner_stuck: bool,
}

/// Clears the engine's owner and waiters: only when no process holds a VF of the GPU.
fn reset_engine(page: &crate::shm::GpuPage) {
    page.owner.store(0, Relaxed);
    page.waiting.store(0, Relaxed);
    page.owner_beat_ns.store(0, Relaxed);
    crate::sched::wake_all(&page.owner);
}

fn open_manager_lock(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
}

/// Takes the manager's lock (`manager.lock`), waiting up to `wait` for whoever holds
/// it (None then): every holder holds it for a placement, a look at the leases or a
/// lease let go, microseconds to milliseconds, unless it is stopped or stuck.
fn lock_manager_within(path: &Path, wait: std::time::Duration) -> std::io::Result<Option<File>> {
    let f = open_manager_lock(path)?;
    let end = std::time::Instant::now() + wait;
    loop {
        if flock(&f, libc::LOCK_EX | libc::LOCK_NB)? {
            return Ok(Some(f));
        }
        if std::time::Instant::now() >= end {
            return Ok(None);
        }
        std::thread::sleep(std::time::Duration::from_micros(500));
    }
}

/// How long a placement or a look waits for the manager's lock before it says who is
/// in the way, and how long a lease let go waits before it goes without it (a VM's
/// exit must not wait long).
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(30);
const DROP_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

fn flock(f: &File, how: i32) -> std::io::Result<bool> {
    // SAFETY: flock on an fd this process owns.
    if unsafe { libc::flock(f.as_raw_fd(), how) } == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Manager {
    pub fn default_dir() -> PathBuf {
        std::env::var_os("GODWIT_GPU_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/run/godwit/gpu"))
    }

    fn io(&self, err: std::io::Error) -> Error {
        Error::Io {
            dir: self.dir.clone(),
            err,
        }
    }

    /// Opens the manager in `dir`, creating a default host (two GW-8 GPUs) on first use.
    pub fn open(dir: &Path) -> Result<Manager> {
        let mut m = Manager {
            dir: dir.to_path_buf(),
            cfg: HostConfig::default(),
            lock_wait: LOCK_WAIT,
        };
        if let Ok(meta) = std::fs::metadata(dir) {
            if !meta.is_dir() {
                return Err(m.io(std::io::Error::new(
                    std::io::ErrorKind::NotADirectory,
                    "exists and is not a directory (--gpu-dir names the GPU manager's directory)",
                )));
            }
        }
        std::fs::create_dir_all(dir).map_err(|e| m.io(e))?;
        let _g = m.global_lock()?;
        let path = dir.join("host.json");
        match std::fs::read(&path) {
            Ok(b) => {
                m.cfg = serde_json::from_slice(&b)
                    .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => m.save()?,
            Err(e) => return Err(m.io(e)),
        }
        for (g, spec) in m.cfg.gpus.iter().enumerate() {
            if profile::model(&spec.model).is_none() {
                return Err(Error::Config(format!(
                    "GPU {g}: unknown model {:?}",
                    spec.model
                )));
            }
            m.shm(g)?.page().policy.store(spec.policy.code(), Relaxed);
        }
        Ok(m)
    }

    /// Rewrites the host's GPU set; refused while any VF is held.
    pub fn init(dir: &Path, cfg: HostConfig) -> Result<Manager> {
        if cfg.gpus.is_empty() || cfg.gpus.len() > 64 {
            return Err(Error::Config("a host has 1 to 64 GPUs".into()));
        }
        for s in &cfg.gpus {
            if profile::model(&s.model).is_none() {
                return Err(Error::Config(format!("unknown GPU model {:?}", s.model)));
            }
        }
        let mut m = Manager::open(dir)?;
        let _g = m.global_lock()?;
        for g in 0..m.cfg.gpus.len().max(cfg.gpus.len()) {
            if !m.live(g)?.is_empty() {
                return Err(Error::Config(format!("GPU {g} has VFs in use")));
            }
        }
        m.cfg = cfg;
        m.save()?;
        for (g, spec) in m.cfg.gpus.iter().enumerate() {
            let shm = m.shm(g)?;
            let page = shm.page();
            page.policy.store(spec.policy.code(), Relaxed);
            // No VF is held (checked above): whatever the scheduler's words say was
            // left by processes that are gone.
            reset_engine(page);
        }
        Ok(m)
    }

    pub fn config(&self) -> &HostConfig {
        &self.cfg
    }

    fn save(&self) -> Result<()> {
        let tmp = self.dir.join("host.json.tmp");
        std::fs::write(
            &tmp,
            serde_json::to_vec_pretty(&self.cfg).expect("plain data"),
        )
        .and_then(|_| std::fs::rename(&tmp, self.dir.join("host.json")))
        .map_err(|e| self.io(e))
    }

    fn global_lock(&self) -> Result<File> {
        lock_manager_within(&self.manager_lock(), self.lock_wait)
            .map_err(|e| self.io(e))?
            .ok_or_else(|| Error::Busy {
                dir: self.dir.clone(),
                waited: self.lock_wait,
            })
    }

    fn manager_lock(&self) -> PathBuf {
        self.dir.join("manager.lock")
    }

    fn shm(&self, g: usize) -> Result<GpuShm> {
        GpuShm::open(&self.dir.join(format!("gpu{g}.shm"))).map_err(|e| self.io(e))
    }

    fn lease_paths(&self, g: usize, s: usize) -> (PathBuf, PathBuf) {
        (
            self.dir.join(format!("gpu{g}-vf{s}.lock")),
            self.dir.join(format!("gpu{g}-vf{s}.json")),
        )
    }

    /// The held VFs of GPU `g`: (slot, holder). Only under the manager's lock
    /// (`global_lock`): a lease's slot lock and its record change together under it,
    /// and a look holds each slot's lock shared for a moment, which an allocation
    /// beside it would take for a holder.
    fn live(&self, g: usize) -> Result<Vec<(usize, Holder)>> {
        let mut out = Vec::new();
        for s in 0..MAX_VFS {
            let (lock, json) = self.lease_paths(g, s);
            let Ok(f) = File::open(&lock) else { continue };
            if flock(&f, libc::LOCK_SH | libc::LOCK_NB).map_err(|e| self.io(e))? {
                continue; // nobody holds it
            }
            let holder = std::fs::read(&json)
                .ok()
                .and_then(|b| serde_json::from_slice::<Holder>(&b).ok())
                .unwrap_or(Holder {
                    pid: 0,
                    vm: "?".into(),
                    profile: "?".into(),
                    since_unix: 0,
                });
            out.push((s, holder));
        }
        Ok(out)
    }

    /// Places a VF of `profile` by the host's placement rule and takes it.
    pub fn allocate(&self, profile_name: &str, vm: &str) -> Result<Lease> {
        self.allocate_on(profile_name, vm, None)
    }

    /// Takes a VF of `profile` on GPU `only` when given (a cluster manager's scheduler
    /// chose that GPU and accounts for it), else wherever the placement rule says.
    pub fn allocate_on(&self, profile_name: &str, vm: &str, only: Option<usize>) -> Result<Lease> {
        let p = profile::profile(profile_name)
            .ok_or_else(|| Error::UnknownProfile(profile_name.into()))?;
        if let Some(g) = only.filter(|g| *g >= self.cfg.gpus.len()) {
            return Err(Error::NoCapacity {
                profile: p.name.into(),
                why: format!("this host has no GPU {g} ({} GPUs)", self.cfg.gpus.len()),
            });
        }
        let _g = self.global_lock()?;
        let mut candidates = Vec::new();
        let mut why = Vec::new();
        for (g, spec) in self.cfg.gpus.iter().enumerate() {
            if only.is_some_and(|o| o != g) {
                continue;
            }
            if spec.model != p.model {
                why.push(format!("GPU {g} is a {}", spec.model));
                continue;
            }
            let live = self.live(g)?;
            if let Some((_, h)) = live.iter().find(|(_, h)| h.profile != p.name) {
                why.push(format!("GPU {g} runs {} VFs", h.profile));
                continue;
            }
            if live.len() >= p.max_instances as usize {
                why.push(format!(
                    "GPU {g} is full ({} of {})",
                    live.len(),
                    p.max_instances
                ));
                continue;
            }
            candidates.push((g, live));
        }
        // In placement order; a VF whose lease file is broken (replaced by a
        // directory, unwritable) is skipped, not fatal: another may be free.
        match self.cfg.placement {
            Placement::BreadthFirst => candidates.sort_by_key(|(g, l)| (l.len(), *g)),
            Placement::DepthFirst => {
                candidates.sort_by_key(|(g, l)| (std::cmp::Reverse(l.len()), *g))
            }
        }
        let mut taken = None;
        'gpus: for (g, live) in &candidates {
            for slot in 0..p.max_instances as usize {
                if live.iter().any(|(l, _)| *l == slot) {
                    continue;
                }
                let (lock, _) = self.lease_paths(*g, slot);
                let f = OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&lock);
                let f = match f {
                    Ok(f) => f,
                    Err(e) => {
                        why.push(format!("GPU {g} VF {slot}: {}: {e}", lock.display()));
                        continue;
                    }
                };
                match flock(&f, libc::LOCK_EX | libc::LOCK_NB) {
                    Ok(true) => {
                        if live.is_empty() {
                            // Nobody holds a VF of this GPU: an engine owner left by a
                            // killed process is cleared now rather than timed out.
                            reset_engine(self.shm(*g)?.page());
                        }
                        taken = Some((*g, slot, f));
                        break 'gpus;
                    }
                    Ok(false) => why.push(format!("GPU {g} VF {slot} was taken meanwhile")),
                    Err(e) => why.push(format!("GPU {g} VF {slot}: {e}")),
                }
            }
        }
        let Some((g, slot, f)) = taken else {
            return Err(Error::NoCapacity {
                profile: p.name.into(),
                why: if why.is_empty() {
                    "no GPUs".into()
                } else {
                    why.join("; ")
                },
            });
        };
        let (_, json) = self.lease_paths(g, slot);
        let holder = Holder {
            pid: std::process::id(),
            vm: vm.into(),
            profile: p.name.into(),
            since_unix: unix_now(),
        };
        std::fs::write(&json, serde_json::to_vec(&holder).expect("plain data"))
            .map_err(|e| self.io(e))?;
        let shm = Arc::new(self.shm(g)?);
        let page = shm.page();
        page.max_vfs.store(p.max_instances, Relaxed);
        page.policy.store(self.cfg.gpus[g].policy.code(), Relaxed);
        let v = &page.vf[slot];
        for c in [&v.engine_ns, &v.commands, &v.errors, &v.resident] {
            c.store(0, Relaxed);
        }
        v.cap_pct.store(0, Relaxed);
        v.pid.store(holder.pid, Relaxed);
        v.heartbeat_ns.store(sched::now_ns(), Relaxed);
        v.attached_at_ns.store(sched::now_ns(), Relaxed);
        v.attached.store(1, Release);
        Ok(Lease {
            gpu: g,
            slot,
            profile: p,
            shm,
            json,
            manager_lock: self.manager_lock(),
            lock: f,
        })
    }

    pub fn set_policy(&mut self, g: usize, policy: Policy) -> Result<()> {
        let _l = self.global_lock()?;
        let n = self.cfg.gpus.len();
        let spec = self
            .cfg
            .gpus
            .get_mut(g)
            .ok_or_else(|| Error::Config(format!("no GPU {g} (this host has {n})")))?;
        spec.policy = policy;
        self.save()?;
        self.shm(g)?.page().policy.store(policy.code(), Relaxed);
        Ok(())
    }

    pub fn status(&self) -> Result<Vec<GpuStatus>> {
        let _g = self.global_lock()?;
        let mut out = Vec::new();
        for (g, spec) in self.cfg.gpus.iter().enumerate() {
            let model = profile::model(&spec.model).expect("checked on open");
            let shm = self.shm(g)?;
            let page = shm.page();
            let live = self.live(g)?;
            let total: u64 = live
                .iter()
                .map(|(s, _)| page.vf[*s].engine_ns.load(Relaxed))
                .sum();
            let mut vfs = Vec::new();
            let mut profile_name = None;
            let mut allocated = 0;
            for (s, h) in live {
                let v = &page.vf[s];
                let p = profile::profile(&h.profile);
                let fb = p.map(|p| p.framebuffer).unwrap_or(0);
                allocated += fb;
                profile_name.get_or_insert(h.profile.clone());
                let ns = v.engine_ns.load(Relaxed);
                vfs.push(VfStatus {
                    slot: s,
                    vram_offset: s as u64 * fb,
                    framebuffer: fb,
                    holder: h,
                    engine_ms: ns as f64 / 1e6,
                    engine_share: if total > 0 {
                        ns as f64 / total as f64
                    } else {
                        0.0
                    },
                    commands: v.commands.load(Relaxed),
                    errors: v.errors.load(Relaxed),
                    vram_resident: v.resident.load(Relaxed),
                    engine_cap_pct: v.cap_pct.load(Relaxed),
                });
            }
            let owner = page.owner.load(Relaxed);
            let engine_owner = (owner != 0).then(|| owner as usize - 1);
            let engine_owner_stuck = engine_owner.is_some_and(|o| {
                !vfs.iter().any(|v| v.slot == o)
                    || sched::stale_stamp(page.owner_beat_ns.load(Relaxed), sched::now_ns())
            });
            out.push(GpuStatus {
                id: g,
                model: spec.model.clone(),
                vram: model.vram,
                policy: Policy::from_code(page.policy.load(Relaxed)),
                profile: profile_name,
                vram_allocated: allocated,
                vfs,
                engine_owner,
                engine_owner_stuck,
            });
        }
        Ok(out)
    }

    /// Engine time of every VF of GPU `g` now (ns, by slot), for measuring shares.
    pub fn engine_ns(&self, g: usize) -> Result<Vec<u64>> {
        let shm = self.shm(g)?;
        Ok(shm
            .page()
            .vf
            .iter()
            .map(|v| v.engine_ns.load(Relaxed))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Between one status and the next in the race tests.
    const LOOK_GAP: std::time::Duration = std::time::Duration::from_micros(50);

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("godwit-gpu-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn places_by_rule_keeps_one_profile_per_gpu_and_frees_on_drop() {
        let d = tmpdir("place");
        let m = Manager::open(&d).unwrap();
        assert_eq!(m.config().gpus.len(), 2);
        // Breadth-first: two VFs land on two GPUs.
        let a = m.allocate("GW8-2C", "a").unwrap();
        let b = m.allocate("GW8-2C", "b").unwrap();
        assert_ne!(a.gpu, b.gpu);
        // A different profile needs an empty GPU: there is none.
        let e = m.allocate("GW8-4C", "c").err().unwrap();
        assert!(matches!(e, Error::NoCapacity { .. }), "{e}");
        assert!(e.to_string().contains("runs GW8-2C VFs"), "{e}");
        assert!(matches!(
            m.allocate("nope", "x"),
            Err(Error::UnknownProfile(_))
        ));
        let st = m.status().unwrap();
        assert_eq!(st[a.gpu].vfs.len(), 1);
        assert_eq!(st[a.gpu].profile.as_deref(), Some("GW8-2C"));
        assert_eq!(st[a.gpu].vfs[0].holder.vm, "a");
        drop(b);
        let st = m.status().unwrap();
        assert_eq!(st.iter().map(|g| g.vfs.len()).sum::<usize>(), 1);
        // Now a GPU is empty, and takes the other profile.
        let c = m.allocate("GW8-4C", "c").unwrap();
        assert_ne!(c.gpu, a.gpu);
        // A chosen GPU is taken or refused, never swapped for another.
        let on = m.allocate_on("GW8-2C", "on", Some(a.gpu)).unwrap();
        assert_eq!(on.gpu, a.gpu);
        let e = m.allocate_on("GW8-2C", "x", Some(c.gpu)).err().unwrap();
        assert!(e.to_string().contains("runs GW8-4C VFs"), "{e}");
        let e = m.allocate_on("GW8-2C", "x", Some(7)).err().unwrap();
        assert!(e.to_string().contains("no GPU 7"), "{e}");
        drop((a, c, on));
        // Depth-first fills GPU 0 before GPU 1.
        let mut cfg = m.config().clone();
        cfg.placement = Placement::DepthFirst;
        let m = Manager::init(&d, cfg).unwrap();
        let v: Vec<Lease> = (0..5)
            .map(|i| m.allocate("GW8-2C", &format!("d{i}")).unwrap())
            .collect();
        assert_eq!(v.iter().map(|l| l.gpu).collect::<Vec<_>>(), [0, 0, 0, 0, 1]);
        assert_eq!(
            v.iter().map(|l| l.slot).collect::<Vec<_>>(),
            [0, 1, 2, 3, 0]
        );
        assert_eq!(v[3].vram_offset(), 6 << 30);
        // Reconfiguring is refused while VFs are held.
        assert!(Manager::init(&d, HostConfig::default()).is_err());
        drop(v);
        let _ = std::fs::remove_dir_all(&d);
    }

    /// A status taken while a VM leases its VF looks at every slot's lock: the lease
    /// must not take that look for another holder. The last free VF of a GPU (GW8-8C:
    /// one per GPU), taken and let go over and over while two threads take statuses
    /// back to back. (When a status looked without the manager's lock, it failed
    /// within 500 leases.)
    #[test]
    fn a_status_taken_meanwhile_never_makes_a_free_vf_look_taken() {
        let d = tmpdir("status-race");
        let m = Manager::open(&d).unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let looks: Vec<_> = (0..2)
            .map(|_| {
                let (stop, d) = (stop.clone(), d.clone());
                std::thread::spawn(move || {
                    let m = Manager::open(&d).unwrap();
                    let mut n = 0u64;
                    loop {
                        m.status().unwrap();
                        n += 1;
                        // Looks hold the manager's lock: back to back they would
                        // starve the allocations of it (flock is not fair).
                        std::thread::sleep(LOOK_GAP);
                        if stop.load(Relaxed) {
                            return n;
                        }
                    }
                })
            })
            .collect();
        for i in 0..10000 {
            match m.allocate_on("GW8-8C", "last", Some(0)) {
                Ok(l) => drop(l),
                Err(e) => {
                    stop.store(true, Relaxed);
                    panic!("allocation {i} of a free VF failed while statuses ran: {e}");
                }
            }
        }
        stop.store(true, Relaxed);
        for l in looks {
            assert!(l.join().unwrap() > 0);
        }
        let _ = std::fs::remove_dir_all(&d);
    }
    /// A lease let go while the manager's lock is held elsewhere and not let go (a
    /// `godwit gpu status` stopped in a debugger) still goes, after its wait: a VM's
    /// exit never hangs on the manager, and its VF is free afterwards. A placement and
    /// a status meanwhile end with an error that says so.
    #[test]
    fn a_lock_held_for_good_neither_keeps_a_lease_nor_hangs_a_placement() {
        let d = tmpdir("held-lock");
        let m = Manager::open(&d).unwrap();
        let l = m.allocate("GW8-8C", "vm").unwrap();
        let mut other = Manager::open(&d).unwrap();
        other.lock_wait = std::time::Duration::from_millis(300);
        let held = m.global_lock().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            drop(l);
            let _ = tx.send(());
        });
        let gone = rx.recv_timeout(DROP_WAIT * 5);
        // Nor do a placement and a status wait for good: they say who is in the way.
        for e in [
            other.allocate("GW8-8C", "next").err().unwrap(),
            other.status().err().unwrap(),
        ] {
            assert!(matches!(e, Error::Busy { .. }), "{e}");
            assert!(e.to_string().contains("held by another process"), "{e}");
        }
        drop(held);
        assert!(
            gone.is_ok(),
            "the lease was not let go while the lock was held"
        );
        assert!(m.status().unwrap().iter().all(|g| g.vfs.is_empty()));
        let _ = std::fs::remove_dir_all(&d);
    }

    /// Leases of one GPU taken and let go by two threads while a third takes statuses:
    /// no look may see a lease half made or half gone. A status must name every holder
    /// (never pid 0, "?"), and an allocation must not take a lease being let go for a
    /// holder of another profile and refuse the GPU ("runs ? VFs").
    #[test]
    fn a_lease_taken_or_let_go_is_never_seen_half_done() {
        let d = tmpdir("half-seen");
        let _m = Manager::open(&d).unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let looker = {
            let (stop, d) = (stop.clone(), d.clone());
            std::thread::spawn(move || {
                let m = Manager::open(&d).unwrap();
                let mut n = 0u64;
                while !stop.load(Relaxed) {
                    for g in m.status().unwrap() {
                        for v in g.vfs {
                            if v.holder.pid == 0 || v.holder.profile != "GW8-2C" {
                                return Err(format!("look {n}: VF {}: {:?}", v.slot, v.holder));
                            }
                        }
                    }
                    n += 1;
                    std::thread::sleep(LOOK_GAP);
                }
                Ok(n)
            })
        };
        let leasers: Vec<_> = (0..2)
            .map(|t| {
                let d = d.clone();
                std::thread::spawn(move || {
                    let m = Manager::open(&d).unwrap();
                    for i in 0..3000 {
                        match m.allocate_on("GW8-2C", &format!("vm{t}"), Some(0)) {
                            Ok(l) => drop(l),
                            Err(e) => return Err(format!("thread {t}, lease {i}: {e}")),
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        let leased: Vec<_> = leasers.into_iter().map(|l| l.join().unwrap()).collect();
        stop.store(true, Relaxed);
        let looked = looker.join().unwrap();
        let _ = std::fs::remove_dir_all(&d);
        for r in leased {
            r.unwrap();
        }
        assert!(looked.unwrap() > 0);
    }
}
