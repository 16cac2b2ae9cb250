"""Dataset loader and metrics of the shipped family's harness tasks (referenced by the YAMLs).

The data are the JSONL files next to this module (written by ``dlf_rs.harness.build_tasks``),
loaded without the network; each metric is the family task's own (``dlf_rs.world``), the one
``dlf-rs demo`` scores with.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dlf_rs.harness._family import world

DATA = Path(__file__).resolve().parent / "data"


def load(name: str, **_: Any) -> Any:
    """The task's examples as a DatasetDict with one "test" split (the harness calls this with
    the YAML's dataset_kwargs and its metadata, which are not needed here)."""
    import datasets

    path = DATA / f"{name}.jsonl"
    with path.open(encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def _score(task: str, doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    return {"score": world.TASKS[task].metric(results[0], doc["answer"])}


def process_math(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    return _score("math", doc, results)


def process_qa(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    return _score("qa", doc, results)


def process_summary(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    return _score("summary", doc, results)


def process_qa_math(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    return _score("qa_math", doc, results)
