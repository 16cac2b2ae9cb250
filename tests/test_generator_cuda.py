"""The driver's equivalence tests on a CUDA device (pinned staging, non-blocking copies, events).

Skipped without CUDA (CI has none). The models run in float32 with TF32 matmuls disabled so the
GPU references (HF ``generate`` and the uncached loop, run on the same device) match exactly.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import PROMPTS, Family
from dlf_rs.engines.hf.generate import FusedGenerator
from test_generator import MAX_NEW, hf_generate, ids_of, reference_loop

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def cuda_family(family: Family) -> Family:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device("cuda")
    return Family(
        tokenizer=family.tokenizer,
        large=copy.deepcopy(family.large).to(dev),
        small=copy.deepcopy(family.small).to(dev),
        experts=[copy.deepcopy(e).to(dev) for e in family.experts],
    )


def gen_of(fam: Family, n: int = 1) -> FusedGenerator:
    return FusedGenerator(fam.large, fam.small, fam.experts[:n], fam.tokenizer)


def test_staging_is_pinned_on_cuda(cuda_family: Family) -> None:
    gen = gen_of(cuda_family)
    gen.generate(PROMPTS, max_new_tokens=2, method="dlf")
    assert gen._staging is not None and gen._staging.pinned
    assert all(buf.is_pinned() for buf in gen._staging._host)


def test_large_matches_hf_generate_on_cuda(cuda_family: Family) -> None:
    res = gen_of(cuda_family).generate(PROMPTS, max_new_tokens=MAX_NEW, method="large")
    assert res.token_ids == hf_generate(cuda_family.large, cuda_family.tokenizer, PROMPTS, MAX_NEW)


def test_expert_matches_hf_generate_on_cuda(cuda_family: Family) -> None:
    res = gen_of(cuda_family, 3).generate(
        PROMPTS, max_new_tokens=MAX_NEW, method="expert", expert=1
    )
    want = hf_generate(cuda_family.experts[1], cuda_family.tokenizer, PROMPTS, MAX_NEW)
    assert res.token_ids == want


@pytest.mark.parametrize("n_experts", [1, 3])
def test_dlf_grid_matches_reference_loop_on_cuda(cuda_family: Family, n_experts: int) -> None:
    res = gen_of(cuda_family, n_experts).generate(
        PROMPTS, max_new_tokens=MAX_NEW, method="dlf", solver="grid"
    )
    models = [cuda_family.large, cuda_family.small, *cuda_family.experts[:n_experts]]
    for i, p in enumerate(PROMPTS):
        ids = ids_of(cuda_family.tokenizer, p)
        toks, alphas = reference_loop(models, [ids] * len(models), MAX_NEW, "dlf")
        assert res.token_ids[i] == toks
        np.testing.assert_allclose(res.alphas[i], np.stack(alphas), atol=1e-5)


def test_static_one_matches_reference_loop_on_cuda(cuda_family: Family) -> None:
    res = gen_of(cuda_family).generate(PROMPTS, max_new_tokens=MAX_NEW, method="static", alpha=1.0)
    models = [cuda_family.large, cuda_family.small, cuda_family.experts[0]]
    for i, p in enumerate(PROMPTS):
        ids = ids_of(cuda_family.tokenizer, p)
        toks, _ = reference_loop(models, [ids] * 3, MAX_NEW, "static", alpha=[1.0])
        assert res.token_ids[i] == toks


def test_batch_matches_single_on_cuda(cuda_family: Family) -> None:
    # (No GPU-vs-CPU token equality: different kernels may flip near-ties of the argmax.)
    on_gpu = gen_of(cuda_family, 3).generate(PROMPTS, max_new_tokens=MAX_NEW, method="dlf")
    for i, p in enumerate(PROMPTS):
        single = gen_of(cuda_family, 3).generate([p], max_new_tokens=MAX_NEW, method="dlf")
        assert single.token_ids[0] == on_gpu.token_ids[i]


def test_seeded_sampling_repeats_on_cuda(cuda_family: Family) -> None:
    gen = gen_of(cuda_family)
    kw = {"max_new_tokens": 8, "method": "dlf", "temperature": 1.0}
    assert (
        gen.generate(PROMPTS, seed=5, **kw).token_ids
        == gen.generate(PROMPTS, seed=5, **kw).token_ids
    )


# ---------------------------------------------------------------------- the fast path on CUDA
@pytest.mark.parametrize(
    "fast_kw",
    [
        pytest.param({}, id="cuda-graphs"),  # default on CUDA: torch.compile reduce-overhead
        pytest.param({"compile": False, "overlap": True}, id="eager-side-stream"),
    ],
)
@pytest.mark.parametrize("method", ["dlf", "static", "large", "expert"])
def test_fast_equals_simple_on_cuda(cuda_family: Family, method: str, fast_kw: dict) -> None:
    from test_fastpath import METHOD_KW, assert_same, eos_ending_rows_at_different_steps

    fam = cuda_family
    models = (fam.large, fam.small, fam.experts[:2], fam.tokenizer)
    simple = FusedGenerator(*models)
    fast = FusedGenerator(*models, fast=True, **fast_kw)
    kw = METHOD_KW[method]
    simple.eos_token_ids = set()
    free = simple.generate(PROMPTS, max_new_tokens=MAX_NEW, **kw)
    simple.eos_token_ids = fast.eos_token_ids = {eos_ending_rows_at_different_steps(free.token_ids)}
    want = simple.generate(PROMPTS, max_new_tokens=MAX_NEW, **kw)
    for _ in range(2):  # the second call replays (CUDA graphs) on the reset, reused caches
        assert_same(fast.generate(PROMPTS, max_new_tokens=MAX_NEW, **kw), want)
    assert fast._staging is not None and fast._staging.pinned
