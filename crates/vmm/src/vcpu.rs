//! A vCPU: its KVM file descriptor, its state image, and the loop its thread runs.

use crate::arch::ring3;
use crate::control::{Control, VmExit};
use crate::devices::serial::SerialDevice;
use crate::devices::Bus;
use crate::dirty::DirtyLog;
use crate::error::{Error, KvmContext, Result};
use crate::memory::{GuestMemory, SYSDEV_BASE};
use crate::state::{GuestKind, MsrValue, VcpuState};
use godwit_guest::abi::sysdev;
use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::{VcpuExit, VcpuFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vm_memory::{Bytes, GuestAddress};

const MSR_IA32_TSC: u32 = 0x10;

pub struct Vcpu {
    pub index: u32,
    pub fd: VcpuFd,
    /// MSRs this vCPU can read, found once when the VM is built.
    pub msr_list: Arc<Vec<u32>>,
}

impl Vcpu {
    pub fn save(&self) -> Result<VcpuState> {
        let fd = &self.fd;
        let mut msrs = Msrs::from_entries(
            &self
                .msr_list
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect::<Vec<_>>(),
        )
        .map_err(|e| Error::State(format!("MSR list: {e:?}")))?;
        let n = fd.get_msrs(&mut msrs).kvm("KVM_GET_MSRS")?;
        if n != self.msr_list.len() {
            return Err(Error::State(format!(
                "read {n} of {} MSRs",
                self.msr_list.len()
            )));
        }
        Ok(VcpuState {
            index: self.index,
            regs: fd.get_regs().kvm("KVM_GET_REGS")?,
            sregs: fd.get_sregs().kvm("KVM_GET_SREGS")?,
            xsave: Box::new(fd.get_xsave().kvm("KVM_GET_XSAVE")?),
            xcrs: fd.get_xcrs().kvm("KVM_GET_XCRS")?,
            msrs: msrs
                .as_slice()
                .iter()
                .map(|e| MsrValue {
                    index: e.index,
                    data: e.data,
                })
                .collect(),
            lapic: Box::new(fd.get_lapic().kvm("KVM_GET_LAPIC")?),
            mp_state: fd.get_mp_state().kvm("KVM_GET_MP_STATE")?,
            events: fd.get_vcpu_events().kvm("KVM_GET_VCPU_EVENTS")?,
            debugregs: fd.get_debug_regs().kvm("KVM_GET_DEBUGREGS")?,
            tsc_khz: fd.get_tsc_khz().kvm("KVM_GET_TSC_KHZ")?,
        })
    }

    /// Loads a state image, with the guest TSC moved on by `tsc_advance` ticks. The
    /// order matters: special registers before MSRs and the LAPIC, pending events last.
    pub fn restore(&self, s: &VcpuState, tsc_advance: u64) -> Result<()> {
        let fd = &self.fd;
        if s.index != self.index {
            return Err(Error::State(format!(
                "state of vCPU {} given to vCPU {}",
                s.index, self.index
            )));
        }
        if let Ok(here) = fd.get_tsc_khz() {
            if here != s.tsc_khz && s.tsc_khz != 0 {
                fd.set_tsc_khz(s.tsc_khz).kvm("KVM_SET_TSC_KHZ")?;
            }
        }
        fd.set_sregs(&s.sregs).kvm("KVM_SET_SREGS")?;
        fd.set_regs(&s.regs).kvm("KVM_SET_REGS")?;
        // SAFETY: the xsave image is a full kvm_xsave read by KVM_GET_XSAVE.
        unsafe { fd.set_xsave(&s.xsave) }.kvm("KVM_SET_XSAVE")?;
        fd.set_xcrs(&s.xcrs).kvm("KVM_SET_XCRS")?;
        let entries: Vec<kvm_msr_entry> = s
            .msrs
            .iter()
            .map(|m| kvm_msr_entry {
                index: m.index,
                data: if m.index == MSR_IA32_TSC {
                    m.data.wrapping_add(tsc_advance)
                } else {
                    m.data
                },
                ..Default::default()
            })
            .collect();
        let msrs =
            Msrs::from_entries(&entries).map_err(|e| Error::State(format!("MSRs: {e:?}")))?;
        let n = fd.set_msrs(&msrs).kvm("KVM_SET_MSRS")?;
        if n != entries.len() {
            return Err(Error::State(format!(
                "KVM took {n} of {} MSRs (stopped at {:#x})",
                entries.len(),
                entries[n].index
            )));
        }
        fd.set_lapic(&s.lapic).kvm("KVM_SET_LAPIC")?;
        fd.set_mp_state(s.mp_state).kvm("KVM_SET_MP_STATE")?;
        fd.set_debug_regs(&s.debugregs).kvm("KVM_SET_DEBUGREGS")?;
        fd.set_vcpu_events(&s.events).kvm("KVM_SET_VCPU_EVENTS")?;
        Ok(())
    }
}

/// Per-vCPU counters for the API.
#[derive(Default)]
pub struct VcpuStats {
    pub exits: AtomicU64,
    pub mmio: AtomicU64,
    pub pio: AtomicU64,
    pub sleeps: AtomicU64,
}

/// What a vCPU thread needs besides its vCPU.
#[derive(Clone)]
pub struct VcpuContext {
    pub mem: GuestMemory,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub serial: Arc<Mutex<SerialDevice>>,
    pub ctl: Arc<Control>,
    pub kind: GuestKind,
    /// Emptied by the vCPU itself when its dirty ring fills.
    pub dirty: Arc<Mutex<DirtyLog>>,
}

/// Longest single sleep a guest can ask for; it loops for longer ones.
const MAX_SLEEP: Duration = Duration::from_secs(10);

enum Step {
    Continue,
    Stop(VmExit),
}

/// The vCPU thread: run until the VM stops. The vCPU is locked only while this thread
/// uses it, so a paused vCPU can be saved or restored from another thread.
pub fn run(vcpu: Arc<Mutex<Vcpu>>, ctx: VcpuContext, stats: Arc<VcpuStats>) {
    let started = crate::confine::enter(crate::confine::Role::Vcpu);
    // The kvm_run mapping lives as long as the vCPU, which `vcpu` keeps past the
    // disarming below.
    let (flag, index): (*mut u8, u32) = {
        let mut v = vcpu.lock().unwrap_or_else(|e| e.into_inner());
        (&mut v.fd.get_kvm_run().immediate_exit, v.index)
    };
    crate::control::arm_kicks(flag);
    ctx.ctl.vcpu_started();
    if let Err(e) = started {
        ctx.ctl
            .request_exit(VmExit::Error(format!("vCPU {index}'s thread: {e}")));
    }
    while ctx.ctl.vcpu_checkpoint() {
        let mut v = vcpu.lock().unwrap_or_else(|e| e.into_inner());
        stats.exits.fetch_add(1, Ordering::Relaxed);
        match step(&mut v, &ctx, &stats) {
            Step::Continue => {
                if ctx.ctl.stopping() {
                    complete_pending_io(&mut v);
                }
            }
            Step::Stop(why) => {
                ctx.ctl.request_exit(why);
                break;
            }
        }
    }
    crate::control::arm_kicks(std::ptr::null_mut());
    ctx.ctl.vcpu_stopped();
}

/// Finishes the instruction behind the last I/O exit without running further guest code
/// (KVM_RUN with immediate_exit set returns EINTR right after completing it), so that
/// state saved now resumes after the access rather than repeating it.
fn complete_pending_io(v: &mut Vcpu) {
    v.fd.set_kvm_immediate_exit(1);
    let _ = v.fd.run();
    v.fd.set_kvm_immediate_exit(0);
}

fn step(v: &mut Vcpu, ctx: &VcpuContext, stats: &VcpuStats) -> Step {
    let index = v.index;
    let exit = match v.fd.run() {
        Ok(e) => e,
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
            v.fd.set_kvm_immediate_exit(0);
            return Step::Continue;
        }
        Err(e) => return Step::Stop(VmExit::Error(format!("vCPU {index}: KVM_RUN failed: {e}"))),
    };
    match exit {
        VcpuExit::IoOut(port, data) => {
            stats.pio.fetch_add(1, Ordering::Relaxed);
            // 0x64 <- 0xfe: i8042 reset line, how Linux reboots.
            if port == 0x64 && data.first() == Some(&0xfe) {
                return Step::Stop(VmExit::Guest(0));
            }
            ctx.pio.write(port as u64, data);
            Step::Continue
        }
        VcpuExit::IoIn(port, data) => {
            stats.pio.fetch_add(1, Ordering::Relaxed);
            ctx.pio.read(port as u64, data);
            Step::Continue
        }
        VcpuExit::MmioRead(addr, data) => {
            stats.mmio.fetch_add(1, Ordering::Relaxed);
            if (SYSDEV_BASE..SYSDEV_BASE + sysdev::SIZE).contains(&addr) {
                data.fill(0);
            } else {
                ctx.mmio.read(addr, data);
            }
            Step::Continue
        }
        VcpuExit::MmioWrite(addr, data) => {
            stats.mmio.fetch_add(1, Ordering::Relaxed);
            if (SYSDEV_BASE..SYSDEV_BASE + sysdev::SIZE).contains(&addr) {
                let mut b = [0u8; 8];
                let n = data.len().min(8);
                b[..n].copy_from_slice(&data[..n]);
                let value = u64::from_le_bytes(b);
                return sysdev_write(v, ctx, stats, addr - SYSDEV_BASE, value);
            }
            ctx.mmio.write(addr, data);
            Step::Continue
        }
        VcpuExit::Intr => Step::Continue,
        VcpuExit::Unsupported(kvm_bindings::KVM_EXIT_DIRTY_RING_FULL) => {
            // KVM refuses to run this vCPU until its ring has room again.
            let r = ctx.dirty.lock().unwrap_or_else(|e| e.into_inner()).ring_full();
            match r {
                Ok(()) => Step::Continue,
                Err(e) => Step::Stop(VmExit::Error(format!("vCPU {index}: dirty ring full: {e}"))),
            }
        }
        VcpuExit::Hlt => Step::Stop(VmExit::Crash(format!("vCPU {index} halted with interrupts off"))),
        VcpuExit::Shutdown => Step::Stop(VmExit::Crash(format!(
            "vCPU {index}: triple fault (KVM_EXIT_SHUTDOWN){}",
            where_(v)
        ))),
        VcpuExit::FailEntry(reason, cpu) => Step::Stop(VmExit::Crash(format!(
            "vCPU {index}: KVM could not enter the guest (hardware reason {reason:#x}, host cpu {cpu})"
        ))),
        VcpuExit::InternalError => Step::Stop(VmExit::Crash(format!(
            "vCPU {index}: KVM internal error (an instruction KVM cannot emulate?){}",
            where_(v)
        ))),
        VcpuExit::SystemEvent(ty, _) => match ty {
            kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN | kvm_bindings::KVM_SYSTEM_EVENT_RESET => Step::Stop(VmExit::Guest(0)),
            _ => Step::Stop(VmExit::Crash(format!("vCPU {index}: system event {ty}"))),
        },
        other => Step::Stop(VmExit::Error(format!("vCPU {index}: unexpected exit {other:?}"))),
    }
}

fn where_(v: &Vcpu) -> String {
    match v.fd.get_regs() {
        Ok(r) => format!(" at rip={:#x} rsp={:#x}", r.rip, r.rsp),
        Err(_) => String::new(),
    }
}

/// A write to godwit's system device. Every value is guest-controlled: checked, and a bad
/// one fails only this request.
fn sysdev_write(v: &mut Vcpu, ctx: &VcpuContext, stats: &VcpuStats, reg: u64, value: u64) -> Step {
    if ctx.kind != GuestKind::Godwit {
        return Step::Continue;
    }
    match reg {
        sysdev::EXIT => Step::Stop(VmExit::Guest(value as u32 as i32)),
        sysdev::CONSOLE => {
            let addr = value & ((1 << sysdev::CONSOLE_LEN_SHIFT) - 1);
            let len = (value >> sysdev::CONSOLE_LEN_SHIFT) as usize;
            let mut buf = vec![0u8; len];
            match ctx.mem.read_slice(&mut buf, GuestAddress(addr)) {
                Ok(()) => ctx
                    .serial
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .write_text(&buf),
                Err(_) => tracing::warn!(
                    vcpu = v.index,
                    addr,
                    len,
                    "console buffer outside guest RAM, ignored"
                ),
            }
            Step::Continue
        }
        sysdev::SLEEP_NS => {
            stats.sleeps.fetch_add(1, Ordering::Relaxed);
            ctx.ctl
                .vcpu_sleep(Duration::from_nanos(value).min(MAX_SLEEP));
            Step::Continue
        }
        sysdev::FAULT => Step::Stop(VmExit::Crash(fault_report(v, ctx, value as u32))),
        sysdev::WAIT_IRQ => match halt_for_interrupt(v) {
            Ok(()) => Step::Continue,
            Err(e) => Step::Stop(VmExit::Error(format!("vCPU {}: {e}", v.index))),
        },
        _ => Step::Continue,
    }
}

/// `sti; hlt` on behalf of ring 3: finish the write that asked for it (so the guest
/// resumes after it), set IF, and let KVM hold the vCPU halted until an interrupt is
/// deliverable. A halted vCPU is plain vCPU state (MP state, RFLAGS): pausing, saving and
/// migrating it need nothing special.
fn halt_for_interrupt(v: &mut Vcpu) -> Result<()> {
    complete_pending_io(v);
    let mut regs = v.fd.get_regs().kvm("KVM_GET_REGS")?;
    regs.rflags |= RFLAGS_IF;
    v.fd.set_regs(&regs).kvm("KVM_SET_REGS")?;
    v.fd.set_mp_state(kvm_bindings::kvm_mp_state {
        mp_state: kvm_bindings::KVM_MP_STATE_HALTED,
    })
    .kvm("KVM_SET_MP_STATE")
}

const RFLAGS_IF: u64 = 1 << 9;

/// Describes the exception whose ring-0 stub reported `vector`.
fn fault_report(v: &Vcpu, ctx: &VcpuContext, vector: u32) -> String {
    let mut msg = format!(
        "vCPU {}: unhandled guest exception {} ({})",
        v.index,
        vector,
        ring3::vector_name(vector)
    );
    let Ok(regs) = v.fd.get_regs() else {
        return msg;
    };
    if let Some((code, [rip, _cs, _rflags, rsp])) =
        ring3::exception_frame(&ctx.mem, regs.rsp, vector)
    {
        msg += &format!(" at rip={rip:#x} rsp={rsp:#x}");
        if let Some(c) = code {
            msg += &format!(" error_code={c:#x}");
        }
    }
    if vector == 14 {
        if let Ok(s) = v.fd.get_sregs() {
            msg += &format!(" address={:#x}", s.cr2);
        }
    }
    msg
}
