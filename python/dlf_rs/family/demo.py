"""`dlf-rs demo`: the paper's experiments, in miniature, on the shipped default family.

Where it sits: the last step of the default-family flow. It loads the checkpoints that
`dlf_rs.family.train` wrote to `python/dlf_rs/family/checkpoints/`, builds the held-out evaluation sets
of `dlf_rs.world`, decodes them greedily with every method (the large base, the small experts,
static alpha 0.5/1.0/1.5, DLF with one expert and with all experts, the large fine-tuned
references, few-shot prompting with and without DLF), scores them with each task's metric, and
writes results.md, results.json and the alpha-over-steps plots (the paper's Figures 2-3).

Fused decoding goes through `dlf_rs.FusedGenerator` (the Rust core); single-model rows use plain
Hugging Face greedy `generate`. Few-shot decision: the shots are in the prompt of *every* model
(large, small base and experts); the continuation is shared (docs/method.md in the repository,
"The method and the decisions"; the family and its tables: docs/demo.md and the README).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dlf_rs.family.world import (
    SEEN_TASKS,
    TASKS,
    UNSEEN_TASKS,
    Example,
    World,
    eval_set,
    few_shot_prompt,
)
from dlf_rs.threads import positive_int, set_threads, threads_argument

DEFAULT_FAMILY = Path(__file__).resolve().parent / "checkpoints"
STATIC_ALPHAS = (0.5, 1.0, 1.5)
# The multi-expert rules besides the paper's one-active (rows of Table 2).
MULTI_RULES = ("joint", "own-terms", "max-shift")
ALL_TASKS = SEEN_TASKS + UNSEEN_TASKS
TASK_ARITHMETIC = "small_task_arithmetic"  # built in memory from the experts (dlf_rs.merge)


@dataclass
class Run:
    """One cell group of the tables: a method on one task's evaluation set."""

    name: str  # row label in the tables
    task: str
    method: str  # "single", "static", "dlf"
    model: str | None = None  # single-model rows: checkpoint name
    experts: list[str] = field(default_factory=list)
    alpha: float | None = None
    multi_expert: str = "one-active"  # DLF rows with several experts: the rule choosing alpha
    shots: int = 0
    score: float = 0.0
    seconds: float = 0.0
    predictions: list[str] = field(default_factory=list)
    references: list[str] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    # Multi-expert DLF rows on a seen task: fraction of decoding steps (over every example) on
    # which the task's own expert carries the largest weight (strictly positive).
    right_expert: float | None = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `dlf-rs demo` (called by the CLI)."""
    parser.add_argument("--quick", action="store_true",
                        help="8 examples per task (about 11 s on 2 CPU cores, imports included)")
    parser.add_argument("--out", type=Path, default=Path("demo_out"),
                        help="directory for results.md, results.json and the PNG plots")
    parser.add_argument("--family", type=Path, default=DEFAULT_FAMILY,
                        help="directory of the model family (default: the shipped one)")
    parser.add_argument("-n", "--examples", type=positive_int, default=None,
                        help="examples per task (default: 200, or 8 with --quick)")
    parser.add_argument("--shots", type=positive_int, default=2, help="shots for the few-shot rows")
    parser.add_argument("--solver", default="grid", choices=("grid", "exact"),
                        help="DLF alpha solver (grid: the paper's Algorithm 1)")
    threads_argument(parser)  # the same --threads as generate and bench


# ----------------------------------------------------------------------------- models


class Family:
    """The loaded checkpoints (float32, eval mode) and the shared tokenizer."""

    def __init__(self, path: Path) -> None:
        import torch
        from transformers import AutoTokenizer, LlamaForCausalLM

        self.path = path
        self.manifest: dict[str, Any] = json.loads((path / "manifest.json").read_text())
        cfg = self.manifest["config"]
        self.world = World.build(
            cfg["world_seed"], cfg["n_entities"], cfg["name_pool"], cfg["name_pool"]
        )
        self.tokenizer = AutoTokenizer.from_pretrained(str(path / "tokenizer"))
        self.tokenizer.padding_side = "left"
        self.models: dict[str, Any] = {}
        for name in self.manifest["models"]:
            m = LlamaForCausalLM.from_pretrained(str(path / name), dtype=torch.float32)
            self.models[name] = m.eval()
        # The paper's "combine experts from task arithmetic": theta_S + (1/T) sum_t tau_t.
        from dlf_rs.merge import merged_model

        experts = [self.models[n] for n in self.manifest["models"] if "small_expert" in n]
        self.models[TASK_ARITHMETIC] = merged_model(
            self.models["small_base"], experts, 1 / len(experts)
        )
        self._generators: dict[tuple[str, ...], Any] = {}

    def generator(self, experts: Sequence[str]) -> Any:
        key = tuple(experts)
        if key not in self._generators:
            from dlf_rs.engines.hf.generate import FusedGenerator

            self._generators[key] = FusedGenerator(
                large=self.models["large_base"],
                small=self.models["small_base"],
                experts=[self.models[e] for e in experts],
                tokenizer=self.tokenizer,
                expert_names=[e.removeprefix("small_expert_") for e in experts],
            )
        return self._generators[key]


def greedy(family: Family, model: str, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Single-model greedy decoding with Hugging Face `generate` (left padding)."""
    import torch

    tok = family.tokenizer
    out: list[str] = []
    with torch.no_grad():
        for i in range(0, len(prompts), 64):
            enc = tok(prompts[i : i + 64], return_tensors="pt", padding=True)
            gen = family.models[model].generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
            )
            out += tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return out


def fused(
    family: Family, run: Run, prompts: list[str], max_new_tokens: int, solver: str
) -> tuple[list[str], list[np.ndarray]]:
    """Fused greedy decoding (static or DLF) through `FusedGenerator`; texts and alphas."""
    gen = family.generator(run.experts)
    texts: list[str] = []
    alphas: list[np.ndarray] = []
    for i in range(0, len(prompts), 64):
        kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "temperature": 0.0}
        if run.method == "static":
            res = gen.generate(prompts[i : i + 64], method="static", alpha=run.alpha, **kwargs)
        else:
            res = gen.generate(prompts[i : i + 64], method="dlf", solver=solver,
                               multi_expert=run.multi_expert, **kwargs)
        texts += list(res.texts)
        alphas += [np.asarray(a, dtype=np.float32) for a in res.alphas]
    return texts, alphas


# ----------------------------------------------------------------------------- experiments


def plan(experts: dict[str, str]) -> list[Run]:
    """Every row of the three tables, in the order they are run."""
    runs: list[Run] = []
    all_experts = [experts[t] for t in SEEN_TASKS]
    for t in ALL_TASKS:
        runs.append(Run("Small base", t, "single", model="small_base"))
        runs.append(Run("Large base", t, "single", model="large_base"))
        for s in SEEN_TASKS:
            runs.append(Run(f"Small expert ({s})", t, "single", model=experts[s]))
        runs.append(Run("Large multi-task tuned", t, "single", model="large_mtt"))
        runs.append(Run("DLF, all experts", t, "dlf", experts=all_experts))
        for rule in MULTI_RULES:
            runs.append(Run(f"DLF, all experts ({rule})", t, "dlf", experts=all_experts,
                            multi_expert=rule))
        runs.append(Run("DLF, task-arithmetic expert", t, "dlf", experts=[TASK_ARITHMETIC]))
        runs.append(Run("Large base, {k}-shot", t, "single", model="large_base", shots=-1))
    for t in SEEN_TASKS:
        runs.append(Run("Large fine-tuned (own task)", t, "single", model=f"large_ft_{t}"))
        for a in STATIC_ALPHAS:
            label = "Proxy-tuning (static alpha 1.0)" if a == 1.0 else f"Static alpha {a}"
            runs.append(Run(label, t, "static", experts=[experts[t]], alpha=a))
        runs.append(Run("DLF, own expert", t, "dlf", experts=[experts[t]]))
        runs.append(Run("DLF, own expert, {k}-shot", t, "dlf", experts=[experts[t]], shots=-1))
    for t in UNSEEN_TASKS:
        runs.append(Run("DLF, all experts, {k}-shot", t, "dlf", experts=all_experts, shots=-1))
    return runs


def execute(family: Family, runs: list[Run], n: int, shots: int, solver: str) -> dict[str, Any]:
    """Decode and score every run; returns the alpha traces kept for the figures."""
    from tqdm import tqdm

    sets = {t: eval_set(family.world, t, n) for t in ALL_TASKS}
    traces: dict[str, Any] = {}
    for run in tqdm(runs, desc="demo runs", unit="run"):
        if run.shots < 0:
            run.shots = shots
            run.name = run.name.format(k=shots)
        task = TASKS[run.task]
        exs: list[Example] = sets[run.task]
        prompts = [few_shot_prompt(family.world, e, run.shots) if run.shots else e.prompt
                   for e in exs]
        t0 = time.perf_counter()
        if run.method == "single":
            assert run.model is not None
            preds = greedy(family, run.model, prompts, task.max_new_tokens)
        else:
            preds, alphas = fused(family, run, prompts, task.max_new_tokens, solver)
        run.seconds = round(time.perf_counter() - t0, 3)
        run.prompts, run.predictions = prompts, preds
        run.references = [e.answer for e in exs]
        scores = [task.score(p, e) for p, e in zip(preds, exs)]
        run.score = float(np.mean(scores))
        if run.method == "dlf" and len(run.experts) > 1 and run.task in SEEN_TASKS:
            run.right_expert = right_expert_share(alphas, SEEN_TASKS.index(run.task))
        if run.method == "dlf" and not run.shots:
            # The figure shows an example DLF got right as a reader would say it (see
            # `readable_row`), and says which.
            row = readable_row(preds, [e.answer for e in exs], scores)
            traces[f"{run.task}:{len(run.experts)}"] = {
                "alphas": alphas[row], "row": row, "prompt": prompts[row], "output": preds[row],
                "reference": exs[row].answer, "score": scores[row],
                "experts": [e.removeprefix("small_expert_") for e in run.experts],
            }
    return traces


def right_expert_share(alphas: list[np.ndarray], right: int) -> float | None:
    """Fraction of steps (rows of every [steps, T] array) whose largest weight is strictly
    positive and belongs to expert `right` (the first on ties, as the core's `active`)."""
    steps = [a for a in alphas if a.size]
    if not steps:
        return None
    allsteps = np.concatenate(steps, axis=0)
    top = np.argmax(allsteps, axis=1)
    hit = (top == right) & (allsteps.max(axis=1) > 0)
    return float(np.mean(hit))


def readable_row(preds: list[str], refs: list[str], scores: list[float]) -> int:
    """The row to show as "right": a full-score row whose output, up to the shot separator,
    starts with the whole reference and adds the least after it (a metric can give full marks
    to "... #### 13 . 12 . #### 12 plus 9"); the best-scoring row if none is clean."""
    from dlf_rs.family.world.metrics import first_segment

    def rank(i: int) -> tuple[float, int, int]:
        pred, ref = first_segment(preds[i]), first_segment(refs[i])
        clean = pred.startswith(ref)
        return (-scores[i], 0 if clean else 1, len(pred) - len(ref) if clean else len(pred))

    return min(range(len(preds)), key=rank) if preds else 0


# ----------------------------------------------------------------------------- reporting


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x + 0.0:.1f}"  # + 0.0: no "-0.0"


def _cell(runs: list[Run], name: str, task: str) -> float | None:
    for r in runs:
        if r.name == name and r.task == task:
            return r.score
    return None


def _row(runs: list[Run], name: str, tasks: Sequence[str]) -> list[float | None]:
    return [_cell(runs, name, t) for t in tasks]


def _mean(xs: Sequence[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return float(np.mean(vals)) if vals and len(vals) == len(xs) else None


def tables(runs: list[Run], shots: int) -> dict[str, Any]:
    """The three tables as {title, columns, rows: [[label, v1, ...]]} (scores in [0, 1])."""
    seen = list(SEEN_TASKS)
    out: dict[str, Any] = {}
    # Table 1: single task. "Small expert (own)" and "Large FT" take each task's own model.
    t1_rows: list[list[Any]] = []
    own_expert = [_cell(runs, f"Small expert ({t})", t) for t in seen]
    for label, vals in (
        ("Large base", _row(runs, "Large base", seen)),
        ("Small expert (own task)", own_expert),
        *((f"Static alpha {a}" if a != 1.0 else "Proxy-tuning (static alpha 1.0)",
           _row(runs, f"Static alpha {a}" if a != 1.0 else "Proxy-tuning (static alpha 1.0)",
                seen)) for a in STATIC_ALPHAS),
        ("DLF, own expert", _row(runs, "DLF, own expert", seen)),
        ("Large fine-tuned (own task)", _row(runs, "Large fine-tuned (own task)", seen)),
    ):
        t1_rows.append([label, *vals, _mean(vals)])
    out["table1"] = {"title": "Single task (one small expert per task -> large base)",
                     "columns": [*seen, "avg"], "rows": t1_rows}
    base = t1_rows[0][-1]
    ft = t1_rows[-1][-1]
    gaps = []
    for row in t1_rows[1:-1]:
        ours = row[-1]
        plain = ours / ft if ours is not None and ft else None
        adj = (ours - base) / (ft - base) if None not in (ours, base, ft) and ft != base else None
        gaps.append([row[0], plain, adj])
    out["gap_closed"] = {"title": "Gap closed to the large fine-tuned model (averages)",
                         "columns": ["ours/FT (paper)", "(ours-base)/(FT-base)"], "rows": gaps}
    # Table 2: multi-task; Avg = (mean of seen + unseen)/2 as in the paper.
    cols = [*seen, "seen avg", *UNSEEN_TASKS, "avg"]
    t2_rows = []
    multi_rows = ("DLF, all experts", *(f"DLF, all experts ({r})" for r in MULTI_RULES))
    for label in ("Small base", "Large base", *(f"Small expert ({t})" for t in seen),
                  "Large multi-task tuned", *multi_rows, "DLF, task-arithmetic expert"):
        s = _row(runs, label, seen)
        u = _row(runs, label, UNSEEN_TASKS)
        sm, um = _mean(s), _mean(u)
        t2_rows.append([label, *s, sm, *u, _mean([sm, um])])
    out["table2"] = {"title": "Multi-task (all experts, no task id; qa_math unseen)",
                     "columns": cols, "rows": t2_rows}
    right_rows = []
    for label in multi_rows:
        vals = [next((r.right_expert for r in runs if r.name == label and r.task == t), None)
                for t in seen]
        right_rows.append([label.replace("DLF, all experts", "DLF, all experts (one-active)")
                           if label == "DLF, all experts" else label, *vals, _mean(vals)])
    out["right_expert"] = {
        "title": "Steps on which the task's own expert carries the largest weight (all experts)",
        "columns": [*seen, "avg"], "rows": right_rows}
    # Table 3: in-context learning, per task (DLF uses the own expert on seen tasks, all experts
    # on the unseen one).
    cols3 = [*ALL_TASKS, "avg"]
    t3_rows = []
    for label, names in (
        ("Large base", ["Large base"] * len(ALL_TASKS)),
        (f"Large base, {shots}-shot", [f"Large base, {shots}-shot"] * len(ALL_TASKS)),
        ("DLF", ["DLF, own expert"] * len(seen) + ["DLF, all experts"] * len(UNSEEN_TASKS)),
        (f"DLF, {shots}-shot", [f"DLF, own expert, {shots}-shot"] * len(seen)
         + [f"DLF, all experts, {shots}-shot"] * len(UNSEEN_TASKS)),
    ):
        vals = [_cell(runs, nm, t) for nm, t in zip(names, ALL_TASKS)]
        t3_rows.append([label, *vals, _mean(vals)])
    out["table3"] = {"title": f"In-context learning ({shots} shots in every model's prompt)",
                     "columns": cols3, "rows": t3_rows}
    return out


def markdown(tabs: dict[str, Any], meta: dict[str, Any]) -> str:
    header = (f"Family: `{meta['family']}`; {meta['n']} held-out examples per task; greedy; "
              f"DLF solver `{meta['solver']}`; scores in %. Wall time {meta['seconds']:.1f} s.")
    lines = ["# dlf-rs demo results", "", header, "",
             "Metrics: " + "; ".join(f"{t}: {TASKS[t].metric_name}" for t in ALL_TASKS), ""]
    for key in ("table1", "gap_closed", "table2", "right_expert", "table3"):
        tab = tabs[key]
        lines += [f"## {tab['title']}", "", "| | " + " | ".join(tab["columns"]) + " |",
                  "|---" * (len(tab["columns"]) + 1) + "|"]
        for row in tab["rows"]:
            lines.append(f"| {row[0]} | " + " | ".join(_pct(v) for v in row[1:]) + " |")
        lines.append("")
    return "\n".join(lines)


def check_arguments(args: argparse.Namespace) -> None:
    """Errors about --out and --family before anything is loaded (each names its option)."""
    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out: {str(out)!r} is a file; expected a directory (created if absent)")
    family: Path = args.family
    if not (family / "manifest.json").is_file():
        raise ValueError(f"--family: {str(family)!r} is not a model family directory "
                         "(no manifest.json; the shipped one is the default)")


def run(args: argparse.Namespace) -> int:
    """Entry point of `dlf-rs demo`; returns the process exit code."""

    check_arguments(args)
    set_threads(args.threads)
    t0 = time.perf_counter()
    n = args.examples or (8 if args.quick else 200)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    family = Family(args.family)
    experts = {t: f"small_expert_{t}" for t in SEEN_TASKS}
    runs = plan(experts)
    traces = execute(family, runs, n, args.shots, args.solver)
    tabs = tables(runs, args.shots)
    seconds = time.perf_counter() - t0
    meta = {"family": str(args.family), "n": n, "shots": args.shots, "solver": args.solver,
            "seconds": seconds, "quick": bool(args.quick)}
    figures = {
        "alpha_one_expert.png": (f"{SEEN_TASKS[0]}:1",
                                 f"DLF, {SEEN_TASKS[0]} expert on a held-out {SEEN_TASKS[0]} example"),
        "alpha_all_experts_unseen.png": (f"{UNSEEN_TASKS[0]}:{len(SEEN_TASKS)}",
                                         f"DLF, all experts on an unseen {UNSEEN_TASKS[0]} example"),
    }
    shown = {f: traces[key] for f, (key, _) in figures.items() if key in traces}
    md = markdown(tabs, meta) + "\n## Alpha over decoding steps\n\n" + "\n".join(
        f"- `{f}` (example {tr['row']}, score {tr['score']:.2f}): prompt `{tr['prompt']}` -> "
        f"`{tr['output']}` (reference `{tr['reference']}`)" for f, tr in shown.items()
    ) + "\n- `alpha_ablation.png`: fixed alpha vs DLF per seen task\n"
    # Results first: a missing plotting library must not cost the numbers.
    (out / "results.md").write_text(md)
    payload = {
        "meta": meta,
        "tables": tabs,
        "runs": [vars(r) for r in runs],
        "alpha_traces": {f: {**tr, "alphas": np.asarray(tr["alphas"]).tolist()}
                         for f, tr in shown.items()},
    }
    (out / "results.json").write_text(json.dumps(payload, indent=1) + "\n")
    print(md)
    try:
        from dlf_rs.family.plots import plot_ablation, plot_trace

        for fname, tr in shown.items():
            plot_trace(tr, out / fname, figures[fname][1])
        plot_ablation(tabs, out / "alpha_ablation.png",
                      "Fixed alpha (static) against DLF, one expert per seen task")
        wrote = "and plots "
    except ImportError as err:
        print(f"dlf-rs demo: plots skipped ({err}); pip install 'dlf_rs[plot]' for them")
        wrote = "(no plots) "
    print(f"wrote {out / 'results.md'}, {out / 'results.json'} {wrote}in {seconds:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="dlf-rs demo", description=__doc__.splitlines()[0])
    add_arguments(ap)
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
