"""The node's one release cache (``releases.sqlite`` in its state folder): every release by
request id — query partial results and training rounds alike — the outcome of charged
requests that failed, and each training run's plan, drawn once.

A replayed request id gets the very same bytes back, never a fresh noise draw (averaging
draws would undo the noise), and a charged failure stays that failure. Rows are only
ever inserted (``INSERT OR IGNORE``): the first outcome of a request id is its outcome.
The query path (``nodes/_guard.py``) and the training path (``nodes/_training.py``, in the
SuperNode's process) share the file; SQLite's WAL lets both write.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

QUERY, TRAINING = "query", "training"


def _now() -> str:
    return datetime.now(UTC).isoformat()


class ReleaseStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()
        db = self._db()
        db.execute("CREATE TABLE IF NOT EXISTS releases (request_id TEXT PRIMARY KEY, "
                   "result BLOB NOT NULL, created_at TEXT NOT NULL)")
        columns = {row[1] for row in db.execute("PRAGMA table_info(releases)")}
        if "kind" not in columns:  # a cache of queries only, from before training shared it
            db.execute(f"ALTER TABLE releases ADD COLUMN kind TEXT NOT NULL DEFAULT '{QUERY}'")
            db.execute("ALTER TABLE releases ADD COLUMN meta TEXT NOT NULL DEFAULT '{}'")
        # Charged requests that failed while running: a replay gets the same failure.
        db.execute("CREATE TABLE IF NOT EXISTS failures (request_id TEXT PRIMARY KEY, "
                   "public TEXT NOT NULL, incident TEXT NOT NULL, created_at TEXT NOT NULL)")
        # Each training run's noise and sampling plan at this node (its count is charged).
        db.execute("CREATE TABLE IF NOT EXISTS plans (run TEXT PRIMARY KEY, "
                   "plan TEXT NOT NULL, created_at TEXT NOT NULL)")

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:  # one connection per thread (sqlite3 objects are not shared)
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            self._local.db = db
        return db

    # -- releases -------------------------------------------------------------------------
    def get(self, request_id: str) -> tuple[bytes, dict[str, Any]] | None:
        """(result bytes, meta) of a released request id."""
        row = self._db().execute("SELECT result, meta FROM releases WHERE request_id = ?",
                                 (request_id,)).fetchone()
        return (row[0], json.loads(row[1])) if row is not None else None

    def put(self, request_id: str, kind: str, result: bytes,
            meta: dict[str, Any] | None = None) -> None:
        self._db().execute(
            "INSERT OR IGNORE INTO releases (request_id, result, created_at, kind, meta) "
            "VALUES (?, ?, ?, ?, ?)",
            (request_id, result, _now(), kind, json.dumps(meta or {})))

    # -- failures -------------------------------------------------------------------------
    def failure(self, request_id: str) -> tuple[str, str] | None:
        """(public message, incident) of a charged request that failed while running."""
        row = self._db().execute("SELECT public, incident FROM failures WHERE request_id = ?",
                                 (request_id,)).fetchone()
        return (row[0], row[1]) if row is not None else None

    def put_failure(self, request_id: str, public: str, incident: str) -> None:
        self._db().execute("INSERT OR IGNORE INTO failures VALUES (?, ?, ?, ?)",
                           (request_id, public, incident, _now()))

    # -- training plans -------------------------------------------------------------------
    def plan(self, run: str) -> dict[str, Any] | None:
        row = self._db().execute("SELECT plan FROM plans WHERE run = ?", (run,)).fetchone()
        return json.loads(row[0]) if row is not None else None

    def keep_plan(self, run: str, plan: dict[str, Any]) -> dict[str, Any]:
        """Store ``plan`` unless the run has one; returns the run's plan."""
        self._db().execute("INSERT OR IGNORE INTO plans VALUES (?, ?, ?)",
                           (run, json.dumps(plan), _now()))
        return self.plan(run) or plan
