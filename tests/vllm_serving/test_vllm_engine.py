"""DLF inside vLLM (offline engine): tokens equal FusedGenerator's, per-request options, seeds.

Runs in the vLLM environment (`make test-vllm`), on the tiny family of family.py (a large and a
small of different head sizes), float32 on both sides. One engine serves the whole module.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

vllm = pytest.importorskip("vllm")

import dlf_rs
import dlf_rs.engines.vllm as dv
from dlf_rs.step import fuse_step
from family import build_family
from vllm import SamplingParams

WORDS = ["kubrai", "moulos", "lives", "in", "fenrick", ".", "the", "apple", "who", "is", "has", "2", "apples", "works", "as", "a", "miner", "trader", "healer", "dun", "tal", "guard", "bron", "fisher", "carver"]  # fmt: skip
MAX_NEW = 10


def prompts(n: int, seed: int = 0) -> list[str]:
    """n prompts of 1 to 24 words (different lengths, so rows finish and join at other steps)."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(k))) for k in rng.integers(1, 25, size=n)]


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("family")
    paths = build_family(root)
    paths["fused"] = dv.build_fused_dir(
        root / "fused", paths["large"], paths["small"], [paths["expert0"], paths["expert1"]]
    )
    return paths


@pytest.fixture(scope="module")
def engine(family: dict[str, Path]):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    llm = dv.llm(family["fused"], dtype="float32", enforce_eager=True, max_model_len=256,
                 max_num_seqs=16, seed=0)  # fmt: skip
    yield llm
    del llm


@pytest.fixture(scope="module")
def reference(family: dict[str, Path]) -> dlf_rs.FusedGenerator:
    return dlf_rs.FusedGenerator.from_pretrained(
        family["large"], family["small"], [family["expert0"], family["expert1"]],
        torch_dtype=torch.float32,
    )  # fmt: skip


def _logits(ref: dlf_rs.FusedGenerator, ids: list[int]) -> list[np.ndarray]:
    x = torch.tensor([ids])
    with torch.no_grad():
        return [
            m(input_ids=x).logits[:, -1].float().numpy()
            for m in (ref.large, ref.small, *ref.experts)
        ]


def _log_softmax(v: np.ndarray) -> np.ndarray:
    v = v.astype(np.float64)
    m = v.max()
    return v - m - np.log(np.exp(v - m).sum())


def _kl(a: np.ndarray, b: np.ndarray) -> float:
    return float((np.exp(a) * (a - b)).sum())


def objective(z: list[np.ndarray], alphas: list[float]) -> float:
    """The paper's J (method.md), in numpy float64: independent of the core."""
    p, q = _log_softmax(z[0][0]), _log_softmax(z[1][0])
    fused = _log_softmax(z[0][0] + sum(a * (e[0] - z[1][0]) for a, e in zip(alphas, z[2:])))
    total = 0.0
    for e in z[2:]:
        qt = _log_softmax(e[0])
        total += (_kl(fused, p) - _kl(qt, q)) ** 2 + (_kl(p, fused) - _kl(q, qt)) ** 2
    return total


def flip_is_a_tie(ref, ids, options, got_alphas, want_alphas) -> tuple[bool, str]:
    """A flip is accepted when the reference's fused top two are within 1e-3, or when the two
    runs chose weights of equal J (a tie of the objective: "joint" has whole curves of optima)."""
    z = _logits(ref, ids)
    r = fuse_step(z[0], z[1], z[2:], **options)
    fused = dlf_rs.fuse_logits(z[0], z[1], z[2:], r.alphas)[0]
    top = np.sort(fused)[-2:]
    margin = float(top[1] - top[0])
    if margin < 1e-3:
        return True, f"fused margin {margin:.2e}"
    if got_alphas is not None and want_alphas is not None:
        jg, jw = objective(z, list(got_alphas)), objective(z, list(want_alphas))
        if abs(jg - jw) <= 1e-6 * (1.0 + abs(jw)):
            return (
                True,
                f"J tie {jg:.9f} vs {jw:.9f} (alphas {list(got_alphas)} vs {list(want_alphas)})",
            )
        return False, f"margin {margin:.2e}, J {jg:.9f} vs {jw:.9f}"
    return False, f"margin {margin:.2e}"


def compare(outs, res, ref, options, family=None, tags=None) -> list[str]:
    """Rows that differ, each checked to be a tie at its first difference."""
    flips = []
    for b, (o, want) in enumerate(zip(outs, res.token_ids, strict=True)):
        got = list(o.outputs[0].token_ids)
        if got == want:
            continue
        j = next(i for i, (g, w) in enumerate(zip(got + [-1], want + [-2])) if g != w)
        got_a = None
        if tags is not None:
            got_a = dv.read_alphas(family["fused"], tags[b])[j]
        ids = list(o.prompt_token_ids) + want[:j]
        ok, why = flip_is_a_tie(ref, ids, options, got_a, res.alphas[b][j])
        assert ok, f"row {b}: differs at step {j} ({got} vs {want}): {why}"
        flips.append(f"row {b} step {j}: {why}")
    return flips


def test_greedy_dlf_equals_fused_generator(engine, reference) -> None:
    ps = prompts(24)
    outs = engine.generate(ps, SamplingParams(temperature=0, max_tokens=MAX_NEW))
    res = reference.generate(ps, max_new_tokens=MAX_NEW)
    ids = [list(o.prompt_token_ids) for o in outs]
    assert ids == [reference.tokenizer(p)["input_ids"] for p in ps]  # same prompts
    flips = compare(outs, res, reference, {})
    assert len(flips) <= 2, flips
    assert sum(len(o.outputs[0].token_ids) for o in outs) > 24 * 3  # not all stopped at once


@pytest.mark.parametrize(
    "xargs, gen_kwargs, core",
    [
        ({"dlf_alpha": 1.0}, {"alpha": 1.0}, {"alpha": 1.0}),
        ({"dlf_alpha": [0.5, 1.5]}, {"alpha": (0.5, 1.5)}, {"alpha": [0.5, 1.5]}),
        ({"dlf_solver": "exact"}, {"solver": "exact"}, {"solver": "exact"}),
        ({"dlf_multi_expert": "joint", "dlf_alpha_range": [-1, 2]},
         {"multi_expert": "joint", "alpha_range": (-1.0, 2.0)},
         {"multi_expert": "joint", "alpha_range": (-1.0, 2.0)}),
    ],
)  # fmt: skip
def test_per_request_options_equal_fused_generator(
    engine, reference, family, xargs, gen_kwargs, core
) -> None:
    ps = prompts(8, seed=1)
    tags = [f"o{uuid.uuid4().hex[:10]}" for _ in ps]
    sps = [SamplingParams(temperature=0, max_tokens=MAX_NEW, extra_args={**xargs, "dlf_alpha_log": t})
           for t in tags]  # fmt: skip
    outs = engine.generate(ps, sps)
    res = reference.generate(ps, max_new_tokens=MAX_NEW, **gen_kwargs)
    flips = compare(outs, res, reference, core, family, tags)
    # every flip is a proven tie; "joint" has whole curves of optima, so ties are common there
    assert len(flips) <= (len(ps) if core.get("multi_expert") == "joint" else 2), flips


def test_single_model_methods(engine, reference) -> None:
    ps = prompts(6, seed=2)
    for xargs, kw in (({"dlf_method": "large"}, {"method": "large"}),
                      ({"dlf_method": "expert", "dlf_expert": 1}, {"method": "expert", "expert": 1})):  # fmt: skip
        outs = engine.generate(
            ps, SamplingParams(temperature=0, max_tokens=MAX_NEW, extra_args=xargs)
        )
        res = reference.generate(ps, max_new_tokens=MAX_NEW, **kw)
        assert [list(o.outputs[0].token_ids) for o in outs] == res.token_ids, xargs


def test_mixed_batch_and_late_arrivals(engine, reference) -> None:
    """Requests with different options in one batch, some added while others decode."""
    ps = prompts(12, seed=3)
    kinds = [{}, {"dlf_alpha": 1.0}, {"dlf_method": "large"}]
    core = engine.llm_engine
    ids = {}
    for i, p in enumerate(ps[:6]):
        rid = f"early-{i}-{uuid.uuid4().hex[:6]}"
        ids[rid] = i
        core.add_request(rid, p, SamplingParams(temperature=0, max_tokens=MAX_NEW,
                                                extra_args=kinds[i % 3] or None))  # fmt: skip
    done: dict[str, list[int]] = {}
    steps = 0
    while core.has_unfinished_requests():
        for out in core.step():
            if out.finished:
                done[out.request_id] = list(out.outputs[0].token_ids)
        steps += 1
        if steps == 3:  # the first six are decoding now
            for i, p in enumerate(ps[6:], start=6):
                rid = f"late-{i}-{uuid.uuid4().hex[:6]}"
                ids[rid] = i
                core.add_request(rid, p, SamplingParams(temperature=0, max_tokens=MAX_NEW,
                                                        extra_args=kinds[i % 3] or None))  # fmt: skip
    got = {ids[r]: toks for r, toks in done.items()}
    assert sorted(got) == list(range(12))
    for k, kw in enumerate(({}, {"alpha": 1.0}, {"method": "large"})):
        rows = [i for i in range(12) if i % 3 == k]
        res = reference.generate([ps[i] for i in rows], max_new_tokens=MAX_NEW, **kw)
        for i, want in zip(rows, res.token_ids, strict=True):
            assert got[i] == want, (i, kw)


def test_seeded_sampling_reproduces(engine) -> None:
    ps = prompts(6, seed=4)
    sp = [
        SamplingParams(temperature=1.0, top_p=0.95, max_tokens=MAX_NEW, seed=100 + i)
        for i in range(6)
    ]
    a = [list(o.outputs[0].token_ids) for o in engine.generate(ps, sp)]
    b = [list(o.outputs[0].token_ids) for o in engine.generate(ps[::-1], sp[::-1])][::-1]
    assert a == b  # per-request seeds: same tokens whatever the batch order
    c = [list(o.outputs[0].token_ids) for o in engine.generate(
        ps, [SamplingParams(temperature=1.0, top_p=0.95, max_tokens=MAX_NEW, seed=200 + i) for i in range(6)])]  # fmt: skip
    assert a != c


def test_alpha_log_equals_fused_generator(engine, reference, family) -> None:
    ps = prompts(3, seed=5)
    tags = [f"t{uuid.uuid4().hex[:8]}" for _ in ps]
    sps = [
        SamplingParams(temperature=0, max_tokens=MAX_NEW, extra_args={"dlf_alpha_log": t})
        for t in tags
    ]
    outs = engine.generate(ps, sps)
    res = reference.generate(ps, max_new_tokens=MAX_NEW)
    for o, t, want_ids, want in zip(outs, tags, res.token_ids, res.alphas, strict=True):
        if list(o.outputs[0].token_ids) != want_ids:
            continue  # a near-tie flip (test_greedy_... bounds them): the alphas follow other tokens
        got = np.asarray(dv.read_alphas(family["fused"], t), dtype=np.float32)
        np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.parametrize(
    "xargs, field",
    [({"dlf_solver": "fast"}, "dlf_solver"), ({"dlf_alpha": "x"}, "dlf_alpha"),
     ({"dlf_alpha_range": [2, 1]}, "dlf_alpha_range"), ({"dlf_wat": 1}, "dlf_wat"),
     ({"dlf_expert": 5, "dlf_method": "expert"}, "dlf_expert"),
     ({"dlf_alpha": [1.0, 1.0, 1.0]}, "dlf_alpha"), ({"dlf_alpha_log": "../x"}, "dlf_alpha_log")],
)  # fmt: skip
def test_bad_request_option_names_the_field(engine, xargs, field) -> None:
    from vllm.exceptions import VLLMValidationError  # what vLLM's server answers with 400

    with pytest.raises(VLLMValidationError, match=f"^{field}: "):
        engine.generate(["the apple"], SamplingParams(max_tokens=2, extra_args=xargs))
    # the engine still serves
    assert (
        engine.generate(["the apple"], SamplingParams(temperature=0, max_tokens=2))[0]
        .outputs[0]
        .token_ids
    )


def test_tensor_parallel_two_ranks_equal_one(family, engine) -> None:
    """--tensor-parallel-size 2 on this CPU (two worker processes, one core each): the members'
    layers are sharded by vLLM, the fused tokens and the alpha log equal one rank's."""
    import subprocess
    import sys

    script = Path(__file__).with_name("tp_run.py")
    ps = prompts(5, seed=7)
    want = engine.generate(ps, SamplingParams(temperature=0, max_tokens=MAX_NEW))
    env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND="0|1", VLLM_LOGGING_LEVEL="WARNING")
    r = subprocess.run([sys.executable, str(script), str(family["fused"]), *ps],
                       capture_output=True, text=True, env=env, timeout=600, check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    got = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("[")]
    assert got == [list(o.outputs[0].token_ids) for o in want]
    alphas = dv.read_alphas(family["fused"], "tp2-row0")
    assert len(alphas) == len(got[0])  # one line per step: only rank 0 writes


def test_plain_vllm_llm_takes_the_fused_directory(family, engine) -> None:
    """`vllm.LLM(dir)` with no dlf_rs call: the plugin registers the model and attaches the
    logits processor, so per-request options and their 400-style errors work there too."""
    import subprocess
    import sys

    ps = prompts(4, seed=8)
    want = [list(o.outputs[0].token_ids) for o in engine.generate(
        ps, SamplingParams(temperature=0, max_tokens=MAX_NEW))]  # fmt: skip
    want += [list(o.outputs[0].token_ids) for o in engine.generate(
        ps, SamplingParams(temperature=0, max_tokens=MAX_NEW, extra_args={"dlf_alpha": 1.0}))]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "DLF_RS_FUSED_DIR"}
    env["VLLM_LOGGING_LEVEL"] = "WARNING"
    r = subprocess.run([sys.executable, str(Path(__file__).with_name("tp_run.py")), "--plain",
                        str(family["fused"]), *ps],
                       capture_output=True, text=True, env=env, timeout=600, check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    got = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("[")]
    assert got == want
    assert want[:4] != want[4:]  # the option changed something
    errors = [line for line in r.stdout.splitlines() if line.startswith("ERROR")]
    assert errors and "dlf_expert: expected an expert index in [0, 2), got 9" in errors[0], r.stdout


def test_each_member_is_built_under_its_own_compile_tag() -> None:
    """A member built inside ``_compile_tag(name)`` gets vLLM's compile tag ``dlf_<name>`` (the
    prefix of its compile backend's cache subdirectory and of its compile log lines); the tag
    in force before comes back afterwards."""
    from dlf_rs.engines.vllm.model import _compile_tag
    from vllm.compilation import backends

    before = backends.model_tag
    seen = []
    for name in ("large", "small", "expert0"):
        with _compile_tag(name):
            seen.append(backends.model_tag)
        assert backends.model_tag == before
    assert seen == ["dlf_large", "dlf_small", "dlf_expert0"]
