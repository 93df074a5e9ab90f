"""Row output of open tables through the streaming RPC (ExecuteRows): several chunks,
the same rows as DuckDB, the row cap enforced mid-stream, every stream audited."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest

from federation._errors import QueryError
from tests._federation import start_federation


@pytest.fixture
def big_open_csv(tmp_path: Path) -> Path:
    path = tmp_path / "events.csv"
    duckdb.connect().execute(
        f"COPY (SELECT range AS id, range % 97 AS k, 'e' || (range % 13) AS label "
        f"FROM range(150000)) TO '{path}' (HEADER, DELIMITER ',')")
    return path


def test_rows_stream_in_chunks_and_equal_duckdb(tmp_path: Path, certs: Path,
                                               big_open_csv: Path) -> None:
    dataset = {"table": "events", "source": str(big_open_csv), "tier": "open"}
    (tmp_path / "fed").mkdir()
    fed = start_federation(tmp_path / "fed", certs, {"solo": [dataset]})
    try:
        stub_calls = []
        client = fed.coordinator.clients["solo"]
        real = client.stub.ExecuteRows

        def counting(plan, timeout):
            for chunk in real(plan, timeout=timeout):
                stub_calls.append(len(chunk.arrow_ipc))
                yield chunk

        client.stub.ExecuteRows = counting
        out = fed.run("SELECT id, k, label FROM events WHERE k < 50 ORDER BY id")
        expected = duckdb.connect().sql(
            f"SELECT id, k, label FROM read_csv('{big_open_csv}') WHERE k < 50 ORDER BY id"
        ).fetchall()
        assert [tuple(r) for r in out["rows"]] == expected and len(expected) > 70_000
        # header, schema, two batches of 65,536 rows or fewer, end of stream
        assert len(stub_calls) >= 5 and stub_calls[0] == 0
        entry = [e for e in fed.engines["solo"].guard.audit.entries()
                 if e.action == "released"][-1]
        assert entry.detail["rows"] == len(expected) and entry.detail["streamed"] is True
    finally:
        fed.close()


def test_row_cap_is_enforced_while_streaming(tmp_path: Path, certs: Path,
                                             big_open_csv: Path) -> None:
    dataset = {"table": "events", "source": str(big_open_csv), "tier": "open"}
    (tmp_path / "fed").mkdir()
    fed = start_federation(tmp_path / "fed", certs, {"solo": [dataset]})
    try:
        engine = fed.engines["solo"]
        engine.max_rows = 100_000  # the coordinator asks for max_rows + 1 at most
        with pytest.raises(QueryError) as err:  # the node's SQL asks for 100,001 rows
            fed.run("SELECT id FROM events")
        assert err.value.code == "node_refused"
        assert "more than 100000 rows" in err.value.message
        actions = [e.action for e in engine.guard.audit.entries()]
        assert actions[-2:] == ["released_partly", "refused"]  # what left, then why it stopped
        partly = list(engine.guard.audit.entries())[-2]
        assert 0 < partly.detail["rows"] <= 100_000
    finally:
        fed.close()
