"""Decode, cache and score every row of the paper tables: ``python -m dlf_rs.real_family.paper run``.

Where it sits: after :mod:`.experts` (the adapters in the cache), before :mod:`.report` (the
tables). For each task and row (:mod:`.plan`) it decodes the chosen part (held-out, or
validation) greedily through :class:`dlf_rs.FusedGenerator` (or a vLLM worker:
:mod:`.vllm_engine`), with the task's zero-shot prompt
(:func:`.prompts.messages`, rendered by each model's chat template), budget and stop strings
(:data:`.tasks.TASKS`), and scores every reply (:func:`.tasks.correct`).

Cache (:mod:`.store`): a row's replies go to ``<cache>/paper/outputs/<task>/<row>-<fp>.jsonl``,
where the fingerprint covers the row's options, the digests of the models it uses (base folders
and adapters), the budget, the dtype, the device kind and the task's batch size. Examples are decoded
in fixed batches (the i-th batch is always examples ``i*B .. i*B+B-1`` of the part), so a
resumed or extended run decodes exactly the batches a fresh run would; a batch is skipped when
every one of its examples is in the cache with the same prompt text. Rows that share models
(the fused rows of one expert set, say) share one loaded generator; a generator is loaded only
when one of its rows has something left to decode.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..train import base_dir
from . import scoring
from .data import GsmExample, MmluExample, TriviaExample
from .experts import adapter_dir
from .plan import (
    CHOICES,
    TASK_ORDER,
    Choice,
    Row,
    default_limits,
    load_benchmarks,
    make_splits,
    rows_for,
)
from .prompts import Example, messages, user_text
from .store import Digests, OutputFile, fingerprint, prompt_sha
from .tasks import TASKS, correct

__all__ = ["OUTPUT_FORMAT", "RowResult", "RunConfig", "Runner", "answer_of"]

OUTPUT_FORMAT = "dlf_rs.real_family.paper.outputs/1"


@dataclass(frozen=True)
class RunConfig:
    """Everything a run reads (built once by the CLI or a test)."""

    cache: Path
    tasks: tuple[str, ...] = TASK_ORDER
    part: str = "heldout"
    limit: int | None = None  # the first N examples of the part, every row
    rows: tuple[str, ...] | None = None  # row keys (default: every row of ``tables``)
    tables: tuple[str, ...] = ("single", "multi")
    row_limits: bool = True  # plan.default_limits on the held-out part
    dtype: str = "bfloat16"
    device: str | None = None  # None: CPU
    batch_size: int | None = None  # every task's instead of TASKS' (None: each task's own)
    threads: int = 2
    seed: int = 0
    wheel: Path | None = None  # another wheel, read unchecked (tests)
    sizes: Mapping[str, Sequence[int]] | None = None  # task -> (held-out, validation)
    budgets: Mapping[str, int] | None = None  # task -> max_new_tokens instead of TASKS'
    decode: bool = True  # False: read the cache only (a row with gaps is left out)
    progress: bool = True
    engine: str = "hf"  # "hf": FusedGenerator; "vllm": a vLLM worker (:mod:`.vllm_engine`)
    vllm_python: str | None = None  # the worker's Python (default: $DLF_RS_VLLM_PYTHON)


ENGINES = ("hf", "vllm")


@dataclass
class RowResult:
    """One row on one task: per-example results in the part's order (the first ``n``)."""

    task: str
    row: Row
    fingerprint: str
    ids: list[str]
    correct: tuple[bool, ...]
    texts: list[str]
    answers: list[str | None]
    tokens: list[int]
    finish: list[str]
    seconds: list[float]  # per example: its batch's wall time over the batch's size
    alphas: list[list[list[float]] | None] = field(default_factory=list)
    note: str = ""

    @property
    def key(self) -> str:
        return self.row.key

    @property
    def n(self) -> int:
        return len(self.ids)


def answer_of(ex: Example, reply: str) -> str | None:
    """The answer the task's scorer reads from ``reply`` (the per-example files keep it)."""
    if isinstance(ex, GsmExample):
        return scoring.extract_gsm8k_number(reply)
    if isinstance(ex, TriviaExample):
        return scoring.trivia_prediction(reply)
    if isinstance(ex, MmluExample):
        return scoring.extract_mmlu_letter(reply, ex.choices)
    raise TypeError(f"ex: expected a GSM8K, TriviaQA or MMLU example, got {type(ex).__name__}")


def _single(path: Path, dtype: str, device: str | None, adapter: Path | None) -> Any:
    """A generator whose only model is ``path`` with ``adapter`` merged in (method "large")."""
    import torch
    import transformers

    from dlf_rs import FusedGenerator

    auto: Any = transformers.AutoModelForCausalLM
    model = auto.from_pretrained(os.fspath(path), dtype=getattr(torch, dtype))
    if adapter is not None:
        import peft

        model = peft.PeftModel.from_pretrained(model, os.fspath(adapter)).merge_and_unload()
    if device is not None:
        model = model.to(device)
    tok = transformers.AutoTokenizer.from_pretrained(os.fspath(path))
    return FusedGenerator(model.eval(), tokenizer=tok)


@dataclass
class _Item:
    task: str
    row: Row
    fp: str
    out: OutputFile
    examples: list[Example]
    manifest: dict[str, Any]


class Runner:
    """The run of one :class:`RunConfig`: :meth:`run` decodes what the cache lacks and returns
    every row's results; :meth:`results` reads them without decoding."""

    def __init__(self, cfg: RunConfig, log: Callable[[str], None] = print) -> None:
        if cfg.engine not in ENGINES:
            raise ValueError(f"engine: expected one of {', '.join(ENGINES)}, got {cfg.engine!r}")
        if cfg.part not in ("heldout", "validation"):
            raise ValueError(f"part: expected 'heldout' or 'validation', got {cfg.part!r}")
        unknown = sorted(set(cfg.tasks) - set(TASKS))
        if unknown:
            raise ValueError(f"tasks: unknown {unknown}; expected some of {', '.join(TASKS)}")
        self.cfg = cfg
        self.log = log
        self.bench, self.data_manifest = load_benchmarks(cfg.cache, cfg.wheel)
        self.splits = make_splits(self.bench, cfg.seed, cfg.sizes)
        self.digests = Digests(cfg.cache / "paper" / "digests.json")
        self.outputs = cfg.cache / "paper" / "outputs"

    # ------------------------------------------------------------------ what to decode
    def part(self, task: str, part: str | None = None) -> list[Example]:
        exs = list(self.splits[task].parts()[part or self.cfg.part])
        return exs[: self.cfg.limit] if self.cfg.limit is not None else exs

    def budget(self, task: str) -> int:
        return int((self.cfg.budgets or {}).get(task, TASKS[task].max_new_tokens))

    def batch(self, task: str) -> int:
        return self.cfg.batch_size or TASKS[task].batch_size

    def rows(self, task: str) -> list[Row]:
        return rows_for(task, self.cfg.tables, self.cfg.rows)

    def n_for(self, task: str, row: Row) -> int:
        n = len(self.part(task))
        if self.cfg.part == "heldout" and self.cfg.row_limits:
            full = len(self.splits[task].heldout)
            n = min(n, default_limits(task, full).get(row.key, n))
        return n

    def _adapter_digest(self, name: str) -> str:
        path = adapter_dir(self.cfg.cache, name)
        if not (path / "adapter_model.safetensors").is_file():
            raise FileNotFoundError(f"{path}: no adapter; run `python -m dlf_rs.real_family.paper "
                                    "train` first")  # fmt: skip
        return self.digests.of(path)

    def models(self, row: Row) -> dict[str, Any]:
        """The digests of the models ``row`` runs (not of the ones merely loaded beside it)."""
        out: dict[str, Any] = {"large": self.digests.of(base_dir(self.cfg.cache, row.base))}
        if row.merged:
            out["merged"] = self._adapter_digest(row.merged)
        if row.fused:
            out["small"] = self.digests.of(base_dir(self.cfg.cache, "small"))
            out["experts"] = [self._adapter_digest(e) for e in row.experts]
        return out

    def lora_mode(self, task: str, row: Row) -> str | None:
        """How ``row`` runs its experts on ``task`` (None: it fuses none)."""
        return TASKS[task].lora_mode if row.fused else None

    def spec(self, task: str, row: Row) -> dict[str, Any]:
        """What a row's replies depend on: hashed into the output file's fingerprint."""
        dev = self.cfg.device or "cpu"
        out = {"format": OUTPUT_FORMAT, "options": dict(row.options), "models": self.models(row),
               "max_new_tokens": self.budget(task), "stop": list(TASKS[task].stop),
               "dtype": self.cfg.dtype, "device": dev.split(":")[0],
               "batch_size": self.batch(task), "seed": self.cfg.seed}  # fmt: skip
        if TASKS[task].answer != "generate":  # generated replies keep their files' names
            out["answer"] = TASKS[task].answer
        mode = self.lora_mode(task, row)
        if self.cfg.engine != "hf":  # vLLM runs LoRA experts merged, always
            out["engine"] = self.cfg.engine
        elif mode not in (None, "mixed"):  # the only mode before the key: its files keep their names
            out["lora_mode"] = mode
        return out

    def _item(self, task: str, row: Row) -> _Item:
        spec = self.spec(task, row)
        fp = fingerprint(spec)
        man = {"task": task, "row": row.key, "label": row.label, "fingerprint": fp,
               "merged": row.merged, "experts": list(row.experts) if row.fused else [],
               "base": row.base, **spec}  # fmt: skip
        return _Item(task, row, fp, OutputFile(self.outputs, task, row.key, fp),
                     self.part(task)[: self.n_for(task, row)], man)  # fmt: skip

    def _missing(self, item: _Item) -> list[list[Example]]:
        """The batches of ``item`` with an example not in its cache file."""
        have = item.out.load()
        b = self.batch(item.task)
        todo = []
        for lo in range(0, len(item.examples), b):
            chunk = item.examples[lo : lo + b]
            if any(have.get(e.id, {}).get("prompt_sha") != prompt_sha(user_text(e)) for e in chunk):
                todo.append(chunk)
        return todo

    # ------------------------------------------------------------------ decoding
    def _load(self, gen: tuple[str, str | None, tuple[str, ...]], lora_mode: str | None) -> Any:
        import torch

        from dlf_rs import FusedGenerator

        torch.set_num_threads(self.cfg.threads)
        base, merged, experts = gen
        c = self.cfg
        if experts:
            return FusedGenerator.from_pretrained(
                base_dir(c.cache, base), base_dir(c.cache, "small"),
                [adapter_dir(c.cache, e) for e in experts], torch_dtype=c.dtype, device=c.device,
                lora_mode=lora_mode or "auto",
            )  # fmt: skip
        return _single(base_dir(c.cache, base), c.dtype, c.device,
                       adapter_dir(c.cache, merged) if merged else None)  # fmt: skip

    def _decode(self, gen: Any, item: _Item, chunks: list[list[Example]]) -> None:
        from tqdm import tqdm

        spec = TASKS[item.task]
        dlf = item.row.options.get("method") == "dlf"
        total = sum(map(len, chunks))
        bar = tqdm(total=total, desc=f"{item.task} {item.row.key}", unit="ex",
                   disable=not self.cfg.progress, leave=False)  # fmt: skip
        for chunk in chunks:
            t0 = time.perf_counter()
            res = gen.generate(messages=[messages(e) for e in chunk],
                               max_new_tokens=self.budget(item.task),
                               stop=list(spec.stop) or None, batch_size=len(chunk),
                               progress=False, temperature=0.0, **item.row.options)  # fmt: skip
            sec = (time.perf_counter() - t0) / len(chunk)
            recs = [_record(e, res.texts[i], res.token_ids[i], res.finish_reasons[i], sec,
                            res.alphas[i] if dlf else None) for i, e in enumerate(chunk)]  # fmt: skip
            item.out.append(recs, item.manifest)
            bar.update(len(chunk))
        bar.close()

    def _choose(self, gen: Any, todo: list[tuple[_Item, list[list[Example]]]]) -> None:
        """Letter-answer rows of one generator: each batch's members run once
        (:meth:`FusedGenerator.next_token_logits`) and every row of the group fuses those
        logits under its own options (:func:`choose_letters`). A row's seconds are the batch's
        forwards (shared by the group's rows) plus its own fusion, per example."""
        from tqdm import tqdm

        letters = letter_ids(gen.tokenizer)
        batches: dict[tuple[str, ...], tuple[list[Example], list[_Item]]] = {}
        for it, chunks in todo:
            for ch in chunks:
                batches.setdefault(tuple(e.id for e in ch), (ch, []))[1].append(it)
        bar = tqdm(total=sum(len(ch) for ch, _ in batches.values()), unit="ex",
                   desc=f"{todo[0][0].task} letters", disable=not self.cfg.progress,
                   leave=False)  # fmt: skip
        for chunk, its in batches.values():
            t0 = time.perf_counter()
            fused = any(it.row.fused for it in its)
            nxt = gen.next_token_logits(messages=[messages(e) for e in chunk],
                                        method="dlf" if fused else "large",
                                        batch_size=len(chunk))  # fmt: skip
            forward = time.perf_counter() - t0
            for it in its:
                t1 = time.perf_counter()
                picks, logps, alphas = choose_letters(nxt, it.row.options, letters)
                sec = (forward + time.perf_counter() - t1) / len(chunk)
                dlf = it.row.options.get("method") == "dlf"
                recs = []
                for i, e in enumerate(chunk):
                    rec = _record(e, "ABCD"[picks[i]], [letters[picks[i]]], "letter", sec,
                                  [alphas[i]] if dlf and alphas is not None else None)  # fmt: skip
                    rec["letter_logprobs"] = [round(float(x), 4) for x in logps[i]]
                    recs.append(rec)
                it.out.append(recs, it.manifest)
            bar.update(len(chunk))
        bar.close()

    def _decode_vllm(self, key: tuple[str, str | None, tuple[str, ...]],
                     todo: list[tuple[_Item, list[list[Example]]]]) -> None:  # fmt: skip
        """One generator group through a vLLM worker (:mod:`.vllm_engine`): every batch of every
        row in one engine, each batch appended to its row's cache as the worker finishes it."""
        import transformers

        from dlf_rs.inputs import render_chat

        from .vllm_engine import decode_group, model_dir, request_args, vllm_python

        c = self.cfg
        base, merged, experts = key
        large, small = base_dir(c.cache, base), base_dir(c.cache, "small")
        names = {"large": self.digests.of(large), "dtype": c.dtype,
                 "merged": self._adapter_digest(merged) if merged else None,
                 "small": self.digests.of(small) if experts else None,
                 "experts": [self._adapter_digest(e) for e in experts]}  # fmt: skip
        t0 = time.perf_counter()
        folder, fused = model_dir(
            c.cache / "paper" / "vllm", fingerprint(names), large, small,
            adapter_dir(c.cache, merged) if merged else None,
            [adapter_dir(c.cache, e) for e in experts], c.dtype,
        )  # fmt: skip
        tok = transformers.AutoTokenizer.from_pretrained(os.fspath(folder))
        batches: list[dict[str, Any]] = []
        where: list[tuple[_Item, list[Example]]] = []
        for it, chunks in todo:
            xargs = request_args(it.row.options)
            dlf = it.row.options.get("method") == "dlf"
            budget, stop = self.budget(it.task), list(TASKS[it.task].stop)
            for chunk in chunks:
                ids = render_chat(tok, base, [messages(e) for e in chunk])
                batches.append({"requests": [
                    {"prompt_token_ids": list(p), "max_tokens": budget, "stop": stop,
                     "extra_args": xargs, "alphas": dlf} for p in ids]})  # fmt: skip
                where.append((it, chunk))
        self.log(f"run: vLLM on {_describe(key)} ({folder.name}, prepared in "
                 f"{time.perf_counter() - t0:.1f} s): {len(batches)} batches")  # fmt: skip
        t1 = time.perf_counter()
        for i, outs, sec in decode_group(vllm_python(c.vllm_python), folder, fused, batches,
                                         dtype=c.dtype, seed=c.seed):  # fmt: skip
            it, chunk = where[i]
            recs = [_record(e, o["text"], o["token_ids"], o["finish"], sec / len(chunk),
                            o["alphas"]) for e, o in zip(chunk, outs, strict=True)]  # fmt: skip
            it.out.append(recs, it.manifest)
        n = sum(len(ch) for _, ch in where)
        self.log(f"run: vLLM decoded {n} examples of {len(todo)} rows in "
                 f"{time.perf_counter() - t1:.1f} s")  # fmt: skip

    def run(self) -> dict[str, list[RowResult]]:
        """Decode every planned row's missing batches, then return all results."""
        if self.cfg.engine == "vllm" and self.cfg.decode:
            letters = [t for t in self.cfg.tasks if TASKS[t].answer == "letter"]
            if letters:
                raise ValueError(f"tasks: {', '.join(letters)} read the answer letter at one "
                                 "position (one forward, no decoding); run them with --engine "
                                 "hf")  # fmt: skip
        items = [self._item(t, r) for t in self.cfg.tasks for r in self.rows(t)]
        groups: dict[tuple[tuple[str, str | None, tuple[str, ...]], str | None], list[_Item]] = {}
        for it in items:
            groups.setdefault((it.row.generator, self.lora_mode(it.task, it.row)), []).append(it)
        for (key, mode), its in groups.items():
            todo = [(it, self._missing(it)) for it in its] if self.cfg.decode else []
            todo = [(it, ch) for it, ch in todo if ch]
            if not todo:
                continue
            if self.cfg.engine == "vllm":
                self._decode_vllm(key, todo)
                continue
            t0 = time.perf_counter()
            gen = self._load(key, mode)
            how = f" ({mode} LoRA)" if mode else ""
            self.log(f"run: loaded {_describe(key)}{how} in {time.perf_counter() - t0:.1f} s")
            letter = [(it, ch) for it, ch in todo if TASKS[it.task].answer == "letter"]
            if letter:
                t1 = time.perf_counter()
                self._choose(gen, letter)
                self.log(f"run: {', '.join(f'{it.task} {it.row.key}' for it, _ in letter)}: "
                         f"letters chosen in {time.perf_counter() - t1:.1f} s")  # fmt: skip
            for it, chunks in todo:
                if TASKS[it.task].answer == "letter":
                    continue
                n = sum(map(len, chunks))
                t1 = time.perf_counter()
                self._decode(gen, it, chunks)
                self.log(f"run: {it.task} {it.row.key}: {n} examples decoded in "
                         f"{time.perf_counter() - t1:.1f} s ({it.out.path.name})")  # fmt: skip
            del gen
            gc.collect()
        return self.results(items)

    # ------------------------------------------------------------------ results
    def _result(self, item: _Item) -> RowResult | None:
        have = item.out.load()
        recs = []
        for e in item.examples:
            rec = have.get(e.id)
            if rec is None or rec.get("prompt_sha") != prompt_sha(user_text(e)):
                return None
            recs.append(rec)
        return RowResult(
            task=item.task, row=item.row, fingerprint=item.fp, ids=[e.id for e in item.examples],
            correct=tuple(correct(e, r["text"]) for e, r in zip(item.examples, recs)),
            texts=[r["text"] for r in recs],
            answers=[answer_of(e, r["text"]) for e, r in zip(item.examples, recs)],
            tokens=[len(r["token_ids"]) for r in recs], finish=[r["finish"] for r in recs],
            seconds=[r["seconds"] for r in recs], alphas=[r.get("alphas") for r in recs],
        )  # fmt: skip

    def results(self, items: list[_Item] | None = None) -> dict[str, list[RowResult]]:
        """Every planned row whose examples are all in the cache (others are logged), plus the
        rows chosen on the validation part (:data:`.plan.CHOICES`) where it is cached."""
        if items is None:
            items = []
            for t in self.cfg.tasks:
                for r in self.rows(t):
                    try:
                        items.append(self._item(t, r))
                    except FileNotFoundError as e:  # an adapter not trained: nothing cached
                        self.log(f"run: {t} {r.key}: left out ({e})")
        out: dict[str, list[RowResult]] = {t: [] for t in self.cfg.tasks}
        for it in items:
            res = self._result(it)
            if res is None:
                self.log(f"run: {it.task} {it.row.key}: not complete in the cache; left out")
                continue
            out[it.task].append(res)
        if self.cfg.part == "heldout":
            for t in self.cfg.tasks:
                for c in CHOICES:
                    chosen = self.choice(t, out[t], c)
                    if chosen is not None:
                        out[t].append(chosen)
        return out

    def choice(self, task: str, held: list[RowResult], choice: Choice) -> RowResult | None:
        """``choice``'s derived row (``static-val``, ``dlf-val``): the candidate most accurate
        on the validation part, ties to ``choice.prefer``'s first, with its held-out results,
        when every candidate is cached on both parts."""
        by = {r.key: r for r in held}
        val = self.part(task, "validation")
        if not val or not all(k in by for k in choice.candidates):
            return None
        acc: dict[str, float] = {}
        for key in choice.candidates:
            it = _Item(task, by[key].row, by[key].fingerprint,
                       OutputFile(self.outputs, task, key, by[key].fingerprint), val, {})  # fmt: skip
            res = self._result(it)
            if res is None:
                return None
            acc[key] = sum(res.correct) / len(res.correct)
        best = max(choice.prefer, key=lambda k: (acc[k], -choice.prefer.index(k)))
        note = ", ".join(f"{name}: {100 * acc[k]:.1f}%" for k, name in choice.candidates.items())
        row = replace(by[best].row, key=choice.key,
                      label=f"{choice.label} ({choice.candidates[best]})")  # fmt: skip
        return replace(by[best], row=row, note=f"validation accuracy by {choice.by} "
                                               f"({len(val)} examples): {note}")  # fmt: skip


def letter_ids(tokenizer: Any) -> list[int]:
    """The token ids of "A", "B", "C", "D" as a reply's first token (each one token)."""
    out = []
    for x in "ABCD":
        ids = tokenizer(x, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"tokenizer: the letter {x!r} is {len(ids)} tokens {ids}; letter "
                             "answers need one token per letter")  # fmt: skip
        out.append(int(ids[0]))
    if len(set(out)) != 4:
        raise ValueError(f"tokenizer: the letters A-D share token ids {out}")
    return out


def choose_letters(nxt: Any, options: Mapping[str, Any], letters: Sequence[int]
                   ) -> tuple[list[int], np.ndarray, np.ndarray | None]:  # fmt: skip
    """Per row of ``nxt`` (:class:`dlf_rs.engines.hf.scoring.NextTokenLogits`): the index of the
    most likely of ``letters`` (ties: the first) under ``options`` ("dlf"/"static": the
    members fused by :func:`dlf_rs.fuse_step`, exactly generate's first step; else the one
    model), the letters' log-probabilities over the whole vocabulary [B, 4], and the weights
    [B, T] (None for one model)."""
    import dlf_rs

    if options.get("method") in ("dlf", "static"):
        large, small, experts = nxt.members()
        z = np.empty_like(large)
        r = dlf_rs.fuse_step(large, small, experts, fused_out=z, **{"temperature": 0.0, **options})
        alphas: np.ndarray | None = np.asarray(r.alphas, np.float32).reshape(len(z), len(experts))
    else:
        (z,) = nxt.logits.values()
        alphas = None
    from dlf_rs.engines.hf.scoring import log_softmax64

    logp = log_softmax64(z)[:, list(letters)]
    return [int(i) for i in np.argmax(logp, axis=-1)], logp, alphas


def _record(e: Example, text: str, token_ids: Sequence[int], finish: str, seconds: float,
            alphas: Sequence[Sequence[float]] | None) -> dict[str, Any]:  # fmt: skip
    """One cache line (either engine): alphas only for DLF rows."""
    rec: dict[str, Any] = {"id": e.id, "prompt_sha": prompt_sha(user_text(e)), "text": text,
                           "token_ids": [int(t) for t in token_ids], "finish": finish,
                           "seconds": round(seconds, 4)}  # fmt: skip
    if alphas is not None:
        rec["alphas"] = [[round(float(a), 4) for a in step] for step in alphas]
    return rec


def _describe(gen: tuple[str, str | None, tuple[str, ...]]) -> str:
    base, merged, experts = gen
    name = f"the {base} model" + (f" + {merged} merged" if merged else "")
    return name + (f" with experts {', '.join(experts)}" if experts else "")
