"""Total evaluation (DESIGN.md): whether a query fails must never depend on the data.

1. Every operator and cast a node compiles is total (``federation/proto/ops.py``): unit
   tests on plain DuckDB, each operator with the inputs that make DuckDB raise, then random
   compositions (DuckDB's optimizer must not move a failing part out of its TRY).
2. Probes around singled-out pupils of the demo data (UCI ``lycee_students``, OULAD
   ``student_info``), for ≥ 20 units each, as SQL through the coordinator and as plans sent
   straight to a node: the outcome with the target present equals the outcome with a
   condition nobody meets. Before total evaluation each probe failed exactly when the
   target existed; each is written so that the target's failing value, now NULL, leaves
   the answer as if the condition met no one.
3. What still fails after a node accepted a plan is one outcome, whatever the cause and
   the node; the cause goes to the node's audit chain.
4. Deadlines and cancellation interrupt the query in DuckDB and free the worker.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator
from datetime import date
from pathlib import Path
from typing import Any

import duckdb
import grpc
import pyarrow as pa
import pytest
from sqlglot import exp

from federation._errors import EVALUATION_FAILED, QueryError
from federation._planner import plan_query
from federation._sql import parse
from federation._tree import Call, Col, Expr, Lit, to_proto
from federation.proto import bulle_pb2 as pb
from federation.proto import bulle_pb2_grpc as pb_grpc
from federation.proto.ops import OPS, column, to_sql
from nodes._config import ConfigError, load_node_config
from nodes._engine import FAILED, Deadline, PlanFailed
from tests._federation import DATA, Federation, node_toml, start_federation, wait_for
from tests.conftest import depp, uci

INT64_MAX = 9223372036854775807
UNITS = 20

# -- 1. the operators, on plain DuckDB ---------------------------------------------------

# a node's connection: TRY is only reliable with DuckDB's common-subexpression pass off
NODE_DUCKDB = {"threads": 1, "disabled_optimizers": "common_subexpressions"}
TYPES = {"b": "BIGINT", "i": "INTEGER", "sm": "SMALLINT", "d": "DOUBLE", "z": "BIGINT",
         "s": "VARCHAR", "dt": "DATE", "ts": "TIMESTAMP", "f": "BOOLEAN"}
ROWS = f"""
    ({INT64_MAX}, 2147483647, 32767, 1e300, 0, 'abc', DATE '2020-01-01',
     TIMESTAMP '2020-01-01 10:00', true),
    ({-INT64_MAX - 1}, -2147483648, -32768, -1.0, 0, '12', 'infinity'::DATE,
     'infinity'::TIMESTAMP, false),
    (1, 1, 1, 'nan'::DOUBLE, 1, '', '-infinity'::DATE, TIMESTAMP '1970-01-01', NULL),
    (NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)"""


@pytest.fixture(scope="module")
def plain() -> Iterator[duckdb.DuckDBPyConnection]:
    con = duckdb.connect(config=NODE_DUCKDB)
    con.execute(f"CREATE TABLE t AS SELECT * FROM (VALUES {ROWS}) v({', '.join(TYPES)})")
    yield con
    con.close()


def typed(table: str, name: str) -> exp.Expression:
    return column(table, name, TYPES[name])


def untyped(table: str, name: str) -> exp.Expression:
    return column(table, name)  # as the coordinator's merge resolves released columns


def C(name: str) -> Col:
    return Col("t", name)


def compiled(e: Expr, resolve: Callable[[str, str], exp.Expression] = typed,
             condition: bool = False) -> str:
    return to_sql(to_proto(e), resolve, condition=condition).sql("duckdb")


def values(con: duckdb.DuckDBPyConnection, e: Expr, **kw: Any) -> list[Any]:
    return [r[0] for r in con.execute(f"SELECT {compiled(e, **kw)} FROM t AS t").fetchall()]


MIN = Call("sub", (Call("neg", (Lit(INT64_MAX),)), Lit(1)))
# (expression, its values on the four rows): the rows where DuckDB raised are NULL
FAILING: list[tuple[Expr, list[Any]]] = [
    (Call("add", (C("b"), Lit(1))), [None, -INT64_MAX, 2, None]),
    (Call("sub", (C("b"), Lit(1))), [INT64_MAX - 1, None, 0, None]),
    (Call("mul", (C("b"), Lit(2))), [None, None, 2, None]),
    (Call("mul", (C("i"), C("i"))), [None, None, 1, None]),
    (Call("add", (C("sm"), Lit(1))), [32768, -32767, 2, None]),  # SMALLINT + BIGINT literal
    (Call("neg", (C("b"),)), [-INT64_MAX, None, -1, None]),
    (Call("abs", (C("b"),)), [INT64_MAX, None, 1, None]),
    (Call("mod", (Lit(7), C("z"))), [None, None, 0, None]),
    (Call("mod", (C("b"), Lit(-1))), [0, None, 0, None]),
    (Call("round", (C("b"), Lit(-1))), [None, None, 0, None]),
    (Call("substr", (C("s"), C("b"))), [None, None, "", None]),
    (Call("substr", (C("s"), Lit(1), C("b"))), [None, None, "", None]),
    (Call("cast", (C("s"), Lit("BIGINT"))), [None, 12, None, None]),
    (Call("cast", (C("s"), Lit("DATE"))), [None, None, None, None]),
    (Call("cast", (C("s"), Lit("BOOLEAN"))), [None, None, None, None]),
    (Call("cast", (C("d"), Lit("BIGINT"))), [None, -1, None, None]),
    (Call("cast", (C("b"), Lit("DOUBLE"))), [float(INT64_MAX), float(-INT64_MAX - 1), 1.0,
                                             None]),
    (Call("eq", (C("s"), Lit(12))), [None, True, None, None]),  # the column cast per row
    (Call("eq", (C("i"), Lit("abc"))), [None, None, None, None]),  # the literal cast
    (Call("gt", (C("dt"), Lit("2020-13-45"))), [None, None, None, None]),
    (Call("eq", (C("i"), C("s"))), [None, False, None, None]),
    (Call("in", (C("s"), *(Lit(k) for k in range(12)))), [None, False, None, None]),
    (Call("between", (C("i"), Lit("x"), Lit(5))), [False, None, None, None]),
    (Call("coalesce", (C("s"), C("i"))), [2147483647, 12, 1, None]),
    (Call("nullif", (C("i"), C("s"))), [2147483647, -2147483648, 1, None]),
    (Call("greatest", (C("i"), C("s"))), [2147483647, 12, 1, None]),
    (Call("case", (Call("eq", (C("z"), Lit(0))), Lit("abc"), C("i"))), [None, None, 1, None]),
    (Call("and", (C("s"), Lit(True))), [None, None, None, None]),
    (Call("not", (C("s"),)), [None, None, None, None]),
    (Call("add", (C("dt"), C("i"))), [None, date.max, date.min, None]),  # out of range
    (Call("mul", (Lit(1.5), MIN)), [-1.3835058055282164e19] * 4),  # DOUBLE, not DECIMAL
]
# never raise in DuckDB 2.0 (IEEE values, NULL on infinite dates): left without TRY
TOTAL: list[Expr] = [
    Call("div", (Lit(1), C("z"))), Call("div", (C("b"), Lit(-1))),
    Call("div", (C("d"), Lit(0.0))), Call("sqrt", (C("d"),)), Call("ln", (C("d"),)),
    Call("ln", (C("z"),)), Call("exp", (C("d"),)), Call("power", (C("d"), C("d"))),
    Call("power", (C("b"), Lit(3))), Call("floor", (C("d"),)), Call("ceil", (C("b"),)),
    Call("bucket", (C("b"), Lit(0))), Call("bucket", (C("d"), Lit(0.5))),
    Call("round", (C("d"), Lit(2147483647))), Call("round", (C("d"), Lit(-2147483647))),
    Call("year", (C("dt"),)), Call("month", (C("dt"),)), Call("year", (C("ts"),)),
    Call("lower", (C("s"),)), Call("upper", (C("s"),)), Call("trim", (C("s"),)),
    Call("length", (C("s"),)), Call("concat", (C("s"), C("b"), C("d"), C("dt"))),
    Call("like", (C("s"), Lit("a\\"))), Call("ilike", (C("s"), C("s"))),
    Call("least", (C("b"), C("d"))), Call("is_null", (C("s"),)),
]


@pytest.mark.parametrize("e,expected", FAILING, ids=lambda v: getattr(v, "op", None))
def test_each_failing_operator_gives_null(plain, e: Expr, expected: list[Any]) -> None:
    assert values(plain, e) == expected, compiled(e)
    # without the columns' types (the coordinator's merge): TRY around the operator, so
    # mixed operands are NULL as a whole, or refused by DuckDB's binder before any row
    try:
        untyped_values = values(plain, e, resolve=untyped)
    except duckdb.BinderException:
        return
    assert [v is None for v in untyped_values] >= [v is None for v in expected]


def test_operators_that_cannot_fail_run_on_every_bad_input(plain) -> None:
    for e in TOTAL:
        values(plain, e)
        if not OPS[e.op].fails:
            assert "TRY" not in compiled(e), compiled(e)  # no cost where nothing can fail


def test_every_operator_is_covered() -> None:
    ops = {e.op for e, _ in FAILING} | {e.op for e in TOTAL} | {"or", "gte", "lt", "lte",
                                                               "neq", "case"}
    assert set(OPS) <= ops | {"case"}, set(OPS) - ops


def test_cheap_comparisons_stay_cheap() -> None:
    # same-typed operands: no TRY (it costs ~2.5 ms per million rows and hides the
    # comparison from DuckDB's filter pushdown); a date literal is cast once
    assert compiled(Call("eq", (C("i"), Lit(5)))) == '("t"."i") = (5)'
    assert compiled(Call("gt", (C("dt"), Lit("2020-01-01")))) == \
        "(\"t\".\"dt\") > (TRY_CAST('2020-01-01' AS DATE))"
    assert compiled(Call("and", (Call("lt", (C("b"), Lit(3))), Call("like", (C("s"),
                                                                           Lit("a%")))))) \
        == "((\"t\".\"b\") < (3)) AND ((\"t\".\"s\") LIKE ('a%'))"
    assert compiled(Call("cast", (C("s"), Lit("BIGINT")))) == 'TRY_CAST("t"."s" AS BIGINT)'
    # a chain of NULL-propagating operators shares one TRY (the same result as one each)
    assert compiled(Call("gt", (Call("add", (Call("mul", (C("b"), Lit(2))), Lit(1))),
                                Lit(0)))) == 'TRY(((("t"."b") * (2)) + (1)) > (0))'
    # a WHERE clause that is not a boolean is cast like DuckDB would, but totally
    assert compiled(C("s"), condition=True) == 'TRY_CAST("t"."s" AS BOOLEAN)'


def _random_expr(rng: random.Random, depth: int) -> Expr:
    if depth == 0 or rng.random() < 0.25:
        if rng.random() < 0.6:
            return C(rng.choice(list(TYPES)))
        return Lit(rng.choice([0, 1, -1, 2, INT64_MAX, -INT64_MAX, 1.5, 1e300, "abc", "12",
                               "2020-01-01", True, None]))
    if rng.random() < 0.1:
        return Call("cast", (_random_expr(rng, depth - 1),
                             Lit(rng.choice(["BIGINT", "DOUBLE", "VARCHAR", "DATE",
                                             "BOOLEAN"]))))
    name = rng.choice(sorted(OPS))
    op = OPS[name]
    n = rng.randint(op.min_args, min(op.max_args or 4, op.min_args + 2))
    args = [_random_expr(rng, depth - 1) for _ in range(n)]
    if name == "in":
        args[1:] = [Lit(rng.choice([0, 1, "abc", 2.5])) for _ in args[1:]] * 4
    return Call(name, tuple(args))


def test_random_compositions_never_raise(plain) -> None:
    """DuckDB may rewrite what it runs (common subexpressions, IN lists as joins, moved
    constants): no composition of operators may let an error out of its TRY. Binder
    errors (wrong types, known before any row is read) are the node's static refusals."""
    rng = random.Random(20261205)
    ran = 0
    for _ in range(200):  # 8,000 deeper trees ran clean while building this
        e, other = _random_expr(rng, 4), _random_expr(rng, 3)
        for resolve in (typed, untyped):
            a, b = compiled(e, resolve), compiled(other, resolve)
            shared = compiled(Call("add", (e, e)), resolve)  # the same subtree twice
            on = compiled(Call("eq", (e, other)), resolve, True)
            for sql in (f"SELECT {a}, {a}, {b}, {shared} FROM t AS t",
                        f"SELECT count(*) FROM t AS t WHERE {compiled(e, resolve, True)}",
                        f"SELECT {b}, count({a}), max({a}) FROM t AS t GROUP BY 1",
                        f"SELECT count(*) FROM t AS t JOIN t AS u ON {on}"):
                try:
                    relation = plain.sql(sql)
                except (duckdb.BinderException, duckdb.CatalogException):
                    continue
                relation.fetchall()  # any error here is a failure the data decides
                ran += 1
    assert ran > 300


def test_float_literals_are_double_so_sums_cannot_overflow_decimal(plain) -> None:
    # DuckDB types 1.5 as DECIMAL: a product of such literals reaches DECIMAL(38), and a
    # SUM of a few of those overflows, an error the rows summed decide
    big = Call("mul", (Call("mul", (Lit(4 * 10**18), Lit(1.5))),
                       Call("mul", (Lit(10**17), Lit(1.5)))))
    sql = compiled(big)
    assert "DOUBLE" in plain.execute(f"SELECT typeof({sql})").fetchone()[0]
    assert plain.execute(f"SELECT sum({sql}) FROM range(20)").fetchone()[0] > 1e37


# -- 2. probes around singled-out pupils, through the coordinator and at the node -------

# Each probe is an expression that DuckDB failed to evaluate on the target's row, and that
# is NULL there now. {n}: a numeric column, {s}: a text column of the table. The probes of
# a query are added up (NULL-propagating: all are evaluated, and any that still raised
# would fail the query), in the rows that {c} singles out (or, "absent", in no row).
VALUE_PROBES = {
    "mod_by_zero": "1 % ({n} - {n})",
    "mod_int64_min_by_minus_1": "(-9223372036854775807 - 1 + {n} - {n}) % -1",
    "mul_overflow": "({n} + 1) * 9223372036854775807",
    "add_overflow": "9223372036854775807 + ({n} + 1)",
    "sub_overflow": "-9223372036854775807 - ({n} + 2)",
    "abs_overflow": "abs(-9223372036854775807 - 1 + {n} - {n})",
    "neg_overflow": "-(-9223372036854775807 - 1 + {n} - {n})",
    "round_overflow": "round(9223372036854775807 + {n} - {n}, -1)",
    "varchar_to_bigint": "CAST({s} AS BIGINT)",
    "varchar_to_integer": "CAST({s} || 'x' AS INTEGER)",
    "varchar_to_date": "length(CAST(CAST({s} AS DATE) AS VARCHAR))",
    "varchar_to_boolean": "CASE WHEN CAST({s} AS BOOLEAN) THEN 1 END",
    "huge_double_to_bigint": "CAST(1e300 * ({n} + 1) AS BIGINT)",
    "try_cast_compiled_as_cast": "TRY_CAST({s} AS BIGINT)",
    "substr_offset": "length(substr({s}, 9223372036854775807 - {n}))",
    "varchar_equals_number": "CASE WHEN {s} = 1 THEN 1 END",
    "number_equals_bad_text": "CASE WHEN {n} = 'abc' THEN 1 END",
    "varchar_in_numbers": "CASE WHEN {s} IN (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12) THEN 1 END",
}
# STDDEV's partial Σx² overflowed BIGINT for x ≈ 4e9 (x itself fits): one value, so the
# released deviation is NULL either way (the node's exact partials differ: a test setting)
SQUARE_PROBE = "STDDEV(CASE WHEN {c} THEN 4000000000 * ({n} + 1) END)"
# the same failures in WHERE: the target's row is counted either way (coalesce(NULL, 0) = 0;
# "IS NULL" would not do: DuckDB drops it where statistics say the column has no NULL)
WHERE_PROBES = {
    "where_mod_by_zero": "1 % ({n} - {n})",
    "where_cast": "CAST({s} || 'x' AS BIGINT)",
    "where_overflow": "{n} * 9223372036854775807 * 2",
}


def _crafted(c: pb.Expr, n: pb.Expr, s: pb.Expr) -> tuple[pb.Expr, pb.Expr]:
    """Failures only a crafted plan asks for (implicit casts in every operator that brings
    operands to one type, text where a condition is expected): (a COUNT argument, a WHERE
    clause), NULL-neutral like the SQL probes."""

    def call(op: str, *args: pb.Expr) -> pb.Expr:
        return pb.Expr(call=pb.Call(op=op, args=list(args)))

    def lit(v: object) -> pb.Expr:
        return to_proto(Lit(v))

    int64_min = call("sub", call("neg", lit(INT64_MAX)), call("add", lit(1), call("sub", n, n)))
    probes = [
        call("not", s),  # text as a condition
        call("between", n, s, lit(5)),
        call("in", s, *(lit(k) for k in range(12))),
        call("eq", call("coalesce", s, lit(1)), lit(2)),
        call("eq", call("nullif", n, s), lit(-1)),
        call("eq", call("case", c, s, n), lit(-1)),
        call("eq", call("greatest", n, s), lit(-1)),
        call("eq", call("cast", s, lit("DATE")), lit("2020-13-45")),
        call("eq", call("mod", int64_min, lit(-1)), lit(5)),
        call("eq", call("power", lit("abc"), n), lit(1)),
    ]
    count = call("case", call("and", c, call("or", *probes)), lit(1))
    where = call("or", call("case", c, s, lit("true")), c)  # text as the WHERE clause
    return count, where


UCI_KEYS = ("sex", "age", "address", "absences", "g1", "g2", "g3", "mjob")


def _condition(keys: tuple[str, ...], values: tuple[Any, ...], absent: bool) -> str:
    parts = []
    for k, v in zip(keys, values, strict=True):
        if absent and isinstance(v, int):
            v = -1 - v  # no one: every numeric key here is ≥ 0
            absent = False
        parts.append(f"{k} = '{v}'" if isinstance(v, str) else f"{k} = {v}")
    return " AND ".join(parts)


def uci_units(union_db: duckdb.DuckDBPyConnection) -> list[tuple[Any, ...]]:
    """Pupils of the GP school that one combination of attributes singles out."""
    keys = ", ".join(UCI_KEYS)
    return union_db.execute(
        f"SELECT {keys} FROM lycee_students GROUP BY {keys} HAVING count(*) = 1 AND "
        f"min(school) = 'GP' ORDER BY hash({keys}) LIMIT {UNITS}").fetchall()


OULAD_KEYS = ("code_module", "code_presentation", "id_student")


def oulad_units(union_db: duckdb.DuckDBPyConnection) -> list[tuple[Any, ...]]:
    """Students of the v1 node's modules (AAA, BBB, CCC), one row each."""
    keys = ", ".join(OULAD_KEYS)
    return union_db.execute(
        f"SELECT {keys} FROM student_info WHERE code_module IN ('AAA', 'BBB', 'CCC') "
        f"GROUP BY {keys} HAVING count(*) = 1 ORDER BY hash({keys}) LIMIT {UNITS}").fetchall()


TABLES = {  # table: (unit keys, units, numeric column, text column, node holding the units)
    "lycee_students": (UCI_KEYS, uci_units, "g3", "mjob", "gp"),
    "student_info": (OULAD_KEYS, oulad_units, "studied_credits", "region", "v1"),
}


def _queries(table: str, c: str, square: bool = True) -> dict[str, str]:
    _, _, n, s, _ = TABLES[table]
    added = " + ".join(f"({p.format(n=n, s=s)})" for p in VALUE_PROBES.values())
    where = " AND ".join(f"(NOT ({c}) OR coalesce({p.format(n=n, s=s)}, 0) = 0)"
                         for p in WHERE_PROBES.values())
    square_item = f", {SQUARE_PROBE.format(c=c, n=n)} AS square" if square else ""
    return {"values": f"SELECT COUNT(*) AS n, SUM({n}) AS total, SUM(CASE WHEN {c} THEN "
                      f"{added} ELSE 0 END) AS probes{square_item} FROM {table}",
            "where": f"SELECT COUNT(*) AS n, SUM({n}) AS total FROM {table} WHERE {where}"}


def sql_outcome(fed: Federation, sql: str) -> tuple[Any, ...]:
    try:
        r = fed.run(sql)
    except QueryError as e:
        return ("error", e.code, e.message, e.nodes)
    return ("ok", _normal(r["rows"]), r["suppressed"], r["notes"], r["columns"])


def _normal(v: Any) -> Any:
    """NaN as a string, so that equal outcomes compare equal."""
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    if isinstance(v, (list, tuple)):
        return [_normal(x) for x in v]
    if isinstance(v, dict):
        return {k: _normal(x) for k, x in v.items()}
    return v


def _raises(con: duckdb.DuckDBPyConnection, sql: str) -> bool:
    try:
        con.execute(sql).fetchall()
    except duckdb.Error:
        return True
    return False


@pytest.mark.parametrize("table", sorted(TABLES))
def test_error_probes_through_the_coordinator(exact_fed, union_db, table: str) -> None:
    keys, units, _, n, s, _ = (*TABLES[table][:2], None, *TABLES[table][2:])
    targets = units(union_db)
    assert len(targets) == UNITS
    for unit in targets:
        # each probe is an oracle in DuckDB itself (the union of the nodes' data, plain
        # SQL): it fails with the target and runs without
        for name, probe in {**VALUE_PROBES, **WHERE_PROBES}.items():
            if name == "try_cast_compiled_as_cast":  # was an oracle by the old compiler
                continue
            for absent in (False, True):
                c = _condition(keys, unit, absent)
                sql = (f"SELECT COUNT(*) FROM {table} WHERE NOT ({c}) OR "
                       f"coalesce({probe.format(n=n, s=s)}, 0) = 0" if name in WHERE_PROBES else
                       f"SELECT SUM(CASE WHEN {c} THEN {probe.format(n=n, s=s)} END) "
                       f"FROM {table}")
                assert _raises(union_db, sql) != absent, (name, unit, absent)
        present = _queries(table, _condition(keys, unit, absent=False))
        absent = _queries(table, _condition(keys, unit, absent=True))
        for name in present:
            got, expected = sql_outcome(exact_fed, present[name]), \
                sql_outcome(exact_fed, absent[name])
            assert got[0] == "ok", (name, unit, got)
            assert got == expected, (name, unit)


def _stub(fed: Federation, node: str, certs: Path) -> tuple[pb_grpc.NodeStub, grpc.Channel]:
    creds = grpc.ssl_channel_credentials(
        root_certificates=(certs / "ca.pem").read_bytes(),
        private_key=(certs / "bulle-coordinator.key").read_bytes(),
        certificate_chain=(certs / "bulle-coordinator.pem").read_bytes())
    channel = grpc.secure_channel(f"127.0.0.1:{fed.ports[node]}", creds)
    return pb_grpc.NodeStub(channel), channel


def node_outcome(stub: pb_grpc.NodeStub, plan: pb.Plan, timeout: float = 30
                 ) -> tuple[Any, ...]:
    try:
        r = stub.Execute(plan, timeout=timeout)
    except grpc.RpcError as e:
        return ("error", e.code(), e.details())
    with pa.ipc.open_stream(r.arrow_ipc) as reader:
        rows = reader.read_all().to_pylist()
    return ("ok", _normal(rows), r.suppressed_cells, r.hidden_cells, r.tier)


def _plan(fed: Federation, sql: str) -> pb.Plan:
    return plan_query(parse(sql, fed.coordinator.schema())).plan


def _crafted_plans(fed: Federation, table: str, c_sql: str) -> dict[str, pb.Plan]:
    _, _, n, s, _ = TABLES[table]
    plans = {name: _plan(fed, sql) for name, sql in _queries(table, c_sql, False).items()}
    cond = _plan(fed, f"SELECT COUNT(*) FROM {table} WHERE {c_sql}").where
    column_of = {name: _plan(fed, f"SELECT SUM({name}) FROM {table}").aggregates[0].arg
                 for name in (n, s)}
    count, where = _crafted(cond, column_of[n], column_of[s])
    plans["crafted_count"] = _plan(fed, f"SELECT COUNT(*) AS n FROM {table}")
    plans["crafted_count"].aggregates.add(name="probes", kind=pb.COUNT, arg=count)
    plans["crafted_where"] = _plan(fed, f"SELECT COUNT(*) AS n FROM {table}")
    plans["crafted_where"].where.CopyFrom(where)
    return plans


@pytest.mark.parametrize("table", sorted(TABLES))
def test_error_probes_as_crafted_plans_at_the_node(exact_fed, union_db, certs,
                                                   table: str) -> None:
    keys, units, _, _, node = TABLES[table]
    stub, channel = _stub(exact_fed, node, certs)
    try:
        for unit in units(union_db):
            present = _crafted_plans(exact_fed, table, _condition(keys, unit, absent=False))
            absent = _crafted_plans(exact_fed, table, _condition(keys, unit, absent=True))
            for name in present:
                got, expected = node_outcome(stub, present[name]), \
                    node_outcome(stub, absent[name])
                assert got[0] == "ok", (name, unit, got)
                assert got == expected, (name, unit)
    finally:
        channel.close()


# -- 3. one outcome for whatever fails once a node accepted a plan -----------------------

RUNAWAY = ("SELECT SUM(a.score + b.score + c.score + d.score) AS s FROM student_assessment a "
           "JOIN student_assessment b ON a.id_student = b.id_student "
           "JOIN student_assessment c ON b.id_student = c.id_student "
           "JOIN student_assessment d ON c.id_student = d.id_student")  # 250M rows, ≥ 10 s
ROWS_RUNAWAY = ("SELECT a.uai FROM dnb_colleges a JOIN dnb_colleges b ON a.academie = "
                "b.academie JOIN dnb_colleges c ON b.academie = c.academie ORDER BY a.uai")


@pytest.fixture(scope="module")
def limits_fed(tmp_path_factory: pytest.TempPathFactory, certs: Path) -> Iterator[Federation]:
    """Two schools, and a node holding every OULAD submission (a 4-way self-join runs for
    minutes) and the DNB results (open); the coordinator waits 1.5 s for a node."""
    submissions = {"table": "student_assessment", "tier": "restricted",
                   "source": str(DATA / "oulad" / "studentAssessment.csv"),
                   "privacy_unit": "id_student", "min_count": 0, "cell_key": {"perturb": False}}
    fed = start_federation(tmp_path_factory.mktemp("limits"), certs,
                           {"gp": uci("GP"), "ms": uci("MS"), "solo": [submissions, depp()[1]]},
                           node_timeout_s=1.5)
    yield fed
    fed.close()


def _entries(fed: Federation, node: str, action: str) -> list[Any]:
    return [e for e in fed.engines[node].guard.audit.entries() if e.action == action]


CAUSES: dict[str, tuple[str, Any]] = {  # how each failure is provoked in a real engine
    "conversion": ("sql", "SELECT CAST('secret-value' AS INTEGER) AS n"),
    "division by zero": ("sql", "SELECT 1 % 0 AS n"),
    "overflow": ("sql", f"SELECT {INT64_MAX} + 1 AS n"),
    "out of memory": ("release", duckdb.OutOfMemoryException("could not allocate")),
    "interrupt": ("release", duckdb.InterruptException("Interrupted!")),
    "arrow": ("release", pa.ArrowInvalid("bad value 'secret-value'")),
    "python memory": ("release", MemoryError()),
    "bug": ("release", KeyError("secret-value")),
}


def test_every_failure_is_one_outcome_at_every_node(limits_fed, certs, monkeypatch) -> None:
    from dataclasses import replace

    import nodes._disclosure  # where the release happens (disclosure control)

    plan = _plan(limits_fed, "SELECT COUNT(*) AS n FROM lycee_students")
    outcomes = set()
    for node in ("gp", "ms"):
        engine = limits_fed.engines[node]
        stub, channel = _stub(limits_fed, node, certs)
        compile_ = engine._compile
        try:
            for what, (how, cause) in CAUSES.items():
                with monkeypatch.context() as m:
                    if how == "sql":  # an engine error in DuckDB itself, after binding
                        m.setattr(engine, "_compile", lambda p, sql=cause, c=compile_:
                                  replace(c(p), sql=sql))
                    else:  # a failure in the release, after the query

                        def fail(*a: Any, cause: BaseException = cause) -> Any:
                            raise cause

                        m.setattr(nodes._disclosure, "release_restricted", fail)
                    outcomes.add(node_outcome(stub, plan))
                    entry = list(engine.guard.audit.entries())[-1]
                    assert entry.action == "failed", what
                    assert entry.detail["incident"] and entry.detail["cause"], what
                    with pytest.raises(QueryError) as err:
                        limits_fed.run("SELECT COUNT(*) AS n FROM lycee_students")
                    e = err.value
                    outcomes.add(("coordinator", e.code, e.message, tuple(e.nodes),
                                  e.status))
        finally:
            channel.close()
    assert outcomes == {("error", grpc.StatusCode.INTERNAL, FAILED),
                        ("coordinator", "evaluation_failed", EVALUATION_FAILED, (), 502)}
    # the cause is on the node's audit chain (the board reads it), never in the answer
    causes = " ".join(e.detail["cause"] for e in _entries(limits_fed, "gp", "failed"))
    assert "ConversionException" in causes and "KeyError" in causes
    assert "secret-value" not in FAILED + EVALUATION_FAILED


def test_static_refusals_keep_their_message(limits_fed, certs) -> None:
    stub, channel = _stub(limits_fed, "gp", certs)
    try:
        plan = _plan(limits_fed, "SELECT COUNT(*) AS n FROM lycee_students")
        plan.aggregates.add(name="s", kind=pb.SUM, arg=to_proto(Col("lycee_students", "mjob")))
        # a type error is found by DuckDB's binder, before any row is read: data-free
        assert node_outcome(stub, plan)[1:] == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "the plan does not type-check against this node's tables")
        assert _entries(limits_fed, "gp", "refused")
    finally:
        channel.close()


def test_a_refusal_or_a_node_down_hides_another_nodes_failure(limits_fed, monkeypatch
                                                              ) -> None:
    import nodes._disclosure  # where the release happens (disclosure control)

    def fail(*a: Any) -> Any:
        raise RuntimeError("failed at gp")

    monkeypatch.setattr(nodes._disclosure, "release_restricted", fail)
    with pytest.raises(QueryError) as err:  # every node fails: the one outcome
        limits_fed.run("SELECT COUNT(*) AS n FROM lycee_students")
    assert err.value.code == "evaluation_failed"
    ms = limits_fed.engines["ms"]
    monkeypatch.setattr(ms, "_compile", lambda p: (_ for _ in ()).throw(
        nodes._engine.PlanRefused("refused at ms")))
    with pytest.raises(QueryError) as err:  # a static refusal says nothing of gp's data
        limits_fed.run("SELECT COUNT(*) AS n FROM lycee_students")
    assert err.value.code == "node_refused" and err.value.nodes == {
        "ms": "refused: refused at ms"}


# -- 4. deadlines and cancellation interrupt DuckDB and free the worker ------------------

def test_a_runaway_join_is_interrupted_at_its_deadline(limits_fed) -> None:
    before = len(_entries(limits_fed, "solo", "interrupted"))
    with pytest.raises(QueryError) as err:
        limits_fed.run(RUNAWAY)
    assert (err.value.code, err.value.message, err.value.nodes) == (
        "evaluation_failed", EVALUATION_FAILED, {})
    wait_for(lambda: len(_entries(limits_fed, "solo", "interrupted")) > before, 30)
    entry = _entries(limits_fed, "solo", "interrupted")[-1]
    assert entry.detail["by"] == "deadline" and 0 < entry.detail["limit_s"] < 2  # ≈ 1.5 s
    assert "Interrupt" in entry.detail["cause"]
    # the node answers at once
    assert limits_fed.run("SELECT COUNT(*) AS n FROM student_assessment")["rows"] == [[173912]]


def test_interrupts_free_every_worker_and_hit_no_other_plan(limits_fed, certs) -> None:
    """Eight runaways fill the node's eight gRPC workers; their deadlines interrupt them
    while short queries run beside them on the same DuckDB, untouched; then the node
    answers (without interrupts it would be busy for minutes)."""
    stub, channel = _stub(limits_fed, "solo", certs)
    runaway = _plan(limits_fed, RUNAWAY)
    short = _plan(limits_fed, "SELECT COUNT(*) AS n FROM student_assessment "
                              "WHERE score > 50")
    expected = node_outcome(stub, short)
    assert expected[0] == "ok"
    try:
        before = len(_entries(limits_fed, "solo", "interrupted"))
        calls = [stub.Execute.future(runaway, timeout=1 + i / 4) for i in range(6)]
        beside = []
        while len(_entries(limits_fed, "solo", "interrupted")) < before + 6:
            beside.append(node_outcome(stub, short))  # 2 workers left for these
            assert len(beside) < 2000, "the runaways were not interrupted"
        assert beside and all(o == expected for o in beside)
        for call in calls:
            assert call.exception().code() == grpc.StatusCode.DEADLINE_EXCEEDED
        calls = [stub.Execute.future(runaway, timeout=1) for _ in range(8)]
        for call in calls:
            assert call.exception().code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_for(lambda: len(_entries(limits_fed, "solo", "interrupted")) >= before + 14, 60)
        assert node_outcome(stub, short, timeout=10) == expected
    finally:
        channel.close()


def test_a_cancelled_plan_is_interrupted(limits_fed, certs) -> None:
    stub, channel = _stub(limits_fed, "solo", certs)
    engine = limits_fed.engines["solo"]
    try:
        before, started = len(_entries(limits_fed, "solo", "interrupted")), engine.executed
        call = stub.Execute.future(_plan(limits_fed, RUNAWAY), timeout=120)
        wait_for(lambda: engine.executed > started, 30)  # the node is running it
        call.cancel()
        wait_for(lambda: len(_entries(limits_fed, "solo", "interrupted")) > before, 30)
        assert _entries(limits_fed, "solo", "interrupted")[-1].detail["by"] == "cancelled"
    finally:
        channel.close()


def test_the_node_caps_a_plan_sent_without_deadline(limits_fed, certs, monkeypatch) -> None:
    engine = limits_fed.engines["solo"]
    monkeypatch.setattr(engine, "max_query_seconds", 0.5)  # [engine] max_query_seconds
    stub, channel = _stub(limits_fed, "solo", certs)
    try:
        try:
            stub.Execute(_plan(limits_fed, RUNAWAY))  # no timeout from this caller
        except grpc.RpcError as e:
            assert (e.code(), e.details()) == (grpc.StatusCode.INTERNAL, FAILED)
        else:
            pytest.fail("the runaway was not interrupted")
        entry = list(engine.guard.audit.entries())[-1]
        assert entry.action == "interrupted" and entry.detail["by"] == "deadline"
        assert entry.detail["limit_s"] == 0.5
    finally:
        channel.close()


def test_a_streamed_row_plan_is_interrupted(limits_fed) -> None:
    before = len(_entries(limits_fed, "solo", "interrupted"))
    with pytest.raises(QueryError) as err:
        limits_fed.run(ROWS_RUNAWAY)  # open data: rows, streamed
    assert err.value.code == "evaluation_failed" and err.value.nodes == {}
    wait_for(lambda: len(_entries(limits_fed, "solo", "interrupted")) > before, 30)
    assert limits_fed.run("SELECT COUNT(*) AS n FROM dnb_colleges")["rows"][0][0] > 0


def test_a_deadline_interrupts_only_its_own_cursor(limits_fed) -> None:
    engine = limits_fed.engines["solo"]
    plan = _plan(limits_fed, RUNAWAY)
    deadline = Deadline(0.2)
    with pytest.raises(PlanFailed) as err:
        engine.execute(plan, deadline)
    assert err.value.interrupted == "deadline"
    deadline.fire("cancelled")  # late: nothing attached, nothing hit
    assert engine.execute(_plan(limits_fed, "SELECT COUNT(*) AS n FROM dnb_colleges"))


def test_max_query_seconds_is_configured(tmp_path, certs) -> None:
    toml = node_toml("solo", certs, [depp()[1]])
    path = tmp_path / "solo.toml"
    path.write_text(toml)
    assert load_node_config(path).engine.max_query_seconds == 60
    path.write_text(toml.replace('memory_limit = "512MB"',
                                 'memory_limit = "512MB"\nmax_query_seconds = 5'))
    assert load_node_config(path).engine.max_query_seconds == 5
    path.write_text(toml.replace('memory_limit = "512MB"',
                                 'memory_limit = "512MB"\nmax_query_seconds = 0'))
    with pytest.raises(ConfigError, match="max_query_seconds"):
        load_node_config(path)


def test_one_watchdog_fires_deadlines_in_their_order(limits_fed) -> None:
    """Deadlines share one thread: a sooner one added after a later one still fires first,
    and a closed one never fires."""
    engine = limits_fed.engines["solo"]
    later, closed = Deadline(30), Deadline(0.05)
    closed.close()
    sooner = Deadline(0.2)
    with pytest.raises(PlanFailed) as err:
        engine.execute(_plan(limits_fed, RUNAWAY), sooner)
    assert err.value.interrupted == "deadline" and sooner.cause == "deadline"
    wait_for(lambda: time.monotonic() > closed._expires + 0.5, 5)
    assert closed.cause == "" and later.cause == ""
    later.close()


def test_a_plan_bound_once_runs_again_alike_and_forgets_on_a_table_change(limits_fed) -> None:
    """The second run of a plan skips the bind check (one parse and bind, not two) and
    answers the same; a change of tables makes the next run bind again."""
    engine = limits_fed.engines["solo"]
    plan = _plan(limits_fed, "SELECT COUNT(*) AS n FROM dnb_colleges")
    first = engine.execute(plan).result.arrow_ipc
    assert engine._bound, "the plan's SQL is remembered as bound"
    assert engine.execute(plan).result.arrow_ipc == first
    engine._forget_compiled()
    assert not engine._bound
    assert engine.execute(plan).result.arrow_ipc == first
