"""The shipped default family and its tools, beside the library (the library never imports them).

- ``checkpoints/``: the trained family (float16 safetensors, one word-level tokenizer): a small
  base, one small expert per seen task (math, qa, summary), a large base, large fine-tuned
  references and a large multi-task model;
- :mod:`dlf_rs.family.world`: the synthetic world, its task formats and metrics;
- :mod:`dlf_rs.family.train`: the script that trained the checkpoints;
- :mod:`dlf_rs.family.demo` and :mod:`dlf_rs.family.plots`: ``dlf-rs demo``.

Prompt format of the shipped family (word-level vocabulary of the world: entity names, cities,
jobs, numbers 0-99 and a few function words; anything else is ``[UNK]``): the task formats of
:mod:`dlf_rs.family.world.tasks`, for example ``question : where does <name> live ? answer :``.
:func:`example_prompts` gives real held-out prompts per task.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["CHECKPOINTS", "EXPERTS", "checkpoint", "example_prompts"]

CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"
#: Seen task -> the small expert fine-tuned on it.
EXPERTS = {"math": "small_expert_math", "qa": "small_expert_qa", "summary": "small_expert_summary"}


def checkpoint(name: str) -> Path:
    """Directory of one shipped checkpoint ("large_base", "small_base", "small_expert_qa", ...)."""
    path = CHECKPOINTS / name
    if not (path / "config.json").is_file():
        names = sorted(p.name for p in CHECKPOINTS.iterdir() if (p / "config.json").is_file())
        raise ValueError(f"family: no shipped checkpoint {name!r}; expected one of {names}")
    return path


def example_prompts(task: str, n: int = 3) -> list[str]:
    """``n`` held-out prompts of ``task`` in the family's format (as the demo evaluates them)."""
    import json

    from .world import TASKS, World, eval_set

    if task not in TASKS:
        raise ValueError(f"task: expected one of {sorted(TASKS)}, got {task!r}")
    cfg = json.loads((CHECKPOINTS / "manifest.json").read_text())["config"]
    world = World.build(cfg["world_seed"], cfg["n_entities"], cfg["name_pool"], cfg["name_pool"])
    return [e.prompt for e in eval_set(world, task, n)]
