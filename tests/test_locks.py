"""The declared ranges tell the truth: every lower bound in pyproject.toml is the version the
oldest lock (requirements/oldest.in, `make test-oldest-transformers`) tests, every version the
locks install lies inside the declared ranges, and the Makefile installs only from locks."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

requirements = pytest.importorskip("packaging.requirements")
markers = pytest.importorskip("packaging.markers")

ROOT = Path(__file__).resolve().parent.parent
# The extras whose lower ends the oldest venv tests; the others say in pyproject why not.
TESTED_AT_THE_BOTTOM = ("generate", "peft", "gguf", "plot", "test")
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)\s*(?:;\s*([^\\]+?))?\s*\\?$")


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> dict[str, list[requirements.Requirement]]:
    if sys.version_info < (3, 11):
        pytest.skip("tomllib is Python 3.11+")
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    out = {"": [requirements.Requirement(r) for r in project["dependencies"]]}
    for extra, reqs in project["optional-dependencies"].items():
        out[extra] = [requirements.Requirement(r) for r in reqs if not r.startswith("dlf_rs")]
    return out


def pins(path: Path, env: dict[str, str] | None = None) -> dict[str, str]:
    """name -> version of a uv-compiled lock, for this interpreter's markers (or ``env``)."""
    out: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        m = _PIN.match(line)
        if m is None:
            continue
        name, version, marker = m.groups()
        if marker is None or markers.Marker(marker).evaluate(env):
            out[norm(name)] = version
    return out


def lower_bound(req: requirements.Requirement) -> str | None:
    lows = [s.version for s in req.specifier if s.operator == ">="]
    return lows[0] if lows else None


def test_every_lower_bound_is_the_oldest_locks_pin() -> None:
    oldest_in = {
        norm(m.group(1)): m.group(2)
        for m in map(_PIN.match, (ROOT / "requirements/oldest.in").read_text().splitlines())
        if m
    }
    wrong = []
    for extra in ("", *TESTED_AT_THE_BOTTOM):
        for req in declared()[extra]:
            low = lower_bound(req)
            if low is None or oldest_in.get(norm(req.name)) is None:
                wrong.append(f"{extra or 'dependencies'}: {req} (no lower bound or not pinned)")
                continue
            pinned = oldest_in[norm(req.name)]
            # ">=5.13" is tested by 5.13.0 (the bound itself), not by 5.13.1.
            if pinned != low and not (pinned.startswith(low + ".") and set(pinned[len(low):]) <= {".", "0"}):
                wrong.append(f"{extra or 'dependencies'}: {req} but oldest.in pins {pinned}")
    assert wrong == []


@pytest.mark.parametrize("lock", ["dev.txt", "oldest.txt"])
def test_the_locks_lie_inside_the_declared_ranges(lock: str) -> None:
    locked = pins(ROOT / "requirements" / lock)
    outside = [
        f"{req} but {lock} has {locked[norm(req.name)]}"
        for reqs in declared().values()
        for req in reqs
        if norm(req.name) in locked and locked[norm(req.name)] not in req.specifier
    ]
    assert outside == []


def test_the_dev_lock_holds_every_extra_the_makefile_venv_needs() -> None:
    locked = pins(ROOT / "requirements/dev.txt")
    missing = [
        req.name
        for extra in ("", "generate", "plot", "peft", "gguf", "eval", "test", "humaneval",
                      "llamacpp")
        for req in declared()[extra]
        if norm(req.name) not in locked
    ]
    assert missing == []


def test_the_makefile_installs_only_from_locks() -> None:
    text = (ROOT / "Makefile").read_text(encoding="utf-8").replace("\\\n", " ")
    installs = [line.strip() for line in text.splitlines() if "pip install" in line
                or "$(PIP_LOCKED)" in line]  # fmt: skip
    assert len(installs) >= 5, installs
    # Every install reads a requirements file with hashes; test-newest (out of CI, on purpose)
    # alone installs what a fresh resolution gave.
    for line in installs:
        if line.startswith("PIP_LOCKED :=") or "$(VENV_NEWEST)" in line:
            continue
        assert "$(PIP_LOCKED)" in line and re.search(r"-r requirements/[\w.-]+\.txt", line), line
    assert "PIP_LOCKED := -m pip install" in text and "--require-hashes" in text


def test_every_lock_file_has_hashes() -> None:
    for lock in sorted((ROOT / "requirements").glob("*.txt")):
        text = lock.read_text(encoding="utf-8")
        n_pins = len([line for line in text.splitlines() if _PIN.match(line)])
        assert n_pins > 0 and text.count("--hash=sha256:") >= n_pins, lock.name
