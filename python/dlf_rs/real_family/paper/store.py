"""The paper runs' cache: fingerprints, model digests and the per-example output files.

Where it sits: under :mod:`.experts` (adapters are skipped when their fingerprint is in place)
and :mod:`.runner` (a row's replies are decoded once per fingerprint and resumed after an
interruption). Everything lives in the real family's cache, ``<cache>/paper/``:

- ``digests.json``: the sha256 of each model folder read (weights, config, tokenizer files),
  remembered with each file's size and modification time so a 3 GB folder is hashed once;
- ``outputs/<task>/<row>-<fingerprint>.jsonl`` with ``.json`` beside it: a row's replies, one
  JSON line per example (``id``, ``prompt_sha``, ``text``, ``token_ids``, ``finish``,
  ``seconds``, and ``alphas`` for DLF rows), and the manifest of what the fingerprint covers
  (the row's options, the digests of the models it uses, the budget, dtype and batch size).

Lines are appended one decoded batch at a time; a later line for the same example wins, so an
interrupted run loses at most the batch in flight.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["Digests", "OutputFile", "fingerprint", "prompt_sha", "write_json"]

# Files that make up a model or adapter folder for the digest; our own manifests (timestamps,
# losses) are left out so a retrained-but-identical adapter keeps its digest.
_MODEL_SUFFIXES = (".safetensors", ".bin", ".json", ".jinja", ".txt", ".model", ".tiktoken")
_NOT_MODEL = {"manifest.json", "paper.json"}


def fingerprint(obj: Any) -> str:
    """16 hex digits of the sha256 of ``obj`` as canonical JSON."""
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def prompt_sha(text: str) -> str:
    """12 hex digits naming a prompt's text (a reworded prompt is decoded again)."""
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON through a temporary file (no half-written manifest)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _model_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir()
                  if f.is_file() and f.suffix in _MODEL_SUFFIXES and f.name not in _NOT_MODEL)  # fmt: skip


class Digests:
    """sha256 of model folders, remembered in ``path`` by (name, size, mtime) of every file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._known: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self._known = {}

    def of(self, folder: Path) -> str:
        folder = folder.resolve()
        files = _model_files(folder)
        if not files:
            raise FileNotFoundError(f"{folder}: no model files to fingerprint")
        stamp = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
        known = self._known.get(os.fspath(folder))
        if known and known.get("files") == stamp:
            return str(known["sha256"])
        h = hashlib.sha256()
        for f in files:
            h.update(f.name.encode() + b"\0")
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    h.update(block)
        digest = h.hexdigest()
        self._known[os.fspath(folder)] = {"files": stamp, "sha256": digest}
        write_json(self.path, self._known)
        return digest


class OutputFile:
    """One row's replies on one task under one fingerprint (see the module docstring)."""

    def __init__(self, root: Path, task: str, row: str, fp: str) -> None:
        safe = row.replace("/", "_")
        self.path = root / task / f"{safe}-{fp}.jsonl"
        self.manifest_path = self.path.with_suffix(".json")

    def load(self) -> dict[str, dict[str, Any]]:
        """id -> the latest record of that example (a torn last line is ignored)."""
        out: dict[str, dict[str, Any]] = {}
        if not self.path.is_file():
            return out
        with open(self.path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a line cut by an interruption
                out[rec["id"]] = rec
        return out

    def append(self, records: Iterable[Mapping[str, Any]], manifest: Mapping[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.manifest_path.is_file():
            write_json(self.manifest_path, dict(manifest))
        torn = False
        if self.path.is_file() and self.path.stat().st_size:
            with open(self.path, "rb") as fh:
                fh.seek(-1, os.SEEK_END)
                torn = fh.read(1) != b"\n"
        with open(self.path, "a", encoding="utf-8") as fh:
            if torn:  # an interrupted write: end that line so the new records stand alone
                fh.write("\n")
            fh.writelines(json.dumps(dict(r), ensure_ascii=False, sort_keys=True) + "\n"
                          for r in records)  # fmt: skip
            fh.flush()
            os.fsync(fh.fileno())
