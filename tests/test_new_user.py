"""What a new user hit on a fresh clone (issue "one home for every option", point 4), each as a
regression test: the call fails at once with a message naming the argument, or does the right
thing."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import dlf_rs
import numpy as np
import pytest
import torch
from conftest import PROMPTS, Family
from dlf_rs.cli import main
from dlf_rs.engines.hf.generate import FusedGenerator
from dlf_rs.family import CHECKPOINTS, example_prompts
from dlf_rs.results import GenerationResult, RowTrace


def cli_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("dlf-rs: error:") and "Traceback" not in err
    return err


@pytest.mark.parametrize("n", ["0", "-3", "two"])
def test_demo_examples_must_be_positive(n: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert "--examples" in cli_error(["demo", "-n", n], capsys)


def test_demo_out_on_a_file_and_missing_family(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    assert "--out" in cli_error(["demo", "--out", str(f)], capsys)
    assert "--family" in cli_error(["demo", "--family", "/nope"], capsys)


def test_demo_writes_results_without_matplotlib(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dlf_rs.family import demo

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    args = parser.parse_args(["--examples", "1", "--out", str(tmp_path)])
    assert demo.run(args) == 0
    assert (tmp_path / "results.md").stat().st_size > 0
    assert json.loads((tmp_path / "results.json").read_text())["tables"]
    assert not list(tmp_path.glob("*.png"))


def test_experts_as_one_string_is_refused_before_loading() -> None:
    with pytest.raises(TypeError, match=r"^experts: expected a list.*pass \["):
        FusedGenerator.from_pretrained(CHECKPOINTS / "large_base", experts="some/path")


def test_mistyped_relative_path_fails_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "default_family").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="^large: model directory .* does not exist"):
        FusedGenerator.from_pretrained("default_family/large_bse")


def test_hub_id_not_cached_is_not_downloaded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(FileNotFoundError, match="^large: .*does not download unless asked"):
        FusedGenerator.from_pretrained("dlf-rs-test/no-such-model-xyz")


def test_empty_and_non_model_directories(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="^large: .*no model \\(no config.json\\)"):
        FusedGenerator.from_pretrained(empty)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "README.txt").write_text("not a model")
    with pytest.raises(FileNotFoundError, match="^small: .*no config.json"):
        FusedGenerator.from_pretrained(CHECKPOINTS / "large_base", small=notes)


def test_pickle_weights_need_allow_pickle(family: Family, tmp_path: Path) -> None:
    path = tmp_path / "pickled"
    family.large.save_pretrained(path)
    family.tokenizer.save_pretrained(path)
    (path / "model.safetensors").unlink()
    torch.save(family.large.state_dict(), path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="^large: .*only pickle weights.*allow_pickle=True"):
        FusedGenerator.from_pretrained(path)
    gen = FusedGenerator.from_pretrained(path, allow_pickle=True)
    assert gen.generate(PROMPTS[:1], 2, method="large").token_ids == FusedGenerator(
        family.large, tokenizer=family.tokenizer
    ).generate(PROMPTS[:1], 2, method="large").token_ids


def test_loading_flags_are_explicit_and_cpu_is_float32() -> None:
    from dlf_rs.engines.hf.loading import LoadOptions

    def opts(**kw: Any) -> LoadOptions:
        base = {"device": None, "torch_dtype": None, "device_map": None,
                "local_files_only": True, "allow_pickle": False, "trust_remote_code": False,
                "extra": {}}  # fmt: skip
        return LoadOptions(**{**base, **kw})

    assert opts().kwargs["trust_remote_code"] is False
    assert opts(trust_remote_code=True).kwargs["trust_remote_code"] is True
    with pytest.raises(TypeError, match="^trust_remote_code:"):
        opts(trust_remote_code="yes")
    assert opts().kwargs["dtype"] == torch.float32
    assert opts(torch_dtype="bfloat16").kwargs["dtype"] == torch.bfloat16
    # The shipped checkpoints are float16 files; on CPU they load as float32.
    gen = FusedGenerator.from_pretrained(CHECKPOINTS / "large_base")
    assert gen.large.dtype == torch.float32


def test_prompt_rules(family: Family) -> None:
    gen = FusedGenerator(family.large, tokenizer=family.tokenizer)
    for bad in ("", "   ", "\n\t"):
        with pytest.raises(ValueError, match=r"^prompts\[0\]: empty or whitespace-only"):
            gen.generate([bad], 2, method="large")
    with pytest.raises(ValueError, match=r"^prompts\[1\]: not valid Unicode"):
        gen.generate(["w1", "w2 \ud800"], 2, method="large")
    with pytest.warns(UserWarning, match=r"prompts\[0\]: .* unknown to the tokenizer"):
        gen.generate(["Q: 2+3=?"], 2, method="large")


def test_family_shortcut_equals_explicit_paths(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # --threads sets RAYON_NUM_THREADS for the process; undo it for the tests that follow.
    monkeypatch.delenv("RAYON_NUM_THREADS", raising=False)
    prompt = example_prompts("qa", 1)[0]
    out = tmp_path / "a.jsonl"
    argv = ["generate", "--family", "default", "--expert", "qa", "--prompt", prompt,
            "--max-new-tokens", "6", "--threads", "1", "--no-progress", "-o", str(out)]  # fmt: skip
    assert main(argv) == 0
    import transformers

    assert not transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.enable_progress_bar()
    assert torch.get_num_threads() == 1
    row = json.loads(out.read_text())
    gen = FusedGenerator.from_pretrained(CHECKPOINTS / "large_base", CHECKPOINTS / "small_base",
                                         [CHECKPOINTS / "small_expert_qa"])  # fmt: skip
    res = gen.generate(prompt, 6)
    assert row["token_ids"] == res.token_ids[0] and row["text"] == res.texts[0]
    # Alphas print as the float32 values they are (0.9, not 0.8999999761581421).
    assert all(len(repr(a)) <= 6 for step in row["alphas"] for a in step)


def test_jsonl_alphas_are_short() -> None:
    a = np.array([[0.9], [0.1], [np.nan]], np.float32)
    empty = RowTrace(*([np.zeros(3)] * 7))
    res = GenerationResult(["x"], [[1, 2, 3]], [a], [empty], ["length"])
    assert res.to_records()[0]["alphas"] == [[0.9], [0.1], [None]]


def test_version_and_module_entry_point(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"dlf-rs {dlf_rs.__version__}"
    out = subprocess.run([sys.executable, "-m", "dlf_rs", "--version"], capture_output=True,
                         text=True, check=True, env={**os.environ})  # fmt: skip
    assert out.stdout.strip() == f"dlf-rs {dlf_rs.__version__}"


def test_plots_carry_their_titles_and_keep_the_legend_off_the_data(tmp_path: Path) -> None:
    from dlf_rs.family.plots import plot_ablation, plot_trace

    alphas = np.linspace(0, 2, 24, dtype=np.float32).reshape(8, 3)
    trace = {"alphas": alphas, "experts": ["math", "qa", "summary"]}
    fig = plot_trace(trace, tmp_path / "a.png", "DLF, math expert on example 3")
    ax = fig.axes[0]
    assert ax.get_title() == "DLF, math expert on example 3"
    fig.canvas.draw()
    legend_box = ax.get_legend().get_window_extent()
    assert legend_box.x0 >= ax.get_window_extent().x1  # outside the axes: never over a point
    tabs = {"table1": {"columns": ["math", "qa", "avg"], "rows": [
        ["Static alpha 0.5", 0.1, 0.2, 0.15], ["DLF, own expert", 0.3, 0.4, 0.35]]}}
    fig2 = plot_ablation(tabs, tmp_path / "b.png", "Fixed alpha against DLF")
    assert fig2.axes[0].get_title() == "Fixed alpha against DLF"


def test_shown_example_is_one_a_reader_calls_right() -> None:
    from dlf_rs.family.demo import readable_row

    ref = "ana has 12 apples . 12 plus 2 is 14 . #### 14"
    preds = [
        "ana has 12 apples . 12 plus 2 is 14 . #### 13 . 12 . #### 12 plus 9",  # scored 1 by a lax metric
        "ana has 12 apples . 12 plus 2 is 14 . #### 14 | problem",
        "wrong",
    ]
    assert readable_row(preds, [ref] * 3, [1.0, 1.0, 0.0]) == 1
    assert readable_row(["wrong", "also wrong"], [ref] * 2, [0.0, 0.5]) == 1


def test_readme_quick_start_runs() -> None:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = text.split("### One decoding step: `dlf_rs.fuse_step`", 1)[1]
    code = block.split("```python", 1)[1].split("```", 1)[0]
    rng = np.random.default_rng(0)
    names = {n: rng.normal(size=(4, 50)).astype(np.float32)
             for n in ("z_large", "z_small", "z_math", "z_qa")}  # fmt: skip
    exec(compile(code, "README quick start", "exec"), {**names})  # noqa: S102
