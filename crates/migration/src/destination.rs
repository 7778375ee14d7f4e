//! The receiving side: waits for a source, checks its VM against what this process was
//! asked to run, rebuilds memory and state from the stream, and starts the VM only once
//! the source has handed it over. Everything it reads is hostile: any malformed,
//! truncated, corrupt or out-of-range input ends the migration with a clear error and
//! the VM is never started.

use crate::transport::{Listener, Stream};
use crate::wire::{self, Frame, Hello, Kind, Totals, WireError, PAGE_SIZE};
use godwit_vmm::memory::{self, GuestMemory, RamRegion};
use godwit_vmm::state::{VmState, STATE_VERSION};
use godwit_vmm::{Console, Payload, Vm, VmConfig};
use std::collections::HashSet;
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress};

/// A source that sends nothing for this long is given up.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Time for the extra data connections to arrive after ACCEPT.
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);

/// What the user asked this destination to run; unset fields are taken from the source.
#[derive(Clone, Debug, Default)]
pub struct Expect {
    pub memory_mib: Option<u64>,
    pub vcpus: Option<u32>,
    /// How this host tracks the VM's writes once it runs here (not checked against the
    /// source: it is this host's choice).
    pub dirty_log: godwit_vmm::dirty::DirtyLogMode,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Error(pub String);

fn err(m: impl Into<String>) -> Error {
    Error(m.into())
}

/// Checks a source's HELLO against this destination; the reason on a mismatch.
pub fn check_hello(h: &Hello, e: &Expect) -> Result<(), String> {
    if h.wire_version != wire::WIRE_VERSION {
        return Err(format!(
            "the source speaks migration wire version {}, this godwit speaks {}",
            h.wire_version,
            wire::WIRE_VERSION
        ));
    }
    if h.state_version != STATE_VERSION {
        return Err(format!(
            "the source sends VM state version {}, this godwit reads {STATE_VERSION}",
            h.state_version
        ));
    }
    if let Some(m) = e.memory_mib {
        if m != h.memory_mib {
            return Err(format!(
                "the source VM has {} MiB of memory, this destination was started with --memory {m}",
                h.memory_mib
            ));
        }
    }
    if let Some(v) = e.vcpus {
        if v != h.shape.vcpus {
            return Err(format!(
                "the source VM has {} vCPUs, this destination was started with --vcpus {v}",
                h.shape.vcpus
            ));
        }
    }
    let bytes = h
        .memory_mib
        .checked_mul(memory::MIB)
        .filter(|b| *b <= memory::MAX_MEMORY)
        .ok_or_else(|| format!("memory size {} MiB is out of range", h.memory_mib))?;
    if h.shape.ram != memory::layout(bytes) {
        return Err(format!(
            "the source's memory layout {:?} is not godwit's layout for {} MiB",
            h.shape.ram, h.memory_mib
        ));
    }
    if h.connections == 0 || h.connections > crate::source::MAX_CONNECTIONS {
        return Err(format!("{} connections asked for", h.connections));
    }
    Ok(())
}

/// The region that holds `[gpa, gpa + len)` whole, if any.
fn in_ram(ram: &[RamRegion], gpa: u64, len: u64) -> bool {
    let Some(end) = gpa.checked_add(len) else {
        return false;
    };
    ram.iter().any(|r| gpa >= r.start && end <= r.end())
}

static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

/// Writes the pages of one PAGES or ZERO frame into guest memory, after checking every
/// address. Nothing is written unless the whole frame is valid.
pub fn apply(
    mem: &GuestMemory,
    ram: &[RamRegion],
    f: &Frame,
    t: &mut Totals,
) -> Result<(), String> {
    match f {
        Frame::Pages { gpas, data } => {
            for &g in gpas {
                if g % PAGE_SIZE as u64 != 0 || !in_ram(ram, g, PAGE_SIZE as u64) {
                    return Err(format!("page address {g:#x} is not a page of guest RAM"));
                }
            }
            for (g, page) in gpas.iter().zip(data.chunks_exact(PAGE_SIZE)) {
                mem.write_slice(page, GuestAddress(*g))
                    .map_err(|e| format!("page {g:#x}: {e}"))?;
            }
            t.pages += gpas.len() as u64;
        }
        Frame::Zero(runs) => {
            for &(g, n) in runs {
                let len = n as u64 * PAGE_SIZE as u64;
                if n == 0 || g % PAGE_SIZE as u64 != 0 || !in_ram(ram, g, len) {
                    return Err(format!(
                        "zero run {g:#x} + {n} pages is not inside guest RAM"
                    ));
                }
            }
            for &(g, n) in runs {
                for i in 0..n as u64 {
                    let a = g + i * PAGE_SIZE as u64;
                    mem.write_slice(&ZERO_PAGE, GuestAddress(a))
                        .map_err(|e| format!("page {a:#x}: {e}"))?;
                }
                t.zero_pages += n as u64;
            }
        }
        other => return Err(format!("{:?} where pages were expected", other.kind())),
    }
    Ok(())
}

/// Reads page frames until `until` (END on a data connection, COMPLETE on the main one,
/// which also carries STATE before it). Returns the state bytes, if any, after checking
/// the sender's totals against what arrived.
pub fn drain(
    r: &mut impl std::io::Read,
    mem: &GuestMemory,
    ram: &[RamRegion],
    until: Kind,
) -> Result<(Totals, Option<Vec<u8>>), String> {
    drain_with(r, mem, ram, until, &mut |_| Ok(()))
}

/// `drain`, calling `on_state` as soon as STATE arrives; an error from it ends the drain.
pub fn drain_with(
    r: &mut impl std::io::Read,
    mem: &GuestMemory,
    ram: &[RamRegion],
    until: Kind,
    on_state: &mut dyn FnMut(&[u8]) -> Result<(), String>,
) -> Result<(Totals, Option<Vec<u8>>), String> {
    let mut buf = Vec::new();
    let mut got = Totals::default();
    let mut state = None;
    loop {
        let f = wire::read_frame(r, &mut buf).map_err(|e| match e {
            WireError::Closed => "the source closed the connection before the end".to_string(),
            e => format!("migration stream: {e}"),
        })?;
        match f {
            Frame::Pages { .. } | Frame::Zero(_) => apply(mem, ram, &f, &mut got)?,
            Frame::State(s) if until == Kind::Complete && state.is_none() => {
                on_state(s)?;
                state = Some(s.to_vec())
            }
            Frame::End(t) | Frame::Complete(t) if f.kind() == until => {
                if t != got {
                    return Err(format!(
                        "the source sent {t:?} on this connection but {got:?} arrived"
                    ));
                }
                if until == Kind::Complete && state.is_none() {
                    return Err("the stream ended without the VM state".into());
                }
                return Ok((got, state));
            }
            Frame::Abort(m) => return Err(format!("the source aborted: {m}")),
            f => {
                return Err(format!(
                    "unexpected {:?} frame in the page stream",
                    f.kind()
                ))
            }
        }
    }
}

/// A VM received and loaded, not yet running.
pub struct Incoming {
    pub vm: Vm,
    main: Stream,
    snapshot: bool,
    pub source_guest: String,
    /// From the first byte of the stream to READY.
    pub receive_ms: f64,
}

fn refuse(main: &mut Stream, snapshot: bool, why: String) -> Error {
    if !snapshot {
        let _ = wire::write_frame(main, &Frame::Refuse(why.clone()));
    }
    err(format!("refused the incoming VM: {why}"))
}

fn abort(main: &mut Stream, snapshot: bool, why: String) -> Error {
    if !snapshot {
        let _ = wire::write_frame(main, &Frame::Abort(why.clone()));
    }
    err(why)
}

/// Waits for a source on `l`, then receives and loads its VM.
pub fn receive(l: &Listener, expect: &Expect, console: Console) -> Result<Incoming, Error> {
    let mut main = l
        .accept(None)
        .map_err(|e| err(format!("waiting for the source: {e}")))?;
    let t0 = Instant::now();
    main.set_read_timeout(Some(IDLE_TIMEOUT))
        .map_err(|e| err(e.to_string()))?;
    let mut buf = Vec::new();
    let hello = match wire::read_frame(&mut main, &mut buf) {
        Ok(Frame::Hello(h)) => h,
        Ok(f) => {
            return Err(err(format!(
                "the stream starts with {:?}, not HELLO",
                f.kind()
            )))
        }
        Err(e) => return Err(err(format!("reading the source's HELLO: {e}"))),
    };
    let snapshot = matches!(l, Listener::File(_));
    if hello.snapshot != snapshot {
        return Err(refuse(
            &mut main,
            snapshot,
            "a snapshot stream came over a socket (or a live one from a file)".into(),
        ));
    }
    if snapshot && hello.connections != 1 {
        return Err(err("a snapshot file must use one connection"));
    }
    if let Err(why) = check_hello(&hello, expect) {
        return Err(refuse(&mut main, snapshot, why));
    }
    let mut vm = match Vm::create(VmConfig {
        memory_mib: hello.memory_mib,
        vcpus: hello.shape.vcpus,
        payload: Payload::Incoming {
            kind: hello.shape.kind.clone(),
            guest: hello.guest.clone(),
        },
        console,
        gpu: None,
        dirty_log: expect.dirty_log,
    }) {
        Ok(vm) => vm,
        Err(e) => {
            return Err(refuse(
                &mut main,
                snapshot,
                format!("cannot build the VM: {e}"),
            ))
        }
    };
    if vm.shape() != hello.shape {
        let why = format!(
            "the source VM {:?} does not match this one {:?}",
            hello.shape,
            vm.shape()
        );
        return Err(refuse(&mut main, snapshot, why));
    }
    // The vCPU threads exist from here on, parked: starting them is not on the
    // switchover's critical path. Dropping the VM on any failure below ends them unrun.
    if let Err(e) = vm.start_paused() {
        return Err(refuse(
            &mut main,
            snapshot,
            format!("cannot create the vCPU threads: {e}"),
        ));
    }
    if !snapshot {
        wire::write_frame(&mut main, &Frame::Accept)
            .map_err(|e| err(format!("answering the source: {e}")))?;
    }

    // Extra data connections: each must name this session and a fresh index.
    let mut data = Vec::new();
    let mut seen = HashSet::new();
    for _ in 1..hello.connections {
        let mut c = l
            .accept(Some(JOIN_TIMEOUT))
            .map_err(|e| abort(&mut main, false, format!("data connection: {e}")))?;
        c.set_read_timeout(Some(IDLE_TIMEOUT))
            .map_err(|e| err(e.to_string()))?;
        match wire::read_frame(&mut c, &mut buf) {
            Ok(Frame::Join { session, index })
                if session == hello.session
                    && (1..hello.connections).contains(&index)
                    && seen.insert(index) => {}
            Ok(f) => {
                let why = format!("a data connection opened with a bad {:?}", f.kind());
                return Err(abort(&mut main, false, why));
            }
            Err(e) => return Err(abort(&mut main, false, format!("data connection: {e}"))),
        }
        data.push(c);
    }
    let ram = vm.machine().description().ram.clone();
    let main_handle = main.try_clone();
    let received = std::thread::scope(|s| {
        let workers: Vec<_> = data
            .into_iter()
            .map(|mut c| {
                let (mem, ram, main_handle) = (vm.memory(), &ram, &main_handle);
                s.spawn(move || {
                    let r = drain(&mut c, mem, ram, Kind::End);
                    if r.is_err() {
                        // Wake the main connection so the failure is reported now.
                        if let Some(m) = main_handle {
                            m.shutdown_read();
                        }
                    }
                    r
                })
            })
            .collect();
        // The source sends the state before its last pages: load it now, on this thread,
        // while the source is still reading its dirty log and sending them (a helper
        // thread would only wait for a core on a small host).
        let main_result = drain_with(&mut main, vm.memory(), &ram, Kind::Complete, &mut |bytes| {
            let state = VmState::decode(bytes)?;
            vm.restore_state(&state)
                .map_err(|e| format!("cannot load the VM state: {e}"))
        });
        let mut first_err = None;
        for w in workers {
            match w.join() {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                Err(_) => {
                    first_err.get_or_insert("a receiver thread failed".into());
                }
            }
        }
        match (first_err, main_result) {
            (Some(e), _) => Err(e),
            (None, r) => r.map(|_| ()),
        }
    });
    if let Err(e) = received {
        return Err(abort(&mut main, snapshot, e));
    }
    if !snapshot {
        wire::write_frame(&mut main, &Frame::Ready)
            .map_err(|e| err(format!("confirming to the source: {e}")))?;
    }
    Ok(Incoming {
        vm,
        main,
        snapshot,
        source_guest: hello.guest,
        receive_ms: t0.elapsed().as_secs_f64() * 1e3,
    })
}

impl Incoming {
    /// Starts the VM once the source has given it up (GO); from a snapshot, at once.
    /// Without GO the VM is dropped unstarted: the source keeps it.
    pub fn start(mut self) -> Result<Vm, Error> {
        if !self.snapshot {
            let mut buf = Vec::new();
            let _ = self.main.set_read_timeout(Some(IDLE_TIMEOUT));
            match wire::read_frame(&mut self.main, &mut buf) {
                Ok(Frame::Go) => {}
                Ok(Frame::Abort(m)) => return Err(err(format!("the source aborted: {m}"))),
                Ok(f) => return Err(err(format!("expected GO, got {:?}", f.kind()))),
                Err(e) => {
                    return Err(err(format!(
                        "the source did not hand the VM over ({e}); it keeps the VM"
                    )))
                }
            }
        }
        if let Err(e) = self.vm.release() {
            // An explicit refusal: the source knows the VM is not running here and
            // takes it back.
            let why = format!("cannot start the VM: {e}");
            return Err(abort(&mut self.main, self.snapshot, why));
        }
        if !self.snapshot {
            // The source waits for this to finish; if it is lost, the source keeps its
            // copy paused (it never resumes after GO), so the VM still runs only here.
            let _ = wire::write_frame(&mut self.main, &Frame::Started);
        }
        Ok(self.vm)
    }
}
