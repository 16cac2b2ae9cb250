"""The wheel users install: ``make wheel`` builds a manylinux2014 (glibc 2.17) abi3 wheel with zig
and an sdist into target/wheels/; the wheel must install and work in a fresh virtual environment
that holds numpy only.

The wheel is rebuilt only when a source file is newer than it (a cold zig build is ~1 minute on
two cores). The fresh environment gets numpy at the version this one has (from pip's cache when
it is there, else from PyPI), then the wheel with ``--no-deps``; the checks run there in a
subprocess: the decode core against numpy, and the driver's clear ImportError without torch.
Skipped without the build toolchain (cargo, make, maturin, zig), except under CI, where a missing
toolchain is a failure: the Makefile installs maturin and ziglang into the venv.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / "target" / "wheels"
SOURCES = ["Cargo.toml", "Cargo.lock", "pyproject.toml", "Makefile", "rust", "python/dlf_rs"]
TAG = "cp310-abi3-manylinux2014_x86_64.manylinux_2_17_x86_64"


def _missing_toolchain() -> str | None:
    bindir = Path(sys.executable).parent
    for tool in ("cargo", "make"):
        if shutil.which(tool) is None:
            return f"{tool} is not on PATH"
    if not (bindir / "maturin").is_file():
        return f"maturin is not installed in {bindir.parent} (make venv installs it)"
    zig = subprocess.run(
        [sys.executable, "-m", "ziglang", "version"], check=False, capture_output=True
    )
    if zig.returncode != 0:
        return f"zig is not installed in {bindir.parent} (pip install ziglang; make venv does)"
    return None


def _newest_source_mtime() -> float:
    newest = 0.0
    for name in SOURCES:
        path = ROOT / name
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        for f in files:
            if "__pycache__" not in f.parts and f.suffix not in (".so", ".pyd"):
                newest = max(newest, f.stat().st_mtime)
    return newest


def _built(fresh: bool) -> tuple[Path, Path] | None:
    """The newest wheel and sdist; with ``fresh`` only when no source is newer than them."""
    wheels = sorted(WHEELS.glob(f"dlf_rs-*-{TAG}.whl"), key=lambda p: p.stat().st_mtime)
    sdists = sorted(WHEELS.glob("dlf_rs-*.tar.gz"), key=lambda p: p.stat().st_mtime)
    if not wheels or not sdists:
        return None
    if (
        fresh
        and min(wheels[-1].stat().st_mtime, sdists[-1].stat().st_mtime) < _newest_source_mtime()
    ):
        return None
    return wheels[-1], sdists[-1]


def _skip_outside_ci(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"the wheel test must run in CI, but: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def artifacts() -> tuple[Path, Path]:
    """(wheel, sdist) from ``make wheel``, rebuilt only when a source is newer."""
    reason = _missing_toolchain()
    if reason is not None:
        _skip_outside_ci(f"no wheel build toolchain: {reason}")
    built = _built(fresh=True)
    if built is None:
        venv = Path(sys.executable).parent.parent
        proc = subprocess.run(
            ["make", "-s", "wheel", f"VENV={venv}"],
            cwd=ROOT,
            check=False,
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, (
            f"make wheel failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        )
        built = _built(fresh=False)  # a source edited during the build is not its fault
        assert built is not None, f"make wheel left no {TAG} wheel and sdist in {WHEELS}"
    return built


def test_wheel_is_manylinux2014_abi3(artifacts: tuple[Path, Path]) -> None:
    wheel, _ = artifacts
    with zipfile.ZipFile(wheel) as zf:
        meta = zf.read(next(n for n in zf.namelist() if n.endswith(".dist-info/WHEEL")))
        names = zf.namelist()
    tags = [
        line.split(": ", 1)[1] for line in meta.decode().splitlines() if line.startswith("Tag:")
    ]
    assert tags == ["cp310-abi3-manylinux2014_x86_64", "cp310-abi3-manylinux_2_17_x86_64"], tags
    assert "dlf_rs/_core.abi3.so" in names
    assert any(n.startswith("dlf_rs/family/checkpoints/") for n in names)


def test_sdist_holds_the_sources(artifacts: tuple[Path, Path]) -> None:
    _, sdist = artifacts
    with tarfile.open(sdist) as tf:
        names = [n.split("/", 1)[1] for n in tf.getnames() if "/" in n]
    assert "Cargo.toml" in names and "pyproject.toml" in names
    assert any(n.startswith("rust/") and n.endswith(".rs") for n in names)
    assert "python/dlf_rs/__init__.py" in names
    assert not [n for n in names if n.startswith((".venv", "target/"))]  # no build leftovers


CHECKS = textwrap.dedent(
    """
    import sys
    import numpy as np
    import dlf_rs

    print(dlf_rs.__file__, flush=True)
    assert "torch" not in sys.modules, "import dlf_rs imported torch"
    rng = np.random.default_rng(0)
    large, small, expert = (rng.standard_normal((4, 97)).astype(np.float32) for _ in range(3))
    res = dlf_rs.fuse_step(large, small, [expert], alpha=0.7)
    want = np.argmax(large + np.float32(0.7) * (expert - small), axis=-1)
    assert res.tokens.tolist() == want.tolist(), (res.tokens, want)
    dyn = dlf_rs.fuse_step(large, small, [expert])  # the solver path, greedy
    assert dyn.tokens.shape == (4,) and dyn.alphas.shape == (4, 1)
    for name in ("FusedGenerator", "GenerationResult"):
        getattr(dlf_rs, name)  # GenerationResult is numpy-only; FusedGenerator must raise
    """
)


def test_wheel_installs_and_runs_in_a_fresh_numpy_only_venv(
    artifacts: tuple[Path, Path], tmp_path: Path
) -> None:
    wheel, _ = artifacts
    env = dict(os.environ)
    for key in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"):
        env.pop(key, None)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=env)
    py = str(venv / "bin" / "python")
    pip = [py, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    proc = subprocess.run(
        [*pip, f"numpy=={np.__version__}"], check=False, capture_output=True, text=True, env=env
    )
    if proc.returncode != 0:
        _skip_outside_ci(f"numpy could not be installed in a fresh venv: {proc.stderr[-500:]}")
    subprocess.run([*pip, "--no-deps", str(wheel)], check=True, env=env)
    run = subprocess.run(
        [py, "-c", CHECKS], check=False, capture_output=True, text=True, env=env, cwd=tmp_path
    )  # cwd: not the checkout, so `import dlf_rs` is the installed wheel
    err = run.stderr
    assert "AssertionError" not in err, err
    assert run.stdout.strip().startswith(str(venv)), f"dlf_rs imported from {run.stdout!r}"
    assert run.returncode != 0, "FusedGenerator did not raise without torch"
    last = err.strip().splitlines()[-1]
    assert last.startswith("ImportError: dlf_rs.FusedGenerator needs torch"), err
    assert 'pip install "dlf_rs[generate]"' in last, err
    # The rest of the lazy names: numpy-only ones import, torch-bound ones name the extra.
    probe = subprocess.run(
        [py, "-c", PROBE], check=True, capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert probe.stdout.splitlines() == PROBE_WANT, probe.stdout


PROBE = textwrap.dedent(
    """
    import dlf_rs

    for name in ("GenerationResult", "plotting", "merge", "FusedGenerator"):
        try:
            getattr(dlf_rs, name)
            print(name, "ok")
        except ImportError as err:
            print(name, type(err).__name__, err)
    """
)
NEEDS_TORCH = (
    'needs torch, which is not installed: pip install "dlf_rs[generate]" (the decode core, '
    "dlf_rs.fuse_step and dlf_rs.fuse_logits, needs only numpy)"
)
PROBE_WANT = [
    "GenerationResult ok",
    "plotting ok",
    f"merge ImportError dlf_rs.merge {NEEDS_TORCH}",
    f"FusedGenerator ImportError dlf_rs.FusedGenerator {NEEDS_TORCH}",
]


def test_driver_without_torch_names_the_extra() -> None:
    """The same messages from the checkout with torch hidden (runs without the wheel toolchain)."""
    code = 'import sys; sys.modules["torch"] = None\n' + PROBE
    probe = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT
    )
    assert probe.stdout.splitlines() == PROBE_WANT, probe.stdout
