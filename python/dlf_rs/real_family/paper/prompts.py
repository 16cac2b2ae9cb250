"""The zero-shot prompts of the paper tasks and the replies the experts are trained on.

Where it sits: between the examples (:mod:`.data`) and decoding. A prompt is one user turn
with no system message: every model renders it with its own chat template (and that
template's default system prompt), as :meth:`dlf_rs.FusedGenerator.generate` does for
``messages=`` (:func:`dlf_rs.inputs.render_chat`); :func:`render` gives the same ids for one
tokenizer, to count prompt tokens or check a template.

The texts (the pilots' wording where there was one):
- GSM8K: the problem, then "Solve it step by step, then write the final answer as 'The answer
  is N.'". The expert's target is the dataset's worked answer without its ``<<48/2=24>>``
  calculator notes, its ``#### N`` line replaced by "The answer is N.".
- TriviaQA: the question, then "Answer with the name or phrase only."; target: the answer's
  ``value``.
- MMLU: the subject, the question, the choices as ``A. ...`` to ``D. ...``, then "Answer with
  only the letter (A, B, C or D) of the correct choice; do not explain."; target: the letter.
"""

from __future__ import annotations

import re
from typing import Any

from dlf_rs.inputs import render_chat

from .data import LETTERS, GsmExample, MmluExample, TriviaExample

__all__ = ["Example", "messages", "render", "target_text", "user_text"]

Example = GsmExample | TriviaExample | MmluExample

GSM8K_INSTRUCTION = "Solve it step by step, then write the final answer as 'The answer is N.'"
TRIVIA_INSTRUCTION = "Answer with the name or phrase only."
# With "Answer with the letter of the correct choice only." the 1.5B opened 28 of 100 pilot
# replies (the 0.5B 15) with "To determine ..." (cut at 8 tokens: no answer); with this
# wording 3 of 16 of those 28 still did.
MMLU_INSTRUCTION = (
    "Answer with only the letter (A, B, C or D) of the correct choice; do not explain."
)

_CALC = re.compile(r"<<[^<>]*>>")


def user_text(ex: Example) -> str:
    """The user turn of ``ex``."""
    if isinstance(ex, GsmExample):
        return f"{ex.question.strip()}\n{GSM8K_INSTRUCTION}"
    if isinstance(ex, TriviaExample):
        return f"{ex.question.strip()}\n{TRIVIA_INSTRUCTION}"
    if isinstance(ex, MmluExample):
        subject = ex.subject.replace("_", " ")
        options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(ex.choices))
        return (f"The following is a multiple choice question about {subject}.\n\n"
                f"{ex.question.strip()}\n{options}\n\n{MMLU_INSTRUCTION}")  # fmt: skip
    raise TypeError(f"ex: expected a GSM8K, TriviaQA or MMLU example, got {type(ex).__name__}")


def messages(ex: Example) -> list[dict[str, str]]:
    """The conversation every model reads (one user turn; each model's template adds the rest)."""
    return [{"role": "user", "content": user_text(ex)}]


def target_text(ex: Example) -> str:
    """The assistant reply an expert is trained to give on ``ex``."""
    if isinstance(ex, GsmExample):
        body = _CALC.sub("", ex.solution)
        body = re.sub(r"\n?####.*$", "", body.strip(), flags=re.DOTALL).rstrip()
        return f"{body}\nThe answer is {ex.answer}."
    if isinstance(ex, TriviaExample):
        return ex.value
    if isinstance(ex, MmluExample):
        return ex.letter
    raise TypeError(f"ex: expected a GSM8K, TriviaQA or MMLU example, got {type(ex).__name__}")


def render(tokenizer: Any, ex: Example) -> tuple[int, ...]:
    """The prompt ids ``tokenizer``'s chat template gives ``ex`` (with the generation prompt)."""
    ids = render_chat(tokenizer, "model", [messages(ex)])[0]
    assert isinstance(ids, tuple)
    return ids
