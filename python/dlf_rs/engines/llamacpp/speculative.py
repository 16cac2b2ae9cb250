"""Speculative DLF on llama.cpp: :meth:`LlamaCppGenerator.generate` with ``speculative=k`` or
``"auto"``.

Where it sits: :class:`.generate.LlamaCppGenerator` hands a batch over to
:func:`decode_speculative` when ``StepOptions.speculative`` is set. What to draft, the core's
verification (``_core.fuse_verify``), emitting, seeds and the result are shared with
:class:`dlf_rs.FusedGenerator` (:mod:`dlf_rs.speculation`; the design is in
:mod:`dlf_rs.engines.hf.speculative` and docs/speculative.md). This module runs the members on
llama.cpp.

One round over the live rows (each row one KV sequence, as in sequential decoding):
1. Drafting: each drafting expert evaluates every live row's pending token (the last one
   emitted, not yet fed) in one ``llama_decode``, then, per drafted position, the rows that
   drafted a token there (one-token decodes, as sequential decoding runs them). Their logits are
   the drafts' distributions and these experts' verification logits.
2. Verification: the large model, the small base and every expert that drafted for no row
   evaluate each live row's [pending, d_1 .. d_m] (m its own draft length) in one
   ``llama_decode`` with logits at every position.
3. The core accepts, corrects, emits (shared). Row b keeps its pending token and its accepted
   drafts in every member's KV; the rest of its positions are removed with
   ``llama_memory_seq_rm`` (:meth:`.native.Context.truncate`), so the next round writes at the
   position after its last kept token.

KV layout: the sequential loop's (with one row llama.cpp's ordinary cache, with several one cache
per sequence, ``kv_unified=False``). Speculation needs it all the more: removing a row's rejected
drafts frees cells, and in a cache shared by the rows llama.cpp would put the next tokens of any
row into the first free cells, out of that row's position order. In its own cache a row's cells
are reused in position order: each row's layout is that of decoding it alone.

Not supported: methods "large" and "expert" (nothing to fuse; refused by name, as in
FusedGenerator).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ...inputs import Inputs
from ...options import StepOptions
from ...speculation import Rounds, check_speculative
from ...stopping import Stopping
from ...streaming import DecodeLoop

__all__ = ["decode_speculative"]


def decode_speculative(gen: Any, opts: StepOptions, inputs: Inputs, max_new_tokens: int,
                       seeds_of_rows: list[int] | None, stops: list[str],
                       t_start: float) -> DecodeLoop:  # fmt: skip
    """Speculative DLF for one batch of :meth:`LlamaCppGenerator.generate` (arguments already
    checked there): yields the row state after every round, returns the batch's result."""
    check_speculative(opts)
    batch, vocab = inputs.batch, gen.vocab_size
    names = gen._names()
    ids = {name: gen._tokenize(inputs.for_model(name)) for name in names}
    for name in names:
        gen._check_length(name, ids[name], max_new_tokens)
    unified = batch == 1  # one row: llama.cpp's ordinary cache (one sequence either way)
    ctxs = []
    for name in names:
        per_row = [len(r) + max_new_tokens for r in ids[name]]
        need = per_row[0] if unified else batch * max(per_row)
        ctxs.append(gen._context(name, need, batch, unified=unified))
    gen._plan(names, ctxs, parallel=False)  # every member in turn on every thread
    timings: dict[str, float] = {"prefill": 0.0, "forward": 0.0, "draft": 0.0, "verify": 0.0,
                                 "copy": 0.0, "fuse_verify": 0.0, "sample": 0.0, "crop": 0.0}  # fmt: skip
    rows = Stopping(batch, gen.tokenizer, gen.eos_token_ids, stops)
    rounds = Rounds(opts, rows, len(gen.experts), max_new_tokens, seeds_of_rows, timings)
    members = _Members(ctxs, names, timings)

    # Prefill: position 0 of the first round (copies: the next decode reuses llama.cpp's buffer).
    first: list[np.ndarray] | None = [
        np.array(members.run(i, "prefill", list(range(batch)), ids[name], every=False))
        for i, name in enumerate(names)
    ]
    members.start()
    pending: dict[int, int] | None = None
    pad = 0  # drafts past a row's draft length (never fed, never read)
    while not rows.all_finished():
        live = rows.live()
        n = len(live)
        k, limit_of, seeds = rounds.plan(live)
        limit = np.array([limit_of[b] for b in live], dtype=np.int64)
        draft_of = rounds.draft_of
        drafters = sorted({int(draft_of[b]) for b in live})
        logits = [np.empty((n, k + 1, vocab), dtype=np.float32) for _ in names]
        if first is not None:  # the first round: every row is live
            for i, z in enumerate(first):
                logits[i][:, 0] = z
            first = None

        # 1. Drafting: one-token decodes of the drafting experts.
        if pending is not None:
            for t in drafters:
                logits[2 + t][:, 0] = members.run(2 + t, "draft", live,
                                                  [[pending[b]] for b in live], every=False)  # fmt: skip
        src = [2 + int(draft_of[b]) for b in live]

        def q_at(j: int, logits: list[np.ndarray] = logits, drafters: list[int] = drafters,
                 src: list[int] = src) -> np.ndarray:  # fmt: skip
            if len(drafters) == 1:
                return logits[2 + drafters[0]][:, j]
            return np.stack([logits[s][i, j] for i, s in enumerate(src)])

        def feed(j: int, drafted: list[int], tokens: np.ndarray, logits: list[np.ndarray] = logits,
                 drafters: list[int] = drafters, live: list[int] = live) -> None:  # fmt: skip
            seqs = [live[i] for i in drafted]
            toks = [[int(tokens[i])] for i in drafted]
            for t in drafters:
                logits[2 + t][drafted, j + 1] = members.run(2 + t, "draft", seqs, toks,
                                                            every=False)  # fmt: skip

        drafts, q, lens = rounds.draft(k, limit, q_at, feed, seeds, pad)
        positions = drafts.shape[1] + 1
        if positions < k + 1:
            logits = [np.ascontiguousarray(z[:, :positions]) for z in logits]

        # 2. Verification: every other member over each row's [pending, d_1 .. d_m].
        lo = 0 if pending is not None else 1
        feeds = [([pending[b]] if pending is not None else []) + drafts[i, : lens[i]].tolist()
                 for i, b in enumerate(live)]  # fmt: skip
        fed_rows = [i for i in range(n) if feeds[i]]
        if fed_rows:
            seqs = [live[i] for i in fed_rows]
            toks = [feeds[i] for i in fed_rows]
            for m in range(len(names)):
                if m >= 2 and (m - 2) in drafters:
                    continue
                out = members.run(m, "verify", seqs, toks, every=True)
                t0 = time.perf_counter()
                at = 0
                for i in fed_rows:
                    w = len(feeds[i])
                    logits[m][i, lo : lo + w] = out[at : at + w]
                    at += w
                timings["copy"] += time.perf_counter() - t0
            rounds.counts["large_forwards"] += 1

        # 3. The core: weights per position, acceptance, correction or bonus.
        r = rounds.verify(logits, drafts, lens, q, seeds)

        # 4. Emit, stop, and drop the rejected positions from every member's KV.
        index = [0] * batch
        for i, b in enumerate(live):
            index[b] = i
        last = rounds.emit(r, live, lens, at=index)
        acc = r.accepted
        kept = {b: (1 if pending is not None else 0) + int(acc[index[b]])
                for b in rows.live()}  # fmt: skip
        t0 = time.perf_counter()
        members.keep(kept)
        timings["crop"] += time.perf_counter() - t0
        pending = {b: last[b] for b in rows.live()}
        if not rows.all_finished():
            yield rows

    return rounds.result(t_start, opts.method, list(gen.expert_names))


class _Members:
    """The members' contexts with each row's kept length and its written length per member."""

    def __init__(self, ctxs: list[Any], names: list[str], timings: dict[str, float]) -> None:
        self.ctxs, self.names, self.timings = ctxs, names, timings
        self.kept: list[dict[int, int]] = [{} for _ in ctxs]  # positions kept in the KV
        self.cursor: list[dict[int, int]] = [{} for _ in ctxs]  # positions written

    def run(self, i: int, key: str, seqs: list[int], tokens: list[list[int]],
            every: bool) -> np.ndarray:  # fmt: skip
        """Member i evaluates ``tokens[j]`` after what row ``seqs[j]`` has written; the logits
        at each row's last token (``every``: at every token), llama.cpp's buffer."""
        t0 = time.perf_counter()
        cur = self.cursor[i]
        starts = [cur.get(b, 0) for b in seqs]
        ctx = self.ctxs[i]
        out = (ctx.decode_all if every else ctx.decode)(seqs, tokens, starts)
        for b, t in zip(seqs, tokens):
            cur[b] = cur.get(b, 0) + len(t)
        dt = time.perf_counter() - t0
        self.timings[key] += dt
        name = f"forward:{self.names[i]}"
        self.timings[name] = self.timings.get(name, 0.0) + dt
        return np.asarray(out)

    def start(self) -> None:
        """After the prefill: every member keeps its prompts."""
        self.kept = [dict(c) for c in self.cursor]

    def keep(self, kept: dict[int, int]) -> None:
        """Row b keeps ``kept[b]`` more positions than at the round's start in every member;
        the positions written after them are removed."""
        for i, ctx in enumerate(self.ctxs):
            for b, n in kept.items():
                length = self.kept[i][b] + n
                if self.cursor[i][b] > length:
                    ctx.truncate(b, length)
                self.kept[i][b] = self.cursor[i][b] = length
