"""What a generation call reads: text prompts, chat messages or token ids, per model.

Where it sits: the first thing :meth:`FusedGenerator.generate` and :meth:`~FusedGenerator.stream`
do after building the options record; the generation loop (:mod:`dlf_rs.engines.hf.runner`) then tokenizes
what is still text. A prompt item is either a ``str`` (tokenized by the shared tokenizer with its
special tokens, as the models were trained) or a ``tuple`` of token ids (used as is: chat
templates already rendered and tokenized, or ids the caller gave).

Decisions:
- Exactly one of ``prompts``, ``messages`` and ``input_ids`` per call.
- ``messages``: every model renders the conversation with its own tokenizer's chat template and
  the generation prompt (as ``apply_chat_template(..., add_generation_prompt=True)``), so a large
  model and experts with different templates each read their own format; the vocabularies are the
  same (checked when the generator is built), so the ids mean the same to every model.
- ``input_ids``: a list of id lists, or a ``[B, L]`` tensor/array; with ``attention_mask`` the
  positions where it is 0 are dropped (left or right padding alike), as ``generate`` reads them.
- ``prompts_for`` (text per model) overrides what that model reads, whichever input was given.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Inputs", "Prompt", "build_inputs", "warn_unknown"]

Prompt = str | tuple[int, ...]


@dataclass
class Inputs:
    """One call's prompts: ``default`` for the models without their own, ``per_model`` by name
    ("large", "small", "expert:<i>")."""

    default: list[Prompt]
    per_model: dict[str, list[Prompt]] = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return len(self.default)

    def for_model(self, name: str) -> list[Prompt]:
        return self.per_model.get(name, self.default)

    def rows(self, lo: int, hi: int) -> Inputs:
        """Rows ``lo:hi`` (a ``batch_size`` slice of a long call)."""
        return Inputs(self.default[lo:hi], {k: v[lo:hi] for k, v in self.per_model.items()})


def check_prompts(prompts: object, name: str) -> list[str]:
    """Text prompts: non-empty strings with a non-space character, valid Unicode."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, Sequence):
        raise TypeError(
            f"{name}: expected a string or a list of strings, got {type(prompts).__name__}"
        )
    out = list(prompts)
    if not out:
        raise ValueError(f"{name}: the prompt list is empty")
    for i, p in enumerate(out):
        if not isinstance(p, str):
            raise TypeError(f"{name}[{i}]: expected a string, got {type(p).__name__}")
        if not p.strip():
            raise ValueError(f"{name}[{i}]: empty or whitespace-only prompt {p!r}")
        try:
            p.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ValueError(
                f"{name}[{i}]: not valid Unicode ({err.reason} at position {err.start})"
            ) from None
    return out


def _is_int(x: object) -> bool:
    return isinstance(x, (numbers.Integral, np.integer)) and not isinstance(x, bool)


def check_input_ids(input_ids: object, attention_mask: object, vocab: int) -> list[Prompt]:
    """Token-id prompts as tuples: lists of id lists, or a 2-D tensor/array with an optional
    mask of the same shape (0 = padding, dropped)."""
    if hasattr(input_ids, "detach"):  # a torch tensor (not imported here)
        input_ids = input_ids.detach().cpu().numpy()  # type: ignore[union-attr]
    if hasattr(attention_mask, "detach"):
        attention_mask = attention_mask.detach().cpu().numpy()  # type: ignore[union-attr]
    if isinstance(input_ids, np.ndarray):
        if input_ids.ndim == 1:
            input_ids = input_ids[None]
        if input_ids.ndim != 2 or input_ids.dtype.kind not in "iu":
            raise TypeError(
                f"input_ids: expected a [batch, length] integer tensor, got "
                f"{input_ids.ndim}-D {input_ids.dtype}"
            )
        rows: list[list[int]] = input_ids.tolist()
    elif isinstance(input_ids, Sequence) and not isinstance(input_ids, (str, bytes)):
        rows_in = list(input_ids)
        if rows_in and all(_is_int(t) for t in rows_in):
            rows_in = [rows_in]  # one flat list: one prompt
        rows = []
        for b, row in enumerate(rows_in):
            if isinstance(row, np.ndarray):
                row = row.tolist()
            if not isinstance(row, Sequence) or isinstance(row, (str, bytes)):
                raise TypeError(
                    f"input_ids[{b}]: expected a list of token ids, got {type(row).__name__}"
                )
            for j, t in enumerate(row):
                if not _is_int(t):
                    raise TypeError(
                        f"input_ids[{b}][{j}]: expected an int token id, got {type(t).__name__}"
                    )
            rows.append([int(t) for t in row])
    else:
        raise TypeError(
            "input_ids: expected a list of token-id lists or a [batch, length] tensor, got "
            f"{type(input_ids).__name__}"
        )
    if not rows:
        raise ValueError("input_ids: no prompts given")
    if attention_mask is not None:
        mask = np.asarray(attention_mask)
        if mask.shape != (len(rows), len(rows[0])) or any(len(r) != len(rows[0]) for r in rows):
            raise ValueError(
                f"attention_mask: expected the shape of input_ids "
                f"[{len(rows)}, {len(rows[0])}], got {list(mask.shape)}"
            )
        if not np.isin(mask, (0, 1)).all():
            raise ValueError("attention_mask: expected only 0 (padding) and 1 (token)")
        rows = [[t for t, m in zip(row, mrow) if m] for row, mrow in zip(rows, mask.tolist())]
    out: list[Prompt] = []
    for b, row in enumerate(rows):
        if not row:
            raise ValueError(f"input_ids[{b}]: no tokens (an empty row or a mask of zeros)")
        bad = next((j for j, t in enumerate(row) if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(
                f"input_ids[{b}][{bad}]: token id {row[bad]} is outside the vocabulary "
                f"[0, {vocab})"
            )
        out.append(tuple(row))
    return out


def check_messages(messages: object) -> list[list[dict[str, Any]]]:
    """Conversations: a list of conversations, each a list of {"role", "content"} dicts (one
    conversation alone is one prompt)."""
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)) or not messages:
        raise TypeError(
            "messages: expected a list of conversations, each a list of "
            '{"role": ..., "content": ...} dicts'
        )
    convs = list(messages)
    if all(isinstance(m, Mapping) for m in convs):
        convs = [convs]  # a single conversation
    out = []
    for b, conv in enumerate(convs):
        if not isinstance(conv, Sequence) or isinstance(conv, (str, bytes)) or not conv:
            raise TypeError(
                f"messages[{b}]: expected a non-empty list of message dicts, got "
                f"{type(conv).__name__}"
            )
        for j, msg in enumerate(conv):
            if not isinstance(msg, Mapping) or "role" not in msg or "content" not in msg:
                raise ValueError(
                    f"messages[{b}][{j}]: expected a dict with 'role' and 'content', got {msg!r}"
                )
        out.append([dict(m) for m in conv])
    return out


def render_chat(tokenizer: Any, name: str, convs: list[list[dict[str, Any]]]) -> list[Prompt]:
    """Each conversation through ``tokenizer``'s chat template with the generation prompt, as
    token ids (rendered, then tokenized without adding special tokens: the template holds them,
    which is what ``apply_chat_template(tokenize=True)`` does)."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"messages: the {name} model's tokenizer has no chat template "
            "(tokenizer.chat_template is None); pass text prompts, or a tokenizer with a chat "
            "template for that model"
        )
    out: list[Prompt] = []
    for conv in convs:
        text = tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        out.append(tuple(int(t) for t in ids))
    return out


def build_inputs(
    *,
    prompts: object,
    messages: object,
    input_ids: object,
    attention_mask: object,
    prompts_for: object,
    names: list[str],
    chat_tokenizers: Mapping[str, Any],
    tokenizer: Any,
    vocab: int,
) -> Inputs:
    """The checked inputs of one call. ``names``: the models taking part; ``chat_tokenizers``:
    a model's own tokenizer when it differs from the shared ``tokenizer`` (chat templates)."""
    given = [k for k, v in (("prompts", prompts), ("messages", messages),
                            ("input_ids", input_ids)) if v is not None]  # fmt: skip
    if not given:
        raise TypeError("prompts: give the prompts (text), messages (chat) or input_ids (tokens)")
    if len(given) > 1:
        raise TypeError(f"{given[1]}: give only one of prompts, messages and input_ids")
    if attention_mask is not None and input_ids is None:
        raise TypeError("attention_mask: only used with input_ids")
    per_model: dict[str, list[Prompt]] = {}
    default: list[Prompt]
    if prompts is not None:
        default = list(check_prompts(prompts, "prompts"))
    elif input_ids is not None:
        default = check_input_ids(input_ids, attention_mask, vocab)
    else:
        convs = check_messages(messages)
        default = render_chat(tokenizer, "large", convs)
        by_tok: dict[int, list[Prompt]] = {id(tokenizer): default}
        for name in names:
            tok = chat_tokenizers.get(name, tokenizer)
            if id(tok) not in by_tok:
                by_tok[id(tok)] = render_chat(tok, name, convs)
            if by_tok[id(tok)] != default:
                per_model[name] = by_tok[id(tok)]
        if "large" in per_model:  # the shared tokenizer is not the large model's own
            default = per_model.pop("large")
    batch = len(default)
    if prompts_for:
        if not isinstance(prompts_for, Mapping):
            raise TypeError(
                f"prompts_for: expected a dict of model name -> prompts, got "
                f"{type(prompts_for).__name__}"
            )
        for key, lst in prompts_for.items():
            if key not in names:
                raise ValueError(
                    f"prompts_for: unknown key {key!r}; expected one of {sorted(names)}"
                )
            items = check_prompts(lst, f"prompts_for[{key!r}]")
            if len(items) != batch:
                raise ValueError(f"prompts_for[{key!r}]: {len(items)} prompts for {batch} prompts")
            per_model[key] = list(items)
    return Inputs(default, per_model)


def warn_unknown(tokenizer: Any, ids: list[list[int]], items: list[Prompt], name: str) -> None:
    """Warn for a text prompt whose own tokens are mostly unknown to the tokenizer. Special
    tokens the tokenizer adds (``<bos>``, ...) are not the prompt's and are not counted, so a
    prompt made only of unknown words warns."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return
    special = set(getattr(tokenizer, "all_special_ids", ())) - {unk}
    for b, (row, item) in enumerate(zip(ids, items)):
        if not isinstance(item, str):
            continue  # token ids and chat templates: the caller chose the tokens
        own = [t for t in row if t not in special]
        n_unk = sum(1 for t in own if t == unk)
        if own and n_unk * 2 > len(own):
            warnings.warn(
                f"prompts[{b}]: {n_unk} of the prompt's {len(own)} tokens are unknown to the "
                f"tokenizer ({tokenizer.unk_token!r}) for the {name} model; the output will "
                "not mean much. Use the vocabulary and prompt format the models were "
                "trained on (for the shipped family: dlf_rs.family.example_prompts)",
                UserWarning,
                stacklevel=4,
            )
