"""Logits as the core reads them: C-contiguous, aligned float32 numpy arrays; token histories
(for the penalties) as one flat int64 array with row offsets (:func:`history_arrays`).

Where it sits: used by the checked step API (:mod:`dlf_rs.step`) on every array a caller passes.

Conversions (documented behaviour):
- float32 C-contiguous numpy arrays and CPU float32 contiguous dense torch tensors are used in
  place (zero-copy);
- float16, bfloat16 and float64 are converted once to float32;
- non-contiguous arrays are copied once into a contiguous buffer;
- integer, bool and complex dtypes, sparse tensors and CUDA tensors raise ``TypeError`` naming
  the argument (the caller converts: ``.float().cpu()``).
The arrays are read, never written, while the core runs; do not mutate them from another thread
until the call returns (the core reports an input that changed under it as a ``DlfError``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._core import DlfError

__all__ = ["as_f32", "experts_f32", "history_arrays", "history_buffer", "is_torch_tensor",
           "torch_to_numpy"]  # fmt: skip


def is_torch_tensor(x: object) -> bool:
    return type(x).__module__.split(".")[0] == "torch" and hasattr(x, "device")


def torch_to_numpy(x: Any, name: str) -> np.ndarray:
    import torch

    if x.layout != torch.strided:
        raise TypeError(
            f"{name}: expected a dense tensor, got layout {x.layout}; call .to_dense() first"
        )
    if x.device.type != "cpu":
        raise TypeError(
            f"{name}: expected a CPU tensor, got a tensor on {x.device}; call .float().cpu() "
            "first (dlf_rs.FusedGenerator stages logits into pinned host buffers for this)"
        )
    if x.dtype in (torch.float16, torch.bfloat16, torch.float64):
        x = x.detach().to(torch.float32)
    elif x.dtype != torch.float32:
        raise TypeError(
            f"{name}: expected a floating-point tensor (float32; float16/bfloat16/float64 are "
            f"converted), got {x.dtype}; call .float()"
        )
    return x.detach().resolve_conj().resolve_neg().numpy()


def as_f32(x: object, name: str, ndim: int) -> np.ndarray:
    """``x`` as a C-contiguous, aligned float32 ndarray with ``ndim`` dimensions, copying only
    when the dtype or layout requires it."""
    # The decode loop's case (a float32 C-contiguous array) without np.require's checks: about a
    # quarter of a small step's Python time.
    if (
        type(x) is np.ndarray
        and x.dtype == np.float32
        and x.ndim == ndim
        and x.flags.c_contiguous
        and x.flags.aligned
    ):
        return x
    if is_torch_tensor(x):
        arr = torch_to_numpy(x, name)
    elif isinstance(x, np.ndarray):
        arr = x
    else:
        raise TypeError(
            f"{name}: expected a numpy array or a CPU torch tensor, got {type(x).__name__}"
        )
    if arr.dtype != np.float32 and (arr.dtype.kind != "f" or arr.dtype.itemsize not in (2, 4, 8)):
        raise TypeError(
            f"{name}: expected a floating-point array (float32; float16/float64 are "
            f"converted), got dtype {arr.dtype}; convert with .astype(np.float32)"
        )
    if arr.ndim != ndim:
        raise DlfError(
            f"{name}: expected a {ndim}-D array, got {arr.ndim}-D with shape {list(arr.shape)}"
        )
    return np.require(arr, dtype=np.float32, requirements=["C", "A"])


def experts_f32(experts: object) -> list[np.ndarray]:
    """Per-expert [B, V] float32 views: a [T, B, V] array is split without copying."""
    if isinstance(experts, np.ndarray) or is_torch_tensor(experts):
        arr = as_f32(experts, "experts", 3)
        return [arr[t] for t in range(arr.shape[0])]
    if isinstance(experts, (list, tuple)):
        return [as_f32(e, f"experts[{t}]", 2) for t, e in enumerate(experts)]
    raise TypeError(
        "experts: expected a [T, B, V] array or a list of T [B, V] arrays, "
        f"got {type(experts).__name__}"
    )


_I64_MAX = np.iinfo(np.int64).max


def _ids_i64(x: object, name: str, ndim: int) -> np.ndarray:
    """Token ids as a C-contiguous int64 array with ``ndim`` dimensions (no copy when they
    already are); integer dtypes only (bool and floats are refused, an empty sequence is fine)."""
    if is_torch_tensor(x):
        t: Any = x
        if t.device.type != "cpu":
            raise TypeError(
                f"{name}: expected a CPU tensor, got a tensor on {t.device}; call .cpu() first"
            )
        x = t.detach().numpy()
    try:
        arr = np.asarray(x)
    except (OverflowError, ValueError) as e:  # ints beyond int64, ragged nested lists
        raise DlfError(f"{name}: expected integer token ids, got {e}") from None
    if arr.ndim != ndim:
        want = "a 1-D sequence of token ids" if ndim == 1 else "a 2-D int array [B, L]"
        raise DlfError(f"{name}: expected {want}, got shape {list(arr.shape)}")
    if arr.size == 0:
        return np.zeros(arr.shape, dtype=np.int64)
    if arr.dtype.kind not in "iu":
        raise TypeError(
            f"{name}: expected integer token ids, got dtype {arr.dtype}; convert with "
            ".astype(np.int64)"
        )
    if arr.dtype.kind == "u" and arr.dtype.itemsize == 8 and int(arr.max()) > _I64_MAX:
        raise DlfError(f"{name}: expected token ids that fit int64, got {int(arr.max())}")
    return np.ascontiguousarray(arr, dtype=np.int64)


def history_arrays(history: object) -> tuple[np.ndarray, np.ndarray]:
    """The tokens each row has seen, as the core reads them: ``(ids, offsets)`` with row b's ids
    ``ids[offsets[b]:offsets[b + 1]]``. Negative ids are padding (skipped by the core).

    ``history`` is a 2-D int array ``[B, L]`` (numpy or CPU torch; an int64 C-contiguous one is
    passed without a copy: ``ids`` is its flat view, ``offsets`` 0, L, ..., B * L) or a list of B
    1-D integer sequences of any lengths (concatenated once). Row count and id range are the
    core's checks (``history``, ``history[b]``).
    """
    if isinstance(history, np.ndarray) and history.dtype == object and history.ndim == 1:
        history = list(history)
    if isinstance(history, np.ndarray) or is_torch_tensor(history):
        arr = _ids_i64(history, "history", 2)
        rows, width = arr.shape
        return arr.reshape(-1), np.arange(rows + 1, dtype=np.int64) * width
    if isinstance(history, (list, tuple)):
        seqs = [_ids_i64(h, f"history[{b}]", 1) for b, h in enumerate(history)]
        offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
        np.cumsum([len(h) for h in seqs], out=offsets[1:])
        ids = np.concatenate(seqs) if seqs else np.zeros(0, dtype=np.int64)
        return ids, offsets
    raise TypeError(
        "history: expected a list of B token-id sequences or a 2-D int array [B, L], "
        f"got {type(history).__name__}"
    )


def history_buffer(prompt_ids: list[list[int]], batch: int,
                   max_new_tokens: int) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """The seen-token buffer of a penalised call (every engine's loop): ``[B, prompt +
    max_new_tokens]`` int64, -1 where nothing was seen yet, and each row's next free column."""
    rows = prompt_ids[:batch]
    hist = np.full((batch, max(map(len, rows)) + max_new_tokens), -1, dtype=np.int64)
    fill = np.zeros(batch, dtype=np.int64)
    for b, row in enumerate(rows):
        hist[b, : len(row)] = row
        fill[b] = len(row)
    return hist, fill
