"""The paper tables' LoRA adapters: one expert per task on the 0.5B, the same recipe on the
1.5B (the upper bounds), and one adapter on the three tasks mixed (multi-task tuning).

Where it sits: after the data and splits (:mod:`.plan`), before decoding (:mod:`.runner`),
which loads these folders as the experts and merged models of its rows. ``python -m
dlf_rs.real_family.paper train`` runs it.

The recipe is the real family's (:mod:`dlf_rs.real_family.train`: LoRA r = 8 on every linear
layer of the blocks, AdamW at 4e-4 with warm-up and linear decay, batch 8, one epoch, float32 on
CPU, loss on the reply tokens only), applied to each task's train part with its training
target (:func:`.prompts.target_text`: GSM8K's worked answer ending "The answer is N.", TriviaQA's
answer value, MMLU's letter, each after the task's zero-shot user turn). TriviaQA's train part
is capped (:data:`.plan.TRAIN_CAP`, a seeded sample). The mixed adapter trains on the
concatenation of the three (capped) train parts; the recipe shuffles its batches.

Cache: ``<cache>/paper/adapters/<name>/`` holds the PEFT adapter, train.py's ``manifest.json``
and ``paper.json``: the fingerprint of the inputs (the recipe, the sha256 of the training
examples as prompt and target text, the base model's digest, the split fingerprints, the LoRA
targets) with the adapter's sha256. A rerun whose fingerprint and adapter file match does
nothing. While an adapter trains, ``<name>.checkpoint.pt`` beside its folder holds the training's
state (every 5 minutes, keyed by the fingerprint): a stopped ``train`` resumes from it and gives
the same adapter as an unbroken run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import train
from .plan import TASK_ORDER, TRAIN_CAP
from .prompts import Example, messages, target_text, user_text
from .store import Digests, fingerprint, write_json

__all__ = ["ADAPTERS", "FORMAT", "PAPER_MANIFEST", "AdapterSpec", "adapter_dir",
           "checkpoint_file", "data_digest", "ensure_adapter", "recipe_for",
           "training_examples"]  # fmt: skip

FORMAT = "dlf_rs.real_family.paper.adapter/1"
PAPER_MANIFEST = "paper.json"


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    base: str  # "small" (an expert, or multi-task tuning) or "large" (an upper bound)
    tasks: tuple[str, ...]


ADAPTERS: dict[str, AdapterSpec] = {
    **{f"{t}-{b}": AdapterSpec(f"{t}-{b}", b, (t,)) for t in TASK_ORDER
       for b in ("small", "large")},
    "mixed-small": AdapterSpec("mixed-small", "small", TASK_ORDER),
    "mixed-large": AdapterSpec("mixed-large", "large", TASK_ORDER),
}  # fmt: skip


def adapter_dir(cache: Path, name: str) -> Path:
    return cache / "paper" / "adapters" / name


def checkpoint_file(cache: Path, name: str) -> Path:
    """Where adapter ``name``'s training keeps its checkpoint while it runs."""
    return adapter_dir(cache, name).with_name(f"{name}.checkpoint.pt")


def training_examples(spec: AdapterSpec, parts: Mapping[str, Any], seed: int = 0,
                      cap: Mapping[str, int | None] = TRAIN_CAP) -> list[Example]:  # fmt: skip
    """The train parts of ``spec``'s tasks (``parts``: task -> split), each capped by a seeded
    sample kept in id order, concatenated in task order."""
    out: list[Example] = []
    for t in spec.tasks:
        part = list(parts[t].train)
        n = cap.get(t)
        if n is not None and len(part) > n:
            part = sorted(random.Random(f"dlf-paper/train-cap/{t}/{seed}").sample(part, n),
                          key=lambda e: e.id)  # fmt: skip
        out.extend(part)
    return out


def data_digest(examples: Sequence[Example]) -> str:
    """sha256 of the training examples as the model sees them: id, user turn, target."""
    rows = [[e.id, user_text(e), target_text(e)] for e in examples]
    blob = json.dumps(rows, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def recipe_for(examples: int, seed: int = 0, **overrides: Any) -> train.Recipe:
    """The real family's recipe (:class:`dlf_rs.real_family.train.Recipe`) over ``examples``."""
    return train.Recipe(examples=examples, seed=seed, **overrides)


class _PaperTask:
    """The paper tasks' prompts for ``train.train_adapter`` (its ``prompts``): the loop, the loss
    and the LoRA config stay train.py's own."""

    messages = staticmethod(messages)
    target_text = staticmethod(target_text)
    dataset_digest = staticmethod(data_digest)

    @staticmethod
    def make_split(*_: Any) -> Any:
        raise RuntimeError("the paper adapters always pass their examples")


def ensure_adapter(cache: Path, name: str, parts: Mapping[str, Any], *, digests: Digests,
                   seed: int = 0, recipe: Mapping[str, Any] | None = None, force: bool = False,
                   micro_batch: int | None = None,
                   log: Callable[[str], None] = print) -> dict[str, Any]:  # fmt: skip
    """Train adapter ``name`` (:data:`ADAPTERS`) unless the same inputs' adapter is in place;
    returns its ``paper.json``. ``recipe``: overrides of the recipe's fields (``max_steps``,
    ``threads``, ``epochs`` ...)."""
    spec = ADAPTERS[name]
    exs = training_examples(spec, parts, seed)
    if not exs:
        raise ValueError(f"{name}: no training examples")
    rec = recipe_for(len(exs), seed, **dict(recipe or {}))
    base = train.base_dir(cache, spec.base)
    if not (base / "config.json").is_file():
        raise FileNotFoundError(f"{base}: no model; run `make real-family` first")
    inputs = {
        "format": FORMAT,
        "adapter": name,
        "tasks": list(spec.tasks),
        # threads change the speed, not the recipe
        "recipe": {k: v for k, v in dataclasses.asdict(rec).items() if k != "threads"},
        "target_modules": list(train.TARGET_MODULES),
        "data_sha256": data_digest(exs),
        "examples": len(exs),
        "base_sha256": digests.of(base),
        "splits": {t: parts[t].fingerprint for t in spec.tasks},
    }
    key = fingerprint(inputs)
    out = adapter_dir(cache, name)
    weights = out / "adapter_model.safetensors"
    try:
        have = json.loads((out / PAPER_MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        have = None
    if (not force and have is not None and have.get("key") == key and weights.is_file()
            and train.sha256_path(weights) == have.get("adapter_sha256")):  # fmt: skip
        log(f"train: {name}: in place ({out}, fingerprint {key}, trained {have.get('created')} "
            f"in {have.get('seconds')} s); nothing to do")  # fmt: skip
        return dict(have)
    log(f"train: {name}: {len(exs)} examples of {'+'.join(spec.tasks)} on the {spec.base} base "
        f"(fingerprint {key})")  # fmt: skip
    t0 = time.perf_counter()
    # every 5 minutes a checkpoint beside the adapter: a stopped run resumes where it was
    man = train.train_adapter(base, out, rec, examples=exs, prompts=_PaperTask, log=log,
                              micro_batch=micro_batch, checkpoint=checkpoint_file(cache, name),
                              checkpoint_key=key)  # fmt: skip
    man["task"] = "paper:" + "+".join(spec.tasks)
    write_json(out / train.MANIFEST, man)
    paper = {
        "key": key,
        "inputs": inputs,
        "adapter_sha256": man["adapter_sha256"],
        "adapter_bytes": man["adapter_bytes"],
        "steps": man["steps"],
        "final_loss": man["losses"][-1] if man["losses"] else None,
        "seconds": round(time.perf_counter() - t0, 1),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    write_json(out / PAPER_MANIFEST, paper)
    return paper
