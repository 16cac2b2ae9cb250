//! The Python face of the core (module `dlf_rs._core`): the only folder that touches PyO3.
//!
//! By concept: this file holds the exceptions, the argument extraction (shapes, seeds,
//! histories, borrowed arrays), the defaults and the module itself; `options.rs` the options
//! record `CoreOptions` (built and checked once, passed whole to every call), `guard.rs` the
//! panic and Ctrl-C handling, `results.rs` the result classes, `calls.rs` the exported functions.
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
    BorrowError, PyArray1, PyArray2, PyArray3, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray2,
    PyReadonlyArray3, PyReadwriteArray2, PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::create_exception;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

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

mod calls;
mod guard;
mod options;
mod results;

use calls::*;
use guard::*;
use options::*;
use results::*;

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

fn not_contiguous(arg: &str) -> PyErr {
    to_py(CoreError::invalid(
        arg,
        "a C-contiguous float32 array",
        "a non-contiguous array",
    ))
}

/// A caller's output buffer: a writable, C-contiguous float32 numpy array of shape `expected`,
/// borrowed for writing. Every refusal names `arg`: a TypeError for anything but a float32
/// ndarray, `DlfError` for the shape, the layout, a read-only array or one that shares memory
/// with an input of the same call (numpy's borrow tracking sees the inputs' read borrows).
fn writable_matrix<'py>(
    obj: &Bound<'py, PyAny>,
    arg: &str,
    expected: [usize; 2],
) -> PyResult<PyReadwriteArray2<'py, f32>> {
    let Ok(untyped) = obj.cast::<PyUntypedArray>() else {
        return Err(PyTypeError::new_err(format!(
            "{arg}: expected a float32 numpy array of shape {}, got {}",
            shape_str(&expected),
            obj.get_type().name()?
        )));
    };
    let Ok(arr) = obj.cast::<PyArray2<f32>>() else {
        return Err(PyTypeError::new_err(format!(
            "{arg}: expected a float32 numpy array of shape {}, got a {}-D array of dtype {}",
            shape_str(&expected),
            untyped.ndim(),
            untyped.dtype()
        )));
    };
    if arr.shape() != expected {
        return Err(to_py(CoreError::Shape {
            arg: arg.to_string(),
            expected: shape_str(&expected),
            got: shape_str(arr.shape()),
        }));
    }
    if !arr.is_c_contiguous() {
        return Err(not_contiguous(arg));
    }
    arr.try_readwrite().map_err(|e| {
        let got = match e {
            BorrowError::NotWriteable => "a read-only array",
            _ => "an array that shares memory with an input of this call",
        };
        to_py(CoreError::invalid(arg, "a writable array of its own", got))
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
    m.add_class::<CoreOptions>()?;
    m.add(
        "MULTI_EXPERT_RULES",
        PyTuple::new(m.py(), multi_expert_rules())?,
    )?;
    m.add("SOLVERS", PyTuple::new(m.py(), solvers())?)?;
    m.add_class::<StepResult>()?;
    m.add_function(wrap_pyfunction!(fuse_step, m)?)?;
    m.add_function(wrap_pyfunction!(fuse_logits, m)?)?;
    m.add_class::<VerifyResult>()?;
    m.add_function(wrap_pyfunction!(fuse_verify, m)?)?;
    m.add_function(wrap_pyfunction!(sample, m)?)?;
    m.add_function(wrap_pyfunction!(_panic_for_tests, m)?)?;
    Ok(())
}
