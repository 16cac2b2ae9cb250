"""The multi-expert rules against the numpy reference (tests/reference.py): "joint" (J minimised
over the whole weight vector) never has a larger J than the paper's "one-active" rule, its J at
the returned weights is the reference's, and for two experts it is at least as good as a
brute-force grid over [0, 2]^2; "own-terms" is the argmin of each candidate's own terms."""

from __future__ import annotations

import dlf_rs
import numpy as np
import pytest
from dlf_rs.reference import (
    grid_values,
    kl,
    log_softmax,
    objective_row,
    replace_neg_inf,
    zipf_logits,
)


def _rows(large, small, experts, b):
    return large[b], small[b], [e[b] for e in experts]


@pytest.fixture(scope="module", params=[2, 3], ids=lambda t: f"T{t}")
def case(request):
    rng = np.random.default_rng(7 + request.param)
    return zipf_logits(rng, 6, 400, request.param)


def test_joint_never_worse_than_one_active(case) -> None:
    large, small, experts = case
    one = dlf_rs.fuse_step(large, small, experts)
    joint = dlf_rs.fuse_step(large, small, experts, multi_expert="joint")
    assert joint.alphas.shape == one.alphas.shape
    assert np.all((joint.alphas >= 0.0) & (joint.alphas <= 2.0))
    for b in range(large.shape[0]):
        j_one = objective_row(*_rows(large, small, experts, b), one.alphas[b])
        j_joint = objective_row(*_rows(large, small, experts, b), joint.alphas[b])
        # float32 weights: J moves by ~1e-7 relative when the weights are rounded.
        assert j_joint <= j_one * (1 + 1e-6) + 1e-12, (b, j_joint, j_one)
        assert float(joint.loss[b]) == pytest.approx(j_joint, rel=1e-5, abs=1e-9)
        nz = np.abs(joint.alphas[b])
        assert joint.active[b] == (int(np.argmax(nz)) if nz.max() > 0 else -1)


def test_joint_at_least_the_brute_force_grid_for_two_experts() -> None:
    rng = np.random.default_rng(3)
    large, small, experts = zipf_logits(rng, 4, 200, 2)
    res = dlf_rs.fuse_step(large, small, experts, multi_expert="joint")
    grid = grid_values()
    for b in range(large.shape[0]):
        zl, zs, ze = _rows(large, small, experts, b)
        brute = min(objective_row(zl, zs, ze, [x, y]) for x in grid for y in grid)
        got = objective_row(zl, zs, ze, res.alphas[b])
        assert got <= brute * (1 + 1e-6) + 1e-12, (b, got, brute)


def test_own_terms_is_the_argmin_of_each_candidates_own_terms(case) -> None:
    large, small, experts = case
    res = dlf_rs.fuse_step(large, small, experts, multi_expert="own-terms")
    grid = grid_values()
    for b in range(large.shape[0]):
        zl, zs, ze = _rows(large, small, experts, b)
        lp, lq = log_softmax(zl), log_softmax(replace_neg_inf(zs))
        zs_r = replace_neg_inf(zs).astype(np.float64)
        best, arg = np.inf, None
        for a in grid:
            for t in range(len(ze)):
                zt = replace_neg_inf(ze[t]).astype(np.float64)
                lf = log_softmax(zl.astype(np.float64) + a * (zt - zs_r))
                lqt = log_softmax(zt)
                j = (kl(lf, lp) - kl(lqt, lq)) ** 2 + (kl(lp, lf) - kl(lq, lqt)) ** 2
                if j < best:
                    best, arg = j, (t, a)
        want = np.zeros(len(ze), np.float32)
        want[arg[0]] = arg[1]
        if not np.array_equal(res.alphas[b], want):  # a float tie, never a real difference
            t = int(res.active[b])
            a = float(res.alphas[b, t])
            zt = replace_neg_inf(ze[t]).astype(np.float64)
            lf = log_softmax(zl.astype(np.float64) + a * (zt - zs_r))
            lqt = log_softmax(zt)
            j = (kl(lf, lp) - kl(lqt, lq)) ** 2 + (kl(lp, lf) - kl(lq, lqt)) ** 2
            assert j == pytest.approx(best, rel=1e-9), (b, res.alphas[b], want)
        full = objective_row(zl, zs, ze, res.alphas[b])
        assert float(res.loss[b]) == pytest.approx(full, rel=1e-5, abs=1e-9)


def test_rule_names() -> None:
    rng = np.random.default_rng(0)
    large, small, experts = zipf_logits(rng, 2, 50, 2)
    with pytest.raises(dlf_rs.DlfError, match="^multi_expert:"):
        dlf_rs.fuse_step(large, small, experts, multi_expert="all")
    # One expert: every rule is the paper's.
    one = dlf_rs.fuse_step(large, small, experts[:1])
    for rule in ("joint", "own-terms"):
        r = dlf_rs.fuse_step(large, small, experts[:1], multi_expert=rule)
        assert np.array_equal(r.alphas, one.alphas) or rule == "joint"
        if rule == "joint":
            for b in range(2):
                zl, zs, ze = _rows(large, small, experts[:1], b)
                assert objective_row(zl, zs, ze, r.alphas[b]) <= objective_row(
                    zl, zs, ze, one.alphas[b]) * (1 + 1e-6) + 1e-12


def test_max_shift_is_single_expert_dlf_with_the_most_shifted_expert(case) -> None:
    large, small, experts = case
    res = dlf_rs.fuse_step(large, small, experts, multi_expert="max-shift")
    for b in range(large.shape[0]):
        _, zs, ze = _rows(large, small, experts, b)
        lq = log_softmax(replace_neg_inf(zs))
        shift = [kl(log_softmax(replace_neg_inf(z)), lq) + kl(lq, log_softmax(replace_neg_inf(z)))
                 for z in ze]
        t = int(np.argmax(shift))
        single = dlf_rs.fuse_step(large[b : b + 1], small[b : b + 1], [experts[t][b : b + 1]])
        want = np.zeros(len(ze), np.float32)
        want[t] = single.alphas[0, 0]
        assert np.array_equal(res.alphas[b], want), (b, res.alphas[b], want)
