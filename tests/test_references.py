"""Public reference tables: a node's shared open table copied to the others for joins.

Real nodes behind real gRPC (mutual TLS), a real coordinator, real DuckDB answers over the
union of the data as the reference.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import duckdb
import grpc
import pytest

from federation._certs import make_certs
from federation.proto import bulle_pb2 as pb
from federation.proto import bulle_pb2_grpc as pb_grpc
from nodes._config import ConfigError, load_node_config
from nodes._engine import NodeEngine
from nodes._references import ReferenceRefused, sha256, to_ipc
from tests._federation import DATA, Federation, node_toml, start_federation, wait_for

IPS = DATA / "fr-ips" / "fr-en-ips-colleges-ap2022.csv"
HEADCOUNTS = DATA / "fr-ille-et-vilaine" / "fr-en-college-effectifs-niveau-sexe-lv.csv"
NAMES = ["depp", "r35a", "r35b", "closed", "gp"]


def _ips(shared: bool = True, **kw: object) -> dict:
    return {"table": "ips_colleges", "source": str(IPS), "tier": "open", "shared": shared, **kw}


def _headcounts(secteur: str) -> dict:
    return {"table": "college_headcounts", "source": str(HEADCOUNTS), "tier": "restricted",
            "filter": f"secteur = '{secteur}'", "privacy_unit": "uai",
            "rename": {"numero_du_college": "uai"}, "unit_level": "institution",
            "min_count": 0, "cell_key": {"perturb": False}}  # exact: checked against a union


def _pupils() -> dict:
    return {"table": "pupils", "source": str(DATA / "uci-student-performance/student-por.csv"),
            "tier": "restricted", "filter": "school = 'GP'", "min_count": 0,
            "cell_key": {"perturb": False}}


@pytest.fixture(scope="module")
def ref_certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_certs(tmp_path_factory.mktemp("ref-certs"), NAMES)


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory, ref_certs: Path) -> Iterator[Federation]:
    nodes = {
        "depp": [_ips(), {"table": "dnb_colleges", "tier": "open", "source": str(
            DATA / "fr-ivac-colleges/fr-en-indicateurs-valeur-ajoutee-colleges.csv")}],
        "r35a": [_headcounts("PUBLIC")],
        "r35b": [_headcounts("PRIVE")],
        "closed": [_pupils()],
    }
    f = start_federation(tmp_path_factory.mktemp("refs"), ref_certs, nodes,
                         node_extra={"closed": "accept_references = false"})
    f.coordinator.catalog(refresh=True)
    yield f
    f.close()


@pytest.fixture(scope="module")
def union(fed: Federation) -> Iterator[duckdb.DuckDBPyConnection]:
    """One DuckDB with the whole headcount file and the IPS table: the reference answers."""
    from nodes._config import DatasetConfig
    from nodes._sources import load_dataset

    con = duckdb.connect()
    load_dataset(con, DatasetConfig("college_headcounts", (HEADCOUNTS,), "restricted",
                                    rename={"numero_du_college": "uai"}))
    load_dataset(con, DatasetConfig("ips_colleges", (IPS,), "open"))
    yield con
    con.close()


def test_shared_table_is_copied_to_the_nodes_that_accept_references(fed: Federation) -> None:
    table = fed.coordinator.catalog()["ips_colleges"]
    assert table.shared and table.nodes == ("depp",)  # a copy is not a partition
    assert table.copies == ("r35a", "r35b")  # not "closed": accept_references = false
    assert not fed.coordinator.catalog()["dnb_colleges"].shared
    origin = next(t for t in fed.engines["depp"].catalog().tables if t.name == "ips_colleges")
    for nid in ("r35a", "r35b"):
        entry = next(t for t in fed.engines[nid].catalog().tables if t.name == "ips_colleges")
        assert entry.copy_of == "depp" and entry.content_sha256 == origin.content_sha256
        assert fed.engines[nid].cursor().sql("SELECT count(*) FROM ips_colleges"
                                            ).fetchall()[0][0] == 6973
    assert "ips_colleges" not in {t.name for t in fed.engines["closed"].catalog().tables}
    body = table.to_json()
    assert body["shared"] is True and body["copies"] == ["r35a", "r35b"]


def test_join_with_the_reference_runs_inside_each_node_and_equals_the_union(
        fed: Federation, union: duckdb.DuckDBPyConnection) -> None:
    sql = ("SELECT h.secteur, h.rentree_scolaire, COUNT(*) AS colleges, AVG(i.ips) AS mean_ips, "
           "SUM(h.nombre_total_de_6emes) AS pupils_6e "
           "FROM college_headcounts h JOIN ips_colleges i USING (uai) "
           "GROUP BY h.secteur, h.rentree_scolaire ORDER BY h.secteur, h.rentree_scolaire")
    before = {n: e.executed for n, e in fed.engines.items()}
    out = fed.run(sql)
    assert out["nodes"] == ["r35a", "r35b"] and out["notes"] == []
    ran = {n: e.executed - before[n] for n, e in fed.engines.items()}
    assert ran == {"depp": 0, "r35a": 1, "r35b": 1, "closed": 0}
    expected = union.sql(sql).fetchall()
    assert len(expected) == 6  # 2 sectors x 3 years
    got = [tuple(r) for r in out["rows"]]
    for g, e in zip(got, expected, strict=True):
        assert g[:3] == e[:3] and g[4] == e[4]
        assert g[3] == pytest.approx(e[3], rel=1e-12)
    # USING works the same once the key has one name on both sides
    using = fed.run("SELECT i.secteur, COUNT(*) AS n FROM ips_colleges i JOIN dnb_colleges d "
                    "USING (uai) GROUP BY i.secteur ORDER BY i.secteur")
    assert using["nodes"] == ["depp"]


def test_reference_rows_are_counted_once(fed: Federation,
                                         union: duckdb.DuckDBPyConnection) -> None:
    out = fed.run("SELECT COUNT(*) AS n, SUM(ips) AS s FROM ips_colleges")
    assert out["nodes"] == ["depp"]
    n, s = union.sql("SELECT COUNT(*), SUM(ips) FROM ips_colleges").fetchall()[0]
    assert out["rows"][0][0] == n == 6973 and out["rows"][0][1] == pytest.approx(s)
    rows = fed.run("SELECT uai, ips FROM ips_colleges WHERE uai LIKE '035%' ORDER BY uai")
    uais = [r[0] for r in rows["rows"]]
    assert rows["nodes"] == ["depp"] and len(uais) == len(set(uais)) > 50


def test_a_node_without_the_copy_is_named_not_silently_dropped(
        tmp_path: Path, ref_certs: Path) -> None:
    nodes = {"depp": [_ips()], "r35a": [_headcounts("PUBLIC")],
             "closed": [_headcounts("PRIVE")]}
    f = start_federation(tmp_path, ref_certs, nodes,
                         node_extra={"closed": "accept_references = false"})
    try:
        out = f.run("SELECT COUNT(*) AS n FROM college_headcounts h JOIN ips_colleges i "
                    "USING (uai)")
        assert out["nodes"] == ["r35a"]
        assert out["notes"] == ["nodes closed do not hold every joined table and did not "
                                "take part"]
    finally:
        f.close()


def test_copies_survive_a_restart_and_are_audited(fed: Federation) -> None:
    config = fed.engines["r35a"].config
    again = NodeEngine(config)  # same state_dir: the copy is back before any sync
    try:
        assert set(again.copies) == {"ips_colleges"}
        assert again.cursor().sql("SELECT count(*) FROM ips_colleges").fetchall()[0][0] == 6973
        received = [e for e in again.guard.audit.entries() if e.action == "reference_received"]
        assert len(received) == 1  # one version, received once
        assert received[0].detail["origin"] == "depp" and received[0].detail["rows"] == 6973
        assert again.guard.audit.verify().ok
    finally:
        again.close()


def test_a_copy_is_dropped_when_its_origin_stops_sharing(tmp_path: Path,
                                                          ref_certs: Path) -> None:
    from nodes._service import build_server

    f = start_federation(tmp_path, ref_certs, {"depp": [_ips()],
                                               "r35a": [_headcounts("PUBLIC")]})
    receiver = f.engines["r35a"]
    try:
        assert f.coordinator.catalog(refresh=True)["ips_colleges"].copies == ("r35a",)
        stored = tmp_path / "r35a-state" / "references" / "ips_colleges.pb"
        assert stored.is_file()
        f.stop_node("depp")  # an origin that is down decides nothing
        assert "ips_colleges" not in f.coordinator.catalog(refresh=True)
        assert "ips_colleges" in receiver.copies
        # the origin comes back on the same address, no longer sharing the table
        config = _config(tmp_path, ref_certs, "depp", [_ips(shared=False)], state="depp2",
                         extra="")
        config = dataclasses.replace(config, listen=f"127.0.0.1:{f.ports['depp']}")
        f.engines["depp"].close()
        f.engines["depp"] = NodeEngine(config)
        f.servers["depp"], _ = build_server(config, f.engines["depp"])
        # the coordinator's channel reconnects after its backoff
        wait_for(lambda: "ips_colleges" in f.coordinator.catalog(refresh=True), timeout=30)
        table = f.coordinator.catalog()["ips_colleges"]
        assert not table.shared and table.copies == () and table.nodes == ("depp",)
        assert receiver.copies == {} and "ips_colleges" not in receiver.meta
        assert not stored.exists()
        assert "ips_colleges" not in {t.name for t in receiver.catalog().tables}
        dropped = [e for e in receiver.guard.audit.entries() if e.action == "reference_dropped"]
        assert [e.detail["table"] for e in dropped] == ["ips_colleges"]
        with pytest.raises(duckdb.CatalogException):
            receiver.cursor().sql("SELECT count(*) FROM ips_colleges").fetchall()
    finally:
        f.close()


def test_a_new_version_replaces_the_copy(tmp_path: Path, ref_certs: Path) -> None:
    old = NodeEngine(_config(tmp_path, ref_certs, "depp", [_ips(filter="ips < 100")]))
    new = NodeEngine(_config(tmp_path, ref_certs, "depp", [_ips()], state="depp2"))
    receiver = NodeEngine(_config(tmp_path, ref_certs, "r35a", [_headcounts("PUBLIC")]))
    try:
        v1, v2 = old.fetch_reference("ips_colleges"), new.fetch_reference("ips_colleges")
        assert v1.info.content_sha256 != v2.info.content_sha256
        count = "SELECT count(*) FROM ips_colleges"
        receiver.put_reference(v1)
        small = receiver.cursor().sql(count).fetchall()[0][0]
        cached = receiver.execute(_count_plan())
        receiver.put_reference(v2)
        assert small < receiver.cursor().sql(count).fetchall()[0][0] == 6973
        # a repeated plan (its compiled SQL is cached) reads the new version
        assert cached.result.arrow_ipc != receiver.execute(_count_plan()).result.arrow_ipc
        entry = next(t for t in receiver.catalog().tables if t.name == "ips_colleges")
        assert entry.content_sha256 == v2.info.content_sha256
    finally:
        for e in (old, new, receiver):
            e.close()


def test_size_cap_and_leftovers_of_a_crash(tmp_path: Path, ref_certs: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import nodes._references as references

    origin = NodeEngine(_config(tmp_path, ref_certs, "depp", [_ips()]))
    config = _config(tmp_path, ref_certs, "r35a", [_headcounts("PUBLIC")])
    receiver = NodeEngine(config)
    try:
        ref = origin.fetch_reference("ips_colleges")
        monkeypatch.setattr(references, "MAX_REFERENCE_TABLE_BYTES", 100_000)
        with pytest.raises(ReferenceRefused, match="once read"):  # decompressed size
            receiver.put_reference(ref)
        assert receiver.copies == {} and "ips_colleges" not in receiver.meta
        monkeypatch.undo()
        receiver.put_reference(ref)
        receiver.put_reference(ref)  # the same version again: acknowledged, not re-read
        received = [e for e in receiver.guard.audit.entries()
                    if e.action == "reference_received"]
        assert len(received) == 1
    finally:
        receiver.close()
        origin.close()
    # a crash in the middle of a write leaves a temporary file: removed, never loaded
    folder = tmp_path / "r35a-state" / "references"
    leftover = folder / ".ips_colleges.0123456789ab.tmp.pb"
    leftover.write_bytes(b"half a file")
    again = NodeEngine(config)
    try:
        assert not leftover.exists() and set(again.copies) == {"ips_colleges"}
    finally:
        again.close()


def test_failed_copies_back_off(monkeypatch: pytest.MonkeyPatch) -> None:
    import federation._references as sync_module

    now = [1000.0]
    monkeypatch.setattr(sync_module.time, "monotonic", lambda: now[0])
    sync = sync_module.ReferenceSync({}, None)
    assert sync._due("r35a", "ips")
    delays = []
    for _ in range(8):
        sync._problem("r35a", "ips", "refused: disk full")
        until, delay = sync._retry[("r35a", "ips")]
        delays.append(delay)
        assert not sync._due("r35a", "ips") and until == now[0] + delay
        now[0] = until  # due again exactly then
        assert sync._due("r35a", "ips")
    assert delays == [30, 60, 120, 240, 480, 900, 900, 900]
    assert sync._due("other", "ips")  # per node and table


def test_a_stale_catalogue_is_served_while_it_refreshes(tmp_path: Path,
                                                       ref_certs: Path) -> None:
    f = start_federation(tmp_path, ref_certs, {"depp": [_ips()],
                                               "r35a": [_headcounts("PUBLIC")]})
    try:
        assert set(f.coordinator.catalog()) == {"ips_colleges", "college_headcounts"}
        f.coordinator.config = dataclasses.replace(f.coordinator.config, catalog_ttl_s=0.0)
        f.stop_node("r35a")
        # served at once from the previous catalogue; the refresh runs in the background
        assert "college_headcounts" in f.coordinator.catalog()
        wait_for(lambda: "college_headcounts" not in f.coordinator.catalog(), timeout=30)
        assert f.coordinator.node_status()["r35a"] == "unreachable"
    finally:
        f.close()


def _count_plan() -> pb.Plan:
    plan = pb.Plan(source=pb.TableRef(table="ips_colleges"), request_id="r")
    plan.aggregates.add(name="p0", kind=pb.COUNT_ROWS)
    return plan


def _config(tmp: Path, certs: Path, node_id: str, datasets: list[dict], *,
            state: str | None = None, extra: str = ""):
    path = tmp / f"{state or node_id}.toml"
    path.write_text(node_toml(node_id, certs, datasets, extra))
    return load_node_config(path)


# ------------------------------------------------------- the node's contract, over gRPC


@pytest.fixture(scope="module")
def node_stub(fed: Federation, ref_certs: Path) -> Iterator[pb_grpc.NodeStub]:
    creds = grpc.ssl_channel_credentials(
        (ref_certs / "ca.pem").read_bytes(), (ref_certs / "bulle-coordinator.key").read_bytes(),
        (ref_certs / "bulle-coordinator.pem").read_bytes())
    with grpc.secure_channel(f"localhost:{fed.ports['r35a']}", creds) as channel:
        yield pb_grpc.NodeStub(channel)


def _refused(call, request) -> str:
    with pytest.raises(grpc.RpcError) as e:
        call(request, timeout=20)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION, e.value
    return e.value.details()


def test_fetch_serves_only_shared_open_tables(fed: Federation, ref_certs: Path) -> None:
    creds = grpc.ssl_channel_credentials(
        (ref_certs / "ca.pem").read_bytes(), (ref_certs / "bulle-coordinator.key").read_bytes(),
        (ref_certs / "bulle-coordinator.pem").read_bytes())
    for nid, table in (("r35a", "college_headcounts"), ("closed", "pupils"),
                       ("depp", "dnb_colleges"), ("r35a", "ips_colleges"),
                       ("depp", "no_such_table")):
        with grpc.secure_channel(f"localhost:{fed.ports[nid]}", creds) as channel:
            why = _refused(pb_grpc.NodeStub(channel).FetchReference,
                           pb.ReferenceRequest(table=table))
        assert why == f"{table!r} is not a shared table of this node"
    with grpc.secure_channel(f"localhost:{fed.ports['depp']}", creds) as channel:
        ref = pb_grpc.NodeStub(channel).FetchReference(
            pb.ReferenceRequest(table="ips_colleges"), timeout=20)
    assert ref.origin == "depp" and ref.info.shared and ref.info.tier == "open"
    assert sha256(ref.arrow_ipc) == ref.info.content_sha256


def test_put_refuses_what_is_not_a_public_reference(fed: Federation,
                                                    node_stub: pb_grpc.NodeStub) -> None:
    good = fed.engines["depp"].fetch_reference("ips_colleges")
    before = fed.engines["r35a"].catalog()

    def variant(**change: object) -> pb.ReferenceTable:
        ref = pb.ReferenceTable()
        ref.CopyFrom(good)
        for key, value in change.items():
            if key == "arrow_ipc":
                ref.arrow_ipc = value
                ref.info.content_sha256 = sha256(value)
            elif key == "origin":
                ref.origin = value
            else:
                setattr(ref.info, key, value)
        return ref

    restricted_ipc = to_ipc(fed.engines["r35b"].cursor().sql(
        "SELECT * FROM college_headcounts").to_arrow_table())
    cases = {
        "tier": (variant(tier="restricted"), "only open tables declared shared"),
        "not shared": (variant(shared=False), "only open tables declared shared"),
        "tampered": (variant(content_sha256="0" * 64), "does not match its SHA-256"),
        "own name": (variant(name="college_headcounts"), "publishes a table of that name"),
        "from itself": (variant(origin="r35a"), "bad origin node"),
        "bad name": (variant(name="x; DROP TABLE t"), "lowercase snake_case"),
        "not arrow": (variant(arrow_ipc=b"not arrow at all"), "not an Arrow IPC stream"),
        "other columns": (variant(arrow_ipc=restricted_ipc), "columns differ"),
    }
    for label, (ref, words) in cases.items():
        assert words in _refused(node_stub.PutReference, ref), label
    for own in ("college_headcounts", "no_such_table"):  # never drops the node's own data
        assert "is not a reference copy" in _refused(
            node_stub.DropReference, pb.ReferenceRequest(table=own))
    assert fed.engines["r35a"].catalog() == before  # nothing changed at the node


def test_a_node_that_declines_refuses_puts(fed: Federation, ref_certs: Path) -> None:
    good = fed.engines["depp"].fetch_reference("ips_colleges")
    assert not fed.engines["closed"].config.accept_references
    with pytest.raises(ReferenceRefused, match="does not accept reference tables"):
        fed.engines["closed"].put_reference(good)


def test_rename_publishes_a_source_column_under_another_name(tmp_path: Path,
                                                             ref_certs: Path) -> None:
    engine = NodeEngine(_config(tmp_path, ref_certs, "r35a", [_headcounts("PUBLIC")]))
    try:
        columns = engine.meta["college_headcounts"].columns
        assert "uai" in columns and "numero_du_college" not in columns
        entry = next(t for t in engine.catalog().tables if t.name == "college_headcounts")
        assert entry.pivots["uai"] == "school"
    finally:
        engine.close()
    bad = {**_headcounts("PUBLIC"), "rename": {"numero_du_colege": "uai"}}
    with pytest.raises(ConfigError, match="rename: column 'numero_du_colege' is not in"):
        NodeEngine(_config(tmp_path, ref_certs, "r35b", [bad]))
    clash = {**_headcounts("PUBLIC"), "rename": {"numero_du_college": "secteur"}}
    with pytest.raises(ConfigError, match="two columns would be named 'secteur'"):
        NodeEngine(_config(tmp_path, ref_certs, "r35b", [clash]))
    with pytest.raises(ConfigError, match="rename maps source column names"):
        _config(tmp_path, ref_certs, "r35b",
                [{**_headcounts("PUBLIC"), "rename": {"numero_du_college": "U A I"}}])


def test_only_open_tables_can_be_shared(tmp_path: Path, ref_certs: Path) -> None:
    bad = {**_headcounts("PUBLIC"), "shared": True}
    with pytest.raises(ConfigError, match="only an open table can be shared"):
        _config(tmp_path, ref_certs, "r35a", [bad])
    with pytest.raises(ConfigError, match="shared must be true or false"):
        _config(tmp_path, ref_certs, "depp", [_ips(shared="yes")])
    with pytest.raises(ConfigError, match="accept_references must be true or false"):
        _config(tmp_path, ref_certs, "depp", [_ips()], extra="accept_references = 1")


def test_a_shared_table_published_twice_is_not_copied(tmp_path: Path, ref_certs: Path) -> None:
    nodes = {"depp": [_ips()], "gp": [_ips()], "r35a": [_headcounts("PUBLIC")]}
    f = start_federation(tmp_path, ref_certs, nodes)
    try:
        table = f.coordinator.catalog(refresh=True)["ips_colleges"]
        assert not table.shared and table.copies == () and table.nodes == ("depp", "gp")
        assert "ips_colleges" not in f.engines["r35a"].copies
    finally:
        f.close()

