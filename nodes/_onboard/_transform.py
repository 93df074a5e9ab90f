"""Transforming the inputs: union, pseudonymise, generalise quasi-identifiers, type
and validate against the declared schema (DuckDB SQL)."""

from __future__ import annotations

import duckdb
import pyarrow as pa

from nodes._config import DatasetConfig
from nodes._onboard._pseudonym import _pseudonymise
from nodes._onboard._read import _fail, _Input
from nodes._onboard._spec import IngestError, IngestSpec, _Unclassified
from nodes._sources import _infer_casts, _quote, type_family

_DATE_FORMATS = "['%Y-%m-%d', '%d/%m/%Y', '%Y-%m-%d %H:%M:%S', '%Y-%m-%dT%H:%M:%S']"


def _text(col: str) -> str:
    return f"NULLIF(trim(CAST({_quote(col)} AS VARCHAR)), '')"


def _generalise(col: str, rule: str) -> tuple[str, str]:
    """(SQL expression, DuckDB type) of a generalised quasi-identifier; NULL = invalid."""
    v = _text(col)
    if rule == "year":
        return (f"CASE WHEN regexp_full_match({v}, '[0-9]{{4}}') THEN CAST({v} AS BIGINT) "
                f"ELSE year(try_strptime({v}, {_DATE_FORMATS})) END", "BIGINT")
    if rule == "month":
        return f"strftime(try_strptime({v}, {_DATE_FORMATS}), '%Y-%m')", "VARCHAR"
    if rule == "departement":
        p = f"lpad({v}, 5, '0')"
        return (f"CASE WHEN regexp_full_match({v}, '2[AaBb][0-9]{{3}}') THEN upper(left({v}, 2))"
                f" WHEN NOT regexp_full_match({v}, '[0-9]{{4,5}}') OR {p} LIKE '00%' THEN NULL"
                f" WHEN {p} LIKE '97%' OR {p} LIKE '98%' THEN left({p}, 3)"
                f" WHEN {p} LIKE '20%' THEN CASE WHEN CAST({p} AS INTEGER) < 20200 THEN '2A'"
                f" ELSE '2B' END ELSE left({p}, 2) END", "VARCHAR")
    if rule.startswith("band:"):
        width = int(rule.split(":")[1])
        lo = (f"CAST(floor(TRY_CAST(replace({v}, ',', '.') AS DOUBLE) / {width}) * {width} "
              "AS BIGINT)")
        return f"CAST({lo} AS VARCHAR) || '-' || CAST({lo} + {width - 1} AS VARCHAR)", "VARCHAR"
    raise AssertionError(rule)


def _typed(col: str, want: str, is_text: bool) -> str:
    """SQL casting one column to a declared type; NULL where a value does not convert."""
    q = _quote(col)
    family = type_family(want)
    if not is_text:
        return f"TRY_CAST({q} AS {want})"
    if family == "number":
        return f"TRY_CAST(replace(trim({q}), ',', '.') AS {want})"
    if family in ("date", "timestamp"):
        return f"CAST(try_strptime(trim({q}), {_DATE_FORMATS}) AS {want})"
    if family == "boolean":
        return (f"CASE WHEN lower(trim({q})) IN ('true', 't', '1', 'yes', 'oui', 'vrai') THEN true"
                f" WHEN lower(trim({q})) IN ('false', 'f', '0', 'no', 'non', 'faux') THEN false"
                " END")
    return f"TRY_CAST(trim({q}) AS {want})" if family == "integer" else f"CAST({q} AS {want})"


def _drain(con: duckdb.DuckDBPyConnection) -> None:
    # _infer_casts leaves a fetchone() result open; DuckDB 2.0 then refuses sql()/register()
    # on the connection until a statement is run to completion.
    con.execute("SELECT 1").fetchall()


def _first_bad(con: duckdb.DuckDBPyConnection, col: str, expr: str) -> tuple[int, int] | None:
    row = con.execute(
        f"SELECT __file, __line FROM __src WHERE {_quote(col)} IS NOT NULL "
        f"AND NULLIF(trim(CAST({_quote(col)} AS VARCHAR)), '') IS NOT NULL AND ({expr}) IS NULL "
        "ORDER BY __file, __line LIMIT 1").fetchall()
    return (int(row[0][0]), int(row[0][1])) if row else None


def _check_declared_type(col: str, got: str, ds: DatasetConfig) -> None:
    want = ds.schema.get(col)
    if want and type_family(want) != type_family(got):
        raise IngestError(f"column {col!r} is {got} after ingest (its classification), but "
                          f"the schema declares {want}")


def _union(con: duckdb.DuckDBPyConnection, inputs: list[_Input]) -> pa.Table:
    """All inputs in one table (columns matched by name), with ``__file`` (the input's
    index) beside ``__line``."""
    tables = []
    for i, inp in enumerate(inputs):
        t = inp.table.append_column("__file", pa.array([i] * inp.table.num_rows, pa.int32()))
        con.register(f"__in{i}", t)
        tables.append(f"SELECT * FROM __in{i}")
    raw = con.sql(" UNION ALL BY NAME ".join(tables)).to_arrow_table()
    for i in range(len(inputs)):
        con.unregister(f"__in{i}")
    return raw


def _check_classified(columns: list[str], classes: dict[str, str]) -> None:
    """Every input column classified, every classified column in the inputs."""
    unclassified = [c for c in columns if c not in classes]
    if unclassified:
        raise _Unclassified(
            f"{len(unclassified)} column(s) not classified: {', '.join(unclassified)}. Each "
            "column must be listed in [dataset.classify] as identifiers, quasi_identifiers, "
            "attributes or drop (a proposal is in the .schema.toml file)")
    missing = [c for c in classes if c not in columns]
    if missing:
        raise IngestError(f"classified column(s) not in the inputs: {', '.join(missing)} "
                          f"(columns are: {', '.join(columns)})")


_SCHEMA_FAMILIES = ("integer", "number", "text", "boolean", "date", "timestamp")


def _output_column(col: str, kind: str, spec: IngestSpec, ds: DatasetConfig,
                   text_cols: set[str]) -> tuple[str, tuple[str, str, str] | None, bool]:
    """How one kept column is written: (SELECT term, (column, expression, what it must be)
    to validate or None, whether its type is to be inferred — the term is then the bare
    column name, replaced once the types are known)."""
    rule = spec.quasi_identifiers.get(col, "keep")
    if kind == "identifier":
        _check_declared_type(col, "VARCHAR", ds)
        return _quote(col), None, False
    if kind == "quasi-identifier" and rule != "keep":
        expr, typ = _generalise(col, rule)
        _check_declared_type(col, typ, ds)
        return f"{expr} AS {_quote(col)}", (col, expr,
                                            f"cannot be generalised by rule {rule!r}"), False
    if col in ds.schema:
        want = ds.schema[col]
        if type_family(want) not in _SCHEMA_FAMILIES:
            raise IngestError(f"schema: unsupported type {want} for column {col!r}")
        expr = _typed(col, want, col in text_cols)
        return f"{expr} AS {_quote(col)}", (col, expr, f"is not a valid {want}"), False
    if col in text_cols:
        return col, None, True  # placeholder, replaced by the inferred cast
    return _quote(col), None, False


def _build(con: duckdb.DuckDBPyConnection, inputs: list[_Input], ds: DatasetConfig,
           spec: IngestSpec, key: bytes | None) -> pa.Table:
    """Union the inputs, pseudonymise, generalise, type and validate; the output table."""
    raw = _union(con, inputs)
    columns = [c for c in raw.column_names if not c.startswith("__")]
    classes = spec.classes()
    _check_classified(columns, classes)
    for col in spec.identifiers:
        assert key is not None and spec.pseudonymise is not None
        idx = raw.column_names.index(col)
        raw = raw.set_column(idx, col, _pseudonymise(raw.column(col), key,
                                                     spec.pseudonymise.length))
    con.register("__src", raw)
    text_cols = {f.name for f in raw.schema if pa.types.is_string(f.type)
                 or pa.types.is_large_string(f.type)}
    select: list[str] = []
    checks: list[tuple[str, str, str]] = []  # column, expression, what it must be
    infer: list[str] = []
    for col in columns:
        if classes[col] == "dropped":
            continue
        term, check, inferred = _output_column(col, classes[col], spec, ds, text_cols)
        select.append(term)
        if check is not None:
            checks.append(check)
        if inferred:
            infer.append(col)
    for col, expr, what in checks:
        bad = _first_bad(con, col, expr)
        if bad:
            inp = inputs[bad[0]]
            raise _fail(inp.path, inp.unit, bad[1], f"column {col!r} {what} "
                        f"(declared in the dataset's schema or classification)")
    if infer:
        inferred_casts = dict(zip(infer, _infer_casts(con, "__src", infer), strict=True))
        _drain(con)
        select = [inferred_casts.get(s, s) for s in select]
    try:
        out = con.sql(f"SELECT {', '.join(select)} FROM __src ORDER BY __file, __line"
                      ).to_arrow_table()
    finally:
        con.unregister("__src")
    return out
