"""Running generated Python in a subprocess: a time limit, a memory limit and no network.

Where it sits: the checker of the real family's task (:mod:`.task`) and of HumanEval
(:mod:`.humaneval`) hand a whole program to :func:`run_program`, which runs it with the same
interpreter in a fresh temporary folder and reports what happened. Never ``exec`` in-process:
generated code may loop forever, eat memory, call ``sys.exit`` or open sockets.

No network, in two layers: every program starts with a prelude that replaces the socket
constructors with a function raising ``PermissionError`` (this alone is a guard against
accidents, not a security boundary: the ``_socket`` module is still there), and where the
kernel allows an unprivileged network namespace (``unshare -rn``, probed once) the process runs
in one with no interface but a down loopback, so nothing can be reached even around the guard.
Limits: ``timeout`` seconds of wall time (the whole process group is killed), as many seconds of
CPU time, ``memory_mb`` of address space, no core files.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["PRELUDE", "ExecResult", "network_namespace", "run_program"]

PRELUDE = """\
import socket as _dlf_socket


def _dlf_refuse(*args, **kwargs):
    raise PermissionError("network access is disabled in the dlf_rs sandbox")


for _dlf_name in ("socket", "create_connection", "create_server", "socketpair", "fromfd",
                  "getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr"):
    setattr(_dlf_socket, _dlf_name, _dlf_refuse)
del _dlf_name
"""


@dataclass(frozen=True)
class ExecResult:
    """What a program did: ``status`` "ok" (exit 0), "error" (another exit status or a signal)
    or "timeout"; its output (truncated to 64 kB each) and the exit status (None on timeout)."""

    status: str
    stdout: str
    stderr: str
    returncode: int | None

    @property
    def passed(self) -> bool:
        return self.status == "ok"


@functools.lru_cache(maxsize=1)
def network_namespace() -> tuple[str, ...]:
    """The command prefix that runs a process without network (``unshare -rn``), or ``()``
    where this system does not allow it (the socket guard of :data:`PRELUDE` still applies)."""
    exe = shutil.which("unshare")
    if exe is None or not sys.platform.startswith("linux"):
        return ()
    try:
        ok = (
            subprocess.run(
                [exe, "-rn", "true"], capture_output=True, timeout=10, check=False
            ).returncode
            == 0
        )
    except (OSError, subprocess.SubprocessError):
        ok = False
    return (exe, "-rn") if ok else ()


def _limits(timeout: float, memory_mb: int) -> str:
    """The program's first lines: its own resource limits (set before any generated code runs;
    no ``preexec_fn``, which is unsafe in a process with threads such as torch's)."""
    cpu = max(1, int(timeout + 1))
    lines = ["import resource as _dlf_resource",
             f"_dlf_resource.setrlimit(_dlf_resource.RLIMIT_CPU, ({cpu}, {cpu}))",
             "_dlf_resource.setrlimit(_dlf_resource.RLIMIT_CORE, (0, 0))"]  # fmt: skip
    if memory_mb > 0:
        lim = memory_mb << 20
        lines.append(f"_dlf_resource.setrlimit(_dlf_resource.RLIMIT_AS, ({lim}, {lim}))")
    return "\n".join(lines) + "\n"


def run_program(
    source: str,
    timeout: float = 5.0,
    *,
    python_path: Sequence[str | os.PathLike[str]] = (),
    stdin: str = "",
    memory_mb: int = 1024,
    isolate_network: bool = True,
) -> ExecResult:
    """Run ``source`` (after :data:`PRELUDE`) as ``python -I -c`` in a temporary folder.

    ``python_path``: folders put first on ``sys.path`` (``-I`` ignores ``PYTHONPATH`` and the
    user's site folder). ``isolate_network``: also run in a network namespace where available.
    """
    if timeout <= 0:
        raise ValueError(f"timeout: expected seconds > 0, got {timeout}")
    paths = [os.fspath(p) for p in python_path]
    head = f"import sys\nsys.path[:0] = {paths!r}\n" if paths else ""
    cmd = [sys.executable, "-I", "-c", _limits(timeout, memory_mb) + head + PRELUDE + "\n" + source]
    if isolate_network:
        cmd = [*network_namespace(), *cmd]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8",
           "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="dlf-sandbox-") as cwd:
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, errors="replace", start_new_session=True,
        )  # fmt: skip
        try:
            out, err = proc.communicate(stdin, timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                proc.kill()
            out, err = proc.communicate()
            return ExecResult("timeout", out[-65536:], err[-65536:], None)
    status = "ok" if proc.returncode == 0 else "error"
    return ExecResult(status, out[-65536:], err[-65536:], proc.returncode)
