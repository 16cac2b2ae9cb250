//! The AVX-512 tier of the summary pass's hot loops (`large`, `row`, `expert`, `moments` in
//! `kernels.rs`), by hand: the first three evaluate one exponential per logit and are most of a
//! certified step, and the table exponential (`numerics::exp512::exp8`, ~17 operations per
//! vector against the polynomial's 26) can only be reached through intrinsics; `moments` fuses
//! the last product of each power sum into its accumulation, and `avx512_front1` runs the first
//! three as one loop when there is one expert; `avx512_moments_wide(_w)` are the wide tail's
//! order-16 power sums. Each computes what its portable twin computes,
//! token k in lane k % 8, with the products of the sums fused (one rounding instead of two:
//! inside the certificate's slack, as the tier's other differences). A block's last len % 8
//! tokens go through the same code with a lane mask. Tests in `kernels512/tests.rs`.

#![cfg(target_arch = "x86_64")]

use super::kernels::ExpertSums;
use super::{ORDER, WIDE_ORDER};
use crate::numerics::exp512::exp8;
use std::arch::x86_64::*;

/// Lanes (tokens) per vector.
const W: usize = 8;

/// Eight f32 at `p` (lanes outside `m` read as 0) as f64.
///
/// # Safety
/// The lanes in `m` must be readable.
#[inline(always)]
unsafe fn load_f32(p: *const f32, m: __mmask8) -> __m512d {
    // SAFETY: the caller's contract; masked-off lanes are not read.
    _mm512_cvtps_pd(unsafe { _mm256_maskz_loadu_ps(m, p) })
}

/// # Safety
/// The lanes in `m` must be readable.
#[inline(always)]
unsafe fn load(p: *const f64, m: __mmask8) -> __m512d {
    // SAFETY: the caller's contract.
    unsafe { _mm512_maskz_loadu_pd(m, p) }
}

/// # Safety
/// The lanes in `m` must be writable.
#[inline(always)]
unsafe fn store(p: *mut f64, m: __mmask8, v: __m512d) {
    // SAFETY: the caller's contract.
    unsafe { _mm512_mask_storeu_pd(p, m, v) }
}

/// The lane masks of a block of `n` tokens: full vectors, then the remainder's lanes.
fn masks(n: usize) -> impl Iterator<Item = (usize, __mmask8)> {
    let full = n / W * W;
    (0..full)
        .step_by(W)
        .map(|k| (k, 0xFF))
        .chain((full < n).then(|| (full, ((1u32 << (n - full)) - 1) as __mmask8)))
}

/// `kernels::large`: lp = z - ml, p = e^lp, tail = 1 where z = -inf (else 0), acc += p.
#[target_feature(enable = "avx512f,avx512vl,fma,avx2")]
pub(crate) fn avx512_large(
    z: &[f32],
    ml: f64,
    lp: &mut [f64],
    p: &mut [f64],
    tail: &mut [f64],
    acc: &mut [f64; 8],
) {
    let n = z.len().min(lp.len()).min(p.len()).min(tail.len());
    let (mlv, ninf, one) = (
        _mm512_set1_pd(ml),
        _mm512_set1_pd(f64::NEG_INFINITY),
        _mm512_set1_pd(1.0),
    );
    // SAFETY: acc holds eight f64.
    let mut a = unsafe { _mm512_loadu_pd(acc.as_ptr()) };
    for (k, m) in masks(n) {
        // SAFETY: k + (lanes in m) <= n, within every slice.
        unsafe {
            let o = _mm512_sub_pd(load_f32(z.as_ptr().add(k), m), mlv);
            let e = exp8(o);
            store(lp.as_mut_ptr().add(k), m, o);
            store(p.as_mut_ptr().add(k), m, e);
            let possible = _mm512_cmp_pd_mask::<_CMP_GT_OQ>(o, ninf);
            store(
                tail.as_mut_ptr().add(k),
                m,
                _mm512_maskz_mov_pd(!possible, one),
            );
            a = _mm512_mask_add_pd(a, m, a, e);
        }
    }
    // SAFETY: acc holds eight f64.
    unsafe { _mm512_storeu_pd(acc.as_mut_ptr(), a) };
}

/// -inf read as `rep`, as f64.
#[target_feature(enable = "avx512f,avx512vl,fma,avx2")]
#[inline]
fn replaced(x: __m512d, rep: f64) -> __m512d {
    let is_ninf = _mm512_cmp_pd_mask::<_CMP_EQ_OQ>(x, _mm512_set1_pd(f64::NEG_INFINITY));
    _mm512_mask_mov_pd(x, is_ninf, _mm512_set1_pd(rep))
}

/// `kernels::row`: x = z (-inf read as rep), q = e^(x - shift), acc += q.
#[target_feature(enable = "avx512f,avx512vl,fma,avx2")]
pub(crate) fn avx512_row(
    z: &[f32],
    rep: f32,
    shift: f64,
    x: &mut [f64],
    q: &mut [f64],
    acc: &mut [f64; 8],
) {
    let n = z.len().min(x.len()).min(q.len());
    let sv = _mm512_set1_pd(shift);
    // SAFETY: acc holds eight f64.
    let mut a = unsafe { _mm512_loadu_pd(acc.as_ptr()) };
    for (k, m) in masks(n) {
        // SAFETY: k + (lanes in m) <= n, within every slice.
        unsafe {
            let v = replaced(load_f32(z.as_ptr().add(k), m), rep as f64);
            let e = exp8(_mm512_sub_pd(v, sv));
            store(x.as_mut_ptr().add(k), m, v);
            store(q.as_mut_ptr().add(k), m, e);
            a = _mm512_mask_add_pd(a, m, a, e);
        }
    }
    // SAFETY: acc holds eight f64.
    unsafe { _mm512_storeu_pd(acc.as_mut_ptr(), a) };
}

/// `kernels::expert`: d = z_t - z_S, tail += 1 where |d| > delta, the sums of q_t, q_t d, q d,
/// p d, p |d| and the largest |d| (tokens with P > 0, and all).
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512vl,fma,avx2")]
pub(crate) fn avx512_expert(
    zt: &[f32],
    rep: f32,
    mt: f64,
    zs: &[f64],
    d: &mut [f64],
    q: &[f64],
    p: &[f64],
    lp: &[f64],
    tail: &mut [f64],
    delta: f64,
    sums: &mut ExpertSums,
) {
    let n = zt
        .len()
        .min(zs.len())
        .min(d.len())
        .min(q.len())
        .min(p.len())
        .min(lp.len())
        .min(tail.len());
    let (mtv, dv, one, ninf) = (
        _mm512_set1_pd(mt),
        _mm512_set1_pd(delta),
        _mm512_set1_pd(1.0),
        _mm512_set1_pd(f64::NEG_INFINITY),
    );
    let ExpertSums {
        acc,
        amax,
        amax_all,
    } = sums;
    // SAFETY: every array below holds eight f64.
    let ld = |a: &[f64; 8]| unsafe { _mm512_loadu_pd(a.as_ptr()) };
    let mut s = [
        ld(&acc[0]),
        ld(&acc[1]),
        ld(&acc[2]),
        ld(&acc[3]),
        ld(&acc[4]),
    ];
    let (mut mx, mut mx_all) = (ld(amax), ld(amax_all));
    for (k, m) in masks(n) {
        // SAFETY: k + (lanes in m) <= n, within every slice.
        unsafe {
            let x = replaced(load_f32(zt.as_ptr().add(k), m), rep as f64);
            let dd = _mm512_sub_pd(x, load(zs.as_ptr().add(k), m));
            store(d.as_mut_ptr().add(k), m, dd);
            let qt = exp8(_mm512_sub_pd(x, mtv));
            let ad = _mm512_abs_pd(dd);
            let out = _mm512_cmp_pd_mask::<_CMP_NLE_UQ>(ad, dv);
            let tp = tail.as_mut_ptr().add(k);
            let tv = load(tp, m);
            store(tp, m, _mm512_mask_add_pd(tv, out, tv, one));
            let (qv, pv) = (load(q.as_ptr().add(k), m), load(p.as_ptr().add(k), m));
            s[0] = _mm512_mask_add_pd(s[0], m, s[0], qt);
            s[1] = _mm512_mask3_fmadd_pd(qt, dd, s[1], m);
            s[2] = _mm512_mask3_fmadd_pd(qv, dd, s[2], m);
            s[3] = _mm512_mask3_fmadd_pd(pv, dd, s[3], m);
            s[4] = _mm512_mask3_fmadd_pd(pv, ad, s[4], m);
            let live = _mm512_cmp_pd_mask::<_CMP_GT_OQ>(load(lp.as_ptr().add(k), m), ninf);
            mx = _mm512_mask_max_pd(mx, live & m, mx, ad);
            mx_all = _mm512_mask_max_pd(mx_all, m, mx_all, ad);
        }
    }
    // SAFETY: every array below holds eight f64.
    let st = |a: &mut [f64; 8], v: __m512d| unsafe { _mm512_storeu_pd(a.as_mut_ptr(), v) };
    for (a, v) in acc.iter_mut().zip(s) {
        st(a, v);
    }
    st(amax, mx);
    st(amax_all, mx_all);
}

/// The power sums' step: s_j += w0 d^j, j = 0..8, the powers from d^2, d^4 and w0 d^0..4 with
/// the last product of each fused into its sum.
#[target_feature(enable = "avx512f,avx512vl,fma,avx2")]
#[inline]
fn powers(s: &mut [__m512d; ORDER + 1], w0: __m512d, d: __m512d) {
    let d2 = _mm512_mul_pd(d, d);
    let d4 = _mm512_mul_pd(d2, d2);
    let w1 = _mm512_mul_pd(w0, d);
    let w2 = _mm512_mul_pd(w0, d2);
    let w3 = _mm512_mul_pd(w1, d2);
    let w4 = _mm512_mul_pd(w0, d4);
    s[0] = _mm512_add_pd(s[0], w0);
    s[1] = _mm512_fmadd_pd(w0, d, s[1]);
    s[2] = _mm512_fmadd_pd(w0, d2, s[2]);
    s[3] = _mm512_fmadd_pd(w1, d2, s[3]);
    s[4] = _mm512_fmadd_pd(w0, d4, s[4]);
    s[5] = _mm512_fmadd_pd(w1, d4, s[5]);
    s[6] = _mm512_fmadd_pd(w2, d4, s[6]);
    s[7] = _mm512_fmadd_pd(w3, d4, s[7]);
    s[8] = _mm512_fmadd_pd(w4, d4, s[8]);
}

/// `kernels::moments`: over the tail (count 0) the power sums p d^j, j = 0..8, and the largest
/// |d|. The powers come from the same tree (d^2, d^4, then p d^0..4), with the last product of
/// each sum fused into its accumulation: 16 operations per vector instead of 20.
#[target_feature(enable = "avx512f,avx512vl,fma,avx2")]
pub(crate) fn avx512_moments(
    tail: &[f64],
    d: &[f64],
    p: &[f64],
    mom: &mut [[f64; 8]; ORDER + 1],
    tmax: &mut f64,
) {
    let n = tail.len().min(d.len()).min(p.len());
    // SAFETY: every array below holds eight f64.
    let mut s: [__m512d; ORDER + 1] =
        std::array::from_fn(|j| unsafe { _mm512_loadu_pd(mom[j].as_ptr()) });
    let mut mx = _mm512_setzero_pd();
    let zero = _mm512_setzero_pd();
    for (k, m) in masks(n) {
        // SAFETY: k + (lanes in m) <= n, within every slice.
        let (tv, dd, pv) = unsafe {
            (
                load(tail.as_ptr().add(k), m),
                load(d.as_ptr().add(k), m),
                load(p.as_ptr().add(k), m),
            )
        };
        let in_tail = _mm512_mask_cmp_pd_mask::<_CMP_EQ_OQ>(m, tv, zero);
        powers(&mut s, _mm512_maskz_mov_pd(in_tail, pv), dd);
        mx = _mm512_mask_max_pd(mx, in_tail, mx, _mm512_abs_pd(dd));
    }
    for (a, v) in mom.iter_mut().zip(s) {
        // SAFETY: a holds eight f64.
        unsafe { _mm512_storeu_pd(a.as_mut_ptr(), v) };
    }
    *tmax = tmax.max(_mm512_reduce_max_pd(mx));
}

/// The single-expert block (the paper's single-task setting) in two loops instead of five:
/// `large`, `row`, `expert` and `outside` here, the power sums in `avx512_moments_w`. The small
/// row's x and q and the large row's p stay in registers; instead of p and the tail counts it
/// writes w0 = p on tail tokens (0 elsewhere), so the power sums need no mask, and it collects
/// the support itself (possible tokens with |d| > delta, in token order: log p and d into the
/// front of `support`'s two slices, at least n long; returns how many). No call may sit in
/// the loop: around one every vector register is spilled (a `Vec::push` made it 40% slower).
/// Every sum equals the separate kernels' bit for bit (tested). (Folding the power sums in too
/// ran 28% slower: 19 accumulators and the exponential's constants do not fit in 32 registers.)
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512vl,fma,avx2")]
pub(crate) fn avx512_front1(
    rows: [&[f32]; 3],
    reps: [f32; 2],
    maxes: [f64; 3],
    delta: f64,
    w0: &mut [f64],
    d: &mut [f64],
    support: (&mut [f64], &mut [f64]),
    sums: (&mut [f64; 8], &mut [f64; 8], &mut ExpertSums),
    tmax: &mut f64,
) -> usize {
    let [zl, zs, zt] = rows;
    let (sp, sd) = support;
    let n = zl
        .len()
        .min(zs.len())
        .min(zt.len())
        .min(w0.len())
        .min(d.len());
    let n = n.min(sp.len()).min(sd.len());
    let mut n_sup = 0;
    let (acc_z, acc_q, e) = sums;
    let [ml, ms, mt] = maxes.map(|x| _mm512_set1_pd(x));
    let (dv, ninf) = (_mm512_set1_pd(delta), _mm512_set1_pd(f64::NEG_INFINITY));
    // SAFETY: every array below holds eight f64.
    let ld = |a: &[f64; 8]| unsafe { _mm512_loadu_pd(a.as_ptr()) };
    let (mut z, mut qsum) = (ld(acc_z), ld(acc_q));
    let mut s = [
        ld(&e.acc[0]),
        ld(&e.acc[1]),
        ld(&e.acc[2]),
        ld(&e.acc[3]),
        ld(&e.acc[4]),
    ];
    let (mut mx, mut mx_all) = (ld(&e.amax), ld(&e.amax_all));
    let mut tmx = _mm512_setzero_pd();
    for (k, m) in masks(n) {
        // SAFETY: k + (lanes in m) <= n, within every slice.
        let (lz, sz, tz) = unsafe {
            (
                load_f32(zl.as_ptr().add(k), m),
                load_f32(zs.as_ptr().add(k), m),
                load_f32(zt.as_ptr().add(k), m),
            )
        };
        // large
        let o = _mm512_sub_pd(lz, ml);
        let pv = exp8(o);
        let possible = _mm512_cmp_pd_mask::<_CMP_GT_OQ>(o, ninf);
        z = _mm512_mask_add_pd(z, m, z, pv);
        // row
        let x = replaced(sz, reps[0] as f64);
        let q = exp8(_mm512_sub_pd(x, ms));
        qsum = _mm512_mask_add_pd(qsum, m, qsum, q);
        // expert
        let xt = replaced(tz, reps[1] as f64);
        let dd = _mm512_sub_pd(xt, x);
        let qt = exp8(_mm512_sub_pd(xt, mt));
        let ad = _mm512_abs_pd(dd);
        let far = _mm512_cmp_pd_mask::<_CMP_NLE_UQ>(ad, dv);
        s[0] = _mm512_mask_add_pd(s[0], m, s[0], qt);
        s[1] = _mm512_mask3_fmadd_pd(qt, dd, s[1], m);
        s[2] = _mm512_mask3_fmadd_pd(q, dd, s[2], m);
        s[3] = _mm512_mask3_fmadd_pd(pv, dd, s[3], m);
        s[4] = _mm512_mask3_fmadd_pd(pv, ad, s[4], m);
        mx = _mm512_mask_max_pd(mx, possible & m, mx, ad);
        mx_all = _mm512_mask_max_pd(mx_all, m, mx_all, ad);
        // The tail (possible, |d| <= delta) for the power sums; the support (possible, far).
        let in_tail = possible & !far & m;
        tmx = _mm512_mask_max_pd(tmx, in_tail, tmx, ad);
        // SAFETY: as above.
        unsafe {
            store(w0.as_mut_ptr().add(k), m, _mm512_maskz_mov_pd(in_tail, pv));
            store(d.as_mut_ptr().add(k), m, dd);
        }
        let mut out = (possible & far & m) as u32;
        if out != 0 && m == 0xff {
            // Eight tokens in full: compress in registers and store eight lanes at n_sup (past
            // the support they are overwritten later or ignored; n_sup <= k, so n_sup + 8 <=
            // k + 8 <= n). Real fine-tunes put most tokens in the support, where the bit loop
            // below cost a mispredicted branch per token. (A compress straight to memory is
            // microcoded on Zen 4.)
            // SAFETY: n_sup + 8 <= n, within both slices.
            unsafe {
                let om = out as __mmask8;
                _mm512_storeu_pd(sp.as_mut_ptr().add(n_sup), _mm512_maskz_compress_pd(om, o));
                _mm512_storeu_pd(sd.as_mut_ptr().add(n_sup), _mm512_maskz_compress_pd(om, dd));
            }
            n_sup += out.count_ones() as usize;
        } else if out != 0 {
            let (mut lpa, mut da) = ([0.0f64; 8], [0.0f64; 8]);
            // SAFETY: both arrays hold eight f64.
            unsafe {
                _mm512_storeu_pd(lpa.as_mut_ptr(), o);
                _mm512_storeu_pd(da.as_mut_ptr(), dd);
            }
            while out != 0 {
                let l = out.trailing_zeros() as usize;
                // n_sup < k + 8 <= n <= both lengths: the checks never fail (and a failed one
                // ends the call, so it costs no spill).
                sp[n_sup] = lpa[l];
                sd[n_sup] = da[l];
                n_sup += 1;
                out &= out - 1;
            }
        }
    }
    // SAFETY: every array below holds eight f64.
    let st = |a: &mut [f64; 8], v: __m512d| unsafe { _mm512_storeu_pd(a.as_mut_ptr(), v) };
    st(acc_z, z);
    st(acc_q, qsum);
    for (a, v) in e.acc.iter_mut().zip(s) {
        st(a, v);
    }
    st(&mut e.amax, mx);
    st(&mut e.amax_all, mx_all);
    *tmax = tmax.max(_mm512_reduce_max_pd(tmx));
    n_sup
}

/// `avx512_moments` on w0 = p masked to the tail (`avx512_front1`): the same products and sums
/// without the tail test (w0 = 0 elsewhere adds exact zeros: every power is built on w0, so a
/// huge d outside the tail never meets a 0 * inf).
#[target_feature(enable = "avx512f,avx512vl,fma,avx2")]
pub(crate) fn avx512_moments_w(w0: &[f64], d: &[f64], mom: &mut [[f64; 8]; ORDER + 1]) {
    let n = w0.len().min(d.len());
    // SAFETY: every array below holds eight f64.
    let mut s: [__m512d; ORDER + 1] =
        std::array::from_fn(|j| unsafe { _mm512_loadu_pd(mom[j].as_ptr()) });
    for (k, m) in masks(n) {
        // SAFETY: k + (lanes in m) <= n, within both slices.
        let (w0, dd) = unsafe { (load(w0.as_ptr().add(k), m), load(d.as_ptr().add(k), m)) };
        powers(&mut s, w0, dd);
    }
    for (a, v) in mom.iter_mut().zip(s) {
        // SAFETY: a holds eight f64.
        unsafe { _mm512_storeu_pd(a.as_mut_ptr(), v) };
    }
}

/// `powers` to order 16 (the wide tail): s_j += w0 d^j, j = 0..16, from d^2, d^4, d^8 and
/// w0 d^0..7, the last product of each sum fused into it.
#[target_feature(enable = "avx512f,avx512vl,fma,avx2")]
#[inline]
fn powers16(s: &mut [__m512d; WIDE_ORDER + 1], w0: __m512d, d: __m512d) {
    let d2 = _mm512_mul_pd(d, d);
    let d4 = _mm512_mul_pd(d2, d2);
    let d8 = _mm512_mul_pd(d4, d4);
    let w1 = _mm512_mul_pd(w0, d);
    let w2 = _mm512_mul_pd(w0, d2);
    let w3 = _mm512_mul_pd(w1, d2);
    let w4 = _mm512_mul_pd(w0, d4);
    let w5 = _mm512_mul_pd(w1, d4);
    let w6 = _mm512_mul_pd(w2, d4);
    let w7 = _mm512_mul_pd(w3, d4);
    let w8 = _mm512_mul_pd(w0, d8);
    s[0] = _mm512_add_pd(s[0], w0);
    s[1] = _mm512_fmadd_pd(w0, d, s[1]);
    s[2] = _mm512_fmadd_pd(w0, d2, s[2]);
    s[3] = _mm512_fmadd_pd(w1, d2, s[3]);
    s[4] = _mm512_fmadd_pd(w0, d4, s[4]);
    s[5] = _mm512_fmadd_pd(w1, d4, s[5]);
    s[6] = _mm512_fmadd_pd(w2, d4, s[6]);
    s[7] = _mm512_fmadd_pd(w3, d4, s[7]);
    s[8] = _mm512_fmadd_pd(w0, d8, s[8]);
    s[9] = _mm512_fmadd_pd(w1, d8, s[9]);
    s[10] = _mm512_fmadd_pd(w2, d8, s[10]);
    s[11] = _mm512_fmadd_pd(w3, d8, s[11]);
    s[12] = _mm512_fmadd_pd(w4, d8, s[12]);
    s[13] = _mm512_fmadd_pd(w5, d8, s[13]);
    s[14] = _mm512_fmadd_pd(w6, d8, s[14]);
    s[15] = _mm512_fmadd_pd(w7, d8, s[15]);
    s[16] = _mm512_fmadd_pd(w8, d8, s[16]);
}

/// `kernels::moments_wide`: over the tail (count 0) the power sums p d^j, j = 0..16, and the
/// largest |d|; d is zeroed outside the tail (d^8 of a huge d is inf, and 0 * inf is NaN).
#[target_feature(enable = "avx512f,avx512vl,fma,avx2")]
pub(crate) fn avx512_moments_wide(
    tail: &[f64],
    d: &[f64],
    p: &[f64],
    mom: &mut [[f64; 8]; WIDE_ORDER + 1],
    tmax: &mut f64,
) {
    let n = tail.len().min(d.len()).min(p.len());
    // SAFETY: every array below holds eight f64.
    let mut s: [__m512d; WIDE_ORDER + 1] =
        std::array::from_fn(|j| unsafe { _mm512_loadu_pd(mom[j].as_ptr()) });
    let mut mx = _mm512_setzero_pd();
    let zero = _mm512_setzero_pd();
    for (k, m) in masks(n) {
        // SAFETY: k + (lanes in m) <= n, within every slice.
        let (tv, dd, pv) = unsafe {
            (
                load(tail.as_ptr().add(k), m),
                load(d.as_ptr().add(k), m),
                load(p.as_ptr().add(k), m),
            )
        };
        let in_tail = _mm512_mask_cmp_pd_mask::<_CMP_EQ_OQ>(m, tv, zero);
        let dt = _mm512_maskz_mov_pd(in_tail, dd);
        powers16(&mut s, _mm512_maskz_mov_pd(in_tail, pv), dt);
        mx = _mm512_max_pd(mx, _mm512_abs_pd(dt));
    }
    for (a, v) in mom.iter_mut().zip(s) {
        // SAFETY: a holds eight f64.
        unsafe { _mm512_storeu_pd(a.as_mut_ptr(), v) };
    }
    *tmax = tmax.max(_mm512_reduce_max_pd(mx));
}

/// `avx512_moments_wide` on w0 = p masked to the tail (`avx512_front1`), d zeroed where w0 = 0.
#[target_feature(enable = "avx512f,avx512vl,fma,avx2")]
pub(crate) fn avx512_moments_wide_w(w0: &[f64], d: &[f64], mom: &mut [[f64; 8]; WIDE_ORDER + 1]) {
    let n = w0.len().min(d.len());
    // SAFETY: every array below holds eight f64.
    let mut s: [__m512d; WIDE_ORDER + 1] =
        std::array::from_fn(|j| unsafe { _mm512_loadu_pd(mom[j].as_ptr()) });
    let zero = _mm512_setzero_pd();
    for (k, m) in masks(n) {
        // SAFETY: k + (lanes in m) <= n, within both slices.
        let (w0, dd) = unsafe { (load(w0.as_ptr().add(k), m), load(d.as_ptr().add(k), m)) };
        let live = _mm512_cmp_pd_mask::<_CMP_NEQ_UQ>(w0, zero);
        powers16(&mut s, w0, _mm512_maskz_mov_pd(live, dd));
    }
    for (a, v) in mom.iter_mut().zip(s) {
        // SAFETY: a holds eight f64.
        unsafe { _mm512_storeu_pd(a.as_mut_ptr(), v) };
    }
}

#[cfg(test)]
mod tests;
