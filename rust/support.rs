//! Builds the f64 vectors the solver works on for one row: either the whole vocabulary, or the
//! sorted union of every model's top-k tokens plus one tail bucket holding, for each model, the
//! exact log-sum-exp of the logits left out. The bucket is just one more "token" to the solver, so
//! every KL over the reduced vectors is the KL between the coarsened distributions.
//!
//! -inf in the small model or an expert has already been mapped to that row's replacement value
//! (`ModelRow::rep`); -inf in the large model is kept (P(x) = 0).

use crate::kl::fast_exp;

/// One model's logits for one row and the value its -inf entries stand for.
#[derive(Debug, Clone, Copy)]
pub struct ModelRow<'a> {
    pub z: &'a [f32],
    /// Replacement for -inf (row minimum minus 30); -inf itself for the large model.
    pub rep: f32,
}

impl ModelRow<'_> {
    #[inline(always)]
    pub fn get(&self, i: usize) -> f32 {
        let v = self.z[i];
        if v == f32::NEG_INFINITY {
            self.rep
        } else {
            v
        }
    }
}

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
    idx: Vec<usize>,
}

impl Reduced {
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
                for i in 0..v {
                    self.zl[i] = large.z[i] as f64;
                    self.zs[i] = small.get(i) as f64;
                }
                for (t, e) in experts.iter().enumerate() {
                    let dst = &mut self.zt[t * v..(t + 1) * v];
                    for (i, o) in dst.iter_mut().enumerate() {
                        *o = e.get(i) as f64;
                    }
                }
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
        self.mask.clear();
        self.mask.resize(v, false);
        mark_top_k(large, k, &mut self.mask, &mut self.sel);
        mark_top_k(small, k, &mut self.mask, &mut self.sel);
        for e in experts {
            mark_top_k(*e, k, &mut self.mask, &mut self.sel);
        }
        self.idx.clear();
        self.idx.extend((0..v).filter(|&i| self.mask[i]));
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
            self.zl[m] = tail_lse(large, &self.mask);
            self.zs[m] = tail_lse(small, &self.mask);
            for (t, e) in experts.iter().enumerate() {
                self.zt[t * n + m] = tail_lse(*e, &self.mask);
            }
        }
    }
}

fn resize(v: &mut Vec<f64>, n: usize) {
    if v.len() != n {
        v.resize(n, 0.0);
    }
}

/// Marks the k largest logits of one model (ties at the threshold: lowest indices first).
fn mark_top_k(row: ModelRow<'_>, k: usize, mask: &mut [bool], sel: &mut Vec<f32>) {
    let v = row.z.len();
    sel.clear();
    sel.extend((0..v).map(|i| row.get(i)));
    let (_, thr, _) = sel.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    let thr = *thr;
    let above = (0..v).filter(|&i| row.get(i) > thr).count();
    let mut ties_left = k - above;
    for (i, m) in mask.iter_mut().enumerate() {
        let x = row.get(i);
        if x > thr {
            *m = true;
        } else if x == thr && ties_left > 0 {
            *m = true;
            ties_left -= 1;
        }
    }
}

/// log sum exp over the tokens outside the support, in f64 (-inf when they are all -inf).
fn tail_lse(row: ModelRow<'_>, mask: &[bool]) -> f64 {
    let mut mx = f64::NEG_INFINITY;
    for (i, &m) in mask.iter().enumerate() {
        if !m {
            mx = mx.max(row.get(i) as f64);
        }
    }
    if mx == f64::NEG_INFINITY {
        return mx;
    }
    let mut s = 0.0;
    for (i, &m) in mask.iter().enumerate() {
        if !m {
            s += fast_exp(row.get(i) as f64 - mx);
        }
    }
    mx + s.ln()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kl::log_sum_exp;

    fn mr(z: &[f32]) -> ModelRow<'_> {
        ModelRow {
            z,
            rep: f32::NEG_INFINITY,
        }
    }

    #[test]
    fn top_k_ties_take_lowest_indices() {
        let z = [1.0f32, 3.0, 2.0, 2.0, 2.0, 0.0];
        let mut mask = vec![false; z.len()];
        let mut sel = Vec::new();
        mark_top_k(mr(&z), 3, &mut mask, &mut sel);
        assert_eq!(mask, [false, true, true, true, false, false]);
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
        assert!((r.zl[3] - 2.0).abs() < 1e-15); // exp(-inf) + exp(2)
        assert!((r.zs[3] - log_sum_exp(&[2.0, 0.5])).abs() < 1e-15);
        // full mass preserved
        let full = log_sum_exp(&s.map(|x| x as f64));
        assert!((log_sum_exp(&r.zs) - full).abs() < 1e-14);
        // k >= V: whole vocabulary, no bucket
        r.fill(mr(&l), mr(&s), &[mr(&e)], Some(5));
        assert_eq!(r.n, 5);
        assert_eq!(r.zl[3], f64::NEG_INFINITY);
    }
}
