"""``dlf-rs serve``: build a fused directory from --large/--small/--expert (or --family) and
start vLLM's OpenAI-compatible server on it, with the DLF logits processor (without it under
speculative decoding, ``-- --speculative-config ...``: vLLM refuses custom logits processors then,
so every request is fused with the default options and ``dlf_*`` request options get a 400).

Every argument after ``--`` goes to ``vllm serve`` unchanged (``--port``, ``--dtype``,
``--tensor-parallel-size``, ``--max-model-len``, ...). Requests take DLF options in their extra
body: ``{"vllm_xargs": {"dlf_alpha": 1.0, "dlf_alpha_log": "run-7"}}`` (dlf_rs.engines.vllm.spec lists
them); a bad value is answered with HTTP 400 naming the field.

On a machine without CUDA the server starts eager (``--enforce-eager``) unless the arguments
after ``--`` choose compiled or eager themselves (:func:`compile_arguments`, docs/vllm.md "Start
time"), and on one with 2 CPUs or fewer the model's threads get every CPU
(:func:`cpu_reservation_env`, docs/vllm.md "CPU threads").

On SIGTERM or SIGINT the server drains: in-flight requests get ``--shutdown-timeout`` seconds
(vLLM's flag; :data:`.shutdown.DEFAULT_GRACE_S` unless given after ``--``), new ones an HTTP 503,
and a second signal stops it at once (:mod:`.shutdown`, docs/vllm.md "Shutdown").
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from ...flags import (
    add_fusion_flags,
    add_member_flags,
    fusion_fields,
    member_sources,
    step_options,
)
from .shutdown import DEFAULT_GRACE_S
from .spec import FUSED_DIR_ENV, FusedConfigError, build_fused_dir
from .state import PROCESSOR

# vLLM's CPU attention (vllm.v1.attention.backends.cpu_attn, 0.32); checked before starting so
# that a refused member is named here instead of deep inside vLLM's engine start.
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)

GiB = 1 << 30
# The KV cache dlf-rs serve asks for on a machine without CUDA when the caller chose none (vLLM's
# CPU build otherwise reserves 0.92 of the node's memory and refuses to start when anything else
# uses memory): 4 GiB (vLLM's own former CPU default), or less where the memory free at start,
# after twice the members' weight files (loaded, and possibly upcast), leaves less than twice it.
CPU_KV_CACHE_DEFAULT = 4 * GiB
# vllm serve arguments (and the environment variable) by which the caller chose the cache size.
_KV_CHOICES = ("--kv-cache-memory-bytes", "--gpu-memory-utilization")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    m = parser.add_argument_group("models")
    add_member_flags(
        m,
        expert_help="small expert checkpoint (full weights or a LoRA adapter, "
        "merged into the fused directory; with --family a task name); repeat",
    )
    m.add_argument("--allow-download", action="store_true",
                   help="let hub ids be downloaded (default: the local cache only)")  # fmt: skip
    add_fusion_flags(
        parser.add_argument_group("default DLF options (each request may override them)")
    )
    parser.add_argument("--fused-dir", default=None,
                        help="where to write the fused directory (default: ~/.cache/dlf_rs/fused/"
                        "<hash of the members and options>)")  # fmt: skip
    parser.add_argument("--dry-run", action="store_true",
                        help="write the directory and print the vllm command; start nothing")  # fmt: skip
    parser.add_argument("vllm_args", nargs=argparse.REMAINDER,
                        help="-- then arguments for `vllm serve` (e.g. -- --port 8000); "
                        f"--shutdown-timeout S (default here {DEFAULT_GRACE_S}) is how long "
                        "in-flight requests may run on after SIGTERM/SIGINT")  # fmt: skip


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """The default options given as flags, checked (a bad value names its flag)."""
    fields = fusion_fields(args)
    step_options(fields)
    return fields


def _sources(args: argparse.Namespace) -> tuple[str, str, list[str]]:
    large, small, experts = member_sources(args)
    if small is None:
        raise FusedConfigError("--small: required: the small base the experts were tuned from")
    if not experts:
        raise FusedConfigError("--expert: at least one expert is required")
    return large, small, experts


def check_head_sizes(fused_dir: Path) -> None:
    """On a machine without CUDA, refuse members whose head size vLLM's CPU attention refuses."""
    import torch

    if torch.cuda.is_available():
        return
    section = json.loads((fused_dir / "config.json").read_text())["dlf_rs"]
    members = [("--large", section["large"]), ("--small", section["small"])] + [
        (f"--expert {e}", e) for e in section["experts"]
    ]
    for arg, src in members:
        cfg_path = Path(src) / "config.json"
        if not cfg_path.exists():
            continue  # a hub id: vLLM resolves and checks it
        cfg = json.loads(cfg_path.read_text())
        head = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        if head not in CPU_HEAD_SIZES:
            raise FusedConfigError(
                f"{arg}: head size {head} is refused by vLLM's CPU attention (it takes "
                f"{', '.join(map(str, CPU_HEAD_SIZES))}), so the shipped toy family (head size 24) "
                "cannot serve on a CPU (GPU attention backends were not tested); serve a family "
                "with supported head sizes (docs/vllm.md, 'Which families serve')"
            )


def cpu_kv_cache_bytes(available: int, weights: int) -> int:
    """The CPU default KV cache size in whole GiB (``CPU_KV_CACHE_DEFAULT`` at most, half of
    what ``available`` bytes leave after twice the ``weights``); at least 1 GiB, else an error
    that says how much is free."""
    room = (available - 2 * weights) // 2
    gib = min(CPU_KV_CACHE_DEFAULT, room) // GiB
    if gib < 1:
        raise FusedConfigError(
            f"serve: only {available / GiB:.1f} GiB of memory is free and the members' weights "
            f"take {weights / GiB:.1f} GiB: no room for a 1 GiB KV cache; free memory, or choose "
            "the size with -- --kv-cache-memory-bytes N (or VLLM_CPU_KVCACHE_SPACE=GiB)"
        )
    return int(gib * GiB)


def _weights_bytes(fused_dir: Path) -> int:
    """The members' weight files' bytes (local directories; hub ids count 0)."""
    section = json.loads((fused_dir / "config.json").read_text())["dlf_rs"]
    dirs = [section["large"], section["small"], *section["experts"]]
    return sum(f.stat().st_size for d in dirs if Path(d).is_dir()
               for f in Path(d).glob("*.safetensors"))  # fmt: skip


def kv_cache_arguments(fused_dir: Path, rest: list[str], env: dict[str, str]) -> list[str]:
    """``--kv-cache-memory-bytes N`` for vllm serve on a machine without CUDA when neither the
    arguments nor ``VLLM_CPU_KVCACHE_SPACE`` choose the cache size; says what it chose."""
    import torch

    chosen = any(a.split("=")[0] in _KV_CHOICES for a in rest)
    if torch.cuda.is_available() or chosen or env.get("VLLM_CPU_KVCACHE_SPACE", "") != "":
        return []
    import psutil  # vLLM's own dependency

    available = int(psutil.virtual_memory().available)
    weights = _weights_bytes(fused_dir)
    size = cpu_kv_cache_bytes(available, weights)
    print(f"dlf-rs serve: no CUDA: KV cache {size // GiB} GiB (--kv-cache-memory-bytes {size}; "
          f"{available / GiB:.1f} GiB free, the members' weights {weights / GiB:.1f} GiB); "
          "choose it with -- --kv-cache-memory-bytes N", file=sys.stderr)  # fmt: skip
    return ["--kv-cache-memory-bytes", str(size)]


# vllm serve arguments that turn speculative decoding on (vLLM 0.32: --speculative-config / -sc,
# or the shorthands --spec-method, --spec-model, --spec-tokens).
_SPECULATION_FLAGS = (
    "--speculative-config",
    "-sc",
    "--spec-method",
    "--spec-model",
    "--spec-tokens",
)


def speculates(rest: list[str]) -> bool:
    """Whether the vllm serve arguments turn on speculative decoding."""
    return any(a.split("=")[0].replace("_", "-") in _SPECULATION_FLAGS for a in rest)


def processor_arguments(rest: list[str]) -> list[str]:
    """``--logits-processors`` with the DLF processor (per-request options, alpha logs), except
    under speculative decoding, where vLLM refuses custom logits processors: the fused model then
    fuses every position with the directory's defaults and requests that set ``dlf_*`` options
    are answered with HTTP 400 (docs/vllm.md, "Speculative decoding")."""
    if speculates(rest):
        print("dlf-rs serve: speculative decoding: every request is fused with the default "
              "options; requests that set dlf_* options get HTTP 400", file=sys.stderr)  # fmt: skip
        return []
    return ["--logits-processors", PROCESSOR]


def shutdown_arguments(rest: list[str]) -> list[str]:
    """``--shutdown-timeout`` :data:`DEFAULT_GRACE_S` unless the vllm serve arguments choose it
    (vLLM's own default, 0, aborts in-flight requests)."""
    if any(a.split("=")[0].replace("_", "-") == "--shutdown-timeout" for a in rest):
        return []
    return ["--shutdown-timeout", str(DEFAULT_GRACE_S)]


# vllm serve arguments by which the caller chose between torch.compile and eager (vLLM 0.32:
# --enforce-eager / --no-enforce-eager, --compilation-config / -cc and their dotted forms such as
# --compilation-config.mode=3, --optimization-level and its short forms -O3, -O 3, -O=3).
_COMPILE_CHOICES = (
    "--enforce-eager",
    "--no-enforce-eager",
    "--compilation-config",
    "-cc",
    "--optimization-level",
)


def chooses_compilation(rest: list[str]) -> bool:
    """Whether the vllm serve arguments choose compiled or eager themselves."""
    for a in rest:
        name = a.split("=")[0].split(".")[0]
        if name.startswith("--"):
            name = "--" + name[2:].replace("_", "-")
        if name in _COMPILE_CHOICES or a.startswith("-O"):
            return True
    return False


def compile_arguments(rest: list[str], cuda: bool) -> list[str]:
    """``--enforce-eager`` on a machine without CUDA unless the vllm serve arguments choose
    compiled or eager (:func:`chooses_compilation`); says what it chose. On the real pair on a
    CPU, vLLM's torch.compile of every member made the fused server start several times slower
    than eager and decode only a little faster (docs/vllm.md, "Start time")."""
    if cuda or chooses_compilation(rest):
        return []
    print("dlf-rs serve: no CUDA: eager (--enforce-eager): compiling each member with "
          "torch.compile takes minutes on a CPU and gains little decode speed there "
          "(docs/vllm.md, 'Start time'); compile with -- --no-enforce-eager", file=sys.stderr)  # fmt: skip
    return ["--enforce-eager"]


# At most this many usable CPUs: dlf-rs serve asks vLLM to reserve none for its engine process.
RESERVE_NONE_UP_TO_CPUS = 2
_RESERVED = "VLLM_CPU_NUM_OF_RESERVED_CPU"


def cpu_reservation_env(env: dict[str, str], cuda: bool, cpus: int) -> dict[str, str]:
    """The environment variables to add for vllm serve: ``VLLM_CPU_NUM_OF_RESERVED_CPU=0`` on a
    machine without CUDA with at most :data:`RESERVE_NONE_UP_TO_CPUS` usable CPUs, unless the
    caller set it or bound vLLM's threads (``VLLM_CPU_OMP_THREADS_BIND`` other than ``auto``);
    says what it chose. vLLM's CPU build keeps one CPU out of the model's threads for its engine
    process, which busy-waits there: on 2 CPUs that halves the compute, and reserving none ran
    the real pair 1.66x (large alone) and 1.54x (fused) faster (docs/vllm.md, "CPU threads")."""
    if cuda or cpus > RESERVE_NONE_UP_TO_CPUS or _RESERVED in env:
        return {}
    if env.get("VLLM_CPU_OMP_THREADS_BIND", "auto") != "auto":
        return {}
    print(f"dlf-rs serve: no CUDA, {cpus} CPUs: the model's threads use all of them ({_RESERVED}"
          f"=0; vLLM would keep one for its engine process, half of this machine); set "
          f"{_RESERVED}=1 to keep vLLM's default", file=sys.stderr)  # fmt: skip
    return {_RESERVED: "0"}


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def run(args: argparse.Namespace) -> int:
    large, small, experts = _sources(args)
    options = _options(args)
    if args.fused_dir is not None:
        out = Path(args.fused_dir)
    else:
        key = json.dumps([large, small, experts, options], sort_keys=True).encode()
        out = Path("~/.cache/dlf_rs/fused").expanduser() / hashlib.sha256(key).hexdigest()[:16]
    build_fused_dir(out, large, small, experts, options,
                    local_files_only=not args.allow_download, overwrite=True)  # fmt: skip
    check_head_sizes(out)
    rest = list(args.vllm_args)
    if rest[:1] == ["--"]:
        rest = rest[1:]
    env = dict(os.environ)
    cuda = _cuda()
    cmd = [sys.executable, "-m", "dlf_rs.engines.vllm.api_server", "--model", str(out),
           *processor_arguments(rest), *kv_cache_arguments(out, rest, env),
           *shutdown_arguments(rest), *compile_arguments(rest, cuda), *rest]  # fmt: skip
    added = cpu_reservation_env(env, cuda, _usable_cpus())
    env.update(added)
    env[FUSED_DIR_ENV] = str(out)
    if not args.allow_download:
        env.setdefault("HF_HUB_OFFLINE", "1")
    print(f"dlf-rs serve: fused directory {out}", file=sys.stderr)
    shown = " ".join(f"{k}={v}" for k, v in {**added, FUSED_DIR_ENV: str(out)}.items())
    print(f"dlf-rs serve: {shown} {' '.join(cmd[1:])}", file=sys.stderr)
    if args.dry_run:
        return 0
    try:
        import vllm  # noqa: F401
    except ImportError as err:
        raise FusedConfigError(
            f"serve: needs vLLM ({err}); pip install 'dlf_rs[vllm]' (docs/vllm.md has the CPU recipe)"
        ) from None
    os.execve(sys.executable, cmd, env)
    return 0  # not reached
