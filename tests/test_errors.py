"""Error paths of the Python API: every bad input raises DlfError (a ValueError) or TypeError with a
message naming the argument; nothing crashes. Also the accepted input kinds (torch, dtypes,
non-contiguous arrays)."""

from __future__ import annotations

import dlf_rs
import numpy as np
import pytest
from dlf_rs import DlfError
from dlf_rs.reference import zipf_logits
from hypothesis import given, settings
from hypothesis import strategies as st

B, V = 3, 64


@pytest.fixture(scope="module")
def data():
    return zipf_logits(np.random.default_rng(0), B, V, 2)


def raises(exc, *words):
    """pytest.raises that also checks the message names every word."""

    class _Ctx:
        def __enter__(self):
            self.ctx = pytest.raises(exc)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *a):
            out = self.ctx.__exit__(*a)
            msg = str(self.info.value)
            for w in words:
                assert w in msg, (w, msg)
            return out

    return _Ctx()


def test_mismatched_batch_and_vocab(data):
    large, small, experts = data
    with raises(DlfError, "small", f"[{B}, {V}]", f"[{B + 1}, {V}]"):
        dlf_rs.fuse_step(large, np.vstack([small, small[:1]]), experts)
    with raises(DlfError, "experts[1]", f"[{B}, {V - 1}]"):
        dlf_rs.fuse_step(large, small, [experts[0], experts[1][:, :-1]])
    with raises(DlfError, "small"):
        dlf_rs.fuse_logits(large, small.T.copy(), experts, [1.0, 1.0])
    with raises(DlfError, "large", "2-D"):
        dlf_rs.fuse_step(large[0], small, experts)
    with raises(DlfError, "experts", "3-D"):
        dlf_rs.fuse_step(large, small, experts[0])


def test_alpha_errors(data):
    large, small, experts = data
    with raises(DlfError, "experts"):
        dlf_rs.fuse_step(large, small, [])
    # One float applies to every expert (StepOptions' rule, the same in generate).
    one = dlf_rs.fuse_step(large, small, experts, alpha=1.0)
    both = dlf_rs.fuse_step(large, small, experts, alpha=[1.0, 1.0])
    assert np.array_equal(one.tokens, both.tokens) and np.array_equal(one.alphas, both.alphas)
    with raises(DlfError, "alpha", "2"):
        dlf_rs.fuse_step(large, small, experts, alpha=[1.0])
    with raises(DlfError, "alpha"):
        dlf_rs.fuse_step(large, small, experts, alpha=[1.0, float("nan")])
    with raises(TypeError, "alpha"):
        dlf_rs.fuse_step(large, small, experts, alpha="1.0")
    with raises(DlfError, "alphas", "T=2"):
        dlf_rs.fuse_logits(large, small, experts, [1.0, 2.0, 3.0])
    with raises(DlfError, "alphas", f"[{B}, 2]"):
        dlf_rs.fuse_logits(large, small, experts, np.ones((B + 1, 2), np.float32))
    with raises(DlfError, "alphas"):
        dlf_rs.fuse_logits(large, small, experts, [1.0, np.inf])
    # No experts and no weights: the "large alone" baseline.
    assert np.array_equal(dlf_rs.fuse_logits(large, small, [], []), large)
    assert np.array_equal(
        dlf_rs.fuse_step(large, small, [], alpha=[]).tokens, np.argmax(large, axis=1)
    )


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("model", ["large", "small", "experts[1]"])
def test_non_finite_names_model_and_row(data, model, bad):
    large, small, experts = (x.copy() for x in data)
    target = {"large": large, "small": small, "experts[1]": experts[1]}[model]
    target[2, 5] = bad
    with raises(DlfError, model, "row 2"):
        dlf_rs.fuse_step(large, small, experts)
    with raises(DlfError, model, "row 2"):
        dlf_rs.fuse_logits(large, small, experts, [1.0, 1.0])


def test_all_neg_inf_row_is_an_error(data):
    large, small, experts = (x.copy() for x in data)
    large[1] = -np.inf
    with raises(DlfError, "large", "row 1"):
        dlf_rs.fuse_step(large, small, experts)
    with raises(DlfError, "logits", "row 1"):
        dlf_rs.sample(large)
    large, small, experts = (x.copy() for x in data)
    experts[0, 2] = -np.inf
    with raises(DlfError, "experts[0]", "row 2"):
        dlf_rs.fuse_step(large, small, experts)


@pytest.mark.parametrize(
    ("kwargs", "word", "exc"),
    [
        ({"alpha_range": (2.0, 0.0)}, "alpha_range", DlfError),
        ({"alpha_range": (0.0, float("nan"))}, "alpha_range", DlfError),
        ({"alpha_range": (float("-inf"), 1.0)}, "alpha_range", DlfError),
        ({"alpha_range": (0.0, 1.0, 2.0)}, "alpha_range", TypeError),
        ({"alpha_range": 2.0}, "alpha_range", TypeError),
        ({"grid_step": 0.0}, "grid_step", DlfError),
        ({"grid_step": -0.1}, "grid_step", DlfError),
        ({"grid_step": float("nan")}, "grid_step", DlfError),
        ({"grid_step": 1e-12}, "grid_step", DlfError),
        ({"support_k": 0}, "support_k", DlfError),
        ({"support_k": -3}, "support_k", DlfError),
        ({"support_k": 2.5}, "support_k", TypeError),
        ({"solver": "newton"}, "solver", DlfError),
        ({"multi_expert": "all"}, "multi_expert", DlfError),
        ({"temperature": -1.0}, "temperature", DlfError),
        ({"temperature": float("nan")}, "temperature", DlfError),
        ({"top_p": 0.0}, "top_p", DlfError),
        ({"top_p": 1.5}, "top_p", DlfError),
        ({"min_p": -0.1}, "min_p", DlfError),
        ({"top_k": -1}, "top_k", DlfError),
        ({"seed": -1}, "seed", DlfError),
        ({"seed": 2**64}, "seed", DlfError),
        ({"seed": 1.5}, "seed", TypeError),
        ({"seed": True}, "seed", TypeError),
        ({"seed": [1, 2]}, "seed", DlfError),
        ({"seed": [1, 2, "x"]}, "seed[2]", TypeError),
    ],
)
def test_bad_options(data, kwargs, word, exc):
    with raises(exc, word):
        dlf_rs.fuse_step(*data, **kwargs)


def test_sample_option_errors(data):
    large = data[0]
    for kwargs, word in [
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"seed": [1]}, "seed"),
        ({"top_k": -2}, "top_k"),
    ]:
        with raises(DlfError, word):
            dlf_rs.sample(large, **kwargs)


def test_bad_dtypes_and_types(data):
    large, small, experts = data
    with raises(TypeError, "large", "int64", "astype"):
        dlf_rs.fuse_step(large.astype(np.int64), small, experts)
    with raises(TypeError, "small", "bool"):
        dlf_rs.fuse_step(large, small > 0, experts)
    with raises(TypeError, "experts[0]", "complex"):
        dlf_rs.fuse_step(large, small, [experts[0].astype(np.complex64), experts[1]])
    with raises(TypeError, "large", "list"):
        dlf_rs.fuse_step(large.tolist(), small, experts)
    with raises(TypeError, "experts"):
        dlf_rs.fuse_step(large, small, "experts")
    with raises(TypeError, "logits"):
        dlf_rs.sample(large.astype(np.int32))


def test_accepted_dtypes_and_layouts(data):
    large, small, experts = data
    want = dlf_rs.fuse_step(large, small, experts)
    for dtype in (np.float64, np.dtype(">f4")):
        got = dlf_rs.fuse_step(large.astype(dtype), small.astype(dtype), experts.astype(dtype))
        assert np.array_equal(got.alphas, want.alphas)
    half = [x.astype(np.float16) for x in (large, small)]
    got = dlf_rs.fuse_step(*half, experts.astype(np.float16))
    ref = dlf_rs.fuse_step(
        *(h.astype(np.float32) for h in half), experts.astype(np.float16).astype(np.float32)
    )
    assert np.array_equal(got.alphas, ref.alphas)
    # Non-contiguous inputs are copied once and give the same answer.
    wide = [np.repeat(x, 2, axis=-1) for x in (large, small, experts)]
    got = dlf_rs.fuse_step(wide[0][:, ::2], wide[1][:, ::2], wide[2][:, :, ::2])
    assert np.array_equal(got.alphas, want.alphas)
    fortran = np.asfortranarray(large)
    assert np.array_equal(dlf_rs.fuse_step(fortran, small, experts).tokens, want.tokens)
    # A read-only array is fine: the core only reads.
    ro = large.copy()
    ro.setflags(write=False)
    assert np.array_equal(dlf_rs.fuse_step(ro, small, list(experts)).alphas, want.alphas)


def test_torch_tensors(data):
    torch = pytest.importorskip("torch")
    large, small, experts = data
    want = dlf_rs.fuse_step(large, small, experts)
    tl, ts, te = (torch.from_numpy(x.copy()) for x in data)
    got = dlf_rs.fuse_step(tl, ts, te)
    assert np.array_equal(got.alphas, want.alphas) and np.array_equal(got.tokens, want.tokens)
    got = dlf_rs.fuse_step(tl.requires_grad_(), ts, [te[0], te[1]])
    assert np.array_equal(got.alphas, want.alphas)
    assert np.array_equal(
        dlf_rs.fuse_logits(tl, ts, te, torch.tensor([1.0, 0.5])),
        dlf_rs.fuse_logits(large, small, experts, [1.0, 0.5]),
    )
    for dt in (torch.float16, torch.bfloat16, torch.float64):
        conv = [x.to(dt) for x in (ts, te)]
        got = dlf_rs.fuse_step(tl.detach().to(dt), *conv)
        ref = dlf_rs.fuse_step(*(x.to(dt).float().numpy() for x in (tl.detach(), ts, te)))
        assert np.array_equal(got.alphas, ref.alphas)
    with raises(TypeError, "small", ".float()"):
        dlf_rs.fuse_step(tl, ts.to(torch.int64), te)
    with raises(TypeError, "logits", "bool"):
        dlf_rs.sample(tl > 0)
    # No GPU here: a non-CPU (meta) tensor takes the same refusal path as a CUDA one.
    with raises(TypeError, "large", "cpu()", "pinned"):
        dlf_rs.fuse_step(torch.empty((B, V), device="meta"), small, experts)
    if torch.cuda.is_available():
        with raises(TypeError, "large", "cuda"):
            dlf_rs.fuse_step(tl.detach().cuda(), ts, te)


@settings(max_examples=60, deadline=None)
@given(
    b=st.integers(1, 4),
    v=st.integers(1, 40),
    which=st.sampled_from(["small", "experts[0]", "experts[1]"]),
    db=st.integers(-1, 2),
    dv=st.integers(-1, 2),
)
def test_random_shape_mismatches(b, v, which, db, dv):
    if db == 0 and dv == 0 or b + db < 0 or v + dv < 0:
        return
    rng = np.random.default_rng(b * 100 + v)
    shapes = {name: (b, v) for name in ("large", "small", "experts[0]", "experts[1]")}
    shapes[which] = (b + db, v + dv)
    arrs = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    with raises(DlfError, which, f"[{b}, {v}]"):
        dlf_rs.fuse_step(arrs["large"], arrs["small"], [arrs["experts[0]"], arrs["experts[1]"]])


@settings(max_examples=60, deadline=None)
@given(
    row=st.integers(0, 3),
    col=st.integers(0, 19),
    which=st.sampled_from(["large", "small", "experts[0]"]),
    bad=st.sampled_from([np.nan, np.inf]),
)
def test_random_non_finite_positions(row, col, which, bad):
    rng = np.random.default_rng(row * 20 + col)
    arrs = {
        k: rng.normal(size=(4, 20)).astype(np.float32) for k in ("large", "small", "experts[0]")
    }
    arrs[which][row, col] = bad
    with raises(DlfError, which, f"row {row}"):
        dlf_rs.fuse_step(arrs["large"], arrs["small"], [arrs["experts[0]"]])
