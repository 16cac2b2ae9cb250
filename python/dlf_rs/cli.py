"""The ``dlf-rs`` command line: the outermost layer of the flow.

``dlf-rs generate`` loads the models with :meth:`FusedGenerator.from_pretrained`, reads prompts
from ``--prompt`` or a JSONL file, decodes them in batches and writes one JSON line per prompt
(text, token ids, per-step weights). ``dlf-rs demo`` delegates to :mod:`dlf_rs.demo` and
``dlf-rs bench`` to :mod:`dlf_rs.bench` (each imported only when used). Errors print one line to stderr and exit with status 2, no traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Sequence
from typing import Any, TextIO

__all__ = ["build_parser", "main"]

DESCRIPTION = """\
Dynamic Logit Fusion (arXiv 2406.15480): decode with a large model L, its small base S and small
experts (S fine-tuned per task), fusing next-token logits z_L + sum_t alpha_t (z_t - z_S) with the
weights alpha solved per row and step by the Rust core.

commands:
  generate   fused generation with Hugging Face checkpoints (local paths or cached hub ids)
  demo       the shipped tiny model family: DLF vs the baselines, tables and alpha plots
  bench      end-to-end decode benchmark: per-step breakdown, tokens/s, ratios to a naive
             loop, to the models' own steps and to the bandwidth floor (dlf-rs bench --help)

example:
  dlf-rs generate --large L --small S --expert MATH --expert QA --prompt "Q: 2+3=?" \\
      --method dlf --max-new-tokens 32 --output out.jsonl
"""

GENERATE_EPILOG = """\
--prompts FILE.jsonl: one JSON object per line with a "prompt" field (or a bare JSON string).
Output (--output, default stdout): one JSON object per prompt with "prompt", "text",
"token_ids", "alphas" ([steps][T] weights), "active", "finish_reason", "method".
Seeds: row seeds are derived from --seed and the prompt's index in the whole input, so the
output does not depend on --batch-size.
"""


class _Failure(Exception):
    """A user-facing error: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse's own errors also exit 2, one line
        self.print_usage(sys.stderr)
        raise _Failure(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="dlf-rs", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", metavar="{generate,demo,bench}", parser_class=_Parser)

    gen = sub.add_parser(
        "generate",
        help="fused generation with Hugging Face checkpoints",
        description="Fused generation: DLF, static weights (proxy-tuning), or one model alone.",
        epilog=GENERATE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    gen.add_argument("--large", required=True, help="large model L: local path or hub id")
    gen.add_argument("--small", help="small base model S (needed by dlf and static)")
    gen.add_argument(
        "--expert", action="append", default=[], metavar="PATH",
        help="small expert (full checkpoint or LoRA adapter dir); repeat for several",
    )  # fmt: skip
    gen.add_argument("--tokenizer", help="tokenizer path (default: the large model's)")
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt; repeatable")
    src.add_argument("--prompts", metavar="FILE.jsonl", help="JSONL file of prompts")
    gen.add_argument("--method", default="dlf", choices=("dlf", "static", "large", "expert"))
    gen.add_argument(
        "--alpha", type=float, action="append", default=None,
        help="static weight (method static); once for all experts or once per expert",
    )  # fmt: skip
    gen.add_argument("--expert-index", type=int, default=None, help="expert for method expert")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--solver", choices=("grid", "exact"), default=None)
    gen.add_argument("--support-k", type=int, default=None, help="top-k support (default: full)")
    gen.add_argument("--alpha-range", type=float, nargs=2, default=(0.0, 2.0), metavar=("LO", "HI"))
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--min-p", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=None, help="stop string; repeatable")
    gen.add_argument("--batch-size", type=int, default=8)
    gen.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: as loaded)")
    gen.add_argument("--device-map", default=None, help='e.g. "auto" (needs accelerate)')
    gen.add_argument(
        "--dtype", default=None, choices=("float32", "bfloat16", "float16", "auto"),
        help="model weights dtype",
    )  # fmt: skip
    gen.add_argument("--output", "-o", default=None, help="JSONL output file (default: stdout)")
    gen.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    # The demo's own options are parsed by a second parser built only when the demo runs, so that
    # `dlf-rs --help` and `dlf-rs generate` never import it (see `_demo`).
    demo = sub.add_parser(
        "demo", help="run the shipped tiny-family demo (dlf-rs demo --help)", add_help=False
    )
    demo.add_argument("demo_args", nargs=argparse.REMAINDER)
    bench = sub.add_parser(
        "bench", help="end-to-end decode benchmark (dlf-rs bench --help)", add_help=False
    )
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    return parser


def _demo(argv: list[str]) -> int:
    from dlf_rs import demo

    parser = _Parser(
        prog="dlf-rs demo",
        description="The shipped tiny model family: DLF against the baselines, with alpha plots.",
    )
    demo.add_arguments(parser)
    return int(demo.run(parser.parse_args(argv)) or 0)


def _bench(argv: list[str]) -> int:
    from dlf_rs import bench

    parser = _Parser(
        prog="dlf-rs bench",
        description=bench.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_arguments(parser)
    return int(bench.run(parser.parse_args(argv)) or 0)


def _read_prompts(path: str) -> list[str]:
    prompts: list[str] = []
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except OSError as err:
        raise _Failure(f"--prompts: cannot read {path!r}: {err.strerror or err}") from None
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise _Failure(f"--prompts: {path}:{n}: not JSON ({err.msg})") from None
        if isinstance(item, dict):
            item = item.get("prompt")
        if not isinstance(item, str):
            raise _Failure(f'--prompts: {path}:{n}: expected a "prompt" string')
        prompts.append(item)
    if not prompts:
        raise _Failure(f"--prompts: {path!r} holds no prompts")
    return prompts


def _generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from dlf_rs.generate import FusedGenerator, row_seed

    if args.batch_size < 1:
        raise _Failure(f"--batch-size: must be >= 1, got {args.batch_size}")
    prompts = list(args.prompt) if args.prompt else _read_prompts(args.prompts)
    alpha: Any = None
    if args.alpha is not None:
        alpha = args.alpha[0] if len(args.alpha) == 1 else list(args.alpha)
    gen = FusedGenerator.from_pretrained(
        large=args.large,
        small=args.small,
        experts=args.expert,
        tokenizer=args.tokenizer,
        device=args.device,
        torch_dtype=args.dtype,
        device_map=args.device_map,
    )
    with contextlib.ExitStack() as stack:
        out: TextIO = (
            stack.enter_context(open(args.output, "w", encoding="utf-8"))
            if args.output
            else sys.stdout
        )
        starts = range(0, len(prompts), args.batch_size)
        for start in tqdm(starts, desc="batches", unit="batch", disable=args.no_progress):
            batch = prompts[start : start + args.batch_size]
            seeds = (
                None
                if args.seed is None
                else [row_seed(args.seed, start + i) for i in range(len(batch))]
            )
            res = gen.generate(
                batch,
                max_new_tokens=args.max_new_tokens,
                method=args.method,
                alpha=alpha,
                expert=args.expert_index,
                solver=args.solver,
                support_k=args.support_k,
                alpha_range=tuple(args.alpha_range),
                temperature=args.temperature,
                top_k=args.top_k,
                top_p=args.top_p,
                min_p=args.min_p,
                seed=seeds,
                stop=args.stop,
            )
            out.writelines(
                json.dumps({"prompt": prompt, **record}) + "\n"
                for prompt, record in zip(batch, res.to_records())
            )
            out.flush()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dlf-rs``; returns the exit status (0 ok, 2 error)."""
    try:
        args_list = list(sys.argv[1:] if argv is None else argv)
        if args_list[:1] == ["demo"]:  # argparse's REMAINDER would not pass on --help or --x
            return _demo(args_list[1:])
        if args_list[:1] == ["bench"]:
            return _bench(args_list[1:])
        parser = build_parser()
        args = parser.parse_args(args_list)
        if args.command == "generate":
            return _generate(args)
        parser.print_help()
        return 2
    except _Failure as err:
        print(f"dlf-rs: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dlf-rs: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, ImportError, RuntimeError) as err:
        # OSError covers FileNotFoundError; RuntimeError covers CUDA out of memory (with a hint).
        msg = " ".join(str(err).split()) or type(err).__name__
        print(f"dlf-rs: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
