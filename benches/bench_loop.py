"""The decode loop's own cost against a proxy-tuning-style loop, and the thread default.

On the shipped family (float32, CPU, greedy), per generated token:
- "peer loop": the structure of proxy-tuning's published ``DExpertsLlama.generate`` (three cached
  forwards, ``base + alpha * (expert - antiexpert)`` in torch, argmax, attention masks grown by
  ``torch.cat``), re-written here for transformers 5 (its ``prepare_inputs_for_generation`` and
  ``top_k_top_p_filtering`` imports no longer exist). Not the peer's file: its loop, re-typed.
- dlf_rs ``FusedGenerator.generate`` with static alpha 1 (the same computation, through the core)
  and with DLF (the solver added).
Tokens are compared row by row; times are medians over prompts; ratios are taken in this run.
Then the thread sweep behind the ``--threads`` default of ``dlf-rs generate`` and ``dlf-rs bench``:
torch threads 1 and 2 (the core's rayon pool follows ``RAYON_NUM_THREADS``) at B = 1 and B = 8,
each setting in a fresh process with ``OMP_WAIT_POLICY=PASSIVE`` (what the CLI sets; ``--wait-policy``
changes it), on the machine as it is and, with ``--busy N``, while N busy-loop processes take the
cores (the case where spinning OpenMP workers collapse). ``--repeats R`` runs the grid R times in
alternating order and prints the median of each cell, so drift in the machine's load spreads
over every cell.

    python benches/bench_loop.py [--prompts 40] [--task qa] [--max-new-tokens 24]
    python benches/bench_loop.py --no-loop --busy 0 2 --wait-policy PASSIVE ACTIVE --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import torch


def peer_loop(base: Any, expert: Any, anti: Any, tok: Any, prompt: str, n: int) -> list[int]:
    """Greedy proxy-tuning (alpha 1), batch 1, DExpertsLlama's loop structure."""
    from transformers import DynamicCache

    enc = tok(prompt, return_tensors="pt")
    input_ids, mask = enc["input_ids"], enc["attention_mask"]
    caches = [DynamicCache(), DynamicCache(), DynamicCache()]
    models = (base, expert, anti)
    out: list[int] = []
    step_ids = input_ids
    for _ in range(n):
        logits = []
        for i, m in enumerate(models):
            o = m(input_ids=step_ids, attention_mask=mask, past_key_values=caches[i],
                  use_cache=True)  # fmt: skip
            caches[i] = o.past_key_values
            logits.append(o.logits[..., -1, :])
        fused = logits[0] + 1.0 * (logits[1][:, : logits[0].shape[-1]] - logits[2])
        nxt = torch.argmax(fused, dim=-1)
        out.append(int(nxt[0]))
        step_ids = nxt[:, None]
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
        if int(nxt[0]) == tok.eos_token_id:
            break
    return out


def timed(fn: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - t0


def loop_cost(args: argparse.Namespace) -> None:
    from dlf_rs.engines.hf.generate import FusedGenerator
    from dlf_rs.family import CHECKPOINTS, example_prompts

    torch.set_num_threads(1)
    gen = FusedGenerator.from_pretrained(
        CHECKPOINTS / "large_base", CHECKPOINTS / "small_base",
        [CHECKPOINTS / f"small_expert_{args.task}"],
    )  # fmt: skip
    prompts = example_prompts(args.task, args.prompts)
    n = args.max_new_tokens
    # Warm-up: allocator and kernels.
    peer_loop(gen.large, gen.experts[0], gen.small, gen.tokenizer, prompts[0], n)
    gen.generate(prompts[0], n, alpha=1.0)
    same, per_tok = 0, {"peer loop": [], "dlf_rs static 1.0": [], "dlf_rs dlf": []}
    with torch.inference_mode():
        for p in prompts:
            ref, t_ref = timed(lambda p=p: peer_loop(gen.large, gen.experts[0], gen.small,
                                                     gen.tokenizer, p, n))  # fmt: skip
            res, t_st = timed(lambda p=p: gen.generate(p, n, alpha=1.0))
            res_d, t_d = timed(lambda p=p: gen.generate(p, n, method="dlf"))
            same += res.token_ids[0] == ref
            per_tok["peer loop"].append(t_ref / len(ref))
            per_tok["dlf_rs static 1.0"].append(t_st / len(res.token_ids[0]))
            per_tok["dlf_rs dlf"].append(t_d / len(res_d.token_ids[0]))
    print(f"shipped family, task {args.task}, B=1, 1 torch thread, float32, greedy, "
          f"{len(prompts)} prompts, <= {n} new tokens")  # fmt: skip
    print(f"identical tokens (static 1.0 vs peer loop): {same} of {len(prompts)} prompts")
    # The ratio per prompt (the loops run back to back on it), then the median: drift in the
    # machine's load cancels.
    peer = per_tok["peer loop"]
    print(f"{'loop':22s} {'ms/token':>9s} {'vs peer (median of per-prompt ratios)':>38s}")
    for name, xs in per_tok.items():
        ratio = statistics.median(x / y for x, y in zip(xs, peer))
        print(f"{name:22s} {1e3 * statistics.median(xs):9.3f} {ratio:37.3f}x")


def _thread_cell(args: argparse.Namespace, policy: str, batch: int, threads: int) -> float:
    """Seconds per token of DLF with one expert, median of 3 calls, in a fresh process (rayon's
    pool size and OpenMP's wait policy are fixed when the process first uses them)."""
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads), OMP_WAIT_POLICY=policy)
    code = (
        "import sys, time, statistics, torch\n"
        "from dlf_rs.family import CHECKPOINTS, example_prompts\n"
        "from dlf_rs.engines.hf.generate import FusedGenerator\n"
        f"torch.set_num_threads({threads})\n"
        "g = FusedGenerator.from_pretrained(CHECKPOINTS/'large_base', "
        f"CHECKPOINTS/'small_base', [CHECKPOINTS/'small_expert_{args.task}'])\n"
        f"p = example_prompts('{args.task}', {batch})\n"
        "g.eos_token_ids = set()\n"
        f"g.generate(p, {args.max_new_tokens})\n"
        "ts = []\n"
        "for _ in range(3):\n"
        f"    t0 = time.perf_counter(); g.generate(p, {args.max_new_tokens})\n"
        f"    ts.append((time.perf_counter() - t0) / {args.max_new_tokens})\n"
        "print(statistics.median(ts))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True, timeout=900)  # fmt: skip
    return float(out.stdout.strip().splitlines()[-1])


def _start_hogs(n: int) -> list[subprocess.Popen[bytes]]:
    """n busy-loop processes (each takes one core), as other users' work would."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.kill()
        proc.wait()


def thread_sweep(args: argparse.Namespace) -> None:
    threads_list, batches = (1, 2), (1, 8)
    cells = [(busy, pol, b, t) for busy in args.busy for pol in args.wait_policy
             for b in batches for t in threads_list]  # fmt: skip
    times: dict[tuple[int, str, int, int], list[float]] = {c: [] for c in cells}
    for rep in range(args.repeats):
        for busy in args.busy:
            hogs = _start_hogs(busy)
            try:
                grid = [c for c in cells if c[0] == busy]
                for cell in grid if rep % 2 == 0 else grid[::-1]:
                    times[cell].append(_thread_cell(args, *cell[1:]))
            finally:
                _stop(hogs)
    print(f"\nthreads (torch = rayon), DLF, one expert, ms per token, {os.cpu_count()} CPUs; "
          f"each cell: median over {args.repeats} run(s) (alternating order) of the median of "
          "3 calls")  # fmt: skip
    print(f"{'busy procs':>10s} {'OMP_WAIT_POLICY':>15s} {'B':>3s} "
          + " ".join(f"{f'threads={t}':>11s}" for t in threads_list))  # fmt: skip
    for busy in args.busy:
        for pol in args.wait_policy:
            for b in batches:
                row = [statistics.median(times[(busy, pol, b, t)]) for t in threads_list]
                print(f"{busy:10d} {pol:>15s} {b:3d} "
                      + " ".join(f"{1e3 * c:11.3f}" for c in row))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=40)
    ap.add_argument("--task", default="qa", choices=("math", "qa", "summary"))
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--no-threads", action="store_true", help="skip the thread sweep")
    ap.add_argument("--no-loop", action="store_true", help="only the thread sweep")
    ap.add_argument("--busy", type=int, nargs="+", default=[0], metavar="N",
                    help="thread sweep with N busy-loop processes running (e.g. 0 2)")
    ap.add_argument("--repeats", type=int, default=1, help="thread sweep repetitions")
    ap.add_argument("--wait-policy", nargs="+", choices=("PASSIVE", "ACTIVE"),
                    default=[os.environ.get("OMP_WAIT_POLICY", "PASSIVE")],
                    help="OMP_WAIT_POLICY of the sweep (several: each is measured)")
    args = ap.parse_args()
    if not args.no_loop:
        loop_cost(args)
    if not args.no_threads:
        thread_sweep(args)


if __name__ == "__main__":
    main()
