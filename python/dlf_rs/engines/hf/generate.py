"""Batched fused generation with Hugging Face causal LMs: :class:`FusedGenerator`.

Flow of :meth:`FusedGenerator.generate`: build the options record (:mod:`dlf_rs.options`) ->
tokenize and left-pad every model's prompts and prefill its KV cache (:mod:`dlf_rs.engines.hf.runner`) ->
per step: wait for the staged logits (:mod:`dlf_rs.engines.hf.staging`), let the Rust core choose one token
per row (``fuse_step`` for "dlf"/"static", ``sample`` for "large"/"expert"), record it
(:mod:`dlf_rs.stopping`, :mod:`dlf_rs.results`) and feed it back to every model. Rows that ended
(EOS, a stop string, ``max_new_tokens``) keep feeding the pad token with their outputs ignored;
the loop stops as soon as every row ended.

Decisions (also in the API docstrings):
- Vocabulary: every model must share the tokenizer; logits are cut to ``len(tokenizer)``.
- Context: a prompt plus ``max_new_tokens`` must fit each model's ``max_position_embeddings``.
- Prompts: non-empty strings with at least one non-space character, valid Unicode. A warning
  names a prompt that is mostly unknown tokens for the tokenizer.
- Seeds: :mod:`dlf_rs.seeds` (results do not depend on batching).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..._core import sample as core_sample
from ...arrays import history_arrays, history_buffer
from ...batching import batches, check_members
from ...inputs import Inputs, Prompt, build_inputs, warn_unknown
from ...options import StepOptions
from ...results import GenerationResult, TraceRecorder
from ...seeds import step_seeds
from ...step import fuse_step_prepared
from ...stopping import Stopping, eos_ids
from ...streaming import DecodeLoop, GenerationStream, StreamChunk, drain
from .fastpath import FastModel, FastOptions, resolve_options
from .loading import LoadOptions, load_family
from .lora import group_slots
from .runner import ModelRunner, ModelSlot, model_device, model_vocab
from .staging import LogitStaging

__all__ = ["FusedGenerator", "GenerationResult", "GenerationStream", "StreamChunk"]


class FusedGenerator:
    """Decode with a large model L, its small base S and T small experts, fusing logits per step.

    ``FusedGenerator(large=model, small=model, experts=[model, ...], tokenizer=tok)`` takes loaded
    Hugging Face causal LMs sharing ``tokenizer``; see :meth:`from_pretrained` to load by path or
    hub id. ``small`` and ``experts`` may be left out when only ``method="large"`` is used.
    ``model_tokenizers`` (optional, name -> tokenizer, names as in ``prompts_for``) are checked
    against ``tokenizer`` and refused when their vocabularies differ.

    ``fast=True`` opts into the fast decode path (:mod:`dlf_rs.engines.hf.fastpath`): a static KV cache per
    model (kept and reset across calls of the same batch size and length bucket), a fixed
    attention mask, and on CUDA compiled decode forwards. Same greedy tokens as the default path
    (up to float rounding of the attention over a longer, masked key axis). ``compile``: None
    (default: ``torch.compile(mode="reduce-overhead")`` only when the large model is on CUDA),
    True/False, or a dict of torch.compile options. ``overlap``: run the small models on a side
    CUDA stream (None: on CUDA when no CUDA graphs are used). Both only with ``fast=True``.
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
        if experts is not None and not isinstance(experts, Sequence):
            raise TypeError(f"experts: expected a list of models, got {type(experts).__name__}")
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
        # A model's own tokenizer (same vocabulary, checked) is kept for its chat template:
        # keys are model names, optionally followed by " (source)" as from_pretrained gives them.
        self._chat_tokenizers: dict[str, Any] = {}
        if model_tokenizers:
            ref = dict(tokenizer.get_vocab())
            for name, tok in model_tokenizers.items():
                if tok is not None and dict(tok.get_vocab()) != ref:
                    raise ValueError(
                        f"tokenizers differ: the tokenizer of {name} "
                        f"({getattr(tok, 'name_or_path', '?')}) does not match the shared tokenizer "
                        f"({getattr(tokenizer, 'name_or_path', '?')}); DLF needs one vocabulary"
                    )
                if tok is not None:
                    self._chat_tokenizers[str(name).split(" (", 1)[0]] = tok
        for name, model in self._named_models():
            if model_vocab(model) < self.vocab_size:
                raise ValueError(
                    f"{name}: the model has {model_vocab(model)} output logits but the tokenizer "
                    f"has {self.vocab_size} tokens; they do not belong together"
                )
        self.pad_token_id = self._pad_id()
        self.eos_token_ids = eos_ids(tokenizer, large)
        # When True (benchmarks), CUDA is synchronised after the forwards so that "forward" holds
        # the compute time instead of only the launch time (otherwise the wait shows in "copy").
        self.sync_timings = False
        self._staging: LogitStaging | None = None
        self._backend: Any = None  # the fast tokenizer's backend, once checked equal (_tokenize)
        self._backend_checked = False
        self.fast = fast
        self._fast_options: FastOptions | None = (
            resolve_options(compile, overlap, model_device(large)) if fast else None
        )
        self._fast_models: dict[str, FastModel] = {}
        self._side_streams: dict[torch.device, torch.cuda.Stream] = {}

    def __repr__(self) -> str:
        lines = [f"FusedGenerator(vocab={self.vocab_size}, fast={self.fast},"]
        for name, model in self._named_models():
            if name.startswith("expert:"):
                name = f"{name} {self.expert_names[int(name[7:])]!r}"
            lines.append(f"  {name}: {_describe(model)},")
        if not self.experts:
            lines.append("  experts: none,")
        tok = self.tokenizer
        lines.append(f"  tokenizer: {type(tok).__name__}({getattr(tok, 'name_or_path', '') or '?'!r}),")
        return "\n".join(lines) + "\n)"

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
        *,
        local_files_only: bool = True,
        allow_pickle: bool = False,
        trust_remote_code: bool = False,
        lora_mode: str = "auto",
        gguf_file: Any = None,
        max_memory: Any = None,
        offload_folder: Any = None,
        **model_kwargs: Any,
    ) -> FusedGenerator:
        """Load Hugging Face causal LMs by local path or hub id.

        Each of ``large``, ``small`` and ``experts`` (a list) is a local model directory, a hub
        id or a ``.gguf`` file; an expert directory holding ``adapter_config.json`` (or a
        ``peft.PeftModel``) is a LoRA adapter on the small base, run as ``lora_mode`` says:
        "auto" (the measured rule of :func:`dlf_rs.engines.hf.lora.choose_mode`), "mixed" (base and all
        adapters as one forward over a mixed batch), "separate" (one shared base, a forward per
        model) or "merged" (each adapter merged into its own copy; needs ``peft``).
        ``gguf_file``, ``device_map``, ``max_memory`` and ``offload_folder`` are passed to
        transformers/accelerate: one value for every model or a dict keyed "large", "small",
        "experts", "expert:<i>" (:func:`dlf_rs.engines.hf.loading.per_model`). ``tokenizer`` (a tokenizer
        or a path) defaults to the large model's; tokenizers shipped with the other checkpoints
        are checked against it. Rules (:mod:`dlf_rs.engines.hf.loading`): hub ids come only from the local
        Hugging Face cache unless ``local_files_only=False``; safetensors only unless
        ``allow_pickle=True``; ``trust_remote_code`` only when passed as True; float32 on CPU
        unless ``torch_dtype`` says otherwise. ``device_map`` is passed to accelerate (sharding);
        otherwise the models are moved to ``device``.
        """
        opts = LoadOptions(
            device=device, torch_dtype=torch_dtype, device_map=device_map,
            local_files_only=local_files_only, allow_pickle=allow_pickle,
            trust_remote_code=trust_remote_code, extra=model_kwargs, gguf_file=gguf_file,
            max_memory=max_memory, offload_folder=offload_folder,
        )  # fmt: skip
        large_m, small_m, experts_m, tok, names, tokenizers = load_family(
            large, small, experts, tokenizer, opts, lora_mode
        )
        return cls(large_m, small_m, experts_m, tok, expert_names=names,
                   model_tokenizers=tokenizers)  # fmt: skip

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        prompts: str | Sequence[str] | None = None,
        max_new_tokens: int = 64,
        options: StepOptions | None = None,
        *,
        messages: Sequence[Any] | None = None,
        input_ids: Any = None,
        attention_mask: Any = None,
        seed: int | Sequence[int] | None = None,
        stop: str | Sequence[str] | None = None,
        prompts_for: Mapping[str, Sequence[str]] | None = None,
        batch_size: int | None = None,
        progress: bool | None = None,
        **overrides: Any,
    ) -> GenerationResult:
        """Generate a continuation for every prompt.

        Input, one of: ``prompts`` (a string or a list of strings), ``messages`` (a list of
        chat conversations, each a list of ``{"role", "content"}`` dicts: every model applies
        its own tokenizer's chat template with the generation prompt) or ``input_ids`` (a list
        of token-id lists, or a ``[B, L]`` tensor with an optional ``attention_mask``, as
        ``generate`` of transformers takes them). :mod:`dlf_rs.inputs` has the rules.

        ``options`` (a :class:`dlf_rs.StepOptions`) and/or its fields as keywords: ``method``
        ("dlf", "static", "large", "expert"), ``alpha``, ``expert``, ``solver``, ``support_k``,
        ``alpha_range``, ``grid_step``, ``multi_expert``, ``temperature``, ``top_k``, ``top_p``,
        ``min_p``, ``speculative`` (keywords override the record; see ``StepOptions`` for each
        rule; ``speculative=k`` or ``"auto"`` decodes with :mod:`dlf_rs.engines.hf.speculative`).
        ``seed``: None (fresh entropy), an int (row seeds derived from it and the row index) or
        one int per prompt, each in [0, 2**64). ``stop``: strings that end a row.
        ``prompts_for``: per-model prompt lists keyed "large", "small" or "expert:<i>" (same
        length as the input); models without a key read the input. Every model gets its own
        prompt tokens and cache; the continuation is shared.
        ``batch_size``: decode at most this many prompts at once (default: all in one batch);
        results are in input order and equal to one batch's. ``progress``: a progress bar over
        the prompts (default: shown when there is more than one batch).
        """
        loops, sizes, show = self._calls(
            prompts, max_new_tokens, options, messages, input_ids, attention_mask, seed, stop,
            prompts_for, batch_size, progress, overrides,
        )  # fmt: skip
        return drain(loops, sizes, show)

    def stream(
        self,
        prompts: str | Sequence[str] | None = None,
        max_new_tokens: int = 64,
        options: StepOptions | None = None,
        *,
        messages: Sequence[Any] | None = None,
        input_ids: Any = None,
        attention_mask: Any = None,
        seed: int | Sequence[int] | None = None,
        stop: str | Sequence[str] | None = None,
        prompts_for: Mapping[str, Sequence[str]] | None = None,
        batch_size: int | None = None,
        progress: bool | None = None,
        **overrides: Any,
    ) -> GenerationStream:
        """:meth:`generate`, yielding each row's new text and token ids as they are decided.

        Returns a :class:`dlf_rs.streaming.GenerationStream` of
        :class:`~dlf_rs.streaming.StreamChunk` (``row``, ``text``, ``token_ids``,
        ``finish_reason`` on a row's last chunk); joined per row they equal ``generate``'s
        ``texts`` and ``token_ids``, and ``stream.result`` is the whole
        :class:`GenerationResult` once the stream is exhausted. With speculative decoding a
        chunk may hold several tokens. Arguments as :meth:`generate`; they are checked here,
        before the first chunk is asked for.
        """
        loops, sizes, show = self._calls(
            prompts, max_new_tokens, options, messages, input_ids, attention_mask, seed, stop,
            prompts_for, batch_size, progress, overrides,
        )  # fmt: skip
        return GenerationStream(loops, sizes, show)

    def _calls(
        self, prompts: Any, max_new_tokens: Any, options: Any, messages: Any, input_ids: Any,
        attention_mask: Any, seed: Any, stop: Any, prompts_for: Any, batch_size: Any,
        progress: Any, overrides: dict[str, Any],
    ) -> tuple[list[Callable[[], DecodeLoop]], list[int], bool]:  # fmt: skip
        """Checks every argument, then the decoding loop of each batch (not started)."""
        t_start = time.perf_counter()
        opts = StepOptions.build(options, **overrides)
        self._check_models(opts)
        names = [name for name, _ in self._named_models()]
        inputs = build_inputs(
            prompts=prompts, messages=messages, input_ids=input_ids,
            attention_mask=attention_mask, prompts_for=prompts_for, names=names,
            chat_tokenizers=self._chat_tokenizers, tokenizer=self.tokenizer,
            vocab=self.vocab_size,
        )  # fmt: skip
        return batches(self._decode, opts, inputs, max_new_tokens, seed, stop, batch_size,
                       progress, t_start)

    def _decode(
        self,
        opts: StepOptions,
        inputs: Inputs,
        max_new_tokens: int,
        seeds_of_rows: list[int] | None,
        stops: list[str],
        t_start: float | None,
    ) -> DecodeLoop:
        """One batch's decoding loop: yields the row state after every step, returns the
        batch's :class:`GenerationResult`."""
        if t_start is None:
            t_start = time.perf_counter()
        batch = inputs.batch
        if opts.speculative is not None:
            from .speculative import generate_speculative

            return (yield from generate_speculative(
                self, opts, inputs, max_new_tokens, seeds_of_rows, stops, t_start
            ))  # fmt: skip

        if opts.method == "large":
            chosen = [("large", self.large)]
        elif opts.expert is not None:  # method "expert" (the record sets expert then only)
            chosen = [(f"expert:{opts.expert}", self.experts[opts.expert])]
        else:
            chosen = self._named_models()
        slots = [ModelSlot.of(name, model, inputs.for_model(name),
                              self._fast_model(name, model)) for name, model in chosen]  # fmt: skip
        slots = group_slots(slots)  # LoRA experts of one base marked mixed: one forward
        timings = {"forward": 0.0, "prefill": 0.0, "copy": 0.0, "fuse_step": 0.0, "sample": 0.0}
        staging = self._staging_for(sum(slot.group for slot in slots), batch)
        runner = ModelRunner(slots, staging, timings, self._tokenize, self.pad_token_id,
                             self._fast_options, self._side_stream, self.sync_timings)  # fmt: skip
        ids = [runner.prompt_ids(slot, max_new_tokens) for slot in slots]
        warn_unknown(self.tokenizer, ids[0], inputs.for_model(slots[0].name), slots[0].name)
        n_exp = len(self.experts)
        trace = TraceRecorder(batch, n_exp)
        rows = Stopping(batch, self.tokenizer, self.eos_token_ids, stops)
        # Penalties on seen tokens read each row's prompt (of the model that leads: the large
        # one, or the expert alone) and its new tokens, as transformers' processors read
        # input_ids: one int64 buffer padded with -1, filled in place (the core reads it as is).
        hist, fill = (history_buffer(ids[0], batch, max_new_tokens) if opts.penalized
                      else (None, None))  # fmt: skip
        # The fast path runs under no_grad like HF generate with static caches and torch.compile
        # (its caches outlive the call and are reused; inference tensors gain nothing there).
        grad_off = torch.no_grad if self.fast else torch.inference_mode
        steps = 0
        feed: np.ndarray | None = None  # the previous step's tokens, fed at the next step
        for step in range(max_new_tokens):
            # One grad context per step, forwards included; a stream's consumer runs between
            # steps (the yield below), outside it.
            with grad_off():
                if feed is None:
                    runner.prefill(ids, max_new_tokens)
                else:
                    runner.decode(feed)
                t0 = time.perf_counter()
                staging.wait()
                timings["copy"] += time.perf_counter() - t0
                seeds = None if seeds_of_rows is None else step_seeds(seeds_of_rows, step)
                live = rows.live()
                t0 = time.perf_counter()
                if opts.fused:
                    views = staging.views()
                    r = fuse_step_prepared(views[0], views[1], views[2:], opts, seeds, hist)
                    timings["fuse_step"] += time.perf_counter() - t0
                    next_tokens = r.tokens
                    trace.fused(live, r)
                else:
                    seen, offsets = (None, None) if hist is None else history_arrays(hist)
                    next_tokens = core_sample(staging.view(0), opts._core, seed=None,
                                              seeds=seeds, history=seen,
                                              history_offsets=offsets)  # fmt: skip
                    timings["sample"] += time.perf_counter() - t0
                    trace.single(live, 0.0 if opts.method == "large" else np.nan)
                steps = step + 1
                rows.record(next_tokens, live)
                if hist is not None and fill is not None:
                    hist[live, fill[live]] = next_tokens[live]
                    fill[live] += 1
            if step == max_new_tokens - 1 or rows.all_finished():
                break
            feed = np.where(rows.finished, self.pad_token_id, next_tokens)
            yield rows

        alphas, traces = trace.rows()
        timings["steps"] = float(steps)
        timings["total"] = time.perf_counter() - t_start
        return GenerationResult(
            texts=[rows.text(b) for b in range(batch)],
            token_ids=rows.tokens,
            alphas=alphas,
            trace=traces,
            finish_reasons=rows.reasons,
            timings=timings,
            method=opts.method,
            expert_names=list(self.expert_names),
        )

    # ------------------------------------------------------------------ scoring
    def score(self, contexts: Any, continuations: Any, options: StepOptions | None = None,
              **kwargs: Any) -> Any:  # fmt: skip
        """Fused log-probabilities of continuations: :func:`dlf_rs.engines.hf.scoring.score`."""
        from .scoring import score

        return score(self, contexts, continuations, options, **kwargs)

    def next_token_logits(
        self,
        prompts: str | Sequence[str] | None = None,
        *,
        messages: Sequence[Any] | None = None,
        input_ids: Any = None,
        attention_mask: Any = None,
        method: str = "dlf",
        expert: int | None = None,
        batch_size: int = 16,
    ) -> Any:
        """Every model's logits for the first new token after each prompt, unfused: a
        :class:`dlf_rs.engines.hf.scoring.NextTokenLogits` (float32 ``[B, V]`` per model).
        Inputs as :meth:`generate` (each model renders ``messages`` with its own chat
        template); ``method``/``expert`` pick the models ("dlf"/"static": every member).
        Fuse them with ``dlf_rs.fuse_step(*result.members(), options, fused_out=...)``: the
        same first step ``generate`` takes, and one forward serves any number of option sets
        (multiple-choice answers read at one position, say)."""
        from .scoring import next_token_logits

        named = dict(self._named_models())
        want = (["large", "small", *(f"expert:{i}" for i in range(len(self.experts)))]
                if method in ("dlf", "static") else
                [f"expert:{expert}"] if method == "expert" and expert is not None else ["large"])  # fmt: skip
        inputs = build_inputs(
            prompts=prompts, messages=messages, input_ids=input_ids,
            attention_mask=attention_mask, prompts_for=None,
            names=[n for n in want if n in named], chat_tokenizers=self._chat_tokenizers,
            tokenizer=self.tokenizer, vocab=self.vocab_size,
        )  # fmt: skip
        ids = {n: self._tokenize(inputs.for_model(n)) for n in want if n in named}
        return next_token_logits(self, ids, method, expert, batch_size=batch_size)

    def score_rolling(self, texts: Any, options: StepOptions | None = None, **kwargs: Any) -> Any:
        """Rolling log-likelihood of whole texts: :func:`dlf_rs.engines.hf.scoring.score_rolling`."""
        from .scoring import score_rolling

        return score_rolling(self, texts, options, **kwargs)

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

    def _tokenize(self, items: list[Prompt]) -> list[list[int]]:
        """Token ids of each prompt item: text is tokenized, token-id tuples pass as they are."""
        texts = [p for p in items if isinstance(p, str)]
        if len(texts) == len(items):
            return self._tokenize_texts(texts)
        encoded = iter(self._tokenize_texts(texts) if texts else [])
        return [next(encoded) if isinstance(p, str) else list(p) for p in items]

    def _tokenize_texts(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text (special tokens added, as the models were trained).

        A fast tokenizer's ``__call__`` is its Rust backend's ``encode_batch`` plus ~100 us of
        Python per call; with no padding or truncation configured on the backend the two give
        the same ids, so the backend is called directly (checked on the first call, and only
        while the backend has neither padding nor truncation switched on)."""
        backend = self._backend
        # Padding/truncation state is re-read every call: a padded __call__ elsewhere on the same
        # tokenizer leaves it switched on in the backend until the next unpadded __call__.
        if backend is not None and backend.padding is None and backend.truncation is None:
            return [e.ids for e in backend.encode_batch(texts, add_special_tokens=True)]
        ids = [list(x) for x in self.tokenizer(texts, add_special_tokens=True)["input_ids"]]
        if self._backend_checked:
            return ids
        self._backend_checked = True
        cand = getattr(self.tokenizer, "backend_tokenizer", None)
        if (getattr(self.tokenizer, "is_fast", False) and cand is not None
                and cand.padding is None and cand.truncation is None
                and [e.ids for e in cand.encode_batch(texts, add_special_tokens=True)] == ids):
            self._backend = cand  # fmt: skip
        return ids

    def _staging_for(self, n_models: int, batch: int) -> LogitStaging:
        if self._staging is None or not self._staging.matches(n_models, batch, self.vocab_size):
            self._staging = LogitStaging(n_models, batch, self.vocab_size)
        return self._staging

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

    # ------------------------------------------------------------------ argument checks
    def _check_models(self, opts: StepOptions) -> None:
        check_members(opts, self.small is not None, len(self.experts))

def _describe(model: Any) -> str:
    """One model in a line: class, source, size, device and dtype (adapters by their base)."""
    source = getattr(getattr(model, "config", None), "_name_or_path", "") or "?"
    try:
        params = sum(p.numel() for p in model.parameters())
        dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    except (AttributeError, StopIteration, TypeError):
        params, dtype = 0, "?"
    size = (f"{params / 1e9:.2f}B" if params >= 1e9 else f"{params / 1e6:.1f}M" if params >= 1e6
            else f"{params / 1e3:.1f}k")  # fmt: skip
    return (f"{type(model).__name__}({os.path.basename(str(source).rstrip('/')) or source!r}, "
            f"{size} params, {model_device(model)}, {dtype})")  # fmt: skip

