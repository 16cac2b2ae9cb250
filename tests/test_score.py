"""Fused scoring (dlf_rs.engines.hf.scoring) against an independent token-by-token computation on the shipped
default family: each model runs on the growing prefix (one sequence, no cache, no padding), the
core solves that one position with ``fuse_step``, ``fuse_logits`` fuses, and torch takes the
float64 log-softmax. Scoring runs each model once over a padded batch of whole sequences."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import dlf_rs
from dlf_rs.engines.hf import scoring
from dlf_rs.harness._family import DEFAULT_FAMILY, world
from dlf_rs.harness.build_tasks import family_world

pytestmark = pytest.mark.skipif(
    not (DEFAULT_FAMILY / "manifest.json").exists(), reason="default family not shipped"
)
EXPERTS = ("qa", "math", "summary")


@pytest.fixture(scope="module")
def family() -> dict:
    from dlf_rs.engines.hf.generate import FusedGenerator
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(str(DEFAULT_FAMILY / "tokenizer"))
    load = {
        name: LlamaForCausalLM.from_pretrained(str(DEFAULT_FAMILY / name), dtype=torch.float32)
        .eval()
        for name in ("large_base", "small_base", *(f"small_expert_{e}" for e in EXPERTS))
    }
    experts = [load[f"small_expert_{e}"] for e in EXPERTS]
    gens = {
        1: FusedGenerator(load["large_base"], load["small_base"], experts[:1], tok,
                          expert_names=list(EXPERTS[:1])),
        3: FusedGenerator(load["large_base"], load["small_base"], experts, tok,
                          expert_names=list(EXPERTS)),
    }  # fmt: skip
    w = family_world(DEFAULT_FAMILY)
    return {"gens": gens, "tok": tok, "world": w}


def _ids(gen, text: str, special: bool = True) -> list[int]:
    return list(gen.tokenizer(text, add_special_tokens=special)["input_ids"])


def _reference(gen, ctx: list[int], cont: list[int], method: str, alpha=None, expert=None):
    """Token by token: every model on the growing prefix, one core call per position."""
    v = gen.vocab_size
    if method == "large":
        models = [gen.large]
    elif method == "expert":
        models = [gen.experts[expert]]
    else:
        models = [gen.large, gen.small, *gen.experts]
    logps, alphas, greedy = [], [], []
    with torch.no_grad():
        for j in range(len(cont)):
            prefix = torch.tensor([ctx + cont[:j]])
            z = [m(input_ids=prefix, use_cache=False).logits[0, -1:, :v].numpy() for m in models]
            if method in ("dlf", "static"):
                r = dlf_rs.fuse_step(z[0], z[1], z[2:], alpha=alpha)
                a = np.asarray(r.alphas, np.float32).reshape(1, -1)
                fused = dlf_rs.fuse_logits(z[0], z[1], z[2:], a)
                alphas.append(a[0])
            else:
                fused = z[0]
            lp = torch.log_softmax(torch.from_numpy(fused).double(), dim=-1)[0]
            logps.append(float(lp[cont[j]]))
            greedy.append(int(np.argmax(fused[0])) == cont[j])
    return np.array(logps), (np.array(alphas) if alphas else None), all(greedy)


def _pairs(family: dict, task: str, n: int) -> tuple[list[list[int]], list[list[int]]]:
    gen = family["gens"][1]
    exs = world.eval_set(family["world"], task, n)
    return [_ids(gen, e.prompt) for e in exs], [_ids(gen, e.answer, False) for e in exs]


@pytest.mark.parametrize(
    ("t", "method", "alpha", "task"),
    [
        (1, "dlf", None, "qa"),
        (1, "static", 1.0, "summary"),
        (3, "dlf", None, "math"),
        (3, "static", [0.5, 1.0, 1.5], "qa"),
    ],
)
def test_score_matches_token_by_token(family, t, method, alpha, task) -> None:
    gen = family["gens"][t]
    ctxs, conts = _pairs(family, task, 3)
    # batch_size=2: a padded batch of two different lengths, then a batch of one.
    res = scoring.score_ids(gen, ctxs, conts, method=method, alpha=alpha, batch_size=2)
    assert len(res) == 3
    for r, ctx, cont in zip(res, ctxs, conts):
        ref_lp, ref_a, ref_greedy = _reference(gen, ctx, cont, method, alpha)
        assert r.token_ids == cont
        assert r.logprobs.dtype == np.float64 and r.logprobs.shape == (len(cont),)
        np.testing.assert_allclose(r.logprobs, ref_lp, atol=2e-4, rtol=0)
        assert r.total == pytest.approx(float(np.sum(r.logprobs)), abs=1e-9)
        assert r.alphas.shape == (len(cont), t)
        np.testing.assert_allclose(r.alphas, ref_a, atol=1e-6)
        assert r.is_greedy == ref_greedy
    if method == "dlf":
        # The weights really vary over positions and rows (the test would pass on zeros too).
        all_alphas = np.concatenate([r.alphas for r in res])
        assert len(np.unique(all_alphas)) > 1


@pytest.mark.parametrize(("method", "expert"), [("large", None), ("expert", 1)])
def test_single_model_methods(family, method, expert) -> None:
    gen = family["gens"][3]
    ctxs, conts = _pairs(family, "math", 2)
    res = scoring.score_ids(gen, ctxs, conts, method=method, expert=expert)
    for r, ctx, cont in zip(res, ctxs, conts):
        ref_lp, _, ref_greedy = _reference(gen, ctx, cont, method, expert=expert)
        np.testing.assert_allclose(r.logprobs, ref_lp, atol=2e-4, rtol=0)
        assert r.is_greedy == ref_greedy
        fill = np.zeros if method == "large" else (lambda s: np.full(s, np.nan))
        np.testing.assert_array_equal(r.alphas, fill((len(cont), 3)))


def test_greedy_continuation_scores_as_greedy_with_decoding_alphas(family) -> None:
    gen = family["gens"][3]
    prompts = [e.prompt for e in world.eval_set(family["world"], "qa", 2)]
    out = gen.generate(prompts, max_new_tokens=6, method="dlf", temperature=0.0)
    ctxs = [_ids(gen, p) for p in prompts]
    res = scoring.score_ids(gen, ctxs, out.token_ids, method="dlf")
    for r, toks, a in zip(res, out.token_ids, out.alphas):
        assert r.is_greedy
        # Position j of the continuation is decoding step j: the same weights were chosen.
        np.testing.assert_allclose(r.alphas, a, atol=1e-6)
        assert np.all(r.logprobs <= 0)
    # Replace the last generated token by another one: no longer the greedy continuation.
    toks = list(out.token_ids[0])
    toks[-1] = (toks[-1] + 7) % gen.vocab_size
    (bad,) = scoring.score_ids(gen, ctxs[:1], [toks], method="dlf")
    assert not bad.is_greedy
    np.testing.assert_allclose(bad.logprobs[:-1], res[0].logprobs[:-1], atol=1e-9)


def test_string_api_splits_at_the_context(family) -> None:
    gen = family["gens"][1]
    ex = world.eval_set(family["world"], "qa", 1)[0]
    (r,) = scoring.score(gen, ex.prompt, " " + ex.answer)
    assert r.token_ids == _ids(gen, ex.answer, False)
    (r2,) = scoring.score_ids(gen, [_ids(gen, ex.prompt)], [r.token_ids])
    np.testing.assert_array_equal(r.logprobs, r2.logprobs)


def test_long_context_is_cut_from_the_left(family) -> None:
    gen = family["gens"][1]
    limit = scoring.context_limit(gen)
    assert limit == 256
    ex = world.eval_set(family["world"], "summary", 1)[0]
    cont = _ids(gen, ex.answer, False)
    filler = _ids(gen, " ".join([ex.prompt] * 20), False)
    ctx = [gen.tokenizer.bos_token_id, *filler]
    assert len(ctx) + len(cont) - 1 > limit
    (r,) = scoring.score_ids(gen, [ctx], [cont])
    cut = len(ctx) + len(cont) - 1 - limit
    assert r.truncated == cut
    (same,) = scoring.score_ids(gen, [ctx[cut:]], [cont])
    np.testing.assert_array_equal(r.logprobs, same.logprobs)
    with pytest.raises(ValueError, match="continuations\\[0\\].*score_rolling"):
        scoring.score_ids(gen, [ctx[:2]], [filler[: limit + 1]])


def test_rolling_windows_cover_every_token_once() -> None:
    for n in (1, 5, 8, 9, 23):
        for max_len in (1, 3, 8):
            wins = scoring.rolling_windows(n, max_len)
            scored = [i for _, s, e in wins for i in range(s, e)]
            assert scored == list(range(n))
            for a, s, e in wins:
                assert 0 <= a <= s < e and e - a <= max_len
                assert a == max(0, e - max_len)  # as much context as fits


def test_score_rolling(family) -> None:
    gen = family["gens"][1]
    text = " ".join(e.prompt + " " + e.answer for e in world.eval_set(family["world"], "qa", 3))
    ids = _ids(gen, text, False)
    bos = gen.tokenizer.bos_token_id
    (whole,) = scoring.score_rolling(gen, text)
    (direct,) = scoring.score_ids(gen, [[bos]], [ids])
    assert whole.token_ids == ids
    np.testing.assert_allclose(whole.logprobs, direct.logprobs, atol=1e-9)
    (windowed,) = scoring.score_rolling(gen, text, max_length=8)
    assert windowed.token_ids == ids and windowed.alphas.shape == (len(ids), 1)
    # The first window sees the same context as the unwindowed pass; later tokens see less.
    np.testing.assert_allclose(windowed.logprobs[:8], whole.logprobs[:8], atol=2e-4)
    assert not np.allclose(windowed.logprobs[8:], whole.logprobs[8:], atol=1e-3)


def test_argument_errors(family) -> None:
    gen = family["gens"][1]
    ctx, cont = [[1, 5]], [[6]]
    with pytest.raises(ValueError, match="alpha: method='static'"):
        scoring.score_ids(gen, ctx, cont, method="static")
    with pytest.raises(ValueError, match="alpha: only used"):
        scoring.score_ids(gen, ctx, cont, method="dlf", alpha=1.0)
    with pytest.raises(ValueError, match="^method: expected one of"):
        scoring.score_ids(gen, ctx, cont, method="proxy")
    with pytest.raises(ValueError, match="continuations\\[0\\]: no tokens"):
        scoring.score_ids(gen, ctx, [[]])
    with pytest.raises(ValueError, match="continuations: 2"):
        scoring.score_ids(gen, ctx, cont * 2)
    with pytest.raises(ValueError, match="grid_step"):
        scoring.score_ids(gen, ctx, cont, grid_step=-1.0)


def test_next_token_logits_are_each_models_last_position(family) -> None:
    """One padded forward per model equals each model on each prompt alone; fusing them with
    fuse_step under any options gives generate's first token and first weights."""
    gen = family["gens"][3]
    prompts = [e.prompt for e in world.eval_set(family["world"], "math", 3)]
    nxt = gen.next_token_logits(prompts, batch_size=2)  # a padded batch of two, then one
    assert list(nxt.logits) == ["large", "small", "expert:0", "expert:1", "expert:2"]
    models = [gen.large, gen.small, *gen.experts]
    with torch.no_grad():
        for (name, z), m in zip(nxt.logits.items(), models):
            assert z.dtype == np.float32 and z.shape == (3, gen.vocab_size)
            for b, p in enumerate(prompts):
                ref = m(input_ids=torch.tensor([_ids(gen, p)]), use_cache=False).logits[0, -1]
                np.testing.assert_allclose(z[b], ref[: gen.vocab_size].numpy(), atol=2e-4)
    large, small, experts = nxt.members()
    for opts in ({"method": "dlf"}, {"method": "dlf", "multi_expert": "joint"},
                 {"method": "static", "alpha": [0.5, 0.5, 0.0]}):  # fmt: skip
        r = dlf_rs.fuse_step(large, small, experts, temperature=0.0,
                             **{k: v for k, v in opts.items() if k != "method"})  # fmt: skip
        out = gen.generate(prompts, max_new_tokens=1, temperature=0.0, **opts)
        assert [t[0] for t in out.token_ids] == [int(t) for t in r.tokens]
        np.testing.assert_allclose(np.stack([a[0] for a in out.alphas]),
                                   np.asarray(r.alphas).reshape(3, 3), atol=1e-6)  # fmt: skip


def test_next_token_logits_single_model_and_errors(family) -> None:
    gen = family["gens"][3]
    prompts = [e.prompt for e in world.eval_set(family["world"], "qa", 2)]
    both = gen.next_token_logits(prompts)
    one = gen.next_token_logits(prompts, method="expert", expert=2)
    assert list(one.logits) == ["expert:2"]
    np.testing.assert_array_equal(one.logits["expert:2"], both.logits["expert:2"])
    large = gen.next_token_logits(prompts, method="large")
    assert list(large.logits) == ["large"]
    with pytest.raises(ValueError, match="members\\(\\) needs"):
        large.members()
    with pytest.raises(ValueError, match="expert: index 5 out of range"):
        gen.next_token_logits(prompts, method="expert", expert=5)
    with pytest.raises(ValueError, match="batch_size: expected an int >= 1"):
        gen.next_token_logits(prompts, batch_size=0)
    with pytest.raises(TypeError, match="prompts: give the prompts"):
        gen.next_token_logits()
    limit = scoring.context_limit(gen)
    with pytest.raises(ValueError, match="prompts\\[1\\]: .* exceed the large model's context"):
        gen.next_token_logits(input_ids=[[1, 2], [1] * (limit + 1)])
