//! What a caller asks of one decoding step. Plain data with its defaults (the single source the
//! Python layer reads through `dlf_rs._core.DEFAULTS`); validated in `validate`.

use crate::error::DlfError;

/// How the expert weights alpha are chosen.
#[derive(Debug, Clone, PartialEq)]
pub enum Weights {
    /// Dynamic Logit Fusion: alpha solved per row from the KL-matching objective J.
    Dynamic(SolverConfig),
    /// Fixed weights, one per expert (proxy-tuning is `Static(vec![1.0])`).
    Static(Vec<f64>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SolverKind {
    /// The paper's Algorithm 1: J on the grid alpha_min, alpha_min + step, ..., alpha_max.
    Grid,
    /// Bracketing by the monotone KLs plus Newton/Brent steps; never worse than `Grid`.
    Exact,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MultiExpert {
    /// The paper's rule for T > 1: one expert active per step, chosen by the same argmin.
    OneActive,
    /// J minimised over the whole vector alpha in [alpha_min, alpha_max]^T (projected Newton
    /// from the one-active winner): never a larger J than `OneActive`.
    Joint,
    /// One expert active, each candidate a * e_t scored by expert t's own two terms of J only.
    OwnTerms,
    /// One expert active: the one whose own distribution moved furthest from the small base at
    /// this step (largest KL(Q_t||Q) + KL(Q||Q_t)), weighted by single-expert DLF.
    MaxShift,
}

impl SolverKind {
    /// The name callers use (`solver="grid"`).
    pub fn name(self) -> &'static str {
        match self {
            SolverKind::Grid => "grid",
            SolverKind::Exact => "exact",
        }
    }

    /// Parses the caller's name; the error names the argument `solver`.
    pub fn parse(name: &str) -> Result<Self, DlfError> {
        match name {
            "grid" => Ok(SolverKind::Grid),
            "exact" => Ok(SolverKind::Exact),
            other => Err(DlfError::invalid(
                "solver",
                "'grid' or 'exact'",
                format!("{other:?}"),
            )),
        }
    }
}

impl MultiExpert {
    /// The name callers use (`multi_expert="one-active"`).
    pub fn name(self) -> &'static str {
        match self {
            MultiExpert::OneActive => "one-active",
            MultiExpert::Joint => "joint",
            MultiExpert::OwnTerms => "own-terms",
            MultiExpert::MaxShift => "max-shift",
        }
    }

    /// Parses the caller's name; the error names the argument `multi_expert`.
    pub fn parse(name: &str) -> Result<Self, DlfError> {
        match name {
            "one-active" => Ok(MultiExpert::OneActive),
            "joint" => Ok(MultiExpert::Joint),
            "own-terms" => Ok(MultiExpert::OwnTerms),
            "max-shift" => Ok(MultiExpert::MaxShift),
            other => Err(DlfError::invalid(
                "multi_expert",
                "'one-active', 'joint', 'own-terms' or 'max-shift'",
                format!("{other:?}"),
            )),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct SolverConfig {
    pub alpha_min: f64,
    pub alpha_max: f64,
    pub grid_step: f64,
    pub solver: SolverKind,
    pub multi_expert: MultiExpert,
    /// `None`: KLs over the full vocabulary. `Some(k)`: union of every model's top-k plus a tail.
    pub support_k: Option<usize>,
}

impl SolverConfig {
    /// Number of grid points, exactly as the numpy reference: n = floor((max - min) / step + 1e-9)
    /// + 1. A float so that validation can refuse absurd counts before any cast.
    pub fn grid_len(&self) -> f64 {
        ((self.alpha_max - self.alpha_min) / self.grid_step + 1e-9).floor() + 1.0
    }

    /// Grid value i: min(alpha_min + i * step, alpha_max).
    #[inline]
    pub fn grid_value(&self, i: usize) -> f64 {
        (self.alpha_min + i as f64 * self.grid_step).min(self.alpha_max)
    }
}

impl Default for SolverConfig {
    fn default() -> Self {
        SolverConfig {
            alpha_min: 0.0,
            alpha_max: 2.0,
            grid_step: 0.1,
            solver: SolverKind::Grid,
            multi_expert: MultiExpert::OneActive,
            support_k: None,
        }
    }
}

/// Token selection from the fused logits. `temperature == 0` is greedy (argmax, lowest index on
/// ties). `top_k == 0`, `top_p == 1`, `min_p == 0` disable their filters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    pub temperature: f64,
    pub top_k: usize,
    pub top_p: f64,
    pub min_p: f64,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
        }
    }
}

/// Penalties on the tokens a row has already seen (its history), applied to the fused logits
/// before `Sampling` (and before the greedy argmax); the weights never see them. Order, as
/// vLLM's: the repetition penalty first (Hugging Face's `RepetitionPenaltyLogitsProcessor`), then
/// the frequency and presence penalties (OpenAI's). The defaults switch every penalty off.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Penalties {
    /// > 0; 1 is off. A seen token's logit l becomes l / p when l > 0, else l * p.
    pub repetition: f64,
    /// In [-2, 2]; 0 is off. l -= frequency * (times the token was seen).
    pub frequency: f64,
    /// In [-2, 2]; 0 is off. l -= presence once per seen token.
    pub presence: f64,
}

impl Penalties {
    /// Whether any penalty changes a logit (and so a history is needed).
    pub fn active(&self) -> bool {
        self.repetition != 1.0 || self.frequency != 0.0 || self.presence != 0.0
    }
}

impl Default for Penalties {
    fn default() -> Self {
        Penalties {
            repetition: 1.0,
            frequency: 0.0,
            presence: 0.0,
        }
    }
}

/// Random seeds for sampling (ignored when greedy).
#[derive(Debug, Clone, PartialEq)]
pub enum Seeds {
    /// Fresh OS entropy: not reproducible.
    Entropy,
    /// One seed for the batch: row b draws from ChaCha8(seed) on stream b.
    One(u64),
    /// One seed per row: row b draws from ChaCha8(seeds[b]) on stream 0.
    PerRow(Vec<u64>),
}

/// Speculative DLF (the generator's `speculative` option): a draft proposes up to k tokens, every
/// model verifies them in one forward, `crate::verify` accepts or corrects them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Speculative {
    /// One large forward per token (sequential DLF).
    #[default]
    Off,
    /// Draft length k, 1 <= k <= `MAX_DRAFT_LEN`.
    Fixed(usize),
    /// Per row, drafting stops where the draft's top probability falls below a threshold (the
    /// drivers' rule, `python/dlf_rs/speculation.py`).
    Auto,
}

/// Longest draft accepted: beyond it a verification forward mostly computes rejected positions
/// (acceptance a gives at most 1 / (1 - a) tokens per verification; a = 0.9 gives 10).
pub const MAX_DRAFT_LEN: usize = 16;

impl Speculative {
    /// The name callers use for `Auto` (`speculative="auto"`); `None` for the others.
    pub fn name(self) -> Option<&'static str> {
        match self {
            Speculative::Auto => Some("auto"),
            _ => None,
        }
    }

    /// Parses the caller's name ("auto"); the error names the argument `speculative`.
    pub fn parse(name: &str) -> Result<Self, DlfError> {
        match name {
            "auto" => Ok(Speculative::Auto),
            other => Err(DlfError::invalid(
                "speculative",
                format!("None, a draft length in [1, {MAX_DRAFT_LEN}] or 'auto'"),
                format!("{other:?}"),
            )),
        }
    }
}
