"""Loading a dataset's source files into the node's DuckDB, before lock-down.

CSV files are read as published: the delimiter is sniffed (``;``, ``,``, tab), a UTF-8 BOM
is stripped, CRLF is accepted, and each column gets the narrowest faithful type (integers,
numbers with ``.`` or French ``,`` decimals, text). Codes with leading zeros (``001``,
``01202``) stay text. Column names become lowercase ASCII snake_case (accents stripped,
other runs → ``_``); names that then collide get ``_2``, ``_3`` in header order.
"""

from __future__ import annotations

import csv
import difflib
import re
import unicodedata
from pathlib import Path

import duckdb
import sqlglot
from sqlglot import exp

from nodes._config import ROW_UNIT, ConfigError, DatasetConfig

_INT = r"^-?(0|[1-9][0-9]{0,17})$"
_NUM = r"^-?(0|[1-9][0-9]*)([.,][0-9]+)?([eE][-+]?[0-9]+)?$"
_FAMILIES = {
    "TINYINT": "integer", "SMALLINT": "integer", "INTEGER": "integer", "BIGINT": "integer",
    "HUGEINT": "integer", "UTINYINT": "integer", "USMALLINT": "integer", "UINTEGER": "integer",
    "UBIGINT": "integer", "DOUBLE": "number", "FLOAT": "number", "REAL": "number",
    "VARCHAR": "text", "BOOLEAN": "boolean", "DATE": "date", "TIMESTAMP": "timestamp",
}


def normalize_column_name(name: str) -> str:
    """``Rentrée scolaire`` → ``rentree_scolaire``; ``Taux - G`` → ``taux_g``."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]+", "_", ascii_name.lower()).strip("_") or "column"


def type_family(duck_type: str) -> str:
    base = duck_type.upper().split("(")[0]
    if base.startswith("DECIMAL"):
        return "number"
    return _FAMILIES.get(base, base.lower())


def sniff_csv(path: Path) -> tuple[str, str]:
    """Return (delimiter, encoding) from the first bytes of a CSV file."""
    head = path.open("rb").read(65536)
    if head.startswith(b"\xef\xbb\xbf"):
        head = head[3:]
    try:
        text = head.decode("utf-8")
        encoding = "utf-8"
    except UnicodeDecodeError as e:
        if e.start < len(head) - 4:  # not merely a multi-byte char cut by the 64 KiB window
            text, encoding = head.decode("latin-1"), "latin-1"
        else:
            text, encoding = head[: e.start].decode("utf-8"), "utf-8"
    first = text.splitlines()[0] if text else ""
    delimiter = max((";", ",", "\t", "|"), key=first.count)
    if first.count(delimiter) == 0:
        delimiter = ","
    return delimiter, encoding


def _quote(name: str) -> str:
    return exp.to_identifier(name, quoted=True).sql("duckdb")


def _csv_header(path: Path, delimiter: str, encoding: str) -> list[str]:
    with path.open(encoding="utf-8-sig" if encoding == "utf-8" else encoding, newline="") as f:
        return next(csv.reader(f, delimiter=delimiter, quotechar='"'), [])


def _relation_sql(path: Path) -> tuple[str, bool]:
    """SQL that reads one source file; second item: whether columns are all text."""
    lit = exp.Literal.string(str(path)).sql("duckdb")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return f"read_parquet({lit})", False
    if suffix in (".jsonl", ".ndjson"):
        return f"read_json({lit}, format='newline_delimited')", False
    delimiter, encoding = sniff_csv(path)
    header = _csv_header(path, delimiter, encoding)
    if not header:
        raise ConfigError(f"{path}: empty file (no header line)")
    # The header is given explicitly and sniffing is off: DuckDB's sniffer would otherwise
    # silently drop ragged files. Every row must then have exactly the header's fields.
    columns = "{" + ", ".join(f"{exp.Literal.string(h).sql('duckdb')}: 'VARCHAR'"
                              for h in header) + "}"
    opts = (
        f"delim={exp.Literal.string(delimiter).sql('duckdb')}, header=true, auto_detect=false, "
        f"columns={columns}, quote='\"', escape='\"', encoding='{encoding}', "
        "strict_mode=true, null_padding=false"
    )
    return f"read_csv({lit}, {opts})", True


def unique_names(raw: list[str]) -> list[str]:
    """Normalised names; a collision (``REP`` and ``REP +``) gets ``_2``, ``_3`` …"""
    out: list[str] = []
    for name in raw:
        base = candidate = normalize_column_name(name)
        i = 2
        while candidate in out:
            candidate = f"{base}_{i}"
            i += 1
        out.append(candidate)
    return out


def _renamed(names: list[str], ds: DatasetConfig, path: Path) -> list[str]:
    missing = sorted(set(ds.rename) - set(names))
    if missing:
        raise ConfigError(f"dataset {ds.table!r}: rename: column {missing[0]!r} is not in "
                          f"{path.name} (its columns: {', '.join(names[:20])})")
    out = [ds.rename.get(n, n) for n in names]
    dup = next((n for n in out if out.count(n) > 1), None)
    if dup:
        raise ConfigError(f"dataset {ds.table!r}: rename: two columns would be named {dup!r}")
    return out


def _infer_casts(con: duckdb.DuckDBPyConnection, view: str, names: list[str]) -> list[str]:
    """Select-list that gives each all-text column its narrowest faithful type."""
    probes = []
    for i, n in enumerate(names):
        q = _quote(n)
        probes.append(
            f"count({q}) AS n{i}, count_if(regexp_full_match({q}, '{_INT}')) AS i{i}, "
            f"count_if(regexp_full_match({q}, '{_NUM}')) AS f{i}"
        )
    row = con.execute(f"SELECT {', '.join(probes)} FROM {view}").fetchall()[0]
    out = []
    for i, n in enumerate(names):
        q = _quote(n)
        total, ints, nums = row[3 * i], row[3 * i + 1], row[3 * i + 2]
        if total and ints == total:
            out.append(f"CAST({q} AS BIGINT) AS {q}")
        elif total and nums == total:
            out.append(f"CAST(replace({q}, ',', '.') AS DOUBLE) AS {q}")
        else:
            out.append(f"{q}")
    return out


def load_dataset(con: duckdb.DuckDBPyConnection, ds: DatasetConfig) -> int:
    """Create table ``ds.table`` from its sources; returns its row count.

    The rows are read straight from the source files into the table (no intermediate copy
    in RAM): with a file database the table lives in DuckDB's compressed storage. CSV files
    are read twice (once to infer each column's type, once to load it).

    Raises ConfigError naming the dataset and file on a missing file, unreadable content
    or a schema that does not match the declared one.
    """
    parts = []
    for path in ds.source:
        if not path.is_file():
            raise ConfigError(f"dataset {ds.table!r}: source file not found: {path}")
        rel, all_text = _relation_sql(path)
        try:
            cols = [c[0] for c in con.execute(f"DESCRIBE SELECT * FROM {rel}").fetchall()]
            names = _renamed(unique_names(cols), ds, path)
            renamed = ", ".join(f"{_quote(c)} AS {_quote(n)}"
                                for c, n in zip(cols, names, strict=True))
            source = f"(SELECT {renamed} FROM {rel})"
            # the probe reads the whole CSV: a malformed line is reported here, by file
            select = _infer_casts(con, source, names) if all_text else [_quote(n) for n in names]
            parts.append(f"SELECT {', '.join(select)} FROM {source}")
        except duckdb.Error as e:
            # Local operator error: DuckDB's message names the line, which helps fix the file.
            raise ConfigError(f"dataset {ds.table!r}: cannot read {path}: {e}") from None
    union = " UNION ALL BY NAME ".join(parts)
    where = ""
    if ds.filter:
        try:
            cond = sqlglot.parse_one(ds.filter, dialect="duckdb")
        except sqlglot.errors.ParseError as e:
            raise ConfigError(f"dataset {ds.table!r}: filter is not valid SQL: {e}") from None
        if isinstance(cond, (exp.Select, exp.Command)) or not isinstance(cond, exp.Expression):
            raise ConfigError(f"dataset {ds.table!r}: filter must be one boolean expression")
        where = f" WHERE {cond.sql('duckdb')}"
    try:
        con.execute(f"CREATE OR REPLACE TABLE {_quote(ds.table)} AS SELECT * FROM ({union}){where}")
    except duckdb.Error as e:
        what = "cannot apply filter" if ds.filter else \
            f"cannot read {', '.join(str(p) for p in ds.source)}"
        raise ConfigError(f"dataset {ds.table!r}: {what}: {e}") from None
    _check_schema(con, ds)
    return con.execute(f"SELECT count(*) FROM {_quote(ds.table)}").fetchall()[0][0]


def table_columns(con: duckdb.DuckDBPyConnection, table: str) -> list[tuple[str, str]]:
    return [(r[0], r[1]) for r in con.execute(f"DESCRIBE {_quote(table)}").fetchall()]


def _check_schema(con: duckdb.DuckDBPyConnection, ds: DatasetConfig) -> None:
    actual = dict(table_columns(con, ds.table))
    problems = []
    for col, want in ds.schema.items():
        if col not in actual:
            problems.append(f"column {col!r} is missing")
        elif type_family(actual[col]) != type_family(want):
            problems.append(f"column {col!r} is {actual[col]}, expected {want}")
    unit = "" if ds.privacy_unit == ROW_UNIT else ds.privacy_unit
    declared = [("privacy_unit", unit), *(("public_domains", c) for c in ds.public_domains),
                *(("columns", c) for c in ds.columns), *(("bounds", c) for c in ds.bounds)]
    for key, col in declared:
        if col and col not in actual:
            hint = (difflib.get_close_matches(col, list(actual), n=1, cutoff=0.6)
                    or [c for c in sorted(actual) if col.lower() in c.lower()][:1])
            problems.append(f"{key} names column {col!r}, which the table does not have"
                            + (f" (did you mean {hint[0]!r}?)" if hint else
                               f" (its columns: {', '.join(sorted(actual)[:12])}"
                               f"{', …' if len(actual) > 12 else ''})"))
    if ds.privacy_unit == ROW_UNIT and ROW_UNIT in actual:
        problems.append(f'privacy_unit = "{ROW_UNIT}" (one person per row) is ambiguous: the '
                        f'table has a column named {ROW_UNIT!r} (rename it)')
    if problems:
        raise ConfigError(f"dataset {ds.table!r}: wrong schema: " + "; ".join(problems))


def row_count_bucket(n: int) -> str:
    for limit, label in ((100, "<100"), (1_000, "100-1k"), (10_000, "1k-10k"),
                         (100_000, "10k-100k"), (1_000_000, "100k-1M")):
        if n < limit:
            return label
    return ">1M"
