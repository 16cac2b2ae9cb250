//! The Python face of the core (module `dlf_rs._core`): the only file that touches PyO3.
//!
//! Over 500 lines on purpose: it is one concern, the whole Python boundary (argument extraction,
//! the result class, panic and signal handling), and splitting it would spread PyO3 over the core.
//!
//! `python/dlf_rs/step.py` (with `arrays.py` and `options.py`) converts what the caller passes
//! (numpy arrays, torch tensors, lists) into C-contiguous float32 numpy arrays and checks types;
//! this file borrows those arrays without copying, checks that their shapes agree, releases the
//! GIL for the whole computation and maps `DlfError` to the Python exception `dlf_rs.DlfError`
//! (a `ValueError` subclass).
//!
//! Guarantees at this boundary:
//! - No panic reaches Python. Every core entry point returns `Result`; as the last line, each
//!   `#[pyfunction]` body runs under `catch_unwind` (`guarded`, and `run_core` for the worker
//!   thread) and a caught panic becomes one `DlfInternalError` per call. The panic hook installed
//!   at import stays quiet for panics inside a dlf_rs call (see `install_quiet_panic_hook`), so a
//!   panic in every one of 100,000 rows prints nothing instead of 100,000 messages.
//! - Ctrl-C stops a long call (`run_core`): the work runs on a scoped worker thread while the
//!   calling thread, detached, wakes every 50 ms to run the signal handlers; on KeyboardInterrupt
//!   it sets the core's cancellation flag (checked between rows and between groups of grid points)
//!   and raises once the worker has stopped, typically a few milliseconds later.
//! - Inputs are borrowed without copying while the GIL is released. Another thread writing to an
//!   input array during a call is not supported: when the core notices (a value the validation
//!   pass saw as NaN/+inf is gone) the call raises `DlfError` saying the input changed during the
//!   call; otherwise the result is computed from a mix of old and new values. It never panics.

use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Mutex, Once};
use std::time::Duration;

use numpy::{
    PyArray1, PyArray2, PyArray3, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray2,
    PyReadonlyArray3, PyUntypedArrayMethods,
};
use pyo3::create_exception;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::cancel::Cancel;
use crate::config::{
    MultiExpert, Penalties, Sampling, Seeds, SolverConfig, SolverKind, Speculative, Weights,
    MAX_DRAFT_LEN,
};
use crate::error::DlfError as CoreError;
use crate::penalty::History;
use crate::step::{StepInputs, StepOutput};
use crate::validate::{self, to_usize, MAX_ABS_ALPHA, MAX_GRID_POINTS};
use crate::verify::{VerifyInputs, VerifyOutput};

create_exception!(
    dlf_rs,
    DlfError,
    PyValueError,
    "Invalid input to the dlf_rs decode core; the message names the argument, the expected and \
     the actual value or shape."
);

create_exception!(
    dlf_rs,
    DlfInternalError,
    DlfError,
    "A bug in the dlf_rs decode core (a caught Rust panic); the message says how to report it."
);

fn to_py(err: CoreError) -> PyErr {
    DlfError::new_err(err.to_string())
}

// ---- The last line of defence: panics, and the interruptible runner ----

/// Number of dlf_rs calls in flight (process-wide) and whether this thread is running one.
static CALLS_IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);
thread_local! {
    static IN_CALL: Cell<bool> = const { Cell::new(false) };
}
/// The first caught panic's message with its location, taken by the call that reports it.
static FIRST_PANIC: Mutex<Option<String>> = Mutex::new(None);

/// Installs, once per process, a panic hook that stays quiet for panics raised inside a dlf_rs
/// call (on the calling thread, the worker thread, or a rayon worker while a call is in flight)
/// and records the first one's message and location for the `DlfInternalError`; every other
/// panic goes to the previous hook unchanged. Chosen over a hook swapped around each call because
/// `set_hook` is process-global: swapping it per call would race between concurrent calls and
/// with other extensions. The cost: while a dlf_rs call runs, a panic of some other library on
/// a rayon worker thread of the global pool is not printed (it still propagates as usual).
fn install_quiet_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let ours = IN_CALL.with(|c| c.get())
                || (CALLS_IN_FLIGHT.load(Ordering::SeqCst) > 0
                    && rayon::current_thread_index().is_some());
            if !ours {
                return prev(info);
            }
            if let Ok(mut slot) = FIRST_PANIC.lock() {
                if slot.is_none() {
                    let loc = info
                        .location()
                        .map(|l| format!(" at {}:{}", l.file(), l.line()))
                        .unwrap_or_default();
                    *slot = Some(format!("{}{loc}", payload_text(info.payload())));
                }
            }
        }));
    });
}

fn payload_text(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_string()
    }
}

fn internal_error(func: &str, payload: &(dyn std::any::Any + Send)) -> PyErr {
    let recorded = FIRST_PANIC.lock().ok().and_then(|mut s| s.take());
    let msg = recorded.unwrap_or_else(|| payload_text(payload));
    DlfInternalError::new_err(format!(
        "internal error in dlf_rs {func} (a bug): {msg}; please report it with the inputs' shapes"
    ))
}

/// Marks this thread as inside a dlf_rs call for the quiet hook, for the guard's lifetime.
struct InCall {
    was: bool,
}

impl InCall {
    fn enter() -> Self {
        CALLS_IN_FLIGHT.fetch_add(1, Ordering::SeqCst);
        InCall {
            was: IN_CALL.with(|c| c.replace(true)),
        }
    }
}

impl Drop for InCall {
    fn drop(&mut self) {
        IN_CALL.with(|c| c.set(self.was));
        CALLS_IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Runs a `#[pyfunction]` body; a panic in it becomes one `DlfInternalError`.
fn guarded<R>(func: &str, body: impl FnOnce() -> PyResult<R>) -> PyResult<R> {
    let _in_call = InCall::enter();
    catch_unwind(AssertUnwindSafe(body)).unwrap_or_else(|p| Err(internal_error(func, &*p)))
}

/// Below this estimate of a call's work (logit reads x passes, see the callers) the core runs
/// on the calling thread: such a call takes about 11 ms at most (the full-vocabulary grid just
/// under this estimate, B = 16, V = 32000, T = 4, measured 12 ms on two cores), so Ctrl-C is
/// served promptly anyway, and a decode step is spared the ~20-50 us of starting a worker
/// thread. It was 2^22, which sent every B = 8, T = 1 step (0.7 ms) to a new thread.
const INLINE_WORK: u64 = 1 << 24;

/// How often the detached calling thread wakes to run Python's signal handlers.
const SIGNAL_POLL: Duration = Duration::from_millis(50);

/// Runs the core work `work` with the GIL released. Small calls run inline; large ones run on a
/// scoped worker thread while this thread polls for signals every `SIGNAL_POLL`: on
/// KeyboardInterrupt (or any exception a signal handler raises) it sets the cancellation flag,
/// waits for the worker to stop (it checks the flag between rows and between groups of grid
/// points) and raises that exception. A panic in the work becomes one `DlfInternalError`.
fn run_core<R: Send>(
    py: Python<'_>,
    func: &str,
    work_estimate: u64,
    work: impl FnOnce(Cancel<'_>) -> Result<R, CoreError> + Send,
) -> PyResult<R> {
    let flag = AtomicBool::new(false);
    let caught = |r: std::thread::Result<Result<R, CoreError>>| match r {
        Ok(res) => res.map_err(to_py),
        Err(p) => Err(internal_error(func, &*p)),
    };
    if work_estimate < INLINE_WORK {
        return caught(py.detach(|| catch_unwind(AssertUnwindSafe(|| work(Cancel::NEVER)))));
    }
    let (tx, rx) = mpsc::sync_channel(1);
    std::thread::scope(|scope| {
        let flag = &flag;
        let worker = std::thread::Builder::new()
            .name("dlf_rs-core".into())
            .spawn_scoped(scope, move || {
                let _in_call = InCall::enter();
                let r = catch_unwind(AssertUnwindSafe(|| work(Cancel::new(flag))));
                // The receiver outlives the scope; a send can only fail if it is gone.
                let _ = tx.send(r);
            });
        if let Err(e) = worker {
            return Err(DlfError::new_err(format!(
                "dlf_rs {func}: could not start a worker thread: {e}"
            )));
        }
        // The receiver is not Sync, so it moves into each detached wait and back out.
        let mut rx = rx;
        loop {
            let (got, back) = py.detach(move || (rx.recv_timeout(SIGNAL_POLL), rx));
            rx = back;
            match got {
                Ok(r) => return caught(r),
                Err(RecvTimeoutError::Timeout) => {
                    if let Err(interrupt) = py.check_signals() {
                        flag.store(true, Ordering::Relaxed);
                        // Wait (detached) for the worker to notice; its result is dropped.
                        let _ = py.detach(move || rx.recv());
                        return Err(interrupt);
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(DlfInternalError::new_err(format!(
                        "internal error in dlf_rs {func} (a bug): the worker thread ended \
                         without a result; please report it with the inputs' shapes"
                    )));
                }
            }
        }
    })
}

/// A rough count of a step's work for `run_core`: logit reads per pass times passes (the grid's
/// points per expert count as passes, the exact solver as a few dozen more).
fn step_work(b: usize, v: usize, n_t: usize, weights: &Weights) -> u64 {
    let reads = (b as u64) * (v as u64) * (n_t as u64 + 2);
    let passes = match weights {
        Weights::Static(_) => 1,
        Weights::Dynamic(cfg) => {
            let pts = cfg.grid_len().clamp(1.0, MAX_GRID_POINTS as f64) as u64;
            let exact = if cfg.solver == SolverKind::Exact {
                64
            } else {
                0
            };
            1 + pts / 4 + exact
        }
    };
    reads.saturating_mul(passes)
}

fn shape_str(shape: &[usize]) -> String {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    format!("[{}]", dims.join(", "))
}

/// A C-contiguous row-major view of a 2-D float32 array; the Python layer guarantees contiguity,
/// this turns a violation into an error rather than a panic.
fn slice_of<'a>(arr: &'a PyReadonlyArray2<'_, f32>, arg: &str) -> PyResult<&'a [f32]> {
    arr.as_slice().map_err(|_| {
        to_py(CoreError::invalid(
            arg,
            "a C-contiguous float32 array",
            "a non-contiguous array",
        ))
    })
}

fn check_shape(arr: &PyReadonlyArray2<'_, f32>, arg: &str, expected: [usize; 2]) -> PyResult<()> {
    if arr.shape() != expected {
        return Err(to_py(CoreError::Shape {
            arg: arg.to_string(),
            expected: shape_str(&expected),
            got: shape_str(arr.shape()),
        }));
    }
    Ok(())
}

fn seeds_of(seed: Option<u64>, seeds: Option<Vec<u64>>) -> PyResult<Seeds> {
    match (seed, seeds) {
        (None, None) => Ok(Seeds::Entropy),
        (Some(s), None) => Ok(Seeds::One(s)),
        (None, Some(v)) => Ok(Seeds::PerRow(v)),
        (Some(_), Some(_)) => Err(to_py(CoreError::invalid(
            "seed",
            "either one seed or one seed per row",
            "both",
        ))),
    }
}

fn sampling_of(temperature: f64, top_k: u64, top_p: f64, min_p: f64) -> PyResult<Sampling> {
    Ok(Sampling {
        temperature,
        top_k: to_usize("top_k", top_k).map_err(to_py)?,
        top_p,
        min_p,
    })
}

fn penalties_of((repetition, frequency, presence): (f64, f64, f64)) -> Penalties {
    Penalties {
        repetition,
        frequency,
        presence,
    }
}

/// The history keywords as the core reads them: `history` the row-major token ids (int64, any
/// negative id is padding) and `history_offsets` the B + 1 row boundaries into it (a `[B, L]`
/// array is `history.reshape(-1)` with offsets 0, L, ..., B * L: no copy). Both or neither.
/// The ids are borrowed, like the logits, while the GIL is released.
struct HistoryArgs<'py> {
    tokens: PyReadonlyArray1<'py, i64>,
    offsets: Vec<usize>,
}

impl<'py> HistoryArgs<'py> {
    fn new(
        tokens: Option<PyReadonlyArray1<'py, i64>>,
        offsets: Option<PyReadonlyArray1<'py, i64>>,
    ) -> PyResult<Option<Self>> {
        let (tokens, offsets) = match (tokens, offsets) {
            (None, None) => return Ok(None),
            (Some(t), Some(o)) => (t, o),
            _ => {
                return Err(to_py(CoreError::invalid(
                    "history",
                    "history and history_offsets together (dlf_rs.fuse_step builds both)",
                    "only one of them",
                )))
            }
        };
        let offsets = offsets
            .as_array()
            .iter()
            .map(|&o| usize::try_from(o))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| {
                to_py(CoreError::invalid(
                    "history_offsets",
                    "non-negative row offsets",
                    "a negative offset",
                ))
            })?;
        Ok(Some(HistoryArgs { tokens, offsets }))
    }

    fn view(&self) -> PyResult<History<'_>> {
        let tokens = self.tokens.as_slice().map_err(|_| {
            to_py(CoreError::invalid(
                "history",
                "a C-contiguous int64 array",
                "a non-contiguous array",
            ))
        })?;
        Ok(History {
            tokens,
            offsets: &self.offsets,
        })
    }
}

/// The solver's settings from the caller's keywords (names parsed, integers fitted to usize).
fn solver_of(
    alpha_min: f64,
    alpha_max: f64,
    grid_step: f64,
    solver: &str,
    multi_expert: &str,
    support_k: Option<u64>,
) -> PyResult<SolverConfig> {
    Ok(SolverConfig {
        alpha_min,
        alpha_max,
        grid_step,
        solver: SolverKind::parse(solver).map_err(to_py)?,
        multi_expert: MultiExpert::parse(multi_expert).map_err(to_py)?,
        support_k: support_k
            .map(|k| to_usize("support_k", k))
            .transpose()
            .map_err(to_py)?,
    })
}

/// Borrowed model logits with their shapes checked against `large`.
struct Borrowed<'a> {
    large: &'a [f32],
    small: &'a [f32],
    experts: Vec<&'a [f32]>,
    batch: usize,
    vocab: usize,
}

fn borrow_models<'a>(
    large: &'a PyReadonlyArray2<'_, f32>,
    small: &'a PyReadonlyArray2<'_, f32>,
    experts: &'a [PyReadonlyArray2<'_, f32>],
) -> PyResult<Borrowed<'a>> {
    let [batch, vocab] = [large.shape()[0], large.shape()[1]];
    check_shape(small, "small", [batch, vocab])?;
    for (t, e) in experts.iter().enumerate() {
        check_shape(e, &format!("experts[{t}]"), [batch, vocab])?;
    }
    let expert_slices = experts
        .iter()
        .enumerate()
        .map(|(t, e)| slice_of(e, &format!("experts[{t}]")))
        .collect::<PyResult<Vec<_>>>()?;
    Ok(Borrowed {
        large: slice_of(large, "large")?,
        small: slice_of(small, "small")?,
        experts: expert_slices,
        batch,
        vocab,
    })
}

/// Result of one `fuse_step`: per-row tokens, weights, objective and KL traces.
/// Every getter returns a fresh numpy array (a copy of a few B x T numbers).
#[pyclass(frozen, module = "dlf_rs")]
pub struct StepResult {
    out: StepOutput,
}

fn vec1<'py, T: numpy::Element + Copy>(py: Python<'py>, v: &[T]) -> Bound<'py, PyArray1<T>> {
    PyArray1::from_slice(py, v)
}

fn vec2<'py, T: numpy::Element + Copy>(
    py: Python<'py>,
    v: &[T],
    rows: usize,
    cols: usize,
) -> PyResult<Bound<'py, PyArray2<T>>> {
    PyArray1::from_slice(py, v).reshape([rows, cols])
}

#[pymethods]
impl StepResult {
    /// Number of rows B.
    #[getter]
    fn batch(&self) -> usize {
        self.out.batch
    }
    /// Number of experts T.
    #[getter]
    fn n_experts(&self) -> usize {
        self.out.n_experts
    }
    /// Next token per row, int64 [B].
    #[getter]
    fn tokens<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<i64>> {
        vec1(py, &self.out.tokens)
    }
    /// Weights used, float32 [B, T].
    #[getter]
    fn alphas<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray2<f32>>> {
        vec2(py, &self.out.alphas, self.out.batch, self.out.n_experts)
    }
    /// J at the chosen weights on the support used (0 for static weights), float32 [B].
    #[getter]
    fn loss<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f32>> {
        vec1(py, &self.out.loss)
    }
    /// Index of the expert with the non-zero weight, -1 if none (or static weights), int64 [B].
    #[getter]
    fn active<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<i64>> {
        vec1(py, &self.out.active)
    }
    /// KL(P~ || P) at the chosen weights, float32 [B] (NaN for static weights).
    #[getter]
    fn kl_fused_large<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f32>> {
        vec1(py, &self.out.kl_fused_large)
    }
    /// KL(P || P~) at the chosen weights, float32 [B] (NaN for static weights).
    #[getter]
    fn kl_large_fused<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f32>> {
        vec1(py, &self.out.kl_large_fused)
    }
    /// Targets KL(Q_t || Q), float32 [B, T] (NaN for static weights).
    #[getter]
    fn kl_expert_small<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray2<f32>>> {
        vec2(
            py,
            &self.out.kl_expert_small,
            self.out.batch,
            self.out.n_experts,
        )
    }
    /// Targets KL(Q || Q_t), float32 [B, T] (NaN for static weights).
    #[getter]
    fn kl_small_expert<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray2<f32>>> {
        vec2(
            py,
            &self.out.kl_small_expert,
            self.out.batch,
            self.out.n_experts,
        )
    }
    /// Number of tokens (tail bucket included) the KLs were computed over, uint32 [B].
    #[getter]
    fn support_size<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<u32>> {
        vec1(py, &self.out.support_size)
    }
    /// Whether the row's full-vocabulary grid answer was proven from the one-pass summary (no
    /// full scan), bool [B].
    #[getter]
    fn certified<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<bool>> {
        vec1(py, &self.out.certified)
    }
    /// Whether the certificate was tried and failed (the full computation ran), bool [B].
    #[getter]
    fn fallback<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<bool>> {
        vec1(py, &self.out.fallback)
    }

    fn __len__(&self) -> usize {
        self.out.batch
    }

    fn __repr__(&self) -> String {
        const SHOW: usize = 4;
        let o = &self.out;
        let rows = o.batch.min(SHOW);
        let more = if o.batch > SHOW { ", ..." } else { "" };
        let list = |v: &[String]| format!("[{}{}]", v.join(", "), more);
        let tokens: Vec<String> = o.tokens[..rows].iter().map(|x| x.to_string()).collect();
        let active: Vec<String> = o.active[..rows].iter().map(|x| x.to_string()).collect();
        let loss: Vec<String> = o.loss[..rows].iter().map(|x| format!("{x:.5}")).collect();
        let alphas: Vec<String> = (0..rows)
            .map(|b| {
                let row = &o.alphas[b * o.n_experts..(b + 1) * o.n_experts];
                let v: Vec<String> = row.iter().map(|x| format!("{x:.4}")).collect();
                format!("[{}]", v.join(", "))
            })
            .collect();
        format!(
            "StepResult(batch={}, n_experts={}, tokens={}, active={}, alphas={}, loss={})",
            o.batch,
            o.n_experts,
            list(&tokens),
            list(&active),
            list(&alphas),
            list(&loss),
        )
    }
}

/// The defaults of every step option, from the core's `Default` impls: the one place they are
/// written. Exposed as `dlf_rs._core.DEFAULTS`; the Python options record reads it.
fn defaults(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let cfg = SolverConfig::default();
    let smp = Sampling::default();
    let d = PyDict::new(py);
    d.set_item("alpha_min", cfg.alpha_min)?;
    d.set_item("alpha_max", cfg.alpha_max)?;
    d.set_item("grid_step", cfg.grid_step)?;
    d.set_item("solver", cfg.solver.name())?;
    d.set_item("multi_expert", cfg.multi_expert.name())?;
    d.set_item("support_k", cfg.support_k)?;
    d.set_item("temperature", smp.temperature)?;
    d.set_item("top_k", smp.top_k)?;
    d.set_item("top_p", smp.top_p)?;
    d.set_item("min_p", smp.min_p)?;
    let pen = Penalties::default();
    d.set_item("repetition_penalty", pen.repetition)?;
    d.set_item("frequency_penalty", pen.frequency)?;
    d.set_item("presence_penalty", pen.presence)?;
    d.set_item("max_grid_points", MAX_GRID_POINTS)?;
    d.set_item("max_abs_alpha", MAX_ABS_ALPHA)?;
    d.set_item("speculative", Speculative::default().name())?;
    d.set_item("max_draft_len", MAX_DRAFT_LEN)?;
    Ok(d)
}

/// Checks every step option with the core's own rules (`validate::validate_options`, which
/// `fuse_step` runs too) and raises `DlfError` with the same message `fuse_step` would. The count
/// of static weights against T is left to `fuse_step` (it needs the experts). `speculative`
/// (the generator's option, not fuse_step's) defaults to off.
#[pyfunction]
#[pyo3(signature = (
    *, alpha, alpha_min, alpha_max, grid_step, solver, multi_expert, support_k,
    temperature, top_k, top_p, min_p,
    repetition_penalty, frequency_penalty, presence_penalty, speculative=None,
))]
#[allow(clippy::too_many_arguments)]
fn validate_options(
    alpha: Option<Vec<f64>>,
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
) -> PyResult<()> {
    guarded("validate_options", move || {
        let cfg = solver_of(
            alpha_min,
            alpha_max,
            grid_step,
            solver,
            multi_expert,
            support_k,
        )?;
        let sampling = sampling_of(temperature, top_k, top_p, min_p)?;
        let pen = penalties_of((repetition_penalty, frequency_penalty, presence_penalty));
        validate::validate_options(alpha.as_deref(), &cfg, &sampling, &pen).map_err(to_py)?;
        let spec = speculative_of(speculative)?;
        validate::validate_speculative(spec).map_err(to_py)?;
        validate::validate_speculative_penalties(spec, &pen).map_err(to_py)
    })
}

/// The caller's `speculative`: a draft length or a name ("auto"); the types are checked by the
/// Python options record, the values here.
#[derive(FromPyObject)]
enum SpecArg {
    Len(i64),
    Name(String),
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

/// One DLF decoding step over a batch. Arguments are checked by `dlf_rs.fuse_step`; see there.
/// The options of `fuse_step` and `fuse_verify` as the core's types, checked with the one
/// validation `validate_options` runs. Every option is checked, even those static weights do not
/// use, so that an options record valid for one call is valid for every call.
#[allow(clippy::type_complexity, clippy::too_many_arguments)]
fn step_options(
    alpha: Option<Vec<f64>>,
    [alpha_min, alpha_max, grid_step]: [f64; 3],
    solver: &str,
    multi_expert: &str,
    support_k: Option<u64>,
    (temperature, top_k, top_p, min_p): (f64, u64, f64, f64),
    penalties: (f64, f64, f64),
    (seed, seeds): (Option<u64>, Option<Vec<u64>>),
) -> PyResult<(Weights, Sampling, Penalties, Seeds)> {
    let cfg = solver_of(
        alpha_min,
        alpha_max,
        grid_step,
        solver,
        multi_expert,
        support_k,
    )?;
    let sampling = sampling_of(temperature, top_k, top_p, min_p)?;
    let pen = penalties_of(penalties);
    validate::validate_options(alpha.as_deref(), &cfg, &sampling, &pen).map_err(to_py)?;
    let weights = match alpha {
        Some(a) => Weights::Static(a),
        None => Weights::Dynamic(cfg),
    };
    Ok((weights, sampling, pen, seeds_of(seed, seeds)?))
}

/// Every option is a required keyword: the defaults live in `DEFAULTS` only.
#[pyfunction]
#[pyo3(signature = (
    large, small, experts, *, alpha, alpha_min, alpha_max, grid_step,
    solver, multi_expert, support_k,
    temperature, top_k, top_p, min_p,
    repetition_penalty, frequency_penalty, presence_penalty,
    seed=None, seeds=None, history=None, history_offsets=None,
))]
#[allow(clippy::too_many_arguments)]
fn fuse_step(
    py: Python<'_>,
    large: PyReadonlyArray2<'_, f32>,
    small: PyReadonlyArray2<'_, f32>,
    experts: Vec<PyReadonlyArray2<'_, f32>>,
    alpha: Option<Vec<f64>>,
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
    seed: Option<u64>,
    seeds: Option<Vec<u64>>,
    history: Option<PyReadonlyArray1<'_, i64>>,
    history_offsets: Option<PyReadonlyArray1<'_, i64>>,
) -> PyResult<StepResult> {
    guarded("fuse_step", move || {
        let (weights, sampling, penalties, seeds) = step_options(
            alpha,
            [alpha_min, alpha_max, grid_step],
            solver,
            multi_expert,
            support_k,
            (temperature, top_k, top_p, min_p),
            (repetition_penalty, frequency_penalty, presence_penalty),
            (seed, seeds),
        )?;
        let history = HistoryArgs::new(history, history_offsets)?;
        let history = history.as_ref().map(HistoryArgs::view).transpose()?;
        let m = borrow_models(&large, &small, &experts)?;
        let inputs = StepInputs {
            large: m.large,
            small: m.small,
            experts: &m.experts,
            batch: m.batch,
            vocab: m.vocab,
        };
        // The arrays are borrowed read-only (zero-copy) while the GIL is released: the caller must not
        // mutate them from another thread until this call returns (see the module docs for what
        // happens if it does). `dlf_rs.FusedGenerator` owns its staging buffers and never does.
        let work = step_work(m.batch, m.vocab, m.experts.len(), &weights);
        let out = run_core(py, "fuse_step", work, |cancel| {
            crate::step::fuse_step_with_penalties(
                &inputs,
                &weights,
                &sampling,
                &penalties,
                history.as_ref(),
                &seeds,
                cancel,
            )
        })?;
        Ok(StepResult { out })
    })
}

/// Fused logits z_L + sum_t alphas[b, t] (z_t - z_S) for every row, float32 [B, V].
#[pyfunction]
fn fuse_logits<'py>(
    py: Python<'py>,
    large: PyReadonlyArray2<'py, f32>,
    small: PyReadonlyArray2<'py, f32>,
    experts: Vec<PyReadonlyArray2<'py, f32>>,
    alphas: PyReadonlyArray2<'py, f32>,
) -> PyResult<Bound<'py, PyArray2<f32>>> {
    guarded("fuse_logits", move || {
        let m = borrow_models(&large, &small, &experts)?;
        check_shape(&alphas, "alphas", [m.batch, m.experts.len()])?;
        let alpha_slice = slice_of(&alphas, "alphas")?;
        let inputs = StepInputs {
            large: m.large,
            small: m.small,
            experts: &m.experts,
            batch: m.batch,
            vocab: m.vocab,
        };
        let mut out = vec![0.0f32; m.batch * m.vocab];
        // Borrowed read-only without copying while detached; see `fuse_step`.
        let work = (m.batch as u64) * (m.vocab as u64) * (m.experts.len() as u64 + 2);
        run_core(py, "fuse_logits", work, |cancel| {
            crate::step::fuse_logits_with_cancel(&inputs, alpha_slice, &mut out, cancel)
        })?;
        vec2(py, &out, m.batch, m.vocab)
    })
}

/// Result of one `fuse_verify`: per row the accepted count, per row and position the emitted
/// token and the step's weights and traces (`[B, P]` / `[B, P, T]`; -1 / NaN past the emitted
/// tokens). Every getter returns a fresh numpy array.
#[pyclass(frozen, module = "dlf_rs")]
pub struct VerifyResult {
    out: VerifyOutput,
}

impl VerifyResult {
    fn bp<'py, T: numpy::Element + Copy>(
        &self,
        py: Python<'py>,
        v: &[T],
    ) -> PyResult<Bound<'py, PyArray2<T>>> {
        vec2(py, v, self.out.batch, self.out.positions)
    }

    fn bpt<'py>(&self, py: Python<'py>, v: &[f32]) -> PyResult<Bound<'py, PyArray3<f32>>> {
        let o = &self.out;
        PyArray1::from_slice(py, v).reshape([o.batch, o.positions, o.steps.n_experts])
    }
}

#[pymethods]
impl VerifyResult {
    /// Number of rows B.
    #[getter]
    fn batch(&self) -> usize {
        self.out.batch
    }
    /// Positions P = k + 1.
    #[getter]
    fn positions(&self) -> usize {
        self.out.positions
    }
    /// Number of experts T.
    #[getter]
    fn n_experts(&self) -> usize {
        self.out.steps.n_experts
    }
    /// Drafted tokens accepted per row, int64 [B]; row b emits accepted[b] + 1 tokens.
    #[getter]
    fn accepted<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<i64>> {
        vec1(py, &self.out.accepted)
    }
    /// Emitted tokens, int64 [B, P] (-1 past accepted[b]).
    #[getter]
    fn tokens<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray2<i64>>> {
        self.bp(py, &self.out.steps.tokens)
    }
    /// Weights used per position, float32 [B, P, T].
    #[getter]
    fn alphas<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray3<f32>>> {
        self.bpt(py, &self.out.steps.alphas)
    }
    /// J at the chosen weights, float32 [B, P].
    #[getter]
    fn loss<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray2<f32>>> {
        self.bp(py, &self.out.steps.loss)
    }
    /// Active expert per position, int64 [B, P].
    #[getter]
    fn active<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray2<i64>>> {
        self.bp(py, &self.out.steps.active)
    }
    /// KL(P~ || P), float32 [B, P].
    #[getter]
    fn kl_fused_large<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray2<f32>>> {
        self.bp(py, &self.out.steps.kl_fused_large)
    }
    /// KL(P || P~), float32 [B, P].
    #[getter]
    fn kl_large_fused<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray2<f32>>> {
        self.bp(py, &self.out.steps.kl_large_fused)
    }
    /// Targets KL(Q_t || Q), float32 [B, P, T].
    #[getter]
    fn kl_expert_small<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray3<f32>>> {
        self.bpt(py, &self.out.steps.kl_expert_small)
    }
    /// Targets KL(Q || Q_t), float32 [B, P, T].
    #[getter]
    fn kl_small_expert<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray3<f32>>> {
        self.bpt(py, &self.out.steps.kl_small_expert)
    }
    /// Support sizes, uint32 [B, P].
    #[getter]
    fn support_size<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray2<u32>>> {
        self.bp(py, &self.out.steps.support_size)
    }

    fn __len__(&self) -> usize {
        self.out.batch
    }

    fn __repr__(&self) -> String {
        format!(
            "VerifyResult(batch={}, positions={}, n_experts={}, accepted={:?})",
            self.out.batch, self.out.positions, self.out.steps.n_experts, self.out.accepted
        )
    }
}

fn check_shape3(arr: &PyReadonlyArray3<'_, f32>, arg: &str, expected: [usize; 3]) -> PyResult<()> {
    if arr.shape() != expected {
        return Err(to_py(CoreError::Shape {
            arg: arg.to_string(),
            expected: shape_str(&expected),
            got: shape_str(arr.shape()),
        }));
    }
    Ok(())
}

fn slice3<'a>(arr: &'a PyReadonlyArray3<'_, f32>, arg: &str) -> PyResult<&'a [f32]> {
    arr.as_slice().map_err(|_| {
        to_py(CoreError::invalid(
            arg,
            "a C-contiguous float32 array",
            "a non-contiguous array",
        ))
    })
}

/// Speculative verification over `[B, P, V]` logits per model; see `dlf_rs.speculative` and
/// `rust/verify.rs`. Options as in `fuse_step` (every one a required keyword).
#[pyfunction]
#[pyo3(signature = (
    large, small, experts, draft_tokens, draft_lens, *, draft_logits, alpha, alpha_min,
    alpha_max, grid_step, solver, multi_expert, support_k,
    temperature, top_k, top_p, min_p,
    repetition_penalty, frequency_penalty, presence_penalty, seed=None, seeds=None,
))]
#[allow(clippy::too_many_arguments)]
fn fuse_verify(
    py: Python<'_>,
    large: PyReadonlyArray3<'_, f32>,
    small: PyReadonlyArray3<'_, f32>,
    experts: Vec<PyReadonlyArray3<'_, f32>>,
    draft_tokens: PyReadonlyArray2<'_, i64>,
    draft_lens: Vec<u64>,
    draft_logits: Option<PyReadonlyArray3<'_, f32>>,
    alpha: Option<Vec<f64>>,
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
    seed: Option<u64>,
    seeds: Option<Vec<u64>>,
) -> PyResult<VerifyResult> {
    guarded("fuse_verify", move || {
        let (weights, sampling, penalties, seeds) = step_options(
            alpha,
            [alpha_min, alpha_max, grid_step],
            solver,
            multi_expert,
            support_k,
            (temperature, top_k, top_p, min_p),
            (repetition_penalty, frequency_penalty, presence_penalty),
            (seed, seeds),
        )?;
        // Verification does not apply penalties; the options record already refuses
        // `speculative` with an active penalty (`validate_speculative_penalties`).
        let p = &penalties;
        let active = [
            ("repetition_penalty", p.repetition, 1.0),
            ("frequency_penalty", p.frequency, 0.0),
            ("presence_penalty", p.presence, 0.0),
        ];
        if let Some((arg, x, off)) = active.into_iter().find(|&(_, x, off)| x != off) {
            return Err(to_py(CoreError::invalid(
                arg,
                format!("{off:?} in fuse_verify (speculative verification applies no penalties)"),
                format!("{x:?}"),
            )));
        }
        let [b, p, v] = [large.shape()[0], large.shape()[1], large.shape()[2]];
        check_shape3(&small, "small", [b, p, v])?;
        for (t, e) in experts.iter().enumerate() {
            check_shape3(e, &format!("experts[{t}]"), [b, p, v])?;
        }
        let k = p.saturating_sub(1);
        if draft_tokens.shape() != [b, k] {
            return Err(to_py(CoreError::Shape {
                arg: "draft_tokens".into(),
                expected: shape_str(&[b, k]),
                got: shape_str(draft_tokens.shape()),
            }));
        }
        if let Some(q) = &draft_logits {
            check_shape3(q, "draft_logits", [b, k, v])?;
        }
        let lens = draft_lens
            .iter()
            .enumerate()
            .map(|(i, &n)| to_usize(&format!("draft_lens[{i}]"), n))
            .collect::<Result<Vec<_>, _>>()
            .map_err(to_py)?;
        let expert_slices = experts
            .iter()
            .enumerate()
            .map(|(t, e)| slice3(e, &format!("experts[{t}]")))
            .collect::<PyResult<Vec<_>>>()?;
        let tokens = draft_tokens.as_slice().map_err(|_| {
            to_py(CoreError::invalid(
                "draft_tokens",
                "a C-contiguous int64 array",
                "a non-contiguous array",
            ))
        })?;
        let q = draft_logits
            .as_ref()
            .map(|q| slice3(q, "draft_logits"))
            .transpose()?;
        let inputs = VerifyInputs {
            large: slice3(&large, "large")?,
            small: slice3(&small, "small")?,
            experts: &expert_slices,
            batch: b,
            positions: p,
            vocab: v,
            draft_tokens: tokens,
            draft_lens: &lens,
            draft_logits: q,
        };
        // Borrowed read-only without copying while detached; see `fuse_step`.
        let work = step_work(b * p, v, expert_slices.len(), &weights);
        let out = run_core(py, "fuse_verify", work, |cancel| {
            crate::verify::fuse_verify_with_cancel(&inputs, &weights, &sampling, &seeds, cancel)
        })?;
        Ok(VerifyResult { out })
    })
}

/// Draw one token per row from `logits` [B, V]; see `dlf_rs.sample`.
#[pyfunction]
#[pyo3(signature = (
    logits, *, temperature, top_k, top_p, min_p,
    repetition_penalty, frequency_penalty, presence_penalty,
    seed=None, seeds=None, history=None, history_offsets=None,
))]
#[allow(clippy::too_many_arguments)]
fn sample<'py>(
    py: Python<'py>,
    logits: PyReadonlyArray2<'py, f32>,
    temperature: f64,
    top_k: u64,
    top_p: f64,
    min_p: f64,
    repetition_penalty: f64,
    frequency_penalty: f64,
    presence_penalty: f64,
    seed: Option<u64>,
    seeds: Option<Vec<u64>>,
    history: Option<PyReadonlyArray1<'py, i64>>,
    history_offsets: Option<PyReadonlyArray1<'py, i64>>,
) -> PyResult<Bound<'py, PyArray1<i64>>> {
    guarded("sample", move || {
        let sampling = sampling_of(temperature, top_k, top_p, min_p)?;
        let penalties = penalties_of((repetition_penalty, frequency_penalty, presence_penalty));
        let seeds = seeds_of(seed, seeds)?;
        let history = HistoryArgs::new(history, history_offsets)?;
        let history = history.as_ref().map(HistoryArgs::view).transpose()?;
        let [batch, vocab] = [logits.shape()[0], logits.shape()[1]];
        let z = slice_of(&logits, "logits")?;
        // Borrowed read-only without copying while detached; see `fuse_step`. Sorting for top-p
        // makes a row cost up to ~log V passes.
        let work = (batch as u64) * (vocab as u64) * 16;
        let tokens = run_core(py, "sample", work, |cancel| {
            crate::sample_batch_penalized(
                z,
                batch,
                vocab,
                &sampling,
                &penalties,
                history.as_ref(),
                &seeds,
                cancel,
            )
        })?;
        Ok(PyArray1::from_vec(py, tokens))
    })
}

/// Not API: panics inside `rows` rayon rows of a core call (on the worker thread when
/// `threaded`), so that tests can check that a panic becomes one `DlfInternalError` and prints
/// nothing. The panic path cannot be reached from valid or invalid inputs otherwise (that is the
/// point), hence this hook.
#[pyfunction]
#[pyo3(signature = (rows, *, threaded=false))]
fn _panic_for_tests(py: Python<'_>, rows: usize, threaded: bool) -> PyResult<()> {
    guarded("_panic_for_tests", || {
        let work = if threaded { INLINE_WORK } else { 0 };
        run_core(py, "_panic_for_tests", work, |_cancel| {
            use rayon::prelude::*;
            (0..rows).into_par_iter().for_each(|r| {
                if r < rows {
                    panic!("test panic in row {r}");
                }
            });
            Ok(())
        })
    })
}

#[pymodule(gil_used = false)]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    install_quiet_panic_hook();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("DlfError", m.py().get_type::<DlfError>())?;
    m.add("DlfInternalError", m.py().get_type::<DlfInternalError>())?;
    m.add("DEFAULTS", defaults(m.py())?)?;
    // The instruction tier the kernels run (numerics::tier), for benchmark reports.
    m.add(
        "SIMD_TIER",
        match crate::numerics::tier() {
            crate::numerics::Tier::Portable => "portable",
            crate::numerics::Tier::Avx2 => "avx2",
            crate::numerics::Tier::Avx512 => "avx512",
        },
    )?;
    m.add_function(wrap_pyfunction!(validate_options, m)?)?;
    m.add_class::<StepResult>()?;
    m.add_function(wrap_pyfunction!(fuse_step, m)?)?;
    m.add_function(wrap_pyfunction!(fuse_logits, m)?)?;
    m.add_class::<VerifyResult>()?;
    m.add_function(wrap_pyfunction!(fuse_verify, m)?)?;
    m.add_function(wrap_pyfunction!(sample, m)?)?;
    m.add_function(wrap_pyfunction!(_panic_for_tests, m)?)?;
    Ok(())
}
