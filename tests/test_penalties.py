"""Penalties on seen tokens (``repetition_penalty``, ``frequency_penalty``, ``presence_penalty``):
applied by the core to the fused logits before the sampler and the greedy argmax, never to the
weights. Checked against a pure-numpy reference written here and against Hugging Face's
``RepetitionPenaltyLogitsProcessor``, through ``fuse_step`` (greedy and sampled) and ``sample``.
"""

from __future__ import annotations

import functools
from typing import Any

import dlf_rs
import numpy as np
import pytest
from dlf_rs import DlfError, StepOptions

SEEDS = range(6)


def penalise_ref(
    z: np.ndarray, history: list[list[int]], rep: float, freq: float, pres: float
) -> np.ndarray:
    """The definition, row by row in float32: per distinct id seen c times, repetition first
    (l / p if l > 0 else l * p), then l - freq * c, then l - pres; -inf stays -inf, finite
    results are kept in the finite float32 range."""
    out = np.array(z, dtype=np.float32, copy=True)
    big = np.finfo(np.float32).max
    for b, row in enumerate(history):
        ids, counts = np.unique([t for t in row if t >= 0], return_counts=True)
        for t, c in zip(ids.tolist(), counts.tolist()):
            x = out[b, t]
            if x == -np.inf:
                continue
            if rep != 1.0:
                with np.errstate(over="ignore"):  # saturated below
                    x = x / np.float32(rep) if x > 0 else x * np.float32(rep)
            if freq != 0.0:
                x = x - np.float32(freq) * np.float32(c)
            if pres != 0.0:
                x = x - np.float32(pres)
            out[b, t] = np.clip(x, -big, big)
    return out


def models(rng: np.random.Generator, b: int, v: int, t: int) -> tuple[Any, Any, list[Any]]:
    def lm() -> np.ndarray:
        return rng.normal(0.0, 2.0, (b, v)).astype(np.float32)

    large, small = lm(), lm()
    experts = [(small + rng.normal(0.0, 1.0, (b, v))).astype(np.float32) for _ in range(t)]
    return large, small, experts


def histories(rng: np.random.Generator, z: np.ndarray, max_len: int = 40) -> list[list[int]]:
    """Ragged rows of random ids that always include the row's argmax (so greedy must move
    whenever a penalty pushes it down), with repeats."""
    b, v = z.shape
    rows = []
    for r in range(b):
        n = int(rng.integers(1, max_len))
        row = rng.integers(0, v, n).tolist() + [int(np.argmax(z[r]))] * int(rng.integers(1, 4))
        rows.append([int(x) for x in rng.permutation(row)])
    return rows


def padded(rows: list[list[int]], extra: int = 3) -> np.ndarray:
    width = max(len(r) for r in rows) + extra
    out = np.full((len(rows), width), -1, dtype=np.int64)
    for b, r in enumerate(rows):
        out[b, : len(r)] = r
    return out


PENALTIES = [
    {"repetition_penalty": 1.3},
    {"repetition_penalty": 0.7},
    {"frequency_penalty": 0.6},
    {"presence_penalty": 1.5},
    {"frequency_penalty": -0.4, "presence_penalty": 0.3},
    {"repetition_penalty": 2.0, "frequency_penalty": 0.5, "presence_penalty": 2.0},
]


def ref_args(p: dict[str, float]) -> tuple[float, float, float]:
    return (
        p.get("repetition_penalty", 1.0),
        p.get("frequency_penalty", 0.0),
        p.get("presence_penalty", 0.0),
    )


@pytest.mark.parametrize("seed", SEEDS)
def test_reference_is_transformers_repetition_penalty(seed: int) -> None:
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    rng = np.random.default_rng(seed)
    b, v, n = 5, 97, 30
    z = rng.normal(0.0, 3.0, (b, v)).astype(np.float32)
    z[rng.random((b, v)) < 0.05] = -np.inf
    z[:, 0] = 0.0
    ids = rng.integers(0, v, (b, n))
    ids[:, :3] = 0  # a zero logit, repeated
    for penalty in (1.3, 0.5, 2.0, 1.0 + seed / 7):
        hf = RepetitionPenaltyLogitsProcessor(penalty=penalty)(
            torch.from_numpy(ids), torch.from_numpy(z.copy())
        ).numpy()
        ours = penalise_ref(z, ids.tolist(), penalty, 0.0, 0.0)
        np.testing.assert_array_equal(ours, hf)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n_experts", [1, 2])
def test_fuse_step_penalises_the_fused_row_only(seed: int, n_experts: int) -> None:
    rng = np.random.default_rng(100 + seed)
    b, v = 12, 257
    large, small, experts = models(rng, b, v, n_experts)
    moved = 0
    for method in ({}, {"alpha": 1.0}):
        plain = dlf_rs.fuse_step(large, small, experts, **method)
        fused = dlf_rs.fuse_logits(large, small, experts, plain.alphas)
        rows = histories(rng, fused)
        for p in PENALTIES:
            res = dlf_rs.fuse_step(large, small, experts, history=rows, **method, **p)
            # The weights and traces are those of the raw logits.
            for name in ("alphas", "loss", "active", "kl_fused_large", "kl_large_fused",
                         "kl_expert_small", "kl_small_expert", "support_size"):  # fmt: skip
                np.testing.assert_array_equal(getattr(res, name), getattr(plain, name), name)
            want = penalise_ref(fused, rows, *ref_args(p))
            np.testing.assert_array_equal(res.tokens, np.argmax(want, axis=1))
            np.testing.assert_array_equal(res.tokens, dlf_rs.sample(want))
            moved += int((res.tokens != plain.tokens).sum())
    assert moved > 0, "no penalty changed a greedy token: the test would not see a bug"


@pytest.mark.parametrize("seed", SEEDS)
def test_sampled_tokens_are_those_of_the_penalised_logits(seed: int) -> None:
    rng = np.random.default_rng(200 + seed)
    b, v = 64, 120
    large, small, experts = models(rng, b, v, 2)
    plain = dlf_rs.fuse_step(large, small, experts)
    fused = dlf_rs.fuse_logits(large, small, experts, plain.alphas)
    rows = histories(rng, fused, max_len=80)
    sampling = [
        {"temperature": 1.0},
        {"temperature": 0.7, "top_k": 15, "top_p": 0.9},
        {"temperature": 1.3, "min_p": 0.05},
    ]
    per_row = [int(s) for s in rng.integers(0, 2**63, b)]
    for s in sampling:
        for p in PENALTIES:
            want = penalise_ref(fused, rows, *ref_args(p))
            for sd in (seed, per_row):
                res = dlf_rs.fuse_step(large, small, experts, history=rows, seed=sd, **s, **p)
                np.testing.assert_array_equal(res.alphas, plain.alphas)
                expected = dlf_rs.sample(want, seed=sd, **s)
                np.testing.assert_array_equal(res.tokens, expected)
                by_sample = dlf_rs.sample(fused, history=rows, seed=sd, **s, **p)
                np.testing.assert_array_equal(by_sample, expected)


@pytest.mark.parametrize("seed", SEEDS)
def test_greedy_with_transformers_processor_end_to_end(seed: int) -> None:
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    rng = np.random.default_rng(300 + seed)
    b, v, n = 8, 300, 25
    large, small, experts = models(rng, b, v, 1)
    plain = dlf_rs.fuse_step(large, small, experts)
    fused = dlf_rs.fuse_logits(large, small, experts, plain.alphas)
    ids = rng.integers(0, v, (b, n))
    ids[:, 0] = plain.tokens  # the unpenalised choice is always seen
    proc = RepetitionPenaltyLogitsProcessor(penalty=1.8)
    hf = proc(torch.from_numpy(ids), torch.from_numpy(fused.copy())).numpy()
    res = dlf_rs.fuse_step(large, small, experts, repetition_penalty=1.8, history=ids)
    np.testing.assert_array_equal(res.tokens, np.argmax(hf, axis=1))
    hist_t = torch.from_numpy(ids)
    res_t = dlf_rs.fuse_step(large, small, experts, repetition_penalty=1.8, history=hist_t)
    np.testing.assert_array_equal(res_t.tokens, res.tokens)


@pytest.mark.parametrize("seed", SEEDS)
def test_padding_and_ragged_lists_agree(seed: int) -> None:
    rng = np.random.default_rng(400 + seed)
    b, v = 6, 50
    large, small, experts = models(rng, b, v, 1)
    fused = dlf_rs.fuse_logits(large, small, experts, dlf_rs.fuse_step(large, small, experts).alphas)
    rows = histories(rng, fused)
    rows[2] = []  # an empty history: that row is unchanged
    p = {"repetition_penalty": 1.4, "frequency_penalty": 0.3, "presence_penalty": 0.2}
    forms: list[Any] = [
        rows,
        tuple(np.array(r, dtype=np.int32) for r in rows),
        padded(rows),
        padded(rows).astype(np.int32),
        np.asfortranarray(padded(rows)),
        [r + [-1, -5] for r in rows],  # negative ids are padding in lists too
    ]
    for s in ({}, {"temperature": 0.9, "seed": seed}):
        want = dlf_rs.sample(penalise_ref(fused, rows, *ref_args(p)), **s)
        for h in forms:
            np.testing.assert_array_equal(dlf_rs.fuse_step(large, small, experts, history=h,
                                                           **s, **p).tokens, want)  # fmt: skip
            np.testing.assert_array_equal(dlf_rs.sample(fused, history=h, **s, **p), want)


def test_minus_inf_stays_minus_inf_and_finite_stays_finite() -> None:
    z = np.array([[-np.inf, 0.0, 0.1, -0.2], [3e38, -3e38, 1.0, -np.inf]], dtype=np.float32)
    rows = [[0] * 50 + [1, 2, 3], [0, 1, 2, 3]]
    # Rewarding seen tokens can never make an impossible one possible.
    reward = {"repetition_penalty": 0.01, "frequency_penalty": -2.0, "presence_penalty": -2.0}
    for seed in range(40):
        tok = dlf_rs.sample(z, history=rows, temperature=1.0, seed=seed, **reward)
        assert tok[0] != 0 and tok[1] != 3
    # A tiny repetition penalty overflows finite logits: saturated, never inf or NaN.
    tiny = penalise_ref(z, rows, 1e-30, 0.0, 0.0)
    assert np.isfinite(tiny[0, 1:]).all() and tiny[0, 0] == -np.inf
    for s in ({}, {"temperature": 1.0, "seed": 3}):
        got = dlf_rs.sample(z, history=rows, repetition_penalty=1e-30, **s)
        np.testing.assert_array_equal(got, dlf_rs.sample(tiny, **s))


def test_neutral_penalties_ignore_history() -> None:
    rng = np.random.default_rng(7)
    large, small, experts = models(rng, 4, 30, 2)
    base = dlf_rs.fuse_step(large, small, experts, temperature=0.8, seed=1)
    junk = [[10**6], [], "not even ids"]  # ignored: no penalty is active
    again = dlf_rs.fuse_step(large, small, experts, temperature=0.8, seed=1, history=junk)
    np.testing.assert_array_equal(base.tokens, again.tokens)
    np.testing.assert_array_equal(base.alphas, again.alphas)
    np.testing.assert_array_equal(dlf_rs.sample(large, history=junk), dlf_rs.sample(large))


def test_options_record_carries_the_penalties() -> None:
    opts = StepOptions(repetition_penalty=1.2, frequency_penalty=np.float32(0.5), presence_penalty=1)
    assert opts.penalized and opts.presence_penalty == 1.0
    assert isinstance(opts.frequency_penalty, float) and isinstance(opts.presence_penalty, float)
    assert (opts.repetition_penalty, opts.frequency_penalty, opts.presence_penalty) == (1.2, 0.5, 1.0)
    rng = np.random.default_rng(8)
    large, small, experts = models(rng, 3, 40, 1)
    rows = [[1, 2], [3], [4, 4, 4]]
    a = dlf_rs.fuse_step(large, small, experts, opts, history=rows)
    b = dlf_rs.fuse_step(large, small, experts, history=rows, repetition_penalty=1.2,
                         frequency_penalty=0.5, presence_penalty=1.0)  # fmt: skip
    np.testing.assert_array_equal(a.tokens, b.tokens)
    prepared = dlf_rs.step.fuse_step_prepared(large, small, experts, opts, None, padded(rows))
    np.testing.assert_array_equal(prepared.tokens, a.tokens)
    for bound in (-2.0, 2.0):
        StepOptions(frequency_penalty=bound, presence_penalty=bound)


def _raises(cls: type[Exception], start: str, call: Any) -> None:
    with pytest.raises(cls) as info:
        call()
    assert str(info.value).startswith(start), str(info.value)
    assert not isinstance(info.value, dlf_rs.DlfInternalError)


BAD_VALUES: list[tuple[str, Any, type[Exception], str]] = [
    ("repetition_penalty", 0.0, DlfError,
     "repetition_penalty: expected a finite number > 0 (1 is off), got 0.0"),
    ("repetition_penalty", -1.0, DlfError, "repetition_penalty:"),
    ("repetition_penalty", float("inf"), DlfError, "repetition_penalty:"),
    ("repetition_penalty", float("nan"), DlfError, "repetition_penalty:"),
    ("repetition_penalty", None, TypeError, "repetition_penalty:"),
    ("frequency_penalty", 2.01, DlfError,
     "frequency_penalty: expected a finite number in [-2, 2] (0 is off), got 2.01"),
    ("frequency_penalty", -float("inf"), DlfError, "frequency_penalty:"),
    ("presence_penalty", -2.5, DlfError, "presence_penalty:"),
    ("presence_penalty", "1", TypeError, "presence_penalty:"),
]  # fmt: skip


@pytest.mark.parametrize(("field", "value", "cls", "start"), BAD_VALUES)
def test_bad_values_name_their_field(field: str, value: Any, cls: type[Exception], start: str) -> None:
    z = np.zeros((2, 5), dtype=np.float32)
    rows = [[0], [1]]
    _raises(cls, start, lambda: StepOptions(**{field: value}))
    _raises(cls, start, lambda: dlf_rs.fuse_step(z, z, [z], history=rows, **{field: value}))
    _raises(cls, start, lambda: dlf_rs.sample(z, history=rows, **{field: value}))


def test_bad_histories_are_clear_errors() -> None:
    z = np.zeros((2, 5), dtype=np.float32)
    p = {"presence_penalty": 0.5}
    calls = [
        lambda h: dlf_rs.fuse_step(z, z, [z], history=h, **p),
        lambda h: dlf_rs.sample(z, history=h, **p),
    ]
    bad: list[tuple[Any, type[Exception], str]] = [
        (None, DlfError, "history: expected the tokens each row has seen"),
        ([[0, 5], [1]], DlfError, "history[0]: expected token ids < 5"),
        ([[0], [1, 2, 7]], DlfError, "history[1]: expected token ids < 5"),
        (np.array([[0, -1], [9, -1]]), DlfError, "history[1]:"),
        ([[0]], DlfError, "history: expected shape 2 rows"),
        ([[0], [1], [2]], DlfError, "history: expected shape 2 rows"),
        (np.zeros((3, 4), dtype=np.int64), DlfError, "history: expected shape 2 rows"),
        (np.array([0, 1]), DlfError, "history: expected a 2-D int array"),
        (np.zeros((2, 2, 2), dtype=np.int64), DlfError, "history: expected a 2-D int array"),
        (np.zeros((2, 3), dtype=np.float32), TypeError, "history: expected integer token ids"),
        (np.zeros((2, 3), dtype=bool), TypeError, "history: expected integer token ids"),
        ([[0.5], [1]], TypeError, "history[0]: expected integer token ids"),
        ([[[0, 1]], [1]], DlfError, "history[0]: expected a 1-D sequence"),
        ([[0], 3], DlfError, "history[1]: expected a 1-D sequence"),
        ("abc", TypeError, "history: expected a list of B token-id sequences"),
        ([[2**70], [1]], TypeError, "history[0]:"),
        (np.array([[2**64 - 1], [0]], dtype=np.uint64), DlfError, "history: expected token ids"),
    ]
    for h, cls, start in bad:
        for call in calls:
            _raises(cls, start, functools.partial(call, h))


def test_speculative_refuses_penalties() -> None:
    _raises(DlfError, "speculative: expected None when repetition_penalty != 1",
            lambda: StepOptions(speculative=2, repetition_penalty=1.1))  # fmt: skip
    _raises(DlfError, "speculative:", lambda: StepOptions(speculative="auto", presence_penalty=0.1))
    StepOptions(speculative=2)
    StepOptions(speculative="auto", repetition_penalty=1.0, frequency_penalty=0.0)
