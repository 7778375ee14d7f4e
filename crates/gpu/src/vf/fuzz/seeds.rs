//! The gpu_engine target's seeds, built by code so that they follow `engine`'s input
//! format: the seeds' tables and ring set up, then commands of every kind, runs cut
//! short, migrations mid-command and before any command, a command or a page table
//! (or the guest RAM a copy reads) rewritten after post-copy brought it in, register
//! abuse, aliased page tables and hostile saved states.

use super::{tables, PAGE, RING, RO, ROOT, SYS};
use crate::abi::{control, kernel, op, pte, reg};
use crate::command::encode;

/// Builds seed inputs: the operations of `engine`, written out.
struct Seed {
    b: Vec<u8>,
    tail: u64,
}

impl Seed {
    /// The seeds' tables and ring, set up and enabled.
    fn new() -> Seed {
        let mut s = Seed {
            b: Vec::new(),
            tail: 0,
        };
        for (off, v) in tables() {
            s.poke(off, v);
        }
        s.reg(reg::RING_BASE, RING);
        s.reg(reg::RING_SIZE, 16);
        s.reg(reg::PT_ROOT, ROOT);
        s.reg(reg::INT_MASK, 3);
        s.reg(reg::CONTROL, control::ENABLE);
        s
    }

    fn reg(&mut self, r: u64, v: u64) -> &mut Seed {
        self.b.extend([3, (r / 8) as u8]);
        self.b.extend(v.to_le_bytes());
        self
    }

    /// A command at the tail, and the doorbell.
    fn cmd(&mut self, opcode: u16, fence: u64, args: [u64; 6]) -> &mut Seed {
        self.entry(self.tail, opcode, fence, args);
        self.tail = (self.tail + 1) % 16;
        self.reg(reg::RING_TAIL, self.tail)
    }

    /// A command written into ring slot `slot`, no doorbell.
    fn entry(&mut self, slot: u64, opcode: u16, fence: u64, args: [u64; 6]) -> &mut Seed {
        self.b.extend([2, slot as u8]);
        self.b.extend(encode(opcode, Some(fence), args));
        self
    }

    fn poke(&mut self, off: u64, v: u64) -> &mut Seed {
        self.b.push(0);
        self.b.extend((off as u32).to_le_bytes());
        self.b.extend(v.to_le_bytes());
        self
    }

    fn run(&mut self, steps: u8) -> &mut Seed {
        self.b.extend([5, steps]);
        self
    }
}

/// Starting points for the fuzzer, each named: the seeds' tables and ring set up, then
/// commands of every kind, runs cut short, migrations mid-command and register abuse.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let one = u64::from(1.0f32.to_bits());
    let k = |id: u64, a: [u64; 5]| [id, a[0], a[1], a[2], a[3], a[4]];

    let mut fill_copy = Seed::new();
    fill_copy
        .cmd(op::FILL, 1, [0, 8 * PAGE, 0x1234_5678, 0, 0, 0])
        // Eight pages from RAM page 1 on: from the first region into the next.
        .cmd(op::COPY, 2, [SYS + PAGE, 0, 8 * PAGE, 0, 0, 0])
        .cmd(op::COPY, 3, [4 * PAGE, SYS + 2 * PAGE, PAGE, 0, 0, 0])
        .cmd(op::WRITE, 4, [SYS + 20 * PAGE, 0xdead, 0, 0, 0, 0])
        .cmd(op::TIMESTAMP, 5, [6 * PAGE, 0, 0, 0, 0, 0])
        .cmd(op::TLB_INVALIDATE, 6, [0; 6])
        .run(63);
    // The small-number form of a command (operation 7).
    fill_copy.b.extend([7, op::NOP as u8, 7]);
    fill_copy.b.extend([0; 24]);
    fill_copy.run(63);

    let mut kernels = Seed::new();
    let p = PAGE;
    kernels
        .cmd(op::FILL, 1, [0, 8 * p, one, 0, 0, 0])
        .cmd(op::KERNEL, 2, k(kernel::VEC_ADD, [0, p, 2 * p, 1024, 0]))
        .cmd(op::KERNEL, 3, k(kernel::VEC_MUL, [0, p, 3 * p, 1024, 0]))
        .cmd(op::KERNEL, 4, k(kernel::AXPY, [0, 4 * p, 1024, one, 0]))
        .cmd(op::KERNEL, 5, k(kernel::RELU, [p, 5 * p, 1024, 0, 0]))
        .cmd(op::KERNEL, 6, k(kernel::REDUCE_SUM, [0, 1024, 6 * p, 0, 0]))
        .cmd(op::KERNEL, 7, k(kernel::DOT, [0, p, 1024, 6 * p + 8, 0]))
        .cmd(op::KERNEL, 8, k(kernel::HASH, [0, p, 6 * p + 16, 0, 0]))
        .run(63)
        .cmd(
            op::KERNEL,
            9,
            k(kernel::STENCIL, [0, 8 * p, p, 32 | 32 << 32, 6 * p + 24]),
        )
        .cmd(
            op::KERNEL,
            10,
            k(kernel::SGEMM, [0, p, 9 * p, 16 | 16 << 21 | 16 << 42, one]),
        )
        .run(63);

    let mut migrate = Seed::new();
    migrate
        .cmd(op::FILL, 1, [0, 8 * p, one, 0, 0, 0])
        .run(63)
        // One step takes the entry, the next checks its operands: mid-command.
        .cmd(op::KERNEL, 2, k(kernel::AXPY, [0, 4 * p, 1024, one, 0]))
        .run(1);
    migrate.b.push(6);
    migrate
        .run(63)
        .cmd(op::KERNEL, 3, k(kernel::VEC_ADD, [0, p, 2 * p, 1024, 0]))
        .run(0)
        // A bad doorbell while a command is in flight, then a migration and a clear.
        .reg(reg::RING_TAIL, 999);
    migrate.b.push(6);
    migrate.reg(reg::CONTROL, control::CLEAR_ERROR).run(63);

    let mut abuse = Seed::new();
    abuse
        .cmd(op::COPY, 1, [RO, 0, 8, 0, 0, 0])
        .run(3)
        .reg(reg::CONTROL, control::CLEAR_ERROR)
        .reg(reg::PT_ROOT, 0)
        .cmd(op::FILL, 2, [0, 3 * p, 0, 0, 0, 0])
        .run(1)
        .reg(reg::CONTROL, control::RESET)
        .reg(reg::RING_SIZE, 4096)
        .reg(reg::CONTROL, control::ENABLE);
    abuse.b.extend([4, 0x40 | 3, 4, 0xc0 | 2]);
    abuse.b.extend([3, 0x5a, 1, 2, 3, 4, 5, 6, 7, 8]);
    abuse.run(8);

    // VA 1 MiB.. 2 MiB all maps VRAM page 1: commands long enough to take several
    // chunks, caught part done by a migration and by RESET.
    let mut aliased = Seed::new();
    for i in 256..512 {
        aliased.poke(ROOT + 2 * PAGE + i * 8, PAGE | pte::VALID | pte::WRITE);
    }
    let mib = 1 << 20;
    aliased
        .cmd(op::FILL, 1, [mib, mib, 0x0102_0304, 0, 0, 0])
        .run(1);
    aliased.b.push(6);
    aliased
        .run(63)
        .cmd(op::COPY, 2, [mib, mib + mib / 2, mib / 2, 0, 0, 0])
        .run(1)
        .reg(reg::CONTROL, control::RESET)
        .reg(reg::CONTROL, control::ENABLE)
        .run(63);

    // Migrated before any command: every step after is post-copy's, each command of a
    // batch rung at once brought in before it runs.
    let mut postcopy = Seed::new();
    postcopy.b.push(6);
    postcopy
        .cmd(op::FILL, 1, [0, 8 * p, one, 0, 0, 0])
        .cmd(op::COPY, 2, [SYS + 16 * p, 20 * p, 4 * p, 0, 0, 0])
        .cmd(op::COPY, 3, [10 * p, SYS + 17 * p, 2 * p, 0, 0, 0])
        .cmd(op::WRITE, 4, [SYS + 23 * p, 0xfeed, 0, 0, 0, 0])
        .cmd(op::TIMESTAMP, 5, [12 * p, 0, 0, 0, 0, 0])
        .cmd(op::KERNEL, 6, k(kernel::VEC_ADD, [0, p, 2 * p, 1024, 0]))
        .cmd(
            op::KERNEL,
            7,
            k(kernel::REDUCE_SUM, [0, 1024, 14 * p, 0, 0]),
        )
        .cmd(op::KERNEL, 8, k(kernel::HASH, [0, 4 * p, 13 * p, 0, 0]))
        .run(63);

    // Post-copy: the engine brings in the next command before it waits for the GPU
    // (the end of a run: here two steps, taking the first FILL and running it), and
    // the guest then rewrites that entry: what the engine takes is another command,
    // brought in before it runs.
    let mut rewrite = Seed::new();
    rewrite.b.push(6);
    rewrite
        .cmd(op::FILL, 1, [26 * p, p, 7, 0, 0, 0])
        .cmd(op::FILL, 2, [27 * p, p, 8, 0, 0, 0])
        .run(1)
        .entry(1, op::FILL, 2, [24 * p, 2 * p, 9, 0, 0, 0])
        .run(63);

    // Post-copy: a FILL brought in (a run of no steps: only what the engine does
    // before it waits for the GPU), then the guest points the page it fills at
    // another, which nothing brought in: the step that would fill it stops first.
    let mut retable = Seed::new();
    retable.b.push(6);
    retable
        .cmd(op::FILL, 1, [26 * p, p, 7, 0, 0, 0])
        .run(0)
        .poke(ROOT + 2 * PAGE + 26 * 8, (28 * p) | pte::VALID | pte::WRITE)
        .run(63);

    // Post-copy: a COPY out of guest RAM brought in, then the guest points its source
    // at a RAM page nothing brought in (RAM page 18, where it was 16): the step that
    // would read it stops first, and the page comes in before the copy runs.
    let mut retable_ram = Seed::new();
    retable_ram.b.push(6);
    let sys_pte = |k: u64| ROOT + 2 * PAGE + (SYS / PAGE + k) * 8;
    retable_ram
        .cmd(op::COPY, 1, [SYS + 16 * p, 20 * p, p, 0, 0, 0])
        .run(0)
        .poke(
            sys_pte(16),
            ((1 << 20) + 2 * p) | pte::VALID | pte::WRITE | pte::SYSTEM,
        )
        .run(63);

    // Hostile saved states, refused and taken, with a command in flight.
    let mut tamper = Seed::new();
    tamper
        .cmd(op::FILL, 1, [0, 8 * p, one, 0, 0, 0])
        .cmd(op::KERNEL, 2, k(kernel::AXPY, [0, 4 * p, 1024, one, 0]))
        .run(1);
    for (field, v) in [
        (4, 3),                     // a ring size no ENABLE takes: refused
        (16, 1 << 40),              // done past the end: refused
        (1, 2 | 0xffff_ffff << 32), // a register error: taken
        (7, 1000),                  // a fence: taken
        (14, u64::MAX),             // a clock at the top: taken
        (12, 1),                    // paused: taken
    ] {
        tamper.b.extend([8, field]);
        tamper.b.extend(u64::to_le_bytes(v));
    }
    tamper.reg(reg::CONTROL, control::CLEAR_ERROR).run(63);

    vec![
        ("seed_aliased", aliased.b),
        ("seed_postcopy", postcopy.b),
        ("seed_postcopy_rewrite", rewrite.b),
        ("seed_postcopy_retable", retable.b),
        ("seed_postcopy_retable_ram", retable_ram.b),
        ("seed_tamper", tamper.b),
        ("seed_fill_copy", fill_copy.b),
        ("seed_kernels", kernels.b),
        ("seed_migrate", migrate.b),
        ("seed_abuse", abuse.b),
    ]
}
