//! The compute kernels' arithmetic, on host slices. The order of every sum is fixed (index
//! order, carried across chunks in the accumulator), so results are bit-for-bit the same
//! however a command is cut into chunks or preempted, and a guest can recompute them.

pub fn vec_add(x: &[f32], y: &[f32], z: &mut Vec<f32>) {
    z.clear();
    z.extend(x.iter().zip(y).map(|(a, b)| a + b));
}

pub fn vec_mul(x: &[f32], y: &[f32], z: &mut Vec<f32>) {
    z.clear();
    z.extend(x.iter().zip(y).map(|(a, b)| a * b));
}

pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

pub fn relu(x: &mut [f32]) {
    for v in x {
        *v = v.max(0.0);
    }
}

pub fn sum(acc: f64, x: &[f32]) -> f64 {
    x.iter().fold(acc, |s, &v| s + v as f64)
}

pub fn dot(acc: f64, x: &[f32], y: &[f32]) -> f64 {
    x.iter()
        .zip(y)
        .fold(acc, |s, (&a, &b)| s + a as f64 * b as f64)
}

/// Columns `j0..j0 + c.len()` of one row of C = alpha * A * B + beta * C. `arow` is that
/// row of A (k values); `b` holds the same columns of every row of B, row p at
/// `b[p * ldb..]`; `c` those elements of C, updated in place. For each element the
/// products are summed in order of p, then alpha and beta applied, so any cut of C into
/// pieces gives the same bits.
pub fn sgemm_piece(
    arow: &[f32],
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    alpha: f32,
    beta: f32,
    tmp: &mut Vec<f32>,
) {
    let width = c.len();
    tmp.clear();
    tmp.resize(width, 0.0);
    for (p, &aip) in arow.iter().enumerate() {
        let brow = &b[p * ldb..p * ldb + width];
        for (t, &bpj) in tmp.iter_mut().zip(brow) {
            *t += aip * bpj;
        }
    }
    for (cij, &t) in c.iter_mut().zip(tmp.iter()) {
        *cij = alpha * t + beta * *cij;
    }
}

/// The input a piece of a Jacobi step reads, around elements `e0..e1` of a W x H grid:
/// `mid` from element `mid_at` (the piece and one element either side), `up` from
/// `up_at` (the elements one row above the piece, where they exist) and `down` from
/// `down_at` (one row below). Only these are read, however wide a row is.
pub struct StencilInput<'a> {
    pub mid: &'a [f32],
    pub mid_at: usize,
    pub up: &'a [f32],
    pub up_at: usize,
    pub down: &'a [f32],
    pub down_at: usize,
}

/// Elements `e0..e0 + f.len()` of one Jacobi step of the 5-point Laplacian on a W x H
/// grid (`f`: the same elements of the right-hand side). Writes `out` and returns `acc`
/// plus the squared change, summed in element order, so any cut of the grid into pieces
/// gives the same bits.
pub fn stencil_piece(
    i: &StencilInput,
    f: &[f32],
    out: &mut Vec<f32>,
    w: usize,
    h: usize,
    e0: usize,
    mut acc: f64,
) -> f64 {
    out.clear();
    out.reserve(f.len());
    for (k, &fk) in f.iter().enumerate() {
        let e = e0 + k;
        let (y, x) = (e / w, e % w);
        let old = i.mid[e - i.mid_at];
        let v = if y == 0 || y == h - 1 || x == 0 || x == w - 1 {
            old
        } else {
            0.25 * (i.up[e - w - i.up_at]
                + i.down[e + w - i.down_at]
                + i.mid[e - 1 - i.mid_at]
                + i.mid[e + 1 - i.mid_at]
                + fk)
        };
        out.push(v);
        let d = (v - old) as f64;
        acc += d * d;
    }
    acc
}

/// Hashes whole little-endian u64 words of `bytes` (a multiple of 8).
pub fn hash(mut h: u64, bytes: &[u8]) -> u64 {
    for w in bytes.chunks_exact(8) {
        h = crate::abi::hash_word(h, u64::from_le_bytes(w.try_into().expect("8 bytes")));
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sgemm_in_pieces_matches_the_textbook_formula() {
        let (m, n, k) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|i| i as f32 * 0.5 - 3.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 - 1.5).collect();
        let c0: Vec<f32> = (0..m * n).map(|i| i as f32).collect();
        let mut c = c0.clone();
        let mut tmp = Vec::new();
        // Row 1 in two pieces (columns 0..3 and 3..7), the other rows whole.
        for i in 0..m {
            let pieces: &[(usize, usize)] = if i == 1 { &[(0, 3), (3, 7)] } else { &[(0, 7)] };
            for &(j0, j1) in pieces {
                let block: Vec<f32> = (0..k)
                    .flat_map(|p| b[p * n + j0..p * n + j1].to_vec())
                    .collect();
                let row = &mut c[i * n + j0..i * n + j1];
                sgemm_piece(
                    &a[i * k..(i + 1) * k],
                    &block,
                    j1 - j0,
                    row,
                    2.0,
                    0.5,
                    &mut tmp,
                );
            }
        }
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0f32;
                for p in 0..k {
                    s += a[i * k + p] * b[p * n + j];
                }
                assert_eq!(c[i * n + j], 2.0 * s + 0.5 * c0[i * n + j]);
            }
        }
    }

    /// One pass over the grid, with the neighbours read straight from it.
    fn stencil_reference(input: &[f32], f: &[f32], w: usize, h: usize) -> (Vec<f32>, f64) {
        let mut out = vec![0f32; w * h];
        let mut acc = 0f64;
        for y in 0..h {
            for x in 0..w {
                let e = y * w + x;
                let v = if y == 0 || y == h - 1 || x == 0 || x == w - 1 {
                    input[e]
                } else {
                    0.25 * (input[e - w] + input[e + w] + input[e - 1] + input[e + 1] + f[e])
                };
                out[e] = v;
                acc += ((v - input[e]) as f64).powi(2);
            }
        }
        (out, acc)
    }

    #[test]
    fn stencil_in_pieces_equals_one_pass() {
        let (w, h) = (6, 5);
        let total = w * h;
        let input: Vec<f32> = (0..total).map(|i| (i * 7 % 11) as f32).collect();
        let f: Vec<f32> = (0..total).map(|i| (i % 3) as f32).collect();
        let (whole, acc) = stencil_reference(&input, &f, w, h);
        // Pieces that start and end mid-row, and one of a single element.
        let mut parts = Vec::new();
        let mut acc2 = 0.0;
        for (e0, e1) in [(0usize, 4usize), (4, 5), (5, 17), (17, 30)] {
            let (mid_at, mid_end) = (e0.saturating_sub(1), (e1 + 1).min(total));
            let (up_at, up_end) = (e0.max(w) - w, e1.max(w) - w);
            let (down_at, down_end) = ((e0 + w).min(total), (e1 + w).min(total));
            let i = StencilInput {
                mid: &input[mid_at..mid_end],
                mid_at,
                up: &input[up_at..up_end],
                up_at,
                down: &input[down_at..down_end],
                down_at,
            };
            let mut out = Vec::new();
            acc2 = stencil_piece(&i, &f[e0..e1], &mut out, w, h, e0, acc2);
            parts.extend(out);
        }
        assert_eq!(whole, parts);
        assert_eq!(acc, acc2);
        let at = |x: usize, y: usize| input[y * w + x];
        assert_eq!(
            whole[2 * w + 2],
            0.25 * (at(2, 1) + at(2, 3) + at(1, 2) + at(3, 2) + f[2 * w + 2])
        );
        assert_eq!(whole[0], input[0]);
    }

    #[test]
    fn hash_is_chunkable() {
        let bytes: Vec<u8> = (0..4096u32).map(|i| (i * 31) as u8).collect();
        let whole = hash(crate::abi::HASH_SEED, &bytes);
        let parts = hash(hash(crate::abi::HASH_SEED, &bytes[..1000]), &bytes[1000..]);
        assert_ne!(whole, 0);
        // 1000 is a multiple of 8: the same words in the same order.
        assert_eq!(whole, parts);
    }
}
