"""The long fuzz run of the public API (issue #14): a seeded random fuzzer over fuse_step,
fuse_logits and sample, each case checked against the f64 numpy oracle (tests/fuzz_oracle.py)
in a pool of worker processes with a time and memory watchdog, so that a hang or a crash is
counted, not fatal.

    python benches/fuzz.py                       # 20,000 cases, seed 0
    python benches/fuzz.py --cases 500 --seed 3  # a quick one while developing
    python benches/fuzz.py --seed 0 --case 1234  # replay one case, verbose
    python benches/fuzz.py --replay '{"fn": ...}' # replay a case printed as JSON
    python benches/fuzz.py --strict              # exit 1 if any bad category is non-zero

Prints a summary table (cases, correct, clean errors, panics, wrong, hangs, crashes, errors
without the argument's name, wrong error class, harness faults) and one reproducer line per case
that is neither correct nor a clean error. It is a report: the exit status is 0 unless --strict.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fuzz_cases import RandomDrawer, case_rng, describe, gen_case
from fuzz_pool import Pool

GOOD = ("correct", "clean_error")
BAD = ("panic", "wrong", "hang", "crash", "unnamed", "wrong_class", "harness")
LABELS = {
    "correct": "correct (equals the oracle)",
    "clean_error": "clean errors (named, right class)",
    "panic": "panics (PanicException / DlfInternalError)",
    "wrong": "wrong (result or refusal)",
    "hang": "hangs (past the time limit)",
    "crash": "crashes (process died / memory limit)",
    "unnamed": "errors without the argument's name",
    "wrong_class": "errors of the wrong class",
    "harness": "harness faults (a bug in the oracle)",
}


def cause(verdict: dict[str, str]) -> str:
    """A failure's kind: its category and detail with the numbers and shapes taken out."""
    detail = verdict["detail"].split("; refused:")[0].split("; rules:")[0]
    if detail.startswith("accepted"):  # which argument should have been refused
        names = re.findall(r"\('([\w\[\]]+)', \(", verdict["detail"])
        detail += f" ({', '.join(sorted(set(names)))})"
    detail = re.sub(r"np\.float\d+\(([^)]*)\)", r"\1", detail)
    detail = re.sub(r"-?\d[\d.e+-]*", "#", detail)
    detail = re.sub(r"\[[#, ]*\]", "[..]", detail)
    return f"{verdict['cat']}: {detail[:160]}"


def table(counts: collections.Counter[str], n: int, seconds: float) -> str:
    lines = [f"{'cases':<46}{n:>8}"]
    for cat in GOOD + BAD:
        lines.append(f"{LABELS[cat]:<46}{counts.get(cat, 0):>8}")
    lines.append(f"{'wall time (s)':<46}{seconds:>8.0f}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=20_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--case", type=int, help="replay one case of the seeded run")
    ap.add_argument("--replay", help="replay a case given as JSON")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds per case")
    ap.add_argument("--mem-mb", type=float, default=2048.0, help="worker RSS limit")
    ap.add_argument("--strict", action="store_true", help="exit 1 on any bad category")
    ap.add_argument("--show", type=int, default=200, help="reproducers printed per category")
    args = ap.parse_args()

    if args.case is not None or args.replay:
        case = (
            json.loads(args.replay)
            if args.replay
            else gen_case(RandomDrawer(case_rng(args.seed, args.case)))
        )
        print(describe(case))
        from fuzz_oracle import run_case

        verdict = run_case(case)
        print(json.dumps(verdict, indent=1))
        return 1 if args.strict and verdict["cat"] in BAD else 0

    t0 = time.monotonic()
    cases = [gen_case(RandomDrawer(case_rng(args.seed, i))) for i in range(args.cases)]
    counts: collections.Counter[str] = collections.Counter()
    bad: dict[str, list[str]] = collections.defaultdict(list)
    causes: collections.Counter[str] = collections.Counter()
    first: dict[str, int] = {}
    pool = Pool(
        args.workers,
        timeout_s=args.timeout,
        mem_mb=args.mem_mb,
        env={"RAYON_NUM_THREADS": os.environ.get("RAYON_NUM_THREADS", "2")},
    )
    done = 0
    try:
        for i, verdict in pool.run(cases):
            done += 1
            counts[verdict["cat"]] += 1
            if verdict["cat"] in BAD:
                causes[cause(verdict)] += 1
                first.setdefault(cause(verdict), i)
                bad[verdict["cat"]].append(
                    f"  --seed {args.seed} --case {i}: {verdict['detail'][:400]}\n"
                    f"      {describe(cases[i])[:600]}"
                )
            if done % 1000 == 0:
                print(f"[{done}/{args.cases}] {dict(counts)}", file=sys.stderr, flush=True)
    finally:
        pool.close()
    print(
        f"dlf_rs fuzz run: seed {args.seed}, {args.workers} workers, "
        f"{args.timeout:.0f} s / {args.mem_mb:.0f} MB per case"
    )
    print(table(counts, done, time.monotonic() - t0))
    if causes:
        print("\nfailures by cause (count, first case):")
        for c, k in causes.most_common():
            print(f"  {k:>6}  --case {first[c]:<6} {c}")
    for cat in BAD:
        if bad[cat] and args.show:
            print(f"\n{LABELS[cat]}: {len(bad[cat])} (replay with python benches/fuzz.py ...)")
            print("\n".join(bad[cat][: args.show]))
    return 1 if args.strict and any(counts.get(c, 0) for c in BAD) else 0


if __name__ == "__main__":
    sys.exit(main())
