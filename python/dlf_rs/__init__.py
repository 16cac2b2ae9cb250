"""dlf_rs: Dynamic Logit Fusion (weak-to-strong decoding, arXiv 2406.15480) with a Rust core.

This module is the decode core's public face: it turns what the caller passes (numpy arrays, CPU
torch tensors, lists of per-expert arrays) into C-contiguous float32 numpy arrays, checks what the
core cannot see (types, dimensions, option strings, seed types) and calls the extension
``dlf_rs._core``, which borrows the arrays without copying, validates values and shapes, and runs
the batch with the GIL released. The generation driver (``FusedGenerator``) lives in
``dlf_rs.generate`` and is imported lazily, so ``import dlf_rs`` needs only numpy.

Input conversion (documented behaviour):
- float32 C-contiguous numpy arrays and CPU float32 contiguous torch tensors are used in place;
- float16, bfloat16 and float64 are converted once to float32;
- non-contiguous arrays are copied once into a contiguous buffer;
- integer, bool and complex dtypes and CUDA tensors raise ``TypeError`` (the caller converts).
The arrays are read, never written, while the core runs; do not mutate them from another thread
until the call returns.
"""

from __future__ import annotations

import numbers
import operator
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from . import _core
from ._core import DlfError, StepResult, __version__

if TYPE_CHECKING:
    from .generate import FusedGenerator, GenerationResult

__all__ = [
    "DlfError",
    "FusedGenerator",
    "GenerationResult",
    "StepResult",
    "__version__",
    "fuse_logits",
    "fuse_step",
    "sample",
]

_SOLVERS = ("grid", "exact")
_MULTI_EXPERT = ("one-active",)
_U64 = 1 << 64


def __getattr__(name: str) -> Any:
    # The driver needs torch and transformers; importing them only on first use keeps
    # `import dlf_rs` light for callers that only want the decode core.
    if name in ("FusedGenerator", "GenerationResult"):
        from . import generate

        return getattr(generate, name)
    raise AttributeError(f"module 'dlf_rs' has no attribute {name!r}")


def _is_torch_tensor(x: object) -> bool:
    return type(x).__module__.split(".")[0] == "torch" and hasattr(x, "device")


def _torch_to_numpy(x: Any, name: str) -> np.ndarray:
    import torch

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


def _as_f32(x: object, name: str, ndim: int) -> np.ndarray:
    """Return `x` as a C-contiguous, aligned float32 ndarray with `ndim` dimensions, copying only
    when the dtype or layout requires it."""
    if _is_torch_tensor(x):
        arr = _torch_to_numpy(x, name)
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


def _experts(experts: object) -> list[np.ndarray]:
    """Per-expert [B, V] float32 views: a [T, B, V] array is split without copying."""
    if isinstance(experts, np.ndarray) or _is_torch_tensor(experts):
        arr = _as_f32(experts, "experts", 3)
        return [arr[t] for t in range(arr.shape[0])]
    if isinstance(experts, (list, tuple)):
        return [_as_f32(e, f"experts[{t}]", 2) for t, e in enumerate(experts)]
    raise TypeError(
        "experts: expected a [T, B, V] array or a list of T [B, V] arrays, "
        f"got {type(experts).__name__}"
    )


def _is_real(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _real(x: object, name: str) -> float:
    if not _is_real(x):
        raise TypeError(f"{name}: expected a real number, got {type(x).__name__} {x!r}")
    return float(x)  # type: ignore[arg-type]


def _nonneg_int(x: object, name: str) -> int:
    if isinstance(x, bool):
        raise TypeError(f"{name}: expected an int, got bool {x!r}")
    try:
        v = operator.index(x)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name}: expected an int, got {type(x).__name__} {x!r}") from None
    if v < 0:
        raise DlfError(f"{name}: expected an int >= 0, got {v}")
    return v


def _seed_value(x: object, name: str) -> int:
    if isinstance(x, bool):
        raise TypeError(f"{name}: expected an int in [0, 2**64), got bool {x!r}")
    try:
        v = operator.index(x)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"{name}: expected an int in [0, 2**64), got {type(x).__name__} {x!r}"
        ) from None
    if not 0 <= v < _U64:
        raise DlfError(f"{name}: expected an int in [0, 2**64), got {v}")
    return v


def _seeds(seed: object) -> dict[str, Any]:
    """None -> fresh entropy; int -> one seed for the batch (row b on stream b);
    sequence of B ints -> one seed per row."""
    if seed is None:
        return {}
    if isinstance(seed, (list, tuple)) or (isinstance(seed, np.ndarray) and seed.ndim == 1):
        return {"seeds": [_seed_value(s, f"seed[{i}]") for i, s in enumerate(seed)]}
    if isinstance(seed, np.ndarray) and seed.ndim == 0:
        seed = seed.item()
    return {"seed": _seed_value(seed, "seed")}


def _sampling(temperature: object, top_k: object, top_p: object, min_p: object) -> dict[str, Any]:
    return {
        "temperature": _real(temperature, "temperature"),
        "top_k": _nonneg_int(top_k, "top_k"),
        "top_p": _real(top_p, "top_p"),
        "min_p": _real(min_p, "min_p"),
    }


def _static_alpha(alpha: object, n_experts: int) -> list[float]:
    if _is_real(alpha) or (isinstance(alpha, np.ndarray) and alpha.ndim == 0):
        if n_experts != 1:
            raise DlfError(
                f"alpha: a single float is allowed only with one expert (T == 1), got T={n_experts}"
                f"; pass a list of {n_experts} floats"
            )
        return [float(alpha)]  # type: ignore[arg-type]
    if isinstance(alpha, (list, tuple)) or (isinstance(alpha, np.ndarray) and alpha.ndim == 1):
        return [_real(a, f"alpha[{t}]") for t, a in enumerate(alpha)]
    if isinstance(alpha, np.ndarray):
        raise DlfError(
            f"alpha: expected None, a float or T={n_experts} floats, got an array of shape "
            f"{list(alpha.shape)}"
        )
    raise TypeError(
        f"alpha: expected None, a float or a sequence of T={n_experts} floats, "
        f"got {type(alpha).__name__}"
    )


def fuse_step(
    large: Any,
    small: Any,
    experts: Any,
    *,
    alpha: float | Sequence[float] | None = None,
    alpha_range: tuple[float, float] = (0.0, 2.0),
    grid_step: float = 0.1,
    solver: str = "grid",
    multi_expert: str = "one-active",
    support_k: int | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    seed: int | Sequence[int] | None = None,
) -> StepResult:
    """One Dynamic Logit Fusion decoding step for a batch.

    large, small: float32 logits [B, V] of the large model and its small base; experts: a
    [T, B, V] array or a list of T [B, V] arrays (small fine-tuned experts). numpy arrays or CPU
    torch tensors; see the module docstring for conversions.

    alpha=None solves the weights per row (the DLF objective J, method.md): ``solver="grid"`` is
    the paper's Algorithm 1 on ``alpha_range`` with ``grid_step``; ``"exact"`` refines to high
    precision and is never worse than the grid. ``multi_expert="one-active"`` (the paper's rule):
    one expert weighted per row. ``support_k``: compute KLs on the union of each model's top-k
    tokens plus an exact tail bucket (None: the full vocabulary). A float ``alpha`` (T == 1) or
    T floats fix the weights instead (proxy-tuning: alpha=1.0).

    Defaults: the paper's grid on the full vocabulary, i.e. Algorithm 1 exactly. ``support_k=1024``
    chose the same weights on every one of 200 LM-like test rows at 2-3x the speed;
    ``support_k=256`` is 3-4x faster again but moves alpha by one grid step on about 7% of such
    rows (more on flat, high-entropy rows). Measured figures: README, "Choosing solver and
    support_k".

    The token is drawn from the fused logits: ``temperature=0`` is greedy; otherwise top-k, top-p
    and min-p filter before sampling. ``seed``: None (fresh entropy), an int (row b draws from
    stream b), or a sequence of B ints (one per row).

    Raises ``DlfError`` (a ValueError) on bad values or shapes, ``TypeError`` on bad types.
    """
    zl = _as_f32(large, "large", 2)
    zs = _as_f32(small, "small", 2)
    ze = _experts(experts)
    if solver not in _SOLVERS:
        raise DlfError(f"solver: expected one of {_SOLVERS}, got {solver!r}")
    if multi_expert not in _MULTI_EXPERT:
        raise DlfError(f"multi_expert: expected one of {_MULTI_EXPERT}, got {multi_expert!r}")
    if not isinstance(alpha_range, (tuple, list)) or len(alpha_range) != 2:
        raise TypeError(f"alpha_range: expected a (low, high) pair, got {alpha_range!r}")
    kwargs: dict[str, Any] = {
        "alpha_min": _real(alpha_range[0], "alpha_range[0]"),
        "alpha_max": _real(alpha_range[1], "alpha_range[1]"),
        "grid_step": _real(grid_step, "grid_step"),
        "solver": solver,
        "multi_expert": multi_expert,
    }
    if alpha is not None:
        kwargs["alpha"] = _static_alpha(alpha, len(ze))
    if support_k is not None:
        kwargs["support_k"] = _nonneg_int(support_k, "support_k")
    kwargs.update(_sampling(temperature, top_k, top_p, min_p))
    kwargs.update(_seeds(seed))
    return _core.fuse_step(zl, zs, ze, **kwargs)


def fuse_logits(large: Any, small: Any, experts: Any, alphas: Any) -> np.ndarray:
    """Fused logits z_L + sum_t alphas_t (z_t - z_S), float32 [B, V].

    ``alphas``: T floats (the same for every row) or a [B, T] array. -inf in the large model stays
    -inf; -inf in the small model or an expert is replaced by that row's smallest finite logit
    minus 30 before differencing (method.md).
    """
    zl = _as_f32(large, "large", 2)
    zs = _as_f32(small, "small", 2)
    ze = _experts(experts)
    if _is_torch_tensor(alphas):
        alphas = _torch_to_numpy(alphas, "alphas")
    if _is_real(alphas):
        alphas = [alphas]
    try:
        a = np.asarray(alphas, dtype=np.float32)
    except (TypeError, ValueError):
        raise TypeError(
            f"alphas: expected T={len(ze)} floats or a [B, T] array, got {type(alphas).__name__}"
        ) from None
    if a.ndim == 1:
        if a.shape[0] != len(ze):
            raise DlfError(
                f"alphas: expected T={len(ze)} floats or shape [{zl.shape[0]}, {len(ze)}], "
                f"got {a.shape[0]} floats"
            )
        a = np.broadcast_to(a, (zl.shape[0], len(ze)))
    elif a.ndim != 2:
        raise DlfError(
            f"alphas: expected T={len(ze)} floats or shape [{zl.shape[0]}, {len(ze)}], "
            f"got shape {list(a.shape)}"
        )
    a = np.require(a, dtype=np.float32, requirements=["C", "A"])
    return _core.fuse_logits(zl, zs, ze, a)


def sample(
    logits: Any,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    seed: int | Sequence[int] | None = None,
) -> np.ndarray:
    """Draw one token per row from float32 logits [B, V]; int64 [B].

    ``temperature=0`` is greedy (argmax, lowest index on ties); otherwise the logits are divided by
    the temperature, then top-k, top-p and min-p filter before drawing. ``seed`` as in
    :func:`fuse_step`.
    """
    z = _as_f32(logits, "logits", 2)
    return _core.sample(z, **_sampling(temperature, top_k, top_p, min_p), **_seeds(seed))
