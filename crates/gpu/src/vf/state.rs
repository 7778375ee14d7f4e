//! A VF's migration state: what it holds apart from VRAM, saved only while the engine is
//! held, and restored only after the checks a guest's own register writes and commands
//! get; and the record of what the engine wrote, which a migration reads in rounds.

use super::engine::work;
use super::{Hold, InFlight, Inner, Regs, Vf};
use crate::abi::{err, irq, ENTRY_SIZE};
use crate::backend::Acc;
use crate::command::{self, Command};
use serde::{Deserialize, Serialize};

/// The version of `VfState`'s encoding.
pub const STATE_VERSION: u32 = 1;

/// The in-flight command in a saved state: the raw entry and how far it got.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InFlightState {
    pub index: u64,
    /// The 64-byte ring entry, as eight little-endian words.
    pub entry: [u64; 8],
    pub done: u64,
    pub acc: Acc,
}

/// Everything about a VF except its VRAM contents: enough to go on at the next chunk
/// boundary in another process.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VfState {
    pub regs: Regs,
    pub in_flight: Option<InFlightState>,
    /// The VM's user holds the engine (the VM is paused): it stays held where the
    /// state is restored, until the VM is resumed there.
    pub user_held: bool,
    /// The GPU clock when saved.
    pub clock_ns: u64,
    pub vram_size: u64,
}

impl VfState {
    /// The state as bytes: the version (u32, little endian), then postcard.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = STATE_VERSION.to_le_bytes().to_vec();
        postcard::to_io(self, &mut out).expect("plain data encodes into a Vec");
        out
    }

    /// Reads `encode`'s bytes; a foreign version or malformed input is an error. What
    /// the values mean is checked by `Vf::restore_state`.
    pub fn decode(bytes: &[u8]) -> Result<VfState, String> {
        let (v, rest) = bytes
            .split_first_chunk::<4>()
            .ok_or("the GPU state is truncated")?;
        let v = u32::from_le_bytes(*v);
        if v != STATE_VERSION {
            return Err(format!(
                "GPU state version {v}; this godwit reads version {STATE_VERSION}"
            ));
        }
        let (s, left): (VfState, _) = postcard::take_from_bytes(rest)
            .map_err(|e| format!("the GPU state is malformed: {e}"))?;
        if !left.is_empty() {
            return Err(format!("{} stray bytes after the GPU state", left.len()));
        }
        Ok(s)
    }
}

fn entry_words(raw: &[u8; ENTRY_SIZE]) -> [u64; 8] {
    core::array::from_fn(|i| u64::from_le_bytes(raw[8 * i..8 * i + 8].try_into().expect("8")))
}

fn entry_bytes(words: &[u64; 8]) -> [u8; ENTRY_SIZE] {
    let mut raw = [0u8; ENTRY_SIZE];
    for (i, w) in words.iter().enumerate() {
        raw[8 * i..8 * i + 8].copy_from_slice(&w.to_le_bytes());
    }
    raw
}

impl Vf {
    fn quiet(i: &Inner) -> Result<(), String> {
        if i.started && !i.parked && !i.shutdown {
            return Err("the GPU engine is running: hold it first".into());
        }
        Ok(())
    }

    /// The VF's state. Only while the engine is held (or not started), so it is final.
    pub fn save_state(&self) -> Result<VfState, String> {
        let i = self.lock();
        Self::quiet(&i)?;
        Ok(VfState {
            regs: i.regs.clone(),
            user_held: i.holds & Hold::User as u8 != 0,
            in_flight: i.in_flight.as_ref().map(|f| InFlightState {
                index: f.index,
                entry: entry_words(&f.raw),
                done: f.done,
                acc: f.acc,
            }),
            clock_ns: self.clock_ns(),
            vram_size: self.backend.vram_size(),
        })
    }

    /// Checks a saved state as hostile input, with the checks a guest's own register
    /// writes and commands get: the result is what the VF may hold, or why not.
    fn check_state(&self, s: &VfState) -> Result<(Regs, Option<InFlight>), String> {
        let r = &s.regs;
        if s.vram_size != self.backend.vram_size() {
            return Err(format!(
                "saved VF has {} bytes of VRAM, this one {}",
                s.vram_size,
                self.backend.vram_size()
            ));
        }
        let code = (r.error & 0xffff_ffff) as u32;
        if code > err::BUSY_WRITE {
            return Err(format!("error register holds unknown code {code}"));
        }
        if (r.int_status | r.int_mask) & !irq::ALL != 0 {
            return Err("interrupt registers hold undefined causes".into());
        }
        if r.enabled {
            let (ring_ok, root_ok) = self.config_ok(r);
            if !ring_ok {
                return Err(format!(
                    "ring of {} entries at {:#x} is not one this VM's VF could enable",
                    r.ring_size, r.ring_base
                ));
            }
            if !root_ok {
                return Err(format!("page-table root {:#x} is outside VRAM", r.pt_root));
            }
            if r.head >= r.ring_size || r.tail >= r.ring_size {
                return Err(format!(
                    "ring head {} or tail {} outside a ring of {}",
                    r.head, r.tail, r.ring_size
                ));
            }
        } else if r.head != 0 || r.tail != 0 {
            return Err("a disabled VF has a non-empty ring".into());
        }
        let Some(f) = &s.in_flight else {
            return Ok((r.clone(), None));
        };
        // A command that fails leaves nothing in flight. An error from a register write
        // (a doorbell outside the ring, a configuration write while enabled) stops the
        // ring with its command still in flight, which goes on after CLEAR_ERROR.
        if !r.enabled || super::command_failed(r.error) {
            return Err(
                "a command in flight on a VF that is disabled or stopped by a failed command"
                    .into(),
            );
        }
        if f.index != r.head {
            return Err(format!(
                "the command in flight is entry {}, the ring head {}",
                f.index, r.head
            ));
        }
        let raw = entry_bytes(&f.entry);
        let entry = command::decode(&raw).map_err(|e| {
            format!(
                "the command in flight does not decode: {} (value {:#x})",
                err::name(e.code),
                e.value
            )
        })?;
        let total = work(&entry);
        let aligned = match entry.cmd {
            Command::Fill { .. } => f.done.is_multiple_of(4),
            _ => true,
        };
        if f.done > total || !aligned {
            return Err(format!(
                "the command in flight has done {} of {total}",
                f.done
            ));
        }
        Ok((
            r.clone(),
            Some(InFlight {
                index: f.index,
                raw,
                entry,
                done: f.done,
                acc: f.acc,
            }),
        ))
    }

    /// Loads a saved state (engine held, or not started); VRAM is the caller's. The
    /// state is checked whole first: a bad one is refused and changes nothing.
    pub fn restore_state(&self, s: &VfState) -> Result<(), String> {
        let (regs, in_flight) = self.check_state(s)?;
        let mut i = self.lock();
        Self::quiet(&i)?;
        i.regs = regs;
        i.in_flight = in_flight;
        i.resolved = None;
        i.resolving = None;
        if s.user_held {
            i.holds |= Hold::User as u8;
        } else {
            i.holds &= !(Hold::User as u8);
        }
        *self
            .clock_offset_ns
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = s
            .clock_ns
            .saturating_sub(self.clock0.elapsed().as_nanos() as u64);
        drop(i);
        self.work.notify_all();
        Ok(())
    }

    /// Starts recording the VRAM pages the engine writes, from none.
    pub fn start_vram_tracking(&self) {
        self.dirty.start_vram();
    }

    pub fn stop_vram_tracking(&self) {
        self.dirty.stop_vram();
    }

    /// Starts recording the guest pages the engine writes (DMA), from none.
    pub fn start_dma_tracking(&self) {
        self.dirty.start_ram();
    }

    pub fn stop_dma_tracking(&self) {
        self.dirty.stop_ram();
    }

    /// VRAM pages the engine wrote since the last take (bit i = page i), now cleared.
    pub fn take_vram_dirty(&self) -> Vec<u64> {
        self.dirty.vram.take()
    }

    /// The same, added to `into` (one bit per VRAM page) rather than into a bitmap of
    /// its own; returns how many pages.
    pub fn take_vram_dirty_into(&self, into: &mut [u64]) -> u64 {
        self.dirty.vram.take_into(into)
    }

    /// The same without clearing.
    pub fn peek_vram_dirty(&self) -> Vec<u64> {
        self.dirty.vram.peek()
    }

    /// Guest pages the engine wrote (DMA) since the last take, one bitmap per region of
    /// its VM's RAM in order, now cleared.
    pub fn take_dma_dirty(&self) -> Vec<Vec<u64>> {
        self.dirty.ram.iter().map(|r| r.bits.take()).collect()
    }

    /// The same without clearing.
    pub fn peek_dma_dirty(&self) -> Vec<Vec<u64>> {
        self.dirty.ram.iter().map(|r| r.bits.peek()).collect()
    }
}
