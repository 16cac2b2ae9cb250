"""The paper tables' files: per-task tables with intervals and paired comparisons, Tables 1 and 2
across tasks, the per-example results, the alpha plots and a manifest.

Where it sits: last, after :mod:`.runner`; ``python -m dlf_rs.real_family.paper run`` (and
``tables``) write into ``docs/paper-tables/`` for a full held-out run (a ``--limit`` run writes
into the cache instead, so a small try never overwrites the committed tables):

- ``<task>.md``: the task's Table 1 rows, then its Table 2 rows, each as an accuracy table
  (95% Wilson intervals, ms per token) and the paired comparisons (paired bootstrap interval,
  discordant counts, exact McNemar p). Rows decoded on fewer examples (the GSM8K ablation rows)
  get a second table on those first examples, where every row is restricted to them;
- ``<task>.jsonl``: one line per example: its id, 1/0 per row, and per row the answer the
  scorer read and the number of tokens (the replies stay in the cache);
- ``tables.md``: Tables 1 and 2 as tasks by methods (the paper's columns; TruthfulQA and
  CNN/DM are not available offline and say so);
- ``alpha-<task>.png``: DLF's alpha per step on one example of each task (the first it gets
  right); ``alpha-<set>-mmlu.png``: each expert's alpha under the one-active rule on one MMLU
  question (the paper's Figure 3);
- ``manifest.json``: the data and split fingerprints, the adapters' fingerprints and hashes,
  every row's output fingerprint, size, accuracy and time, the versions.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .plan import CHOICES, DERIVED, MULTI_SETS, TASK_ORDER, table_keys
from .runner import RowResult
from .stats import Accuracy
from .store import write_json
from .tables import (
    COMPARISONS,
    GAP_METHODS,
    MethodRow,
    accuracy_table,
    gap_table,
    gap_table_tasks,
    paired_table,
    task_table,
)
from .tasks import TASKS

__all__ = ["PAPER_COLUMNS", "comparisons", "method_rows", "per_example", "write_report"]

PAPER_COLUMNS = ("GSM8K", "TruthfulQA", "TriviaQA", "CNN/DM", "MMLU")


GAP_NOTE = (
    "The gap between the 1.5B alone and the 1.5B + LoRA (the upper bound) that each "
    "method closes, (method - large) / (upper - large), with its bootstrap interval; "
    '"minus the midpoint" is method - (large + upper) / 2: an interval above zero '
    "means the method closes at least half the gap (95%):"
)

ROWS_NOTE = (
    "Per task, the rows run on all of its examples count (not GSM8K's ablation rows on fewer)."
)


def comparisons(table: str) -> list[tuple[str, str]]:
    """The paired comparisons of a table ("a minus b")."""
    if table == "single":
        return [*COMPARISONS, ("dlf", "static-val"), ("dlf-val", "dlf"), ("dlf-val", "proxy"),
                ("large-lora", "dlf")]  # fmt: skip
    out = []
    for s in MULTI_SETS:
        out += [(f"{s}/one-active", f"{s}/static-avg"), (f"{s}/one-active", "large"),
                (f"{s}/max-shift", f"{s}/one-active")]  # fmt: skip
    return out + [("gtm/one-active", "mtt")]


def method_rows(results: Sequence[RowResult], n: int | None = None) -> list[MethodRow]:
    """The rows as :class:`.tables.MethodRow`, each cut to its first ``n`` examples."""
    out = []
    for r in results:
        k = r.n if n is None else n
        out.append(MethodRow(r.key, r.row.label, r.correct[:k], float(sum(r.seconds[:k])),
                             int(sum(r.tokens[:k])), sum(f == "length" for f in r.finish[:k])))  # fmt: skip
    return out


def _section(results: Sequence[RowResult], table: str) -> str:
    """Accuracy and paired tables of ``results``, one pair per distinct row size."""
    parts = []
    sizes = sorted({r.n for r in results}, reverse=True)
    for i, n in enumerate(sizes):
        sub = [r for r in results if r.n >= n]
        head = (f"All {n} examples:" if i == 0 and len(sizes) == 1 else
                f"The first {n} examples ({len(sub)} rows):")  # fmt: skip
        rows = method_rows(sub, n)
        letter = TASKS[results[0].task].answer == "letter"
        parts.append(head + "\n\n" + accuracy_table(rows, per="example" if letter else "token"))
        keys = {r.key for r in sub}
        pairs = [(a, b) for a, b in comparisons(table) if a in keys and b in keys]
        if pairs:
            parts.append("Paired comparisons (a minus b, percentage points):\n\n"
                         + paired_table(rows, pairs))  # fmt: skip
        gaps = gap_table(rows) if table == "single" else None
        if gaps:
            parts.append(GAP_NOTE + "\n\n" + gaps)
    notes = [f"- {r.row.label}: {r.note}" for r in results if r.note]
    return "\n\n".join(parts + (["\n".join(notes)] if notes else []))


def _task_md(task: str, results: Sequence[RowResult], part: str, split: Mapping[str, Any]) -> str:
    spec = TASKS[task]
    single = set(table_keys(task, "single")) | set(DERIVED)
    multi = set(table_keys(task, "multi"))
    lines = [f"# {spec.column}: {part} part of split {split['fingerprint']}",
             "",
             ("Zero-shot chat prompts, greedy, at most the task's budget of new tokens; "
              if spec.answer == "generate" else
              "Zero-shot chat prompts; the reply is the likeliest of the letters A-D at the "
              "first position, under each row's fusion (one forward per model, no decoding); ")
             + f"metric: {spec.metric}. [Back to the tables](tables.md).",
             ""]  # fmt: skip
    s_rows = [r for r in results if r.key in single]
    m_rows = [r for r in results if r.key in multi]
    if s_rows:
        lines += ["## Table 1 rows (single task: this task's expert)", "", _section(s_rows, "single"),
                  ""]  # fmt: skip
    if m_rows:
        unseen = sorted({r.key.split("/")[0] for r in m_rows if task in r.row.unseen})
        note = (f" {TASKS[task].column} is unseen by the {', '.join(unseen)} expert set."
                if unseen else "")  # fmt: skip
        lines += ["## Table 2 rows (several experts at once, no task id)", "",
                  f"Every expert decodes every task.{note}", "", _section(m_rows, "multi"), ""]  # fmt: skip
    return "\n".join(lines)


def per_example(results: Sequence[RowResult]) -> list[dict[str, Any]]:
    """One record per example (the longest row's order): 1/0 per row that has it, and per row
    the scorer's reading of the reply and its token count."""
    if not results:
        return []
    longest = max(results, key=lambda r: r.n)
    out = []
    for i, ex_id in enumerate(longest.ids):
        rec: dict[str, Any] = {"id": ex_id, "answers": {}, "tokens": {}}
        for r in results:
            if i < r.n:
                assert r.ids[i] == ex_id, "rows list the part's examples in one order"
                rec[r.key] = int(r.correct[i])
                rec["answers"][r.key] = r.answers[i]
                rec["tokens"][r.key] = r.tokens[i]
        out.append(rec)
    return out


def _plot(result: RowResult, path: Path, names: list[str]) -> dict[str, Any] | None:
    from dlf_rs.plotting import plot_alphas

    idx = next((i for i, ok in enumerate(result.correct) if ok), 0)
    alphas = result.alphas[idx] if result.alphas else None
    if not alphas:
        return None
    arr = np.asarray(alphas, dtype=np.float32)
    verdict = "right" if result.correct[idx] else "wrong"
    plot_alphas(arr, expert_names=names, path=str(path),
                title=f"{result.row.label}: alpha per step, {TASKS[result.task].column} "
                      f"{result.ids[idx]} ({verdict})")  # fmt: skip
    return {"file": path.name, "task": result.task, "row": result.key, "id": result.ids[idx],
            "correct": bool(result.correct[idx]), "text": result.texts[idx],
            "alphas": arr.tolist()}  # fmt: skip


def _cells(results: Mapping[str, Sequence[RowResult]], table: str
           ) -> tuple[dict[str, dict[str, Accuracy | None]], list[str]]:  # fmt: skip
    cells: dict[str, dict[str, Accuracy | None]] = {}
    sizes: dict[str, dict[int, list[str]]] = {}
    rank: dict[str, int] = {}  # rows in the plan's order, whichever task has them first
    for task, rows in results.items():
        order = list(table_keys(task, table)) + (list(DERIVED) if table == "single" else [])
        keys = set(order)
        col = TASKS[task].column
        for r in rows:
            if r.key not in keys:
                continue
            label = r.row.label + (" [MMLU unseen]" if table == "multi" and r.row.unseen else "")
            for c in CHOICES:  # the choice differs by task: one row across the tasks
                if r.key == c.key:
                    label = c.label
            cells.setdefault(label, {})[col] = MethodRow(r.key, label, r.correct).accuracy
            rank[label] = min(rank.get(label, len(order)), order.index(r.key))
            sizes.setdefault(col, {}).setdefault(r.n, []).append(label)
    notes = []
    for col, by in sizes.items():
        main = max(by, key=lambda n: len(by[n]))
        other = "; ".join(f"{n} for {', '.join(v)}" for n, v in sorted(by.items()) if n != main)
        notes.append(f"{col}: {main} examples" + (f" ({other})" if other else ""))
    return {k: cells[k] for k in sorted(cells, key=lambda k: rank[k])}, notes


def write_report(out: Path, results: Mapping[str, Sequence[RowResult]], meta: Mapping[str, Any],
                 adapters: Mapping[str, Any]) -> list[Path]:  # fmt: skip
    """Write every file listed in the module docstring into ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    plots: dict[str, Any] = {}
    part = str(meta.get("part", "heldout"))
    for task in [t for t in TASK_ORDER if t in results]:
        rows = list(results[task])
        if not rows:
            continue
        md = out / f"{task}.md"
        md.write_text(_task_md(task, rows, part, meta["splits"][task]) + "\n", encoding="utf-8")
        jl = out / f"{task}.jsonl"
        with open(jl, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n"
                          for r in per_example(rows))  # fmt: skip
        written += [md, jl]
        by = {r.key: r for r in rows}
        if "dlf" in by:
            p = _plot(by["dlf"], out / f"alpha-{task}.png", [f"{TASKS[task].column} expert"])
            if p:
                plots[p["file"]] = p
                written.append(out / p["file"])
        if task == "mmlu":
            for s, ts in MULTI_SETS.items():
                if f"{s}/one-active" in by:
                    p = _plot(by[f"{s}/one-active"], out / f"alpha-{s}-mmlu.png",
                              [f"{TASKS[t].column} expert" for t in ts])  # fmt: skip
                    if p:
                        plots[p["file"]] = p
                        written.append(out / p["file"])
    lines = [f"# The paper's Tables 1 and 2 on the real family ({part} part)", "",
             "Generated by `python -m dlf_rs.real_family.paper run` (docs/paper-tables.md has "
             "how, and what each row means). Accuracy in percent with its 95% Wilson interval; "
             "per-task tables with the paired comparisons: "
             + ", ".join(f"[{TASKS[t].column}]({t}.md)" for t in TASK_ORDER if results.get(t))
             + ".", ""]  # fmt: skip
    titles = {"single": "Table 1: one task's expert (a LoRA of the 0.5B) on the 1.5B",
              "multi": "Table 2: several experts at once, no task id"}  # fmt: skip
    for table, title in titles.items():
        cells, notes = _cells(results, table)
        if cells:
            lines += [f"## {title}", "", task_table(cells, PAPER_COLUMNS), "",
                      "Examples per cell: " + "; ".join(notes) + ".", ""]  # fmt: skip
        if table == "single":
            per_task = {
                TASKS[t].column: {r.key: r.correct for r in rs if r.n == max(x.n for x in rs)}
                for t, rs in results.items()
                if rs
            }
            labels = {k: next(r.row.label for rs in results.values() for r in rs if r.key == k)
                      for k in GAP_METHODS
                      if any(r.key == k for rs in results.values() for r in rs)}  # fmt: skip
            gaps = gap_table_tasks(per_task, labels)
            if gaps:
                lines += ["### The gap closed, tasks weighted equally", "", GAP_NOTE, "", gaps,
                          "", ROWS_NOTE, ""]  # fmt: skip
    if plots:
        lines += ["## Alpha per step", ""] + [f"![{v['row']} on {v['id']}]({k})"
                                              for k, v in plots.items()] + [""]  # fmt: skip
    (out / "tables.md").write_text("\n".join(lines), encoding="utf-8")
    written.append(out / "tables.md")
    rows_meta = {t: {r.key: {"label": r.row.label, "fingerprint": r.fingerprint, "n": r.n,
                             "correct": int(sum(r.correct)),
                             "accuracy": round(sum(r.correct) / r.n, 4) if r.n else None,
                             "seconds": round(float(sum(r.seconds)), 1),
                             "tokens": int(sum(r.tokens)),
                             "length_cut": sum(f == "length" for f in r.finish),
                             "options": dict(r.row.options), "base": r.row.base,
                             "merged": r.row.merged, "experts": list(r.row.experts),
                             **({"note": r.note} if r.note else {})}
                     for r in results[t]} for t in results}  # fmt: skip
    manifest = {**dict(meta), "adapters": dict(adapters), "rows": rows_meta,
                "alpha_plots": plots, "written": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
    write_json(out / "manifest.json", manifest)
    written.append(out / "manifest.json")
    return written
