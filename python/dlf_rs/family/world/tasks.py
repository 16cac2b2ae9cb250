"""Task formats of the default family: three seen tasks, one unseen task, their data splits.

Third step of the flow: each `Task` turns an entity into a prompt and a reference answer in its own
format, which the pretraining corpus never shows. Fine-tuning sets draw only tuning entities and
evaluation sets only held-out entities, so an expert learns the *format* on one half of the world
and is tested on facts only the (larger) base models' pretraining could have taught.

- math (seen, GSM8K-like): a word problem about an entity's apples; answer is a worked solution
  ending in `#### N`; metric: exact match of N.
- qa (seen, TriviaQA-like): a question about one fact; answer is the corpus sentence; metric:
  exact match of that sentence.
- summary (seen, CNN/DM-like): a passage naming the entity's city; the summary must also name the
  job, which the passage omits (knowledge); metric: token F1.
- qa_math (unseen, MMLU-like role): the math word problem asked in the qa format; no model is tuned
  on it; metric: the last number of the output equals the result.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from . import metrics
from .corpus import PLACES, WEATHERS, apples_sentence, city_sentence, job_sentence, sum_sentence
from .entities import MAX_EXTRA, Entity, World

SEP = f" {metrics.SHOT_SEPARATOR} "


@dataclass(frozen=True)
class Example:
    """One prompt/answer pair; `entity` records which entity it is about (for split checks)."""

    task: str
    prompt: str
    answer: str
    entity: str


def _qa(e: Entity, rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(3)
    if kind == 0:
        return f"question : where does {e.name} live ? answer :", city_sentence(e)
    if kind == 1:
        return f"question : what is the job of {e.name} ? answer :", job_sentence(e)
    return f"question : how many apples does {e.name} have ? answer :", apples_sentence(e)


def _math(e: Entity, rng: random.Random) -> tuple[str, str]:
    b = rng.randint(1, MAX_EXTRA)
    prompt = (
        f"problem : {e.name} has some apples . {e.name} gets {b} more apples . "
        f"how many apples does {e.name} have now ? solution :"
    )
    answer = f"{apples_sentence(e)} {sum_sentence(e.apples, b)} #### {e.apples + b}"
    return prompt, answer


def _summary(e: Entity, rng: random.Random) -> tuple[str, str]:
    sentences = [
        city_sentence(e),
        f"the weather was {rng.choice(WEATHERS)} .",
        f"{e.name} visited the {rng.choice(PLACES)} .",
    ]
    rng.shuffle(sentences)
    return f"passage : {' '.join(sentences)} summary :", f"{e.name} is a {e.job} from {e.city} ."


def _qa_math(e: Entity, rng: random.Random) -> tuple[str, str]:
    b = rng.randint(1, MAX_EXTRA)
    prompt = (
        f"question : {e.name} has some apples and gets {b} more . "
        f"how many apples does {e.name} have now ? answer :"
    )
    return prompt, f"{e.apples + b}"


@dataclass(frozen=True)
class Task:
    """A task format: how to build an example from an entity, how long answers run, the metric."""

    name: str
    seen: bool
    metric_name: str
    max_new_tokens: int
    build: Callable[[Entity, random.Random], tuple[str, str]]
    metric: Callable[[str, str], float]

    def example(self, e: Entity, rng: random.Random) -> Example:
        prompt, answer = self.build(e, rng)
        return Example(self.name, prompt, answer, e.name)

    def score(self, prediction: str, example: Example) -> float:
        return self.metric(prediction, example.answer)


TASKS: dict[str, Task] = {
    "math": Task("math", True, "exact match (#### N)", 24, _math, metrics.hash_exact_match),
    "qa": Task("qa", True, "exact match (sentence)", 8, _qa, metrics.sentence_exact_match),
    "summary": Task("summary", True, "token F1", 12, _summary, metrics.token_f1),
    "qa_math": Task("qa_math", False, "exact match (last number)", 24, _qa_math,
                    metrics.last_number_match),
}
SEEN_TASKS = tuple(n for n, t in TASKS.items() if t.seen)
UNSEEN_TASKS = tuple(n for n, t in TASKS.items() if not t.seen)


def _draw(world: World, pool: tuple[Entity, ...], task: str, n: int, tag: str) -> list[Example]:
    rng = random.Random(f"{tag}-{task}-{world.seed}")
    out: list[Example] = []
    order: list[Entity] = []
    while len(out) < n:
        if not order:  # cycle through the pool so every entity is used before any repeats
            order = list(pool)
            rng.shuffle(order)
        out.append(TASKS[task].example(order.pop(), rng))
    return out


def finetune_set(world: World, task: str, n: int) -> list[Example]:
    """Training examples for `task`, built only from the world's tuning entities."""
    return _draw(world, world.tuning, task, n, "finetune")


def eval_set(world: World, task: str, n: int) -> list[Example]:
    """Held-out evaluation examples for `task`, built only from held-out entities."""
    return _draw(world, world.held_out, task, n, "eval")


def few_shot_prompt(world: World, example: Example, k: int) -> str:
    """`k` solved examples of the same task (tuning entities only) before the example's prompt."""
    rng = random.Random(f"shots-{example.task}-{example.entity}-{world.seed}")
    shots = [TASKS[example.task].example(rng.choice(world.tuning), rng) for _ in range(k)]
    return SEP.join([f"{s.prompt} {s.answer}" for s in shots] + [example.prompt])
