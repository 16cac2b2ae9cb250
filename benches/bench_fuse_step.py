"""Python-side benchmark of one DLF decode step (`make bench-python`).

First, one table per kind of row, side by side (`--kinds`): for each vocabulary size and shape
(B=8 T=1, B=32 T=4), the certified default's median time, the plain full-vocabulary scan it
replaces (support_k=V), the exact solver, the numpy reference's vectorised paper grid
(dlf_rs.reference; at the largest shapes one call), a memory floor (numpy reading every input
array once), the share of rows the default certified, and whether the default equals the full
scan (weights and tokens). The kinds:

- zipf: `reference.zipf_logits`: Zipf-like large and small rows; each expert differs from the
  small model on 300 of its likeliest tokens only (d = z_E - z_S is exactly 0 elsewhere).
- dense: `reference.dense_logits`, shaped like real fine-tunes: the same large and
  small rows; each expert row = small + N(0, s) on every token, s ~ U(0.05, 0.3) per row and
  expert, plus 20 task tokens (uniform over the vocabulary) boosted by U(2, 6) each.
- real: the shipped family (python/dlf_rs/family): large_base, small_base and the small experts
  (qa; for T=3 also math and summary), logits recorded by one forward pass of each model over
  held-out qa prompts followed by their DLF continuation (greedy, 12 new tokens); every decode
  position is a row. Its vocabulary has 215 tokens, so these rows are reported at V=215 only.

`--engine` (alone, or added to a full run) prints the engine table: what
`dlf_rs.engines.fusion.fuse_rows` (vLLM's `compute_logits`) pays per step for the fused logits
of a batch on dense rows, V = 49,152 and 151,936, B = 1, 8, 16, T = 1 and 2, greedy-core
options as the engine passes them: before, `fuse_step` for the weights then `fuse_logits` for
the fused logits (two calls, two passes over every model row); after, one `fuse_step` writing
them into `fused_out`; and the step alone for scale. The calls alternate so that the ratio
before / after is taken in one run under the same load.

Then (unless `--quick`) the older detail tables on Zipf rows at V=32000: support_k=256/1024 and a
vectorised torch (CPU) paper grid, the certified/fallback rates on Zipf and flat Gaussian rows,
and the pruning-error figures. `--rows FILE` adds a table of real models' rows recorded by
`python -m dlf_rs.real_family record` (Qwen2.5-Coder 1.5B / 0.5B, V=151,936). Timing is
reported, never asserted. `--quick` (V=32000 only,
shorter samples, no detail tables) runs in a few minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import dlf_rs
from dlf_rs.reference import dense_logits, objective_row, paper_grid_numpy, zipf_logits

try:
    import torch
except ImportError:  # the torch column is skipped
    torch = None


def paper_grid_torch(large, small, experts, lo=0.0, hi=2.0, step=0.1):
    """The paper's grid as a PyTorch user would vectorise it: fused logits [G, B, V] per expert,
    log-softmax and both KLs over the vocabulary, one-active argmin (a-major, then expert)."""
    n = int(np.floor((hi - lo) / step + 1e-9))
    grid = torch.tensor([min(lo + i * step, hi) for i in range(n + 1)], dtype=torch.float32)
    lp, lq = torch.log_softmax(large, -1), torch.log_softmax(small, -1)

    def kl(la, lb):
        return (la.exp() * (la - lb)).sum(-1)

    targets = []
    for e in experts:
        lqt = torch.log_softmax(e, -1)
        targets.append((kl(lqt, lq), kl(lq, lqt)))
    js = []
    for e in experts:
        lf = torch.log_softmax(large[None] + grid[:, None, None] * (e - small)[None], -1)
        fl, lf_ = kl(lf, lp[None]), kl(lp[None], lf)
        js.append(sum((fl - a) ** 2 + (lf_ - b) ** 2 for a, b in targets))
    j = torch.stack(js, 1).reshape(grid.numel() * len(experts), -1)
    best = j.argmin(0)
    return grid[best // len(experts)], best % len(experts)


def median_time(
    fn: Callable[[], object], repeats: int, budget_s: float = 4.0, min_s: float = 0.5
) -> float:
    """Median of the timed calls after a warm-up of at least 0.3 s (one call when a call is
    slower than that): on this machine a core coming out of idle runs the first milliseconds
    at a fraction of its speed, which one warm-up call does not cover and which made short
    calls read up to 2x slow. Samples: at least `repeats` and at least `min_s` seconds of calls,
    stopping once `budget_s` is spent; a call slower than 1 s is its own warm-up and sample."""
    t = time.perf_counter()
    fn()
    first = time.perf_counter() - t
    if first > 1.0:
        times: list[float] = [first]
    else:
        times = []
        while time.perf_counter() - t < 0.3:
            fn()
    start = time.perf_counter()
    while (len(times) < repeats or time.perf_counter() - start < min_s) and (
        time.perf_counter() - start < budget_s or not times
    ):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def read_once(arrays: list[np.ndarray]) -> None:
    for a in arrays:
        np.add.reduce(a, axis=None)


def bench_case(batch: int, vocab: int, n_exp: int, repeats: int) -> None:
    rng = np.random.default_rng(batch * 1000 + n_exp)
    large, small, experts = zipf_logits(rng, batch, vocab, n_exp)
    ex = list(experts)
    rows: dict[str, float] = {}
    rows["fuse_step grid (default)"] = median_time(
        lambda: dlf_rs.fuse_step(large, small, ex), repeats
    )
    rows["fuse_step grid, full scan"] = median_time(
        lambda: dlf_rs.fuse_step(large, small, ex, support_k=vocab), repeats
    )
    for k in (256, 1024):
        rows[f"fuse_step grid, support_k={k}"] = median_time(
            lambda k=k: dlf_rs.fuse_step(large, small, ex, support_k=k), repeats
        )
    rows["fuse_step exact"] = median_time(
        lambda: dlf_rs.fuse_step(large, small, ex, solver="exact"), max(3, repeats // 3)
    )
    rows["numpy paper grid"] = median_time(
        lambda: paper_grid_numpy(large, small, ex), max(3, repeats // 3)
    )
    if torch is not None:
        tl, ts = torch.from_numpy(large), torch.from_numpy(small)
        te = [torch.from_numpy(e) for e in ex]
        with torch.inference_mode():
            rows["torch CPU paper grid"] = median_time(
                lambda: paper_grid_torch(tl, ts, te), max(3, repeats // 3)
            )
    floor = median_time(lambda: read_once([large, small, *ex]), repeats)
    rows["numpy read-once floor"] = floor

    # Sanity: the three grid implementations choose the same weights (up to float ties).
    a_np, _ = paper_grid_numpy(large, small, ex)
    res = dlf_rs.fuse_step(large, small, ex)
    a_rs = res.alphas
    agree = float(np.mean(np.all(np.isclose(a_np, a_rs, atol=1e-6), axis=1)))
    scan = dlf_rs.fuse_step(large, small, ex, support_k=vocab)
    same = bool(np.array_equal(res.alphas, scan.alphas) and np.array_equal(res.tokens, scan.tokens))

    grid_np = rows["numpy paper grid"]
    grid_t = rows.get("torch CPU paper grid", float("nan"))
    print(
        f"\nB={batch} V={vocab} T={n_exp}  (grid alphas agree with numpy on {agree:.0%} of rows; "
        f"default certified on {res.certified.mean():.0%} of rows, identical to the full scan: "
        f"{same})"
    )
    print(
        f"  {'':32s} {'median ms':>10s} {'vs numpy grid':>14s} {'vs torch grid':>14s} "
        f"{'/ read floor':>13s}"
    )
    for name, t in rows.items():
        print(
            f"  {name:32s} {t * 1e3:10.3f} {grid_np / t:13.1f}x {grid_t / t:13.1f}x "
            f"{t / floor:12.1f}x"
        )
    d = rows["fuse_step grid (default)"]
    print(
        f"  goals: default / read floor {d / floor:.1f}x (goal <= 3x at B=32 T=4); "
        f"numpy grid / default {grid_np / d:.0f}x (goal >= 200x at B=8 T=1); "
        f"exact / default {rows['fuse_step exact'] / d:.1f}x, exact / full scan "
        f"{rows['fuse_step exact'] / rows['fuse_step grid, full scan']:.1f}x (goal <= 2x)"
    )


def certified_rates(n_rows: int = 64, vocab: int = 32000) -> None:
    """How often the default proves the full-vocabulary answer without the full scan."""
    rng = np.random.default_rng(7)
    print(f"\nCertified / fallback rows of the default (grid, V={vocab}, {n_rows} rows each):")
    for n_exp in (1, 4):
        zipf = zipf_logits(rng, n_rows, vocab, n_exp)
        large, small, _ = flat_logits(rng, n_rows, vocab)
        flat_e = (small[None] + 0.8 * rng.standard_normal((n_exp, n_rows, vocab))).astype(
            np.float32
        )
        for name, (lg, sm, ex) in (("Zipf", zipf), ("flat Gaussian", (large, small, flat_e))):
            r = dlf_rs.fuse_step(lg, sm, list(ex))
            # What the attempt costs (or saves) against the plain full scan on the same rows.
            args = (lg, sm, list(ex))
            t_def = median_time(lambda a=args: dlf_rs.fuse_step(*a), 5)
            t_full = median_time(lambda a=args: dlf_rs.fuse_step(*a, support_k=vocab), 5)
            print(
                f"  T={n_exp} {name:14s} certified {r.certified.mean():6.1%}  fallback "
                f"{r.fallback.mean():6.1%}  default {t_def * 1e3:7.2f} ms, full scan "
                f"{t_full * 1e3:7.2f} ms ({t_def / t_full:.2f}x)"
            )


def flat_logits(rng: np.random.Generator, n_rows: int, vocab: int) -> tuple[np.ndarray, ...]:
    """High-entropy rows (Gaussian logits, sd 1): the hard case for pruning, where the tail holds
    most of the mass."""
    large = rng.standard_normal((n_rows, vocab)).astype(np.float32)
    small = (large + 0.5 * rng.standard_normal((n_rows, vocab))).astype(np.float32)
    expert = (small + 0.8 * rng.standard_normal((n_rows, vocab))).astype(np.float32)
    return large, small, expert[None]


def pruning_figures(
    n_rows: int = 200, vocab: int = 32000, k: int = 256, flat: bool = False
) -> None:
    rng = np.random.default_rng(2024)
    if flat:
        large, small, experts = flat_logits(rng, n_rows, vocab)
    else:
        large, small, experts = zipf_logits(rng, n_rows, vocab, 1)
    full = dlf_rs.fuse_step(large, small, experts)
    pruned = dlf_rs.fuse_step(large, small, experts, support_k=k)
    j_err, subopt = [], []
    for b in range(n_rows):
        ze = [experts[0, b]]
        j0 = objective_row(large[b], small[b], ze, [0.0])
        j_p = objective_row(large[b], small[b], ze, pruned.alphas[b].astype(np.float64))
        j_f = objective_row(large[b], small[b], ze, full.alphas[b].astype(np.float64))
        j_err.append(abs(float(pruned.loss[b]) - j_p) / j0)
        subopt.append((j_p - j_f) / j0)
    differs = float(np.mean(np.any(full.alphas != pruned.alphas, axis=1)))
    print(
        f"\nPruning support_k={k} vs full vocabulary (grid, {n_rows} {'flat Gaussian' if flat else 'Zipf'}"
        f" rows, V={vocab}, T=1): "
        f"alpha differs in {differs:.1%} of rows (max |d alpha| "
        f"{np.max(np.abs(full.alphas - pruned.alphas)):.2f}); |J_pruned - J_full| at the pruned "
        f"alpha / J(0): max {max(j_err):.1e}, median {np.median(j_err):.1e}; J_full suboptimality"
        f" / J(0): max {max(subopt):.1e}; mean support {pruned.support_size.mean():.0f} tokens"
    )


VOCABS = (32000, 128256, 151936)
SHAPES = ((8, 1), (32, 4))


def real_rows(n_prompts: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(large [N, 215], small [N, 215], experts [3, N, 215]) float32 from the shipped family:
    every decode position of held-out qa prompts continued by DLF (12 greedy tokens)."""
    import torch as th
    from dlf_rs.family import checkpoint, example_prompts

    names = ("small_expert_qa", "small_expert_math", "small_expert_summary")
    gen = dlf_rs.FusedGenerator.from_pretrained(
        checkpoint("large_base"), checkpoint("small_base"), [checkpoint(n) for n in names]
    )
    prompts = example_prompts("qa", n_prompts)
    out = gen.generate(prompts, max_new_tokens=12)
    v = gen.vocab_size
    models = [gen.large, gen.small, *gen.experts]
    rows: list[list[np.ndarray]] = [[] for _ in models]
    for prompt, new in zip(prompts, out.token_ids, strict=True):
        ids = list(gen.tokenizer(prompt, add_special_tokens=True)["input_ids"])
        full = th.tensor([ids + list(new)])
        with th.inference_mode():
            for m, acc in zip(models, rows, strict=True):
                z = m(full).logits[0, len(ids) - 1 : full.shape[1] - 1, :v]
                acc.append(z.float().numpy())
    arrs = [np.concatenate(a).astype(np.float32) for a in rows]
    return arrs[0], arrs[1], np.stack(arrs[2:])


def kind_row(
    large: np.ndarray, small: np.ndarray, experts: np.ndarray, quick: bool
) -> dict[str, float]:
    """One line of a kind's table: medians in seconds, the certified share, identical or not."""
    vocab = large.shape[1]
    ex = list(experts)
    budget = 1.0 if quick else 3.0
    work = large.size * (1 + len(ex))
    slow = work * len(ex) > 8 * 128256 * 4  # numpy's grid takes seconds: one call
    out: dict[str, float] = {}
    res = dlf_rs.fuse_step(large, small, ex)
    scan = dlf_rs.fuse_step(large, small, ex, support_k=vocab)
    out["certified"] = float(res.certified.mean())
    out["same"] = float(
        np.array_equal(res.alphas, scan.alphas) and np.array_equal(res.tokens, scan.tokens)
    )
    out["default"] = median_time(lambda: dlf_rs.fuse_step(large, small, ex), 9, budget)
    out["full"] = median_time(
        lambda: dlf_rs.fuse_step(large, small, ex, support_k=vocab), 5, budget
    )
    out["exact"] = median_time(
        lambda: dlf_rs.fuse_step(large, small, ex, solver="exact"), 3, budget
    )
    out["grid"] = median_time(
        lambda: paper_grid_numpy(large, small, ex), 1 if slow else 3, budget, 0.0 if slow else 0.5
    )
    out["floor"] = median_time(lambda: read_once([large, small, *ex]), 9, budget)
    return out


def print_kind(title: str, lines: list[tuple[str, dict[str, float]]]) -> None:
    print(f"\n{title}")
    print(
        f"  {'shape':22s} {'certified':>9s} {'default':>9s} {'full scan':>9s} {'exact':>9s} "
        f"{'numpy grid':>10s} {'read floor':>10s} {'grid/def':>8s} {'def/floor':>9s} "
        f"{'exact/def':>9s} {'= scan':>6s}"
    )
    for shape, r in lines:
        print(
            f"  {shape:22s} {r['certified']:9.0%} {r['default'] * 1e3:9.3f} "
            f"{r['full'] * 1e3:9.3f} {r['exact'] * 1e3:9.3f} {r['grid'] * 1e3:10.1f} "
            f"{r['floor'] * 1e3:10.3f} {r['grid'] / r['default']:7.0f}x "
            f"{r['default'] / r['floor']:8.1f}x {r['exact'] / r['default']:8.1f}x "
            f"{'yes' if r['same'] else 'NO':>6s}"
        )


def three_kinds(kinds: list[str], vocabs: tuple[int, ...], quick: bool) -> None:
    print(
        "\nRow kinds side by side (median ms per fuse_step call; grid/def = numpy paper grid / "
        "default, def/floor = default / numpy read-once floor; = scan: the default's weights and "
        "tokens equal the full scan's)"
    )
    for kind in kinds:
        lines: list[tuple[str, dict[str, float]]] = []
        if kind == "real":
            large, small, experts = real_rows()
            n = large.shape[0]
            cert = dlf_rs.fuse_step(large, small, list(experts[:1])).certified.mean()
            cert3 = dlf_rs.fuse_step(large, small, list(experts)).certified.mean()
            for b, t in ((8, 1), (32, 1), (32, 3)):
                lines.append(
                    (
                        f"V={large.shape[1]} B={b} T={t}",
                        kind_row(large[:b], small[:b], experts[:t, :b], quick),
                    )
                )
            print_kind(
                f"real rows (shipped family, V={large.shape[1]}: its own vocabulary; {n} decode "
                f"rows of held-out qa prompts; certified over all {n} rows: {cert:.0%} with the "
                f"qa expert, {cert3:.0%} with all three)",
                lines,
            )
            continue
        make = zipf_logits if kind == "zipf" else dense_logits
        for v in vocabs:
            for b, t in SHAPES:
                rng = np.random.default_rng(b * 1000 + t + v)
                large, small, experts = make(rng, b, v, t)
                lines.append((f"V={v} B={b} T={t}", kind_row(large, small, experts, quick)))
        print_kind(
            "Zipf rows (experts move 300 head tokens; d = 0 elsewhere)"
            if kind == "zipf"
            else "dense rows (experts = small + N(0, 0.05..0.3) everywhere + 20 tokens +2..+6)",
            lines,
        )


def recorded_rows(path: str, quick: bool) -> None:
    """A table of rows recorded by ``python -m dlf_rs.real_family record`` (real models' logits
    of greedy DLF decoding: large, small and the expert at every step), in batches of 8 and 32
    consecutive rows, T = 1, plus the certified share over every recorded row."""
    from dlf_rs.real_family.record import load_rows

    arrays, meta = load_rows(path)
    large, small = arrays["large"], arrays["small"]
    n_exp = int(meta.get("experts", "1"))
    experts = np.stack([arrays[f"expert_{t}"] for t in range(n_exp)])
    n, v = large.shape
    cert = dlf_rs.fuse_step(large, small, list(experts)).certified.mean()
    lines = [(f"V={v} B={b} T={n_exp}", kind_row(large[:b], small[:b], experts[:, :b], quick))
             for b in (8, 32) if b <= n]  # fmt: skip
    try:
        models = ", ".join(f"{k} {os.path.basename(str(d))}"
                           for k, d in json.loads(meta.get("models", "{}")).items())  # fmt: skip
    except ValueError:
        models = "?"
    print_kind(
        f"recorded rows ({os.path.basename(path)}: {models}; {n} rows; "
        f"certified over all rows: {cert:.0%})",
        lines,
    )


def paired_medians(fns: dict[str, Callable[[], object]], min_s: float) -> dict[str, float]:
    """Median seconds per call of each function, the calls interleaved round by round (after a
    0.3 s warm-up of each) so that drift in the machine's load hits them alike."""
    for fn in fns.values():
        t = time.perf_counter()
        while time.perf_counter() - t < 0.3:
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    start = time.perf_counter()
    while time.perf_counter() - start < min_s or len(next(iter(times.values()))) < 5:
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: float(np.median(v)) for k, v in times.items()}


def engine_fusion(quick: bool) -> None:
    """fuse_rows before (fuse_step, then fuse_logits) and after (fuse_step with fused_out)."""
    from dlf_rs.engines.fusion import fuse_rows, greedy_options
    from dlf_rs.step import fuse_step_prepared

    opts = dlf_rs.StepOptions()
    core_opts = greedy_options(opts)
    print(
        "\nEngine fusion (dlf_rs.engines.fusion.fuse_rows, method dlf, dense rows; median ms per "
        "step, calls interleaved; before = fuse_step then fuse_logits, after = fuse_step with "
        "fused_out)"
    )
    print(
        f"  {'shape':22s} {'step alone':>10s} {'before':>9s} {'after':>9s} "
        f"{'before/after':>12s} {'same':>5s}"
    )
    for v in (49152, 151936):
        for t in (1, 2):
            for b in (1, 8, 16):
                rng = np.random.default_rng(b * 1000 + t + v)
                large, small, experts = dense_logits(rng, b, v, t)
                ex = [np.ascontiguousarray(e) for e in experts]

                def before(large=large, small=small, ex=ex) -> np.ndarray:
                    # fuse_rows as it was: the weights from the step, a second fusion pass.
                    fused = np.empty_like(large)
                    w = fuse_step_prepared(large, small, ex, core_opts, None).alphas
                    fused[:] = dlf_rs.fuse_logits(large, small, ex, np.ascontiguousarray(w))
                    return fused

                def after(large=large, small=small, ex=ex, b=b) -> np.ndarray:
                    return fuse_rows(large, small, ex, [opts] * b)[0]

                def step(large=large, small=small, ex=ex) -> object:
                    return fuse_step_prepared(large, small, ex, core_opts, None)

                same = bool(np.array_equal(before(), after()))
                r = paired_medians(
                    {
                        "step": step,
                        "before": before,
                        "after": after,
                    },
                    0.5 if quick else 2.0,
                )
                print(
                    f"  {f'V={v} B={b} T={t}':22s} {r['step'] * 1e3:10.3f} "
                    f"{r['before'] * 1e3:9.3f} {r['after'] * 1e3:9.3f} "
                    f"{r['before'] / r['after']:11.2f}x {'yes' if same else 'NO':>5s}"
                )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kinds", default="zipf,dense,real", help="comma-separated: zipf, dense, real")
    ap.add_argument("--vocab", type=int, nargs="+", help="vocabulary sizes of the synthetic rows")
    ap.add_argument(
        "--quick", action="store_true", help="V=32000 only, short samples, no detail tables"
    )
    ap.add_argument("--rows", metavar="FILE", help="also a table of recorded real rows "
                    "(python -m dlf_rs.real_family record)")  # fmt: skip
    ap.add_argument("--engine", action="store_true", help="the engine fusion table (fuse_rows "
                    "before / after fused_out); alone unless --kinds is given")  # fmt: skip
    args = ap.parse_args()
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    bad = [k for k in kinds if k not in ("zipf", "dense", "real")]
    if bad:
        ap.error(f"--kinds: unknown {bad}; expected zipf, dense, real")
    vocabs = tuple(args.vocab) if args.vocab else ((32000,) if args.quick else VOCABS)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"dlf_rs {dlf_rs.__version__} (kernels: {dlf_rs._core.SIMD_TIER}); numpy {np.__version__}"
        + (f"; torch {torch.__version__} ({torch.get_num_threads()} threads)" if torch else "")
        + f"; load average {load:.2f}"
    )
    if args.engine:
        engine_fusion(args.quick)
        if "--kinds" not in sys.argv:
            return
    three_kinds(kinds, vocabs, args.quick)
    if args.rows:
        recorded_rows(args.rows, args.quick)
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")
    if args.quick:
        return
    bench_case(1, 32000, 1, repeats=15)
    bench_case(8, 32000, 1, repeats=9)
    bench_case(32, 32000, 4, repeats=5)
    certified_rates()
    for flat in (False, True):
        pruning_figures(k=256, flat=flat)
        pruning_figures(k=1024, flat=flat)


if __name__ == "__main__":
    main()
