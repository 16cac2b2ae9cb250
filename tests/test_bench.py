"""``dlf-rs bench`` (:mod:`dlf_rs.bench`) on the tiny preset: it runs and prints every ratio.

Only that the numbers are computed (finite, positive) is checked; timings never pass or fail a test.
"""

from __future__ import annotations

import math
import re

import pytest

pytest.importorskip("transformers")


def test_bench_runs_and_prints_every_ratio(capsys: pytest.CaptureFixture[str]) -> None:
    from dlf_rs.cli import main

    argv = ["bench", "--device", "cpu", "--batch", "2", "--experts", "1", "--steps", "3",
            "--prompt-len", "4", "--vocab", "64", "--compile", "off"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    m = re.search(r"ratios B=2 T=1 fast: naive=(\S+) own_sum=(\S+) floor=(\S+)", out)
    assert m is not None, out
    for value in m.groups():
        assert math.isfinite(float(value)) and float(value) > 0
    assert re.search(r"^\s+2\s+1 naive\s+\d", out, re.MULTILINE)
    assert re.search(r"^\s+2\s+1 fast\s+\d", out, re.MULTILINE)
    assert "peak GPU memory: n/a on CPU" in out
    assert re.search(r"tok/s", out)
