//! Drawing the next token from one row of fused f32 logits, after the solver and the fusion.
//!
//! Order (Hugging Face's warpers): temperature, top-k, top-p, min-p, renormalise, then an inverse
//! CDF with one uniform u over the kept tokens in ascending token order. Probabilities are in f64:
//! l = logit / temperature, p = exp(l - max) / sum. `temperature == 0` is greedy (argmax, lowest
//! index on ties) and draws nothing.
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

use crate::config::{Sampling, Seeds};
use crate::error::DlfError;
use crate::kl::fast_exp;
use crate::step::{check_matrix, scan_row, validate_sampling, validate_seeds};

/// Per-thread buffers reused across rows.
#[derive(Debug, Default)]
pub struct SampleScratch {
    l: Vec<f64>,
    p: Vec<f64>,
    sel: Vec<f64>,
    order: Vec<u32>,
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
        let mut rng = match self {
            RowSeeds::Stream(s) => {
                let mut r = ChaCha8Rng::seed_from_u64(*s);
                r.set_stream(row as u64);
                r
            }
            RowSeeds::PerRow(v) => ChaCha8Rng::seed_from_u64(v[row]),
        };
        (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
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
    let mut best = 0;
    for (i, &v) in z.iter().enumerate() {
        if v > z[best] {
            best = i;
        }
    }
    best
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
    let v = z.len();
    sc.l.clear();
    sc.l.extend(z.iter().map(|&x| x as f64 / s.temperature));
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

    let m = l.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    sc.p.clear();
    sc.p.extend(l.iter().map(|&x| fast_exp(x - m)));
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
        for &i in &sc.order[cut.max(1)..] {
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

    let total: f64 = p.iter().sum();
    let target = u() * total;
    let mut cum = 0.0;
    let mut last = 0;
    for (i, &x) in p.iter().enumerate() {
        if x > 0.0 {
            cum += x;
            last = i;
            if target < cum {
                return i;
            }
        }
    }
    last
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
    check_matrix("logits", logits.len(), batch, vocab)?;
    validate_sampling(sampling)?;
    validate_seeds(seeds, batch)?;
    if batch == 0 {
        return Ok(vec![]);
    }
    let row_seeds = RowSeeds::new(seeds);
    logits
        .par_chunks(vocab)
        .enumerate()
        .map_init(SampleScratch::default, |sc, (b, z)| {
            scan_row("logits", b, z)?;
            Ok(sample_row(z, sampling, || row_seeds.uniform(b), sc) as i64)
        })
        .collect()
}
