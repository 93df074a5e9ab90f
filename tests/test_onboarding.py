"""Onboarding (issue 7): `bulle node ingest`, pseudonymisation, quality report, catalogue."""

from __future__ import annotations

import csv
import hashlib
import hmac
import json
import subprocess
import sys
import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nodes._config import ConfigError, DatasetConfig, load_node_config
from nodes._engine import NodeEngine
from nodes._onboard import IngestError, ingest_dataset, ingest_node, proposal_path
from nodes._quality import compute_quality, published
from nodes._sources import load_dataset, sniff_csv
from tests._federation import DATA, TOKEN, node_toml, start_federation

KEY = "a3f1c9e07b5d42e8a3f1c9e07b5d42e8"  # the trusted third party's key, in the tests
OTHER_KEY = "0f0e0d0c0b0a09080706050403020100"

PUBLISHED = sorted(
    [p for d in ("fr-ips", "fr-ivac-colleges", "fr-ille-et-vilaine") for p in
     (DATA / d).glob("*.csv")]
    + [DATA / "oulad" / f for f in ("courses.csv", "assessments.csv", "vle.csv", "studentInfo.csv",
                                    "studentRegistration.csv", "studentAssessment.csv")]
    + [DATA / "uci-student-performance" / f for f in ("student-mat.csv", "student-por.csv")])


def _config(tmp: Path, datasets: list[dict[str, Any]], node_id: str = "solo",
            data_dir: str = "data") -> Path:
    """A node config as an operator writes it, comments included."""
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "node.toml"
    text = node_toml(node_id, tmp / "certs", datasets,
                     f'data_dir = "{data_dir}"  # operator: Parquet lives here')
    path.write_text("# operator's header comment: keep me\n" + text)
    return path


def _dataset(tmp: Path, inputs: list[Path], classify: dict[str, Any] | None = None,
             table: str = "t", **extra: Any) -> dict[str, Any]:
    ds = {"table": table, "source": str(tmp / "data" / f"{table}.parquet"),
          "tier": extra.pop("tier", "open"), **extra,
          "ingest": {"inputs": [str(p) for p in inputs]}}
    if classify is not None:
        ds["classify"] = classify
    return ds


def _csv_rows(path: Path) -> int:
    delimiter, _ = sniff_csv(path)
    with path.open(encoding="utf-8-sig", newline="") as f:
        return sum(1 for _ in csv.reader(f, delimiter=delimiter)) - 1


# -- the published files ------------------------------------------------------------------

@pytest.mark.parametrize("path", PUBLISHED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_published_files_ingest_as_published(tmp_path: Path, path: Path) -> None:
    # 1. Nothing classified: refused, and the proposal lists every column.
    config = _config(tmp_path, [_dataset(tmp_path, [path])])
    with pytest.raises(IngestError, match="not classified"):
        ingest_dataset(load_node_config(config), load_node_config(config).datasets[0])
    assert not (tmp_path / "data" / "t.parquet").exists()
    proposal = tomllib.loads(proposal_path(load_node_config(config)).read_text())["t"]
    cls = proposal["classify"]
    columns = [*cls.get("identifiers", []), *cls.get("quasi_identifiers", {}),
               *cls.get("attributes", []), *cls.get("drop", [])]
    # 2. The operator classifies every column (open school-level data: attributes).
    config = _config(tmp_path, [_dataset(tmp_path, [path], {"attributes": columns})])
    before = config.read_bytes()
    node = load_node_config(config)
    result = ingest_dataset(node, node.datasets[0])
    assert result.status == "ingested" and result.rows == _csv_rows(path)
    assert config.read_bytes() == before  # the operator's TOML (and comments) untouched
    # The Parquet holds exactly what the node loads from the published file directly.
    con = duckdb.connect()
    load_dataset(con, DatasetConfig(table="direct", source=(path,), tier="open"))
    con.execute(f"CREATE TABLE ingested AS SELECT * FROM read_parquet('{result.output}')")
    describe = "SELECT column_name, column_type FROM (DESCRIBE {})"
    assert (con.execute(describe.format("direct")).fetchall()
            == con.execute(describe.format("ingested")).fetchall())
    for a, b in (("direct", "ingested"), ("ingested", "direct")):
        assert con.execute(f"SELECT count(*) FROM (FROM {a} EXCEPT ALL FROM {b})"
                           ).fetchall()[0][0] == 0
    report = json.loads((tmp_path / "data" / "t.quality.json").read_text())
    assert report["rows"] == result.rows and 0 <= report["score"] <= 100
    assert sorted(tomllib.loads(proposal_path(node).read_text())["t"]["schema"]) == sorted(columns)


def test_spreadsheets_are_refused_with_the_reason(tmp_path: Path) -> None:
    xlsx = DATA / "fr-ips" / "Table-de-passage-IPS-PCS-2022.xlsx"
    node = load_node_config(_config(tmp_path, [_dataset(tmp_path, [xlsx], {})]))
    with pytest.raises(IngestError, match=r"unsupported format '\.xlsx'.*export"):
        ingest_dataset(node, node.datasets[0])


# -- pseudonymisation -----------------------------------------------------------------------

FIRST = ["Anne-Laure", "Benoît", "Chloé", "Dominique", "Émilie", "François"]
LAST = ["Delacroix", "Fontaine", "Guillemot", "Lefebvre", "Marchetti", "Rousseau"]
PUPIL_CLASSES = {
    "identifiers": ["ine", "nom", "prenom", "e_mail"],
    "quasi_identifiers": {"date_de_naissance": "year", "code_postal": "departement",
                          "age": "band:5", "sexe": "keep"},
    "attributes": ["uai", "score"],
    "drop": ["commentaire"],
}


def _pupils(path: Path, n: int = 30) -> list[dict[str, str]]:
    rows = []
    postcodes = ["35000", "20090", "20200", "97411", "1000", "75011"]
    for i in range(n):
        first, last = FIRST[i % 6], LAST[(i // 6) % 6]
        rows.append({
            "INE": f"{70123400 + i:09d}{'ABCDEFGHJK'[i % 10]}{'XYZ'[i % 3]}",
            "Nom": last, "Prénom": first,
            "E-mail": f"{first.lower()}.{last.lower()}{i}@lycee-exemple.fr",
            "Date de naissance": f"{1 + i % 28:02d}/{1 + i % 12:02d}/{2008 + i % 3}",
            "Code postal": postcodes[i % 6], "Age": str(14 + i % 4),
            "Sexe": "FM"[i % 2], "UAI": f"03500{i % 3:02d}A",
            "Score": f"{8 + i % 12},5", "Commentaire": f"suivi par {first} {last}",
        })
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=";")
        writer.writeheader()
        writer.writerows(rows)
    return rows


def _pupil_dataset(tmp: Path, raw: Path, key_env: str = "BULLE_TEST_KEY", **extra: Any
                   ) -> dict[str, Any]:
    return _dataset(tmp, [raw], PUPIL_CLASSES, table="pupils",
                    **{"tier": "restricted", "privacy_unit": "ine", "pivots": ["uai"],
                       "public_domains": {"sexe": ["F", "M"]}, "bounds": {"score": [0, 20]},
                       "pseudonymise": {"key_env": key_env}, **extra})


def _pupil_node(tmp: Path, raw: Path, key_env: str = "BULLE_TEST_KEY", **extra: Any) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    return _config(tmp, [_pupil_dataset(tmp, raw, key_env, **extra)])


def test_no_raw_identifier_remains_and_pseudonyms_link_across_nodes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = tmp_path / "raw" / "eleves.csv"
    raw.parent.mkdir()
    rows = _pupils(raw)
    monkeypatch.setenv("BULLE_TEST_KEY", KEY)
    monkeypatch.setenv("BULLE_OTHER_KEY", OTHER_KEY)
    tables = {}
    for node, env in (("a", "BULLE_TEST_KEY"), ("b", "BULLE_TEST_KEY"), ("c", "BULLE_OTHER_KEY")):
        config = load_node_config(_pupil_node(tmp_path / node, raw, env))
        [result] = ingest_node(config)
        assert not isinstance(result, Exception), result
        tables[node] = pq.read_table(result.output).to_pylist()
    # No raw identifier (nor a raw birth date, nor the dropped comment) in any file's bytes.
    secrets = {v for r in rows for k, v in r.items()
               if k in ("INE", "Nom", "Prénom", "E-mail", "Date de naissance", "Commentaire")}
    secrets |= {s.lower() for s in secrets} | {s.upper() for s in secrets}
    for node in "abc":
        files = [p for p in (tmp_path / node / "data").rglob("*") if p.is_file()]
        assert {p.suffix for p in files} >= {".parquet", ".json"}
        for p in files:
            blob = p.read_bytes()
            leaked = sorted(s for s in secrets if s.encode() in blob)
            assert not leaked, f"{p.name} holds raw identifiers: {leaked[:3]}"
        # the scan does see plain values in these files (attributes are kept as is)
        assert b"0350001A" in (tmp_path / node / "data" / "pupils.parquet").read_bytes()
    # HMAC-SHA256 of the normalised value, 32 hex characters; same key -> same pseudonyms.
    want = hmac.new(KEY.encode(), rows[0]["INE"].casefold().encode(), hashlib.sha256)
    assert tables["a"][0]["ine"] == want.hexdigest()[:32]
    assert tables["a"] == tables["b"]
    assert all(ra[c] != rc[c] for ra, rc in zip(tables["a"], tables["c"], strict=True)
               for c in ("ine", "nom", "prenom", "e_mail"))
    assert len({r["ine"] for r in tables["a"]}) == len(rows)
    # generalisation: year, département (Corsica, DOM, lost leading zero), 5-year band
    first = tables["a"][:6]
    assert [r["date_de_naissance"] for r in first] == [2008, 2009, 2010, 2008, 2009, 2010]
    assert [r["code_postal"] for r in first] == ["35", "2A", "2B", "974", "01", "75"]
    assert [r["age"] for r in first[:2]] == ["10-14", "15-19"]
    assert "commentaire" not in tables["a"][0]
    assert tables["a"][0]["score"] == 8.5 and tables["a"][0]["uai"] == "0350000A"


def test_the_key_is_required_and_kept_apart(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    raw = tmp_path / "eleves.csv"
    _pupils(raw, 5)
    monkeypatch.delenv("BULLE_TEST_KEY", raising=False)
    config = load_node_config(_pupil_node(tmp_path / "n", raw))
    with pytest.raises(IngestError, match=r"BULLE_TEST_KEY.*not set; refusing to ingest"):
        ingest_dataset(config, config.datasets[0])
    assert not (tmp_path / "n" / "data" / "pupils.parquet").exists()
    # a key file inside the data directory is refused; identifiers need a key at all
    (tmp_path / "k" / "data").mkdir(parents=True)
    (tmp_path / "k" / "data" / "key").write_text(KEY)
    ds = _dataset(tmp_path / "k", [raw], PUPIL_CLASSES, table="pupils",
                  pseudonymise={"key_file": str(tmp_path / "k" / "data" / "key")})
    config = load_node_config(_config(tmp_path / "k", [ds]))
    with pytest.raises(IngestError, match="must not be kept with the data"):
        ingest_dataset(config, config.datasets[0])
    no_key = _dataset(tmp_path / "k", [raw], PUPIL_CLASSES, table="pupils")
    with pytest.raises(ConfigError, match=r"no \[dataset\.pseudonymise\] section"):
        load_node_config(_config(tmp_path / "k", [no_key]))


def test_config_sub_tables_are_checked(tmp_path: Path) -> None:
    base = {"table": "t", "source": str(tmp_path / "t.parquet"), "tier": "open"}
    with pytest.raises(ConfigError, match="unknown key 'colour'"):
        load_node_config(_config(tmp_path, [{**base, "ingest": {"inputs": ["x.csv"],
                                                                  "colour": 1}}]))
    with pytest.raises(ConfigError, match=r"\[dataset.classify\] only applies with"):
        load_node_config(_config(tmp_path, [{**base, "classify": {"attributes": ["a"]}}]))
    with pytest.raises(ConfigError, match="unknown generalisation rule"):
        load_node_config(_config(tmp_path, [{**base, "ingest": {"inputs": ["x.csv"]},
                                             "classify": {"quasi_identifiers": {"a": "day"}}}]))
    with pytest.raises(ConfigError, match="classified more than once"):
        load_node_config(_config(tmp_path, [{**base, "ingest": {"inputs": ["x.csv"]},
                                             "classify": {"attributes": ["a"], "drop": ["a"]}}]))
    # pivots alone are fine without an ingest: the demo's datasets stay as they are
    config = load_node_config(_config(tmp_path, [{**base, "pivots": ["uai"]}]))
    assert config.datasets[0].onboarding.pivots == ("uai",)
    assert config.data_dir == tmp_path / "data"


# -- encodings, formats, malformed files --------------------------------------------------

def test_latin1_cp1252_jsonl_and_parquet_inputs(tmp_path: Path) -> None:
    latin = tmp_path / "latin1.csv"
    latin.write_bytes("Académie;Libellé;Taux\nRennes;Collège Élémentaire;87,5\n"
                      .encode("latin-1"))
    cp1252 = tmp_path / "cp1252.csv"
    cp1252.write_bytes("Académie;Libellé;Taux\nNice;L’œuvre à 5 €;92,25\n".encode("cp1252"))
    jsonl = tmp_path / "more.jsonl"
    jsonl.write_text('{"Académie": "Lille", "Libellé": "x", "Taux": 50}\n\n'
                     '{"Académie": "Nancy", "Libellé": null, "Taux": 75.5}\n')
    parquet = tmp_path / "more.parquet"
    pq.write_table(pa.table({"academie": ["Lyon"], "libelle": ["y"], "taux": [12.0]}), parquet)
    ds = _dataset(tmp_path, [latin, cp1252, jsonl, parquet],
                  {"attributes": ["academie", "libelle", "taux"]})
    node = load_node_config(_config(tmp_path, [ds]))
    result = ingest_dataset(node, node.datasets[0])
    assert pq.read_table(result.output).to_pylist() == [
        {"academie": "Rennes", "libelle": "Collège Élémentaire", "taux": 87.5},
        {"academie": "Nice", "libelle": "L’œuvre à 5 €", "taux": 92.25},
        {"academie": "Lille", "libelle": "x", "taux": 50.0},
        {"academie": "Nancy", "libelle": None, "taux": 75.5},
        {"academie": "Lyon", "libelle": "y", "taux": 12.0},
    ]


def _serving_rows(config_path: Path) -> int:
    engine = NodeEngine(load_node_config(config_path))
    try:
        return engine.cursor().execute("SELECT count(*) FROM pupils").fetchall()[0][0]
    finally:
        engine.close()


def test_malformed_files_fail_with_the_line_and_keep_the_previous_version(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BULLE_TEST_KEY", KEY)
    raw = tmp_path / "eleves.csv"
    _pupils(raw, 12)
    config_path = _pupil_node(tmp_path, raw, schema={"score": "DOUBLE", "uai": "VARCHAR"})
    config = load_node_config(config_path)
    ds = config.datasets[0]
    v1 = ingest_dataset(config, ds)
    good = v1.output.read_bytes()
    assert _serving_rows(config_path) == 12
    lines = raw.read_text(encoding="utf-8").splitlines(keepends=True)

    def broken(text: str | bytes, match: str) -> None:
        raw.write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(IngestError, match=match):
            ingest_dataset(config, ds)
        assert v1.output.read_bytes() == good  # the previous version still serves
        assert not list((tmp_path / "data").glob(".*.tmp*"))

    broken("".join(lines[:3]) + lines[3].rstrip("\n") + ";extra\n" + "".join(lines[4:]),
           r"eleves\.csv line 4: 12 fields where the header has 11 \(ragged row\)")
    bad_byte = "".join(lines).encode().replace(b"Fontaine", b"Font\xe9ine", 1)
    line_of = 1 + bad_byte[:bad_byte.index(b"Font\xe9ine")].count(b"\n")
    broken(bad_byte, rf"eleves\.csv line {line_of}: invalid UTF-8 byte")
    broken("".join(lines[:5]) + lines[5].replace(",5;", ",5x;", 1) + "".join(lines[6:]),
           r"eleves\.csv line 6: column 'score' is not a valid DOUBLE")
    broken("".join(lines[:7]) + lines[7].replace("/20", "/2O", 1) + "".join(lines[8:]),
           r"eleves\.csv line 8: column 'date_de_naissance' cannot be generalised by rule 'year'")
    broken("".join(lines[:2]) + '"unterminated;' + "".join(lines[2:]), r"eleves\.csv line")
    assert _serving_rows(config_path) == 12

    # An ingest interrupted while writing the Parquet (disk full, killed) changes nothing.
    raw.write_text("".join(lines[:6]))
    real = pq.write_table

    def interrupted(table: pa.Table, where: Any, **kw: Any) -> None:
        real(table.slice(0, 1), where, **kw)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pq, "write_table", interrupted)
    with pytest.raises(IngestError, match=r"cannot write under .*No space left"):
        ingest_dataset(config, ds)
    monkeypatch.setattr(pq, "write_table", real)
    assert v1.output.read_bytes() == good and _serving_rows(config_path) == 12
    assert not list((tmp_path / "data").glob(".*.tmp*"))
    assert ingest_dataset(config, ds).rows == 5  # and the fixed input goes through


def test_ingest_is_idempotent_and_atomic(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BULLE_TEST_KEY", KEY)
    raw = tmp_path / "eleves.csv"
    _pupils(raw, 8)
    config_path = _pupil_node(tmp_path, raw)
    config = load_node_config(config_path)
    first = ingest_dataset(config, config.datasets[0])
    data = first.output.read_bytes()
    again = ingest_dataset(config, config.datasets[0])
    assert again.status == "unchanged" and again.output.read_bytes() == data
    forced = ingest_dataset(config, config.datasets[0], force=True)
    assert forced.status == "ingested" and forced.output.read_bytes() == data  # same bytes
    monkeypatch.setenv("BULLE_TEST_KEY", OTHER_KEY)  # a new key: pseudonyms must change
    rekeyed = ingest_dataset(config, config.datasets[0])
    assert rekeyed.status == "ingested" and rekeyed.output.read_bytes() != data
    # through the CLI: the operator's config is untouched, the proposal sits beside it
    before = config_path.read_bytes()
    cli = [sys.executable, "-m", "bulle_cli", "node", "ingest", "--config", str(config_path)]
    env = {"PATH": "/usr/bin:/bin", "BULLE_TEST_KEY": OTHER_KEY}
    proc = subprocess.run(cli, capture_output=True, text=True, timeout=120, env=env,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr
    assert "pupils: inputs unchanged" in proc.stdout
    proc = subprocess.run([*cli, "--dataset", "pupils", "--force"], capture_output=True,
                          text=True, timeout=120, env={"PATH": "/usr/bin:/bin"},
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 2 and "refusing to ingest" in proc.stderr
    assert config_path.read_bytes() == before
    proposal = tomllib.loads(proposal_path(config).read_text())
    assert proposal["pupils"]["schema"]["date_de_naissance"] == "BIGINT"
    assert proposal["pupils"]["classify"]["identifiers"] == ["ine", "nom", "prenom", "e_mail"]


# -- quality --------------------------------------------------------------------------------

def test_quality_score_formula_by_hand() -> None:
    con = duckdb.connect()
    con.execute("CREATE TABLE t (id VARCHAR, sex VARCHAR, score DOUBLE)")
    con.execute("INSERT INTO t VALUES ('a', 'F', 10), ('b', 'M', 25), ('b', 'X', NULL), "
                "(NULL, 'F', 5)")
    ds = DatasetConfig(table="t", source=(), tier="sensitive", privacy_unit="id",
                       public_domains={"sex": ("F", "M")}, bounds={"score": (0.0, 20.0)})
    report = compute_quality(con, ds, {"source_modified_at": None, "ingested_at": None})
    # completeness: id 3/4, sex 4/4, score 3/4 -> C = 2.5/3
    assert report["columns"]["id"] == {"nulls": 1, "completeness": 0.75}
    assert report["components"]["completeness"] == pytest.approx(2.5 / 3)
    # validity: sex in {F, M} 3/4; score in [0, 20] 2 of its 3 non-null -> V = (3/4 + 2/3)/2
    assert [(c["column"], c["invalid"]) for c in report["checks"]] == [("sex", 1), ("score", 1)]
    assert report["components"]["validity"] == pytest.approx((0.75 + 2 / 3) / 2)
    # uniqueness: only unit 'a' stays within 1 row per unit: 1 of 4 rows -> U = 0.25
    assert report["privacy_unit"]["units"] == 2
    assert report["privacy_unit"]["rows_over_limit"] == 2
    assert report["components"]["uniqueness"] == 0.25
    # score = round(100 * (C + V + U) / 3) = round(59.72) = 60
    assert report["score"] == 60
    shown = published(report, "sensitive")  # rounded to 5 points, small counts withheld
    assert shown["score"] == 60 and shown["completeness_pct"] == 85.0
    assert shown["validity_pct"] == 70.0 and shown["uniqueness_pct"] == 25.0
    assert [c["invalid"] for c in shown["checks"]] == ["<10", "<10"]
    assert shown["units_bucket"] == "<100" and shown["coarsened"]
    # restricted: uniqueness is reported but not scored -> round(100 * (C + V) / 2) = 77
    restricted = compute_quality(con, replace(ds, tier="restricted"))
    assert restricted["score"] == 77
    open_view = published(restricted, "open")
    assert open_view["completeness_pct"] == 83.3 and open_view["checks"][0]["invalid"] == "1"


def test_the_node_serves_the_ingested_parquet_with_its_report(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BULLE_TEST_KEY", KEY)
    raw = tmp_path / "eleves.csv"
    _pupils(raw, 30)
    config_path = _pupil_node(tmp_path, raw, tier="sensitive")
    config = load_node_config(config_path)
    ingest_dataset(config, config.datasets[0])
    engine = NodeEngine(config)
    try:
        [info] = engine.catalog().tables
    finally:
        engine.close()
    q = info.quality
    assert q.coarsened and q.score % 5 == 0 and q.completeness_pct == 100.0
    assert all(v % 5 == 0 for v in q.column_completeness_pct.values())
    assert q.ingested_at and q.source_modified_at and q.units_bucket == "<100"
    assert dict(info.pivots) == {"uai": "school"}


# -- the catalogue for people --------------------------------------------------------------

def test_catalogue_search_quality_and_pivots(tmp_path: Path, certs: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from enclave import connect
    from federation._api import build_app
    from tests.test_api import ServerThread

    monkeypatch.setenv("BULLE_TEST_KEY", KEY)
    raw = tmp_path / "eleves.csv"
    _pupils(raw, 30)
    solo = _pupil_dataset(tmp_path / "solo", raw, columns={"score": "mean mark, out of 20"})
    pupils = load_node_config(_config(tmp_path / "solo", [solo]))
    ingest_dataset(pupils, pupils.datasets[0])
    depp = [
        {"table": "ips_colleges", "tier": "open",
         "source": str(DATA / "fr-ips/fr-en-ips-colleges-ap2022.csv"),
         "columns": {"ips": "indice de position sociale"}},
        {"table": "dnb_colleges", "tier": "open", "source": str(
            DATA / "fr-ivac-colleges/fr-en-indicateurs-valeur-ajoutee-colleges.csv")},
    ]
    (tmp_path / "fed").mkdir()
    fed = start_federation(tmp_path / "fed", certs, {"depp": depp, "solo": [solo]})
    try:
        with ServerThread(build_app(fed.coordinator)) as url:
            hub = connect(url, TOKEN)
            catalog = hub.catalog().set_index("table")
            assert catalog.loc["pupils", "quality"] == 100
            assert 0 < catalog.loc["ips_colleges", "quality"] <= 100
            found = hub.catalog(search="ips")
            assert list(found["table"]) == ["ips_colleges"]
            assert "ips" in found.iloc[0]["matches"]
            assert list(hub.catalog(search="Position SOCIALE")["table"]) == ["ips_colleges"]
            assert list(hub.catalog(search="mark")["table"]) == ["pupils"]
            assert hub.catalog(search="no such word").empty
            cols = hub.describe("ips_colleges").set_index("name")
            assert cols.loc["uai", "pivot"] == "school"
            assert cols.loc["uai", "joins_with"] == ["dnb_colleges", "pupils"]
            assert cols.loc["rentree_scolaire", "pivot"] == "year"
            assert pd.isna(cols.loc["ips", "pivot"]) and cols.loc["ips", "joins_with"] == []
            assert 90 < cols.loc["ips", "completeness_pct"] <= 100
    finally:
        fed.close()


@pytest.mark.parametrize(("column", "expected"), [
    ("age_at_enrollment", ("quasi-identifier", "band:5")),
    ("nacionality", ("quasi-identifier", "keep")),
    ("nationality", ("quasi-identifier", "keep")),
    ("date_de_naissance", ("quasi-identifier", "year")),
    ("birth_date", ("quasi-identifier", "year")),
    ("code_postal", ("quasi-identifier", "departement")),
    ("school", ("quasi-identifier", "keep")),
    ("gender", ("quasi-identifier", "keep")),
    ("ine", ("identifier", "")),
    ("student_email", ("identifier", "")),
    ("curricular_units_1st_sem_grade", ("attribute", "")),
    ("marital_status", ("attribute", "")),
])
def test_the_proposal_flags_the_usual_quasi_identifiers_by_name(column: str,
                                                                 expected: tuple) -> None:
    from nodes._onboard import _suggest

    assert _suggest(column) == expected
