"""Ways to get rows out, each refused: first by the coordinator before any node runs
anything, then (second line of defence) by the node itself for crafted plans."""

from __future__ import annotations

import grpc
import pytest

from federation._errors import QueryError
from federation._planner import plan_query
from federation._sql import parse
from federation._tree import Call, Col, Lit, to_proto
from federation.proto import bulle_pb2 as pb
from federation.proto import bulle_pb2_grpc as pb_grpc

ATTACKS = [
    # row-level output of non-open data
    "SELECT * FROM lycee_students",
    "SELECT g3, absences FROM lycee_students",
    "SELECT id_student FROM student_info WHERE final_result = 'Fail'",
    "SELECT g3 FROM lycee_students ORDER BY g3 LIMIT 1",
    "SELECT id_student, score FROM student_assessment",
    # file, extension, settings and database access
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_parquet('/tmp/x.parquet')",
    "SELECT * FROM '/etc/passwd'",
    "SELECT COUNT(*) FROM 'https://example.org/data.csv'",
    "SELECT * FROM glob('/*')",
    "COPY lycee_students TO '/tmp/leak.csv'",
    "ATTACH '/tmp/other.duckdb' AS other",
    "INSTALL httpfs",
    "LOAD httpfs",
    "PRAGMA database_list",
    "SET enable_external_access = true",
    "SELECT COUNT(*) FROM lycee_students WHERE current_setting('threads') = '1'",
    "SELECT getenv('HOME'), COUNT(*) FROM lycee_students GROUP BY 1",
    "CREATE TABLE x AS SELECT * FROM lycee_students",
    "DROP TABLE lycee_students",
    "UPDATE lycee_students SET g3 = 0",
    "SELECT COUNT(*) FROM main.lycee_students",
    # window functions and set operations
    "SELECT g3, ROW_NUMBER() OVER (ORDER BY g3) FROM lycee_students",
    "SELECT COUNT(*) OVER () FROM lycee_students",
    "SELECT COUNT(*) FROM lycee_students UNION SELECT g3 FROM lycee_students",
    "SELECT COUNT(*) FROM lycee_students UNION ALL SELECT COUNT(*) FROM lycee_students_math",
    "SELECT COUNT(*) FROM lycee_students EXCEPT SELECT COUNT(*) FROM lycee_students_math",
    # subqueries and CTEs that could smuggle rows
    "SELECT COUNT(*) FROM (SELECT * FROM lycee_students) t",
    "WITH t AS (SELECT * FROM lycee_students) SELECT COUNT(*) FROM t",
    "SELECT COUNT(*) FROM lycee_students WHERE g3 = (SELECT MAX(g3) FROM lycee_students)",
    "SELECT COUNT(*) FROM lycee_students WHERE g3 IN (SELECT g3 FROM lycee_students_math)",
    "SELECT (SELECT g3 FROM lycee_students LIMIT 1), COUNT(*) FROM lycee_students",
    # cross-node row joins and cross joins
    "SELECT COUNT(*) FROM lycee_students l JOIN student_info s ON l.age = s.num_of_prev_attempts",
    "SELECT COUNT(*) FROM lycee_students, lycee_students_math",
    "SELECT COUNT(*) FROM lycee_students CROSS JOIN ips_colleges",
    # non-mergeable or row-revealing aggregates
    "SELECT COUNT(DISTINCT g3) FROM lycee_students",
    "SELECT MEDIAN(g3) FROM lycee_students",
    "SELECT LIST(g3) FROM lycee_students",
    "SELECT STRING_AGG(mjob, ',') FROM lycee_students",
    "SELECT ARG_MAX(absences, g3) FROM lycee_students",
    "SELECT FIRST(g3) FROM lycee_students",
    "SELECT DISTINCT g3 FROM lycee_students",
    "SELECT MAX(g3) FROM lycee_students GROUP BY MAX(g3)",
    "SELECT SUM(MAX(g3)) FROM lycee_students",
    "SELECT COUNT(*) FROM lycee_students WHERE SUM(g3) > 3",
    "SELECT COUNT(*) FROM lycee_students LIMIT 1 OFFSET 1",
    "SELECT COUNT(*) FROM lycee_students; SELECT COUNT(*) FROM ips_colleges",
    "SELECT COUNT(*) FROM lycee_students QUALIFY g3 > 3",
    "SELECT COUNT(*) FROM lycee_students WHERE g3 > ?",
]


@pytest.mark.parametrize("sql", ATTACKS)
def test_attack_refused_before_any_node_runs(sql: str, exact_fed) -> None:
    before = exact_fed.executed
    with pytest.raises(QueryError) as err:
        exact_fed.run(sql)
    assert err.value.code in ("not_allowed", "syntax_error", "unknown_table", "unknown_column")
    assert err.value.message
    assert exact_fed.executed == before, "a node executed a refused query"


def test_attack_corpus_is_large_enough() -> None:
    assert len(ATTACKS) >= 30


def test_refusals_say_why(exact_fed) -> None:
    cases = {
        "SELECT * FROM lycee_students": "only allowed on open tables",
        "SELECT * FROM read_csv('/etc/passwd')": "table functions, files",
        "SELECT g3, ROW_NUMBER() OVER () FROM lycee_students": "window functions",
        "SELECT 1 FROM lycee_students UNION SELECT 2 FROM lycee_students": "set operations",
        "COPY lycee_students TO 'x.csv'": "COPY",
        "SELECT COUNT(*) FROM lycee_students l JOIN student_info s ON l.age = s.gender":
            "no node holds all",
        "SELECT COUNT(*) FROM lycee_studnets": "did you mean 'lycee_students'",
        "SELECT AVG(g4) FROM lycee_students": "did you mean 'g",
    }
    for sql, fragment in cases.items():
        with pytest.raises(QueryError) as err:
            exact_fed.run(sql)
        assert fragment in err.value.message, (sql, err.value.message)


def test_syntax_error_has_position(exact_fed) -> None:
    with pytest.raises(QueryError) as err:
        exact_fed.run("SELECT COUNT(*)\nFROM lycee_students WHERE g3 >")
    assert err.value.code == "syntax_error"
    assert err.value.position is not None and err.value.position[0] == 2


# -- second line of defence: crafted plans straight to the node ----------------------

def _stub(fed, node: str, certs, client: str = "bulle-coordinator"):
    creds = grpc.ssl_channel_credentials(
        root_certificates=(certs / "ca.pem").read_bytes(),
        private_key=(certs / f"{client}.key").read_bytes(),
        certificate_chain=(certs / f"{client}.pem").read_bytes())
    channel = grpc.secure_channel(f"127.0.0.1:{fed.ports[node]}", creds)
    return pb_grpc.NodeStub(channel), channel


def _plan(sql: str, fed) -> pb.Plan:
    return plan_query(parse(sql, fed.coordinator.schema())).plan


def _row_plan(table: str, column: str) -> pb.Plan:
    plan = pb.Plan(source=pb.TableRef(table=table, alias=table))
    plan.rows.columns.add(name="c0", expr=to_proto(Col(table, column)))
    return plan


def crafted_plans(fed) -> dict[str, pb.Plan]:
    plans = {}
    plans["row output of a restricted table"] = _row_plan("lycee_students", "g3")
    plans["unknown table"] = _row_plan("pg_catalog", "x")
    plans["unknown column"] = _plan("SELECT COUNT(*) FROM lycee_students", fed)
    plans["unknown column"].where.CopyFrom(to_proto(Call("gt", (Col("lycee_students",
                                                                    "secret"), Lit(1)))))
    bad_op = _plan("SELECT COUNT(*) FROM lycee_students", fed)
    bad_op.where.CopyFrom(pb.Expr(call=pb.Call(op="read_csv", args=[to_proto(Lit("/etc"))])))
    plans["operator outside the allow-list"] = bad_op
    bad_cast = _plan("SELECT COUNT(*) FROM lycee_students", fed)
    bad_cast.where.CopyFrom(to_proto(Call("cast", (Col("lycee_students", "g3"),
                                                    Lit("BLOB")))))
    plans["cast to a type outside the allow-list"] = bad_cast
    inj = _plan("SELECT COUNT(*) FROM lycee_students", fed)
    inj.source.alias = 'x" ; COPY lycee_students TO \'/tmp/p\' --'
    plans["SQL injection through an alias"] = inj
    deep = Lit(1)
    for _ in range(40):  # deeper than the node allows (32), within protobuf limits
        deep = Call("add", (deep, Lit(1)))
    deep_plan = _plan("SELECT COUNT(*) FROM lycee_students", fed)
    deep_plan.where.CopyFrom(to_proto(Call("gt", (deep, Lit(0)))))
    plans["expression too deep"] = deep_plan
    join = _plan("SELECT COUNT(*) FROM lycee_students", fed)
    join.joins.add(table=pb.TableRef(table="lycee_students_math", alias="m"), kind="inner",
                   on=to_proto(Call("eq", (Col("lycee_students", "age"), Col("m", "age")))))
    plans["join of restricted tables not on the privacy unit"] = join
    in_sub = _plan("SELECT COUNT(*) FROM lycee_students", fed)
    in_sub.where.CopyFrom(to_proto(Call("in", (Col("lycee_students", "g3"),
                                               Col("lycee_students", "g1")))))
    plans["IN over a column instead of constants"] = in_sub
    return plans


def test_node_refuses_crafted_plans(exact_fed, certs) -> None:
    stub, channel = _stub(exact_fed, "gp", certs)
    try:
        for what, plan in crafted_plans(exact_fed).items():
            with pytest.raises(grpc.RpcError) as err:
                stub.Execute(plan, timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, what
            # the streaming row RPC refuses the same plans before sending anything
            received = []
            with pytest.raises(grpc.RpcError) as err:
                received.extend(stub.ExecuteRows(plan, timeout=10))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, what
            assert received == [], what
        # and takes row plans only: an aggregate over open data goes through Execute
        aggregate = _plan("SELECT COUNT(*) FROM lycee_students", exact_fed)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.ExecuteRows(aggregate, timeout=10))
        assert err.value.details() == "ExecuteRows takes row plans only"
    finally:
        channel.close()


def test_node_refuses_other_client_certificates(exact_fed, certs, foreign_certs) -> None:
    # a certificate from the right CA but another identity
    stub, channel = _stub(exact_fed, "gp", certs, client="intruder")
    with pytest.raises(grpc.RpcError) as err:
        stub.GetCatalog(pb.CatalogRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    channel.close()
    # a 'bulle-coordinator' certificate issued by another CA: the TLS handshake fails
    creds = grpc.ssl_channel_credentials(
        root_certificates=(certs / "ca.pem").read_bytes(),
        private_key=(foreign_certs / "bulle-coordinator.key").read_bytes(),
        certificate_chain=(foreign_certs / "bulle-coordinator.pem").read_bytes())
    channel = grpc.secure_channel(f"127.0.0.1:{exact_fed.ports['gp']}", creds)
    with pytest.raises(grpc.RpcError) as err:
        pb_grpc.NodeStub(channel).GetCatalog(pb.CatalogRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    channel.close()
    # no client certificate at all
    channel = grpc.secure_channel(f"127.0.0.1:{exact_fed.ports['gp']}",
                                  grpc.ssl_channel_credentials((certs / "ca.pem").read_bytes()))
    with pytest.raises(grpc.RpcError) as err:
        pb_grpc.NodeStub(channel).GetCatalog(pb.CatalogRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    channel.close()
    # plaintext
    channel = grpc.insecure_channel(f"127.0.0.1:{exact_fed.ports['gp']}")
    with pytest.raises(grpc.RpcError):
        pb_grpc.NodeStub(channel).GetCatalog(pb.CatalogRequest(), timeout=5)
    channel.close()


def test_engine_is_locked_down(exact_fed, tmp_path) -> None:
    cur = exact_fed.engines["gp"].cursor()
    secret = tmp_path / "secret.csv"
    secret.write_text("a\n1\n")
    forbidden = [
        f"SELECT * FROM read_csv('{secret}')",
        f"COPY lycee_students TO '{tmp_path / 'leak.csv'}'",
        f"ATTACH '{tmp_path / 'x.duckdb'}' AS x",
        "INSTALL httpfs",
        "LOAD httpfs",
        "SET enable_external_access = true",
        "SET threads = 8",
        "SET lock_configuration = false",
    ]
    for sql in forbidden:
        with pytest.raises(Exception):  # noqa: B017 (each is a different DuckDB error)
            cur.execute(sql)
    assert not (tmp_path / "leak.csv").exists()
    assert cur.execute("SELECT current_setting('threads')").fetchone()[0] == 1
