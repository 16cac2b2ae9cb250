"""benches/gpu_check.py stays runnable without a GPU: its ``--dry-run`` (every check on CPU with
tiny shapes) passes or skips each check with a reason and exits 0, and a failing check makes the
exit status 1 without hiding the checks after it. Run in a subprocess, one thread, as CI would.
Timing figures are printed by the script, never asserted here."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benches" / "gpu_check.py"
LINE = re.compile(r"^(PASS|FAIL|SKIP) (\S+): (.*) \[\d+\.\d+s\]$")
CHECKS = [
    "family-greedy[default]", "family-greedy[fast]", "family-greedy[fast-eager-overlap]",
    "smollm-greedy[default]", "smollm-greedy[fast]", "pinned-staging", "sampling-seeds",
    "breakdown[B=1]", "breakdown[B=8]",
]  # fmt: skip


def run_check(*args: str) -> tuple[int, dict[str, tuple[str, str]], str]:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--threads", "1", *args],
        check=False, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600,
    )  # fmt: skip
    checks: dict[str, tuple[str, str]] = {}
    for line in proc.stdout.splitlines():
        if line.startswith("#"):
            continue
        m = LINE.match(line)
        assert m is not None, f"not a header, summary or check line: {line!r}\n{proc.stdout}"
        checks[m.group(2)] = (m.group(1), m.group(3))
    return proc.returncode, checks, proc.stdout + proc.stderr[-4000:]


@pytest.fixture(scope="module")
def smollm_arg(request: Any) -> list[str]:
    """``--smollm DIR`` when the suite's converted SmolLM2 is available (conftest's fixture,
    cached across runs), else nothing: the dry run then skips those checks with a reason."""
    try:
        return ["--smollm", request.getfixturevalue("smollm_dir")]
    except pytest.skip.Exception:
        return []


def test_dry_run_passes_or_skips_every_check(smollm_arg: list[str]) -> None:
    rc, checks, out = run_check(*smollm_arg)
    assert list(checks) == CHECKS, out
    for name, (status, text) in checks.items():
        assert status in ("PASS", "SKIP"), f"{name}: {status} {text}\n{out}"
        if status == "SKIP":
            assert len(text) > 10, f"{name}: a SKIP without a reason\n{out}"
    assert rc == 0, out
    assert "# torch " in out and "dlf_rs " in out and "# GPU: " in out  # the environment header
    # What the dry run must reach on CPU (the rest needs CUDA or the SmolLM2 files).
    for name in ("family-greedy[default]", "family-greedy[fast]", "sampling-seeds",
                 "breakdown[B=1]", "breakdown[B=8]"):  # fmt: skip
        assert checks[name][0] == "PASS", out
    assert checks["pinned-staging"][0] == "SKIP" and "no CUDA" in checks["pinned-staging"][1]
    assert "ms/token" in checks["breakdown[B=8]"][1] and "fuse_step" in checks["breakdown[B=8]"][1]
    if smollm_arg:
        assert checks["smollm-greedy[default]"][0] == "PASS", out


def test_a_failing_check_sets_the_exit_status_and_hides_nothing() -> None:
    rc, checks, out = run_check(
        "--only", "family-greedy[default],pinned-staging,sampling-seeds",
        "--inject-failure", "family-greedy[default]",
    )  # fmt: skip
    assert rc == 1, out
    assert checks["family-greedy[default]"][0] == "FAIL", out
    assert "injected failure" in checks["family-greedy[default]"][1]
    assert checks["sampling-seeds"][0] == "PASS", out  # the checks after a failure still ran
    assert checks["pinned-staging"][0] == "SKIP", out
    assert "# summary: 1 pass, 1 fail, 1 skip" in out
