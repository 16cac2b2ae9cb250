"""The llama.cpp engine's lanes (dlf_rs.engines.llamacpp.lanes): how members and threads are
split, and how a step runs along the lanes. Needs no llama.cpp: the engine's use of the lanes
(tokens and weights equal with the lanes on and off) is in tests/test_llamacpp.py."""

from __future__ import annotations

import threading
import time

import pytest
from dlf_rs.engines.llamacpp.lanes import Lane, LaneRunner, plan_lanes


def test_one_lane_when_parallel_is_off_or_impossible() -> None:
    assert plan_lanes([3.0, 1.0, 1.0], 2, parallel=False) == [Lane((0, 1, 2), 2)]
    assert plan_lanes([3.0, 1.0, 1.0], 1, parallel=True) == [Lane((0, 1, 2), 1)]
    assert plan_lanes([3.0], 8, parallel=True) == [Lane((0,), 8)]


def test_two_lanes_balance_the_members_costs() -> None:
    # The real pair (1.5B large, 0.5B small and expert) on 2 threads: the large alone on one.
    assert plan_lanes([1.54e9, 4.9e8, 4.9e8], 2, parallel=True) == [Lane((0,), 1),
                                                                     Lane((1, 2), 1)]  # fmt: skip
    # Longest first, each to the lighter lane: 3 | 1 1 1, then 3 1 | 1 1 1 ... balanced 4 | 4.
    lanes = plan_lanes([3.0, 1.0, 1.0, 1.0, 1.0, 1.0], 2, parallel=True)
    assert lanes == [Lane((0, 4), 1), Lane((1, 2, 3, 5), 1)]
    # Threads in proportion to the lanes' costs, at least one each.
    assert plan_lanes([6.0, 1.0, 1.0], 8, parallel=True) == [Lane((0,), 6), Lane((1, 2), 2)]
    assert plan_lanes([100.0, 1.0], 4, parallel=True) == [Lane((0,), 3), Lane((1,), 1)]
    for costs, threads in (([5.0, 4.0, 2.0, 2.0, 1.0], 3), ([1.0, 1.0], 16), ([2.0, 9.0], 5)):
        lanes = plan_lanes(costs, threads, parallel=True)
        members = sorted(i for lane in lanes for i in lane.members)
        assert members == list(range(len(costs)))  # every member once
        assert sum(lane.threads for lane in lanes) == threads
        assert all(lane.threads >= 1 for lane in lanes)


def test_bad_costs_are_named() -> None:
    with pytest.raises(ValueError, match="costs: expected at least one member"):
        plan_lanes([], 2, parallel=True)
    with pytest.raises(ValueError, match="costs: expected positive costs"):
        plan_lanes([1.0, 0.0], 2, parallel=True)


def test_runner_overlaps_the_lanes_and_keeps_member_order() -> None:
    runner = LaneRunner()
    lanes = [Lane((0, 2), 1), Lane((1,), 1)]
    seen: dict[int, str] = {}
    start = threading.Barrier(2, timeout=5)  # both lanes must be inside work() at once

    def work(i: int) -> int:
        seen[i] = threading.current_thread().name
        if i in (0, 1):
            start.wait()
        return 10 * i

    assert runner.run(lanes, work) == [0, 10, 20]
    assert seen[0] == seen[2] == threading.current_thread().name  # the first lane: the caller
    assert seen[1].startswith("dlf-rs-lane")
    assert runner.run([Lane((0, 1), 2)], lambda i: i + 1) == [1, 2]  # one lane: in turn
    runner.close()


def test_runner_raises_a_lane_error_after_both_lanes_stopped() -> None:
    runner = LaneRunner()
    finished: list[int] = []

    def work(i: int) -> int:
        if i == 1:
            raise RuntimeError("member 1 failed")
        time.sleep(0.05)
        finished.append(i)
        return i

    with pytest.raises(RuntimeError, match="member 1 failed"):
        runner.run([Lane((0, 2), 1), Lane((1,), 1)], work)
    assert finished == [0, 2]  # the first lane ran to its end before the error was raised

    def slow_second(i: int) -> int:
        if i == 0:
            raise ValueError("member 0 failed")
        time.sleep(0.2)
        finished.append(i)
        return i

    finished.clear()
    with pytest.raises(ValueError, match="member 0 failed"):
        runner.run([Lane((0,), 1), Lane((1,), 1)], slow_second)
    assert finished == [1]  # the second lane was waited for, not left running
    runner.close()
