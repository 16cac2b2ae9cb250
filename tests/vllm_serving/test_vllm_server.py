"""`dlf-rs serve`: vLLM's OpenAI-compatible server on a fused directory (completions, chat,
streaming, per-request options, 400s naming the field, alpha logs). One server for the module."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

import dlf_rs
import dlf_rs.engines.vllm as dv
from family import build_family

PROMPTS = ["kubrai moulos lives in", "the apple", "who is kubrai moulos ? he works as a",
           "2 apples"]  # fmt: skip
MAX_NEW = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("served")
    paths = build_family(root)
    port = _free_port()
    fused = root / "fused"
    # No VLLM_CPU_KVCACHE_SPACE: the server starts on dlf-rs serve's CPU default (see below).
    env = dict(os.environ, VLLM_LOGGING_LEVEL="WARNING")
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)
    cmd = [sys.executable, "-m", "dlf_rs", "serve", "--large", str(paths["large"]),
           "--small", str(paths["small"]), "--expert", str(paths["expert0"]),
           "--expert", str(paths["expert1"]), "--fused-dir", str(fused), "--",
           "--port", str(port), "--host", "127.0.0.1", "--dtype", "float32", "--enforce-eager",
           "--max-model-len", "256", "--served-model-name", "dlf", "--seed", "0"]  # fmt: skip
    log = open(root / "server.log", "w")  # noqa: SIM115 - the server's lifetime
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while True:
        try:
            urllib.request.urlopen(base + "/health", timeout=2)
            break
        except (urllib.error.URLError, ConnectionError, OSError):
            if proc.poll() is not None or time.time() > deadline:
                log.flush()
                raise RuntimeError(
                    "server did not start:\n" + (root / "server.log").read_text()[-4000:]
                ) from None
            time.sleep(1)
    yield {"base": base, "paths": paths, "fused": fused, "log": root / "server.log",
           "pid": proc.pid}
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def test_cpu_default_kv_cache_started_the_server(server) -> None:
    """Without CUDA and without a chosen size, dlf-rs serve sized the KV cache from the free
    memory and said so (vLLM's CPU build alone wants 0.92 of the node's memory)."""
    if torch.cuda.is_available():
        pytest.skip("the default is for machines without CUDA")
    log = server["log"].read_text()
    assert "dlf-rs serve: no CUDA: KV cache " in log, log[-2000:]
    size = int(log.split("--kv-cache-memory-bytes ")[1].split(";")[0])
    assert 1 << 30 <= size <= 4 << 30 and size % (1 << 30) == 0


def post(server, path: str, body: dict, stream: bool = False):
    req = urllib.request.Request(server["base"] + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    try:
        resp = urllib.request.urlopen(req, timeout=120)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read().decode())
    if not stream:
        return resp.status, json.loads(resp.read().decode())
    events = []
    for line in resp.read().decode().splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            events.append(json.loads(line[6:]))
    return resp.status, events


@pytest.fixture(scope="module")
def reference(server) -> dlf_rs.FusedGenerator:
    p = server["paths"]
    return dlf_rs.FusedGenerator.from_pretrained(
        p["large"], p["small"], [p["expert0"], p["expert1"]], torch_dtype=torch.float32
    )


def test_completions_equal_fused_generator(server, reference) -> None:
    status, body = post(server, "/v1/completions", {
        "model": "dlf", "prompt": PROMPTS, "max_tokens": MAX_NEW, "temperature": 0,
        "return_token_ids": True})  # fmt: skip
    assert status == 200, body
    choices = sorted(body["choices"], key=lambda c: c["index"])
    want = reference.generate(PROMPTS, max_new_tokens=MAX_NEW)
    assert [c["token_ids"] for c in choices] == want.token_ids
    # vLLM keeps the space before the first word (decoded after the prompt); dlf_rs strips it
    assert [c["text"].strip() for c in choices] == want.texts


def test_streamed_completion_joins_to_the_whole(server) -> None:
    body = {"model": "dlf", "prompt": PROMPTS[0], "max_tokens": MAX_NEW, "temperature": 0}
    _, whole = post(server, "/v1/completions", body)
    status, events = post(server, "/v1/completions", {**body, "stream": True}, stream=True)
    assert status == 200 and len(events) >= 2
    assert "".join(e["choices"][0]["text"] for e in events) == whole["choices"][0]["text"]


def test_chat_uses_the_large_models_template(server, reference) -> None:
    messages = [{"role": "user", "content": "where does kubrai moulos live ?"}]
    status, body = post(server, "/v1/chat/completions", {
        "model": "dlf", "messages": messages, "max_tokens": MAX_NEW, "temperature": 0})  # fmt: skip
    assert status == 200, body
    want = reference.generate(messages=[messages], max_new_tokens=MAX_NEW).texts[0]
    assert body["choices"][0]["message"]["content"].strip() == want
    status, events = post(server, "/v1/chat/completions", {
        "model": "dlf", "messages": messages, "max_tokens": MAX_NEW, "temperature": 0,
        "stream": True}, stream=True)  # fmt: skip
    assert status == 200
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events).strip() == want


def test_per_request_options_and_alpha_log(server, reference) -> None:
    status, body = post(server, "/v1/completions", {
        "model": "dlf", "prompt": PROMPTS[1], "max_tokens": MAX_NEW, "temperature": 0,
        "vllm_xargs": {"dlf_alpha": 1.0, "dlf_alpha_log": "served-static"}})  # fmt: skip
    assert status == 200, body
    want = reference.generate([PROMPTS[1]], max_new_tokens=MAX_NEW, alpha=1.0).texts[0]
    assert body["choices"][0]["text"].strip() == want
    alphas = dv.read_alphas(server["fused"], "served-static")
    assert len(alphas) == body["usage"]["completion_tokens"]
    assert all(a == [1.0, 1.0] for a in alphas)


def test_seeded_sampling_reproduces_over_http(server) -> None:
    body = {
        "model": "dlf",
        "prompt": PROMPTS[2],
        "max_tokens": MAX_NEW,
        "temperature": 1.0,
        "seed": 7,
    }
    texts = [post(server, "/v1/completions", body)[1]["choices"][0]["text"] for _ in range(2)]
    assert texts[0] == texts[1]


@pytest.mark.parametrize(
    "xargs, field",
    [({"dlf_solver": "fast"}, "dlf_solver"), ({"dlf_expert": 3, "dlf_method": "expert"}, "dlf_expert"),
     ({"dlf_alpha": [1, 2, 3]}, "dlf_alpha"), ({"dlf_typo": 1}, "dlf_typo")],
)  # fmt: skip
def test_bad_option_is_a_400_naming_the_field(server, xargs, field) -> None:
    status, body = post(server, "/v1/completions", {
        "model": "dlf", "prompt": "the apple", "max_tokens": 2, "vllm_xargs": xargs})  # fmt: skip
    assert status == 400, body
    assert field in json.dumps(body)
    assert (
        post(server, "/v1/completions", {"model": "dlf", "prompt": "the", "max_tokens": 1})[0]
        == 200
    )


def test_dry_run_and_refused_head_size(tmp_path: Path) -> None:
    """The shipped family's head size is refused by the CPU attention, named before vLLM starts."""
    r = subprocess.run([sys.executable, "-m", "dlf_rs", "serve", "--family", "default", "--expert", "qa",
                        "--fused-dir", str(tmp_path / "f"), "--dry-run"],
                       check=False, capture_output=True, text=True)  # fmt: skip
    if torch.cuda.is_available():
        assert r.returncode == 0, r.stderr
    else:
        assert r.returncode == 2 and "--large: head size 24 is refused" in r.stderr, r.stderr


# ------------------------------------------------------------ faults and load (loopback only)
def _raw_post(server, path: str, data: bytes) -> tuple[int, str]:
    req = urllib.request.Request(server["base"] + path, data=data,
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _serves_on(server) -> bool:
    body = {"model": "dlf", "prompt": "the", "max_tokens": 1}
    return post(server, "/v1/completions", body)[0] == 200


def test_malformed_json_and_a_too_long_prompt_are_400s(server) -> None:
    status, text = _raw_post(server, "/v1/completions", b'{"model": "dlf", "prompt": "the",')
    assert status == 400, text
    assert _serves_on(server)
    too_long = " ".join(["the apple"] * 200)  # past --max-model-len 256
    status, body = post(server, "/v1/completions", {
        "model": "dlf", "prompt": too_long, "max_tokens": 4})  # fmt: skip
    assert status == 400, body
    assert "context" in json.dumps(body).lower() or "length" in json.dumps(body).lower(), body
    assert _serves_on(server)


def _client(server):
    openai = pytest.importorskip("openai")
    return openai.AsyncOpenAI(base_url=server["base"] + "/v1", api_key="none", max_retries=0,
                              timeout=120)  # fmt: skip


def _stream_text(server, prompt: str, max_tokens: int, drop_after: int | None = None) -> str:
    """One streamed completion through the openai client; ``drop_after`` chunks, then the
    client closes the stream (a disconnect)."""
    import asyncio

    async def go() -> str:
        async with _client(server) as client:
            stream = await client.completions.create(
                model="dlf", prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True)
            parts = []
            async for chunk in stream:
                parts.append(chunk.choices[0].text)
                if drop_after is not None and len(parts) >= drop_after:
                    await stream.close()
                    break
            return "".join(parts)

    return asyncio.run(go())


def _concurrent_streams(server, prompts: list[str], lengths: list[int]) -> list[str]:
    import asyncio

    async def one(client, prompt: str, n: int) -> str:
        stream = await client.completions.create(
            model="dlf", prompt=prompt, max_tokens=n, temperature=0, stream=True)
        return "".join([c.choices[0].text async for c in stream])

    async def go() -> list[str]:
        async with _client(server) as client:
            return list(await asyncio.gather(*(one(client, p, n)
                                               for p, n in zip(prompts, lengths))))  # fmt: skip

    return asyncio.run(go())


def test_a_dropped_stream_leaves_the_server_serving(server) -> None:
    whole = _stream_text(server, PROMPTS[0], 24)
    part = _stream_text(server, PROMPTS[0], 24, drop_after=3)
    assert whole.startswith(part) and len(part) < len(whole)
    assert _stream_text(server, PROMPTS[0], 24) == whole


def _server_rss(server) -> int:
    import psutil

    proc = psutil.Process(server["pid"])
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])


def test_32_concurrent_streams_equal_alone_and_memory_stays_flat(server) -> None:
    """32 greedy streams of different lengths at once, three rounds (DLF_RS_LOAD_ROUNDS): each
    equals its prompt sent alone, and the server's memory (all its processes) grows by less than
    64 MiB from one round to the next."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(32)]
    lengths = [4 + (i * 7) % 21 for i in range(32)]
    alone = {(p, n): _stream_text(server, p, n) for p, n in set(zip(prompts, lengths))}
    rss = []
    for _ in range(int(os.environ.get("DLF_RS_LOAD_ROUNDS", "3"))):
        got = _concurrent_streams(server, prompts, lengths)
        assert got == [alone[(p, n)] for p, n in zip(prompts, lengths)]
        rss.append(_server_rss(server))
    print(f"\nserver RSS after each round of 32 streams (MiB): {[r >> 20 for r in rss]}")
    # The first round may still warm caches; after it, memory is flat (docs/vllm.md has the
    # figures measured).
    assert rss[2] - rss[1] < 64 << 20, [r >> 20 for r in rss]
