//! The result classes `StepResult` and `VerifyResult`: the core's outputs behind numpy getters
//! (each getter returns a fresh array of a few B x T numbers).

use super::*;

/// Result of one `fuse_step`: per-row tokens, weights, objective and KL traces.
/// Every getter returns a fresh numpy array (a copy of a few B x T numbers).
#[pyclass(frozen, module = "dlf_rs")]
pub struct StepResult {
    pub(super) out: StepOutput,
}

pub(super) fn vec1<'py, T: numpy::Element + Copy>(
    py: Python<'py>,
    v: &[T],
) -> Bound<'py, PyArray1<T>> {
    PyArray1::from_slice(py, v)
}

pub(super) fn vec2<'py, T: numpy::Element + Copy>(
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

/// Result of one `fuse_verify`: per row the accepted count, per row and position the emitted
/// token and the step's weights and traces (`[B, P]` / `[B, P, T]`; -1 / NaN past the emitted
/// tokens). Every getter returns a fresh numpy array.
#[pyclass(frozen, module = "dlf_rs")]
pub struct VerifyResult {
    pub(super) out: VerifyOutput,
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
