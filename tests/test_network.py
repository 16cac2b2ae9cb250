"""No network unless asked: with ``local_files_only=True`` (the default, CLI without
``--allow-download``) loading makes zero connection attempts, whatever is missing.

Every socket entry point is replaced by one that records the attempt and raises, and
huggingface_hub's once-a-day agent-registry cache is pointed at an empty folder, so a request the
hub would make (transformers' adapter_config.json lookup, the registry fetch behind every request's
headers) is seen here instead of being skipped by a warm cache. Attempts are counted, not timed.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import pytest
from conftest import Family
from dlf_rs.cli import main
from dlf_rs.engines.hf.generate import FusedGenerator

NOT_DOWNLOADED = (
    "is not a local directory and not in the Hugging Face cache; dlf_rs does not download unless "
    "asked"
)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> list[tuple[Any, ...]]:
    attempts: list[tuple[Any, ...]] = []

    def refuse(*args: Any, **kwargs: Any) -> Any:
        attempts.append(args[:2])
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    # The test must see what dlf_rs does, not an offline mode set by the environment.
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH",
                        str(tmp_path / "registry" / "agents.json"), raising=False)  # fmt: skip
    try:
        from huggingface_hub.utils import _detect_agent

        monkeypatch.setattr(_detect_agent, "_registry", None)
    except (ImportError, AttributeError):  # other huggingface_hub versions: no registry
        pass
    return attempts


@pytest.fixture(scope="module")
def saved(family: Family, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("net")
    paths = {}
    for name, model in (("large", family.large), ("small", family.small)):
        path = os.path.join(root, name)
        model.save_pretrained(path, safe_serialization=True)
        family.tokenizer.save_pretrained(path)
        paths[name] = path
    return paths


def _restored(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE is False and "HF_HUB_OFFLINE" not in os.environ


@pytest.mark.parametrize("hub_id", ["dlf-rs-test/no-such-model", "gpt2-dlf-rs-test-missing"])
def test_unknown_large_hub_id_makes_no_network_attempt(
    no_network: list[Any], monkeypatch: pytest.MonkeyPatch, hub_id: str
) -> None:
    with pytest.raises(FileNotFoundError, match=f"^large: '{hub_id}' {NOT_DOWNLOADED}"):
        FusedGenerator.from_pretrained(hub_id)
    assert no_network == []
    _restored(monkeypatch)


@pytest.mark.parametrize("expert", ["dlf-rs-test/no-such-expert", "dlf-rs-test/qa-lora-adapter"])
def test_unknown_expert_or_adapter_hub_id_makes_no_network_attempt(
    no_network: list[Any], saved: dict[str, str], expert: str
) -> None:
    with pytest.raises(FileNotFoundError, match=f"^experts\\[0\\]: '{expert}' {NOT_DOWNLOADED}"):
        FusedGenerator.from_pretrained(saved["large"], saved["small"], [expert])
    assert no_network == []


def test_unknown_tokenizer_hub_id_makes_no_network_attempt(
    no_network: list[Any], saved: dict[str, str]
) -> None:
    name = "dlf-rs-test/no-such-tokenizer"
    with pytest.raises(FileNotFoundError, match=f"^tokenizer: '{name}' {NOT_DOWNLOADED}"):
        FusedGenerator.from_pretrained(saved["large"], tokenizer=name)
    assert no_network == []


def test_local_adapter_without_weights_makes_no_network_attempt(
    no_network: list[Any], saved: dict[str, str], family: Family, tmp_path: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A LoRA adapter directory whose weights are missing: peft would look for them on the hub
    under the directory's name (a relative name is a valid hub id)."""
    peft = pytest.importorskip("peft")
    import copy

    config = peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    adapter = peft.get_peft_model(copy.deepcopy(family.small), config)
    adapter.save_pretrained(tmp_path / "qa_adapter")
    for name in os.listdir(tmp_path / "qa_adapter"):
        if name != "adapter_config.json":
            os.remove(tmp_path / "qa_adapter" / name)
    monkeypatch.chdir(tmp_path)
    with pytest.raises((OSError, ValueError)):
        FusedGenerator.from_pretrained(saved["large"], saved["small"], ["qa_adapter"],
                                       lora_mode="merged")  # fmt: skip
    assert no_network == []
    _restored(monkeypatch)


def test_cli_family_with_unknown_expert_names_the_tasks_offline(
    no_network: list[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["generate", "--family", "default", "--expert", "qaa",
            "--prompt", "question : where does kubrai moulos live ? answer :", "--no-progress"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        "dlf-rs: error: --expert: unknown expert 'qaa'; expected math, qa, summary"
    )
    assert no_network == []


def test_cli_unknown_large_hub_id_fails_offline(
    no_network: list[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["generate", "--large", "dlf-rs-test/no-such-model", "--prompt", "w1", "--method",
            "large", "--no-progress"]  # fmt: skip
    assert main(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"dlf-rs: error: large: 'dlf-rs-test/no-such-model' {NOT_DOWNLOADED}")
    assert "--allow-download" in last
    assert no_network == []


def test_cli_family_with_unknown_hub_expert_fails_offline(
    no_network: list[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """An "owner/name" expert next to --family is the user's own hub id: looked up in the cache
    only, with no request."""
    argv = ["generate", "--family", "default", "--expert", "dlf-rs-test/qa-lora-adapter",
            "--prompt", "question : where does kubrai moulos live ? answer :", "--no-progress"]  # fmt: skip
    assert main(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"experts[0]: 'dlf-rs-test/qa-lora-adapter' {NOT_DOWNLOADED}" in last
    assert no_network == []
