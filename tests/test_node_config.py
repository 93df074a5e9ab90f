"""Node configuration and ingestion: unknown keys, missing files, schemas, French CSVs."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest

from nodes._config import ConfigError, DatasetConfig, load_node_config
from nodes._engine import NodeEngine
from nodes._sources import load_dataset, normalize_column_name, sniff_csv
from tests._federation import DATA, node_toml

FILES = {
    "student-por.csv": DATA / "uci-student-performance/student-por.csv",
    "studentAssessment.csv": DATA / "oulad/studentAssessment.csv",
    "courses.csv": DATA / "oulad/courses.csv",
    "ips-colleges": DATA / "fr-ips/fr-en-ips-colleges-ap2022.csv",
    "ips-lycees": DATA / "fr-ips/fr-en-ips-lycees-ap2022.csv",
    "ips-ecoles-2021": DATA / "fr-ips/fr-en-ips_ecoles.csv",
    "ips-lycees-2016": DATA / "fr-ips/fr-en-ips_lycees.csv",
    "ivac": DATA / "fr-ivac-colleges/fr-en-indicateurs-valeur-ajoutee-colleges.csv",
    "annuaire-35": DATA / "fr-ille-et-vilaine/fr-en-annuaire-education.csv",
    "ecoles-effectifs-35": DATA / "fr-ille-et-vilaine/fr-en-ecoles-effectifs-nb_classes.csv",
}


@pytest.mark.parametrize(("name", "expected"), [
    ("Rentrée scolaire", "rentree_scolaire"), ("Taux de réussite - G", "taux_de_reussite_g"),
    ("G3", "g3"), ("id_student", "id_student"), ("Nom de l'établissment", "nom_de_l_etablissment"),
    ("  Nb mentions TB - G ", "nb_mentions_tb_g"), ("Numéro de l'école", "numero_de_l_ecole"),
])
def test_column_names(name: str, expected: str) -> None:
    assert normalize_column_name(name) == expected


@pytest.mark.parametrize("key", sorted(FILES))
def test_published_files_load_as_published(key: str) -> None:
    con = duckdb.connect()
    n = load_dataset(con, DatasetConfig(table="t", source=(FILES[key],), tier="open"))
    # the same count as a plain CSV parser (header excluded)
    import csv

    path = FILES[key]
    delimiter, _ = sniff_csv(path)
    with path.open(encoding="utf-8-sig", newline="") as f:
        assert n == sum(1 for _ in csv.reader(f, delimiter=delimiter)) - 1
    types = dict(con.execute("SELECT column_name, column_type FROM (DESCRIBE t)").fetchall())
    assert all(c == normalize_column_name(c) for c in types)


def test_types_follow_the_source() -> None:
    con = duckdb.connect()
    load_dataset(con, DatasetConfig(table="ips", source=(FILES["ips-colleges"],), tier="open"))
    types = dict(con.execute("SELECT column_name, column_type FROM (DESCRIBE ips)").fetchall())
    assert types["code_du_departement"] == "VARCHAR"  # '001' keeps its zeros
    assert types["ips"] == "DOUBLE" and types["uai"] == "VARCHAR"
    assert con.execute("SELECT code_du_departement FROM ips LIMIT 1").fetchone()[0] == "001"
    load_dataset(con, DatasetConfig(table="por", source=(FILES["student-por.csv"],), tier="open"))
    types = dict(con.execute("SELECT column_name, column_type FROM (DESCRIBE por)").fetchall())
    assert types["g1"] == types["g3"] == "BIGINT"  # G1 is quoted in the source, G3 is not


def test_french_decimal_commas_bom_and_crlf(tmp_path: Path) -> None:
    path = tmp_path / "fr.csv"
    path.write_bytes("\ufeffCode;Taux de réussite;Libellé\r\n001;87,5;é\r\n010;92,25;à\r\n"
                     .encode())
    con = duckdb.connect()
    load_dataset(con, DatasetConfig(table="fr", source=(path,), tier="open"))
    assert con.execute("SELECT * FROM fr ORDER BY code").fetchall() == [
        ("001", 87.5, "é"), ("010", 92.25, "à")]


def test_parquet_and_several_sources(tmp_path: Path) -> None:
    con = duckdb.connect()
    con.execute(f"COPY (SELECT range AS id, range * 2 AS v FROM range(5)) TO "
                f"'{tmp_path / 'a.parquet'}'")
    (tmp_path / "b.csv").write_text("ID,V\n10,20\n")
    n = load_dataset(con, DatasetConfig(table="t", tier="open",
                                        source=(tmp_path / "a.parquet", tmp_path / "b.csv")))
    assert n == 6 and con.execute("SELECT sum(v) FROM t").fetchone()[0] == 40


def test_ragged_csv_fails_with_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("a;b\n1;2\n3;4;5\n")
    with pytest.raises(ConfigError, match=r"bad\.csv") as err:
        load_dataset(duckdb.connect(), DatasetConfig(table="t", source=(path,), tier="open"))
    assert "line 3" in str(err.value).lower() or "Line: 3" in str(err.value)


def _write(tmp_path: Path, certs: Path, datasets: list[dict], extra: str = "") -> Path:
    path = tmp_path / "node.toml"
    path.write_text(node_toml("gp", certs, datasets, extra))
    return path


def test_unknown_keys_are_rejected_by_name(tmp_path: Path, certs: Path) -> None:
    ds = {"table": "t", "source": str(FILES["courses.csv"]), "tier": "open"}
    with pytest.raises(ConfigError, match="unknown key 'colour'"):
        load_node_config(_write(tmp_path, certs, [{**ds, "colour": "red"}]))
    with pytest.raises(ConfigError, match="unknown key 'threads_per_node'"):
        load_node_config(_write(tmp_path, certs, [ds], "threads_per_node = 2"))
    with pytest.raises(ConfigError, match="tier 'secret'"):
        load_node_config(_write(tmp_path, certs, [{**ds, "tier": "secret"}]))


def test_missing_file_and_wrong_schema_refuse_to_start(tmp_path: Path, certs: Path) -> None:
    missing = {"table": "t", "source": str(tmp_path / "nope.csv"), "tier": "open"}
    with pytest.raises(ConfigError, match=r"source file not found: .*nope\.csv"):
        NodeEngine(load_node_config(_write(tmp_path, certs, [missing])))
    wrong = {"table": "t", "source": str(FILES["courses.csv"]), "tier": "open",
             "schema": {"code_module": "BIGINT", "missing_col": "VARCHAR"}}
    with pytest.raises(ConfigError, match="wrong schema") as err:
        NodeEngine(load_node_config(_write(tmp_path, certs, [wrong])))
    assert "code_module" in str(err.value) and "missing_col" in str(err.value)


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("public_domains", {"code_modul": ["AAA"]}, "public_domains names column 'code_modul', "
     "which the table does not have (did you mean 'code_module'?)"),
    ("bounds", {"length": [0, 300]}, "bounds names column 'length', which the table does not "
     "have (did you mean 'module_presentation_length'?)"),
    ("privacy_unit", "zzz", "privacy_unit names column 'zzz', which the table does not have "
     "(its columns: code_module, code_presentation, module_presentation_length)"),
])
def test_a_declared_column_that_does_not_exist_is_named_with_its_key(
        tmp_path: Path, certs: Path, key: str, value: object, expected: str) -> None:
    ds = {"table": "t", "source": str(FILES["courses.csv"]), "tier": "restricted", key: value}
    with pytest.raises(ConfigError) as err:
        NodeEngine(load_node_config(_write(tmp_path, certs, [ds])))
    assert str(err.value) == f"dataset 't': wrong schema: {expected}"


def test_the_cli_reports_config_errors(tmp_path: Path) -> None:
    import subprocess
    import sys

    bad = tmp_path / "bad.toml"
    bad.write_text('node_id = "x"\nlisten = "127.0.0.1:0"\nsurprise = 1\n')
    proc = subprocess.run([sys.executable, "-m", "bulle_cli", "node", "serve", "--config",
                           str(bad)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown key 'surprise'" in proc.stderr


def test_demo_configs_are_valid(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BULLE_DATA", str(DATA))
    monkeypatch.setenv("BULLE_DEMO_STATE", str(tmp_path))
    from bulle_demo import NODES, node_config

    root = node_config(NODES[0]).parent  # package data, as the launcher finds it
    configs = {p.stem: load_node_config(p) for p in root.glob("*.toml")}
    assert set(configs) == {"region-gp", "region-ms", "region-35", "vendor-a", "vendor-b", "depp"}
    tables = {n: {d.table for d in c.datasets} for n, c in configs.items()}
    assert tables["region-gp"] == tables["region-ms"] == {"lycee_students", "lycee_students_math"}
    assert tables["vendor-a"] == tables["vendor-b"] == {
        "student_info", "student_registration", "student_assessment", "assessments", "courses"}
    assert tables["depp"] == {"ips_colleges", "ips_ecoles", "ips_lycees", "dnb_colleges"}
    assert all(d.tier == "open" for d in configs["depp"].datasets)
    assert [d.table for d in configs["depp"].datasets if d.shared] == ["ips_colleges"]
    assert tables["region-35"] == {"college_headcounts"}


@pytest.mark.parametrize("listen", ["127.0.0.1:9464", "127.8.0.1:9464", "[::1]:9464",
                                    "localhost:9464"])
def test_metrics_listen_on_loopback_needs_nothing_more(tmp_path: Path, certs: Path,
                                                       listen: str) -> None:
    ds = {"table": "t", "source": str(FILES["courses.csv"]), "tier": "open"}
    config = load_node_config(_write(tmp_path, certs, [ds], f'metrics_listen = "{listen}"'))
    assert config.metrics_listen == listen


@pytest.mark.parametrize("listen", ["0.0.0.0:9464", "10.1.2.3:9464", "[::]:9464",
                                    "node.example.org:9464"])
def test_metrics_listen_elsewhere_needs_metrics_allow_remote(tmp_path: Path, certs: Path,
                                                             listen: str) -> None:
    """The endpoint has no authentication: off loopback only when the operator says so."""
    ds = {"table": "t", "source": str(FILES["courses.csv"]), "tier": "open"}
    with pytest.raises(ConfigError, match=r"not a loopback address.*metrics_allow_remote"):
        load_node_config(_write(tmp_path, certs, [ds], f'metrics_listen = "{listen}"'))
    allowed = f'metrics_listen = "{listen}"\nmetrics_allow_remote = true'
    assert load_node_config(_write(tmp_path, certs, [ds], allowed)).metrics_listen == listen
    with pytest.raises(ConfigError, match="metrics_allow_remote must be true or false"):
        load_node_config(_write(tmp_path, certs, [ds], f'metrics_listen = "{listen}"\n'
                                                       'metrics_allow_remote = "yes"'))
