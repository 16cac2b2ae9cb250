"""Tests of `dlf-rs demo` (dlf_rs.demo) on a reduced run over the shipped default family: the
numbers are computed from the generated outputs (one cell is recomputed here with the task's
metric), results.json agrees with results.md, and the alpha plots are real PNG images."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import pytest
from dlf_rs.family import demo
from dlf_rs.family.world import TASKS

# DLF_RS_FAMILY points the test at another trained family (e.g. a fresh train_family --out DIR).
FAMILY = Path(os.environ.get("DLF_RS_FAMILY", demo.DEFAULT_FAMILY))
pytestmark = pytest.mark.skipif(
    not (FAMILY / "manifest.json").exists(), reason="default family not shipped"
)


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    args = parser.parse_args(
        ["--quick", "--examples", "3", "--out", str(out), "--family", str(FAMILY)]
    )
    assert demo.run(args) == 0
    return out


def _runs(out: Path) -> list[dict]:
    return json.loads((out / "results.json").read_text())["runs"]


def test_cell_recomputed_from_outputs(demo_out: Path) -> None:
    data = json.loads((demo_out / "results.json").read_text())
    runs = {(r["name"], r["task"]): r for r in data["runs"]}
    for (name, task), column in ((("DLF, own expert", "qa"), "qa"),
                                 (("Proxy-tuning (static alpha 1.0)", "math"), "math")):
        r = runs[(name, task)]
        metric = TASKS[task].metric
        again = float(np.mean([metric(p, ref) for p, ref in zip(r["predictions"], r["references"])]))
        assert r["score"] == pytest.approx(again)
        assert len(r["predictions"]) == 3
        table = data["tables"]["table1"]
        row = next(row for row in table["rows"] if row[0] == name)
        assert row[1 + table["columns"].index(column)] == pytest.approx(again)
    # the references are the evaluation set's answers, not copies of the predictions
    assert all(isinstance(p, str) for r in data["runs"] for p in r["predictions"])


def test_json_matches_markdown(demo_out: Path) -> None:
    data = json.loads((demo_out / "results.json").read_text())
    md = (demo_out / "results.md").read_text()
    for key in ("table1", "table2", "table3", "gap_closed"):
        tab = data["tables"][key]
        assert tab["title"] in md
        for row in tab["rows"]:
            line = f"| {row[0]} | " + " | ".join(demo._pct(v) for v in row[1:]) + " |"
            assert line in md


def test_methods_differ_and_averages_consistent(demo_out: Path) -> None:
    data = json.loads((demo_out / "results.json").read_text())
    for row in data["tables"]["table1"]["rows"]:
        vals = row[1:-1]
        assert row[-1] == pytest.approx(sum(vals) / len(vals))
    preds = {(r["name"], r["task"]): r["predictions"] for r in _runs(demo_out)}
    # the large base does not know the task format; its fine-tuned copy does
    assert preds[("Large base", "qa")] != preds[("Large fine-tuned (own task)", "qa")]


def test_plots_written(demo_out: Path) -> None:
    import matplotlib.image as mpimg

    for name in ("alpha_one_expert.png", "alpha_all_experts_unseen.png", "alpha_ablation.png"):
        path = demo_out / name
        assert path.exists() and path.stat().st_size > 5_000
        img = mpimg.imread(str(path))
        assert img.ndim == 3 and img.shape[0] > 100 and float(img.std()) > 0.01
    traces = json.loads((demo_out / "results.json").read_text())["alpha_traces"]
    a = np.asarray(traces["alpha_all_experts_unseen.png"]["alphas"])
    assert a.ndim == 2 and a.shape[1] == 3 and np.all((a >= 0) & (a <= 2))
