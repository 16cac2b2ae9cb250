"""Members decoded side by side: the llama.cpp engine's two lanes of CPU threads.

Where it sits: :class:`.generate.LlamaCppGenerator` plans the lanes for a call
(:func:`plan_lanes`) and runs every member's decode of a step through :class:`LaneRunner`.

Why: one step of DLF is one decode per member, and the members do not depend on each other
within a step. On this project's 2-core CPU llama.cpp's one-token decode scales poorly with its
own threads (Qwen2.5-Coder Q4_K_M, AVX2 build: the 1.5B 133 ms on one thread, 98 ms on two; the
0.5B 75 and 60 ms), while two contexts on one thread each run side by side at their one-thread
speed (the 1.5B 132 ms beside the 0.5B's 78 ms). So with the large model on one core and the
small base and the experts one after another on the other, a step costs about the slower lane
(max(133, 75 + 75) ms) instead of the sum at two threads (98 + 60 + 60 ms).
(docs/llamacpp.md, "Members side by side", has the measurements.)

The plan: at most two lanes (measured here only with two cores; more lanes are not measured).
Members go to lanes by longest-processing-time order of their cost (the models' parameter counts):
the largest first, each to the lane with the least cost so far. The threads are split between
the lanes in proportion to their cost, at least one each. One lane (every member in turn on all
threads, llama.cpp's own way) when there is one thread, one member, or ``parallel`` is off.

Each context keeps its own threads (``llama_set_n_threads``); llama.cpp's decode runs outside
Python's GIL (ctypes releases it), so the second lane is a Python thread. A lane's decodes only
touch their own contexts, so nothing is shared between the lanes but the numpy views handed back
after both finished, and the weights of a model two contexts use (a LoRA expert over the small
model), which llama.cpp only reads in a decode (tested with the two in different lanes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

__all__ = ["Lane", "LaneRunner", "plan_lanes"]


@dataclass(frozen=True)
class Lane:
    """Members (indices into the call's member list, in the order they run) and their threads."""

    members: tuple[int, ...]
    threads: int


def plan_lanes(costs: Sequence[float], n_threads: int, parallel: bool) -> list[Lane]:
    """The lanes for members of ``costs`` (any positive unit) on ``n_threads`` threads."""
    n = len(costs)
    if n == 0:
        raise ValueError("costs: expected at least one member")
    if any(not c > 0 for c in costs):
        raise ValueError(f"costs: expected positive costs, got {list(costs)}")
    if not parallel or n_threads < 2 or n < 2:
        return [Lane(tuple(range(n)), n_threads)]
    load = [0.0, 0.0]
    members: list[list[int]] = [[], []]
    for i in sorted(range(n), key=lambda i: (-costs[i], i)):
        lane = 0 if load[0] <= load[1] else 1
        members[lane].append(i)
        load[lane] += costs[i]
    t0 = min(max(round(n_threads * load[0] / (load[0] + load[1])), 1), n_threads - 1)
    return [Lane(tuple(sorted(members[0])), t0),
            Lane(tuple(sorted(members[1])), n_threads - t0)]  # fmt: skip


class LaneRunner:
    """Runs one step's work per member along the lanes: the first lane in the calling thread,
    the second in a worker thread kept for the generator's life; results by member index."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None

    def run(self, lanes: Sequence[Lane], work: Callable[[int], Any]) -> list[Any]:
        """``work(i)`` for every member ``i``; an exception in either lane is raised here after
        both lanes have stopped (no decode is left running on a context)."""
        out: list[Any] = [None] * sum(len(lane.members) for lane in lanes)

        def along(lane: Lane) -> None:
            for i in lane.members:
                out[i] = work(i)

        if len(lanes) == 1:
            along(lanes[0])
            return out
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dlf-rs-lane")
        other = self._pool.submit(along, lanes[1])
        try:
            along(lanes[0])
        finally:
            err = other.exception()  # waits for the second lane in every case
        if err is not None:
            raise err
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
