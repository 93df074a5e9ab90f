"""Attacks on the restricted tier (issue 11; DESIGN.md "The restricted tier" and "Total
evaluation"), each run against at least 20 different singled-out units of the real data, at
both layers: SQL through the coordinator, and crafted plans sent straight to the node that
holds the unit (with the coordinator's client certificate).

Targets are fixed: UCI pupils (no id) are the rows whose quasi-identifiers (school, sex,
age, address, famsize, pstatus, medu, fedu, mjob, fjob) are unique in the union data,
sorted, taken at even steps; OULAD learners are the ``id_student`` with one
``student_info`` row in the federation's modules and no missing score, sorted, at even
steps. True values come from ``union_db``.

The record keys are drawn afresh by every federation, so a perturbed answer is random from
one run to the next. Where an attack may succeed by chance, the bound on its successes is
derived from the parameters the nodes declare (threshold k, ptable, magnitude μ and the
documented law of v: symmetric, |v| uniform on [0.5, 1.5]): ``_allowed`` is the number of
exact recoveries that the declared mechanism exceeds with probability below 1e-6, and the
declared mechanism itself must leave the attack a small chance (``SMALL``) on average.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pyarrow as pa
import pytest

from federation._errors import QueryError
from federation._planner import plan_query
from federation._sql import parse
from federation.proto import bulle_pb2 as pb
from federation.proto import bulle_pb2_grpc as pb_grpc
from nodes._restricted import contribution_bounds
from privacy import CkmParams, ptable_for
from privacy._ckm import CKEYS, MAGNITUDE_HIGH, MAGNITUDE_LOW, pcv

N_TARGETS = 20
N_SIBLINGS = 10  # targets of the extra siblings of a class (each class has >= 20)
SMALL = 0.25  # "a small fraction" of the targets
ALPHA = 1e-6  # chance that a correct mechanism exceeds the allowed number of exact hits
DRAWS = 40_000  # Monte Carlo draws of the declared law, per target
QI = ("school", "sex", "age", "address", "famsize", "pstatus", "medu", "fedu", "mjob", "fjob")
SDC_MODULES = {"v1": ("AAA", "BBB", "CCC"), "v2": ("DDD", "EEE")}  # tests/conftest.py
NODE_OF_SCHOOL = {"GP": "gp", "MS": "ms"}
NODE_NAME = re.compile(r"\b(gp|ms|v1|v2|v3|depp)\b")
NOBODY = "age = 99"  # a condition no pupil meets
REFUSED = ("not_allowed", "syntax_error", "unknown_table", "unknown_column")
RELEASED = ("columns", "rows", "suppressed", "notes", "suppressed_cells", "hidden_cells",
            "tier", "nodes")


# -- targets ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Pupil:
    where: str  # a condition exactly one pupil of lycee_students meets
    row: dict[str, Any]  # that pupil's true record

    @property
    def node(self) -> str:
        return NODE_OF_SCHOOL[self.row["school"]]

    def __getitem__(self, column: str) -> Any:
        return self.row[column]


@dataclass(frozen=True)
class Learner:
    id: int
    node: str
    info: dict[str, Any]  # the student_info row
    scores: tuple[int, ...]  # student_assessment scores at its node


def _lit(v: Any) -> str:
    return "'" + v.replace("'", "''") + "'" if isinstance(v, str) else str(v)


def _records(con, sql: str) -> list[dict[str, Any]]:
    cur = con.execute(sql)
    names = [d[0] for d in cur.description]
    return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]


def _spread(items: Sequence[Any], n: int = N_TARGETS) -> list[Any]:
    assert len(items) >= n
    return [items[i * len(items) // n] for i in range(n)]


@pytest.fixture(scope="module")
def uci_rows(union_db) -> dict[str, list[dict[str, Any]]]:
    """lycee_students per school (= per node), in a fixed order."""
    rows = _records(union_db, f"SELECT * FROM lycee_students ORDER BY {', '.join(QI)}, g3, "
                              "absences, g1, g2, reason")
    return {s: [r for r in rows if r["school"] == s] for s in NODE_OF_SCHOOL}


@pytest.fixture(scope="module")
def pupils(uci_rows) -> list[Pupil]:
    rows = [r for rs in uci_rows.values() for r in rs]
    counts = Counter(tuple(r[c] for c in QI) for r in rows)
    unique = sorted((r for r in rows if counts[tuple(r[c] for c in QI)] == 1),
                    key=lambda r: tuple(r[c] for c in QI))
    out = [Pupil(" AND ".join(f"{c} = {_lit(r[c])}" for c in QI), r) for r in _spread(unique)]
    assert {p["school"] for p in out} == {"GP", "MS"}  # both nodes are attacked
    return out


def _module_list(node: str) -> str:
    return ", ".join(f"'{m}'" for m in SDC_MODULES[node])


@pytest.fixture(scope="module")
def learners(union_db) -> list[Learner]:
    out = []
    for node in SDC_MODULES:
        mods = _module_list(node)
        infos = _records(union_db, f"""
            SELECT * FROM student_info WHERE code_module IN ({mods}) AND id_student IN (
                SELECT id_student FROM student_info
                WHERE code_module IN ({_module_list('v1')}, {_module_list('v2')})
                GROUP BY 1 HAVING count(*) = 1)""")
        scores = _records(union_db, f"""
            SELECT s.id_student, list(s.score ORDER BY s.id_assessment) AS scores
            FROM student_assessment s JOIN assessments a ON s.id_assessment = a.id_assessment
            WHERE a.code_module IN ({mods}) GROUP BY 1""")
        by_id = {r["id_student"]: r["scores"] for r in scores}
        for info in infos:
            s = by_id.get(info["id_student"], [])
            if len(s) >= 3 and None not in s:
                out.append(Learner(info["id_student"], node, info, tuple(s)))
    out.sort(key=lambda learner: learner.id)
    chosen = _spread(out)
    assert {learner.node for learner in chosen} == set(SDC_MODULES)
    return chosen


@pytest.fixture(scope="module")
def ckm(sdc_fed) -> CkmParams:
    """The parameters the nodes declare for the UCI and OULAD restricted tables."""
    metas = [sdc_fed.engines[n].meta[t] for n, t in (
        ("gp", "lycee_students"), ("ms", "lycee_students"), ("v1", "student_assessment"),
        ("v2", "student_info"))]
    params = {m.ckm for m in metas}
    assert len(params) == 1 and all(m.perturb for m in metas)
    (p,) = params
    assert p.threshold == 8
    return p


# -- the two layers ----------------------------------------------------------------------------

def outcome(fed, sql: str) -> tuple[Any, ...]:
    """Everything a researcher sees of a query, in a comparable form."""
    try:
        r = fed.run(sql)
    except QueryError as e:
        return ("error", e.code, e.message, tuple(sorted(e.nodes)))
    return ("ok", *(json.dumps(r.get(k), sort_keys=True) for k in RELEASED))


def values(fed, sql: str) -> list[Any]:
    """The single released row of an aggregate query (None where "< k")."""
    r = fed.run(sql)
    assert len(r["rows"]) == 1, sql
    return r["rows"][0]


def plan_of(fed, sql: str) -> pb.Plan:
    """The plan the coordinator's planner makes of ``sql`` (without its checks)."""
    return plan_query(parse(sql, fed.coordinator.schema())).plan


@pytest.fixture(scope="module")
def node(sdc_fed, certs) -> Iterator[Callable[[str, pb.Plan], tuple[Any, ...]]]:
    """Send a crafted plan straight to a node with the coordinator's client certificate."""
    creds = grpc.ssl_channel_credentials(
        root_certificates=(certs / "ca.pem").read_bytes(),
        private_key=(certs / "bulle-coordinator.key").read_bytes(),
        certificate_chain=(certs / "bulle-coordinator.pem").read_bytes())
    channels = {n: grpc.secure_channel(f"127.0.0.1:{sdc_fed.ports[n]}", creds)
                for n in ("gp", "ms", "v1", "v2")}
    stubs = {n: pb_grpc.NodeStub(c) for n, c in channels.items()}

    def call(node_id: str, plan: pb.Plan) -> tuple[Any, ...]:
        try:
            res = stubs[node_id].Execute(plan, timeout=60)
        except grpc.RpcError as e:
            return ("error", e.code().name, e.details())
        table = pa.ipc.open_stream(res.arrow_ipc).read_all()
        return ("ok", tuple(table.schema.names), json.dumps(table.to_pylist()),
                res.suppressed_cells, res.hidden_cells, res.tier, res.min_count, res.round_to,
                res.perturbed)

    yield call
    for c in channels.values():
        c.close()


def node_values(call: Callable[[str, pb.Plan], tuple[Any, ...]], node_id: str,
                plan: pb.Plan) -> list[Any]:
    out = call(node_id, plan)
    assert out[0] == "ok", out
    rows = json.loads(out[2])
    assert len(rows) == 1
    return [v for k, v in rows[0].items() if k != "__suppressed"]


# -- the declared law, and how often it lets an attack hit the truth ---------------------------

def _v(rng: np.random.Generator) -> np.ndarray:
    """The magnitude draw as documented: symmetric, |v| uniform on [0.5, 1.5]."""
    sign = rng.choice(np.array([-1.0, 1.0]), DRAWS)
    return sign * rng.uniform(MAGNITUDE_LOW, MAGNITUDE_HIGH, DRAWS)


def _e(rng: np.random.Generator, table: np.ndarray, n: int) -> np.ndarray:
    """The ptable's perturbation of a count of n units with a uniformly random cell key."""
    if n == 0:
        return np.zeros(DRAWS)
    return table[int(pcv(np.array([n]))[0]) - 1][rng.integers(0, CKEYS, DRAWS)].astype(float)


def scale_of(fed, node_id: str, table: str, arg: str) -> float:
    """B of SUM(arg) at a node, as declared: the most one unit adds — the static bound of
    ``arg`` (declared bounds, else the node's power-of-two envelope) times the most rows
    one unit has there (1 when each unit has one row and nothing is joined)."""
    meta = fed.engines[node_id].meta[table]
    plan = plan_of(fed, f"SELECT SUM({arg}) FROM {table}")
    found = contribution_bounds(plan.aggregates[0].arg,
                                {(table, c): b for c, b in meta.bounds.items()})
    assert found is not None, arg
    rows = 1 if not meta.privacy_unit or meta.max_unit_rows == 1 else meta.max_unit_rows
    return max(abs(found[0]), abs(found[1])) * rows


def p_exact_sums(a: np.ndarray, b: np.ndarray, estimate: Callable[[Any, Any], Any],
                 truth: float, mu: float, integer: bool, seed: int, scale_a: float,
                 scale_b: float) -> float:
    """P(round(estimate(A, B)) == truth) where A and B are the released SUMs of two cells
    over the same units at one node; ``a``, ``b``: each unit's contribution (NaN: none).

    Declared mechanism: released = Σ + μ·B·v, B the static bound of one unit's
    contribution (``scale_of``), v keyed on (cell key = the set of units with a value, 0
    included; value key = what each of them adds). The same contributions give the same
    v; any other pair, an independent one.
    """
    assert not np.all(np.isin(a[~np.isnan(a)], (0, 1))), "a count-like cell: another law"
    rng = np.random.default_rng(seed)
    same = np.array_equal(a, b, equal_nan=True)  # NaN (no value) is not 0 (a value)
    v_a = _v(rng)
    v_b = v_a if same else _v(rng)
    big_a = np.nansum(a) + mu * scale_a * v_a
    big_b = np.nansum(b) + mu * scale_b * v_b
    if integer:
        big_a, big_b = np.round(big_a), np.round(big_b)
    return float(np.mean(np.round(estimate(big_a, big_b)) == truth))


def _allowed(ps: Sequence[float]) -> int:
    """The most exact hits that independent successes of probabilities ``ps`` reach with
    probability at least ALPHA (Poisson-binomial upper tail; ps padded for Monte Carlo)."""
    dist = np.zeros(len(ps) + 1)
    dist[0] = 1.0
    for p in ps:
        p = min(1.0, p + 4 * np.sqrt(p * (1 - p) / DRAWS) + 1e-3)
        dist[1:] = dist[1:] * (1 - p) + dist[:-1] * p
        dist[0] *= 1 - p
    tail = np.cumsum(dist[::-1])[::-1]  # tail[m] = P(hits >= m)
    return next(m for m in range(len(ps) + 1) if m == len(ps) or tail[m + 1] < ALPHA)


def assert_rarely_exact(what: str, hits: Sequence[bool], ps: Sequence[float],
                        shown: Sequence[str]) -> None:
    """The attack recovers the exact value no more often than the declared mechanism allows,
    never for every target, and the declared mechanism leaves it a small chance."""
    n, h = len(hits), sum(hits)
    assert n >= N_TARGETS
    detail = "\n".join(shown[:6])
    assert h < n, f"{what}: the exact value of all {n} targets was recovered\n{detail}"
    allowed = _allowed(ps)
    assert h <= allowed, (f"{what}: exact for {h}/{n} targets, the declared parameters allow "
                          f"at most {allowed}\n{detail}")
    assert float(np.mean(ps)) <= SMALL, (
        f"{what}: exact for {h}/{n} targets; by the declared mechanism itself this attack is "
        f"exact with probability {np.mean(ps):.2f} per target (more than {SMALL})\n{detail}")


def assert_few(what: str, hits: Sequence[bool], shown: Sequence[str],
               minimum: int = N_TARGETS) -> None:
    """An attack without a declared chance of success: exact for a small fraction at most
    (an oracle that carries nothing leaves a search at one end of the range)."""
    n, h = len(hits), sum(hits)
    assert n >= minimum
    assert h <= SMALL * n, (f"{what}: recovered exactly for {h}/{n} targets"
                            + "\n" + "\n".join(shown[:6]))


def all_hold(checks: Sequence[Callable[[], None]]) -> None:
    """Run every check and report every failure (one attack's variants in one test)."""
    failures = []
    for check in checks:
        try:
            check()
        except AssertionError as e:
            failures.append(str(e).split("\nassert ")[0])
    assert not failures, f"{len(failures)} of {len(checks)} variants leak:\n\n" + \
        "\n\n".join(failures)


def search(bit: Callable[[int], bool], lo: int, hi: int) -> int:
    """The largest t in [lo, hi] with bit(t), for a bit that is true at lo and monotone."""
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if bit(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


# == 1. MIN/MAX of a singled-out unit, enumeration ===========================================

def _min_max_sql(pupils: list[Pupil], learners: list[Learner]) -> list[str]:
    out = []
    for p in pupils:
        w = p.where
        out += [
            f"SELECT MAX(CASE WHEN {w} THEN g3 END) FROM lycee_students",
            f"SELECT MIN(CASE WHEN {w} THEN absences END) FROM lycee_students",
            f"SELECT MAX(CASE WHEN {w} THEN mjob END) FROM lycee_students",
            f"SELECT MIN(CASE WHEN {w} THEN reason END) AS r, COUNT(*) FROM lycee_students",
            f"SELECT MAX(CASE WHEN {w} THEN g3 END) - MIN(g3) FROM lycee_students",
            f"SELECT sex, COUNT(*) FROM lycee_students GROUP BY sex "
            f"HAVING MAX(CASE WHEN {w} THEN g3 END) >= 10",
            f"SELECT sex, COUNT(*) AS n FROM lycee_students GROUP BY sex "
            f"ORDER BY MIN(CASE WHEN {w} THEN g3 END)",
            f"SELECT age, MAX(g1) FROM lycee_students WHERE {w} GROUP BY age",
            f"SELECT MAX(g3) FROM lycee_students_math WHERE {w}",
            f"SELECT MEDIAN(CASE WHEN {w} THEN g3 END) FROM lycee_students",
            f"SELECT COUNT(DISTINCT CASE WHEN {w} THEN g3 END) FROM lycee_students",
        ]
    prev = 0
    for learner in learners:
        x = learner.id
        out += [
            f"SELECT MIN(CASE WHEN id_student > {prev} THEN id_student END) FROM student_info",
            f"SELECT MAX(CASE WHEN id_student = {x} THEN final_result END) FROM student_info",
            f"SELECT MAX(score) FROM student_assessment WHERE id_student = {x}",
            f"SELECT MIN(date_registration) FROM student_registration WHERE id_student = {x}",
            f"SELECT MAX(a.weight) FROM student_assessment s JOIN assessments a "
            f"ON s.id_assessment = a.id_assessment WHERE s.id_student = {x}",
            f"SELECT MAX(CASE WHEN s.id_student = {x} THEN s.highest_education END) "
            "FROM student_info s JOIN courses c ON s.code_module = c.code_module "
            "AND s.code_presentation = c.code_presentation",
            f"SELECT quantile_cont(score, 0.5) FROM student_assessment WHERE id_student = {x}",
        ]
        prev = x
    return out


def test_min_max_of_a_singled_out_unit_is_refused_by_the_coordinator(sdc_fed, pupils,
                                                                      learners) -> None:
    sqls = _min_max_sql(pupils, learners)
    before = sdc_fed.executed
    answered = []
    for sql in sqls:
        try:
            sdc_fed.run(sql)
        except QueryError as e:
            assert e.code in REFUSED, (sql, e.code, e.message)
            continue
        answered.append(sql)
    assert not answered, f"{len(answered)} order-statistic queries answered, e.g. {answered[0]}"
    assert sdc_fed.executed == before, "a node ran a refused order statistic"


def _crafted_min_max(fed, pupils: list[Pupil], learners: list[Learner]
                     ) -> list[tuple[str, pb.Plan, str]]:
    """(node, plan, what): plans with a MIN/MAX aggregate the coordinator would never send,
    built from a COUNT/SUM plan whose aggregate kind is switched."""
    out = []

    def crafted(node_id: str, sql: str, kind: int) -> None:
        plan = plan_of(fed, sql)
        plan.aggregates[0].kind = kind
        out.append((node_id, plan, sql))

    for p in pupils:
        w = p.where
        crafted(p.node, f"SELECT SUM(CASE WHEN {w} THEN g3 END) FROM lycee_students", pb.MAX)
        crafted(p.node, f"SELECT COUNT(CASE WHEN {w} THEN mjob END) FROM lycee_students",
                pb.MIN)
        crafted(p.node, f"SELECT SUM(g3) FROM lycee_students_math WHERE {w}", pb.MAX)
    prev = 0
    for learner in learners:
        x = learner.id
        crafted(learner.node, "SELECT COUNT(CASE WHEN id_student > "
                f"{prev} THEN id_student END) FROM student_info", pb.MIN)
        crafted(learner.node, f"SELECT COUNT(CASE WHEN id_student = {x} THEN final_result END) "
                "FROM student_info", pb.MAX)
        crafted(learner.node, f"SELECT SUM(score) FROM student_assessment WHERE id_student = {x}",
                pb.MAX)
        crafted(learner.node, "SELECT SUM(a.weight) FROM student_assessment s JOIN assessments a "
                f"ON s.id_assessment = a.id_assessment WHERE s.id_student = {x}", pb.MAX)
        prev = x
    return out


def test_min_max_plans_are_refused_by_the_node(sdc_fed, node, pupils, learners) -> None:
    leaks = []
    for node_id, plan, sql in _crafted_min_max(sdc_fed, pupils, learners):
        got = node(node_id, plan)
        if got[:2] != ("error", "INVALID_ARGUMENT") or "MIN and MAX" not in got[2]:
            leaks.append(f"{node_id} <- MIN/MAX of [{sql}]: {got}")
    assert not leaks, f"{len(leaks)} crafted MIN/MAX plans not refused:\n" + "\n".join(leaks[:5])


# == 2. Offsets against dominance ===============================================================

@dataclass(frozen=True)
class Offset:
    """est = (SUM(A) - SUM(B)) / scale; A and B per row as SQL ({w}: the pupil) and as a
    function of (is the pupil, the row's g3)."""

    sql_a: str
    sql_b: str
    a: Callable[[bool, float], float]
    b: Callable[[bool, float], float]
    scale: float = 1.0


OFFSETS = {
    "+10": Offset("CASE WHEN {w} THEN g3 + 10 ELSE 10 END", "10",
                  lambda t, g: g + 10 if t else 10, lambda t, g: 10),
    "+100": Offset("CASE WHEN {w} THEN g3 + 100 ELSE 100 END", "100",
                   lambda t, g: g + 100 if t else 100, lambda t, g: 100),
    "+1000 (issue 11)": Offset("CASE WHEN {w} THEN g3 + 1000 ELSE 1000 END", "1000",
                               lambda t, g: g + 1000 if t else 1000, lambda t, g: 1000),
    "+1e6": Offset("CASE WHEN {w} THEN g3 + 1000000 ELSE 1000000 END", "1000000",
                   lambda t, g: g + 1e6 if t else 1e6, lambda t, g: 1e6),
    "multiplied": Offset("CASE WHEN {w} THEN (g3 + 10) * 1000 ELSE 10000 END", "10000",
                         lambda t, g: (g + 10) * 1000 if t else 10000, lambda t, g: 10000,
                         scale=1000),
    "negative": Offset("CASE WHEN {w} THEN g3 - 1000 ELSE -1000 END", "-1000",
                       lambda t, g: g - 1000 if t else -1000, lambda t, g: -1000),
    "subtracted (1000 - g3)": Offset("1000", "CASE WHEN {w} THEN 1000 - g3 ELSE 1000 END",
                                     lambda t, g: 1000, lambda t, g: 1000 - g if t else 1000),
}


def _offset_sql(o: Offset, w: str) -> str:
    return f"(SUM({o.sql_a.format(w=w)}) - SUM({o.sql_b.format(w=w)})) / {o.scale}"


def test_offsets_do_not_reveal_a_pupils_grade(sdc_fed, pupils, uci_rows, ckm) -> None:
    """SUM(CASE WHEN <pupil> THEN g3 + c ELSE c END) - SUM(c) and its variants, all in one
    query per pupil (each pair of SUMs is its own pair of cells)."""
    results: dict[str, tuple[list[bool], list[float], list[str]]] = {
        name: ([], [], []) for name in OFFSETS}
    for i, p in enumerate(pupils):
        items = [_offset_sql(o, p.where) for o in OFFSETS.values()]
        row = values(sdc_fed, f"SELECT {', '.join(items)} FROM lycee_students")
        rows = uci_rows[p["school"]]
        for j, ((name, o), est) in enumerate(zip(OFFSETS.items(), row, strict=True)):
            hits, ps, shown = results[name]
            a = np.array([o.a(r is p.row, r["g3"]) for r in rows], dtype=float)
            b = np.array([o.b(r is p.row, r["g3"]) for r in rows], dtype=float)
            ps.append(p_exact_sums(
                a, b, lambda x, y, s=o.scale: (x - y) / s, p["g3"], ckm.magnitude, True,
                100 * i + j, scale_of(sdc_fed, p.node, "lycee_students", o.sql_a.format(w=p.where)),
                scale_of(sdc_fed, p.node, "lycee_students", o.sql_b.format(w=p.where))))
            hits.append(est is not None and round(est) == p["g3"])
            if hits[-1]:
                shown.append(f"  SELECT {items[j]} FROM lycee_students\n"
                             f"    -> {est} (true g3 {p['g3']})")
    all_hold([lambda name=name, r=r: assert_rarely_exact(f"offset {name}", *r)
              for name, r in results.items()])


def test_tiny_padding_does_not_reveal_a_pupils_values(sdc_fed, pupils, ckm) -> None:
    """Every other row adds 1e-6: all units contribute, the pupil is the largest."""
    rng = np.random.default_rng(2)
    results: dict[str, tuple[list[bool], list[float], list[str]]] = {
        c: ([], [], []) for c in ("g3", "absences")}
    for p in pupils:
        items = [f"SUM(CASE WHEN {p.where} THEN {c} ELSE 0.000001 END)" for c in results]
        row = values(sdc_fed, f"SELECT {', '.join(items)} FROM lycee_students")
        for (c, (hits, ps, shown)), item, est in zip(results.items(), items, row, strict=True):
            x = p[c]
            scale = scale_of(sdc_fed, p.node, "lycee_students", item[4:-1])
            ps.append(float(np.mean(np.round(x + ckm.magnitude * scale * _v(rng)) == x)))
            hits.append(est is not None and round(est) == x)
            if hits[-1]:
                shown.append(f"  SELECT {item} FROM lycee_students\n    -> {est} (true {c} {x})")
    all_hold([lambda c=c, r=r: assert_rarely_exact(f"padding 1e-6 on {c}", *r)
              for c, r in results.items()])


def test_known_others_in_an_average_do_not_reveal_a_pupil(sdc_fed, pupils, uci_rows,
                                                          ckm) -> None:
    """AVG over one school where every other pupil counts as a known 10: (AVG − 10)·n."""
    table = ptable_for(ckm)
    hits, ps, shown = [], [], []
    for i, p in enumerate(pupils):
        sql = (f"SELECT (AVG(CASE WHEN {p.where} THEN g3 + 10 ELSE 10 END) - 10) * COUNT(*) "
               f"FROM lycee_students WHERE school = '{p['school']}'")
        (est,) = values(sdc_fed, sql)
        g, n = p["g3"], len(uci_rows[p["school"]])
        rng = np.random.default_rng(100 + i)  # sum: μ·B·v; count: n + e
        scale = scale_of(sdc_fed, p.node, "lycee_students",
                         f"CASE WHEN {p.where} THEN g3 + 10 ELSE 10 END")
        noise = np.round(ckm.magnitude * scale * _v(rng)) - 10 * _e(rng, table, n)
        ps.append(float(np.mean(np.round(g + noise) == g)))
        hits.append(est is not None and round(est) == g)
        if hits[-1]:
            shown.append(f"  {sql}\n    -> {est} (true g3 {g})")
    assert_rarely_exact("AVG with known others", hits, ps, shown)


def _assessment_units(union_db, node_id: str) -> dict[int, tuple[int, float]]:
    """Per learner at a node: (rows in student_assessment, sum of scores)."""
    rows = union_db.execute(f"""
        SELECT s.id_student, count(*), sum(s.score)
        FROM student_assessment s JOIN assessments a ON s.id_assessment = a.id_assessment
        WHERE a.code_module IN ({_module_list(node_id)}) GROUP BY 1 ORDER BY 1""").fetchall()
    return {u: (n, float(s or 0)) for u, n, s in rows}


def test_offsets_do_not_reveal_a_learners_total_score(sdc_fed, learners, union_db,
                                                      ckm) -> None:
    """Many rows per unit: contributions are summed per learner before any rule."""
    units = {n: _assessment_units(union_db, n) for n in SDC_MODULES}
    forms = ("+1000 per row (issue 11)", "1000 - score per row")
    results: dict[str, tuple[list[bool], list[float], list[str]]] = {
        f: ([], [], []) for f in forms}
    for i, learner in enumerate(learners):
        x = learner.id
        items = [f"SUM(CASE WHEN id_student = {x} THEN score + 1000 ELSE 1000 END) - SUM(1000)",
                 f"SUM(1000) - SUM(CASE WHEN id_student = {x} THEN 1000 - score ELSE 1000 END)"]
        row = values(sdc_fed, f"SELECT {', '.join(items)} FROM student_assessment")
        truth = sum(learner.scores)
        u = units[learner.node]
        base = np.array([1000.0 * r for r, _ in u.values()])
        mine = np.where(np.array([uid == x for uid in u]), [s for _, s in u.values()], 0.0)
        pairs = [(base + mine, base), (base, base - mine)]
        for j, (form, item, est, (a, b)) in enumerate(zip(forms, items, row, pairs,
                                                            strict=True)):
            hits, ps, shown = results[form]
            sums = re.findall(r"SUM\((.*?)\)(?= -|$)", item)
            ps.append(p_exact_sums(a, b, lambda s, t: s - t, truth, ckm.magnitude, True,
                                   10 * i + j, *(scale_of(sdc_fed, learner.node,
                                                          "student_assessment", x)
                                                 for x in sums)))
            hits.append(est is not None and round(est) == truth)
            if hits[-1]:
                shown.append(f"  SELECT {item} FROM student_assessment\n"
                             f"    -> {est} (true total score {truth})")
    all_hold([lambda f=f, r=r: assert_rarely_exact(f"offset {f} on student_assessment", *r)
              for f, r in results.items()])


def test_offset_partials_at_the_node_reveal_no_grade(sdc_fed, node, pupils, uci_rows,
                                                     ckm) -> None:
    """The same offsets read from the node's own partials (crafted plans)."""
    plus, minus = OFFSETS["+1000 (issue 11)"], OFFSETS["subtracted (1000 - g3)"]
    results: dict[str, tuple[list[bool], list[float], list[str]]] = {
        n: ([], [], []) for n in ("+1000", "1000 - g3")}
    for i, p in enumerate(pupils):
        sql = (f"SELECT SUM({plus.sql_a.format(w=p.where)}), SUM(1000), "
               f"SUM({minus.sql_b.format(w=p.where)}) FROM lycee_students")
        s_plus, s_1000, s_minus = node_values(node, p.node, plan_of(sdc_fed, sql))
        rows = uci_rows[p["school"]]
        for j, (name, o, est) in enumerate((("+1000", plus, s_plus - s_1000),
                                            ("1000 - g3", minus, s_1000 - s_minus))):
            hits, ps, shown = results[name]
            a = np.array([o.a(r is p.row, r["g3"]) for r in rows], dtype=float)
            b = np.array([o.b(r is p.row, r["g3"]) for r in rows], dtype=float)
            ps.append(p_exact_sums(
                a, b, lambda x, y: x - y, p["g3"], ckm.magnitude, True, 1000 + 2 * i + j,
                scale_of(sdc_fed, p.node, "lycee_students", o.sql_a.format(w=p.where)),
                scale_of(sdc_fed, p.node, "lycee_students", o.sql_b.format(w=p.where))))
            hits.append(est == p["g3"])
            if hits[-1]:
                shown.append(f"  {p.node} <- plan of [{sql}]\n    -> partials "
                             f"{s_plus}, {s_1000}, {s_minus}: {est} (true g3 {p['g3']})")
    all_hold([lambda n=n, r=r: assert_rarely_exact(f"offset {n} in the node's partials", *r)
              for n, r in results.items()])


# == 3. Differencing exact sums =================================================================

def _without(p: Pupil, rows: list[dict[str, Any]], column: str
             ) -> tuple[np.ndarray, np.ndarray]:
    """SUM(col) over the node, and the same without the pupil (NaN: no contribution)."""
    a = np.array([r[column] for r in rows], dtype=float)
    b = np.array([np.nan if r is p.row else r[column] for r in rows], dtype=float)
    return a, b


def test_differencing_sums_and_counts_reveals_no_value(sdc_fed, pupils, uci_rows,
                                                       ckm) -> None:
    """With and without NOT (<pupil>): SUM(g3), SUM(absences), COUNT(*). The same records
    give the same values however asked: SUM(1) is COUNT(*), a CASE equals a WHERE."""
    table = ptable_for(ckm)
    whole = values(sdc_fed, "SELECT SUM(g3), SUM(absences), COUNT(*), SUM(1) "
                            "FROM lycee_students")
    assert whole[2] == whole[3], f"COUNT(*) {whole[2]} and SUM(1) {whole[3]} differ"
    names = ("SUM(g3)", "SUM(absences)", "COUNT(*)")
    results: dict[str, tuple[list[bool], list[float], list[str]]] = {
        n: ([], [], []) for n in names}
    inconsistent = []
    for i, p in enumerate(pupils):
        not_p = f"NOT ({p.where})"
        case = values(sdc_fed, f"SELECT SUM(CASE WHEN {not_p} THEN g3 END), SUM(CASE WHEN "
                               f"{not_p} THEN absences END), COUNT(CASE WHEN {not_p} THEN 1 END)"
                               " FROM lycee_students")
        rest = values(sdc_fed, "SELECT SUM(g3), SUM(absences), COUNT(*), SUM(1) FROM "
                               f"lycee_students WHERE {not_p}")
        if case != rest[:3] or rest[2] != rest[3]:
            inconsistent.append(f"  [{not_p}]: CASE {case}, WHERE {rest}")
        n = len(uci_rows[p["school"]])
        q_n = np.bincount(table[pcv(np.array([n]))[0] - 1] + 64, minlength=129) / CKEYS
        q_m = np.bincount(table[pcv(np.array([n - 1]))[0] - 1] + 64, minlength=129) / CKEYS
        g3, ab = (scale_of(sdc_fed, p.node, "lycee_students", c) for c in ("g3", "absences"))
        model = [p_exact_sums(*_without(p, uci_rows[p["school"]], "g3"), lambda x, y: x - y,
                              p["g3"], ckm.magnitude, True, 3 * i, g3, g3),
                 p_exact_sums(*_without(p, uci_rows[p["school"]], "absences"),
                              lambda x, y: x - y, p["absences"], ckm.magnitude, True,
                              3 * i + 1, ab, ab),
                 float(q_n @ q_m)]  # counts: exact iff the two independent draws agree
        for name, w, r, truth, pr in zip(names, whole[:3], case, (p["g3"], p["absences"], 1), model,
                                         strict=True):
            hits, ps, shown = results[name]
            ps.append(pr)
            hits.append(w - r == truth)
            if hits[-1]:
                shown.append(f"  {name} - {name} WHERE {not_p}\n    -> {w} - {r} (true {truth})")
    assert not inconsistent, "the same records released differently:\n" + \
        "\n".join(inconsistent[:3])
    all_hold([lambda n=n, r=r: assert_rarely_exact(f"{n} with and without the pupil", *r)
              for n, r in results.items()])


REWEIGHTED = {
    # (A, B, column, weight of the pupil's row in A, in B, integer sums): every unit stays in
    "absences doubled": ("CASE WHEN {w} THEN 2 * absences ELSE absences END", "absences",
                         "absences", 2.0, 1.0, True),
    "g3 halved": ("g3 * 1.0", "CASE WHEN {w} THEN g3 * 0.5 ELSE g3 * 1.0 END", "g3", 1.0, 0.5,
                  False),
}


def test_reweighting_one_row_reveals_no_value(sdc_fed, pupils, uci_rows, ckm) -> None:
    results: dict[str, tuple[list[bool], list[float], list[str]]] = {
        n: ([], [], []) for n in REWEIGHTED}
    for i, p in enumerate(pupils):
        items = [f"(SUM({a.format(w=p.where)}) - SUM({b.format(w=p.where)})) / {wa - wb}"
                 for a, b, _, wa, wb, _ in REWEIGHTED.values()]
        row = values(sdc_fed, f"SELECT {', '.join(items)} FROM lycee_students")
        rows = uci_rows[p["school"]]
        for j, ((name, spec), item, est) in enumerate(zip(REWEIGHTED.items(), items, row,
                                                          strict=True)):
            _, _, column, wa, wb, integer = spec
            hits, ps, shown = results[name]
            a = np.array([r[column] * (wa if r is p.row else 1.0) for r in rows], dtype=float)
            b = np.array([r[column] * (wb if r is p.row else 1.0) for r in rows], dtype=float)
            ps.append(p_exact_sums(
                a, b, lambda x, y, s=wa - wb: (x - y) / s, p[column], ckm.magnitude, integer,
                10 * i + j, *(scale_of(sdc_fed, p.node, "lycee_students", x.format(w=p.where))
                              for x in spec[:2])))
            hits.append(est is not None and round(est) == p[column])
            if hits[-1]:
                shown.append(f"  SELECT {item} FROM lycee_students\n"
                             f"    -> {est} (true {column} {p[column]})")
    all_hold([lambda n=n, r=r: assert_rarely_exact(f"one row re-weighted ({n})", *r)
              for n, r in results.items()])


def test_differencing_the_nodes_partials_reveals_no_value(sdc_fed, node, pupils, uci_rows,
                                                          ckm) -> None:
    whole = {n: node_values(node, n, plan_of(sdc_fed, "SELECT SUM(g3) FROM lycee_students"))[0]
             for n in NODE_OF_SCHOOL.values()}
    hits, ps, shown = [], [], []
    for i, p in enumerate(pupils):
        sql = f"SELECT SUM(g3) FROM lycee_students WHERE NOT ({p.where})"
        (rest,) = node_values(node, p.node, plan_of(sdc_fed, sql))
        g3 = scale_of(sdc_fed, p.node, "lycee_students", "g3")
        ps.append(p_exact_sums(*_without(p, uci_rows[p["school"]], "g3"), lambda x, y: x - y,
                               p["g3"], ckm.magnitude, True, 500 + i, g3, g3))
        hits.append(whole[p.node] - rest == p["g3"])
        if hits[-1]:
            shown.append(f"  {p.node} <- plan of [{sql}]: {whole[p.node]} - {rest} "
                         f"(true {p['g3']})")
    assert_rarely_exact("differencing the node's SUM(g3) partials", hits, ps, shown)


# The equality oracle. A consistent perturbation releases a function of the records and of
# what each adds: two queries over the same records with the same contributions give equal
# answers, two that differ give (almost always) different ones. Comparing the answer for a
# condition on one pupil with the answer without it (padded with known others, a whole age
# group, the complement cell, an amplified indicator) therefore tells whether the pupil met
# the condition, and a binary search reads a grade. No cell key method closes this while
# keeping "the same records, the same answer" (DESIGN.md); the README states it as the
# method's known limit, the queries name the pupil in their text and are on the audit log the
# board reads, and analysis that must resist it belongs in the sensitive tier (DP). These
# probes are kept, and run, as expected failures: they document what the tier does not do.
EQUALITY_ORACLE = pytest.mark.xfail(
    reason="equality oracle: inherent to consistent (cell key) perturbation; README "
           "'The method's known limit'", strict=False)


# == 4. 0 versus "suppressed", and other 1-bit oracles ==========================================
# Every t at or below the pupil's grade selects the same records, and so does every t above
# it: a deterministic release can only differ between t = g3 and t = g3 + 1. The probes ask
# at both ends of the range, a few points between, and at that step.

def _thresholds(p: Pupil) -> list[int]:
    return sorted({0, 5, 10, 15, 20, p["g3"], min(p["g3"] + 1, 20)})


def _step(p: Pupil) -> list[int]:
    return [p["g3"], p["g3"] + 1]


def _moves(fed, sqls: Sequence[str], call: Callable[[str], Any] | None = None
           ) -> tuple[str, list[Any]] | None:
    """None if every query releases the same, else (one query, two different answers)."""
    seen: dict[Any, str] = {}
    for sql in sqls:
        seen.setdefault(outcome(fed, sql) if call is None else call(sql), sql)
    if len(seen) == 1:
        return None
    return next(iter(seen.values())), list(seen)[:2]


def test_zero_and_small_release_the_same(sdc_fed, pupils) -> None:
    """COUNT(*) WHERE <pupil> AND g3 >= t is 0 or 1: both "< k", identical for every t."""
    leaks = []
    for p in pupils:
        moved = _moves(sdc_fed, [f"SELECT COUNT(*) FROM lycee_students WHERE {p.where} AND "
                                 f"g3 >= {t}" for t in _thresholds(p)])
        if moved:
            leaks.append(f"  {moved[0]}\n    -> {moved[1]}")
    assert not leaks, f"{len(leaks)} pupils' answers depend on t:\n" + "\n".join(leaks[:3])


def test_zero_and_small_release_the_same_in_other_shapes(sdc_fed, pupils) -> None:
    """Zero-filled public keys, HAVING, ORDER BY/LIMIT, an aggregate of 0/1 rows."""
    shapes = [
        "SELECT age, COUNT(*) AS n, SUM(g3) AS s FROM lycee_students WHERE {w} AND g3 >= {t} "
        "GROUP BY age",
        "SELECT sex, AVG(g1) AS m FROM lycee_students WHERE {w} AND g3 >= {t} GROUP BY sex "
        "HAVING COUNT(*) >= 0 ORDER BY m DESC, sex LIMIT 1",
        "SELECT COUNT(*), SUM(CASE WHEN {w} AND g3 >= {t} THEN 1 ELSE 0 END) FROM lycee_students",
    ]
    leaks = []
    for p in pupils[::2]:
        for shape in shapes:
            moved = _moves(sdc_fed, [shape.format(w=p.where, t=t) for t in _step(p)])
            if moved:
                leaks.append(f"  {moved[0]}\n    -> {moved[1]}")
    assert len(pupils[::2]) >= N_SIBLINGS
    assert not leaks, f"{len(leaks)} answers depend on the grade:\n" + "\n".join(leaks[:3])


@EQUALITY_ORACLE
def test_grouping_by_a_singled_out_condition_releases_the_same(sdc_fed, pupils) -> None:
    """GROUP BY CASE WHEN <pupil> AND g3 >= t THEN 'x' ELSE 'y' END: the pupil's cell is
    never named, and nothing else may move with t (the other cell is everyone else)."""
    leaks = []
    for p in pupils:
        moved = _moves(sdc_fed, [f"SELECT CASE WHEN {p.where} AND g3 >= {t} THEN 'x' ELSE 'y' "
                                 "END AS k, COUNT(*) AS n FROM lycee_students GROUP BY 1"
                                 for t in _step(p)])
        if moved:
            a, b = moved[1]
            leaks.append(f"  {moved[0]}\n    -> rows {a[2]} vs {b[2]} (t = g3 vs g3 + 1)")
    assert not leaks, (f"{len(leaks)}/{len(pupils)} pupils: the released table moves with t:\n"
                       + "\n".join(leaks[:3]))


PAD_COLUMNS = ("age", "sex", "address", "famsize", "pstatus", "medu", "fedu", "mjob", "fjob",
               "studytime", "reason", "guardian")


def _pad(rows: list[dict[str, Any]], p: Pupil, k: int) -> str:
    """A short condition that exactly k other pupils of p's school meet, and p does not:
    the first pair of columns (in a fixed order) with such a pair of values."""
    for i, c1 in enumerate(PAD_COLUMNS):
        for c2 in PAD_COLUMNS[i + 1:]:
            counts = Counter((r[c1], r[c2]) for r in rows)
            for (v1, v2), n in sorted(counts.items(), key=str):
                if n == k and (p[c1], p[c2]) != (v1, v2):
                    return f"(school = '{p['school']}' AND {c1} = {_lit(v1)} AND {c2} = {_lit(v2)})"
    raise AssertionError(f"no pair of columns pads {p.where} with {k} pupils")


def _grade_search(fed, sql: Callable[[int], str]) -> int:
    """Binary search on the grade with the equality oracle: an answer equal to the answer
    for t = 0 (the pupil is in) says g3 >= t."""
    first = outcome(fed, sql(0))
    return search(lambda t: outcome(fed, sql(t)) == first, 0, 20)


@EQUALITY_ORACLE
def test_padded_binary_search_does_not_find_the_grade(sdc_fed, pupils, uci_rows,
                                                      ckm) -> None:
    """(<pupil> AND g3 >= t) OR <exactly k−1 other pupils of the school>."""
    hits, shown = [], []
    for p in pupils:
        pad = _pad(uci_rows[p["school"]], p, ckm.threshold - 1)

        def sql(t: int, w: str = p.where, pad: str = pad) -> str:
            return f"SELECT COUNT(*) FROM lycee_students WHERE ({w} AND g3 >= {t}) OR {pad}"

        found = _grade_search(sdc_fed, sql)
        hits.append(found == p["g3"])
        if hits[-1]:
            shown.append(f"  ~6 queries like {sql(found + 1)}\n    -> g3 = {found} (true)")
    assert_few("binary search padded with k−1 other pupils", hits, shown)


def _age_pad(p: Pupil) -> str:
    return f"school = '{p['school']}' AND age = {16 if p['age'] != 16 else 17}"


@EQUALITY_ORACLE
def test_padding_with_a_whole_age_group_does_not_find_the_grade(sdc_fed, pupils) -> None:
    hits, shown = [], []
    for p in pupils[::2]:
        a, b = (outcome(sdc_fed, f"SELECT COUNT(*) FROM lycee_students WHERE ({p.where} AND "
                                 f"g3 >= {t}) OR {_age_pad(p)}") for t in _step(p))
        hits.append(a != b)  # the step is seen: a binary search finds g3
        if hits[-1]:
            shown.append(f"  ({p.where} AND g3 >= t) OR {_age_pad(p)}\n    -> {a[2]} at "
                         f"t = {p['g3']}, {b[2]} at t = {p['g3'] + 1}")
    assert_few("padding with an age group", hits, shown, minimum=N_SIBLINGS)


@EQUALITY_ORACLE
def test_amplified_indicator_does_not_find_the_grade(sdc_fed, pupils) -> None:
    """SUM(CASE WHEN <pupil> AND g3 >= t THEN 1000 ELSE 1 END): every unit contributes.
    Asked at the step (t = g3, g3 + 1): a difference there is what a binary search reads."""
    hits, shown = [], []
    for p in pupils:
        a, b = (values(sdc_fed, f"SELECT SUM(CASE WHEN {p.where} AND g3 >= {t} THEN 1000 "
                                "ELSE 1 END) FROM lycee_students")[0] for t in _step(p))
        hits.append(a != b)
        if hits[-1]:
            shown.append(f"  SELECT SUM(CASE WHEN {p.where} AND g3 >= t THEN 1000 ELSE 1 END) "
                         f"FROM lycee_students\n    -> {a} at t = {p['g3']}, {b} at t = "
                         f"{p['g3'] + 1}")
    assert_few("amplified indicator", hits, shown)


@EQUALITY_ORACLE
def test_having_on_an_amplified_indicator_does_not_find_the_grade(sdc_fed, pupils) -> None:
    """The same bit carried only by whether a row passes HAVING."""
    hits, shown = [], []
    for p in pupils[::2]:
        a, b = (outcome(sdc_fed, "SELECT sex, COUNT(*) AS n FROM lycee_students GROUP BY sex "
                                 f"HAVING SUM(CASE WHEN {p.where} AND g3 >= {t} THEN 1000 ELSE 1 "
                                 "END) > 800") for t in _step(p))
        hits.append(a != b)
        if hits[-1]:
            shown.append(f"  ... HAVING SUM(CASE WHEN {p.where} AND g3 >= t THEN 1000 ELSE 1 END)"
                         f" > 800\n    -> {a[2]} at t = {p['g3']}, {b[2]} at t = {p['g3'] + 1}")
    assert_few("HAVING on an amplified indicator", hits, shown, minimum=N_SIBLINGS)


@EQUALITY_ORACLE
def test_padded_equality_does_not_reveal_a_string(sdc_fed, pupils) -> None:
    """mjob, by comparing (<pupil> AND mjob LIKE v) OR <age group> with the age group."""
    jobs = ("at_home", "health", "other", "services", "teacher")
    hits, shown = [], []
    for p in pupils[::2]:
        base = outcome(sdc_fed, f"SELECT COUNT(*) FROM lycee_students WHERE {_age_pad(p)}")
        moved = [j for j in jobs if outcome(
            sdc_fed, f"SELECT COUNT(*) FROM lycee_students WHERE ({p.where} AND mjob LIKE "
                     f"'{j[:3]}%') OR {_age_pad(p)}") != base]
        hits.append(moved == [p["mjob"]])
        if hits[-1]:
            shown.append(f"  ({p.where} AND mjob LIKE '{p['mjob'][:3]}%') OR {_age_pad(p)}\n"
                         f"    -> differs from the age group alone: mjob = {p['mjob']} (true)")
    assert_few("padded equality on mjob", hits, shown, minimum=N_SIBLINGS)


@EQUALITY_ORACLE
def test_padded_equality_does_not_reveal_a_final_result(sdc_fed, learners) -> None:
    results = ("Distinction", "Fail", "Pass", "Withdrawn")
    hits, shown = [], []
    for learner in learners:
        x, info = learner.id, learner.info
        pad = (f"code_module = '{info['code_module']}' AND code_presentation = "
               f"'{info['code_presentation']}' AND region = '{info['region']}' "
               f"AND id_student <> {x}")
        base = outcome(sdc_fed, f"SELECT COUNT(*) FROM student_info WHERE {pad}")
        moved = [r for r in results if outcome(
            sdc_fed, f"SELECT COUNT(*) FROM student_info WHERE (id_student = {x} AND "
                     f"final_result = '{r}') OR ({pad})") != base]
        hits.append(moved == [info["final_result"]])
        if hits[-1]:
            shown.append(f"  (id_student = {x} AND final_result = '{info['final_result']}') "
                         f"OR ({pad})\n    -> differs from the pad alone: "
                         f"{info['final_result']} (true)")
    assert_few("padded equality on final_result", hits, shown)


def test_fan_out_join_and_scores_release_the_same(sdc_fed, learners) -> None:
    """A join with an open table multiplies a learner's rows; still one unit, "< k"."""
    leaks = []
    for learner in learners[::2]:
        x, top = learner.id, max(learner.scores)
        for sqls in (
            ["SELECT COUNT(*), SUM(a.weight) FROM student_info s JOIN assessments a ON "
             "s.code_module = a.code_module AND s.code_presentation = a.code_presentation "
             f"WHERE s.id_student = {x} AND s.final_result = '{r}'"
             for r in ("Distinction", "Fail", "Pass", "Withdrawn")],
            [f"SELECT COUNT(*), SUM(score) FROM student_assessment WHERE id_student = {x} "
             f"AND score >= {t}" for t in (top, top + 1)],
        ):
            moved = _moves(sdc_fed, sqls)
            if moved:
                leaks.append(f"  {moved[0]}\n    -> {moved[1]}")
    assert len(learners[::2]) >= N_SIBLINGS
    assert not leaks, f"{len(leaks)} learners' answers move:\n" + "\n".join(leaks[:3])


def test_a_singled_out_key_value_is_never_named(sdc_fed, pupils) -> None:
    leaks = []
    for p in pupils[::2]:
        for sql in (
            f"SELECT bucket(CASE WHEN {p.where} THEN g3 ELSE -100 END, 1) AS b, COUNT(*) "
            "FROM lycee_students GROUP BY 1",
            f"SELECT CASE WHEN {p.where} THEN mjob ELSE 'nobody' END AS j, COUNT(*) "
            "FROM lycee_students GROUP BY 1",
        ):
            keys = {row[0] for row in sdc_fed.run(sql)["rows"]}
            if keys - {-100, -100.0, "nobody"}:
                leaks.append(f"  {sql} -> keys {keys}")
    assert not leaks, "\n".join(leaks[:3])


@EQUALITY_ORACLE
def test_node_releases_the_same_partial_for_zero_and_small(sdc_fed, node, pupils) -> None:
    leaks = []
    for p in pupils[::2]:
        for shape in ("SELECT COUNT(*), SUM(absences) FROM lycee_students WHERE {w} AND g3 >= {t}",
                      "SELECT CASE WHEN {w} AND g3 >= {t} THEN 'x' ELSE 'y' END AS k, COUNT(*) "
                      "FROM lycee_students GROUP BY 1"):
            moved = _moves(sdc_fed, [shape.format(w=p.where, t=t) for t in _step(p)],
                           lambda sql, n=p.node: node(n, plan_of(sdc_fed, sql)))
            if moved:
                leaks.append(f"  {p.node} <- plan of [{moved[0]}]\n    -> {moved[1]}")
    assert not leaks, (f"{len(leaks)} node partials move with the pupil's grade:\n"
                       + "\n".join(leaks[:3]))


# == 5. No averaging by rewriting or repeating ==================================================

def test_five_formulations_of_a_cell_release_one_value(sdc_fed, pupils) -> None:
    """The cell (school, sex, age) of each pupil, asked in several ways."""
    bad = []
    for p in pupils:
        s, x, a = p["school"], p["sex"], p["age"]
        c = f"school = '{s}' AND sex = '{x}' AND age = {a}"
        where = values(sdc_fed, f"SELECT COUNT(*), SUM(1), COUNT(g3), SUM(g3), SUM(g3 + 0), "
                                f"AVG(g3) FROM lycee_students WHERE {c}")
        case = values(sdc_fed, f"SELECT COUNT(CASE WHEN {c} THEN 1 END), "
                               f"SUM(CASE WHEN {c} THEN 1 ELSE 0 END), "
                               f"SUM(CASE WHEN {c} THEN g3 END), "
                               f"AVG(CASE WHEN {c} THEN g3 END) FROM lycee_students")
        # (not SUM(CASE WHEN c THEN g3 ELSE 0 END): a 0 is a value, so its records are every
        # pupil — as AVG would count them — and a pupil who adds 0 is not invisible)
        rewritten = values(sdc_fed, "SELECT COUNT(*), SUM(g3) FROM lycee_students WHERE "
                                    f"age BETWEEN {a} AND {a} AND NOT (NOT (sex IN ('{x}'))) "
                                    f"AND '{s}' = school")
        grouped = sdc_fed.run(f"SELECT sex, COUNT(*), SUM(g3), AVG(g3) FROM lycee_students "
                              f"WHERE school = '{s}' AND age = {a} GROUP BY sex")
        (row,) = [r[1:] for r in grouped["rows"] if r[0] == x]
        counts = [where[0], where[1], where[2], case[0], case[1], rewritten[0], row[0]]
        sums = [where[3], where[4], case[2], rewritten[1], row[1]]
        means = [where[5], case[3], row[2]]
        for what, vs in (("count", counts), ("sum", sums), ("mean", means)):
            if len(set(vs)) != 1:
                bad.append(f"  {what} of [{c}]: {vs}")
    assert not bad, f"{len(bad)} cells released differently when rewritten:\n" + "\n".join(bad[:5])


def test_repeated_queries_release_identical_answers(sdc_fed, node, pupils) -> None:
    bad = []
    for p in pupils:
        sql = (f"SELECT SUM(CASE WHEN {p.where} THEN g3 + 1000 ELSE 1000 END), COUNT(*), "
               f"AVG(absences) FROM lycee_students WHERE school = '{p['school']}'")
        plan = plan_of(sdc_fed, sql)
        coordinator = {outcome(sdc_fed, sql) for _ in range(2)}
        at_node = {node(p.node, plan) for _ in range(2)}
        if len(coordinator) != 1 or len(at_node) != 1:
            bad.append(f"  {sql}: {coordinator}, {at_node}")
    assert not bad, "\n".join(bad[:5])


def test_formulations_give_one_partial_at_the_node(sdc_fed, node, pupils) -> None:
    bad = []
    for p in pupils:
        c = f"school = '{p['school']}' AND sex = '{p['sex']}' AND age = {p['age']}"
        got = [*node_values(node, p.node, plan_of(
                   sdc_fed, f"SELECT COUNT(*), SUM(1), COUNT(g2) FROM lycee_students "
                            f"WHERE NOT (NOT ({c}))")),
               *node_values(node, p.node, plan_of(
                   sdc_fed, f"SELECT COUNT(CASE WHEN {c} THEN 1 END), SUM(CASE WHEN {c} THEN "
                            "1 ELSE 0 END) FROM lycee_students"))]
        if len(set(got)) != 1:
            bad.append(f"  [{c}] at {p.node}: {got}")
    assert not bad, "\n".join(bad[:5])


# == 6. Error oracles ===========================================================================
# Each probe fails in plain DuckDB for the pupil's row only ({c}: the condition, {x}: the
# failing value). With total evaluation its outcome is that of the same query with NULL for
# the failing value (the same records, so the same released values), and of the same kind
# (answer, or one failure with one message naming no node) as with a condition nobody meets.
# Probes of one kind are asked together (OR-ed conditions, or several aggregates); a batch
# whose outcome depends on the pupil is then asked probe by probe to name the culprit.

WHERE_PROBES = {  # conditions true for every other row
    "modulo by zero": ("1 % (CASE WHEN {c} THEN {x} ELSE 1 END) = 0", "0"),
    "modulo by a column": ("g3 % (CASE WHEN {c} THEN {x} ELSE 100 END) >= 0", "g3 - g3"),
    "string cast to INTEGER": ("CAST(CASE WHEN {c} THEN {x} ELSE '1' END AS INTEGER) = 1",
                               "'x'"),
    "string cast to DATE": ("CAST(CASE WHEN {c} THEN {x} ELSE '2020-01-01' END AS DATE) > "
                            "CAST('2000-01-01' AS DATE)", "'2020-13-45'"),
    "string cast to BOOLEAN": ("CAST(CASE WHEN {c} THEN {x} ELSE 'true' END AS BOOLEAN)",
                               "'maybe'"),
    "string as a condition": ("CASE WHEN {c} THEN {x} ELSE 'true' END", "'maybe'"),
    "string compared with a number": ("CASE WHEN {c} THEN {x} ELSE '1' END = 1", "'x'"),
    "string in a numeric IN list": ("CASE WHEN {c} THEN {x} ELSE '1' END IN (1, 2)", "'x'"),
    "TRY_CAST": ("TRY_CAST(CASE WHEN {c} THEN {x} ELSE '1' END AS INTEGER) = 1", "'x'"),
    "BIGINT overflow in *": ("(g3 + 2) * (CASE WHEN {c} THEN {x} ELSE 1 END) >= 0",
                             "9223372036854775807"),
    "BIGINT overflow in +": ("(g3 + 1) + (CASE WHEN {c} THEN {x} ELSE 0 END) >= 0",
                             "9223372036854775807"),
    "BIGINT overflow in abs": ("abs(CASE WHEN {c} THEN {x} ELSE 1 END) > 0",
                               "-9223372036854775807 - 1"),
    # (DuckDB folds TRY(-x > 0) into a comparison that never negates: test IS NOT NULL)
    "BIGINT overflow in unary minus": ("-(CASE WHEN {c} THEN {x} ELSE -1 END) IS NOT NULL",
                                       "g3 - 9223372036854775807 - 1 - g3"),
    "1e300 cast to BIGINT": ("CAST(CASE WHEN {c} THEN {x} ELSE 1 END AS BIGINT) > 0", "1e300"),
    "round overflow": ("round(CASE WHEN {c} THEN {x} ELSE 1 END, -19) >= 0",
                       "9223372036854775807"),
    "substr offset beyond 2^32": ("substr(mjob, CASE WHEN {c} THEN {x} ELSE 1 END) <> 'zz'",
                                  "5000000000"),
    "DATE overflow": ("CAST('2020-01-01' AS DATE) + (CASE WHEN {c} THEN {x} ELSE 1 END) > "
                      "CAST('2000-01-01' AS DATE)", "2147483647"),
}
AGGREGATE_PROBES = {
    "SUM argument beyond 2^53": ("SUM(CASE WHEN {c} THEN {x} ELSE 1 END)", "9007199254740993"),
    "SUM argument at the BIGINT limit": ("SUM(CASE WHEN {c} THEN {x} ELSE 1 END)",
                                         "9223372036854775807"),
    "AVG argument at the BIGINT limit": ("AVG(CASE WHEN {c} THEN {x} ELSE 1 END)",
                                         "9223372036854775807"),
}
KIND_PROBES = {  # not failures in DuckDB (IEEE, or a square under TRY): same kind of outcome
    "x·x overflow in STDDEV": ("STDDEV(CASE WHEN {c} THEN {x} ELSE 1 END)", "3037000500"),
    "merged product overflow": ("SUM(CASE WHEN {c} THEN {x} ELSE 1 END) * "
                                "SUM(CASE WHEN {c} THEN {x} ELSE 1 END)", "4000000000"),
    "division by zero": ("COUNT(CASE WHEN 1 / (CASE WHEN {c} THEN {x} ELSE 1 END) > 0 THEN 1 "
                         "END)", "0"),
    "power overflow": ("COUNT(CASE WHEN power(10, CASE WHEN {c} THEN {x} ELSE 1 END) > 0 "
                       "THEN 1 END)", "400"),
}


def _where_sql(probes: dict[str, tuple[str, str]], c: str, null: bool = False) -> str:
    conds = " OR ".join(f"({e.format(c=c, x='NULL' if null else x)})"
                        for e, x in probes.values())
    return f"SELECT COUNT(*) FROM lycee_students WHERE {conds}"


def _aggregate_sql(probes: dict[str, tuple[str, str]], c: str, null: bool = False) -> str:
    items = ", ".join(e.format(c=c, x="NULL" if null else x) for e, x in probes.values())
    return f"SELECT {items} FROM lycee_students"


# AGGREGATE_PROBES: no value fails any more (every argument is clamped to its static bound
# and released as a double beyond 2^53): one kind of outcome. Their values are amplified
# indicators, an equality oracle (see EQUALITY_ORACLE).
BATCHES = [(WHERE_PROBES, _where_sql, True), (AGGREGATE_PROBES, _aggregate_sql, False),
           (KIND_PROBES, _aggregate_sql, False)]


def _names_a_node(got: tuple[Any, ...]) -> bool:
    return got[0] == "error" and bool(NODE_NAME.search(" ".join(str(v) for v in got[1:])))


def _differs(got: tuple[Any, ...], nobody: tuple[Any, ...], ref: tuple[Any, ...] | None
             ) -> str:
    if _names_a_node(got):
        return f"the failure names a node: {got}"
    if got[0] != nobody[0] or (got[0] == "error" and got != nobody):
        return f"{got[:3]}, but with nobody {nobody[:3]}"
    if ref is not None and got != ref:
        return f"{got[:3]}, but with NULL for the failing value {ref[:3]}"
    return ""


def _error_oracles(ask: Callable[[Pupil, str], tuple[Any, ...]],
                   pupils: list[Pupil]) -> list[str]:
    """ask(pupil, sql) -> the outcome of sql where the pupil's data is (its node, or the
    coordinator). Returns the problems found, per probe."""
    cache: dict[tuple[str, str], tuple[Any, ...]] = {}

    def with_nobody(p: Pupil, sql: str) -> tuple[Any, ...]:
        if (p.node, sql) not in cache:
            cache[p.node, sql] = ask(p, sql)
        return cache[p.node, sql]

    problems: dict[str, list[str]] = {}
    for probes, make, total in BATCHES:
        pinned = 0
        for p in pupils:
            sql = make(probes, p.where)
            ref = ask(p, make(probes, p.where, True)) if total else None
            why = _differs(ask(p, sql), with_nobody(p, make(probes, NOBODY)), ref)
            if not why:
                continue
            if pinned >= 2:  # name the culprits for two pupils, count the others
                problems.setdefault("(a batch, probe not named)", []).append(
                    f"{sql[:100]}…: {why}")
                continue
            pinned += 1
            for name, probe in probes.items():
                one = {name: probe}
                ref = ask(p, make(one, p.where, True)) if total else None
                why = _differs(ask(p, make(one, p.where)), with_nobody(p, make(one, NOBODY)),
                               ref)
                if why:
                    problems.setdefault(name, []).append(f"{make(one, p.where)}\n      -> {why}")
    return [f"  {name} ({len(found)}×): {found[0]}" for name, found in problems.items()]


def test_error_probes_give_one_outcome_through_the_coordinator(sdc_fed, pupils) -> None:
    problems = _error_oracles(lambda p, sql: outcome(sdc_fed, sql), pupils)
    assert not problems, "outcomes that depend on the pupil:\n" + "\n".join(problems)


def test_error_probes_give_one_outcome_at_the_node(sdc_fed, node, pupils) -> None:
    """The same probes as crafted plans, sent to the node that holds the pupil."""
    problems = _error_oracles(lambda p, sql: node(p.node, plan_of(sdc_fed, sql)), pupils)
    assert not problems, "node outcomes that depend on the pupil:\n" + "\n".join(problems)


def test_error_probe_on_an_indicator_does_not_find_the_grade(sdc_fed, pupils) -> None:
    """A failure that depends on the data, if any is left, used as a 1-bit oracle on g3."""
    hits, shown = [], []
    for p in pupils[::2]:
        a, b = (outcome(sdc_fed, f"SELECT SUM(CASE WHEN {p.where} AND g3 >= {t} THEN "
                                 "9007199254740993 ELSE 1 END) FROM lycee_students")[0]
                for t in _step(p))
        hits.append(a != b)
        if hits[-1]:
            shown.append(f"  SELECT SUM(CASE WHEN {p.where} AND g3 >= t THEN 9007199254740993 "
                         f"ELSE 1 END) FROM lycee_students\n    -> {a} at t = {p['g3']}, {b} "
                         f"at t = {p['g3'] + 1}")
    assert_few("answer-or-failure of a SUM argument beyond 2^53", hits, shown,
               minimum=N_SIBLINGS)
