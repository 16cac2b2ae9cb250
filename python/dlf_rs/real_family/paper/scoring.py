"""Scoring a model's reply on each paper task: GSM8K exact match on the final number, TriviaQA
exact match against the answer's aliases, MMLU accuracy on the chosen letter.

Where it sits: after decoding (the replies of every method), before :mod:`.stats` and
:mod:`.tables`. Pure functions of strings, tested against hand-checked replies.

Decisions:
- GSM8K. The predicted number is, in this order: the number after the last ``####``; the last
  ``\\boxed{...}``; the last "the (final) answer is ..." / "Answer: ..."; else the last number
  in the reply. Numbers may carry thousands commas, a ``$``, a trailing period, a minus (ASCII
  or U+2212) or decimals; they compare as numbers (``18.00`` equals ``18``). A minus directly
  after a letter or digit is a dash, not a sign (``3-4`` reads 3 then 4).
- TriviaQA. The prediction is the reply's first non-empty line, less a leading "Answer:". It
  and every alias are normalised as the TriviaQA evaluation script does (lower case, ``_`` and
  punctuation to spaces, the articles a/an/the dropped, whitespace collapsed); right when equal
  to one alias (the dataset's own normalised aliases count too).
- MMLU. The letter is, in this order: "answer is (X)" / "Answer: X" / ``\\boxed{X}``; a reply
  that starts with the letter alone or followed by ``.``, ``)`` or ``:`` (``B``, ``(B)``,
  ``B. Paris``); a reply whose text is one choice's. A reply starting "A good ..." is not the
  letter A. Anything else is no answer (wrong).
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Sequence
from decimal import Decimal, InvalidOperation

__all__ = [
    "extract_gsm8k_number",
    "extract_mmlu_letter",
    "gsm8k_correct",
    "mmlu_correct",
    "normalize_number",
    "normalize_trivia",
    "trivia_correct",
    "trivia_prediction",
]

# ----------------------------------------------------------------------------- GSM8K
# A number: thousands-grouped or plain digits, optional decimals; the minus only when it is not
# a dash after a word character.
_NUMBER = re.compile(r"(?<![\w.])(-?)(\d{1,3}(?:,\d{3})+(?![\d,]\d)|\d+)(\.\d+)?")
_HASHES = re.compile(r"####\s*(.*)")
_BOXED = re.compile(r"\\boxed\s*\{((?:[^{}]|\{[^{}]*\})*)\}")
# The rest of the line is captured in a lookahead, so a later cue on the same line still counts.
_ANSWER_IS = re.compile(r"(?:the\s+(?:final\s+)?answer\s+is|answer\s*:)\s*(?=([^\n]*))",
                        re.IGNORECASE)  # fmt: skip


def _clean(text: str) -> str:
    return text.replace("\u2212", "-").replace("\\$", "$").replace("$", " ").replace("\\,", ",")


def normalize_number(text: str) -> str | None:
    """``text`` as a canonical number string (``"1,234.50"`` -> ``"1234.5"``), else None."""
    raw = text.strip().replace(",", "").rstrip(".")
    try:
        value = Decimal(raw)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def _numbers(text: str) -> list[str]:
    return [sign + digits + (frac or "") for sign, digits, frac in _NUMBER.findall(_clean(text))]


def _first_number(text: str) -> str | None:
    nums = _numbers(text)
    return normalize_number(nums[0]) if nums else None


def extract_gsm8k_number(reply: str) -> str | None:
    """The reply's final answer as a canonical number string, or None (module docstring)."""
    hashes = _HASHES.findall(reply)
    if hashes and (n := _first_number(hashes[-1])) is not None:
        return n
    boxed = _BOXED.findall(reply)
    if boxed and (n := _first_number(boxed[-1])) is not None:
        return n
    stated = [m.group(1) for m in _ANSWER_IS.finditer(reply)]
    if stated and (n := _first_number(stated[-1])) is not None:
        return n
    nums = _numbers(reply)
    return normalize_number(nums[-1]) if nums else None


def gsm8k_correct(reply: str, gold: str) -> bool:
    """Exact match of the reply's final number with the gold one (as numbers)."""
    pred = extract_gsm8k_number(reply)
    return pred is not None and pred == normalize_number(gold)


# ----------------------------------------------------------------------------- TriviaQA
_PUNCT = set(string.punctuation + "\u2018\u2019\u00b4`")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_ANSWER_PREFIX = re.compile(r"^\s*(?:the\s+)?answer(?:\s+is\b\s*:?|\s*:)\s*", re.IGNORECASE)


def normalize_trivia(text: str) -> str:
    """TriviaQA's normalisation (its ``triviaqa_evaluation.py``): underscores to spaces, lower
    case, punctuation to spaces, articles dropped, whitespace collapsed."""
    text = text.replace("_", " ").lower()
    text = "".join(" " if ch in _PUNCT else ch for ch in text)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def trivia_prediction(reply: str) -> str:
    """The answer in a reply: its first non-empty line, less a leading "Answer:"."""
    line = next((ln for ln in reply.splitlines() if ln.strip()), "")
    return _ANSWER_PREFIX.sub("", line, count=1)


def trivia_correct(reply: str, aliases: Iterable[str]) -> bool:
    """Exact match, after normalisation, of the reply's answer with one of the aliases."""
    pred = normalize_trivia(trivia_prediction(reply))
    return bool(pred) and pred in {normalize_trivia(a) for a in aliases}


# ----------------------------------------------------------------------------- MMLU
# The cue is case-blind, the letter is not ("the answer is a ..." picks nothing).
_STATED_LETTER = re.compile(
    r"(?i:answer\s+is|answer\s*:|\\boxed\s*\{)[\s:*]*(?i:option\s+|choice\s+)?\(?\s*([ABCD])\b"
)
_LEADING_LETTER = re.compile(r"^\s*(?:\*\*)?\(?([ABCD])(?:\*\*)?(?:[).:\]]|\s*$|[ \t]*\n)")


def extract_mmlu_letter(reply: str, choices: Sequence[str] = ()) -> str | None:
    """The letter (A-D) a reply picks, or None (module docstring)."""
    stated = _STATED_LETTER.findall(reply)
    if stated:
        return str(stated[-1])
    m = _LEADING_LETTER.match(reply)
    if m:
        return m.group(1)
    said = normalize_trivia(reply)
    for i, choice in enumerate(choices):
        if said and said == normalize_trivia(choice):
            return "ABCD"[i]
    return None


def mmlu_correct(reply: str, label: int, choices: Sequence[str] = ()) -> bool:
    return extract_mmlu_letter(reply, choices) == "ABCD"[label]
