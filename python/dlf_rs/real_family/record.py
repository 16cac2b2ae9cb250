"""Recording real next-token logit rows for the core's benchmark (``... real_family record``).

Where it sits: after ``make real-family``; reads the converted family, writes one file outside
the repository. The models decode greedily with :class:`dlf_rs.FusedGenerator`, method "dlf",
and every ``[batch, V]`` logit block the Rust core is handed (the staging views, observed by
wrapping :meth:`dlf_rs.engines.hf.staging.LogitStaging.views` for the call) is copied out; rows of prompts
that already ended are dropped. So the rows are exactly what ``fuse_step`` saw, and replaying
them through ``dlf_rs.fuse_step`` gives the recorded tokens (checked at the end of a recording,
the count stored as ``replay_mismatches``).

The expert, until a LoRA expert exists: the small model itself reading each prompt in its chat
template while the large and small models read the plain prompt (the setting of the SmolLM2
test in tests/test_real_model.py); ``--expert DIR`` takes a real one (a model directory or a
LoRA adapter on the small base; ``--expert-prompt plain`` if it was trained on plain prompts).

File format (``FORMAT``), a safetensors file (``safetensors.numpy.load_file(path)``; the
metadata with ``safetensors.safe_open(path, "np").metadata()``):

- ``large``, ``small``: float32 ``[R, V]``; ``expert_0`` .. ``expert_{T-1}``: float32
  ``[R, V]``. Row ``r`` of each is one decoding step of one prompt (prompt-major: prompt 0's
  steps, then prompt 1's), V = the tokenizer's vocabulary, the columns the core reads
  (151,936 for the Qwen family converted from GGUF);
- ``tokens``: int64 ``[R]``, the token greedy DLF chose from the row; ``alphas``: float32
  ``[R, T]``, the weights it used; ``prompt``, ``step``: int32 ``[R]``, where the row comes from;
- metadata (strings): ``format``, ``experts`` (T), ``vocab``, ``rows``, ``method`` ("dlf"),
  ``dtype`` (the models' compute dtype), ``models`` (JSON: name -> source), ``prompts`` and
  ``expert_prompts`` (JSON lists), ``steps`` (max new tokens), ``replay_mismatches``,
  ``seconds`` (decoding wall time), ``threads``, versions (``dlf_rs``, ``torch``,
  ``transformers``), ``created``.

Rows ``[i:i+B]`` of ``large``, ``small`` and the experts are a realistic batch for
``fuse_step(z_large, z_small, [z_expert_0, ...])``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["FORMAT", "PROMPTS", "add_arguments", "chat_prompts", "load_rows", "record_rows",
           "replay", "run", "save_rows"]  # fmt: skip

FORMAT = "dlf_rs.real_family.rows/1"

# Short code-completion prompts: what a coder model continues naturally.
PROMPTS = [
    'def fibonacci(n: int) -> int:\n    """Return the n-th Fibonacci number."""\n',
    'def is_prime(n: int) -> bool:\n    """Return True if n is a prime number."""\n',
    'def reverse_words(s: str) -> str:\n    """Reverse the order of the words in s."""\n',
    "# Read a CSV file and print the average of the column 'price'\nimport csv\n\n",
    'def merge_sorted(a: list[int], b: list[int]) -> list[int]:\n    """Merge two sorted lists."""\n',
    'class Stack:\n    """A last-in first-out stack."""\n\n    def __init__(self):\n',
    'def count_vowels(text: str) -> int:\n    """Count the vowels in text."""\n',
    "# Write a function that returns the factorial of n\n",
    'def flatten(nested: list) -> list:\n    """Flatten an arbitrarily nested list."""\n',
    'def binary_search(xs: list[int], target: int) -> int:\n    """Index of target, or -1."""\n',
    "import json\n\n\ndef load_config(path):\n",
    'def gcd(a: int, b: int) -> int:\n    """Greatest common divisor."""\n',
    "# A Python function that checks whether a string is a palindrome\n",
    'def word_count(text: str) -> dict[str, int]:\n    """Count each word."""\n',
    "def quicksort(xs):\n",
    'def to_snake_case(name: str) -> str:\n    """CamelCase to snake_case."""\n',
]


@contextlib.contextmanager
def observe_views(sink: list[list[np.ndarray]]) -> Iterator[None]:
    """While active, every :meth:`LogitStaging.views` call (one per fused decoding step, just
    before ``fuse_step``) appends a copy of the views to ``sink``."""
    from dlf_rs.engines.hf.staging import LogitStaging

    original = LogitStaging.views

    def views(self: LogitStaging) -> list[np.ndarray]:
        out = original(self)
        sink.append([np.array(v, dtype=np.float32, copy=True) for v in out])
        return out

    LogitStaging.views = views  # type: ignore[method-assign]
    try:
        yield
    finally:
        LogitStaging.views = original  # type: ignore[method-assign]


def chat_prompts(tokenizer: Any, prompts: Sequence[str]) -> list[str]:
    """Each prompt as one user turn in the tokenizer's chat template, generation prompt added."""
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in prompts
    ]


def record_rows(
    gen: Any,
    prompts: Sequence[str],
    steps: int,
    expert_prompts: Sequence[str] | None = None,
    batch_size: int | None = None,
) -> tuple[dict[str, np.ndarray], Any]:
    """Greedy DLF decoding of ``prompts`` with ``gen`` (a :class:`dlf_rs.FusedGenerator`),
    returning the arrays of the file format (see the module docstring) and the
    :class:`GenerationResult`. ``expert_prompts``: what every expert reads instead."""
    n_exp = len(gen.experts)
    if n_exp < 1:
        raise ValueError("gen: recording DLF rows needs at least one expert")
    prompts_for = None
    if expert_prompts is not None:
        if len(expert_prompts) != len(prompts):
            raise ValueError(f"expert_prompts: {len(expert_prompts)} prompts for "
                             f"{len(prompts)} prompts")  # fmt: skip
        prompts_for = {f"expert:{i}": list(expert_prompts) for i in range(n_exp)}
    captured: list[list[np.ndarray]] = []
    with observe_views(captured):
        res = gen.generate(list(prompts), max_new_tokens=steps, method="dlf",
                           prompts_for=prompts_for, batch_size=batch_size)  # fmt: skip
    size = len(prompts) if batch_size is None else batch_size
    names = ["large", "small"] + [f"expert_{i}" for i in range(n_exp)]
    blocks: dict[str, list[np.ndarray]] = {k: [] for k in names}
    tokens, alphas, prompt_of, step_of = [], [], [], []
    at = 0  # the next captured step
    for lo in range(0, len(prompts), size):
        rows = range(lo, min(lo + size, len(prompts)))
        n_steps = max(len(res.alphas[b]) for b in rows)
        mine = captured[at : at + n_steps]
        at += n_steps
        if len(mine) != n_steps or any(len(v) != len(names) for v in mine):
            raise RuntimeError(f"captured {len(mine)} steps of {len(mine[0]) if mine else 0} "
                               f"models, expected {n_steps} of {len(names)}")  # fmt: skip
        for b in rows:
            live = len(res.alphas[b])
            for k, name in enumerate(names):
                blocks[name].append(np.stack([mine[t][k][b - lo] for t in range(live)]))
            tokens.append(np.asarray(res.token_ids[b][:live], dtype=np.int64))
            alphas.append(np.asarray(res.alphas[b], dtype=np.float32).reshape(live, n_exp))
            prompt_of.append(np.full(live, b, dtype=np.int32))
            step_of.append(np.arange(live, dtype=np.int32))
    if at != len(captured):
        raise RuntimeError(f"captured {len(captured)} steps, used {at}")
    captured.clear()
    arrays = {name: np.ascontiguousarray(np.concatenate(blocks.pop(name))) for name in names}
    arrays.update(tokens=np.concatenate(tokens), alphas=np.concatenate(alphas),
                  prompt=np.concatenate(prompt_of), step=np.concatenate(step_of))  # fmt: skip
    return arrays, res


def expert_keys(arrays: dict[str, np.ndarray]) -> list[str]:
    n = sum(1 for k in arrays if k.startswith("expert_"))
    return [f"expert_{i}" for i in range(n)]


def replay(arrays: dict[str, np.ndarray], batch: int = 16) -> int:
    """How many recorded tokens ``dlf_rs.fuse_step`` (defaults: greedy DLF) does not reproduce
    from the recorded rows."""
    import dlf_rs

    experts = expert_keys(arrays)
    bad = 0
    for i in range(0, len(arrays["tokens"]), batch):
        sl = slice(i, i + batch)
        r = dlf_rs.fuse_step(arrays["large"][sl], arrays["small"][sl],
                             [arrays[k][sl] for k in experts])  # fmt: skip
        bad += int(np.count_nonzero(np.asarray(r.tokens) != arrays["tokens"][sl]))
    return bad


def save_rows(path: str | os.PathLike[str], arrays: dict[str, np.ndarray],
              metadata: dict[str, Any]) -> None:  # fmt: skip
    """Writes the file format (via a ``.partial`` file, renamed when complete)."""
    from safetensors.numpy import save_file

    meta = {"format": FORMAT, "experts": str(len(expert_keys(arrays))),
            "vocab": str(arrays["large"].shape[1]), "rows": str(len(arrays["tokens"]))}  # fmt: skip
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    save_file(arrays, str(tmp), metadata=meta)
    os.replace(tmp, out)


def load_rows(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The arrays and metadata of a recorded file, its format checked."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    with safe_open(os.fspath(path), "np") as fh:
        meta = dict(fh.metadata() or {})
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} file (format {meta.get('format')!r})")
    return load_file(os.fspath(path)), meta


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompts", type=int, default=8, help=f"how many of the {len(PROMPTS)} "
                   "built-in code prompts (default 8)")  # fmt: skip
    p.add_argument("--steps", type=int, default=32, help="max new tokens per prompt (default 32)")
    p.add_argument("--out", help="output file (default <cache>/rows-<prompts>x<steps>.safetensors)")
    p.add_argument("--large", help="large model directory (default <cache>/large-bf16)")
    p.add_argument("--small", help="small model directory (default <cache>/small-bf16)")
    p.add_argument("--expert", help="expert directory or LoRA adapter (default: the small model "
                   "reading chat-formatted prompts)")  # fmt: skip
    p.add_argument(
        "--expert-prompt",
        choices=("chat", "plain"),
        default=None,
        help="what the expert reads (default chat without --expert, plain with it)",
    )
    p.add_argument("--dtype", default="float32", help="the models' compute dtype (default "
                   "float32, as FusedGenerator on CPU)")  # fmt: skip
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--batch-size", type=int, default=None, help="prompts decoded at once "
                   "(default all)")  # fmt: skip


def run(args: argparse.Namespace, cache: Path) -> None:
    import torch
    import transformers

    import dlf_rs
    from dlf_rs import FusedGenerator
    from dlf_rs.engines.hf.loading import LoadOptions, load_model, load_tokenizer

    if not 1 <= args.prompts <= len(PROMPTS):
        raise SystemExit(f"--prompts: expected 1 to {len(PROMPTS)}, got {args.prompts}")
    if args.steps < 1:
        raise SystemExit(f"--steps: expected at least 1, got {args.steps}")
    torch.set_num_threads(args.threads)
    large = args.large or str(cache / "large-bf16")
    small = args.small or str(cache / "small-bf16")
    out = Path(args.out or cache / f"rows-{args.prompts}x{args.steps}.safetensors")
    expert_prompt = args.expert_prompt or ("plain" if args.expert else "chat")
    t0 = time.perf_counter()
    if args.expert:
        gen = FusedGenerator.from_pretrained(large, small, [args.expert], torch_dtype=args.dtype)
        expert_src = args.expert
    else:
        # The small model is its own expert: one copy in memory, its own cache per slot.
        opts = LoadOptions(device=None, torch_dtype=args.dtype, device_map=None,
                           local_files_only=True, allow_pickle=False, trust_remote_code=False,
                           extra={})  # fmt: skip
        small_model = load_model("small", small, opts)
        gen = FusedGenerator(load_model("large", large, opts), small_model, [small_model],
                             load_tokenizer("tokenizer", large, opts),
                             expert_names=["small (chat prompt)"])  # fmt: skip
        expert_src = small
    print(f"loaded the models in {time.perf_counter() - t0:.1f} s ({args.dtype}, "
          f"{args.threads} threads); vocab {gen.vocab_size:,}", flush=True)  # fmt: skip
    prompts = PROMPTS[: args.prompts]
    expert_prompts = chat_prompts(gen.tokenizer, prompts) if expert_prompt == "chat" else None
    t0 = time.perf_counter()
    arrays, res = record_rows(gen, prompts, args.steps, expert_prompts, args.batch_size)
    seconds = time.perf_counter() - t0
    rows = len(arrays["tokens"])
    print(f"decoded {rows} rows ({args.prompts} prompts x up to {args.steps} steps) in "
          f"{seconds:.1f} s ({seconds / max(1, max(len(a) for a in res.alphas)):.2f} s/step)",
          flush=True)  # fmt: skip
    t1 = time.perf_counter()
    bad = replay(arrays)
    print(f"replayed through fuse_step in {time.perf_counter() - t1:.1f} s: {bad} of {rows} "
          "tokens differ", flush=True)  # fmt: skip
    active = float(np.mean(np.any(arrays["alphas"] != 0, axis=1)))
    meta = {"method": "dlf", "dtype": args.dtype, "steps": str(args.steps),
            "models": {"large": large, "small": small, "expert_0": expert_src},
            "prompts": list(prompts), "expert_prompts": expert_prompts or list(prompts),
            "expert_prompt": expert_prompt, "replay_mismatches": str(bad),
            "seconds": f"{seconds:.1f}", "threads": str(args.threads),
            "dlf_rs": getattr(dlf_rs, "__version__", "?"), "torch": torch.__version__,
            "transformers": transformers.__version__,
            "created": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
    t1 = time.perf_counter()
    save_rows(out, arrays, meta)
    print(f"wrote {out}: {out.stat().st_size / 1e6:.1f} MB in {time.perf_counter() - t1:.1f} s; "
          f"{rows} rows x {arrays['large'].shape[1]:,} columns per model; an expert active on "
          f"{active:.0%} of rows", flush=True)  # fmt: skip
    for i, text in enumerate(res.texts[:3]):
        print(f"  [{i}] {prompts[i][:40]!r} -> {text[:80]!r}")
