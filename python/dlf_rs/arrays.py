"""Logits as the core reads them: C-contiguous, aligned float32 numpy arrays.

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

__all__ = ["as_f32", "experts_f32", "is_torch_tensor", "torch_to_numpy"]


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
