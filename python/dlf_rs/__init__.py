"""dlf_rs: Dynamic Logit Fusion (weak-to-strong decoding, arXiv 2406.15480) with a Rust core.

The package in the order of the flow:
- :mod:`dlf_rs.options`: :class:`StepOptions`, every option of a step with its default and rules;
- :mod:`dlf_rs.step`: the checked step API (``fuse_step``, ``fuse_logits``, ``sample``) over the
  Rust extension ``dlf_rs._core`` (array conversion in :mod:`dlf_rs.arrays`);
- :mod:`dlf_rs.generate`: ``FusedGenerator``, batched generation with Hugging Face models, built
  from :mod:`dlf_rs.loading` (checkpoints), :mod:`dlf_rs.runner` (forwards and KV caches),
  :mod:`dlf_rs.staging` (host buffers), :mod:`dlf_rs.stopping` (EOS and stop strings),
  :mod:`dlf_rs.seeds` and :mod:`dlf_rs.results`;
- :mod:`dlf_rs.cli`: the ``dlf-rs`` command (also ``python -m dlf_rs``).
Beside the library: :mod:`dlf_rs.family` (the shipped default family: world, training, demo,
plots) and :mod:`dlf_rs.bench` (the end-to-end benchmark); the library never imports them.

``import dlf_rs`` needs only numpy: the driver (torch, transformers) is imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._core import DlfError, DlfInternalError, StepResult, __version__
from .options import StepOptions
from .step import fuse_logits, fuse_step, sample

if TYPE_CHECKING:
    from .generate import FusedGenerator
    from .results import GenerationResult

__all__ = [
    "DlfError",
    "DlfInternalError",
    "FusedGenerator",
    "GenerationResult",
    "StepOptions",
    "StepResult",
    "__version__",
    "fuse_logits",
    "fuse_step",
    "sample",
]


def __getattr__(name: str) -> Any:
    # The driver needs torch and transformers; importing them only on first use keeps
    # `import dlf_rs` light for callers that only want the decode core.
    if name == "FusedGenerator":
        from .generate import FusedGenerator

        return FusedGenerator
    if name == "GenerationResult":
        from .results import GenerationResult

        return GenerationResult
    raise AttributeError(f"module 'dlf_rs' has no attribute {name!r}")
