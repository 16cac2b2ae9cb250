"""FusedGenerator against independent references: HF ``generate`` and the test's own decode loop.

The loop below re-reads the whole sequence with every model at every step (no cache, no padding)
and fuses with ``tests/reference.py`` (pure numpy), so it shares nothing with the driver's
batching, caching, staging or the Rust core.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch
from conftest import EOS, PROMPTS, VOCAB, Family, make_llama, make_tokenizer
from dlf_rs.engines.hf.generate import FusedGenerator, GenerationResult
from dlf_rs.seeds import row_seed, splitmix64

MAX_NEW = 10


def gen_of(fam: Family, n_experts: int = 1) -> FusedGenerator:
    return FusedGenerator(
        large=fam.large, small=fam.small, experts=fam.experts[:n_experts], tokenizer=fam.tokenizer
    )


def hf_generate(model: Any, tok: Any, prompts: Sequence[str], max_new: int, eos: int = EOS):
    enc = tok(list(prompts), padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **enc, max_new_tokens=max_new, do_sample=False, pad_token_id=0, eos_token_id=eos
        )
    rows = []
    for row in out[:, enc["input_ids"].shape[1] :].tolist():
        rows.append(row[: row.index(eos) + 1] if eos in row else row)
    return rows


def last_logits(model: Any, ids: list[int], vocab: int) -> np.ndarray:
    with torch.no_grad():
        z = model(torch.tensor([ids], device=model.device)).logits[0, -1, :vocab]
    return z.float().cpu().numpy()


def reference_loop(
    models: list[Any],
    prompt_ids: list[list[int]],
    max_new: int,
    mode: str,
    alpha: Sequence[float] | None = None,
    eos: int = EOS,
) -> tuple[list[int], list[np.ndarray]]:
    """Fused greedy decoding without cache; ``models`` = [large, small, *experts]."""
    from dlf_rs.reference import dlf_grid_row, fuse_row

    cont: list[int] = []
    alphas: list[np.ndarray] = []
    for _ in range(max_new):
        z = [last_logits(m, ids + cont, len(VOCAB)) for m, ids in zip(models, prompt_ids)]
        if mode == "dlf":
            a, _j = dlf_grid_row(z[0], z[1], z[2:], alpha_range=(0.0, 2.0), grid_step=0.1)
        else:
            assert alpha is not None
            a = np.asarray(alpha, dtype=np.float32)
        fused = fuse_row(z[0], z[1], z[2:], np.asarray(a, dtype=np.float32))
        tok = int(np.argmax(fused))
        cont.append(tok)
        alphas.append(np.asarray(a, dtype=np.float32))
        if tok == eos:
            break
    return cont, alphas


def ids_of(tok: Any, prompt: str) -> list[int]:
    return list(tok(prompt)["input_ids"])


# ---------------------------------------------------------------------- baselines vs HF generate
def test_large_matches_hf_generate_batched_and_per_prompt(family: Family) -> None:
    res = gen_of(family).generate(PROMPTS, max_new_tokens=MAX_NEW, method="large")
    assert isinstance(res, GenerationResult)
    assert res.token_ids == hf_generate(family.large, family.tokenizer, PROMPTS, MAX_NEW)
    for i, p in enumerate(PROMPTS):
        assert res.token_ids[i] == hf_generate(family.large, family.tokenizer, [p], MAX_NEW)[0]
    assert all(len(t) == MAX_NEW for t in res.token_ids)
    assert res.texts[0] == family.tokenizer.decode(res.token_ids[0], skip_special_tokens=True)


def test_static_zero_equals_large(family: Family) -> None:
    gen = gen_of(family, 3)
    large = gen.generate(PROMPTS, max_new_tokens=MAX_NEW, method="large")
    static = gen.generate(PROMPTS, max_new_tokens=MAX_NEW, method="static", alpha=0.0)
    assert static.token_ids == large.token_ids
    assert all(np.all(a == 0.0) and a.shape == (MAX_NEW, 3) for a in static.alphas)


@pytest.mark.parametrize("index", [0, 2])
def test_expert_equals_expert_generate(family: Family, index: int) -> None:
    res = gen_of(family, 3).generate(PROMPTS, max_new_tokens=MAX_NEW, method="expert", expert=index)
    ref = hf_generate(family.experts[index], family.tokenizer, PROMPTS, MAX_NEW)
    assert res.token_ids == ref


# ---------------------------------------------------------------------- fusion vs the test's loop
def test_static_one_expert_alpha_one_equals_reference_loop(family: Family) -> None:
    res = gen_of(family).generate(PROMPTS, max_new_tokens=MAX_NEW, method="static", alpha=1.0)
    models = [family.large, family.small, family.experts[0]]
    large_only = gen_of(family).generate(PROMPTS, max_new_tokens=MAX_NEW, method="large")
    assert res.token_ids != large_only.token_ids  # the expert really changes the output
    for i, p in enumerate(PROMPTS):
        ids = ids_of(family.tokenizer, p)
        toks, _ = reference_loop(models, [ids] * 3, MAX_NEW, "static", alpha=[1.0])
        assert res.token_ids[i] == toks
        np.testing.assert_array_equal(res.alphas[i], np.ones((len(toks), 1), np.float32))


@pytest.mark.parametrize("n_experts", [1, 3])
def test_dlf_grid_equals_reference_loop(family: Family, n_experts: int) -> None:
    res = gen_of(family, n_experts).generate(
        PROMPTS, max_new_tokens=MAX_NEW, method="dlf", solver="grid", support_k=None
    )
    models = [family.large, family.small, *family.experts[:n_experts]]
    nonzero = 0
    for i, p in enumerate(PROMPTS):
        ids = ids_of(family.tokenizer, p)
        toks, alphas = reference_loop(models, [ids] * len(models), MAX_NEW, "dlf")
        assert res.token_ids[i] == toks
        np.testing.assert_allclose(res.alphas[i], np.stack(alphas), atol=1e-5)
        nonzero += int(np.count_nonzero(res.alphas[i]))
        # one-active rule: at most one non-zero weight per step, and `active` names it
        assert np.all(np.count_nonzero(res.alphas[i], axis=1) <= 1)
        act = res.trace[i].active
        for s in range(len(toks)):
            if act[s] >= 0:
                assert res.alphas[i][s, act[s]] > 0
            else:
                assert np.all(res.alphas[i][s] == 0)
    assert nonzero > 0  # the solver did pick non-trivial weights on this family


def test_dlf_trace_fields(family: Family) -> None:
    res = gen_of(family, 3).generate(PROMPTS[:2], max_new_tokens=4, method="dlf")
    tr = res.trace[0]
    assert tr.kl_expert_small.shape == (4, 3) and tr.kl_small_expert.shape == (4, 3)
    assert np.all(np.isfinite(tr.loss)) and np.all(tr.kl_expert_small > 0)
    assert np.all(tr.kl_fused_large >= 0) and np.all(tr.kl_large_fused >= 0)
    static = gen_of(family).generate(PROMPTS[:1], max_new_tokens=2, method="static", alpha=0.5)
    assert np.all(np.isnan(static.trace[0].kl_fused_large))
    for key in ("forward", "copy", "fuse_step", "sample", "total"):
        assert key in res.timings and res.timings[key] >= 0.0


def test_prompts_for_gives_each_model_its_prompt(family: Family) -> None:
    """L reads an extra prefix (e.g. shots); S and the expert read the plain prompt."""
    shots = [f"w40 w41 w42 {p}" for p in PROMPTS]
    res = gen_of(family).generate(
        PROMPTS, max_new_tokens=6, method="dlf", prompts_for={"large": shots}
    )
    models = [family.large, family.small, family.experts[0]]
    for i, p in enumerate(PROMPTS):
        ids = ids_of(family.tokenizer, p)
        toks, alphas = reference_loop(
            models, [ids_of(family.tokenizer, shots[i]), ids, ids], 6, "dlf"
        )
        assert res.token_ids[i] == toks
        np.testing.assert_allclose(res.alphas[i], np.stack(alphas), atol=1e-5)
    # and the prefix matters: without it the large model answers differently
    plain = gen_of(family).generate(PROMPTS, max_new_tokens=6, method="large")
    shot = gen_of(family).generate(
        PROMPTS, max_new_tokens=6, method="large", prompts_for={"large": shots}
    )
    assert (
        shot.token_ids == gen_of(family).generate(shots, max_new_tokens=6, method="large").token_ids
    )
    assert shot.token_ids != plain.token_ids


# ---------------------------------------------------------------------- batching and seeds
def test_batch_equals_one_prompt_at_a_time(family: Family) -> None:
    gen = gen_of(family, 3)
    batch = gen.generate(PROMPTS, max_new_tokens=MAX_NEW, method="dlf")
    for i, p in enumerate(PROMPTS):
        single = gen.generate([p], max_new_tokens=MAX_NEW, method="dlf")
        assert single.token_ids[0] == batch.token_ids[i]
        np.testing.assert_allclose(single.alphas[0], batch.alphas[i], atol=1e-6)


def test_seeded_sampling_repeats_and_seeds_differ(family: Family) -> None:
    gen = gen_of(family)
    kw: dict[str, Any] = {"max_new_tokens": 12, "method": "dlf", "temperature": 1.0}
    a = gen.generate(PROMPTS, seed=7, **kw)
    b = gen.generate(PROMPTS, seed=7, **kw)
    c = gen.generate(PROMPTS, seed=8, **kw)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids
    greedy = gen.generate(PROMPTS, max_new_tokens=12, method="dlf")
    assert a.token_ids != greedy.token_ids
    # Row seeds depend on the row only: one prompt alone with its row seed repeats row 2.
    alone = gen.generate([PROMPTS[2]], seed=[row_seed(7, 2)], **kw)
    assert alone.token_ids[0] == a.token_ids[2]
    large = gen.generate(PROMPTS, seed=3, max_new_tokens=12, method="large", temperature=1.0)
    again = gen.generate(PROMPTS, seed=3, max_new_tokens=12, method="large", temperature=1.0)
    assert large.token_ids == again.token_ids


def test_splitmix64_reference_value() -> None:
    # First output of splitmix64 seeded with 0 (Vigna's reference implementation).
    assert splitmix64(0) == 0xE220A8397B1DCDAF
    assert row_seed(1, 0) != row_seed(1, 1) and row_seed(1, 0) < 2**63


# ---------------------------------------------------------------------- ending rows
def test_eos_ends_rows_and_is_kept(family: Family) -> None:
    gen = gen_of(family)
    free = gen.generate(PROMPTS, max_new_tokens=MAX_NEW, method="large")
    eos = free.token_ids[0][3]  # pretend this token is EOS: row 0 must end at step 4
    gen.eos_token_ids = {eos}
    res = gen.generate(PROMPTS, max_new_tokens=MAX_NEW, method="large")
    assert res.token_ids[0] == free.token_ids[0][: free.token_ids[0].index(eos) + 1]
    assert res.finish_reasons[0] == "eos"
    assert res.token_ids == hf_generate(family.large, family.tokenizer, PROMPTS, MAX_NEW, eos=eos)
    assert len(res.alphas[0]) == len(res.token_ids[0])
    # every row ends with EOS early -> the loop stops before max_new_tokens
    gen.eos_token_ids = {t[0] for t in free.token_ids}
    first = gen.generate(PROMPTS, max_new_tokens=MAX_NEW, method="large")
    assert all(len(t) == 1 for t in first.token_ids) and first.timings["steps"] == 1


def test_real_eos_token_is_kept_and_left_out_of_text(family: Family) -> None:
    large = copy.deepcopy(family.large)
    with torch.no_grad():  # make </s> the likeliest token everywhere
        large.lm_head.weight[EOS] = 0.0
        large.lm_head.bias = None
        large.model.norm.weight.abs_()
        large.lm_head.weight[EOS] = large.lm_head.weight.abs().max(0).values * 3
    gen = FusedGenerator(large, tokenizer=family.tokenizer)
    res = gen.generate(PROMPTS, max_new_tokens=5, method="large")
    ref = hf_generate(large, family.tokenizer, PROMPTS, 5)
    assert res.token_ids == ref
    assert any(t[-1] == EOS for t in res.token_ids)
    for toks, text in zip(res.token_ids, res.texts):
        if toks[-1] == EOS:
            assert "</s>" not in text


def test_stop_string_ends_row(family: Family) -> None:
    gen = gen_of(family)
    free = gen.generate(PROMPTS, max_new_tokens=MAX_NEW, method="dlf")
    words = free.texts[1].split()
    stop = f"{words[2]} {words[3]}"  # spans two tokens
    res = gen.generate(PROMPTS, max_new_tokens=MAX_NEW, method="dlf", stop=[stop, "never-seen"])
    first = free.texts[1].find(stop)
    n_words = len(free.texts[1][:first].split()) + 2
    assert res.finish_reasons[1] == "stop"
    assert res.token_ids[1] == free.token_ids[1][:n_words]
    assert res.texts[1] == free.texts[1][:first]
    for i in (0, 2, 3):  # other rows go on unless they also produced the stop string
        if stop not in free.texts[i]:
            assert res.token_ids[i] == free.token_ids[i]


def test_padded_vocabulary_is_cut(family: Family) -> None:
    """A checkpoint with 80 logits for a 64-token tokenizer; the extra columns dominate."""
    padded = make_llama(0, hidden=64, vocab=80)
    with torch.no_grad():
        for name, p in family.large.named_parameters():
            dst = padded.get_parameter(name)
            dst[: p.shape[0]] = p
        # padding rows that copy (scaled up) the rows of word tokens: they win whenever a word would
        padded.lm_head.weight[64:] = 10 * family.large.lm_head.weight[4:20]
    uncut = hf_generate(padded, family.tokenizer, PROMPTS, MAX_NEW)
    assert any(t >= 64 for row in uncut for t in row)  # without the cut the padding would win
    want = gen_of(family).generate(PROMPTS, max_new_tokens=MAX_NEW, method="large")
    got = FusedGenerator(padded, tokenizer=family.tokenizer).generate(
        PROMPTS, max_new_tokens=MAX_NEW, method="large"
    )
    assert got.token_ids == want.token_ids
    fam_dlf = FusedGenerator(padded, family.small, family.experts[:1], family.tokenizer)
    ref = gen_of(family).generate(PROMPTS, max_new_tokens=MAX_NEW, method="dlf")
    assert fam_dlf.generate(PROMPTS, max_new_tokens=MAX_NEW).token_ids == ref.token_ids


# ---------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("kwargs", "exc", "needle"),
    [
        ({"prompts": []}, ValueError, "prompts"),
        ({"prompts": ["w1", ""]}, ValueError, "prompts[1]"),
        ({"prompts": ["w1"], "max_new_tokens": 0}, ValueError, "max_new_tokens"),
        ({"prompts": ["w1"], "method": "beam"}, ValueError, "method"),
        ({"prompts": ["w1"], "method": "expert"}, ValueError, "expert"),
        ({"prompts": ["w1"], "method": "expert", "expert": 3}, ValueError, "expert"),
        ({"prompts": ["w1"], "method": "static"}, ValueError, "alpha"),
        ({"prompts": ["w1"], "method": "static", "alpha": [1.0, 2.0]}, ValueError, "alpha"),
        ({"prompts": ["w1"], "method": "dlf", "alpha": 1.0}, ValueError, "alpha"),
        ({"prompts": ["w1"], "max_new_tokens": 70}, ValueError, "context"),
        ({"prompts": [" ".join(["w1"] * 70)]}, ValueError, "max_position_embeddings"),
        ({"prompts": ["w1"], "prompts_for": {"medium": ["w2"]}}, ValueError, "prompts_for"),
        ({"prompts": ["w1"], "prompts_for": {"large": ["w2", "w3"]}}, ValueError, "prompts_for"),
        ({"prompts": ["w1"], "stop": [""]}, ValueError, "stop"),
        ({"prompts": ["w1"], "seed": [1, 2]}, ValueError, "seed"),
    ],
)
def test_argument_errors(family: Family, kwargs: dict, exc: type, needle: str) -> None:
    with pytest.raises(exc) as info:
        gen_of(family).generate(**kwargs)
    assert needle in str(info.value)


def test_methods_needing_small_and_experts(family: Family) -> None:
    gen = FusedGenerator(family.large, tokenizer=family.tokenizer)
    with pytest.raises(ValueError, match="small"):
        gen.generate(["w1"], method="dlf")
    gen = FusedGenerator(family.large, family.small, [], family.tokenizer)
    with pytest.raises(ValueError, match="experts"):
        gen.generate(["w1"], method="static", alpha=1.0)


def test_tokenizer_and_vocab_mismatch_refused(family: Family) -> None:
    other = make_tokenizer()
    other.add_tokens(["extra-word"])
    with pytest.raises(ValueError, match="tokenizers differ") as info:
        FusedGenerator(
            family.large, family.small, family.experts[:1], family.tokenizer,
            model_tokenizers={"small (s)": other},
        )  # fmt: skip
    assert "small" in str(info.value)
    with pytest.raises(ValueError, match="output logits"):
        FusedGenerator(make_llama(0, hidden=32, vocab=50), tokenizer=family.tokenizer)
    with pytest.raises(ValueError, match="tokenizer"):
        FusedGenerator(family.large, tokenizer=None)


def test_cuda_oom_reraised_with_hint(family: Family, monkeypatch: pytest.MonkeyPatch) -> None:
    small = copy.deepcopy(family.small)

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")

    monkeypatch.setattr(small, "forward", boom)
    gen = FusedGenerator(family.large, small, family.experts[:1], family.tokenizer)
    with pytest.raises(torch.cuda.OutOfMemoryError) as info:
        gen.generate(["w1"], max_new_tokens=2)
    msg = str(info.value)
    assert "small" in msg and "batch" in msg and "device_map" in msg and "dtype" in msg


# ---------------------------------------------------------------------- loading
def save_family(fam: Family, root: Any, tokenizer_everywhere: bool = True) -> dict[str, str]:
    paths = {}
    for name, model in [("large", fam.large), ("small", fam.small), ("expert0", fam.experts[0])]:
        path = os.path.join(root, name)
        model.save_pretrained(path, safe_serialization=True)
        if tokenizer_everywhere or name == "large":
            fam.tokenizer.save_pretrained(path)
        paths[name] = path
    return paths


def test_from_pretrained_round_trip(family: Family, tmp_path: Any) -> None:
    paths = save_family(family, tmp_path)
    assert os.path.isfile(os.path.join(paths["large"], "model.safetensors"))
    gen = FusedGenerator.from_pretrained(
        large=paths["large"], small=paths["small"], experts=[paths["expert0"]], device="cpu"
    )
    assert gen.expert_names == ["expert0"]
    got = gen.generate(PROMPTS, max_new_tokens=6, method="dlf")
    want = gen_of(family).generate(PROMPTS, max_new_tokens=6, method="dlf")
    assert got.token_ids == want.token_ids
    assert got.texts == want.texts


def test_from_pretrained_errors(family: Family, tmp_path: Any) -> None:
    paths = save_family(family, tmp_path, tokenizer_everywhere=False)
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="small"):
        FusedGenerator.from_pretrained(large=paths["large"], small=missing, experts=[])
    with pytest.raises(FileNotFoundError, match=r"experts\[0\]"):
        FusedGenerator.from_pretrained(
            large=paths["large"], small=paths["small"], experts=[missing]
        )
    # a tokenizer with another vocabulary next to the expert is refused, naming both
    other = make_tokenizer()
    other.add_tokens(["extra-word"])
    other.save_pretrained(paths["expert0"])
    with pytest.raises(ValueError, match="tokenizers differ") as info:
        FusedGenerator.from_pretrained(
            large=paths["large"], small=paths["small"], experts=[paths["expert0"]]
        )
    assert "expert:0" in str(info.value) and "large" in str(info.value)


def test_lora_adapter_without_peft_gives_hint(family: Family, tmp_path: Any) -> None:
    try:
        import peft  # noqa: F401

        pytest.skip("peft is installed; the hint path is not reachable")
    except ImportError:
        pass
    paths = save_family(family, tmp_path)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(ImportError, match="peft"):
        FusedGenerator.from_pretrained(
            large=paths["large"], small=paths["small"], experts=[str(adapter)]
        )


# ---------------------------------------------------------------------- staging and plotting
def test_staging_buffers_are_reused_zero_copy() -> None:
    from dlf_rs.engines.hf.staging import LogitStaging

    st = LogitStaging(2, batch=3, vocab=5, pin=False)
    st.stage(0, torch.arange(21, dtype=torch.bfloat16).reshape(3, 7))
    st.stage(1, torch.ones(3, 5))
    st.wait()
    first = st.view(0)
    assert first.dtype == np.float32 and first.shape == (3, 5) and first.flags.c_contiguous
    np.testing.assert_array_equal(first[1], np.arange(7, 12, dtype=np.float32))
    st.stage(0, torch.zeros(3, 5))
    st.wait()
    assert st.view(0) is not first  # a float32 CPU tensor is read in place, not copied
    st.stage(0, torch.arange(21, dtype=torch.bfloat16).reshape(3, 7) * 0)
    st.wait()
    assert st.view(0) is first and np.all(first == 0)  # converted: same buffer, overwritten
    logits = torch.randn(3, 5)
    st.stage(1, logits)
    st.wait()
    assert st.view(1).ctypes.data == logits.data_ptr()  # zero-copy
    toks = st.tokens_to(np.array([4, 1, 2]), torch.device("cpu"))
    assert toks.shape == (3, 1) and toks.dtype == torch.long


def test_plot_alphas_writes_png(family: Family, tmp_path: Any) -> None:
    pytest.importorskip("matplotlib")
    from dlf_rs.plotting import plot_alphas

    res = gen_of(family, 3).generate(PROMPTS[:1], max_new_tokens=5, method="dlf")
    path = tmp_path / "alphas.png"
    fig = plot_alphas(res, row=0, expert_names=["math", "qa", "sum"], path=str(path))
    assert path.stat().st_size > 1000
    assert len(fig.axes[0].lines) == 3
    fig2 = plot_alphas(np.zeros((4, 2), np.float32))
    assert len(fig2.axes[0].lines) == 2
