"""The three paper tasks in one registry: the table column, the metric, the decoding budget
the batch size and the scorer of each, dispatched by example type.

Where it sits: what an evaluation loop (the tables' runner, the MMLU pilot) reads to decode and
score any example: ``spec = TASKS[task_of(ex)]``, decode ``prompts.messages(ex)`` greedily with
``spec.max_new_tokens`` and ``spec.stop``, then ``correct(ex, reply)``.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import scoring
from .data import GsmExample, MmluExample, TriviaExample
from .prompts import Example

__all__ = ["TASKS", "TaskSpec", "correct", "task_of"]


@dataclass(frozen=True)
class TaskSpec:
    name: str
    column: str  # the paper's column name
    metric: str
    max_new_tokens: int
    stop: tuple[str, ...]
    # examples decoded at once on CPU: GSM8K's long chains of thought go 2.1x (DLF) to 2.3x (the
    # 1.5B alone) faster per token at 32 than at 8 on this 2-core machine; TriviaQA's and MMLU's
    # replies are a few tokens, their prompts' prefill dominates, and their cached rows are at 8
    batch_size: int = 8
    # how a fused row runs its LoRA expert (FusedGenerator's lora_mode): "merged" makes the
    # expert member the very model of the "expert alone" row, and on this CPU at batch 32 it
    # decoded 12-23% faster than "mixed" (one forward over base and adapter rows); TriviaQA's
    # fused rows were decoded "mixed" before the choice existed and stay so
    lora_mode: str = "merged"
    # "generate": the reply is decoded greedily and scored; "letter": the reply is the most
    # likely of the letters A-D at the first position, under the row's fusion (MMLU: the
    # standard multiple-choice reading; the generated letter lost 26 of the 1.5B's first 192
    # held-out replies to reasoning cut at its 8-token budget, docs/paper-tables.md)
    answer: str = "generate"


TASKS = {
    # the pilots: GSM8K chain of thought in 256 tokens, TriviaQA in 16
    "gsm8k": TaskSpec("gsm8k", "GSM8K", "exact match (final number)", 256, (), batch_size=32),
    "triviaqa": TaskSpec("triviaqa", "TriviaQA", "exact match (aliases)", 16, ("\n",),
                         lora_mode="mixed"),
    "mmlu": TaskSpec("mmlu", "MMLU", "accuracy (letter of highest probability)", 1, (),
                     answer="letter"),
}


def task_of(ex: Example) -> str:
    if isinstance(ex, GsmExample):
        return "gsm8k"
    if isinstance(ex, TriviaExample):
        return "triviaqa"
    if isinstance(ex, MmluExample):
        return "mmlu"
    raise TypeError(f"ex: expected a GSM8K, TriviaQA or MMLU example, got {type(ex).__name__}")


def correct(ex: Example, reply: str) -> bool:
    """Whether ``reply`` answers ``ex`` right, by its task's scorer (:mod:`.scoring`)."""
    if isinstance(ex, GsmExample):
        return scoring.gsm8k_correct(reply, ex.answer)
    if isinstance(ex, TriviaExample):
        return scoring.trivia_correct(reply, ex.aliases + ex.normalized_aliases)
    if isinstance(ex, MmluExample):
        return scoring.mmlu_correct(reply, ex.label, ex.choices)
    raise TypeError(f"ex: expected a GSM8K, TriviaQA or MMLU example, got {type(ex).__name__}")
