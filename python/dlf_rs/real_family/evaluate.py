"""The weak-to-strong table on real weights: ``python -m dlf_rs.real_family eval``.

Where it sits: after ``make real-family`` and ``... train`` (the expert, and with
``--base large`` the upper bound). It decodes the held-out vexil examples (:mod:`.task`) and a
HumanEval subset (:mod:`.humaneval`) greedily with every method through dlf_rs's own API
(:class:`dlf_rs.FusedGenerator`: ``method="large"``, ``"expert"``, ``"static"`` with alpha 0.5,
1.0 (proxy-tuning) and 1.5, and ``"dlf"``, the library's default), scores each reply by running
it in the sandbox, and writes a JSON report, the Markdown tables and an alpha plot to
``<cache>/results/``. The rows that are not one generator's methods: the small base alone (a
generator whose "large" model is the small base) and the upper bound (the large base with the
same LoRA recipe, merged, alone).

Before the table, two checks on the real family (:func:`check_family`): the expert folder loads
as a PEFT adapter on the small base (and changes its logits), and greedy DLF's tokens and
alphas equal an independent loop over the same models' logits (each model run with its own
KV cache, the paper's grid search by the numpy reference :mod:`dlf_rs.reference`).

Time per token: wall time of a method's ``generate`` calls over the tokens it produced (rows
decoded ``--batch-size`` at a time), prefill included.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dlf_rs.reference import dlf_grid_row, fuse_row

from . import humaneval, task
from .train import MANIFEST, adapter_dir, base_dir

__all__ = ["HUMANEVAL_METHODS", "TASK_METHODS", "MethodResult", "check_family", "decode",
           "format_table", "grid_alpha", "independent_dlf", "run", "summary"]  # fmt: skip

# key -> (label, generate() overrides); "small" and "large-lora" use their own generators.
LABELS = {
    "large": "1.5B alone",
    "small": "0.5B base alone",
    "expert": "0.5B + LoRA (the expert) alone",
    "static-0.5": "static alpha 0.5",
    "proxy": "static alpha 1.0 (proxy-tuning)",
    "static-1.5": "static alpha 1.5",
    "dlf": "DLF (library default)",
    "large-lora": "1.5B + LoRA, same recipe (upper bound)",
}
OVERRIDES: dict[str, dict[str, Any]] = {
    "large": {"method": "large"},
    "small": {"method": "large"},
    "large-lora": {"method": "large"},
    "expert": {"method": "expert", "expert": 0},
    "static-0.5": {"method": "static", "alpha": 0.5},
    "proxy": {"method": "static", "alpha": 1.0},
    "static-1.5": {"method": "static", "alpha": 1.5},
    "dlf": {"method": "dlf"},
}
TASK_METHODS = ["large", "small", "expert", "static-0.5", "proxy", "static-1.5", "dlf",
                "large-lora"]  # fmt: skip
# The order they run in: the rows the bar needs first (a run cut short keeps them).
RUN_ORDER = ["large", "expert", "dlf", "proxy", "static-0.5", "static-1.5", "small", "large-lora"]
HUMANEVAL_METHODS = ["large", "expert", "proxy", "dlf"]


@dataclass
class MethodResult:
    """One method on one benchmark: how many passed, and what it cost."""

    key: str
    label: str
    passed: int
    n: int
    seconds: float
    tokens: int
    texts: list[str] = field(default_factory=list)
    verdicts: list[str] = field(default_factory=list)

    @property
    def score(self) -> float:
        return 100.0 * self.passed / self.n if self.n else float("nan")

    @property
    def ms_per_token(self) -> float:
        return 1000.0 * self.seconds / self.tokens if self.tokens else float("nan")

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "label": self.label, "passed": self.passed, "n": self.n,
                "score": round(self.score, 2), "seconds": round(self.seconds, 2),
                "tokens": self.tokens, "ms_per_token": round(self.ms_per_token, 1),
                "texts": self.texts, "verdicts": self.verdicts}  # fmt: skip


def decode(gen: Any, overrides: dict[str, Any], *, messages: Sequence[Any] | None = None,
           prompts: Sequence[str] | None = None, max_new_tokens: int, stop: Sequence[str],
           batch_size: int) -> tuple[Any, float, int]:  # fmt: skip
    """Greedy decoding of every input with ``gen`` and ``overrides``: (result, seconds, tokens)."""
    t0 = time.perf_counter()
    res = gen.generate(prompts, max_new_tokens, messages=messages, stop=list(stop),
                       batch_size=batch_size, progress=False, temperature=0.0,
                       **overrides)  # fmt: skip
    seconds = time.perf_counter() - t0
    return res, seconds, sum(len(ids) for ids in res.token_ids)


def run_task(gen: Any, key: str, examples: Sequence[task.Example], max_new_tokens: int,
             batch_size: int, log: Callable[[str], None] = print) -> tuple[MethodResult, Any]:  # fmt: skip
    res, sec, ntok = decode(gen, OVERRIDES[key], messages=[task.messages(e) for e in examples],
                            max_new_tokens=max_new_tokens, stop=["\n```"],
                            batch_size=batch_size)  # fmt: skip
    verdicts = [task.check(e, t) for e, t in zip(examples, res.texts)]
    out = MethodResult(key, LABELS[key], sum(v.passed for v in verdicts), len(examples), sec,
                       ntok, list(res.texts), [v.reason for v in verdicts])  # fmt: skip
    log(f"vexil  {out.label:42s} {out.passed:3d}/{out.n} = {out.score:5.1f}%  "
        f"{out.ms_per_token:7.1f} ms/token  ({sec:.0f} s, {ntok} tokens)")  # fmt: skip
    return out, res


def run_humaneval(gen: Any, key: str, problems: Sequence[dict[str, Any]], max_new_tokens: int,
                  batch_size: int, log: Callable[[str], None] = print) -> MethodResult:  # fmt: skip
    prompts = [humaneval.prompt_text(gen.tokenizer, p) for p in problems]
    res, sec, ntok = decode(gen, OVERRIDES[key], prompts=prompts, max_new_tokens=max_new_tokens,
                            stop=humaneval.STOPS, batch_size=batch_size)  # fmt: skip
    ok = [humaneval.check(p, t) for p, t in zip(problems, res.texts)]
    out = MethodResult(key, LABELS[key], sum(ok), len(problems), sec, ntok, list(res.texts),
                       ["ok" if x else "fail" for x in ok])  # fmt: skip
    log(f"humaneval {out.label:39s} {out.passed:3d}/{out.n} = {out.score:5.1f}%  "
        f"{out.ms_per_token:7.1f} ms/token  ({sec:.0f} s, {ntok} tokens)")  # fmt: skip
    return out


# ----------------------------------------------------------------------------- tables
def format_table(rows: Sequence[MethodResult], metric: str) -> str:
    """A Markdown table: method, score (passed/n), time per token, total time."""
    lines = [
        f"| method | {metric} | ms / token | wall s (tokens) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(f"| {r.label} | {r.score:.1f}% ({r.passed}/{r.n}) | {r.ms_per_token:.0f} | "
                     f"{r.seconds:.0f} ({r.tokens}) |")  # fmt: skip
    return "\n".join(lines)


def summary(rows: Sequence[MethodResult]) -> dict[str, Any]:
    """The bar of the issue: DLF against the large model alone and the expert alone, and the
    share of the gap to the upper bound it closes, ``(dlf - large) / (upper - large)``."""
    by = {r.key: r.score for r in rows}
    out: dict[str, Any] = {}
    if "dlf" in by and "large" in by and "expert" in by:
        out["dlf_above_large_and_expert"] = by["dlf"] > by["large"] and by["dlf"] > by["expert"]
    if {"dlf", "large", "large-lora"} <= by.keys() and by["large-lora"] != by["large"]:
        out["gap_closed"] = round((by["dlf"] - by["large"]) / (by["large-lora"] - by["large"]), 3)
        out["half_gap_closed"] = out["gap_closed"] >= 0.5
    if {"proxy", "large", "large-lora"} <= by.keys() and by["large-lora"] != by["large"]:
        out["gap_closed_proxy"] = round((by["proxy"] - by["large"]) /
                                        (by["large-lora"] - by["large"]), 3)  # fmt: skip
    return out


# ----------------------------------------------------------------------------- checks
def grid_alpha(z_large: np.ndarray, z_small: np.ndarray, z_expert: np.ndarray, lo: float = 0.0,
               hi: float = 2.0, step: float = 0.1) -> float:  # fmt: skip
    """The paper's Algorithm 1 for one expert, independent of the core: the alpha of the grid
    with the smallest J (strict "<" scanning upward), by the numpy reference
    (:func:`dlf_rs.reference.dlf_grid_row`, float64)."""
    alphas, _ = dlf_grid_row(z_large, z_small, [z_expert], (lo, hi), step)
    return float(alphas[0])


def independent_dlf(large: Any, small: Any, expert: Any, ids: list[int], steps: int,
                    vocab: int, eos: set[int]) -> tuple[list[int], list[float]]:  # fmt: skip
    """Greedy DLF over ``ids`` without dlf_rs: each model (callables ``(input_ids, cache) ->
    (logits, cache)``) keeps its own cache; alpha by :func:`grid_alpha`, the token by argmax of
    ``z_L + alpha (z_E - z_S)``."""
    import torch

    caches: list[Any] = [None, None, None]
    feed = torch.tensor([ids])
    tokens: list[int] = []
    alphas: list[float] = []
    with torch.inference_mode():
        for _ in range(steps):
            zs = []
            for k, model in enumerate((large, small, expert)):
                logits, caches[k] = model(feed, caches[k])
                zs.append(logits[0, -1, :vocab].float().numpy())
            a = grid_alpha(*zs)
            tok = int(np.argmax(fuse_row(zs[0], zs[1], [zs[2]], [a])))
            tokens.append(tok)
            alphas.append(a)
            if tok in eos:
                break
            feed = torch.tensor([[tok]])
    return tokens, alphas


def _hf_step(model: Any, off: Callable[[], Any] | None = None) -> Callable[[Any, Any], Any]:
    import contextlib

    def call(x: Any, cache: Any) -> tuple[Any, Any]:
        with off() if off is not None else contextlib.nullcontext():
            out = model(input_ids=x, past_key_values=cache, use_cache=True)
        return out.logits, out.past_key_values

    return call


def check_family(gen: Any, small_dir: Path, adapter: Path, examples: Sequence[task.Example],
                 steps: int, log: Callable[[str], None] = print) -> dict[str, Any]:  # fmt: skip
    """The expert loads as a PEFT adapter on the small base; greedy DLF (``gen``, one prompt at
    a time) equals :func:`independent_dlf` over freshly loaded small base and adapter."""
    import peft
    import torch
    import transformers

    dtype = next(gen.large.parameters()).dtype
    base = transformers.AutoModelForCausalLM.from_pretrained(os.fspath(small_dir), dtype=dtype)
    pm = peft.PeftModel.from_pretrained(base, os.fspath(adapter)).eval()
    kinds = sorted({type(m).__name__ for m in pm.modules() if "lora" in type(m).__module__.lower()})
    ids = gen.tokenizer.apply_chat_template(task.messages(examples[0]), add_generation_prompt=True,
                                            tokenize=False)  # fmt: skip
    x = torch.tensor([gen.tokenizer(ids, add_special_tokens=False)["input_ids"]])
    with torch.inference_mode():
        z_e = pm(input_ids=x).logits[0, -1].float()
        with pm.disable_adapter():
            z_b = pm(input_ids=x).logits[0, -1].float()
    shift = float((z_e - z_b).abs().max())
    out: dict[str, Any] = {"peft_loaded": True, "lora_layer_types": kinds,
                           "expert_vs_base_max_logit_shift": round(shift, 3), "prompts": []}  # fmt: skip
    log(f"check: {adapter} loads as a PEFT adapter ({', '.join(kinds)}); it moves the small "
        f"base's logits by up to {shift:.2f}")  # fmt: skip
    vocab = gen.vocab_size
    eos = set(gen.eos_token_ids)
    all_equal = True
    for ex in examples:
        res = gen.generate(messages=[task.messages(ex)], max_new_tokens=steps, method="dlf",
                           progress=False)  # fmt: skip
        text = gen.tokenizer.apply_chat_template(task.messages(ex), add_generation_prompt=True,
                                                 tokenize=False)  # fmt: skip
        ids_ = gen.tokenizer(text, add_special_tokens=False)["input_ids"]
        toks, alphas = independent_dlf(_hf_step(gen.large), _hf_step(pm, pm.disable_adapter),
                                       _hf_step(pm), ids_, len(res.token_ids[0]), vocab, eos)  # fmt: skip
        got = list(res.token_ids[0])
        ga = [float(a) for a in np.asarray(res.alphas[0])[:, 0]]
        equal = got == toks
        n = min(len(ga), len(alphas))
        diff = float(np.max(np.abs(np.asarray(ga[:n]) - np.asarray(alphas[:n])))) if n else 0.0
        all_equal &= equal
        out["prompts"].append({"id": ex.id, "tokens": len(got), "equal": equal,
                               "max_alpha_diff": round(diff, 6)})  # fmt: skip
        log(f"check: {ex.id}: {len(got)} DLF tokens {'equal' if equal else 'DIFFER from'} the "
            f"independent loop; max |alpha diff| {diff:.2g}")  # fmt: skip
    out["all_equal"] = all_equal
    del pm, base
    gc.collect()
    return out


# ----------------------------------------------------------------------------- the run
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--examples", type=int, default=20, help="held-out vexil examples")
    p.add_argument("--humaneval", type=int, default=8, help="HumanEval problems (0: skip)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64, help="vexil reply limit")
    p.add_argument("--humaneval-tokens", type=int, default=160, help="HumanEval body limit")
    p.add_argument("--dtype", default="bfloat16", help="the models' dtype (bfloat16, float32)")
    p.add_argument("--methods", default=",".join(RUN_ORDER), help="vexil rows, in this order")
    p.add_argument("--humaneval-methods", default=",".join(HUMANEVAL_METHODS))
    p.add_argument("--check-prompts", type=int, default=3, help="prompts of the DLF check")
    p.add_argument("--check-steps", type=int, default=24)
    p.add_argument("--seed", type=int, default=0, help="the held-out split's seed")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="results folder (default <cache>/results)")


def _load_single(path: Path, dtype: str, adapter: Path | None = None) -> Any:
    """A generator whose only model is ``path`` (plus ``adapter`` merged in), for "large"."""
    import torch
    import transformers

    from dlf_rs import FusedGenerator

    model = transformers.AutoModelForCausalLM.from_pretrained(os.fspath(path),
                                                              dtype=getattr(torch, dtype))  # fmt: skip
    if adapter is not None:
        import peft

        model = peft.PeftModel.from_pretrained(model, os.fspath(adapter)).merge_and_unload()
    tok = transformers.AutoTokenizer.from_pretrained(os.fspath(path))
    return FusedGenerator(model.eval(), tokenizer=tok)


def _single_row(cache: Path, key: str, examples: Sequence[task.Example],
                args: argparse.Namespace, times: dict[str, float],
                log: Callable[[str], None]) -> MethodResult:  # fmt: skip
    """The vexil row of a model alone: the small base, or the large one with its LoRA merged."""
    t0 = time.perf_counter()
    adapter = adapter_dir(cache, "large") if key == "large-lora" else None
    single = _load_single(base_dir(cache, "large" if adapter else "small"), args.dtype, adapter)
    r, _ = run_task(single, key, examples, args.max_new_tokens, args.batch_size, log)
    times[f"vexil:{key}"] = round(time.perf_counter() - t0, 1)
    del single
    gc.collect()
    return r


def _write(
    out_dir: Path,
    stamp: str,
    report: dict[str, Any],
    rows: list[MethodResult],
    he_rows: list[MethodResult],
    n_he: int,
) -> str:
    """Write the JSON report and the Markdown tables (again after every row: a run cut short
    keeps what it measured); returns the tables."""
    order = {k: i for i, k in enumerate(TASK_METHODS)}
    rows = sorted(rows, key=lambda r: order[r.key])
    report["vexil"] = [r.to_json() for r in rows]
    report["humaneval"] = [r.to_json() for r in he_rows]
    report["summary"] = summary(rows)
    with open(out_dir / f"eval-{stamp}.json", "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=1)
    tables = (f"vexil, {report['examples']} held-out examples, greedy, {report['dtype']}, "
              f"batch {report['batch_size']}:\n\n" + format_table(rows, "pass@1"))  # fmt: skip
    if he_rows:
        tables += (f"\n\nHumanEval, {n_he} of 164 problems, greedy:\n\n"
                   + format_table(he_rows, "pass@1"))  # fmt: skip
    (out_dir / f"eval-{stamp}.md").write_text(tables + "\n", encoding="utf-8")
    return tables


def run(args: argparse.Namespace, cache: Path) -> None:
    import torch

    from dlf_rs import FusedGenerator
    from dlf_rs.plotting import plot_alphas

    torch.set_num_threads(args.threads)
    log: Callable[[str], None] = lambda m: print(m, flush=True)
    out_dir = Path(args.out) if args.out else cache / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    large_dir, small_dir = base_dir(cache, "large"), base_dir(cache, "small")
    expert, upper = adapter_dir(cache, "small"), adapter_dir(cache, "large")
    if not (expert / MANIFEST).is_file():
        raise SystemExit(f"error: no expert in {expert}; run `python -m dlf_rs.real_family train`")
    methods = [m for m in args.methods.split(",") if m]
    he_methods = [m for m in args.humaneval_methods.split(",") if m] if args.humaneval else []
    for m in methods + he_methods:
        if m not in LABELS or (m in he_methods and m in ("small", "large-lora")):
            raise SystemExit(f"error: unknown method {m!r}; expected one of {', '.join(LABELS)}")
    if "large-lora" in methods and not (upper / MANIFEST).is_file():
        log(f"eval: no upper bound in {upper} (train --base large); skipping that row")
        methods.remove("large-lora")
    examples = task.make_split("heldout", args.examples, args.seed)
    times: dict[str, float] = {}
    report: dict[str, Any] = {"examples": len(examples), "dtype": args.dtype,
                              "batch_size": args.batch_size, "threads": args.threads,
                              "max_new_tokens": args.max_new_tokens,
                              "humaneval_tokens": args.humaneval_tokens, "times": times}  # fmt: skip
    for name, folder in (("expert_manifest", expert), ("upper_manifest", upper)):
        if (folder / MANIFEST).is_file():
            with open(folder / MANIFEST, encoding="utf-8") as fh:
                report[name] = {k: v for k, v in json.load(fh).items() if k != "losses"}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    rows: list[MethodResult] = []
    he_rows: list[MethodResult] = []
    problems: list[dict[str, Any]] = []
    fused_keys = [m for m in methods if m not in ("small", "large-lora")]
    if fused_keys or he_methods or args.check_prompts:
        t0 = time.perf_counter()
        gen = FusedGenerator.from_pretrained(large_dir, small_dir, [expert],
                                             torch_dtype=args.dtype)  # fmt: skip
        times["load"] = round(time.perf_counter() - t0, 1)
        log(f"eval: loaded in {times['load']} s\n{gen!r}")
        t0 = time.perf_counter()
        if args.check_prompts:
            report["check"] = check_family(gen, small_dir, expert, examples[: args.check_prompts],
                                           args.check_steps, log)  # fmt: skip
            _write(out_dir, stamp, report, rows, he_rows, 0)
        times["check"] = round(time.perf_counter() - t0, 1)
        for key in fused_keys:
            t0 = time.perf_counter()
            r, res = run_task(gen, key, examples, args.max_new_tokens, args.batch_size, log)
            rows.append(r)
            times[f"vexil:{key}"] = round(time.perf_counter() - t0, 1)
            if key == "dlf":
                row = next((i for i, v in enumerate(r.verdicts) if v == "ok"), 0)
                path = out_dir / f"alpha-vexil-{stamp}.png"
                plot_alphas(res, row=row, path=os.fspath(path),
                            title=f"DLF weights per step, vexil {examples[row].id}")  # fmt: skip
                report["alpha_plot"] = {
                    "path": os.fspath(path), "example": examples[row].id,
                    "prompt": examples[row].prompt, "text": res.texts[row],
                    "tokens": [gen.tokenizer.decode([t]) for t in res.token_ids[row]],
                    "alphas": [round(float(a), 3) for a in np.asarray(res.alphas[row])[:, 0]],
                }  # fmt: skip
            _write(out_dir, stamp, report, rows, he_rows, 0)
        if "small" in methods:  # before HumanEval: the vexil table first
            methods.remove("small")
            rows.append(_single_row(cache, "small", examples, args, times, log))
            _write(out_dir, stamp, report, rows, he_rows, 0)
        if he_methods:
            problems = humaneval.subset(humaneval.load_problems(), args.humaneval)
            report["humaneval_ids"] = [p["task_id"] for p in problems]
            for key in he_methods:
                t0 = time.perf_counter()
                he_rows.append(run_humaneval(gen, key, problems, args.humaneval_tokens,
                                             args.batch_size, log))  # fmt: skip
                times[f"humaneval:{key}"] = round(time.perf_counter() - t0, 1)
                _write(out_dir, stamp, report, rows, he_rows, len(problems))
        del gen
        gc.collect()

    if "small" in methods:
        rows.append(_single_row(cache, "small", examples, args, times, log))
        _write(out_dir, stamp, report, rows, he_rows, len(problems))
    if "large-lora" in methods:  # last, once the main generator's memory is free
        rows.append(_single_row(cache, "large-lora", examples, args, times, log))
        _write(out_dir, stamp, report, rows, he_rows, len(problems))
    tables = _write(out_dir, stamp, report, rows, he_rows, len(problems))
    log("\n" + tables + f"\n\nsummary: {report['summary']}\ntimes (s): {times}\n"
        f"written: {out_dir / f'eval-{stamp}.json'}")  # fmt: skip
