//! The summary pass of the certified default: one blocked pass over a row's logits that keeps
//! the exact targets, the normaliser, the support (tokens beyond delta, exactly) and the tail's
//! power sums (`Summary`). What it holds and which slack covers which rounding is described in
//! the parent (`solver/certified.rs`), which decides from it.

use super::*;

/// What the summary pass keeps of one row.
#[derive(Debug, Default, Clone)]
pub(super) struct Summary {
    pub(super) n_vocab: usize,
    pub(super) n_sup: usize,
    /// The large row's maximum: p_v = exp(z_L - ml) (`full_kls` reuses it).
    pub(super) ml: f64,
    /// sum p (all tokens), sum p over the tail, sum p d_t and sum p |d_t| (all tokens).
    pub(super) z: f64,
    pub(super) pd: Vec<f64>,
    pub(super) pabsd: Vec<f64>,
    /// Per expert: S_0..S_order over the tail (S_0 shared), largest |d_t| in the tail; `order` is
    /// ORDER (narrow tail) or WIDE_ORDER (wide tail).
    pub(super) mom: Vec<[f64; WIDE_ORDER + 1]>,
    pub(super) order: usize,
    pub(super) tail_absmax: Vec<f64>,
    /// Largest |d_t| over every token with P > 0, per expert, and over every token.
    pub(super) absmax: Vec<f64>,
    pub(super) absmax_all: Vec<f64>,
    pub(super) targets_b: Vec<f64>,
    pub(super) targets_c: Vec<f64>,
    /// Magnitude scale of each target's rounding (|lse_t| + |lse_s| + max |d_t|).
    pub(super) target_scale: Vec<f64>,
}

/// Lane sums over a block: LANES independent accumulators (vectorisable, fixed order).
#[inline(always)]
pub(super) fn lanes_add(acc: &mut [f64; LANES], v: &[f64]) {
    let ch = v.chunks_exact(LANES);
    let rest = ch.remainder();
    for c in ch {
        for l in 0..LANES {
            acc[l] += c[l];
        }
    }
    for (l, &x) in rest.iter().enumerate() {
        acc[l] += x;
    }
}

#[inline(always)]
pub(super) fn total(a: &[f64; LANES]) -> f64 {
    ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]))
}

/// The first ORDER + 1 power sums' accumulators.
pub(super) fn narrow(m: &mut [[f64; LANES]; WIDE_ORDER + 1]) -> &mut [[f64; LANES]; ORDER + 1] {
    (&mut m[..ORDER + 1])
        .try_into()
        .expect("ORDER < WIDE_ORDER")
}

/// The summary pass; `delta` is the tail's bound on |d|, `WIDE` picks the tail's order
/// (WIDE_ORDER, else ORDER). None when the support is too large (the narrow pass also gives up
/// after its first block when that block's support passes SWITCH_FRACTION: the wide pass is
/// then tried).
pub(super) fn summarize<const WIDE: bool>(
    large: ModelRow<'_>,
    small: ModelRow<'_>,
    experts: &[ModelRow<'_>],
    delta: f64,
    max_frac: f64,
    sc: &mut CertScratch,
) -> Option<Summary> {
    // A constant, so that each form compiles without the other's branches in its loop.
    let wide = WIDE;
    let v = large.z.len();
    let n_t = experts.len();
    let max_sup = ((v as f64) * max_frac) as usize + 1;
    // The rows' maxima come from the validation pass (-inf read as the row's replacement).
    let ml = large.max as f64;
    let ms = small.max as f64;
    let mts: Vec<f64> = experts.iter().map(|e| e.max as f64).collect();
    for b in [
        &mut sc.bp,
        &mut sc.bl,
        &mut sc.bzs,
        &mut sc.bq,
        &mut sc.tail,
    ] {
        b.resize(BLOCK, 0.0);
    }
    sc.bd.resize(BLOCK * n_t, 0.0);
    sc.sp.clear();
    sc.sd.clear();

    let mut z = [0.0; LANES];
    let mut qsum = [0.0; LANES];
    let mut qtsum = vec![[0.0; LANES]; n_t];
    let mut qtd = vec![[0.0; LANES]; n_t];
    let mut qd = vec![[0.0; LANES]; n_t];
    let mut pd = vec![[0.0; LANES]; n_t];
    let mut pabsd = vec![[0.0; LANES]; n_t];
    let mut mom = vec![[[0.0; LANES]; WIDE_ORDER + 1]; n_t];
    let mut tail_absmax = vec![0.0f64; n_t];
    let mut absmax = vec![0.0f64; n_t];
    let mut absmax_all = vec![0.0f64; n_t];
    let mut too_big = false;
    let mut sums = vec![kernels::ExpertSums::default(); n_t];

    // Give up as soon as the support passes the cap, or, from an eighth of the row on, once it
    // is on course for 1.5 times the cap (token ids carry no order, so the share seen so far
    // predicts the rest): a row that cannot be certified then costs an eighth of a pass more
    // than the full scan instead of most of one. Only speed depends on this.
    let give_up = |n_sup: usize, seen: usize| {
        let projected = n_sup as f64 * v as f64 / seen as f64;
        n_sup > max_sup
            || (8 * seen >= v && projected > 1.5 * max_sup as f64)
            || (!wide && seen <= BLOCK && n_sup as f64 > SWITCH_FRACTION * seen as f64)
    };
    let mut j0 = 0;
    while j0 < v {
        let len = BLOCK.min(v - j0);
        let (bp, bl, bzs, bq, tail) = (
            &mut sc.bp[..len],
            &mut sc.bl[..len],
            &mut sc.bzs[..len],
            &mut sc.bq[..len],
            &mut sc.tail[..len],
        );
        // One expert under AVX-512: the block in two loops (`avx512_front1`, then the power
        // sums), the same values as the kernels below.
        #[cfg(target_arch = "x86_64")]
        if n_t == 1 && crate::numerics::has_avx512() {
            let (r, e) = (j0..j0 + len, &experts[0]);
            let bd = &mut sc.bd[..len];
            // The block's support (log p, d) lands in bl and bq, which this path leaves unused.
            // SAFETY: AVX-512 detected above.
            let n_sup = unsafe {
                let n_sup = kernels512::avx512_front1(
                    [&large.z[r.clone()], &small.z[r.clone()], &e.z[r]],
                    [small.rep, e.rep],
                    [ml, ms, mts[0]],
                    delta,
                    bp,
                    bd,
                    (bl, bq),
                    (&mut z, &mut qsum, &mut sums[0]),
                    &mut tail_absmax[0],
                );
                if wide {
                    kernels512::avx512_moments_wide_w(bp, bd, &mut mom[0]);
                } else {
                    kernels512::avx512_moments_w(bp, bd, narrow(&mut mom[0]));
                }
                n_sup
            };
            sc.sp.extend_from_slice(&bl[..n_sup]);
            sc.sd.extend_from_slice(&bq[..n_sup]);
            j0 += len;
            if give_up(sc.sp.len(), j0) {
                too_big = true;
                break;
            }
            continue;
        }
        // -inf - ml is -inf and fast_exp gives 0 below -708: impossible tokens get p = 0.
        simd_dispatch!(
            avx512: kernels512::avx512_large(&large.z[j0..j0 + len], ml, bl, bp, tail, &mut z),
            avx2: kernels::avx2_large(&large.z[j0..j0 + len], ml, bl, bp, tail, &mut z),
            portable: kernels::large(&large.z[j0..j0 + len], ml, bl, bp, tail, &mut z),
        );
        simd_dispatch!(
            avx512: kernels512::avx512_row(&small.z[j0..j0 + len], small.rep, ms, bzs, bq, &mut qsum),
            avx2: kernels::avx2_row(&small.z[j0..j0 + len], small.rep, ms, bzs, bq, &mut qsum),
            portable: kernels::row(&small.z[j0..j0 + len], small.rep, ms, bzs, bq, &mut qsum),
        );
        // `tail` counts why a token is outside the tail: z_L = -inf, or |d_t| > delta for an
        // expert t. The tail is where it is 0. Possible tokens outside it form the support,
        // whatever their p (a p that underflowed can still carry weight p e^{a d} when d is large).
        for (t, e) in experts.iter().enumerate() {
            let bd = &mut sc.bd[t * BLOCK..t * BLOCK + len];
            let zt = &e.z[j0..j0 + len];
            let sums = &mut sums[t];
            simd_dispatch!(
                avx512: kernels512::avx512_expert(zt, e.rep, mts[t], bzs, bd, bq, bp, bl, tail, delta, sums),
            avx2: kernels::avx2_expert(zt, e.rep, mts[t], bzs, bd, bq, bp, bl, tail, delta, sums),
                portable: kernels::expert(zt, e.rep, mts[t], bzs, bd, bq, bp, bl, tail, delta, sums),
            );
        }
        for t in 0..n_t {
            let bd = &sc.bd[t * BLOCK..t * BLOCK + len];
            let (m, tm) = (&mut mom[t], &mut tail_absmax[t]);
            if wide {
                simd_dispatch!(
                    avx512: kernels512::avx512_moments_wide(tail, bd, bp, m, tm),
                    avx2: kernels::avx2_moments_wide(tail, bd, bp, m, tm),
                    portable: kernels::moments_wide(tail, bd, bp, m, tm),
                );
            } else {
                let m = narrow(m);
                simd_dispatch!(
                    avx512: kernels512::avx512_moments(tail, bd, bp, m, tm),
                    avx2: kernels::avx2_moments(tail, bd, bp, m, tm),
                    portable: kernels::moments(tail, bd, bp, m, tm),
                );
            }
        }
        // The block's support tokens (possible, outside the tail), found eight at a time.
        sc.idx.clear();
        let idx = &mut sc.idx;
        simd_dispatch!(
            avx512: kernels::avx512_outside(tail, bl, idx),
            avx2: kernels::avx2_outside(tail, bl, idx),
            portable: kernels::outside(tail, bl, idx),
        );
        for &k in sc.idx.iter() {
            let k = k as usize;
            sc.sp.push(bl[k]);
            for t in 0..n_t {
                sc.sd.push(sc.bd[t * BLOCK + k]);
            }
        }
        j0 += len;
        if give_up(sc.sp.len(), j0) {
            too_big = true;
            break;
        }
    }
    for (t, sm) in sums.iter().enumerate() {
        qtsum[t] = sm.acc[0];
        qtd[t] = sm.acc[1];
        qd[t] = sm.acc[2];
        pd[t] = sm.acc[3];
        pabsd[t] = sm.acc[4];
        absmax[t] = sm.amax.iter().copied().fold(0.0, f64::max);
        absmax_all[t] = sm.amax_all.iter().copied().fold(0.0, f64::max);
    }
    if too_big {
        return None;
    }
    let lse_s = ms + total(&qsum).ln();
    let mut s = Summary {
        n_vocab: v,
        n_sup: sc.sp.len(),
        ml,
        z: total(&z),
        pd: pd.iter().map(total).collect(),
        pabsd: pabsd.iter().map(total).collect(),
        mom: mom
            .iter()
            .map(|m| {
                let mut o = [0.0; WIDE_ORDER + 1];
                for (k, a) in m.iter().enumerate() {
                    o[k] = total(a);
                }
                o
            })
            .collect(),
        order: if wide { WIDE_ORDER } else { ORDER },
        tail_absmax,
        absmax,
        absmax_all,
        ..Default::default()
    };
    for t in 0..n_t {
        let st = total(&qtsum[t]);
        let lse_t = mts[t] + st.ln();
        let e_qt = total(&qtd[t]) / st;
        let e_q = total(&qd[t]) / total(&qsum);
        s.targets_b.push((e_qt - lse_t + lse_s).max(0.0));
        s.targets_c.push((lse_t - lse_s - e_q).max(0.0));
        s.target_scale
            .push(lse_t.abs() + lse_s.abs() + s.absmax_all[t]);
    }
    Some(s)
}
