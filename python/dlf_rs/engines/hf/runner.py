"""The forward side of the generation loop: one :class:`ModelSlot` per model taking part.

Where it sits: :mod:`dlf_rs.engines.hf.generate` builds the slots, then for every step calls
:meth:`ModelRunner.prefill` once and :meth:`ModelRunner.decode` per token; each forward's
last-position logits go into the host staging buffers (:mod:`dlf_rs.engines.hf.staging`). Every model keeps
its own prompt tokens, attention mask, position ids and KV cache (a growing ``DynamicCache``, or
with ``fast=True`` a reused static cache and compiled decode forwards, :mod:`dlf_rs.engines.hf.fastpath`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .fastpath import FastModel, FastOptions, cache_length
from .staging import LogitStaging

__all__ = [
    "ModelRunner", "ModelSlot", "cache_keyword", "context_length", "forward_params", "model_device",
    "model_vocab", "output_cache",
]  # fmt: skip


def oom_hint(name: str, err: BaseException) -> torch.cuda.OutOfMemoryError:
    """A CUDA out-of-memory error that names the model and says what to try."""
    return torch.cuda.OutOfMemoryError(
        f"CUDA out of memory in the {name} model ({err}). Try a smaller batch "
        "(fewer prompts per call / --batch-size), device_map='auto' to shard the models over "
        "devices, or a lower dtype (torch_dtype=torch.bfloat16 / --dtype bfloat16)."
    )


def model_device(model: Any) -> torch.device:
    try:
        dev = model.get_input_embeddings().weight.device
    except AttributeError:
        dev = next(model.parameters()).device
    return dev if dev.type != "meta" else torch.device("cpu")


def model_vocab(model: Any) -> int:
    emb = model.get_output_embeddings()
    if emb is not None and getattr(emb, "weight", None) is not None:
        return int(emb.weight.shape[0])
    return int(model.config.vocab_size)


def context_length(model: Any) -> int | None:
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


_PARAMS: weakref.WeakKeyDictionary[Any, frozenset[str]] = weakref.WeakKeyDictionary()


def forward_params(model: Any) -> frozenset[str]:
    """The keyword names of ``model.forward``, looked up once per model (``inspect`` is slow)."""
    params = _PARAMS.get(model)
    if params is None:
        try:
            params = frozenset(inspect.signature(model.forward).parameters)
        except (TypeError, ValueError):
            params = frozenset()
        _PARAMS[model] = params
    return params


@functools.cache
def _library_cache_keyword() -> str:
    """The installed transformers' name for the KV cache: ``cache`` where its output classes
    carry a ``cache`` field (from 5.24, which deprecates ``past_key_values`` for removal in
    5.40), else ``past_key_values``."""
    try:
        from transformers.modeling_outputs import CausalLMOutputWithPast
    except ImportError:
        return "past_key_values"
    fields = getattr(CausalLMOutputWithPast, "__dataclass_fields__", {})
    return "cache" if "cache" in fields else "past_key_values"


def cache_keyword(model: Any) -> str:
    """The keyword ``model``'s forward takes its KV cache by, read from its signature: ``cache``
    from transformers 5.24 (passing ``past_key_values`` there prints a FutureWarning on every
    call), ``past_key_values`` on older releases and older remote code. A forward naming neither
    (``**kwargs`` only, e.g. a ``PeftModel``) gets the installed transformers' name."""
    params = forward_params(model)
    if "cache" in params:
        return "cache"
    if "past_key_values" in params:
        return "past_key_values"
    return _library_cache_keyword()


def output_cache(out: Any) -> Any:
    """The KV cache a forward returned: ``out.cache`` on current transformers, else
    ``out.past_key_values`` (reading that name on current releases logs a deprecation)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


_PLAIN_CACHE: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


def _new_cache(model: Any) -> Any:
    """A ``DynamicCache`` for one call. Built from the config only when some layer is not plain
    full attention (sliding-window or chunked layers need their own cache layers); reading the
    config costs ~60 us a model and call, which a per-token loop on small models feels."""
    from transformers import DynamicCache

    plain = _PLAIN_CACHE.get(model)
    if plain is None:
        cfg = getattr(model, "config", None)
        types = getattr(cfg, "layer_types", None)
        plain = (
            getattr(cfg, "sliding_window", None) is None
            and getattr(cfg, "attention_chunk_size", None) is None
            and (types is None or all(t == "full_attention" for t in types))
        )
        _PLAIN_CACHE[model] = plain
    if plain:
        return DynamicCache()
    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older transformers
        return DynamicCache()


@dataclass
class ModelSlot:
    """One model taking part in a call: its prompts, device and per-call decoding state."""

    name: str  # "large", "small", "expert:<i>"
    model: Any
    prompts: list[Any]  # str, or a tuple of token ids (dlf_rs.inputs)
    device: torch.device
    takes_logits_to_keep: bool
    takes_position_ids: bool
    fast: FastModel | None = None  # set when the generator was built with fast=True
    cache: Any = None
    unpadded: bool = False  # no row of this call is left-padded (dynamic caches only)
    attention_mask: torch.Tensor | None = None
    last_position: torch.Tensor | None = None
    # A mixed LoRA batch (dlf_rs.engines.hf.lora.group_slots): this slot's forward runs ``group`` models'
    # rows member-major, and its logits fill ``group`` staging buffers.
    group: int = 1
    cache_kw: str = "past_key_values"  # the forward's name for the KV cache (cache_keyword)

    @classmethod
    def of(cls, name: str, model: Any, prompts: list[Any], fast: FastModel | None) -> ModelSlot:
        params = forward_params(model)
        return cls(name, model, prompts, model_device(model), "logits_to_keep" in params,
                   "position_ids" in params, fast, cache_kw=cache_keyword(model))  # fmt: skip

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, call: Any = None) -> Any:
        kwargs: dict[str, Any] = {
            "input_ids": input_ids,
            self.cache_kw: self.cache,
            "use_cache": True,
        }
        # Without padding the mask is all ones and the positions are the cache length onwards:
        # exactly what the model assumes when given neither, minus building and checking a mask
        # in every layer call (measured ~9% of a small model's decode forward).
        if not self.unpadded:
            kwargs["attention_mask"] = self.attention_mask
            if self.takes_position_ids:
                kwargs["position_ids"] = positions
        if self.takes_logits_to_keep and input_ids.shape[1] > 1:
            kwargs["logits_to_keep"] = 1
        try:
            out = (call or self.model)(**kwargs)
        except torch.cuda.OutOfMemoryError as err:
            raise oom_hint(self.name, err) from err
        self.cache = output_cache(out)
        return out.logits[:, -1, :]


class ModelRunner:
    """Runs the slots' forwards and stages their logits, accounting the time in ``timings``:
    "forward" (all forwards), "prefill", "forward:<name>" (decode forwards per model) and
    "copy" (host transfers)."""

    def __init__(
        self,
        slots: list[ModelSlot],
        staging: LogitStaging,
        timings: dict[str, float],
        tokenize: Callable[[list[Any]], list[list[int]]],  # text or token-id prompts
        pad_id: int,
        fast: FastOptions | None,
        side_stream: Callable[[torch.device], torch.cuda.Stream],
        sync: bool,
    ) -> None:
        self.slots, self.staging, self.timings = slots, staging, timings
        self.tokenize, self.pad_id, self.fast = tokenize, pad_id, fast
        self._ids: dict[tuple[str, ...], list[list[int]]] = {}  # models reading the same prompts
        self._padded_by_ids: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.side_stream, self.sync = side_stream, sync
        self.stage_at = [sum(s.group for s in slots[:i]) for i in range(len(slots))]
        for slot in slots:
            timings.setdefault(f"forward:{slot.name}", 0.0)

    def _run(
        self, i: int, slot: ModelSlot, key: str, ids: torch.Tensor, pos: torch.Tensor,
        call: Any = None,
    ) -> None:  # fmt: skip
        """Time one forward (synchronised when ``sync``), add it up, stage its logits."""
        t0 = time.perf_counter()
        logits = slot.forward(ids, pos, call)
        if self.sync and slot.device.type == "cuda":
            torch.cuda.synchronize(slot.device)
        elapsed = time.perf_counter() - t0
        self.timings["forward"] += elapsed
        self.timings[key] += elapsed
        t0 = time.perf_counter()
        if slot.group > 1:
            for j, part in enumerate(logits.chunk(slot.group)):
                self.staging.stage(self.stage_at[i] + j, part)
        else:
            # Its event is recorded on the stream it ran on.
            self.staging.stage(self.stage_at[i], logits)
        self.timings["copy"] += time.perf_counter() - t0

    def prompt_ids(self, slot: ModelSlot, max_new_tokens: int) -> list[list[int]]:
        key = tuple(slot.prompts)
        if key not in self._ids:
            self._ids[key] = self.tokenize(slot.prompts)
        ids = self._ids[key]
        ctx = context_length(slot.model)
        batch = len(ids) // slot.group
        for k, row in enumerate(ids):
            b = k % batch  # a mixed LoRA slot holds its members' prompts one after the other
            if not row:
                raise ValueError(f"prompts[{b}]: tokenizes to no tokens for the {slot.name} model")
            if ctx is not None and len(row) + max_new_tokens > ctx:
                raise ValueError(
                    f"prompts[{b}]: {len(row)} prompt tokens + max_new_tokens={max_new_tokens} "
                    f"exceed the {slot.name} model's context of {ctx} tokens "
                    "(max_position_embeddings); shorten the prompt or lower max_new_tokens"
                )
        return ids

    def _padded(self, ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Left-padded input ids, attention mask and position ids (CPU), built once per prompt
        set: models that read the same prompts share them (each step replaces, never writes,
        a slot's mask and positions)."""
        key = id(ids)
        if key not in self._padded_by_ids:
            width = max(len(r) for r in ids)
            input_ids = np.full((len(ids), width), self.pad_id, dtype=np.int64)
            mask = np.zeros((len(ids), width), dtype=np.int64)
            for b, row in enumerate(ids):
                input_ids[b, width - len(row) :] = row
                mask[b, width - len(row) :] = 1
            positions = np.maximum(mask.cumsum(-1) - 1, 0)
            self._padded_by_ids[key] = (torch.from_numpy(input_ids), torch.from_numpy(mask),
                                        torch.from_numpy(positions))  # fmt: skip
        return self._padded_by_ids[key]

    def prefill(self, ids_per_slot: list[list[list[int]]], max_new_tokens: int) -> None:
        """Left-pad each model's prompts, run the prompt forward, stage the last logits."""
        for i, (slot, ids) in enumerate(zip(self.slots, ids_per_slot)):
            input_ids, mask, positions = self._padded(ids)
            slot.last_position = positions[:, -1:].to(slot.device)
            if slot.fast is not None:
                width = input_ids.shape[1]
                max_len = cache_length(width + max_new_tokens, context_length(slot.model))
                slot.fast.prepare(len(ids), max_len, mask.to(slot.device, copy=True))
                slot.attention_mask = slot.fast.mask
                slot.cache = slot.fast.cache
            else:
                slot.attention_mask = mask.to(slot.device)
                slot.cache = _new_cache(slot.model)
            # Finished rows keep attending (mask 1), so an unpadded call stays unpadded.
            slot.unpadded = slot.fast is None and bool(mask.all())
            self._run(i, slot, "prefill", input_ids.to(slot.device), positions.to(slot.device))

    def decode(self, feed: np.ndarray) -> None:
        """One decode forward per model on the tokens ``feed`` (int64 [B])."""
        if self.fast is not None:
            self._decode_fast(feed)
            return
        t0 = time.perf_counter()
        tokens_on = self._tokens_on(feed)
        # Models that read the same prompts on one device share their mask and position tensors
        # (prefill hands them the same ones): each grown tensor is made once and shared again.
        grown: dict[int, torch.Tensor] = {}
        old = [(slot.attention_mask, slot.last_position) for slot in self.slots]  # ids stay unique
        for slot in self.slots:
            mask, pos = slot.attention_mask, slot.last_position
            assert mask is not None and pos is not None
            if slot.unpadded:  # neither is passed to the model (ModelSlot.forward)
                continue
            if id(mask) not in grown:
                # Finished rows keep attending (mask 1) like HF generate; outputs are ignored.
                grown[id(mask)] = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
            if id(pos) not in grown:
                grown[id(pos)] = pos + 1
            slot.attention_mask, slot.last_position = grown[id(mask)], grown[id(pos)]
        del old
        self.timings["copy"] += time.perf_counter() - t0
        for i, slot in enumerate(self.slots):
            assert slot.last_position is not None
            tokens = tokens_on[slot.device]
            if slot.group > 1:
                tokens = tokens.repeat(slot.group, 1)
            self._run(i, slot, f"forward:{slot.name}", tokens, slot.last_position)

    def _tokens_on(self, feed: np.ndarray) -> dict[torch.device, torch.Tensor]:
        """The step's token ids, sent once to each device the models live on (the models only
        read them)."""
        tokens_on: dict[torch.device, torch.Tensor] = {}
        for slot in self.slots:
            if slot.device not in tokens_on:
                tokens_on[slot.device] = self.staging.tokens_to(feed, slot.device)
        return tokens_on

    def _decode_fast(self, feed: np.ndarray) -> None:
        """One decode step on static caches: the mask stays as it is (the causal mask hides the
        unwritten positions) and the token ids go to each device once. With ``overlap`` every
        model after the large one runs on a side stream; the side stream waits for the main one
        before the large forward is enqueued (so it sees this step's token ids and the prefill,
        and does not wait for the large forward)."""
        assert self.fast is not None
        overlap = self.fast.overlap and not self.sync  # syncing would serialise it anyway
        t0 = time.perf_counter()
        tokens_on = self._tokens_on(feed)
        side_on: dict[torch.device, torch.cuda.Stream] = {}
        for slot in self.slots[1:] if overlap else []:
            if slot.device.type == "cuda" and slot.device not in side_on:
                side_on[slot.device] = self.side_stream(slot.device)
                side_on[slot.device].wait_stream(torch.cuda.current_stream(slot.device))
        self.timings["copy"] += time.perf_counter() - t0
        for i, slot in enumerate(self.slots):
            assert slot.fast is not None and slot.last_position is not None
            tokens = tokens_on[slot.device]
            context: Any = contextlib.nullcontext()
            if i > 0 and slot.device in side_on:
                side = side_on[slot.device]
                # Allocated on the main stream, read on the side one: keep the allocator from
                # handing their memory to the main stream while the side stream may still read.
                tokens.record_stream(side)
                slot.last_position.record_stream(side)
                context = torch.cuda.stream(side)
            with context:
                slot.last_position = slot.last_position + 1
                self._run(i, slot, f"forward:{slot.name}", tokens, slot.last_position,
                          slot.fast.decode_call())  # fmt: skip
