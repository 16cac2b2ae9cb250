"""LoRA experts (dlf_rs.engines.hf.lora): the mixed batch and the separate forwards on one shared base give
the tokens and alphas of the same adapters merged into full models, for DLF and static weights,
B in {1, 4} with prompts of different lengths; loading by directory, PeftModel and lora_mode."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import PROMPTS, Family

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft", reason="peft not installed: pip install 'dlf_rs[peft]'")

from dlf_rs.engines.hf.generate import FusedGenerator
from dlf_rs.engines.hf.lora import AdapterView, MixedLora, choose_mode, lora_experts

TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


def random_adapter(small: Any, seed: int, r: int = 4) -> Any:
    """A PeftModel with random (non-zero) LoRA weights on a copy of ``small``."""
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, init_lora_weights=False)
    return peft.get_peft_model(copy.deepcopy(small), cfg).eval()


@pytest.fixture(scope="module")
def adapters(family: Family, tmp_path_factory: Any) -> list[str]:
    root = tmp_path_factory.mktemp("adapters")
    paths = []
    for i in range(3):
        path = root / f"lora{i}"
        random_adapter(family.small, 100 + i, r=2 + 2 * i).save_pretrained(str(path))
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def merged(family: Family, adapters: list[str]) -> FusedGenerator:
    """The reference: every adapter merged into its own full copy of the small base by peft."""
    experts = [
        peft.PeftModel.from_pretrained(copy.deepcopy(family.small), a).merge_and_unload().eval()
        for a in adapters
    ]
    return FusedGenerator(family.large, family.small, experts, family.tokenizer)


def lora_generator(family: Family, adapters: list[str], mode: str) -> FusedGenerator:
    small, experts, used = lora_experts(copy.deepcopy(family.small), adapters, mode)
    assert used == mode
    return FusedGenerator(family.large, small, experts, family.tokenizer)


@pytest.mark.parametrize("mode", ["mixed", "separate", "merged"])
@pytest.mark.parametrize("method", ["dlf", "static"])
@pytest.mark.parametrize("batch", [1, 4])
def test_lora_modes_equal_merged_full_models(
    family: Family, adapters: list[str], merged: FusedGenerator, mode: str, method: str, batch: int
) -> None:
    prompts = PROMPTS[2:3] if batch == 1 else PROMPTS  # 1 to 7 tokens: left padding differs
    kw: dict[str, Any] = {"method": method}
    if method == "static":
        kw["alpha"] = [0.5, 1.0, 1.5]
    gen = lora_generator(family, adapters, mode)
    got = gen.generate(prompts, max_new_tokens=10, **kw)
    ref = merged.generate(prompts, max_new_tokens=10, **kw)
    assert got.token_ids == ref.token_ids
    np.testing.assert_allclose(got.alphas, ref.alphas, atol=1e-6)
    if method == "dlf":
        assert np.asarray(ref.alphas).max() > 0  # the adapters move the experts
    keys = [k for k in got.timings if k.startswith("forward:")]
    if mode == "mixed":
        assert keys == ["forward:large", "forward:small+expert:0+expert:1+expert:2"]
    else:
        assert "forward:expert:2" in keys


def test_mixed_batch_logits_match_separate_forwards(family: Family, adapters: list[str]) -> None:
    small, experts, _ = lora_experts(copy.deepcopy(family.small), adapters, "mixed")
    assert isinstance(small, AdapterView) and all(isinstance(e, AdapterView) for e in experts)
    mixed = MixedLora(small.peft_model, [small.adapter] + [e.adapter for e in experts])
    ids = torch.tensor([[1, 5, 6, 7]] * 2)
    with torch.no_grad():
        one = mixed(input_ids=ids.repeat(4, 1)).logits
        each = torch.cat([m(input_ids=ids).logits for m in [small, *experts]])
    torch.testing.assert_close(one, each, atol=2e-5, rtol=0)


def test_mixed_with_per_model_prompts(
    family: Family, adapters: list[str], merged: FusedGenerator
) -> None:
    """An expert reading its own prompts (prompts_for) inside the mixed batch."""
    own = {"expert:1": ["w30 w31 w32 w33 " + p for p in PROMPTS]}
    got = lora_generator(family, adapters, "mixed").generate(PROMPTS, 8, prompts_for=own)
    ref = merged.generate(PROMPTS, 8, prompts_for=own)
    assert got.token_ids == ref.token_ids
    np.testing.assert_allclose(got.alphas, ref.alphas, atol=1e-6)


def test_method_expert_on_a_shared_base(
    family: Family, adapters: list[str], merged: FusedGenerator
) -> None:
    gen = lora_generator(family, adapters, "mixed")
    got = gen.generate(PROMPTS, 6, method="expert", expert=2)
    assert got.token_ids == merged.generate(PROMPTS, 6, method="expert", expert=2).token_ids


def test_from_pretrained_adapter_dirs_and_peft_models(
    family: Family, adapters: list[str], merged: FusedGenerator, tmp_path: Path
) -> None:
    family.large.save_pretrained(tmp_path / "large")
    family.small.save_pretrained(tmp_path / "small")
    family.tokenizer.save_pretrained(tmp_path / "large")
    ref = merged.generate(PROMPTS, 8)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(family.small), adapters[1])
    for mode in ("mixed", "separate", "merged", "auto"):
        gen = FusedGenerator.from_pretrained(
            tmp_path / "large", tmp_path / "small", [adapters[0], pm, adapters[2]],
            lora_mode=mode,
        )  # fmt: skip
        got = gen.generate(PROMPTS, 8)
        assert got.token_ids == ref.token_ids, mode
        assert gen.expert_names == ["lora0", "expert:1", "lora2"]
    # The shipped-size rule: a tiny base merges (plain forwards are fastest there).
    assert choose_mode(family.small, 3) == "merged"
    big = family.small.__class__(family.small.config.__class__(
        vocab_size=64, hidden_size=512, intermediate_size=4096, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2))  # fmt: skip
    assert choose_mode(big, 3) == "mixed"


def test_lora_errors(family: Family, adapters: list[str], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="^lora_mode:"):
        lora_experts(copy.deepcopy(family.small), adapters, "fused")
    with pytest.raises(TypeError, match=r"^experts:"):
        lora_experts(copy.deepcopy(family.small), adapters[0], "mixed")
    with pytest.raises(FileNotFoundError, match=r"^experts\[0\]: .*adapter_config"):
        lora_experts(copy.deepcopy(family.small), [str(tmp_path)], "mixed")
    with pytest.raises(TypeError, match=r"^experts\[0\]:"):
        lora_experts(copy.deepcopy(family.small), [family.small], "mixed")
    family.large.save_pretrained(tmp_path / "large")
    family.tokenizer.save_pretrained(tmp_path / "large")
    with pytest.raises(ValueError, match=r"^experts\[0\]: a LoRA adapter needs the small"):
        FusedGenerator.from_pretrained(tmp_path / "large", experts=adapters[:1])
    with pytest.raises(ValueError, match="^lora_mode:"):
        FusedGenerator.from_pretrained(tmp_path / "large", lora_mode="x")
    # An adapter made for another shape of base is refused naming the expert.
    other = random_adapter(family.large, 5)
    other.save_pretrained(str(tmp_path / "wrong"))
    with pytest.raises(ValueError, match=r"^experts\[0\]: the adapter .* does not fit"):
        lora_experts(copy.deepcopy(family.small), [str(tmp_path / "wrong")], "separate")
