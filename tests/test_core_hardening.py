"""Hardening of the Rust core and the options contract of `dlf_rs._core`
(issue 9): DEFAULTS and CoreOptions, no panic reaching Python, tiny temperatures, weight limits,
Ctrl-C on a long call. Calls `dlf_rs._core` directly, with every option spelled out from
`DEFAULTS`, so it does not depend on the Python wrappers."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from dlf_rs import StepOptions, _core

SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty")
OPTION_KEYS = ["alpha_min", "alpha_max", "grid_step", "solver", "multi_expert", "support_k", *SAMPLING_KEYS]


def options(**overrides):
    opts = {k: _core.DEFAULTS[k] for k in OPTION_KEYS}
    opts["alpha"] = None
    opts.update(overrides)
    return opts


def core(**overrides):
    return _core.CoreOptions(**options(**overrides))


def f32(x):
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32))


def lm_rows(rng, b, v):
    ranks = rng.permuted(np.tile(np.arange(1, v + 1), (b, 1)), axis=1)
    return f32(-1.1 * np.log(ranks) + 0.5 * rng.random((b, v)))


def test_defaults_are_the_documented_ones():
    assert _core.DEFAULTS == {
        "alpha_min": 0.0,
        "alpha_max": 2.0,
        "grid_step": 0.1,
        "solver": "grid",
        "multi_expert": "one-active",
        "support_k": None,
        "temperature": 0.0,
        "top_k": 0,
        "top_p": 1.0,
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "frequency_penalty": 0.0,
        "presence_penalty": 0.0,
        "max_grid_points": 10001,
        "max_abs_alpha": 100.0,
        "speculative": None,
        "max_draft_len": 16,
    }
    assert issubclass(_core.DlfInternalError, _core.DlfError)
    assert isinstance(core(), _core.CoreOptions)
    assert _core.MULTI_EXPERT_RULES == ("one-active", "joint", "own-terms", "max-shift")
    assert _core.SOLVERS == ("grid", "exact")


BAD_OPTIONS = [
    ({"alpha": [1e300]}, "alpha:"),
    ({"alpha": [0.5, float("nan")]}, "alpha:"),
    ({"alpha": [-100.5]}, "alpha:"),
    ({"alpha_min": -1e300, "alpha_max": -1e300}, "alpha_range:"),
    ({"alpha_min": -101.0, "alpha_max": 0.0}, "alpha_range:"),
    ({"alpha_min": 1.0, "alpha_max": 0.0}, "alpha_range:"),
    ({"alpha_max": float("inf")}, "alpha_range:"),
    ({"grid_step": 0.0}, "grid_step:"),
    ({"alpha_min": -50.0, "alpha_max": 50.0, "grid_step": 0.0099}, "grid_step:"),
    ({"solver": "newton"}, "solver:"),
    ({"multi_expert": "Joint"}, "multi_expert:"),
    ({"support_k": 0}, "support_k:"),
    ({"temperature": -1.0}, "temperature:"),
    ({"temperature": float("inf")}, "temperature:"),
    ({"top_p": 0.0}, "top_p:"),
    ({"top_p": 1.5}, "top_p:"),
    ({"min_p": -0.1}, "min_p:"),
    ({"repetition_penalty": 0.0}, "repetition_penalty:"),
    ({"repetition_penalty": float("nan")}, "repetition_penalty:"),
    ({"frequency_penalty": 2.5}, "frequency_penalty:"),
    ({"presence_penalty": -float("inf")}, "presence_penalty:"),
]


@pytest.mark.parametrize("bad,prefix", BAD_OPTIONS)
def test_core_options_raise_what_the_record_raises(bad, prefix):
    with pytest.raises(_core.DlfError) as by_core:
        core(**bad)
    assert str(by_core.value).startswith(prefix), by_core.value
    assert not isinstance(by_core.value, _core.DlfInternalError)
    fields = {k: tuple(v) if k == "alpha" else v for k, v in bad.items()}
    if "alpha_min" in fields or "alpha_max" in fields:
        d = _core.DEFAULTS
        fields["alpha_range"] = (fields.pop("alpha_min", d["alpha_min"]),
                                 fields.pop("alpha_max", d["alpha_max"]))  # fmt: skip
    with pytest.raises(_core.DlfError) as by_record:
        StepOptions(**fields)
    assert str(by_record.value) == str(by_core.value)


def test_limits_are_inclusive():
    core(alpha=[100.0, -100.0])
    core(alpha=-100.0)
    core(alpha_min=-50.0, alpha_max=50.0, grid_step=0.01)  # 10,001 points
    core(alpha_min=-100.0, alpha_max=100.0)


def test_speculative_is_checked_with_the_penalties():
    assert isinstance(core(speculative=16), _core.CoreOptions)
    assert isinstance(core(speculative="auto"), _core.CoreOptions)
    for bad in (0, 17, -1, "fast"):
        with pytest.raises(_core.DlfError, match="^speculative: expected None, a draft length"):
            core(speculative=bad)
    with pytest.raises(_core.DlfError, match="^speculative: expected None when repetition"):
        core(speculative=2, presence_penalty=0.5)


def test_every_option_is_required():
    z = f32([[0.0, 1.0]])
    with pytest.raises(TypeError):
        _core.fuse_step(z, z, [z])
    with pytest.raises(TypeError):
        _core.sample(z)
    with pytest.raises(TypeError):
        _core.CoreOptions(alpha=None)
    with pytest.raises(TypeError):  # the options travel as one record, never as keywords
        _core.sample(z, options(temperature=0.5))


def test_one_static_weight_is_broadcast_to_the_experts():
    rng = np.random.default_rng(2)
    large, small = lm_rows(rng, 3, 40), lm_rows(rng, 3, 40)
    experts = [lm_rows(rng, 3, 40) for _ in range(3)]
    one = core(alpha=0.75)
    assert one.static_alphas(3) == [0.75] * 3 and one.static_alphas(0) == []
    assert core(alpha=[0.5, 1.0]).static_alphas(3) == [0.5, 1.0] and core().static_alphas(2) is None
    for t in (1, 3):
        a = _core.fuse_step(large, small, experts[:t], one)
        b = _core.fuse_step(large, small, experts[:t], core(alpha=[0.75] * t))
        np.testing.assert_array_equal(a.alphas, np.full((3, t), 0.75, np.float32))
        np.testing.assert_array_equal(a.tokens, b.tokens)
    with pytest.raises(_core.DlfError, match=r"^alpha: expected 3 static weights \(one per expert\), got 2"):
        _core.fuse_step(large, small, experts, core(alpha=[0.5, 1.0]))


# ---- reproducers of reported failures ----


@pytest.mark.parametrize("temperature", [5e-324, 1e-310, 1e-300])
@pytest.mark.parametrize("top_p", [1.0, 0.5])
def test_tiny_temperature_is_greedy_like(temperature, top_p):
    opts = core(temperature=temperature, top_p=top_p)
    assert _core.sample(f32([[1.0, 2.0]]), opts, seed=0).tolist() == [1]
    z = f32([[-np.inf, 1.0, 2.0]] * 64)
    assert set(_core.sample(z, opts, seed=1).tolist()) == {2}
    ties = f32([[2.0, -np.inf, 2.0, 1.0]] * 400)
    drawn = set(_core.sample(ties, opts, seed=2).tolist())
    # Uniform over the tied maxima; top-p 0.5 keeps the first of them only (mass 0.5 reached).
    assert drawn == ({0, 2} if top_p == 1.0 else {0})


def test_static_alpha_above_float32_is_refused():
    large, small, expert = f32([[5.0, 0.0]]), f32([[0.0, 0.0]]), f32([[0.0, -1.0]])
    with pytest.raises(_core.DlfError, match="^alpha:"):
        core(alpha=[1e300])
    with pytest.raises(_core.DlfError, match="^alphas:"):
        _core.fuse_logits(large, small, [expert], f32([[1e30]]))


@pytest.mark.parametrize("solver", ["grid", "exact"])
@pytest.mark.parametrize(
    "lo,hi,step", [(-100.0, 100.0, 0.1), (-3.0, -1.0, 0.05), (0.5, 0.7, 0.1), (-100.0, -100.0, 0.1)]
)
def test_results_lie_in_the_range(solver, lo, hi, step):
    rng = np.random.default_rng(3)
    b, v = 6, 500
    large, small = lm_rows(rng, b, v), lm_rows(rng, b, v)
    experts = [f32(small + rng.normal(0, 1, (b, v))) for _ in range(2)]
    res = _core.fuse_step(
        large, small, experts, core(alpha_min=lo, alpha_max=hi, grid_step=step, solver=solver)
    )
    chosen = res.alphas[np.arange(b), np.maximum(res.active, 0)]
    chosen = np.where(res.active >= 0, chosen, 0.0)
    assert np.all(np.isfinite(res.alphas))
    assert np.all((chosen >= np.float32(lo)) & (chosen <= np.float32(hi)) | (res.active < 0))
    assert np.all(np.isfinite(res.loss))


def run_python(code: str, timeout: float = 120.0, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **env},
        check=False,  # the callers assert on the return code and stderr themselves
    )


@pytest.mark.parametrize("threaded", [False, True])
def test_a_panic_is_one_internal_error_and_prints_nothing(threaded):
    code = f"""
        from dlf_rs import _core
        try:
            _core._panic_for_tests(100_000, threaded={threaded})
        except _core.DlfInternalError as e:
            print("CAUGHT", e)
        except BaseException as e:
            print("ESCAPED", type(e).__name__, e)
        """
    proc = run_python(code, RUST_BACKTRACE="1")
    assert "CAUGHT internal error in dlf_rs _panic_for_tests (a bug): test panic in row" in proc.stdout
    assert "please report it with the inputs' shapes" in proc.stdout
    assert len(proc.stderr) < 2000, proc.stderr[:2000]


def test_ctrl_c_stops_a_long_call_within_a_bound():
    # A 10,001-point grid over (-50, 50) on B = 64, V = 32000, T = 4 runs for many seconds; SIGINT
    # at 0.5 s must end it with KeyboardInterrupt within 3 s (a bound, not a benchmark).
    code = """
        import os, signal, threading, time
        import numpy as np
        from dlf_rs import _core
        rng = np.random.default_rng(0)
        b, v = 64, 32000
        z = lambda: np.ascontiguousarray(rng.normal(0, 2, (b, v)).astype(np.float32))
        large, small, experts = z(), z(), [z() for _ in range(4)]
        opts = {k: _core.DEFAULTS[k] for k in
                "solver multi_expert support_k temperature top_k top_p min_p "
                "repetition_penalty frequency_penalty presence_penalty".split()}
        opts = _core.CoreOptions(alpha=None, alpha_min=-50.0, alpha_max=50.0, grid_step=0.01,
                                 **opts)
        # Python leaves SIGINT ignored when its parent ignored it (a background job of a
        # non-interactive shell, nohup): Ctrl-C must mean KeyboardInterrupt here whatever ran us.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
        t0 = time.perf_counter()
        try:
            _core.fuse_step(large, small, experts, opts)
            print("FINISHED", time.perf_counter() - t0)
        except KeyboardInterrupt:
            print("INTERRUPTED", time.perf_counter() - t0)
        """
    proc = run_python(code, timeout=300)
    assert proc.stdout.startswith("INTERRUPTED"), proc.stdout + proc.stderr
    elapsed = float(proc.stdout.split()[1])
    print(f"KeyboardInterrupt {elapsed - 0.5:.3f} s after SIGINT")
    assert elapsed < 3.5, elapsed


def test_threaded_path_gives_the_same_result_as_inline():
    # Large enough to run on the worker thread (see INLINE_WORK in rust/python/guard.rs).
    rng = np.random.default_rng(5)
    b, v = 32, 32000
    large, small = lm_rows(rng, b, v), lm_rows(rng, b, v)
    experts = [f32(small + rng.normal(0, 1, (b, v)))]
    opts = core(temperature=0.7)
    big = _core.fuse_step(large, small, experts, opts, seed=4)
    for r in range(0, b, 5):
        one = _core.fuse_step(
            large[r : r + 1], small[r : r + 1], [experts[0][r : r + 1]], opts, seeds=[0]
        )
        assert one.alphas[0, 0] == big.alphas[r, 0]
