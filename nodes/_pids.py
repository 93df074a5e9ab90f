"""Whether a process still runs, by PID: the engine's stale temporary files, the demo's
processes (``bulle_demo``)."""

from __future__ import annotations

import os


def process_alive(pid: int) -> bool:
    """True while ``pid`` runs (under any user); a zombie, exited but not yet reaped by its
    parent, is not alive."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc (or it went meanwhile): kill(0) said it exists
