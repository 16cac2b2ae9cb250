"""DLF in vLLM against its members alone, in vLLM, in one run (run it in the vLLM venv).

    .venv-vllm/bin/python benches/bench_vllm.py --tiny                  # the tests' family
    .venv-vllm/bin/python benches/bench_vllm.py --large L --small S --expert E [--dtype bfloat16]

For each batch size B: B prompts decode `--max-tokens` tokens (greedy, ignore_eos) under
(1) the large model alone, (2) the small model alone, (3) the fused model with method "large"
(every member runs, no fusion), (4) the fused model with DLF (the default). Decode throughput is
generated tokens / wall time of `generate` (prefill included, engine start excluded), best of
`--repeats`. The reference "members alone" time is t(large) + (1 + T) t(small): what running
the models one after the other would cost; fused / members-alone is the overhead of DLF in
vLLM. Ratios are taken within one run; on a shared machine absolute numbers move.

Serving mode (`--serve`): the OpenAI server under concurrent streamed requests.

    .venv-vllm/bin/python benches/bench_vllm.py --serve --smollm DIR   # the SmolLM2-derived family
    .venv-vllm/bin/python benches/bench_vllm.py --serve --large L --small S --expert E

`--smollm DIR` (a converted SmolLM2-135M-Instruct: tests/conftest.py's `smollm_dir` fixture
writes one to .pytest_cache/d/smollm2-135m-instruct) builds the family this mode was written
for: large = SmolLM2-135M-Instruct (30 layers), small = its first 8 layers with its final norm and
(tied) head, expert = the small one with a seeded perturbation (a stand-in for a fine-tune: the
speed does not depend on what it learned). Each engine serves in turn on loopback: `dlf-rs serve`
on the fused directory (DLF, then the same server with `dlf_method: large` per request: the
model still fuses every row with the defaults and the logits processor then redoes those rows, so
this row is DLF plus the cost of a per-request option, not members without fusion), then plain vLLM (`python -m vllm.entrypoints.openai.api_server`) on the
large checkpoint alone. The real `openai` client streams `--requests` greedy completions of
`--max-tokens` tokens (ignore_eos, the same token-id prompts for every engine) from
`concurrency` workers (each sends its next request when its stream ends); a warm-up round is not
counted. Per request: TTFT = request sent to first streamed token, ITL = the gaps between its
later tokens; aggregate tokens/s = all generated tokens / the wall time of the round. Then
`FusedGenerator` (`--fg-threads` torch threads) on the same prompts, batch = concurrency, DLF and
method large, through its `stream` (TTFT = batch start to the row's first token; the rows of a
batch start together).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def _engine(model: str, args: argparse.Namespace, fused: bool) -> Any:
    import dlf_rs.engines.vllm as dv
    from vllm import LLM

    kw = {"dtype": args.dtype, "enforce_eager": True, "max_model_len": args.max_model_len,
          "max_num_seqs": max(args.batch), "seed": 0}  # fmt: skip
    return dv.llm(model, **kw) if fused else LLM(model=model, **kw)


def _time(llm: Any, batch: int, args: argparse.Namespace, xargs: dict | None) -> float:
    from vllm import SamplingParams

    words = [
        "def",
        "parse",
        "(",
        "text",
        ")",
        ":",
        "return",
        "[",
        "int",
        "(",
        "x",
        ")",
        "for",
        "x",
        "in",
        "text",
        ".",
        "split",
        "(",
        ")",
        "]",
    ]
    prompts = [" ".join(words[: 4 + (i % 8)]) for i in range(batch)]
    sp = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True,
                        extra_args=xargs)  # fmt: skip
    llm.generate(prompts[:1], sp, use_tqdm=False)  # warm
    best = float("inf")
    for _ in range(args.repeats):
        t = time.perf_counter()
        llm.generate(prompts, sp, use_tqdm=False)
        best = min(best, time.perf_counter() - t)
    return best


# ---------------------------------------------------------------------- serving mode (--serve)
PROMPTS = [
    "The capital of France is",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Once upon a time, in a small village by the sea,",
    "List three uses of a paper clip:",
    "def merge_sorted(a, b):",
    "Explain in one paragraph why the sky is blue.",
    "The quick brown fox",
    "Translate to French: I would like a cup of coffee, please.",
    "A recipe for pancakes needs",
    "SELECT name, age FROM users WHERE",
    "The three laws of motion are",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "import numpy as np\n\ndef normalise(x):",
    "My favourite season is autumn because",
    "Q: What is 17 times 23?\nA:",
    "The most important skill for a software engineer is",
]


def build_smollm_family(src: Path, root: Path, small_layers: int = 8,
                        seed: int = 7) -> dict[str, str]:  # fmt: skip
    """large = ``src``; small = its first ``small_layers`` layers, final norm and (tied) head;
    expert = the small one plus seeded relative noise (a stand-in fine-tune, as
    benches/gpu_check.py makes one)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    cfg = json.loads((src / "config.json").read_text())
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise SystemExit(f"--smollm {src}: no .safetensors there")
    weights: dict[str, Any] = {}
    for f in files:
        weights.update(load_file(str(f)))
    small = {k: v for k, v in weights.items()
             if not k.startswith("model.layers.") or int(k.split(".")[2]) < small_layers}  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    expert = {k: (v + 0.05 * v.float().std().clamp(min=1e-3) * torch.randn(v.shape, generator=g))
              .to(v.dtype).contiguous() for k, v in sorted(small.items())}  # fmt: skip
    out: dict[str, str] = {"large": str(src)}
    for name, tensors in (("small", small), ("expert0", expert)):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json",):
                shutil.copy2(f, d / f.name)
        (d / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": small_layers},
                                                  indent=2))  # fmt: skip
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(d / "model.safetensors"),
                  metadata={"format": "pt"})  # fmt: skip
        out[name] = str(d)
    return out


def matmul_weights(model_dir: str) -> tuple[int, int]:
    """(layers, weights multiplied per token: every layer's projections and the output head) of
    a Llama-shaped checkpoint, from its config."""
    c = json.loads((Path(model_dir) / "config.json").read_text())
    h, heads, kv = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
    hd = c.get("head_dim") or h // heads
    layer = 2 * h * heads * hd + 2 * h * kv * hd + 3 * h * c["intermediate_size"]
    return c["num_hidden_layers"], c["num_hidden_layers"] * layer + h * c["vocab_size"]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start(cmd: list[str], log: Path, base: str, timeout: float = 900) -> Any:
    import subprocess
    import urllib.error
    import urllib.request

    env = dict(os.environ, VLLM_LOGGING_LEVEL="WARNING")
    fh = open(log, "w")  # noqa: SIM115 - the server's lifetime
    proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(base + "/health", timeout=2)
            return proc
        except (urllib.error.URLError, ConnectionError, OSError):
            if proc.poll() is not None or time.time() > deadline:
                _stop(proc)
                raise SystemExit(f"server did not start ({' '.join(cmd)}):\n"
                                 + log.read_text()[-4000:]) from None  # fmt: skip
            time.sleep(1)


def _stop(proc: Any) -> None:
    import signal
    import subprocess

    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the server's own process group
            proc.wait()


async def _request(client: Any, ids: list[int], max_tokens: int, xbody: dict) -> dict:
    t0 = time.perf_counter()
    stream = await client.completions.create(
        model="m", prompt=ids, max_tokens=max_tokens, temperature=0, stream=True,
        extra_body={"ignore_eos": True, "return_token_ids": True, **xbody},
    )  # fmt: skip
    stamps: list[float] = []
    async for chunk in stream:
        if not chunk.choices:
            continue
        now = time.perf_counter()
        new = (chunk.choices[0].model_extra or {}).get("token_ids")
        k = len(new) if new is not None else 1
        prev = stamps[-1] if stamps else t0
        stamps.extend(prev + (now - prev) * (j + 1) / k for j in range(k))
    if len(stamps) != max_tokens:
        raise SystemExit(f"a stream gave {len(stamps)} tokens, not {max_tokens} (ignore_eos)")
    return {"ttft": stamps[0] - t0, "itl": list(np.diff(stamps)), "tokens": len(stamps)}


def _round(base: str, prompts: list[list[int]], conc: int, n: int, max_tokens: int,
           xbody: dict) -> dict:  # fmt: skip
    import asyncio

    import openai

    async def go() -> tuple[list[dict], float]:
        client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="none", max_retries=0,
                                    timeout=900)  # fmt: skip
        todo = list(range(n))
        done: list[dict] = []

        async def worker() -> None:
            while todo:
                i = todo.pop(0)
                done.append(await _request(client, prompts[i % len(prompts)], max_tokens, xbody))

        t = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(conc)))
        wall = time.perf_counter() - t
        await client.close()
        return done, wall

    done, wall = asyncio.run(go())
    return _summary(done, wall)


def _summary(done: list[dict], wall: float) -> dict:
    ttft = [d["ttft"] for d in done]
    itl = [x for d in done for x in d["itl"]]
    return {"requests": len(done), "tokens_s": sum(d["tokens"] for d in done) / wall,
            "ttft": (np.percentile(ttft, 50), np.percentile(ttft, 99)),
            "itl": (np.percentile(itl, 50), np.percentile(itl, 99))}  # fmt: skip


def _fused_generator(members: dict, prompts: list[list[int]], plan: list[tuple[int, int]],
                     args: argparse.Namespace) -> dict:  # fmt: skip
    import dlf_rs
    import torch

    torch.set_num_threads(args.fg_threads)
    gen = dlf_rs.FusedGenerator.from_pretrained(
        members["large"],
        members["small"],
        members["experts"],
        torch_dtype=getattr(torch, args.dtype),
    )
    gen.eos_token_ids = set()  # every row decodes max_tokens, as the servers' ignore_eos
    rows: dict = {}
    for method, name in (("dlf", "FusedGenerator, DLF"), ("large", "FusedGenerator, large alone")):
        for conc, n in plan:
            gen.generate(input_ids=prompts[:conc], max_new_tokens=4, method=method)  # warm-up
            done: list[dict] = []
            t = time.perf_counter()
            for b in range(0, n, conc):
                ids = [prompts[i % len(prompts)] for i in range(b, min(b + conc, n))]
                t0 = time.perf_counter()
                stamps: dict[int, list[float]] = {r: [] for r in range(len(ids))}
                for ch in gen.stream(input_ids=ids, max_new_tokens=args.max_tokens, method=method):
                    if ch.token_ids:
                        now = time.perf_counter()
                        st = stamps[ch.row]
                        prev = st[-1] if st else t0
                        k = len(ch.token_ids)
                        st.extend(prev + (now - prev) * (j + 1) / k for j in range(k))
                for st in stamps.values():
                    if len(st) != args.max_tokens:
                        raise SystemExit(
                            f"FusedGenerator gave {len(st)} tokens, not {args.max_tokens}"
                        )
                    done.append({"ttft": st[0] - t0, "itl": list(np.diff(st)), "tokens": len(st)})
            rows[(name, conc)] = _summary(done, time.perf_counter() - t)
            print(f"# {name} c={conc}: {rows[(name, conc)]['tokens_s']:.1f} tok/s", file=sys.stderr)
    return rows


def serve_main(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    import shutil
    import sys as _sys

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    reqs = args.requests or [max(8, 4 * c) for c in args.concurrency]
    if len(reqs) != len(args.concurrency):
        p.error("--requests: one count per --concurrency value")
    plan = list(zip(args.concurrency, reqs, strict=True))
    load0 = os.getloadavg()
    if args.smollm and not (Path(args.smollm) / "config.json").is_file():
        p.error(f"--smollm {args.smollm}: no config.json there")
    if not (args.smollm or args.tiny or (args.large and args.small and args.expert)):
        p.error("--serve needs --smollm DIR, --tiny, or --large, --small and --expert")
    tmp = Path(tempfile.mkdtemp(prefix="bench_vllm_serve_"))
    try:
        if args.smollm:
            fam = build_smollm_family(Path(args.smollm), tmp / "family")
            family = "SmolLM2-derived (large SmolLM2-135M-Instruct, small its first 8 layers, expert perturbed)"
            args.large, args.small, args.expert = fam["large"], fam["small"], [fam["expert0"]]
        elif args.tiny:
            _sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests/vllm_serving"))
            from family import build_family

            fam2 = build_family(tmp / "family", experts=1)
            args.large, args.small, args.expert = (
                str(fam2["large"]),
                str(fam2["small"]),
                [str(fam2["expert0"])],
            )
            family = "the tests' tiny family"
        else:
            family = "given members"
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.large)
        prompts = [list(tok(t)["input_ids"]) for t in PROMPTS]
        common = ["--host", "127.0.0.1", "--dtype", args.dtype, "--enforce-eager",
                  "--max-model-len", str(args.max_model_len), "--served-model-name", "m",
                  "--seed", "0", "--max-num-seqs", str(max(args.concurrency))]  # fmt: skip
        experts = [a for e in args.expert for a in ("--expert", e)]
        servers = [
            ("vLLM fused (dlf-rs serve)", [_sys.executable, "-m", "dlf_rs", "serve", "--large",
             args.large, "--small", args.small, *experts, "--fused-dir", str(tmp / "fused"), "--"],
             [("vLLM fused, DLF", {})] + ([] if args.no_fused_large else
                                         [("vLLM fused, method large", {"vllm_xargs": {"dlf_method": "large"}})])),
            ("vLLM large alone", [_sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                                  "--model", args.large], [("vLLM large alone", {})]),
        ]  # fmt: skip
        rows: dict = {}
        for label, cmd, engines in servers:
            port = _free_port()
            base = f"http://127.0.0.1:{port}"
            t0 = time.perf_counter()
            proc = _start([*cmd, "--port", str(port), *common], tmp / f"{port}.log", base)
            print(f"# {label}: started in {time.perf_counter() - t0:.1f} s", file=_sys.stderr)
            try:
                for name, xbody in engines:
                    _round(base, prompts, max(args.concurrency), max(args.concurrency), 8, xbody)
                    for conc, n in plan:
                        rows[(name, conc)] = _round(base, prompts, conc, n, args.max_tokens, xbody)
                        print(f"# {name} c={conc}: {rows[(name, conc)]['tokens_s']:.1f} tok/s",
                              file=_sys.stderr)  # fmt: skip
            finally:
                _stop(proc)
        members = {"large": args.large, "small": args.small, "experts": args.expert}
        rows.update(_fused_generator(members, prompts, plan, args))
        load1 = os.getloadavg()
        lay = [matmul_weights(m) for m in (args.large, args.small, *args.expert)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    names = ["vLLM fused, DLF"] + ([] if args.no_fused_large else ["vLLM fused, method large"])
    names += ["vLLM large alone", "FusedGenerator, DLF", "FusedGenerator, large alone"]
    print(f"Family: {family}; dtype {args.dtype}; {args.max_tokens} greedy tokens per request "
          f"(ignore_eos); {len(PROMPTS)} fixed prompts of {min(map(len, prompts))}-"
          f"{max(map(len, prompts))} tokens; FusedGenerator on {args.fg_threads} torch threads, "
          f"batch = concurrency; one run.")  # fmt: skip
    print(f"Load average (1/5/15 min) at start {load0[0]:.2f}/{load0[1]:.2f}/{load0[2]:.2f}, "
          f"at end {load1[0]:.2f}/{load1[1]:.2f}/{load1[2]:.2f}; {os.cpu_count()} CPUs.")  # fmt: skip
    print()
    print(
        "| engine | concurrency | requests | tokens/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        for conc, _ in plan:
            r = rows[(name, conc)]
            print(f"| {name} | {conc} | {r['requests']} | {r['tokens_s']:.1f} | "
                  f"{1e3 * r['ttft'][0]:.0f} ms | {1e3 * r['ttft'][1]:.0f} ms | "
                  f"{1e3 * r['itl'][0]:.0f} ms | {1e3 * r['itl'][1]:.0f} ms |")  # fmt: skip
    print()
    hdr = "| concurrency | vLLM: fused DLF token / large-alone token |"
    if not args.no_fused_large:
        hdr += " vLLM: fused method large / large alone |"
    hdr += (
        " FusedGenerator: DLF token / large-alone token | tokens/s, vLLM fused DLF / "
        "FusedGenerator DLF |"
    )
    print(hdr)
    print("|---" * hdr.count(" |") + "|")
    for conc, _ in plan:
        tps = {n: rows[(n, conc)]["tokens_s"] for n in names}
        cells = [f"{tps['vLLM large alone'] / tps['vLLM fused, DLF']:.2f}x"]
        if not args.no_fused_large:
            cells.append(f"{tps['vLLM large alone'] / tps['vLLM fused, method large']:.2f}x")
        cells.append(f"{tps['FusedGenerator, large alone'] / tps['FusedGenerator, DLF']:.2f}x")
        cells.append(f"{tps['vLLM fused, DLF'] / tps['FusedGenerator, DLF']:.2f}x")
        print(f"| {conc} | " + " | ".join(cells) + " |")
    print()
    print(f"Floors (a fused token's work over a large-alone token's): layers "
          f"{' + '.join(str(x[0]) for x in lay)} over {lay[0][0]} = "
          f"{sum(x[0] for x in lay) / lay[0][0]:.2f}x; weights multiplied per token (layers and "
          f"each member's output head) {sum(x[1] for x in lay) / 1e6:.1f}M over "
          f"{lay[0][1] / 1e6:.1f}M = {sum(x[1] for x in lay) / lay[0][1]:.2f}x.")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--tiny", action="store_true", help="the tests' family (tests/vllm_serving/family.py)"
    )
    p.add_argument("--large")
    p.add_argument("--small")
    p.add_argument("--expert", action="append", default=[])
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    s = p.add_argument_group("serving mode")
    s.add_argument("--serve", action="store_true", help="the OpenAI-server benchmark (see above)")
    s.add_argument("--smollm", help="a converted SmolLM2-135M-Instruct directory: build the "
                   "SmolLM2-derived family from it")  # fmt: skip
    s.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    s.add_argument("--requests", type=int, nargs="+", default=None,
                   help="requests per concurrency (default max(8, 4 x concurrency))")  # fmt: skip
    s.add_argument("--fg-threads", type=int, default=2, help="FusedGenerator's torch threads")
    s.add_argument("--no-fused-large", action="store_true",
                   help="skip the fused server's method-large rows")  # fmt: skip
    args = p.parse_args()
    if args.serve:
        serve_main(p, args)
        return
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    tmp = Path(tempfile.mkdtemp(prefix="bench_vllm_"))
    if args.tiny:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests/vllm_serving"))
        from family import build_family

        fam = build_family(tmp / "family", experts=1)
        args.large, args.small, args.expert = (
            str(fam["large"]),
            str(fam["small"]),
            [str(fam["expert0"])],
        )
    if not (args.large and args.small and args.expert):
        p.error("--large, --small and --expert (or --tiny) are required")
    import dlf_rs.engines.vllm as dv

    fused = dv.build_fused_dir(tmp / "fused", args.large, args.small, args.expert)
    t_n = len(args.expert)
    times: dict[tuple[str, int], float] = {}
    for name, model, is_fused, xargs in (
        ("large alone", args.large, False, None),
        ("small alone", args.small, False, None),
        ("fused, method large", str(fused), True, {"dlf_method": "large"}),
        ("fused, DLF", str(fused), True, None),
    ):
        t0 = time.perf_counter()
        llm = _engine(model if not is_fused else str(fused), args, is_fused)
        start = time.perf_counter() - t0
        for b in args.batch:
            times[(name, b)] = _time(llm, b, args, xargs)
        print(f"# {name}: engine start {start:.1f} s", file=sys.stderr)
        del llm
        gc.collect()
    print(f"{args.max_tokens} new tokens per row, dtype {args.dtype}, T = {t_n} expert(s)")
    print("| B | large alone | small alone | members alone (L + (1+T) S) | fused, method large | "
          "fused, DLF | DLF / members alone | DLF / large alone |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for b in args.batch:
        toks = b * args.max_tokens

        def rate(s: float, toks: int = toks) -> str:
            return f"{toks / s:.1f} tok/s"

        members = times[("large alone", b)] + (1 + t_n) * times[("small alone", b)]
        dlf = times[("fused, DLF", b)]
        print(f"| {b} | {rate(times[('large alone', b)])} | {rate(times[('small alone', b)])} | "
              f"{rate(members)} | {rate(times[('fused, method large', b)])} | {rate(dlf)} | "
              f"{dlf / members:.2f}x | {dlf / times[('large alone', b)]:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
