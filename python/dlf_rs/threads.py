"""CPU threads of a run: torch's, OpenMP's wait policy and the Rust core's workers.

Where it sits: the command line (:mod:`dlf_rs.cli`) and the end-to-end bench
(:mod:`dlf_rs.bench`) call these before torch is imported or used, so both have the same
``--threads`` default and meaning. Measurements behind the default: docs/performance.md, "The
threads default".
"""

from __future__ import annotations

import argparse
import os
from typing import Any

__all__ = ["DEFAULT_THREADS", "passive_omp", "positive_int", "set_threads", "threads_argument"]

# The default of --threads (generate and bench), measured with benches/bench_loop.py on a shared
# 2-core machine (README, "Command line"): with OMP_WAIT_POLICY=PASSIVE two threads no longer
# collapse when the cores are busy (B=8: 12.5 ms/token, 77 with ACTIVE) but were not reliably
# faster than one (idle B=1: 3.5 one, 6.0 two; busy B=8: 5.1 / 12.5); one thread was never the
# slow case, so it stays the default.
DEFAULT_THREADS = 1

THREADS_HELP = (
    "CPU threads for torch and the core's workers (default %(default)s: measured on a shared "
    "2-core machine, one thread was at most 1.4x slower than two and two up to 2.4x slower than "
    "one; try 2 or more on an idle machine, README 'Command line'). OMP_WAIT_POLICY=PASSIVE is "
    "set unless you set it"
)


def passive_omp() -> None:
    """``OMP_WAIT_POLICY=PASSIVE`` unless the user chose a policy. OpenMP (libgomp, loaded with
    torch) reads it once, when torch is imported, so this runs before that import: with the
    default (active) policy idle workers spin and, on a machine whose cores are taken by other
    work, two torch threads decoded the shipped family 6x slower than with PASSIVE (B=8, 77 ms
    per token against 12.5; README, "Command line")."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def set_threads(n: int) -> None:
    """torch's intra-op threads and the Rust core's worker threads (rayon reads
    RAYON_NUM_THREADS when its pool starts, i.e. on the first core call of the process)."""
    import torch

    torch.set_num_threads(n)
    os.environ.setdefault("RAYON_NUM_THREADS", str(n))


def threads_argument(group: Any) -> None:
    """``--threads`` with the same default and meaning for ``generate`` and ``bench``."""
    group.add_argument("--threads", type=positive_int, default=DEFAULT_THREADS,
                       help=THREADS_HELP)  # fmt: skip


def positive_int(text: str) -> int:
    """An argparse type: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {value}")
    return value


positive_int.__name__ = "int >= 1"
