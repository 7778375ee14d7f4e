//! The console. A line is handed to the VMM in one piece so that lines from different
//! vCPUs never interleave mid-line.

use crate::abi::sysdev;
use crate::env::{self, Platform};
use core::fmt;

const COM1: u16 = 0x3f8;
const LINE: usize = 256;

pub fn write_bytes(b: &[u8]) {
    if b.is_empty() {
        return;
    }
    match env::platform() {
        Platform::Godwit => {
            for chunk in b.chunks(sysdev::CONSOLE_MAX as usize) {
                let v = chunk.as_ptr() as u64 | ((chunk.len() as u64) << sysdev::CONSOLE_LEN_SHIFT);
                crate::sys::sysdev_write(sysdev::CONSOLE, v);
            }
        }
        Platform::Pvh => {
            for &c in b {
                crate::port::outb(COM1, c);
            }
        }
    }
}

/// Formats into a stack buffer and writes whole lines.
pub struct LineWriter {
    buf: [u8; LINE],
    len: usize,
}

impl LineWriter {
    pub const fn new() -> Self {
        LineWriter {
            buf: [0; LINE],
            len: 0,
        }
    }
    pub fn flush(&mut self) {
        write_bytes(&self.buf[..self.len]);
        self.len = 0;
    }
}

impl Default for LineWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Write for LineWriter {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &c in s.as_bytes() {
            if self.len == LINE {
                self.flush();
            }
            self.buf[self.len] = c;
            self.len += 1;
        }
        Ok(())
    }
}

#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {{
        let mut w = $crate::console::LineWriter::new();
        let _ = core::fmt::Write::write_fmt(&mut w, format_args!($($arg)*));
        w.flush();
    }};
}

#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {{
        let mut w = $crate::console::LineWriter::new();
        let _ = core::fmt::Write::write_fmt(&mut w, format_args!($($arg)*));
        let _ = core::fmt::Write::write_str(&mut w, "\n");
        w.flush();
    }};
}
