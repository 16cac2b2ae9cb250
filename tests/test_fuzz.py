"""Fuzzing the public API against the rules (README.md, "Options") and the f64 numpy oracle, CI-sized.

Cases (shapes B 0..6, V 1..300, T 1..4; float16/32/64 numpy, torch CPU tensors, transposed,
sliced and reversed views, [T, B, V] arrays or lists; huge, tiny, subnormal, tied and -inf
logits, NaN/+inf entries; every option of fuse_step/sample with valid and odd values) are drawn by
hypothesis through tests/fuzz_cases.py and run in a worker subprocess (tests/fuzz_pool.py) with a
time and memory watchdog, so that a crash or a hang fails one example instead of killing pytest.
Each call must give the oracle's result (tests/fuzz_oracle.py) or a clean error: DlfError or
TypeError, never a PanicException, with a message that starts with the argument's name.

The long run of the same generator is benches/fuzz.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from typing import Any

import pytest
from fuzz_cases import (
    MIN_P,
    SUPPORT_K,
    TEMPERATURE,
    TOP_K,
    TOP_P,
    Drawer,
    describe,
    gen_case,
)
from fuzz_pool import Pool
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

GOOD = ("correct", "clean_error")
FUZZ = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)


class HypothesisDrawer(Drawer):
    def __init__(self, data: Any):
        self.data = data

    def int(self, lo: int, hi: int) -> int:
        return self.data.draw(st.integers(lo, hi))


@pytest.fixture(scope="module")
def pool():
    p = Pool(1, timeout_s=30.0, mem_mb=2048.0)
    yield p
    p.close()


def run(pool: Pool, case: dict[str, Any]) -> dict[str, Any]:
    ((_, verdict),) = list(pool.run([case]))
    return verdict


def assert_good(pool: Pool, case: dict[str, Any]) -> dict[str, Any]:
    verdict = run(pool, case)
    assert verdict["cat"] in GOOD, f"{verdict['cat']}: {verdict['detail']}\n{describe(case)}"
    return verdict


@settings(FUZZ, max_examples=150)
@given(data=st.data())
def test_fuse_step_fuzz(pool, data):
    assert_good(pool, gen_case(HypothesisDrawer(data), "fuse_step"))


@settings(FUZZ, max_examples=60)
@given(data=st.data())
def test_fuse_logits_fuzz(pool, data):
    assert_good(pool, gen_case(HypothesisDrawer(data), "fuse_logits"))


@settings(FUZZ, max_examples=80)
@given(data=st.data())
def test_sample_fuzz(pool, data):
    assert_good(pool, gen_case(HypothesisDrawer(data), "sample"))


ODD = {
    "temperature": TEMPERATURE["odd"],
    "top_k": TOP_K["odd"],
    "top_p": TOP_P["odd"],
    "min_p": MIN_P["odd"],
    "support_k": SUPPORT_K["odd"],
    "solver": ["'newton'", "None", "1"],
    "multi_expert": ["'all'", "None"],
    "grid_step": ["0", "-0.1", "float('nan')", "True", "'0.1'", "1e-12", "5e-324"],
    "alpha_range": ["(2.0, 0.0)", "'ab'", "(0.0, 1.0, 2.0)", "(-1e300, -1e300)", "(0.0, 101)"],
    "alpha": ["1e300", "1e39", "100.5", "float('inf')", "True", "'1.0'", "np.array(1j)", "1j"],
    "seed": ["-1", "2**64", "1.5", "True", "'ab'", "[1, 2, 3, 4, 5, 6, 7]", "np.int64(-3)"],
}


@settings(FUZZ, max_examples=60)
@given(data=st.data(), name=st.sampled_from(sorted(ODD)))
def test_one_odd_option_is_a_named_error(pool, data, name):
    """A valid call with exactly one odd option: a clean error naming that option (or, where
    the rules leave the value open, the oracle's result)."""
    case = gen_case(HypothesisDrawer(data), "fuse_step")
    case.update(specials=[], neg_rows=[], bad_input=None, ninf_large=0.0, ninf_other=0.0)
    case.update(B=max(case["B"], 1), V=min(case["V"], 40), T=max(case["T"], 1))
    case["kwargs"] = {name: data.draw(st.sampled_from(ODD[name]))}
    verdict = assert_good(pool, case)
    if verdict["cat"] == "clean_error":
        msg = verdict["detail"].split(": ", 1)[1]
        assert msg.startswith(name), (msg, describe(case))


# ---- the reproducers of issue #14, each in a fresh subprocess ---------------------------------

PRELUDE = """
import json, sys
import numpy as np
import dlf_rs
inf, nan = float("inf"), float("nan")
def out(kind, value):
    print(json.dumps({"kind": kind, "value": value}))
try:
    r = CALL
except BaseException as e:
    out("error", [type(e).__name__, isinstance(e, Exception), str(e)[:300]])
else:
    r = getattr(r, "tokens", r), getattr(r, "alphas", None)
    out("result", [np.asarray(r[0]).tolist(), None if r[1] is None else np.asarray(r[1]).tolist()])
"""


def isolated(call: str, timeout: float = 60.0) -> dict[str, Any]:
    """Run one API call in a fresh interpreter with a timeout; a crash or hang fails the test."""
    code = textwrap.dedent(PRELUDE).replace("CALL", call)
    proc = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "RUST_BACKTRACE": "0"},
    )
    assert proc.returncode == 0, f"{call}: exit {proc.returncode}\n{proc.stderr[-2000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def named_error(r: dict[str, Any], name: str) -> None:
    assert r["kind"] == "error", r
    cls, is_exception, msg = r["value"]
    assert is_exception and cls in ("DlfError", "TypeError"), r
    assert msg.startswith((name + ":", name + "[")), r


STEP = "dlf_rs.fuse_step(np.zeros((1, 3)), np.zeros((1, 3)), np.zeros((1, 1, 3)), {})"
STEP_5_0 = "dlf_rs.fuse_step(np.array([[5., 0]]), np.zeros((1, 2)), np.array([[[0., -1]]]), {})"


@pytest.mark.parametrize(
    ("call", "name"),
    [
        ("dlf_rs.sample(np.array([[1., 2.]], np.float32), temperature=5e-324, top_p=0.5)", None),
        ("dlf_rs.sample(np.array([[-inf, 1, 2]], np.float32), temperature=5e-324)", None),
        (STEP_5_0.format("alpha=1e300"), "alpha"),
        (STEP_5_0.format("alpha_range=(-1e300, -1e300)"), "alpha_range"),
        ("dlf_rs.sample(np.zeros((1, 3)), top_k=2**64)", "top_k"),
        (STEP.format("support_k=2**64"), "support_k"),
        (STEP.format("alpha=np.array(1j)"), "alpha"),
        ("dlf_rs.sample(__import__('torch').zeros((2, 3)).to_sparse())", "logits"),
        (STEP.format("grid_step=1e-5"), "grid_step"),
        (STEP.format("alpha_range='ab'"), "alpha_range"),
        (STEP.format("seed=-1"), "seed"),
    ],
)
def test_issue_14_reproducers(call, name):
    """A named error, or (name None: the sampling cases) a token that is finite and maximal."""
    r = isolated(call)
    if name is not None:
        named_error(r, name)
        return
    assert r["kind"] == "result", r
    # The row's maximum is unique: a temperature this small is greedy in the limit.
    want = [1] if "[[1., 2.]]" in call else [2]
    assert r["value"][0] == want, r
