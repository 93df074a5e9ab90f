"""What the demo's coordinator holds beyond its config, put there through its public
surface once it runs: a pending project (so the board has something to decide) and the
demo's standing indicator, proposed by the researcher with the SDK and approved by the
board with ``bulle board approve`` and the board's key; nodes added to a running demo
registered with ``bulle coordinator nodes add``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from enclave import connect

# The standing indicator the demo ships (federation/_indicators.py): restricted tier (cell
# key method), so no ε; refreshed hourly by the coordinator.
INDICATOR = {"name": "college-6e-35", "title": "Pupils in 6e in the collèges of "
             "Ille-et-Vilaine, by rentrée", "schedule": "hourly",
             "sql": "SELECT rentree_scolaire, SUM(nombre_total_de_6emes) AS pupils_6e FROM "
                    "college_headcounts GROUP BY rentree_scolaire ORDER BY rentree_scolaire",
             "audience": "the State (rectorat de Rennes) and the département 35",
             "description": "Headcounts of 6e in the 117 collèges, perturbed by the cell key "
                            "method at the region's node.", "value_column": "pupils_6e"}
PENDING = {"name": "dropout-signals", "title": "Early signals of dropout in online courses",
           "purpose": "Describe how assessment scores and submission delays evolve before "
                      "withdrawal, per module, to inform tutoring policy. Research only: no "
                      "decision about any learner.",
           "datasets": ["student_assessment"], "epsilon": 3.0, "duration_days": 180}


def bulle(args: list[str], cwd: Path, user: tuple[int, int] | None = None,
          env: dict[str, str] | None = None) -> str:
    """Run ``bulle ARGS`` (as ``user``: uid, gid); its output, or its error raised."""
    kw = {"user": user[0], "group": user[1], "extra_groups": []} if user else {}
    r = subprocess.run([sys.executable, "-m", "bulle_cli", *args], capture_output=True,
                       text=True, cwd=cwd, env={**os.environ, **(env or {})}, **kw)
    if r.returncode != 0:
        raise RuntimeError(f"bulle {' '.join(args[:3])} failed: "
                           f"{(r.stderr or r.stdout).strip()}")
    return r.stdout


def seed_indicator(url: str, researcher_token: str, board_key: Path, cwd: Path) -> None:
    """The demo's indicator, proposed (once) and approved (while pending). Idempotent."""
    hub = connect(url, researcher_token)
    known = hub.indicators().set_index("name")
    if INDICATOR["name"] not in known.index:
        project = hub.propose_indicator(**INDICATOR)["project"]
        status = "pending"
    else:
        project, status = known.loc[INDICATOR["name"], ["project", "status"]]
    if status == "pending":
        bulle(["board", "approve", project, "--url", url, "--key", str(board_key),
               "--reason", "approved at demo setup"], cwd)


def seed_pending_project(url: str, researcher_token: str, researcher: str) -> None:
    """A project for the board to decide, submitted once by the researcher."""
    hub = connect(url, researcher_token)
    if PENDING["name"] not in set(hub.projects()["name"]):
        hub.submit_project(**PENDING, team=[researcher])
