"""A plan's time limit and its caller's cancellation, fired by one watchdog thread.

One thread serves every plan's deadline: a ``threading.Timer`` per plan started and stopped
a thread per query (issue 13: ~10% of a node's Python time on small queries).
"""

from __future__ import annotations

import heapq
import itertools
import math
import os
import threading
import time

import duckdb

from nodes._disclosure import PlanFailed


class Deadline:
    """One plan's time limit and its caller's cancellation.

    When either comes, the DuckDB cursor running this plan's query is interrupted, so the
    worker is free at once. A plan runs on a cursor of its own, attached here only while
    its query runs: an interrupt can never reach another plan's query.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = max(0.0, seconds)
        self.cause = ""  # "deadline" or "cancelled", once fired
        self.closed = False
        self._expires = time.monotonic() + self.seconds
        self._cursor: duckdb.DuckDBPyConnection | None = None
        self._lock = threading.Lock()
        if math.isfinite(self._expires):
            _WATCHDOG.add(self._expires, self)

    def expired(self) -> bool:
        return time.monotonic() >= self._expires - 0.05

    def fire(self, cause: str) -> None:
        with self._lock:
            self.cause = self.cause or cause
            if self._cursor is not None:
                self._cursor.interrupt()

    def attach(self, cursor: duckdb.DuckDBPyConnection) -> None:
        with self._lock:
            if self.cause:
                raise PlanFailed(cause=f"{self.cause} before the query ran",
                                 interrupted=self.cause)
            self._cursor = cursor

    def detach(self) -> None:
        with self._lock:
            self._cursor = None

    def check(self) -> None:
        """After the query: a limit reached meanwhile (in the release) still fails it."""
        if self.cause:
            raise PlanFailed(cause=f"{self.cause} during the release", interrupted=self.cause)

    def close(self) -> None:
        self.closed = True  # the watchdog drops it when its time comes
        self.detach()


class _Watchdog:
    """Fires each open deadline when its time comes; closed ones are dropped unfired."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Deadline]] = []
        self._order = itertools.count()  # ties: never compare two Deadlines
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def add(self, when: float, deadline: Deadline) -> None:
        with self._wake:
            heapq.heappush(self._heap, (when, next(self._order), deadline))
            if self._thread is None or self._pid != os.getpid():  # none yet, or forked
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._run, name="bulle-deadlines",
                                                daemon=True)
                self._thread.start()
            elif self._heap[0][2] is deadline:  # sooner than what the thread waits for
                self._wake.notify()

    def _run(self) -> None:
        while True:
            due: list[Deadline] = []
            with self._wake:
                now = time.monotonic()
                while self._heap and self._heap[0][0] <= now:
                    due.append(heapq.heappop(self._heap)[2])
                if not due:
                    self._wake.wait(self._heap[0][0] - now if self._heap else None)
                    continue
            for deadline in due:
                if not deadline.closed:
                    deadline.fire("deadline")


_WATCHDOG = _Watchdog()
