//! Dense f32 kernels of the VNode math: matrix products on the `gemm` crate's microkernels and
//! the element-wise passes, spread over rayon's pool.
//!
//! Determinism: a product is cut into panels (rows or columns of its output) and its inner
//! dimension into blocks, both fixed by the shapes alone, and every panel is one single-threaded
//! `gemm` call per block. Which thread runs a panel changes nothing, so the bits are the same for
//! any thread count (`RAYON_NUM_THREADS`). The inner blocks are cut here rather than by `gemm`,
//! whose own blocking reads the cache sizes of the machine. What still changes bits is the
//! microkernel `gemm` picks from the CPU's SIMD features: part of the determinism class
//! ([`crate::KERNELS`], docs/DETERMINISM.md).

// `gemm` takes raw pointers and strides; this module is the one place that hands them over, with
// every extent checked against its slice first.
#![allow(unsafe_code)]

use rayon::prelude::*;
use std::sync::OnceLock;

/// Width of an output panel (rows or columns): one unit of work for a thread.
const PANEL: usize = 64;
/// Products smaller than this many multiply-adds run as one panel: a thread hand-off costs more.
const SPLIT_MIN_MACS: usize = 1 << 20;
/// The longest inner block of one `gemm` call.
const K_BLOCK: usize = 512;
/// Elements per task of the element-wise passes.
const CHUNK: usize = 1 << 14;

/// The threads the kernels spread over: `RAYON_NUM_THREADS`, else one per core.
static POOL: OnceLock<Option<rayon::ThreadPool>> = OnceLock::new();

/// Runs `f` (a whole pass: a VNode's message, a reference step) on the kernels' thread pool, so
/// its products and element-wise passes are spread over the pool's threads, forking and joining
/// between them. Kernels called outside `run` stay on the calling thread: what a host wants when
/// it already runs several passes side by side (a pipelined mesh). The bits are the same either
/// way. Without a pool (it could not be started) `f` runs here.
pub fn run<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let pool =
        POOL.get_or_init(|| rayon::ThreadPoolBuilder::new().thread_name(|i| format!("dcnr-kernels-{i}")).build().ok());
    match pool {
        Some(pool) => pool.install(f),
        None => f(),
    }
}

/// Whether kernels may spread over threads here: only on a pool thread, i.e. inside [`run`].
fn spread() -> bool {
    rayon::current_thread_index().is_some()
}

/// A matrix product whose operands do not fit each other or their slices.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("matrix product of [{m}, {k}] by [{k2}, {n}] into {dst} elements: shapes do not fit")]
pub struct ShapeError {
    m: usize,
    k: usize,
    k2: usize,
    n: usize,
    dst: usize,
}

/// A row-major f32 matrix on the host; its length always equals rows × cols.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Matrix {
    rows: usize,
    cols: usize,
    data: Vec<f32>,
}

impl Matrix {
    /// A matrix over `data`, if it holds exactly `rows * cols` values.
    pub fn new(rows: usize, cols: usize, data: Vec<f32>) -> Option<Matrix> {
        (rows.checked_mul(cols) == Some(data.len())).then_some(Matrix { rows, cols, data })
    }

    /// All zeros.
    pub fn zeros(rows: usize, cols: usize) -> Matrix {
        Matrix { rows, cols, data: vec![0.0; rows * cols] }
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The shape as a host tensor names it: `[rows, cols]`.
    pub fn shape(&self) -> Vec<usize> {
        vec![self.rows, self.cols]
    }

    /// The values, row by row.
    pub fn data(&self) -> &[f32] {
        &self.data
    }

    /// The values, row by row, to change in place.
    pub fn data_mut(&mut self) -> &mut [f32] {
        &mut self.data
    }

    /// The values, row by row.
    pub fn into_data(self) -> Vec<f32> {
        self.data
    }

    /// The matrix as an operand.
    pub fn view(&self) -> View<'_> {
        View { data: &self.data, rows: self.rows, cols: self.cols, rs: self.cols, cs: 1 }
    }
}

/// A read-only operand: element (i, j) is `data[i * rs + j * cs]`.
#[derive(Debug, Clone, Copy)]
pub struct View<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> View<'a> {
    /// The transpose (no copy).
    pub fn t(self) -> View<'a> {
        View { data: self.data, rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs }
    }

    /// Whether every element lies inside the slice.
    fn fits(&self) -> bool {
        if self.rows == 0 || self.cols == 0 {
            return true;
        }
        let last = (self.rows - 1).checked_mul(self.rs).zip((self.cols - 1).checked_mul(self.cs));
        last.and_then(|(a, b)| a.checked_add(b)).is_some_and(|i| i < self.data.len())
    }
}

/// `dst = a · b` (or `dst += a · b` with `accumulate`), `dst` row-major `[a.rows, b.cols]`.
pub fn matmul(dst: &mut [f32], a: View<'_>, b: View<'_>, accumulate: bool) -> Result<(), ShapeError> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let err = ShapeError { m, k, k2: b.rows, n, dst: dst.len() };
    if b.rows != k || m.checked_mul(n) != Some(dst.len()) || !a.fits() || !b.fits() {
        return Err(err);
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            dst.fill(0.0);
        }
        return Ok(());
    }
    let macs = m.saturating_mul(n).saturating_mul(k);
    // Split the longer side of the output: each panel then reads the whole of the other
    // operand, the smaller one.
    let by_rows = m > n;
    let side = if by_rows { m } else { n };
    let width = if macs < SPLIT_MIN_MACS { side } else { PANEL };
    let panels = side.div_ceil(width);
    let out = DstPtr(dst.as_mut_ptr());
    let run = |p: usize| {
        let (start, end) = (p * width, ((p + 1) * width).min(side));
        if start >= end {
            return;
        }
        let (rows, cols) = if by_rows { (start..end, 0..n) } else { (0..m, start..end) };
        // SAFETY: the panel's rows and columns lie inside dst ([m, n], row-major, checked
        // above) and panels are disjoint, so no two threads write one element; a and b were
        // checked to fit their slices, and the offsets below stay inside them.
        unsafe { panel(out, n, a, b, rows, cols, accumulate) };
    };
    if panels == 1 || !spread() {
        (0..panels).for_each(run);
    } else {
        (0..panels).into_par_iter().for_each(run);
    }
    Ok(())
}

/// The output pointer of a product, shared by the threads that write its disjoint panels.
#[derive(Clone, Copy)]
struct DstPtr(*mut f32);
// SAFETY: only used by `matmul`, whose panels write disjoint elements.
unsafe impl Send for DstPtr {}
// SAFETY: as above.
unsafe impl Sync for DstPtr {}

/// One panel of `matmul`: `dst[rows, cols] (+)= a[rows, :] · b[:, cols]`, in fixed inner blocks.
///
/// # Safety
/// `dst` points to a row-major matrix with `ld` columns covering `rows × cols`; `a` and `b`
/// fit their slices and `rows` / `cols` lie within `a.rows` / `b.cols`.
unsafe fn panel(
    dst: DstPtr,
    ld: usize,
    a: View<'_>,
    b: View<'_>,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
    accumulate: bool,
) {
    let k = a.cols;
    let blocks = k.div_ceil(K_BLOCK);
    let kb = k.div_ceil(blocks);
    let mut k0 = 0;
    while k0 < k {
        let len = kb.min(k - k0);
        // SAFETY: the caller's guarantees; k0 + len <= k keeps every offset inside a and b.
        unsafe {
            gemm::gemm(
                rows.len(),
                cols.len(),
                len,
                dst.0.add(rows.start * ld + cols.start),
                1,
                ld as isize,
                accumulate || k0 > 0,
                a.data.as_ptr().add(rows.start * a.rs + k0 * a.cs),
                a.cs as isize,
                a.rs as isize,
                b.data.as_ptr().add(k0 * b.rs + cols.start * b.cs),
                b.cs as isize,
                b.rs as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        k0 += len;
    }
}

/// Runs element-wise code compiled for the widest SIMD features the CPU has. Only for IEEE
/// add, subtract, multiply, divide and square root, which round the same at every vector width
/// (Rust never fuses a multiply and an add on its own), so the features change no bit here.
#[inline(always)]
fn wide<R>(f: impl FnOnce() -> R) -> R {
    pulp::Arch::new().dispatch(f)
}

/// `x`, or 0 when it is subnormal. A moment whose gradient stays 0 (a weight of a pixel that is
/// always blank) decays geometrically into the subnormal range, where every operation on it
/// costs tens of cycles; its effect on the parameter is far below the parameter's last bit by
/// then. A comparison and a select, the same on every CPU and vector width.
#[inline(always)]
fn flush(x: f32) -> f32 {
    if x.abs() < f32::MIN_POSITIVE { 0.0 } else { x }
}

/// SGD with heavy-ball momentum, in place: `v = momentum·v + g; p -= lr·v` (`p -= lr·g`
/// without momentum, when `v` is empty). Element-wise, so the chunks change no bit.
pub fn sgd(p: &mut [f32], v: &mut [f32], g: &[f32], lr: f32, momentum: f32) {
    if v.is_empty() {
        let pass = |(p, g): (&mut [f32], &[f32])| {
            wide(|| {
                for (p, g) in p.iter_mut().zip(g) {
                    *p -= lr * g;
                }
            })
        };
        if spread() {
            p.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK)).for_each(pass);
        } else {
            pass((p, g));
        }
        return;
    }
    let pass = |((p, v), g): ((&mut [f32], &mut [f32]), &[f32])| {
        wide(|| {
            for ((p, v), g) in p.iter_mut().zip(v.iter_mut()).zip(g) {
                *v = flush(momentum * *v + g);
                *p -= lr * *v;
            }
        })
    };
    if spread() {
        p.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)).zip(g.par_chunks(CHUNK)).for_each(pass);
    } else {
        pass(((p, v), g));
    }
}

/// Constants of one Adam step.
#[derive(Debug, Clone, Copy)]
pub struct AdamStep {
    /// Learning rate.
    pub lr: f32,
    /// First-moment decay.
    pub beta1: f32,
    /// Second-moment decay.
    pub beta2: f32,
    /// Denominator epsilon.
    pub eps: f32,
    /// 1 − beta1^t.
    pub correction1: f32,
    /// 1 − beta2^t.
    pub correction2: f32,
    /// What the parameter is multiplied by before the step: 1 − lr·weight_decay for AdamW, 1
    /// for Adam (an exact multiplication, so Adam's bits are the same either way).
    pub decay: f32,
}

impl AdamStep {
    /// The constants of update number `t` (from 1).
    pub fn new(lr: f32, beta1: f32, beta2: f32, eps: f32, t: i32) -> AdamStep {
        AdamStep {
            lr,
            beta1,
            beta2,
            eps,
            correction1: 1.0 - beta1.powi(t),
            correction2: 1.0 - beta2.powi(t),
            decay: 1.0,
        }
    }
}

/// Matching chunks of a parameter, its two moments and its gradient.
type AdamChunk<'a> = (((&'a mut [f32], &'a mut [f32]), &'a mut [f32]), &'a [f32]);

/// Adam in place, one pass over the parameter, both moments and the gradient; element-wise.
pub fn adam(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], s: AdamStep) {
    // Bias corrections folded into two scalars, as PyTorch does: one square root and one
    // division per element.
    let step = s.lr / s.correction1;
    let root = 1.0 / s.correction2.sqrt();
    let (b1, b2, eps, decay) = (s.beta1, s.beta2, s.eps, s.decay);
    let pass = |(((p, m), v), g): AdamChunk<'_>| {
        wide(|| {
            for (((p, m), v), g) in p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
                *m = flush(b1 * *m + (1.0 - b1) * g);
                *v = flush(b2 * *v + (1.0 - b2) * (g * g));
                *p = *p * decay - step * *m / (v.sqrt() * root + eps);
            }
        })
    };
    if spread() {
        let chunks = p.par_chunks_mut(CHUNK).zip(m.par_chunks_mut(CHUNK)).zip(v.par_chunks_mut(CHUNK));
        chunks.zip(g.par_chunks(CHUNK)).for_each(pass);
    } else {
        pass((((p, m), v), g));
    }
}

/// Sums of the columns of a `[rows, cols]` matrix, each over the rows in order.
pub fn column_sums(x: &Matrix) -> Vec<f32> {
    let mut acc = vec![0.0f32; x.cols];
    for row in x.data.chunks_exact(x.cols.max(1)) {
        add_assign(&mut acc, row);
    }
    acc
}

/// `a += b`, element by element.
pub fn add_assign(a: &mut [f32], b: &[f32]) {
    wide(|| {
        for (a, b) in a.iter_mut().zip(b) {
            *a += b;
        }
    })
}

/// `max(x, 0)` in place.
pub fn relu(x: &mut [f32]) {
    wide(|| {
        for v in x.iter_mut() {
            *v = v.max(0.0);
        }
    })
}

/// Zeroes the gradient `g` where the output `y` of a relu is not positive.
pub fn relu_backward(g: &mut [f32], y: &[f32]) {
    wide(|| {
        for (g, y) in g.iter_mut().zip(y) {
            *g = if *y > 0.0 { *g } else { 0.0 };
        }
    })
}

/// `g · (1 − y²)`, the gradient through a tanh whose output is `y`, in place.
pub fn tanh_backward(g: &mut [f32], y: &[f32]) {
    wide(|| {
        for (g, y) in g.iter_mut().zip(y) {
            *g *= 1.0 - y * y;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &Matrix, b: &Matrix) -> Vec<f32> {
        let mut out = vec![0.0f64; a.rows * b.cols];
        for i in 0..a.rows {
            for j in 0..b.cols {
                for k in 0..a.cols {
                    out[i * b.cols + j] += f64::from(a.data[i * a.cols + k]) * f64::from(b.data[k * b.cols + j]);
                }
            }
        }
        out.into_iter().map(|v| v as f32).collect()
    }

    fn filled(rows: usize, cols: usize, salt: u32) -> Matrix {
        let data = (0..rows * cols).map(|i| (((i as u32).wrapping_mul(2654435761) ^ salt) % 1000) as f32 / 500.0 - 1.0);
        Matrix::new(rows, cols, data.collect()).expect("length")
    }

    #[test]
    fn products_match_a_naive_product_in_every_layout() {
        for &(m, k, n) in &[(64, 784, 256), (3, 5, 2), (256, 256, 10), (700, 64, 256), (1, 1, 1), (65, 1025, 130)] {
            let (a, b) = (filled(m, k, 1), filled(k, n, 2));
            let want = naive(&a, &b);
            let mut got = vec![0.0; m * n];
            matmul(&mut got, a.view(), b.view(), false).expect("fits");
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() <= 1e-3 * (1.0 + w.abs()), "{m}x{k}x{n}: {g} vs {w}");
            }
            // The same product from transposed storage.
            let at = Matrix::new(k, m, (0..k * m).map(|i| a.data[(i % m) * k + i / m]).collect()).expect("len");
            let mut got_t = vec![0.0; m * n];
            matmul(&mut got_t, at.view().t(), b.view(), false).expect("fits");
            for (g, w) in got_t.iter().zip(&want) {
                assert!((g - w).abs() <= 1e-3 * (1.0 + w.abs()));
            }
            // Accumulating adds onto what is there.
            let mut twice = got.clone();
            matmul(&mut twice, a.view(), b.view(), true).expect("fits");
            for (t, g) in twice.iter().zip(&got) {
                assert!((t - 2.0 * g).abs() <= 1e-3 * (1.0 + g.abs()));
            }
        }
    }

    #[test]
    fn the_thread_count_does_not_change_a_bit() {
        let (a, b) = (filled(256, 784, 3), filled(784, 256, 4));
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("pool");
            pool.install(|| {
                let mut out = vec![0.0; 256 * 256];
                matmul(&mut out, a.view(), b.view(), false).expect("fits");
                let mut dw = vec![0.0; 784 * 256];
                matmul(&mut dw, a.view().t(), filled(256, 256, 5).view(), false).expect("fits");
                let mut p = filled(1, 300_000, 6).into_data();
                let (mut m, mut v) = (vec![0.1; p.len()], vec![0.2; p.len()]);
                let g = filled(1, 300_000, 7).into_data();
                let s = AdamStep {
                    lr: 0.01,
                    beta1: 0.9,
                    beta2: 0.999,
                    eps: 1e-8,
                    correction1: 0.1,
                    correction2: 0.001,
                    decay: 1.0,
                };
                adam(&mut p, &mut m, &mut v, &g, s);
                (out, dw, p, m, v)
            })
        };
        let one = run(1);
        assert_eq!(one, run(2));
        assert_eq!(one, run(4));
    }

    #[test]
    fn operands_that_do_not_fit_are_refused() {
        let (a, b) = (filled(4, 3, 1), filled(2, 5, 2));
        assert!(matmul(&mut [0.0; 20], a.view(), b.view(), false).is_err());
        let b = filled(3, 5, 2);
        assert!(matmul(&mut [0.0; 19], a.view(), b.view(), false).is_err());
        assert!(matmul(&mut [0.0; 20], a.view(), b.view(), false).is_ok());
        assert!(Matrix::new(2, 3, vec![0.0; 5]).is_none());
    }
}
