"""DLF served by vLLM: the fused model as a vLLM model (``pip install "dlf_rs[vllm]"``).

- :func:`build_fused_dir` writes a directory vLLM can be pointed at (its ``config.json`` names
  the large, small and expert checkpoints and the default options: :mod:`.spec`);
- vLLM loads it through the ``vllm.general_plugins`` entry point (:func:`register`, which maps
  the architecture ``DlfFusedForCausalLM`` to :class:`.model.DlfFusedForCausalLM`);
- :data:`PROCESSOR` (:class:`.logits.DlfLogitsProcessor`) adds per-request options
  (``dlf_*`` extra arguments) and alpha logs (``dlf_alpha_log``); :func:`llm` and ``dlf-rs
  serve`` pass it, as ``LLM(dir, logits_processors=[PROCESSOR])`` or ``vllm serve dir
  --logits-processors dlf_rs.vllm.logits:DlfLogitsProcessor`` would.

Only :func:`register`, :func:`llm` and the two submodules ``model`` / ``logits`` import vLLM.
docs/vllm.md has the design, what was rejected and the measurements.
"""

from __future__ import annotations

import os
from typing import Any

from .spec import (
    ARCHITECTURE,
    FUSED_DIR_ENV,
    FusedConfigError,
    FusedSpec,
    build_fused_dir,
    load_spec,
    read_alphas,
    request_options,
)
from .state import PROCESSOR

__all__ = [
    "ARCHITECTURE",
    "PROCESSOR",
    "FusedConfigError",
    "FusedSpec",
    "build_fused_dir",
    "llm",
    "load_spec",
    "read_alphas",
    "register",
    "request_options",
]


def register() -> None:
    """vLLM's general plugin (entry point ``vllm.general_plugins``: ``dlf_rs``), run in every
    vLLM process: registers the fused architecture, lazily (no import of the model here)."""
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "dlf_rs.vllm.model:DlfFusedForCausalLM")


def llm(fused_dir: str | os.PathLike[str], **kwargs: Any) -> Any:
    """``vllm.LLM`` on a fused directory with the DLF logits processor (per-request options)
    and request checks that know the expert count; other keywords go to ``vllm.LLM``."""
    from vllm import LLM

    load_spec(fused_dir)  # a clear error before vLLM starts
    os.environ[FUSED_DIR_ENV] = os.fspath(fused_dir)
    procs = list(kwargs.pop("logits_processors", None) or [])
    if PROCESSOR not in procs:
        procs.append(PROCESSOR)
    return LLM(model=os.fspath(fused_dir), logits_processors=procs, **kwargs)
