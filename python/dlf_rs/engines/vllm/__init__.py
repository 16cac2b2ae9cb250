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
    refuse_under_speculation,
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
    processors rule out speculative decoding, so they are never added to other models), and a
    fused engine that speculates drops the processor again (:func:`_speculation_hooks`)."""
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
    _speculation_hooks()


def _is_fused(model_config: Any) -> bool:
    try:
        return ARCHITECTURE in list(getattr(model_config.hf_config, "architectures", None) or [])
    except Exception:  # noqa: BLE001 - a config without hf_config: not ours
        return False


def _speculation_hooks() -> None:
    """Speculative decoding of a fused model (docs/vllm.md, "Speculative decoding"). vLLM
    refuses every custom logits processor when it speculates, so a fused engine's config drops
    the DLF processor then (the model fuses every position with the directory's defaults in
    ``compute_logits``, which the rejection sampler verifies), and its request checks refuse
    ``dlf_*`` options (HTTP 400 naming the field) instead of ignoring them."""
    try:
        from vllm.config import VllmConfig
        from vllm.v1.engine.input_processor import InputProcessor
    except ImportError:  # another vLLM layout: `dlf-rs serve` still leaves the processor out
        return
    original = VllmConfig.__post_init__
    if not getattr(original, "_dlf_rs", False):

        def __post_init__(self: Any, *args: Any, **kwargs: Any) -> None:
            original(self, *args, **kwargs)
            mc = self.model_config
            if mc is None or self.speculative_config is None or not _is_fused(mc):
                return
            procs = list(mc.logits_processors or [])
            kept = [p for p in procs if "dlf_rs.engines.vllm" not in _processor_name(p)]
            if len(kept) != len(procs):
                mc.logits_processors = kept or None

        __post_init__._dlf_rs = True  # type: ignore[attr-defined]
        VllmConfig.__post_init__ = __post_init__  # type: ignore[method-assign]
    build = InputProcessor._build_logits_processors_params_validator
    if getattr(build, "_dlf_rs", False):
        return

    def _build(self: Any) -> Any:
        validate = build(self)
        if self.vllm_config.speculative_config is None or not _is_fused(self.model_config):
            return validate

        def check(params: Any) -> None:
            from vllm.exceptions import VLLMValidationError

            validate(params)
            try:
                refuse_under_speculation(getattr(params, "extra_args", None))
            except FusedConfigError as e:
                raise VLLMValidationError(str(e)) from None

        return check

    _build._dlf_rs = True  # type: ignore[attr-defined]
    InputProcessor._build_logits_processors_params_validator = _build  # type: ignore[method-assign]


def _processor_name(p: Any) -> str:
    return p if isinstance(p, str) else f"{p.__module__}:{p.__qualname__}"


def llm(fused_dir: str | os.PathLike[str], **kwargs: Any) -> Any:
    """``vllm.LLM`` on a fused directory with the DLF logits processor (per-request options)
    and request checks that know the expert count; other keywords go to ``vllm.LLM``. With
    ``speculative_config`` every request is fused with the directory's defaults (requests that
    set ``dlf_*`` options are refused)."""
    from vllm import LLM

    load_spec(fused_dir)  # a clear error before vLLM starts
    os.environ[FUSED_DIR_ENV] = os.fspath(fused_dir)
    procs = list(kwargs.pop("logits_processors", None) or [])
    if PROCESSOR not in procs and kwargs.get("speculative_config") is None:
        procs.append(PROCESSOR)  # vLLM runs no custom processor when it speculates
    return LLM(model=os.fspath(fused_dir), logits_processors=procs, **kwargs)
