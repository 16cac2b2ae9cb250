"""The fast decode path (``FusedGenerator(fast=True)``) against the default path.

The default path is itself checked against HF ``generate`` and an uncached numpy loop in
``test_generator.py``; here the fast path (static caches, fixed masks, optionally compiled
forwards) must give the same greedy tokens, finish reasons and weights for every method, on a batch
of prompts of different lengths whose rows end at EOS at different steps.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from conftest import PROMPTS, Family
from dlf_rs.engines.hf.fastpath import cache_length, resolve_options
from dlf_rs.engines.hf.generate import FusedGenerator
from test_generator import hf_generate

MAX_NEW = 10
METHOD_KW: dict[str, dict[str, Any]] = {
    "dlf": {"method": "dlf", "solver": "grid"},
    "static": {"method": "static", "alpha": [1.0, 0.5]},
    "large": {"method": "large"},
    "expert": {"method": "expert", "expert": 1},
}


def gens(fam: Family, **fast_kw: Any) -> tuple[FusedGenerator, FusedGenerator]:
    models = (fam.large, fam.small, fam.experts[:2], fam.tokenizer)
    return FusedGenerator(*models), FusedGenerator(*models, fast=True, **fast_kw)


def eos_ending_rows_at_different_steps(free: list[list[int]]) -> int:
    """A token that, taken as EOS, ends some rows early at different steps and leaves at least one
    row running past the first one to end (read from an EOS-free run, not hard-coded)."""
    for tok in sorted({t for row in free for t in row}):
        ends = [row.index(tok) + 1 if tok in row else None for row in free]
        early = [e for e in ends if e is not None]
        if len(set(early)) >= 2 and max(e or MAX_NEW + 1 for e in ends) > min(early):
            return tok
    raise AssertionError("no token ends the rows at different steps; change the prompts")


def assert_same(a: Any, b: Any) -> None:
    assert a.token_ids == b.token_ids
    assert a.finish_reasons == b.finish_reasons
    for x, y in zip(a.alphas, b.alphas):
        np.testing.assert_allclose(x, y, atol=1e-5)


@pytest.mark.parametrize("method", sorted(METHOD_KW))
def test_fast_equals_simple_with_rows_ending_at_different_steps(
    family: Family, method: str
) -> None:
    simple, fast = gens(family)
    kw = METHOD_KW[method]
    simple.eos_token_ids = set()
    free = simple.generate(PROMPTS, max_new_tokens=MAX_NEW, **kw)
    eos = eos_ending_rows_at_different_steps(free.token_ids)
    simple.eos_token_ids = fast.eos_token_ids = {eos}
    want = simple.generate(PROMPTS, max_new_tokens=MAX_NEW, **kw)
    got = fast.generate(PROMPTS, max_new_tokens=MAX_NEW, **kw)
    lengths = {len(t) for t, r in zip(want.token_ids, want.finish_reasons) if r == "eos"}
    assert len(lengths) >= 2  # rows end at EOS at different steps...
    assert max(len(t) for t in want.token_ids) > min(lengths)  # ...while others keep decoding
    assert_same(got, want)
    if method == "dlf":
        assert any(np.count_nonzero(a) for a in got.alphas)  # non-trivial weights were solved


def test_fast_large_matches_hf_generate(family: Family) -> None:
    _, fast = gens(family)
    res = fast.generate(PROMPTS, max_new_tokens=MAX_NEW, method="large")
    assert res.token_ids == hf_generate(family.large, family.tokenizer, PROMPTS, MAX_NEW)


def test_fast_caches_are_reused_and_rebuilt_for_new_shapes(family: Family) -> None:
    simple, fast = gens(family)
    first = fast.generate(PROMPTS, max_new_tokens=MAX_NEW, method="dlf")
    state = fast._fast_models["large"]
    cache = state.cache
    again = fast.generate(PROMPTS, max_new_tokens=MAX_NEW - 3, method="dlf")  # same bucket
    assert state.cache is cache and state.reused == 1
    assert again.token_ids == [t[: MAX_NEW - 3] for t in first.token_ids]
    two = fast.generate(PROMPTS[:2], max_new_tokens=MAX_NEW, method="dlf")  # new batch size
    assert state.cache is not cache
    assert two.token_ids == simple.generate(PROMPTS[:2], max_new_tokens=MAX_NEW).token_ids
    assert first.token_ids == simple.generate(PROMPTS, max_new_tokens=MAX_NEW).token_ids


def test_fast_compiled_forwards_trace_once_and_match(family: Family) -> None:
    # backend="eager" runs TorchDynamo's tracing (what CUDA graphs need: one graph, no breaks, no
    # recompiles across steps and calls) without a C++ toolchain; inductor is the CUDA default.
    from torch._dynamo.utils import counters

    opts = {"backend": "eager", "fullgraph": True, "dynamic": False}
    simple, fast = gens(family, compile=opts)
    want = simple.generate(PROMPTS, max_new_tokens=6, method="static", alpha=1.0)
    torch._dynamo.reset()
    counters.clear()
    got = fast.generate(PROMPTS, max_new_tokens=6, method="static", alpha=1.0)
    graphs = counters["stats"]["unique_graphs"]
    assert 1 <= graphs <= 3  # at most one per model, whatever the number of steps
    again = fast.generate(PROMPTS, max_new_tokens=5, method="static", alpha=1.0)
    assert counters["stats"]["unique_graphs"] == graphs  # nothing recompiled
    assert_same(got, want)
    assert again.token_ids == [t[:5] for t in want.token_ids]


def test_fast_options_and_errors(family: Family) -> None:
    cpu = torch.device("cpu")
    assert resolve_options(None, None, cpu).compile is None  # no compile on CPU unless asked
    assert resolve_options(None, None, torch.device("cuda")).compile is not None
    assert not resolve_options(None, None, torch.device("cuda")).overlap  # not with CUDA graphs
    assert resolve_options(False, None, torch.device("cuda")).overlap
    assert cache_length(10, 64) == 64 and cache_length(65, 100) == 100
    assert cache_length(65, None) == 128 and cache_length(200, 100) == 256
    tok = family.tokenizer
    with pytest.raises(ValueError, match="compile"):
        FusedGenerator(family.large, tokenizer=tok, compile=True)
    with pytest.raises(ValueError, match="overlap"):
        FusedGenerator(family.large, tokenizer=tok, overlap=False)
    with pytest.raises(TypeError, match="fast"):
        FusedGenerator(family.large, tokenizer=tok, fast=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="compile"):
        FusedGenerator(family.large, tokenizer=tok, fast=True, compile="yes")  # type: ignore
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="overlap"):
            FusedGenerator(family.large, tokenizer=tok, fast=True, overlap=True)
