"""Batched fused generation on llama.cpp: :class:`LlamaCppGenerator`.

Flow of :meth:`LlamaCppGenerator.generate`, the same as :class:`dlf_rs.FusedGenerator`'s: build
the options record (:mod:`dlf_rs.options`) -> tokenize every member's prompts with the GGUF's own
tokenizer and prefill them, one KV sequence per row, in one batch per member
(:mod:`.native`) -> per step: the Rust core chooses one token per live row from the members'
last-position logits, read in place from llama.cpp's buffers (``fuse_step`` for "dlf"/"static",
``sample`` for "large"/"expert"), records it (:mod:`dlf_rs.stopping`, :mod:`dlf_rs.results`) and
feeds it to every member. A row that ends (EOS, a stop string, ``max_new_tokens``) leaves the
batch, so later steps evaluate only the rows still running; its KV cells are freed when the call
ends (freed at once, llama.cpp reuses them for the other rows' next tokens, which reorders those
rows' attention sums: their tokens then differed from decoding them alone).

Decisions (also in the API docstrings):
- Members: the large model, the small base and each expert are GGUF files loaded by llama.cpp as
  they are (any quantisation llama.cpp reads; no conversion). An expert may be a LoRA adapter
  GGUF: it runs as a context of the small model with the adapter applied (the small model's
  weights are loaded once).
- Vocabulary: every member must have the large model's vocabulary, token for token (checked at
  load); the logits are the models' full width.
- Context: each row's prompt plus ``max_new_tokens`` must fit every member's training context.
- Seeds and options: as :class:`dlf_rs.FusedGenerator` (:mod:`dlf_rs.seeds`; results do not
  depend on batching).
- ``speculative=k`` or ``"auto"``: speculative DLF (:mod:`.speculative`), FusedGenerator's
  semantics and core call; greedy gives the tokens of sequential DLF.
- Threads: in sequential decoding the members' decodes of a step run side by side in two lanes
  of threads (:mod:`.lanes`; ``parallel_members``), each member on its lane's threads; the
  logits do not depend on it (checked in the tests). Speculative DLF runs its members in turn on
  every thread (its verification decodes several positions, which two threads speed up well).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from ..._core import sample as core_sample
from ...arrays import history_arrays, history_buffer
from ...batching import batches, check_members
from ...inputs import Inputs, Prompt, build_inputs
from ...options import StepOptions, check_int
from ...results import GenerationResult, TraceRecorder
from ...seeds import step_seeds
from ...step import fuse_step_prepared
from ...stopping import Stopping
from ...streaming import DecodeLoop, GenerationStream, drain
from .lanes import Lane, LaneRunner, plan_lanes
from .native import Context, GgufLora, GgufModel, gguf_kind

__all__ = ["GgufTokenizer", "LlamaCppGenerator"]


class GgufTokenizer:
    """A GGUF model's own tokenizer with the few Hugging Face tokenizer members the shared code
    reads (:mod:`dlf_rs.stopping`, :mod:`dlf_rs.streaming`, :mod:`dlf_rs.inputs`)."""

    def __init__(self, model: GgufModel) -> None:
        self.model = model
        self.name_or_path = model.path
        self.eos_token_id = model.special_id("eos")
        self.bos_token_id = model.special_id("bos")
        self.pad_token_id = model.special_id("pad")
        self.unk_token_id = None
        self.chat_template = model.chat_template()
        self._chat: Any = None

    def __len__(self) -> int:
        return self.model.n_vocab

    def __call__(self, text: str | Sequence[str],
                 add_special_tokens: bool = True) -> dict[str, Any]:  # fmt: skip
        """``{"input_ids": ids}`` of a text or a list of texts (special tokens in the text are
        parsed, as Hugging Face tokenizers do)."""
        if isinstance(text, str):
            return {"input_ids": self.model.tokenize(text, add_special_tokens)}
        return {"input_ids": [self.model.tokenize(t, add_special_tokens) for t in text]}

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.model.detokenize(list(ids), skip_special=skip_special_tokens)

    def apply_chat_template(self, conversation: list[dict[str, Any]], tokenize: bool = False,
                            add_generation_prompt: bool = True) -> str:  # fmt: skip
        """The GGUF's chat template rendered as transformers renders it (jinja2, sandboxed)."""
        if tokenize:
            raise ValueError("tokenize: only tokenize=False is supported")
        if self.chat_template is None:
            raise ValueError(f"{self.model.arg}: the GGUF has no chat template")
        if self._chat is None:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            self._chat = Jinja2ChatFormatter(
                self.chat_template,
                eos_token=self.model.token_text(self.eos_token_id),
                bos_token=self.model.token_text(self.bos_token_id),
                add_generation_prompt=add_generation_prompt,
            )
        return str(self._chat(messages=conversation).prompt)


class LlamaCppGenerator:
    """Decode with a large GGUF model L, its small base S and T small experts on llama.cpp,
    fusing logits per step with dlf_rs's core: :meth:`from_gguf` loads the files.

    ``generate`` and ``stream`` take the same arguments and options as
    :class:`dlf_rs.FusedGenerator`'s (methods "dlf", "static", "large", "expert", the solver and
    multi-expert options, sampling, penalties, seeds, stop strings, chat messages, speculative
    DLF with ``speculative=k`` or ``"auto"``) and return the same
    :class:`dlf_rs.GenerationResult` and stream chunks.

    ``n_threads``: llama.cpp's CPU threads in all (default: every core). ``parallel_members``:
    decode the members of a step side by side in two lanes that share those threads
    (:mod:`.lanes`); default (None): on when there are at least two threads and no layer is
    offloaded to a GPU. Off, each member decodes in turn on every thread.
    """

    def __init__(self, large: GgufModel, small: GgufModel | None = None,
                 experts: Sequence[GgufModel | GgufLora] = (), *,
                 expert_names: Sequence[str] | None = None, n_threads: int | None = None,
                 lora_scale: float = 1.0, flash_attn: bool = True,
                 parallel_members: bool | None = None) -> None:  # fmt: skip
        if not isinstance(large, GgufModel):
            raise TypeError(f"large: expected a GgufModel (LlamaCppGenerator.from_gguf loads "
                            f"files), got {type(large).__name__}")  # fmt: skip
        self.large, self.small, self.experts = large, small, list(experts)
        for i, e in enumerate(self.experts):
            if isinstance(e, GgufLora) and e.base is not small:
                raise ValueError(f"experts[{i}]: a LoRA adapter expert must be loaded over the "
                                 "small model")  # fmt: skip
        self.expert_names = (list(expert_names) if expert_names is not None
                             else [f"expert:{i}" for i in range(len(self.experts))])  # fmt: skip
        if len(self.expert_names) != len(self.experts):
            raise ValueError(f"expert_names: {len(self.expert_names)} names for "
                             f"{len(self.experts)} experts")  # fmt: skip
        threads = (os.cpu_count() or 1) if n_threads is None else n_threads
        self.n_threads = check_int(threads, "n_threads", low=1)
        self.lora_scale = float(lora_scale)
        if not isinstance(flash_attn, bool):
            raise TypeError(f"flash_attn: expected a bool, got {type(flash_attn).__name__}")
        self.flash_attn = flash_attn
        if parallel_members is None:
            offloaded = any(self._base_of(n)[0].n_gpu_layers for n in self._names())
            parallel_members = self.n_threads >= 2 and not offloaded
        elif not isinstance(parallel_members, bool):
            raise TypeError("parallel_members: expected a bool or None, got "
                            f"{type(parallel_members).__name__}")  # fmt: skip
        self.parallel_members = parallel_members
        self._lanes = LaneRunner()
        self.tokenizer = GgufTokenizer(large)
        self.vocab_size = large.n_vocab
        self._check_vocab()
        self.eos_token_ids = large.eog_ids()
        self._contexts: dict[str, Context] = {}

    def __repr__(self) -> str:
        head = (f"LlamaCppGenerator(vocab={self.vocab_size}, threads={self.n_threads}, "
                f"parallel_members={self.parallel_members},")  # fmt: skip
        lines = [head]
        for name in self._names():
            m = self._model_of(name)
            what = (f"LoRA {os.path.basename(m.path)!r} over the small model"
                    if isinstance(m, GgufLora) else os.path.basename(m.path))  # fmt: skip
            lines.append(f"  {name}: {what},")
        return "\n".join(lines) + "\n)"

    @classmethod
    def from_gguf(cls, large: str | os.PathLike[str], small: str | os.PathLike[str] | None = None,
                  experts: Sequence[str | os.PathLike[str]] | None = None, *,
                  n_threads: int | None = None, n_gpu_layers: int = 0,
                  lora_scale: float = 1.0, flash_attn: bool = True,
                  parallel_members: bool | None = None) -> LlamaCppGenerator:  # fmt: skip
        """Load GGUF files: ``large``, ``small`` and ``experts`` (a list) are model files, or for
        an expert a LoRA adapter GGUF over the small model (llama.cpp's ``convert_lora_to_gguf``
        writes them), applied at ``lora_scale``. Every path is checked (exists, is a GGUF, is a
        model or an adapter as its place needs) before anything loads. ``n_threads``: llama.cpp's
        CPU threads (default: every core); ``n_gpu_layers``: layers llama.cpp offloads to a GPU
        where it was built with one (default 0); ``parallel_members``: as the constructor's."""
        experts = list(experts or [])
        kinds = [gguf_kind(large, "large")]
        if small is not None:
            kinds.append(gguf_kind(small, "small"))
        kinds += [gguf_kind(p, f"experts[{i}]") for i, p in enumerate(experts)]
        if kinds[0] == "adapter":
            raise ValueError(f"large: {str(large)!r} is a LoRA adapter GGUF, not a model")
        if small is not None and kinds[1] == "adapter":
            raise ValueError(f"small: {str(small)!r} is a LoRA adapter GGUF, not a model")
        if small is None and "adapter" in kinds:
            raise ValueError("small: LoRA adapter experts need the small model they adapt")
        lm = GgufModel(large, "large", n_gpu_layers=n_gpu_layers)
        sm = GgufModel(small, "small", n_gpu_layers=n_gpu_layers) if small is not None else None
        ex: list[GgufModel | GgufLora] = []
        for i, p in enumerate(experts):
            arg = f"experts[{i}]"
            if gguf_kind(p, arg) == "adapter":
                assert sm is not None
                ex.append(GgufLora(p, sm, arg))
            else:
                ex.append(GgufModel(p, arg, n_gpu_layers=n_gpu_layers))
        names = [os.path.splitext(os.path.basename(str(p)))[0] for p in experts]
        return cls(lm, sm, ex, expert_names=names, n_threads=n_threads, lora_scale=lora_scale,
                   flash_attn=flash_attn, parallel_members=parallel_members)

    # ------------------------------------------------------------------ generation
    def generate(self, prompts: str | Sequence[str] | None = None, max_new_tokens: int = 64,
                 options: StepOptions | None = None, *, messages: Sequence[Any] | None = None,
                 input_ids: Any = None, seed: int | Sequence[int] | None = None,
                 stop: str | Sequence[str] | None = None,
                 prompts_for: Mapping[str, Sequence[str]] | None = None,
                 batch_size: int | None = None, progress: bool | None = None,
                 **overrides: Any) -> GenerationResult:  # fmt: skip
        """Generate a continuation for every prompt; arguments as
        :meth:`dlf_rs.FusedGenerator.generate` (``input_ids``: lists of token ids)."""
        loops, sizes, show = self._calls(prompts, max_new_tokens, options, messages, input_ids,
                                         seed, stop, prompts_for, batch_size, progress,
                                         overrides)  # fmt: skip
        return drain(loops, sizes, show)

    def stream(self, prompts: str | Sequence[str] | None = None, max_new_tokens: int = 64,
               options: StepOptions | None = None, *, messages: Sequence[Any] | None = None,
               input_ids: Any = None, seed: int | Sequence[int] | None = None,
               stop: str | Sequence[str] | None = None,
               prompts_for: Mapping[str, Sequence[str]] | None = None,
               batch_size: int | None = None, progress: bool | None = None,
               **overrides: Any) -> GenerationStream:  # fmt: skip
        """:meth:`generate`, yielding each row's new text and token ids as they are decided
        (:class:`dlf_rs.StreamChunk`; arguments are checked before the first chunk)."""
        loops, sizes, show = self._calls(prompts, max_new_tokens, options, messages, input_ids,
                                         seed, stop, prompts_for, batch_size, progress,
                                         overrides)  # fmt: skip
        return GenerationStream(loops, sizes, show)

    def close(self) -> None:
        """Free the contexts and the lane thread (the models are freed with this object)."""
        self._lanes.close()
        for ctx in self._contexts.values():
            ctx.close()
        self._contexts.clear()

    def _calls(self, prompts: Any, max_new_tokens: Any, options: Any, messages: Any,
               input_ids: Any, seed: Any, stop: Any, prompts_for: Any, batch_size: Any,
               progress: Any, overrides: dict[str, Any],
               ) -> tuple[list[Callable[[], DecodeLoop]], list[int], bool]:  # fmt: skip
        t_start = time.perf_counter()
        opts = StepOptions.build(options, **overrides)
        self._check_models(opts)
        inputs = build_inputs(
            prompts=prompts, messages=messages, input_ids=input_ids, attention_mask=None,
            prompts_for=prompts_for, names=self._names(), chat_tokenizers={},
            tokenizer=self.tokenizer, vocab=self.vocab_size,
        )  # fmt: skip
        # llama.cpp decodes at most llama_max_parallel_sequences() sequences at once (256).
        max_batch = int(self.large.lib.llama_max_parallel_sequences())
        return batches(self._decode, opts, inputs, max_new_tokens, seed, stop, batch_size,
                       progress, t_start, max_batch=max_batch)  # fmt: skip

    def _decode(self, opts: StepOptions, inputs: Inputs, max_new_tokens: int,
                seeds_of_rows: list[int] | None, stops: list[str],
                t_start: float | None) -> DecodeLoop:  # fmt: skip
        """One batch's decoding loop: yields the row state after every step, returns the
        batch's :class:`GenerationResult`."""
        t_start = time.perf_counter() if t_start is None else t_start
        if opts.speculative is not None:
            from .speculative import decode_speculative

            return (yield from decode_speculative(self, opts, inputs, max_new_tokens,
                                                  seeds_of_rows, stops, t_start))  # fmt: skip
        batch = inputs.batch
        if opts.method == "large":
            names = ["large"]
        elif opts.expert is not None:  # method "expert"
            names = [f"expert:{opts.expert}"]
        else:
            names = self._names()
        ids = {name: self._tokenize(inputs.for_model(name)) for name in names}
        for name in names:
            self._check_length(name, ids[name], max_new_tokens)
        # One KV cache per sequence when B > 1 (``kv_unified=False``): in a cache shared by the
        # rows, llama.cpp gave a row of a batch of chat prompts logits 0.7-1.4 away from the row
        # alone (docs/llamacpp.md, "Batches"); per sequence, each row's are its own.
        unified = batch == 1
        ctxs = []
        for name in names:
            per_row = [len(r) + max_new_tokens for r in ids[name]]
            need = per_row[0] if unified else batch * max(per_row)
            ctxs.append(self._context(name, need, batch, unified=unified))
        lanes = self._plan(names, ctxs, parallel=True)
        timings = {"forward": 0.0, "prefill": 0.0, "fuse_step": 0.0, "sample": 0.0}
        timings.update({f"forward:{name}": 0.0 for name in names})
        trace = TraceRecorder(batch, len(self.experts))
        rows = Stopping(batch, self.tokenizer, self.eos_token_ids, stops)
        hist, fill = (history_buffer(ids[names[0]], batch, max_new_tokens) if opts.penalized
                      else (None, None))  # fmt: skip
        pos = {name: [len(r) for r in ids[name]] for name in names}
        every = list(range(batch))
        t0 = time.perf_counter()
        views = self._lanes.run(lanes, lambda i: ctxs[i].decode(every, ids[names[i]], [0] * batch))
        # (each view: [live rows, vocab], llama.cpp's own buffer until that context's next decode)
        timings["prefill"] += time.perf_counter() - t0
        own = [0.0] * len(names)  # each member's own decode time in a step (lanes overlap)
        next_tokens = np.zeros(batch, dtype=np.int64)
        steps = 0
        for step in range(max_new_tokens):
            live = rows.live()
            seeds = None
            if seeds_of_rows is not None:
                all_seeds = step_seeds(seeds_of_rows, step)
                seeds = [all_seeds[b] for b in live]
            seen = None if hist is None else np.ascontiguousarray(hist[live])
            t0 = time.perf_counter()
            if opts.fused:
                r = fuse_step_prepared(views[0], views[1], views[2:], opts, seeds, seen)
                timings["fuse_step"] += time.perf_counter() - t0
                chosen = np.asarray(r.tokens)
                trace.fused(live, r, compact=True)
            else:
                s_ids, offsets = (None, None) if seen is None else history_arrays(seen)
                chosen = core_sample(views[0], opts._core, seed=None, seeds=seeds,
                                     history=s_ids, history_offsets=offsets)  # fmt: skip
                timings["sample"] += time.perf_counter() - t0
                trace.single(live, 0.0 if opts.method == "large" else np.nan)
            next_tokens[live] = chosen
            steps = step + 1
            rows.record(next_tokens, live)
            if hist is not None and fill is not None:
                hist[live, fill[live]] = next_tokens[live]
                fill[live] += 1
            if step == max_new_tokens - 1 or rows.all_finished():
                break
            still = rows.live()
            feed = [[int(next_tokens[b])] for b in still]

            def member_step(i: int, still: list[int] = still,
                            feed: list[list[int]] = feed) -> np.ndarray:  # fmt: skip
                t0 = time.perf_counter()
                p = pos[names[i]]
                view = ctxs[i].decode(still, feed, [p[b] for b in still])
                own[i] = time.perf_counter() - t0
                return view

            t0 = time.perf_counter()
            views = self._lanes.run(lanes, member_step)
            timings["forward"] += time.perf_counter() - t0
            for i, name in enumerate(names):
                timings[f"forward:{name}"] += own[i]
                for b in still:
                    pos[name][b] += 1
            yield rows

        alphas, traces = trace.rows()
        timings["steps"] = float(steps)
        timings["total"] = time.perf_counter() - t_start
        return GenerationResult(
            texts=[rows.text(b) for b in range(batch)], token_ids=rows.tokens, alphas=alphas,
            trace=traces, finish_reasons=rows.reasons, timings=timings, method=opts.method,
            expert_names=list(self.expert_names),
        )  # fmt: skip

    # ------------------------------------------------------------------ helpers
    def _plan(self, names: list[str], ctxs: list[Context], parallel: bool) -> list[Lane]:
        """The call's lanes (:func:`.lanes.plan_lanes`, by the members' parameter counts), each
        context set to its lane's threads; ``parallel=False``: one lane on every thread."""
        lanes = self._lane_plan(names, parallel)
        for lane in lanes:
            for i in lane.members:
                ctxs[i].set_threads(lane.threads)
        return lanes

    def _lane_plan(self, names: list[str], parallel: bool) -> list[Lane]:
        """The lanes of ``names`` (indices into it), costed by the models' parameter counts."""
        costs = [float(self._base_of(name)[0].n_params) for name in names]
        return plan_lanes(costs, self.n_threads, parallel and self.parallel_members)

    def _names(self) -> list[str]:
        names = ["large"] + (["small"] if self.small is not None else [])
        return names + [f"expert:{i}" for i in range(len(self.experts))]

    def _model_of(self, name: str) -> Any:
        if name == "large":
            return self.large
        if name == "small":
            return self.small
        return self.experts[int(name.split(":")[1])]

    def _base_of(self, name: str) -> tuple[GgufModel, GgufLora | None]:
        m = self._model_of(name)
        return (m.base, m) if isinstance(m, GgufLora) else (m, None)

    def _context(self, name: str, n_ctx: int, n_seq: int, unified: bool = True) -> Context:
        """The member's context, kept across calls while it is large enough; cleared.
        ``unified=False``: one KV cache per sequence (every batch of several rows), kept apart
        from the unified one."""
        key = name if unified else f"{name}/per-sequence"
        ctx = self._contexts.get(key)
        if ctx is None or not ctx.fits(n_ctx, n_seq, unified):
            if ctx is not None:
                ctx.close()
            model, lora = self._base_of(name)
            cells = 256
            while cells < n_ctx:
                cells *= 2
            ctx = Context(model, name, n_ctx=cells, n_seq=max(n_seq, 1),
                          n_threads=self.n_threads, lora=lora, lora_scale=self.lora_scale,
                          flash_attn=self.flash_attn, unified=unified)  # fmt: skip
            self._contexts[key] = ctx
        ctx.clear()
        return ctx

    def _tokenize(self, items: list[Prompt]) -> list[list[int]]:
        out = []
        for p in items:
            out.append(self.large.tokenize(p) if isinstance(p, str) else list(p))
        return out

    def _check_length(self, name: str, ids: list[list[int]], max_new_tokens: int) -> None:
        model, _ = self._base_of(name)
        limit = model.n_ctx_train
        for b, row in enumerate(ids):
            if limit > 0 and len(row) + max_new_tokens > limit:
                raise ValueError(
                    f"max_new_tokens: prompt {b} has {len(row)} tokens; with max_new_tokens="
                    f"{max_new_tokens} it exceeds the {name} model's context of {limit} tokens"
                )

    def _check_vocab(self) -> None:
        ref = self.large.token_texts()
        for name in self._names()[1:]:
            m, _ = self._base_of(name)
            if m is self.large:
                continue
            other = m.token_texts()
            if len(other) != len(ref):
                raise ValueError(
                    f"{name}: {m.path!r} has {len(other)} tokens but the large model "
                    f"{self.large.path!r} has {len(ref)}; DLF needs one vocabulary"
                )
            if other != ref:
                i = next(k for k, (a, b) in enumerate(zip(ref, other)) if a != b)
                raise ValueError(
                    f"{name}: {m.path!r} has another vocabulary than the large model "
                    f"{self.large.path!r} (token {i}: {other[i]!r} vs {ref[i]!r}); DLF needs "
                    "one vocabulary"
                )

    def _check_models(self, opts: StepOptions) -> None:
        check_members(opts, self.small is not None, len(self.experts))
