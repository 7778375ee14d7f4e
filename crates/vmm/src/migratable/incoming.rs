//! A destination builds the VM an incoming stream describes: its sections say how much
//! memory, how many vCPUs, what guest, which GPU profile. The host adds its own choices
//! (how it tracks writes, where its GPU manager lives) and its limits (`--memory` and
//! `--vcpus` given by the user must match). Whatever cannot match is refused here,
//! before the source stops anything; the VM built is then compared section by section.

use super::Section;
use crate::config::{GpuRequest, Payload, VmConfig};
use crate::state::GuestKind;
use crate::Console;
use std::path::PathBuf;

/// What a destination host brings to an incoming VM.
#[derive(Clone, Debug, Default)]
pub struct Host {
    /// What the user said this destination must receive (unset: the source's).
    pub memory_mib: Option<u64>,
    pub vcpus: Option<u32>,
    /// How this host tracks the VM's writes once it runs here.
    pub dirty_log: crate::dirty::DirtyLogMode,
    /// This host's GPU manager, where a GPU function is leased.
    pub gpu_dir: Option<PathBuf>,
    /// How the VM is named in `godwit gpu status`.
    pub name: String,
    /// Its id here (`godwit run --id`), if any.
    pub id: Option<String>,
    /// The GPU (by index) its GPU function must be leased on, if a manager chose one.
    pub gpu_index: Option<usize>,
    /// The GPU profile the user said the source must bring (`--gpu` with `--incoming`;
    /// unset: whatever it brings, or none).
    pub gpu_profile: Option<String>,
    /// In post-copy, how its GPU engine meets pages still at the source (`run
    /// --gpu-prefetch`).
    pub gpu_prefetch: crate::config::GpuPrefetch,
    /// Memory (and VRAM) readied before the source connected (`--memory`, and `--gpu`,
    /// with `--prefault`).
    pub prefaulted: crate::memory::Prefaulted,
}

const KNOWN: [&str; 4] = ["vcpus", "gpu", "ram", "platform"];

fn need<'a>(sections: &'a [Section], name: &str, key: &str) -> Result<&'a str, String> {
    let s = sections
        .iter()
        .find(|s| s.name == name)
        .ok_or_else(|| format!("the source's VM has no {name} section"))?;
    s.needs
        .get(key)
        .map(String::as_str)
        .ok_or_else(|| format!("the source's {name} section does not say its {key}"))
}

/// The configuration of a VM that can take `sections` on `host`, or why it cannot.
pub fn config(
    sections: &[Section],
    guest: &str,
    host: &Host,
    console: Console,
) -> Result<VmConfig, String> {
    for (i, s) in sections.iter().enumerate() {
        if !KNOWN.contains(&s.name.as_str()) {
            return Err(format!(
                "the source's VM has a part this godwit does not know: {:?}",
                s.name
            ));
        }
        if sections[..i].iter().any(|o| o.name == s.name) {
            return Err(format!("the source names its {} section twice", s.name));
        }
    }
    let memory_mib: u64 = need(sections, "ram", "memory_mib")?
        .parse()
        .map_err(|_| "the source's memory size is not a number".to_string())?;
    if memory_mib == 0 || memory_mib > crate::memory::MAX_MEMORY / crate::memory::MIB {
        return Err(format!("memory size {memory_mib} MiB is out of range"));
    }
    if let Some(m) = host.memory_mib.filter(|m| *m != memory_mib) {
        return Err(format!(
            "the source VM has {memory_mib} MiB of memory, this destination was started with --memory {m}"
        ));
    }
    let vcpus: u32 = need(sections, "vcpus", "count")?
        .parse()
        .map_err(|_| "the source's vCPU count is not a number".to_string())?;
    if let Some(v) = host.vcpus.filter(|v| *v != vcpus) {
        return Err(format!(
            "the source VM has {vcpus} vCPUs, this destination was started with --vcpus {v}"
        ));
    }
    let kind = match need(sections, "platform", "guest")? {
        "godwit" => GuestKind::Godwit,
        "linux" => GuestKind::Linux,
        k => return Err(format!("the source runs a guest of unknown kind {k:?}")),
    };
    let profile = match sections.iter().any(|s| s.name == "gpu") {
        false => None,
        true => Some(need(sections, "gpu", "profile")?),
    };
    match (profile, host.gpu_profile.as_deref()) {
        (Some(theirs), Some(ours)) if theirs != ours => {
            return Err(format!(
                "the source VM has a GPU function of profile {theirs}, this destination was \
                 started with --gpu {ours}"
            ))
        }
        (None, Some(ours)) => {
            return Err(format!(
                "the source VM has no GPU function, this destination was started with --gpu \
                 {ours}"
            ))
        }
        _ => {}
    }
    let gpu = profile.map(|profile| GpuRequest {
        profile: profile.to_string(),
        manager_dir: host
            .gpu_dir
            .clone()
            .unwrap_or_else(godwit_gpu::Manager::default_dir),
        vm_name: host.name.clone(),
        gpu_index: host.gpu_index,
        prefetch: host.gpu_prefetch,
    });
    let cfg = VmConfig {
        memory_mib,
        vcpus,
        payload: Payload::Incoming {
            kind,
            guest: guest.chars().take(200).collect(),
        },
        console,
        id: host.id.clone(),
        gpu,
        dirty_log: host.dirty_log,
        prefaulted: host.prefaulted.clone(),
    };
    cfg.validate().map_err(|e| e.to_string())?;
    Ok(cfg)
}

/// Why a VM built here (`ours`) cannot take a source's sections, if it cannot.
pub fn mismatch(theirs: &[Section], ours: &[Section]) -> Option<String> {
    for t in theirs {
        match ours.iter().find(|o| o.name == t.name) {
            Some(o) => {
                if let Some(why) = t.mismatch(o) {
                    return Some(why);
                }
            }
            None => return Some(format!("this VM has no {} to take", t.name)),
        }
    }
    ours.iter()
        .find(|o| !theirs.iter().any(|t| t.name == o.name))
        .map(|o| format!("the source sends no {} section", o.name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sections(mem: &str) -> Vec<Section> {
        vec![
            Section::new("vcpus", 1, &[("count", "2".into())]),
            Section::new("gpu", 1, &[("profile", "GW8-2C".into())]),
            Section::new("ram", 1, &[("memory_mib", mem.into())]),
            Section::new("platform", 1, &[("guest", "godwit".into())]),
        ]
    }

    #[test]
    fn a_config_follows_the_sections_and_the_host_limits() {
        let host = Host {
            gpu_dir: Some("/tmp/x".into()),
            ..Default::default()
        };
        let c = config(&sections("512"), "g", &host, Console::Null).unwrap();
        assert_eq!((c.memory_mib, c.vcpus), (512, 2));
        let g = c.gpu.unwrap();
        assert_eq!(
            (g.profile.as_str(), g.manager_dir),
            ("GW8-2C", "/tmp/x".into())
        );
        let mine = Host {
            memory_mib: Some(256),
            ..Default::default()
        };
        let e = config(&sections("512"), "g", &mine, Console::Null)
            .err()
            .unwrap();
        assert!(e.contains("--memory 256"), "{e}");
        assert!(config(&sections("lots"), "g", &host, Console::Null).is_err());
        let mut odd = sections("512");
        odd.push(Section::new("fpga", 1, &[]));
        assert!(config(&odd, "g", &host, Console::Null)
            .err()
            .unwrap()
            .contains("fpga"));
    }

    #[test]
    fn a_destination_started_with_a_gpu_profile_takes_only_that_one() {
        let host = |p: &str| Host {
            gpu_profile: Some(p.into()),
            ..Default::default()
        };
        let c = config(&sections("512"), "g", &host("GW8-2C"), Console::Null).unwrap();
        assert_eq!(c.gpu.unwrap().profile, "GW8-2C");
        let e = config(&sections("512"), "g", &host("GW8-1C"), Console::Null)
            .err()
            .unwrap();
        assert!(
            e.contains("profile GW8-2C") && e.contains("--gpu GW8-1C"),
            "{e}"
        );
        let no_gpu: Vec<Section> = sections("512")
            .into_iter()
            .filter(|s| s.name != "gpu")
            .collect();
        let e = config(&no_gpu, "g", &host("GW8-2C"), Console::Null)
            .err()
            .unwrap();
        assert!(e.contains("no GPU function"), "{e}");
    }

    #[test]
    fn the_first_difference_is_named() {
        let a = sections("512");
        assert_eq!(mismatch(&a, &a), None);
        let b = sections("1024");
        assert!(mismatch(&a, &b).unwrap().contains("memory_mib 512"));
        assert!(mismatch(&a, &a[..3]).unwrap().contains("no platform"));
        assert!(mismatch(&a[..3], &a).unwrap().contains("sends no platform"));
    }
}
