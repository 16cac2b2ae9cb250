"""When a row ends, and its text: EOS ids and stop strings.

Where it sits: after the token of a step is chosen, :meth:`Stopping.record` appends it to every
live row and ends rows that produced EOS or completed a stop string; at the end of the call
:meth:`Stopping.text` decodes each row. Decisions: ``token_ids`` keep the token that completed
the stop string and the EOS token; ``texts`` are cut just before the stop string and leave EOS
out (special tokens are skipped).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["Stopping", "check_stop", "eos_ids"]


def eos_ids(tokenizer: Any, model: Any) -> set[int]:
    """EOS ids of the tokenizer and of the large model's generation config."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    cfg_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(cfg_eos, int):
        ids.add(cfg_eos)
    elif isinstance(cfg_eos, (list, tuple)):
        ids.update(int(e) for e in cfg_eos)
    return ids


def check_stop(stop: str | Sequence[str] | None) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, Sequence):
        stops = list(stop)
    else:
        raise TypeError(f"stop: expected a string or a list of strings, got {type(stop).__name__}")
    for i, s in enumerate(stops):
        if not isinstance(s, str):
            raise TypeError(f"stop[{i}]: expected a string, got {type(s).__name__}")
        if not s:
            raise ValueError(f"stop[{i}]: stop strings must be non-empty")
    return stops


class Stopping:
    """Per-call row state: tokens so far, which rows ended and why."""

    def __init__(self, batch: int, tokenizer: Any, eos: set[int], stops: list[str]) -> None:
        self.tokenizer, self.eos, self.stops = tokenizer, eos, stops
        self.tokens: list[list[int]] = [[] for _ in range(batch)]
        self.finished = np.zeros(batch, dtype=bool)
        self.reasons = ["length"] * batch
        self._live = list(range(batch))

    def live(self) -> list[int]:
        """The rows still generating (a fresh list: the caller may keep it)."""
        return list(self._live)

    def all_finished(self) -> bool:
        return not self._live

    def record(self, next_tokens: np.ndarray, live: list[int]) -> None:
        values = next_tokens.tolist()
        for b in live:
            tok = values[b]
            self.tokens[b].append(tok)
            if tok in self.eos:
                self._finish(b, "eos")
            elif self.stops:
                text = self.tokenizer.decode(self.tokens[b], skip_special_tokens=True)
                if any(s in text for s in self.stops):
                    self._finish(b, "stop")

    def end(self, b: int, reason: str = "length") -> None:
        """End a live row from outside (speculative decoding: the row reached its token limit
        inside a verified run)."""
        if not self.finished[b]:
            self._finish(b, reason)

    def _finish(self, b: int, reason: str) -> None:
        self.finished[b] = True
        self.reasons[b] = reason
        self._live.remove(b)

    def text(self, b: int) -> str:
        text = str(self.tokenizer.decode(self.tokens[b], skip_special_tokens=True))
        if self.reasons[b] == "length" and text.endswith("\ufffd"):
            text = self._whole_characters(self.tokens[b], text)
        if self.reasons[b] == "stop":
            cut = min((text.find(s) for s in self.stops if s in text), default=len(text))
            text = text[:cut]
        return text

    def _whole_characters(self, tokens: list[int], text: str) -> str:
        """``text`` without a character cut in half by ``max_new_tokens``: byte-level vocabularies
        split a multi-byte character over up to 4 tokens, and decoding the first of them gives
        U+FFFD. Drops the fewest last tokens whose removal leaves a text without it."""
        for k in range(1, min(4, len(tokens)) + 1):
            head = str(self.tokenizer.decode(tokens[:-k], skip_special_tokens=True))
            if not head.endswith("\ufffd"):
                return head if text.startswith(head) else text
        return text
