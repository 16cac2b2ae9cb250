//! First in the flow: every rule on a step's options and inputs, and the per-row scan of the
//! logits (NaN / +inf refused, the value -inf stands for in each small-model and expert row). Each rule is written once here; `step`, `sample` and the Python binding's
//! `validate_options` all call these functions, so a message never differs between entry points.
//!
//! Rules (README.md, "Options": the table of fields and rules):
//! - static alpha: each finite with |alpha| <= `MAX_ABS_ALPHA` (the count is checked against T);
//! - alpha_range: finite, -`MAX_ABS_ALPHA` <= lo <= hi <= `MAX_ABS_ALPHA`;
//! - grid_step: finite > 0 and at most `MAX_GRID_POINTS` points on the range (bounds one call's
//!   work; `solver="exact"` is the way to precision);
//! - support_k: None or >= 1; top_p in (0, 1]; min_p in [0, 1]; temperature finite >= 0;
//! - repetition_penalty finite > 0; frequency_penalty and presence_penalty finite in [-2, 2]
//!   (OpenAI's and vLLM's range); speculative decoding with an active penalty is refused;
//! - integers from the caller arrive as u64 and must fit `usize`.

use crate::config::{
    Penalties, Sampling, Seeds, SolverConfig, Speculative, Weights, MAX_DRAFT_LEN,
};
use crate::error::DlfError;
use crate::numerics::passes::RowScan;

/// At most this many grid points per call: with B rows, V tokens and T experts a grid call does
/// O(points x B x V x T) work, so this caps it (10,001 = step 0.01 on [-50, 50]).
pub const MAX_GRID_POINTS: usize = 10_001;

/// Largest |alpha| accepted, static or as a bound of alpha_range. Beyond it the fused logits are
/// the expert difference alone, which is almost surely a mistake; it also keeps every weight far
/// inside f32 (a static 1e300 used to become inf).
pub const MAX_ABS_ALPHA: f64 = 100.0;

/// A float as Python's repr writes it (`1e300`, `0.1`), never 300 digits.
fn num(x: f64) -> String {
    format!("{x:?}")
}

/// Shapes of the three inputs: every array is `batch * vocab`, and `vocab > 0` when `batch > 0`.
pub(crate) fn validate_inputs(
    large: &[f32],
    small: &[f32],
    experts: &[&[f32]],
    b: usize,
    v: usize,
) -> Result<(), DlfError> {
    check_matrix("large", large.len(), b, v)?;
    check_matrix("small", small.len(), b, v)?;
    for (t, e) in experts.iter().enumerate() {
        check_matrix(&format!("experts[{t}]"), e.len(), b, v)?;
    }
    Ok(())
}

pub(crate) fn shape(arg: &str, expected: String, got_len: usize) -> DlfError {
    DlfError::Shape {
        arg: arg.to_string(),
        expected,
        got: format!("{got_len} elements"),
    }
}

pub(crate) fn check_matrix(arg: &str, len: usize, b: usize, v: usize) -> Result<(), DlfError> {
    let want = b.checked_mul(v);
    if b > 0 && v == 0 {
        return Err(DlfError::Shape {
            arg: arg.to_string(),
            expected: format!("[{b}, vocab > 0]"),
            got: format!("[{b}, 0]"),
        });
    }
    if want != Some(len) {
        return Err(shape(
            arg,
            format!("[{b}, {v}] ({} elements)", b.saturating_mul(v)),
            len,
        ));
    }
    Ok(())
}

/// A caller's integer (u64 at the binding) as `usize`; refused by name where it does not fit.
pub fn to_usize(arg: &str, x: u64) -> Result<usize, DlfError> {
    usize::try_from(x).map_err(|_| {
        DlfError::invalid(
            arg,
            format!(
                "an int that fits this platform's usize (< {})",
                usize::MAX as u128 + 1
            ),
            x,
        )
    })
}

/// Values of static weights (not their count, which depends on T).
pub fn validate_static_alpha(alpha: &[f64]) -> Result<(), DlfError> {
    validate_weight_values("alpha", alpha.iter().copied())
}

/// Every weight finite with |w| <= `MAX_ABS_ALPHA`: static `alpha` and `fuse_logits`' `alphas`.
pub(crate) fn validate_weight_values(
    arg: &str,
    mut values: impl Iterator<Item = f64>,
) -> Result<(), DlfError> {
    if let Some(x) = values.find(|x| !(x.is_finite() && x.abs() <= MAX_ABS_ALPHA)) {
        return Err(DlfError::invalid(
            arg,
            format!("finite values with |{arg}| <= {MAX_ABS_ALPHA}"),
            num(x),
        ));
    }
    Ok(())
}

pub(crate) fn validate_weights(weights: &Weights, n_t: usize) -> Result<(), DlfError> {
    match weights {
        Weights::Static(a) => {
            if a.len() != n_t {
                return Err(DlfError::invalid(
                    "alpha",
                    format!("{n_t} static weights (one per expert)"),
                    format!("{} values", a.len()),
                ));
            }
            validate_static_alpha(a)
        }
        Weights::Dynamic(cfg) => {
            if n_t == 0 {
                return Err(DlfError::invalid(
                    "experts",
                    "at least one expert for dynamic weights",
                    "0 experts",
                ));
            }
            validate_solver(cfg)
        }
    }
}

pub fn validate_solver(cfg: &SolverConfig) -> Result<(), DlfError> {
    let (lo, hi) = (cfg.alpha_min, cfg.alpha_max);
    let in_bounds = |x: f64| x.is_finite() && x.abs() <= MAX_ABS_ALPHA;
    if !(in_bounds(lo) && in_bounds(hi) && lo <= hi) {
        return Err(DlfError::invalid(
            "alpha_range",
            format!(
                "finite (alpha_min, alpha_max) with -{MAX_ABS_ALPHA} <= alpha_min <= alpha_max \
                 <= {MAX_ABS_ALPHA}"
            ),
            format!("({}, {})", num(lo), num(hi)),
        ));
    }
    if !(cfg.grid_step.is_finite() && cfg.grid_step > 0.0) {
        return Err(DlfError::invalid(
            "grid_step",
            "a finite value > 0",
            num(cfg.grid_step),
        ));
    }
    let n = cfg.grid_len();
    if n.is_nan() || n > MAX_GRID_POINTS as f64 {
        return Err(DlfError::invalid(
            "grid_step",
            format!(
                "at most {MAX_GRID_POINTS} grid points on alpha_range (use solver=\"exact\" for \
                 precision)"
            ),
            format!(
                "{n} points for step {} on [{}, {}]",
                num(cfg.grid_step),
                num(lo),
                num(hi)
            ),
        ));
    }
    if cfg.support_k == Some(0) {
        return Err(DlfError::invalid("support_k", "None or an int >= 1", 0));
    }
    Ok(())
}

pub fn validate_sampling(s: &Sampling) -> Result<(), DlfError> {
    if !(s.temperature.is_finite() && s.temperature >= 0.0) {
        return Err(DlfError::invalid(
            "temperature",
            "a finite value >= 0",
            num(s.temperature),
        ));
    }
    if !(s.top_p > 0.0 && s.top_p <= 1.0) {
        return Err(DlfError::invalid(
            "top_p",
            "a value in (0, 1]",
            num(s.top_p),
        ));
    }
    if !(s.min_p >= 0.0 && s.min_p <= 1.0) {
        return Err(DlfError::invalid(
            "min_p",
            "a value in [0, 1]",
            num(s.min_p),
        ));
    }
    Ok(())
}

/// Largest |frequency_penalty| and |presence_penalty| (OpenAI's and vLLM's bound).
pub const MAX_ABS_PENALTY: f64 = 2.0;

pub fn validate_penalties(p: &Penalties) -> Result<(), DlfError> {
    if !(p.repetition.is_finite() && p.repetition > 0.0) {
        return Err(DlfError::invalid(
            "repetition_penalty",
            "a finite number > 0 (1 is off)",
            num(p.repetition),
        ));
    }
    for (arg, x) in [
        ("frequency_penalty", p.frequency),
        ("presence_penalty", p.presence),
    ] {
        if !(x.is_finite() && x.abs() <= MAX_ABS_PENALTY) {
            return Err(DlfError::invalid(
                arg,
                format!("a finite number in [-{MAX_ABS_PENALTY}, {MAX_ABS_PENALTY}] (0 is off)"),
                num(x),
            ));
        }
    }
    Ok(())
}

pub(crate) fn validate_seeds(seeds: &Seeds, batch: usize) -> Result<(), DlfError> {
    if let Seeds::PerRow(v) = seeds {
        if v.len() != batch {
            return Err(DlfError::invalid(
                "seed",
                format!("{batch} per-row seeds"),
                format!("{} seeds", v.len()),
            ));
        }
    }
    Ok(())
}

/// Every option of a step at once, in the order `fuse_step` checks them: static weights (when
/// given), the solver's settings, sampling, penalties. The binding's `CoreOptions` constructor and
/// `fuse_step` both call this, so an options record validated once is valid for every call.
pub fn validate_options(
    alpha: Option<&[f64]>,
    cfg: &SolverConfig,
    sampling: &Sampling,
    penalties: &Penalties,
) -> Result<(), DlfError> {
    if let Some(a) = alpha {
        validate_static_alpha(a)?;
    }
    validate_solver(cfg)?;
    validate_sampling(sampling)?;
    validate_penalties(penalties)
}

/// Speculative verification does not apply penalties (each drafted position would need the
/// row's history extended by the draft before it), so the two are refused together, naming
/// `speculative`, rather than verified against logits the sequential step would not sample.
pub fn validate_speculative_penalties(
    spec: Speculative,
    penalties: &Penalties,
) -> Result<(), DlfError> {
    if spec != Speculative::Off && penalties.active() {
        let got = match spec {
            Speculative::Fixed(k) => k.to_string(),
            _ => "'auto'".to_string(),
        };
        return Err(DlfError::invalid(
            "speculative",
            "None when repetition_penalty != 1, frequency_penalty != 0 or presence_penalty != 0 \
             (speculative verification does not apply penalties)",
            got,
        ));
    }
    Ok(())
}

/// The `speculative` option: a draft length in [1, `MAX_DRAFT_LEN`] (`Fixed`) or `Auto`.
pub fn validate_speculative(spec: Speculative) -> Result<(), DlfError> {
    if let Speculative::Fixed(k) = spec {
        if !(1..=MAX_DRAFT_LEN).contains(&k) {
            return Err(DlfError::invalid(
                "speculative",
                format!("None, a draft length in [1, {MAX_DRAFT_LEN}] or 'auto'"),
                k,
            ));
        }
    }
    Ok(())
}

/// One model's logits for one row and the value its -inf entries stand for.
#[derive(Debug, Clone, Copy)]
pub struct ModelRow<'a> {
    pub z: &'a [f32],
    /// Replacement for -inf (row minimum minus 30); -inf itself for the large model.
    pub rep: f32,
    /// The row's largest value with -inf read as `rep` (from the validation pass).
    pub max: f32,
}

impl<'a> ModelRow<'a> {
    /// A row with its maximum computed here (tests build rows without the validation pass).
    #[cfg(test)]
    pub fn new(z: &'a [f32], rep: f32) -> Self {
        let max = z.iter().fold(rep, |m, &x| if x > m { x } else { m });
        ModelRow { z, rep, max }
    }

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

/// Scans one row of each model and returns the rows with their -inf replacements.
#[allow(clippy::type_complexity)]
pub(crate) fn scan_models<'a>(
    large: &'a [f32],
    small: &'a [f32],
    experts: &[&'a [f32]],
    v: usize,
    b: usize,
) -> Result<(ModelRow<'a>, ModelRow<'a>, Vec<ModelRow<'a>>), DlfError> {
    let span = b * v..(b + 1) * v;
    // A model row with its -inf replacement (smallest finite logit minus 30) and maximum.
    let model_row = |z: &'a [f32], s: RowScan| {
        let rep = s.min - 30.0;
        ModelRow {
            z,
            rep,
            max: s.max.max(rep),
        }
    };
    let large = &large[span.clone()];
    let s = scan_row_named(|| "large".to_string(), b, large)?;
    let large = ModelRow {
        z: large,
        rep: f32::NEG_INFINITY,
        max: s.max,
    };
    let z = &small[span.clone()];
    let small = model_row(z, scan_row_named(|| "small".to_string(), b, z)?);
    let mut rows = Vec::with_capacity(experts.len());
    for (t, e) in experts.iter().enumerate() {
        let z = &e[span.clone()];
        rows.push(model_row(
            z,
            scan_row_named(|| format!("experts[{t}]"), b, z)?,
        ));
    }
    Ok((large, small, rows))
}

/// Checks one row (NaN / +inf are errors, at least one finite value) and returns the value -inf
/// stands for in that row: its smallest finite logit minus 30 (f32 arithmetic).
pub(crate) fn scan_row(model: &str, row: usize, z: &[f32]) -> Result<f32, DlfError> {
    scan_row_named(|| model.to_string(), row, z).map(|s| s.min - 30.0)
}

/// The validation pass over one row, its errors named.
fn scan_row_named(model: impl Fn() -> String, row: usize, z: &[f32]) -> Result<RowScan, DlfError> {
    let scan = crate::numerics::passes::scan(z);
    let RowScan { min, bad, .. } = scan;
    if bad {
        // The vectorised pass saw NaN or +inf; find it for the message. If it is gone, another
        // thread wrote to the array during the call (the binding documents that as an error).
        return Err(
            match z
                .iter()
                .enumerate()
                .find(|(_, x)| x.is_nan() || **x == f32::INFINITY)
            {
                Some((token, &value)) => DlfError::NonFinite {
                    model: model(),
                    row,
                    token,
                    value,
                },
                None => DlfError::InputChanged { arg: model(), row },
            },
        );
    }
    if min == f32::INFINITY {
        return Err(DlfError::NoFiniteLogit {
            model: model(),
            row,
        });
    }
    Ok(scan)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_rules() {
        assert!(validate_static_alpha(&[100.0, -100.0, 0.0]).is_ok());
        for bad in [100.5, -1e300, 1e300, f64::NAN, f64::INFINITY] {
            assert!(matches!(validate_static_alpha(&[0.0, bad]),
                Err(DlfError::InvalidArgument { ref arg, .. }) if arg == "alpha"));
        }
        let range = |lo, hi| SolverConfig {
            alpha_min: lo,
            alpha_max: hi,
            ..Default::default()
        };
        assert!(validate_solver(&range(-100.0, 100.0)).is_ok()); // 2001 points at step 0.1
        for (lo, hi) in [(-1e300, -1e300), (-101.0, 0.0), (0.0, 100.5), (1.0, 0.0)] {
            assert!(matches!(validate_solver(&range(lo, hi)),
                Err(DlfError::InvalidArgument { ref arg, .. }) if arg == "alpha_range"));
        }
        let pts = |lo: f64, hi: f64, step: f64| SolverConfig {
            alpha_min: lo,
            alpha_max: hi,
            grid_step: step,
            ..Default::default()
        };
        assert!(validate_solver(&pts(-50.0, 50.0, 0.01)).is_ok()); // exactly 10,001 points
        assert!(matches!(validate_solver(&pts(-50.0, 50.0, 0.0099)),
            Err(DlfError::InvalidArgument { ref arg, .. }) if arg == "grid_step"));
        assert_eq!(to_usize("top_k", 7), Ok(7));
        for ok in [Speculative::Off, Speculative::Auto, Speculative::Fixed(1)] {
            assert!(validate_speculative(ok).is_ok());
        }
        assert!(validate_speculative(Speculative::Fixed(MAX_DRAFT_LEN)).is_ok());
        let p = |repetition, frequency, presence| Penalties {
            repetition,
            frequency,
            presence,
        };
        for ok in [p(1.0, 0.0, 0.0), p(1e-9, 2.0, -2.0), p(50.0, -2.0, 2.0)] {
            assert!(validate_penalties(&ok).is_ok());
        }
        let bad_p = [
            (
                p(0.0, 0.0, 0.0),
                "repetition_penalty: expected a finite number > 0 (1 is off), got 0.0",
            ),
            (p(-1.0, 0.0, 0.0), "repetition_penalty:"),
            (p(f64::INFINITY, 0.0, 0.0), "repetition_penalty:"),
            (p(f64::NAN, 0.0, 0.0), "repetition_penalty:"),
            (
                p(1.0, 2.5, 0.0),
                "frequency_penalty: expected a finite number in [-2, 2] (0 is off), got 2.5",
            ),
            (p(1.0, f64::NAN, 0.0), "frequency_penalty:"),
            (p(1.0, 0.0, -2.01), "presence_penalty:"),
        ];
        for (bad, msg) in bad_p {
            let e = validate_penalties(&bad).unwrap_err().to_string();
            assert!(e.starts_with(msg), "{e}");
        }
        let on = p(1.1, 0.0, 0.0);
        assert!(validate_speculative_penalties(Speculative::Off, &on).is_ok());
        assert!(validate_speculative_penalties(Speculative::Auto, &p(1.0, 0.0, 0.0)).is_ok());
        for spec in [Speculative::Auto, Speculative::Fixed(3)] {
            assert!(matches!(validate_speculative_penalties(spec, &on),
                Err(DlfError::InvalidArgument { ref arg, .. }) if arg == "speculative"));
        }
        for bad in [0, MAX_DRAFT_LEN + 1] {
            assert!(matches!(validate_speculative(Speculative::Fixed(bad)),
                Err(DlfError::InvalidArgument { ref arg, .. }) if arg == "speculative"));
        }
    }
}
