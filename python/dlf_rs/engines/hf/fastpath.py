"""The opt-in fast decode path of :class:`dlf_rs.FusedGenerator` (``FusedGenerator(..., fast=True)``).

Where it sits: ``generate.py`` calls into this module instead of growing a ``DynamicCache`` when the
generator was built with ``fast=True``. Per model it keeps, across calls:
- a transformers ``StaticCache`` (fixed ``[batch, heads, max_len, head_dim]`` tensors at fixed
  addresses; ``reset()`` between calls), sized to a bucket so calls of similar lengths reuse it;
- a fixed ``[batch, max_len]`` attention mask: the prompt's left padding, then ones. The causal
  mask built inside the model (query offset = the cache's own length tensor) hides the positions
  not written yet, so the mask never changes during decoding and every decode forward sees the
  same shapes and addresses;
- optionally a ``torch.compile``'d ``__call__`` (mode "reduce-overhead": CUDA graphs), used for
  the one-token decode forwards only. The prefill runs eagerly, as in HF ``generate``.
The staging of logits (pinned host buffers, non-blocking copies, one wait per step) is
:mod:`dlf_rs.engines.hf.staging`, shared with the simple path. On CUDA without CUDA graphs the small models
run on a side stream so their forwards overlap the large model's.

Checked against transformers 5.4 to 5.24 (``cache_utils.StaticLayer`` tracks ``cumulative_length``
itself; there is no ``cache_position`` argument any more, see ``_MIN_TRANSFORMERS``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "DEFAULT_COMPILE", "FastModel", "FastOptions", "cache_length", "kv_cache_bytes",
    "resolve_options",
]  # fmt: skip

# What HF generate uses for static caches (transformers.CompileConfig defaults), with static
# shapes: every decode forward has the same shapes, so dynamic shapes would only add guards.
DEFAULT_COMPILE: dict[str, Any] = {"mode": "reduce-overhead", "fullgraph": False, "dynamic": False}
_MIN_CACHE = 64


@dataclass(frozen=True)
class FastOptions:
    """Resolved fast-path settings (see :func:`resolve_options`)."""

    compile: dict[str, Any] | None  # torch.compile kwargs, None: eager forwards
    overlap: bool  # small models on a side CUDA stream


def resolve_options(
    compile: bool | Mapping[str, Any] | None, overlap: bool | None, device: torch.device
) -> FastOptions:
    """Defaults: compile with :data:`DEFAULT_COMPILE` on CUDA only; overlap on CUDA when no CUDA
    graphs are used.

    CUDA graphs and the side stream are not combined by default: torch.compile's CUDA-graph trees
    share one memory pool per device and assume their graphs replay in order on one stream.
    """
    if compile is None:
        opts = dict(DEFAULT_COMPILE) if device.type == "cuda" else None
    elif isinstance(compile, bool):
        opts = dict(DEFAULT_COMPILE) if compile else None
    elif isinstance(compile, Mapping):
        opts = dict(compile)
    else:
        raise TypeError(
            f"compile: expected None, a bool or a dict of torch.compile options, "
            f"got {type(compile).__name__}"
        )
    graphs = opts is not None and opts.get("mode") in ("reduce-overhead", "max-autotune")
    if overlap is None:
        overlap = device.type == "cuda" and not graphs
    elif not isinstance(overlap, bool):
        raise TypeError(f"overlap: expected None or a bool, got {type(overlap).__name__}")
    elif overlap and device.type != "cuda":
        raise ValueError(f"overlap: a side CUDA stream needs the models on CUDA, not {device}")
    return FastOptions(compile=opts, overlap=overlap)


def cache_length(needed: int, context: int | None) -> int:
    """Static cache length for ``needed`` positions: the next power of two (at least 64), capped
    at the model's context. Buckets let calls of similar lengths reuse one cache and one CUDA
    graph (a new length means new shapes, hence a new compile)."""
    length = _MIN_CACHE
    while length < needed:
        length *= 2
    if context is not None and needed <= context < length:
        length = context
    return length


# Before 5.4 the models still took a ``cache_position`` argument and a static cache given none
# was written at the wrong positions: wrong tokens, no error (seen on 5.0.0).
_MIN_TRANSFORMERS = (5, 4)


def _check_transformers() -> None:
    import transformers

    version = tuple(int(p) for p in transformers.__version__.split(".")[:2] if p.isdigit())
    if version < _MIN_TRANSFORMERS:
        raise ImportError(
            f"fast: the static-cache path needs transformers >= 5.4 (installed: "
            f"{transformers.__version__}); use fast=False or upgrade transformers"
        )


@dataclass
class FastModel:
    """The persistent fast-path state of one model: its static cache, mask and compiled call."""

    name: str
    model: Any
    options: FastOptions
    cache: Any = None
    mask: torch.Tensor | None = None
    _compiled: Any = None
    _shape: tuple[int, int] = (0, 0)  # (batch, max_len) of ``cache``
    reused: int = field(default=0)  # how many calls reused the cache (tests, benchmarks)

    def prepare(self, batch: int, max_len: int, prompt_mask: torch.Tensor) -> None:
        """A reset (or new) static cache for ``batch`` rows and ``max_len`` positions, and the
        call's fixed mask: ``prompt_mask`` (``[batch, width]``, 1 = token) followed by ones."""
        from transformers import StaticCache

        _check_transformers()
        if self.cache is not None and self._shape == (batch, max_len):
            self.cache.reset()  # keeps the tensors (and their static addresses)
            self.reused += 1
        else:
            try:
                self.cache = StaticCache(config=self.model.config, max_cache_len=max_len)
            except (TypeError, ValueError, KeyError, AttributeError) as err:
                raise ValueError(
                    f"fast: the {self.name} model's config does not support a static KV cache "
                    f"({type(err).__name__}: {err}); use fast=False"
                ) from err
            self._shape = (batch, max_len)
        width = prompt_mask.shape[1]
        mask = torch.ones((batch, max_len), dtype=torch.long, device=prompt_mask.device)
        mask[:, :width] = prompt_mask
        self.mask = mask

    def decode_call(self) -> Any:
        """The callable for one-token decode forwards: compiled once per model when asked."""
        if self.options.compile is None:
            return self.model
        if self._compiled is None:
            self._compiled = torch.compile(self.model.__call__, **self.options.compile)
        return self._compiled

    def release(self) -> None:
        self.cache = None
        self.mask = None
        self._shape = (0, 0)


def kv_cache_bytes(model: Any, batch: int, max_len: int) -> int:
    """Bytes of a full static KV cache of ``model`` (keys and values, every layer)."""
    cfg = model.config.get_text_config(decoder=True)
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    itemsize = next(model.parameters()).element_size()
    return 2 * cfg.num_hidden_layers * batch * heads * head_dim * max_len * itemsize
