"""Speculative DLF (dlf_rs.engines.hf.speculative, rust/verify.rs) against sequential DLF.

- Greedy, on the shipped family: identical token ids, finish reasons and texts, and weights
  equal to float tolerance, for every task, T = 1 and T = 3, k in {1, 2, 4, 8}, B in {1, 5}
  (prompts of different lengths), with EOS and stop strings, static weights too. A token that
  differs must be a near-tie of the sequential fused logits: the test then reports its margin
  (a warning naming the task, row, position and margin) and fails if the margin is not tiny.
- Sampling: at a fixed prefix, the first token and the first two tokens follow sequential DLF's
  distribution (two-sample chi-square against sequential draws); seeds reproduce; a row's output
  does not depend on its batch.
- The trace and timings fields, option errors, the CLI flag.
"""

from __future__ import annotations

import json
import warnings
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from dlf_rs import DlfError, FusedGenerator, fuse_logits
from dlf_rs.family import CHECKPOINTS, EXPERTS, checkpoint, example_prompts
from dlf_rs.family.world import TASKS

pytestmark = pytest.mark.skipif(
    not (CHECKPOINTS / "manifest.json").exists(), reason="default family not shipped"
)

MAX_NEW = 40
NEAR_TIE = 1e-3  # a flipped greedy token must have had a top-2 fused margin below this
EXPERT_OF = {"math": "math", "qa": "qa", "summary": "summary", "qa_math": "qa"}


@pytest.fixture(scope="module")
def gens() -> dict[str, FusedGenerator]:
    """One generator per seen task's expert (T = 1) and one with all three experts ("all")."""
    torch.set_num_threads(1)
    large, small = checkpoint("large_base"), checkpoint("small_base")
    out = {"all": FusedGenerator.from_pretrained(large, small, [checkpoint(EXPERTS[t])
                                                               for t in EXPERTS])}  # fmt: skip
    for task in EXPERTS:
        out[task] = FusedGenerator.from_pretrained(large, small, [checkpoint(EXPERTS[task])])
    return out


def _gen(gens: dict[str, FusedGenerator], task: str, n_exp: int) -> FusedGenerator:
    return gens["all"] if n_exp == 3 else gens[EXPERT_OF[task]]


def _prompts(task: str, batch: int) -> list[str]:
    prompts = example_prompts(task, 8)
    # Different lengths in one batch: cut some prompts' leading words (still task-shaped).
    out = (
        [prompts[0]]
        if batch == 1
        else [" ".join(p.split()[i % 3 :]) for i, p in enumerate(prompts[:batch])]
    )
    return out


def _margin(gen: FusedGenerator, prompt: str, prefix: list[int], alphas: np.ndarray) -> float:
    """Top-1 minus top-2 of the sequential fused logits after ``prompt`` + ``prefix``."""
    ids = gen._tokenize([prompt])[0] + list(prefix)
    x = torch.tensor([ids])
    with torch.inference_mode():
        z = [m(input_ids=x).logits[:, -1, : gen.vocab_size].float().numpy()
             for m in (gen.large, gen.small, *gen.experts)]  # fmt: skip
    fused = fuse_logits(z[0], z[1], z[2:], alphas.reshape(1, -1))[0]
    top = np.sort(fused)[-2:]
    return float(top[1] - top[0])


def assert_same(gen: FusedGenerator, prompts: list[str], seq: Any, spec: Any, what: str) -> None:
    for b, prompt in enumerate(prompts):
        s, p = seq.token_ids[b], spec.token_ids[b]
        n = next((i for i, (x, y) in enumerate(zip(s, p)) if x != y), min(len(s), len(p)))
        np.testing.assert_allclose(spec.alphas[b][:n], seq.alphas[b][:n], rtol=0, atol=1e-5,
                                   err_msg=f"{what} row {b}")  # fmt: skip
        if s == p:
            assert spec.finish_reasons[b] == seq.finish_reasons[b], f"{what} row {b}"
            assert spec.texts[b] == seq.texts[b], f"{what} row {b}"
            continue
        assert n < min(len(s), len(p)), (
            f"{what} row {b}: same first {n} tokens, then one run ended "
            f"({seq.finish_reasons[b]} vs {spec.finish_reasons[b]})"
        )
        margin = _margin(gen, prompt, s[:n], seq.alphas[b][n])
        message = (f"{what} row {b}: token {n} differs (sequential {s[n]}, speculative {p[n]}); "
                   f"sequential top-2 fused margin {margin:.3g}")  # fmt: skip
        assert margin < NEAR_TIE, message + " is not a near-tie"
        warnings.warn("near-tie flip: " + message, stacklevel=2)


@pytest.mark.parametrize("n_exp", [1, 3])
@pytest.mark.parametrize("task", list(TASKS))
def test_greedy_equals_sequential(gens: dict[str, FusedGenerator], task: str, n_exp: int) -> None:
    gen = _gen(gens, task, n_exp)
    for batch in (1, 5):
        prompts = _prompts(task, batch)
        seq = gen.generate(prompts, MAX_NEW)
        for k in (1, 2, 4, 8, "auto"):
            spec = gen.generate(prompts, MAX_NEW, speculative=k)
            assert_same(gen, prompts, seq, spec, f"{task} T={n_exp} B={batch} k={k}")


@pytest.mark.parametrize("task", ["math", "qa", "summary"])
def test_stop_strings_inside_accepted_runs(gens: dict[str, FusedGenerator], task: str) -> None:
    gen = _gen(gens, task, 1)
    prompts = _prompts(task, 5)
    free = gen.generate(prompts, MAX_NEW)
    # A word each row produces a few tokens in: the stop lands inside verified runs.
    words = [t.split()[min(3, len(t.split()) - 1)] for t in free.texts if t.split()]
    stop = sorted(set(words))[:2]
    seq = gen.generate(prompts, MAX_NEW, stop=stop)
    assert "stop" in seq.finish_reasons
    for k in (2, 4, 8):
        spec = gen.generate(prompts, MAX_NEW, stop=stop, speculative=k)
        assert_same(gen, prompts, seq, spec, f"{task} stop={stop} k={k}")


@pytest.mark.parametrize("n_exp", [1, 3])
def test_static_weights_equal_sequential(gens: dict[str, FusedGenerator], n_exp: int) -> None:
    alpha = 1.0 if n_exp == 1 else (0.5, 1.0, 0.8)
    for task in ("math", "qa"):
        gen = _gen(gens, task, n_exp)
        prompts = _prompts(task, 5)
        seq = gen.generate(prompts, MAX_NEW, alpha=alpha)
        for k in (1, 4):
            spec = gen.generate(prompts, MAX_NEW, alpha=alpha, speculative=k)
            assert_same(gen, prompts, seq, spec, f"static {task} T={n_exp} k={k}")


def test_auto_and_short_limits(gens: dict[str, FusedGenerator]) -> None:
    gen = _gen(gens, "qa", 1)
    prompts = _prompts("qa", 5)
    for n in (1, 2, 3, 7):  # rows hit max_new_tokens inside verified runs
        seq = gen.generate(prompts, n)
        for k in (4, "auto"):
            spec = gen.generate(prompts, n, speculative=k)
            assert_same(gen, prompts, seq, spec, f"max_new_tokens={n} k={k}")
            assert all(len(t) <= n for t in spec.token_ids)
    seq = gen.generate(prompts, MAX_NEW)
    assert "eos" in seq.finish_reasons  # EOS inside verified runs is exercised
    assert_same(gen, prompts, seq, gen.generate(prompts, MAX_NEW, speculative="auto"), "auto")


def test_trace_and_timings(gens: dict[str, FusedGenerator]) -> None:
    gen = _gen(gens, "math", 1)
    res = gen.generate(_prompts("math", 5), MAX_NEW, speculative=4)
    for b, tr in enumerate(res.trace):
        n = len(res.token_ids[b])
        assert tr.accepted_draft is not None and tr.accepted_draft.shape == (n,)
        assert res.alphas[b].shape == (n, 1) and tr.active.shape == (n,)
        assert tr.acceptance_rate is not None and 0.0 <= tr.acceptance_rate <= 1.0
        assert not tr.accepted_draft[0] or n > 1
    t = res.timings
    for key in ("draft", "verify", "fuse_verify", "sample", "prefill", "copy", "crop", "total"):
        assert t[key] >= 0.0, key
    emitted = sum(len(x) for x in res.token_ids)
    # Every round emits at least one token per live row; accepted drafts are emitted tokens.
    assert t["large_forwards"] <= t["steps"] and t["accepted"] <= emitted
    assert t["large_forwards"] < emitted / 5  # 5 rows: fewer large forwards than tokens per row
    assert 0.3 < t["acceptance"] <= 1.0
    seq = gen.generate(_prompts("math", 5), MAX_NEW)
    assert all(tr.accepted_draft is None for tr in seq.trace)


# ---------------------------------------------------------------------- sampling
def _pairs(res: Any) -> list[tuple[int, int]]:
    return [(t[0], t[1] if len(t) > 1 else -1) for t in res.token_ids]


def _chi2_critical(dof: int, z: float = 3.09) -> float:
    """The chi-square value exceeded with probability about 1e-3 (z = 3.09), Wilson-Hilferty."""
    c = 2.0 / (9.0 * dof)
    return dof * (1.0 - c + z * c**0.5) ** 3


def _chi2_ratio(a: list[Any], b: list[Any]) -> float:
    """Chi-square statistic that two samples share a distribution (values seen fewer than 10
    times pooled), divided by its 1e-3 critical value: above 1 rejects at p < 1e-3."""
    values = sorted(set(a) | set(b), key=str)
    counts = np.array([[a.count(v) for v in values], [b.count(v) for v in values]], float)
    big = counts.sum(0) >= 10
    table = np.column_stack([counts[:, big], counts[:, ~big].sum(1)])
    table = table[:, table.sum(0) > 0]
    if table.shape[1] < 2:
        return 0.0
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    stat = float(((table - expected) ** 2 / expected).sum())
    return stat / _chi2_critical(table.shape[1] - 1)


FILTERED = {"temperature": 1.2, "top_k": 20, "top_p": 0.95, "min_p": 0.01}


@pytest.mark.parametrize("sampling", [{"temperature": 1.5}, FILTERED])
@pytest.mark.parametrize("prompt", ["question : what is the job of", "passage :"])
def test_sampling_keeps_the_distribution(gens: dict[str, FusedGenerator],
                                         sampling: dict[str, Any], prompt: str) -> None:  # fmt: skip
    # Prefixes with broad next-token distributions (acceptance about 0.35 and 0.55 at k = 1).
    gen = _gen(gens, "qa", 1)
    n = 1500
    seq = gen.generate([prompt] * n, 2, seed=list(range(n)), **sampling)
    for k in (1, 4, "auto"):
        # Three tokens: the first round drafts up to two, so both compared tokens can come from
        # one verification (accepted drafts, a correction, a bonus) or from two.
        spec = gen.generate([prompt] * n, 3, seed=list(range(10**6, 10**6 + n)), speculative=k,
                            **sampling)  # fmt: skip
        first = _chi2_ratio([t[0] for t in seq.token_ids], [t[0] for t in spec.token_ids])
        pairs = _chi2_ratio(_pairs(seq), _pairs(spec))
        assert first < 1.0 and pairs < 1.0, (k, first, pairs)
        assert 0.0 < spec.timings["acceptance"] < 1.0 or k == "auto"
    # The same test tells a different distribution apart: the expert alone.
    other = gen.generate([prompt] * n, 2, seed=list(range(n)), method="expert", expert=0,
                         **sampling)  # fmt: skip
    assert _chi2_ratio(_pairs(seq), _pairs(other)) > 1.0


def test_seeds_reproduce_and_rows_are_batch_independent(gens: dict[str, FusedGenerator]) -> None:
    gen = _gen(gens, "summary", 1)
    prompts = _prompts("summary", 5)
    seeds = [11, 22, 33, 44, 55]
    a = gen.generate(prompts, 20, seed=seeds, temperature=1.0, speculative=3)
    b = gen.generate(prompts, 20, seed=seeds, temperature=1.0, speculative=3)
    assert a.token_ids == b.token_ids
    c = gen.generate(prompts, 20, seed=[s + 1 for s in seeds], temperature=1.0, speculative=3)
    assert a.token_ids != c.token_ids
    alone = gen.generate(prompts[2:3], 20, seed=seeds[2:3], temperature=1.0, speculative=3)
    assert alone.token_ids[0] == a.token_ids[2]
    t3 = _gen(gens, "qa", 3)
    x = t3.generate(prompts, 20, seed=seeds, temperature=1.0, speculative=3)
    y = t3.generate(prompts[1:2], 20, seed=seeds[1:2], temperature=1.0, speculative=3)
    assert y.token_ids[0] == x.token_ids[1]


# ---------------------------------------------------------------------- errors and CLI
def test_refused_where_it_does_not_apply(gens: dict[str, FusedGenerator]) -> None:
    gen = _gen(gens, "qa", 1)
    with pytest.raises(DlfError, match="^speculative: needs a fused method"):
        gen.generate(["question : where does kubrai moulos live ? answer :"], 4, method="large",
                     speculative=2)  # fmt: skip
    with pytest.raises(DlfError, match=r"^speculative: expected None, a draft length in \[1, 16\]"):
        gen.generate(["question : where does kubrai moulos live ? answer :"], 4, speculative=0)
    with pytest.raises(TypeError, match="^speculative: expected None, an int"):
        gen.generate(["question : where does kubrai moulos live ? answer :"], 4, speculative=2.0)


def test_cli_flag(tmp_path: Any) -> None:
    from dlf_rs.cli import main

    out = tmp_path / "o.jsonl"
    prompt = example_prompts("qa", 1)[0]
    args = ["generate", "--family", "default", "--expert", "qa", "--prompt", prompt,
            "--max-new-tokens", "12", "--no-progress", "-o"]  # fmt: skip
    assert main([*args, str(out), "--speculative", "4"]) == 0
    assert main([*args, str(tmp_path / "s.jsonl")]) == 0
    spec, seq = json.loads(out.read_text()), json.loads((tmp_path / "s.jsonl").read_text())
    # The speculative record adds the acceptance figures; everything else is sequential DLF's.
    assert 0.0 <= spec.pop("acceptance_rate") <= 1.0
    assert len(spec.pop("accepted_draft")) == len(seq["token_ids"])
    assert spec == seq
    assert main([*args, str(out), "--speculative", "auto"]) == 0
    assert main([*args, str(out), "--speculative", "0"]) == 2
    assert main([*args, str(out), "--speculative", "fast"]) == 2


def test_margin_report_works(gens: dict[str, FusedGenerator]) -> None:
    """The near-tie report of assert_same computes a real margin (it runs only on a flip)."""
    gen = _gen(gens, "qa", 1)
    prompt = example_prompts("qa", 1)[0]
    seq = gen.generate([prompt], 6)
    for n in range(len(seq.token_ids[0])):
        margin = _margin(gen, prompt, seq.token_ids[0][:n], seq.alphas[0][n])
        assert margin > NEAR_TIE  # the family's greedy tokens are far from ties


def test_bench_script_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """benches/bench_speculative.py on a tiny run prints the table and the labelled projection."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benches" / "bench_speculative.py"
    spec = importlib.util.spec_from_file_location("bench_speculative", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = ["--tasks", "qa", "--prompts", "2", "--batch", "1", "--k", "2", "--max-new-tokens",
            "6", "--repeats", "1", "--t-core", "0.5"]  # fmt: skip
    assert module.main(argv) == 0
    out = capsys.readouterr().out
    assert "qa        1 k=2" in out and "PROJECTION for 13B" in out
