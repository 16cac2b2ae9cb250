"""What a generation call returns: per-row texts, tokens, weights and solver traces.

Where it sits: filled step by step by the generation loop (:mod:`dlf_rs.generate`) through a
:class:`TraceRecorder`, returned as a :class:`GenerationResult`, written as JSONL by the CLI.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._core import StepResult

__all__ = ["GenerationResult", "RowTrace", "TraceRecorder"]


@dataclass
class RowTrace:
    """What the solver did at each step of one row (arrays over steps)."""

    active: np.ndarray  # int64[steps], -1: no expert active (or static / single model)
    loss: np.ndarray  # f32[steps], J at the chosen weights
    kl_fused_large: np.ndarray  # f32[steps], KL(P~ || P)
    kl_large_fused: np.ndarray  # f32[steps], KL(P || P~)
    kl_expert_small: np.ndarray  # f32[steps, T], targets KL(Q_t || Q)
    kl_small_expert: np.ndarray  # f32[steps, T], targets KL(Q || Q_t)
    support_size: np.ndarray  # uint32[steps]
    # Speculative decoding only (None otherwise): per token, whether it was a drafted token the
    # verification accepted (False: the fused correction or bonus token), and the row's share of
    # tested drafted tokens that were accepted.
    accepted_draft: np.ndarray | None = None  # bool[steps]
    acceptance_rate: float | None = None


def _short_floats(a: np.ndarray) -> list[Any]:
    """float32 values as the shortest decimals that round-trip in float32 (0.9, not
    0.8999999761581421); NaN becomes None (JSON has no NaN)."""
    if a.ndim == 0:
        v = np.float32(a.item())
        return None if np.isnan(v) else float(np.format_float_positional(v, unique=True))  # type: ignore[return-value]
    return [_short_floats(x) for x in a]


@dataclass
class GenerationResult:
    """Output of :meth:`FusedGenerator.generate`, one entry per prompt in every list."""

    texts: list[str]
    token_ids: list[list[int]]
    alphas: list[np.ndarray]  # f32[steps, T] per row (zeros for "large", NaN for "expert")
    trace: list[RowTrace]
    finish_reasons: list[str]  # "eos", "stop" or "length"
    timings: dict[str, float] = field(default_factory=dict)
    method: str = "dlf"
    expert_names: list[str] = field(default_factory=list)

    def to_records(self) -> list[dict[str, Any]]:
        """JSON-ready dicts (used by the CLI's JSONL output)."""
        return [
            {
                "text": self.texts[i],
                "token_ids": [int(t) for t in self.token_ids[i]],
                "alphas": _short_floats(np.asarray(self.alphas[i], dtype=np.float32)),
                "active": [int(a) for a in self.trace[i].active],
                "finish_reason": self.finish_reasons[i],
                "method": self.method,
            }
            for i in range(len(self.texts))
        ]


class TraceRecorder:
    """Collects, per row, the weights and solver trace of every step the row was live for.

    Columns are appended per step for the live rows only and stacked once at the end, so the
    per-step cost is a few list appends per live row.
    """

    def __init__(self, batch: int, n_experts: int) -> None:
        self.batch, self.n_exp = batch, n_experts
        # (live rows, the step's StepResult or the fill value of a single-model step)
        self._steps: list[tuple[list[int], StepResult | float]] = []

    def fused(self, live: list[int], r: StepResult) -> None:
        """A fused step (dlf or static): the core's per-row results, read out at the end."""
        self._steps.append((live, r))

    def single(self, live: list[int], alpha_fill: float) -> None:
        """A single-model step ("large": weights 0; "expert": NaN); no solver trace."""
        self._steps.append((live, alpha_fill))

    def _arrays(self, r: StepResult) -> dict[str, np.ndarray]:
        b, t = self.batch, self.n_exp
        return {
            "alphas": np.asarray(r.alphas, np.float32).reshape(b, t),
            "active": np.asarray(r.active, np.int64),
            "loss": np.asarray(r.loss, np.float32),
            "kl_fused_large": np.asarray(r.kl_fused_large, np.float32),
            "kl_large_fused": np.asarray(r.kl_large_fused, np.float32),
            "kl_expert_small": np.asarray(r.kl_expert_small, np.float32).reshape(b, t),
            "kl_small_expert": np.asarray(r.kl_small_expert, np.float32).reshape(b, t),
            "support_size": np.asarray(r.support_size, np.uint32),
        }

    def rows(self) -> tuple[list[np.ndarray], list[RowTrace]]:
        """Per-row ``alphas`` [steps, T] and :class:`RowTrace`."""
        t = self.n_exp
        nan_t = np.full(t, np.nan, np.float32)
        single = {"active": -1, "loss": np.nan, "kl_fused_large": np.nan,
                  "kl_large_fused": np.nan, "kl_expert_small": nan_t, "kl_small_expert": nan_t,
                  "support_size": 0}  # fmt: skip
        alphas: list[list[Any]] = [[] for _ in range(self.batch)]
        cols: list[dict[str, list[Any]]] = [{k: [] for k in single} for _ in range(self.batch)]
        for live, step in self._steps:
            if not isinstance(step, StepResult):
                for row in live:
                    alphas[row].append(np.full(t, step, np.float32))
                    for k, v in single.items():
                        cols[row][k].append(v)
                continue
            arrays = self._arrays(step)
            for row in live:
                alphas[row].append(arrays["alphas"][row])
                for k in single:
                    cols[row][k].append(arrays[k][row])
        out_alphas = [np.asarray(a, np.float32).reshape(len(a), t) for a in alphas]
        traces = []
        for c in cols:
            n = len(c["active"])
            traces.append(RowTrace(
                active=np.asarray(c["active"], np.int64).reshape(n),
                loss=np.asarray(c["loss"], np.float32).reshape(n),
                kl_fused_large=np.asarray(c["kl_fused_large"], np.float32).reshape(n),
                kl_large_fused=np.asarray(c["kl_large_fused"], np.float32).reshape(n),
                kl_expert_small=np.asarray(c["kl_expert_small"], np.float32).reshape(n, t),
                kl_small_expert=np.asarray(c["kl_small_expert"], np.float32).reshape(n, t),
                support_size=np.asarray(c["support_size"], np.uint32).reshape(n),
            ))  # fmt: skip
        return out_alphas, traces
