"""DLF in vLLM on real weights: the Qwen2.5-Coder family (`make real-family`) with the trained
LoRA expert (`make real-family-train`), greedy tokens against FusedGenerator's, and speed.

    .venv-vllm/bin/python benches/vllm_real_family.py [--prompts 20] [--max-tokens 24]

Phase 1 (a child process, so its memory is returned): vLLM serves the fused directory (large
1.5B, small 0.5B, the 0.5B + LoRA expert merged) and decodes every prompt; phase 2: FusedGenerator
on the same checkpoints and prompts. Rows whose tokens differ are shown with the reference's
top-two fused-logit margin at the first difference (a near-tie at the dtype's precision) and the
J of both runs' weights. Times: wall time of each engine's generate over all prompts (vLLM
continuously batched, FusedGenerator in one batch), engine start excluded.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPTS = [
    "def fibonacci(n):",
    "# Return the sum of the squares of a list\ndef sum_squares(xs):",
    "import json\n\ndef load(path):",
    "class Stack:\n    def __init__(self):",
    "def is_palindrome(s: str) -> bool:",
    "# Parse 'a=1,b=2' into a dict\ndef parse_pairs(text):",
    "def merge_sorted(a, b):",
    "def count_words(text):\n    counts = {}",
    "SELECT name FROM users WHERE",
    "def flatten(nested):",
    "# binary search\ndef search(xs, target):",
    "def read_csv(path):\n    import csv",
    "def gcd(a, b):",
    "for i in range(10):",
    "def transpose(matrix):",
    "def unique(xs):\n    seen = set()",
    "async def fetch(session, url):",
    "def to_snake_case(name):",
    "def chunks(xs, n):",
    "# Write a function that reverses a linked list\nclass Node:",
    "def max_subarray(xs):",
    "def rotate(xs, k):",
]


def phase_vllm(args: argparse.Namespace) -> None:
    import dlf_rs.engines.vllm as dv
    from vllm import SamplingParams

    t0 = time.perf_counter()
    llm = dv.llm(args.fused, dtype=args.dtype, enforce_eager=True, max_model_len=1024,
                 max_num_seqs=args.prompts, seed=0)  # fmt: skip
    start = time.perf_counter() - t0
    ps = PROMPTS[: args.prompts]
    sp = SamplingParams(temperature=0, max_tokens=args.max_tokens,
                        extra_args={"dlf_alpha_log": "real0"})  # fmt: skip
    llm.generate(ps[:1], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)  # warm
    t = time.perf_counter()
    outs = llm.generate(ps, [sp] + [SamplingParams(temperature=0, max_tokens=args.max_tokens)] * (len(ps) - 1),
                        use_tqdm=False)  # fmt: skip
    wall = time.perf_counter() - t
    record = {"start": start, "wall": wall,
              "prompt_ids": [list(o.prompt_token_ids) for o in outs],
              "tokens": [list(o.outputs[0].token_ids) for o in outs]}  # fmt: skip
    Path(args.out).write_text(json.dumps(record))


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--cache", default=None, help="the real family's cache (default as make real-family)"
    )
    p.add_argument("--prompts", type=int, default=20)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    p.add_argument("--fused", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if args.phase == "vllm":
        phase_vllm(args)
        return
    import dlf_rs
    import dlf_rs.engines.vllm as dv
    import numpy as np
    import torch
    from dlf_rs.real_family import cache_root

    root = cache_root(args.cache)
    large, small = root / "large-bf16", root / "small-bf16"
    adapter = root / "adapters" / "vexil-small"
    for need in (large, small, adapter):
        if not need.exists():
            sys.exit(f"missing {need}: run `make real-family` and `make real-family-train` first")
    tmp = Path(tempfile.mkdtemp(prefix="vllm_real_"))
    t = time.perf_counter()
    fused = dv.build_fused_dir(tmp / "fused", large, small, [adapter])
    print(f"fused directory (LoRA merged) in {time.perf_counter() - t:.1f} s: {fused}")
    out = tmp / "vllm.json"
    env = dict(os.environ, VLLM_LOGGING_LEVEL="WARNING")
    subprocess.run([sys.executable, __file__, "--phase", "vllm", "--fused", str(fused), "--out",
                    str(out), "--prompts", str(args.prompts), "--max-tokens", str(args.max_tokens),
                    "--dtype", args.dtype], check=True, env=env)  # fmt: skip
    got = json.loads(out.read_text())
    print(f"vLLM: engine start {got['start']:.1f} s, {args.prompts} prompts x {args.max_tokens} "
          f"tokens in {got['wall']:.1f} s ({sum(map(len, got['tokens'])) / got['wall']:.2f} tok/s)")  # fmt: skip
    dtype = getattr(torch, args.dtype)
    # the expert vLLM ran: the adapter merged into the fused directory (equal to peft's merge:
    # tests/test_vllm_spec.py); the vLLM venv has no peft
    gen = dlf_rs.FusedGenerator.from_pretrained(large, small, [fused / "experts" / "expert0"],
                                                torch_dtype=dtype)  # fmt: skip
    ps = PROMPTS[: args.prompts]
    t = time.perf_counter()
    res = gen.generate(input_ids=got["prompt_ids"], max_new_tokens=args.max_tokens)
    wall = time.perf_counter() - t
    print(f"FusedGenerator: {wall:.1f} s ({sum(map(len, res.token_ids)) / wall:.2f} tok/s)")
    alphas = dv.read_alphas(fused, "real0")
    same = 0
    for b, (g, w) in enumerate(zip(got["tokens"], res.token_ids, strict=True)):
        if g == w:
            same += 1
            continue
        j = next(i for i, (x, y) in enumerate(zip(g + [-1], w + [-2])) if x != y)
        ids = torch.tensor([got["prompt_ids"][b] + w[:j]])
        with torch.no_grad():
            z = [
                m(input_ids=ids).logits[:, -1].float().numpy()
                for m in (gen.large, gen.small, *gen.experts)
            ]
        r = dlf_rs.fuse_step(z[0], z[1], z[2:])
        f = dlf_rs.fuse_logits(z[0], z[1], z[2:], r.alphas)[0]
        top = np.sort(f)[-2:]
        print(f"  row {b} ({ps[b][:30]!r}): first difference at token {j}: vLLM {g[j] if j < len(g) else 'end'}, "
              f"FusedGenerator {w[j] if j < len(w) else 'end'}; reference fused top-two margin {top[1] - top[0]:.4f}")  # fmt: skip
    print(f"greedy tokens equal on {same} of {len(ps)} prompts ({args.dtype})")
    if got["tokens"][0] == res.token_ids[0]:
        a = np.asarray(alphas, dtype=np.float32)
        print(
            f"row 0 alphas: vLLM log vs FusedGenerator max |diff| {np.abs(a - res.alphas[0]).max():.2e}"
        )


if __name__ == "__main__":
    main()
