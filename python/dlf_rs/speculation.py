"""Speculative DLF, the part every engine shares: draft, verify with the core, emit.

Where it sits: an engine's speculative loop (:mod:`dlf_rs.engines.hf.speculative` for
:class:`dlf_rs.FusedGenerator`, :mod:`dlf_rs.engines.llamacpp.speculative` for
:class:`dlf_rs.engines.llamacpp.LlamaCppGenerator`) owns its models' forwards and caches and
hands everything else to one :class:`Rounds` per batch: which rows draft how many tokens
(:meth:`Rounds.plan`), the drafting loop (:meth:`Rounds.draft`: greedy argmax or the core's
sampler, ``speculative="auto"``'s confidence rule; the engine's callback runs the drafting
experts' one-token forwards), the core's verification (:meth:`Rounds.verify`,
``_core.fuse_verify``), emitting the tokens one by one through :class:`dlf_rs.stopping.Stopping`
(:meth:`Rounds.emit`), the next draft expert of each row, and the result with its traces and
counts (:meth:`Rounds.result`). The design (draft expert, seeds, what is accepted) is in
:mod:`dlf_rs.engines.hf.speculative` and docs/speculative.md.

Rows: an engine may give the core every row of its batch (finished rows too, with lengths 0) or
only the live ones; ``at`` (row of the batch -> row of the arrays) says which.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ._core import DlfError, VerifyResult
from ._core import fuse_verify as core_fuse_verify
from ._core import sample as core_sample
from .options import StepOptions
from .results import GenerationResult, RowTrace
from .seeds import step_seed
from .stopping import Stopping

__all__ = ["AUTO_CONFIDENCE", "AUTO_MAX_DRAFT", "Rounds", "check_speculative"]

# speculative="auto": each row drafts while the draft expert's most likely token has at least this
# probability (softmax of its logits at the sampling temperature, 1 when greedy), up to
# AUTO_MAX_DRAFT tokens. On the shipped family a greedy draft above 0.5 is accepted 76-94 % of
# the time, one below only 15-20 %: stopping there saves the expert forward a rejected draft
# costs. The rule reads the draft's distribution only, never the drawn token: a stop that
# depended on the drawn token would bias speculative sampling (the residual max(0, p - q) is only
# right when every token q can draw is tested).
AUTO_CONFIDENCE = 0.5
AUTO_MAX_DRAFT = 8

_TRACE_KEYS = ("alphas", "active", "loss", "kl_fused_large", "kl_large_fused",
               "kl_expert_small", "kl_small_expert", "support_size")  # fmt: skip


def check_speculative(opts: StepOptions) -> None:
    """Speculative DLF needs a fused method (the draft length and the penalties are checked by
    the options record)."""
    if not opts.fused:
        raise DlfError(
            f"speculative: needs a fused method ('dlf' or 'static'), got method={opts.method!r}"
        )


def confidence(q: np.ndarray, temperature: float) -> np.ndarray:
    """The draft's largest probability per row: max softmax(q / T) (T = 1 when greedy)."""
    z = q.astype(np.float64) / (temperature if temperature > 0 else 1.0)
    z -= z.max(axis=-1, keepdims=True)
    return np.asarray(1.0 / np.exp(z).sum(axis=-1))


class Rounds:
    """One batch's speculative state outside the models: rows, draft experts, traces, counts."""

    def __init__(self, opts: StepOptions, rows: Stopping, n_experts: int, max_new_tokens: int,
                 seeds_of_rows: list[int] | None, timings: dict[str, float]) -> None:  # fmt: skip
        check_speculative(opts)
        self.opts, self.rows, self.n_exp = opts, rows, n_experts
        self.max_new_tokens, self.seeds_of_rows = max_new_tokens, seeds_of_rows
        self.timings = timings
        self.auto = opts.speculative == "auto"
        self.k_cap = AUTO_MAX_DRAFT if self.auto else int(opts.speculative or 1)
        batch = len(rows.tokens)
        # The draft expert of each row: static weights fix it (the largest), dynamic ones move it
        # to the expert active at the row's last emitted token (:meth:`emit`).
        static = opts._core.static_alphas(n_experts)
        first = int(np.argmax(static)) if static is not None else 0
        self.draft_of = np.full(batch, first, dtype=np.int64)
        self.per_row: list[dict[str, list[Any]]] = [
            {key: [] for key in (*_TRACE_KEYS, "accepted")} for _ in range(batch)
        ]
        self.tested = np.zeros(batch, dtype=np.int64)
        self.accepted = np.zeros(batch, dtype=np.int64)
        self.counts = {"rounds": 0, "drafted": 0, "large_forwards": 0}

    def plan(self, live: Sequence[int]) -> tuple[int, dict[int, int], list[int] | None]:
        """This round's draft length k, each live row's own limit (fewer near its token limit)
        and the live rows' round seeds (None when greedy): a row's seed comes from its own seed
        and its own token count only, so its output does not depend on its batch."""
        tokens = self.rows.tokens
        remaining = {b: self.max_new_tokens - len(tokens[b]) for b in live}
        k = max(0, min(self.k_cap, max(remaining.values()) - 1))
        limit = {b: min(k, remaining[b] - 1) for b in live}
        seeds = (None if self.seeds_of_rows is None else
                 [step_seed(self.seeds_of_rows[b], len(tokens[b])) for b in live])  # fmt: skip
        return k, limit, seeds

    def draft(self, k: int, limit: np.ndarray, q_at: Callable[[int], np.ndarray],
              feed: Callable[[int, list[int], np.ndarray], None], seeds: list[int] | None,
              pad: int, keep: np.ndarray | None = None,
              ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:  # fmt: skip
        """The drafting loop over n rows (``limit``: each row's most drafts, 0 for a row that
        drafts none): ``q_at(j)`` gives every row's draft logits at position j [n, V];
        ``feed(j, rows, tokens)`` runs the drafting experts on the rows that drafted their
        (j + 1)-th token (``tokens`` [n], pad elsewhere), so that position j + 1 exists. Returns
        (drafts [n, k], the drafts' logits [n, k, V] when sampling, draft lengths [n]).
        ``keep``: rows whose drawn tokens are kept where they did not draft (FusedGenerator's
        finished rows get pad instead)."""
        opts, n = self.opts, len(limit)
        drafts = np.full((n, k), pad, dtype=np.int64)
        q: np.ndarray | None = None
        lens = np.zeros(n, dtype=np.int64)
        drafting = [i for i in range(n) if limit[i] > 0]
        j = 0
        while drafting:
            q_j = q_at(j)
            t_s = time.perf_counter()
            if opts.greedy:
                d = np.argmax(q_j, axis=-1).astype(np.int64)
            else:
                assert seeds is not None
                if q is None:
                    q = np.empty((n, k, q_j.shape[-1]), dtype=np.float32)
                q[:, j] = q_j
                d = core_sample(np.ascontiguousarray(q_j), opts._core, seed=None,
                                seeds=[step_seed(s, j + 1) for s in seeds])  # fmt: skip
            sure = confidence(q_j, opts.temperature) >= AUTO_CONFIDENCE if self.auto else None
            self.timings["sample"] += time.perf_counter() - t_s
            drafted = [i for i in drafting if sure is None or sure[i]]
            if not drafted:
                break
            for i in drafted:
                lens[i] = j + 1
            drafting = [i for i in drafted if j + 1 < limit[i]]
            mask = lens > j if keep is None else keep
            drafts[:, j] = np.where(mask, d, pad)
            feed(j, drafted, drafts[:, j])
            j += 1
        if q is not None and j < k:
            q = np.ascontiguousarray(q[:, :j])
        return np.ascontiguousarray(drafts[:, :j]), q, lens

    def verify(self, logits: list[np.ndarray], drafts: np.ndarray, lens: np.ndarray,
               q: np.ndarray | None, seeds: list[int] | None) -> VerifyResult:  # fmt: skip
        """The core: every position's weights, acceptance, the correction or bonus token.
        ``logits``: per model [n, P, V] (large, small, experts), P = drafts.shape[1] + 1."""
        t0 = time.perf_counter()
        r = core_fuse_verify(
            logits[0], logits[1], logits[2:], drafts, lens.tolist(), self.opts._core,
            draft_logits=q if (q is not None and drafts.shape[1] > 0) else None,
            seed=None, seeds=seeds,
        )  # fmt: skip
        self.timings["fuse_verify"] += time.perf_counter() - t0
        return r

    def emit(self, r: VerifyResult, live: list[int], lens: np.ndarray,
             at: Sequence[int] | None = None) -> dict[int, int]:  # fmt: skip
        """Records each live row's emitted tokens in order (EOS, stop strings, the token limit
        end it inside the run) with their traces, counts tested and accepted drafts, moves the
        draft experts; returns each live row's last emitted token. ``at[b]``: the row of ``r``
        and ``lens`` holding batch row b (default: b)."""
        rows, batch = self.rows, len(self.rows.tokens)
        at = list(range(batch)) if at is None else at
        acc = {b: int(r.accepted[at[b]]) for b in live}
        arrays = {key: getattr(r, key) for key in _TRACE_KEYS}
        tokens = r.tokens
        column = np.zeros(batch, dtype=np.int64)
        for j in range(max(acc.values()) + 1):
            col = [b for b in rows.live() if b in acc and j <= acc[b]]
            if not col:
                break
            for b in col:
                column[b] = tokens[at[b], j]
            rows.record(column, col)
            for b in col:
                rec = self.per_row[b]
                for key, arr in arrays.items():
                    rec[key].append(arr[at[b], j])
                rec["accepted"].append(j < acc[b])
                if not rows.finished[b] and len(rows.tokens[b]) >= self.max_new_tokens:
                    rows.end(b, "length")
        for b in live:
            self.tested[b] += min(acc[b] + 1, int(lens[at[b]]))
            self.accepted[b] += acc[b]
        self.counts["drafted"] += int(sum(int(lens[at[b]]) for b in live))
        self.counts["rounds"] += 1
        if r.n_experts > 1:
            active = r.active
            for b in rows.live():
                t = int(active[at[b], acc[b]])
                if t >= 0:  # no expert active: the row keeps its draft expert
                    self.draft_of[b] = t
        return {b: int(tokens[at[b], acc[b]]) for b in live}

    def result(self, t_start: float, method: str, expert_names: list[str]) -> GenerationResult:
        """The batch's result; ``timings`` gets the counts and the acceptance."""
        timings, rows = self.timings, self.rows
        timings["forward"] = timings["draft"] + timings["verify"] + timings["prefill"]
        timings["steps"] = float(self.counts["rounds"])
        timings["large_forwards"] = float(self.counts["large_forwards"])
        timings["drafted"] = float(self.counts["drafted"])
        timings["accepted"] = float(self.accepted.sum())
        timings["tested"] = float(self.tested.sum())
        timings["acceptance"] = float(self.accepted.sum() / max(self.tested.sum(), 1))
        timings["total"] = time.perf_counter() - t_start
        alphas, traces = [], []
        n_exp = self.n_exp
        for b, rec in enumerate(self.per_row):
            n = len(rec["active"])
            alphas.append(np.asarray(rec["alphas"], np.float32).reshape(n, n_exp))
            traces.append(RowTrace(
                active=np.asarray(rec["active"], np.int64).reshape(n),
                loss=np.asarray(rec["loss"], np.float32).reshape(n),
                kl_fused_large=np.asarray(rec["kl_fused_large"], np.float32).reshape(n),
                kl_large_fused=np.asarray(rec["kl_large_fused"], np.float32).reshape(n),
                kl_expert_small=np.asarray(rec["kl_expert_small"], np.float32).reshape(n, n_exp),
                kl_small_expert=np.asarray(rec["kl_small_expert"], np.float32).reshape(n, n_exp),
                support_size=np.asarray(rec["support_size"], np.uint32).reshape(n),
                accepted_draft=np.asarray(rec["accepted"], bool).reshape(n),
                acceptance_rate=(float(self.accepted[b] / self.tested[b]) if self.tested[b]
                                 else math.nan),
            ))  # fmt: skip
        return GenerationResult(
            texts=[rows.text(b) for b in range(len(rows.tokens))], token_ids=rows.tokens,
            alphas=alphas, trace=traces, finish_reasons=rows.reasons, timings=timings,
            method=method, expert_names=list(expert_names),
        )  # fmt: skip
