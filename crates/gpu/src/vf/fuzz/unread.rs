//! Guest RAM that is not here, made unreadable while the engine steps: the model
//! reads guest memory straight from its mapping (vm-memory), past the backend that
//! records VRAM accesses, so a step's reads of guest RAM are seen only by the MMU. The
//! pages not here are mapped PROT_NONE for the step; a touch of one stops in a
//! SIGSEGV handler, which notes the page and maps it back so the step goes on (as
//! userfaultfd would bring it in, while the engine held the GPU), and the check then
//! names it. A fault anywhere else, or on another thread, puts the handler that was
//! there before back and returns, so the fault happens again and is that handler's
//! (the sanitizer's, libFuzzer's, or the default crash).

use crate::mmu::GuestRam;
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};

const PAGE: u64 = 4096;

/// The pages of one step's guard: at most 64 (the harness's RAM has 24).
struct Window {
    /// (host address, guest address, length) of each region.
    regions: Vec<(usize, u64, u64)>,
    /// The guarded pages, by guest page number, in order; bit i of `touched` is
    /// `pages[i]`.
    pages: Vec<u64>,
    touched: AtomicU64,
}

impl Window {
    fn host(&self, gpn: u64) -> Option<usize> {
        let gpa = gpn * PAGE;
        self.regions
            .iter()
            .find(|&&(_, at, len)| gpa >= at && gpa - at < len)
            .map(|&(h, at, _)| h + (gpa - at) as usize)
    }

    fn protect(&self, gpn: u64, prot: libc::c_int) {
        let h = self.host(gpn).expect("a guarded page is in a region");
        // SAFETY: a whole page of a region of the harness's own guest RAM, which
        // stays mapped while the window is open; only its protection changes.
        let r = unsafe { libc::mprotect(h as *mut libc::c_void, PAGE as usize, prot) };
        assert_eq!(r, 0, "mprotect: {}", std::io::Error::last_os_error());
    }

    /// From the handler: the page of `addr`, if it is one of this window's, noted and
    /// mapped back. Only what a signal handler may do: atomics and mprotect.
    fn touch(&self, addr: usize) -> bool {
        for (i, &gpn) in self.pages.iter().enumerate() {
            let Some(h) = self.host(gpn) else { continue };
            if addr >= h && addr - h < PAGE as usize {
                self.touched.fetch_or(1 << i, Ordering::SeqCst);
                // SAFETY: as in `protect`: a page of this window, mapped.
                unsafe {
                    libc::mprotect(
                        h as *mut libc::c_void,
                        PAGE as usize,
                        libc::PROT_READ | libc::PROT_WRITE,
                    )
                };
                return true;
            }
        }
        false
    }
}

thread_local! {
    /// The window open on this thread (the handler runs on the faulting thread).
    static OPEN: Cell<*const Window> = const { Cell::new(std::ptr::null()) };
}

/// The SIGSEGV action there was before this one was first put in.
struct Action(libc::sigaction);
// SAFETY: a plain C struct of a handler address and flags, written once.
unsafe impl Sync for Action {}
// SAFETY: as above.
unsafe impl Send for Action {}
static BEFORE: OnceLock<Action> = OnceLock::new();
static INSTALLED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_fault(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel hands a SA_SIGINFO handler a valid siginfo.
    let addr = unsafe { (*info).si_addr() } as usize;
    let w = OPEN.with(|o| o.get());
    // SAFETY: a window is open on this thread only while `guard` keeps it alive.
    if !w.is_null() && unsafe { &*w }.touch(addr) {
        return;
    }
    if let Some(b) = BEFORE.get() {
        INSTALLED.store(false, Ordering::SeqCst);
        // SAFETY: puts back the action saved when this one went in.
        unsafe { libc::sigaction(libc::SIGSEGV, &b.0, std::ptr::null_mut()) };
    }
}

fn install() {
    if INSTALLED.swap(true, Ordering::SeqCst) {
        return;
    }
    // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" start.
    let mut ours: libc::sigaction = unsafe { std::mem::zeroed() };
    ours.sa_sigaction = on_fault as *const () as usize;
    // On the alternate stack where the thread has one (Rust's threads do): a stack
    // overflow's fault still reaches the handler there before, which reports it.
    ours.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
    // SAFETY: as above.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: both point at valid sigaction structs.
    let r = unsafe { libc::sigaction(libc::SIGSEGV, &ours, &mut old) };
    assert_eq!(r, 0, "sigaction: {}", std::io::Error::last_os_error());
    BEFORE.get_or_init(|| Action(old));
}

/// A window open on this thread; closed (the pages mapped back, the handler told)
/// when dropped, a panic's unwinding included.
struct Open<'a>(&'a Window);

impl<'a> Open<'a> {
    fn new(w: &'a Window) -> Open<'a> {
        for &p in &w.pages {
            w.protect(p, libc::PROT_NONE);
        }
        OPEN.with(|o| o.set(w));
        Open(w)
    }
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        OPEN.with(|o| o.set(std::ptr::null()));
        for &p in &self.0.pages {
            self.0.protect(p, libc::PROT_READ | libc::PROT_WRITE);
        }
    }
}

/// Runs `f` with the guest pages `missing` (page numbers in `ram`) unreadable, and
/// returns what it returned and the pages it touched, which are mapped back.
pub(super) fn guard<T>(ram: &GuestRam, missing: &[u64], f: impl FnOnce() -> T) -> (T, Vec<u64>) {
    assert!(missing.len() <= 64, "a window guards at most 64 pages");
    let w = Window {
        regions: ram
            .iter()
            .map(|r| {
                let h = r
                    .get_host_address(vm_memory::MemoryRegionAddress(0))
                    .expect("a mapped region") as usize;
                (h, r.start_addr().raw_value(), r.len())
            })
            .collect(),
        pages: missing.to_vec(),
        touched: AtomicU64::new(0),
    };
    install();
    let r = {
        let _open = Open::new(&w);
        f()
    };
    let touched = w.touched.load(Ordering::SeqCst);
    let pages = (0..missing.len())
        .filter(|i| touched >> i & 1 == 1)
        .map(|i| missing[i])
        .collect();
    (r, pages)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    /// A read of a guarded page is seen and goes on with the page's bytes; a page not
    /// guarded is not named; outside a window the pages read as ever.
    #[test]
    fn a_read_of_a_guarded_page_is_named_and_reads_right() {
        let ram = GuestRam::from_ranges(&[
            (GuestAddress(0), 4 * PAGE as usize),
            (GuestAddress(1 << 20), 2 * PAGE as usize),
        ])
        .unwrap();
        ram.write_obj(0x1234_5678u32, GuestAddress((1 << 20) + PAGE + 8))
            .unwrap();
        let guarded = [1, (1 << 20) / PAGE + 1];
        let (v, touched) = guard(&ram, &guarded, || {
            let a: u32 = ram.read_obj(GuestAddress(0)).unwrap();
            let b: u32 = ram.read_obj(GuestAddress((1 << 20) + PAGE + 8)).unwrap();
            (a, b)
        });
        assert_eq!(v, (0, 0x1234_5678));
        assert_eq!(touched, [(1 << 20) / PAGE + 1]);
        let (_, touched) = guard(&ram, &guarded, || {
            ram.write_obj(7u8, GuestAddress(PAGE + 3)).unwrap()
        });
        assert_eq!(touched, [1]);
        assert_eq!(ram.read_obj::<u8>(GuestAddress(PAGE + 3)).unwrap(), 7);
    }

    /// A fault outside a window is not swallowed: the handler puts back the one there
    /// before, and the process dies of it. Run in a child (this test binary again).
    #[test]
    fn a_fault_outside_a_window_is_the_handler_befores() {
        use std::os::unix::process::ExitStatusExt;
        const CHILD: &str = "GODWIT_UNREAD_FAULT_CHILD";
        if std::env::var_os(CHILD).is_some() {
            let ram = GuestRam::from_ranges(&[(GuestAddress(0), PAGE as usize)]).unwrap();
            let _ = guard(&ram, &[0], || ());
            // SAFETY: a fresh anonymous page, mapped with no access on purpose.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    PAGE as usize,
                    libc::PROT_NONE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_ne!(p, libc::MAP_FAILED);
            // SAFETY: mapped (above); the read faults, which is what is tested.
            let v = unsafe { std::ptr::read_volatile(p as *const u8) };
            panic!("read {v} from a page with no access");
        }
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "vf::fuzz::unread::tests::a_fault_outside_a_window_is_the_handler_befores",
            ])
            .env(CHILD, "1")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let end = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if std::time::Instant::now() > end {
                let _ = child.kill();
                panic!("the child neither died nor ended in 60 s: the fault was swallowed");
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        assert_eq!(status.signal(), Some(libc::SIGSEGV), "{status}");
    }
}
