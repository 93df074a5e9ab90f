"""The restricted tier's cell key method: the ptable and draws of ``privacy/_ckm.py``, the
release of ``nodes/_restricted.py`` in real DuckDB, a differential test against ONS's own
implementation (PyPI ``cell-key-perturbation``), and the released values end to end.

Every tolerance is computed from the declared parameters (maximum perturbation D,
variance V, magnitude μ, |v| ∈ [0.5, 1.5]) and the number of draws: a statistic is
accepted within Z standard errors of its expectation, Z = 4 (a two-sided 6·10⁻⁵ chance
for a correct implementation, on fixed seeds: deterministic here). Where a node's secret
is made by the node (the federation fixtures), an assertion that depends on it is one that
fails with a probability far below that.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from cell_key_perturbation.create_perturbed_table import create_perturbed_table
from cell_key_perturbation.utils.generate_test_ptable import generate_ptable_10_5_rule

from federation.proto import bulle_pb2 as pb
from nodes._restricted import (
    RECORD_KEY,
    RestrictedAgg,
    RestrictedRelease,
    add_record_keys,
    release_restricted,
    restricted_sql,
)
from privacy import (
    CkmParams,
    PtableError,
    count_perturbation,
    generate_ptable,
    load_ptable,
    magnitude_draw,
)
from privacy._ckm import CKEYS, MAGNITUDE_VARIANCE, PCV_MAX, pcv
from tests._federation import Federation, start_federation

Z = 4.0
ONE_KEY = 1 / CKEYS  # the step of a 256-key table's probabilities
# the declared law of magnitude draws: |v| uniform on [0.5, 1.5], symmetric; its moments
# E[v²] = ∫ x² dx = 13/12 and E[v⁴] = ∫ x⁴ dx over the interval (its length is 1)
V_MAG = (1.5**3 - 0.5**3) / 3
MAGNITUDE_M4 = (1.5**5 - 0.5**5) / 5
# (D, V) over the range a node accepts: 1 ≤ D ≤ 50, 0 < V ≤ D²
GRID = [(d, v) for d in (1, 2, 3, 4, 5, 6, 8, 10, 20)
        for v in sorted({round(d * d * f, 3) for f in (0.02, 0.1, 0.25, 0.5, 0.75, 1.0)})]


def _seeded_secret(state_dir: Path, seed: str) -> None:
    """A fixed node secret (the file ``record_key_secret`` keeps): reproducible record keys."""
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / "record_keys.secret").write_text(
        hashlib.sha256(seed.encode()).hexdigest() + "\n", encoding="ascii")


def _write_ons_csv(path: Path, table: np.ndarray) -> Path:
    """A ptable in ONS's CSV layout: pcv, ckey, pvalue."""
    pd.DataFrame({"pcv": np.repeat(np.arange(1, PCV_MAX + 1), CKEYS),
                  "ckey": np.tile(np.arange(CKEYS), PCV_MAX),
                  "pvalue": table.ravel()}).to_csv(path, index=False)
    return path


PTABLES = {
    "generated D=4 V=3": lambda: generate_ptable(4, 3.0),
    "generated D=3 V=1.5": lambda: generate_ptable(3, 1.5),
    "ONS 10-5 rule": None,  # generate_ptable_10_5_rule(): threshold 10, rounding to 5
}


@pytest.fixture(scope="module")
def ptables(tmp_path_factory: pytest.TempPathFactory
            ) -> dict[str, tuple[Path, np.ndarray, pd.DataFrame]]:
    """Each table written once in ONS's layout: (file, load_ptable's, pandas' for ONS)."""
    where = tmp_path_factory.mktemp("ptables")
    out = {}
    for i, (name, make) in enumerate(PTABLES.items()):
        path = where / f"p{i}.csv"
        if make is None:
            generate_ptable_10_5_rule().to_csv(path, index=False)
        else:
            _write_ons_csv(path, make())
        out[name] = (path, load_ptable(path), pd.read_csv(path))
    return out


# -- the perturbation table ----------------------------------------------------------------

@pytest.mark.parametrize(("d", "v"), GRID)
def test_generated_ptable_rows_are_unbiased_with_the_declared_variance(d: int, v: float) -> None:
    table = generate_ptable(d, v)
    assert table.shape == (PCV_MAX, CKEYS)
    counts = np.arange(1, PCV_MAX + 1)
    # mean exactly 0 on every row: the sum of its 256 integer draws is 0
    assert (table.astype(np.int64).sum(axis=1) == 0).all()
    # from pcv = D on, every row has the full support [−D, D]: variance as declared, to
    # within 1/256 (moving two of the 256 keys apart or together, the mean kept, changes
    # the variance by 2/256: a table can always be brought within half that step)
    steady = table[d - 1:].astype(np.float64)
    worst = np.abs(steady.var(axis=1) - v).max()
    assert worst <= ONE_KEY + 1e-12, (d, v, worst)
    # smaller counts (support [−n, D]) are no noisier than declared
    assert table.astype(np.float64).var(axis=1).max() <= v + ONE_KEY + 1e-12
    # never below 0, never beyond D
    assert (counts[:, None] + table >= 0).all()
    assert np.abs(table).max() <= d


def test_small_counts_keep_their_support_and_large_ones_share_a_row() -> None:
    d, v = 4, 3.0
    table = generate_ptable(d, v)
    for n in range(1, d + 1):  # the smallest perturbation of n is −n: a cell may show 0
        assert table[n - 1].min() >= -n
    # rows from D on are one law (the perturbation does not depend on the size of the cell)
    assert (table[d - 1:] == table[d - 1]).all()


@pytest.mark.parametrize(("d", "v"), [(0, 1.0), (51, 4.0), (4, 0.0), (4, 16.5), (2, -1.0)])
def test_generate_ptable_refuses_impossible_parameters(d: int, v: float) -> None:
    with pytest.raises(PtableError):
        generate_ptable(d, v)


def test_pcv_wraps_like_ons() -> None:
    n = np.arange(0, 5000)
    ons = np.where(n <= 750, n, (n - 1) % 250 + 501)  # create_perturbed_table, step 3
    assert (pcv(n) == ons).all()
    assert pcv(np.array([750, 751, 1000, 1001])).tolist() == [750, 501, 750, 501]


def test_count_perturbation_is_the_table_entry_and_never_negative() -> None:
    table = generate_ptable(4, 3.0)
    rng = np.random.default_rng(11)
    count = rng.integers(0, 5000, 200_000)
    key = rng.integers(0, 1 << 32, 200_000)
    p = count_perturbation(table, count, key)
    rows = pcv(np.maximum(count, 1)) - 1
    assert (p == np.where(count > 0, table[rows, key % CKEYS], 0)).all()
    assert (count + p >= 0).all() and np.abs(p).max() <= 4
    assert (p[count == 0] == 0).all()  # an empty cell is not perturbed


# -- load_ptable -----------------------------------------------------------------------------

def test_load_ptable_round_trips_a_generated_table(
        ptables: dict[str, tuple[Path, np.ndarray, pd.DataFrame]], tmp_path: Path) -> None:
    path, loaded, _ = ptables["generated D=4 V=3"]
    table = generate_ptable(4, 3.0)
    assert loaded.dtype.kind == "i" and np.array_equal(loaded, table)
    # row order and column order do not matter, nor extra columns
    frame = pd.read_csv(path).sample(frac=1.0, random_state=3)
    frame.insert(1, "note", "x")
    frame[["pvalue", "note", "ckey", "pcv"]].to_csv(tmp_path / "q.csv", index=False)
    assert np.array_equal(load_ptable(tmp_path / "q.csv"), table)


def test_load_ptable_reads_ons_own_table(
        ptables: dict[str, tuple[Path, np.ndarray, pd.DataFrame]]) -> None:
    _, table, ons = ptables["ONS 10-5 rule"]
    assert (table[ons.pcv - 1, ons.ckey] == ons.pvalue).all()
    assert (table[:9] == -np.arange(1, 10)[:, None]).all()  # below 10: shown as 0


@pytest.mark.parametrize(("case", "expected"), [
    ("missing column", "pcv,ckey,pvalue layout"),
    ("not a number", "pcv,ckey,pvalue layout"),
    ("pcv out of range", "out of range"),
    ("ckey out of range", "out of range"),
    ("below zero", "out of range"),
    ("incomplete", "needs all 256 cell keys"),
    ("missing file", "pcv,ckey,pvalue layout"),
])
def test_load_ptable_rejects_malformed_files(
        ptables: dict[str, tuple[Path, np.ndarray, pd.DataFrame]], tmp_path: Path, case: str,
        expected: str) -> None:
    good = ptables["generated D=4 V=3"][0].read_text(encoding="utf-8").splitlines()
    header, rows = good[0], good[1:]
    bad = {"not a number": "5,17,two", "pcv out of range": "751,0,0",
           "ckey out of range": "10,256,0", "below zero": "2,7,-3"}  # a count of 2 to −1
    if case == "missing column":
        header = "pcv,ckey,value"
    elif case in bad:  # first, so that it is read whatever the reader does after
        rows.insert(0, bad[case])
    elif case == "incomplete":
        rows = rows[:-1]
    path = tmp_path / "bad.csv"
    if case != "missing file":
        path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    with pytest.raises(PtableError) as err:
        load_ptable(path)
    assert str(path) in str(err.value) and expected in str(err.value), str(err.value)


# -- magnitude draws -----------------------------------------------------------------------

def test_magnitude_draw_has_the_declared_law() -> None:
    n = 400_000
    rng = np.random.default_rng(7)
    v = magnitude_draw(rng.integers(0, 1 << 32, n), rng.integers(0, 1 << 32, n))
    a = np.abs(v)
    assert a.min() >= 0.5 and a.max() <= 1.5  # p% protection of the top unit by construction
    assert abs(v.mean()) <= Z * math.sqrt(V_MAG / n)
    assert math.isclose(MAGNITUDE_VARIANCE, V_MAG)
    var_se = math.sqrt((MAGNITUDE_M4 - V_MAG**2) / n)
    assert abs(v.var() - V_MAG) <= Z * var_se
    assert abs((v > 0).mean() - 0.5) <= Z * math.sqrt(0.25 / n)  # symmetric
    # |v| uniform on [0.5, 1.5]: each tenth of the interval holds a tenth of the draws
    bins = np.histogram(a, bins=10, range=(0.5, 1.5))[0] / n
    assert np.abs(bins - 0.1).max() <= Z * math.sqrt(0.09 / n)


@pytest.mark.parametrize("which", ["cell key", "record key", "both"])
def test_magnitude_draws_for_neighbouring_keys_are_uncorrelated(which: str) -> None:
    n = 200_000
    rng = np.random.default_rng(13)
    key = rng.integers(0, (1 << 32) - 1, n)
    top = rng.integers(0, (1 << 32) - 1, n)
    v = magnitude_draw(key, top)
    if which == "cell key":  # a cell with one more unit whose record key is small
        w = magnitude_draw(key + 1, top)
    elif which == "record key":
        w = magnitude_draw(key, top + 1)
    else:
        w = magnitude_draw(key + 1, top + 1)
    assert abs(np.corrcoef(v, w)[0, 1]) <= Z / math.sqrt(n)
    assert abs(np.corrcoef(np.abs(v), np.abs(w))[0, 1]) <= Z / math.sqrt(n)
    assert abs((np.sign(v) == np.sign(w)).mean() - 0.5) <= Z * math.sqrt(0.25 / n)
    # and along a run of consecutive cell keys (lag 1)
    run = magnitude_draw(np.arange(n), np.full(n, 12345))
    assert abs(np.corrcoef(run[:-1], run[1:])[0, 1]) <= Z / math.sqrt(n)


# -- differential test against ONS's implementation ----------------------------------------

def _microdata(seed: int, n: int) -> pd.DataFrame:
    """One row per person; skewed variables so that cells run from empty to above 750."""
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({
        "unit": [f"p{i:06d}" for i in range(n)],
        "region": rng.choice(["R1", "R2", "R3"], n, p=[0.5, 0.3, 0.2]),
        "a": rng.choice(["x", "y", "z"], n, p=[0.8, 0.15, 0.05]),
        "b": rng.choice(["p", "q", "r", "s"], n, p=[0.7, 0.2, 0.08, 0.02]),
        "c": rng.choice(list(range(6)), n, p=[0.4, 0.3, 0.15, 0.1, 0.04, 0.01]),
        "rk": rng.integers(0, CKEYS, n),  # ONS's own record keys: 0–255
    })
    # an empty combination, so that the public domains make a cell of 0
    return df[~((df.region == "R3") & (df.a == "z") & (df.b == "s"))].reset_index(drop=True)


@pytest.fixture(scope="module")
def ons_data(tmp_path_factory: pytest.TempPathFactory
             ) -> tuple[duckdb.DuckDBPyConnection, pd.DataFrame]:
    df = _microdata(2023, 40_000)
    con = duckdb.connect(config={"threads": 1})
    con.register("df_view", df)
    con.execute("CREATE TABLE t AS SELECT * FROM df_view")
    con.unregister("df_view")
    state = tmp_path_factory.mktemp("ons-node")
    _seeded_secret(state, "differential")
    add_record_keys(con, "t", "unit", state)  # the node's own 32-bit record keys
    keys = dict(con.execute(f"SELECT unit, {RECORD_KEY} FROM t").fetchall())
    df["node_rk"] = df["unit"].map(keys).astype(np.int64)
    return con, df


@pytest.mark.parametrize("ptable_name", list(PTABLES))
@pytest.mark.parametrize("record_key", ["node_rk", "rk"])
def test_counts_match_ons_create_perturbed_table(
        ons_data: tuple[duckdb.DuckDBPyConnection, pd.DataFrame],
        ptables: dict[str, tuple[Path, np.ndarray, pd.DataFrame]], ptable_name: str,
        record_key: str) -> None:
    """Same microdata, same record keys (the node's 32-bit ones, or ONS's 0–255), same
    ptable file: Bulle's cells (DuckDB) and release give ONS's table, threshold included."""
    con, df = ons_data
    _, ours, theirs = ptables[ptable_name]
    geog, tab = ["region"], ["a", "b", "c"]
    names = geog + tab
    domains = tuple(tuple(sorted(df[c].unique().tolist())) for c in names)
    aggs = [RestrictedAgg("n", pb.COUNT_ROWS, None)]
    rk_sql = RECORD_KEY if record_key == "node_rk" else f'"{record_key}"'
    cells = {}
    for per_unit in (False, True):  # both compiled forms of the plan
        sql = restricted_sql(" FROM t", [(c, f'"{c}"') for c in names], '"unit"', rk_sql,
                             aggs, per_unit)
        cells[per_unit] = con.sql(sql).to_arrow_table()
    for threshold in (0, 10, 25):
        ons = create_perturbed_table(df, theirs, geog, tab, record_key, threshold=threshold)
        expected = {tuple(r[:4]): r[4:] for r in ons[[*names, "pre_sdc_count", "ckey",
                                                      "pvalue", "count"]].itertuples(index=False)}
        assert len(expected) == math.prod(len(d) for d in domains)  # ONS zero-fills too
        assert any(v[0] > 750 for v in expected.values())  # the pcv wrap is exercised
        assert any(v[0] == 0 for v in expected.values())
        assert any(0 < v[0] < 30 for v in expected.values())
        for per_unit, table in cells.items():
            # DuckDB's cell key mod 256 is ONS's cell key; the ptable entry is ONS's pvalue
            for r in table.to_pylist():
                n, ckey, pvalue, _ = expected[tuple(r[c] for c in names)]
                assert (r["__n"], int(r["__k"]) % CKEYS) == (n, ckey), r
                assert count_perturbation(ours, r["__n"], int(r["__k"])) == pvalue, r
            release = RestrictedRelease(tuple(names), domains, (("n", pb.COUNT_ROWS),),
                                        CkmParams(threshold=threshold), perturb=True)
            out, below = release_restricted(table, release, ours)
            released = {tuple(r[c] for c in names): (r["n"], r["__suppressed"])
                        for r in out.to_pylist()}
            assert released.keys() == expected.keys()
            for key, (n, _, _, count) in expected.items():
                value = None if pd.isna(count) else int(count)
                assert released[key] == (value, value is None), (key, n, threshold, per_unit)
            assert below == sum(pd.isna(v[3]) for v in expected.values())


# -- the release in DuckDB, without servers -------------------------------------------------

D, V, MU, K = 4, 3.0, 0.5, 10
PARAMS = CkmParams(threshold=K, max_perturbation=D, variance=V, magnitude=MU)


@pytest.fixture(scope="module")
def groups(tmp_path_factory: pytest.TempPathFactory) -> duckdb.DuckDBPyConnection:
    """M groups of 15–60 people (one row each), values x ∈ [1, 100], a seeded node secret."""
    rng = np.random.default_rng(99)
    m = 5000
    sizes = rng.integers(15, 61, m)
    g = np.repeat(np.arange(m), sizes)
    j = np.concatenate([np.arange(s) for s in sizes])
    con = duckdb.connect(config={"threads": 1})
    con.register("rows_view", pa.table({
        "unit": [f"u{a}_{b}" for a, b in zip(g, j, strict=True)], "g": g, "j": j,
        "x": rng.uniform(1, 100, len(g)), "xi": rng.integers(0, 50, len(g))}))
    con.execute("CREATE TABLE t AS SELECT * FROM rows_view")
    con.unregister("rows_view")
    state = tmp_path_factory.mktemp("groups-node")
    _seeded_secret(state, "groups")
    add_record_keys(con, "t", "unit", state)
    return con


def _release(con: duckdb.DuckDBPyConnection, aggs: list[RestrictedAgg], *, where: str = "",
             keys: tuple[str, ...] = ("g",), domains: tuple[Any, ...] | None = None,
             params: CkmParams = PARAMS, per_unit: bool = False, table: str = "t"
             ) -> tuple[pa.Table, int]:
    source = f" FROM {table}" + (f" WHERE {where}" if where else "")
    sql = restricted_sql(source, [(k, f'"{k}"') for k in keys], '"unit"', RECORD_KEY,
                         aggs, per_unit)
    release = RestrictedRelease(keys, domains or (None,) * len(keys),
                                tuple((a.name, a.kind) for a in aggs), params, perturb=True,
                                noise=tuple((a.scale, a.count_like) for a in aggs))
    ptable = generate_ptable(params.max_perturbation, params.variance)
    return release_restricted(con.sql(sql).to_arrow_table(), release, ptable)


def _by_key(out: pa.Table, column: str) -> dict[object, object]:
    return dict(zip(out.column("g").to_pylist(), out.column(column).to_pylist(), strict=True))


def _truth(con: duckdb.DuckDBPyConnection, expr: str, where: str = "") -> dict[object, object]:
    w = f" WHERE {where}" if where else ""
    return dict(con.execute(f"SELECT g, {expr} FROM t{w} GROUP BY g").fetchall())


def test_counts_are_unbiased_with_the_declared_variance_over_many_cells(
        groups: duckdb.DuckDBPyConnection) -> None:
    aggs = [RestrictedAgg("n", pb.COUNT_ROWS, None)]
    out, below = _release(groups, aggs)
    # one row per unit: the per-unit step is the identity, and gives the same release
    assert out.equals(_release(groups, aggs, per_unit=True)[0])
    truth = _truth(groups, "count(*)")
    released = _by_key(out, "n")
    assert below == 0 and released.keys() == truth.keys()  # every cell has ≥ 15 − 4 units
    err = np.array([released[g] - truth[g] for g in truth], dtype=float)
    m = len(err)
    assert abs(err.mean()) <= Z * math.sqrt(V / m)
    # Var(err²) = μ₄ − V² ≤ D²·V − V² (|err| ≤ D)
    assert abs(err.var() - V) <= Z * math.sqrt((D * D * V - V * V) / m) + ONE_KEY
    assert np.abs(err).max() <= D
    assert (err != 0).mean() > 0.5  # perturbed, not released exactly


def test_cells_differing_by_one_unit_get_independent_perturbations(
        groups: duckdb.DuckDBPyConnection) -> None:
    aggs = [RestrictedAgg("n", pb.COUNT_ROWS, None)]
    a = _by_key(_release(groups, aggs)[0], "n")
    b = _by_key(_release(groups, aggs, where="j <> 0")[0], "n")  # one person fewer
    truth = _truth(groups, "count(*)")
    assert a.keys() == b.keys() == truth.keys()
    ea = np.array([a[g] - truth[g] for g in truth], dtype=float)
    eb = np.array([b[g] - (truth[g] - 1) for g in truth], dtype=float)
    d = ea - eb  # released difference minus the true difference (1)
    m = len(d)
    # independent draws of one law: the difference has variance 2V, and
    # Var(d²) = 2μ₄ + 2V² ≤ 2D²V + 2V²
    assert abs(d.mean()) <= Z * math.sqrt(2 * V / m)
    assert abs(d.var() - 2 * V) <= Z * math.sqrt((2 * D * D * V + 2 * V * V) / m) + 2 * ONE_KEY
    assert abs(np.corrcoef(ea, eb)[0, 1]) <= Z / math.sqrt(m)
    # the difference is the true one only as often as two independent draws agree
    law = np.unique(generate_ptable(D, V)[D - 1], return_counts=True)[1] / CKEYS
    q = float((law**2).sum())
    assert abs((d == 0).mean() - q) <= Z * math.sqrt(q * (1 - q) / m)
    assert q < 0.5


def _sum(name: str, arg: str, scale: float) -> RestrictedAgg:
    return RestrictedAgg(name, pb.SUM, arg, scale, count_like=False)


@pytest.mark.parametrize(("arg", "scale"), [("x", 128), ("x + 1000", 1128), ("-x", 128)])
def test_magnitudes_are_perturbed_by_the_static_bound_of_one_unit(
        groups: duckdb.DuckDBPyConnection, arg: str, scale: float) -> None:
    """SUM gets μ·B·v, B the most one unit can add (from the bounds, not the data): an
    offset added to every row scales the noise up with it."""
    out, _ = _release(groups, [_sum("s", arg, scale)])
    released = _by_key(out, "s")
    truth = _truth(groups, f"sum({arg})")
    v = np.array([(released[g] - truth[g]) / (MU * scale) for g in truth])
    m = len(v)
    assert np.abs(v).min() >= 0.5 - 1e-9 and np.abs(v).max() <= 1.5 + 1e-9
    assert abs(v.mean()) <= Z * math.sqrt(V_MAG / m)
    assert abs(v.var() - V_MAG) <= Z * math.sqrt(
        (MAGNITUDE_M4 - V_MAG**2) / m)


def test_other_contributions_from_the_same_units_get_independent_draws(
        groups: duckdb.DuckDBPyConnection) -> None:
    """The value key: SUM(x) and SUM(x + [one unit]) over the same units — an offset on
    one row — are perturbed independently, so their difference is not that offset; the
    same contributions written otherwise get the same draw."""
    scale = 128.0
    base = _by_key(_release(groups, [_sum("s", "x", scale)])[0], "s")
    same = _by_key(_release(groups, [_sum("s", "CASE WHEN true THEN x ELSE 0 END",
                                          scale)])[0], "s")
    moved = _by_key(_release(groups, [_sum("s", "x + CASE WHEN j = 0 THEN 1 ELSE 0 END",
                                           scale)])[0], "s")
    assert same == base
    truth = _truth(groups, "sum(x)")
    va = np.array([(base[g] - truth[g]) / (MU * scale) for g in truth])
    vb = np.array([(moved[g] - truth[g] - 1) / (MU * scale) for g in truth])
    assert abs(np.corrcoef(va, vb)[0, 1]) <= Z / math.sqrt(len(va))
    # the offset of 1 is never read exactly from the difference
    assert np.mean(np.abs(np.array([moved[g] - base[g] for g in truth]) - 1) < 1e-6) == 0


def test_cells_of_zeros_are_perturbed_like_others(groups: duckdb.DuckDBPyConnection) -> None:
    """SUM(0 × x + [a known unit]): one non-zero unit in cells of zeros is not exact."""
    out, _ = _release(groups, [_sum("s", "CASE WHEN j < 12 THEN x * 0 + 0.001 ELSE 0 END",
                                    128.0)])
    released = _by_key(out, "s")
    assert released and all(abs(s - 0.012) >= 0.5 * MU * 128.0 - 1e-6
                            for s in released.values())


def test_released_counts_are_whole_and_never_negative(tmp_path: Path) -> None:
    """Threshold 0 (nothing withheld) over cells of 0 to 5 people, public domain."""
    rng = np.random.default_rng(21)
    m = 3000
    sizes = rng.integers(0, 6, m)
    g = np.repeat(np.arange(m), sizes)
    xi = rng.integers(0, 3, len(g))
    con = duckdb.connect()
    con.register("v", pa.table({
        "unit": [f"w{i}" for i in range(len(g))], "g": g, "xi": xi,
        # a column with nothing to add in every seventh cell
        "xn": pa.array(np.where(g % 7 == 0, 0, xi), mask=g % 7 == 0)}))
    con.execute("CREATE TABLE t AS SELECT * FROM v")
    _seeded_secret(tmp_path, "small")
    add_record_keys(con, "t", "unit", tmp_path)
    params = CkmParams(threshold=0, max_perturbation=D, variance=V, magnitude=MU)
    aggs = [RestrictedAgg("n", pb.COUNT_ROWS, None), RestrictedAgg("c", pb.COUNT, "xi"),
            _sum("s", "xi", 2.0), _sum("sn", "xn", 2.0)]
    out, below = _release(con, aggs, domains=(tuple(range(m)),), params=params)
    assert below == 0 and out.num_rows == m
    for name in ("n", "c", "s", "sn"):
        assert pa.types.is_integer(out.schema.field(name).type), out.schema
    n, c = _by_key(out, "n"), _by_key(out, "c")
    s, sn = _by_key(out, "s"), _by_key(out, "sn")
    for i, size in enumerate(sizes.tolist()):
        assert n[i] is not None and n[i] >= 0 and c[i] >= 0, (i, size, n[i])
        assert abs(n[i] - size) <= D
        if size == 0:  # an empty cell is a count of 0, like ONS's, and a SUM of nothing
            assert (n[i], c[i], s[i], sn[i]) == (0, 0, None, None)
        elif i % 7 == 0:
            assert sn[i] is None, (i, size, sn[i])  # only NULLs to add: NULL, as in SQL
        else:
            assert s[i] is not None and sn[i] is not None
    assert any(n[i] != size for i, size in enumerate(sizes.tolist()))


def test_formulations_of_a_count_agree_when_units_have_several_rows(tmp_path: Path) -> None:
    """The per-unit step (units of 1–4 rows): COUNT(*) WHERE c, SUM(CASE WHEN c THEN 1
    ELSE 0 END), COUNT(CASE WHEN c THEN 1 END), SUM(CAST(c AS INTEGER)), COUNT(x) WHERE c
    release the same cells: one set of records, one value."""
    rng = np.random.default_rng(31)
    units = 20_000
    per = rng.integers(1, 5, units)
    unit = np.repeat(np.arange(units), per)
    con = duckdb.connect()
    con.register("v", pa.table({"unit": unit, "g": unit % 300,
                                "x": rng.integers(0, 20, len(unit))}))
    con.execute("CREATE TABLE t AS SELECT * FROM v")
    _seeded_secret(tmp_path, "rows")
    add_record_keys(con, "t", "unit", tmp_path)
    cond = "x >= 7"
    forms = [(pb.COUNT_ROWS, None, cond), (pb.SUM, f"CASE WHEN {cond} THEN 1 ELSE 0 END", ""),
             (pb.COUNT, f"CASE WHEN {cond} THEN 1 END", ""),
             (pb.SUM, f"CAST({cond} AS INTEGER)", ""), (pb.COUNT, "x", cond)]
    released = []
    for kind, arg, where in forms:
        out, _ = _release(con, [RestrictedAgg("n", kind, arg)], where=where, per_unit=True)
        released.append(_by_key(out, "n"))
    assert len(released[0]) > 250  # most cells pass the threshold
    assert all(r == released[0] for r in released), [
        sum(r[g] != released[0].get(g) for g in r) for r in released]
    truth = _truth(con, "count(*)", where=cond)
    assert any(released[0][g] != truth[g] for g in released[0])


def test_zero_and_small_cells_below_the_threshold_are_alike(tmp_path: Path) -> None:
    """Cells of 0, 1, 2 and 3 people under k = 10 (D = 4: at most 7 after perturbation):
    every one is NULL and flagged, each row built the same way."""
    con = duckdb.connect()
    rows = [(f"z{s}_{i}", f"S{s}") for s in range(1, 4) for i in range(s)]
    rows += [(f"big{i}", "S9") for i in range(40)]
    con.execute("CREATE TABLE t (unit VARCHAR, g VARCHAR)")
    con.executemany("INSERT INTO t VALUES (?, ?)", rows)
    _seeded_secret(tmp_path, "zero")
    add_record_keys(con, "t", "unit", tmp_path)
    domain = tuple(f"S{i}" for i in range(10))
    aggs = [RestrictedAgg("n", pb.COUNT_ROWS, None), RestrictedAgg("u", pb.SUM, "1")]
    out, below = _release(con, aggs, domains=(domain,))
    cells = {r["g"]: (r["n"], r["u"], r["__suppressed"]) for r in out.to_pylist()}
    assert list(out.column("g").to_pylist()) == sorted(domain)  # key order, every key
    assert below == 9
    assert {cells[s] for s in domain if s != "S9"} == {(None, None, True)}
    assert cells["S9"][2] is False and abs(cells["S9"][0] - 40) <= D
    # without a public domain: kept cells only, no trace of the others
    out, _ = _release(con, aggs)
    assert out.column("g").to_pylist() == ["S9"]


# -- end to end: the federation ---------------------------------------------------------------

def _formulations(cond: str) -> list[tuple[str, str]]:
    """Five ways to count one set of records: (aggregate, WHERE clause)."""
    col = cond.split()[0]
    return [
        ("COUNT(*)", f"WHERE {cond}"),
        (f"SUM(CASE WHEN {cond} THEN 1 ELSE 0 END)", ""),
        (f"COUNT(CASE WHEN {cond} THEN 1 END)", ""),
        (f"SUM(CAST({cond} AS INTEGER))", ""),
        (f"COUNT({col})", f"WHERE {cond}"),
    ]


def _node_filters(table: str) -> list[str]:
    """The part of the union each node of ``sdc_fed`` holds (tests/conftest.py)."""
    from tests.conftest import MODULES

    if table == "lycee_students":
        return ["school = 'GP'", "school = 'MS'"]
    return ["code_module IN ({})".format(", ".join(f"'{m}'" for m in MODULES[n]))
            for n in ("v1", "v2")]


@pytest.mark.parametrize(("table", "group", "column", "cuts", "unit"), [
    ("lycee_students", "sex", "g3", range(8, 15), None),  # one row per pupil
    ("student_info", "gender", "studied_credits", (30, 60, 90, 120), "id_student"),
])
def test_five_formulations_of_one_cell_release_the_same_value(
        sdc_fed: Federation, union_db: duckdb.DuckDBPyConnection, table: str, group: str,
        column: str, cuts: range, unit: str | None) -> None:
    parts = _node_filters(table)
    inside = " OR ".join(f"({p})" for p in parts)
    min_count = 8  # sdc_fed's min_count
    # the largest number of rows of one unit at a node: a count moves by ≤ D times it there
    moves = [D * union_db.execute(
        f"SELECT max(c) FROM (SELECT count(*) AS c FROM {table} WHERE {p} "
        f"GROUP BY {unit or 'rowid'})").fetchone()[0] for p in parts]
    assert CkmParams().max_perturbation == D
    errors, slack = [], []
    for t in cuts:
        answers = []
        for agg, where in _formulations(f"{column} >= {t}"):
            out = sdc_fed.run(f"SELECT {group}, {agg} AS n FROM {table} {where} "
                              f"GROUP BY {group} ORDER BY {group}")
            assert not any(any(s) for s in out["suppressed"]), out
            answers.append(out["rows"])
        assert all(a == answers[0] for a in answers), (t, answers)
        truth = dict(union_db.execute(
            f"SELECT {group}, count(*) FROM {table} WHERE ({inside}) AND {column} >= {t} "
            "GROUP BY 1").fetchall())
        assert [k for k, _ in answers[0]] == sorted(truth)
        for key, n in answers[0]:
            assert isinstance(n, int)
            errors.append(n - truth[key])
            # each node moves its part by at most D × its largest unit; a part whose
            # perturbed count may fall under k is left out of the merge altogether
            bound = 0
            for p, move in zip(parts, moves, strict=True):
                part = union_db.execute(
                    f"SELECT count(*) FROM {table} WHERE ({p}) AND {column} >= {t} "
                    f"AND {group} = ?", [key]).fetchone()[0]
                bound += move + (part if part < min_count + move else 0)
            slack.append(bound - abs(errors[-1]))
    assert min(slack) >= 0, (errors, slack)
    # perturbed: every cell exact would have a chance below 0.2 ** (2 × cells)
    assert any(e != 0 for e in errors), errors


def _without_timing(out: dict[str, Any]) -> dict[str, Any]:
    """The answer without what names the query rather than the data: its time, and the
    receipt's query id, text and plan hashes and signing time (the receipt's released
    values, ε, tier and each node's own signed statement stay compared: a node signs the
    same fields for a cell of none as for a cell of a few, and its commitment is salted
    afresh, so it differs between any two answers)."""
    from privacy._receipts import peek

    kept = {k: v for k, v in out.items() if k not in ("elapsed_ms", "receipt")}
    if receipt := out.get("receipt"):
        naming = {"id", "query", "query_sha256", "plan_sha256", "issued"}
        nodes = [peek(t) for t in peek(receipt["statement"])["nodes"]]
        assert nodes and all(len(n["commitment"]) == 64 for n in nodes)
        kept["receipt"] = {
            "released": receipt["released"],
            "summary": {k: v for k, v in receipt["summary"].items() if k not in naming},
            "node_statements": sorted(
                sorted((k, v) for k, v in n.items()
                        if k not in naming | {"request", "commitment"}) for n in nodes)}
    return kept


def test_zero_and_small_look_the_same_through_the_federation(
        sdc_fed: Federation, union_db: duckdb.DuckDBPyConnection) -> None:
    """A cell that holds a few pupils and a cell that holds none give the same answer:
    values, flags, notes and counts of suppressed or hidden cells."""
    groups = union_db.execute(
        "SELECT school, sex, age, g1, count(*) AS n, min(g3), max(g3) FROM lycee_students "
        "GROUP BY ALL HAVING n <= 3 ORDER BY n DESC, school, sex, age, g1").fetchall()
    picked = [g for n in (1, 2, 3) for g in [r for r in groups if r[4] == n][:4]]
    assert len(picked) == 12
    for school, sex, age, g1, n, low, high in picked:
        who = f"school = '{school}' AND sex = '{sex}' AND g1 = {g1}"
        seen = []
        for cut, true in ((low, n), (high + 1, 0)):
            assert union_db.execute(f"SELECT count(*) FROM lycee_students WHERE {who} AND "
                                    f"age = {age} AND g3 >= {cut}").fetchone()[0] == true
            one = sdc_fed.run(f"SELECT COUNT(*) AS n, SUM(absences) AS a FROM lycee_students "
                              f"WHERE {who} AND age = {age} AND g3 >= {cut}")
            by_age = sdc_fed.run(f"SELECT age, COUNT(*) AS n FROM lycee_students "
                                 f"WHERE {who} AND age = {age} AND g3 >= {cut} "
                                 "GROUP BY age ORDER BY age")
            assert one["rows"] == [[None, None]] and one["suppressed"] == [[True, True]]
            assert [r[0] for r in by_age["rows"]] == list(range(15, 23))
            assert all(r[1] is None for r in by_age["rows"])
            assert one["hidden_cells"] == by_age["hidden_cells"] == 0
            seen.append((_without_timing(one), _without_timing(by_age)))
        assert seen[0] == seen[1], (school, sex, age, g1, n)


def test_released_counts_are_whole_through_the_federation(sdc_fed: Federation) -> None:
    for sql in ("SELECT age, COUNT(*) AS n, COUNT(g3) AS c, SUM(g3) AS s FROM lycee_students "
                "GROUP BY age",
                "SELECT final_result, COUNT(*) AS n, SUM(studied_credits) AS s "
                "FROM student_info GROUP BY final_result"):
        out = sdc_fed.run(sql)
        for row, flags in zip(out["rows"], out["suppressed"], strict=True):
            for value, hidden in zip(row[1:], flags[1:], strict=True):
                assert (value is None) == hidden
                assert value is None or (isinstance(value, int) and value >= 0), (sql, row)


def test_record_keys_are_stable_across_a_restart(tmp_path: Path, certs: Path) -> None:
    rng = np.random.default_rng(5)
    lines = ["unit,grp,x"]
    for i in range(40):
        lines += [f"u{i}_{j},G{i:02d},{rng.integers(1, 100)}"
                  for j in range(int(rng.integers(15, 40)))]  # ≥ K + D: all released
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    dataset = {"table": "t", "source": str(tmp_path / "t.csv"), "tier": "restricted",
               "privacy_unit": "unit", "min_count": K,
               "public_domains": {"grp": [f"G{i:02d}" for i in range(40)]}}
    sql = "SELECT grp, COUNT(*) AS n, SUM(x) AS s FROM t GROUP BY grp ORDER BY grp"

    def answer(where: Path) -> list[list[object]]:
        where.mkdir(exist_ok=True)
        fed = start_federation(where, certs, {"solo": [dataset]})
        try:
            return fed.run(sql)["rows"]
        finally:
            fed.close()

    first = answer(tmp_path / "node")
    secret = tmp_path / "node" / "solo-state" / "record_keys.secret"
    assert secret.stat().st_mode & 0o777 == 0o600
    assert answer(tmp_path / "node") == first  # restarted on the same state_dir
    truth = Counter(line.split(",")[1] for line in lines[1:])
    assert all(isinstance(row[1], int) for row in first)
    assert any(row[1] != truth[row[0]] for row in first)  # perturbed
    # another node secret: other record keys, other perturbations
    _seeded_secret(tmp_path / "other" / "solo-state", "another node")
    other = answer(tmp_path / "other")
    assert [r[0] for r in other] == [r[0] for r in first]
    assert sum(a != b for a, b in zip(other, first, strict=True)) >= 10
