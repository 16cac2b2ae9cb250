"""DLF on llama.cpp on real weights: speed against FusedGenerator and against the members' own
forwards, and the cross-checks (docs/llamacpp.md).

    .venv/bin/python benches/bench_llamacpp.py [--prompts 8] [--max-new-tokens 32] [--threads 2]
    .venv/bin/python benches/bench_llamacpp.py --speculative 3 5 --only-speculative

The family: the Qwen2.5-Coder 1.5B Q4_K_M (large) and 0.5B Q4_K_M (small) GGUFs of `make
real-family`, and as the expert a copy of the 0.5B with its norms perturbed (written once with
dlf_rs.engines.llamacpp.gguf_files; the project's trained expert is a PEFT adapter on the bf16
model, which this bench does not need: speed does not depend on what the expert learned).
FusedGenerator runs the bf16 conversions of the same GGUFs (the expert converted the same way).

Measured, one run, same prompts, greedy: tokens/s of DLF (on llama.cpp with the members side by
side, the default, and in turn) and of the large model alone at B = 1
(each prompt alone) and B = 8 (one batch) on both engines; each member alone on llama.cpp (the
floor of a fused token is the sum of the three members' per-token times); then the cross-checks
with the paper's grid over the full vocabulary (solver "grid", support_k None): llama.cpp DLF
against an independent loop (llama-cpp-python's Llama class per member, one prompt at a time,
every token chosen by dlf_rs.reference in numpy), and against FusedGenerator's tokens (agreement,
and the top-two margin of the fused logits where they first differ).

With ``--speculative K ...``: speculative DLF at B = 1 (each prompt alone) with each draft length
on both engines, beside each engine's sequential DLF on the same prompts (llama.cpp's with the
members side by side and in turn): tokens/s, the ratio to
FusedGenerator's sequential DLF, acceptance (accepted / tested drafts), large forwards per token,
and whether every prompt's tokens equal that engine's sequential DLF (greedy).
``--only-speculative`` runs just that table (no B = 8, members alone or cross-checks), at
B = ``--batch`` (default 1; 8: one batch of the 8 prompts).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vllm_real_family import PROMPTS  # the same code prompts as the vLLM bench


def family(threads: int) -> dict[str, Path]:
    from dlf_rs.engines.llamacpp.gguf_files import derive_model
    from dlf_rs.real_family import LARGE, SMALL, cache_root

    root = cache_root()
    paths = {"large": root / "gguf" / LARGE.filename, "small": root / "gguf" / SMALL.filename,
             "large_bf16": root / "large-bf16", "small_bf16": root / "small-bf16"}  # fmt: skip
    for key in ("large", "small", "large_bf16", "small_bf16"):
        if not paths[key].exists():
            sys.exit(f"{paths[key]} is missing: run `make real-family` first")
    work = root / "llamacpp"
    work.mkdir(exist_ok=True)
    paths["expert"] = work / "expert-0.5b-perturbed-q4_k_m.gguf"
    if not paths["expert"].exists():
        derive_model(paths["small"], paths["expert"], perturb=0.1, seed=7, name="expert")
    paths["expert_bf16"] = work / "expert-bf16"
    if not (paths["expert_bf16"] / "config.json").exists():
        from dlf_rs.engines.hf.loading import gguf_to_safetensors

        gguf_to_safetensors(paths["expert"], paths["expert_bf16"], dtype="bfloat16")
    return paths


def timed(gen: Any, prompts: list[str], batch: int, max_new: int, **kw: Any) -> dict[str, Any]:
    t0 = time.perf_counter()
    res = gen.generate(prompts, max_new_tokens=max_new, batch_size=batch, progress=False, **kw)
    wall = time.perf_counter() - t0
    tokens = sum(len(t) for t in res.token_ids)
    return {"wall": wall, "tokens": tokens, "tok_s": tokens / wall, "ms_per_token": 1e3 * wall /
            tokens, "result": res}  # fmt: skip


def reference_loop(paths: dict[str, Path], prompts: list[str], max_new: int, threads: int,
                   eog: set[int]) -> list[tuple[list[int], list[float]]]:  # fmt: skip
    """Greedy DLF per prompt through llama-cpp-python's Llama class, tokens chosen in numpy.
    Returns each prompt's tokens and the top-two margin of the fused logits at each step."""
    import llama_cpp
    from dlf_rs import reference

    members = [llama_cpp.Llama(model_path=str(paths[k]), n_ctx=1024, n_batch=512,
                               n_threads=threads, flash_attn=True, verbose=False)
               for k in ("large", "small", "expert")]  # fmt: skip
    n = members[0].n_vocab()

    def logits(m: Any) -> np.ndarray:
        return np.ctypeslib.as_array(m._ctx.get_logits(), shape=(n,)).copy()

    out = []
    for prompt in prompts:
        ids = members[0].tokenize(prompt.encode(), add_bos=True, special=True)
        for m in members:
            m.reset()
            m.eval(ids)
        z = [logits(m) for m in members]
        toks, margins = [], []
        for _ in range(max_new):
            a, _j = reference.dlf_grid_row(z[0], z[1], z[2:])
            fused = reference.fuse_row(z[0], z[1], z[2:], a)
            top2 = np.partition(fused, -2)[-2:]
            tok = int(np.argmax(fused))
            toks.append(tok)
            margins.append(float(top2[1] - top2[0]))
            if tok in eog:
                break
            for m in members:
                m.eval([tok])
            z = [logits(m) for m in members]
        out.append((toks, margins))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--skip-hf", action="store_true", help="llama.cpp only")
    ap.add_argument("--no-checks", action="store_true", help="speed only, no cross-checks")
    ap.add_argument("--out", default=None, help="write the numbers as JSON here")
    ap.add_argument(
        "--speculative",
        type=lambda t: t if t == "auto" else int(t),
        nargs="*",
        default=[],
        metavar="K",
        help="draft lengths for the speculative rows",
    )
    ap.add_argument(
        "--only-speculative",
        action="store_true",
        help="only the sequential and speculative rows (B = --batch)",
    )
    ap.add_argument("--batch", type=int, default=1,
                    help="batch size of the --only-speculative rows (default 1)")  # fmt: skip
    args = ap.parse_args()
    if args.only_speculative:
        return speculative_only(args)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("RAYON_NUM_THREADS", str(args.threads))
    from dlf_rs.engines.llamacpp.generate import LlamaCppGenerator

    paths = family(args.threads)
    prompts = PROMPTS[: args.prompts]
    n_new = args.max_new_tokens
    rows: dict[str, Any] = {}
    t0 = time.perf_counter()
    lc = LlamaCppGenerator.from_gguf(paths["large"], paths["small"], [paths["expert"]],
                                     n_threads=args.threads)  # fmt: skip
    rows["llamacpp_load_s"] = time.perf_counter() - t0
    lc.generate(prompts[:1], max_new_tokens=4)  # warm-up (contexts, pages of the mmap)
    for b in (1, 8):
        rows[f"llamacpp dlf B={b}"] = timed(lc, prompts, b, n_new)
        lc.parallel_members = False  # the members in turn, each on every thread
        rows[f"llamacpp dlf B={b}, members in turn"] = timed(lc, prompts, b, n_new)
        lc.parallel_members = True
        rows[f"llamacpp large B={b}"] = timed(lc, prompts, b, n_new, method="large")
    # Each member alone (its own per-token time at B = 1): the floor of a fused token.
    for key in ("small", "expert"):
        alone = LlamaCppGenerator.from_gguf(paths[key], n_threads=args.threads)
        alone.generate(prompts[:1], max_new_tokens=4, method="large")
        rows[f"llamacpp {key} alone B=1"] = timed(alone, prompts, 1, n_new, method="large")
        alone.close()
    dlf1 = rows["llamacpp dlf B=1"]["result"].timings
    hf = None
    if not args.skip_hf:
        import dlf_rs
        import torch

        torch.set_num_threads(args.threads)
        t0 = time.perf_counter()
        hf = dlf_rs.FusedGenerator.from_pretrained(
            paths["large_bf16"], paths["small_bf16"], [paths["expert_bf16"]],
            torch_dtype=torch.bfloat16,
        )  # fmt: skip
        rows["hf_load_s"] = time.perf_counter() - t0
        hf.generate(prompts[:1], max_new_tokens=4)
        for b in (1, 8):
            rows[f"FusedGenerator dlf B={b}"] = timed(hf, prompts, b, n_new)
            rows[f"FusedGenerator large B={b}"] = timed(hf, prompts, b, n_new, method="large")

    print(f"\n## Speed (one run; {len(prompts)} code prompts, up to {n_new} new tokens, greedy, "
          f"{args.threads} threads)\n")  # fmt: skip
    print("| engine, method, batch | tokens | wall s | tokens/s | ms/token |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        if isinstance(r, dict):
            print(f"| {name} | {r['tokens']} | {r['wall']:.1f} | {r['tok_s']:.2f} | "
                  f"{r['ms_per_token']:.0f} |")  # fmt: skip
    floor = (rows["llamacpp large B=1"]["ms_per_token"] + rows["llamacpp small alone B=1"][
        "ms_per_token"] + rows["llamacpp expert alone B=1"]["ms_per_token"])  # fmt: skip
    fused = rows["llamacpp dlf B=1"]["ms_per_token"]
    steps = max(dlf1["steps"], 1.0)
    inside = {k: 1e3 * v / steps for k, v in dlf1.items() if k.startswith(("forward", "fuse"))}
    print(f"\nB=1: a fused token {fused:.0f} ms; the members alone {floor:.0f} ms summed "
          f"(ratio {fused / floor:.2f}); inside the fused run per step: "
          + ", ".join(f"{k} {v:.1f} ms" for k, v in inside.items()))  # fmt: skip
    if hf is not None:
        for b in (1, 8):
            r = rows[f"llamacpp dlf B={b}"]["tok_s"] / rows[f"FusedGenerator dlf B={b}"]["tok_s"]
            print(f"B={b}: DLF on llama.cpp / FusedGenerator DLF = {r:.2f}x tokens/s")

    report: dict[str, Any] = {}
    if args.no_checks:
        args.skip_hf = True
        prompts = []
    # Cross-checks: the paper's grid over the full vocabulary on both engines.
    grid = {"solver": "grid", "support_k": None}
    if prompts:
        lc_grid = lc.generate(prompts, max_new_tokens=n_new, batch_size=1, **grid)
        ref = reference_loop(paths, prompts, n_new, args.threads, lc.eos_token_ids)
        same = sum(a == b for a, (b, _m) in zip(lc_grid.token_ids, ref))
        print(f"\nllama.cpp DLF = independent loop (Llama class + numpy grid): {same}/"
              f"{len(prompts)} prompts token-identical")  # fmt: skip
        report = {"independent_loop_identical": same, "prompts": len(prompts)}
    if hf is not None and prompts:
        hf_grid = hf.generate(prompts, max_new_tokens=n_new, batch_size=1, **grid)
        agree = total = 0
        firsts = []
        for i, (a, b) in enumerate(zip(lc_grid.token_ids, hf_grid.token_ids)):
            k = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            agree += k
            total += max(len(a), len(b))
            if k < min(len(a), len(b)):
                firsts.append((i, k, ref[i][1][k] if k < len(ref[i][1]) else float("nan")))
        print(f"llama.cpp (Q4_K_M) vs FusedGenerator (bf16 of the same weights): "
              f"{agree}/{total} tokens before the first difference; "
              f"{len(prompts) - len(firsts)}/{len(prompts)} prompts identical")  # fmt: skip
        for i, k, margin in firsts:
            print(f"  prompt {i}: first difference at token {k}; llama.cpp's fused top-two margin "
                  f"there {margin:.3f}")  # fmt: skip
        report |= {"agree_tokens": agree, "total_tokens": total, "differences": firsts}
    if args.out:
        numbers = {k: {kk: vv for kk, vv in v.items() if kk != "result"} if isinstance(v, dict)
                   else v for k, v in rows.items()}  # fmt: skip
        Path(args.out).write_text(json.dumps({"speed": numbers, "checks": report}, indent=1))


def speculative_only(args: argparse.Namespace) -> None:
    """B = --batch (1 unless chosen) on both engines: sequential DLF and speculative DLF with each
    draft length."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("RAYON_NUM_THREADS", str(args.threads))
    import dlf_rs
    import torch
    from dlf_rs.engines.llamacpp.generate import LlamaCppGenerator

    torch.set_num_threads(args.threads)
    paths = family(args.threads)
    prompts = PROMPTS[: args.prompts]
    n_new = args.max_new_tokens
    ks = args.speculative or [3]
    lc = LlamaCppGenerator.from_gguf(paths["large"], paths["small"], [paths["expert"]],
                                     n_threads=args.threads)  # fmt: skip
    engines: list[tuple[str, Any]] = [("llama.cpp Q4_K_M", lc)]
    if not args.skip_hf:
        hf = dlf_rs.FusedGenerator.from_pretrained(
            paths["large_bf16"], paths["small_bf16"], [paths["expert_bf16"]],
            torch_dtype=torch.bfloat16,
        )  # fmt: skip
        engines.append(("FusedGenerator bf16", hf))
    # Warm-up once everything is loaded (contexts, the GGUFs' mmap pages, torch's kernels).
    for _name, gen in engines:
        gen.generate(prompts[:1], max_new_tokens=8)
        gen.generate(prompts[:1], max_new_tokens=8, speculative=ks[0])
    rows: list[dict[str, Any]] = []
    b = args.batch
    for name, gen in engines:
        seq = timed(gen, prompts, b, n_new)
        rows.append({"engine": name, "mode": "sequential", **seq})
        if gen is lc:  # the members in turn, each on every thread (lanes off)
            lc.parallel_members = False
            rows.append({"engine": name, "mode": "sequential, members in turn",
                         **timed(gen, prompts, b, n_new)})  # fmt: skip
            lc.parallel_members = True
        for k in ks:
            r = timed(gen, prompts, b, n_new, speculative=k)
            res = r["result"]
            pairs = list(zip(res.token_ids, seq["result"].token_ids))
            same = sum(a == b for a, b in pairs)
            firsts = [(i, next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), -1))
                      for i, (a, b) in enumerate(pairs) if a != b]  # fmt: skip
            rows.append({"engine": name, "mode": f"speculative k={k}", **r, "same": same,
                         "first_differences": firsts,
                         "acceptance": res.timings["acceptance"],
                         "large_per_token": res.timings["large_forwards"] / r["tokens"]})  # fmt: skip
    # The first engine's sequential run once more, last: how much the machine drifted.
    again = timed(engines[0][1], prompts, b, n_new)
    rows.append({"engine": engines[0][0], "mode": "sequential, again (last)", **again})
    base = next((r["tok_s"] for r in rows if r["engine"].startswith("FusedGenerator")
                 and r["mode"] == "sequential"), None)  # fmt: skip
    rows_of = "each alone" if b == 1 else f"in batches of {b}"
    print(f"\n## Speculative DLF at B = {b} (one run; {len(prompts)} code prompts, {rows_of}, "
          f"up to {n_new} new tokens, greedy, {args.threads} threads)\n")  # fmt: skip
    print(
        "| engine | mode | tokens | wall s | tokens/s | x FusedGenerator sequential | "
        "acceptance | large fwd / token | tokens = sequential |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['tok_s'] / base:.2f}" if base else "-"
        acc = f"{r['acceptance']:.2f}" if "acceptance" in r else "-"
        lpt = f"{r['large_per_token']:.2f}" if "large_per_token" in r else "-"
        same = f"{r['same']}/{len(prompts)}" if "same" in r else "-"
        print(f"| {r['engine']} | {r['mode']} | {r['tokens']} | {r['wall']:.1f} | "
              f"{r['tok_s']:.2f} | {ratio} | {acc} | {lpt} | {same} |")  # fmt: skip
    for name, _gen in engines:
        spec = [r for r in rows if r["engine"] == name and "acceptance" in r]
        for r in spec:
            t = r["result"].timings
            steps = max(t["steps"], 1.0)
            print(f"{name} {r['mode']}: per round " + ", ".join(
                f"{key} {1e3 * t[key] / steps:.0f} ms" for key in
                ("draft", "verify", "fuse_verify", "sample", "crop")) +
                f"; {r['tokens'] / steps:.2f} tokens per round")  # fmt: skip
            for i, j in r["first_differences"]:
                print(f"  prompt {i}: first token that differs from sequential: {j}")
    if args.out:
        clean = [{k: v for k, v in r.items() if k != "result"} for r in rows]
        Path(args.out).write_text(json.dumps(clean, indent=1))


if __name__ == "__main__":
    main()
