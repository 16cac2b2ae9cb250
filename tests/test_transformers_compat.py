"""The driver passes and reads the KV cache under the name the installed transformers uses.

transformers 5.24 renamed the forward's ``past_key_values`` keyword (and the output field) to
``cache``: passing the old name prints a FutureWarning on every forward (``deprecate_kwarg``,
removal announced for 5.40) and reading ``out.past_key_values`` logs a deprecation. Every path of
the driver (default, ``fast=True``, speculative, scoring, a mixed LoRA batch) must run without
either, and still give HF ``generate``'s tokens; before 5.24 the old name is used.
``make test-oldest-transformers`` runs this file (and the driver tests) under the oldest release.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import PROMPTS, Family
from test_generator import hf_generate

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from dlf_rs.engines.hf.generate import FusedGenerator
from dlf_rs.engines.hf.runner import cache_keyword

VERSION = tuple(int(p) for p in transformers.__version__.split(".")[:2] if p.isdigit())


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def no_transformers_deprecations() -> Iterator[None]:
    """Fail on any FutureWarning or DeprecationWarning raised inside the block, and on a
    deprecation logged by transformers' logger.

    The warnings are not filtered by module: ``deprecate_kwarg`` warns with ``stacklevel=2``,
    which attributes the warning to torch's ``Module._call_impl``, not to transformers. Its
    ``logger.warning_once`` messages are cached per process, so the cache is cleared first (an
    earlier test may have logged the message already)."""
    from transformers.utils import logging as hf_logging

    once = getattr(hf_logging, "warning_once", None)
    if once is not None and hasattr(once, "cache_clear"):
        once.cache_clear()
    logger = logging.getLogger("transformers")  # the library root: it does not propagate
    handler = _Records()
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        logger.removeHandler(handler)
    bad = [
        f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})"
        for w in caught
        if issubclass(w.category, (FutureWarning, DeprecationWarning))
    ]
    bad += [f"transformers log: {m}" for m in handler.messages if "deprecat" in m.lower()]
    assert not bad, "\n".join(bad)


def test_cache_keyword_follows_the_forward_signature(family: Family) -> None:
    params = inspect.signature(transformers.LlamaForCausalLM.forward).parameters
    expected = "cache" if "cache" in params else "past_key_values"
    assert cache_keyword(family.large) == expected
    if VERSION < (5, 24):  # ``cache`` arrived in 5.24
        assert expected == "past_key_values"

    class Old(torch.nn.Module):
        def forward(self, input_ids: Any = None, past_key_values: Any = None) -> None: ...

    class New(torch.nn.Module):
        def forward(self, input_ids: Any = None, cache: Any = None) -> None: ...

    assert cache_keyword(Old()) == "past_key_values"
    assert cache_keyword(New()) == "cache"


@pytest.mark.parametrize("mode", ["default", "fast", "speculative"])
def test_generate_prints_no_deprecation_and_matches_hf(family: Family, mode: str) -> None:
    if mode == "fast" and VERSION < (5, 4):
        pytest.skip(f"fast=True needs transformers >= 5.4 (installed {transformers.__version__})")
    gen = FusedGenerator(family.large, family.small, family.experts[:2], family.tokenizer,
                         fast=mode == "fast")  # fmt: skip
    kw: dict[str, Any] = {"speculative": 2} if mode == "speculative" else {}
    with no_transformers_deprecations():
        fused = gen.generate(PROMPTS, max_new_tokens=8, **kw)
        large = gen.generate(PROMPTS, max_new_tokens=8, method="large")  # speculative: fused only
        seq = gen.generate(PROMPTS, max_new_tokens=8) if kw else fused
    assert fused.token_ids == seq.token_ids
    assert large.token_ids == hf_generate(family.large, family.tokenizer, PROMPTS, 8)


def test_score_prints_no_deprecation(family: Family) -> None:
    gen = FusedGenerator(family.large, family.small, family.experts[:2], family.tokenizer)
    with no_transformers_deprecations():
        res = gen.score(["w1 w2", "w5"], [" w3 w4", " w6"])
    assert [r.logprobs.shape for r in res] == [(2,), (1,)]


def test_mixed_lora_prints_no_deprecation(family: Family, tmp_path: Any) -> None:
    """The mixed batch hands the cache to peft under the base model's own keyword."""
    peft = pytest.importorskip("peft", reason="peft not installed")
    from dlf_rs.engines.hf.lora import lora_experts

    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                          init_lora_weights=False)  # fmt: skip
    torch.manual_seed(7)
    peft.get_peft_model(copy.deepcopy(family.small), cfg).save_pretrained(str(tmp_path))
    small, experts, _ = lora_experts(copy.deepcopy(family.small), [str(tmp_path)], "mixed")
    merged = peft.PeftModel.from_pretrained(copy.deepcopy(family.small), str(tmp_path))
    ref = FusedGenerator(family.large, family.small, [merged.merge_and_unload().eval()],
                         family.tokenizer).generate(PROMPTS, max_new_tokens=6)  # fmt: skip
    gen = FusedGenerator(family.large, small, experts, family.tokenizer)
    with no_transformers_deprecations():
        res = gen.generate(PROMPTS, max_new_tokens=6)
    assert res.token_ids == ref.token_ids
