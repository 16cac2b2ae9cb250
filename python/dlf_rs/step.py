"""The checked step API: ``fuse_step``, ``fuse_logits`` and ``sample`` over numpy or torch.

Where it sits: between the caller and the Rust extension ``dlf_rs._core``. It builds the options
record (:class:`dlf_rs.options.StepOptions`), turns the logits into C-contiguous float32 numpy
arrays (:mod:`dlf_rs.arrays`) and calls the core, which borrows them without copying, checks
values and shapes, and runs the whole batch with the GIL released. The core's errors reach the
caller unchanged. The generation loop calls :func:`fuse_step_prepared` instead: its staging
buffers are already float32 and its options already checked.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._core import DlfError, StepResult
from ._core import fuse_logits as core_fuse_logits
from ._core import fuse_step as core_fuse_step
from ._core import sample as core_sample
from .arrays import as_f32, experts_f32, history_arrays, torch_to_numpy
from .options import StepOptions, check_real, check_seed

__all__ = ["fuse_logits", "fuse_step", "fuse_step_prepared", "sample"]


def _seed_kwargs(seed: object) -> dict[str, Any]:
    checked = check_seed(seed)
    if checked is None:
        return {}
    if isinstance(checked, tuple):
        return {"seeds": list(checked)}
    return {"seed": checked}


def _history_kwargs(history: object, options: StepOptions) -> dict[str, Any]:
    """The core's ``history`` / ``history_offsets`` keywords; nothing (and no look at
    ``history``) when no penalty is active, so such calls are unchanged. An active penalty
    without a history is the core's error (naming ``history``)."""
    if history is None or not options.penalized:
        return {}
    ids, offsets = history_arrays(history)
    return {"history": ids, "history_offsets": offsets}


def fuse_step_prepared(
    large: np.ndarray,
    small: np.ndarray,
    experts: list[np.ndarray],
    options: StepOptions,
    seeds: list[int] | None,
    history: Any = None,
    fused_out: np.ndarray | None = None,
) -> StepResult:
    """``fuse_step`` for callers that hold float32 C-contiguous arrays and a checked record
    (the generation loop): no conversion, no re-validation of the record in Python.

    ``history`` as in :func:`fuse_step`; cheapest as an int64 C-contiguous ``[B, L]`` array
    padded with -1 (passed without a copy), e.g. a buffer the loop fills in place.
    ``fused_out``: as in :func:`fuse_step` (a numpy array only).
    """
    if history is None and fused_out is None:  # the loop's common case: not one more call
        return core_fuse_step(large, small, experts, options._core, seed=None, seeds=seeds)
    return core_fuse_step(
        large, small, experts, options._core, seed=None, seeds=seeds,
        fused_out=fused_out, **_history_kwargs(history, options),
    )  # fmt: skip


def _output_array(x: Any, name: str) -> Any:
    """A caller's output buffer as the numpy array the core writes into: an ndarray as is, a
    CPU float32 tensor as a view of its memory (never a copy: the writes must reach it).
    The core checks shape, dtype, layout and writability (errors naming ``name``)."""
    if type(x).__module__.split(".")[0] != "torch":
        return x
    import torch

    if x.layout != torch.strided or x.device.type != "cpu" or x.dtype != torch.float32:
        raise TypeError(
            f"{name}: expected a float32 numpy array or dense CPU float32 tensor, got a "
            f"{x.dtype} tensor on {x.device} ({x.layout})"
        )
    if x.requires_grad:
        raise TypeError(f"{name}: expected a tensor that does not require grad")
    return x.numpy()


def fuse_step(
    large: Any,
    small: Any,
    experts: Any,
    options: StepOptions | None = None,
    *,
    seed: int | list[int] | None = None,
    history: Any = None,
    fused_out: Any = None,
    **overrides: Any,
) -> StepResult:
    """One Dynamic Logit Fusion decoding step for a batch.

    large, small: float32 logits [B, V] of the large model and its small base; experts: a
    [T, B, V] array or a list of T [B, V] arrays (small fine-tuned experts). numpy arrays or CPU
    torch tensors (see :mod:`dlf_rs.arrays` for conversions).

    ``options`` (a :class:`StepOptions`) and/or its fields as keywords (``alpha``, ``solver``,
    ``support_k``, ``alpha_range``, ``grid_step``, ``multi_expert``, ``temperature``, ``top_k``,
    ``top_p``, ``min_p``; keywords override the record). Without ``alpha`` the weights are solved
    per row (the paper's Algorithm 1 on the full vocabulary by default); with ``alpha`` they are
    fixed (proxy-tuning: ``alpha=1.0``). Methods "large"/"expert" are for the generator; here use
    :func:`sample` on one model's logits.

    ``seed``: None (fresh entropy), an int (row b draws from stream b), or B ints (one per row).

    ``history``: the tokens each row has seen, for ``repetition_penalty``,
    ``frequency_penalty`` and ``presence_penalty`` (applied to the fused logits before the
    draw; the weights, ``loss`` and KLs are those without): a list of B 1-D integer sequences
    (any lengths) or a 2-D int array ``[B, L]`` whose negative entries are padding. Needed when
    a penalty is active, ignored otherwise. Ids must be < V (error naming ``history[b]``).

    ``fused_out``: None, or a writable C-contiguous float32 ``[B, V]`` numpy array (or CPU
    float32 tensor) that receives each row's fused logits z_L + sum_t alpha_t (z_t - z_S) for
    the returned ``alphas``, before penalties, temperature and filters: bit for bit what
    ``fuse_logits(large, small, experts, result.alphas)`` returns, built once in the pass that
    draws the token instead of by a second call. It must not share memory with an input, and
    nothing may read or write it until the call returns. A wrong shape, layout, a read-only
    array or one that overlaps an input raises ``DlfError``, a wrong dtype or type
    ``TypeError``, each naming ``fused_out``.

    Raises ``DlfError`` (a ValueError) on bad values or shapes, ``TypeError`` on bad types.
    """
    opts = StepOptions.build(options, **overrides)
    if not opts.fused:
        raise DlfError(
            f"method: fuse_step fuses models ('dlf' or 'static'), got {opts.method!r}; "
            "use dlf_rs.sample on that model's logits"
        )
    zl = as_f32(large, "large", 2)
    zs = as_f32(small, "small", 2)
    ze = experts_f32(experts)
    out = {} if fused_out is None else {"fused_out": _output_array(fused_out, "fused_out")}
    return core_fuse_step(
        zl, zs, ze, opts._core, **_seed_kwargs(seed), **_history_kwargs(history, opts), **out
    )


def fuse_logits(large: Any, small: Any, experts: Any, alphas: Any) -> np.ndarray:
    """Fused logits z_L + sum_t alphas_t (z_t - z_S), float32 [B, V].

    ``alphas``: one float (every expert), T floats (the same for every row) or a [B, T] array (e.g. ``StepResult.alphas``
    of a call with the same experts). -inf in the large model stays -inf; -inf in the small model
    or an expert is replaced by that row's smallest finite logit minus 30 before differencing.
    """
    zl = as_f32(large, "large", 2)
    zs = as_f32(small, "small", 2)
    ze = experts_f32(experts)
    t = len(ze)
    if type(alphas).__module__.split(".")[0] == "torch":
        alphas = torch_to_numpy(alphas, "alphas")
    if isinstance(alphas, (list, tuple)):
        alphas = [check_real(a, f"alphas[{i}]") for i, a in enumerate(alphas)]
    elif not isinstance(alphas, np.ndarray):
        alphas = [check_real(alphas, "alphas")] * t  # one float: every expert, as StepOptions
    elif alphas.dtype.kind not in "iuf":
        raise TypeError(f"alphas: expected real numbers, got an array of dtype {alphas.dtype}")
    a = np.asarray(alphas, dtype=np.float64)
    if a.ndim == 1 and a.shape[0] == t:
        a = np.broadcast_to(a, (zl.shape[0], t))
    elif a.ndim != 2:
        raise DlfError(
            f"alphas: expected T={t} floats or shape [{zl.shape[0]}, {t}], "
            f"got shape {list(a.shape)}"
        )
    if not np.isfinite(a).all() or (np.abs(a) > np.finfo(np.float32).max).any():
        bad = a[~(np.isfinite(a) & (np.abs(a) <= np.finfo(np.float32).max))][0]
        raise DlfError(f"alphas: expected finite float32 values, got {bad}")
    a32 = np.require(a, dtype=np.float32, requirements=["C", "A"])
    return core_fuse_logits(zl, zs, ze, a32)


def sample(
    logits: Any,
    options: StepOptions | None = None,
    *,
    seed: int | list[int] | None = None,
    history: Any = None,
    **overrides: Any,
) -> np.ndarray:
    """Draw one token per row from float32 logits [B, V]; int64 [B].

    Sampling fields of :class:`StepOptions` as a record and/or keywords: ``temperature=0`` is
    greedy (argmax, lowest index on ties); otherwise softmax((z - max z) / temperature), then
    top-k, top-p and min-p filter before drawing. ``-inf`` tokens are never drawn. ``seed`` as in
    :func:`fuse_step`. The penalties (with ``history``, as in :func:`fuse_step`) apply to a copy
    of each row first: ``sample(fused, history=h, ...)`` draws what ``fuse_step`` draws.
    """
    opts = StepOptions.build(options, **overrides)
    z = as_f32(logits, "logits", 2)
    return core_sample(z, opts._core, **_seed_kwargs(seed), **_history_kwargs(history, opts))
