"""Latency patches for flwr 1.42.0 — private names, so flwr is pinned exactly.

Measured on loopback (TRAPS.md): with stock settings a round costs seconds of pure waiting,
not work. Two private spots are patched (``tests/test_training.py`` fails when they change):

- ``flwr.supercore.inflatable.inflatable_utils.pull_objects`` and
  ``pull_and_inflate_object_from_tree`` back off 1 s, 2 s, 4 s… when an object is not
  there yet — which is the normal case: a message is visible a few milliseconds before its
  objects are uploaded. Their keyword defaults are lowered to ``initial``/``cap``.
- ``flwr.supernode.start_client_internal`` sleeps a hard-coded 3 s after an empty pull and
  0.5 s while it waits for a reply: its ``time`` is replaced by one whose ``sleep`` is
  capped (the SuperNode process only).
"""

from __future__ import annotations

import time
import types
from collections.abc import Callable
from typing import Any

FLOWER_VERSION = "1.42.0"


def _check_version() -> None:
    import flwr

    if flwr.__version__ != FLOWER_VERSION:
        raise RuntimeError(f"flwr {flwr.__version__} is installed; bulle_flower._patches was "
                           f"written for {FLOWER_VERSION}: re-measure and re-check them")


def cap_pull_backoff(initial: float = 0.02, cap: float = 0.2) -> None:
    """Object pulls retry after ``initial`` seconds, doubling up to ``cap``."""
    _check_version()
    from flwr.supercore.inflatable import inflatable_utils as iu

    for fn in (iu.pull_objects, iu.pull_and_inflate_object_from_tree):
        defaults = fn.__kwdefaults__
        if defaults is None or not {"initial_backoff", "backoff_cap"} <= set(defaults):
            raise RuntimeError(f"{fn.__qualname__} has no initial_backoff/backoff_cap defaults")
        defaults["initial_backoff"], defaults["backoff_cap"] = initial, cap


class IdleBackoff:
    """The wait between polls: ``active`` seconds while there is work, growing ×1.5 per
    empty poll up to ``warm_cap`` within ``warm`` seconds of the last work (between the
    rounds of a run), then up to ``idle`` (issue 13: polling every 0.2 s kept the SuperLink
    at ~16% of a core, every 2 s an idle demo at 4.3%). Work resets it to short waits; the
    first message after a long pause waits ≤ ``idle`` (a run starts ≤ 5 s later)."""

    def __init__(self, active: float, idle: float = 5.0, warm: float = 30.0,
                 warm_cap: float = 2.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.active, self.idle = active, max(idle, active)
        self.warm, self.warm_cap, self._clock = warm, max(min(warm_cap, self.idle), active), clock
        self._next = active
        self._last_work = clock()

    def empty(self) -> float:
        """Seconds to wait after an empty poll (and lengthen the next one)."""
        warm = self._clock() - self._last_work < self.warm
        cap = self.warm_cap if warm else self.idle
        wait = min(self._next, cap)
        self._next = min(wait * 1.5, cap)
        return wait

    def busy(self) -> None:
        """There was work: back to short waits."""
        self._next = self.active
        self._last_work = self._clock()


class _CappedTime(types.ModuleType):
    """``time`` with ``sleep`` capped: the SuperNode loop's only waiting primitive. Its
    3 s sleep follows an empty pull (backs off, see ``IdleBackoff``); its 0.5 s sleeps wait
    for a reply being computed (work: short waits again)."""

    def __init__(self, cap: float) -> None:
        super().__init__("time")
        self._cap = cap
        self._backoff = IdleBackoff(cap)

    def sleep(self, seconds: float) -> None:
        if seconds >= 3:  # start_client_internal: `time.sleep(3)` after an empty pull
            time.sleep(self._backoff.empty())
            return
        self._backoff.busy()
        time.sleep(min(seconds, self._cap))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def cap_supernode_sleep(cap: float) -> None:
    """The SuperNode's loop waits at most ``cap`` seconds between pulls."""
    _check_version()
    from flwr.supernode import start_client_internal as sci

    if getattr(sci, "time", None) is not time:
        raise RuntimeError("flwr.supernode.start_client_internal no longer uses `time`")
    sci.time = _CappedTime(cap)  # type: ignore[assignment]
