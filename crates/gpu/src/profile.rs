//! GPU models and vGPU profiles. A profile fixes a VF's frame buffer, how many such VFs
//! one GPU holds, and so its scheduling share under fixed-share scheduling (1/max).
//!
//! One GPU runs one profile at a time (like NVIDIA's time-sliced vGPU): the first VF
//! placed on an empty GPU sets it, and the GPU takes any profile again once its last VF
//! is gone. With equal-sized slices VRAM is divided statically with no fragmentation
//! (slot i owns [i * size, (i + 1) * size)), and fixed shares add up to exactly one GPU.

use serde::Serialize;

#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
pub struct Model {
    pub name: &'static str,
    pub vram: u64,
}

#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
pub struct Profile {
    pub name: &'static str,
    pub model: &'static str,
    /// Frame buffer (VRAM) of one VF, bytes.
    pub framebuffer: u64,
    pub max_instances: u32,
}

impl Profile {
    /// The engine share a VF of this profile is guaranteed under fixed-share scheduling.
    pub fn fixed_share(&self) -> f64 {
        1.0 / self.max_instances as f64
    }
}

const GIB: u64 = 1 << 30;

pub const MODELS: &[Model] = &[Model {
    name: "GW-8",
    vram: 8 * GIB,
}];

pub const PROFILES: &[Profile] = &[
    Profile {
        name: "GW8-1C",
        model: "GW-8",
        framebuffer: GIB,
        max_instances: 8,
    },
    Profile {
        name: "GW8-2C",
        model: "GW-8",
        framebuffer: 2 * GIB,
        max_instances: 4,
    },
    Profile {
        name: "GW8-4C",
        model: "GW-8",
        framebuffer: 4 * GIB,
        max_instances: 2,
    },
    Profile {
        name: "GW8-8C",
        model: "GW-8",
        framebuffer: 8 * GIB,
        max_instances: 1,
    },
];

pub fn model(name: &str) -> Option<&'static Model> {
    MODELS.iter().find(|m| m.name.eq_ignore_ascii_case(name))
}

pub fn profile(name: &str) -> Option<&'static Profile> {
    PROFILES.iter().find(|p| p.name.eq_ignore_ascii_case(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_profile_divides_its_gpu_exactly() {
        for p in PROFILES {
            let m = model(p.model).unwrap();
            assert_eq!(p.framebuffer * p.max_instances as u64, m.vram, "{}", p.name);
            assert!(p.framebuffer.is_power_of_two());
            assert!(p.max_instances as usize <= crate::shm::MAX_VFS);
        }
        assert_eq!(profile("gw8-2c").unwrap().max_instances, 4);
        assert!(profile("GW8-3C").is_none());
    }
}
