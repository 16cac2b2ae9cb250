"""Per-row fusion of member logits for an engine's batch (no vLLM import).

An engine's batch mixes requests with different options; :func:`fuse_rows` groups the rows by
their :class:`~dlf_rs.StepOptions` and runs dlf_rs's core on each group: for method "dlf",
``fuse_step`` (the same call :class:`~dlf_rs.FusedGenerator` makes each step) solves the weights
and writes the fused logits z_L + sum_t alpha_t (z_t - z_S) into its ``fused_out`` buffer in the
same pass (one call, not ``fuse_step`` then ``fuse_logits``: docs/vllm.md has the measurement);
for method "static", ``fuse_logits`` with the fixed weights. The engine's own sampler then draws
from the fused logits (its temperature, top-p, seeds and penalties, per request). The logits go
to the core as float32 host arrays (a CPU float32 tensor without a copy; a GPU tensor is copied to
the host and the fused logits back).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..options import StepOptions
from ..step import fuse_logits, fuse_step_prepared

__all__ = ["fuse_rows", "greedy_options"]


@functools.lru_cache(maxsize=256)
def greedy_options(options: StepOptions) -> StepOptions:
    """``options`` with the core's own draw turned into the cheap argmax: the engine samples.
    Cached (records are frozen and hashable), so an engine's step re-checks no record."""
    if (
        options.temperature == 0.0
        and options.top_k == 0
        and options.top_p == 1.0
        and (options.min_p == 0.0)
    ):
        return options
    return dataclasses.replace(options, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0)


def _host(x: Any) -> np.ndarray:
    """A float32 C-contiguous host array of a torch tensor or array (no copy when already so)."""
    if type(x).__module__.split(".")[0] == "torch":
        x = x.detach()
        if x.device.type != "cpu" or x.dtype != _torch().float32:
            x = x.to(device="cpu", dtype=_torch().float32)
        x = x.contiguous().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def _torch() -> Any:
    import torch

    return torch


def fuse_rows(
    large: Any,
    small: Any,
    experts: Sequence[Any],
    row_options: Sequence[StepOptions],
) -> tuple[Any, np.ndarray]:
    """(fused logits like ``large``: float32, same device; alphas float32 [B, T]).

    ``row_options[b]`` is row b's record (fusion fields used; its sampling fields ignored).
    Rows of method "large" return the large model's logits, rows of method "expert" expert
    ``expert``'s; their alphas are NaN (no weights were solved).
    """
    zl, zs = _host(large), _host(small)
    ze = [_host(e) for e in experts]
    b, t = zl.shape[0], len(ze)
    if len(row_options) != b:
        raise ValueError(f"row_options: expected {b} records (one per row), got {len(row_options)}")
    fused = np.empty_like(zl)
    alphas = np.full((b, t), np.nan, dtype=np.float32)
    groups: dict[StepOptions, list[int]] = {}
    for i, o in enumerate(row_options):
        groups.setdefault(o, []).append(i)
    for opts, rows in groups.items():
        whole = len(rows) == b
        idx = slice(None) if whole else np.asarray(rows)
        if opts.method == "large":
            fused[idx] = zl[idx]
            continue
        if opts.expert is not None:  # method "expert" (the record sets expert then only)
            fused[idx] = ze[opts.expert][idx]
            continue
        gl = zl if whole else np.ascontiguousarray(zl[idx])
        gs = zs if whole else np.ascontiguousarray(zs[idx])
        ge = ze if whole else [np.ascontiguousarray(e[idx]) for e in ze]
        if opts.method == "static":
            a = opts._core.static_alphas(t)
            assert a is not None
            w = np.broadcast_to(np.asarray(a, dtype=np.float32), (len(rows), t))
            fused[idx] = fuse_logits(gl, gs, ge, np.ascontiguousarray(w))
        else:
            # The step leaves the fused rows of the weights it solved in `dst` (the whole
            # batch's buffer when the group is the batch); no second fusion pass.
            dst = fused if whole else np.empty_like(gl)
            w = fuse_step_prepared(gl, gs, ge, greedy_options(opts), None, fused_out=dst).alphas
            if not whole:
                fused[idx] = dst
        alphas[idx] = w
    if type(large).__module__.split(".")[0] == "torch":
        out = _torch().from_numpy(fused)
        return (out if large.device.type == "cpu" else out.to(large.device)), alphas
    return fused, alphas
