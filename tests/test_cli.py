"""The ``dlf-rs`` command line on tiny checkpoints saved to ``tmp_path`` (nothing downloaded)."""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any

import numpy as np
import pytest
from conftest import PROMPTS, Family
from dlf_rs.cli import main
from dlf_rs.engines.hf.generate import FusedGenerator
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


# ----------------------------------------------------------------- the new-user report's points


def test_alpha_takes_one_value_per_expert(
    family: Family, saved: dict[str, str], tmp_path: Any
) -> None:
    from dlf_rs.cli import _step_options, build_parser

    args = build_parser().parse_args(
        ["generate", "--large", "L", "--prompt", "w1", "--alpha", "1.0", "0.5"]
    )
    opts = _step_options(args)
    assert opts.alpha == (1.0, 0.5) and opts.method == "static"
    args = build_parser().parse_args(["generate", "--large", "L", "--prompt", "w1", "--alpha", "1"])
    assert _step_options(args).alpha == 1.0
    out = tmp_path / "out.jsonl"
    argv = ["generate", *model_args(saved), "--alpha", "1.0", "0.5", "--prompt", PROMPTS[0],
            "--prompt", PROMPTS[2], "--max-new-tokens", "5", "--no-progress", "-o", str(out)]  # fmt: skip
    assert main(argv) == 0
    want = FusedGenerator(
        family.large, family.small, family.experts[:2], family.tokenizer
    ).generate([PROMPTS[0], PROMPTS[2]], max_new_tokens=5, alpha=(1.0, 0.5))
    rows = read_jsonl(out)
    assert [r["token_ids"] for r in rows] == want.token_ids
    assert all(r["method"] == "static" for r in rows)
    assert rows[0]["alphas"][0] == [1.0, 0.5]


def test_seed_with_greedy_decoding_prints_a_note(
    saved: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["generate", "--large", saved["large"], "--prompt", PROMPTS[0], "--method", "large",
            "--max-new-tokens", "2", "--no-progress", "--seed", "3"]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if line.startswith("dlf-rs: note:")]
    want = ("dlf-rs: note: --seed has no effect with greedy decoding (--temperature 0, the "
            "default); pass --temperature > 0 to sample")
    assert notes == [want]
    assert main([*argv, "--temperature", "1.0"]) == 0
    assert "dlf-rs: note:" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("device", "available", "count", "needle"),
    [
        ("cuda", False, 0, "--device: 'cuda' requested but CUDA is not available here"),
        ("cuda:1", False, 0, "--device: 'cuda:1' requested but CUDA is not available here"),
        ("cuda:3", True, 1, "--device: 'cuda:3' requested but this machine has 1 CUDA device(s)"),
        ("gpu0", False, 0, "--device:"),
    ],
)
def test_unusable_device_fails_before_loading(
    saved: dict[str, str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    device: str, available: bool, count: int, needle: str,
) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)

    def no_loading(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("models were loaded before --device was checked")

    monkeypatch.setattr(FusedGenerator, "from_pretrained", no_loading)
    argv = ["generate", "--large", saved["large"], "--prompt", "w1", "--method", "large",
            "--device", device, "--no-progress"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("dlf-rs: error: --device") and needle in lines[-1]
    assert "Traceback" not in err and len([x for x in lines if "error" in x]) == 1


def test_load_options_refuse_an_unusable_cuda_device(
    saved: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="^device: 'cuda' requested but CUDA is not available"):
        FusedGenerator.from_pretrained(saved["large"], device="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=r"^device: 'cuda:2' .* 2 CUDA device\(s\) \(cuda:0 to"):
        FusedGenerator.from_pretrained(saved["large"], device="cuda:2")


def test_bench_refuses_cuda_without_gpu(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "--device", "cuda", "--batch", "1", "--experts", "1"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        "dlf-rs: error: --device: 'cuda' requested but CUDA is not available"
    )


def test_generate_help_shows_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    from dlf_rs.threads import DEFAULT_THREADS

    with pytest.raises(SystemExit) as info:
        main(["generate", "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for fragment in ("tokens to generate per prompt at most (default: 64)",
                     "prompts per batch (default: 8)", "(default: grid)", "(default: 0.1)",
                     "(default: one-active)", "(default: 0 2)", "default: auto)",
                     f"(default {DEFAULT_THREADS}:", "--alpha A [A ...]"):  # fmt: skip
        assert fragment in text, fragment
    assert "default: None" not in text
    assert "Threads: --threads N" in text  # the raw epilog is still there


def test_bench_threads_default_and_rule_match_generate(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import argparse

    from dlf_rs.bench import add_arguments
    from dlf_rs.cli import build_parser
    from dlf_rs.threads import DEFAULT_THREADS

    ap = argparse.ArgumentParser()
    add_arguments(ap)
    assert ap.parse_args([]).threads == DEFAULT_THREADS
    assert ap.parse_args(["--threads", "2"]).threads == 2
    gen = build_parser().parse_args(["generate", "--large", "L", "--prompt", "w1"])
    assert gen.threads == DEFAULT_THREADS
    assert main(["bench", "--threads", "0"]) == 2
    assert "--threads" in capsys.readouterr().err.strip().splitlines()[-1]


def test_cli_sets_passive_openmp_unless_the_user_chose(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import subprocess
    import sys

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert main(["generate", "--large", "L"]) == 2  # an argument error: nothing loads
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert main(["generate", "--large", "L"]) == 2
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
    capsys.readouterr()
    # The setting counts only if torch (which loads OpenMP) is imported after it: the CLI module
    # must not import torch, and dlf_rs.bench must set the policy before its own torch import.
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = ("import sys, os, dlf_rs.cli; t = 'torch' in sys.modules; import dlf_rs.bench; "
            "print(t, os.environ.get('OMP_WAIT_POLICY'))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()  # fmt: skip
    assert out == ["False", "PASSIVE"]


def test_jsonl_has_acceptance_figures_with_speculative_decoding(
    family: Family, saved: dict[str, str], tmp_path: Any
) -> None:
    common = ["generate", *model_args(saved), "--prompt", PROMPTS[0], "--prompt", PROMPTS[3],
              "--max-new-tokens", "6", "--no-progress"]  # fmt: skip
    spec_out, plain_out = tmp_path / "spec.jsonl", tmp_path / "plain.jsonl"
    assert main([*common, "--speculative", "3", "-o", str(spec_out)]) == 0
    assert main([*common, "-o", str(plain_out)]) == 0
    want = FusedGenerator(
        family.large, family.small, family.experts[:2], family.tokenizer
    ).generate([PROMPTS[0], PROMPTS[3]], max_new_tokens=6, speculative=3)
    spec, plain = read_jsonl(spec_out), read_jsonl(plain_out)
    assert [r["token_ids"] for r in spec] == [r["token_ids"] for r in plain]
    for row, trace in zip(spec, want.trace):
        assert trace.accepted_draft is not None
        assert row["accepted_draft"] == [bool(a) for a in trace.accepted_draft]
        assert len(row["accepted_draft"]) == len(row["token_ids"])
        rate = trace.acceptance_rate
        assert row["acceptance_rate"] == (None if rate is None or math.isnan(rate) else rate)
    assert all("acceptance_rate" not in r and "accepted_draft" not in r for r in plain)


def _help_text(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    return capsys.readouterr().out


def test_demo_help_states_measured_time_and_existing_docs(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from pathlib import Path

    text = _help_text(["demo", "--help"], capsys)
    assert "about a minute" not in text and "QUICK_S" not in text
    assert re.search(r"--quick\s+8 examples per task \(about \d+ s", text)
    root = Path(__file__).resolve().parents[1]
    docs = re.findall(r"\bdocs/[\w.-]+\.md\b", text)
    assert docs, text
    for doc in docs:
        assert (root / doc).is_file(), f"demo --help points to {doc}, not in the repository"


def test_eval_help_lists_every_model_arg(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("lm_eval")
    import inspect

    from dlf_rs.harness.model import DLFLM

    for argv in (["eval", "--help"], ["eval", "run", "--help"]):
        assert main(argv) == 0
        text = capsys.readouterr().out
        assert 'The "dlf" model' in text
        for name in inspect.signature(DLFLM.__init__).parameters:
            if name not in ("self", "generator"):  # generator: a Python object, not a string
                assert re.search(rf"^  {name}\b", text, re.MULTILINE), name


def test_cli_examples_ask_about_people_of_the_shipped_world() -> None:
    import json as json_

    from dlf_rs import cli
    from dlf_rs.family import CHECKPOINTS
    from dlf_rs.family.world import World

    cfg = json_.loads((CHECKPOINTS / "manifest.json").read_text())["config"]
    world = World.build(cfg["world_seed"], cfg["n_entities"], cfg["name_pool"], cfg["name_pool"])
    people = world.by_name()
    names = re.findall(r"where does (.+?) live \?", cli.DESCRIPTION + cli.GENERATE_EPILOG)
    assert names
    for name in names:
        assert name in people, f"the CLI example asks about {name!r}, unknown to the family"


def test_generate_and_serve_share_the_fusion_flags(capsys: pytest.CaptureFixture[str]) -> None:
    """One builder of the flags (dlf_rs.flags): both commands read --alpha the same two ways,
    refuse --support-k 0 alike, and name a bad value by its flag."""
    import argparse

    from dlf_rs.cli import _Failure, _step_options, build_parser
    from dlf_rs.engines.vllm import serve
    from dlf_rs.flags import UsageError, fusion_fields, step_options

    def serve_args(argv: list[str]) -> argparse.Namespace:
        p = argparse.ArgumentParser(exit_on_error=False)
        serve.add_arguments(p)
        return p.parse_args(["--large", "L", *argv])

    def gen_args(argv: list[str]) -> argparse.Namespace:
        return build_parser().parse_args(["generate", "--large", "L", "--prompt", "w1", *argv])

    for argv in (["--alpha", "1.0", "0.5"], ["--alpha", "1.0", "--alpha", "0.5"]):
        assert _step_options(gen_args(argv)).alpha == (1.0, 0.5)
        assert serve._options(serve_args(argv)) == {"alpha": (1.0, 0.5)}
    flags = ["--method", "dlf", "--solver", "exact", "--support-k", "5", "--alpha-range", "0",
             "1.5", "--grid-step", "0.05", "--multi-expert", "joint"]  # fmt: skip
    assert fusion_fields(gen_args(flags)) == fusion_fields(serve_args(flags))
    assert step_options(fusion_fields(serve_args(flags))) == _step_options(gen_args(flags))
    for parse in (gen_args, serve_args):
        with pytest.raises((argparse.ArgumentError, _Failure)) as err:
            parse(["--support-k", "0"])
        assert "expected an int >= 1, got 0" in str(err.value) + capsys.readouterr().err
    with pytest.raises(UsageError, match=r"^--grid-step: "):
        serve._options(serve_args(["--grid-step", "-1"]))
    with pytest.raises(UsageError, match=r"^--grid-step: "):
        _step_options(gen_args(["--grid-step", "-1"]))
