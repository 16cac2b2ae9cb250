//! Drawing the next token from one row of fused f32 logits, after the solver, the fusion and
//! the penalties on seen tokens (`penalty`; only when the caller asks for them).
//!
//! Order (Hugging Face's warpers): temperature, top-k, top-p, min-p, renormalise, then an inverse
//! CDF with one uniform u over the kept tokens in ascending token order. Probabilities are in f64:
//! l = (logit - max logit) / temperature, p = exp(l) / sum. Subtracting the max before dividing
//! keeps every l in [-inf, 0] with l = 0 at the maxima, so any finite temperature > 0, however
//! small (even subnormal), gives a valid distribution: one that underflows to the tied maxima is
//! exactly "uniform over the tied maxima", the greedy-like limit (README.md, "Options"). -inf logits get
//! p = 0 and are never drawn. `temperature == 0` is greedy (argmax, lowest index on ties) and
//! draws nothing.
//!
//! Randomness: ChaCha8, u = (next_u64 >> 11) * 2^-53. `Seeds::One(s)`: row b uses seed s on
//! stream b; `Seeds::PerRow(v)`: row b uses seed v[b] on stream 0; `Seeds::Entropy`: one seed per
//! call from std's `RandomState` (randomly keyed by the OS per process, bumped per call) mixed
//! with the clock, then streams as for `One`. That avoids a getrandom dependency; it is not meant
//! to be cryptographic, only unpredictable between calls.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};

use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};

use rayon::prelude::*;

use crate::cancel::Cancel;
use crate::config::{Penalties, Sampling, Seeds};
use crate::error::DlfError;
use crate::numerics::{fast_exp, with_simd};
use crate::penalty::{apply_penalties, resolve_history, History, SeenCounts};
use crate::validate::{
    check_matrix, scan_row, validate_penalties, validate_sampling, validate_seeds,
};

/// Per-thread buffers reused across rows.
#[derive(Debug, Default)]
pub struct SampleScratch {
    l: Vec<f64>,
    p: Vec<f64>,
    sel: Vec<f64>,
    order: Vec<u32>,
    /// Token counts of the row's history (`penalty`).
    pub(crate) seen: SeenCounts,
    /// `sample_batch`'s copy of a row to penalise (its input is read-only).
    row: Vec<f32>,
}

impl SampleScratch {
    /// The kept tokens' unnormalised probabilities left by the last `warp` (0 where filtered).
    pub(crate) fn probs(&self) -> &[f64] {
        &self.p
    }

    pub(crate) fn heap_bytes(&self) -> usize {
        (self.l.capacity() + self.p.capacity() + self.sel.capacity()) * 8
            + (self.order.capacity() + self.row.capacity()) * 4
            + self.seen.heap_bytes()
    }
}

/// The seed and stream a row draws from; resolves `Entropy` once per call.
#[derive(Debug, Clone)]
pub enum RowSeeds<'a> {
    Stream(u64),
    PerRow(&'a [u64]),
}

impl<'a> RowSeeds<'a> {
    pub fn new(seeds: &'a Seeds) -> Self {
        match seeds {
            Seeds::One(s) => RowSeeds::Stream(*s),
            Seeds::PerRow(v) => RowSeeds::PerRow(v),
            Seeds::Entropy => RowSeeds::Stream(entropy_seed()),
        }
    }

    /// The one uniform in [0, 1) that row b consumes.
    pub fn uniform(&self, row: usize) -> f64 {
        next_uniform(&mut self.rng(row))
    }

    /// Row b's generator; its first uniform is `uniform(row)`. Speculative verification draws
    /// several uniforms from it in turn.
    pub fn rng(&self, row: usize) -> ChaCha8Rng {
        match self {
            RowSeeds::Stream(s) => {
                let mut r = ChaCha8Rng::seed_from_u64(*s);
                r.set_stream(row as u64);
                r
            }
            RowSeeds::PerRow(v) => ChaCha8Rng::seed_from_u64(v[row]),
        }
    }
}

/// The next uniform in [0, 1) of `rng`: (next_u64 >> 11) * 2^-53.
pub fn next_uniform(rng: &mut ChaCha8Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

fn entropy_seed() -> u64 {
    let mut h = RandomState::new().build_hasher();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    h.write_u128(nanos);
    h.finish()
}

/// Greedy: the first index holding the maximum (NaN never reaches here: validated).
pub fn argmax(z: &[f32]) -> usize {
    if z.len() > u32::MAX as usize {
        // Lane indices are u32; a row this long keeps the plain scan.
        let mx = z
            .iter()
            .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
        return z.iter().position(|&x| x == mx).unwrap_or(0);
    }
    with_simd(
        #[inline(always)]
        || {
            // One vectorisable pass: per lane the maximum and the index where it first occurs
            // (a strict > keeps the earliest), then the lowest index among the lanes holding the
            // overall maximum; ties go to the lowest index, as a left-to-right scan would. (The
            // search for the first index equal to the maximum cannot vectorise: it was as slow
            // as the rest of the row's sampling.)
            const W: usize = 16;
            let mut m = [f32::NEG_INFINITY; W];
            let mut id = [0u32; W];
            let chunks = z.chunks_exact(W);
            let rest = chunks.remainder();
            let full = z.len() - rest.len();
            for (ci, c) in chunks.enumerate() {
                let base = (ci * W) as u32;
                for l in 0..W {
                    let gt = c[l] > m[l];
                    m[l] = if gt { c[l] } else { m[l] };
                    id[l] = if gt { base + l as u32 } else { id[l] };
                }
            }
            let (mut bv, mut bi) = (f32::NEG_INFINITY, usize::MAX);
            for l in 0..W {
                if m[l] > bv || (m[l] == bv && (id[l] as usize) < bi) {
                    (bv, bi) = (m[l], id[l] as usize);
                }
            }
            for (j, &x) in rest.iter().enumerate() {
                if x > bv || (x == bv && full + j < bi) {
                    (bv, bi) = (x, full + j);
                }
            }
            if bi == usize::MAX {
                0
            } else {
                bi
            }
        },
    )
}

/// The token for one row. `u` is only called when the row is not greedy.
pub fn sample_row(
    z: &[f32],
    s: &Sampling,
    u: impl FnOnce() -> f64,
    sc: &mut SampleScratch,
) -> usize {
    if s.temperature == 0.0 {
        return argmax(z);
    }
    warp(z, s, sc);
    let p = &sc.p;
    let total: f64 = p.iter().sum();
    let target = u() * total;
    let mut cum = 0.0;
    // Kept tokens always include a maximum (p = 1), so `last` is set; the argmax is only a guard.
    let mut last = None;
    for (i, &x) in p.iter().enumerate() {
        if x > 0.0 {
            cum += x;
            last = Some(i);
            if target < cum {
                return i;
            }
        }
    }
    last.unwrap_or_else(|| argmax(z))
}

/// Temperature, top-k, top-p, min-p: leaves the kept tokens' unnormalised probabilities in
/// `sc.p` (0 for filtered tokens).
pub(crate) fn warp(z: &[f32], s: &Sampling, sc: &mut SampleScratch) {
    let v = z.len();
    // The row holds a finite value (validated), so zmax is finite and every l is <= 0 or -inf.
    let zmax = z
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a }) as f64;
    sc.l.clear();
    sc.l.extend(z.iter().map(|&x| (x as f64 - zmax) / s.temperature));
    let l = &mut sc.l;

    if s.top_k > 0 && s.top_k < v {
        sc.sel.clear();
        sc.sel.extend_from_slice(l);
        let (_, kth, _) = sc
            .sel
            .select_nth_unstable_by(s.top_k - 1, |a, b| b.total_cmp(a));
        let thr = *kth;
        for x in l.iter_mut() {
            if *x < thr {
                *x = f64::NEG_INFINITY;
            }
        }
    }

    sc.p.clear();
    sc.p.extend(l.iter().map(|&x| fast_exp(x)));
    let p = &mut sc.p;

    if s.top_p < 1.0 {
        let total: f64 = p.iter().sum();
        sc.order.clear();
        sc.order
            .extend((0..v as u32).filter(|&i| p[i as usize] > 0.0));
        sc.order
            .sort_unstable_by(|&a, &b| p[b as usize].total_cmp(&p[a as usize]).then(a.cmp(&b)));
        let need = s.top_p * total;
        let mut cum = 0.0;
        let mut cut = sc.order.len();
        for (r, &i) in sc.order.iter().enumerate() {
            cum += p[i as usize];
            if cum >= need {
                cut = r + 1;
                break;
            }
        }
        for &i in &sc.order[cut.max(1).min(sc.order.len())..] {
            p[i as usize] = 0.0;
        }
    }

    if s.min_p > 0.0 {
        let pmax = p.iter().copied().fold(0.0, f64::max);
        let floor = s.min_p * pmax;
        for x in p.iter_mut() {
            if *x < floor {
                *x = 0.0;
            }
        }
    }
}

/// Draws one token per row from `logits` (`batch * vocab`, row-major) alone, e.g. for the
/// "large only" or "expert only" baselines. Validates like `fuse_step` (argument name `logits`).
pub fn sample_batch(
    logits: &[f32],
    batch: usize,
    vocab: usize,
    sampling: &Sampling,
    seeds: &Seeds,
) -> Result<Vec<i64>, DlfError> {
    sample_batch_with_cancel(logits, batch, vocab, sampling, seeds, Cancel::NEVER)
}

/// `sample_batch` that stops with `DlfError::Cancelled` soon after `cancel` is set.
pub fn sample_batch_with_cancel(
    logits: &[f32],
    batch: usize,
    vocab: usize,
    sampling: &Sampling,
    seeds: &Seeds,
    cancel: Cancel<'_>,
) -> Result<Vec<i64>, DlfError> {
    let off = Penalties::default();
    sample_batch_penalized(logits, batch, vocab, sampling, &off, None, seeds, cancel)
}

/// `sample_batch` with penalties on each row's `history` applied to a copy of the row before
/// drawing (`penalty`): the same token `fuse_step` draws from those logits. `history` is needed
/// when a penalty is active and ignored otherwise.
#[allow(clippy::too_many_arguments)]
pub fn sample_batch_penalized(
    logits: &[f32],
    batch: usize,
    vocab: usize,
    sampling: &Sampling,
    penalties: &Penalties,
    history: Option<&History<'_>>,
    seeds: &Seeds,
    cancel: Cancel<'_>,
) -> Result<Vec<i64>, DlfError> {
    check_matrix("logits", logits.len(), batch, vocab)?;
    validate_sampling(sampling)?;
    validate_penalties(penalties)?;
    let history = resolve_history(penalties, history, batch, vocab)?;
    validate_seeds(seeds, batch)?;
    if batch == 0 {
        return Ok(vec![]);
    }
    let row_seeds = RowSeeds::new(seeds);
    logits
        .par_chunks(vocab)
        .enumerate()
        .map_init(SampleScratch::default, |sc, (b, z)| {
            cancel.check()?;
            scan_row("logits", b, z)?;
            let u = || row_seeds.uniform(b);
            let Some(h) = history else {
                return Ok(sample_row(z, sampling, u, sc) as i64);
            };
            let mut row = std::mem::take(&mut sc.row);
            row.clear();
            row.extend_from_slice(z);
            apply_penalties(&mut row, h.row(b), penalties, &mut sc.seen);
            let token = sample_row(&row, sampling, u, sc);
            sc.row = row;
            Ok(token as i64)
        })
        .collect()
}

#[cfg(test)]
mod tests;
