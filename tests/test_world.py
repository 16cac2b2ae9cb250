"""Tests of the synthetic world behind the default family (dlf_rs.family.world): determinism from seeds,
metric correctness on hand-made cases, task formats, and disjoint fine-tuning/evaluation splits."""

from __future__ import annotations

import pytest
from dlf_rs.family.world import (
    SEEN_TASKS,
    TASKS,
    UNSEEN_TASKS,
    World,
    eval_set,
    few_shot_prompt,
    finetune_set,
    hash_exact_match,
    last_number_match,
    pretraining_documents,
    sentence_exact_match,
    token_f1,
    vocabulary,
)


def test_world_is_deterministic_from_seed() -> None:
    assert World.build(3, 60) == World.build(3, 60)
    assert World.build(3, 60) != World.build(4, 60)
    a, b = World.build(0, 80), World.build(0, 80)
    assert pretraining_documents(a, 50) == pretraining_documents(b, 50)
    assert pretraining_documents(a, 50) != pretraining_documents(World.build(1, 80), 50)
    for task in TASKS:
        assert eval_set(a, task, 10) == eval_set(b, task, 10)
        assert finetune_set(a, task, 10) == finetune_set(b, task, 10)
        assert eval_set(a, task, 10) != eval_set(World.build(1, 80), task, 10)


def test_names_unique_and_splits_disjoint() -> None:
    w = World.build(0, 120)
    names = [e.name for e in w.entities]
    assert len(set(names)) == len(names) == 120
    tuning = {e.name for e in w.tuning}
    held = {e.name for e in w.held_out}
    assert not tuning & held and len(tuning) + len(held) == 120
    for task in TASKS:
        ft = finetune_set(w, task, 200)
        ev = eval_set(w, task, 50)
        assert {e.entity for e in ft} <= tuning
        assert {e.entity for e in ev} <= held
        # no held-out entity (a two-word name) is even mentioned in a fine-tuning example
        ft_text = " " + " ".join(f"{e.prompt} {e.answer}" for e in ft) + " "
        assert not [n for n in held if f" {n} " in ft_text]
        for ex in ev[:10]:  # shots come from tuning entities only
            shots = " " + few_shot_prompt(w, ex, 2).rsplit("|", 1)[0] + " "
            assert not [n for n in held if f" {n} " in shots]
            assert f" {ex.entity} " in " " + ex.prompt + " "


def test_corpus_states_held_out_facts_but_no_task_format() -> None:
    w = World.build(0, 40)
    text = " ".join(pretraining_documents(w, 400))
    e = w.held_out[0]
    assert f"{e.name} lives in {e.city} ." in text
    assert f"{e.name} has {e.apples} apples ." in text
    for keyword in ("question", "answer", "problem", "solution", "summary", "passage", "####", "|"):
        assert keyword not in text.split()


def test_task_formats() -> None:
    w = World.build(0, 40)
    e = w.held_out[0]
    math = eval_set(w, "math", 1)[0]
    assert math.prompt.startswith("problem :") and math.prompt.endswith("solution :")
    assert math.answer.split("####")[1].strip().isdigit()
    qa = eval_set(w, "qa", 30)
    assert all(x.prompt.startswith("question :") and x.prompt.endswith("answer :") for x in qa)
    ent = w.by_name()
    for x in qa:  # the answer is the corpus sentence carrying the fact
        f = ent[x.entity]
        assert x.answer in (f"{f.name} lives in {f.city} .", f"{f.name} works as a {f.job} .",
                            f"{f.name} has {f.apples} apples .")
    summ = eval_set(w, "summary", 1)[0]
    f = ent[summ.entity]
    assert summ.answer == f"{f.name} is a {f.job} from {f.city} ."
    assert f.job not in summ.prompt.split()  # the job must come from knowledge
    qm = eval_set(w, "qa_math", 1)[0]
    assert qm.prompt.startswith("question :") and qm.answer.isdigit()
    assert set(SEEN_TASKS) == {"math", "qa", "summary"} and UNSEEN_TASKS == ("qa_math",)
    vocab = set(vocabulary(w))
    assert set(e.name.split()) <= vocab and len(e.name.split()) == 2
    for x in (math, summ, qm):
        assert set(few_shot_prompt(w, x, 2).split()) <= vocab


@pytest.mark.parametrize(
    ("pred", "ref", "want"),
    [
        ("bo lives in tosk .", "bo lives in tosk .", 1.0),
        ("bo lives in tosk . bo has 3 apples .", "bo lives in tosk .", 1.0),
        ("bo lives in holm .", "bo lives in tosk .", 0.0),
        ("bo lives in tosk", "bo lives in tosk .", 0.0),
        ("", "bo lives in tosk .", 0.0),
        ("bo lives in tosk . | question : x", "bo lives in tosk .", 1.0),
    ],
)
def test_sentence_exact_match(pred: str, ref: str, want: float) -> None:
    assert sentence_exact_match(pred, ref) == want


def test_hash_and_number_metrics() -> None:
    ref = "bo has 3 apples . 3 plus 4 is 7 . #### 7"
    assert hash_exact_match("bo has 3 apples . 3 plus 4 is 7 . #### 7", ref) == 1.0
    assert hash_exact_match("#### 7", ref) == 1.0
    assert hash_exact_match("bo has 3 apples . 3 plus 4 is 7 .", ref) == 0.0  # no ####
    assert hash_exact_match("#### 17", ref) == 0.0
    assert hash_exact_match("| #### 7", ref) == 0.0  # after the shot separator
    assert last_number_match("bo has 3 apples . 3 plus 4 is 7 . #### 7", "7") == 1.0
    assert last_number_match("7 .", "7") == 1.0
    assert last_number_match("bo has 7 apples . 3", "7") == 0.0
    assert last_number_match("no number", "7") == 0.0


def test_token_f1() -> None:
    ref = "bo is a baker from tosk ."
    assert token_f1(ref, ref) == 1.0
    assert token_f1("", ref) == 0.0
    assert token_f1("xx yy", ref) == 0.0
    # 4 of 7 reference words, prediction of 5 words: p = 4/5, r = 4/7
    assert token_f1("bo is a miner .", ref) == pytest.approx(2 * 0.8 * (4 / 7) / (0.8 + 4 / 7))
