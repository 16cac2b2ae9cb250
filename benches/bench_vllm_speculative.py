"""Speculative decoding of the fused model inside vLLM, on real weights, at concurrency 1.

    .venv-vllm/bin/python benches/bench_vllm_speculative.py [--prompts 6] [--max-tokens 128]
        [--set edit|complete] [--draft] [--tokens 3]

The family: Qwen2.5-Coder-1.5B-Instruct (large) and 0.5B-Instruct (small) in bfloat16 from
`make real-family`, and as the expert the perturbed 0.5B of benches/bench_llamacpp.py
(`~/.cache/dlf_rs/real-family/llamacpp/expert-bf16`; `--expert small` uses the small model itself:
fused = large then, at the fused model's full cost). Speed does not depend on what the expert
learned; acceptance does a little (it depends on how far the fused model is from what the drafts
copy).

Each engine runs in its own child process (memory returned), on the same prompts, one request at
a time (concurrency 1), greedy; tokens/s is the generated tokens over the summed wall time of the
requests (engine start and one warm-up request excluded):

- ``large``: vLLM on the large model alone, no speculation (the goal's floor);
- ``fused``: the fused directory, no speculation (per-request options through the processor);
- ``fused+ngram``: the fused directory with vLLM's n-gram (prompt lookup) proposer;
- ``fused+draft`` (``--draft``): drafts from the small member's checkpoint (vLLM's draft_model).

Acceptance: vLLM's own counters (``LLM.get_metrics()``): accepted / drafted tokens, and the mean
acceptance length (tokens per verification step: 1 + accepted / drafts). Greedy identity: every
speculative run's tokens against ``fused``'s, prompt by prompt.

Prompt sets: ``edit`` (default), chat requests to rewrite a given function (type hints, a
docstring, a rename, a loop as a comprehension ...): the answer repeats much of the prompt, the
case prompt lookup is for; ``complete``: benches/vllm_real_family.py's raw code openings (the
model writes new code: the n-gram proposer finds fewer matches).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vllm_real_family import PROMPTS as COMPLETE  # the same code openings

EDIT = [
    ("Add type hints to this function. Reply with the code only.",
     ("def merge_sorted(a, b):\n    i = j = 0\n    out = []\n    while i < len(a) and j < len(b):\n"
     "        if a[i] <= b[j]:\n            out.append(a[i])\n            i += 1\n        else:\n"
     "            out.append(b[j])\n            j += 1\n    out.extend(a[i:])\n    out.extend(b[j:])\n"
     "    return out\n")),
    ("Add a docstring to this function. Reply with the code only.",
     ("def count_words(text):\n    counts = {}\n    for word in text.split():\n"
     "        word = word.lower().strip('.,!?')\n        counts[word] = counts.get(word, 0) + 1\n"
     "    return counts\n")),
    ("Rename the variable `xs` to `values` everywhere. Reply with the code only.",
     ("def mean_and_spread(xs):\n    n = len(xs)\n    if n == 0:\n        return 0.0, 0.0\n"
     "    m = sum(xs) / n\n    spread = max(xs) - min(xs)\n    return m, spread\n\n\n"
     "def normalise(xs):\n    m, spread = mean_and_spread(xs)\n    if spread == 0:\n"
     "        return [0.0 for _ in xs]\n    return [(x - m) / spread for x in xs]\n")),
    ("Rewrite the loop as a list comprehension. Reply with the code only.",
     ("def squares_of_evens(numbers):\n    result = []\n    for n in numbers:\n"
     "        if n % 2 == 0:\n            result.append(n * n)\n    return result\n")),
    ("Make this class a dataclass. Reply with the code only.",
     ("class Point:\n    def __init__(self, x, y, label=None):\n        self.x = x\n"
     "        self.y = y\n        self.label = label\n\n    def norm(self):\n"
     "        return (self.x ** 2 + self.y ** 2) ** 0.5\n\n    def shifted(self, dx, dy):\n"
     "        return Point(self.x + dx, self.y + dy, self.label)\n")),
    ("Add error handling: raise ValueError for an empty list. Reply with the code only.",
     ("def median(xs):\n    s = sorted(xs)\n    n = len(s)\n    mid = n // 2\n    if n % 2 == 1:\n"
     "        return s[mid]\n    return (s[mid - 1] + s[mid]) / 2\n")),
    ("Convert this function to use pathlib instead of os.path. Reply with the code only.",
     ("import os\n\n\ndef find_logs(root):\n    found = []\n    for name in os.listdir(root):\n"
     "        path = os.path.join(root, name)\n        if os.path.isfile(path) and name.endswith('.log'):\n"
     "            found.append(os.path.abspath(path))\n    return sorted(found)\n")),
    ("Add type hints and a docstring. Reply with the code only.",
     ("def chunks(xs, n):\n    if n <= 0:\n        raise ValueError('n must be positive')\n"
     "    return [xs[i:i + n] for i in range(0, len(xs), n)]\n")),
]  # fmt: skip

NGRAM = {"method": "ngram", "prompt_lookup_max": 4, "prompt_lookup_min": 2}


def prompts(kind: str, n: int, tokenizer) -> list[str]:
    if kind == "complete":
        return COMPLETE[:n]
    out = []
    for ask, code in EDIT[:n]:
        msgs = [{"role": "user", "content": f"{ask}\n\n```python\n{code}```"}]
        out.append(tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
    return out


def phase(args: argparse.Namespace) -> None:
    """One engine, in a child process: every prompt alone, greedy; the record as JSON."""
    import dlf_rs.engines.vllm as dv
    import vllm
    from vllm import SamplingParams

    spec = None
    if args.phase in ("fused+ngram", "large+ngram"):
        spec = dict(NGRAM, num_speculative_tokens=args.tokens)
    elif args.phase == "fused+draft":
        spec = {"method": "draft_model", "model": args.draft_model,
                "num_speculative_tokens": args.tokens}  # fmt: skip
    kw = {
        "dtype": "bfloat16",
        "enforce_eager": True,
        "max_model_len": 2048,
        "max_num_seqs": 1,
        "seed": 0,
        "disable_log_stats": False,
    }
    t0 = time.perf_counter()
    if args.phase.startswith("large"):
        llm = vllm.LLM(model=args.large, **kw, **({"speculative_config": spec} if spec else {}))
    else:
        llm = dv.llm(args.fused, **kw, **({"speculative_config": spec} if spec else {}))
    start = time.perf_counter() - t0
    ps = prompts(args.set, args.prompts, llm.get_tokenizer())
    sp = SamplingParams(temperature=0, max_tokens=args.max_tokens, logprobs=2)
    llm.generate(ps[:1], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)  # warm
    before = _counters(llm)
    walls, tokens, margins = [], [], []
    for p in ps:  # concurrency 1
        t = time.perf_counter()
        out = llm.generate([p], sp, use_tqdm=False)[0]
        walls.append(time.perf_counter() - t)
        tokens.append(list(out.outputs[0].token_ids))
        margins.append([_margin(d) for d in out.outputs[0].logprobs or []])
    after = _counters(llm)
    spec_counts = {k: after[k] - before.get(k, 0) for k in after}
    Path(args.out).write_text(json.dumps({"start": start, "walls": walls, "tokens": tokens,
                                          "margins": margins, "spec": spec_counts}))  # fmt: skip


def _margin(d: dict) -> float | None:
    """The log-probability gap between the chosen (greedy) token and the runner-up."""
    lps = sorted((v.logprob for v in d.values()), reverse=True)
    return None if len(lps) < 2 else lps[0] - lps[1]


def _counters(llm) -> dict[str, float]:
    out = {}
    for m in llm.get_metrics():
        if m.name.startswith("vllm:spec_decode_num_") and hasattr(m, "value"):
            out[m.name.removeprefix("vllm:spec_decode_num_")] = float(m.value)
    return out


def _line(name: str, rs: list[dict]) -> str:
    n = sum(len(t) for r in rs for t in r["tokens"])
    wall = sum(w for r in rs for w in r["walls"])
    line = f"{name:12s} {n:5d} tokens in {wall:7.1f} s  {n / wall:6.2f} tok/s"
    if len(rs) == 1:
        line += f"  (engine start {rs[0]['start']:.1f} s)"
    drafts = sum(r["spec"].get("drafts", 0) for r in rs)
    drafted = sum(r["spec"].get("draft_tokens", 0) for r in rs)
    accepted = sum(r["spec"].get("accepted_tokens", 0) for r in rs)
    if drafted:
        line += (f"  accepted {accepted:.0f}/{drafted:.0f} drafted ({accepted / drafted:.1%}), "
                 f"mean acceptance length {1 + accepted / max(drafts, 1):.2f}")  # fmt: skip
    return line


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--cache", default=None, help="the real family's cache (as make real-family)")
    p.add_argument("--prompts", type=int, default=6)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--set", choices=("edit", "complete"), default="edit")
    p.add_argument("--tokens", type=int, default=3, help="num_speculative_tokens")
    p.add_argument("--expert", choices=("perturbed", "small"), default="perturbed")
    p.add_argument("--draft", action="store_true", help="also draft with the small member")
    p.add_argument(
        "--large-ngram",
        action="store_true",
        help="also the large model alone with the n-gram proposer (vLLM's own case)",
    )
    p.add_argument("--only", nargs="*", default=None,
                   help="run these engines, in this order (repeats allowed: runs of the same "
                   "engine are pooled, each one printed; alternate them on a shared machine)")  # fmt: skip
    for hidden in ("--phase", "--fused", "--large", "--draft-model", "--out"):
        p.add_argument(hidden, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if args.phase is not None:
        phase(args)
        return

    import dlf_rs.engines.vllm as dv
    from dlf_rs.real_family import cache_root

    root = cache_root(args.cache)
    large, small = root / "large-bf16", root / "small-bf16"
    expert = small if args.expert == "small" else root / "llamacpp" / "expert-bf16"
    for need in (large, small, expert):
        if not (need / "config.json").exists():
            hint = "benches/bench_llamacpp.py (or --expert small)" if need == expert else \
                "make real-family"  # fmt: skip
            sys.exit(f"missing {need}: run {hint} first")
    tmp = Path(tempfile.mkdtemp(prefix="vllm_spec_"))
    fused = dv.build_fused_dir(tmp / "fused", large, small, [expert])
    engines = (
        ["large", "fused", "fused+ngram"]
        + (["fused+draft"] if args.draft else [])
        + (["large+ngram"] if args.large_ngram else [])
    )
    if args.only:
        known = {"large", "fused", "fused+ngram", "fused+draft", "large+ngram"}
        bad = [e for e in args.only if e not in known]
        if bad:
            sys.exit(f"--only: unknown engine {bad[0]!r}; expected {sorted(known)}")
        engines = list(args.only)
    env = dict(os.environ, VLLM_LOGGING_LEVEL="WARNING")
    runs: dict[str, list[dict]] = {}
    for i, name in enumerate(engines):
        out = tmp / f"{i}-{name}.json"
        subprocess.run([sys.executable, __file__, "--phase", name, "--fused", str(fused),
                        "--large", str(large), "--draft-model", str(small), "--out", str(out),
                        "--prompts", str(args.prompts), "--max-tokens", str(args.max_tokens),
                        "--set", args.set, "--tokens", str(args.tokens)], check=True, env=env)  # fmt: skip
        r = json.loads(out.read_text())
        runs.setdefault(name, []).append(r)
        print(_line(name, [r]), flush=True)
    print("pooled over runs:" if any(len(v) > 1 for v in runs.values()) else "")
    rates = {}
    for name, rs in runs.items():
        print(_line(name, rs))
        rates[name] = sum(len(t) for r in rs for t in r["tokens"]) / sum(
            w for r in rs for w in r["walls"]
        )
    for name, rs in runs.items():
        base = name.split("+")[0]
        if "+" not in name or base not in runs:
            continue
        want = runs[base][0]
        for r in rs:
            same = sum(a == b for a, b in zip(r["tokens"], want["tokens"]))
            print(f"greedy tokens of {name} equal {base}'s on {same} of {args.prompts} prompts")
            for b, (a, w) in enumerate(zip(r["tokens"], want["tokens"])):
                if a != w:
                    j = next(i for i, (x, y) in enumerate(zip(a + [-1], w + [-2])) if x != y)
                    m = want["margins"][b]
                    gap = f"{m[j]:.3f}" if j < len(m) and m[j] is not None else "?"
                    print(
                        f"  prompt {b}: first difference at token {j} of {len(w)}; {base}'s "
                        f"top-two log-probability gap there {gap}"
                    )
    for name in ("fused", "fused+ngram", "fused+draft"):
        if name in rates and "large" in rates:
            print(f"{name} / large alone: {rates[name] / rates['large']:.2f}x")
    got = runs
    (tmp / "summary.json").write_text(json.dumps(got))
    print(f"records: {tmp}/summary.json")


if __name__ == "__main__":
    main()
