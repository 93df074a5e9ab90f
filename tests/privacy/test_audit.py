from __future__ import annotations

import json
import multiprocessing as mp
import sqlite3
import threading
from pathlib import Path

import pytest

from privacy import AuditLog
from privacy._audit import entry_hash


@pytest.fixture
def log(tmp_path: Path) -> AuditLog:
    a = AuditLog(tmp_path / "audit.db")
    for i in range(1, 11):
        a.append("node-north", "reading-gaps", "charge", {"request": f"r{i}", "eps": 0.1 * i})
    return a


def raw(log: AuditLog) -> sqlite3.Connection:
    return sqlite3.connect(log.path, isolation_level=None)


def test_clean_log_verifies(log: AuditLog) -> None:
    rep = log.verify()
    assert rep.ok and rep.entries == 10 and rep.first_bad_seq is None
    entries = list(log.entries())
    assert [e.seq for e in entries] == list(range(1, 11))
    assert entries[4].prev_hash == entries[3].hash
    assert log.head() == (10, entries[-1].hash)
    assert log.verify(checkpoint=(10, entries[-1].hash)).ok
    assert log.verify(checkpoint=(4, entries[3].hash)).ok  # an older checkpoint is a prefix


def test_edit_detected(log: AuditLog) -> None:
    raw(log).execute("UPDATE audit_entries SET detail = ? WHERE seq = 5",
                     (json.dumps({"eps": 0.0, "request": "r5"}),))  # fmt: skip
    rep = log.verify()
    assert not rep.ok and rep.first_bad_seq == 5 and "hash" in rep.reason


def test_edit_with_recomputed_hash_detected(log: AuditLog) -> None:
    e = list(log.entries())[4]
    detail = {"eps": 0.0, "request": "r5"}
    h = entry_hash(e.seq, e.time, e.actor, e.project, e.action, detail, e.prev_hash)
    raw(log).execute(
        "UPDATE audit_entries SET detail = ?, hash = ? WHERE seq = 5",
        (json.dumps(detail, sort_keys=True, separators=(",", ":")), h),
    )
    rep = log.verify()
    assert not rep.ok and rep.first_bad_seq == 5 and "rewritten" in rep.reason


def test_delete_detected(log: AuditLog) -> None:
    raw(log).execute("DELETE FROM audit_entries WHERE seq = 5")
    rep = log.verify()
    assert not rep.ok and rep.first_bad_seq == 5 and "missing" in rep.reason


def test_reorder_detected(log: AuditLog) -> None:
    con = raw(log)
    con.execute("BEGIN")
    con.execute("UPDATE audit_entries SET seq = -1 WHERE seq = 5")
    con.execute("UPDATE audit_entries SET seq = 5 WHERE seq = 6")
    con.execute("UPDATE audit_entries SET seq = 6 WHERE seq = -1")
    con.execute("COMMIT")
    rep = log.verify()
    assert not rep.ok and rep.first_bad_seq == 5


def test_truncated_tail_detected(log: AuditLog) -> None:
    raw(log).execute("DELETE FROM audit_entries WHERE seq > 7")
    rep = log.verify()
    assert not rep.ok and rep.first_bad_seq == 8 and "truncated" in rep.reason
    # Appending after a truncation chains from the head: the gap stays visible.
    log.append("x", "p", "a", {})
    assert log.verify().first_bad_seq == 8


def test_truncation_with_head_rewritten_needs_external_checkpoint(log: AuditLog) -> None:
    exported = log.head()  # e.g. written into the coordinator's log
    entries = list(log.entries())
    con = raw(log)
    con.execute("DELETE FROM audit_entries WHERE seq > 7")
    con.execute("UPDATE audit_head SET seq = 7, hash = ? WHERE id = 1", (entries[6].hash,))
    assert log.verify().ok  # the documented limit: undetectable from inside the file
    rep = log.verify(checkpoint=exported)
    assert not rep.ok and rep.first_bad_seq == 8 and "external checkpoint" in rep.reason


def test_entry_appended_behind_the_head_detected(log: AuditLog) -> None:
    e = list(log.entries())[-1]
    h = entry_hash(11, e.time, "intruder", "p", "a", {}, e.hash)
    raw(log).execute("INSERT INTO audit_entries VALUES (11, ?, 'intruder', 'p', 'a', '{}', ?, ?)",
                     (e.time, e.hash, h))  # fmt: skip
    rep = log.verify()
    assert not rep.ok and rep.first_bad_seq == 11


def _append_many(path: str, who: str, n: int, start: mp.Event) -> None:
    a = AuditLog(path)
    start.wait()
    for i in range(n):
        a.append(who, "p", "query", {"i": i})


def test_concurrent_appenders(tmp_path: Path) -> None:
    path = str(tmp_path / "audit.db")
    shared = AuditLog(path)
    ctx = mp.get_context("fork")
    start = ctx.Event()
    procs = [ctx.Process(target=_append_many, args=(path, f"proc{k}", 25, start))
             for k in range(4)]  # fmt: skip
    go = threading.Event()

    def thread_work(k: int) -> None:
        go.wait()
        for i in range(25):
            shared.append(f"thread{k}", "p", "query", {"i": i})

    threads = [threading.Thread(target=thread_work, args=(k,)) for k in range(4)]
    for p in procs:
        p.start()
    for t in threads:
        t.start()
    start.set()
    go.set()
    for t in threads:
        t.join()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    rep = shared.verify()
    assert rep.ok and rep.entries == 200
    actors = [e.actor for e in shared.entries()]
    assert all(actors.count(f"{kind}{k}") == 25 for kind in ("proc", "thread") for k in range(4))


def test_detail_must_be_json(tmp_path: Path) -> None:
    a = AuditLog(tmp_path / "a.db")
    with pytest.raises((TypeError, ValueError)):
        a.append("x", "p", "a", {"bad": float("nan")})
    with pytest.raises(TypeError):
        a.append("x", "p", "a", ["not", "a", "dict"])  # type: ignore[arg-type]
    assert a.verify().ok and a.verify().entries == 0
