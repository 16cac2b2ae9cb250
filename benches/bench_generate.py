"""End-to-end step-time breakdown of FusedGenerator (forwards, copies, fuse_step, sampling).

Where it sits: the outermost benchmark; ``bench_fuse_step.py`` and the criterion benches time the
core alone. Models are random-initialised Llamas with the shapes of the named presets (bf16 on
CUDA, float32 on CPU) sharing a 32000-token word-level tokenizer, so nothing is downloaded. It
prints the per-step time of each phase for DLF, static fusion (proxy-tuning) and the large model
alone, and the ratio of DLF's step time to the large model's own forward time. EOS is disabled so
every row runs all ``--steps``. Numbers are printed, never asserted.

    python benches/bench_generate.py --large-config tiny --small-config tiny --batch 4 --steps 16
    python benches/bench_generate.py --large-config llama2-13b --small-config tinyllama-1.1b \
        --batch 8 --steps 64 --experts 2
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Any

import torch

PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"hidden": 64, "inter": 128, "layers": 2, "heads": 4, "kv": 2},
    "tinyllama-1.1b": {"hidden": 2048, "inter": 5632, "layers": 22, "heads": 32, "kv": 4},
    "llama2-7b": {"hidden": 4096, "inter": 11008, "layers": 32, "heads": 32, "kv": 32},
    "llama2-13b": {"hidden": 5120, "inter": 13824, "layers": 40, "heads": 40, "kv": 40},
}
VOCAB = 32000


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


def make_model(preset: str, device: torch.device, dtype: torch.dtype, seed: int) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    p = PRESETS[preset]
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=p["hidden"], intermediate_size=p["inter"],
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


def per_step(t: dict[str, float]) -> dict[str, float]:
    steps = max(t["steps"], 1.0)
    decode_forwards = max(steps - 1.0, 1.0)  # the first step's logits come from the prefill
    return {
        "forward": (t["forward"] - t["prefill"]) / decode_forwards,
        "copy": t["copy"] / steps,
        "fuse_step": t["fuse_step"] / steps,
        "sample": t["sample"] / steps,
        "step": (t["total"] - t["prefill"]) / steps,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--large-config", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--small-config", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--experts", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--solver", choices=("grid", "exact"), default="grid")
    ap.add_argument("--support-k", type=int, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = ap.parse_args()

    from dlf_rs.generate import FusedGenerator

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)
    t0 = time.perf_counter()
    large = make_model(args.large_config, device, dtype, seed=0)
    small = make_model(args.small_config, device, dtype, seed=1)
    experts = []
    for i in range(args.experts):
        expert = copy.deepcopy(small)
        gen = torch.Generator(device=device).manual_seed(100 + i)
        with torch.no_grad():
            for p in expert.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=gen, device=device, dtype=p.dtype))
        experts.append(expert)
    tok = make_tokenizer(VOCAB)
    build_s = time.perf_counter() - t0

    gen_ = FusedGenerator(large, small, experts, tok)
    gen_.eos_token_ids = set()  # every row runs all steps
    gen_.sync_timings = True  # honest per-phase times on CUDA (otherwise waits land in "copy")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, VOCAB, (args.batch, args.prompt_len), generator=g)
    prompts = [" ".join(f"t{int(i) - 4}" for i in row) for row in ids]
    kw: dict[str, Any] = {"max_new_tokens": args.steps}
    dlf_kw = {"method": "dlf", "solver": args.solver, "support_k": args.support_k}

    gen_.generate(prompts, max_new_tokens=2, **dlf_kw)  # warm-up (allocator, kernels, staging)
    runs = {
        "dlf": gen_.generate(prompts, **kw, **dlf_kw).timings,
        "static": gen_.generate(prompts, **kw, method="static", alpha=1.0).timings,
        "large": gen_.generate(prompts, **kw, method="large").timings,
    }
    print(
        f"device={device} dtype={dtype_name} large={args.large_config} small={args.small_config} "
        f"experts={args.experts} batch={args.batch} steps={args.steps} vocab={VOCAB} "
        f"prompt_len={args.prompt_len} solver={args.solver} support_k={args.support_k} "
        f"threads={torch.get_num_threads()} (models built in {build_s:.1f}s)"
    )
    print(f"{'method':8s} {'forward':>10s} {'copy':>10s} {'fuse_step':>10s} {'sample':>10s} "
          f"{'step':>10s}   (ms per step; forward = all models' decode forwards)")  # fmt: skip
    rows = {name: per_step(t) for name, t in runs.items()}
    for name, r in rows.items():
        print(
            f"{name:8s} {1e3 * r['forward']:10.3f} {1e3 * r['copy']:10.3f} "
            f"{1e3 * r['fuse_step']:10.3f} {1e3 * r['sample']:10.3f} {1e3 * r['step']:10.3f}"
        )
    large_fwd = rows["large"]["forward"]
    print(f"DLF step / large forward: {rows['dlf']['step'] / large_fwd:.2f}x")
    print(f"static step / large forward: {rows['static']['step'] / large_fwd:.2f}x")
    print(f"DLF step / large-alone step: {rows['dlf']['step'] / rows['large']['step']:.2f}x")
    print(f"fuse_step share of the DLF step: {rows['dlf']['fuse_step'] / rows['dlf']['step']:.1%}")


if __name__ == "__main__":
    main()
