//! The COM1 16550 UART (vm-superio), its output sink, and its saved state.

use super::BusDevice;
use serde::{Deserialize, Serialize};
use std::io::Write;
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

pub const COM1_PORT: u64 = 0x3f8;
pub const COM1_IRQ: u32 = 4;

/// Raises the UART's interrupt line through an irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

pub type Uart = Serial<IrqTrigger, NoEvents, Out>;

/// The UART's output. vm-superio flushes it after every byte, which is right for a
/// guest that writes the UART a byte at a time (each byte shows as it is written); a
/// line the system device hands over whole is held and goes out in one write
/// (`SerialDevice::write_text`), not a system call per byte (each of which wakes
/// whoever reads the console: a 100-byte line took about 1.5 ms that way here).
pub struct Out {
    inner: Box<dyn Write + Send>,
    held: Option<Vec<u8>>,
}

impl Out {
    pub fn new(inner: Box<dyn Write + Send>) -> Out {
        Out { inner, held: None }
    }

    /// The writer it writes to, leaving a sink in its place.
    pub fn take(&mut self) -> Box<dyn Write + Send> {
        std::mem::replace(&mut self.inner, Box::new(std::io::sink()))
    }

    fn hold(&mut self, capacity: usize) {
        self.held = Some(Vec::with_capacity(capacity));
    }

    /// Writes what was held since `hold`, in one piece.
    fn release(&mut self) -> std::io::Result<()> {
        if let Some(b) = self.held.take() {
            self.inner.write_all(&b)?;
        }
        self.inner.flush()
    }
}

impl Write for Out {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        match &mut self.held {
            Some(h) => {
                h.extend_from_slice(b);
                Ok(b.len())
            }
            None => self.inner.write(b),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self.held {
            Some(_) => Ok(()),
            None => self.inner.flush(),
        }
    }
}

pub struct SerialDevice {
    pub uart: Uart,
}

/// The UART's registers and pending input, in a form that serialises.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialDeviceState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl SerialDevice {
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        SerialDevice {
            uart: Serial::new(IrqTrigger(irq), Out::new(out)),
        }
    }

    pub fn from_state(
        state: &SerialDeviceState,
        irq: EventFd,
        out: Box<dyn Write + Send>,
    ) -> Result<Self, String> {
        let s = SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let uart = Serial::from_state(&s, IrqTrigger(irq), NoEvents, Out::new(out))
            .map_err(|e| format!("serial state: {e:?}"))?;
        Ok(SerialDevice { uart })
    }

    pub fn state(&self) -> SerialDeviceState {
        let s = self.uart.state();
        SerialDeviceState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// Console text from godwit's system device goes through the transmit register, so it
    /// meets exactly what a guest writing the UART itself would.
    pub fn write_text(&mut self, bytes: &[u8]) {
        self.uart.writer_mut().hold(bytes.len());
        for &b in bytes {
            let _ = self.uart.write(0, b);
        }
        let _ = self.uart.writer_mut().release();
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 && offset < 8 {
            data[0] = self.uart.read(offset as u8);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 && offset < 8 {
            let _ = self.uart.write(offset as u8, data[0]);
            if offset == 0 {
                let _ = self.uart.writer_mut().flush();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Counts the writes it takes.
    #[derive(Clone, Default)]
    struct Writes(Arc<Mutex<Vec<Vec<u8>>>>);
    impl Write for Writes {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().push(b.to_vec());
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_line_handed_over_whole_goes_out_in_one_write_and_bytes_one_by_one() {
        let w = Writes::default();
        let mut s = SerialDevice::new(EventFd::new(0).unwrap(), Box::new(w.clone()));
        s.write_text(b"a whole line\n");
        BusDevice::write(&mut s, 0, b"x");
        BusDevice::write(&mut s, 0, b"y");
        assert_eq!(
            *w.0.lock().unwrap(),
            [b"a whole line\n".to_vec(), b"x".to_vec(), b"y".to_vec()]
        );
    }

    #[test]
    fn text_reaches_the_sink_and_state_round_trips() {
        let sink = Sink::default();
        let mut s = SerialDevice::new(EventFd::new(0).unwrap(), Box::new(sink.clone()));
        s.write_text(b"hi\n");
        BusDevice::write(&mut s, 0, b"!");
        assert_eq!(&*sink.0.lock().unwrap(), b"hi\n!");
        // Scratch register and line control survive a save/restore.
        BusDevice::write(&mut s, 7, &[0x5a]);
        BusDevice::write(&mut s, 3, &[0x03]);
        let st = s.state();
        let json = serde_json::to_string(&st).unwrap();
        let back: SerialDeviceState = serde_json::from_str(&json).unwrap();
        let mut r =
            SerialDevice::from_state(&back, EventFd::new(0).unwrap(), Box::new(sink.clone()))
                .unwrap();
        let mut d = [0u8];
        r.read(7, &mut d);
        assert_eq!(d[0], 0x5a);
        r.read(3, &mut d);
        assert_eq!(d[0], 0x03);
    }
}
