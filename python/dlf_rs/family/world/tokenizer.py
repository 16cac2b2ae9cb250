"""The shared word-level tokenizer of the default family (one token per word of the world).

Built from the closed vocabulary of a `World` (names, cities, jobs, numbers, template words), so
every model of the family shares it exactly. Saved next to every checkpoint as a
`PreTrainedTokenizerFast` with bos/eos/pad/unk.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from .corpus import pretraining_documents
from .entities import CITIES, JOBS, MAX_NUMBER, World
from .tasks import TASKS, few_shot_prompt

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")


def vocabulary(world: World) -> list[str]:
    """Specials first, then every word the world's corpus and task formats can produce, sorted."""
    words: set[str] = {w for e in world.entities for w in e.name.split()} | set(CITIES) | set(JOBS)
    words |= {str(i) for i in range(MAX_NUMBER + 1)}
    for doc in pretraining_documents(world, 400, seed=12345):
        words.update(doc.split())
    rng = random.Random(0)
    for task in TASKS.values():
        for _ in range(20):
            ex = task.example(rng.choice(world.entities), rng)
            words.update(few_shot_prompt(world, ex, 1).split())
            words.update(ex.answer.split())
    return list(SPECIALS) + sorted(words)


def build_tokenizer(world: World) -> Any:
    """A `PreTrainedTokenizerFast` over `vocabulary(world)` that splits on whitespace."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary(world))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # Every encoded text starts with <bos>, in training and in generation alike.
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    # No decoder: tokenizers then joins words with single spaces, which is this world's text form.
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
    )


def save_tokenizer(tokenizer: Any, path: str | Path) -> None:
    tokenizer.save_pretrained(str(path))
