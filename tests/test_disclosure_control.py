"""The restricted tier's disclosure control (privacy/_sdc.py), end to end on real data."""

from __future__ import annotations

import itertools

from privacy import round_count, suppression_mask

MIN = 8


def test_primary_and_secondary_suppression_unit() -> None:
    keys = [("a",), ("b",), ("c",), ("d",)]
    assert suppression_mask(keys, [50, 3, 40, 20], MIN) == [False, True, False, True]
    assert suppression_mask(keys, [50, 0, 40, 20], MIN) == [False] * 4  # zeros name nobody
    assert suppression_mask(keys, [50, 9, 40, 20], MIN) == [False] * 4
    # two small cells that together reach the minimum protect each other
    assert suppression_mask(keys, [50, 4, 4, 20], MIN) == [False, True, True, False]
    # dominance is primary too, and then needs a complement
    assert suppression_mask(keys, [50, 30, 40, 20], MIN, [False, True, False, False]) == \
        [False, True, False, False]


def test_secondary_suppression_along_every_line_of_a_two_way_table() -> None:
    keys = list(itertools.product("ab", "xyz"))
    units = [30, 2, 40, 25, 35, 45]
    mask = dict(zip(keys, suppression_mask(keys, units, MIN), strict=True))
    by_key = dict(zip(keys, units, strict=True))
    for fixed_dim in (0, 1):
        for value in {k[fixed_dim] for k in keys}:
            line = [k for k in keys if k[fixed_dim] == value]
            hidden = sum(by_key[k] for k in line if mask[k])
            assert hidden == 0 or hidden >= MIN, (fixed_dim, value, mask)


def test_round_count() -> None:
    assert [round_count(v, 5) for v in (0, 2, 3, 7, 8, 423)] == [0, 0, 5, 5, 10, 425]
    assert round_count(423, 1) == 423 and round_count(None, 5) is None


def _cells(result):
    return {tuple(r[:-1]): (r[-1], s[-1]) for r, s in zip(result["rows"], result["suppressed"],
                                                          strict=True)}


def test_small_cells_are_marked_not_dropped(sdc_fed, union_db) -> None:
    result = sdc_fed.run("SELECT age, COUNT(*) AS n FROM lycee_students GROUP BY age "
                         "ORDER BY age")
    truth = dict(union_db.execute("SELECT age, count(*) FROM lycee_students GROUP BY age")
                 .fetchall())
    cells = _cells(result)
    assert [k[0] for k in cells] == list(range(15, 23))  # the whole public domain
    for (age,), (value, suppressed) in cells.items():
        n = truth.get(age, 0)
        if suppressed:
            assert value is None
        else:
            assert value == round_count(n, 5)
    assert any(s for _, s in cells.values()), "expected at least one suppressed age"
    assert any("suppressed" in note for note in result["notes"])


def test_suppressed_values_never_leave_the_node(sdc_fed) -> None:
    plan_result = sdc_fed.coordinator.catalog()  # noqa: F841 (warms the catalogue)
    # a cell at one node below the minimum: the node sends NULL, not the value
    result = sdc_fed.run("SELECT age, SUM(g3) AS total FROM lycee_students WHERE school = 'MS' "
                         "GROUP BY age ORDER BY age")
    for row, flags in zip(result["rows"], result["suppressed"], strict=True):
        if flags[1]:
            assert row[1] is None


def test_keys_outside_public_domains_are_not_named_when_suppressed(sdc_fed, union_db) -> None:
    result = sdc_fed.run("SELECT id_student, COUNT(*) FROM student_info GROUP BY id_student")
    assert result["rows"] == []  # every learner is a cell of one: none is named
    assert result["hidden_cells"] > 1000
    ids = {r[0] for r in union_db.execute("SELECT id_student FROM student_info").fetchall()}
    assert not ids & {v for row in result["rows"] for v in row}


def test_a_cell_suppressed_at_one_node_is_suppressed_when_merged(sdc_fed, union_db) -> None:
    counts = union_db.execute(
        "SELECT failures, count(*) FILTER (school = 'GP'), count(*) FILTER (school = 'MS') "
        "FROM lycee_students GROUP BY ALL ORDER BY 1").fetchall()
    # a value where one node is below the minimum and the other is not
    key, gp, ms = next(r for r in counts if (0 < r[1] < MIN <= r[2]) or (0 < r[2] < MIN <= r[1]))
    merged = _cells(sdc_fed.run("SELECT failures, COUNT(*) FROM lycee_students GROUP BY 1"))
    assert merged[(key,)] == (None, True)
    # the other node's own part is released on its own, so merged − it would recover the
    # suppressed part: that is why the merged cell is withheld whole.
    big = "GP" if gp >= MIN else "MS"
    alone = _cells(sdc_fed.run("SELECT failures, COUNT(*) FROM lycee_students "
                               f"WHERE school = '{big}' GROUP BY 1"))
    assert alone[(key,)] == (round_count(max(gp, ms), 5), False)


def test_differencing_against_the_margin_reveals_no_small_cell(sdc_fed, union_db) -> None:
    """total − Σ released cells is either 0 or a total over at least MIN units."""
    for where in ("", "WHERE school = 'GP'", "WHERE school = 'MS'", "WHERE sex = 'F'"):
        total = sdc_fed.run(f"SELECT COUNT(*) FROM lycee_students {where}")
        by_age = sdc_fed.run(f"SELECT age, COUNT(*) FROM lycee_students {where} GROUP BY age")
        true_total = union_db.execute(f"SELECT count(*) FROM lycee_students {where}").fetchone()[0]
        true_cells = dict(union_db.execute(
            f"SELECT age, count(*) FROM lycee_students {where} GROUP BY age").fetchall())
        assert total["rows"][0][0] == round_count(true_total, 5)
        hidden_true = sum(true_cells.get(r[0], 0) for r, s in
                          zip(by_age["rows"], by_age["suppressed"], strict=True) if s[1])
        assert hidden_true == 0 or hidden_true >= MIN, where


def test_dominated_sum_is_suppressed(sdc_fed, union_db) -> None:
    # Pad one pupil's absences with pupils who have none: the count passes the minimum but
    # the sum is that one pupil's value. The dominance rule must withhold it.
    school, sex, most = union_db.execute(
        "SELECT school, sex, absences FROM lycee_students ORDER BY absences DESC LIMIT 1"
    ).fetchone()
    result = sdc_fed.run(
        f"SELECT sex, SUM(absences) AS s, AVG(absences) AS m FROM lycee_students "
        f"WHERE school = '{school}' AND absences IN (0, {most}) GROUP BY sex")
    cell = next(r for r in zip(result["rows"], result["suppressed"], strict=True)
                if r[0][0] == sex)
    assert cell == ([sex, None, None], [False, True, True])
    assert most not in [v for row in result["rows"] for v in row[1:]]


def test_dominance_uses_absolute_values_when_a_column_can_be_negative(tmp_path, certs) -> None:
    """One large negative value dominates a cell whose plain sum looks harmless: the rule
    reads |v| (MAX(v)/SUM(v) is only used on columns without a negative value)."""
    from tests._federation import start_federation

    rows = ["unit,grp,v"] + [f"u{i},a,1" for i in range(10)] + ["u10,a,-100"]
    rows += [f"w{i},b,{5 + i}" for i in range(12)]
    (tmp_path / "balances.csv").write_text("\n".join(rows) + "\n")
    dataset = {"table": "balances", "source": str(tmp_path / "balances.csv"),
               "tier": "restricted", "privacy_unit": "unit", "min_count": 5,
               "public_domains": {"grp": ["a", "b"]}}
    (tmp_path / "fed").mkdir()
    (tmp_path / "fed2").mkdir()
    fed = start_federation(tmp_path / "fed", certs, {"solo": [dataset]})
    try:
        engine = fed.engines["solo"]
        assert engine.meta["balances"].nonnegative == frozenset()  # v has a negative value
        out = fed.run("SELECT grp, SUM(v) AS s, COUNT(*) AS n FROM balances GROUP BY grp "
                      "ORDER BY grp")
        # a: 11 units pass the minimum, but |-100| > 0.9 × 110: the cell is withheld
        assert out["rows"] == [["a", None, None], ["b", sum(range(5, 17)), 12]]
        # and a column without negative values takes the MAX(v)/SUM(v) form, same answer
        positive = {**dataset, "table": "positive"}
        (tmp_path / "positive.csv").write_text(
            "\n".join(["unit,grp,v"] + [f"u{i},a,1" for i in range(10)] + ["u10,a,100"]
                      + [f"w{i},b,{5 + i}" for i in range(12)]) + "\n")
        positive["source"] = str(tmp_path / "positive.csv")
        fed2 = start_federation(tmp_path / "fed2", certs, {"solo": [positive]})
        try:
            assert fed2.engines["solo"].meta["positive"].nonnegative == frozenset({"v"})
            out = fed2.run("SELECT grp, SUM(v) AS s FROM positive GROUP BY grp ORDER BY grp")
            assert out["rows"] == [["a", None], ["b", sum(range(5, 17))]]
            assert out["suppressed"] == [[False, True], [False, False]]
        finally:
            fed2.close()
    finally:
        fed.close()
