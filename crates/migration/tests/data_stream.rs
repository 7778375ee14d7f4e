//! A component that is not memory streams opaque bytes, the way a VFIO device's data fd
//! does: in PRE_COPY what it can send while running, in STOP_COPY the rest. Here a
//! stand-in for such a device streams a few MiB through the real sending lanes (DATA
//! frames, cut to the frame limit, in order on the main connection) and the real
//! receiver feeds them, in order, to its counterpart, which checks every byte when it
//! leaves RESUMING, as a VFIO driver checks the state it was given.

use godwit_migration::destination::drain;
use godwit_migration::outbound::Outbound;
use godwit_migration::transport::{Stream, Target};
use godwit_migration::wire::{Frame, Kind};
use godwit_vmm::migratable::{
    step_to, Component, ComponentError, MigState, PreCopyInfo, ReadReport, Result, Section, Sink,
};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The device's whole state: 5 MiB, more than one frame holds.
fn blob() -> Vec<u8> {
    (0..5u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect()
}

/// What a device with an opaque data stream looks like to the driver.
struct Device {
    state: Mutex<MigState>,
    /// Source: the state still to send (PRE_COPY sends the first 4 MiB, STOP_COPY the
    /// rest). Destination: what arrived.
    bytes: Mutex<Vec<u8>>,
    sent: Mutex<usize>,
}

impl Device {
    fn new(bytes: Vec<u8>) -> Device {
        Device {
            state: Mutex::new(MigState::Running),
            bytes: Mutex::new(bytes),
            sent: Mutex::new(0),
        }
    }

    /// What may be read now: the pre-copy part while running, all of it once stopped.
    fn available(&self) -> usize {
        let n = self.bytes.lock().unwrap().len();
        match *self.state.lock().unwrap() {
            MigState::StopCopy => n,
            _ => n.min(4 << 20),
        }
    }
}

impl Component for Device {
    fn section(&self) -> Section {
        Section::new("device", 1, &[])
    }
    fn stop_order(&self) -> u8 {
        1
    }
    fn state(&self) -> MigState {
        *self.state.lock().unwrap()
    }
    fn set_state(&self, to: MigState) -> Result<()> {
        let mut s = self.state.lock().unwrap();
        if !s.is_arc(to) {
            return Err(ComponentError::Arc { from: *s, to });
        }
        if (*s, to) == (MigState::Resuming, MigState::Stop) && *self.bytes.lock().unwrap() != blob()
        {
            return Err(ComponentError::Refused(
                "the device state is incomplete".into(),
            ));
        }
        *s = to;
        Ok(())
    }
    fn precopy_info(&self) -> Result<PreCopyInfo> {
        let left = (self.available() - *self.sent.lock().unwrap()) as u64;
        Ok(PreCopyInfo {
            initial_bytes: left,
            dirty_bytes: 0,
        })
    }
    fn read(&self, sink: &mut dyn Sink, _pages: u64) -> Result<ReadReport> {
        // At most 1 MiB per call, as a read of a VFIO data fd returns what it has.
        let (from, to) = {
            let sent = *self.sent.lock().unwrap();
            (sent, self.available().min(sent + (1 << 20)))
        };
        sink.data(&self.bytes.lock().unwrap()[from..to])?;
        *self.sent.lock().unwrap() = to;
        Ok(ReadReport::default())
    }
    fn save(&self) -> Result<Vec<u8>> {
        Ok(Vec::new())
    }
    fn load(&self, _bytes: &[u8]) -> Result<()> {
        Ok(())
    }
    fn load_data(&self, bytes: &[u8]) -> Result<()> {
        if self.state() != MigState::Resuming {
            return Err(ComponentError::WrongState {
                what: "data",
                state: self.state(),
            });
        }
        self.bytes.lock().unwrap().extend_from_slice(bytes);
        Ok(())
    }
}

#[test]
fn a_device_streams_its_state_as_opaque_bytes() {
    let dir = std::env::temp_dir().join(format!("godwit-data-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("stream");
    // The source: pre-copy what it can, stop, send the rest, as the driver does.
    let src = Device::new(blob());
    let s = Stream::connect(&Target::File(path.clone()), Duration::from_secs(1)).unwrap();
    let mut out = Outbound::new(vec![s], None, Arc::default()).unwrap();
    let cancel = AtomicBool::new(false);
    let pump = |out: &mut Outbound| {
        while src.precopy_info().unwrap().total() > 0 {
            src.read(&mut out.sink(0, &cancel), 0).unwrap();
        }
    };
    step_to(&src, MigState::PreCopy).unwrap();
    pump(&mut out);
    assert_eq!(*src.sent.lock().unwrap(), 4 << 20, "the pre-copy part");
    step_to(&src, MigState::StopCopy).unwrap();
    pump(&mut out);
    out.control(&Frame::State {
        section: 0,
        data: &[],
    })
    .unwrap();
    out.complete().unwrap();
    // A snapshot file replaces its path only when sealed.
    out.seal().unwrap();
    drop(out);
    // The destination takes the frames in order.
    let dst: Arc<dyn Component> = Arc::new(Device::new(Vec::new()));
    step_to(&*dst, MigState::Resuming).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let parts = vec![dst.clone()];
    let t = drain(
        &mut bytes.as_slice(),
        &parts,
        &["device".into()],
        &Default::default(),
        Kind::Complete,
        &mut |_| Ok(()),
    )
    .unwrap();
    assert_eq!(t.data, 5 << 20);
    step_to(&*dst, MigState::Stop).expect("every byte arrived, in order");
    // A damaged stream is refused where the device checks it.
    let mut cut = Device::new(Vec::new());
    cut.state = Mutex::new(MigState::Resuming);
    cut.bytes.lock().unwrap().extend_from_slice(&blob()[..100]);
    assert!(step_to(&cut, MigState::Stop).is_err());
    let _ = std::fs::remove_dir_all(&dir);
}
