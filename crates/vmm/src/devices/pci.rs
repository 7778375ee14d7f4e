//! A PCI bus behind a host bridge: type-0 config spaces with BAR sizing, reachable through
//! an ECAM window (what godwit's guests use) and the legacy 0xCF8/0xCFC ports (Linux).

use super::BusDevice;
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};

pub const CONFIG_SIZE: usize = 256;
pub const SLOTS: usize = 32;
pub const LEGACY_PORT: u64 = 0xcf8;

const CAP_MSI: u8 = 0x05;
const MSI_ENABLE: u16 = 1 << 0;
const MSI_64BIT: u16 = 1 << 7;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BarKind {
    Mem32,
    Mem64,
}

/// A type-0 configuration space. Writes go through a mask: only bits a real device lets
/// software change can change.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PciConfig {
    bytes: Vec<u8>,
    write_mask: Vec<u8>,
    bar_sizes: [u64; 6],
}

impl PciConfig {
    pub fn new(vendor: u16, device: u16, class: u32, revision: u8) -> Self {
        let mut c = PciConfig {
            bytes: vec![0; CONFIG_SIZE],
            write_mask: vec![0; CONFIG_SIZE],
            bar_sizes: [0; 6],
        };
        c.set16(0x00, vendor);
        c.set16(0x02, device);
        c.set32(0x08, class << 8 | revision as u32);
        // Command: I/O, memory, bus master, INTx disable are software's to set.
        c.write_mask[0x04] = 0x07;
        c.write_mask[0x05] = 0x04;
        // Cache line size, latency timer, interrupt line.
        c.write_mask[0x0c] = 0xff;
        c.write_mask[0x0d] = 0xff;
        c.write_mask[0x3c] = 0xff;
        c
    }

    fn set16(&mut self, off: usize, v: u16) {
        self.bytes[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }

    fn set32(&mut self, off: usize, v: u32) {
        self.bytes[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }

    /// Declares memory BAR `index` of `size` bytes (a power of two, at least 16) at `addr`.
    pub fn add_bar(
        &mut self,
        index: usize,
        kind: BarKind,
        size: u64,
        addr: u64,
        prefetchable: bool,
    ) {
        assert!(size.is_power_of_two() && size >= 16 && index < 6);
        let off = 0x10 + index * 4;
        let flags = match kind {
            BarKind::Mem32 => 0,
            BarKind::Mem64 => 0x4,
        } | if prefetchable { 0x8 } else { 0 };
        let mask = !(size - 1);
        self.set32(off, (addr as u32 & mask as u32) | flags);
        self.write_mask[off..off + 4].copy_from_slice(&((mask as u32) & !0xf).to_le_bytes());
        self.bar_sizes[index] = size;
        if kind == BarKind::Mem64 {
            self.set32(off + 4, (addr >> 32) as u32);
            self.write_mask[off + 4..off + 8].copy_from_slice(&((mask >> 32) as u32).to_le_bytes());
        }
    }

    /// Adds a 64-bit MSI capability (one vector, no per-vector masking) at `off` as the
    /// only entry of the capability list.
    pub fn add_msi(&mut self, off: usize) {
        assert!((0x40..CONFIG_SIZE - 14).contains(&off) && off.is_multiple_of(4));
        self.bytes[0x06] |= 0x10;
        self.bytes[0x34] = off as u8;
        self.bytes[off] = CAP_MSI;
        self.bytes[off + 1] = 0;
        self.set16(off + 2, MSI_64BIT);
        self.write_mask[off + 2] = MSI_ENABLE as u8;
        self.write_mask[off + 4..off + 8].copy_from_slice(&[0xfc, 0xff, 0xff, 0xff]);
        self.write_mask[off + 8..off + 14].fill(0xff);
    }

    fn get16(&self, off: usize) -> u16 {
        u16::from_le_bytes([self.bytes[off], self.bytes[off + 1]])
    }

    fn get32(&self, off: usize) -> u32 {
        u32::from_le_bytes(self.bytes[off..off + 4].try_into().expect("4 bytes"))
    }

    /// The MSI message (address, data) the function sends, if software enabled MSI and
    /// bus mastering (an MSI is a memory write by the device).
    pub fn msi_message(&self) -> Option<(u64, u32)> {
        if self.bytes[0x04] & 0x04 == 0 || self.bytes[0x06] & 0x10 == 0 {
            return None;
        }
        let mut p = (self.bytes[0x34] & 0xfc) as usize;
        // The list lives in read-only bytes, but bound the walk anyway.
        for _ in 0..48 {
            if !(0x40..=CONFIG_SIZE - 14).contains(&p) {
                return None;
            }
            if self.bytes[p] == CAP_MSI {
                let ctl = self.get16(p + 2);
                if ctl & MSI_ENABLE == 0 {
                    return None;
                }
                let lo = self.get32(p + 4) as u64;
                return Some(if ctl & MSI_64BIT != 0 {
                    (
                        lo | (self.get32(p + 8) as u64) << 32,
                        self.get16(p + 12) as u32,
                    )
                } else {
                    (lo, self.get16(p + 8) as u32)
                });
            }
            p = (self.bytes[p + 1] & 0xfc) as usize;
        }
        None
    }

    /// Current guest-programmed address of memory BAR `index`.
    pub fn bar_addr(&self, index: usize) -> u64 {
        let off = 0x10 + index * 4;
        let lo = self.get32(off);
        let mut a = (lo & !0xf) as u64;
        if lo & 0x6 == 0x4 && index < 5 {
            a |= (self.get32(off + 4) as u64) << 32;
        }
        a
    }

    pub fn bar_size(&self, index: usize) -> u64 {
        self.bar_sizes[index]
    }

    pub fn read(&self, off: usize, data: &mut [u8]) {
        for (i, d) in data.iter_mut().enumerate() {
            *d = self.bytes.get(off + i).copied().unwrap_or(0);
        }
    }

    pub fn write(&mut self, off: usize, data: &[u8]) {
        for (i, &d) in data.iter().enumerate() {
            let o = off + i;
            if o < CONFIG_SIZE {
                let m = self.write_mask[o];
                self.bytes[o] = (self.bytes[o] & !m) | (d & m);
            }
        }
    }

    /// Whether a saved config space (hostile input) could be this function's: the same
    /// size, and every bit software cannot write equal to this one's. Only the bytes
    /// matter: which bits are writable, and BAR sizes, are this device model's own.
    pub fn check_saved(&self, saved: &PciConfig) -> Result<(), String> {
        if saved.bytes.len() != CONFIG_SIZE {
            return Err(format!("a config space of {} bytes", saved.bytes.len()));
        }
        let differs =
            (0..CONFIG_SIZE).find(|&o| (saved.bytes[o] ^ self.bytes[o]) & !self.write_mask[o] != 0);
        match differs {
            Some(o) => Err(format!(
                "read-only config byte {o:#x} is {:#04x}, this device's {:#04x}",
                saved.bytes[o], self.bytes[o]
            )),
            None => Ok(()),
        }
    }
}

pub trait PciDevice: Send {
    fn name(&self) -> &str;
    fn config(&self) -> &PciConfig;
    fn config_mut(&mut self) -> &mut PciConfig;
    /// Called after software wrote the config space or a saved one was loaded.
    fn config_changed(&mut self) {}
}

/// Device 00:00.0.
pub struct HostBridge {
    config: PciConfig,
}

impl HostBridge {
    pub const VENDOR: u16 = 0x8086;
    pub const DEVICE: u16 = 0x0d57;

    pub fn new() -> Self {
        HostBridge {
            config: PciConfig::new(Self::VENDOR, Self::DEVICE, 0x06_00_00, 0),
        }
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for HostBridge {
    fn name(&self) -> &str {
        "host-bridge"
    }
    fn config(&self) -> &PciConfig {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }
}

/// Saved config space of the device in `slot`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PciSlotState {
    pub slot: u8,
    pub name: String,
    pub config: PciConfig,
}

/// Bus 0. Only function 0 of each slot exists.
pub struct PciBus {
    slots: Vec<Option<Box<dyn PciDevice>>>,
}

impl Default for PciBus {
    fn default() -> Self {
        Self::new()
    }
}

impl PciBus {
    pub fn new() -> Self {
        let mut slots: Vec<Option<Box<dyn PciDevice>>> = (0..SLOTS).map(|_| None).collect();
        slots[0] = Some(Box::new(HostBridge::new()));
        PciBus { slots }
    }

    /// Puts a device in the first free slot; returns the slot.
    pub fn add(&mut self, dev: Box<dyn PciDevice>) -> Option<u8> {
        let i = self.slots.iter().position(|s| s.is_none())?;
        self.slots[i] = Some(dev);
        Some(i as u8)
    }

    fn dev(&mut self, bus: u8, slot: u8, func: u8) -> Option<&mut Box<dyn PciDevice>> {
        if bus != 0 || func != 0 {
            return None;
        }
        self.slots.get_mut(slot as usize)?.as_mut()
    }

    pub fn config_read(&mut self, bus: u8, slot: u8, func: u8, off: usize, data: &mut [u8]) {
        match self.dev(bus, slot, func) {
            Some(d) => d.config().read(off, data),
            None => data.fill(0xff),
        }
    }

    pub fn config_write(&mut self, bus: u8, slot: u8, func: u8, off: usize, data: &[u8]) {
        if let Some(d) = self.dev(bus, slot, func) {
            d.config_mut().write(off, data);
            d.config_changed();
        }
    }

    pub fn state(&self) -> Vec<PciSlotState> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                s.as_ref().map(|d| PciSlotState {
                    slot: i as u8,
                    name: d.name().to_string(),
                    config: d.config().clone(),
                })
            })
            .collect()
    }

    /// Checks saved config spaces against the devices this bus has: the same functions
    /// in the same slots, each one's read-only bytes unchanged.
    pub fn check(&self, state: &[PciSlotState]) -> Result<(), String> {
        let have: Vec<(u8, String)> = self.state().into_iter().map(|s| (s.slot, s.name)).collect();
        let want: Vec<(u8, String)> = state.iter().map(|s| (s.slot, s.name.clone())).collect();
        if have != want {
            return Err(format!("PCI devices differ: saved {want:?}, here {have:?}"));
        }
        for s in state {
            let d = self.slots[s.slot as usize].as_ref().expect("checked above");
            d.config()
                .check_saved(&s.config)
                .map_err(|e| format!("PCI {}: {e}", s.name))?;
        }
        Ok(())
    }

    /// Restores config spaces onto the devices this bus already has (see `check`).
    pub fn restore(&mut self, state: &[PciSlotState]) -> Result<(), String> {
        self.check(state)?;
        for s in state {
            let d = self.slots[s.slot as usize].as_mut().expect("checked above");
            d.config_mut().bytes.copy_from_slice(&s.config.bytes);
            d.config_changed();
        }
        Ok(())
    }
}

/// The ECAM window: offset = bus << 20 | slot << 15 | func << 12 | register.
pub struct Ecam(pub Arc<Mutex<PciBus>>);

impl BusDevice for Ecam {
    fn read(&mut self, off: u64, data: &mut [u8]) {
        let (b, s, f, r) = (
            (off >> 20) as u8,
            (off >> 15 & 0x1f) as u8,
            (off >> 12 & 7) as u8,
            (off & 0xfff) as usize,
        );
        self.0.lock().unwrap().config_read(b, s, f, r, data);
    }
    fn write(&mut self, off: u64, data: &[u8]) {
        let (b, s, f, r) = (
            (off >> 20) as u8,
            (off >> 15 & 0x1f) as u8,
            (off >> 12 & 7) as u8,
            (off & 0xfff) as usize,
        );
        self.0.lock().unwrap().config_write(b, s, f, r, data);
    }
}

/// Configuration mechanism #1: an address register at 0xCF8, data at 0xCFC..0xCFF.
pub struct LegacyConfig {
    pub bus: Arc<Mutex<PciBus>>,
    pub address: u32,
}

impl LegacyConfig {
    fn target(&self, data_off: u64) -> Option<(u8, u8, u8, usize)> {
        let a = self.address;
        (a & 0x8000_0000 != 0).then_some((
            (a >> 16) as u8,
            (a >> 11 & 0x1f) as u8,
            (a >> 8 & 7) as u8,
            (a & 0xfc) as usize + data_off as usize,
        ))
    }
}

impl BusDevice for LegacyConfig {
    fn read(&mut self, off: u64, data: &mut [u8]) {
        if off == 0 && data.len() == 4 {
            data.copy_from_slice(&self.address.to_le_bytes());
        } else if off >= 4 {
            match self.target(off - 4) {
                Some((b, s, f, r)) => self.bus.lock().unwrap().config_read(b, s, f, r, data),
                None => data.fill(0xff),
            }
        } else {
            data.fill(0xff);
        }
    }
    fn write(&mut self, off: u64, data: &[u8]) {
        if off == 0 && data.len() == 4 {
            self.address = u32::from_le_bytes(data.try_into().unwrap());
        } else if off >= 4 {
            if let Some((b, s, f, r)) = self.target(off - 4) {
                self.bus.lock().unwrap().config_write(b, s, f, r, data);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dummy(PciConfig);
    impl PciDevice for Dummy {
        fn name(&self) -> &str {
            "dummy"
        }
        fn config(&self) -> &PciConfig {
            &self.0
        }
        fn config_mut(&mut self) -> &mut PciConfig {
            &mut self.0
        }
    }

    fn read32(e: &mut Ecam, off: u64) -> u32 {
        let mut d = [0u8; 4];
        e.read(off, &mut d);
        u32::from_le_bytes(d)
    }

    #[test]
    fn ecam_finds_the_host_bridge_and_sizes_bars() {
        let bus = Arc::new(Mutex::new(PciBus::new()));
        let mut cfg = PciConfig::new(0x1234, 0x5678, 0x03_02_00, 1);
        cfg.add_bar(0, BarKind::Mem32, 0x1000, 0xc000_0000, false);
        cfg.add_bar(2, BarKind::Mem64, 1 << 32, 0x10_0000_0000, true);
        assert_eq!(bus.lock().unwrap().add(Box::new(Dummy(cfg))), Some(1));
        let mut e = Ecam(bus.clone());
        assert_eq!(read32(&mut e, 0), 0x0d57_8086);
        assert_eq!(read32(&mut e, 0x08) >> 8, 0x06_00_00);
        let dev1 = 1 << 15;
        assert_eq!(read32(&mut e, dev1), 0x5678_1234);
        // Absent slot, function and bus.
        assert_eq!(read32(&mut e, 2 << 15), 0xffff_ffff);
        assert_eq!(read32(&mut e, dev1 | 1 << 12), 0xffff_ffff);
        assert_eq!(read32(&mut e, 1 << 20), 0xffff_ffff);
        // Size a 32-bit BAR the way a guest does.
        e.write(dev1 + 0x10, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(read32(&mut e, dev1 + 0x10), 0xffff_f000);
        e.write(dev1 + 0x10, &0xc001_0000u32.to_le_bytes());
        assert_eq!(
            bus.lock().unwrap().slots[1]
                .as_ref()
                .unwrap()
                .config()
                .bar_addr(0),
            0xc001_0000
        );
        // 64-bit prefetchable BAR of 4 GiB.
        e.write(dev1 + 0x18, &0xffff_ffffu32.to_le_bytes());
        e.write(dev1 + 0x1c, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(read32(&mut e, dev1 + 0x18), 0x0000_000c);
        assert_eq!(read32(&mut e, dev1 + 0x1c), 0xffff_ffff);
        // Ids are read-only.
        e.write(dev1, &0u32.to_le_bytes());
        assert_eq!(read32(&mut e, dev1), 0x5678_1234);
        // Out-of-range register offsets read as zero and ignore writes.
        e.write(dev1 + 0x800, &[1, 2, 3, 4]);
        assert_eq!(read32(&mut e, dev1 + 0x800), 0);
    }

    #[test]
    fn legacy_ports_reach_the_same_bus_and_state_round_trips() {
        let bus = Arc::new(Mutex::new(PciBus::new()));
        let mut l = LegacyConfig {
            bus: bus.clone(),
            address: 0,
        };
        l.write(0, &0x8000_0000u32.to_le_bytes());
        let mut d = [0u8; 4];
        l.read(4, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x0d57_8086);
        let mut h = [0u8; 2];
        l.read(6, &mut h);
        assert_eq!(u16::from_le_bytes(h), 0x0d57);
        // Enable bit clear: nothing answers.
        l.write(0, &0u32.to_le_bytes());
        l.read(4, &mut d);
        assert_eq!(d, [0xff; 4]);

        l.write(0, &0x8000_0004u32.to_le_bytes());
        l.write(4, &[0x06, 0, 0, 0]);
        let saved = bus.lock().unwrap().state();
        let json = serde_json::to_string(&saved).unwrap();
        let other = Arc::new(Mutex::new(PciBus::new()));
        other
            .lock()
            .unwrap()
            .restore(&serde_json::from_str::<Vec<PciSlotState>>(&json).unwrap())
            .unwrap();
        assert_eq!(other.lock().unwrap().state(), saved);
        let mut with_extra = PciBus::new();
        with_extra.add(Box::new(Dummy(PciConfig::new(1, 2, 3, 4))));
        assert!(with_extra.restore(&saved).is_err());
    }

    #[test]
    fn msi_capability_is_found_and_programmed_like_hardware() {
        let mut c = PciConfig::new(1, 2, 3, 4);
        c.add_msi(0x40);
        let mut b = [0u8; 4];
        c.read(0x34, &mut b[..1]);
        assert_eq!(b[0], 0x40);
        c.read(0x40, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x0080_0005);
        c.write(0x44, &0xfee0_1003u32.to_le_bytes());
        c.write(0x48, &0u32.to_le_bytes());
        c.write(0x4c, &0x0041u32.to_le_bytes());
        c.read(0x44, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0xfee0_1000, "address bits 1:0 are 0");
        // Not enabled, then no bus mastering: no message.
        assert_eq!(c.msi_message(), None);
        c.write(0x42, &[0x71, 0xff]);
        assert_eq!(c.msi_message(), None);
        c.read(0x40, &mut b);
        assert_eq!(
            u32::from_le_bytes(b) >> 16,
            0x81,
            "only the enable bit is writable"
        );
        c.write(0x04, &[0x06]);
        assert_eq!(c.msi_message(), Some((0xfee0_1000, 0x41)));
        c.write(0x42, &[0x00]);
        assert_eq!(c.msi_message(), None);
    }
}
