"""``dlf-rs generate --stream`` and ``--chat``: the streamed text is the JSONL run's text, chat
prompts reach every model's chat template, and misuse is one error line (exit 2)."""

from __future__ import annotations

import json
from typing import Any

import pytest

pytest.importorskip("torch")

from dlf_rs.cli import main

PROMPT = "question : where does kubrai moulos live ? answer :"
FAMILY = ["generate", "--family", "default", "--expert", "qa", "--max-new-tokens", "12",
          "--no-progress"]  # fmt: skip


def test_stream_prints_the_text_of_the_jsonl_run(capsys: pytest.CaptureFixture[str],
                                                  tmp_path: Any) -> None:  # fmt: skip
    assert main([*FAMILY, "--prompt", PROMPT]) == 0  # not a terminal: JSONL
    record = json.loads(capsys.readouterr().out)
    assert record["text"] == "kubrai moulos lives in fenrick ."
    out = tmp_path / "o.jsonl"
    assert main([*FAMILY, "--prompt", PROMPT, "--stream", "-o", str(out)]) == 0
    assert capsys.readouterr().out == record["text"] + "\n"
    assert json.loads(out.read_text()) == record  # the JSONL still goes to --output
    assert main([*FAMILY, "--prompt", PROMPT, "--stream", "--speculative", "3"]) == 0
    assert capsys.readouterr().out == record["text"] + "\n"


@pytest.mark.parametrize("extra, needle", [
    (["--prompt", PROMPT, "--prompt", PROMPT, "--stream"], "--stream: prints one prompt's text"),
    (["--prompt", PROMPT, "--system", "be brief"], "--system: only used with --chat"),
    (["--prompt", PROMPT, "--chat"], "messages: the large model's tokenizer has no chat template"),
])  # fmt: skip
def test_misuse_is_one_line(capsys: pytest.CaptureFixture[str], extra: list[str],
                            needle: str) -> None:  # fmt: skip
    assert main([*FAMILY, *extra]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") <= 2, err


def test_jsonl_messages_need_no_chat_flag_and_must_not_mix(tmp_path: Any,
                                                           capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps({"prompt": PROMPT}) + "\n"
                     + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    assert main([*FAMILY, "--prompts", str(mixed)]) == 2
    assert 'mixes "prompt" and "messages"' in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user"}]}) + "\n")
    assert main([*FAMILY, "--prompts", str(bad)]) == 2
    assert '"messages" must be a list' in capsys.readouterr().err


def test_chat_on_a_real_chat_model(smollm_dir: str, tmp_path: Any, one_thread: Any) -> None:
    """--chat with SmolLM2-135M-Instruct equals generate(messages=...) of the API, and a JSONL
    file of "messages" gives the same record."""
    from dlf_rs.engines.hf.generate import FusedGenerator

    args = ["generate", "--large", smollm_dir, "--method", "large", "--max-new-tokens", "6",
            "--no-progress"]  # fmt: skip
    out = tmp_path / "o.jsonl"
    assert main([*args, "--chat", "--system", "Answer briefly.", "--prompt", "What is 2+2?",
                 "-o", str(out)]) == 0  # fmt: skip
    record = json.loads(out.read_text())
    conv = [{"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "What is 2+2?"}]  # fmt: skip
    assert record["messages"] == conv
    gen = FusedGenerator.from_pretrained(smollm_dir)
    want = gen.generate(messages=[conv], max_new_tokens=6, method="large")
    assert record["token_ids"] == want.token_ids[0] and record["text"] == want.texts[0]
    src = tmp_path / "chats.jsonl"
    src.write_text(json.dumps({"messages": conv}) + "\n")
    assert main([*args, "--prompts", str(src), "-o", str(out)]) == 0
    assert json.loads(out.read_text()) == record


def test_penalty_flags_reach_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    from dlf_rs.engines.hf.generate import FusedGenerator
    from dlf_rs.family import checkpoint

    assert main([*FAMILY, "--prompt", PROMPT, "--method", "large", "--repetition-penalty", "3",
                 "--presence-penalty", "1.5"]) == 0  # fmt: skip
    got = json.loads(capsys.readouterr().out)
    gen = FusedGenerator.from_pretrained(checkpoint("large_base"))
    want = gen.generate(PROMPT, 12, method="large", repetition_penalty=3.0, presence_penalty=1.5)
    plain = gen.generate(PROMPT, 12, method="large")
    assert got["token_ids"] == want.token_ids[0] != plain.token_ids[0]
    assert main([*FAMILY, "--prompt", PROMPT, "--frequency-penalty", "3"]) == 2
    assert "--frequency-penalty:" in capsys.readouterr().err
