"""Text and tokens as they are decided: :class:`GenerationStream` and its :class:`StreamChunk`.

Where it sits: every engine's ``stream`` returns a stream over the same decoding loops that its
``generate`` drains (:mod:`dlf_rs.engines.hf.generate` and :mod:`dlf_rs.engines.hf.speculative`,
:mod:`dlf_rs.engines.llamacpp.generate` and :mod:`dlf_rs.engines.llamacpp.speculative`); the loops yield their :class:`~dlf_rs.stopping.Stopping`
state after every step (speculative: every round, several tokens at once) and this module turns
what changed into chunks.

Decisions:
- A chunk carries a row's new token ids and new text since its previous chunk; a row's last
  chunk has its ``finish_reason``. Joined, a row's chunks give exactly ``generate``'s
  ``token_ids`` and ``texts``.
- Text is held back where a later token could still change it, as Hugging Face's
  ``TextStreamer`` does: a trailing partial word and the whitespace before it (tokenizers merge
  subwords and clean up spaces before punctuation), a trailing U+FFFD (a multi-byte character
  cut between tokens) and a trailing prefix of a stop string (the stop string is cut from the
  text). The row's last chunk releases the rest.
- Several batches (``batch_size``) run one after the other; ``row`` is the index in the whole
  input. ``GenerationStream.result`` holds the whole :class:`GenerationResult` once the stream is
  exhausted.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from .results import GenerationResult
from .stopping import Stopping

__all__ = ["DecodeLoop", "GenerationStream", "StreamChunk", "drain"]

# One batch's decoding loop: yields its row state after each step, returns the batch's result.
DecodeLoop = Generator[Stopping, None, GenerationResult]


@dataclass(frozen=True)
class StreamChunk:
    """What one row gained since its previous chunk."""

    row: int  # index of the prompt in the call's input
    text: str  # new text ("" while held back, see the module docs)
    token_ids: list[int] = field(default_factory=list)  # new token ids
    finish_reason: str | None = None  # "eos", "stop" or "length" on the row's last chunk


def _progress(total: int, show: bool) -> Any:
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="prompt", desc="generate")


def drain(loops: Sequence[Callable[[], DecodeLoop]], sizes: Sequence[int],
          show_progress: bool) -> GenerationResult:  # fmt: skip
    """Run every batch's loop to its end (``generate``): no text is decoded along the way."""
    results = []
    bar = _progress(sum(sizes), show_progress)
    try:
        for make, size in zip(loops, sizes):
            loop = make()
            while True:
                try:
                    next(loop)
                except StopIteration as stop:
                    results.append(stop.value)
                    break
            if bar is not None:
                bar.update(size)
    finally:
        if bar is not None:
            bar.close()
    return GenerationResult.concat(results)


class _RowText:
    """Per-row bookkeeping of what was sent, and the text that is safe to send."""

    def __init__(self, rows: Stopping) -> None:
        self.rows = rows
        n = len(rows.tokens)
        self.sent_ids = [0] * n
        self.sent_text = [""] * n
        self.done = [False] * n

    def stable(self, b: int) -> str:
        rows = self.rows
        text = str(rows.tokenizer.decode(rows.tokens[b], skip_special_tokens=True))
        cut = len(text.rstrip("\ufffd"))
        for s in rows.stops:
            for k in range(min(len(s) - 1, cut), 0, -1):
                if text[cut - k : cut] == s[:k]:
                    cut -= k
                    break
        while cut > 0 and text[cut - 1].isalnum() and ord(text[cut - 1]) < 0x2E80:
            cut -= 1  # a partial word (CJK characters are words of their own)
        while cut > 0 and text[cut - 1].isspace():
            cut -= 1
        return text[:cut]

    def chunks(self, offset: int, final: bool) -> list[StreamChunk]:
        rows, out = self.rows, []
        for b, toks in enumerate(rows.tokens):
            if self.done[b]:
                continue
            ended = final or bool(rows.finished[b])
            if len(toks) == self.sent_ids[b] and not ended:
                continue
            new_ids = toks[self.sent_ids[b] :]
            self.sent_ids[b] = len(toks)
            sent = self.sent_text[b]
            reason = None
            if ended:
                text = rows.text(b)
                reason = rows.reasons[b]
                self.done[b] = True
            else:
                text = self.stable(b)
            delta = text[len(sent) :] if text.startswith(sent) else ""
            self.sent_text[b] = sent + delta
            out.append(StreamChunk(offset + b, delta, list(new_ids), reason))
        return out


class GenerationStream(Iterator[StreamChunk]):
    """An iterator of :class:`StreamChunk` over one call; ``result`` is the call's
    :class:`GenerationResult` once every chunk was read (None before)."""

    def __init__(self, loops: Sequence[Callable[[], DecodeLoop]], sizes: Sequence[int],
                 show_progress: bool) -> None:  # fmt: skip
        self.result: GenerationResult | None = None
        self._it: Generator[StreamChunk, None, None] = self._chunks(
            list(loops), list(sizes), show_progress
        )

    def __iter__(self) -> GenerationStream:
        return self

    def __next__(self) -> StreamChunk:
        return next(self._it)

    def close(self) -> None:
        """Stop decoding early (also done when the stream is garbage-collected)."""
        self._it.close()

    def _chunks(self, loops: list[Callable[[], DecodeLoop]], sizes: list[int],
                show_progress: bool) -> Generator[StreamChunk, None, None]:  # fmt: skip
        results = []
        bar = _progress(sum(sizes), show_progress)
        offset = 0
        try:
            for make, size in zip(loops, sizes):
                loop = make()
                text: _RowText | None = None
                while True:
                    try:
                        rows = next(loop)
                    except StopIteration as stop:
                        results.append(stop.value)
                        break
                    if text is None:
                        text = _RowText(rows)
                    yield from text.chunks(offset, final=False)
                if text is not None:
                    yield from text.chunks(offset, final=True)
                offset += size
                if bar is not None:
                    bar.update(size)
        finally:
            if bar is not None:
                bar.close()
        self.result = GenerationResult.concat(results)
