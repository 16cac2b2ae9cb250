//! Between fusion and the sampler: penalties on the tokens each row has already seen (logits
//! processors, in text-generation-inference's terms), applied to the fused logits before
//! temperature / top-k / top-p / min-p and before the greedy argmax. The solver never sees them:
//! the weights, J and the KLs use the raw logits.
//!
//! Per distinct token id in the row's history, with c its count there, in this order (vLLM's):
//! 1. repetition (Hugging Face's `RepetitionPenaltyLogitsProcessor`): l = l * p if l < 0, else
//!    l / p;
//! 2. frequency and presence (OpenAI's): l = l - frequency * c, then l = l - presence.
//!
//! Arithmetic in f32 with the penalties rounded to f32 once, operation by operation as written
//! (no FMA), so Hugging Face's processor and a numpy reference on f32 logits agree bit for bit.
//! -inf stays -inf. A finite logit stays finite: a result beyond the f32 range (a tiny repetition
//! penalty, a large count) saturates to +-f32::MAX, as `fuse` does, so the row keeps a finite
//! maximum for the sampler.

use crate::config::Penalties;
use crate::error::DlfError;

/// Every row's history, ragged: row b is `tokens[offsets[b]..offsets[b + 1]]`. Negative ids are
/// padding and skipped, so a `[B, L]` array padded with -1 is its own `tokens` with offsets
/// 0, L, 2L, ..., B * L (no copy). Checked by `check` before any row is read.
#[derive(Debug, Clone, Copy)]
pub struct History<'a> {
    pub tokens: &'a [i64],
    pub offsets: &'a [usize],
}

impl<'a> History<'a> {
    /// The row offsets must be `batch + 1` non-decreasing values from 0 to `tokens.len()`, and
    /// every id below `vocab`. Errors name `history` (structure) or `history[b]` (an id).
    pub fn check(&self, batch: usize, vocab: usize) -> Result<(), DlfError> {
        let off = self.offsets;
        if off.len() != batch + 1 {
            return Err(DlfError::Shape {
                arg: "history".into(),
                expected: format!("{batch} rows (one token sequence per row)"),
                got: format!("{} rows", off.len().saturating_sub(1)),
            });
        }
        let ordered = off.windows(2).all(|w| w[0] <= w[1]);
        if off[0] != 0 || !ordered || off[batch] != self.tokens.len() {
            return Err(DlfError::invalid(
                "history",
                format!(
                    "row offsets that start at 0, never decrease and end at the token count {}",
                    self.tokens.len()
                ),
                format!("{off:?}"),
            ));
        }
        for b in 0..batch {
            if let Some((i, &t)) = self
                .row(b)
                .iter()
                .enumerate()
                .find(|(_, &t)| t >= vocab as i64)
            {
                return Err(DlfError::invalid(
                    &format!("history[{b}]"),
                    format!("token ids < {vocab} (the vocabulary size; negative ids are padding)"),
                    format!("{t} at position {i}"),
                ));
            }
        }
        Ok(())
    }

    /// Row b's token ids (padding included). Only after `check`.
    #[inline]
    pub fn row(&self, b: usize) -> &'a [i64] {
        &self.tokens[self.offsets[b]..self.offsets[b + 1]]
    }
}

/// The history a call must apply: `None` when no penalty is active (then `history` is ignored,
/// unchecked), else the checked history; an active penalty without one is an error naming
/// `history`.
pub fn resolve_history<'h, 'a>(
    penalties: &Penalties,
    history: Option<&'h History<'a>>,
    batch: usize,
    vocab: usize,
) -> Result<Option<&'h History<'a>>, DlfError> {
    if !penalties.active() {
        return Ok(None);
    }
    let Some(h) = history else {
        return Err(DlfError::invalid(
            "history",
            "the tokens each row has seen (a list of B sequences or a [B, L] int array) when \
             repetition_penalty != 1, frequency_penalty != 0 or presence_penalty != 0",
            "None",
        ));
    };
    h.check(batch, vocab)?;
    Ok(Some(h))
}

/// Per-thread token counts over the vocabulary, all zero between calls (each call resets the
/// entries it touched), so a row costs O(history), not O(V), after the first.
#[derive(Debug, Default)]
pub struct SeenCounts(Vec<u32>);

impl SeenCounts {
    pub(crate) fn heap_bytes(&self) -> usize {
        self.0.capacity() * std::mem::size_of::<u32>()
    }
}

/// Applies `p` to one row's logits `z` in place for the ids in `seen` (each < `z.len()` or
/// negative: padding). See the module docs for the arithmetic.
pub fn apply_penalties(z: &mut [f32], seen: &[i64], p: &Penalties, counts: &mut SeenCounts) {
    let counts = &mut counts.0;
    if counts.len() < z.len() {
        counts.resize(z.len(), 0);
    }
    for &t in seen {
        if t >= 0 {
            counts[t as usize] = counts[t as usize].saturating_add(1);
        }
    }
    // Rounded to f32 once, as torch does with a Python float; kept inside (0, inf] so that no
    // 0 / 0 or 0 * inf can appear (only a repetition_penalty below 1.4e-45 is moved).
    let rep = (p.repetition as f32).max(f32::from_bits(1));
    let (freq, pres) = (p.frequency as f32, p.presence as f32);
    for &t in seen {
        if t < 0 {
            continue;
        }
        let i = t as usize;
        // Taking the count marks the id done: its later occurrences are skipped.
        let c = std::mem::take(&mut counts[i]);
        let l = z[i];
        if c == 0 || l == f32::NEG_INFINITY {
            continue;
        }
        let mut x = l;
        if p.repetition != 1.0 {
            x = if x < 0.0 { x * rep } else { x / rep };
        }
        if freq != 0.0 {
            x -= freq * c as f32;
        }
        if pres != 0.0 {
            x -= pres;
        }
        z[i] = x.clamp(-f32::MAX, f32::MAX);
    }
}

#[cfg(test)]
mod tests;
