"""lm-evaluation-harness integration: the "dlf" model (:mod:`.model`), the shipped family's tasks
(``tasks/``, built by :mod:`.build_tasks`) and ``dlf-rs eval`` (:mod:`.cli`).

Importing :mod:`dlf_rs.harness.model` registers the model with the harness; ``lm_eval`` has no
discovery of models from other packages, hence the ``dlf-rs eval`` / ``python -m dlf_rs.harness``
entry point that registers it first and then runs the harness's own command line.
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "tasks"

__all__ = ["TASKS_DIR"]
