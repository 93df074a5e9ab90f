"""The node's one release cache (nodes/_releases.py), on a real SQLite file: query partials
and training rounds side by side, the first outcome of a request id is its outcome, and a
cache written before training shared it is read as it was."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import numpy as np

from nodes._releases import QUERY, TRAINING, ReleaseStore
from nodes._training import keep_round, kept_round


def test_queries_and_rounds_share_one_cache_and_the_first_outcome_stays(
        tmp_path: Path) -> None:
    store = ReleaseStore(tmp_path / "releases.sqlite")
    store.put("q1", QUERY, b"partial-1")
    store.put("q1", QUERY, b"partial-2")  # a replay never replaces the release
    weights = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    keep_round(store, "run:1:n", weights, {"loss": 0.5}, {"sigma": 1.2})
    keep_round(store, "run:1:n", {"w": np.zeros((2, 3), np.float32)}, {}, {})
    assert store.get("q1") == (b"partial-1", {})
    arrays, metrics, dp = kept_round(store, "run:1:n")
    assert np.array_equal(arrays["w"], weights["w"]) and metrics == {"loss": 0.5}
    assert dp == {"sigma": 1.2}
    assert kept_round(store, "run:2:n") is None and store.get("nope") is None
    kinds = dict(sqlite3.connect(tmp_path / "releases.sqlite").execute(
        "SELECT request_id, kind FROM releases"))
    assert kinds == {"q1": QUERY, "run:1:n": TRAINING}
    store.put_failure("q2", "failed", "inc-1")
    store.put_failure("q2", "other", "inc-2")
    assert store.failure("q2") == ("failed", "inc-1")
    assert store.keep_plan("run", {"sigma": 1}) == {"sigma": 1}
    assert store.keep_plan("run", {"sigma": 2}) == {"sigma": 1}  # drawn once


def test_a_cache_from_before_training_shared_it_is_read_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "releases.sqlite"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE releases (request_id TEXT PRIMARY KEY, result BLOB NOT NULL, "
               "created_at TEXT NOT NULL)")
    db.execute("INSERT INTO releases VALUES ('old', x'0102', '2026-01-01')")
    db.commit()
    db.close()
    store = ReleaseStore(path)
    assert store.get("old") == (b"\x01\x02", {})
    ReleaseStore(path)  # opening again migrates nothing twice


def test_threads_each_get_their_own_connection(tmp_path: Path) -> None:
    store = ReleaseStore(tmp_path / "releases.sqlite")
    errors: list[BaseException] = []

    def put(i: int) -> None:
        try:
            for j in range(20):
                store.put(f"{i}:{j}", QUERY, bytes([i, j]))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=put, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(store.get(f"{i}:{j}") == (bytes([i, j]), {}) for i in range(4) for j in range(20))
