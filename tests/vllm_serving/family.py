"""A tiny member family vLLM's CPU attention accepts, built in-process and seeded.

The shipped family's head size (24) is refused by vLLM's CPU attention (32, 64, 80, ... are
accepted), so these tests build their own: a large Llama (hidden 128, two heads of 64), a small
Llama (hidden 64, two heads of 32) and two experts (the small architecture, other seeds), all on
the shipped family's tokenizer (215 tokens) with a chat template added. Weights are drawn with a
wide initializer so that next-token distributions are peaked (few near-ties in greedy decoding).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

TOKENIZER = Path(__file__).resolve().parents[2] / "python/dlf_rs/family/checkpoints/tokenizer"
CHAT_TEMPLATE = (
    "{% for m in messages %}<bos>{{ m['role'] }} : {{ m['content'] }} <eos>{% endfor %}"
    "{% if add_generation_prompt %}<bos>assistant :{% endif %}"
)
SHAPES = {
    "large": {"hidden_size": 128, "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 64,
                  "intermediate_size": 256, "num_hidden_layers": 3},
    "small": {"hidden_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32,
                  "intermediate_size": 128, "num_hidden_layers": 2},
}  # fmt: skip
SEEDS = {"large": 1, "small": 2, "expert0": 3, "expert1": 4}


def _tokenizer_files(out: Path) -> int:
    for f in TOKENIZER.iterdir():
        shutil.copy2(f, out / f.name)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    cfg["chat_template"] = CHAT_TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    return len(json.loads((TOKENIZER / "tokenizer.json").read_text())["model"]["vocab"])


def build_member(out: Path, shape: str, seed: int, vocab: int, base: Path | None = None,
                 positions: int = 512) -> Path:
    """One member; an expert (``base`` given) is its small base plus a seeded perturbation, as a
    fine-tune is (so the experts move every token a little and a few a lot)."""
    out.mkdir(parents=True, exist_ok=True)
    _tokenizer_files(out)
    cfg = LlamaConfig(vocab_size=vocab, max_position_embeddings=positions, rms_norm_eps=1e-6,
                      initializer_range=0.5, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                      tie_word_embeddings=False, **SHAPES[shape])  # fmt: skip
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).float().eval()
    if base is not None:
        ref = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for (_, p), (_, q) in zip(
                model.named_parameters(), ref.named_parameters(), strict=True
            ):
                p.copy_(q + 0.3 * q.std() * torch.randn(q.shape, generator=g))
    model.save_pretrained(out, safe_serialization=True)
    return out


def build_family(root: Path, experts: int = 2, positions: int = 512) -> dict[str, Path]:
    """large, small and ``experts`` experts under ``root`` (directories named as the keys);
    ``positions``: every member's max_position_embeddings (long requests need more)."""
    vocab = len(json.loads((TOKENIZER / "tokenizer.json").read_text())["model"]["vocab"])
    paths = {
        "large": build_member(root / "large", "large", SEEDS["large"], vocab, None, positions),
        "small": build_member(root / "small", "small", SEEDS["small"], vocab, None, positions),
    }
    for t in range(experts):
        name = f"expert{t}"
        paths[name] = build_member(root / name, "small", SEEDS[name], vocab, paths["small"],
                                   positions)
    return paths
