"""DLF in vLLM against its members alone, in vLLM, in one run (run it in the vLLM venv).

    .venv-vllm/bin/python benches/bench_vllm.py --tiny                  # the tests' family
    .venv-vllm/bin/python benches/bench_vllm.py --large L --small S --expert E [--dtype bfloat16]

For each batch size B: B prompts decode `--max-tokens` tokens (greedy, ignore_eos) under
(1) the large model alone, (2) the small model alone, (3) the fused model with method "large"
(every member runs, no fusion), (4) the fused model with DLF (the default). Decode throughput is
generated tokens / wall time of `generate` (prefill included, engine start excluded), best of
`--repeats`. The reference "members alone" time is t(large) + (1 + T) t(small): what running
the models one after the other would cost; fused / members-alone is the overhead of DLF in
vLLM. Ratios are taken within one run; on a shared machine absolute numbers move.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _engine(model: str, args: argparse.Namespace, fused: bool) -> Any:
    import dlf_rs.engines.vllm as dv
    from vllm import LLM

    kw = {"dtype": args.dtype, "enforce_eager": True, "max_model_len": args.max_model_len,
          "max_num_seqs": max(args.batch), "seed": 0}  # fmt: skip
    return dv.llm(model, **kw) if fused else LLM(model=model, **kw)


def _time(llm: Any, batch: int, args: argparse.Namespace, xargs: dict | None) -> float:
    from vllm import SamplingParams

    words = [
        "def",
        "parse",
        "(",
        "text",
        ")",
        ":",
        "return",
        "[",
        "int",
        "(",
        "x",
        ")",
        "for",
        "x",
        "in",
        "text",
        ".",
        "split",
        "(",
        ")",
        "]",
    ]
    prompts = [" ".join(words[: 4 + (i % 8)]) for i in range(batch)]
    sp = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True,
                        extra_args=xargs)  # fmt: skip
    llm.generate(prompts[:1], sp, use_tqdm=False)  # warm
    best = float("inf")
    for _ in range(args.repeats):
        t = time.perf_counter()
        llm.generate(prompts, sp, use_tqdm=False)
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--tiny", action="store_true", help="the tests' family (tests/vllm_serving/family.py)"
    )
    p.add_argument("--large")
    p.add_argument("--small")
    p.add_argument("--expert", action="append", default=[])
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    tmp = Path(tempfile.mkdtemp(prefix="bench_vllm_"))
    if args.tiny:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests/vllm_serving"))
        from family import build_family

        fam = build_family(tmp / "family", experts=1)
        args.large, args.small, args.expert = (
            str(fam["large"]),
            str(fam["small"]),
            [str(fam["expert0"])],
        )
    if not (args.large and args.small and args.expert):
        p.error("--large, --small and --expert (or --tiny) are required")
    import dlf_rs.engines.vllm as dv

    fused = dv.build_fused_dir(tmp / "fused", args.large, args.small, args.expert)
    t_n = len(args.expert)
    times: dict[tuple[str, int], float] = {}
    for name, model, is_fused, xargs in (
        ("large alone", args.large, False, None),
        ("small alone", args.small, False, None),
        ("fused, method large", str(fused), True, {"dlf_method": "large"}),
        ("fused, DLF", str(fused), True, None),
    ):
        t0 = time.perf_counter()
        llm = _engine(model if not is_fused else str(fused), args, is_fused)
        start = time.perf_counter() - t0
        for b in args.batch:
            times[(name, b)] = _time(llm, b, args, xargs)
        print(f"# {name}: engine start {start:.1f} s", file=sys.stderr)
        del llm
        gc.collect()
    print(f"{args.max_tokens} new tokens per row, dtype {args.dtype}, T = {t_n} expert(s)")
    print("| B | large alone | small alone | members alone (L + (1+T) S) | fused, method large | "
          "fused, DLF | DLF / members alone | DLF / large alone |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for b in args.batch:
        toks = b * args.max_tokens

        def rate(s: float, toks: int = toks) -> str:
            return f"{toks / s:.1f} tok/s"

        members = times[("large alone", b)] + (1 + t_n) * times[("small alone", b)]
        dlf = times[("fused, DLF", b)]
        print(f"| {b} | {rate(times[('large alone', b)])} | {rate(times[('small alone', b)])} | "
              f"{rate(members)} | {rate(times[('fused, method large', b)])} | {rate(dlf)} | "
              f"{dlf / members:.2f}x | {dlf / times[('large alone', b)]:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
