"""dlf_rs: Dynamic Logit Fusion (weak-to-strong decoding, arXiv 2406.15480) with a Rust core.

The package in the order of the flow:
- :mod:`dlf_rs.options`: :class:`StepOptions`, every option of a step with its default and rules;
- :mod:`dlf_rs.step`: the checked step API (``fuse_step``, ``fuse_logits``, ``sample``) over the
  Rust extension ``dlf_rs._core`` (array conversion in :mod:`dlf_rs.arrays`);
- what every engine shares: :mod:`dlf_rs.hub` (paths vs hub ids), :mod:`dlf_rs.merge` (task
  arithmetic), :mod:`dlf_rs.inputs` (prompts, chat templates), :mod:`dlf_rs.stopping` (EOS and
  stop strings), :mod:`dlf_rs.seeds` and :mod:`dlf_rs.results`;
- :mod:`dlf_rs.engines`: what runs the members' forwards. :mod:`dlf_rs.engines.hf` is
  ``FusedGenerator`` (Hugging Face checkpoints and LoRA adapter experts, batched generation,
  streaming, speculative DLF, scoring), :mod:`dlf_rs.engines.vllm` is DLF inside vLLM
  (``dlf-rs serve``), :mod:`dlf_rs.engines.llamacpp` is DLF over GGUF files on llama.cpp, and
  :mod:`dlf_rs.engines.fusion` the per-step fusion of rows with their own options they share;
- :mod:`dlf_rs.cli` with :mod:`dlf_rs.flags`: the ``dlf-rs`` command (also ``python -m dlf_rs``);
- :mod:`dlf_rs.reference`: the pure-numpy reference of the step the checks compare against.
Beside the library: :mod:`dlf_rs.family` (the shipped default family: world, training, demo,
plots), :mod:`dlf_rs.bench` (the end-to-end benchmark), :mod:`dlf_rs.harness`
(lm-evaluation-harness's model "dlf", ``dlf-rs eval``) and :mod:`dlf_rs.real_family` (the
Qwen2.5-Coder family from PyPI and the weak-to-strong evaluation on it); the library never
imports them.

``import dlf_rs`` needs only numpy: the driver (torch, transformers) is imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._core import DlfError, DlfInternalError, StepResult, __version__
from .options import StepOptions
from .step import fuse_logits, fuse_step, sample

if TYPE_CHECKING:
    from .engines.hf.generate import FusedGenerator
    from .results import GenerationResult
    from .streaming import GenerationStream, StreamChunk

__all__ = [
    "DlfError",
    "DlfInternalError",
    "FusedGenerator",
    "GenerationResult",
    "GenerationStream",
    "StepOptions",
    "StepResult",
    "StreamChunk",
    "__version__",
    "fuse_logits",
    "fuse_step",
    "sample",
]


# The optional dependencies of the lazily imported parts, by top-level module -> the extra that
# installs them (pyproject.toml's [project.optional-dependencies]).
_EXTRA_OF_MODULE = {
    "torch": "generate", "transformers": "generate", "safetensors": "generate",
    "tokenizers": "generate", "tqdm": "generate", "matplotlib": "plot", "peft": "peft",
    "gguf": "gguf", "accelerate": "gguf", "lm_eval": "eval",
}  # fmt: skip
# Public names imported on first use: name -> (submodule, attribute).
_LAZY_NAMES = {
    "FusedGenerator": ("engines.hf.generate", "FusedGenerator"),
    "GenerationResult": ("results", "GenerationResult"),
    "GenerationStream": ("streaming", "GenerationStream"),
    "StreamChunk": ("streaming", "StreamChunk"),
}
# Submodules reachable as attributes (``dlf_rs.plotting``) without an explicit import.
_LAZY_SUBMODULES = frozenset({
    "bench", "cli", "engines", "family", "harness", "inputs", "merge", "plotting",
    "real_family", "results", "seeds", "stopping",
})  # fmt: skip


def _import_optional(submodule: str, what: str) -> Any:
    """Import ``dlf_rs.<submodule>``; a missing optional dependency becomes an ImportError that
    names the extra to install (a bare "No module named 'torch'" says nothing about dlf_rs)."""
    import importlib

    try:
        return importlib.import_module(f"{__name__}.{submodule}")
    except ModuleNotFoundError as err:
        # Only a top-level module that is absent altogether: a broken or too old install
        # ("No module named 'transformers.models.x'") keeps its own message.
        missing = err.name or ""
        extra = _EXTRA_OF_MODULE.get(missing)
        if extra is None:
            raise
        raise ImportError(
            f"dlf_rs.{what} needs {missing}, which is not installed: "
            f'pip install "dlf_rs[{extra}]" (the decode core, dlf_rs.fuse_step and '
            "dlf_rs.fuse_logits, needs only numpy)",
            name=missing,
        ) from err


def __getattr__(name: str) -> Any:
    # The driver needs torch and transformers; importing them only on first use keeps
    # `import dlf_rs` light for callers that only want the decode core.
    if name in _LAZY_NAMES:
        submodule, attr = _LAZY_NAMES[name]
        return getattr(_import_optional(submodule, name), attr)
    if name in _LAZY_SUBMODULES:
        return _import_optional(name, name)
    raise AttributeError(f"module 'dlf_rs' has no attribute {name!r}")
