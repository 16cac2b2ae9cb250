"""Batched fused generation with Hugging Face causal LMs: the driver around ``dlf_rs.fuse_step``.

Flow: prompts are tokenized per model (``prompts_for`` lets one model see other prompt tokens) and
left-padded -> every needed model prefills its own KV cache (``DynamicCache``) with attention mask
and position ids -> each step the last-position logits go through :mod:`dlf_rs.staging` into
reused host buffers -> ``fuse_step`` (methods "dlf"/"static") or ``sample`` ("large"/"expert")
picks one token per row -> only those tokens go back to the devices and the loop repeats. Rows
that ended (EOS, a stop string, ``max_new_tokens``) keep feeding the pad token with their outputs
ignored; the loop stops as soon as every row ended. ``FusedGenerator(..., fast=True)`` swaps the
growing ``DynamicCache`` for reused static caches and compiled decode forwards
(:mod:`dlf_rs.fastpath`); everything else in the flow is shared.

Decisions (documented in the API docstrings):
- Vocabulary: every model must share the tokenizer; logits are cut to ``len(tokenizer)``.
- Context: a prompt plus ``max_new_tokens`` must fit each model's ``max_position_embeddings``.
- Seeds: row ``b`` uses ``row_seed = mix(seed, b)``; step ``s`` of that row draws with
  ``mix(row_seed, s)``, where ``mix(a, b) = splitmix64(a ^ splitmix64(b))`` masked to 63 bits.
  A list of per-prompt seeds gives the row seeds directly, so results do not depend on batching.
- Stop strings end the row; ``token_ids`` keep the token that completed the stop string, ``texts``
  are cut just before the stop string. EOS is kept in ``token_ids`` and left out of ``texts``.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dlf_rs.fastpath import FastModel, FastOptions, cache_length, resolve_options
from dlf_rs.staging import LogitStaging

__all__ = ["METHODS", "FusedGenerator", "GenerationResult", "RowTrace", "row_seed", "splitmix64"]

METHODS = ("dlf", "static", "large", "expert")
_MASK64 = (1 << 64) - 1
_MASK63 = (1 << 63) - 1


def splitmix64(x: int) -> int:
    """One splitmix64 output for state ``x`` (Steele, Lea, Flood 2014)."""
    z = (x + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _mix(a: int, b: int) -> int:
    # 63 bits so the value fits a signed int64 as well as a u64 on the Rust side.
    return splitmix64((a & _MASK64) ^ splitmix64(b)) & _MASK63


def row_seed(seed: int, row: int) -> int:
    """The seed of row ``row`` of a call made with integer ``seed``."""
    return _mix(seed, row)


def step_seed(row_seed_value: int, step: int) -> int:
    """The seed passed to the core for one row at decoding step ``step`` (0-based)."""
    return _mix(row_seed_value, step)


@dataclass
class RowTrace:
    """What the solver did at each step of one row (arrays over steps)."""

    active: np.ndarray  # int64[steps], -1: no expert active (or static / single model)
    loss: np.ndarray  # f32[steps], J at the chosen weights
    kl_fused_large: np.ndarray  # f32[steps], KL(P~ || P)
    kl_large_fused: np.ndarray  # f32[steps], KL(P || P~)
    kl_expert_small: np.ndarray  # f32[steps, T], targets KL(Q_t || Q)
    kl_small_expert: np.ndarray  # f32[steps, T], targets KL(Q || Q_t)
    support_size: np.ndarray  # uint32[steps]


@dataclass
class GenerationResult:
    """Output of :meth:`FusedGenerator.generate`, one entry per prompt in every list."""

    texts: list[str]
    token_ids: list[list[int]]
    alphas: list[np.ndarray]  # f32[steps, T] per row (zeros for "large", NaN for "expert")
    trace: list[RowTrace]
    finish_reasons: list[str]  # "eos", "stop" or "length"
    timings: dict[str, float] = field(default_factory=dict)
    method: str = "dlf"
    expert_names: list[str] = field(default_factory=list)

    def to_records(self) -> list[dict[str, Any]]:
        """JSON-ready dicts (used by the CLI's JSONL output)."""
        return [
            {
                "text": self.texts[i],
                "token_ids": [int(t) for t in self.token_ids[i]],
                "alphas": np.asarray(self.alphas[i], dtype=np.float64).tolist(),
                "active": [int(a) for a in self.trace[i].active],
                "finish_reason": self.finish_reasons[i],
                "method": self.method,
            }
            for i in range(len(self.texts))
        ]


@dataclass
class _Slot:
    """One model taking part in a call: its prompts, device and per-call decoding state."""

    name: str
    model: Any
    prompts: list[str]
    device: torch.device
    takes_logits_to_keep: bool
    takes_position_ids: bool
    cache: Any = None
    attention_mask: torch.Tensor | None = None
    last_position: torch.Tensor | None = None
    fast: FastModel | None = None  # set when the generator was built with fast=True


def _model_device(model: Any) -> torch.device:
    try:
        dev = model.get_input_embeddings().weight.device
    except AttributeError:
        dev = next(model.parameters()).device
    return dev if dev.type != "meta" else torch.device("cpu")


def _model_vocab(model: Any) -> int:
    emb = model.get_output_embeddings()
    if emb is not None and getattr(emb, "weight", None) is not None:
        return int(emb.weight.shape[0])
    return int(model.config.vocab_size)


def _context_length(model: Any) -> int | None:
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _forward_params(model: Any) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def _new_cache(model: Any) -> Any:
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older transformers
        return DynamicCache()


def _oom_hint(name: str, err: BaseException) -> torch.cuda.OutOfMemoryError:
    return torch.cuda.OutOfMemoryError(
        f"CUDA out of memory in the forward of the {name} model ({err}). Try a smaller batch "
        "(fewer prompts per call / --batch-size), device_map='auto' to shard the models over "
        "devices, or a lower dtype (torch_dtype=torch.bfloat16 / --dtype bfloat16)."
    )


def _vocab_of(tokenizer: Any) -> dict[str, int]:
    return dict(tokenizer.get_vocab())


class FusedGenerator:
    """Decode with a large model L, its small base S and T small experts, fusing logits per step.

    ``FusedGenerator(large=model, small=model, experts=[model, ...], tokenizer=tok)`` takes loaded
    Hugging Face causal LMs sharing ``tokenizer``; see :meth:`from_pretrained` to load by path or
    hub id. ``small`` and ``experts`` may be left out when only ``method="large"`` is used.
    ``model_tokenizers`` (optional, name -> tokenizer, names as in ``prompts_for``) are checked
    against ``tokenizer`` and refused when their vocabularies differ.

    ``fast=True`` opts into the fast decode path (:mod:`dlf_rs.fastpath`): a static KV cache per
    model (transformers ``StaticCache``, kept and reset across calls of the same batch size and
    length bucket), a fixed attention mask, and on CUDA compiled decode forwards. It produces the
    same greedy tokens as the default path (up to float rounding of the attention over a longer,
    masked key axis). ``compile``: None (default: ``torch.compile(mode="reduce-overhead")``, i.e.
    CUDA graphs, only when the large model is on CUDA), True/False, or a dict of torch.compile
    options. ``overlap``: run the small models on a side CUDA stream, overlapping the large
    model's forward (None: on CUDA when no CUDA graphs are used). ``compile`` and ``overlap``
    are only used with ``fast=True``. The default path (``fast=False``) is unchanged.
    """

    def __init__(
        self,
        large: Any,
        small: Any = None,
        experts: Sequence[Any] | None = None,
        tokenizer: Any = None,
        *,
        expert_names: Sequence[str] | None = None,
        model_tokenizers: Mapping[str, Any] | None = None,
        fast: bool = False,
        compile: bool | Mapping[str, Any] | None = None,  # torch.compile's name, on purpose
        overlap: bool | None = None,
    ) -> None:
        if large is None:
            raise ValueError("large: a model is required")
        if not isinstance(fast, bool):
            raise TypeError(f"fast: expected a bool, got {type(fast).__name__}")
        if not fast and (compile is not None or overlap is not None):
            name = "compile" if compile is not None else "overlap"
            raise ValueError(f"{name}: only used by the fast path; pass fast=True as well")
        if tokenizer is None:
            raise ValueError(
                "tokenizer: required (FusedGenerator.from_pretrained loads the large model's)"
            )
        if not hasattr(tokenizer, "get_vocab") or not callable(tokenizer):
            raise TypeError(f"tokenizer: expected a Hugging Face tokenizer, got {type(tokenizer)}")
        self.large = large
        self.small = small
        self.experts = list(experts or [])
        self.tokenizer = tokenizer
        self.expert_names = (
            list(expert_names)
            if expert_names is not None
            else [f"expert:{i}" for i in range(len(self.experts))]
        )
        if len(self.expert_names) != len(self.experts):
            raise ValueError(
                f"expert_names: {len(self.expert_names)} names for {len(self.experts)} experts"
            )
        self.vocab_size = len(tokenizer)
        if model_tokenizers:
            ref = _vocab_of(tokenizer)
            for name, tok in model_tokenizers.items():
                if tok is not None and _vocab_of(tok) != ref:
                    raise ValueError(
                        f"tokenizers differ: the tokenizer of {name} "
                        f"({getattr(tok, 'name_or_path', '?')}) does not match the shared tokenizer "
                        f"({getattr(tokenizer, 'name_or_path', '?')}); DLF needs one vocabulary"
                    )
        for name, model in self._named_models():
            if _model_vocab(model) < self.vocab_size:
                raise ValueError(
                    f"{name}: the model has {_model_vocab(model)} output logits but the tokenizer "
                    f"has {self.vocab_size} tokens; they do not belong together"
                )
        self.pad_token_id = self._pad_id()
        self.eos_token_ids = self._eos_ids()
        # When True (benchmarks), CUDA is synchronised after the forwards so that "forward" holds
        # the compute time instead of only the launch time (otherwise the wait shows in "copy").
        self.sync_timings = False
        self._staging: LogitStaging | None = None
        self.fast = fast
        self._fast_options: FastOptions | None = (
            resolve_options(compile, overlap, _model_device(large)) if fast else None
        )
        self._fast_models: dict[str, FastModel] = {}
        self._side_streams: dict[torch.device, torch.cuda.Stream] = {}

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        large: str | os.PathLike[str],
        small: str | os.PathLike[str] | None = None,
        experts: Sequence[str | os.PathLike[str]] | None = None,
        tokenizer: Any = None,
        device: str | torch.device | None = None,
        torch_dtype: str | torch.dtype | None = None,
        device_map: Any = None,
        **model_kwargs: Any,
    ) -> FusedGenerator:
        """Load Hugging Face causal LMs by local path or hub id (safetensors).

        A string naming an existing directory is loaded from there; anything else is treated as a
        hub id and resolved through the local Hugging Face cache (a download needs network). An
        expert directory holding ``adapter_config.json`` is a PEFT LoRA adapter: it is applied
        to its own copy of the small base and merged (needs ``peft``). ``tokenizer`` (a tokenizer
        or a path) defaults to the large model's; tokenizers shipped with the other checkpoints
        are checked against it. ``device_map`` is passed through (accelerate sharding); otherwise
        the models are moved to ``device``.
        """
        from transformers import AutoTokenizer

        dtype = _parse_dtype(torch_dtype)
        kwargs = dict(model_kwargs)
        if dtype is not None:
            kwargs["dtype"] = dtype
        if device_map is not None:
            kwargs["device_map"] = device_map

        def place(model: Any) -> Any:
            if device_map is None and device is not None:
                model = model.to(device)
            return model.eval()

        large_src = _resolve_source("large", large)
        large_model = place(_load_model("large", large_src, kwargs))
        small_src = _resolve_source("small", small) if small is not None else None
        small_model = place(_load_model("small", small_src, kwargs)) if small_src else None
        expert_models = []
        sources: dict[str, str] = {"large": large_src}
        if small_src:
            sources["small"] = small_src
        for i, exp in enumerate(experts or []):
            arg = f"experts[{i}]"
            src = _resolve_source(arg, exp)
            sources[f"expert:{i}"] = src
            if os.path.isfile(os.path.join(src, "adapter_config.json")):
                if small_src is None:
                    raise ValueError(f"{arg}: a LoRA adapter needs the small base model (small=)")
                expert_models.append(place(_load_adapter(arg, src, small_src, kwargs)))
            else:
                expert_models.append(place(_load_model(arg, src, kwargs)))

        if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
            tok_src = large_src if tokenizer is None else _resolve_source("tokenizer", tokenizer)
            tok = _load_tokenizer("tokenizer", tok_src, AutoTokenizer)
        else:
            tok = tokenizer
        model_tokenizers: dict[str, Any] = {}
        for name, src in sources.items():
            if os.path.isdir(src) and not _has_tokenizer_files(src):
                continue
            try:
                model_tokenizers[f"{name} ({src})"] = AutoTokenizer.from_pretrained(src)
            except (OSError, ValueError):
                continue
        names = [str(e) for e in (experts or [])]
        return cls(
            large_model,
            small_model,
            expert_models,
            tok,
            expert_names=[os.path.basename(os.path.normpath(n)) or n for n in names],
            model_tokenizers=model_tokenizers,
        )

    # ------------------------------------------------------------------ helpers
    def _named_models(self) -> list[tuple[str, Any]]:
        named = [("large", self.large)]
        if self.small is not None:
            named.append(("small", self.small))
        named += [(f"expert:{i}", m) for i, m in enumerate(self.experts)]
        return named

    def _pad_id(self) -> int:
        tok = self.tokenizer
        for cand in (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id):
            if cand is not None:
                return int(cand)
        return 0

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        gen_cfg = getattr(self.large, "generation_config", None)
        cfg_eos = getattr(gen_cfg, "eos_token_id", None)
        if isinstance(cfg_eos, int):
            ids.add(cfg_eos)
        elif isinstance(cfg_eos, (list, tuple)):
            ids.update(int(e) for e in cfg_eos)
        return ids

    def _tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def _staging_for(self, n_models: int, batch: int) -> LogitStaging:
        if self._staging is None or not self._staging.matches(n_models, batch, self.vocab_size):
            self._staging = LogitStaging(n_models, batch, self.vocab_size)
        return self._staging

    def _forward(
        self, slot: _Slot, input_ids: torch.Tensor, positions: torch.Tensor, call: Any = None
    ) -> torch.Tensor:
        kwargs: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": slot.attention_mask,
            "past_key_values": slot.cache,
            "use_cache": True,
        }
        if slot.takes_position_ids:
            kwargs["position_ids"] = positions
        if slot.takes_logits_to_keep:
            kwargs["logits_to_keep"] = 1
        try:
            out = (call or slot.model)(**kwargs)
        except torch.cuda.OutOfMemoryError as err:
            raise _oom_hint(slot.name, err) from err
        slot.cache = out.past_key_values
        return out.logits[:, -1, :]

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        prompts: str | Sequence[str],
        max_new_tokens: int = 64,
        method: str = "dlf",
        alpha: float | Sequence[float] | None = None,
        expert: int | None = None,
        solver: str | None = None,
        support_k: int | None = None,
        alpha_range: tuple[float, float] = (0.0, 2.0),
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        seed: int | Sequence[int] | None = None,
        stop: str | Sequence[str] | None = None,
        prompts_for: Mapping[str, Sequence[str]] | None = None,
    ) -> GenerationResult:
        """Generate a continuation for every prompt (one batch).

        method: "dlf" (weights solved per row and step), "static" (fixed ``alpha``: a float for
        every expert or one per expert; 1.0 with one expert is proxy-tuning), "large" (L alone) or
        "expert" (expert number ``expert`` alone). ``solver``/``support_k``/``alpha_range`` go to
        ``fuse_step``. Sampling is greedy for ``temperature=0``. ``seed``: None (fresh entropy),
        an int (row seeds derived from it and the row index) or one int per prompt.
        ``stop``: strings that end a row. ``prompts_for``: per-model prompt lists keyed "large",
        "small" or "expert:<i>" (same length as ``prompts``); models without a key read
        ``prompts``. Every model gets its own prompt tokens and cache; the continuation is shared.
        A prompt plus ``max_new_tokens`` must fit each model's context length.
        """
        t_start = time.perf_counter()
        prompts_list = self._check_prompts(prompts)
        batch = len(prompts_list)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)):
            raise TypeError(f"max_new_tokens: expected an int, got {type(max_new_tokens).__name__}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: must be >= 1, got {max_new_tokens}")
        max_new_tokens = int(max_new_tokens)
        n_exp = len(self.experts)
        static_alphas = self._check_method(method, alpha, expert)
        stops = self._check_stop(stop)
        row_seeds = self._row_seeds(seed, batch)
        per_model = self._check_prompts_for(prompts_for, batch)

        if method == "large":
            chosen = [("large", self.large)]
        elif method == "expert":
            assert expert is not None
            chosen = [(f"expert:{expert}", self.experts[expert])]
        else:
            chosen = self._named_models()
        slots = []
        for name, model in chosen:
            params = _forward_params(model)
            slots.append(
                _Slot(
                    name=name,
                    model=model,
                    prompts=per_model.get(name, prompts_list),
                    device=_model_device(model),
                    takes_logits_to_keep="logits_to_keep" in params,
                    takes_position_ids="position_ids" in params,
                    fast=self._fast_model(name, model),
                )
            )

        timings = {"forward": 0.0, "prefill": 0.0, "copy": 0.0, "fuse_step": 0.0, "sample": 0.0}
        # Per-model decode forward times ("forward:large", ...): the bench's per-model split.
        timings.update({f"forward:{slot.name}": 0.0 for slot in slots})
        staging = self._staging_for(len(slots), batch)
        fuse_kwargs = self._fuse_kwargs(method, static_alphas, solver, support_k, alpha_range)
        sample_kwargs: dict[str, Any] = {
            "temperature": temperature,
            "top_k": top_k,
            "top_p": top_p,
            "min_p": min_p,
        }
        import dlf_rs

        # The fast path runs under no_grad like HF generate with static caches and torch.compile
        # (its caches outlive the call and are reused; inference tensors gain nothing there).
        grad_off = torch.no_grad() if self.fast else torch.inference_mode()
        with grad_off:
            self._prefill(slots, max_new_tokens, staging, timings)

            tokens_out: list[list[int]] = [[] for _ in range(batch)]
            alphas_out: list[list[np.ndarray]] = [[] for _ in range(batch)]
            trace_rows: list[list[tuple[Any, ...]]] = [[] for _ in range(batch)]
            finished = np.zeros(batch, dtype=bool)
            reasons = ["length"] * batch
            nan_t = np.full(n_exp, np.nan, dtype=np.float32)
            steps_done = 0
            for step in range(max_new_tokens):
                t0 = time.perf_counter()
                staging.wait()
                timings["copy"] += time.perf_counter() - t0
                seeds = (
                    None
                    if row_seeds is None or temperature == 0
                    else [step_seed(s, step) for s in row_seeds]
                )
                t0 = time.perf_counter()
                if method in ("large", "expert"):
                    next_tokens = np.asarray(
                        dlf_rs.sample(staging.view(0), seed=seeds, **sample_kwargs), dtype=np.int64
                    )
                    timings["sample"] += time.perf_counter() - t0
                    step_alpha = np.zeros(n_exp, np.float32) if method == "large" else nan_t
                    for b in np.flatnonzero(~finished):
                        alphas_out[b].append(step_alpha)
                        trace_rows[b].append((-1, np.nan, np.nan, np.nan, nan_t, nan_t, 0))
                else:
                    views = staging.views()
                    r = dlf_rs.fuse_step(
                        views[0], views[1], views[2:], seed=seeds, **fuse_kwargs, **sample_kwargs
                    )
                    timings["fuse_step"] += time.perf_counter() - t0
                    next_tokens = np.asarray(r.tokens, dtype=np.int64)
                    r_alphas = np.asarray(r.alphas, dtype=np.float32).reshape(batch, n_exp)
                    for b in np.flatnonzero(~finished):
                        alphas_out[b].append(r_alphas[b].copy())
                        trace_rows[b].append(
                            (
                                int(r.active[b]),
                                float(r.loss[b]),
                                float(r.kl_fused_large[b]),
                                float(r.kl_large_fused[b]),
                                np.asarray(r.kl_expert_small[b], np.float32).copy(),
                                np.asarray(r.kl_small_expert[b], np.float32).copy(),
                                int(r.support_size[b]),
                            )
                        )
                steps_done = step + 1
                self._record(next_tokens, finished, tokens_out, reasons, stops)
                if step == max_new_tokens - 1 or finished.all():
                    break
                feed = np.where(finished, self.pad_token_id, next_tokens)
                self._decode_step(slots, feed, staging, timings)

        texts = [self._text(tokens_out[b], reasons[b], stops) for b in range(batch)]
        traces = [_row_trace(trace_rows[b], n_exp) for b in range(batch)]
        timings["steps"] = float(steps_done)
        timings["total"] = time.perf_counter() - t_start
        return GenerationResult(
            texts=texts,
            token_ids=tokens_out,
            alphas=[
                np.stack(a).astype(np.float32) if a else np.zeros((0, n_exp), np.float32)
                for a in alphas_out
            ],
            trace=traces,
            finish_reasons=reasons,
            timings=timings,
            method=method,
            expert_names=list(self.expert_names),
        )

    def _prefill(
        self, slots: list[_Slot], max_new_tokens: int, staging: LogitStaging, timings: dict
    ) -> None:
        for i, slot in enumerate(slots):
            ids = [self._tokenize(p) for p in slot.prompts]
            ctx = _context_length(slot.model)
            for b, row in enumerate(ids):
                if not row:
                    raise ValueError(
                        f"prompts[{b}]: tokenizes to no tokens for the {slot.name} model"
                    )
                if ctx is not None and len(row) + max_new_tokens > ctx:
                    raise ValueError(
                        f"prompts[{b}]: {len(row)} prompt tokens + max_new_tokens={max_new_tokens} "
                        f"exceed the {slot.name} model's context of {ctx} tokens "
                        "(max_position_embeddings); shorten the prompt or lower max_new_tokens"
                    )
            width = max(len(r) for r in ids)
            input_ids = torch.full((len(ids), width), self.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(ids), width), dtype=torch.long)
            for b, row in enumerate(ids):
                input_ids[b, width - len(row) :] = torch.tensor(row, dtype=torch.long)
                mask[b, width - len(row) :] = 1
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            slot.last_position = positions[:, -1:].to(slot.device)
            if slot.fast is not None:
                max_len = cache_length(width + max_new_tokens, ctx)
                slot.fast.prepare(len(ids), max_len, mask.to(slot.device))
                slot.attention_mask = slot.fast.mask
                slot.cache = slot.fast.cache
            else:
                slot.attention_mask = mask.to(slot.device)
                slot.cache = _new_cache(slot.model)
            t0 = time.perf_counter()
            logits = self._forward(slot, input_ids.to(slot.device), positions.to(slot.device))
            self._sync_for_timing(slot.device)
            elapsed = time.perf_counter() - t0
            timings["forward"] += elapsed
            timings["prefill"] += elapsed
            t0 = time.perf_counter()
            staging.stage(i, logits)
            timings["copy"] += time.perf_counter() - t0

    def _decode_step(
        self, slots: list[_Slot], feed: np.ndarray, staging: LogitStaging, timings: dict
    ) -> None:
        if self.fast:
            self._decode_step_fast(slots, feed, staging, timings)
            return
        for i, slot in enumerate(slots):
            t0 = time.perf_counter()
            tokens = staging.tokens_to(feed, slot.device)
            assert slot.attention_mask is not None and slot.last_position is not None
            # Finished rows keep attending (mask 1) like HF generate; their outputs are ignored.
            slot.attention_mask = torch.cat(
                [slot.attention_mask, slot.attention_mask.new_ones((feed.shape[0], 1))], dim=-1
            )
            slot.last_position = slot.last_position + 1
            timings["copy"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            logits = self._forward(slot, tokens, slot.last_position)
            self._sync_for_timing(slot.device)
            elapsed = time.perf_counter() - t0
            timings["forward"] += elapsed
            timings[f"forward:{slot.name}"] += elapsed
            t0 = time.perf_counter()
            staging.stage(i, logits)
            timings["copy"] += time.perf_counter() - t0

    def _decode_step_fast(
        self, slots: list[_Slot], feed: np.ndarray, staging: LogitStaging, timings: dict
    ) -> None:
        """One decode step on static caches: the mask stays as it is (the causal mask hides the
        unwritten positions) and the token ids go to each device once. With ``overlap`` every
        model after the large one runs on a side stream; the side stream waits for the main one
        before the large forward is enqueued (so it sees this step's token ids and the prefill,
        and does not wait for the large forward)."""
        opts = self._fast_options
        assert opts is not None
        overlap = opts.overlap and not self.sync_timings  # syncing would serialise it anyway
        t0 = time.perf_counter()
        tokens_on: dict[torch.device, torch.Tensor] = {}
        for slot in slots:
            if slot.device not in tokens_on:
                tokens_on[slot.device] = staging.tokens_to(feed, slot.device)
        side_on: dict[torch.device, torch.cuda.Stream] = {}
        for slot in slots[1:] if overlap else []:
            if slot.device.type == "cuda" and slot.device not in side_on:
                side_on[slot.device] = self._side_stream(slot.device)
                side_on[slot.device].wait_stream(torch.cuda.current_stream(slot.device))
        timings["copy"] += time.perf_counter() - t0
        for i, slot in enumerate(slots):
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
                t0 = time.perf_counter()
                slot.last_position = slot.last_position + 1
                logits = self._forward(slot, tokens, slot.last_position, slot.fast.decode_call())
                self._sync_for_timing(slot.device)
                elapsed = time.perf_counter() - t0
                timings["forward"] += elapsed
                timings[f"forward:{slot.name}"] += elapsed
                t0 = time.perf_counter()
                staging.stage(i, logits)  # its event is recorded on the stream it ran on
                timings["copy"] += time.perf_counter() - t0

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._side_streams:
            self._side_streams[device] = torch.cuda.Stream(device)
        return self._side_streams[device]

    def _fast_model(self, name: str, model: Any) -> FastModel | None:
        if self._fast_options is None:
            return None
        state = self._fast_models.get(name)
        if state is None or state.model is not model:
            state = FastModel(name, model, self._fast_options)
            self._fast_models[name] = state
        return state

    def _sync_for_timing(self, device: torch.device) -> None:
        if self.sync_timings and device.type == "cuda":
            torch.cuda.synchronize(device)

    def _record(
        self,
        next_tokens: np.ndarray,
        finished: np.ndarray,
        tokens_out: list[list[int]],
        reasons: list[str],
        stops: list[str],
    ) -> None:
        for b in np.flatnonzero(~finished):
            tok = int(next_tokens[b])
            tokens_out[b].append(tok)
            if tok in self.eos_token_ids:
                finished[b] = True
                reasons[b] = "eos"
            elif stops:
                text = self.tokenizer.decode(tokens_out[b], skip_special_tokens=True)
                if any(s in text for s in stops):
                    finished[b] = True
                    reasons[b] = "stop"

    def _text(self, tokens: list[int], reason: str, stops: list[str]) -> str:
        text = str(self.tokenizer.decode(tokens, skip_special_tokens=True))
        if reason == "stop":
            cut = min((text.find(s) for s in stops if s in text), default=len(text))
            text = text[:cut]
        return text

    # ------------------------------------------------------------------ argument checks
    def _check_prompts(self, prompts: str | Sequence[str]) -> list[str]:
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, Sequence):
            raise TypeError(f"prompts: expected a string or a list of strings, got {type(prompts)}")
        out = list(prompts)
        if not out:
            raise ValueError("prompts: the prompt list is empty")
        for i, p in enumerate(out):
            if not isinstance(p, str):
                raise TypeError(f"prompts[{i}]: expected a string, got {type(p).__name__}")
            if not p:
                raise ValueError(f"prompts[{i}]: empty prompt string")
        return out

    def _check_method(
        self, method: str, alpha: float | Sequence[float] | None, expert: int | None
    ) -> list[float] | None:
        if method not in METHODS:
            raise ValueError(f"method: unknown {method!r}; expected one of {', '.join(METHODS)}")
        n_exp = len(self.experts)
        if method == "expert":
            if expert is None:
                raise ValueError("expert: method='expert' needs the index of the expert to run")
            if isinstance(expert, bool) or not isinstance(expert, (int, np.integer)):
                raise TypeError(f"expert: expected an int index, got {type(expert).__name__}")
            if not 0 <= expert < n_exp:
                raise ValueError(f"expert: index {expert} out of range for {n_exp} experts")
        elif expert is not None:
            raise ValueError(f"expert: only used by method='expert' (method={method!r})")
        if method in ("dlf", "static"):
            if self.small is None:
                raise ValueError(f"small: method={method!r} needs the small base model")
            if n_exp == 0:
                raise ValueError(f"experts: method={method!r} needs at least one expert")
        if method != "static":
            if alpha is not None:
                raise ValueError(f"alpha: only used by method='static' (method={method!r})")
            return None
        if alpha is None:
            raise ValueError("alpha: method='static' needs the static weight(s), e.g. alpha=1.0")
        if isinstance(alpha, (int, float, np.floating, np.integer)):
            return [float(alpha)] * n_exp
        values = [float(a) for a in alpha]
        if len(values) != n_exp:
            raise ValueError(f"alpha: {len(values)} weights given for {n_exp} experts")
        return values

    @staticmethod
    def _check_stop(stop: str | Sequence[str] | None) -> list[str]:
        if stop is None:
            return []
        stops = [stop] if isinstance(stop, str) else list(stop)
        for i, s in enumerate(stops):
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop[{i}]: stop strings must be non-empty strings")
        return stops

    @staticmethod
    def _row_seeds(seed: int | Sequence[int] | None, batch: int) -> list[int] | None:
        if isinstance(seed, bool):
            raise TypeError("seed: expected None, an int or one int per prompt, got a bool")
        if seed is None:
            base = secrets.randbits(63)
            return [row_seed(base, b) for b in range(batch)]
        if isinstance(seed, (int, np.integer)):
            return [row_seed(int(seed), b) for b in range(batch)]
        seeds = [int(s) & _MASK63 for s in seed]
        if len(seeds) != batch:
            raise ValueError(f"seed: {len(seeds)} seeds given for {batch} prompts")
        return seeds

    def _check_prompts_for(
        self, prompts_for: Mapping[str, Sequence[str]] | None, batch: int
    ) -> dict[str, list[str]]:
        if not prompts_for:
            return {}
        names = {name for name, _ in self._named_models()}
        out: dict[str, list[str]] = {}
        for key, lst in prompts_for.items():
            if key not in names:
                raise ValueError(
                    f"prompts_for: unknown key {key!r}; expected one of {sorted(names)}"
                )
            items = [lst] if isinstance(lst, str) else list(lst)
            if len(items) != batch:
                raise ValueError(f"prompts_for[{key!r}]: {len(items)} prompts for {batch} prompts")
            for i, p in enumerate(items):
                if not isinstance(p, str) or not p:
                    raise ValueError(f"prompts_for[{key!r}][{i}]: empty or non-string prompt")
            out[key] = items
        return out

    @staticmethod
    def _fuse_kwargs(
        method: str,
        static_alphas: list[float] | None,
        solver: str | None,
        support_k: int | None,
        alpha_range: tuple[float, float],
    ) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        if method == "static":
            kwargs["alpha"] = static_alphas
        elif method == "dlf":
            kwargs["alpha_range"] = (float(alpha_range[0]), float(alpha_range[1]))
            if solver is not None:
                kwargs["solver"] = solver
            if support_k is not None:
                kwargs["support_k"] = int(support_k)
        return kwargs


def _row_trace(rows: list[tuple[Any, ...]], n_exp: int) -> RowTrace:
    if not rows:
        empty = np.zeros((0,), np.float32)
        return RowTrace(
            np.zeros((0,), np.int64), empty, empty, empty,
            np.zeros((0, n_exp), np.float32), np.zeros((0, n_exp), np.float32),
            np.zeros((0,), np.uint32),
        )  # fmt: skip
    cols = list(zip(*rows))
    return RowTrace(
        active=np.asarray(cols[0], np.int64),
        loss=np.asarray(cols[1], np.float32),
        kl_fused_large=np.asarray(cols[2], np.float32),
        kl_large_fused=np.asarray(cols[3], np.float32),
        kl_expert_small=np.stack(cols[4]).astype(np.float32).reshape(len(rows), n_exp),
        kl_small_expert=np.stack(cols[5]).astype(np.float32).reshape(len(rows), n_exp),
        support_size=np.asarray(cols[6], np.uint32),
    )


# ---------------------------------------------------------------------- loading helpers
def _parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return "auto"
    names = {
        "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
        "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
        "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    }  # fmt: skip
    if dtype not in names:
        raise ValueError(f"torch_dtype: unknown dtype {dtype!r}; expected one of {sorted(names)}")
    return names[dtype]


def _looks_like_path(s: str) -> bool:
    return (
        s.startswith((".", "/", "~"))
        or "\\" in s
        or s.count("/") > 1
        or s.endswith("/")
        or os.path.isabs(s)
    )


def _resolve_source(arg: str, value: str | os.PathLike[str]) -> str:
    """A local directory for ``value`` when one exists, else the string as a hub id."""
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{arg}: expected a path or hub id string, got {type(value).__name__}")
    s = os.path.expanduser(os.fspath(value))
    if os.path.isdir(s):
        return s
    if os.path.exists(s):
        raise FileNotFoundError(f"{arg}: {s!r} is a file; expected a model directory")
    if _looks_like_path(s):
        raise FileNotFoundError(f"{arg}: model directory {s!r} does not exist")
    return s


def _not_found(arg: str, src: str, err: BaseException) -> FileNotFoundError:
    return FileNotFoundError(
        f"{arg}: {src!r} was not found locally (no such directory) and not in the Hugging Face "
        f"cache; fetching it from the hub would need network ({type(err).__name__})"
    )


def _load_model(arg: str, src: str, kwargs: dict[str, Any]) -> Any:
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(src, **kwargs)
    except torch.cuda.OutOfMemoryError as err:
        raise _oom_hint(arg, err) from err
    except OSError as err:
        if os.path.isdir(src):
            raise OSError(f"{arg}: could not load a causal LM from {src!r}: {err}") from err
        raise _not_found(arg, src, err) from None


def _load_adapter(arg: str, src: str, small_src: str, kwargs: dict[str, Any]) -> Any:
    try:
        from peft import PeftModel
    except ImportError as err:
        raise ImportError(
            f"{arg}: {src!r} is a PEFT LoRA adapter (adapter_config.json); loading it needs "
            "peft: pip install 'dlf_rs[peft]'"
        ) from err
    with open(os.path.join(src, "adapter_config.json"), encoding="utf-8") as fh:
        json.load(fh)  # a clear JSON error here beats a deep one inside peft
    # Each adapter gets its own copy of the small base: merging LoRA modifies the weights.
    base = _load_model("small", small_src, kwargs)
    return PeftModel.from_pretrained(base, src).merge_and_unload()


def _has_tokenizer_files(path: str) -> bool:
    return any(
        os.path.isfile(os.path.join(path, f))
        for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    )


def _load_tokenizer(arg: str, src: str, auto: Any) -> Any:
    try:
        return auto.from_pretrained(src)
    except OSError as err:
        if os.path.isdir(src):
            raise OSError(f"{arg}: no tokenizer could be loaded from {src!r}: {err}") from err
        raise _not_found(arg, src, err) from None
