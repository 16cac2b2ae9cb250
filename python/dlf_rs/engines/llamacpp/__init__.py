"""The llama.cpp engine: DLF over GGUF files, :class:`LlamaCppGenerator`.

In the order of the flow: :mod:`.native` (llama.cpp's C API through ``llama_cpp``: GGUF models
and LoRA adapters loaded as they are, one context per member, multi-sequence batches, logits as
numpy views of llama.cpp's buffers), :mod:`.generate` (argument checks, the decode loop, the
GGUF tokenizer) and :mod:`.speculative` (speculative DLF's rounds on llama.cpp). Needs ``llama-cpp-python`` (the ``llamacpp`` extra); no torch.
docs/llamacpp.md has the build recipe and the measurements.
"""

from __future__ import annotations

from typing import Any

__all__ = ["LlamaCppGenerator"]


def __getattr__(name: str) -> Any:
    if name == "LlamaCppGenerator":
        from .generate import LlamaCppGenerator

        return LlamaCppGenerator
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
