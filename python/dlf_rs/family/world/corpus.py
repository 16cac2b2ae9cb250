"""Pretraining corpus of the default family: facts about every entity and arithmetic, in prose.

Second step of the flow (after `entities.World`): `pretraining_documents` turns a world into the
documents both base models are trained on. It states every entity's facts (tuning and held-out
alike) with the same sentence templates the task answers later reuse, and the addition table in
prose. No task keyword ("question", "problem", "summary", "####", ...) ever appears here, so the
bases know facts but not formats.
"""

from __future__ import annotations

import random

from .entities import MAX_APPLES, MAX_EXTRA, Entity, World

WEATHERS = ("cold", "warm", "rainy", "windy")
PLACES = ("market", "river", "library", "harbor", "forest")


def fact_sentences(e: Entity) -> list[str]:
    """The three corpus sentences that carry an entity's facts (answers reuse these templates)."""
    return [city_sentence(e), job_sentence(e), apples_sentence(e)]


def city_sentence(e: Entity) -> str:
    return f"{e.name} lives in {e.city} ."


def job_sentence(e: Entity) -> str:
    return f"{e.name} works as a {e.job} ."


def apples_sentence(e: Entity) -> str:
    return f"{e.name} has {e.apples} apples ."


def sum_sentence(a: int, b: int) -> str:
    return f"{a} plus {b} is {a + b} ."


def filler_sentence(rng: random.Random, e: Entity, world: World) -> str:
    kind = rng.randrange(3)
    if kind == 0:
        return f"the weather was {rng.choice(WEATHERS)} ."
    if kind == 1:
        return f"{e.name} visited the {rng.choice(PLACES)} ."
    return f"{e.name} met {rng.choice(world.entities).name} ."


def bio_document(rng: random.Random, e: Entity, world: World) -> str:
    sentences = fact_sentences(e)
    if rng.random() < 0.5:
        sentences.append(filler_sentence(rng, e, world))
    rng.shuffle(sentences)
    return " ".join(sentences)


def arithmetic_document(rng: random.Random) -> str:
    return " ".join(
        sum_sentence(rng.randint(1, MAX_APPLES), rng.randint(1, MAX_EXTRA))
        for _ in range(rng.randint(3, 5))
    )


def pretraining_documents(
    world: World, n_docs: int, seed: int = 0, arithmetic_share: float = 0.2
) -> list[str]:
    """`n_docs` documents in a fixed order: each entity's bio equally often, arithmetic mixed in."""
    rng = random.Random(f"corpus-{world.seed}-{seed}")
    docs: list[str] = []
    order: list[Entity] = []
    while len(docs) < n_docs:
        if rng.random() < arithmetic_share:
            docs.append(arithmetic_document(rng))
            continue
        if not order:
            order = list(world.entities)
            rng.shuffle(order)
        docs.append(bio_document(rng, order.pop(), world))
    return docs
