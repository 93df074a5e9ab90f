"""Per-node partial results → the released table (federation/_merge.py), on Arrow tables
built by hand: no node, no server."""

from __future__ import annotations

import pyarrow as pa
import pytest

from federation._merge import merge
from federation._planner import plan_query
from federation._sql import parse
from federation.proto import bulle_pb2 as pb

SCHEMA = {"pupils": {"sex": "VARCHAR", "g3": "BIGINT"},
          "schools": {"uai": "VARCHAR", "ips": "DOUBLE"}}


def _part(node: str, **columns: list) -> tuple[pb.PartialResult, pa.Table]:
    return pb.PartialResult(node_id=node, tier="open"), pa.table(columns)


@pytest.mark.parametrize("sql", [
    # plain: merged in pyarrow
    "SELECT sex, COUNT(*) AS n, SUM(g3) AS s, AVG(g3) AS mean FROM pupils GROUP BY sex "
    "ORDER BY n DESC",
    # HAVING: merged in DuckDB
    "SELECT sex, COUNT(*) AS n, SUM(g3) AS s, AVG(g3) AS mean FROM pupils GROUP BY sex "
    "HAVING COUNT(*) > 0 ORDER BY n DESC",
])
def test_partials_add_up_across_nodes(sql: str) -> None:
    fp = plan_query(parse(sql, SCHEMA))
    assert [p.name for p in fp.partials] == ["p0", "p1", "p2"]  # rows, sum, count of g3
    a = _part("a", g0=["F", "M"], p0=[3, 1], p1=[30, 12], p2=[3, 1],
              __suppressed=[False, False])
    b = _part("b", g0=["F", "M"], p0=[1, 4], p1=[10, 28], p2=[1, 4],
              __suppressed=[False, False])
    out = merge(fp, [a, b], max_rows=100)
    assert out.table.column_names == ["sex", "n", "s", "mean"]
    assert out.table.to_pylist() == [
        {"sex": "M", "n": 5, "s": 40, "mean": 8.0},
        {"sex": "F", "n": 4, "s": 40, "mean": 10.0},
    ]
    assert out.suppressed == [[False] * 4] * 2


def test_a_cell_no_node_could_release_is_suppressed() -> None:
    fp = plan_query(parse("SELECT sex, COUNT(*) AS n FROM pupils GROUP BY sex", SCHEMA))
    a = _part("a", g0=["F", "M"], p0=[7, None], __suppressed=[False, True])
    b = _part("b", g0=["F"], p0=[2], __suppressed=[False])
    out = merge(fp, [a, b], max_rows=100)
    assert out.table.to_pylist() == [{"sex": "F", "n": 9}, {"sex": "M", "n": None}]
    assert out.suppressed == [[False, False], [False, True]]  # the key is not derived
    assert out.suppressed_cells == 1


def test_rows_are_concatenated_ordered_and_renamed() -> None:
    fp = plan_query(parse("SELECT uai, ips AS x FROM schools ORDER BY x DESC", SCHEMA))
    a = _part("a", c0=["u1", "u2"], c1=[90.0, 110.0])
    b = _part("b", c0=["u3"], c1=[100.0])
    out = merge(fp, [a, b], max_rows=2)
    assert out.table.to_pylist() == [{"uai": "u2", "x": 110.0}, {"uai": "u3", "x": 100.0}]
    assert any("truncated to 2 rows" in n for n in out.notes)
