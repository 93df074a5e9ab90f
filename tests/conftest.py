from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest

from federation._certs import make_certs
from nodes._config import DatasetConfig
from nodes._sources import load_dataset
from tests._federation import DATA, Federation, start_federation

# The exact federation releases the restricted tier unperturbed (the rewrite corpus checks
# every answer against one DuckDB): a setting nodes refuse without this variable.
os.environ["BULLE_ALLOW_EXACT_RELEASE"] = "1"
NODE_NAMES = ["gp", "ms", "v1", "v2", "v3", "depp", "solo", "slow"]
MODULES = {"v1": ("AAA", "BBB", "CCC"), "v2": ("DDD", "EEE"), "v3": ("FFF", "GGG")}


def pytest_configure(config: pytest.Config) -> None:
    if not (DATA / "uci-student-performance" / "student-por.csv").exists():
        raise pytest.UsageError(f"the shared open data is expected at {DATA}")


# With BULLE_REQUIRE_ALL=1 (CI), a test skipped because PostgreSQL, chromium, playwright or docker
# is missing fails instead: a skip there would let CI pass without those tests.
REQUIRE_ALL = os.environ.get("BULLE_REQUIRE_ALL") == "1"
_REQUIRED = ("PostgreSQL", "chromium", "playwright", "docker")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if not (REQUIRE_ALL and report.skipped and call.excinfo is not None
            and call.excinfo.errisinstance(pytest.skip.Exception)):
        return
    reason = str(call.excinfo.value)
    if any(what in reason for what in _REQUIRED):
        report.outcome = "failed"
        report.longrepr = f"BULLE_REQUIRE_ALL=1, and this test was skipped: {reason}"


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_certs(tmp_path_factory.mktemp("certs"), NODE_NAMES, extra_clients=["intruder"])


@pytest.fixture(scope="session")
def foreign_certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another CA, which issues its own 'bulle-coordinator' certificate."""
    return make_certs(tmp_path_factory.mktemp("foreign"), ["gp"])


def uci(school: str, min_count: int = 0, round_to: int = 1, perturb: bool = False
        ) -> list[dict]:
    out = []
    for table, file in (("lycee_students", "student-por.csv"),
                        ("lycee_students_math", "student-mat.csv")):
        out.append({
            "table": table, "source": str(DATA / "uci-student-performance" / file),
            "filter": f"school = '{school}'", "tier": "restricted",
            "min_count": min_count, "round_to": round_to, "cell_key": {"perturb": perturb},
            "public_domains": {"school": ["GP", "MS"], "sex": ["F", "M"],
                               "studytime": [1, 2, 3, 4], "age": list(range(15, 23))},
        })
    return out


def oulad(modules: tuple[str, ...], min_count: int = 0, perturb: bool = False) -> list[dict]:
    mods = ", ".join(f"'{m}'" for m in modules)
    o = DATA / "oulad"
    return [
        {"table": "courses", "source": str(o / "courses.csv"), "tier": "open",
         "filter": f"code_module IN ({mods})"},
        {"table": "assessments", "source": str(o / "assessments.csv"), "tier": "open",
         "filter": f"code_module IN ({mods})"},
        {"table": "student_info", "source": str(o / "studentInfo.csv"), "tier": "restricted",
         "filter": f"code_module IN ({mods})", "privacy_unit": "id_student",
         "min_count": min_count, "cell_key": {"perturb": perturb},
         "public_domains": {"final_result": ["Distinction", "Fail", "Pass", "Withdrawn"],
                            "gender": ["F", "M"]}},
        {"table": "student_registration", "source": str(o / "studentRegistration.csv"),
         "tier": "restricted", "filter": f"code_module IN ({mods})",
         "privacy_unit": "id_student", "min_count": min_count,
         "cell_key": {"perturb": perturb}},
        {"table": "student_assessment", "source": str(o / "studentAssessment.csv"),
         "tier": "restricted", "privacy_unit": "id_student", "min_count": min_count,
         "cell_key": {"perturb": perturb},
         "filter": "id_assessment IN (SELECT id_assessment FROM assessments)"},
    ]


def depp() -> list[dict]:
    return [
        {"table": "ips_colleges", "source": str(DATA / "fr-ips/fr-en-ips-colleges-ap2022.csv"),
         "tier": "open"},
        {"table": "dnb_colleges", "tier": "open", "source": str(
            DATA / "fr-ivac-colleges/fr-en-indicateurs-valeur-ajoutee-colleges.csv")},
    ]


@pytest.fixture(scope="session")
def exact_fed(tmp_path_factory: pytest.TempPathFactory, certs: Path) -> Iterator[Federation]:
    """The real data split over 6 nodes, restricted tier with suppression off: exact."""
    nodes = {"gp": uci("GP"), "ms": uci("MS"), "depp": depp()}
    nodes.update({n: oulad(m) for n, m in MODULES.items()})
    fed = start_federation(tmp_path_factory.mktemp("exact"), certs, nodes)
    yield fed
    fed.close()


@pytest.fixture(scope="session")
def sdc_fed(tmp_path_factory: pytest.TempPathFactory, certs: Path) -> Iterator[Federation]:
    """The same split with the restricted tier perturbed by the cell key method (as in the
    demo)."""
    nodes = {"gp": uci("GP", 8, perturb=True), "ms": uci("MS", 8, perturb=True),
             "depp": depp(), "v1": oulad(MODULES["v1"], 8, perturb=True),
             "v2": oulad(MODULES["v2"], 8, perturb=True)}
    fed = start_federation(tmp_path_factory.mktemp("sdc"), certs, nodes)
    yield fed
    fed.close()


@pytest.fixture(scope="session")
def union_db() -> Iterator[duckdb.DuckDBPyConnection]:
    """One DuckDB holding the union of every node's partition: the reference answers."""
    con = duckdb.connect()
    u, o = DATA / "uci-student-performance", DATA / "oulad"
    files = {
        "lycee_students": u / "student-por.csv", "lycee_students_math": u / "student-mat.csv",
        "courses": o / "courses.csv", "assessments": o / "assessments.csv",
        "student_info": o / "studentInfo.csv",
        "student_registration": o / "studentRegistration.csv",
        "student_assessment": o / "studentAssessment.csv",
        "ips_colleges": DATA / "fr-ips/fr-en-ips-colleges-ap2022.csv",
        "dnb_colleges": DATA / "fr-ivac-colleges/fr-en-indicateurs-valeur-ajoutee-colleges.csv",
    }
    for table, path in files.items():
        load_dataset(con, DatasetConfig(table=table, source=(path,), tier="open"))
    yield con
    con.close()
