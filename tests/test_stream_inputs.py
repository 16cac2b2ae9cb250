"""Hugging Face conventions of FusedGenerator: streaming, chat messages, token-id input,
``batch_size``, ``repr`` and the unknown-token warning.

References: ``generate``'s own output for streaming and batching (each is a separate path over
the same loop), HF ``generate`` on ids built by ``apply_chat_template`` for chat, and the
text-prompt path for token-id input.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest
import torch
from conftest import EOS, PROMPTS, Family
from dlf_rs.engines.hf.generate import FusedGenerator

TEMPLATE_A = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}" \
             "{% if add_generation_prompt %}w40 {% endif %}"  # fmt: skip
TEMPLATE_B = "<s> {% for m in messages %}w50 {{ m['content'] }} {% endfor %}" \
             "{% if add_generation_prompt %}w51 w52 {% endif %}"  # fmt: skip
CONVS = [
    [{"role": "user", "content": "w1 w2 w3"}],
    [{"role": "system", "content": "w9"}, {"role": "user", "content": "w5 w6"}],
]


def gen_of(fam: Family, n_experts: int = 2, **kw: Any) -> FusedGenerator:
    return FusedGenerator(fam.large, fam.small, fam.experts[:n_experts], fam.tokenizer, **kw)


def joined(stream: Any, batch: int) -> tuple[list[str], list[list[int]], list[str | None]]:
    texts, ids = [""] * batch, [[] for _ in range(batch)]  # type: ignore[var-annotated]
    reasons: list[str | None] = [None] * batch
    for chunk in stream:
        assert reasons[chunk.row] is None, "a chunk after the row's last one"
        texts[chunk.row] += chunk.text
        ids[chunk.row] += chunk.token_ids
        reasons[chunk.row] = chunk.finish_reason
    return texts, ids, reasons


@pytest.mark.parametrize("kwargs", [
    {},
    {"method": "static", "alpha": 1.0},
    {"temperature": 0.9, "seed": 7},
    {"speculative": 2},
    {"speculative": "auto", "temperature": 0.8, "seed": 3},
    {"method": "large", "stop": ["w9"]},
])  # fmt: skip
def test_stream_joined_equals_generate(family: Family, kwargs: dict[str, Any]) -> None:
    gen = gen_of(family)
    want = gen.generate(PROMPTS, 10, **kwargs)
    stream = gen.stream(PROMPTS, 10, **kwargs)
    assert stream.result is None
    texts, ids, reasons = joined(stream, len(PROMPTS))
    assert ids == want.token_ids
    assert texts == want.texts
    assert reasons == want.finish_reasons
    assert stream.result is not None and stream.result.token_ids == want.token_ids
    for a, b in zip(stream.result.alphas, want.alphas):
        np.testing.assert_array_equal(a, b)


def test_stream_yields_as_tokens_are_decided(family: Family) -> None:
    """Chunks arrive step by step (one token each without speculation), not all at the end."""
    gen = gen_of(family)
    stream = gen.stream(PROMPTS[:1], 6)
    first = next(stream)
    assert first.row == 0 and len(first.token_ids) == 1 and first.finish_reason is None
    rest = list(stream)
    assert len(rest) >= 1 and rest[-1].finish_reason is not None
    spec = list(gen.stream(PROMPTS[:1], 9, speculative=4))
    assert max(len(c.token_ids) for c in spec) > 1  # several tokens per round


def test_stream_holds_back_a_partial_stop_string(family: Family) -> None:
    """A stop string's prefix at the end of the text is not sent before it is resolved."""
    gen = gen_of(family)
    free = gen.generate(PROMPTS[:1], 8, method="large")
    words = free.texts[0].split()
    stop = " ".join(words[2:4])  # a two-word stop string the row will meet
    want = gen.generate(PROMPTS[:1], 8, method="large", stop=stop)
    assert want.finish_reasons == ["stop"]
    sent = ""
    for chunk in gen.stream(PROMPTS[:1], 8, method="large", stop=stop):
        sent += chunk.text
        assert stop not in sent
    assert sent == want.texts[0]


def test_batch_size_equals_one_batch(family: Family, capsys: pytest.CaptureFixture[str]) -> None:
    gen = gen_of(family)
    prompts = PROMPTS * 3  # 12 prompts of different lengths
    for kwargs in ({}, {"temperature": 1.0, "seed": 11}):
        one = gen.generate(prompts, 6, **kwargs)
        split = gen.generate(prompts, 6, batch_size=5, progress=False, **kwargs)
        assert split.token_ids == one.token_ids and split.texts == one.texts
        assert split.finish_reasons == one.finish_reasons
        for a, b in zip(split.alphas, one.alphas):
            np.testing.assert_allclose(a, b)
    capsys.readouterr()
    gen.generate(prompts, 2, batch_size=4)  # three batches: the bar is shown by default
    assert "12/12" in capsys.readouterr().err
    gen.generate(prompts, 2, batch_size=4, progress=False)
    assert capsys.readouterr().err == ""
    streamed = joined(gen.stream(prompts, 6, batch_size=5), len(prompts))
    assert streamed[1] == gen.generate(prompts, 6).token_ids
    with pytest.raises(ValueError, match="batch_size"):
        gen.generate(prompts, 2, batch_size=0)


def test_token_ids_equal_text_prompts(family: Family) -> None:
    gen = gen_of(family)
    want = gen.generate(PROMPTS, 8)
    ids = [family.tokenizer(p)["input_ids"] for p in PROMPTS]
    assert gen.generate(input_ids=ids, max_new_tokens=8).token_ids == want.token_ids
    for side in ("left", "right"):
        family.tokenizer.padding_side = side
        enc = family.tokenizer(PROMPTS, padding=True, return_tensors="pt")
        got = gen.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                           max_new_tokens=8)  # fmt: skip
        assert got.token_ids == want.token_ids and got.texts == want.texts
    family.tokenizer.padding_side = "left"
    one = gen.generate(input_ids=ids[0], max_new_tokens=8)  # one flat list: one prompt
    assert one.token_ids == want.token_ids[:1]


@pytest.mark.parametrize("kwargs, exc, needle", [
    ({"input_ids": [[1, 5, 99]]}, ValueError, r"input_ids\[0\]\[2\]: token id 99 is outside"),
    ({"input_ids": [[1, 5], []]}, ValueError, r"input_ids\[1\]: no tokens"),
    ({"input_ids": [[1, 5.0]]}, TypeError, r"input_ids\[0\]\[1\]: expected an int"),
    ({"input_ids": torch.ones(2, 3), }, TypeError, "input_ids: expected a \\[batch, length\\]"),
    ({"input_ids": [[1, 5]], "attention_mask": [[1, 1, 1]]}, ValueError, "attention_mask"),
    ({"prompts": ["w1"], "input_ids": [[1, 5]]}, TypeError, "input_ids: give only one"),
    ({"prompts": ["w1"], "messages": CONVS}, TypeError, "messages: give only one"),
    ({}, TypeError, "prompts: give the prompts"),
    ({"prompts": ["w1"], "attention_mask": [[1]]}, TypeError, "attention_mask: only used"),
    ({"messages": [["hi"]]}, ValueError, r"messages\[0\]\[0\]: expected a dict"),
    ({"messages": "hi"}, TypeError, "messages: expected a list of conversations"),
])  # fmt: skip
def test_input_errors(family: Family, kwargs: dict[str, Any], exc: type, needle: str) -> None:
    with pytest.raises(exc, match=needle):
        gen_of(family).generate(max_new_tokens=2, **kwargs)


def templated(family: Family, template: str) -> Any:
    import copy

    tok = copy.deepcopy(family.tokenizer)
    tok.chat_template = template
    return tok


def hf_greedy_ids(model: Any, ids: list[int], max_new: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False,
                             pad_token_id=0, eos_token_id=EOS)  # fmt: skip
    row = out[0, len(ids) :].tolist()
    return row[: row.index(EOS) + 1] if EOS in row else row


def test_messages_use_each_models_own_chat_template(family: Family) -> None:
    """The large model reads template A, expert 0 template B: method "large" and "expert" each
    equal HF greedy generate on their own model's apply_chat_template ids."""
    tok_a, tok_b = templated(family, TEMPLATE_A), templated(family, TEMPLATE_B)
    gen = FusedGenerator(family.large, family.small, family.experts[:1], tok_a,
                         model_tokenizers={"expert:0 (somewhere)": tok_b})  # fmt: skip
    for method, model, tok in (("large", family.large, tok_a),
                               ("expert", family.experts[0], tok_b)):  # fmt: skip
        kw: dict[str, Any] = {"method": method} | ({"expert": 0} if method == "expert" else {})
        got = gen.generate(messages=CONVS, max_new_tokens=6, **kw)
        for b, conv in enumerate(CONVS):
            ids = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
            ids = tok(ids, add_special_tokens=False)["input_ids"]
            assert got.token_ids[b] == hf_greedy_ids(model, ids, 6), (method, b)
    # DLF with the two templates equals DLF given those ids per model (one path, by ids).
    fused = gen.generate(messages=CONVS, max_new_tokens=6)
    assert len(fused.token_ids) == 2 and all(fused.token_ids)
    single = gen.generate(messages=CONVS[1], max_new_tokens=6)  # one conversation alone
    assert single.token_ids == fused.token_ids[1:]


def test_messages_without_a_template_name_the_model(family: Family) -> None:
    gen = FusedGenerator(family.large, family.small, family.experts[:1],
                         templated(family, TEMPLATE_A),
                         model_tokenizers={"expert:0": family.tokenizer})  # fmt: skip
    with pytest.raises(ValueError, match="messages: the expert:0 model's tokenizer has no chat"):
        gen.generate(messages=CONVS, max_new_tokens=2)


def test_unknown_prompt_warns_without_counting_bos(family: Family) -> None:
    gen = gen_of(family, 1)
    with pytest.warns(UserWarning, match="1 of the prompt's 1 tokens are unknown"):
        gen.generate(["xyz"], 2)  # <s> <unk>: the <s> is not the prompt's
    with pytest.warns(UserWarning, match=r"prompts\[1\]"):
        gen.generate(["w1 w2", "ééé ü"], 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        gen.generate(["w1 xyz w2"], 2)  # a minority unknown: no warning
        gen.generate(input_ids=[[1, 3, 3]], max_new_tokens=2)  # ids: the caller's choice


def test_reprs_are_short_and_informative(family: Family) -> None:
    gen = FusedGenerator(family.large, family.small, family.experts[:2], family.tokenizer,
                         expert_names=["math", "qa"])  # fmt: skip
    text = repr(gen)
    for needle in ("large: LlamaForCausalLM", "small: LlamaForCausalLM", "expert:0 'math'",
                   "expert:1 'qa'", "cpu", "float32", "params", "vocab=64"):  # fmt: skip
        assert needle in text, needle
    res = gen.generate(PROMPTS * 4, 12)
    r = repr(res)
    assert r.startswith("GenerationResult(method='dlf', rows=16") and "... 13 more" in r
    assert len(r) < 800 and "array(" not in r
    assert len(res) == 16


def test_batches_sum_speculative_counts(family: Family) -> None:
    gen = gen_of(family, 1)
    prompts = PROMPTS * 2
    one = gen.generate(prompts, 8, speculative=3)
    split = gen.generate(prompts, 8, speculative=3, batch_size=3, progress=False)
    assert split.token_ids == one.token_ids
    t = split.timings
    assert t["tested"] >= t["accepted"] > 0
    assert t["acceptance"] == pytest.approx(t["accepted"] / t["tested"])
    rows = [r.acceptance_rate for r in split.trace]
    assert all(r is not None and 0.0 <= r <= 1.0 for r in rows)
