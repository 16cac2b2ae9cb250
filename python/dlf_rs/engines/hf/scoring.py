"""Fused scoring: log-probabilities of given continuations under DLF, static fusion or one model.

Where it sits: beside the decode loop (``dlf_rs.engines.hf.generate``), on the same generator and the same
core. Decoding asks "which token next?" one position at a time; scoring asks "how likely is this
known continuation?", so every position is known in advance and each model runs ONE forward over
context + continuation (all positions at once, a left-padded batch with its attention mask and
position ids). The logits at the continuation positions become the rows of one core call:
``fuse_step`` solves the weights of every position exactly as decoding would from that position's
three distributions (or takes the static ones) and writes the fused logits (``fused_out``), and a
float64 log-softmax gives the log-probabilities. This is what lm-evaluation-harness's
``loglikelihood`` needs (``dlf_rs.harness``) and what perplexity needs (:func:`score_rolling`).

Decisions:
- Tokens: a context is tokenized like a generation prompt (special tokens added); the
  continuation's tokens are those the tokenizer gives for context + continuation after the
  context's tokens (lm-evaluation-harness's rule, so merges across the boundary are honoured),
  falling back to the continuation tokenized alone when the context's tokens are not a prefix.
- Length: a pair longer than the shortest model context keeps its continuation and drops context
  tokens from the left (lm-evaluation-harness's rule); a continuation that alone does not fit is
  refused: use :func:`score_rolling` for long texts.
- ``is_greedy``: every continuation token is the token greedy decoding would emit there (the
  core's greedy token of the fused logits; the argmax, lowest index on ties, for one model).
- Alphas: [n_tokens, T]; zeros for method "large", NaN for "expert" (as ``generate`` reports).
- Options are passed straight through to ``fuse_step`` under their own names; nothing here
  re-defaults them beyond the signature.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ...options import StepOptions
from ...step import fuse_step
from .runner import context_length, forward_params, model_device

__all__ = [
    "METHODS", "NextTokenLogits", "ScoreResult", "context_limit", "log_softmax64",
    "next_token_logits",
    "rolling_windows", "score", "score_ids", "score_rolling",
]

METHODS = ("dlf", "static", "large", "expert")


@dataclass
class ScoreResult:
    """The fused log-probabilities of one continuation (one entry per continuation token)."""

    token_ids: list[int]  # the continuation's tokens
    logprobs: np.ndarray  # float64[n_tokens], log p(token | everything before it)
    total: float  # sum of logprobs (float64)
    is_greedy: bool  # every token is the fused greedy token at its position
    alphas: np.ndarray  # float32[n_tokens, T], the weights used at each position
    truncated: int = 0  # context tokens dropped from the left to fit the context length


def _takes(model: Any, name: str) -> bool:
    return name in forward_params(model)


def _models(gen: Any, method: str, expert: int | None) -> list[Any]:
    """The models a method runs, in core order: large, small, experts (or the single one)."""
    if method not in METHODS:
        raise ValueError(f"method: unknown {method!r}; expected one of {', '.join(METHODS)}")
    n_exp = len(gen.experts)
    if method == "expert":
        if expert is None:
            raise ValueError("expert: method='expert' needs the index of the expert to run")
        if isinstance(expert, bool) or not isinstance(expert, (int, np.integer)):
            raise TypeError(f"expert: expected an int index, got {type(expert).__name__}")
        if not 0 <= expert < n_exp:
            raise ValueError(f"expert: index {expert} out of range for {n_exp} experts")
        return [gen.experts[int(expert)]]
    if expert is not None:
        raise ValueError(f"expert: only used by method='expert' (method={method!r})")
    if method == "large":
        return [gen.large]
    if gen.small is None:
        raise ValueError(f"small: method={method!r} needs the small base model")
    if n_exp == 0:
        raise ValueError(f"experts: method={method!r} needs at least one expert")
    return [gen.large, gen.small, *gen.experts]


def context_limit(gen: Any, method: str = "dlf", expert: int | None = None) -> int | None:
    """The longest input (tokens) every model of ``method`` accepts, or None if unknown."""
    lengths = [n for m in _models(gen, method, expert) if (n := context_length(m)) is not None]
    return min(lengths) if lengths else None


def _encode(gen: Any, text: str, special: bool) -> list[int]:
    return [int(t) for t in gen.tokenizer(text, add_special_tokens=special)["input_ids"]]


def _split_pair(gen: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    ctx = _encode(gen, context, True)
    whole = _encode(gen, context + continuation, True)
    if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
        return ctx, whole[len(ctx) :]
    return ctx, _encode(gen, continuation, False)


def _continuation_logits(
    model: Any, rows: list[list[int]], keep: int, pad_id: int, vocab: int
) -> np.ndarray:
    """Float32 logits [B, keep, vocab] of the last ``keep`` positions of each left-padded row."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[b, width - len(row) :] = 1
    dev = model_device(model)
    kwargs: dict[str, Any] = {"input_ids": ids.to(dev), "attention_mask": mask.to(dev)}
    if _takes(model, "position_ids"):
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0).to(dev)
    if _takes(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = keep  # only the scored positions reach the LM head
    if _takes(model, "use_cache"):
        kwargs["use_cache"] = False
    logits = model(**kwargs).logits[:, -keep:, :vocab]
    return np.ascontiguousarray(logits.float().cpu().numpy())


def log_softmax64(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    m = np.max(z, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)  # an all -inf row stays -inf, never NaN
    shifted = z - m
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def _score_batch(
    gen: Any,
    models: list[Any],
    pairs: list[tuple[list[int], list[int]]],
    method: str,
    fuse_options: dict[str, Any],
    n_exp: int,
) -> list[ScoreResult]:
    rows = [ctx + cont[:-1] for ctx, cont in pairs]
    keep = max(len(cont) for _, cont in pairs)
    with torch.inference_mode():
        per_model = [
            _continuation_logits(m, rows, keep, gen.pad_token_id, gen.vocab_size) for m in models
        ]
    # Row b's continuation occupies the last len(cont_b) of the kept positions.
    sel_b = np.concatenate([np.full(len(c), b) for b, (_, c) in enumerate(pairs)])
    sel_p = np.concatenate([np.arange(keep - len(c), keep) for _, c in pairs])
    flat = [np.ascontiguousarray(z[sel_b, sel_p]) for z in per_model]  # [N, V] each
    targets = np.concatenate([np.asarray(c, dtype=np.int64) for _, c in pairs])
    if method in ("dlf", "static"):
        # The core writes the fused logits it builds anyway (no second fusion here).
        fused = np.empty_like(flat[0])
        res = fuse_step(flat[0], flat[1], flat[2:], fused_out=fused, **fuse_options)
        alphas = np.asarray(res.alphas, dtype=np.float32).reshape(len(targets), n_exp)
        greedy = np.asarray(res.tokens, dtype=np.int64)
    else:
        fused = flat[0]
        fill = 0.0 if method == "large" else np.nan
        alphas = np.full((len(targets), n_exp), fill, dtype=np.float32)
        greedy = np.argmax(fused, axis=-1)
    logp = log_softmax64(fused)[np.arange(len(targets)), targets]
    out: list[ScoreResult] = []
    start = 0
    for ctx, cont in pairs:
        sl = slice(start, start + len(cont))
        start += len(cont)
        out.append(
            ScoreResult(
                token_ids=list(cont),
                logprobs=logp[sl].copy(),
                total=float(np.sum(logp[sl])),
                is_greedy=bool(np.all(greedy[sl] == targets[sl])),
                alphas=alphas[sl].copy(),
            )
        )
    return out


def score_ids(
    gen: Any,
    contexts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    options: StepOptions | None = None,
    *,
    batch_size: int = 16,
    **overrides: Any,
) -> list[ScoreResult]:
    """:func:`score` on token ids: ``contexts[i]`` (at least one token) and ``continuations[i]``
    (at least one token) are lists of ints of ``gen.tokenizer``. Batches are formed in the given
    order, ``batch_size`` pairs per forward."""
    if len(contexts) != len(continuations):
        raise ValueError(
            f"continuations: {len(continuations)} continuations for {len(contexts)} contexts"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise TypeError(f"batch_size: expected an int, got {type(batch_size).__name__}")
    if batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size}")
    opts = StepOptions.build(options, **overrides)
    method, expert = opts.method, opts.expert
    models = _models(gen, method, expert)
    fuse_options: dict[str, Any] = {"options": opts} if opts.fused else {}
    limit = context_limit(gen, method, expert)
    pairs: list[tuple[list[int], list[int]]] = []
    dropped: list[int] = []
    for i, (ctx, cont) in enumerate(zip(contexts, continuations)):
        ctx_l, cont_l = [int(t) for t in ctx], [int(t) for t in cont]
        if not ctx_l:
            raise ValueError(f"contexts[{i}]: no tokens (a context needs at least one, e.g. BOS)")
        if not cont_l:
            raise ValueError(f"continuations[{i}]: no tokens to score")
        cut = 0
        if limit is not None and len(ctx_l) + len(cont_l) - 1 > limit:
            if len(cont_l) > limit:
                raise ValueError(
                    f"continuations[{i}]: {len(cont_l)} tokens exceed the models' context of "
                    f"{limit} tokens; use score_rolling for long texts"
                )
            cut = len(ctx_l) + len(cont_l) - 1 - limit
            ctx_l = ctx_l[cut:]
        pairs.append((ctx_l, cont_l))
        dropped.append(cut)
    out: list[ScoreResult] = []
    for start in range(0, len(pairs), int(batch_size)):
        out += _score_batch(
            gen, models, pairs[start : start + int(batch_size)], method, fuse_options,
            len(gen.experts),
        )
    for res, cut in zip(out, dropped):
        res.truncated = cut
    return out


def score(
    gen: Any,
    contexts: str | Sequence[str],
    continuations: str | Sequence[str],
    options: StepOptions | None = None,
    *,
    batch_size: int = 16,
    **overrides: Any,
) -> list[ScoreResult]:
    """Log-probabilities of ``continuations[i]`` after ``contexts[i]`` under the fused model.

    ``options`` (a :class:`dlf_rs.StepOptions`) and/or its fields as keywords, as in
    ``generate``: ``method`` "dlf" (weights solved at every continuation position from the three
    distributions there, as decoding would), "static" (fixed ``alpha``), "large" (L alone) or
    "expert" (expert number ``expert`` alone); the solver fields go to ``fuse_step`` unchanged
    (the sampling fields do not matter for scoring). One forward per model and batch of
    ``batch_size`` pairs; one core call per batch over all continuation positions.
    Returns one :class:`ScoreResult` per pair, in order.
    """
    ctxs = [contexts] if isinstance(contexts, str) else list(contexts)
    conts = [continuations] if isinstance(continuations, str) else list(continuations)
    if len(ctxs) != len(conts):
        raise ValueError(f"continuations: {len(conts)} continuations for {len(ctxs)} contexts")
    ids_ctx: list[list[int]] = []
    ids_cont: list[list[int]] = []
    for i, (c, x) in enumerate(zip(ctxs, conts)):
        if not isinstance(c, str) or not isinstance(x, str):
            raise TypeError(f"contexts[{i}], continuations[{i}]: expected strings")
        a, b = _split_pair(gen, c, x)
        ids_ctx.append(a)
        ids_cont.append(b)
    return score_ids(gen, ids_ctx, ids_cont, StepOptions.build(options, **overrides),
                     batch_size=batch_size)  # fmt: skip


@dataclass
class NextTokenLogits:
    """Each model's logits for the token after each prompt: float32 ``[B, V]`` per model, keyed
    by the generator's member names ("large", "small", "expert:<i>"), for the models the method
    runs. :meth:`members` gives them in ``fuse_step``'s order."""

    logits: dict[str, np.ndarray]
    prompt_ids: dict[str, list[list[int]]]  # the token ids each model read

    def members(self) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """``(large, small, experts)`` for :func:`dlf_rs.fuse_step`."""
        if "large" not in self.logits or "small" not in self.logits:
            raise ValueError(
                f"method: members() needs the logits of every member (method 'dlf' or "
                f"'static'), got {', '.join(self.logits)}"
            )
        experts = sorted((k for k in self.logits if k.startswith("expert:")),
                         key=lambda k: int(k.split(":")[1]))  # fmt: skip
        return self.logits["large"], self.logits["small"], [self.logits[k] for k in experts]


def next_token_logits(
    gen: Any,
    prompt_ids: Mapping[str, Sequence[Sequence[int]]],
    method: str = "dlf",
    expert: int | None = None,
    *,
    batch_size: int = 16,
) -> NextTokenLogits:
    """One forward per model over each prompt, no decoding: the logits at the position after
    its last token (what the first step of ``generate`` fuses). ``prompt_ids``: each model's
    token ids by member name (every model the method runs). Fusing these with
    :func:`dlf_rs.fuse_step` under several option sets costs one forward per model in all,
    where ``generate(max_new_tokens=1)`` would run the forwards again for each set.
    A prompt past a model's context is refused (error naming ``prompts[b]``)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise TypeError(f"batch_size: expected an int, got {type(batch_size).__name__}")
    if batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size}")
    models = _models(gen, method, expert)
    if method == "expert":
        names = [f"expert:{int(expert)}"]  # type: ignore[arg-type]
    else:
        names = ["large", "small", *(f"expert:{i}" for i in range(len(gen.experts)))]
        names = names[: len(models)]
    out: dict[str, np.ndarray] = {}
    ids_out: dict[str, list[list[int]]] = {}
    for name, model in zip(names, models):
        ids = [[int(t) for t in row] for row in prompt_ids[name]]
        limit = context_length(model)
        for b, row in enumerate(ids):
            if not row:
                raise ValueError(f"prompts[{b}]: tokenizes to no tokens for the {name} model")
            if limit is not None and len(row) > limit:
                raise ValueError(f"prompts[{b}]: {len(row)} tokens exceed the {name} model's "
                                 f"context of {limit} tokens")  # fmt: skip
        parts = []
        with torch.inference_mode():
            for lo in range(0, len(ids), int(batch_size)):
                chunk = ids[lo : lo + int(batch_size)]
                z = _continuation_logits(model, chunk, 1, gen.pad_token_id, gen.vocab_size)
                parts.append(z[:, 0])
        out[name] = np.ascontiguousarray(np.concatenate(parts, axis=0))
        ids_out[name] = ids
    return NextTokenLogits(out, ids_out)


def rolling_windows(n_tokens: int, max_len: int) -> list[tuple[int, int, int]]:
    """Windows ``(a, start, end)`` over ``full = [prefix] + tokens``: the window's input is
    ``full[a:end]`` and it scores ``tokens[start:end]`` (= ``full[start + 1 : end + 1]``). Every
    token is scored exactly once, each with as much context as ``max_len`` input tokens allow
    (lm-evaluation-harness's rolling windows)."""
    if max_len < 1:
        raise ValueError(f"max_length: expected an int >= 1, got {max_len}")
    out = []
    start = 0
    while start < n_tokens:
        end = min(start + max_len, n_tokens)
        out.append((max(0, end - max_len), start, end))
        start = end
    return out


def score_rolling(
    gen: Any,
    texts: str | Sequence[str],
    options: StepOptions | None = None,
    *,
    batch_size: int = 16,
    max_length: int | None = None,
    prefix_token_id: int | None = None,
    **overrides: Any,
) -> list[ScoreResult]:
    """Rolling log-likelihood of whole texts (perplexity): every token of ``texts[i]`` (tokenized
    without special tokens) is scored once after ``prefix_token_id`` (default: BOS, else EOS) and
    as many previous tokens as fit ``max_length`` (default: the shortest model context). Texts
    longer than that are cut into windows. Returns one result per text (all its tokens)."""
    opts = StepOptions.build(options, **overrides)
    items = [texts] if isinstance(texts, str) else list(texts)
    if prefix_token_id is None:
        tok = gen.tokenizer
        prefix_token_id = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if prefix_token_id is None:
            raise ValueError("prefix_token_id: the tokenizer has no BOS or EOS token; pass one")
    limit = max_length if max_length is not None else context_limit(gen, opts.method, opts.expert)
    if limit is None:
        raise ValueError("max_length: the models do not state a context length; pass one")
    ctxs: list[list[int]] = []
    conts: list[list[int]] = []
    owner: list[int] = []
    for i, text in enumerate(items):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}]: expected a string, got {type(text).__name__}")
        ids = _encode(gen, text, False)
        if not ids:
            raise ValueError(f"texts[{i}]: tokenizes to no tokens")
        full = [int(prefix_token_id), *ids]
        for a, start, end in rolling_windows(len(ids), int(limit)):
            ctxs.append(full[a : start + 1])
            conts.append(full[start + 1 : end + 1])
            owner.append(i)
    parts = score_ids(gen, ctxs, conts, opts, batch_size=batch_size)
    out: list[ScoreResult] = []
    for i in range(len(items)):
        mine = [p for p, o in zip(parts, owner) if o == i]
        logp = np.concatenate([p.logprobs for p in mine])
        out.append(
            ScoreResult(
                token_ids=[t for p in mine for t in p.token_ids],
                logprobs=logp,
                total=float(np.sum(logp)),
                is_greedy=all(p.is_greedy for p in mine),
                alphas=np.concatenate([p.alphas for p in mine]),
            )
        )
    return out
