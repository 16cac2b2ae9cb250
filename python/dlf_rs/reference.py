"""Pure-numpy reference of the DLF decode step, written from docs/method.md alone.

It shares no code with the Rust core (it imports only numpy) and is the one reference every check
uses: the pytest suite checks `dlf_rs` against it, the benchmark times its vectorised "paper
grid", the generation driver's tests import `dlf_grid_row` and `fuse_row` from here, and the real
family's evaluation decodes an independent greedy DLF loop with them
(:func:`dlf_rs.real_family.evaluate.independent_dlf`). Keep those names and signatures.

Conventions (method.md): KLs and J in float64 over the full vocabulary; -inf in the small model or
an expert is replaced by that row's smallest finite logit minus 30 before anything else; -inf in
the large model stays (the token stays impossible in the fused distribution).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

NEG_INF_MARGIN = 30.0


def log_softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    """float64 log-softmax with max subtraction; -inf entries stay -inf."""
    z = np.asarray(z, dtype=np.float64)
    m = np.max(z, axis=axis, keepdims=True)
    shifted = z - m
    return shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))


def kl(logp_a: np.ndarray, logp_b: np.ndarray, axis: int = -1) -> np.ndarray:
    """KL(A || B) from log-probabilities; terms with A(x) = 0 contribute 0."""
    p_a = np.exp(logp_a)
    with np.errstate(invalid="ignore"):
        terms = np.where(p_a > 0, p_a * (logp_a - logp_b), 0.0)
    return np.sum(terms, axis=axis)


def replace_neg_inf(z: np.ndarray) -> np.ndarray:
    """The method's rule for S and experts: -inf -> (row's smallest finite logit) - 30, float32."""
    z = np.array(z, dtype=np.float32, copy=True)
    neg = np.isneginf(z)
    if neg.any():
        finite = np.where(neg, np.inf, z)
        row_min = np.min(finite, axis=-1, keepdims=True)
        z = np.where(neg, row_min - np.float32(NEG_INF_MARGIN), z).astype(np.float32)
    return z


def objective_row(
    z_large: np.ndarray,
    z_small: np.ndarray,
    z_experts: Sequence[np.ndarray],
    alphas: Sequence[float] | np.ndarray,
) -> float:
    """J(alpha) = sum_t (KL(P~||P) - KL(Q_t||Q))^2 + (KL(P||P~) - KL(Q||Q_t))^2, float64."""
    zl = np.asarray(z_large, dtype=np.float64)
    zs = replace_neg_inf(z_small).astype(np.float64)
    zes = [replace_neg_inf(e).astype(np.float64) for e in z_experts]
    a = np.asarray(alphas, dtype=np.float64)
    fused = zl.copy()
    for t, ze in enumerate(zes):
        fused = fused + a[t] * (ze - zs)
    lp, lq, lf = log_softmax(zl), log_softmax(zs), log_softmax(fused)
    kl_fl, kl_lf = kl(lf, lp), kl(lp, lf)
    total = 0.0
    for ze in zes:
        lqt = log_softmax(ze)
        total += (kl_fl - kl(lqt, lq)) ** 2 + (kl_lf - kl(lq, lqt)) ** 2
    return float(total)


def grid_values(
    alpha_range: tuple[float, float] = (0.0, 2.0), grid_step: float = 0.1
) -> np.ndarray:
    """a_i = min(lo + i*step, hi), i = 0..floor((hi - lo)/step + 1e-9), float64."""
    lo, hi = float(alpha_range[0]), float(alpha_range[1])
    n = int(np.floor((hi - lo) / grid_step + 1e-9))
    return np.array([min(lo + i * grid_step, hi) for i in range(n + 1)], dtype=np.float64)


def dlf_grid_row(
    z_large: np.ndarray,
    z_small: np.ndarray,
    z_experts: Sequence[np.ndarray],
    alpha_range: tuple[float, float] = (0.0, 2.0),
    grid_step: float = 0.1,
) -> tuple[np.ndarray, float]:
    """The paper's Algorithm 1 for one row, literally: returns (alphas [T], J at them).

    T = 1: scan the grid upward, keep the first strict minimum. T > 1 ("one-active"): for each
    grid value a (ascending), for each expert t (in order), score a * e_t; strict '<' so ties go
    to the smaller a, then the earlier expert. The best value is reset per call (per step).
    """
    n_exp = len(z_experts)
    best_j = np.inf
    best = np.zeros(n_exp, dtype=np.float64)
    for a in grid_values(alpha_range, grid_step):
        for t in range(n_exp):
            cand = np.zeros(n_exp, dtype=np.float64)
            cand[t] = a
            j = objective_row(z_large, z_small, z_experts, cand)
            if j < best_j:
                best_j, best = j, cand
    return best, float(best_j)


def fuse_row(
    z_large: np.ndarray,
    z_small: np.ndarray,
    z_experts: Sequence[np.ndarray],
    alphas: Sequence[float] | np.ndarray,
) -> np.ndarray:
    """Fused logits exactly as the core specifies them, float32 [V]:
    out = z_L; for t: out += float32(alpha_t) * (z_t' - z_S'), with S/experts -inf-replaced."""
    out = np.array(z_large, dtype=np.float32, copy=True)
    zs = replace_neg_inf(z_small)
    for t, ze in enumerate(z_experts):
        diff = (replace_neg_inf(ze) - zs).astype(np.float32)
        out += np.float32(alphas[t]) * diff
    return out


def zipf_logits(
    rng: np.random.Generator,
    batch: int,
    vocab: int,
    n_experts: int,
    *,
    n_perturbed: int = 300,
    neg_inf_frac: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """LM-like logits: (large [B, V], small [B, V], experts [T, B, V]), float32.

    Each row of `large` is z = -s log(rank) over a random permutation (s ~ U(1, 1.5)) plus small
    noise; `small` has the same shape of distribution with a perturbed exponent, a few swapped
    ranks and more noise; each expert is `small` plus a sparse perturbation on `n_perturbed` of
    the small model's most likely tokens, with a per-row strength so that the solved alphas vary
    across rows. `neg_inf_frac` masks that fraction of tokens to -inf in `large` (as a logits
    processor would), never the top one.
    """
    ranks = np.log(np.arange(1, vocab + 1, dtype=np.float64))
    large = np.empty((batch, vocab), dtype=np.float32)
    small = np.empty((batch, vocab), dtype=np.float32)
    experts = np.empty((n_experts, batch, vocab), dtype=np.float32)
    for b in range(batch):
        perm = rng.permutation(vocab)
        s_l = rng.uniform(1.0, 1.5)
        zl = np.empty(vocab)
        zl[perm] = -s_l * ranks
        zl += rng.normal(0.0, 0.1, vocab)
        perm_s = perm.copy()
        n_swap = max(1, vocab // 50)
        i, j = rng.integers(0, min(vocab, 2000), n_swap), rng.integers(0, vocab, n_swap)
        for x, y in zip(i, j, strict=True):  # scalar swaps keep perm_s a permutation
            perm_s[x], perm_s[y] = perm_s[y], perm_s[x]
        zs = np.empty(vocab)
        zs[perm_s] = -s_l * rng.uniform(0.6, 1.4) * ranks
        zs += rng.normal(0.0, 0.3, vocab)
        large[b] = zl + 3.0
        small[b] = zs + 1.0
        head = perm_s[: min(vocab, 3 * n_perturbed)]
        for t in range(n_experts):
            strength = rng.uniform(0.2, 3.0)
            idx = rng.choice(head, size=min(n_perturbed, head.size), replace=False)
            ze = zs.copy()
            ze[idx] += rng.normal(0.0, strength, idx.size)
            ze[idx[: max(1, idx.size // 20)]] += strength
            experts[t, b] = ze + 1.0
        if neg_inf_frac > 0.0:
            top = int(np.argmax(large[b]))
            mask = rng.random(vocab) < neg_inf_frac
            mask[top] = False
            large[b, mask] = -np.inf
    return large, small, experts


def dense_logits(
    rng: np.random.Generator,
    batch: int,
    vocab: int,
    n_experts: int,
    *,
    sigma: tuple[float, float] = (0.05, 0.3),
    n_task: int = 20,
    boost: tuple[float, float] = (2.0, 6.0),
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows shaped like a real fine-tune's: (large [B, V], small [B, V], experts
    [T, B, V]), float32.

    `large` and `small` are `zipf_logits`' (Zipf-like heads, a perturbed exponent and swapped
    ranks in `small`). Each expert row is `small` plus N(0, s) on every token, s ~ U(sigma) per
    row and expert (so d = z_E - z_S is nonzero and small everywhere), plus `n_task` "task"
    tokens, drawn uniformly from the vocabulary, boosted by U(boost) each.
    """
    large, small, _ = zipf_logits(rng, batch, vocab, 0)
    experts = np.empty((n_experts, batch, vocab), dtype=np.float32)
    for t in range(n_experts):
        for b in range(batch):
            ze = small[b].astype(np.float64) + rng.normal(0.0, rng.uniform(*sigma), vocab)
            idx = rng.choice(vocab, size=min(n_task, vocab), replace=False)
            ze[idx] += rng.uniform(*boost, idx.size)
            experts[t, b] = ze
    return large, small, experts


def paper_grid_numpy(
    large: np.ndarray,
    small: np.ndarray,
    experts: Sequence[np.ndarray] | np.ndarray,
    alpha_range: tuple[float, float] = (0.0, 2.0),
    grid_step: float = 0.1,
) -> tuple[np.ndarray, np.ndarray]:
    """The paper's grid for a whole batch, vectorised as a numpy user would write it: materialise
    the fused logits [n_grid, B, V] per expert, float32 logits, float64 KLs. Returns (alphas [B, T],
    J [B]) with the same tie rule as `dlf_grid_row` (no -inf handling: benchmark inputs only)."""
    grid = grid_values(alpha_range, grid_step)
    n_exp = len(experts)
    lp = log_softmax(large)  # [B, V]
    lq = log_softmax(small)
    fused_kls = []
    targets = []
    for e in experts:
        lqt = log_softmax(e)
        targets.append((kl(lqt, lq), kl(lq, lqt)))
    for e in experts:
        diff = (e - small).astype(np.float32)
        fused = large[None] + grid.astype(np.float32)[:, None, None] * diff[None]  # [G, B, V]
        lf = log_softmax(fused)
        fused_kls.append((kl(lf, lp[None]), kl(lp[None], lf)))  # each [G, B]
    # J[g, t, b]: candidate a_g * e_t scored with the sum over every expert's targets.
    j = np.zeros((grid.size, n_exp, large.shape[0]))
    for t in range(n_exp):
        fl, lf_ = fused_kls[t]
        for u in range(n_exp):
            j[:, t] += (fl - targets[u][0]) ** 2 + (lf_ - targets[u][1]) ** 2
    flat = j.reshape(grid.size * n_exp, -1)  # a-major, then expert: argmin's first hit = tie rule
    best = np.argmin(flat, axis=0)
    alphas = np.zeros((large.shape[0], n_exp))
    rows = np.arange(large.shape[0])
    alphas[rows, best % n_exp] = grid[best // n_exp]
    return alphas, flat[best, rows]
