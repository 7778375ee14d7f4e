//! The contract between the godwit virtual GPU function (VF) and the driver in the guest:
//! PCI ids, the register BAR, command entries, kernels, page-table entries and error
//! codes. Shared verbatim by the device model and the no_std guest runtime, so the two can
//! never disagree. Everything here is plain constants and little-endian layouts.

/// Not a PCI-SIG assigned vendor id: godwit's own experimental id ("dw").
pub const VENDOR_ID: u16 = 0x6477;
/// A virtual function of a godwit GPU.
pub const DEVICE_ID_VF: u16 = 0x10f1;
/// Display controller / 3D controller.
pub const CLASS: u32 = 0x03_02_00;
pub const REVISION: u8 = 1;
/// BAR 0: registers (32-bit, 4 KiB). BAR 2: the VRAM aperture (64-bit, prefetchable).
pub const BAR_REGS: usize = 0;
pub const BAR_VRAM: usize = 2;
pub const REGS_SIZE: u64 = 0x1000;

/// "GDWF" and the interface version (major << 16 | minor), in one 64-bit register.
pub const MAGIC: u64 = 0x4657_4447;
pub const VERSION: u64 = 0x0001_0001;

/// Registers: 64 bits each, 8-byte aligned; 4-byte accesses read or write one half.
pub mod reg {
    /// R: MAGIC | VERSION << 32.
    pub const ID: u64 = 0x000;
    /// R: bytes of VRAM this VF owns (the aperture's size).
    pub const VRAM_SIZE: u64 = 0x008;
    /// R: `status::*` bits.
    pub const STATUS: u64 = 0x010;
    /// R: the first error since the last clear: code | ring index << 32.
    pub const ERROR: u64 = 0x018;
    /// R: the GPU virtual address (or value) the error is about.
    pub const ERROR_ADDR: u64 = 0x020;
    /// W: `control::*` bits.
    pub const CONTROL: u64 = 0x028;
    /// RW (only while disabled): guest-physical address of the ring, 4 KiB aligned.
    pub const RING_BASE: u64 = 0x030;
    /// RW (only while disabled): ring entries, a power of two in RING_MIN..=RING_MAX.
    pub const RING_SIZE: u64 = 0x038;
    /// R: index of the next entry the engine takes.
    pub const RING_HEAD: u64 = 0x040;
    /// RW: index after the last entry the driver wrote. Writing it rings the doorbell.
    pub const RING_TAIL: u64 = 0x048;
    /// R: the last fence value signalled.
    pub const FENCE: u64 = 0x050;
    /// W: blocks the writing vCPU until FENCE >= value, an error, or WAIT_MAX_NS passes.
    /// The driver reads FENCE afterwards and writes again if it needs to keep waiting.
    pub const WAIT_FENCE: u64 = 0x058;
    /// RW (only while disabled): VRAM offset of the top-level page table, 4 KiB aligned.
    pub const PT_ROOT: u64 = 0x060;
    /// R: the GPU clock in nanoseconds.
    pub const TIMESTAMP: u64 = 0x068;
    /// R: engine time this VF has used, in nanoseconds.
    pub const ENGINE_NS: u64 = 0x070;
    /// R: commands completed since the VF was enabled.
    pub const COMPLETED: u64 = 0x078;
    /// R: `irq::*` causes raised since they were last cleared. W: 1s clear those bits.
    pub const INT_STATUS: u64 = 0x080;
    /// RW: the causes that send the VF's MSI (none after power-on; kept across RESET).
    pub const INT_MASK: u64 = 0x088;
}

/// Interrupt causes. The VF has one MSI vector (a 64-bit MSI capability at `MSI_CAP` in
/// its config space, no INTx). A message is sent when a cause enabled in INT_MASK becomes
/// pending, and when INT_MASK enables a cause that is already pending, so a driver that
/// clears INT_STATUS, re-checks FENCE and then waits can never miss a wake-up.
pub mod irq {
    /// A command with the FENCE flag completed.
    pub const FENCE: u64 = 1 << 0;
    /// ERROR went from clear to set.
    pub const ERROR: u64 = 1 << 1;
    pub const ALL: u64 = FENCE | ERROR;
}

/// Config-space offset of the MSI capability (the only one in the list).
pub const MSI_CAP: u16 = 0x40;

pub mod status {
    pub const ENABLED: u64 = 1 << 0;
    /// The engine holds a command of this VF (running or preempted mid-command).
    pub const BUSY: u64 = 1 << 1;
    /// ERROR holds an error; the ring is stopped at the failing entry.
    pub const ERROR: u64 = 1 << 2;
}

pub mod control {
    /// Start taking commands (the ring and page-table registers must be valid).
    pub const ENABLE: u64 = 1 << 0;
    /// Stop, drop any command in flight, head = tail = 0, clear the error and fence.
    pub const RESET: u64 = 1 << 1;
    /// Clear the error and go on after the failing entry (which is skipped).
    pub const CLEAR_ERROR: u64 = 1 << 2;
}

pub const RING_MIN: u64 = 16;
pub const RING_MAX: u64 = 4096;
/// Bytes per ring entry.
pub const ENTRY_SIZE: usize = 64;
pub const WAIT_MAX_NS: u64 = 10_000_000;

/// Ring entry: u16 opcode, u16 flags, u32 zero, u64 fence, u64 args[6].
pub mod op {
    pub const NOP: u16 = 0;
    /// args: dst VA, src VA, bytes.
    pub const COPY: u16 = 1;
    /// args: dst VA, bytes (multiple of 4), u32 pattern.
    pub const FILL: u16 = 2;
    /// args: kernel id, then the kernel's operands (see `kernel`).
    pub const KERNEL: u16 = 3;
    /// args: dst VA (8 bytes): the GPU clock in ns when the command runs.
    pub const TIMESTAMP: u16 = 4;
    /// args: dst VA (8 bytes), value: a semaphore release.
    pub const WRITE: u16 = 5;
    /// No arguments; godwit's MMU keeps no translation cache, so this only orders.
    pub const TLB_INVALIDATE: u16 = 6;
}

pub mod flags {
    /// On completion, FENCE = the entry's fence value.
    pub const FENCE: u16 = 1 << 0;
    pub const ALL: u16 = FENCE;
}

/// Compute kernels. f32 data, row-major; operands are GPU VAs that must map to VRAM.
/// `args[1..]` of the KERNEL entry:
pub mod kernel {
    /// z = x + y: x, y, z, n.
    pub const VEC_ADD: u64 = 1;
    /// z = x * y (element-wise): x, y, z, n.
    pub const VEC_MUL: u64 = 2;
    /// y = a * x + y: x, y, n, a (f32 bits).
    pub const AXPY: u64 = 3;
    /// C = alpha * A(MxK) * B(KxN) + beta * C: A, B, C, dims (M | N << 21 | K << 42),
    /// alpha bits | beta bits << 32.
    pub const SGEMM: u64 = 4;
    /// *dst = sum x[i] as f64 (in index order): x, n, dst.
    pub const REDUCE_SUM: u64 = 5;
    /// *dst = sum x[i] * y[i] as f64 (in index order): x, y, n, dst.
    pub const DOT: u64 = 6;
    /// One Jacobi step of the 5-point Laplacian on a W x H grid: out = (the four
    /// neighbours + f) / 4 inside, boundary copied; *dst (if not 0) = sum over the grid of
    /// (out - in)^2 as f64: in, out, f, W | H << 32, dst.
    pub const STENCIL: u64 = 7;
    /// *dst = godwit hash of the bytes (multiple of 8) as u64: src, bytes, dst.
    pub const HASH: u64 = 8;
    /// out = max(x, 0): x, out, n.
    pub const RELU: u64 = 9;
}

/// The hash of the HASH kernel, one 64-bit little-endian word at a time. Chunkable: the
/// state after a prefix is all it needs to go on.
pub const HASH_SEED: u64 = 0xcbf2_9ce4_8422_2325;
pub fn hash_word(h: u64, w: u64) -> u64 {
    (h ^ w).wrapping_mul(0x0000_0100_0000_01b3).rotate_left(29)
}

/// GPU page tables: three levels of 512 eight-byte entries in 4 KiB VRAM pages, for a
/// 39-bit GPU virtual address space: L2 index = VA[38:30], L1 = VA[29:21], L0 = VA[20:12].
pub mod pte {
    pub const VALID: u64 = 1 << 0;
    pub const WRITE: u64 = 1 << 1;
    /// The leaf maps guest system memory (a guest-physical address), not VRAM.
    pub const SYSTEM: u64 = 1 << 2;
    /// In an L1 entry: a 2 MiB leaf.
    pub const HUGE: u64 = 1 << 3;
    pub const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
    pub const VA_BITS: u32 = 39;
}

/// Error codes (low 32 bits of ERROR).
pub mod err {
    pub const NONE: u32 = 0;
    pub const BAD_OPCODE: u32 = 1;
    /// Sizes, alignment, overflow, reserved bits or flags.
    pub const BAD_ARGS: u32 = 2;
    /// Unmapped VA, write to a read-only page, or a page table or leaf outside this VF's
    /// VRAM or its VM's RAM. ERROR_ADDR holds the VA.
    pub const GPU_FAULT: u32 = 3;
    /// ENABLE with an invalid ring or page-table root.
    pub const BAD_RING: u32 = 4;
    /// RING_TAIL written with an index outside the ring.
    pub const BAD_TAIL: u32 = 5;
    pub const BAD_KERNEL: u32 = 6;
    /// A kernel operand that is not contiguous VRAM, or outputs that overlap inputs.
    pub const BAD_OPERAND: u32 = 7;
    /// A configuration register written while the VF is enabled.
    pub const BUSY_WRITE: u32 = 8;

    pub fn name(code: u32) -> &'static str {
        match code {
            NONE => "none",
            BAD_OPCODE => "bad opcode",
            BAD_ARGS => "bad arguments",
            GPU_FAULT => "GPU page fault",
            BAD_RING => "bad ring configuration",
            BAD_TAIL => "ring tail outside the ring",
            BAD_KERNEL => "unknown kernel",
            BAD_OPERAND => "kernel operand not contiguous VRAM or overlapping",
            BUSY_WRITE => "configuration written while enabled",
            _ => "unknown error",
        }
    }
}
