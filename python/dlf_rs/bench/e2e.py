"""End-to-end decode benchmark of FusedGenerator: ``dlf-rs bench`` and ``benches/bench_generate.py``.

Where it sits: the outermost benchmark (``benches/bench_fuse_step.py`` and the criterion benches
time the Rust core alone). Models are random-initialised Llamas with the shapes of the named
presets sharing a word-level tokenizer, so nothing is downloaded. For every batch size B and
expert count T it runs, in one process and on the same prompts:
- ``naive``: a proxy-tuning style eager loop written here (models one after another, DynamicCache,
  full-vocabulary torch fusion z_L + sum_t (z_t - z_S), argmax on the device);
- ``simple``: DLF through ``FusedGenerator`` (default path, DynamicCache);
- ``fast``: DLF through ``FusedGenerator(fast=True)`` (static caches; compiled on CUDA);
- each model's own single-token decode step alone, with the fast path's cache kind and compiled
  call, and the weights-bandwidth floor (all weights read once per step / memory bandwidth).
It prints per-step times split into each model's forward, the copies, ``fuse_step`` and sampling,
tokens per second, three ratios (step / naive step, step / sum of the models' own steps,
step / bandwidth floor) and, on CUDA, peak memory against weights plus KV caches. EOS is disabled
so every row runs all steps. Numbers are printed, never asserted.
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import time
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["PRESETS", "add_arguments", "main", "run"]

PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"hidden": 64, "inter": 128, "layers": 2, "heads": 4, "kv": 2},
    "tinyllama-1.1b": {"hidden": 2048, "inter": 5632, "layers": 22, "heads": 32, "kv": 4},
    "llama2-7b": {"hidden": 4096, "inter": 11008, "layers": 32, "heads": 32, "kv": 32},
    "llama2-13b": {"hidden": 5120, "inter": 13824, "layers": 40, "heads": 40, "kv": 40},
}
# Peak HBM bandwidth (B/s) by substring of torch.cuda.get_device_name(); others are measured.
DEVICE_BANDWIDTH: dict[str, float] = {
    "H200": 4.8e12, "H100": 3.35e12, "A100-SXM4-80GB": 2.04e12, "A100": 1.55e12,
    "L40S": 8.64e11, "A10G": 6.0e11, "L4": 3.0e11,
}  # fmt: skip


# ---------------------------------------------------------------------- models
def make_tokenizer(vocab: int) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"t{i}" for i in range(vocab - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        unk_token="<unk>", padding_side="left",
    )  # fmt: skip


def make_model(preset: str, vocab: int, device: torch.device, dtype: torch.dtype, seed: int) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    p = PRESETS[preset]
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=p["hidden"], intermediate_size=p["inter"],
        num_hidden_layers=p["layers"], num_attention_heads=p["heads"],
        num_key_value_heads=p["kv"], max_position_embeddings=4096, tie_word_embeddings=False,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def make_expert(small: Any, seed: int) -> Any:
    expert = copy.deepcopy(small)
    device = next(small.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in expert.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen, device=device, dtype=p.dtype))
    return expert


def weight_bytes(models: Sequence[Any]) -> int:
    return sum(p.numel() * p.element_size() for m in models for p in m.parameters())


# ---------------------------------------------------------------------- measurements
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_bandwidth(device: torch.device, nbytes: int = 1 << 28) -> float:
    """Copy bandwidth in B/s (bytes read plus bytes written), best of 5 copies of ``nbytes``."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = math.inf
    for _ in range(5):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def device_bandwidth(device: torch.device, given: float | None) -> tuple[float, str]:
    """The bandwidth for the floor and where it came from."""
    if given is not None:
        return given, "--bandwidth"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in DEVICE_BANDWIDTH.items():
            if key in name:
                return value, f"spec sheet of {name}"
    return measure_bandwidth(device), "measured (torch copy, read + write)"


def _encode(tok: Any, prompts: list[str], device: torch.device) -> tuple[torch.Tensor, ...]:
    enc = tok(prompts, padding=True, return_tensors="pt", add_special_tokens=True)
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def naive_step_time(models: list[Any], tok: Any, prompts: list[str], steps: int) -> float:
    """Seconds per step of the proxy-tuning style loop: ``models`` = [large, small, *experts]."""
    from transformers import DynamicCache

    from dlf_rs.engines.hf.runner import cache_keyword

    device = next(models[0].parameters()).device
    vocab = len(tok)
    with torch.no_grad():
        ids, mask, pos = _encode(tok, prompts, device)
        # {"cache": c} (or {"past_key_values": c} on transformers 4.x), made once per model.
        caches = [{cache_keyword(m): DynamicCache(config=m.config)} for m in models]
        z = [
            m(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
              **c).logits[:, -1, :vocab].float()
            for m, c in zip(models, caches)
        ]  # fmt: skip
        pos = pos[:, -1:]
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            fused = z[0] + sum(zt - z[1] for zt in z[2:])
            nxt = fused.argmax(-1, keepdim=True)
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
            pos = pos + 1
            z = [
                m(input_ids=nxt, attention_mask=mask, position_ids=pos, use_cache=True,
                  **c).logits[:, -1, :vocab].float()
                for m, c in zip(models, caches)
            ]  # fmt: skip
        _sync(device)
    return (time.perf_counter() - t0) / steps


def own_step_times(gen: Any, prompts: list[str], steps: int) -> dict[str, float]:
    """Seconds per single-token decode step of each model alone, reusing the fast generator's
    static caches and compiled calls (same shapes, so nothing is recompiled)."""
    from dlf_rs.engines.hf.fastpath import cache_length
    from dlf_rs.engines.hf.runner import cache_keyword

    out: dict[str, float] = {}
    with torch.no_grad():
        for name, state in gen._fast_models.items():
            device = next(state.model.parameters()).device
            ids, mask, pos = _encode(gen.tokenizer, prompts, device)
            ctx = getattr(state.model.config, "max_position_embeddings", None)
            state.prepare(ids.shape[0], cache_length(ids.shape[1] + steps, ctx), mask)
            kw = {"attention_mask": state.mask, cache_keyword(state.model): state.cache,
                  "use_cache": True}
            state.model(input_ids=ids, position_ids=pos, logits_to_keep=1, **kw)
            call = state.decode_call()
            nxt, pos = ids[:, -1:].clone(), pos[:, -1:]
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(steps - 1):  # the generator's decode forwards: one fewer than steps
                pos = pos + 1
                call(input_ids=nxt, position_ids=pos, logits_to_keep=1, **kw)
            _sync(device)
            out[name] = (time.perf_counter() - t0) / max(steps - 1, 1)
    return out


def per_step(t: dict[str, float]) -> dict[str, float]:
    """Per-step times from ``GenerationResult.timings`` (the first step's logits come from the
    prefill, so there is one decode forward fewer than steps)."""
    steps = max(t["steps"], 1.0)
    forwards = max(steps - 1.0, 1.0)
    row = {
        "copy": t["copy"] / steps,
        "fuse_step": t["fuse_step"] / steps,
        "sample": t["sample"] / steps,
        "step": (t["total"] - t["prefill"]) / steps,
    }
    experts = 0.0
    for key, value in t.items():
        if key.startswith("forward:expert"):
            experts += value / forwards
        elif key.startswith("forward:"):
            row[key] = value / forwards
    row["forward:experts"] = experts
    return row


# ---------------------------------------------------------------------- the run
def add_arguments(ap: argparse.ArgumentParser) -> None:
    gpu = torch.cuda.is_available()
    ap.add_argument("--large-config", choices=sorted(PRESETS), default=None,
                    help="large model shape (default: llama2-13b on CUDA, tiny on CPU)")
    ap.add_argument("--small-config", choices=sorted(PRESETS), default=None,
                    help="small base and experts shape (default: tinyllama-1.1b on CUDA, tiny)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32], metavar="B")
    ap.add_argument("--experts", type=int, nargs="+", default=[1, 4], metavar="T")
    ap.add_argument("--steps", type=int, default=32, help="decode steps per measured run")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--solver", choices=("grid", "exact"), default="grid")
    ap.add_argument("--support-k", type=int, default=None)
    ap.add_argument("--device", default="cuda" if gpu else "cpu")
    ap.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                    help="weights dtype (default: bfloat16 on CUDA, float32 on CPU)")
    ap.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                    help="compiled decode forwards in the fast path (auto: on CUDA only)")
    ap.add_argument("--bandwidth", type=float, default=None, metavar="B_PER_S",
                    help="memory bandwidth for the floor (default: spec sheet by GPU name, "
                         "else measured with a large torch copy)")
    # The same flag as `dlf-rs generate --threads` (default and meaning): torch's threads and the
    # core's workers. torch's own default (every core) was measured 21x slower per step at B=1
    # on a shared 2-core machine (168.7 ms against 7.99 with one thread).
    from dlf_rs.threads import threads_argument

    threads_argument(ap)


def _check(args: argparse.Namespace) -> None:
    for name in ("batch", "experts"):
        bad = [v for v in getattr(args, name) if v < 1]
        if bad:
            raise ValueError(f"--{name}: values must be >= 1, got {bad}")
    for name in ("steps", "prompt_len"):
        if getattr(args, name) < 2:
            raise ValueError(f"--{name.replace('_', '-')}: must be >= 2, got {getattr(args, name)}")
    if args.vocab < 8:
        raise ValueError(f"--vocab: must be >= 8, got {args.vocab}")


def run(args: argparse.Namespace) -> int:
    from dlf_rs.engines.hf.fastpath import cache_length, kv_cache_bytes
    from dlf_rs.engines.hf.generate import FusedGenerator
    from dlf_rs.engines.hf.loading import check_device
    from dlf_rs.options import StepOptions
    from dlf_rs.threads import set_threads

    _check(args)
    check_device("--device", args.device)
    set_threads(args.threads)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    large_cfg = args.large_config or ("llama2-13b" if on_gpu else "tiny")
    small_cfg = args.small_config or ("tinyllama-1.1b" if on_gpu else "tiny")
    dtype_name = args.dtype or ("bfloat16" if on_gpu else "float32")
    dtype = getattr(torch, dtype_name)
    compile_arg = {"auto": None, "on": True, "off": False}[args.compile]
    # Each (model shape, batch) is its own graph; the sweep needs more than dynamo's default 8.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)

    t0 = time.perf_counter()
    large = make_model(large_cfg, args.vocab, device, dtype, seed=0)
    small = make_model(small_cfg, args.vocab, device, dtype, seed=1)
    experts = [make_expert(small, 100 + i) for i in range(max(args.experts))]
    tok = make_tokenizer(args.vocab)
    build_s = time.perf_counter() - t0
    bandwidth, bw_src = device_bandwidth(device, args.bandwidth)
    fast_opts = FusedGenerator(large, tokenizer=tok, fast=True, compile=compile_arg)._fast_options
    assert fast_opts is not None

    print(
        f"device={device}{' (' + torch.cuda.get_device_name(device) + ')' if on_gpu else ''} "
        f"dtype={dtype_name} large={large_cfg} small={small_cfg} vocab={args.vocab} "
        f"steps={args.steps} prompt_len={args.prompt_len} solver={args.solver} "
        f"support_k={args.support_k} threads={torch.get_num_threads()} "
        f"(models built in {build_s:.1f}s)"
    )
    print(
        f"fast path: static KV caches, compile={fast_opts.compile}, overlap={fast_opts.overlap}; "
        f"bandwidth {bandwidth:.3g} B/s ({bw_src})"
    )
    print("times in ms per step; fwd = decode forward per model (experts summed); "
          "ratios = step / naive step, / sum of own steps, / bandwidth floor")  # fmt: skip
    head = (
        f"{'B':>3s} {'T':>2s} {'path':7s} {'fwd:L':>8s} {'fwd:S':>8s} {'fwd:E':>8s} "
        f"{'copy':>7s} {'fuse':>7s} {'sample':>7s} {'step':>8s} {'tok/s':>9s} "
        f"{'xnaive':>7s} {'xown':>7s} {'xfloor':>7s}"
    )
    g = torch.Generator().manual_seed(0)
    options = StepOptions(method="dlf", solver=args.solver, support_k=args.support_k)
    dlf_kw: dict[str, Any] = {"options": options, "max_new_tokens": args.steps}
    for n_exp in args.experts:
        models = [large, small, *experts[:n_exp]]
        for batch in args.batch:
            print(head)
            ids = torch.randint(4, args.vocab, (batch, args.prompt_len), generator=g)
            prompts = [" ".join(f"t{int(i) - 4}" for i in row) for row in ids]
            rows: dict[str, dict[str, float]] = {}
            for path in ("simple", "fast"):
                fast = path == "fast"
                gen = FusedGenerator(
                    large, small, experts[:n_exp], tok, fast=fast,
                    compile=compile_arg if fast else None,
                )  # fmt: skip
                gen.eos_token_ids = set()  # every row runs all steps
                gen.generate(prompts, **dlf_kw)  # warm-up: allocator, kernels, compile
                gen.sync_timings = True  # honest per-phase times (waits land in "forward")
                rows[path] = per_step(gen.generate(prompts, **dlf_kw).timings)
                if on_gpu:  # the wall-clock step, without the timing syncs
                    gen.sync_timings = False
                    torch.cuda.reset_peak_memory_stats(device)
                    rows[path]["step"] = per_step(gen.generate(prompts, **dlf_kw).timings)["step"]
                    rows[path]["peak"] = float(torch.cuda.max_memory_allocated(device))
                if fast:
                    own = own_step_times(gen, prompts, args.steps)
                    width = len(gen._tokenize([prompts[0]])[0])
                    ctx = large.config.max_position_embeddings
                    kv = sum(
                        kv_cache_bytes(m, batch, cache_length(width + args.steps, ctx))
                        for m in models
                    )
                del gen
            naive = naive_step_time(models, tok, prompts, args.steps)
            floor = weight_bytes(models) / bandwidth
            own_sum = sum(own.values())
            print(f"{batch:3d} {n_exp:2d} {'naive':7s} {'':>8s} {'':>8s} {'':>8s} {'':>7s} "
                  f"{'':>7s} {'':>7s} {1e3 * naive:8.3f} {batch / naive:9.1f}")  # fmt: skip
            for path, r in rows.items():
                print(
                    f"{batch:3d} {n_exp:2d} {path:7s} {1e3 * r['forward:large']:8.3f} "
                    f"{1e3 * r['forward:small']:8.3f} {1e3 * r['forward:experts']:8.3f} "
                    f"{1e3 * r['copy']:7.3f} {1e3 * r['fuse_step']:7.3f} "
                    f"{1e3 * r['sample']:7.3f} {1e3 * r['step']:8.3f} "
                    f"{batch / r['step']:9.1f} {r['step'] / naive:7.2f} "
                    f"{r['step'] / own_sum:7.2f} {r['step'] / floor:7.2f}"
                )
            own_txt = " ".join(f"{k} {1e3 * v:.3f}" for k, v in own.items())
            print(f"       own decode steps (fast cache kind): {own_txt}; sum {1e3 * own_sum:.3f}"
                  f"; floor {1e3 * floor:.3f} ms ({weight_bytes(models) / 1e9:.3g} GB of weights)")
            # Every expert of the sweep stays resident, so the weights are all of them.
            wk = weight_bytes([large, small, *experts]) + kv
            if on_gpu:
                print(f"       peak GPU memory: fast {rows['fast']['peak'] / 2**30:.2f} GiB, "
                      f"simple {rows['simple']['peak'] / 2**30:.2f} GiB; resident weights + "
                      f"static KV {wk / 2**30:.2f} GiB (fast / that {rows['fast']['peak'] / wk:.2f})")
            else:
                print("       peak GPU memory: n/a on CPU (resident weights + static KV "
                      f"{wk / 2**20:.1f} MiB)")
            fr = rows["fast"]
            print(
                f"ratios B={batch} T={n_exp} fast: naive={fr['step'] / naive:.3f} "
                f"own_sum={fr['step'] / own_sum:.3f} floor={fr['step'] / floor:.3f}"
            )
            gc.collect()
            if on_gpu:
                torch.cuda.empty_cache()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="dlf-rs bench", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    add_arguments(ap)
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
