"""The fuzz oracle: what the rules (README.md, "Options") say a call must do, checked against what dlf_rs did.

`expect(case)` reads the case's arguments the way the rules read them and returns either the
errors the call must (or may) raise, each as (argument name, allowed classes), or the normalised
options a result must honour. `run_case(case)` makes the call and returns a verdict:

- correct: a result that equals the f64 numpy oracle (tests/reference.py): greedy tokens exactly
  unless a near-tie within float tolerance (the margin is reported), solved alphas in the range
  and at the minimum of J up to the float tolerance of J, fused logits to tolerance, sampled
  tokens never -inf and inside the top-k/top-p/min-p admissible set;
- clean_error: a DlfError/TypeError whose message starts with a refused argument's name as the
  caller spelled it ("temperature:", "experts[1]:", "seed[2]:");
- panic (a PanicException or a DlfInternalError), wrong (a wrong result, a refused valid call or
  an accepted invalid one), unnamed (the message does not start with the argument's name),
  wrong_class (named, but neither DlfError nor TypeError as the rules say), harness (a bug here).

Run as a script it is the worker of tests/fuzz_pool.py: JSON cases in on stdin, verdicts out.

Over 500 lines: the whole of the rules as checks, one function per entry point; split, the rules
would drift apart from each other.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import traceback
from dataclasses import dataclass, field
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dlf_rs
from dlf_rs.reference import fuse_row, grid_values, kl, log_softmax, replace_neg_inf
from fuzz_cases import MAX_GRID_POINTS, build_call, truth_arrays

DlfError = dlf_rs.DlfError
# A caught panic (a bug). Not re-exported by every version of dlf_rs: also matched by name.
DlfInternalError = getattr(dlf_rs, "DlfInternalError", None)
U64 = 1 << 64
I63 = 1 << 63
ALPHA_MAX = 100.0
EPS32 = 2.0**-24
ARG_NAMES = (
    "large",
    "small",
    "experts",
    "alphas",
    "logits",
    "alpha_range",
    "alpha",
    "grid_step",
    "solver",
    "multi_expert",
    "support_k",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "seed",
)
D, T_ = "DlfError", "TypeError"


@dataclass
class Expected:
    """must: violations that make an error mandatory; may: ones the rules leave open (an error
    naming them, or a correct result, are both fine). Each is (name, classes, why)."""

    must: list[tuple[str, tuple[str, ...], str]] = field(default_factory=list)
    may: list[tuple[str, tuple[str, ...], str]] = field(default_factory=list)
    opts: dict[str, Any] = field(default_factory=dict)

    def add(self, name: str, classes: tuple[str, ...], why: str, must: bool = True) -> None:
        (self.must if must else self.may).append((name, classes, why))


class _Missing:
    pass


MISSING = _Missing()


# ---- reading scalars by the rules -------------------------------------------------------------


def _is_bool(x: Any) -> bool:
    return isinstance(x, (bool, np.bool_))


def real_arg(e: Expected, name: str, x: Any) -> float | None:
    """A float argument: Python int/float or numpy integer/floating scalar. None if refused."""
    if _is_bool(x):
        e.add(name, (T_,), "bool is not a number")
        return None
    if isinstance(x, np.ndarray) and x.ndim == 0 and x.dtype.kind in "fiu":
        e.add(name, (T_, D), "0-d array: rules silent", must=False)
        return real_arg(Expected(), name, x.item())
    if isinstance(x, (int, np.integer)):
        try:
            return float(x)
        except OverflowError:
            e.add(name, (T_, D), "int beyond float range")
            return None
    if isinstance(x, (float, np.floating)):
        return float(x)
    if x is None:
        e.add(name, (T_,), "None", must=False)
        return None
    e.add(name, (T_,), f"not a real number: {type(x).__name__}")
    return None


def int_arg(e: Expected, name: str, x: Any) -> int | None:
    if _is_bool(x):
        e.add(name, (T_,), "bool is not an int")
        return None
    if isinstance(x, (int, np.integer)):
        return int(x)
    if x is None:
        e.add(name, (T_,), "None", must=False)
        return None
    e.add(name, (T_,), f"not an int: {type(x).__name__}")
    return None


def seed_arg(e: Expected, x: Any, batch: int) -> Any:
    if x is None:
        return None
    if isinstance(x, (list, tuple)) or (isinstance(x, np.ndarray) and x.ndim == 1):
        vals = []
        for i, s in enumerate(x):
            v = int_arg(e, f"seed[{i}]", s)
            if v is not None and not 0 <= v < U64:
                e.add(f"seed[{i}]", (D,), "out of [0, 2**64)")
            vals.append(v)
        if len(vals) != batch:
            e.add("seed", (D,), f"{len(vals)} seeds for {batch} rows")
        return vals
    if isinstance(x, np.ndarray):
        e.add("seed", (D, T_), "array of ndim != 1")
        return None
    v = int_arg(e, "seed", x)
    if v is not None and not 0 <= v < U64:
        e.add("seed", (D,), "out of [0, 2**64)")
    return v


def sampling_args(e: Expected, kw: dict[str, Any], batch: int) -> None:
    t = real_arg(e, "temperature", kw.get("temperature", 0.0))
    if t is not None and not (math.isfinite(t) and t >= 0):
        e.add("temperature", (D,), "not a finite value >= 0")
    k = int_arg(e, "top_k", kw.get("top_k", 0))
    if k is not None and not 0 <= k < I63:
        e.add("top_k", (D,), "not in [0, 2**63)")
    p = real_arg(e, "top_p", kw.get("top_p", 1.0))
    if p is not None and not 0 < p <= 1:
        e.add("top_p", (D,), "not in (0, 1]")
    m = real_arg(e, "min_p", kw.get("min_p", 0.0))
    if m is not None and not 0 <= m <= 1:
        e.add("min_p", (D,), "not in [0, 1]")
    seed = seed_arg(e, kw.get("seed"), batch)
    e.opts.update(
        temperature=t if t is not None else 0.0,
        top_k=k or 0,
        top_p=p if p is not None else 1.0,
        min_p=m or 0.0,
        seed=seed,
    )


def static_alpha(e: Expected, x: Any, n_exp: int) -> list[float] | None:
    def check(name: str, v: float | None) -> float | None:
        if v is None:
            return None
        if not (math.isfinite(v) and abs(v) <= ALPHA_MAX):
            e.add(name, (D,), "not finite with |alpha| <= 100")
            return None
        return v

    if isinstance(x, (list, tuple)) or (isinstance(x, np.ndarray) and x.ndim == 1):
        if isinstance(x, np.ndarray) and x.dtype.kind not in "fiu":
            e.add("alpha", (T_,), f"array of dtype {x.dtype}")
            return None
        # "alpha:" or "alpha[i]:" both name the argument (the matcher takes an index suffix).
        vals = [check("alpha", real_arg(e, "alpha", a)) for a in x]
        if len(vals) != n_exp:
            e.add("alpha", (D,), f"{len(vals)} weights for T={n_exp}")
        return None if any(v is None for v in vals) else [float(v) for v in vals]  # type: ignore
    if isinstance(x, np.ndarray) and x.ndim > 1:
        e.add("alpha", (D, T_), "array of ndim > 1")
        return None
    if isinstance(x, np.ndarray) and x.ndim == 0 and x.dtype.kind == "c":
        e.add("alpha", (T_,), "complex")
        return None
    v = check("alpha", real_arg(e, "alpha", x))
    if v is None:
        return None
    if n_exp == 0:
        e.add("alpha", (D,), "one float for T=0", must=False)
    return [v] * n_exp


def solver_args(e: Expected, kw: dict[str, Any], dynamic: bool) -> None:
    """alpha_range, grid_step, solver, multi_expert, support_k. With static weights these are
    unused: an error naming a bad one is allowed but not required (the record may validate all)."""
    must = dynamic
    sub = Expected()
    ar = kw.get("alpha_range", (0.0, 2.0))
    lo = hi = None
    if isinstance(ar, (tuple, list)) and len(ar) == 2:
        lo, hi = (real_arg(sub, "alpha_range", a) for a in ar)
        if (
            lo is not None
            and hi is not None
            and not (
                math.isfinite(lo) and math.isfinite(hi) and -ALPHA_MAX <= lo <= hi <= ALPHA_MAX
            )
        ):
            sub.add("alpha_range", (D,), "not -100 <= lo <= hi <= 100, finite")
            lo = hi = None
    elif isinstance(ar, np.ndarray) and ar.shape == (2,) and ar.dtype.kind == "f":
        sub.add("alpha_range", (T_, D), "an array pair: rules silent", must=False)
        lo, hi = float(ar[0]), float(ar[1])
    elif ar is None:
        sub.add("alpha_range", (T_,), "None", must=False)
        lo, hi = 0.0, 2.0
    else:
        sub.add("alpha_range", (T_, D), "not a (lo, hi) pair")
    step = real_arg(sub, "grid_step", kw.get("grid_step", 0.1))
    if step is not None and not (math.isfinite(step) and step > 0):
        sub.add("grid_step", (D,), "not finite > 0")
        step = None
    if step is not None and lo is not None and hi is not None:
        n = (hi - lo) / step + 1e-9  # a float: inf for a subnormal step
        if not n < MAX_GRID_POINTS:  # floor(n) + 1 > MAX_GRID_POINTS
            sub.add("grid_step", (D,), f"{n} grid points > {MAX_GRID_POINTS}")
            sub.may.append(("alpha_range", (D,), "too many grid points"))
    solver = kw.get("solver", "grid")
    if not isinstance(solver, str):
        sub.add("solver", (T_, D), "not a str")
    elif solver not in ("grid", "exact"):
        sub.add("solver", (D,), "not grid|exact")
    multi = kw.get("multi_expert", "one-active")
    if not isinstance(multi, str):
        sub.add("multi_expert", (T_, D), "not a str")
    elif multi not in ("one-active", "joint", "own-terms", "max-shift"):
        sub.add("multi_expert", (D,), "unknown")
    sk = kw.get("support_k")
    skv = None
    if sk is not None:
        skv = int_arg(sub, "support_k", sk)
        if skv is not None and not 1 <= skv < I63:
            sub.add("support_k", (D,), "not in [1, 2**63)")
            skv = None
    for item in sub.must:
        e.add(*item, must=must)
    e.may.extend(sub.may)
    e.opts.update(lo=lo, hi=hi, step=step, solver=solver, multi=multi, support_k=skv)


def _array_kind(x: Any) -> str:
    mod = type(x).__module__.split(".")[0]
    if mod == "torch":
        return "torch"
    if isinstance(x, np.ndarray):
        return "numpy"
    if isinstance(x, (list, tuple)):
        return "list"
    return "other"


def array_arg(e: Expected, name: str, x: Any, ndim: int) -> tuple[int, ...] | None:
    """Type and dimension checks of one logits input; its shape if usable."""
    kind = _array_kind(x)
    if kind == "torch":
        import torch

        if x.layout != torch.strided:
            e.add(name, (T_, D), "sparse tensor", must=False)
            return tuple(x.shape) if x.dim() == ndim else None
        if x.device.type != "cpu":
            e.add(name, (T_,), "not a CPU tensor")
            return None
        if not x.is_floating_point():
            e.add(name, (T_,), f"dtype {x.dtype}")
            return None
        shape = tuple(x.shape)
    elif kind == "numpy":
        if x.dtype.kind != "f" or x.dtype.itemsize not in (2, 4, 8):
            e.add(name, (T_,), f"dtype {x.dtype}")
            return None
        shape = x.shape
    elif kind == "list":
        try:
            arr = np.asarray(x, dtype=np.float64)
        except (TypeError, ValueError):
            e.add(name, (T_,), "a ragged or non-numeric list")
            return None
        e.add(name, (T_,), "a nested list: rules silent", must=False)
        shape = arr.shape
    else:
        e.add(name, (T_,), f"not an array: {type(x).__name__}")
        return None
    if len(shape) != ndim:
        e.add(name, (D,), f"{len(shape)}-D, expected {ndim}-D")
        return None
    return tuple(shape)


def expect(case: dict[str, Any], args: list[Any], kw: dict[str, Any]) -> Expected:
    """What the rules make of this call (see the module docstring)."""
    e = Expected()
    fn = case["fn"]
    if fn == "sample":
        shape = array_arg(e, "logits", args[0], 2)
        b = shape[0] if shape else case["B"]
        sampling_args(e, kw, b)
        if shape and shape[0] > 0 and shape[1] == 0:
            e.add("logits", (D,), "vocabulary of 0")
        _data_errors(e, case, {"logits": "logits"})
        return e
    large, small, experts = args[:3]
    shapes: dict[str, tuple[int, ...] | None] = {
        "large": array_arg(e, "large", large, 2),
        "small": array_arg(e, "small", small, 2),
    }
    if isinstance(experts, (list, tuple)):
        n_exp = len(experts)
        for i, x in enumerate(experts):
            shapes[f"experts[{i}]"] = array_arg(e, f"experts[{i}]", x, 2)
        ex_name = {f"experts[{i}]": f"experts[{i}]" for i in range(n_exp)}
    else:
        sh = array_arg(e, "experts", experts, 3)
        n_exp = sh[0] if sh else case["T"]
        for i in range(n_exp):
            shapes[f"experts[{i}]"] = sh[1:] if sh else None
        ex_name = {f"experts[{i}]": "experts" for i in range(n_exp)}
    ref = shapes["large"]
    if ref is not None:
        if ref[0] > 0 and ref[1] == 0:
            e.add("large", (D,), "vocabulary of 0")
        for name, sh in shapes.items():
            if name != "large" and sh is not None and sh != ref:
                shown = ex_name.get(name, name)
                empty = ref[0] == 0 and sh[0] == 0  # [0, V] against [0, V']: rules silent
                e.add(shown, (D,), f"shape {sh} != large {ref}", must=not empty)
                e.may.append(("large", (D,), "the reference of a mismatch"))
    b = ref[0] if ref else case["B"]
    e.opts["n_exp"] = n_exp
    if fn == "fuse_step":
        alpha = kw.get("alpha")
        st = static_alpha(e, alpha, n_exp) if alpha is not None else None
        e.opts["static"] = st
        if alpha is None and n_exp == 0:
            e.add("experts", (D,), "no experts for dynamic weights")
        solver_args(e, kw, dynamic=alpha is None)
        sampling_args(e, kw, b)
    else:
        alphas_arg(e, args[3], b, n_exp)
    _data_errors(e, case, {"large": "large", "small": "small", **ex_name})
    return e


def alphas_arg(e: Expected, x: Any, b: int, n_exp: int) -> None:
    if _array_kind(x) == "torch":
        x = x.detach().numpy()
    if isinstance(x, (int, float, np.floating, np.integer)) and not _is_bool(x):
        x = [x]
    if isinstance(x, str) or x is None:
        e.add("alphas", (T_,), f"not numbers: {type(x).__name__}")
        return
    try:
        a = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        e.add("alphas", (T_,), "not numbers")
        return
    if a.ndim == 1 and a.shape[0] == n_exp:
        a = np.broadcast_to(a, (b, n_exp))
    elif not (a.ndim == 2 and a.shape == (b, n_exp)):
        e.add("alphas", (D,), f"shape {a.shape} for B={b}, T={n_exp}")
        return
    if not np.isfinite(a.astype(np.float32)).all():
        e.add("alphas", (D,), "not finite in float32")
        return
    if (np.abs(a) > ALPHA_MAX).any():
        e.add("alphas", (D,), "|alpha| > 100 (the static rule)", must=False)
    e.opts["alphas"] = a


def _data_errors(e: Expected, case: dict[str, Any], names: dict[str, str]) -> None:
    """NaN / +inf anywhere, or a row with no finite logit, in the arrays that reach the core."""
    if case["bad_input"] is not None and case["bad_input"][1] not in ("list", "sparse"):
        return  # the input is refused for its type or shape before its values matter
    arrs = truth_arrays(case)
    for key, shown in names.items():
        x = arrs["experts"][int(key[8:-1])] if key.startswith("experts[") else arrs[key]
        if x.size == 0:
            continue
        if (np.isnan(x) | (x == np.inf)).any():
            e.add(shown, (D,), "NaN or +inf")
        if np.isneginf(x).all(axis=1).any():
            e.add(shown, (D,), "a row with every logit -inf")


# ---- checking results -------------------------------------------------------------------------


class Wrong(Exception):
    """A result that contradicts the oracle."""


def _fused_tol(
    zl: np.ndarray, zs: np.ndarray, zes: list[np.ndarray], alphas: np.ndarray
) -> np.ndarray:
    """Per-token bound on the float32 rounding of z_L + sum_t a_t (z_t - z_S)."""
    scale = np.where(np.isfinite(zl), np.abs(zl), 0.0).astype(np.float64)
    zs_r = np.abs(replace_neg_inf(zs).astype(np.float64))
    for a, ze in zip(alphas, zes, strict=True):
        scale = scale + abs(float(np.float32(a))) * (np.abs(replace_neg_inf(ze)) + zs_r)
    return 8 * EPS32 * scale + 1e-44


def check_greedy(token: int, z: np.ndarray, tol: np.ndarray, exact_ties: bool, what: str) -> str:
    """Greedy token against float32 logits z; returns the margin note."""
    if not 0 <= token < z.size:
        raise Wrong(f"{what}: token {token} outside [0, {z.size})")
    if z[token] == -np.inf:
        raise Wrong(f"{what}: token {token} is -inf")
    zmax = float(np.max(z))
    if exact_ties:
        want = int(np.argmax(z))
        if token != want:
            raise Wrong(
                f"{what}: greedy token {token} (logit {z[token]!r}), want {want} "
                f"(logit {z[want]!r}, lowest index of the maximum)"
            )
        return ""
    if float(z[token]) + tol[token] < zmax - tol[int(np.argmax(z))]:
        raise Wrong(
            f"{what}: greedy token {token} logit {z[token]!r} < max {zmax!r} at "
            f"{int(np.argmax(z))} by {zmax - float(z[token]):.3g} (tolerance "
            f"{tol[token] + tol[int(np.argmax(z))]:.3g})"
        )
    if token != int(np.argmax(z)):
        return f"near-tie: token {token} vs {int(np.argmax(z))}, margin {zmax - z[token]:.3g}"
    return ""


def admissible(
    z: np.ndarray, temperature: float, top_k: int, top_p: float, min_p: float
) -> np.ndarray:
    """Tokens the rules allow to be drawn (a superset by 1e-7 relative in the cut-offs)."""
    z = z.astype(np.float64)
    m = np.max(z)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        l = np.where(z == -np.inf, -np.inf, (z - m) / temperature)
    keep = z > -np.inf
    if 0 < top_k < z.size:
        kth = np.sort(l)[::-1][top_k - 1]
        keep &= l >= kth
    with np.errstate(under="ignore"):
        p = np.where(keep, np.exp(l), 0.0)
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        total = cum[-1]
        need = min(top_p * total * (1 + 1e-7), total)
        r = int(np.searchsorted(cum, need * (1 - 1e-12), side="left"))
        cut = p[order[min(r, len(order) - 1)]]
        keep &= p >= cut * (1 - 1e-7)
    if min_p > 0.0:
        keep &= p >= min_p * np.max(p) * (1 - 1e-7)
    return keep & (p > 0)


def check_sampled(token: int, z: np.ndarray, tol: np.ndarray, o: dict[str, Any], what: str) -> None:
    if not 0 <= token < z.size:
        raise Wrong(f"{what}: token {token} outside [0, {z.size})")
    if z[token] == -np.inf:
        raise Wrong(f"{what}: sampled token {token} is -inf")
    zz = z.astype(np.float64).copy()
    zz[token] += tol[token]  # raising a token's own logit only widens its admissibility
    ok = admissible(zz, o["temperature"], o["top_k"], o["top_p"], o["min_p"])
    if not ok[token]:
        ad = np.flatnonzero(admissible(z, o["temperature"], o["top_k"], o["top_p"], o["min_p"]))
        raise Wrong(
            f"{what}: sampled token {token} (logit {z[token]!r}) is outside the "
            f"admissible set {ad[:20].tolist()} (T={o['temperature']!r}, top_k="
            f"{o['top_k']}, top_p={o['top_p']!r}, min_p={o['min_p']!r})"
        )


def check_tokens(
    tokens: np.ndarray,
    fused: list[np.ndarray],
    tols: list[np.ndarray],
    o: dict[str, Any],
    exact: list[bool],
) -> list[str]:
    notes = []
    for r, (z, tol) in enumerate(zip(fused, tols, strict=True)):
        tok = int(tokens[r])
        if o["temperature"] == 0.0:
            note = check_greedy(tok, z, tol, exact[r], f"row {r}")
            if note:
                notes.append(f"row {r}: {note}")
        else:
            check_sampled(tok, z, tol, o, f"row {r}")
    return notes


def _kl_tol(k: np.ndarray, amp: float, scale: float) -> np.ndarray:
    """Float error bound of a KL computed from float32 logits (log-probs off by ~eps * scale)."""
    return 1e-5 * np.abs(k) + 8 * EPS32 * (1.0 + amp) * scale + 1e-9


def row_objective(
    zl: np.ndarray, zs: np.ndarray, zes: list[np.ndarray], cands: np.ndarray, t: int
) -> tuple[np.ndarray, np.ndarray]:
    """J at alpha = a * e_t for every a in `cands`, and its tolerance (f64, full vocabulary)."""
    zl64 = zl.astype(np.float64)
    zs_r = replace_neg_inf(zs).astype(np.float64)
    zer = [replace_neg_inf(x).astype(np.float64) for x in zes]
    lp, lq = log_softmax(zl64), log_softmax(zs_r)
    fin = np.isfinite(zl64)
    scale = float(
        max(np.max(np.abs(zl64[fin])), np.max(np.abs(zs_r)), max(np.max(np.abs(x)) for x in zer))
    )
    with np.errstate(invalid="ignore"):
        fused = zl64[None] + cands[:, None] * (zer[t] - zs_r)[None]
    lf = log_softmax(fused)
    kfl, klf = kl(lf, lp[None]), kl(lp[None], lf)
    j = np.zeros(cands.size)
    tol = np.zeros(cands.size)
    for ze in zer:
        lqt = log_softmax(ze)
        k1, k2 = float(kl(lqt, lq)), float(kl(lq, lqt))
        x1, x2 = kfl - k1, klf - k2
        j += x1**2 + x2**2
        d1 = _kl_tol(kfl, np.abs(cands), scale) + _kl_tol(np.array(k1), 0.0, scale)
        d2 = _kl_tol(klf, np.abs(cands), scale) + _kl_tol(np.array(k2), 0.0, scale)
        tol += 2 * np.abs(x1) * d1 + d1**2 + 2 * np.abs(x2) * d2 + d2**2
    return j, tol


def check_step(case: dict[str, Any], res: Any, o: dict[str, Any]) -> list[str]:
    arrs = truth_arrays(case)
    b, n_exp = arrs["large"].shape[0], o["n_exp"]
    tokens, alphas = np.asarray(res.tokens), np.asarray(res.alphas)
    if tokens.shape != (b,) or alphas.shape != (b, n_exp):
        raise Wrong(
            f"shapes: tokens {tokens.shape}, alphas {alphas.shape}; want ({b},), ({b}, {n_exp})"
        )
    notes: list[str] = []
    fused, tols, exact = [], [], []
    for r in range(b):
        zl, zs = arrs["large"][r], arrs["small"][r]
        zes = [arrs["experts"][t][r] for t in range(n_exp)]
        a = alphas[r].astype(np.float64)
        if not np.isfinite(a).all():
            raise Wrong(f"row {r}: alphas {a.tolist()} not finite")
        if o["static"] is not None:
            want = np.float32(np.array(o["static"], np.float64))
            if not np.array_equal(alphas[r], want):
                raise Wrong(f"row {r}: alphas {alphas[r].tolist()}, static weights {want.tolist()}")
        else:
            notes += _check_solved(r, zl, zs, zes, a, res, o)
        fused.append(fuse_row(zl, zs, zes, a))
        tols.append(_fused_tol(zl, zs, zes, a))
        exact.append(bool(np.all(a == 0.0)))
    notes += check_tokens(tokens, fused, tols, o, exact)
    return notes


def _check_solved(
    r: int,
    zl: np.ndarray,
    zs: np.ndarray,
    zes: list[np.ndarray],
    a: np.ndarray,
    res: Any,
    o: dict[str, Any],
) -> list[str]:
    lo32, hi32 = np.float32(o["lo"]), np.float32(o["hi"])
    active = int(np.asarray(res.active)[r])
    if o["multi"] == "joint":  # weights in [lo, hi]^T; J's optimality is tested in test_multi_expert
        if not np.all((lo32 <= a) & (a <= hi32)):
            raise Wrong(f"row {r}: joint alphas {a.tolist()} outside [{o['lo']!r}, {o['hi']!r}]")
        return []
    if active == -1:  # "no expert": every weight 0, which must then lie in the range
        if np.any(a != 0.0) or not o["lo"] <= 0.0 <= o["hi"]:
            raise Wrong(f"row {r}: active -1 with alphas {a.tolist()} on [{o['lo']}, {o['hi']}]")
        active = 0
    if not 0 <= active < len(zes):
        raise Wrong(f"row {r}: active expert {active} not in [-1, {len(zes)})")
    others = np.delete(a, active)
    if o["multi"] != "joint" and np.any(others != 0.0):
        raise Wrong(f"row {r}: one-active rule, but alphas {a.tolist()} (active {active})")
    av = a[active]
    if not lo32 <= av <= hi32:
        raise Wrong(f"row {r}: alpha {av!r} outside alpha_range [{o['lo']!r}, {o['hi']!r}]")
    full = o["support_k"] is None or o["support_k"] >= zl.size
    grid = grid_values((o["lo"], o["hi"]), o["step"])
    if o["solver"] == "grid" and o["multi"] == "one-active":
        on_grid = np.float32(grid)
        if not np.any(on_grid == np.float32(av)):
            near = grid[np.argmin(np.abs(grid - av))]
            raise Wrong(f"row {r}: alpha {av!r} is not a grid value (nearest {near!r})")
    if not full or o["multi"] in ("own-terms", "max-shift"):
        return []  # support_k < V: an approximation; own-terms: another score; structure only
    j_all, tol_all = [], []
    for t in range(len(zes)):
        j, tol = row_objective(zl, zs, zes, grid, t)
        j_all.append(j)
        tol_all.append(tol)
    jg, tg = np.array(j_all), np.array(tol_all)
    best = np.unravel_index(np.argmin(jg.T), jg.T.shape)  # a-major, then expert: the tie rule
    g_best, t_best = int(best[0]), int(best[1])
    j_min, tol_min = jg[t_best, g_best], tg[t_best, g_best]
    j_got, tol_got = (x[0] for x in row_objective(zl, zs, zes, np.array([av]), active))
    loss = float(np.asarray(res.loss)[r])
    with np.errstate(over="ignore"):
        j32 = float(np.float32(j_got))  # the loss is float32: J beyond its range reads inf
    if not (loss == j32 or abs(loss - j_got) <= tol_got + 1e-5 * abs(j_got) + 1e-30):
        raise Wrong(
            f"row {r}: loss {loss!r}, J at the returned alpha {j_got!r} (tolerance {tol_got:.3g})"
        )
    margin = j_got - j_min
    if margin > tol_got + tol_min:
        raise Wrong(
            f"row {r}: J({av!r} * e_{active}) = {j_got!r} exceeds the grid minimum "
            f"{j_min!r} at {grid[g_best]!r} * e_{t_best} by {margin:.3g} (tolerance "
            f"{tol_got + tol_min:.3g})"
        )
    if o["solver"] == "grid" and (active != t_best or np.float32(av) != np.float32(grid[g_best])):
        steps = abs(av - grid[g_best]) / o["step"]
        return [
            (
                f"row {r}: tie: got {av!r}*e_{active}, oracle {grid[g_best]!r}*e_{t_best} "
                f"({steps:.3g} steps), J margin {margin:.3g} <= tolerance "
                f"{tol_got + tol_min:.3g}"
            )
        ]
    return []


def check_fuse_logits(case: dict[str, Any], got: Any, o: dict[str, Any]) -> list[str]:
    arrs = truth_arrays(case)
    b, v = arrs["large"].shape
    got = np.asarray(got)
    if got.shape != (b, v) or got.dtype != np.float32:
        raise Wrong(f"fused logits shape {got.shape} dtype {got.dtype}, want ({b}, {v}) float32")
    for r in range(b):
        zes = [arrs["experts"][t][r] for t in range(o["n_exp"])]
        a = o["alphas"][r]
        want = fuse_row(arrs["large"][r], arrs["small"][r], zes, a)
        tol = _fused_tol(arrs["large"][r], arrs["small"][r], zes, a)
        ninf = want == -np.inf
        if not np.array_equal(got[r] == -np.inf, ninf):
            raise Wrong(f"row {r}: -inf pattern differs from large's")
        if not np.isfinite(got[r][~ninf]).all():
            raise Wrong(f"row {r}: non-finite fused logits")
        err = np.abs(got[r][~ninf].astype(np.float64) - want[~ninf])
        if (err > tol[~ninf]).any():
            i = int(np.argmax(err - tol[~ninf]))
            raise Wrong(f"row {r}: fused logit off by {err[i]:.3g} (tolerance {tol[~ninf][i]:.3g})")
    return []


def check_sample(case: dict[str, Any], got: Any, o: dict[str, Any]) -> list[str]:
    z = truth_arrays(case)["logits"]
    got = np.asarray(got)
    if got.shape != (z.shape[0],):
        raise Wrong(f"tokens shape {got.shape}, want ({z.shape[0]},)")
    zero = [np.zeros(z.shape[1]) for _ in range(z.shape[0])]
    return check_tokens(got, list(z), zero, o, [True] * z.shape[0])


# ---- one case -----------------------------------------------------------------------------------


def _name_matches(msg: str, name: str) -> bool:
    """The message starts with `name`, optionally indexed (experts[1] for experts), then ':'."""
    return re.match(re.escape(name) + r"(\[\d+\])*:", msg) is not None


def _classify_error(exc: BaseException, e: Expected) -> tuple[str, str]:
    cls = type(exc).__name__
    msg = str(exc)
    head = f"{cls}: {msg[:300]}"
    if cls == "DlfInternalError" or (
        DlfInternalError is not None and isinstance(exc, DlfInternalError)
    ):
        return "panic", f"internal error: {head}"
    if not isinstance(exc, Exception) or cls == "PanicException":
        return "panic", head
    allowed = e.must + e.may
    if not e.must and not e.may:
        return "wrong", f"refused a valid call: {head}"
    named = [v for v in allowed if _name_matches(msg, v[0])]
    if not named:
        if any(_name_matches(msg, n) for n in ARG_NAMES):
            return "wrong", f"blames another argument: {head}; refused: {allowed}"
        return "unnamed", f"{head}; refused: {allowed}"
    kinds = {D: DlfError, T_: TypeError}
    if any(isinstance(exc, kinds[c]) for v in named for c in v[1]):
        if not e.must and not isinstance(exc, (DlfError, TypeError)):
            return "wrong_class", head
        return "clean_error", head
    return "wrong_class", f"{head}; rules: {[(v[0], v[1]) for v in named]}"


def _snapshot(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        return x.copy()
    if type(x).__module__.split(".")[0] == "torch" and getattr(x, "layout", None) is not None:
        import torch

        if x.layout == torch.strided and x.device.type == "cpu":
            return x.detach().clone()
    if isinstance(x, (list, tuple)):
        return [_snapshot(y) for y in x]
    return None


def _same(a: Any, b: Any) -> bool:
    if a is None:
        return True
    if isinstance(a, list):
        return all(_same(x, y) for x, y in zip(a, b, strict=False))
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b, equal_nan=True)
    import torch

    return bool(torch.equal(a.nan_to_num(), b.detach().nan_to_num()))


def _call(fn: str, args: list[Any], kw: dict[str, Any]) -> Any:
    return getattr(dlf_rs, fn)(*args, **kw)


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    """Call the API on the case and judge the outcome; never raises."""
    try:
        args, kw = build_call(case)
        e = expect(case, args, kw)
        before = [_snapshot(x) for x in args]
    except Exception:  # noqa: BLE001 - a fault here is the harness's, reported as such
        return {"cat": "harness", "detail": "building: " + traceback.format_exc()[-1500:]}
    try:
        out = _call(case["fn"], args, kw)
    except BaseException as exc:  # noqa: BLE001 - a PanicException is a BaseException
        cat, detail = _classify_error(exc, e)
        return {"cat": cat, "detail": detail}
    try:
        if not all(_same(a, b) for a, b in zip(before, args, strict=True)):
            return {"cat": "wrong", "detail": "an input array was modified by the call"}
        if e.must:
            return {"cat": "wrong", "detail": f"accepted an invalid call; refused: {e.must}"}
        o = e.opts
        if case["fn"] == "fuse_step":
            notes = check_step(case, out, o)
        elif case["fn"] == "fuse_logits":
            notes = check_fuse_logits(case, out, o)
        else:
            notes = check_sample(case, out, o)
        if o.get("seed") is not None and o.get("temperature", 0.0) > 0:
            again = _call(case["fn"], *build_call(case))
            t1 = np.asarray(out.tokens if case["fn"] == "fuse_step" else out)
            t2 = np.asarray(again.tokens if case["fn"] == "fuse_step" else again)
            if not np.array_equal(t1, t2):
                raise Wrong(f"same seed, different tokens: {t1.tolist()} vs {t2.tolist()}")
        return {"cat": "correct", "detail": "; ".join(notes)}
    except Wrong as w:
        return {"cat": "wrong", "detail": str(w)}
    except BaseException:  # noqa: BLE001
        return {"cat": "harness", "detail": "checking: " + traceback.format_exc()[-1500:]}


def worker_main() -> None:
    """One JSON case per stdin line -> one JSON verdict per stdout line."""
    import warnings

    warnings.simplefilter("ignore")
    out = sys.stdout
    sys.stdout = sys.stderr  # stray prints must not corrupt the protocol
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        verdict = run_case(req["case"])
        verdict["id"] = req["id"]
        out.write(json.dumps(verdict) + "\n")
        out.flush()


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        worker_main()
    else:
        print(json.dumps(run_case(json.loads(sys.argv[1])), indent=1))
