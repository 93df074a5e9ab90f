"""The Flower pollers' wait (bulle_flower/_patches.py): short while a run works, long when
the federation is idle (issue 13), short again as soon as there is work."""

from __future__ import annotations

import itertools
import time

import pytest

from bulle_flower._patches import IdleBackoff, _CappedTime


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_empty_polls_back_off_to_the_warm_wait_and_work_resets_it() -> None:
    clock = Clock()
    b = IdleBackoff(0.2, clock=clock)
    waits = []
    for _ in range(10):  # within 30 s of the last work: between the rounds of a run
        waits.append(b.empty())
        clock.now += waits[-1]
    assert waits[0] == 0.2
    assert all(x <= y for x, y in itertools.pairwise(waits))  # never shorter
    assert waits[-1] == 2.0 and max(waits) == 2.0
    assert sum(waits[:4]) < 2.0  # the first seconds of a pause stay responsive
    b.busy()
    assert b.empty() == 0.2


def test_a_long_pause_backs_off_to_the_idle_wait_and_work_resets_it() -> None:
    clock = Clock()
    b = IdleBackoff(0.2, clock=clock)
    waits = []
    while clock.now < 1120:  # two minutes without work
        waits.append(b.empty())
        clock.now += waits[-1]
    assert all(x <= y for x, y in itertools.pairwise(waits))
    assert max(waits) == 5.0 and waits[-1] == 5.0
    assert max(w for w, t in zip(waits, itertools.accumulate(waits), strict=True)
               if t < 30) <= 2.0  # the warm half-minute keeps 2 s waits
    b.busy()
    assert b.empty() == 0.2
    clock.now += 31
    assert b.empty() == pytest.approx(0.3)  # short again after work, growing from there


def test_the_supernode_loop_backs_off_on_empty_pulls_only(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    t = _CappedTime(0.2)
    for _ in range(6):
        t.sleep(3)  # start_client_internal after an empty pull
    assert slept[0] == 0.2 and slept[-1] > 1.0 and slept[-1] <= 5.0
    t.sleep(0.5)  # waiting for a reply: work, capped and back to short waits
    t.sleep(3)
    assert slept[-2:] == [0.2, 0.2]
