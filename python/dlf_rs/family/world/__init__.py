"""The synthetic world behind dlf_rs's shipped default family of tiny models.

Flow: `World.build(seed)` (entities and facts) -> `pretraining_documents` (prose corpus for the
bases) -> `TASKS` with `finetune_set` / `eval_set` (task formats on disjoint entity halves) ->
`build_tokenizer` (shared word-level tokenizer). `dlf_rs.family.train` trains the family from
these; `dlf_rs.family.demo` evaluates fused decoding on the evaluation sets.
"""

from .corpus import pretraining_documents
from .entities import CITIES, JOBS, Entity, World
from .metrics import hash_exact_match, last_number_match, sentence_exact_match, token_f1
from .tasks import (
    SEEN_TASKS,
    TASKS,
    UNSEEN_TASKS,
    Example,
    Task,
    eval_set,
    few_shot_prompt,
    finetune_set,
)
from .tokenizer import build_tokenizer, vocabulary

__all__ = [
    "CITIES", "JOBS", "SEEN_TASKS", "TASKS", "UNSEEN_TASKS", "Entity", "Example", "Task", "World",
    "build_tokenizer", "eval_set", "few_shot_prompt", "finetune_set", "hash_exact_match",
    "last_number_match", "pretraining_documents", "sentence_exact_match", "token_f1", "vocabulary",
]
