"""Penalties on seen tokens in the generation loop: the history the loop hands the core is the
row's prompt plus its new tokens, as transformers' processors read ``input_ids``.

References: HF ``generate(repetition_penalty=...)`` for the large model alone, and for DLF a
cache-free numpy loop (``reference.py``'s grid and fusion, ``test_penalties``' penalty).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from conftest import EOS, PROMPTS, VOCAB, Family
from dlf_rs import DlfError
from dlf_rs.engines.hf.generate import FusedGenerator
from test_generator import ids_of, last_logits
from test_penalties import penalise_ref

MAX_NEW = 10


def gen_of(fam: Family) -> FusedGenerator:
    return FusedGenerator(fam.large, fam.small, fam.experts[:1], fam.tokenizer)


@pytest.mark.parametrize("penalty", [1.3, 3.0, 0.7])
def test_large_with_repetition_penalty_equals_hf_generate(family: Family, penalty: float) -> None:
    gen = gen_of(family)
    batched = gen.generate(PROMPTS, MAX_NEW, method="large", repetition_penalty=penalty)
    plain = gen.generate(PROMPTS, MAX_NEW, method="large")
    for b, prompt in enumerate(PROMPTS):
        enc = family.tokenizer([prompt], return_tensors="pt")
        with torch.no_grad():
            out = family.large.generate(
                input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                max_new_tokens=MAX_NEW, do_sample=False, repetition_penalty=penalty,
                pad_token_id=0, eos_token_id=EOS,
            )  # fmt: skip
        row = out[0, enc["input_ids"].shape[1] :].tolist()
        row = row[: row.index(EOS) + 1] if EOS in row else row
        assert batched.token_ids[b] == row, (penalty, b)
    assert batched.token_ids != plain.token_ids  # the penalty moved some token


def reference_dlf(fam: Family, prompt: str, rep: float, freq: float, pres: float) -> list[int]:
    from dlf_rs.reference import dlf_grid_row, fuse_row

    models = [fam.large, fam.small, fam.experts[0]]
    ids = ids_of(fam.tokenizer, prompt)
    cont: list[int] = []
    for _ in range(MAX_NEW):
        z = [last_logits(m, ids + cont, len(VOCAB)) for m in models]
        a, _j = dlf_grid_row(z[0], z[1], z[2:], alpha_range=(0.0, 2.0), grid_step=0.1)
        fused = fuse_row(z[0], z[1], z[2:], np.asarray(a, dtype=np.float32))
        fused = penalise_ref(fused[None], [ids + cont], rep, freq, pres)[0]
        tok = int(np.argmax(fused))
        cont.append(tok)
        if tok == EOS:
            break
    return cont


@pytest.mark.parametrize("rep, freq, pres", [(1.5, 0.0, 0.0), (1.0, 0.8, 0.0), (1.2, 0.3, 1.0)])
def test_dlf_with_penalties_equals_reference_loop(family: Family, rep: float, freq: float,
                                                  pres: float) -> None:  # fmt: skip
    gen = gen_of(family)
    got = gen.generate(PROMPTS, MAX_NEW, repetition_penalty=rep, frequency_penalty=freq,
                       presence_penalty=pres)  # fmt: skip
    plain = gen.generate(PROMPTS, MAX_NEW)
    for b, prompt in enumerate(PROMPTS):
        assert got.token_ids[b] == reference_dlf(family, prompt, rep, freq, pres), b
    # The weights are solved on the raw logits: where the sequences agree, so do the alphas.
    for b in range(len(PROMPTS)):
        n = next((i for i, (x, y) in enumerate(zip(got.token_ids[b], plain.token_ids[b]))
                  if x != y), min(len(got.token_ids[b]), len(plain.token_ids[b])))  # fmt: skip
        np.testing.assert_array_equal(got.alphas[b][: n + 1], plain.alphas[b][: n + 1])


def test_sampled_penalties_repeat_per_seed_and_batching(family: Family) -> None:
    gen = gen_of(family)
    kw: dict[str, Any] = {"temperature": 1.0, "presence_penalty": 1.5, "seed": 4}
    one = gen.generate(PROMPTS, MAX_NEW, **kw)
    again = gen.generate(PROMPTS, MAX_NEW, batch_size=1, progress=False, **kw)
    assert one.token_ids == again.token_ids


def test_penalties_with_speculative_are_refused_by_name(family: Family) -> None:
    with pytest.raises(DlfError, match="speculative"):
        gen_of(family).generate(PROMPTS, 4, speculative=2, repetition_penalty=1.2)
