"""Intervals and paired comparisons for the paper tables (accuracies over the same examples).

Where it sits: between the per-example results (one bool per example and method, every method
on the same held-out examples in the same order) and :mod:`.tables`.

- :func:`wilson_interval`: the 95% Wilson score interval of an accuracy (no continuity
  correction; what ``scipy.stats.binomtest(k, n).proportion_ci(method="wilson")`` gives);
  better than the normal interval near 0 and 1, where these small models often are.
- :func:`bootstrap_interval`: the percentile bootstrap of a mean (seeded).
- :func:`paired_bootstrap`: the percentile bootstrap of ``mean(a) - mean(b)`` resampling
  *examples* (both methods' results of an example move together), seeded.
- :func:`mcnemar_exact`: McNemar's exact test on the discordant pairs (examples one method gets
  and the other misses): two-sided binomial test of ``b`` successes in ``b + c`` at 1/2.
- :func:`examples_for_halfwidth`: how many examples give a 95% interval of half-width ``h``
  at accuracy ``p`` (normal approximation; the sizing of the tables).
- :func:`gap_closed`: the share of the gap between the large model alone and its upper bound
  (large + LoRA) that a method closes, ``(m - L) / (U - L)`` of the accuracies averaged over
  tasks, with a bootstrap interval (examples resampled within each task, the three methods'
  results of an example together), and the sign test of "at least half" as the interval on
  ``m - (L + U) / 2``, which needs no ratio.

numpy only; exact integer arithmetic for the binomial tails.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Accuracy", "GapClosed", "McNemar", "PairedDiff", "accuracy", "bootstrap_interval",
           "examples_for_halfwidth", "gap_closed", "mcnemar_exact",
           "paired_bootstrap", "wilson_interval"]  # fmt: skip

Z95 = 1.959963984540054  # the 97.5% point of the standard normal


def _as_bools(x: Sequence[bool] | np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D sequence of per-example results")
    if arr.dtype != bool and not np.isin(arr, (0, 1)).all():
        seen = sorted(set(arr.tolist()))[:5]
        raise ValueError(f"{name}: expected booleans or 0/1, got values {seen}")
    return arr.astype(bool)


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of ``k`` successes in ``n`` (fractions; (0, 1) when n = 0)."""
    if n < 0 or not 0 <= k <= n:
        raise ValueError(f"expected 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Accuracy:
    k: int
    n: int
    lo: float
    hi: float

    @property
    def value(self) -> float:
        return self.k / self.n if self.n else float("nan")


def accuracy(correct: Sequence[bool] | np.ndarray) -> Accuracy:
    """Accuracy with its 95% Wilson interval."""
    arr = _as_bools(correct, "correct")
    k, n = int(arr.sum()), int(arr.size)
    return Accuracy(k, n, *wilson_interval(k, n))


def bootstrap_interval(values: Sequence[float] | np.ndarray, n_boot: int = 10_000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:  # fmt: skip
    """Percentile bootstrap interval of the mean of ``values``."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError("values: expected a non-empty 1-D sequence")
    rng = np.random.default_rng(seed)
    # in blocks, so 10,000 resamples of a few thousand examples stay a few tens of MB
    block = max(1, min(n_boot, 4_000_000 // x.size))
    means = np.concatenate([x[rng.integers(0, x.size, size=(min(block, n_boot - i), x.size))]
                            .mean(axis=1) for i in range(0, n_boot, block)])  # fmt: skip
    a = (1 - level) / 2
    lo, hi = np.quantile(means, [a, 1 - a])
    return float(lo), float(hi)


@dataclass(frozen=True)
class PairedDiff:
    """``mean(a) - mean(b)`` over the same examples with its paired bootstrap interval."""

    diff: float
    lo: float
    hi: float
    n: int


def paired_bootstrap(a: Sequence[bool] | np.ndarray, b: Sequence[bool] | np.ndarray,
                     n_boot: int = 10_000, seed: int = 0,
                     level: float = 0.95) -> PairedDiff:  # fmt: skip
    """Percentile bootstrap of the accuracy difference, resampling examples (pairs)."""
    xa, xb = _as_bools(a, "a"), _as_bools(b, "b")
    if xa.size != xb.size or xa.size == 0:
        raise ValueError(f"a, b: expected results on the same examples, got {xa.size} and "
                         f"{xb.size}")  # fmt: skip
    d = xa.astype(np.float64) - xb.astype(np.float64)
    lo, hi = bootstrap_interval(d, n_boot, seed, level)
    return PairedDiff(float(d.mean()), lo, hi, int(d.size))


@dataclass(frozen=True)
class McNemar:
    """Discordant pairs: ``a_only`` (a right, b wrong), ``b_only``; the exact two-sided p."""

    a_only: int
    b_only: int
    p_value: float


def _binom_tail_half(k: int, n: int) -> float:
    """P(X <= k) for X ~ Binomial(n, 1/2), exactly (integers, then one division)."""
    return sum(math.comb(n, i) for i in range(k + 1)) / 2**n


def mcnemar_exact(a: Sequence[bool] | np.ndarray, b: Sequence[bool] | np.ndarray) -> McNemar:
    """McNemar's exact test: ``min(1, 2 P(X <= min(b01, b10)))``, X ~ Bin(b01 + b10, 1/2)."""
    xa, xb = _as_bools(a, "a"), _as_bools(b, "b")
    if xa.size != xb.size:
        raise ValueError(f"a, b: expected results on the same examples, got {xa.size} and "
                         f"{xb.size}")  # fmt: skip
    a_only = int((xa & ~xb).sum())
    b_only = int((~xa & xb).sum())
    n = a_only + b_only
    p = 1.0 if n == 0 else min(1.0, 2 * _binom_tail_half(min(a_only, b_only), n))
    return McNemar(a_only, b_only, p)


def examples_for_halfwidth(halfwidth: float, p: float = 0.5, z: float = Z95) -> int:
    """Examples for a 95% interval of half-width ``halfwidth`` (a fraction) at accuracy ``p``."""
    if not 0 < halfwidth < 1 or not 0 <= p <= 1:
        raise ValueError(f"expected 0 < halfwidth < 1 and 0 <= p <= 1, got {halfwidth}, {p}")
    return math.ceil(z * z * p * (1 - p) / (halfwidth * halfwidth))


@dataclass(frozen=True)
class GapClosed:
    """The share of the large model's gap to its upper bound that a method closes.

    ``share`` is ``(m - L) / (U - L)`` on the accuracies (averaged over the tasks given), ``None``
    where the upper bound does not beat the large model (``U <= L``: no gap to close). ``lo`` and
    ``hi`` are its percentile bootstrap interval over the resamples where ``U > L``;
    ``undefined`` is the fraction of resamples where ``U <= L`` (above ``(1 - level) / 2`` the
    interval is not to be trusted and the tables say so). ``half_diff`` is ``m - (L + U) / 2``
    (the method minus the midpoint) with its interval ``half_lo``, ``half_hi``: "closes at least
    half the gap" holds with 95% confidence exactly when ``half_lo > 0``, given ``U > L``.
    """

    share: float | None
    lo: float
    hi: float
    undefined: float
    half_diff: float
    half_lo: float
    half_hi: float
    n: int


def gap_closed(tasks: Sequence[tuple[Sequence[bool], Sequence[bool], Sequence[bool]]],
               n_boot: int = 10_000, seed: int = 0, level: float = 0.95) -> GapClosed:  # fmt: skip
    """The gap closed by a method, from per-task ``(large, method, upper)`` per-example results
    (each task's three on the same examples). Tasks weigh equally, as the paper's averages do;
    each bootstrap resample draws every task's examples with replacement, independently."""
    if not tasks:
        raise ValueError("tasks: expected at least one (large, method, upper) triple")
    rng = np.random.default_rng(seed)
    gaps = np.zeros(n_boot)
    gains = np.zeros(n_boot)
    point_gap = point_gain = 0.0
    n = 0
    for i, (lg, m, up) in enumerate(tasks):
        xl, xm, xu = (_as_bools(x, f"tasks[{i}][{j}]") for j, x in enumerate((lg, m, up)))
        if not xl.size == xm.size == xu.size or xl.size == 0:
            raise ValueError(f"tasks[{i}]: expected the large, method and upper results on the "
                             f"same examples, got {xl.size}, {xm.size} and {xu.size}")  # fmt: skip
        gap = xu.astype(np.float64) - xl
        gain = xm.astype(np.float64) - xl
        point_gap += gap.mean() / len(tasks)
        point_gain += gain.mean() / len(tasks)
        n += xl.size
        block = max(1, min(n_boot, 4_000_000 // xl.size))
        for lo in range(0, n_boot, block):
            idx = rng.integers(0, xl.size, size=(min(block, n_boot - lo), xl.size))
            gaps[lo : lo + idx.shape[0]] += gap[idx].mean(axis=1) / len(tasks)
            gains[lo : lo + idx.shape[0]] += gain[idx].mean(axis=1) / len(tasks)
    a = (1 - level) / 2
    ok = gaps > 1e-12
    if ok.any():
        lo_s, hi_s = (float(q) for q in np.quantile(gains[ok] / gaps[ok], [a, 1 - a]))
    else:
        lo_s = hi_s = float("nan")
    half = gains - gaps / 2
    half_lo, half_hi = (float(q) for q in np.quantile(half, [a, 1 - a]))
    return GapClosed(share=float(point_gain / point_gap) if point_gap > 1e-12 else None,
                     lo=lo_s, hi=hi_s, undefined=float(1 - ok.mean()),
                     half_diff=float(point_gain - point_gap / 2), half_lo=half_lo,
                     half_hi=half_hi, n=n)  # fmt: skip
