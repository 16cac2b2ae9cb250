"""Memory soak (issue #14): resident memory over many calls, printed at checkpoints.

    python benches/soak.py                 # 20,000 fuse_step calls + 200 generate calls
    python benches/soak.py --steps 2000 --generates 20   # a quick one

1. 20,000 fuse_step calls of mixed sizes and options (grid/exact, support_k, sampling, static
   weights, -inf entries, refused calls): RSS every 2,000 calls and the growth after warm-up.
2. Scratch returned after an unusually large call: RSS before one large fuse_step, after it and
   after 200 small calls that follow (issue #14 saw 39 -> 283 MB kept).
3. 200 FusedGenerator.generate calls on the shipped tiny family on CPU (dlf, static, sampled):
   RSS every 20 calls and the growth after warm-up.

RSS is read from /proc/self/status (VmRSS; resource's ru_maxrss, a peak, where /proc is absent).
It is a report: exit status 0; --strict exits 1 when a growth passes its --limit-mb.
"""

from __future__ import annotations

import argparse
import gc
import resource
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import dlf_rs
from dlf_rs.reference import zipf_logits

FAMILY = ROOT / "python" / "dlf_rs" / "family" / "checkpoints"


def rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fuse_soak(n_calls: int) -> tuple[float, float]:
    """Mixed fuse_step calls; returns (RSS after warm-up, RSS at the end)."""
    rng = np.random.default_rng(0)
    sizes = [(1, 64, 1), (4, 512, 2), (8, 2048, 3), (2, 8192, 1), (3, 32000, 2)]
    data = {s: zipf_logits(rng, s[0], s[1], s[2], neg_inf_frac=0.05) for s in sizes}
    options = [
        {},
        {"solver": "exact"},
        {"support_k": 64},
        {"temperature": 0.8, "top_p": 0.9, "seed": 1},
        {"temperature": 1.0, "top_k": 20, "min_p": 0.05, "seed": 7},
        {"alpha_range": (-1.0, 1.0), "grid_step": 0.05},
        {"static": True},
        {"refused": True},
    ]
    warm = start = rss_mb()
    print(f"fuse_step soak: {n_calls} calls over sizes (B, V, T) {sizes}")
    print(f"{'calls':>8} {'RSS MB':>9}")
    print(f"{0:>8} {start:>9.1f}")
    t0 = time.monotonic()
    for i in range(1, n_calls + 1):
        # Mostly small rows, one in 50 at V = 32000.
        size = sizes[4] if i % 50 == 0 else sizes[i % 4]
        large, small, experts = data[size]
        opt = dict(options[i % len(options)])
        if opt.pop("static", False):
            opt["alpha"] = [0.5] * size[2]
        if opt.pop("refused", False):
            try:
                dlf_rs.fuse_step(large, small, experts, temperature=-1.0)
            except dlf_rs.DlfError:
                pass
            continue
        res = dlf_rs.fuse_step(large, small, experts, **opt)
        assert res.tokens.shape == (size[0],)
        if i == min(1000, n_calls):
            warm = rss_mb()
        if i % max(1, n_calls // 10) == 0:
            print(f"{i:>8} {rss_mb():>9.1f}")
    end = rss_mb()
    print(
        f"fuse_step soak: {time.monotonic() - t0:.0f} s; RSS after {min(1000, n_calls)} calls "
        f"{warm:.1f} MB, "
        f"at the end {end:.1f} MB: growth {end - warm:+.1f} MB"
    )
    return warm, end


def scratch_check(n_small: int = 200) -> tuple[float, bool]:
    """One large call then small calls; returns (RSS after the small calls minus before, whether
    the scratch was returned: at most a quarter of it, plus 8 MB, is kept)."""
    rng = np.random.default_rng(1)
    small_in = zipf_logits(rng, 2, 256, 1)
    for _ in range(20):
        dlf_rs.fuse_step(*small_in)
    gc.collect()
    before = rss_mb()
    b, v, t = 32, 128_000, 2
    big = zipf_logits(rng, b, v, t, n_perturbed=300)
    inputs_mb = sum(x.nbytes for x in big) / 2**20
    after_inputs = rss_mb()
    dlf_rs.fuse_step(*big, alpha_range=(-2.0, 2.0), grid_step=0.1)
    after_large = rss_mb()
    del big
    gc.collect()
    for _ in range(n_small):
        dlf_rs.fuse_step(*small_in)
    after_small = rss_mb()
    kept = after_small - before
    returned = kept < 0.25 * (after_large - after_inputs) + 8
    print(f"\nscratch after a large call (B={b}, V={v}, T={t}, inputs {inputs_mb:.0f} MB):")
    print(
        f"  RSS before {before:.1f} MB; inputs built {after_inputs:.1f} MB; after the large call "
        f"{after_large:.1f} MB (+{after_large - after_inputs:.1f} MB scratch); "
        f"after {n_small} small calls (inputs freed) {after_small:.1f} MB"
    )
    print(
        f"  kept after the large call: {kept:+.1f} MB "
        f"({'returned' if returned else 'NOT returned'})"
    )
    return kept, returned


def generate_soak(n_calls: int) -> tuple[float, float]:
    import torch

    torch.manual_seed(0)
    gen = dlf_rs.FusedGenerator.from_pretrained(
        large=str(FAMILY / "large_base"),
        small=str(FAMILY / "small_base"),
        experts=[str(FAMILY / "small_expert_qa")],
        device="cpu",
    )
    prompts = ["Q: Where does Ada live? A:", "Q: What does Bo do? A:", "Q: Who is Cy? A:"]
    kinds = [
        {"method": "dlf"},
        {"method": "static", "alpha": 1.0},
        {"method": "dlf", "temperature": 0.9, "top_p": 0.9, "seed": 3},
        {"method": "large"},
    ]
    print(f"\ngenerate soak: {n_calls} calls, {len(prompts)} prompts, 12 new tokens, CPU")
    print(f"{'calls':>8} {'RSS MB':>9}")
    start = warm = rss_mb()
    print(f"{0:>8} {start:>9.1f}")
    t0 = time.monotonic()
    for i in range(1, n_calls + 1):
        batch = prompts[: 1 + i % len(prompts)]
        res = gen.generate(batch, max_new_tokens=12, **kinds[i % len(kinds)])
        assert len(res.texts) == len(batch)
        if i == min(20, n_calls):
            warm = rss_mb()
        if i % max(1, n_calls // 10) == 0:
            print(f"{i:>8} {rss_mb():>9.1f}")
    end = rss_mb()
    print(
        f"generate soak: {time.monotonic() - t0:.0f} s; RSS after {min(20, n_calls)} calls "
        f"{warm:.1f} MB, at "
        f"the end {end:.1f} MB: growth {end - warm:+.1f} MB"
    )
    return warm, end


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20_000)
    ap.add_argument("--generates", type=int, default=200)
    ap.add_argument("--limit-mb", type=float, default=20.0, help="growth counted as a leak")
    ap.add_argument("--strict", action="store_true")
    args = ap.parse_args()
    warm, end = fuse_soak(args.steps)
    kept, returned = scratch_check()
    gwarm, gend = generate_soak(args.generates) if args.generates else (0.0, 0.0)
    bad = [
        name
        for name, growth in (("fuse_step", end - warm), ("generate", gend - gwarm))
        if growth > args.limit_mb
    ] + ([] if returned else ["scratch not returned"])
    print(
        f"\nsummary: fuse_step growth {end - warm:+.1f} MB, kept after a large call "
        f"{kept:+.1f} MB, generate growth {gend - gwarm:+.1f} MB (limit {args.limit_mb:.0f} MB)"
        f"{'; bad: ' if bad else ''}{', '.join(bad)}"
    )
    return 1 if args.strict and bad else 0


if __name__ == "__main__":
    sys.exit(main())
