//! Address-range dispatch for port I/O and MMIO exits. Accesses that hit no device read
//! as all ones and are otherwise ignored, as on real hardware.

use std::sync::{Arc, Mutex};

/// A device with plain mutable state: the bus serialises its accesses (through a Mutex).
pub trait BusDevice: Send {
    /// `offset` is relative to the start of the device's range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// What the bus calls: a device that handles its own locking, so that an access that
/// blocks (a GPU fence wait) does not hold up other vCPUs reaching the same device.
pub trait SharedDevice: Send + Sync {
    fn read(&self, offset: u64, data: &mut [u8]);
    fn write(&self, offset: u64, data: &[u8]);
}

impl<T: BusDevice> SharedDevice for Mutex<T> {
    fn read(&self, offset: u64, data: &mut [u8]) {
        self.lock()
            .unwrap_or_else(|e| e.into_inner())
            .read(offset, data)
    }
    fn write(&self, offset: u64, data: &[u8]) {
        self.lock()
            .unwrap_or_else(|e| e.into_inner())
            .write(offset, data)
    }
}

struct Range {
    base: u64,
    len: u64,
    dev: Arc<dyn SharedDevice>,
}

#[derive(Default)]
pub struct Bus {
    ranges: Vec<Range>,
}

impl Bus {
    /// Adds a device; refuses a range that overlaps another.
    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        dev: Arc<dyn SharedDevice>,
    ) -> Result<(), String> {
        if len == 0 || base.checked_add(len).is_none() {
            return Err(format!("bad range {base:#x}+{len:#x}"));
        }
        if self
            .ranges
            .iter()
            .any(|r| base < r.base + r.len && r.base < base + len)
        {
            return Err(format!("range {base:#x}+{len:#x} overlaps another device"));
        }
        let at = self.ranges.partition_point(|r| r.base < base);
        self.ranges.insert(at, Range { base, len, dev });
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(&Range, u64)> {
        let i = self.ranges.partition_point(|r| r.base <= addr);
        let r = self.ranges.get(i.checked_sub(1)?)?;
        let off = addr - r.base;
        (off.checked_add(size as u64)? <= r.len).then_some((r, off))
    }

    /// Returns false if no device claims the access.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((r, off)) => {
                r.dev.read(off, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((r, off)) => {
                r.dev.write(off, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<(u64, Vec<u8>)>);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range_and_rejects_overlaps() {
        let mut bus = Bus::default();
        let a = Arc::new(Mutex::new(Echo(vec![])));
        bus.insert(0x100, 0x10, a.clone()).unwrap();
        bus.insert(0x200, 0x10, Arc::new(Mutex::new(Echo(vec![]))))
            .unwrap();
        assert!(bus.insert(0x10f, 2, a.clone()).is_err());
        assert!(bus.insert(u64::MAX, 2, a.clone()).is_err());
        let mut d = [0u8; 2];
        assert!(bus.read(0x104, &mut d));
        assert_eq!(d, [4, 4]);
        // Straddling the end of a device, or in a gap: nobody answers.
        assert!(!bus.read(0x10f, &mut d));
        assert_eq!(d, [0xff, 0xff]);
        assert!(!bus.write(0x150, &[1]));
        assert!(bus.write(0x10e, &[7, 8]));
        assert_eq!(a.lock().unwrap().0, vec![(0xe, vec![7, 8])]);
    }

    /// An access at the very top of the address space, past the last device (one at
    /// address 0, as port 0 is on a PC): its offset into that device plus its size does
    /// not fit 64 bits. Nobody answers (it used to wrap into the device's range in a
    /// release build, and panic in a debug one).
    #[test]
    fn an_access_at_the_top_of_the_address_space_reaches_no_device() {
        let mut bus = Bus::default();
        let a = Arc::new(Mutex::new(Echo(vec![])));
        bus.insert(0, 0x10, a.clone()).unwrap();
        let mut d = [0u8; 8];
        assert!(!bus.read(u64::MAX - 3, &mut d));
        assert_eq!(d, [0xff; 8]);
        assert!(!bus.write(u64::MAX - 3, &[1; 8]));
        assert!(a.lock().unwrap().0.is_empty());
    }
}
