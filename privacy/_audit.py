"""Append-only, hash-chained audit log (stdlib sqlite3, WAL, ``synchronous=FULL``).

Entry ``seq`` (1, 2, …) stores ``hash = sha256(canonical JSON of {seq, time, actor,
project, action, detail, prev_hash})`` with ``prev_hash`` the previous entry's hash
(64 zeros for seq 1). Appends run under ``BEGIN IMMEDIATE``, so concurrent appenders
(threads or processes) are serialised and the chain never forks.

Head checkpoint: the table ``audit_head`` holds the (seq, hash) of the last entry,
updated in the same transaction as each append, and appends chain from it (not from the
last row present), so entries deleted at the tail leave a visible gap. ``verify`` reports:

* an edited entry (its hash no longer matches its fields) → that seq;
* an entry rewritten *with* a recomputed hash → that seq, found from the next entry's
  ``prev_hash`` (the next entry is intact, so it remembers the original hash);
* a deleted entry (gap in seq) → the first missing seq;
* reordered entries (seq is inside the hash) → the first moved seq;
* a truncated tail (head says seq n, rows stop at m < n) → m + 1.

Limit: whoever can write the database can also rewrite the head row, or rebuild the whole
chain from some point on. Only a checkpoint kept out of their reach detects that: export
``head()`` elsewhere (e.g. into the coordinator's log, or print it in a report) and pass it
to ``verify(checkpoint=…)``. Without one, truncation of the tail *together with* the head
row, or a re-hashed suffix, is undetectable.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

GENESIS = "0" * 64

_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_entries (
    seq INTEGER PRIMARY KEY,
    time TEXT NOT NULL,
    actor TEXT NOT NULL,
    project TEXT NOT NULL,
    action TEXT NOT NULL,
    detail TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_head (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    seq INTEGER NOT NULL,
    hash TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class AuditEntry:
    seq: int
    time: str
    actor: str
    project: str
    action: str
    detail: dict[str, Any]
    prev_hash: str
    hash: str


@dataclass(frozen=True)
class AuditReport:
    ok: bool
    entries: int
    first_bad_seq: int | None
    reason: str


def entry_hash(
    seq: int, time: str, actor: str, project: str, action: str, detail: Any, prev_hash: str
) -> str:
    """sha256 hex of the canonical JSON of the entry's fields (``detail`` as a value)."""
    body = {
        "seq": seq,
        "time": time,
        "actor": actor,
        "project": project,
        "action": action,
        "detail": detail,
        "prev_hash": prev_hash,
    }
    return hashlib.sha256(_canonical(body).encode("utf-8")).hexdigest()


class AuditLog:
    """One log file; safe to share between threads (one connection per thread)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._local = threading.local()
        with self._tx() as cur:
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    cur.execute(stmt)

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def append(self, actor: str, project: str, action: str, detail: dict[str, Any]) -> AuditEntry:
        """Append one entry and move the head, atomically; returns the stored entry."""
        if not isinstance(detail, dict):
            raise TypeError("detail must be a dict")
        detail_json = _canonical(detail)  # fails early on values JSON cannot carry
        detail_value = json.loads(detail_json)
        with self._tx() as cur:
            head = cur.execute("SELECT seq, hash FROM audit_head WHERE id = 1").fetchone()
            prev_seq, prev_hash = head if head else (0, GENESIS)
            seq = prev_seq + 1
            now = datetime.now(UTC).isoformat(timespec="microseconds")
            h = entry_hash(seq, now, actor, project, action, detail_value, prev_hash)
            cur.execute(
                "INSERT INTO audit_entries VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (seq, now, actor, project, action, detail_json, prev_hash, h),
            )
            cur.execute(
                "INSERT INTO audit_head (id, seq, hash) VALUES (1, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash",
                (seq, h),
            )
        return AuditEntry(seq, now, actor, project, action, detail_value, prev_hash, h)

    def head(self) -> tuple[int, str]:
        """(seq, hash) of the last entry, to export as an external checkpoint."""
        row = self._conn().execute("SELECT seq, hash FROM audit_head WHERE id = 1").fetchone()
        return (int(row[0]), str(row[1])) if row else (0, GENESIS)

    def entries(self, project: str | None = None) -> Iterator[AuditEntry]:
        """Stored entries in seq order (optionally of one project); not verified."""
        sql = "SELECT * FROM audit_entries"
        args: tuple[Any, ...] = ()
        if project is not None:
            sql, args = sql + " WHERE project = ?", (project,)
        for r in self._conn().execute(sql + " ORDER BY seq", args):
            yield AuditEntry(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]), r[6], r[7])

    def entries_after(self, seq: int, limit: int = 10_000) -> list[AuditEntry]:
        """Up to ``limit`` entries after ``seq`` in seq order (metrics tail the chain)."""
        rows = self._conn().execute("SELECT * FROM audit_entries WHERE seq > ? ORDER BY seq "
                                    "LIMIT ?", (seq, limit)).fetchall()
        return [AuditEntry(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]), r[6], r[7])
                for r in rows]

    def follow(self, seq: int) -> Iterator[AuditEntry]:
        """Every entry after ``seq``, in seq order, read in batches (metrics tail the chain)."""
        while batch := self.entries_after(seq):
            yield from batch
            seq = batch[-1].seq

    def verify(self, checkpoint: tuple[int, str] | None = None) -> AuditReport:
        """Check the whole chain, the stored head and, if given, an external checkpoint."""
        conn = self._conn()
        conn.execute("BEGIN")  # one read snapshot for rows and head (WAL)
        try:
            rows = conn.execute("SELECT * FROM audit_entries ORDER BY seq").fetchall()
            head = conn.execute("SELECT seq, hash FROM audit_head WHERE id = 1").fetchone()
        finally:
            conn.execute("COMMIT")
        return _verify_rows(rows, head, checkpoint)

    # --------------------------------------------------------------------------- sqlite

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid != os.getpid():
            conn = None  # inherited through fork: never reuse a parent's SQLite connection
        if conn is None:
            # isolation_level=None: we issue BEGIN IMMEDIATE / COMMIT ourselves.
            conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            conn.execute("PRAGMA busy_timeout = 60000")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Cursor]:
        conn = self._conn()
        cur = conn.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            yield cur
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        else:
            cur.execute("COMMIT")
        finally:
            cur.close()


def _verify_rows(
    rows: list[tuple[Any, ...]], head: tuple[int, str] | None, checkpoint: tuple[int, str] | None
) -> AuditReport:
    n = len(rows)

    def bad(seq: int, reason: str) -> AuditReport:
        return AuditReport(False, n, seq, reason)

    prev_hash = GENESIS
    for i, r in enumerate(rows):
        seq, time, actor, project, action, detail_json, stored_prev, stored_hash = r
        expected = i + 1
        if seq != expected:
            return bad(expected, f"entry {expected} is missing (deleted)")
        try:
            detail = json.loads(detail_json)
            canonical = _canonical(detail) == detail_json
        except (TypeError, ValueError):
            detail, canonical = None, False
        if not canonical or stored_hash != entry_hash(
            seq, time, actor, project, action, detail, stored_prev
        ):
            return bad(seq, f"entry {seq} does not match its hash (edited or moved)")
        if stored_prev != prev_hash:
            if seq == 1:
                return bad(1, "entry 1 does not start the chain")
            # Entries 1..seq are each self-consistent, so this one recorded the original
            # hash of the previous entry: that entry was rewritten with a recomputed hash.
            return bad(seq - 1, f"entry {seq - 1} was rewritten (entry {seq} links elsewhere)")
        prev_hash = stored_hash

    last_seq = n
    for label, mark in (("stored head", head), ("external checkpoint", checkpoint)):
        if mark is None:
            continue
        m_seq, m_hash = int(mark[0]), str(mark[1])
        if m_seq > last_seq:
            return bad(last_seq + 1, f"{label} is at seq {m_seq} but the log ends at {last_seq}"
                       " (tail truncated)")  # fmt: skip
        got = rows[m_seq - 1][7] if m_seq >= 1 else GENESIS
        if got != m_hash:
            return bad(max(m_seq, 1), f"entry {m_seq} differs from the {label}")
    if head is None and n:
        return bad(n, "head checkpoint is missing")
    if head is not None and int(head[0]) != last_seq:
        return bad(int(head[0]) + 1, f"entries after the stored head ({head[0]}) were added")
    return AuditReport(True, n, None, "ok")


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)  # fmt: skip
