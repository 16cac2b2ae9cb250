//! The functions `dlf_rs._core` exports for the work itself: `fuse_step`, `fuse_logits`,
//! `fuse_verify`, `sample` (and a panic hook for the tests). Each checks shapes, borrows the
//! arrays, releases the GIL through `run_core` and wraps the core's result.

use super::*;

/// One DLF decoding step over a batch; see `dlf_rs.fuse_step`. The options come checked, as one
/// `CoreOptions` (`options.rs`); only what depends on this call's inputs is checked here or in
/// the core (shapes, seeds, history, the static weights' count against the experts).
#[pyfunction]
#[pyo3(signature = (
    large, small, experts, options, *, seed=None, seeds=None, history=None, history_offsets=None,
    fused_out=None,
))]
#[allow(clippy::too_many_arguments)]
pub(super) fn fuse_step<'py>(
    py: Python<'py>,
    large: PyReadonlyArray2<'py, f32>,
    small: PyReadonlyArray2<'py, f32>,
    experts: Vec<PyReadonlyArray2<'py, f32>>,
    options: PyRef<'py, CoreOptions>,
    seed: Option<u64>,
    seeds: Option<Vec<u64>>,
    history: Option<PyReadonlyArray1<'py, i64>>,
    history_offsets: Option<PyReadonlyArray1<'py, i64>>,
    fused_out: Option<Bound<'py, PyAny>>,
) -> PyResult<StepResult> {
    guarded("fuse_step", move || {
        let weights = options.weights(experts.len());
        let (sampling, penalties) = (options.sampling, options.penalties);
        let seeds = seeds_of(seed, seeds)?;
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
        // Checked after the inputs are borrowed, so an output that shares memory with one of
        // them is refused (numpy's borrow tracking) instead of being written while it is read.
        let mut fused = fused_out
            .as_ref()
            .map(|o| writable_matrix(o, "fused_out", [m.batch, m.vocab]))
            .transpose()?;
        // The arrays are borrowed read-only (zero-copy) while the GIL is released: the caller must not
        // mutate them from another thread until this call returns (see the module docs for what
        // happens if it does). `dlf_rs.FusedGenerator` owns its staging buffers and never does.
        // `fused_out` is borrowed writable the same way: nothing else may read or write it
        // until the call returns.
        let work = step_work(m.batch, m.vocab, m.experts.len(), &weights);
        let dst = fused.as_mut().map(|f| f.as_slice_mut()).transpose();
        let dst = dst.map_err(|_| not_contiguous("fused_out"))?;
        let out = run_core(py, "fuse_step", work, |cancel| match dst {
            None => crate::step::fuse_step_with_penalties(
                &inputs,
                &weights,
                &sampling,
                &penalties,
                history.as_ref(),
                &seeds,
                cancel,
            ),
            Some(dst) => crate::step::fuse_step_into(
                &inputs,
                &weights,
                &sampling,
                &penalties,
                history.as_ref(),
                &seeds,
                dst,
                cancel,
            ),
        })?;
        Ok(StepResult { out })
    })
}

/// Fused logits z_L + sum_t alphas[b, t] (z_t - z_S) for every row, float32 [B, V].
#[pyfunction]
pub(super) fn fuse_logits<'py>(
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

/// Speculative verification over `[B, P, V]` logits per model; see
/// `dlf_rs.engines.hf.speculative` and `rust/verify.rs`. Options as in `fuse_step`.
#[pyfunction]
#[pyo3(signature = (
    large, small, experts, draft_tokens, draft_lens, options, *, draft_logits, seed=None,
    seeds=None,
))]
#[allow(clippy::too_many_arguments)]
pub(super) fn fuse_verify(
    py: Python<'_>,
    large: PyReadonlyArray3<'_, f32>,
    small: PyReadonlyArray3<'_, f32>,
    experts: Vec<PyReadonlyArray3<'_, f32>>,
    draft_tokens: PyReadonlyArray2<'_, i64>,
    draft_lens: Vec<u64>,
    options: PyRef<'_, CoreOptions>,
    draft_logits: Option<PyReadonlyArray3<'_, f32>>,
    seed: Option<u64>,
    seeds: Option<Vec<u64>>,
) -> PyResult<VerifyResult> {
    guarded("fuse_verify", move || {
        let weights = options.weights(experts.len());
        let (sampling, penalties) = (options.sampling, options.penalties);
        let seeds = seeds_of(seed, seeds)?;
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

/// Draw one token per row from `logits` [B, V]; see `dlf_rs.sample`. Of the options, the
/// sampling and the penalties are used.
#[pyfunction]
#[pyo3(signature = (logits, options, *, seed=None, seeds=None, history=None, history_offsets=None))]
pub(super) fn sample<'py>(
    py: Python<'py>,
    logits: PyReadonlyArray2<'py, f32>,
    options: PyRef<'py, CoreOptions>,
    seed: Option<u64>,
    seeds: Option<Vec<u64>>,
    history: Option<PyReadonlyArray1<'py, i64>>,
    history_offsets: Option<PyReadonlyArray1<'py, i64>>,
) -> PyResult<Bound<'py, PyArray1<i64>>> {
    guarded("sample", move || {
        let (sampling, penalties) = (options.sampling, options.penalties);
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
pub(super) fn _panic_for_tests(py: Python<'_>, rows: usize, threaded: bool) -> PyResult<()> {
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
