"""dlf_rs.engines.vllm without vLLM: the fused directory, request options, per-row fusion, `dlf-rs serve
--dry-run`. (The engine itself is tested in tests/vllm_serving/ inside the vLLM environment.)"""

from __future__ import annotations

import json
from pathlib import Path

import dlf_rs
import numpy as np
import pytest
from dlf_rs.engines.fusion import fuse_rows
from dlf_rs.engines.vllm import (
    FusedConfigError,
    build_fused_dir,
    load_spec,
    read_alphas,
    request_options,
)
from dlf_rs.engines.vllm.spec import alpha_dir
from dlf_rs.options import StepOptions

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def members(family, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("members")
    out = {}
    for name, model in [("large", family.large), ("small", family.small),
                        ("e0", family.experts[0]), ("e1", family.experts[1])]:  # fmt: skip
        model.save_pretrained(root / name)
        family.tokenizer.save_pretrained(root / name)
        out[name] = root / name
    return out


def test_fused_dir_layout(members, tmp_path) -> None:
    d = build_fused_dir(tmp_path / "f", members["large"], members["small"],
                        [members["e0"], members["e1"]], {"solver": "exact"})  # fmt: skip
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["architectures"] == ["DlfFusedForCausalLM"]
    large_cfg = json.loads((members["large"] / "config.json").read_text())
    assert (
        cfg["hidden_size"] == large_cfg["hidden_size"]
        and cfg["vocab_size"] == large_cfg["vocab_size"]
    )
    sec = cfg["dlf_rs"]
    assert sec["format"] == "dlf_rs.fused/1"
    assert sec["experts"] == [str(members["e0"].resolve()), str(members["e1"].resolve())]
    assert sec["options"]["solver"] == "exact" and sec["options"]["method"] == "dlf"
    assert (d / "tokenizer.json").exists() and (d / "dlf_rs_fused.safetensors").exists()
    spec = load_spec(d)
    assert spec.options == StepOptions(solver="exact") and len(spec.experts) == 2
    assert alpha_dir(spec) == d / "alphas"


def test_fused_dir_refuses_what_vllm_would_fail_on(members, tmp_path) -> None:
    args = (members["large"], members["small"])
    with pytest.raises(FusedConfigError, match=r"^options\.alpha: expected one float or 2"):
        build_fused_dir(tmp_path / "a", *args, [members["e0"], members["e1"]], {"alpha": [1, 2, 3]})
    with pytest.raises(FusedConfigError, match=r"^options\.solver: expected 'grid' or 'exact'"):
        build_fused_dir(tmp_path / "b", *args, [members["e0"]], {"solver": "fast"})
    with pytest.raises(FusedConfigError, match=r"^options\.temperature: unknown DLF option"):
        build_fused_dir(tmp_path / "c", *args, [members["e0"]], {"temperature": 0.5})
    with pytest.raises(FusedConfigError, match=r"^experts: expected at least one"):
        build_fused_dir(tmp_path / "d", *args, [])
    with pytest.raises(FusedConfigError, match=r"^experts\[0\]: .* has no config.json"):
        (tmp_path / "empty").mkdir()
        build_fused_dir(tmp_path / "e", *args, [tmp_path / "empty"])
    with pytest.raises(FusedConfigError, match=r"^experts\[0\]: 'no/such-model' is neither"):
        build_fused_dir(tmp_path / "g", *args, ["no/such-model"])
    other = tmp_path / "other_vocab"
    cfg = json.loads((members["e0"] / "config.json").read_text())
    other.mkdir()
    (other / "config.json").write_text(json.dumps({**cfg, "vocab_size": cfg["vocab_size"] + 1}))
    with pytest.raises(FusedConfigError, match=r"^experts\[0\]: vocabulary size .* differs"):
        build_fused_dir(tmp_path / "h", *args, [other])
    build_fused_dir(tmp_path / "i", *args, [members["e0"]])
    with pytest.raises(FusedConfigError, match=r"^out: .* is not empty"):
        build_fused_dir(tmp_path / "i", *args, [members["e0"]])


def test_request_options_override_the_defaults() -> None:
    d = StepOptions(solver="exact", alpha_range=(0.0, 1.0))
    assert request_options(None, d) == (None, None)
    assert request_options({"other_ext": 1}, d) == (None, None)
    assert request_options({"dlf_alpha_log": "run-1"}, d) == (None, "run-1")
    o, _ = request_options({"dlf_alpha": 1.0}, d, 2)
    assert o == StepOptions(alpha=1.0, solver="exact", alpha_range=(0.0, 1.0))  # static now
    o, _ = request_options({"dlf_support_k": 0, "dlf_multi_expert": "joint"}, d, 2)
    assert o.support_k is None and o.multi_expert == "joint" and o.solver == "exact"
    o, _ = request_options({"dlf_method": "expert", "dlf_expert": 1}, StepOptions(alpha=0.5), 2)
    assert o.method == "expert" and o.expert == 1 and o.alpha is None


def test_a_request_is_checked_once() -> None:
    """The frontend's check and the worker's read of the same request (and requests with the
    same options) share one record; 1, 1.0 and True stay apart, also inside lists."""
    d = StepOptions(solver="exact")
    o, tag = request_options({"dlf_alpha": [1, 0.5], "dlf_alpha_log": "r1"}, d, 2)
    again, tag2 = request_options({"dlf_alpha_log": "r2", "dlf_alpha": [1, 0.5]}, d, 2)
    assert again is o and (tag, tag2) == ("r1", "r2") and o.alpha == (1.0, 0.5)
    assert request_options({"dlf_alpha": [1, 0.5]}, StepOptions(), 2)[0] is not o
    with pytest.raises(FusedConfigError, match=r"^dlf_alpha\[0\]: expected a real number"):
        request_options({"dlf_alpha": [True, 0.5]}, d, 2)
    with pytest.raises(FusedConfigError, match=r"^dlf_support_k: expected an int, got bool"):
        request_options({"dlf_support_k": True}, d, 2)
    assert request_options({"dlf_support_k": 1}, d, 2)[0].support_k == 1


@pytest.mark.parametrize(
    "xargs, message",
    [({"dlf_solver": 3}, r"^dlf_solver: expected one of 'grid', 'exact', got 3"),
     ({"dlf_alpha": "1"}, r"^dlf_alpha: expected a real number"),
     ({"dlf_alpha_range": [1, 0]}, r"^dlf_alpha_range: expected finite"),
     ({"dlf_grid_step": 0}, r"^dlf_grid_step"),
     ({"dlf_support_k": -1}, r"^dlf_support_k"),
     ({"dlf_method": "expert"}, r"^dlf_expert: method='expert' needs"),
     ({"dlf_method": "expert", "dlf_expert": 2}, r"^dlf_expert: expected an expert index in \[0, 2\)"),
     ({"dlf_alpha": [1.0]}, r"^dlf_alpha: expected one float or 2"),
     ({"dlf_temperature": 0.5}, r"^dlf_temperature: unknown DLF option"),
     ({"dlf_alpha_log": "a/b"}, r"^dlf_alpha_log: expected a tag")],
)  # fmt: skip
def test_bad_request_options_name_the_field(xargs, message) -> None:
    with pytest.raises(FusedConfigError, match=message):
        request_options(xargs, StepOptions(), 2)


def test_fuse_rows_equals_each_row_alone_and_numpy(family) -> None:
    """A batch mixing methods equals each row fused on its own; static rows equal numpy."""
    rng = np.random.default_rng(0)
    b, v = 6, 300
    zl, zs = (
        rng.normal(0, 3, (b, v)).astype(np.float32),
        rng.normal(0, 3, (b, v)).astype(np.float32),
    )
    ze = [zs + rng.normal(0, 1, (b, v)).astype(np.float32) for _ in range(2)]
    rows = [StepOptions(), StepOptions(alpha=(0.5, 1.5)), StepOptions(method="large"),
            StepOptions(method="expert", expert=1), StepOptions(), StepOptions(solver="exact")]  # fmt: skip
    fused, alphas = fuse_rows(torch.from_numpy(zl), torch.from_numpy(zs),
                              [torch.from_numpy(e) for e in ze], rows)  # fmt: skip
    assert isinstance(fused, torch.Tensor) and fused.dtype == torch.float32
    fused = fused.numpy()
    np.testing.assert_array_equal(fused[2], zl[2])
    np.testing.assert_array_equal(fused[3], ze[1][3])
    assert np.isnan(alphas[2]).all() and np.isnan(alphas[3]).all()
    want = zl[1] + 0.5 * (ze[0][1] - zs[1]) + 1.5 * (ze[1][1] - zs[1])
    np.testing.assert_allclose(fused[1], want, rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(alphas[1], [0.5, 1.5])
    for i in (0, 4, 5):
        one = dlf_rs.fuse_step(zl[i : i + 1], zs[i : i + 1], [e[i : i + 1] for e in ze],
                               solver=rows[i].solver)  # fmt: skip
        np.testing.assert_array_equal(alphas[i], one.alphas[0])
        np.testing.assert_array_equal(
            fused[i], dlf_rs.fuse_logits(zl[i : i + 1], zs[i : i + 1], [e[i : i + 1] for e in ze],
                                         one.alphas)[0])  # fmt: skip
        assert int(np.argmax(fused[i])) == int(one.tokens[0])  # greedy: the generator's token
    with pytest.raises(ValueError, match="row_options: expected 6 records"):
        fuse_rows(zl, zs, ze, rows[:2])


def test_read_alphas_orders_steps_and_keeps_the_last(members, tmp_path) -> None:
    d = build_fused_dir(tmp_path / "f", members["large"], members["small"], [members["e0"]])
    (d / "alphas").mkdir()
    lines = [
        {"step": 1, "alphas": [0.2]},
        {"step": 0, "alphas": [0.9]},
        {"step": 0, "alphas": [0.1]},
    ]
    (d / "alphas" / "t.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert read_alphas(d, "t") == [[0.1], [0.2]]
    with pytest.raises(FileNotFoundError, match="tag: no alphas logged under 'u'"):
        read_alphas(d, "u")
    with pytest.raises(FusedConfigError, match="tag: expected"):
        read_alphas(d, "../t")


def test_serve_dry_run_writes_the_directory(tmp_path, capsys) -> None:
    import sys

    from dlf_rs.cli import main

    sys.path.insert(0, str(Path(__file__).parent / "vllm_serving"))
    from family import build_family  # head sizes 64 and 32: accepted by vLLM's CPU attention

    m = build_family(tmp_path / "m", experts=1)
    out = tmp_path / "served"
    rc = main(["serve", "--large", str(m["large"]), "--small", str(m["small"]),
               "--expert", str(m["expert0"]), "--alpha", "1.0", "--fused-dir", str(out),
               "--dry-run", "--", "--port", "8123"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 0, err
    assert load_spec(out).options == StepOptions(alpha=1.0)
    assert f"DLF_RS_FUSED_DIR={out}" in err
    assert "--logits-processors dlf_rs.engines.vllm.logits:DlfLogitsProcessor" in err
    assert err.rstrip().endswith("--port 8123")
    assert main(["serve", "--large", str(m["large"]), "--expert", str(m["expert0"])]) == 2
    assert "--small: required" in capsys.readouterr().err
    if not torch.cuda.is_available():  # the shipped family (head size 24) is named, not started
        assert main(["serve", "--family", "default", "--expert", "qa", "--dry-run",
                     "--fused-dir", str(tmp_path / "toy")]) == 2  # fmt: skip
        assert "--large: head size 24 is refused by vLLM's CPU attention" in capsys.readouterr().err


def test_lora_expert_is_merged_into_the_directory(members, family, tmp_path) -> None:
    """vLLM members are plain models: a LoRA adapter expert is merged (lambda 1) into
    experts/expert{t}, equal to peft's own merge."""
    peft = pytest.importorskip("peft")
    import copy

    from safetensors.torch import load_file

    small = copy.deepcopy(family.small)
    cfg = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    torch.manual_seed(0)
    model = peft.get_peft_model(small, cfg)
    model.save_pretrained(tmp_path / "adapter")
    d = build_fused_dir(tmp_path / "f", members["large"], members["small"],
                        [members["e0"], tmp_path / "adapter"])  # fmt: skip
    spec = load_spec(d)
    assert spec.experts[1] == "experts/expert1" and spec.resolve(spec.experts[1]) == str(
        d / "experts/expert1"
    )
    merged = load_file(str(d / "experts/expert1/model.safetensors"))
    want = model.merge_and_unload().state_dict()
    for k, v in merged.items():
        torch.testing.assert_close(v, want[k], rtol=1e-5, atol=1e-6)
    assert (d / "experts/expert1/config.json").exists()


def test_cpu_kv_cache_default_fits_the_free_memory() -> None:
    """dlf-rs serve on a CPU sizes vLLM's KV cache from the memory free at start (vLLM's CPU
    build otherwise wants 0.92 of the node and refuses to start beside anything else)."""
    from dlf_rs.engines.vllm.serve import FusedConfigError, GiB, cpu_kv_cache_bytes

    assert cpu_kv_cache_bytes(22 * GiB, GiB // 2) == 4 * GiB  # the default, whole GiB
    assert cpu_kv_cache_bytes(6 * GiB, GiB) == 2 * GiB  # (6 - 2) / 2
    assert cpu_kv_cache_bytes(int(5.9 * GiB), GiB) == GiB  # rounded down to whole GiB
    with pytest.raises(FusedConfigError, match=r"^serve: only 2\.5 GiB of memory is free"):
        cpu_kv_cache_bytes(int(2.5 * GiB), GiB)


def _cpu_dry_run_argv(tmp_path: Path) -> list[str]:
    """``dlf-rs serve --dry-run`` arguments on the tests' tiny family (skips where there is
    CUDA: these defaults are for machines without it), ending with ``--``."""
    import sys

    if torch.cuda.is_available():
        pytest.skip("the default is for machines without CUDA")
    sys.path.insert(0, str(Path(__file__).parent / "vllm_serving"))
    from family import build_family

    m = build_family(tmp_path / "m", experts=1)
    return ["serve", "--large", str(m["large"]), "--small", str(m["small"]), "--expert",
            str(m["expert0"]), "--fused-dir", str(tmp_path / "f"), "--dry-run", "--"]  # fmt: skip


def test_serve_dry_run_says_the_cpu_kv_cache_it_chose(tmp_path, capsys, monkeypatch) -> None:
    from dlf_rs.cli import main

    argv = _cpu_dry_run_argv(tmp_path)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    assert main([*argv, "--port", "8123"]) == 0
    err = capsys.readouterr().err
    assert "dlf-rs serve: no CUDA: KV cache " in err
    size = int(err.split("--kv-cache-memory-bytes ")[-1].split()[0])
    assert size % (1 << 30) == 0 and 1 << 30 <= size <= 4 << 30
    assert err.rstrip().endswith("--port 8123")  # the caller's arguments come last
    for chosen in (["--kv-cache-memory-bytes", "1000000"], ["--gpu-memory-utilization=0.5"]):
        assert main([*argv, *chosen]) == 0
        err = capsys.readouterr().err
        assert "KV cache" not in err and err.count("--kv-cache-memory-bytes") <= 1
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "2")
    assert main(argv) == 0
    assert "KV cache" not in capsys.readouterr().err


def test_serve_is_eager_on_a_cpu_unless_the_caller_chooses(capsys) -> None:
    """dlf-rs serve adds --enforce-eager where there is no CUDA (compiling every member takes
    minutes on a CPU, docs/vllm.md "Start time"), and nothing where the caller's vllm serve
    arguments choose compiled or eager in any of vLLM's spellings, or where there is CUDA."""
    from dlf_rs.engines.vllm.serve import chooses_compilation, compile_arguments

    assert compile_arguments(["--port", "8000", "--max-model-len", "1024"], cuda=False) == [
        "--enforce-eager"
    ]
    assert "dlf-rs serve: no CUDA: eager (--enforce-eager)" in capsys.readouterr().err
    assert compile_arguments([], cuda=True) == []
    assert capsys.readouterr().err == ""
    chosen = [
        ["--enforce-eager"],
        ["--no-enforce-eager"],
        ["--enforce_eager"],
        ["--compilation-config", '{"mode": 3}'],
        ['--compilation-config={"mode": 3}'],
        ["--compilation-config.mode=3"],
        ["--compilation_config.mode", "3"],
        ["-cc", '{"mode": 0}'],
        ["-cc.mode=0"],
        ["--optimization-level", "3"],
        ["--optimization-level=0"],
        ["-O3"],
        ["-O", "0"],
        ["-O=1"],
    ]
    for rest in chosen:
        assert chooses_compilation(["--port", "8000", *rest]), rest
        assert compile_arguments(["--port", "8000", *rest], cuda=False) == [], rest
    assert capsys.readouterr().err == ""
    # Values and other flags that merely contain the words do not count as a choice.
    for rest in (["--served-model-name", "--enforce-eager-model"], ["--model-impl", "vllm"],
                 ["--seed", "0", "--max-num-seqs", "4"], ["--port", "8000"]):  # fmt: skip
        assert not chooses_compilation(rest), rest


def test_serve_gives_a_small_cpu_machine_all_its_cpus(capsys) -> None:
    """On a machine without CUDA with at most 2 CPUs dlf-rs serve sets
    VLLM_CPU_NUM_OF_RESERVED_CPU=0 (vLLM would keep one of the two for its engine process) and
    says so; nothing with CUDA, with more CPUs, or where the caller chose (the variable, or a
    thread binding of their own)."""
    from dlf_rs.engines.vllm.serve import cpu_reservation_env

    for cpus in (1, 2):
        assert cpu_reservation_env({}, cuda=False, cpus=cpus) == {
            "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}, cpus  # fmt: skip
        assert "VLLM_CPU_NUM_OF_RESERVED_CPU=0" in capsys.readouterr().err
    auto = {"VLLM_CPU_OMP_THREADS_BIND": "auto"}
    assert cpu_reservation_env(auto, cuda=False, cpus=2) == {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    capsys.readouterr()
    for env, cuda, cpus in (({}, True, 2), ({}, False, 3), ({}, False, 64),
                            ({"VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}, False, 2),
                            ({"VLLM_CPU_OMP_THREADS_BIND": "0-1"}, False, 2),
                            ({"VLLM_CPU_OMP_THREADS_BIND": "nobind"}, False, 2)):  # fmt: skip
        assert cpu_reservation_env(env, cuda=cuda, cpus=cpus) == {}, (env, cuda, cpus)
    assert capsys.readouterr().err == ""


def test_serve_dry_run_is_eager_on_a_cpu(tmp_path, capsys) -> None:
    from dlf_rs.cli import main

    argv = _cpu_dry_run_argv(tmp_path)
    assert main([*argv, "--port", "8123"]) == 0
    cmd = capsys.readouterr().err.strip().splitlines()[-1].split()
    assert cmd.count("--enforce-eager") == 1 and cmd[-2:] == ["--port", "8123"]
    assert main([*argv, "--no-enforce-eager"]) == 0
    cmd = capsys.readouterr().err.strip().splitlines()[-1].split()
    assert "--enforce-eager" not in cmd and cmd[-1] == "--no-enforce-eager"
