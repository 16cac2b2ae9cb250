"""How one call becomes batches, the part every engine with its own loop shares.

Where it sits: an engine's ``generate``/``stream`` builds the options record and the inputs,
then :func:`check_members` checks the record against the engine's members and :func:`batches`
checks the call's other arguments and returns one not-yet-started decoding loop per batch
(:mod:`dlf_rs.streaming` drains or streams them). Used by :class:`dlf_rs.FusedGenerator` and
:class:`dlf_rs.engines.llamacpp.LlamaCppGenerator`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from ._core import DlfError
from .inputs import Inputs
from .options import StepOptions, check_int
from .seeds import row_seeds
from .stopping import check_stop
from .streaming import DecodeLoop

__all__ = ["batches", "check_members"]

# An engine's loop over one batch: (options, the batch's inputs, max_new_tokens, the rows'
# seeds or None, stop strings, the clock's start or None) -> its decoding loop.
Decode = Callable[[StepOptions, Inputs, int, "list[int] | None", "list[str]", "float | None"],
                  DecodeLoop]  # fmt: skip


def check_members(opts: StepOptions, has_small: bool, n_experts: int) -> None:
    """The members ``opts`` needs are there: the small base and an expert for "dlf"/"static",
    one weight per expert for a static alpha tuple, an expert index in range."""
    if opts.expert is not None and not opts.expert < n_experts:  # method "expert"
        raise ValueError(f"expert: index {opts.expert} out of range for {n_experts} experts")
    if opts.fused:
        if not has_small:
            raise ValueError(f"small: method={opts.method!r} needs the small base model")
        if n_experts == 0:
            raise ValueError(f"experts: method={opts.method!r} needs at least one expert")
        if isinstance(opts.alpha, tuple) and len(opts.alpha) != n_experts:
            raise ValueError(f"alpha: {len(opts.alpha)} weights given for {n_experts} experts")


def batches(decode: Decode, opts: StepOptions, inputs: Inputs, max_new_tokens: Any, seed: Any,
            stop: Any, batch_size: Any, progress: Any, t_start: float,
            max_batch: int | None = None) -> tuple[list[Callable[[], DecodeLoop]], list[int], bool]:  # fmt: skip
    """(the loop of each batch, not started; the batches' sizes; whether to show a progress
    bar), after checking ``max_new_tokens``, ``stop``, ``batch_size``, ``progress`` and
    ``seed`` (row seeds come from the row's index in the whole input, so results do not depend
    on ``batch_size``). ``max_batch``: the most rows the engine decodes at once (then the
    default batch size, and the largest ``batch_size`` accepted)."""
    total = inputs.batch
    max_new_tokens = check_int(max_new_tokens, "max_new_tokens", low=1)
    stops = check_stop(stop)
    if batch_size is None:
        size = total if max_batch is None else min(total, max_batch)
    else:
        size = check_int(batch_size, "batch_size", low=1)
        if max_batch is not None and size > max_batch:
            raise DlfError(f"batch_size: expected at most {max_batch} (the most sequences this "
                           f"engine decodes at once), got {size}")  # fmt: skip
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress: expected True, False or None, got {progress!r}")
    seeds_of_rows = None if opts.greedy else row_seeds(seed, total)
    if opts.greedy and seed is not None:
        row_seeds(seed, total)  # checked all the same: a bad seed is an error either way
    loops: list[Callable[[], DecodeLoop]] = []
    sizes = []
    for lo in range(0, total, size):
        hi = min(lo + size, total)
        seeds = None if seeds_of_rows is None else seeds_of_rows[lo:hi]
        # The first batch's clock starts at the call (argument checks included).
        start = t_start if lo == 0 else None
        loops.append(functools.partial(decode, opts, inputs.rows(lo, hi), max_new_tokens, seeds,
                                       stops, start))  # fmt: skip
        sizes.append(hi - lo)
    return loops, sizes, progress if progress is not None else len(loops) > 1
