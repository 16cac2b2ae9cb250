"""Start time of `dlf-rs serve` on the real pair, compiled against eager, beside the large alone.

    .venv-vllm/bin/python benches/bench_vllm_start.py [--runs large:compiled:cold ...]
        [--max-model-len 1024] [--requests 3] [--max-tokens 32] [--timeout 600]

The family: Qwen2.5-Coder-1.5B-Instruct (large) and 0.5B-Instruct (small) in bfloat16 from
`make real-family`, and as the expert the perturbed 0.5B of benches/bench_llamacpp.py
(`~/.cache/dlf_rs/real-family/llamacpp/expert-bf16`).

Each run starts one OpenAI-compatible server in its own process and times it from the process
start to the first HTTP 200 of ``/health``:

- engine ``large``: ``python -m dlf_rs.engines.vllm.api_server --model <large>`` (vLLM's server on
  the large model alone); engine ``fused``: ``python -m dlf_rs serve --large ... --small ...
  --expert ...`` on the fused directory (the DLF logits processor on);
- mode ``compiled``: ``--no-enforce-eager`` (vLLM's torch.compile of each decoder, its default
  when nothing is chosen); ``eager``: ``--enforce-eager``;
- cache ``cold``: a new empty ``VLLM_CACHE_ROOT`` and ``TORCHINDUCTOR_CACHE_DIR`` (nothing
  compiled before); ``warm``: the directories of the previous cold run of the same engine and
  mode (a restart).

Then, unless the run is warm, decode speed: one warm-up request, ``--requests`` greedy requests of
``--max-tokens`` tokens one at a time (concurrency 1), then 4 at once (concurrency 4);
tokens/s = completion tokens / wall time of that batch. A start past ``--timeout`` seconds is
killed and printed as ``> timeout``. Logs (and the compile-cache lines grepped from them) go to a
temporary directory printed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

RUNS = [
    "large:compiled:cold",
    "large:compiled:warm",
    "large:eager:cold",
    "fused:eager:cold",
    "fused:compiled:cold",
    "fused:compiled:warm",
]
PROMPTS = [
    "def quicksort(xs):\n",
    "class LRUCache:\n    def __init__(self, capacity):\n",
    "# Parse a CSV file and return the rows as dicts\nimport csv\n\n",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
]
# Lines of the server log that say what the compile cache did.
CACHE_LINES = ("load failure", "Directly load AOT", "saved AOT", "torch.compile took",
               "torch.compile and initial", "Compiling a graph", "Loading weights took",
               "init engine", "Using cache directory")  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _post(base: str, prompt: str, max_tokens: int) -> int:
    body = {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True}  # fmt: skip
    req = urllib.request.Request(base + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=600) as resp:
        return int(json.loads(resp.read())["usage"]["completion_tokens"])


def _rate(base: str, prompts: list[str], max_tokens: int, concurrency: int) -> float:
    t = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        n = sum(pool.map(lambda p: _post(base, p, max_tokens), prompts))
    return n / (time.perf_counter() - t)


def one_run(args: argparse.Namespace, run: str, paths: dict[str, Path], tmp: Path,
            caches: dict[str, Path]) -> dict:  # fmt: skip
    engine, mode, cache = run.split(":")
    key = f"{engine}:{mode}"
    if cache == "cold":
        caches[key] = Path(tempfile.mkdtemp(prefix=f"cache-{engine}-{mode}-", dir=tmp))
    elif key not in caches:
        raise SystemExit(f"--runs: {run} needs a cold run of {key} before it")
    root = caches[key]
    env = dict(os.environ, VLLM_CACHE_ROOT=str(root / "vllm"),
               TORCHINDUCTOR_CACHE_DIR=str(root / "inductor"),
               VLLM_CPU_KVCACHE_SPACE=str(args.kv_gib))  # fmt: skip
    env.update(kv.split("=", 1) for kv in args.env)
    port = _free_port()
    common = ["--port", str(port), "--host", "127.0.0.1", "--dtype", "bfloat16",
              "--max-model-len", str(args.max_model_len), "--served-model-name", "m",
              "--seed", "0", "--enforce-eager" if mode == "eager" else "--no-enforce-eager"]  # fmt: skip
    if engine == "large":
        cmd = [sys.executable, "-m", "dlf_rs.engines.vllm.api_server",
               "--model", str(paths["large"]), *common]  # fmt: skip
    else:
        cmd = [sys.executable, "-m", "dlf_rs", "serve", "--large", str(paths["large"]),
               "--small", str(paths["small"]), "--expert", str(paths["expert"]),
               "--fused-dir", str(tmp / "fused"), "--", *common]  # fmt: skip
    log_path = tmp / f"{run.replace(':', '-')}.log"
    base = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        start = None
        while start is None:
            try:
                urllib.request.urlopen(base + "/health", timeout=2)
                start = time.perf_counter() - t0
            except (urllib.error.URLError, ConnectionError, OSError):
                if proc.poll() is not None:
                    raise SystemExit(f"{run}: the server exited; see {log_path}") from None
                if time.perf_counter() - t0 > args.timeout:
                    break
                time.sleep(0.5)
        rec: dict = {"run": run, "start": start, "c1": None, "c4": None, "log": str(log_path)}
        try:
            if start is not None and cache == "cold" and args.requests > 0:
                _post(base, PROMPTS[0], 4)  # warm-up
                rec["c1"] = _rate(base, PROMPTS[: args.requests], args.max_tokens, 1)
                rec["c4"] = _rate(base, PROMPTS[:4], args.max_tokens, 4)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    rec["cache_lines"] = [line.strip()[-300:] for line in log_path.read_text().splitlines()
                          if any(k in line for k in CACHE_LINES)]  # fmt: skip
    return rec


def _fmt(x: float | None, spec: str) -> str:
    return "-".rjust(int(spec.split(".")[0])) if x is None else format(x, spec)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--cache", default=None, help="the real family's cache (as make real-family)")
    p.add_argument("--runs", nargs="*", default=RUNS,
                   help="engine:mode:cache, in order (engine large|fused, mode compiled|eager, "
                   "cache cold|warm; a warm run reuses the last cold run's directories)")  # fmt: skip
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--kv-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE")
    p.add_argument("--requests", type=int, default=3, help="requests at concurrency 1 (0: none)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--timeout", type=float, default=600, help="seconds a start may take")
    p.add_argument("--env", nargs="*", default=[],
                   help="KEY=VALUE for every server (e.g. VLLM_USE_AOT_COMPILE=0)")  # fmt: skip
    p.add_argument("--keep", action="store_true", help="keep the compile caches")
    args = p.parse_args()
    for kv in args.env:
        if "=" not in kv:
            sys.exit(f"--env: {kv!r} is not KEY=VALUE")
    for run in args.runs:
        parts = run.split(":")
        if len(parts) != 3 or parts[0] not in ("large", "fused") or parts[1] not in (
            "compiled", "eager") or parts[2] not in ("cold", "warm"):  # fmt: skip
            sys.exit(f"--runs: {run!r} is not engine:mode:cache (large|fused, compiled|eager, "
                     "cold|warm)")  # fmt: skip
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from dlf_rs.real_family import cache_root

    root = cache_root(args.cache)
    paths = {"large": root / "large-bf16", "small": root / "small-bf16",
             "expert": root / "llamacpp" / "expert-bf16"}  # fmt: skip
    for name, need in paths.items():
        if not (need / "config.json").exists():
            hint = "benches/bench_llamacpp.py" if name == "expert" else "make real-family"
            sys.exit(f"missing {need}: run {hint} first")
    tmp = Path(tempfile.mkdtemp(prefix="vllm_start_"))
    caches: dict[str, Path] = {}
    recs = []
    if args.env:
        print("environment: " + " ".join(args.env))
    print(f"{'engine':7s} {'mode':9s} {'cache':5s} {'start s':>8s} {'tok/s c=1':>10s} "
          f"{'tok/s c=4':>10s}", flush=True)  # fmt: skip
    for run in args.runs:
        rec = one_run(args, run, paths, tmp, caches)
        recs.append(rec)
        engine, mode, cache = run.split(":")
        start = _fmt(rec["start"], "8.1f") if rec["start"] is not None else \
            f"> {args.timeout:.0f}".rjust(8)  # fmt: skip
        print(f"{engine:7s} {mode:9s} {cache:5s} {start} {_fmt(rec['c1'], '10.2f')} "
              f"{_fmt(rec['c4'], '10.2f')}", flush=True)  # fmt: skip
        for line in rec["cache_lines"]:
            print(f"    {line}", flush=True)
    (tmp / "summary.json").write_text(json.dumps(recs, indent=1))
    if not args.keep:
        for d in caches.values():
            shutil.rmtree(d, ignore_errors=True)
    print(f"records and logs: {tmp}")


if __name__ == "__main__":
    main()
