"""vLLM's speculative decoding on the fused model (docs/vllm.md, "Speculative decoding").

Under speculation vLLM runs no custom logits processor, so the fused model fuses every scheduled
position with the directory's defaults in ``compute_logits`` (k + 1 per request when verifying k
drafts) and vLLM's rejection sampler verifies the drafts against those fused logits. Checked here,
float32 on the tiny family: greedy tokens equal the fused model's without speculation (n-gram
proposer; draft-model proposer drafting with the large member), logprobs too, the sampled
distribution is kept, ``dlf_*`` request options are refused naming the field, and ``dlf-rs
serve ... -- --speculative-config`` starts and answers 400 for them.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

vllm = pytest.importorskip("vllm")

import dlf_rs.engines.vllm as dv
from dlf_rs.engines.vllm.serve import processor_arguments, speculates
from family import TOKENIZER, build_member
from vllm import SamplingParams

WORDS = ["kubrai", "moulos", "lives", "in", "fenrick", ".", "the", "apple", "who", "is", "has", "2", "apples", "works", "as", "a", "miner", "trader", "healer"]  # fmt: skip
MAX_NEW = 24
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4,
         "prompt_lookup_min": 2}  # fmt: skip
ENGINE = {
    "dtype": "float32",
    "enforce_eager": True,
    "max_model_len": 256,
    "max_num_seqs": 16,
    "seed": 0,
    "disable_log_stats": False,
}


def prompts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    out = [" ".join(rng.choice(WORDS, size=int(k))) for k in rng.integers(1, 20, size=n)]
    # a prompt that repeats itself, so that the n-gram proposer has something to look up
    return out + ["the apple who is 2 apples the apple who is 2 apples the apple who is"]


def _expert(small: Path, out: Path, scale: float, seed: int) -> Path:
    """The small base plus a small seeded perturbation: the fused model stays close to the large
    model, so drafts from the large member are often (not always) accepted."""
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    for f in small.iterdir():
        if f.suffix != ".safetensors":
            (out / f.name).write_bytes(f.read_bytes())
    g = torch.Generator().manual_seed(seed)
    weights = load_file(str(small / "model.safetensors"))
    weights = {
        k: v + scale * v.std() * torch.randn(v.shape, generator=g) for k, v in weights.items()
    }
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("spec_family")
    vocab = len(json.loads((TOKENIZER / "tokenizer.json").read_text())["model"]["vocab"])
    paths = {"large": build_member(root / "large", "large", 1, vocab),
             "small": build_member(root / "small", "small", 2, vocab)}  # fmt: skip
    paths["expert0"] = _expert(paths["small"], root / "expert0", 0.1, 3)
    paths["fused"] = dv.build_fused_dir(root / "fused", paths["large"], paths["small"],
                                        [paths["expert0"]])  # fmt: skip
    return paths


@pytest.fixture(scope="module")
def plain(family):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    llm = dv.llm(family["fused"], **ENGINE, max_logprobs=-1)
    yield llm
    del llm


@pytest.fixture(scope="module")
def ngram(family):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    llm = dv.llm(family["fused"], speculative_config=NGRAM, **ENGINE)
    yield llm
    del llm


@pytest.fixture(scope="module")
def drafted(family):
    """The draft-model proposer drafting with the large member's own checkpoint; a plain
    ``vllm.LLM`` (the plugin attaches the processor, and drops it again under speculation)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    spec = {"method": "draft_model", "model": str(family["large"]), "num_speculative_tokens": 3}
    llm = vllm.LLM(model=str(family["fused"]), speculative_config=spec, **ENGINE)
    yield llm
    del llm


def _counts(llm) -> dict[str, float]:
    return {m.name.removeprefix("vllm:spec_decode_num_"): float(m.value)
            for m in llm.get_metrics()
            if m.name.startswith("vllm:spec_decode_num_") and hasattr(m, "value")}  # fmt: skip


def _greedy(llm, ps: list[str]) -> tuple[list[list[int]], list[list[dict[int, float]]]]:
    outs = llm.generate(ps, SamplingParams(temperature=0, max_tokens=MAX_NEW, logprobs=2,
                                           ignore_eos=True), use_tqdm=False)  # fmt: skip
    toks = [list(o.outputs[0].token_ids) for o in outs]
    lps = [[{k: v.logprob for k, v in d.items()} for d in o.outputs[0].logprobs] for o in outs]
    return toks, lps


def _same_greedy(got, want, want_lps) -> list[str]:
    """Rows that differ must first differ at a proven tie of the fused model (its top two
    log-probabilities within 1e-4, where float32 kernels of other shapes may order them either
    way); returns those rows."""
    ties = []
    for b, (g, w) in enumerate(zip(got, want, strict=True)):
        if g == w:
            continue
        j = next(i for i, (x, y) in enumerate(zip(g, w)) if x != y)
        top = sorted(want_lps[b][j].values(), reverse=True)
        assert top[0] - top[1] < 1e-4, f"row {b} differs at {j} ({g} vs {w}), gap {top[0] - top[1]}"
        ties.append(f"row {b} step {j}")
    return ties


@pytest.mark.parametrize("proposer", ["ngram", "drafted"])
def test_greedy_equals_fused_without_speculation(request, plain, proposer) -> None:
    llm = request.getfixturevalue(proposer)
    cfg = llm.llm_engine.vllm_config
    assert cfg.speculative_config is not None
    assert not any("dlf_rs" in str(p) for p in cfg.model_config.logits_processors or [])
    ps = prompts(12, seed=1)
    want, want_lps = _greedy(plain, ps)
    before = _counts(llm)
    got, got_lps = _greedy(llm, ps)
    c = {k: v - before.get(k, 0) for k, v in _counts(llm).items()}
    ties = _same_greedy(got, want, want_lps)
    assert len(ties) <= 1, ties
    print(f"{proposer}: drafted {c.get('draft_tokens', 0):.0f}, accepted "
          f"{c.get('accepted_tokens', 0):.0f}, ties {ties}")  # fmt: skip
    assert c.get("draft_tokens", 0) > 0  # the proposer drafted, and the drafts were verified
    if proposer == "drafted":  # the large member is close to the fused model here: both outcomes
        assert 0 < c["accepted_tokens"] < c["draft_tokens"]
    # the verified positions' log-probabilities are the fused model's own (the rejection
    # sampler's target distribution): equal to float32 precision where the tokens agree
    for b in range(len(ps)):
        for j, (g, w) in enumerate(zip(got_lps[b], want_lps[b])):
            if got[b][: j + 1] != want[b][: j + 1]:
                break
            for tok, lp in w.items():
                assert tok in g and abs(g[tok] - lp) < 1e-4, (b, j, tok, g, w)


def _exact_second_token(llm, prompt: str, temperature: float) -> np.ndarray:
    """The fused model's distribution of the second sampled token at ``temperature``:
    sum over first tokens t1 of p(t1) p(. | t1), from full-vocabulary log-probabilities of the
    engine without speculation (first tokens below 1e-4 left out: under 1e-2 of mass in all)."""
    from vllm.inputs import TokensPrompt

    def dist(ids: list[int]) -> np.ndarray:
        out = llm.generate([TokensPrompt(prompt_token_ids=ids)],
                           SamplingParams(temperature=0, max_tokens=1, logprobs=-1),
                           use_tqdm=False)[0]  # fmt: skip
        lp = out.outputs[0].logprobs[0]
        z = np.full(max(lp) + 1, -np.inf)
        for tok, v in lp.items():
            z[tok] = v.logprob
        z = z / temperature
        e = np.exp(z - z.max())
        return e / e.sum()

    ids = list(llm.generate([prompt], SamplingParams(max_tokens=1), use_tqdm=False)[0]
               .prompt_token_ids)  # fmt: skip
    p1 = dist(ids)
    total = np.zeros_like(p1)
    for t1 in np.flatnonzero(p1 > 1e-4):
        total += p1[t1] * dist([*ids, int(t1)])
    assert total.sum() > 0.99
    return total


def _chi2(counts: Counter, p: np.ndarray, n: int) -> tuple[float, int]:
    """Pearson's statistic of ``counts`` against ``p`` over bins of expected count >= 5 (the
    rest pooled), and its degrees of freedom."""
    bins = [t for t in range(len(p)) if n * p[t] >= 5]
    rest = [t for t in range(len(p)) if t not in bins]
    obs = [counts[t] for t in bins] + [sum(counts[t] for t in rest)]
    exp = [n * p[t] for t in bins] + [n * (1 - sum(p[t] for t in bins))]
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp) if e > 0)
    return stat, len(obs) - 1


def test_sampling_distribution_kept(plain, drafted) -> None:
    """Sampled at temperature 1.5 (seeded per request: deterministic): under speculation (drafts
    from the large member, verified by vLLM's rejection sampler against the fused logits) the
    second token follows the fused model's exact distribution; so do the samples without
    speculation, and the large model's own (method large) is rejected by the same test."""
    n, temp, prompt = 1000, 1.5, "kubrai moulos lives in"
    exact = _exact_second_token(plain, prompt, temp)

    def second(llm, extra=None) -> Counter:
        sps = [SamplingParams(temperature=temp, max_tokens=3, seed=1000 + i, ignore_eos=True,
                              extra_args=extra) for i in range(n)]  # fmt: skip
        outs = llm.generate([prompt] * n, sps, use_tqdm=False)
        return Counter(o.outputs[0].token_ids[1] for o in outs)

    # chi-square bound: mean df, sd sqrt(2 df); 5 sd above the mean (p < 1e-4)
    stats = {}
    for name, counts in (("speculative", second(drafted)), ("plain", second(plain)),
                         ("large", second(plain, {"dlf_method": "large"}))):  # fmt: skip
        stat, df = _chi2(counts, exact, n)
        stats[name] = (stat, df, df + 5 * (2 * df) ** 0.5)
    print("chi-square (stat, df, bound):", stats)
    for name in ("speculative", "plain"):
        assert stats[name][0] < stats[name][2], stats
    assert stats["large"][0] > stats["large"][2], stats


@pytest.mark.parametrize("xargs, field", [({"dlf_alpha": 1.0}, "dlf_alpha"),
                                          ({"dlf_alpha_log": "t1"}, "dlf_alpha_log"),
                                          ({"dlf_method": "large", "dlf_solver": "exact"}, "dlf_method")])  # fmt: skip
def test_request_options_refused_naming_the_field(ngram, xargs, field) -> None:
    from vllm.exceptions import VLLMValidationError  # what vLLM's server answers with 400

    with pytest.raises(VLLMValidationError, match=f"^{field}: per-request DLF options are not "
                       "available with speculative decoding"):  # fmt: skip
        ngram.generate(["the apple"], SamplingParams(max_tokens=2, extra_args=xargs))
    # other extensions' arguments pass, and the engine still serves
    out = ngram.generate(["the apple"], SamplingParams(temperature=0, max_tokens=2,
                                                       extra_args={"other": 1}))  # fmt: skip
    assert out[0].outputs[0].token_ids


def test_serve_leaves_the_processor_out_under_speculation() -> None:
    assert not speculates(["--port", "8000"])
    for args in (["--speculative-config", "{}"], ["--speculative_config={}"], ["-sc", "{}"],
                 ["--spec-method", "ngram"]):  # fmt: skip
        assert speculates(args), args
        assert processor_arguments(args) == []
    assert processor_arguments([]) == ["--logits-processors", dv.PROCESSOR]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _post(base: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(base + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    try:
        resp = urllib.request.urlopen(req, timeout=120)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read().decode())
    return resp.status, json.loads(resp.read().decode())


def test_serve_with_ngram_speculation(family, plain, tmp_path) -> None:
    """The issue's command line: `dlf-rs serve ... -- --speculative-config '{"method": "ngram",
    ...}'` used to die at engine start; it serves, greedy text equal to the engine without
    speculation, and a request with a dlf_* option gets a 400 naming it."""
    port = _free_port()
    env = dict(os.environ, VLLM_LOGGING_LEVEL="WARNING", VLLM_CPU_KVCACHE_SPACE="1")
    cmd = [sys.executable, "-m", "dlf_rs", "serve", "--large", str(family["large"]),
           "--small", str(family["small"]), "--expert", str(family["expert0"]),
           "--fused-dir", str(tmp_path / "fused"), "--", "--port", str(port), "--host",
           "127.0.0.1", "--dtype", "float32", "--enforce-eager", "--max-model-len", "256",
           "--served-model-name", "dlf", "--seed", "0", "--speculative-config",
           json.dumps(NGRAM)]  # fmt: skip
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + 300
            while True:
                try:
                    urllib.request.urlopen(base + "/health", timeout=2)
                    break
                except (urllib.error.URLError, ConnectionError, OSError):
                    if proc.poll() is not None or time.time() > deadline:
                        raise RuntimeError("server did not start:\n"
                                           + log_path.read_text()[-4000:]) from None  # fmt: skip
                    time.sleep(1)
            ps = prompts(3, seed=2)
            want = plain.generate(ps, SamplingParams(temperature=0, max_tokens=MAX_NEW),
                                  use_tqdm=False)  # fmt: skip
            for p, w in zip(ps, want, strict=True):
                code, body = _post(base, {"model": "dlf", "prompt": p, "max_tokens": MAX_NEW,
                                          "temperature": 0})  # fmt: skip
                assert code == 200, body
                assert body["choices"][0]["text"] == w.outputs[0].text
            code, body = _post(base, {"model": "dlf", "prompt": "the apple", "max_tokens": 2,
                                      "vllm_xargs": {"dlf_alpha": 1.0}})  # fmt: skip
            assert code == 400, body
            assert body["error"]["message"].startswith("dlf_alpha: per-request DLF options are "
                                                       "not available"), body  # fmt: skip
            # the acceptance counters, on vLLM's Prometheus endpoint
            metrics = urllib.request.urlopen(base + "/metrics", timeout=30).read().decode()
            for name in ("spec_decode_num_draft_tokens", "spec_decode_num_accepted_tokens"):
                assert f"vllm:{name}" in metrics, name
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    assert "speculative decoding: every request is fused with the default options" in \
        log_path.read_text()  # fmt: skip
