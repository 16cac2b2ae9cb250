"""The made-up world: entities and their facts, drawn deterministically from one seed.

First step of the default-family flow: `World.build(seed)` fixes every entity's name, city, job and
apple count, and splits the entities into a *tuning* half (used to fine-tune the experts and the
large references) and a *held-out* half (used only by evaluation sets). Both halves are described
in the pretraining corpus, so a base model that memorised the corpus knows held-out facts; the task
formats never appear there.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

CITIES = (
    "paldor", "mirren", "tosk", "velun", "karhold", "brisa", "ombrel", "quenta", "dunmere", "sallow",
    "fenrick", "lorvan", "ashgrove", "tirel", "gannet", "holm", "zeline", "corvast", "umber", "plinth",
)
JOBS = (
    "baker", "miner", "weaver", "sailor", "potter", "farmer", "smith", "healer", "scribe", "hunter",
    "tailor", "mason", "brewer", "fisher", "carver", "singer", "guard", "cook", "trader", "drover",
)
MAX_APPLES = 12   # an entity owns 1..MAX_APPLES apples
MAX_EXTRA = 9     # word problems add 1..MAX_EXTRA apples
MAX_NUMBER = MAX_APPLES + MAX_EXTRA

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "sh", "th", "br", "kr")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou")
_CODAS = ("", "n", "r", "k", "x", "l", "s", "m")


@dataclass(frozen=True)
class Entity:
    """One made-up person and the three facts the corpus states about them."""

    name: str  # two words: "first last"
    city: str
    job: str
    apples: int


@dataclass(frozen=True)
class World:
    """All entities of one seed, with a tuning/held-out split that never overlaps."""

    seed: int
    entities: tuple[Entity, ...]
    tuning: tuple[Entity, ...]
    held_out: tuple[Entity, ...]

    @staticmethod
    def build(seed: int = 0, n_entities: int = 500, n_first: int = 26, n_last: int = 26) -> World:
        rng = random.Random(f"world-{seed}")
        words: list[str] = []
        reserved = set(CITIES) | set(JOBS)
        while len(words) < n_first + n_last:
            word = "".join(
                rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(rng.choice((1, 2, 2)))
            ) + rng.choice(_CODAS)
            if word not in words and word not in reserved and len(word) > 2:
                words.append(word)
        # Two-word names from shared pools: recalling a fact means combining both words, which
        # takes attention and MLP capacity (one token per entity would let even the smallest
        # model store every fact in its embedding rows).
        pairs = [(f, la) for f in words[:n_first] for la in words[n_first:]]
        if n_entities > len(pairs):
            raise ValueError(f"n_entities: at most {len(pairs)} for these pools, got {n_entities}")
        ordered = [f"{f} {la}" for f, la in rng.sample(pairs, n_entities)]
        entities = tuple(
            Entity(n, rng.choice(CITIES), rng.choice(JOBS), rng.randint(1, MAX_APPLES))
            for n in ordered
        )
        half = n_entities // 2
        return World(seed, entities, entities[:half], entities[half:])

    def by_name(self) -> dict[str, Entity]:
        return {e.name: e for e in self.entities}
