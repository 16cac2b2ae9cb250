"""What a generation call returns: per-row texts, tokens, weights and solver traces.

Where it sits: filled step by step by the generation loop (:mod:`dlf_rs.engines.hf.generate`) through a
:class:`TraceRecorder`, returned as a :class:`GenerationResult`, written as JSONL by the CLI.
"""

from __future__ import annotations

import math
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
    # bool[steps]: the full-vocabulary answer proven from the one-pass summary / the certificate
    # tried and failed (full computation ran). Both False for static weights and single models.
    certified: np.ndarray = field(default_factory=lambda: np.zeros(0, np.bool_))
    fallback: np.ndarray = field(default_factory=lambda: np.zeros(0, np.bool_))
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

    def __len__(self) -> int:
        return len(self.texts)

    def __repr__(self) -> str:
        n = len(self.texts)
        steps = [len(t) for t in self.token_ids]
        reasons: dict[str, int] = {}
        for r in self.finish_reasons:
            reasons[r] = reasons.get(r, 0) + 1
        shape = "x".join(str(s) for s in np.shape(self.alphas[0])) if n else "0"
        lines = [
            (f"GenerationResult(method={self.method!r}, rows={n}, "
             f"new tokens={min(steps, default=0)}..{max(steps, default=0)}, "
             f"finish_reasons={reasons}, experts={self.expert_names}, alphas[0]: [{shape}])")
        ]
        for i, text in enumerate(self.texts[:3]):
            short = text if len(text) <= 60 else text[:57] + "..."
            lines.append(f"  [{i}] {short!r}")
        if n > 3:
            lines.append(f"  ... {n - 3} more")
        return "\n".join(lines)

    @classmethod
    def concat(cls, parts: list[GenerationResult]) -> GenerationResult:
        """Several batches' results as one, rows in order; timings are summed."""
        if len(parts) == 1:
            return parts[0]
        timings: dict[str, float] = {}
        for p in parts:
            for k, v in p.timings.items():
                timings[k] = timings.get(k, 0.0) + v
        if "acceptance" in timings:  # a rate, not a sum: accepted over tested drafts
            timings["acceptance"] = timings.get("accepted", 0.0) / max(timings["tested"], 1.0)
        return cls(
            texts=[t for p in parts for t in p.texts],
            token_ids=[t for p in parts for t in p.token_ids],
            alphas=[a for p in parts for a in p.alphas],
            trace=[t for p in parts for t in p.trace],
            finish_reasons=[r for p in parts for r in p.finish_reasons],
            timings=timings,
            method=parts[0].method,
            expert_names=parts[0].expert_names,
        )

    def to_records(self) -> list[dict[str, Any]]:
        """JSON-ready dicts (used by the CLI's JSONL output). Rows decoded speculatively also
        carry ``acceptance_rate`` (None when no drafted token was tested) and
        ``accepted_draft`` (per token)."""
        records = []
        for i in range(len(self.texts)):
            trace = self.trace[i]
            record: dict[str, Any] = {
                "text": self.texts[i],
                "token_ids": [int(t) for t in self.token_ids[i]],
                "alphas": _short_floats(np.asarray(self.alphas[i], dtype=np.float32)),
                "active": [int(a) for a in trace.active],
                "finish_reason": self.finish_reasons[i],
                "method": self.method,
            }
            if trace.accepted_draft is not None or trace.acceptance_rate is not None:
                rate = trace.acceptance_rate
                record["acceptance_rate"] = (
                    None if rate is None or math.isnan(rate) else float(rate)
                )
                record["accepted_draft"] = (
                    None if trace.accepted_draft is None
                    else [bool(a) for a in trace.accepted_draft]
                )  # fmt: skip
            records.append(record)
        return records


class TraceRecorder:
    """Collects, per row, the weights and solver trace of every step the row was live for.

    Columns are appended per step for the live rows only and stacked once at the end, so the
    per-step cost is a few list appends per live row.
    """

    def __init__(self, batch: int, n_experts: int) -> None:
        self.batch, self.n_exp = batch, n_experts
        # (live rows, (the step's StepResult, whether it holds the live rows only) or the fill
        # value of a single-model step)
        self._steps: list[tuple[list[int], tuple[StepResult, bool] | float]] = []

    def fused(self, live: list[int], r: StepResult, *, compact: bool = False) -> None:
        """A fused step (dlf or static): the core's per-row results, read out at the end.
        ``compact``: ``r`` holds the live rows only, in ``live``'s order (an engine that runs
        only the live rows), instead of every row of the batch."""
        self._steps.append((live, (r, compact)))

    def single(self, live: list[int], alpha_fill: float) -> None:
        """A single-model step ("large": weights 0; "expert": NaN); no solver trace."""
        self._steps.append((live, alpha_fill))

    def rows(self) -> tuple[list[np.ndarray], list[RowTrace]]:
        """Per-row ``alphas`` [steps, T] and :class:`RowTrace`: every field is stacked over the
        steps once ([S, B, ...]), then each row takes the steps it was live for."""
        b, t, s = self.batch, self.n_exp, len(self._steps)
        live = np.zeros((s, b), dtype=bool)
        alphas = np.full((s, b, t), np.nan, np.float32)
        active = np.full((s, b), -1, np.int64)
        loss, kfl, klf = (np.full((s, b), np.nan, np.float32) for _ in range(3))
        kes, kse = (np.full((s, b, t), np.nan, np.float32) for _ in range(2))
        support = np.zeros((s, b), np.uint32)
        certified, fallback = np.zeros((s, b), np.bool_), np.zeros((s, b), np.bool_)
        for i, (rows, entry) in enumerate(self._steps):
            live[i, rows] = True
            if not isinstance(entry, tuple):
                alphas[i] = entry
                continue
            step, compact = entry
            at = (i, rows) if compact else i  # where the result's rows go in step i
            n = len(rows) if compact else b
            alphas[at] = np.asarray(step.alphas, np.float32).reshape(n, t)
            active[at] = step.active
            loss[at], kfl[at], klf[at] = step.loss, step.kl_fused_large, step.kl_large_fused
            kes[at] = np.asarray(step.kl_expert_small, np.float32).reshape(n, t)
            kse[at] = np.asarray(step.kl_small_expert, np.float32).reshape(n, t)
            support[at] = step.support_size
            certified[at], fallback[at] = step.certified, step.fallback
        out_alphas, traces = [], []
        for row in range(b):
            m = live[:, row]
            out_alphas.append(np.ascontiguousarray(alphas[m, row]))
            traces.append(RowTrace(
                active=active[m, row], loss=loss[m, row], kl_fused_large=kfl[m, row],
                kl_large_fused=klf[m, row], kl_expert_small=kes[m, row],
                kl_small_expert=kse[m, row], support_size=support[m, row],
                certified=certified[m, row], fallback=fallback[m, row],
            ))  # fmt: skip
        return out_alphas, traces
