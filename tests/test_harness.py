"""The lm-evaluation-harness model "dlf" (dlf_rs.harness) on the shipped family's local tasks,
offline: generation scores equal `dlf-rs demo`'s own decoding and scoring of the same examples,
multiple-choice accuracy equals an independent argmax over fused score sums, and a two-process
data-parallel run gives the metrics of one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
lm_eval = pytest.importorskip("lm_eval")

from dlf_rs.engines.hf import scoring
from dlf_rs.harness import TASKS_DIR, build_tasks
from dlf_rs.harness._family import DEFAULT_FAMILY, demo, world
from dlf_rs.harness.model import DLFLM, parse_alpha, parse_alpha_range, resolve_family
from lm_eval.tasks import TaskManager

pytestmark = pytest.mark.skipif(
    not (DEFAULT_FAMILY / "manifest.json").exists(), reason="default family not shipped"
)
N = 6  # examples per task: CI-sized
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module", autouse=True)
def offline():
    saved = {k: os.environ.get(k) for k in OFFLINE}
    os.environ.update(OFFLINE)
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def family():
    import torch

    torch.set_num_threads(1)
    return demo.Family(DEFAULT_FAMILY)


@pytest.fixture(scope="module")
def tasks() -> TaskManager:
    return TaskManager(include_path=str(TASKS_DIR))


def _evaluate(lm, task_names: list[str], tasks: TaskManager) -> dict:
    return lm_eval.simple_evaluate(
        model=lm, tasks=task_names, task_manager=tasks, limit=N, log_samples=True,
        bootstrap_iters=0,
    )  # fmt: skip


def test_committed_tasks_are_a_fresh_build() -> None:
    files = build_tasks.build(DEFAULT_FAMILY)
    assert len([f for f in files if f.endswith(".yaml")]) == 10
    for rel, text in files.items():
        assert (TASKS_DIR / rel).read_text() == text, f"{rel}: run python -m {build_tasks.__name__}"


def test_mc_choices_are_the_reference_and_distinct_distractors(family) -> None:
    recs = build_tasks.mc_records(family.world, 20)
    exs = world.eval_set(family.world, "qa", 20)
    labels = set()
    for rec, ex in zip(recs, exs):
        assert rec["prompt"] == ex.prompt
        assert rec["choices"][rec["label"]] == ex.answer
        assert len(set(rec["choices"])) == build_tasks.MC_CHOICES
        labels.add(rec["label"])
    assert len(labels) > 1  # the answer is not always in the same place


@pytest.mark.parametrize(("task", "shots"), [("math", 0), ("qa", 0), ("summary", 0), ("qa", 2)])
def test_generation_scores_equal_the_demo(family, tasks, task, shots) -> None:
    expert = f"small_expert_{task}"
    lm = DLFLM(generator=family.generator([expert]), batch_size=64)
    name = f"dlf_{task}" + (f"_{shots}shot" if shots else "")
    res = _evaluate(lm, [name], tasks)
    samples = sorted(res["samples"][name], key=lambda s: s["doc_id"])

    # The demo's own path: its examples, prompts, fused decoding and the task's metric.
    exs = world.eval_set(family.world, task, N)
    prompts = [world.few_shot_prompt(family.world, e, shots) if shots else e.prompt for e in exs]
    run = demo.Run("DLF, own expert", task, "dlf", experts=[expert], shots=shots)
    preds, _ = demo.fused(family, run, prompts, world.TASKS[task].max_new_tokens, "grid")
    demo_scores = [world.TASKS[task].score(p, e) for p, e in zip(preds, exs)]

    assert [s["arguments"][0][0] for s in samples] == prompts
    got = [s["resps"][0][0] for s in samples]
    assert [world.metrics.first_segment(g) for g in got] == [
        world.metrics.first_segment(p) for p in preds
    ]
    assert [s["score"] for s in samples] == demo_scores
    assert res["results"][name]["score,none"] == pytest.approx(np.mean(demo_scores), abs=1e-12)


def test_multiple_choice_accuracy_is_the_argmax_of_score_sums(family, tasks) -> None:
    gen = family.generator(["small_expert_qa"])
    lm = DLFLM(generator=gen, batch_size=7)  # batches that cut across documents
    res = _evaluate(lm, ["dlf_qa_mc"], tasks)
    samples = sorted(res["samples"]["dlf_qa_mc"], key=lambda s: s["doc_id"])
    recs = build_tasks.mc_records(family.world, N)
    correct = []
    for rec, s in zip(recs, samples):
        k = len(rec["choices"])
        scored = scoring.score(gen, [rec["prompt"]] * k, [" " + c for c in rec["choices"]])
        sums = np.array([r.total for r in scored])
        # Other batch neighbours and padding move float32 logits in the last bits only.
        np.testing.assert_allclose([r[0][0] for r in s["resps"]], sums, atol=1e-4)
        correct.append(float(np.argmax(sums) == rec["label"]))
    assert res["results"]["dlf_qa_mc"]["acc,none"] == pytest.approx(np.mean(correct), abs=1e-12)


def test_model_args_string(family) -> None:
    lm = DLFLM.create_from_arg_string(
        "family=default,experts=qa;math,method=static,alpha=0.5;1.5,alpha_range=0:1.5,"
        "batch_size=4,device=cpu",
        {"batch_size": 1, "device": "cuda:0", "max_batch_size": None},
    )
    assert lm.batch_size == 4 and str(lm.device) == "cpu"
    assert lm.gen.expert_names == ["small_expert_qa", "small_expert_math"]
    assert lm.options.alpha == (0.5, 1.5) and lm.options.alpha_range == (0.0, 1.5)
    assert lm.max_length == 256
    assert parse_alpha("1") == 1.0 and parse_alpha(None) is None
    assert parse_alpha_range("-1:2") == (-1.0, 2.0)
    with pytest.raises(ValueError, match="alpha_range"):
        parse_alpha_range("0-2")
    with pytest.raises(FileNotFoundError, match="experts"):
        resolve_family("default", None, None, ["nope"])
    with pytest.raises(ValueError, match="^alpha: method=.static. needs"):
        DLFLM(generator=family.generator(["small_expert_qa"]), method="static")
    one = DLFLM(generator=family.generator(["small_expert_qa"]), method="expert", expert="qa")
    assert one.expert == 0
    # lora_mode reaches the loader (how LoRA experts run: the paper runner's commands set it)
    with pytest.raises(ValueError, match="^lora_mode: expected one of"):
        DLFLM.create_from_arg_string("family=default,lora_mode=fused")


def test_two_processes_give_the_metrics_of_one(family, tasks, tmp_path: Path) -> None:
    names = ["dlf_qa", "dlf_qa_mc"]
    single = _evaluate(DLFLM(generator=family.generator(["small_expert_qa"]), batch_size=64),
                       names, tasks)["results"]
    env = {**os.environ, **OFFLINE, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "python"),
                                          os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "dlf_rs.harness", "--model", "dlf",
           "--model_args", "family=default,experts=qa,device=cpu,threads=1,batch_size=64",
           "--tasks", ",".join(names), "--limit", str(N), "--output_path", str(tmp_path)]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "on rank 1" in proc.stderr  # the documents really were split over two ranks
    (path,) = tmp_path.rglob("results_*.json")
    multi = json.loads(path.read_text())["results"]
    for name, metric in (("dlf_qa", "score,none"), ("dlf_qa_mc", "acc,none")):
        assert multi[name]["sample_len"] == single[name]["sample_len"] == N
        assert multi[name][metric] == pytest.approx(single[name][metric], abs=1e-12)
