"""DLF served by vLLM: the fused model as a vLLM model (``pip install "dlf_rs[vllm]"``).

- :func:`build_fused_dir` writes a directory vLLM can be pointed at (its ``config.json`` names
  the large, small and expert checkpoints and the default options: :mod:`.spec`);
- vLLM loads it through the ``vllm.general_plugins`` entry point (:func:`register`, which maps
  the architecture ``DlfFusedForCausalLM`` to :class:`.model.DlfFusedForCausalLM`);
- :data:`PROCESSOR` (:class:`.logits.DlfLogitsProcessor`) adds per-request options
  (``dlf_*`` extra arguments) and alpha logs (``dlf_alpha_log``); the plugin attaches it to
  fused models' configs, and :func:`llm` and ``dlf-rs serve`` pass it explicitly too.

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
    vLLM process before its configs are built: registers the fused architecture (lazily: no
    import of the model here) and makes a fused model's config carry the DLF logits processor,
    so that a plain ``LLM(dir)`` or ``vllm serve dir`` takes per-request options too. Only
    configs of a fused directory are touched: other models keep vLLM's behaviour (custom logits
    processors rule out speculative decoding, so they are never added to other models)."""
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "dlf_rs.engines.vllm.model:DlfFusedForCausalLM")
    _attach_processor()


def _attach_processor() -> None:
    try:
        from vllm.config import ModelConfig
    except ImportError:  # another vLLM layout: `dv.llm` / `dlf-rs serve` still pass it
        return
    original = ModelConfig.__post_init__
    if getattr(original, "_dlf_rs", False):
        return

    def __post_init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        try:
            archs = list(getattr(self.hf_config, "architectures", None) or [])
        except Exception:  # noqa: BLE001 - a config without hf_config: not ours
            return
        if ARCHITECTURE not in archs:
            return
        procs = list(self.logits_processors or [])
        if PROCESSOR not in procs:
            self.logits_processors = [*procs, PROCESSOR]
        if os.path.isdir(str(self.model)):  # the frontend's request checks know T
            os.environ[FUSED_DIR_ENV] = str(self.model)

    __post_init__._dlf_rs = True  # type: ignore[attr-defined]
    ModelConfig.__post_init__ = __post_init__  # type: ignore[method-assign]


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
