"""Speculative DLF: a small expert drafts k tokens, every model verifies them in one forward.

Where it sits: :meth:`dlf_rs.FusedGenerator.generate` hands over to :func:`generate_speculative`
when ``StepOptions.speculative`` is set. Prompts, prefill and stopping are the sequential loop's
(:mod:`dlf_rs.engines.hf.runner`, :mod:`dlf_rs.stopping`); the drafting loop, seeds, emitting and
the result are shared with the llama.cpp engine (:mod:`dlf_rs.speculation`); the acceptance and
correction run in the Rust core (``_core.fuse_verify``, ``rust/verify.rs``). This module owns the
torch forwards and the caches.

One round, per batch (B rows, draft length k; with ``speculative="auto"`` each row drafts while
the draft's top probability is at least ``AUTO_CONFIDENCE``, up to ``AUTO_MAX_DRAFT`` tokens):
1. Drafting. Each row's draft is one expert: with T = 1 the expert; with T > 1 the expert that
   was active at the row's last emitted token (one-active: the expert with the non-zero weight;
   when no expert was active the row keeps its previous draft expert; static weights: the
   expert with the largest weight; at the start expert 0, or the largest static weight). The
   drafting experts run one-token forwards: the row's pending token (the last one emitted, not
   yet fed), then each drafted token in turn. Their logits are the drafts' distributions q and
   also these experts' logits for verification, computed exactly as sequential decoding does.
2. Verification forwards: the large model, the small base and every expert that drafted for no
   row run one forward over [pending, d_1 .. d_k], giving their logits at the k + 1 positions.
3. The core (``fuse_verify``) solves every position's weights as a sequential step would,
   accepts drafts up to the first disagreement and emits the fused token there (or the bonus
   token after k acceptances). Greedy: the same tokens as sequential DLF (up to the last bits of
   a multi-token forward, see docs/speculative.md). Sampling: accept with min(1, p/q), else draw from the
   normalised max(0, p - q): the same distribution as sequential DLF.
4. Emitted tokens go through EOS, stop strings and ``max_new_tokens`` one by one, so a row ends
   at the right token inside an accepted run.

KV caches (decision): rejected positions are removed, never reused. Every cache grows by the
same number of entries per round; row b keeps m_b of them (its pending token and its accepted
drafts). All caches are cropped to the longest kept run M = max m_b, and for a row with m_b < M
the M - m_b surplus columns are masked out of the attention mask (they hold rejected drafts) and
its position ids continue from its own last kept token. With B = 1, or when rows accept equally,
no column is masked and the cache is exactly sequential decoding's. Masked columns are a bounded
waste (at most k per row and round) instead of a per-row re-alignment copy of every cache each
round; a masked key gets exactly zero attention weight, so it influences nothing.

Seeds: row b's round draws from seeds derived from the row's seed and the number of tokens it
has emitted (``step_seed``), so a row's output does not depend on the batch it is in.

Not supported (refused by name): ``fast=True`` (static caches cannot be cropped per row here),
methods "large" and "expert" (nothing to fuse).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from ..._core import DlfError
from ...inputs import Inputs, warn_unknown
from ...options import StepOptions
from ...speculation import AUTO_CONFIDENCE, AUTO_MAX_DRAFT, Rounds, check_speculative
from ...stopping import Stopping
from ...streaming import DecodeLoop
from .runner import ModelRunner, ModelSlot, context_length, output_cache

__all__ = ["AUTO_CONFIDENCE", "AUTO_MAX_DRAFT", "generate_speculative"]


def _crop(cache: Any, length: int, name: str) -> None:
    """Keep the first ``length`` positions of every layer of a ``DynamicCache``."""
    layers = getattr(cache, "layers", None)
    if layers is None:  # transformers 4.x: crop() takes the final length
        cache.crop(length)
        return
    for layer in layers:
        if type(layer).__name__ != "DynamicLayer":
            raise DlfError(
                f"speculative: the {name} model's cache layer {type(layer).__name__} cannot be "
                "cropped per row (only full-attention DynamicCache layers); use speculative=None"
            )
        if getattr(layer, "keys", None) is not None and layer.keys.numel():
            layer.keys = layer.keys[..., :length, :]
            layer.values = layer.values[..., :length, :]


class _Forwards:
    """Multi-token forwards on the slots' caches, logits staged as float32 numpy."""

    def __init__(self, slots: list[ModelSlot], vocab: int, timings: dict[str, float],
                 sync: bool) -> None:  # fmt: skip
        self.slots, self.vocab, self.timings, self.sync = slots, vocab, timings, sync
        self.ctx = [context_length(s.model) for s in slots]

    def run(self, i: int, tokens: np.ndarray, key: str) -> np.ndarray:
        """Feed ``tokens`` [B, n] to slot ``i``; its logits at the n positions, [B, n, V]."""
        slot = self.slots[i]
        assert slot.attention_mask is not None and slot.last_position is not None
        t0 = time.perf_counter()
        n = tokens.shape[1]
        dev = slot.device
        steps = torch.arange(1, n + 1, device=dev).view(1, -1)
        positions = slot.last_position + steps
        # Positions past a row's draft length are rejected anyway; keep them inside the context
        # so that models with absolute position tables do not index out of range.
        ctx = self.ctx[i]
        feed_pos = positions.clamp(max=ctx - 1) if ctx is not None else positions
        slot.attention_mask = torch.cat(
            [slot.attention_mask, slot.attention_mask.new_ones((tokens.shape[0], n))], dim=-1
        )
        kwargs: dict[str, Any] = {
            "input_ids": torch.from_numpy(tokens).to(dev),
            slot.cache_kw: slot.cache,
            "use_cache": True,
        }
        # While no row is padded and no rejected column is masked, the mask is all ones and the
        # positions run on from the cache length: the model's own defaults (as in runner.py).
        in_context = ctx is None or int(positions[:, -1].max()) < ctx
        if not (slot.unpadded and in_context):
            kwargs["attention_mask"] = slot.attention_mask
            if slot.takes_position_ids:
                kwargs["position_ids"] = feed_pos
        if slot.takes_logits_to_keep:
            kwargs["logits_to_keep"] = n
        out = slot.model(**kwargs)
        slot.cache = output_cache(out)
        slot.last_position = positions[:, -1:]
        logits = out.logits[:, -n:, : self.vocab]
        if self.sync and dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t1 = time.perf_counter()
        host = logits.to(torch.float32).cpu().numpy()
        t2 = time.perf_counter()
        self.timings[key] += t1 - t0
        self.timings[f"forward:{slot.name}"] += t1 - t0
        self.timings["copy"] += t2 - t1
        return host


def generate_speculative(
    gen: Any,
    opts: StepOptions,
    inputs: Inputs,
    max_new_tokens: int,
    seeds_of_rows: list[int] | None,
    stops: list[str],
    t_start: float,
) -> DecodeLoop:
    """Speculative DLF for one batch of :meth:`FusedGenerator.generate` (arguments already
    checked there): yields the row state after every round (a stream's consumer runs there,
    outside inference mode), returns the batch's result."""
    check_speculative(opts)
    if gen.fast:
        raise DlfError(
            "speculative: not available with fast=True (its static caches are not cropped per "
            "row); build the generator with fast=False"
        )
    batch, n_exp, vocab = inputs.batch, len(gen.experts), gen.vocab_size
    slots = [ModelSlot.of(name, model, inputs.for_model(name), None)
             for name, model in gen._named_models()]  # fmt: skip
    timings = {"prefill": 0.0, "forward": 0.0, "draft": 0.0, "verify": 0.0, "copy": 0.0,
               "fuse_verify": 0.0, "sample": 0.0, "crop": 0.0}  # fmt: skip
    staging = gen._staging_for(len(slots), batch)
    runner = ModelRunner(slots, staging, timings, gen._tokenize, gen.pad_token_id, None,
                         gen._side_stream, gen.sync_timings)  # fmt: skip
    ids = [runner.prompt_ids(slot, max_new_tokens) for slot in slots]
    warn_unknown(gen.tokenizer, ids[0], inputs.for_model("large"), "large")
    rows = Stopping(batch, gen.tokenizer, gen.eos_token_ids, stops)
    fwd = _Forwards(slots, vocab, timings, gen.sync_timings)
    rounds = Rounds(opts, rows, n_exp, max_new_tokens, seeds_of_rows, timings)
    pad = gen.pad_token_id

    outer_grad = torch.is_grad_enabled()
    with torch.inference_mode():
        t0 = time.perf_counter()
        runner.prefill(ids, max_new_tokens)
        staging.wait()
        first_logits: list[np.ndarray] | None = [np.array(v) for v in staging.views()]
        timings["copy"] += time.perf_counter() - t0
        pending: np.ndarray | None = None
        while not rows.all_finished():
            live = rows.live()
            k, limit_of, live_seeds = rounds.plan(live)
            # Every row of the batch goes to the core (finished rows draft nothing).
            limit = np.zeros(batch, dtype=np.int64)
            bases: list[int] | None = None
            if live_seeds is not None:
                bases = [0] * batch
                for b, s in zip(live, live_seeds):
                    bases[b] = s
            for b in live:
                limit[b] = limit_of[b]
            draft_of = rounds.draft_of
            drafters = sorted({int(draft_of[b]) for b in live})
            logits = [np.empty((batch, k + 1, vocab), dtype=np.float32) for _ in slots]
            if first_logits is not None:
                for i, z in enumerate(first_logits):
                    logits[i][:, 0] = z
                first_logits = None
            width = slots[0].attention_mask.shape[1]  # type: ignore[union-attr]

            # 1. Drafting: one-token forwards of the drafting experts (every row: one cache).
            if pending is not None:
                for t in drafters:
                    logits[2 + t][:, 0:1] = fwd.run(2 + t, pending.reshape(-1, 1), "draft")
            # Rows that ended read any drafting expert (their drafts are ignored).
            src = [int(draft_of[b]) if not rows.finished[b] else drafters[0] for b in range(batch)]

            def q_at(j: int, logits: list[np.ndarray] = logits, drafters: list[int] = drafters,
                     src: list[int] = src) -> np.ndarray:  # fmt: skip
                if len(drafters) == 1:
                    return logits[2 + drafters[0]][:, j]
                return np.stack([logits[2 + src[b]][b, j] for b in range(batch)])

            def feed(j: int, _rows: list[int], tokens: np.ndarray,
                     logits: list[np.ndarray] = logits, drafters: list[int] = drafters) -> None:  # fmt: skip
                for t in drafters:
                    logits[2 + t][:, j + 1 : j + 2] = fwd.run(2 + t, tokens.reshape(-1, 1), "draft")

            drafts, q, lens = rounds.draft(k, limit, q_at, feed, bases, pad, keep=~rows.finished)
            positions = drafts.shape[1] + 1
            n_feed = positions - 1 + (1 if pending is not None else 0)
            if positions < k + 1:
                logits = [np.ascontiguousarray(z[:, :positions]) for z in logits]

            # 2. Verification forwards: every other model over [pending, d_1 .. d_k].
            feed_ids = drafts if pending is None else np.concatenate([pending[:, None], drafts], 1)
            lo = positions - n_feed
            for i in range(len(slots)):
                if i >= 2 and (i - 2) in drafters:
                    continue
                if n_feed:
                    logits[i][:, lo:] = fwd.run(i, feed_ids, "verify")
            rounds.counts["large_forwards"] += 1 if n_feed else 0

            # 3. The core: weights per position, acceptance, correction or bonus.
            r = rounds.verify(logits, drafts, lens, q, bases)

            # 4. Emit, stop, and drop the rejected positions from every cache.
            acc = r.accepted
            pending_fed = pending is not None
            last = rounds.emit(r, live, lens)
            pending = np.full(batch, pad, dtype=np.int64)
            for b, tok in last.items():
                pending[b] = tok
            t0 = time.perf_counter()
            if rows.live():
                kept = np.array([(1 if pending_fed else 0) + int(acc[b]) for b in range(batch)])
                kept_max = max(int(kept[b]) for b in live)
                kept = np.where(np.isin(np.arange(batch), live), kept, kept_max)
                _drop_rejected(slots, width, n_feed, kept, kept_max)
            pending = np.where(rows.finished, pad, pending)
            timings["crop"] += time.perf_counter() - t0
            if not rows.all_finished():
                with torch.inference_mode(False), torch.set_grad_enabled(outer_grad):
                    yield rows

    return rounds.result(t_start, opts.method, list(gen.expert_names))


def _drop_rejected(slots: list[ModelSlot], width: int, n_feed: int, kept: np.ndarray,
                   kept_max: int) -> None:  # fmt: skip
    """Crop every cache to ``width + kept_max`` and mask each row's surplus columns; each row's
    next position follows its last kept token."""
    new_len = width + kept_max
    holes = bool((kept < kept_max).any())  # never with B = 1 or equal acceptance
    for slot in slots:
        assert slot.attention_mask is not None and slot.last_position is not None
        _crop(slot.cache, new_len, slot.name)
        mask = slot.attention_mask[:, :new_len]
        kept_t = torch.from_numpy(kept).to(mask.device).view(-1, 1)
        if holes:
            slot.unpadded = False  # masked columns from now on: the mask must be passed
            mask = mask.clone()
            cols = torch.arange(new_len, device=mask.device).view(1, -1)
            mask[cols >= width + kept_t] = 0
        slot.attention_mask = mask
        # last_position advanced by n_feed in the forwards; back to the last kept token.
        slot.last_position = slot.last_position - (n_feed - kept_t)
