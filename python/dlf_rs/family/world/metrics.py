"""Metrics of the default family's tasks; pure functions over generated text.

Used by `tasks.Task.score` and recomputed independently by the tests. Every metric first cuts the
prediction at the few-shot separator `|` (a continuation may run on into a new shot).
"""

from __future__ import annotations

import re

SHOT_SEPARATOR = "|"
_NUMBER = re.compile(r"(?<![\w])(\d+)(?![\w])")


def first_segment(text: str) -> str:
    """The prediction up to the first shot separator, whitespace-normalised."""
    return " ".join(text.split(SHOT_SEPARATOR, 1)[0].split())


def first_sentence(text: str) -> str:
    """The first sentence including its full stop ('a b .'), whitespace-normalised."""
    seg = first_segment(text)
    head, dot, _ = seg.partition(" .")
    if not dot and seg.endswith("."):
        return seg
    return (head + dot).strip()


def sentence_exact_match(prediction: str, reference: str) -> float:
    """1.0 if the first sentence of the prediction equals the reference's first sentence."""
    return float(first_sentence(prediction) == first_sentence(reference) != "")


def hash_answer(text: str) -> str | None:
    """The number after '####' (GSM8K style), or None if there is none."""
    seg = first_segment(text)
    if "####" not in seg:
        return None
    m = _NUMBER.search(seg.split("####", 1)[1])
    return m.group(1) if m else None


def hash_exact_match(prediction: str, reference: str) -> float:
    got = hash_answer(prediction)
    return float(got is not None and got == hash_answer(reference))


def last_number(text: str) -> str | None:
    nums = _NUMBER.findall(first_segment(text))
    return nums[-1] if nums else None


def last_number_match(prediction: str, reference: str) -> float:
    """1.0 if the last number in the prediction equals the reference's last number."""
    got = last_number(prediction)
    return float(got is not None and got == last_number(reference))


def token_f1(prediction: str, reference: str) -> float:
    """Bag-of-words F1 (ROUGE-1-like) between the prediction's first segment and the reference."""
    pred = first_segment(prediction).split()
    ref = first_segment(reference).split()
    if not pred or not ref:
        return 0.0
    counts: dict[str, int] = {}
    for w in ref:
        counts[w] = counts.get(w, 0) + 1
    overlap = 0
    for w in pred:
        if counts.get(w, 0) > 0:
            overlap += 1
            counts[w] -= 1
    if overlap == 0:
        return 0.0
    p, r = overlap / len(pred), overlap / len(ref)
    return 2 * p * r / (p + r)
