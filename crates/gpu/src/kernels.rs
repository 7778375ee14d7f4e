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

/// Rows of C = alpha * A * B + beta * C. `a` holds those rows of A (rows x k), `b` all of
/// B (k x n), `c` those rows of C (rows x n). For each (i, j) the products are summed in
/// order of p, then alpha and beta applied.
#[allow(clippy::too_many_arguments)]
pub fn sgemm_rows(
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    n: usize,
    k: usize,
    alpha: f32,
    beta: f32,
    tmp: &mut Vec<f32>,
) {
    let rows = c.len() / n;
    tmp.clear();
    tmp.resize(n, 0.0);
    for i in 0..rows {
        tmp.fill(0.0);
        let arow = &a[i * k..(i + 1) * k];
        for (p, &aip) in arow.iter().enumerate() {
            let brow = &b[p * n..(p + 1) * n];
            for (t, &bpj) in tmp.iter_mut().zip(brow) {
                *t += aip * bpj;
            }
        }
        for (cij, &t) in c[i * n..(i + 1) * n].iter_mut().zip(tmp.iter()) {
            *cij = alpha * t + beta * *cij;
        }
    }
}

/// Rows `row0..row0 + f.len() / w` of one Jacobi step. `input` holds the input rows from
/// `row0 - first` on (so `first` is the index in `input` of row0); `f` the same rows of
/// the right-hand side. Writes `out` and returns `acc` plus the squared change, summed
/// row by row in order.
#[allow(clippy::too_many_arguments)]
pub fn stencil_rows(
    input: &[f32],
    first: usize,
    f: &[f32],
    out: &mut Vec<f32>,
    w: usize,
    h: usize,
    row0: usize,
    mut acc: f64,
) -> f64 {
    let rows = f.len() / w;
    out.clear();
    out.resize(rows * w, 0.0);
    for r in 0..rows {
        let y = row0 + r;
        let at = |dy: isize, x: usize| input[((first + r) as isize + dy) as usize * w + x];
        for x in 0..w {
            let old = at(0, x);
            let v = if y == 0 || y == h - 1 || x == 0 || x == w - 1 {
                old
            } else {
                0.25 * (at(-1, x) + at(1, x) + at(0, x - 1) + at(0, x + 1) + f[r * w + x])
            };
            out[r * w + x] = v;
            let d = (v - old) as f64;
            acc += d * d;
        }
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
    fn sgemm_matches_the_textbook_formula() {
        let (m, n, k) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|i| i as f32 * 0.5 - 3.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 - 1.5).collect();
        let mut c: Vec<f32> = (0..m * n).map(|i| i as f32).collect();
        let c0 = c.clone();
        let mut tmp = Vec::new();
        sgemm_rows(&a, &b, &mut c, n, k, 2.0, 0.5, &mut tmp);
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

    #[test]
    fn stencil_in_row_chunks_equals_one_pass() {
        let (w, h) = (6, 5);
        let input: Vec<f32> = (0..w * h).map(|i| (i * 7 % 11) as f32).collect();
        let f: Vec<f32> = (0..w * h).map(|i| (i % 3) as f32).collect();
        let mut whole = Vec::new();
        let acc = stencil_rows(&input, 0, &f, &mut whole, w, h, 0, 0.0);
        let mut parts = Vec::new();
        let mut acc2 = 0.0;
        for (r0, r1) in [(0usize, 2usize), (2, 3), (3, 5)] {
            let lo = r0.saturating_sub(1);
            let hi = (r1 + 1).min(h);
            let mut out = Vec::new();
            acc2 = stencil_rows(
                &input[lo * w..hi * w],
                r0 - lo,
                &f[r0 * w..r1 * w],
                &mut out,
                w,
                h,
                r0,
                acc2,
            );
            parts.extend(out);
        }
        assert_eq!(whole, parts);
        assert_eq!(acc, acc2);
        // Interior point (2, 2) by hand; boundary copied.
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
