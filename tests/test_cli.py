"""The ``dlf-rs`` command line on tiny checkpoints saved to ``tmp_path`` (nothing downloaded)."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import pytest
from conftest import PROMPTS, Family
from dlf_rs.cli import main
from dlf_rs.generate import FusedGenerator
from dlf_rs.seeds import row_seed


@pytest.fixture(scope="module")
def saved(family: Family, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("ckpt")
    paths = {}
    named = [("large", family.large), ("small", family.small)]
    named += [(f"expert{i}", m) for i, m in enumerate(family.experts[:2])]
    for name, model in named:
        path = os.path.join(root, name)
        model.save_pretrained(path, safe_serialization=True)
        family.tokenizer.save_pretrained(path)
        paths[name] = path
    return paths


def model_args(saved: dict[str, str]) -> list[str]:
    return [
        "--large", saved["large"], "--small", saved["small"],
        "--expert", saved["expert0"], "--expert", saved["expert1"],
    ]  # fmt: skip


def read_jsonl(path: Any) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def test_generate_writes_jsonl_matching_the_api(
    family: Family, saved: dict[str, str], tmp_path: Any
) -> None:
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text(
        "\n".join(json.dumps({"prompt": p}) for p in PROMPTS[:3]) + "\n", encoding="utf-8"
    )
    out = tmp_path / "out.jsonl"
    argv = ["generate", *model_args(saved), "--prompts", str(prompts_file), "--method", "dlf"]
    argv += ["--max-new-tokens", "5", "--batch-size", "2", "--output", str(out), "--no-progress"]
    assert main(argv) == 0
    rows = read_jsonl(out)
    want = FusedGenerator(
        family.large, family.small, family.experts[:2], family.tokenizer
    ).generate(PROMPTS[:3], max_new_tokens=5, method="dlf")
    assert [r["prompt"] for r in rows] == PROMPTS[:3]
    assert [r["token_ids"] for r in rows] == want.token_ids
    assert [r["text"] for r in rows] == want.texts
    for r, a in zip(rows, want.alphas):
        np.testing.assert_allclose(np.asarray(r["alphas"], np.float32), a, atol=1e-6)
        assert r["method"] == "dlf" and r["finish_reason"] in ("eos", "stop", "length")


def test_generate_static_and_seeded_sampling_independent_of_batch_size(
    family: Family, saved: dict[str, str], tmp_path: Any
) -> None:
    common = ["generate", *model_args(saved), "--method", "static", "--alpha", "1.0"]
    common += ["--max-new-tokens", "4", "--temperature", "1.0", "--seed", "11", "--no-progress"]
    for p in PROMPTS[:3]:
        common += ["--prompt", p]
    out1, out3 = tmp_path / "b1.jsonl", tmp_path / "b3.jsonl"
    assert main([*common, "--batch-size", "1", "--output", str(out1)]) == 0
    assert main([*common, "--batch-size", "3", "--output", str(out3)]) == 0
    rows1, rows3 = read_jsonl(out1), read_jsonl(out3)
    assert [r["token_ids"] for r in rows1] == [r["token_ids"] for r in rows3]
    gen = FusedGenerator(family.large, family.small, family.experts[:2], family.tokenizer)
    want = gen.generate(
        PROMPTS[:3], max_new_tokens=4, method="static", alpha=1.0, temperature=1.0,
        seed=[row_seed(11, i) for i in range(3)],
    )  # fmt: skip
    assert [r["token_ids"] for r in rows3] == want.token_ids


def test_generate_to_stdout(saved: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["generate", "--large", saved["large"], "--prompt", PROMPTS[0], "--method", "large"]
    assert main([*argv, "--max-new-tokens", "3", "--no-progress"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and len(json.loads(lines[0])["token_ids"]) == 3


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--large", "MISSING", "--prompt", "w1", "--method", "large"], "large"),
        (["--large", "LARGE", "--prompt", "", "--method", "large"], "prompts[0]"),
        (["--large", "LARGE", "--prompt", "w1", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["--large", "LARGE", "--prompt", "w1", "--method", "static"], "--alpha"),
        (["--large", "LARGE", "--prompt", "w1", "--alpha", "1"], "--small"),
        (["--large", "LARGE", "--prompt", "w1", "--method", "dlf", "--alpha", "1"], "--alpha"),
        (["--large", "LARGE", "--prompt", "w1", "--top-p", "2"], "--top-p"),
        (["--large", "LARGE", "--prompt", "w1", "--seed", "-1"], "--seed"),
        (["--large", "LARGE", "--prompt", "w1", "--method", "large", "-o", "/nope/x.jsonl"],
         "--output"),
        (["--family", "/nope", "--prompt", "w1"], "--family"),
        (["--large", "LARGE", "--prompt", "w1", "--method", "nope"], "invalid choice"),
        (["--large", "LARGE", "--prompts", "MISSING", "--method", "large"], "--prompts"),
        (["--large", "LARGE"], "--prompt"),
    ],
)
def test_generate_errors_exit_2_with_one_line(
    saved: dict[str, str], capsys: pytest.CaptureFixture[str], extra: list[str], needle: str
) -> None:
    missing = os.path.join(os.path.dirname(saved["large"]), "missing")
    argv = [{"MISSING": missing, "LARGE": saved["large"]}.get(a, a) for a in ["generate", *extra]]
    assert main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("dlf-rs: error:") and needle in last
    assert "Traceback" not in err


def test_help_explains_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "generate" in text and "demo" in text and "Dynamic Logit Fusion" in text
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = capsys.readouterr().out
    for flag in ("--large", "--expert", "--prompts", "--method", "--seed", "--batch-size"):
        assert flag in text


def test_demo_delegates_to_the_demo_module(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import argparse
    import sys
    import types

    seen: dict[str, Any] = {}
    fake = types.ModuleType("dlf_rs.family.demo")

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--quick", action="store_true")

    def run(args: argparse.Namespace) -> int:
        seen["quick"] = args.quick
        return 0

    fake.add_arguments = add_arguments  # type: ignore[attr-defined]
    fake.run = run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "dlf_rs.family.demo", fake)
    import dlf_rs.family

    monkeypatch.setattr(dlf_rs.family, "demo", fake, raising=False)
    assert main(["demo", "--quick"]) == 0
    assert seen == {"quick": True}
    assert main(["demo", "--bogus"]) == 2
    assert "dlf-rs: error:" in capsys.readouterr().err
