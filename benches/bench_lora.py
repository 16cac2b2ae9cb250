"""The small side's cost per decode step with T LoRA experts: mixed batch, separate, merged.

Printed, not asserted (timings never gate a test). For each shape (the shipped small base, and
SmolLM2-135M's shape with random weights) and batch size B, one run measures per decode step:
- one small forward (the plain base over B rows): the unit;
- mixed: the base and T adapters as ONE forward over (1 + T) * B rows (peft adapter_names);
- separate: 1 + T forwards of B rows on the shared PeftModel (one adapter name per forward);
- merged: 1 + T plain forwards, each adapter merged into its own copy of the base.
Each step runs on a cache prefilled with a 16-token prompt; the median of ``--steps`` steps.
The rule of ``lora_mode="auto"`` (dlf_rs.engines.hf.lora.choose_mode) is read from these numbers.

    PYTHONPATH=python python benches/bench_lora.py [--threads 1] [--steps 10] [--experts 4]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

SHIPPED = Path(__file__).resolve().parents[1] / "python/dlf_rs/family/checkpoints/small_base"
SMOLLM2_135M = {  # SmolLM2-135M's config (random weights: only the shape matters here)
    "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
    "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 2048,
    "tie_word_embeddings": True, "rope_theta": 100000.0,
}  # fmt: skip
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def shapes() -> dict[str, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    shipped = LlamaForCausalLM.from_pretrained(str(SHIPPED), dtype=torch.float32).eval()
    torch.manual_seed(0)
    smol = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).eval()
    torch.manual_seed(0)
    mid = LlamaForCausalLM(LlamaConfig(**{**SMOLLM2_135M, "hidden_size": 192, "num_hidden_layers": 6,
                                          "intermediate_size": 512, "num_attention_heads": 6,
                                          "num_key_value_heads": 2})).eval()  # fmt: skip
    return {"shipped small (hidden 24, 2 layers)": shipped, "hidden 192, 6 layers": mid,
            "SmolLM2-135M shape": smol}  # fmt: skip


def adapters(base: Any, n: int, r: int) -> list[Any]:
    import peft

    out = []
    for i in range(n):
        torch.manual_seed(100 + i)
        cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS,
                              init_lora_weights=False)  # fmt: skip
        out.append(peft.get_peft_model(copy.deepcopy(base), cfg).eval())
    return out


def step_time(call: Callable[[torch.Tensor, Any, torch.Tensor], Any], rows: int, steps: int) -> float:
    """Median seconds of one decode forward over ``rows`` rows after a 16-token prefill."""
    from transformers import DynamicCache

    ids = torch.randint(3, 200, (rows, 16))
    mask = torch.ones((rows, 16), dtype=torch.long)
    cache = DynamicCache()
    call(ids, cache, mask)
    times = []
    for _ in range(steps):
        mask = torch.cat([mask, mask.new_ones((rows, 1))], dim=-1)
        t0 = time.perf_counter()
        call(ids[:, -1:], cache, mask)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def plain(model: Any) -> Callable[..., Any]:
    def call(ids: torch.Tensor, cache: Any, mask: torch.Tensor) -> Any:
        return model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True,
                     logits_to_keep=1)  # fmt: skip

    return call


def tagged(model: Any, names: list[str]) -> Callable[..., Any]:
    def call(ids: torch.Tensor, cache: Any, mask: torch.Tensor) -> Any:
        rows = ids.shape[0] // len(names)
        tags = [n for n in names for _ in range(rows)]
        return model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True,
                     logits_to_keep=1, adapter_names=tags)  # fmt: skip

    return call


def measure(base: Any, n_experts: int, batch: int, steps: int, r: int) -> dict[str, float]:
    from dlf_rs.engines.hf.lora import AdapterView, MixedLora, lora_experts

    with torch.inference_mode():
        one = step_time(plain(base), batch, steps)
    peft_models = adapters(base, n_experts, r)
    small, experts, _ = lora_experts(copy.deepcopy(base), peft_models, "mixed")
    assert isinstance(small, AdapterView)
    members = [small.adapter] + [e.adapter for e in experts]
    mixed_model = MixedLora(small.peft_model, members)
    _, merged, _ = lora_experts(copy.deepcopy(base), peft_models, "merged")
    with torch.inference_mode():
        mixed = step_time(
            lambda i, c, m: mixed_model(input_ids=i, attention_mask=m, past_key_values=c,
                                        use_cache=True, logits_to_keep=1),
            (1 + n_experts) * batch, steps,
        )  # fmt: skip
        separate = sum(
            step_time(tagged(small.peft_model, [name]), batch, steps) for name in members
        )
        merged_t = one + sum(step_time(plain(m), batch, steps) for m in merged)
    return {"one": one, "mixed": mixed, "separate": separate, "merged": merged_t}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, CPU, {args.threads} thread(s); T={args.experts} LoRA "
          f"experts, r={args.rank} on {'/'.join(TARGETS)}; median of {args.steps} decode steps")  # fmt: skip
    print(f"{'shape':38} {'B':>2} {'one fwd ms':>10} {'mixed':>14} {'separate':>14} {'merged':>14}")
    for name, base in shapes().items():
        params = sum(q.numel() for q in base.parameters())
        for batch in args.batches:
            t = measure(base, args.experts, batch, args.steps, args.rank)
            cells = [f"{1e3 * t[k]:7.2f} {t[k] / t['one']:4.1f}x" for k in ("mixed", "separate", "merged")]
            print(f"{name + f' ({params / 1e6:.1f}M)':38} {batch:>2} {1e3 * t['one']:10.2f} "
                  + " ".join(f"{c:>14}" for c in cells))  # fmt: skip
    print("(x = the small side's cost per step as a multiple of one small forward over B rows)")


if __name__ == "__main__":
    main()
