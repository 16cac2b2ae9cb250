"""``fuse_step(..., fused_out=buf)``: the fused logits the step builds, written into the caller's
buffer, against the numpy reference (``dlf_rs.reference.fuse_row``) at the returned weights.

The comparison is bit for bit: the core specifies its fusion as a fixed float32 operation
sequence (``out = z_L; out += float32(alpha_t) * (z_t' - z_S')`` per expert, no fused
multiply-add; rust/fuse.rs), which the numpy loop performs in the same order. The inputs here
have no -0.0 and no overflow (the two places where the core's rules, skipping a zero weight and
saturating, could differ from a plain numpy loop in the last bit or in inf vs f32 max).
The engine path (``dlf_rs.engines.fusion.fuse_rows``), which now makes one call instead of
``fuse_step`` followed by ``fuse_logits``, is checked against the same reference.
"""

from __future__ import annotations

import dlf_rs
import numpy as np
import pytest
from dlf_rs.engines.fusion import fuse_rows
from dlf_rs.options import StepOptions
from dlf_rs.reference import fuse_row, zipf_logits
from dlf_rs.step import fuse_step_prepared


def family(b: int, v: int, t: int, seed: int = 0):
    rng = np.random.default_rng(seed + 97 * b + 13 * t + v)
    large, small, experts = zipf_logits(rng, b, v, t)
    large, small = large.copy(), small.copy()
    experts = [np.ascontiguousarray(e) for e in experts]
    # -inf: in the large model (stays -inf) and in an expert (replaced before differencing).
    large[0, 3] = -np.inf
    experts[0][b - 1, 5] = -np.inf
    return large, small, experts


def reference(large, small, experts, alphas) -> np.ndarray:
    return np.stack(
        [
            fuse_row(large[i], small[i], [e[i] for e in experts], alphas[i])
            for i in range(len(large))
        ]
    )


def bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)


OPTIONS = {
    "dlf default": {},
    "dlf support_k=16": {"support_k": 16},
    "dlf exact": {"solver": "exact"},
    "dlf top_k sampling": {"temperature": 0.8, "top_k": 5},
    "dlf top_p sampling": {"temperature": 1.2, "top_p": 0.9, "min_p": 0.01},
    "dlf joint": {"multi_expert": "joint"},
    "static": {"alpha": 0.75},
    "static top_k": {"alpha": 1.25, "temperature": 0.7, "top_k": 3},
}


@pytest.mark.parametrize("name", list(OPTIONS))
@pytest.mark.parametrize(("b", "v", "t"), [(1, 50, 1), (4, 2048, 2), (3, 4099, 3), (9, 777, 1)])
def test_fused_out_is_fuse_logits_of_the_returned_alphas(name, b, v, t) -> None:
    large, small, experts = family(b, v, t)
    kw = OPTIONS[name]
    buf = np.full((b, v), np.nan, dtype=np.float32)
    res = dlf_rs.fuse_step(large, small, experts, seed=11, fused_out=buf, **kw)
    want = reference(large, small, experts, res.alphas)
    np.testing.assert_array_equal(bits(buf), bits(want))
    assert np.isneginf(buf[0, 3])
    # The step itself is unchanged by the buffer: same weights, traces and tokens (same seed).
    plain = dlf_rs.fuse_step(large, small, experts, seed=11, **kw)
    for field in ("tokens", "alphas", "loss", "active", "support_size", "certified"):
        np.testing.assert_array_equal(getattr(res, field), getattr(plain, field), err_msg=field)
    # And the public fuse_logits agrees with both.
    np.testing.assert_array_equal(
        bits(dlf_rs.fuse_logits(large, small, experts, res.alphas)), bits(buf)
    )


def test_fused_out_holds_the_logits_before_penalties() -> None:
    """Penalties change the row the token is drawn from, not the fused logits returned."""
    b, v, t = 3, 500, 2
    large, small, experts = family(b, v, t)
    history = [[0, 1, 1, 7], [], [499, 3]]
    kw = {"repetition_penalty": 1.4, "presence_penalty": 0.3, "temperature": 0.9}
    buf = np.empty((b, v), dtype=np.float32)
    res = dlf_rs.fuse_step(large, small, experts, seed=5, history=history, fused_out=buf, **kw)
    plain = dlf_rs.fuse_step(large, small, experts, seed=5, history=history, **kw)
    np.testing.assert_array_equal(res.tokens, plain.tokens)
    np.testing.assert_array_equal(bits(buf), bits(reference(large, small, experts, res.alphas)))
    # The tokens are those sample() draws from the fused logits with the same penalties.
    drawn = dlf_rs.sample(buf, seed=5, history=history, **kw)
    np.testing.assert_array_equal(res.tokens, drawn)


def test_fused_out_greedy_token_is_the_rows_argmax() -> None:
    large, small, experts = family(8, 3000, 1)
    buf = np.empty_like(large)
    res = dlf_rs.fuse_step(large, small, experts, fused_out=buf)
    np.testing.assert_array_equal(res.tokens, np.argmax(buf, axis=1))


def test_fused_out_takes_a_cpu_float32_tensor() -> None:
    torch = pytest.importorskip("torch")
    large, small, experts = family(2, 300, 2)
    out = torch.full((2, 300), float("nan"))
    res = dlf_rs.fuse_step(large, small, experts, fused_out=out)
    want = reference(large, small, experts, res.alphas)
    np.testing.assert_array_equal(bits(out.numpy()), bits(want))
    with pytest.raises(TypeError, match=r"^fused_out: expected a float32 numpy array"):
        dlf_rs.fuse_step(large, small, experts, fused_out=torch.zeros(2, 300, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"^fused_out: expected a tensor that does not require"):
        dlf_rs.fuse_step(large, small, experts, fused_out=torch.zeros(2, 300, requires_grad=True))


def test_fuse_step_prepared_and_empty_batch() -> None:
    large, small, experts = family(3, 400, 2)
    buf = np.empty_like(large)
    res = fuse_step_prepared(large, small, experts, StepOptions(), None, fused_out=buf)
    np.testing.assert_array_equal(bits(buf), bits(reference(large, small, experts, res.alphas)))
    e = np.empty((0, 10), dtype=np.float32)
    out = np.empty((0, 10), dtype=np.float32)
    assert dlf_rs.fuse_step(e, e, [e], fused_out=out).tokens.shape == (0,)


def _bad_buffers(large: np.ndarray):
    b, v = large.shape
    ro = np.empty((b, v), dtype=np.float32)
    ro.flags.writeable = False
    yield (
        "shape",
        np.empty((b, v - 1), np.float32),
        dlf_rs.DlfError,
        r"expected shape \[3, 200\], got \[3, 199\]",
    )
    yield "3-D", np.empty((1, b, v), np.float32), TypeError, "got a 3-D array of dtype float32"
    yield "dtype", np.empty((b, v), np.float64), TypeError, "got a 2-D array of dtype float64"
    yield "Fortran", np.empty((b, v), np.float32, order="F"), dlf_rs.DlfError, "non-contiguous"
    yield "strided", np.empty((b, 2 * v), np.float32)[:, ::2], dlf_rs.DlfError, "non-contiguous"
    yield "read-only", ro, dlf_rs.DlfError, "got a read-only array"
    yield "aliases large", large, dlf_rs.DlfError, "shares memory with an input"
    yield "list", [[0.0] * v] * b, TypeError, "got list"
    yield "float", 1.0, TypeError, "got float"


@pytest.mark.parametrize("case", [c[0] for c in _bad_buffers(np.empty((3, 200), np.float32))])
def test_bad_fused_out_names_the_argument(case) -> None:
    large, small, experts = family(3, 200, 1)
    _, buf, exc, message = next(c for c in _bad_buffers(large) if c[0] == case)
    with pytest.raises(exc, match=r"^fused_out: .*" + message):
        dlf_rs.fuse_step(large, small, experts, fused_out=buf)
    with pytest.raises(exc, match=r"^fused_out: .*" + message):
        fuse_step_prepared(large, small, experts, StepOptions(), None, fused_out=buf)
    # A refused call wrote nothing and leaves the inputs usable.
    assert np.isneginf(large[0, 3])
    dlf_rs.fuse_step(large, small, experts)


def test_fused_out_overlapping_an_expert_is_refused() -> None:
    large, small, experts = family(2, 100, 2)
    with pytest.raises(dlf_rs.DlfError, match=r"^fused_out: .*shares memory"):
        dlf_rs.fuse_step(large, small, experts, fused_out=experts[1])


@pytest.mark.parametrize("t", [1, 2])
def test_fuse_rows_one_call_equals_numpy(t) -> None:
    """fuse_rows (one fuse_step with fused_out per group of options; static rows through
    fuse_logits) against the numpy reference at its returned weights, with groups that are the
    whole batch and groups that are not."""
    b, v = 7, 1500
    large, small, experts = family(b, v, t, seed=3)
    whole, _ = fuse_rows(large, small, experts, [StepOptions()] * b)
    res = dlf_rs.fuse_step(large, small, experts)
    np.testing.assert_array_equal(bits(whole), bits(reference(large, small, experts, res.alphas)))
    mixed = [
        StepOptions(),
        StepOptions(support_k=16),
        StepOptions(alpha=0.5),
        StepOptions(method="large"),
        StepOptions(),
        StepOptions(solver="exact", temperature=0.7),  # sampling fields are the engine's
        StepOptions(support_k=16),
    ]
    fused, alphas = fuse_rows(large, small, experts, mixed)
    for i, o in enumerate(mixed):
        if o.method == "large":
            np.testing.assert_array_equal(bits(fused[i]), bits(large[i]))
            assert np.isnan(alphas[i]).all()
            continue
        # The weights do not depend on the sampling fields, so row i alone gives them.
        one = dlf_rs.fuse_step(
            large[i : i + 1], small[i : i + 1], [e[i : i + 1] for e in experts], o
        )
        np.testing.assert_array_equal(alphas[i], one.alphas[0])
        want = fuse_row(large[i], small[i], [e[i] for e in experts], alphas[i])
        np.testing.assert_array_equal(bits(fused[i]), bits(want), err_msg=f"row {i}")
