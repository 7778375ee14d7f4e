//! Ring entries: decoding the 64 guest-written bytes into a checked command. Everything
//! here is guest-controlled; the decoder checks opcodes, flags, reserved fields, sizes and
//! overflow, and never trusts a length before it is bounded. Addresses are checked later,
//! against the page tables, when the command runs.

use crate::abi::{self, err, flags, kernel, op, ENTRY_SIZE};
use serde::{Deserialize, Serialize};

/// Largest single copy or fill (the whole 39-bit GPU address space).
pub const MAX_BYTES: u64 = 1 << abi::pte::VA_BITS;
/// Largest element count of a vector kernel.
pub const MAX_ELEMS: u64 = MAX_BYTES / 4;
/// SGEMM dimensions are 21-bit fields.
pub const MAX_DIM: u64 = (1 << 21) - 1;

/// A decoded ring entry.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub cmd: Command,
    /// Fence value to signal on completion, if the entry asks for one.
    pub fence: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Command {
    Nop,
    Copy { dst: u64, src: u64, bytes: u64 },
    Fill { dst: u64, bytes: u64, pattern: u32 },
    Kernel(Kernel),
    Timestamp { dst: u64 },
    Write { dst: u64, value: u64 },
    TlbInvalidate,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Kernel {
    VecAdd {
        x: u64,
        y: u64,
        z: u64,
        n: u64,
    },
    VecMul {
        x: u64,
        y: u64,
        z: u64,
        n: u64,
    },
    Axpy {
        x: u64,
        y: u64,
        n: u64,
        a: f32,
    },
    Sgemm {
        a: u64,
        b: u64,
        c: u64,
        m: u64,
        n: u64,
        k: u64,
        alpha: f32,
        beta: f32,
    },
    ReduceSum {
        x: u64,
        n: u64,
        dst: u64,
    },
    Dot {
        x: u64,
        y: u64,
        n: u64,
        dst: u64,
    },
    Stencil {
        input: u64,
        out: u64,
        f: u64,
        w: u64,
        h: u64,
        dst: u64,
    },
    Hash {
        src: u64,
        bytes: u64,
        dst: u64,
    },
    Relu {
        x: u64,
        out: u64,
        n: u64,
    },
}

/// Why an entry was refused: an `abi::err` code and the value at fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeError {
    pub code: u32,
    pub value: u64,
}

fn bad(code: u32, value: u64) -> DecodeError {
    DecodeError { code, value }
}

fn elems(n: u64) -> Result<u64, DecodeError> {
    if n == 0 || n > MAX_ELEMS {
        return Err(bad(err::BAD_ARGS, n));
    }
    Ok(n)
}

/// Decodes one entry. Never panics, whatever the bytes.
pub fn decode(e: &[u8; ENTRY_SIZE]) -> Result<Entry, DecodeError> {
    let u16_at = |o: usize| u16::from_le_bytes([e[o], e[o + 1]]);
    let u64_at = |o: usize| u64::from_le_bytes(e[o..o + 8].try_into().expect("8 bytes"));
    let opcode = u16_at(0);
    let fl = u16_at(2);
    let reserved = u32::from_le_bytes(e[4..8].try_into().expect("4 bytes"));
    if fl & !flags::ALL != 0 {
        return Err(bad(err::BAD_ARGS, fl as u64));
    }
    if reserved != 0 {
        return Err(bad(err::BAD_ARGS, reserved as u64));
    }
    let fence = (fl & flags::FENCE != 0).then(|| u64_at(8));
    let a: [u64; 6] = core::array::from_fn(|i| u64_at(16 + 8 * i));
    let cmd = match opcode {
        op::NOP => Command::Nop,
        op::COPY => {
            if a[2] == 0 || a[2] > MAX_BYTES {
                return Err(bad(err::BAD_ARGS, a[2]));
            }
            Command::Copy {
                dst: a[0],
                src: a[1],
                bytes: a[2],
            }
        }
        op::FILL => {
            if a[1] == 0 || a[1] > MAX_BYTES || !a[1].is_multiple_of(4) || !a[0].is_multiple_of(4) {
                return Err(bad(err::BAD_ARGS, a[1]));
            }
            if a[2] > u32::MAX as u64 {
                return Err(bad(err::BAD_ARGS, a[2]));
            }
            Command::Fill {
                dst: a[0],
                bytes: a[1],
                pattern: a[2] as u32,
            }
        }
        op::KERNEL => Command::Kernel(decode_kernel(&a)?),
        op::TIMESTAMP => Command::Timestamp { dst: a[0] },
        op::WRITE => Command::Write {
            dst: a[0],
            value: a[1],
        },
        op::TLB_INVALIDATE => Command::TlbInvalidate,
        other => return Err(bad(err::BAD_OPCODE, other as u64)),
    };
    Ok(Entry { cmd, fence })
}

fn decode_kernel(a: &[u64; 6]) -> Result<Kernel, DecodeError> {
    let f32_at = |v: u64| f32::from_bits(v as u32);
    Ok(match a[0] {
        kernel::VEC_ADD => Kernel::VecAdd {
            x: a[1],
            y: a[2],
            z: a[3],
            n: elems(a[4])?,
        },
        kernel::VEC_MUL => Kernel::VecMul {
            x: a[1],
            y: a[2],
            z: a[3],
            n: elems(a[4])?,
        },
        kernel::AXPY => Kernel::Axpy {
            x: a[1],
            y: a[2],
            n: elems(a[3])?,
            a: f32_at(a[4]),
        },
        kernel::SGEMM => {
            let (m, n, k) = (a[4] & MAX_DIM, a[4] >> 21 & MAX_DIM, a[4] >> 42 & MAX_DIM);
            if m == 0 || n == 0 || k == 0 || a[4] >> 63 != 0 {
                return Err(bad(err::BAD_ARGS, a[4]));
            }
            // Each matrix must fit the address space (these cannot overflow: 42 bits each).
            for elems in [m * k, k * n, m * n] {
                if elems > MAX_ELEMS {
                    return Err(bad(err::BAD_ARGS, a[4]));
                }
            }
            Kernel::Sgemm {
                a: a[1],
                b: a[2],
                c: a[3],
                m,
                n,
                k,
                alpha: f32_at(a[5]),
                beta: f32_at(a[5] >> 32),
            }
        }
        kernel::REDUCE_SUM => Kernel::ReduceSum {
            x: a[1],
            n: elems(a[2])?,
            dst: a[3],
        },
        kernel::DOT => Kernel::Dot {
            x: a[1],
            y: a[2],
            n: elems(a[3])?,
            dst: a[4],
        },
        kernel::STENCIL => {
            let (w, h) = (a[4] & 0xffff_ffff, a[4] >> 32);
            if w < 3 || h < 3 || w * h > MAX_ELEMS {
                return Err(bad(err::BAD_ARGS, a[4]));
            }
            Kernel::Stencil {
                input: a[1],
                out: a[2],
                f: a[3],
                w,
                h,
                dst: a[5],
            }
        }
        kernel::HASH => {
            if a[2] == 0 || !a[2].is_multiple_of(8) || a[2] > MAX_BYTES {
                return Err(bad(err::BAD_ARGS, a[2]));
            }
            Kernel::Hash {
                src: a[1],
                bytes: a[2],
                dst: a[3],
            }
        }
        kernel::RELU => Kernel::Relu {
            x: a[1],
            out: a[2],
            n: elems(a[3])?,
        },
        other => return Err(bad(err::BAD_KERNEL, other)),
    })
}

/// Encodes an entry (the inverse of `decode`, for tests and host-side tools).
pub fn encode(opcode: u16, fence: Option<u64>, args: [u64; 6]) -> [u8; ENTRY_SIZE] {
    let mut e = [0u8; ENTRY_SIZE];
    e[0..2].copy_from_slice(&opcode.to_le_bytes());
    let fl = if fence.is_some() { flags::FENCE } else { 0 };
    e[2..4].copy_from_slice(&fl.to_le_bytes());
    e[8..16].copy_from_slice(&fence.unwrap_or(0).to_le_bytes());
    for (i, a) in args.iter().enumerate() {
        e[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_le_bytes());
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_what_encode_writes_and_refuses_bad_fields() {
        let e = encode(op::COPY, Some(7), [0x1000, 0x2000, 4096, 0, 0, 0]);
        assert_eq!(
            decode(&e).unwrap(),
            Entry {
                cmd: Command::Copy {
                    dst: 0x1000,
                    src: 0x2000,
                    bytes: 4096
                },
                fence: Some(7)
            }
        );
        assert_eq!(
            decode(&encode(99, None, [0; 6])).unwrap_err().code,
            err::BAD_OPCODE
        );
        assert_eq!(
            decode(&encode(op::COPY, None, [0, 0, 0, 0, 0, 0]))
                .unwrap_err()
                .code,
            err::BAD_ARGS
        );
        assert_eq!(
            decode(&encode(op::FILL, None, [0, 6, 0, 0, 0, 0]))
                .unwrap_err()
                .code,
            err::BAD_ARGS
        );
        let mut flagged = encode(op::NOP, None, [0; 6]);
        flagged[2] = 0x80;
        assert_eq!(decode(&flagged).unwrap_err().code, err::BAD_ARGS);
        let mut reserved = encode(op::NOP, None, [0; 6]);
        reserved[5] = 1;
        assert_eq!(decode(&reserved).unwrap_err().code, err::BAD_ARGS);
        assert_eq!(
            decode(&encode(op::KERNEL, None, [77, 0, 0, 0, 0, 0]))
                .unwrap_err()
                .code,
            err::BAD_KERNEL
        );
        // SGEMM with a zero dimension, and one whose matrices exceed the address space.
        let dims = |m: u64, n: u64, k: u64| m | n << 21 | k << 42;
        for d in [dims(0, 4, 4), dims(MAX_DIM, MAX_DIM, MAX_DIM)] {
            let e = encode(op::KERNEL, None, [kernel::SGEMM, 0, 0, 0, d, 0]);
            assert_eq!(decode(&e).unwrap_err().code, err::BAD_ARGS);
        }
        let ok = encode(
            op::KERNEL,
            None,
            [kernel::SGEMM, 1, 2, 3, dims(2, 3, 4), 0x4000_0000_3f80_0000],
        );
        assert_eq!(
            decode(&ok).unwrap().cmd,
            Command::Kernel(Kernel::Sgemm {
                a: 1,
                b: 2,
                c: 3,
                m: 2,
                n: 3,
                k: 4,
                alpha: 1.0,
                beta: 2.0
            })
        );
    }
}

/// A kernel operand: a GPU VA range and whether the kernel writes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Operand {
    pub va: u64,
    pub bytes: u64,
    pub write: bool,
    /// Written only once every input has been read (a reduction's result).
    pub result: bool,
}

fn opd(va: u64, elems: u64, write: bool) -> Operand {
    Operand {
        va,
        bytes: elems * 4,
        write,
        result: false,
    }
}

fn result(va: u64) -> Operand {
    Operand {
        va,
        bytes: 8,
        write: true,
        result: true,
    }
}

impl Kernel {
    /// The units a kernel is cut into: elements (of the vectors, of C, of the grid) or
    /// hash words.
    pub fn units(&self) -> u64 {
        match *self {
            Kernel::VecAdd { n, .. }
            | Kernel::VecMul { n, .. }
            | Kernel::Axpy { n, .. }
            | Kernel::Relu { n, .. }
            | Kernel::ReduceSum { n, .. }
            | Kernel::Dot { n, .. } => n,
            Kernel::Sgemm { m, n, .. } => m * n,
            Kernel::Stencil { w, h, .. } => w * h,
            Kernel::Hash { bytes, .. } => bytes / 8,
        }
    }

    /// Units per chunk: about a quarter of a million element operations (an SGEMM
    /// element costs k of them), a fraction of a millisecond here. The chunk is the
    /// engine's preemption point, so it is bounded in work whatever shape the guest
    /// gives a kernel: an SGEMM with k at its 2^21 maximum still stops after each
    /// element of C, and a grid row of any width is cut.
    pub fn chunk(&self) -> u64 {
        const OPS: u64 = 1 << 18;
        match *self {
            Kernel::Sgemm { k, .. } => (OPS * 8 / k).max(1),
            _ => OPS,
        }
    }

    /// The VRAM byte ranges that units `units` of this kernel (with resolved operands)
    /// write, apart from a reduction's 8-byte result (written once, at the end).
    pub fn written(&self, units: std::ops::Range<u64>) -> Option<(u64, u64)> {
        let at = |base: u64| (base + 4 * units.start, 4 * (units.end - units.start));
        match *self {
            Kernel::VecAdd { z, .. } | Kernel::VecMul { z, .. } => Some(at(z)),
            Kernel::Axpy { y, .. } => Some(at(y)),
            Kernel::Relu { out, .. } => Some(at(out)),
            Kernel::Sgemm { c, .. } => Some(at(c)),
            Kernel::Stencil { out, .. } => Some(at(out)),
            Kernel::ReduceSum { .. } | Kernel::Dot { .. } | Kernel::Hash { .. } => None,
        }
    }

    /// Whether output element i depends only on input element i.
    pub fn elementwise(&self) -> bool {
        matches!(
            self,
            Kernel::VecAdd { .. }
                | Kernel::VecMul { .. }
                | Kernel::Axpy { .. }
                | Kernel::Relu { .. }
        )
    }

    /// Every operand, in a fixed order (`with_operands` takes them back in that order).
    pub fn operands(&self) -> Vec<Operand> {
        match *self {
            Kernel::VecAdd { x, y, z, n } | Kernel::VecMul { x, y, z, n } => {
                vec![opd(x, n, false), opd(y, n, false), opd(z, n, true)]
            }
            Kernel::Axpy { x, y, n, .. } => vec![opd(x, n, false), opd(y, n, true)],
            Kernel::Relu { x, out, n } => vec![opd(x, n, false), opd(out, n, true)],
            Kernel::ReduceSum { x, n, dst } => vec![opd(x, n, false), result(dst)],
            Kernel::Dot { x, y, n, dst } => vec![opd(x, n, false), opd(y, n, false), result(dst)],
            Kernel::Sgemm {
                a, b, c, m, n, k, ..
            } => {
                vec![
                    opd(a, m * k, false),
                    opd(b, k * n, false),
                    opd(c, m * n, true),
                ]
            }
            Kernel::Stencil {
                input,
                out,
                f,
                w,
                h,
                dst,
            } => {
                let mut v = vec![
                    opd(input, w * h, false),
                    opd(f, w * h, false),
                    opd(out, w * h, true),
                ];
                if dst != 0 {
                    v.push(result(dst));
                }
                v
            }
            Kernel::Hash { src, bytes, dst } => vec![
                Operand {
                    va: src,
                    bytes,
                    write: false,
                    result: false,
                },
                result(dst),
            ],
        }
    }

    /// The same kernel with its operand addresses replaced, in `operands()` order.
    pub fn with_operands(&self, o: &[u64]) -> Kernel {
        let mut k = *self;
        match &mut k {
            Kernel::VecAdd { x, y, z, .. } | Kernel::VecMul { x, y, z, .. } => {
                (*x, *y, *z) = (o[0], o[1], o[2])
            }
            Kernel::Axpy { x, y, .. } => (*x, *y) = (o[0], o[1]),
            Kernel::Relu { x, out, .. } => (*x, *out) = (o[0], o[1]),
            Kernel::ReduceSum { x, dst, .. } => (*x, *dst) = (o[0], o[1]),
            Kernel::Dot { x, y, dst, .. } => (*x, *y, *dst) = (o[0], o[1], o[2]),
            Kernel::Sgemm { a, b, c, .. } => (*a, *b, *c) = (o[0], o[1], o[2]),
            Kernel::Stencil {
                input, f, out, dst, ..
            } => {
                (*input, *f, *out) = (o[0], o[1], o[2]);
                if *dst != 0 {
                    *dst = o[3];
                }
            }
            Kernel::Hash { src, dst, .. } => (*src, *dst) = (o[0], o[1]),
        }
        k
    }

    /// The accumulator a kernel starts from.
    pub fn initial_acc(&self) -> crate::backend::Acc {
        crate::backend::Acc {
            f: 0.0,
            u: if matches!(self, Kernel::Hash { .. }) {
                abi::HASH_SEED
            } else {
                0
            },
        }
    }

    /// The 8 bytes a reduction leaves at its result operand.
    pub fn result_bytes(&self, acc: &crate::backend::Acc) -> Option<[u8; 8]> {
        match self {
            Kernel::ReduceSum { .. } | Kernel::Dot { .. } => Some(acc.f.to_le_bytes()),
            Kernel::Stencil { dst, .. } if *dst != 0 => Some(acc.f.to_le_bytes()),
            Kernel::Hash { .. } => Some(acc.u.to_le_bytes()),
            _ => None,
        }
    }
}
