"""The kernels' instruction tiers give the same answers (rust/numerics: `DLF_RS_SIMD`).

Each tier runs in its own process (the tier is fixed once per process). Portable and AVX2
perform the same IEEE operations in the same order: every output is bit-identical. The AVX-512
tier widens the same code (bit-identical too) except the certified summary pass, whose
exponentials use fused multiply-adds: there the weights, tokens and flags of the certificate
must still be identical, and the reported KLs/loss equal to float32 precision.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent

SCRIPT = r"""
import sys, json
import numpy as np
sys.path.insert(0, sys.argv[2])
import dlf_rs
from dlf_rs import _core
from dlf_rs.reference import dense_logits, zipf_logits

rng = np.random.default_rng(11)
out = {"tier": _core.SIMD_TIER}
cases = {}
for t in (1, 3):
    cases[f"zipf{t}"] = zipf_logits(rng, 4, 32000, t)
    cases[f"dense{t}"] = dense_logits(rng, 4, 32000, t)
if len(sys.argv) > 3:  # real rows recorded from the shipped family
    real = np.load(sys.argv[3])
    cases["real1"] = (real["l"], real["s"], real["e"][:1])
    cases["real3"] = (real["l"], real["s"], real["e"])
cases["zipf_masked"] = zipf_logits(rng, 4, 32000, 2, neg_inf_frac=0.05)
large = rng.standard_normal((4, 2000)).astype(np.float32)
small = (large + 0.5 * rng.standard_normal((4, 2000))).astype(np.float32)
cases["flat"] = (large, small, (small + 0.8 * rng.standard_normal((2, 4, 2000))).astype(np.float32))
fields = ("tokens", "alphas", "active", "certified", "fallback", "loss", "kl_fused_large",
          "kl_large_fused", "kl_expert_small", "kl_small_expert")
runs = {
    "default": {},
    "full": {"support_k": 10**6},
    "exact": {"solver": "exact"},
    "own": {"multi_expert": "own-terms"},
    "static": {"alpha": 0.7},
    "sampled": {"temperature": 0.9, "top_p": 0.9},
}
for cname, (l, s, e) in cases.items():
    for rname, kw in runs.items():
        r = dlf_rs.fuse_step(l, s, list(e), seed=5, **kw)
        out[f"{cname}/{rname}"] = {f: np.asarray(getattr(r, f)).tolist() for f in fields}
    fused = dlf_rs.fuse_logits(l, s, list(e), [0.3] * len(e))
    out[f"{cname}/fuse_logits"] = {"logits": fused.view(np.uint32).tolist()}
print(json.dumps(out))
"""

EXACT = ("tokens", "alphas", "active", "certified", "fallback")


def run_tier(tier: str, real: Path | None = None) -> dict:
    env = {**os.environ, "DLF_RS_SIMD": tier}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, "x", str(HERE), *([str(real)] if real else [])],
        env=env, capture_output=True, text=True, check=True, timeout=300,
    )
    return json.loads(proc.stdout)


def record_real_rows(path: Path) -> Path | None:
    """Rows of the shipped family (large_base, small_base, the three small experts): one forward
    pass over held-out qa prompts, every position a row (V = 215). None without torch."""
    try:
        import torch
        from dlf_rs.family import checkpoint, example_prompts
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        return None
    names = ["large_base", "small_base", "small_expert_qa", "small_expert_math",
             "small_expert_summary"]
    tok = AutoTokenizer.from_pretrained(checkpoint("large_base"))
    v = len(tok)
    rows: list[list[np.ndarray]] = [[] for _ in names]
    models = [AutoModelForCausalLM.from_pretrained(checkpoint(n)) for n in names]
    for prompt in example_prompts("qa", 6):
        ids = torch.tensor([tok(prompt)["input_ids"]])
        with torch.inference_mode():
            for m, acc in zip(models, rows, strict=True):
                acc.append(m(ids).logits[0, :, :v].float().numpy())
    arrs = [np.concatenate(a).astype(np.float32) for a in rows]
    np.savez(path, l=arrs[0], s=arrs[1], e=np.stack(arrs[2:]))
    return path


@pytest.fixture(scope="module")
def tiers(tmp_path_factory) -> dict[str, dict]:
    real = record_real_rows(tmp_path_factory.mktemp("real") / "rows.npz")
    return {t: run_tier(t, real) for t in ("portable", "avx2", "avx512")}


def test_portable_and_avx2_are_bit_identical(tiers):
    a, b = tiers["portable"], tiers["avx2"]
    assert a["tier"] == "portable"
    for key in a:
        if key != "tier":
            assert a[key] == b[key], key


def test_avx512_tier_gives_the_same_weights_and_tokens(tiers):
    a, b = tiers["avx2"], tiers["avx512"]
    if b["tier"] != "avx512":
        pytest.skip("this CPU has no AVX-512 (F, VL) with FMA")
    for key in a:
        if key == "tier":
            continue
        for field, va in a[key].items():
            vb = b[key][field]
            if field in EXACT or field == "logits" or "/full" in key or "/static" in key:
                # Outside the certified pass every tier runs the same operations.
                assert va == vb, (key, field)
            else:
                np.testing.assert_allclose(
                    np.asarray(vb, dtype=np.float64), np.asarray(va, dtype=np.float64),
                    rtol=2e-6, atol=1e-9, err_msg=f"{key} {field}",
                )
    # The certified path was exercised (else this compares two full scans).
    assert any(any(v["certified"]) for k, v in b.items() if k.endswith("/default"))


def test_the_cap_is_read_case_blind_and_a_bad_value_is_named() -> None:
    def tier(value: str) -> subprocess.CompletedProcess[str]:
        code = "import dlf_rs; print(dlf_rs._core.SIMD_TIER)"
        env = {**os.environ, "DLF_RS_SIMD": value}
        return subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )

    best = tier("avx512").stdout.strip()
    assert tier(" AVX2 ").stdout.strip() in {"avx2", "portable"}
    assert tier("Portable").stdout.strip() == "portable"
    bad = tier("sse4")
    assert bad.stdout.strip() == best
    assert "DLF_RS_SIMD" in bad.stderr and "'sse4'" not in bad.stderr and '"sse4"' in bad.stderr
