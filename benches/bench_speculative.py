"""Speculative DLF against sequential DLF on the shipped family, and a cost model.

Per task (the task's expert as the only expert, greedy, float32 on CPU), per batch size, in one
process on the same prompts, runs interleaved (sequential, then each draft length) so that load
on the machine hits every mode alike:
- tokens per second (generated tokens / wall time of ``generate``) and the ratio to sequential;
- large-model forwards per generated token (prefill excluded; sequential: one per token after
  the first);
- acceptance (accepted drafts / drafts tested) and whether every row's tokens equal sequential;
- where the speculative time goes: drafting forwards, verification forwards, the core
  (``fuse_verify``), drawing drafts, cache cropping, the rest (prefill, copies, Python).
Then the cost model with the inputs measured in this run, and the same model for 13B/1.1B
shapes (labelled as a projection; see ``cost_model``).

    python benches/bench_speculative.py [--tasks math qa summary] [--prompts 16]
        [--batch 1 8] [--k 2 3 4 auto] [--max-new-tokens 48] [--repeats 2] [--threads 1]
    python benches/bench_speculative.py --project-only --t-large 7.9 --t-small 0.9 ...
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from typing import Any

import torch

SPLIT = ("draft", "verify", "fuse_verify", "sample", "crop")


def expected_tokens(a: float, k: int) -> float:
    """Tokens per verification round with per-token acceptance a and k drafts."""
    return float(k + 1) if a >= 1.0 else (1.0 - a ** (k + 1)) / (1.0 - a)


def cost_model(a: float, k: int, t_large: float, t_small: float, t_expert: float,
               t_core: float, verify_factor: float, n_exp: int = 1) -> tuple[float, float]:  # fmt: skip
    """(sequential cost per token, speculative cost per token) in the units of the inputs.

    Sequential: one forward of L, S and each expert, and one core step per token.
    Speculative round: k + 1 one-token forwards of the drafting expert, one (k + 1)-token forward
    of L, S and the other experts (``verify_factor`` times a one-token forward), the core at up
    to k + 1 positions; it yields ``expected_tokens(a, k)`` tokens.
    """
    seq = t_large + t_small + n_exp * t_expert + t_core
    round_cost = ((k + 1) * t_expert + verify_factor * (t_large + t_small + (n_exp - 1) * t_expert)
                  + (k + 1) * t_core)  # fmt: skip
    return seq, round_cost / expected_tokens(a, k)


def _run(gen: Any, prompts: list[str], n: int, k: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    res = gen.generate(prompts, n) if k is None else gen.generate(prompts, n, speculative=k)
    return res, time.perf_counter() - t0


def bench_task(task: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    from dlf_rs import FusedGenerator
    from dlf_rs.family import EXPERTS, checkpoint, example_prompts

    gen = FusedGenerator.from_pretrained(checkpoint("large_base"), checkpoint("small_base"),
                                         [checkpoint(EXPERTS[task])])  # fmt: skip
    prompts = example_prompts(task, args.prompts)
    modes: list[Any] = [None, *args.k]
    gen.generate(prompts[:2], 8)  # warm-up
    gen.generate(prompts[:2], 8, speculative=2)
    rows = []
    for batch in args.batch:
        chunks = [prompts[i : i + batch] for i in range(0, len(prompts), batch)]
        acc: dict[Any, dict[str, float]] = {m: defaultdict(float) for m in modes}
        same: dict[Any, bool] = dict.fromkeys(modes, True)
        for _ in range(args.repeats):
            for chunk in chunks:
                ref = None
                for m in modes:
                    res, dt = _run(gen, chunk, args.max_new_tokens, m)
                    a = acc[m]
                    a["time"] += dt
                    a["tokens"] += sum(len(t) for t in res.token_ids)
                    if m is None:
                        ref = res.token_ids
                        a["large_forwards"] += res.timings["steps"] - 1
                        a["forward:large"] += res.timings["forward:large"]
                        a["forward:small"] += res.timings["forward:small"]
                        a["forward:expert"] += res.timings["forward:expert:0"]
                        a["core"] += res.timings["fuse_step"]
                        a["steps"] += res.timings["steps"]
                    else:
                        same[m] &= res.token_ids == ref
                        for key in ("large_forwards", "accepted", "drafted", *SPLIT,
                                    "forward:large", "forward:small", "forward:expert:0"):
                            a[key] += res.timings.get(key, 0.0)  # fmt: skip
                        a["tested"] += res.timings["accepted"] / max(res.timings["acceptance"],
                                                                     1e-9)  # fmt: skip
        base = acc[None]["tokens"] / acc[None]["time"]
        for m in modes:
            a = acc[m]
            tps = a["tokens"] / a["time"]
            row = {"task": task, "batch": batch, "mode": "sequential" if m is None else f"k={m}",
                   "tok_s": tps, "speedup": tps / base,
                   "large_per_token": a["large_forwards"] / a["tokens"],
                   "acceptance": a["accepted"] / a["tested"] if a.get("tested") else float("nan"),
                   "identical": same[m], "acc": dict(a)}  # fmt: skip
            rows.append(row)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    head = (f"{'task':8} {'B':>2} {'mode':11} {'tok/s':>7} {'x seq':>6} {'L fwd/tok':>9} "
            f"{'accept':>6} {'same':>5}  time split % (draft verify core sample crop rest)")  # fmt: skip
    print(head)
    print("-" * len(head))
    for r in rows:
        a = r["acc"]
        if r["mode"] == "sequential":
            split = ""
        else:
            parts = [100 * a.get(k, 0.0) / a["time"] for k in SPLIT]
            split = " ".join(f"{p:4.0f}" for p in [*parts, 100 - sum(parts)])
        print(f"{r['task']:8} {r['batch']:>2} {r['mode']:11} {r['tok_s']:7.0f} "
              f"{r['speedup']:6.2f} {r['large_per_token']:9.2f} {r['acceptance']:6.2f} "
              f"{'yes' if r['identical'] else 'NO':>5}  {split}")  # fmt: skip


def print_cost_model(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print("\nCost model (per generated token; see cost_model in this file)")
    seq_rows = {(r["task"], r["batch"]): r for r in rows if r["mode"] == "sequential"}
    print("Measured inputs in this run, B = 1 (ms per one-token forward; verify factor = a "
          "(k+1)-token forward over a one-token one):")
    for (task, batch), r in seq_rows.items():
        if batch != 1:
            continue
        a = r["acc"]
        steps = a["steps"]
        t_l, t_s = a["forward:large"] / steps * 1e3, a["forward:small"] / steps * 1e3
        t_e, t_c = a["forward:expert"] / steps * 1e3, a["core"] / steps * 1e3
        spec = [x for x in rows if x["task"] == task and x["batch"] == 1 and x["mode"] != "sequential"]
        for x in spec:
            k = x["mode"][2:]
            if not k.isdigit():
                continue
            b = x["acc"]
            rounds = max(b["large_forwards"], 1.0)
            factor = (b["forward:large"] / rounds * 1e3) / t_l
            seq, sp = cost_model(x["acceptance"], int(k), t_l, t_s, t_e, t_c, factor)
            print(f"  {task:8} k={k}: t_L={t_l:.2f} t_S={t_s:.2f} t_E={t_e:.2f} core={t_c:.2f} "
                  f"verify factor={factor:.2f} a={x['acceptance']:.2f} -> model x{seq / sp:.2f}, "
                  f"measured x{x['speedup']:.2f}")  # fmt: skip
    # Fixed-k rows only: "auto" tests confident drafts only, so its acceptance is not the
    # per-token acceptance of the model.
    accepts = sorted({round(r["acceptance"], 2) for r in rows if r["mode"][2:].isdigit()
                      and r["batch"] == 1})  # fmt: skip
    project(accepts or [0.7, 0.8], args)


def core_ms(vocab: int = 32000, reps: int = 50) -> float:
    """Measured here: ms of one fuse_step row (grid solver, full vocabulary, T = 1) at a
    Llama-2 vocabulary, on LM-like random logits."""
    import numpy as np
    from dlf_rs import fuse_step

    rng = np.random.default_rng(0)
    ranks = rng.permuted(np.tile(np.arange(1, vocab + 1), (3, 1)), axis=1)
    z = (-1.1 * np.log(ranks) + 0.5 * rng.random((3, vocab))).astype(np.float32)
    zl, zs, ze = z[0:1], z[1:2], z[2:3] + 0.3 * z[1:2]
    fuse_step(zl, zs, [ze])
    t0 = time.perf_counter()
    for _ in range(reps):
        fuse_step(zl, zs, [ze])
    return (time.perf_counter() - t0) / reps * 1e3


def project(accepts: list[float], args: argparse.Namespace) -> None:
    """The same model with 13B/1.1B inputs: a PROJECTION, not a measurement."""
    t_l, t_s, factor = args.t_large, args.t_small, args.verify_factor
    t_c = args.t_core if args.t_core is not None else core_ms()
    print(f"\nPROJECTION for 13B large / 1.1B small+expert ({args.project_note}): "
          f"t_L={t_l} ms, t_S=t_E={t_s} ms, verify factor {factor}; core {t_c:.2f} ms per "
          f"position (fuse_step at V = 32000, measured on this machine)")
    print("  acceptance a (measured above per task) -> projected speedup over sequential DLF "
          "for k = 1..8, and the k that maximises it")
    for a in accepts:
        ratios = []
        for k in range(1, 9):
            seq, sp = cost_model(a, k, t_l, t_s, t_s, t_c, factor)
            ratios.append(seq / sp)
        best = max(range(8), key=lambda i: ratios[i])
        cells = " ".join(f"{r:4.2f}" for r in ratios)
        seq, sp = cost_model(a, best + 1, t_l, t_s, t_s, t_c, factor)
        print(f"  a={a:.2f}: {cells}   best k={best + 1} (x{ratios[best]:.2f}); per token "
              f"sequential DLF {seq / t_l:.2f}, speculative {sp / t_l:.2f} large-forward times "
              f"(L alone: 1.00)")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=["math", "qa", "summary"])
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--k", nargs="+", default=["2", "3", "4", "auto"])
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--project-only", action="store_true", help="print only the projection")
    p.add_argument("--accept", type=float, nargs="+", default=None,
                   help="acceptances for --project-only")  # fmt: skip
    # Defaults: H100 SXM, fp16, batch 1: weights read once per forward at ~3.35 TB/s (26 GB for
    # 13B, 2.2 GB for 1.1B) plus launch overheads; a 5-9 token forward stays memory-bound.
    p.add_argument("--t-large", type=float, default=8.5, help="ms per one-token 13B forward")
    p.add_argument("--t-small", type=float, default=1.2, help="ms per one-token 1.1B forward")
    p.add_argument("--verify-factor", type=float, default=1.1)
    p.add_argument("--t-core", type=float, default=None,
                   help="ms of fuse_step per position (default: measured here at V = 32000)")
    p.add_argument("--project-note", default="bandwidth estimate, H100 fp16, B = 1")
    args = p.parse_args(argv)
    args.k = [int(k) if k.isdigit() else k for k in args.k]
    if args.project_only:
        project(args.accept or [0.7, 0.8, 0.85], args)
        return 0
    torch.set_num_threads(args.threads)
    rows = []
    for task in args.tasks:
        rows += bench_task(task, args)
    print(f"Speculative vs sequential DLF, shipped family, greedy, one expert (the task's), "
          f"{args.prompts} prompts per task, max_new_tokens={args.max_new_tokens}, "
          f"{args.repeats} repeats, torch threads={args.threads}")
    print_table(rows)
    print_cost_model(rows, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
