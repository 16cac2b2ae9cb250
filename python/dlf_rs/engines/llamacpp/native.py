"""The thin layer over llama.cpp's C API (through ``llama_cpp``'s ctypes bindings).

What the engine needs from llama.cpp and nothing more: a model loaded straight from its GGUF file
(:class:`GgufModel`: vocabulary, tokenizer, chat template), a LoRA adapter GGUF over a model
(:class:`GgufLora`), and a context (:class:`Context`) that evaluates several sequences in one
``llama_decode`` batch (one KV sequence id per row, removed when the row ends) and hands back
the rows' last-position logits as a numpy view of llama.cpp's own logits buffer (no copy).

Decisions:
- Paths are checked before llama.cpp sees them (a missing file, a file that is not a GGUF, a
  LoRA adapter given as a model and the other way round), so an error names the argument instead
  of llama.cpp's log; llama.cpp's own failures (a NULL model or context, a decode error) become a
  :class:`LlamaCppError` that says which member and what was asked.
- llama.cpp's log goes to Python's ``logging`` (logger ``dlf_rs.llamacpp``): errors as errors,
  the rest at DEBUG, so loading three models does not print several hundred lines.
- A context holds ``n_seq`` sequences, in one KV cache shared by them (``unified=True``, one row)
  or in one cache per sequence of ``n_ctx / n_seq`` cells each (``unified=False``, what every
  batch of several rows uses: with a shared cache llama.cpp gave a batch's rows logits 0.7-1.4
  away from decoding them alone; docs/llamacpp.md "Batches").
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Context", "GgufLora", "GgufModel", "LlamaCppError", "gguf_kind", "llama_cpp"]

log = logging.getLogger("dlf_rs.llamacpp")

GGUF_MAGIC = b"GGUF"


class LlamaCppError(RuntimeError):
    """llama.cpp refused or failed (a model that does not load, a context it cannot allocate, a
    batch it cannot decode); the message names the member and what was asked."""


def llama_cpp() -> Any:
    """The ``llama_cpp`` bindings, with llama.cpp's log routed to :data:`log` (once)."""
    try:
        import llama_cpp as lib
    except ModuleNotFoundError as err:
        if err.name != "llama_cpp":
            raise
        raise ImportError(
            "the llama.cpp engine needs llama-cpp-python, which is not installed: "
            'pip install "dlf_rs[llamacpp]" (it compiles llama.cpp; docs/llamacpp.md has the '
            "build flags that work on CPUs without AVX-512)",
            name="llama_cpp",
        ) from err
    global _LOG_CALLBACK
    if _LOG_CALLBACK is None:
        _LOG_CALLBACK = lib.llama_log_callback(_forward_log)  # kept alive: llama.cpp holds it
        lib.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))
        lib.llama_backend_init()
    return lib


_LOG_CALLBACK: Any = None
_GGML_LOG_LEVEL_ERROR = 4


def _forward_log(level: int, text: bytes, _user: Any) -> None:
    try:
        msg = text.decode("utf-8", "replace").rstrip()
    except Exception:  # noqa: BLE001 - a log callback must never raise into C
        return
    if msg:
        log.log(logging.ERROR if level == _GGML_LOG_LEVEL_ERROR else logging.DEBUG, msg)


def gguf_kind(path: str | os.PathLike[str], arg: str) -> str:
    """"model" or "adapter" (``general.type`` of the GGUF header), after checking that ``path``
    is a readable GGUF file; errors name ``arg``."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{arg}: {str(path)!r} does not exist")
    if not p.is_file():
        raise ValueError(f"{arg}: {str(path)!r} is not a file (expected a .gguf file)")
    with open(p, "rb") as f:
        head = f.read(4)
    if head != GGUF_MAGIC:
        raise ValueError(
            f"{arg}: {str(path)!r} is not a GGUF file (it starts with {head!r}, not {GGUF_MAGIC!r});"
            " the llama.cpp engine reads GGUF files only (FusedGenerator reads Hugging Face "
            "checkpoints)"
        )
    return "adapter" if _general_type(p) == "adapter" else "model"


def _general_type(path: Path) -> str | None:
    """``general.type`` from a GGUF header (v2/v3), read without loading the tensors."""
    import struct

    scalar = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    with open(path, "rb") as f:
        _magic, _version, _n_tensors, n_kv = struct.unpack("<4sIQQ", f.read(24))

        def string() -> bytes:
            (n,) = struct.unpack("<Q", f.read(8))
            return f.read(n)

        def skip(vtype: int) -> None:
            if vtype in scalar:
                f.seek(scalar[vtype], 1)
            elif vtype == 8:
                string()
            elif vtype == 9:
                (etype,) = struct.unpack("<I", f.read(4))
                (count,) = struct.unpack("<Q", f.read(8))
                if etype in scalar:
                    f.seek(scalar[etype] * count, 1)
                else:
                    for _ in range(count):
                        skip(etype)
            else:
                raise ValueError(f"unknown GGUF value type {vtype}")

        for _ in range(min(n_kv, 1 << 16)):
            key = string()
            (vtype,) = struct.unpack("<I", f.read(4))
            if key == b"general.type" and vtype == 8:
                return string().decode("utf-8", "replace")
            skip(vtype)
    return None


class GgufModel:
    """One GGUF model file loaded by llama.cpp (weights memory-mapped, as llama.cpp does)."""

    def __init__(self, path: str | os.PathLike[str], arg: str, *, n_gpu_layers: int = 0) -> None:
        if gguf_kind(path, arg) == "adapter":
            raise ValueError(
                f"{arg}: {str(path)!r} is a LoRA adapter GGUF, not a model; pass it as an "
                "expert (it is applied over the small model)"
            )
        lib = llama_cpp()
        self.lib, self.arg, self.path = lib, arg, str(path)
        self.n_gpu_layers = n_gpu_layers
        params = lib.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        self.ptr = lib.llama_model_load_from_file(os.fsencode(path), params)
        if not self.ptr:
            raise LlamaCppError(
                f"{arg}: llama.cpp could not load {str(path)!r} (an architecture this llama.cpp "
                "build does not know, or a truncated file; its log is on the 'dlf_rs.llamacpp' "
                "logger)"
            )
        self.vocab = lib.llama_model_get_vocab(self.ptr)
        self.n_vocab = int(lib.llama_vocab_n_tokens(self.vocab))
        self.n_ctx_train = int(lib.llama_model_n_ctx_train(self.ptr))
        self.n_params = int(lib.llama_model_n_params(self.ptr))
        self._texts: list[bytes] | None = None

    def __repr__(self) -> str:
        return f"GgufModel({os.path.basename(self.path)!r}, vocab={self.n_vocab})"

    def meta(self, key: str) -> str | None:
        """A metadata value of the GGUF header as a string, or None."""
        buf = ctypes.create_string_buffer(1 << 16)
        n = self.lib.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        return None if n < 0 else buf.value.decode("utf-8", "replace")

    def token_texts(self) -> list[bytes]:
        """Every token's text (the vocabulary, for comparing members)."""
        if self._texts is None:
            get = self.lib.llama_vocab_get_text
            self._texts = [get(self.vocab, i) or b"" for i in range(self.n_vocab)]
        return self._texts

    def eog_ids(self) -> set[int]:
        """The end-of-generation tokens (EOS, EOT, ...) as llama.cpp marks them."""
        is_eog = self.lib.llama_vocab_is_eog
        return {i for i in range(self.n_vocab) if is_eog(self.vocab, i)}

    def special_id(self, which: str) -> int | None:
        """llama.cpp's ``bos``/``eos``/``pad`` token id, or None where the vocabulary has none."""
        tok = int(getattr(self.lib, f"llama_vocab_{which}")(self.vocab))
        return tok if 0 <= tok < self.n_vocab else None

    def token_text(self, token: int | None) -> str:
        if token is None:
            return ""
        return self.token_texts()[token].decode("utf-8", "replace")

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 16
        buf = (self.lib.llama_token * cap)()
        n = self.lib.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special,
                                    parse_special)  # fmt: skip
        if n < 0:  # the buffer was too small: -n tokens are needed
            cap = -n
            buf = (self.lib.llama_token * cap)()
            n = self.lib.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special,
                                        parse_special)  # fmt: skip
        if n < 0:
            raise LlamaCppError(f"{self.arg}: llama.cpp could not tokenize a prompt ({n})")
        return list(buf[:n])

    def detokenize(self, tokens: Sequence[int], skip_special: bool = True) -> str:
        if not tokens:
            return ""
        arr = (self.lib.llama_token * len(tokens))(*tokens)
        cap = 8 * len(tokens) + 16
        for _ in range(2):
            buf = ctypes.create_string_buffer(cap)
            n = self.lib.llama_detokenize(self.vocab, arr, len(tokens), buf, cap, skip_special,
                                          not skip_special)  # fmt: skip
            if n >= 0:
                return buf.raw[:n].decode("utf-8", "replace")
            cap = -n
        raise LlamaCppError(f"{self.arg}: llama.cpp could not detokenize {len(tokens)} tokens")

    def chat_template(self) -> str | None:
        raw = self.lib.llama_model_chat_template(self.ptr, None)
        return raw.decode("utf-8", "replace") if raw else None

    def close(self) -> None:
        if getattr(self, "ptr", None):
            self.lib.llama_model_free(self.ptr)
            self.ptr = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown: the library may be gone
            self.close()


class GgufLora:
    """A LoRA adapter GGUF loaded over ``base`` (llama.cpp checks that its tensors fit)."""

    def __init__(self, path: str | os.PathLike[str], base: GgufModel, arg: str) -> None:
        if gguf_kind(path, arg) != "adapter":
            raise ValueError(f"{arg}: {str(path)!r} is a model GGUF, not a LoRA adapter")
        self.lib, self.arg, self.path, self.base = base.lib, arg, str(path), base
        self.ptr = self.lib.llama_adapter_lora_init(base.ptr, os.fsencode(path))
        if not self.ptr:
            raise LlamaCppError(
                f"{arg}: llama.cpp could not apply the LoRA adapter {str(path)!r} to the small "
                f"model {base.path!r} (its tensors do not match that model; the log is on the "
                "'dlf_rs.llamacpp' logger)"
            )

    def close(self) -> None:
        # llama.cpp frees adapters with their model; an explicit free before that is allowed.
        if getattr(self, "ptr", None) and getattr(self.base, "ptr", None):
            self.lib.llama_adapter_lora_free(self.ptr)
        self.ptr = None


class Context:
    """A llama.cpp context over one model: ``n_seq`` sequences sharing ``n_ctx`` KV cells."""

    def __init__(self, model: GgufModel, name: str, *, n_ctx: int, n_seq: int, n_threads: int,
                 n_batch: int = 512, lora: GgufLora | None = None, lora_scale: float = 1.0,
                 flash_attn: bool = True, unified: bool = True) -> None:  # fmt: skip
        lib = model.lib
        self.lib, self.model, self.name = lib, model, name
        self.n_ctx, self.n_seq, self.n_batch, self.unified = n_ctx, n_seq, n_batch, unified
        params = lib.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = n_batch
        params.n_seq_max = n_seq
        params.n_threads = params.n_threads_batch = n_threads
        self.n_threads = n_threads
        params.kv_unified = unified
        params.flash_attn_type = 1 if flash_attn else 0  # llama.cpp: -1, "auto" (on, on a CPU)
        params.no_perf = True
        self.ptr = lib.llama_init_from_model(model.ptr, params)
        if not self.ptr:
            raise LlamaCppError(
                f"{name}: llama.cpp could not create a context of {n_ctx} KV cells for {n_seq} "
                "sequences (out of memory? lower batch_size or max_new_tokens)"
            )
        self.lora = lora
        if lora is not None:
            adapters = (lib.llama_adapter_lora_p_ctypes * 1)(lora.ptr)
            scales = (ctypes.c_float * 1)(lora_scale)
            if lib.llama_set_adapters_lora(self.ptr, adapters, 1, scales) != 0:
                raise LlamaCppError(f"{name}: llama.cpp refused the LoRA adapter {lora.path!r}")
        self.mem = lib.llama_get_memory(self.ptr)
        self.batch = lib.llama_batch_init(n_batch, 0, 1)
        b = self.batch
        self._token = np.ctypeslib.as_array(b.token, shape=(n_batch,))
        self._pos = np.ctypeslib.as_array(b.pos, shape=(n_batch,))
        self._n_seq_id = np.ctypeslib.as_array(b.n_seq_id, shape=(n_batch,))
        self._logits = np.ctypeslib.as_array(b.logits, shape=(n_batch,))
        self._n_seq_id[:] = 1
        self._seq_slot = [b.seq_id[i] for i in range(n_batch)]

    def fits(self, n_ctx: int, n_seq: int, unified: bool = True) -> bool:
        if self.unified != unified:
            return False
        if unified:
            return self.n_ctx >= n_ctx and self.n_seq >= n_seq
        return self.n_seq == n_seq and self.n_ctx >= n_ctx  # n_ctx / n_seq cells per sequence

    def set_threads(self, n_threads: int) -> None:
        """The CPU threads of this context's next decodes (:mod:`.lanes`)."""
        if n_threads != self.n_threads:
            self.lib.llama_set_n_threads(self.ptr, n_threads, n_threads)
            self.n_threads = n_threads

    def clear(self) -> None:
        """Forget every sequence (the start of a call)."""
        self.lib.llama_memory_clear(self.mem, True)

    def remove(self, seq: int) -> None:
        """Free a finished row's KV cells."""
        self.lib.llama_memory_seq_rm(self.mem, seq, -1, -1)

    def truncate(self, seq: int, length: int) -> None:
        """Drop sequence ``seq``'s positions from ``length`` on (speculative DLF's rejected
        drafts); its next token goes at position ``length``."""
        if not self.lib.llama_memory_seq_rm(self.mem, seq, length, -1):
            raise LlamaCppError(f"{self.name}: llama.cpp could not remove positions {length}.. of "
                                f"sequence {seq} from its KV cache")  # fmt: skip

    def decode_all(self, seqs: Sequence[int], tokens: Sequence[Sequence[int]],
                   starts: Sequence[int]) -> np.ndarray:  # fmt: skip
        """Evaluate ``tokens[i]`` at positions ``starts[i]...`` of sequence ``seqs[i]``; returns
        the logits at every token, ``[sum of lengths, n_vocab]`` float32, sequence by sequence.
        A view of llama.cpp's logits buffer (valid until this context's next decode) when the
        tokens fit one batch, else a copy gathered over batches."""
        n_vocab = self.model.n_vocab
        total = sum(len(t) for t in tokens)
        spans = [(0, len(t)) for t in tokens]
        if total <= self.n_batch:
            self._fill(seqs, tokens, starts, spans, every=True)
            self._run(len(seqs), total)
            ptr = self.lib.llama_get_logits(self.ptr)
            return np.ctypeslib.as_array(ptr, shape=(total, n_vocab))
        out = np.empty((total, n_vocab), dtype=np.float32)
        at = 0
        i = 0
        while i < len(seqs):  # whole sequences per batch (a sequence longer than one: split)
            chunk: list[int] = []
            room = self.n_batch
            while i < len(seqs) and len(tokens[i]) <= room:
                chunk.append(i)
                room -= len(tokens[i])
                i += 1
            if not chunk:  # one sequence longer than a batch
                toks, lo = tokens[i], 0
                while lo < len(toks):
                    hi = min(len(toks), lo + self.n_batch)
                    self._fill([seqs[i]], [toks[lo:hi]], [starts[i] + lo], [(0, hi - lo)],
                               every=True)  # fmt: skip
                    self._run(1, hi - lo)
                    ptr = self.lib.llama_get_logits(self.ptr)
                    out[at : at + hi - lo] = np.ctypeslib.as_array(ptr, shape=(hi - lo, n_vocab))
                    at += hi - lo
                    lo = hi
                i += 1
                continue
            n = sum(len(tokens[c]) for c in chunk)
            self._fill([seqs[c] for c in chunk], [tokens[c] for c in chunk],
                       [starts[c] for c in chunk], [(0, len(tokens[c])) for c in chunk],
                       every=True)  # fmt: skip
            self._run(len(chunk), n)
            ptr = self.lib.llama_get_logits(self.ptr)
            out[at : at + n] = np.ctypeslib.as_array(ptr, shape=(n, n_vocab))
            at += n
        return out

    def decode(self, seqs: Sequence[int], tokens: Sequence[Sequence[int]],
               starts: Sequence[int]) -> np.ndarray:  # fmt: skip
        """Evaluate ``tokens[i]`` at positions ``starts[i]...`` of sequence ``seqs[i]``; returns
        ``[len(seqs), n_vocab]`` float32 logits of each sequence's last token. When everything
        fits one batch (every decode step: one token per row) this is a view of llama.cpp's
        logits buffer, valid until this context's next decode; a prefill longer than the batch
        is split and its rows' logits are gathered (one copy per row)."""
        n_vocab = self.model.n_vocab
        total = sum(len(t) for t in tokens)
        if total <= self.n_batch:
            self._fill(seqs, tokens, starts, [(0, len(t)) for t in tokens])
            self._run(len(seqs), total)
            ptr = self.lib.llama_get_logits(self.ptr)
            return np.ctypeslib.as_array(ptr, shape=(len(seqs), n_vocab))
        out = np.empty((len(seqs), n_vocab), dtype=np.float32)
        # Chunks of at most n_batch tokens, rows cut anywhere; a row's logits come with the
        # chunk holding its last token.
        pending = [(i, 0) for i in range(len(seqs))]
        while pending:
            room, chunk, spans = self.n_batch, [], []
            while pending and room:
                i, lo = pending.pop(0)
                hi = min(len(tokens[i]), lo + room)
                chunk.append(i)
                spans.append((lo, hi))
                room -= hi - lo
                if hi < len(tokens[i]):
                    pending.insert(0, (i, hi))
            self._fill([seqs[i] for i in chunk], [tokens[i] for i in chunk],
                       [starts[i] for i in chunk], spans)  # fmt: skip
            self._run(len(chunk), sum(hi - lo for lo, hi in spans))
            outs = [i for i, (_lo, hi) in zip(chunk, spans) if hi == len(tokens[i])]
            if outs:
                ptr = self.lib.llama_get_logits(self.ptr)
                view = np.ctypeslib.as_array(ptr, shape=(len(outs), n_vocab))
                out[outs] = view
        return out

    def _fill(self, seqs: Sequence[int], tokens: Sequence[Sequence[int]], starts: Sequence[int],
              spans: Sequence[tuple[int, int]], every: bool = False) -> None:  # fmt: skip
        """The batch: each sequence's span of tokens, logits at its last token (``every``: at
        every token)."""
        at = 0
        for seq, toks, start, (lo, hi) in zip(seqs, tokens, starts, spans):
            n = hi - lo
            self._token[at : at + n] = toks[lo:hi]
            self._pos[at : at + n] = np.arange(start + lo, start + hi)
            self._logits[at : at + n] = 1 if every else 0
            if hi == len(toks):
                self._logits[at + n - 1] = 1
            for k in range(at, at + n):
                self._seq_slot[k][0] = seq
            at += n
        self.batch.n_tokens = at

    def _run(self, rows: int, n_tokens: int) -> None:
        rc = self.lib.llama_decode(self.ptr, self.batch)
        if rc != 0:
            what = {1: "no KV slot for the batch (the context is full)", 2: "aborted",
                    -1: "invalid batch"}.get(rc, f"error {rc}")  # fmt: skip
            raise LlamaCppError(
                f"{self.name}: llama_decode failed on {n_tokens} tokens of {rows} rows: {what}"
            )

    def close(self) -> None:
        if getattr(self, "ptr", None):
            self.lib.llama_batch_free(self.batch)
            self.lib.llama_free(self.ptr)
            self.ptr = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown: the library may be gone
            self.close()
