"""The options record: one set of defaults (the core's), one set of rules, the same everywhere.

Each rule is checked through every entry point that takes it (``fuse_step``, ``sample``,
``FusedGenerator.generate``, the CLI), so the layers cannot drift apart again.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import dlf_rs
import numpy as np
import pytest
from conftest import PROMPTS, Family
from dlf_rs import DlfError, StepOptions, _core
from dlf_rs.engines.hf.generate import FusedGenerator

RNG = np.random.default_rng(0)
ZL, ZS = RNG.normal(size=(2, 16)).astype(np.float32), RNG.normal(size=(2, 16)).astype(np.float32)
ZE = [RNG.normal(size=(2, 16)).astype(np.float32)]


def test_defaults_are_the_cores() -> None:
    d = _core.DEFAULTS
    o = StepOptions()
    assert o.alpha_range == (d["alpha_min"], d["alpha_max"])
    for name in ("grid_step", "solver", "multi_expert", "support_k", "temperature", "top_k",
                 "top_p", "min_p", "repetition_penalty", "frequency_penalty",
                 "presence_penalty"):  # fmt: skip
        assert getattr(o, name) == d[name], name
    assert o.method == "dlf" and o.greedy and o.fused and not o.penalized


def test_method_is_inferred_from_alpha() -> None:
    assert StepOptions(alpha=1.0).method == "static"
    assert StepOptions(method=None, alpha=1.0).method == "static"
    assert StepOptions(method=None).method == "dlf" and StepOptions.method is None
    assert StepOptions(alpha=[0.5, 1.5]).alpha == (0.5, 1.5)
    assert StepOptions.build(StepOptions(alpha=1.0), alpha=None).method == "dlf"
    assert StepOptions.build(StepOptions(), alpha=0.5).method == "static"
    with pytest.raises(TypeError, match="^bogus: unknown option"):
        StepOptions.build(None, bogus=1)


# (field, value, error class, message start): each rule, decided once.
BAD: list[tuple[str, Any, type[Exception], str]] = [
    ("support_k", 2.7, TypeError, "support_k:"),
    ("support_k", True, TypeError, "support_k:"),
    ("support_k", 0, DlfError, "support_k:"),
    ("support_k", 2**64, DlfError, "support_k:"),
    ("top_k", 2**64, DlfError, "top_k:"),
    ("top_k", -1, DlfError, "top_k:"),
    ("top_k", 1.0, TypeError, "top_k:"),
    ("top_p", 0.0, DlfError, "top_p:"),
    ("top_p", "0.5", TypeError, "top_p:"),
    ("min_p", 1.5, DlfError, "min_p:"),
    ("temperature", -1.0, DlfError, "temperature:"),
    ("temperature", float("nan"), DlfError, "temperature:"),
    ("temperature", 1j, TypeError, "temperature:"),
    ("alpha", 1e9, DlfError, "alpha:"),
    ("alpha", 1e300, DlfError, "alpha:"),
    ("alpha", float("inf"), DlfError, "alpha:"),
    ("alpha", np.array(1j), TypeError, "alpha:"),
    ("alpha", "1.0", TypeError, "alpha:"),
    ("alpha_range", (-1e300, -1e300), DlfError, "alpha_range:"),
    ("alpha_range", (2.0, 1.0), DlfError, "alpha_range:"),
    ("alpha_range", "ab", TypeError, "alpha_range:"),
    ("grid_step", 0.0, DlfError, "grid_step:"),
    ("grid_step", 1e-7, DlfError, "grid_step:"),
    ("solver", "fast", DlfError, "solver:"),
    ("solver", 1, TypeError, "solver:"),
    ("multi_expert", "all", DlfError, "multi_expert:"),
    ("method", "best", DlfError, "method:"),
    ("repetition_penalty", 0.0, DlfError, "repetition_penalty: expected a finite number > 0"),
    ("repetition_penalty", -1.2, DlfError, "repetition_penalty:"),
    ("repetition_penalty", "1.2", TypeError, "repetition_penalty:"),
    ("frequency_penalty", 2.5, DlfError, "frequency_penalty: expected a finite number in [-2, 2]"),
    ("frequency_penalty", float("nan"), DlfError, "frequency_penalty:"),
    ("presence_penalty", -3.0, DlfError, "presence_penalty:"),
    ("presence_penalty", True, TypeError, "presence_penalty:"),
]


@pytest.mark.parametrize(("field", "value", "cls", "start"), BAD)
def test_each_rule_names_its_field_in_every_entry_point(
    family: Family, field: str, value: Any, cls: type[Exception], start: str
) -> None:
    def check(call: Any) -> None:
        with pytest.raises(cls) as info:
            call()
        assert str(info.value).startswith(start), str(info.value)
        assert not isinstance(info.value, dlf_rs.DlfInternalError)

    check(lambda: StepOptions(**{field: value}))
    if field != "method":
        check(lambda: dlf_rs.fuse_step(ZL, ZS, ZE, **{field: value}))
    gen = FusedGenerator(family.large, family.small, family.experts[:1], family.tokenizer)
    kwargs = {field: value}
    if field == "alpha":
        kwargs["method"] = "static"
    check(lambda: gen.generate(PROMPTS[:1], 2, **kwargs))


def test_good_values_pass_everywhere(family: Family) -> None:
    # Negative static weights are an anti-expert: allowed; 100 is the bound, inclusive.
    for alpha in (-3.0, 100.0, np.float32(0.5), np.int64(1)):
        StepOptions(alpha=alpha)
        dlf_rs.fuse_step(ZL, ZS, ZE, alpha=alpha)
    for k in (1, np.int64(5), 2**63 - 1):
        StepOptions(support_k=k, top_k=k)
    gen = FusedGenerator(family.large, family.small, family.experts[:1], family.tokenizer)
    res = gen.generate(PROMPTS[:1], 2, StepOptions(alpha=-3.0))
    assert res.method == "static"


@pytest.mark.parametrize("seed", [-1, 2**64, "abc", 1.7, True, [1, -2]])
def test_seed_rule_is_one_rule(family: Family, seed: Any) -> None:
    gen = FusedGenerator(family.large, family.small, family.experts[:1], family.tokenizer)
    calls = [
        lambda: dlf_rs.fuse_step(ZL, ZS, ZE, seed=seed),
        lambda: dlf_rs.sample(ZL, temperature=1.0, seed=seed),
        lambda: gen.generate(PROMPTS[:2], 2, temperature=1.0, seed=seed),
        lambda: gen.generate(PROMPTS[:2], 2, seed=seed),  # greedy: still checked
    ]
    for call in calls:
        with pytest.raises((TypeError, DlfError)) as info:
            call()
        assert str(info.value).startswith("seed"), str(info.value)


def test_record_reaches_generate_and_equals_keywords(family: Family) -> None:
    gen = FusedGenerator(family.large, family.small, family.experts[:2], family.tokenizer)
    opts = StepOptions(grid_step=0.25, alpha_range=(0.0, 1.0), support_k=8)
    a = gen.generate(PROMPTS, 4, opts)
    b = gen.generate(PROMPTS, 4, grid_step=0.25, alpha_range=(0.0, 1.0), support_k=8)
    assert a.token_ids == b.token_ids
    for x, y in zip(a.alphas, b.alphas):
        np.testing.assert_array_equal(x, y)
    # grid_step reaches the core: every weight is on the 0.25 grid.
    values = np.concatenate([x.ravel() for x in a.alphas])
    np.testing.assert_allclose(values * 4, np.round(values * 4), atol=1e-5)
    assert dataclasses.replace(opts, grid_step=0.5).grid_step == 0.5


def test_the_core_record_is_built_once_and_shared() -> None:
    from dlf_rs import options

    assert options.MULTI_EXPERT_RULES == _core.MULTI_EXPERT_RULES
    assert options.MULTI_EXPERT_RULES[0] == _core.DEFAULTS["multi_expert"]
    opts = StepOptions(temperature=0.5, top_k=3)
    core = opts._core
    assert isinstance(core, _core.CoreOptions) and opts._core is core
    dlf_rs.fuse_step(ZL, ZS, ZE, opts, seed=1)
    dlf_rs.sample(ZL, opts, seed=1)
    assert opts._core is core
    assert "_core" not in repr(opts) and opts == StepOptions(temperature=0.5, top_k=3)
    assert hash(opts) == hash(StepOptions(temperature=0.5, top_k=3))


def test_records_pickle_and_copy() -> None:
    import copy
    import pickle

    opts = StepOptions(alpha=(0.5, 1.0), temperature=0.7)
    for back in (pickle.loads(pickle.dumps(opts)), copy.deepcopy(opts), copy.copy(opts)):
        assert back == opts and back.method == "static"
        a = dlf_rs.fuse_step(ZL, ZS, ZE * 2, back, seed=3)
        b = dlf_rs.fuse_step(ZL, ZS, ZE * 2, opts, seed=3)
        np.testing.assert_array_equal(a.tokens, b.tokens)
