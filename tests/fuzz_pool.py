"""Worker processes for fuzz cases, with a time and memory watchdog.

Each worker is `python tests/fuzz_oracle.py --worker` (JSON cases in, verdicts out). A case that
runs past its time limit is a `hang`; a worker whose resident memory passes the limit, or that
dies (a crash, an abort, a kill), makes its case a `crash`; either way the worker is replaced and
the run goes on. Used by tests/test_fuzz.py (one worker) and benches/fuzz.py (a pool).
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

WORKER = Path(__file__).resolve().parent / "fuzz_oracle.py"


def rss_mb(pid: int) -> float:
    """Resident set size of a process in MB (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class Worker:
    def __init__(self, env: dict[str, str] | None = None):
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), "--worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "RUST_BACKTRACE": "0", **(env or {})},
        )
        self.case_id: int | None = None
        self.started = 0.0
        self.buf = b""

    def send(self, case_id: int, case: dict[str, Any]) -> None:
        self.case_id, self.started = case_id, time.monotonic()
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"id": case_id, "case": case}) + "\n").encode())
        self.proc.stdin.flush()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class Pool:
    """Runs cases on `n` workers; `run(cases)` yields (index, verdict) as they finish."""

    def __init__(
        self,
        n: int = 1,
        timeout_s: float = 30.0,
        mem_mb: float = 2048.0,
        first_timeout_s: float = 120.0,
        env: dict[str, str] | None = None,
    ):
        self.n, self.timeout_s, self.mem_mb = n, timeout_s, mem_mb
        self.first_timeout_s = first_timeout_s  # a fresh worker first imports numpy and torch
        self.env = env
        self.workers: list[Worker] = []
        self.fresh: set[int] = set()

    def _spawn(self) -> Worker:
        w = Worker(self.env)
        self.fresh.add(id(w))
        return w

    def run(self, cases: list[dict[str, Any]]) -> Iterator[tuple[int, dict[str, Any]]]:
        sel = selectors.DefaultSelector()
        todo = list(range(len(cases)))[::-1]
        while len(self.workers) < min(self.n, len(cases)):
            self.workers.append(self._spawn())
        for w in self.workers:
            assert w.proc.stdout is not None
            os.set_blocking(w.proc.stdout.fileno(), False)
            sel.register(w.proc.stdout, selectors.EVENT_READ, w)
        idle = list(self.workers)
        busy: list[Worker] = []

        def replace(w: Worker) -> None:
            sel.unregister(w.proc.stdout)
            w.kill()
            nw = self._spawn()
            self.workers[self.workers.index(w)] = nw
            assert nw.proc.stdout is not None
            os.set_blocking(nw.proc.stdout.fileno(), False)
            sel.register(nw.proc.stdout, selectors.EVENT_READ, nw)
            idle.append(nw)

        try:
            while todo or busy:
                while todo and idle:
                    w = idle.pop()
                    i = todo.pop()
                    try:
                        w.send(i, cases[i])
                        busy.append(w)
                    except OSError:  # died between cases: replace it and retry the case
                        todo.append(i)
                        replace(w)
                for key, _ in sel.select(timeout=0.05):
                    w = key.data
                    try:
                        w.buf += os.read(w.proc.stdout.fileno(), 1 << 20)
                    except BlockingIOError:
                        continue
                    while b"\n" in w.buf and w in busy:
                        line, w.buf = w.buf.split(b"\n", 1)
                        verdict = json.loads(line)
                        busy.remove(w)
                        idle.append(w)
                        self.fresh.discard(id(w))
                        yield verdict.pop("id"), verdict
                now = time.monotonic()
                for w in list(busy):
                    limit = self.first_timeout_s if id(w) in self.fresh else self.timeout_s
                    rss = rss_mb(w.proc.pid)
                    if w.proc.poll() is not None:
                        cat, detail = "crash", f"worker died with status {w.proc.returncode}"
                    elif now - w.started > limit:
                        cat, detail = "hang", f"no answer within {limit:.0f} s"
                    elif rss > self.mem_mb:
                        cat, detail = "crash", f"worker RSS {rss:.0f} MB > {self.mem_mb:.0f} MB"
                    else:
                        continue
                    busy.remove(w)
                    case_id = w.case_id
                    replace(w)
                    assert case_id is not None
                    yield case_id, {"cat": cat, "detail": detail}
        finally:
            sel.close()

    def close(self) -> None:
        for w in self.workers:
            w.kill()
        self.workers = []
