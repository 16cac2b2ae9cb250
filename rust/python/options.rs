//! `CoreOptions`: every step option as the core's types, built and checked once and then passed
//! whole to `fuse_step`, `fuse_verify` and `sample`.
//!
//! Where it sits: `dlf_rs.options.StepOptions` (the Python record) checks the Python types and
//! builds one `CoreOptions` in `__post_init__`; the constructor runs the core's value rules
//! (`validate::validate_options`, `validate_speculative`, `validate_speculative_penalties`), so a
//! call never re-parses or re-checks its options. What depends on the call's inputs stays with
//! the call: the count of static weights against the experts (the core's `validate_weights`).
//! The option names and their order are written here and in `_core.pyi` only.

use super::*;

/// The static weights as the caller gave them. One weight is broadcast to the call's experts
/// (`weights`), so one record serves any T; a list is checked against T by the core.
#[derive(Debug, Clone, PartialEq)]
enum Alpha {
    /// No static weights: DLF solves them per row.
    Solved,
    One(f64),
    PerExpert(Vec<f64>),
}

/// The caller's `alpha`; the types are checked by the Python record, the values here.
#[derive(FromPyObject)]
enum AlphaArg {
    One(f64),
    PerExpert(Vec<f64>),
}

/// The caller's `speculative`: a draft length or a name ("auto").
#[derive(FromPyObject)]
enum SpecArg {
    Len(i64),
    Name(String),
}

/// Every option of a decoding step, checked (module docs). Immutable, so one record is shared
/// by every call and thread that uses it.
#[pyclass(frozen, module = "dlf_rs._core")]
pub struct CoreOptions {
    alpha: Alpha,
    solver: SolverConfig,
    pub(super) sampling: Sampling,
    pub(super) penalties: Penalties,
    speculative: Speculative,
}

impl CoreOptions {
    /// The weights for a call with `n_experts` experts.
    pub(super) fn weights(&self, n_experts: usize) -> Weights {
        match &self.alpha {
            Alpha::Solved => Weights::Dynamic(self.solver.clone()),
            Alpha::One(a) => Weights::Static(vec![*a; n_experts]),
            Alpha::PerExpert(a) => Weights::Static(a.clone()),
        }
    }
}

#[pymethods]
impl CoreOptions {
    /// Every option is a required keyword (the defaults live in `DEFAULTS` only) but
    /// `speculative` (the generator's option, not the step's), which defaults to off. Checks run
    /// in the order `fuse_step` used: names and integer sizes, static weights, the solver's
    /// settings, sampling, penalties, then `speculative`.
    #[new]
    #[pyo3(signature = (
        *, alpha, alpha_min, alpha_max, grid_step, solver, multi_expert, support_k,
        temperature, top_k, top_p, min_p,
        repetition_penalty, frequency_penalty, presence_penalty, speculative=None,
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        alpha: Option<AlphaArg>,
        alpha_min: f64,
        alpha_max: f64,
        grid_step: f64,
        solver: &str,
        multi_expert: &str,
        support_k: Option<u64>,
        temperature: f64,
        top_k: u64,
        top_p: f64,
        min_p: f64,
        repetition_penalty: f64,
        frequency_penalty: f64,
        presence_penalty: f64,
        speculative: Option<SpecArg>,
    ) -> PyResult<Self> {
        guarded("CoreOptions", move || {
            let solver = SolverConfig {
                alpha_min,
                alpha_max,
                grid_step,
                solver: SolverKind::parse(solver).map_err(to_py)?,
                multi_expert: MultiExpert::parse(multi_expert).map_err(to_py)?,
                support_k: support_k
                    .map(|k| to_usize("support_k", k))
                    .transpose()
                    .map_err(to_py)?,
            };
            let sampling = Sampling {
                temperature,
                top_k: to_usize("top_k", top_k).map_err(to_py)?,
                top_p,
                min_p,
            };
            let penalties = Penalties {
                repetition: repetition_penalty,
                frequency: frequency_penalty,
                presence: presence_penalty,
            };
            let alpha = match alpha {
                None => Alpha::Solved,
                Some(AlphaArg::One(a)) => Alpha::One(a),
                Some(AlphaArg::PerExpert(a)) => Alpha::PerExpert(a),
            };
            let checked: Option<&[f64]> = match &alpha {
                Alpha::Solved => None,
                Alpha::One(a) => Some(std::slice::from_ref(a)),
                Alpha::PerExpert(a) => Some(a),
            };
            validate::validate_options(checked, &solver, &sampling, &penalties).map_err(to_py)?;
            let speculative = speculative_of(speculative)?;
            validate::validate_speculative(speculative).map_err(to_py)?;
            validate::validate_speculative_penalties(speculative, &penalties).map_err(to_py)?;
            Ok(CoreOptions {
                alpha,
                solver,
                sampling,
                penalties,
                speculative,
            })
        })
    }

    /// The static weights for `n_experts` experts (one weight repeated, or the list as given),
    /// None when DLF solves them: what `fuse_step` uses.
    fn static_alphas(&self, n_experts: usize) -> Option<Vec<f64>> {
        match self.weights(n_experts) {
            Weights::Static(a) => Some(a),
            Weights::Dynamic(_) => None,
        }
    }

    fn __repr__(&self) -> String {
        format!(
            "CoreOptions(alpha={:?}, solver={:?}, sampling={:?}, penalties={:?}, speculative={:?})",
            self.alpha, self.solver, self.sampling, self.penalties, self.speculative
        )
    }
}

fn speculative_of(arg: Option<SpecArg>) -> PyResult<Speculative> {
    Ok(match arg {
        None => Speculative::Off,
        Some(SpecArg::Len(k)) => match usize::try_from(k) {
            Ok(k) => Speculative::Fixed(k),
            // Negative: the same message as the range check, naming the value.
            Err(_) => {
                return Err(to_py(CoreError::invalid(
                    "speculative",
                    format!("None, a draft length in [1, {MAX_DRAFT_LEN}] or 'auto'"),
                    k,
                )))
            }
        },
        Some(SpecArg::Name(n)) => Speculative::parse(&n).map_err(to_py)?,
    })
}

/// The names of every value of an option's enum, in declaration order, from its first value and
/// an exhaustive successor: adding a value to the enum fails to compile until it is listed.
fn names<T: Copy>(
    first: T,
    next: fn(T) -> Option<T>,
    name: fn(T) -> &'static str,
) -> Vec<&'static str> {
    std::iter::successors(Some(first), |&v| next(v))
        .map(name)
        .collect()
}

/// `_core.MULTI_EXPERT_RULES`: the names `multi_expert` takes.
pub(super) fn multi_expert_rules() -> Vec<&'static str> {
    use MultiExpert::*;
    let next = |m| match m {
        OneActive => Some(Joint),
        Joint => Some(OwnTerms),
        OwnTerms => Some(MaxShift),
        MaxShift => None,
    };
    names(OneActive, next, MultiExpert::name)
}

/// `_core.SOLVERS`: the names `solver` takes.
pub(super) fn solvers() -> Vec<&'static str> {
    let next = |s| match s {
        SolverKind::Grid => Some(SolverKind::Exact),
        SolverKind::Exact => None,
    };
    names(SolverKind::Grid, next, SolverKind::name)
}
