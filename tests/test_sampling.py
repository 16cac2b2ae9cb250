"""dlf_rs.sample and the sampling half of fuse_step: reproducibility, the seed contract (one seed:
row b on stream b; per-row seeds: stream 0 of each row's seed) and the drawn frequencies checked
against softmax with a chi-square test."""

from __future__ import annotations

import dlf_rs
import numpy as np
import pytest
from dlf_rs.reference import fuse_row, zipf_logits

# chi-square critical values at p = 1e-4 (df -> value); a correct sampler fails ~1 in 10^4 runs
# per check, and all draws here are seeded, so a pass is reproducible.
CHI2_CRIT_1E4 = {4: 23.51, 5: 25.74, 7: 29.88, 9: 33.72, 11: 37.33}


def softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


def chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "drew a token of probability 0"
    return float(np.sum((counts[keep] - expected[keep]) ** 2 / expected[keep]))


def draws(z: np.ndarray, n: int, seed: int, **kw) -> np.ndarray:
    """n draws from one row: n copies of the row, one seed (row b uses stream b)."""
    batch = np.repeat(z[None, :].astype(np.float32), n, axis=0)
    return dlf_rs.sample(batch, seed=seed, **kw)


LOGITS = np.array([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0, -3.0], np.float32)


@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
def test_frequencies_match_softmax(temperature):
    tokens = draws(LOGITS, 40_000, seed=123, temperature=temperature)
    counts = np.bincount(tokens, minlength=LOGITS.size)
    stat = chi_square(counts, softmax(LOGITS / temperature))
    assert stat < CHI2_CRIT_1E4[LOGITS.size - 1], (stat, counts)


def test_frequencies_with_many_seeds():
    """Same test with one call per seed (stream 0 of many seeds) instead of many streams."""
    n = 4000
    tokens = np.array([dlf_rs.sample(LOGITS[None], temperature=1.0, seed=s)[0] for s in range(n)])
    counts = np.bincount(tokens, minlength=LOGITS.size)
    assert chi_square(counts, softmax(LOGITS)) < CHI2_CRIT_1E4[LOGITS.size - 1]


def filtered_probs(z, top_k=0, top_p=1.0, min_p=0.0):
    """HF/TGI semantics: top-k keeps the k largest; top-p keeps the smallest prefix (by
    probability) whose mass reaches p; min-p keeps tokens with p >= min_p * p_max."""
    p = softmax(z)
    keep = np.ones_like(p, dtype=bool)
    order = np.argsort(-p, kind="stable")
    if top_k:
        keep[order[top_k:]] = False
    if top_p < 1.0:
        q = np.where(keep, p, 0.0)
        q /= q.sum()
        cum = np.cumsum(q[order])
        n_keep = int(np.searchsorted(cum, top_p) + 1)
        keep[order[n_keep:]] = False
    if min_p > 0.0:
        keep &= p >= min_p * p.max()
    out = np.where(keep, p, 0.0)
    return out / out.sum()


@pytest.mark.parametrize(
    "kw", [{"top_k": 3}, {"top_p": 0.8}, {"min_p": 0.1}, {"top_k": 5, "top_p": 0.9}]
)
def test_filtered_frequencies(kw):
    tokens = draws(LOGITS, 30_000, seed=7, temperature=1.0, **kw)
    probs = filtered_probs(LOGITS, **kw)
    counts = np.bincount(tokens, minlength=LOGITS.size)
    df = int((probs > 0).sum()) - 1
    stat = chi_square(counts, probs)
    assert stat < CHI2_CRIT_1E4.get(df, 40.0) if df > 0 else counts.sum() == counts[0]


def test_seeded_sampling_repeats_and_seeds_differ():
    z = zipf_logits(np.random.default_rng(0), 16, 1000, 1)[0]
    a = dlf_rs.sample(z, temperature=1.0, seed=5)
    assert np.array_equal(a, dlf_rs.sample(z, temperature=1.0, seed=5))
    others = [dlf_rs.sample(z, temperature=1.0, seed=s) for s in range(6, 12)]
    assert sum(not np.array_equal(a, o) for o in others) >= 5
    per_row = list(range(100, 116))
    c = dlf_rs.sample(z, temperature=1.0, seed=per_row)
    assert np.array_equal(c, dlf_rs.sample(z, temperature=1.0, seed=np.array(per_row)))
    assert not np.array_equal(c, a)


def test_seed_contract():
    """Per-row seeds make each row independent of the batch it is in; one seed = stream b."""
    z = zipf_logits(np.random.default_rng(1), 6, 500, 1)[0]
    seeds = [11, 22, 33, 44, 55, 66]
    batch = dlf_rs.sample(z, temperature=1.0, seed=seeds)
    for b in range(6):
        alone = dlf_rs.sample(z[b : b + 1], temperature=1.0, seed=[seeds[b]])
        assert alone[0] == batch[b]
    one = dlf_rs.sample(z, temperature=1.0, seed=9)
    assert one[0] == dlf_rs.sample(z[:1], temperature=1.0, seed=[9])[0]
    assert one[0] == dlf_rs.sample(z[:1], temperature=1.0, seed=9)[0]


def test_greedy_and_top_k_one():
    z = zipf_logits(np.random.default_rng(2), 32, 777, 1)[0]
    greedy = dlf_rs.sample(z)
    assert np.array_equal(greedy, np.argmax(z, axis=1))
    assert greedy.dtype == np.int64
    for seed in range(5):
        assert np.array_equal(dlf_rs.sample(z, temperature=1.3, top_k=1, seed=seed), greedy)
    ties = np.zeros((2, 10), np.float32)
    ties[1, [3, 7]] = 1.0
    assert dlf_rs.sample(ties).tolist() == [0, 3]


def test_fuse_step_sampling_uses_fused_logits():
    large, small, experts = zipf_logits(np.random.default_rng(3), 8, 400, 2)
    a = dlf_rs.fuse_step(large, small, experts, temperature=0.9, top_p=0.95, seed=[1] * 8)
    b = dlf_rs.fuse_step(large, small, experts, temperature=0.9, top_p=0.95, seed=[1] * 8)
    assert np.array_equal(a.tokens, b.tokens)
    fused = np.stack([fuse_row(large[r], small[r], experts[:, r], a.alphas[r]) for r in range(8)])
    want = dlf_rs.sample(fused, temperature=0.9, top_p=0.95, seed=[1] * 8)
    assert np.array_equal(a.tokens, want)
    greedy = dlf_rs.fuse_step(large, small, experts, top_k=1, temperature=2.0, seed=0)
    assert np.array_equal(greedy.tokens, np.argmax(fused, axis=1))
