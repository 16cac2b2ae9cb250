//! Builds the f64 vectors the solver works on for one row: either the whole vocabulary, or the
//! sorted union of every model's top-k tokens plus one tail bucket holding, for each model, the
//! exact log-sum-exp of the logits left out. The bucket is just one more "token" to the solver, so
//! every KL over the reduced vectors is the KL between the coarsened distributions.
//!
//! -inf in the small model or an expert has already been mapped to that row's replacement value
//! (`ModelRow::rep`); -inf in the large model is kept (P(x) = 0).

use crate::numerics::passes::{filter_at_least, masked_exp_sum};
use crate::numerics::{fast_exp, with_simd};

use crate::validate::ModelRow;

/// Reduced vectors of one row, reused across rows on the same thread (no per-row allocation once
/// the buffers have grown to the vocabulary size).
#[derive(Debug, Default)]
pub struct Reduced {
    /// Number of support entries, tail bucket included.
    pub n: usize,
    pub zl: Vec<f64>,
    pub zs: Vec<f64>,
    /// Expert t occupies `zt[t * n..(t + 1) * n]`.
    pub zt: Vec<f64>,
    mask: Vec<bool>,
    sel: Vec<f32>,
    cand: Vec<(f32, usize)>,
    idx: Vec<usize>,
}

impl Reduced {
    pub(crate) fn heap_bytes(&self) -> usize {
        (self.zl.capacity() + self.zs.capacity() + self.zt.capacity()) * 8
            + self.mask.capacity()
            + self.sel.capacity() * 4
            + self.cand.capacity() * std::mem::size_of::<(f32, usize)>()
            + self.idx.capacity() * std::mem::size_of::<usize>()
    }

    pub fn expert(&self, t: usize) -> &[f64] {
        &self.zt[t * self.n..(t + 1) * self.n]
    }

    /// Fills the vectors from `large`, `small` and `experts` (all of length V). `support_k = None`
    /// or `k >= V` keeps the whole vocabulary (bit-identical to the unpruned path).
    pub fn fill(
        &mut self,
        large: ModelRow<'_>,
        small: ModelRow<'_>,
        experts: &[ModelRow<'_>],
        support_k: Option<usize>,
    ) {
        let v = large.z.len();
        let n_t = experts.len();
        match support_k {
            Some(k) if k < v => self.fill_pruned(large, small, experts, k),
            _ => {
                self.n = v;
                resize(&mut self.zl, v);
                resize(&mut self.zs, v);
                resize(&mut self.zt, v * n_t);
                with_simd(
                    #[inline(always)]
                    || {
                        widen(large, &mut self.zl);
                        widen(small, &mut self.zs);
                        for (e, dst) in experts.iter().zip(self.zt.chunks_exact_mut(v)) {
                            widen(*e, dst);
                        }
                    },
                );
            }
        }
    }

    fn fill_pruned(
        &mut self,
        large: ModelRow<'_>,
        small: ModelRow<'_>,
        experts: &[ModelRow<'_>],
        k: usize,
    ) {
        let v = large.z.len();
        if self.mask.len() != v {
            self.mask.clear();
            self.mask.resize(v, false);
        }
        self.idx.clear();
        let rows = std::iter::once(large)
            .chain(std::iter::once(small))
            .chain(experts.iter().copied());
        let mut maxes = [f64::NEG_INFINITY; 2];
        let mut expert_max = Vec::with_capacity(experts.len());
        for (m, row) in rows.enumerate() {
            let mx = mark_top_k(
                row,
                k,
                &mut self.mask,
                &mut self.idx,
                &mut self.sel,
                &mut self.cand,
            );
            match m {
                0 | 1 => maxes[m] = mx,
                _ => expert_max.push(mx),
            }
        }
        // Ascending token order: the solver then sums in the same order as the whole-vocabulary
        // path would over these tokens.
        self.idx.sort_unstable();
        let m = self.idx.len();
        let has_tail = m < v;
        let n = m + usize::from(has_tail);
        self.n = n;
        resize(&mut self.zl, n);
        resize(&mut self.zs, n);
        resize(&mut self.zt, n * experts.len());
        for (j, &i) in self.idx.iter().enumerate() {
            self.zl[j] = large.z[i] as f64;
            self.zs[j] = small.get(i) as f64;
        }
        for (t, e) in experts.iter().enumerate() {
            for (j, &i) in self.idx.iter().enumerate() {
                self.zt[t * n + j] = e.get(i) as f64;
            }
        }
        if has_tail {
            self.zl[m] = tail_lse(large, &self.mask, maxes[0]);
            self.zs[m] = tail_lse(small, &self.mask, maxes[1]);
            for (t, e) in experts.iter().enumerate() {
                self.zt[t * n + m] = tail_lse(*e, &self.mask, expert_max[t]);
            }
        }
        // Leave the mask all-false for the next row without an O(V) clear.
        for &i in &self.idx {
            self.mask[i] = false;
        }
    }
}

/// dst[i] = row.get(i) as f64, as one vectorisable map.
#[inline(always)]
fn widen(row: ModelRow<'_>, dst: &mut [f64]) {
    let rep = row.rep;
    for (o, &x) in dst.iter_mut().zip(row.z) {
        *o = (if x == f32::NEG_INFINITY { rep } else { x }) as f64;
    }
}

fn resize(v: &mut Vec<f64>, n: usize) {
    if v.len() != n {
        v.resize(n, 0.0);
    }
}

/// Marks the k largest logits of one model (ties at the threshold: lowest indices first), pushing
/// newly marked indices to `idx`; returns the row maximum (after the -inf replacement).
///
/// Hand-written because it runs on every model row at every step and a full selection over V
/// dominated the pruned path: a threshold guessed from a strided sample admits a few times k
/// candidates in one vectorisable pass (chunk maxima are compared first), and the exact k-th value
/// is then selected among the candidates only. When the guess admits fewer than k tokens (ties,
/// -inf, k close to V) the exact selection over the whole row is used instead; both give the same
/// set.
fn mark_top_k(
    row: ModelRow<'_>,
    k: usize,
    mask: &mut [bool],
    idx: &mut Vec<usize>,
    sel: &mut Vec<f32>,
    cand: &mut Vec<(f32, usize)>,
) -> f64 {
    if !candidates_above_guess(row, k, sel, cand) {
        cand.clear();
        cand.extend((0..row.z.len()).map(|i| (row.get(i), i)));
    }
    // Exact k-th largest among the candidates (which hold every token >= it, in index order).
    sel.clear();
    sel.extend(cand.iter().map(|c| c.0));
    let (_, thr, _) = sel.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    let thr = *thr;
    let above = cand.iter().filter(|c| c.0 > thr).count();
    let mut ties_left = k - above;
    let mut mx = f32::NEG_INFINITY;
    for &(x, i) in cand.iter() {
        mx = mx.max(x);
        let take = x > thr || (x == thr && ties_left > 0);
        if x == thr && take {
            ties_left -= 1;
        }
        if take && !mask[i] {
            mask[i] = true;
            idx.push(i);
        }
    }
    mx as f64
}

/// Fills `cand` with (value, index), in index order, of every token at or above a threshold
/// guessed from a strided sample; false when the guess is unusable (fewer than k tokens admitted,
/// or k too close to V for pruning by guess to pay off).
fn candidates_above_guess(
    row: ModelRow<'_>,
    k: usize,
    sample: &mut Vec<f32>,
    cand: &mut Vec<(f32, usize)>,
) -> bool {
    let v = row.z.len();
    if k.saturating_mul(16) > v {
        return false;
    }
    // About max(4k, 1024) samples; the expected number of true top-k tokens among them is
    // e = k n_s / V. Rank 1.5 e + 6 admits ~1.5k-2k candidates on LM-like rows and falls short of
    // k (exact fallback) only when the sample holds > 1.5 e + 6 of the top k (rare: e + 3.4 sd).
    let stride = (v / (4 * k).max(1024)).max(1);
    sample.clear();
    sample.extend(row.z.iter().step_by(stride).map(|&x| x.max(row.rep)));
    let n_s = sample.len();
    let rank = (3 * k * n_s).div_ceil(2 * v) + 6;
    if rank >= n_s {
        return false;
    }
    let (_, g, _) = sample.select_nth_unstable_by(rank - 1, |a, b| b.total_cmp(a));
    let g = *g;
    // A sampled -inf became `rep`; a guess that low would not match the raw comparison below.
    if !g.is_finite() || g <= row.rep {
        return false;
    }
    cand.clear();
    // -inf (and its replacement, below every finite value) is below any finite guess, so the
    // raw values can be compared.
    filter_at_least(row.z, g, cand);
    cand.len() >= k
}

/// log sum exp over the tokens outside the support, in f64 (-inf when they are all -inf).
/// One vectorised pass shifted by the row maximum `mx` with f32 exponentials (the bucket's logit
/// is then within ~1e-6 of exact, below the rounding of f32 logits of magnitude ~10); when that
/// underflows (a tail far below the maximum) the sum is redone in f64 shifted by the tail's own
/// maximum.
fn tail_lse(row: ModelRow<'_>, mask: &[bool], mx: f64) -> f64 {
    if mx.is_finite() {
        let s = masked_exp_sum(row.z, mask, row.rep, mx as f32);
        // Below this the f32 terms may have flushed to 0: redo it exactly in f64.
        if s > 1e-30 {
            return mx + s.ln();
        }
    }
    let mut tmx = f64::NEG_INFINITY;
    for (i, &m) in mask.iter().enumerate() {
        if !m {
            tmx = tmx.max(row.get(i) as f64);
        }
    }
    if tmx == f64::NEG_INFINITY {
        return tmx;
    }
    let mut s = 0.0;
    for (i, &m) in mask.iter().enumerate() {
        if !m {
            s += fast_exp(row.get(i) as f64 - tmx);
        }
    }
    tmx + s.ln()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kl::reference::log_sum_exp;

    fn mr(z: &[f32]) -> ModelRow<'_> {
        ModelRow::new(z, f32::NEG_INFINITY)
    }

    #[test]
    fn top_k_ties_take_lowest_indices() {
        let z = [1.0f32, 3.0, 2.0, 2.0, 2.0, 0.0];
        let mut mask = vec![false; z.len()];
        let (mut idx, mut sel, mut cand) = (Vec::new(), Vec::new(), Vec::new());
        let mx = mark_top_k(mr(&z), 3, &mut mask, &mut idx, &mut sel, &mut cand);
        assert_eq!(mask, [false, true, true, true, false, false]);
        assert_eq!(idx, [1, 2, 3]);
        assert_eq!(mx, 3.0);
    }

    /// The sampled-threshold path against a plain sort by (value desc, index asc), on rows with
    /// many ties, -inf entries and a replacement value, for k from 1 to V/16 (where it applies).
    #[test]
    fn fast_top_k_equals_sorting() {
        let mut next = crate::testing::xorshift(0x9E37_79B9_7F4A_7C15);
        let mut guessed = 0;
        for case in 0..60 {
            let v = 4096 + (next() % 5000) as usize;
            let levels = [8u64, 64, 100_000][case % 3];
            let z: Vec<f32> = (0..v)
                .map(|_| {
                    let r = next();
                    if r.is_multiple_of(97) {
                        f32::NEG_INFINITY
                    } else {
                        // heavy right tail, like LM logits; coarse levels make ties
                        let u = (r >> 11) % levels;
                        (u as f32 / levels as f32).powi(8) * 20.0
                    }
                })
                .collect();
            let rep = if case % 2 == 0 {
                f32::NEG_INFINITY
            } else {
                -50.0
            };
            let row = ModelRow::new(&z, rep);
            for k in [1usize, 5, 64, 256] {
                let (mut s, mut c) = (Vec::new(), Vec::new());
                guessed += usize::from(candidates_above_guess(row, k, &mut s, &mut c));
                let mut mask = vec![false; v];
                let (mut idx, mut sel, mut cand) = (Vec::new(), Vec::new(), Vec::new());
                mark_top_k(row, k, &mut mask, &mut idx, &mut sel, &mut cand);
                let mut order: Vec<usize> = (0..v).collect();
                order.sort_by(|&a, &b| row.get(b).total_cmp(&row.get(a)).then(a.cmp(&b)));
                let mut want = vec![false; v];
                for &i in &order[..k] {
                    want[i] = true;
                }
                assert_eq!(mask, want, "case {case} k {k}");
                idx.sort_unstable();
                let mut want_idx = order[..k].to_vec();
                want_idx.sort_unstable();
                assert_eq!(idx, want_idx);
            }
        }
        assert_eq!(guessed, 240, "the sampled guess should serve these rows");
        // A row whose largest values sit exactly on the sampled positions: the guess admits too
        // few tokens and the exact fallback must give the same set.
        let v = 32_000;
        let stride = v / 1024;
        let mut z: Vec<f32> = (0..v).map(|i| ((i * 7919) % 1000) as f32 * 0.001).collect();
        for j in 0..300 {
            z[j * stride] = 10.0 + j as f32 * 0.01;
        }
        let row = ModelRow::new(&z, f32::NEG_INFINITY);
        let (mut s, mut c) = (Vec::new(), Vec::new());
        assert!(!candidates_above_guess(row, 256, &mut s, &mut c));
        let mut mask = vec![false; v];
        let (mut idx, mut sel, mut cand) = (Vec::new(), Vec::new(), Vec::new());
        mark_top_k(row, 256, &mut mask, &mut idx, &mut sel, &mut cand);
        idx.sort_unstable();
        let want: Vec<usize> = (44..300).map(|j| j * stride).collect();
        assert_eq!(idx, want);
    }

    /// The shifted-by-row-max tail sum and its fallback agree with a direct log-sum-exp, including
    /// a tail that underflows relative to the row maximum.
    #[test]
    fn tail_lse_matches_direct_sum() {
        let mut z: Vec<f32> = (0..300).map(|i| ((i * 37) % 101) as f32 * 0.1).collect();
        let mask: Vec<bool> = (0..300).map(|i| i % 3 == 0).collect();
        let direct = |z: &[f32]| {
            let t: Vec<f64> = z
                .iter()
                .zip(&mask)
                .filter(|(_, &m)| !m)
                .map(|(&x, _)| x as f64)
                .collect();
            log_sum_exp(&t)
        };
        let mx = z.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
        // f32 exponentials: the bucket's logit is within ~1e-6 of the exact value.
        assert!((tail_lse(mr(&z), &mask, mx) - direct(&z)).abs() < 1e-6);
        // One masked token 1e30 above the rest: the shifted sum underflows, the fallback is exact.
        z[0] = 1e30;
        let got = tail_lse(mr(&z), &mask, 1e30);
        assert!((got - direct(&z)).abs() < 1e-12, "{got}");
        // Everything outside the support impossible: -inf.
        let z = [f32::NEG_INFINITY; 4];
        let m = [true, false, false, false];
        assert_eq!(tail_lse(mr(&z), &m, f64::NEG_INFINITY), f64::NEG_INFINITY);
    }

    #[test]
    fn pruned_support_and_tail_mass() {
        let l = [0.0f32, 5.0, 1.0, f32::NEG_INFINITY, 2.0];
        let s = [3.0f32, 0.0, 1.0, 2.0, 0.5];
        let e = [0.0f32, 0.0, 4.0, 0.0, 1.0];
        let mut r = Reduced::default();
        r.fill(mr(&l), mr(&s), &[mr(&e)], Some(1));
        // support {0 (small), 1 (large), 2 (expert)} + tail {3, 4}
        assert_eq!(r.n, 4);
        assert_eq!(&r.zl[..3], &[0.0, 5.0, 1.0]);
        assert!((r.zl[3] - 2.0).abs() < 1e-6); // exp(-inf) + exp(2), f32 exponentials
        assert!((r.zs[3] - log_sum_exp(&[2.0, 0.5])).abs() < 1e-6);
        // full mass preserved
        let full = log_sum_exp(&s.map(|x| x as f64));
        assert!((log_sum_exp(&r.zs) - full).abs() < 1e-6);
        // k >= V: whole vocabulary, no bucket
        r.fill(mr(&l), mr(&s), &[mr(&e)], Some(5));
        assert_eq!(r.n, 5);
        assert_eq!(r.zl[3], f64::NEG_INFINITY);
    }
}
