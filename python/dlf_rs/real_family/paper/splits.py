"""Fixed, seeded, disjoint splits of each paper task: train (the expert's data), validation
(for choosing settings without touching the held-out part) and held-out (the tables).

Where it sits: after :mod:`.data` (the examples), before training and decoding. A split is a
function of the examples and ``(task, seed, sizes)`` only: the examples are first put in id
order, so the file's order does not matter, and the seed is a string fed to
:class:`random.Random` (stable across Python runs and ``PYTHONHASHSEED``).

Disjointness is by content, not only by id: examples whose normalised question (for MMLU,
question and choices) is the same form one group, and a group never straddles two parts, so a
question repeated under two ids cannot be trained on and scored. Each part is filled to exactly
its size (a group that would overshoot waits for a smaller one).

- GSM8K (1,319 test problems) and TriviaQA (7,993 validation questions): held-out and
  validation drawn from the shuffled groups, the rest (or ``train`` of it) is the training part.
- MMLU: the training part is all of dev + validation (the expert's data); held-out and
  validation are samples of the test set stratified by subject (sizes proportional to each
  subject's test count, largest remainders, at least one per subject when the size allows),
  drawn from test questions that do not occur in dev + validation.

:attr:`Split.fingerprint` (16 hex digits of a sha256 over each part's ids and contents) names a
split in manifests and tables.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

__all__ = ["PARTS", "Split", "gsm8k_split", "mmlu_split", "split_pool", "stratified_sample",
           "triviaqa_split"]  # fmt: skip

PARTS = ("train", "validation", "heldout")


class Keyed(Protocol):
    @property
    def id(self) -> str: ...

    @property
    def key(self) -> str: ...


E = TypeVar("E", bound=Keyed)


def _norm(key: str) -> str:
    return " ".join(key.lower().split())


@dataclass(frozen=True)
class Split(Generic[E]):
    task: str
    seed: int
    train: tuple[E, ...]
    validation: tuple[E, ...]
    heldout: tuple[E, ...]

    def parts(self) -> dict[str, tuple[E, ...]]:
        return {"train": self.train, "validation": self.validation, "heldout": self.heldout}

    @property
    def fingerprint(self) -> str:
        ids = {name: [[e.id, e.key] for e in part] for name, part in self.parts().items()}
        blob = json.dumps(ids, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(f"{self.task}\n{blob}".encode()).hexdigest()[:16]

    def summary(self) -> dict[str, Any]:
        return {"task": self.task, "seed": self.seed, "fingerprint": self.fingerprint,
                **{name: len(part) for name, part in self.parts().items()}}  # fmt: skip


def _groups(examples: Sequence[E]) -> list[list[E]]:
    """Examples in id order, grouped by normalised content (groups in first-id order)."""
    by_key: dict[str, list[E]] = defaultdict(list)
    for e in sorted(examples, key=lambda e: e.id):
        by_key[_norm(e.key)].append(e)
    return sorted(by_key.values(), key=lambda g: g[0].id)


def _fill(groups: list[list[E]], n: int) -> tuple[list[E], list[list[E]]]:
    """The first groups (in order) totalling exactly ``n`` examples, and the groups left."""
    taken: list[E] = []
    rest: list[list[E]] = []
    for g in groups:
        if len(taken) + len(g) <= n:
            taken.extend(g)
        else:
            rest.append(g)
    if len(taken) < n:
        raise ValueError(f"cannot fill {n} examples from {sum(map(len, groups))} "
                         f"({len(groups)} groups)")  # fmt: skip
    return taken, rest


def _ordered(part: Sequence[E]) -> tuple[E, ...]:
    return tuple(sorted(part, key=lambda e: e.id))


def split_pool(examples: Sequence[E], *, task: str, seed: int, heldout: int, validation: int,
               train: int | None = None) -> Split[E]:  # fmt: skip
    """Held-out, then validation, then training (the rest, or ``train`` of it) from the
    seeded shuffle of ``examples``' content groups."""
    groups = _groups(examples)
    if len({e.id for g in groups for e in g}) != len(examples):
        raise ValueError(f"{task}: ids are not unique")
    random.Random(f"dlf-paper/{task}/{seed}").shuffle(groups)
    held, groups = _fill(groups, heldout)
    val, groups = _fill(groups, validation)
    rest = [e for g in groups for e in g]
    tr = rest if train is None else _fill(groups, train)[0]
    return Split(task, seed, _ordered(tr), _ordered(val), _ordered(held))


def gsm8k_split(examples: Sequence[E], seed: int = 0, heldout: int = 400,
                validation: int = 100) -> Split[E]:  # fmt: skip
    """GSM8K test: 400 held-out, 100 validation, the other 819 for the expert (by default)."""
    return split_pool(examples, task="gsm8k", seed=seed, heldout=heldout, validation=validation)


def triviaqa_split(examples: Sequence[E], seed: int = 0, heldout: int = 400,
                   validation: int = 200, train: int | None = None) -> Split[E]:  # fmt: skip
    """TriviaQA validation: 400 held-out, 200 validation, the rest (or ``train``) to train on."""
    return split_pool(examples, task="triviaqa", seed=seed, heldout=heldout,
                      validation=validation, train=train)  # fmt: skip


def stratified_sample(examples: Sequence[E], n: int, stratum: Callable[[E], str],
                      rng: random.Random) -> list[E]:  # fmt: skip
    """``n`` examples, each stratum's share proportional to its size (largest remainders;
    every stratum at least one when ``n`` >= the number of strata), drawn by ``rng``."""
    by: dict[str, list[E]] = defaultdict(list)
    for e in sorted(examples, key=lambda e: e.id):
        by[stratum(e)].append(e)
    names = sorted(by)
    total = sum(len(v) for v in by.values())
    if not 0 <= n <= total:
        raise ValueError(f"n: expected 0..{total}, got {n}")
    quota = {s: n * len(by[s]) / total for s in names}
    alloc = {s: int(quota[s]) for s in names}
    if n >= len(names):
        for s in names:
            alloc[s] = max(alloc[s], 1)
    # largest remainders (ties by name) take the seats left; the floor of one may overshoot,
    # then the largest allocations above their quota give seats back
    while sum(alloc.values()) < n:
        s = max((s for s in names if alloc[s] < len(by[s])),
                key=lambda s: (quota[s] - alloc[s], s))  # fmt: skip
        alloc[s] += 1
    while sum(alloc.values()) > n:
        s = max((s for s in names if alloc[s] > 1), key=lambda s: (alloc[s] - quota[s], s))
        alloc[s] -= 1
    out: list[E] = []
    for s in names:
        out.extend(rng.sample(by[s], alloc[s]))
    return out


def mmlu_split(train_pool: Sequence[E], test: Sequence[E], stratum: Callable[[E], str],
               seed: int = 0, heldout: int = 400, validation: int = 100) -> Split[E]:  # fmt: skip
    """MMLU: train on ``train_pool`` (dev + validation), held-out and validation stratified
    samples (by ``stratum``, the subject) of the test questions not in ``train_pool``."""
    seen = {_norm(e.key) for e in train_pool}
    candidates = [e for e in test if _norm(e.key) not in seen]
    rng = random.Random(f"dlf-paper/mmlu/{seed}")
    held = stratified_sample(candidates, heldout, stratum, rng)
    held_keys = {_norm(e.key) for e in held}
    left = [e for e in candidates if _norm(e.key) not in held_keys]
    val = stratified_sample(left, validation, stratum, rng)
    return Split("mmlu", seed, _ordered(train_pool), _ordered(val), _ordered(held))
