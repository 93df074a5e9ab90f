"""Issue 13: a node's tables live in a DuckDB file of its state folder (compressed storage,
not a copy in RAM), private to the node, removed when the engine closes, and the answers
are those of one DuckDB over the same files."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import duckdb
import pytest

from nodes._config import ConfigError, load_node_config
from nodes._engine import STORAGE_DIR, NodeEngine
from tests._federation import node_toml, start_federation

QUERIES = [
    "SELECT academie, COUNT(*) AS n FROM {t} GROUP BY academie ORDER BY academie",
    "SELECT academie, AVG(note) AS m, SUM(note) AS s FROM {t} GROUP BY academie "
    "ORDER BY academie",
    "SELECT academie, sexe, COUNT(*) AS n, AVG(note) AS m FROM {t} WHERE ips < 100 "
    "GROUP BY academie, sexe ORDER BY academie, sexe",
]


@pytest.fixture(scope="module")
def pupils(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same 30,000 pupils as Parquet (two files' worth: one per node) and CSV."""
    out = tmp_path_factory.mktemp("pupils")
    con = duckdb.connect()
    con.execute("""CREATE TABLE p AS SELECT range AS id,
        ['AMIENS', 'LILLE', 'PARIS', 'RENNES'][(1 + hash(range) % 4)::BIGINT] AS academie,
        CASE WHEN hash(range, 1) % 2 = 0 THEN 'F' ELSE 'M' END AS sexe,
        40 + (hash(range, 2) % 1300) / 10.0 AS ips,
        (hash(range, 3) % 201) / 10.0 AS note FROM range(30000)""")
    con.execute(f"COPY (SELECT * FROM p WHERE id % 2 = 0) TO '{out / 'a.parquet'}'")
    con.execute(f"COPY (SELECT * FROM p WHERE id % 2 = 1) TO '{out / 'b.csv'}' (HEADER)")
    con.close()
    return out / "a.parquet", out / "b.csv"


def _dataset(source: Path, tier: str) -> dict:
    ds = {"table": "eleves", "source": str(source), "tier": tier}
    if tier == "restricted":
        ds |= {"min_count": 0, "cell_key": {"perturb": False}}
    return ds


def test_tables_are_a_private_file_and_answers_equal_duckdb(tmp_path: Path, certs: Path,
                                                           pupils: tuple[Path, Path]) -> None:
    parquet, csv = pupils
    fed = start_federation(tmp_path, certs, {"gp": [_dataset(parquet, "restricted")],
                                             "ms": [_dataset(csv, "restricted")]})
    try:
        for engine in fed.engines.values():
            folder = engine.storage.parent
            assert folder.name == STORAGE_DIR and engine.storage.is_file()
            assert stat.S_IMODE(folder.stat().st_mode) == 0o700
            assert stat.S_IMODE(engine.storage.stat().st_mode) == 0o600
            cur = engine.cursor()
            try:  # the tables are in that file, not in an in-memory database
                main = cur.sql("SELECT path FROM duckdb_databases() WHERE database_name = "
                               "current_database()").fetchall()
                assert main == [(str(engine.storage),)]
                tables = cur.sql("SELECT database_name FROM duckdb_tables() "
                                 "WHERE table_name = 'eleves'").fetchall()
                assert tables == [(engine.storage.stem,)]
                with pytest.raises(duckdb.Error):  # still locked down
                    cur.sql(f"SELECT * FROM read_parquet('{parquet}')").fetchall()
            finally:
                cur.close()
        truth = duckdb.connect()
        truth.execute(f"CREATE VIEW eleves AS SELECT * FROM read_parquet('{parquet}') "
                      f"UNION ALL BY NAME SELECT * FROM read_csv('{csv}')")
        for sql in QUERIES:
            expected = truth.sql(sql.format(t="eleves")).fetchall()
            got = [tuple(r) for r in fed.run(sql.format(t="eleves"))["rows"]]
            assert len(got) == len(expected)
            for g_row, e_row in zip(got, expected, strict=True):
                for g, e in zip(g_row, e_row, strict=True):
                    assert g == (e if isinstance(e, str) else pytest.approx(e, rel=1e-12)), sql
        truth.close()
    finally:
        fed.close()
    assert not any(e.storage.exists() for e in fed.engines.values())  # removed at close


def _config(tmp_path: Path, certs: Path, datasets: list[dict]) -> Path:
    path = tmp_path / "solo.toml"
    path.write_text(node_toml("solo", certs, datasets))
    return path


def test_each_engine_has_its_own_file_and_stale_files_go(tmp_path: Path, certs: Path,
                                                        pupils: tuple[Path, Path]) -> None:
    config = load_node_config(_config(tmp_path, certs, [_dataset(pupils[0], "open")]))
    first = NodeEngine(config)
    folder = first.storage.parent
    dead = folder / "tables-999999999-0123456789ab.duckdb"  # a process that is gone
    dead.write_bytes(b"")
    (folder / "tables-999999999-0123456789ab.duckdb.wal").write_bytes(b"")
    second = NodeEngine(config)  # as the training executor does beside the server
    try:
        assert second.storage != first.storage and first.storage.is_file()
        assert not dead.exists() and not Path(f"{dead}.wal").exists()
        counts = [e.cursor().sql("SELECT count(*) FROM eleves").fetchall() for e in
                  (first, second)]
        assert counts == [[(15000,)], [(15000,)]]
    finally:
        first.close()
        second.close()
    assert sorted(os.listdir(folder)) == []


def test_a_failed_load_leaves_no_file(tmp_path: Path, certs: Path,
                                      pupils: tuple[Path, Path]) -> None:
    bad = {**_dataset(pupils[0], "open"), "filter": "no_such_column > 1"}
    config = load_node_config(_config(tmp_path, certs, [bad]))
    with pytest.raises(ConfigError, match="cannot apply filter"):
        NodeEngine(config)
    folder = tmp_path / "solo-state" / STORAGE_DIR
    assert folder.is_dir() and list(folder.iterdir()) == []


def test_a_serving_node_loads_no_training_or_accounting_code() -> None:
    """The serve path imports no DP accounting, OpenDP, scipy or training stack (issue 13):
    they load on first use (a DP release, a training round), not with every node."""
    import subprocess
    import sys

    heavy = ["dp_accounting", "opendp", "scipy", "torch", "flwr", "opacus", "jupyterhub"]
    code = ("import sys, nodes.cli; from nodes._engine import NodeEngine; "
            "from nodes._service import build_server; "
            f"print(','.join(m for m in {heavy!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == ""


def test_the_ledgers_rdp_orders_are_dp_accountings() -> None:
    """ORDERS is written out so the ledger loads without dp-accounting; stored totals depend
    on this exact list."""
    from dp_accounting.rdp.rdp_privacy_accountant import DEFAULT_RDP_ORDERS

    from privacy._accounting import ORDERS

    assert tuple(float(o) for o in DEFAULT_RDP_ORDERS) == ORDERS


_NODE_WITHOUT_CHARGES = """
import sys
from pathlib import Path
from federation.proto import bulle_pb2 as pb
from nodes._config import load_node_config
from nodes._engine import NodeEngine
from nodes._service import build_server

engine = NodeEngine(load_node_config(sys.argv[1]))
server, _ = build_server(engine.config, engine)
done = engine.execute(pb.Plan.FromString(Path(sys.argv[2]).read_bytes()))
print(done.rows_out, "sqlalchemy" in sys.modules, end=" ")
engine.guard.ledger  # the first charge would open it
print("sqlalchemy" in sys.modules)
server.stop(None).wait()
engine.close()
"""


def test_a_node_that_charges_nothing_never_loads_the_ledger(tmp_path: Path, certs: Path,
                                                          pupils: tuple[Path, Path]) -> None:
    """SQLAlchemy (the ledger's) loads on a node's first charge, not with every node: a
    node serving a restricted table answers without it (issue 13: imports before data)."""
    import subprocess
    import sys

    from federation._planner import plan_query
    from federation._sql import parse

    config = _config(tmp_path, certs, [{"table": "eleves", "source": str(pupils[0]),
                                        "tier": "restricted"}])
    engine = NodeEngine(load_node_config(config))
    query = parse("SELECT academie, COUNT(*) AS n FROM eleves GROUP BY academie",
                  {"eleves": engine.meta["eleves"].columns})
    engine.close()
    plan = tmp_path / "plan.bin"
    plan.write_bytes(plan_query(query).plan.SerializeToString())
    out = subprocess.run([sys.executable, "-c", _NODE_WITHOUT_CHARGES, str(config), str(plan)],
                         capture_output=True, text=True, check=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.split() == ["4", "False", "True"], out.stdout + out.stderr[-2000:]
