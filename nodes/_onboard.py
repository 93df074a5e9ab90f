"""Onboarding a dataset: ``bulle node ingest`` turns an operator's raw files into the Parquet
the node serves, with direct identifiers pseudonymised, quasi-identifiers generalised, the
values validated and a data-quality report (``nodes/_quality.py``) stored beside it.

Config (all inside the dataset; ``nodes/_config.py`` only hooks :func:`parse_onboarding`)::

    data_dir = "/srv/bulle/data"                 # node level: where ingest writes

    [[dataset]]
    table = "pupils"
    source = "/srv/bulle/data/pupils.parquet"    # what the node serves = what ingest writes
    tier = "sensitive"
    privacy_unit = "ine"
    pivots = ["uai"]                             # join columns, marked in the catalogue

    [dataset.ingest]
    inputs = ["raw/pupils-2024.csv"]             # CSV (; , tab |), Parquet, JSON lines
    encoding = "auto"                            # or utf-8, cp1252, latin-1
    delimiter = "auto"

    [dataset.pseudonymise]
    key_env = "BULLE_PSEUDONYM_KEY"              # or key_file = "/run/secrets/bulle.key"
    length = 32

    [dataset.classify]                           # every input column, exactly once
    identifiers = ["ine", "nom", "prenom", "email"]
    quasi_identifiers = { date_naissance = "year", code_postal = "departement", age = "band:5" }
    attributes = ["uai", "score"]
    drop = ["commentaire"]

Only a dataset with ``[dataset.ingest]`` needs (and may have) ``[dataset.pseudonymise]`` and
``[dataset.classify]``; then every input column must be classified or the ingest is refused
(its columns are listed in the proposal file, see below). Datasets without it, such as the
demo's published open data, are served straight from their source as before.

Pseudonyms are HMAC-SHA256(key, value) in hex, truncated to ``length`` (default 32 hex = 128
bits). The key makes them irreversible: a national pupil id (INE) has few enough possible
values that a plain hash could be inverted by enumeration; without the key it cannot. 128
bits keep accidental collisions negligible (about n²/2¹²⁹: 10⁻²³ for 10⁸ pupils) at half the
width of the full digest. The key comes from a trusted third party, via a file or an
environment variable named in the config, and is never written with the data; the same key
at every node gives the same pseudonym for the same value, so datasets link across nodes.
Values are normalised first (Unicode NFC, whitespace collapsed, case folded) so ``" Dupont"``
and ``"DUPONT"`` meet.

Generalisation rules for quasi-identifiers: ``year`` and ``month`` (dates as ``YYYY-MM-DD``,
``DD/MM/YYYY`` or a year), ``departement`` (postcode → département: the first two digits;
``97x``/``98x`` overseas keep three; Corsican postcodes ``200xx``–``201xx`` → ``2A``, others
``20xxx`` → ``2B``; a four-digit code that lost its leading zero is padded), ``band:N``
(number → ``"15-19"`` for N = 5) and ``keep``.

Writes are atomic (temporary file, fsync, rename, fsync of the folder) and idempotent: a
manifest records the hash of the inputs, the ingest settings and the key's fingerprint, and
an unchanged ingest is skipped. Any failure (malformed file, bad encoding, wrong type against
the declared ``schema``) names the file and line and leaves the previous version serving. The
inferred schema and a classification proposal are written to ``<config>.schema.toml`` for the
operator to review; the operator's own TOML is never rewritten.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import hmac
import io
import json
import os
import re
import secrets
import shutil
import tempfile
import tomllib
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from nodes._config import ConfigError, DatasetConfig, NodeConfig, _expand
from nodes._ingest import _infer_casts, _quote, load_dataset, type_family, unique_names
from nodes._quality import compute_quality, sha256_file
from nodes._quality import iso as _iso

FORMAT_VERSION = 1  # part of the input hash: a new pipeline re-ingests everything once
RULES = ("year", "month", "departement", "keep")  # and band:N
ENCODINGS = ("auto", "utf-8", "cp1252", "latin-1")
_TEXT_SUFFIXES = (".csv", ".txt", ".tsv")
_JSONL_SUFFIXES = (".jsonl", ".ndjson")
_DATE_FORMATS = "['%Y-%m-%d', '%d/%m/%Y', '%Y-%m-%d %H:%M:%S', '%Y-%m-%dT%H:%M:%S']"
_UTF8_MULTIBYTE = re.compile(rb"[\xc2-\xdf][\x80-\xbf]|[\xe0-\xef][\x80-\xbf]{2}"
                             rb"|[\xf0-\xf4][\x80-\xbf]{3}")


class IngestError(ConfigError):
    """An ingest refused or failed; the previous version of the dataset still serves."""


class _Unclassified(IngestError):
    """Input columns that [dataset.classify] does not name."""


# -- config ------------------------------------------------------------------------------

@dataclass(frozen=True)
class PseudonymSpec:
    key_file: Path | None = None
    key_env: str = ""
    length: int = 32


@dataclass(frozen=True)
class IngestSpec:
    inputs: tuple[Path, ...]
    encoding: str = "auto"
    delimiter: str = "auto"
    pseudonymise: PseudonymSpec | None = None
    identifiers: tuple[str, ...] = ()
    quasi_identifiers: dict[str, str] = field(default_factory=dict)  # column -> rule
    attributes: tuple[str, ...] = ()
    drop: tuple[str, ...] = ()

    def classes(self) -> dict[str, str]:
        out = {c: "identifier" for c in self.identifiers}
        out.update({c: "quasi-identifier" for c in self.quasi_identifiers})
        out.update({c: "attribute" for c in self.attributes})
        out.update({c: "dropped" for c in self.drop})
        return out


@dataclass(frozen=True)
class Onboarding:
    ingest: IngestSpec | None = None
    pivots: tuple[str, ...] = ()


def _keys(where: str, raw: Any, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a table")
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} "
                          f"(allowed: {', '.join(sorted(allowed))})")
    return raw


def _names(where: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: must be a list of column names")
    return tuple(value)


def _rule_ok(rule: str) -> bool:
    if rule in RULES:
        return True
    m = re.fullmatch(r"band:([1-9][0-9]{0,3})", rule)
    return m is not None


def parse_onboarding(raw: dict[str, Any], base: Path, where: str) -> Onboarding | None:
    """The dataset's onboarding sub-tables, or None when it has none."""
    if not {"ingest", "pseudonymise", "classify", "pivots"} & set(raw):
        return None
    pivots = _names(f"{where} pivots", raw.get("pivots", []))
    if "ingest" not in raw:
        extra = sorted({"pseudonymise", "classify"} & set(raw))
        if extra:
            raise ConfigError(f"{where}: [dataset.{extra[0]}] only applies with a "
                              "[dataset.ingest] section (it happens at ingest)")
        return Onboarding(pivots=pivots)
    ing = _keys(f"{where} [dataset.ingest]", raw["ingest"], {"inputs", "encoding", "delimiter"})
    inputs = ing.get("inputs")
    inputs = [inputs] if isinstance(inputs, str) else inputs
    if not inputs or not all(isinstance(p, str) for p in inputs):
        raise ConfigError(f"{where} [dataset.ingest]: inputs must name the raw files")
    encoding = str(ing.get("encoding", "auto")).lower().replace("_", "-")
    encoding = {"utf8": "utf-8", "latin1": "latin-1", "iso-8859-1": "latin-1",
                "windows-1252": "cp1252"}.get(encoding, encoding)
    if encoding not in ENCODINGS:
        raise ConfigError(f"{where} [dataset.ingest]: encoding {encoding!r} is not one of "
                          f"{', '.join(ENCODINGS)}")
    delimiter = str(ing.get("delimiter", "auto"))
    if delimiter not in ("auto", ";", ",", "\t", "|"):
        raise ConfigError(f"{where} [dataset.ingest]: delimiter must be auto, ';', ',', tab "
                          "or '|'")
    cls = _keys(f"{where} [dataset.classify]", raw.get("classify", {}),
                {"identifiers", "quasi_identifiers", "attributes", "drop"})
    qis = cls.get("quasi_identifiers", {})
    if not isinstance(qis, dict) or not all(isinstance(v, str) for v in qis.values()):
        raise ConfigError(f"{where} [dataset.classify]: quasi_identifiers maps each column to "
                          "a rule (year, month, departement, band:N, keep)")
    bad = next((f"{c} = {r!r}" for c, r in qis.items() if not _rule_ok(r)), None)
    if bad:
        raise ConfigError(f"{where} [dataset.classify]: unknown generalisation rule {bad} "
                          "(year, month, departement, band:N, keep)")
    spec = IngestSpec(
        inputs=tuple(_expand(p, base, where) for p in inputs),
        encoding=encoding, delimiter=delimiter,
        identifiers=_names(f"{where} identifiers", cls.get("identifiers", [])),
        quasi_identifiers=dict(qis),
        attributes=_names(f"{where} attributes", cls.get("attributes", [])),
        drop=_names(f"{where} drop", cls.get("drop", [])),
    )
    seen: dict[str, int] = {}
    for c in (*spec.identifiers, *spec.quasi_identifiers, *spec.attributes, *spec.drop):
        seen[c] = seen.get(c, 0) + 1
    twice = sorted(c for c, n in seen.items() if n > 1)
    if twice:
        raise ConfigError(f"{where} [dataset.classify]: column {twice[0]!r} is classified "
                          "more than once")
    if "pseudonymise" in raw:
        ps = _keys(f"{where} [dataset.pseudonymise]", raw["pseudonymise"],
                   {"key_file", "key_env", "length"})
        if ("key_file" in ps) == ("key_env" in ps):
            raise ConfigError(f"{where} [dataset.pseudonymise]: give exactly one of key_file "
                              "or key_env (the trusted third party's key)")
        length = ps.get("length", 32)
        if not isinstance(length, int) or not 16 <= length <= 64:
            raise ConfigError(f"{where} [dataset.pseudonymise]: length must be 16..64 hex "
                              "characters")
        spec = replace(spec, pseudonymise=PseudonymSpec(
            key_file=_expand(ps["key_file"], base, where) if "key_file" in ps else None,
            key_env=str(ps.get("key_env", "")), length=length))
    elif spec.identifiers:
        raise ConfigError(f"{where}: identifiers are declared but there is no "
                          "[dataset.pseudonymise] section giving the key")
    return Onboarding(ingest=spec, pivots=pivots)


# -- pseudonyms --------------------------------------------------------------------------

def _normalise(value: str) -> str:
    return " ".join(unicodedata.normalize("NFC", value).split()).casefold()


def pseudonym(key: bytes, value: str, length: int = 32) -> str | None:
    """The pseudonym of one identifier value (None for an empty one)."""
    norm = _normalise(value)
    if not norm:
        return None
    return hmac.new(key, norm.encode("utf-8"), hashlib.sha256).hexdigest()[:length]


def key_fingerprint(key: bytes) -> str:
    """Names a key without revealing it (an HMAC of a constant): detects a key change."""
    return hmac.new(key, b"bulle pseudonymisation key id", hashlib.sha256).hexdigest()[:16]


def _load_key(spec: PseudonymSpec, data_dir: Path, where: str) -> bytes:
    if spec.key_file is not None:
        if spec.key_file.resolve().is_relative_to(data_dir.resolve()):
            raise IngestError(f"{where}: the pseudonymisation key must not be kept with the "
                              f"data (it is under data_dir: {spec.key_file})")
        try:
            key = spec.key_file.read_bytes().strip()
        except OSError as e:
            raise IngestError(f"{where}: cannot read the pseudonymisation key file "
                              f"{spec.key_file}: {e.strerror}; refusing to ingest") from None
    else:
        key = os.environ.get(spec.key_env, "").strip().encode()
        if not key:
            raise IngestError(f"{where}: environment variable {spec.key_env} (the "
                              "pseudonymisation key) is not set; refusing to ingest")
    if len(key) < 16:
        raise IngestError(f"{where}: the pseudonymisation key is shorter than 16 bytes")
    return key


def _pseudonymise(values: pa.ChunkedArray, key: bytes, length: int) -> pa.ChunkedArray:
    # HMAC once per distinct value, then a vectorised lookup
    text = pc.cast(values, pa.string())
    distinct = pc.unique(text)
    mapped = pa.array([None if v is None else pseudonym(key, v, length)
                       for v in distinct.to_pylist()], pa.string())
    return pc.take(mapped, pc.index_in(text, value_set=distinct))


# -- reading the inputs --------------------------------------------------------------------

@dataclass
class _Input:
    path: Path
    table: pa.Table  # normalised column names, + __line (1-based line or row)
    unit: str  # "line" (CSV, JSON lines) or "row" (Parquet)


def _fail(path: Path, unit: str, n: int, what: str) -> IngestError:
    return IngestError(f"{path} {unit} {n}: {what}")


def _decode(path: Path, encoding: str) -> str:
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data, encoding = data[3:], "utf-8" if encoding == "auto" else encoding
    elif data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return data.decode("utf-16")
    if encoding == "auto":
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            # Valid multi-byte UTF-8 elsewhere in the file: a damaged or mixed file, not a
            # legacy single-byte one. Refuse rather than guess.
            if _UTF8_MULTIBYTE.search(data):
                line = data.count(b"\n", 0, e.start) + 1
                raise _fail(path, "line", line, "invalid UTF-8 byte in a UTF-8 file "
                            "(bad or mixed encoding); fix the file or set "
                            "[dataset.ingest] encoding") from None
        encoding = "cp1252"  # French Windows exports; a superset of latin-1's letters
        try:
            return data.decode("cp1252")
        except UnicodeDecodeError:
            encoding = "latin-1"
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise _fail(path, "line", line, f"not valid {encoding}") from None


def _sniff(first_line: str) -> str:
    delimiter = max((";", ",", "\t", "|"), key=first_line.count)
    return delimiter if first_line.count(delimiter) else ","


def _text_table(header: list[str], columns: list[list[str | None]], lines: list[int]
                ) -> pa.Table:
    names = unique_names(header)
    arrays = {n: pa.array(c, pa.string()) for n, c in zip(names, columns, strict=True)}
    arrays["__line"] = pa.array(lines, pa.int64())
    return pa.table(arrays)


def _read_csv(path: Path, spec: IngestSpec) -> _Input:
    text = _decode(path, spec.encoding).removeprefix("\ufeff")
    delimiter = _sniff(text.split("\n", 1)[0]) if spec.delimiter == "auto" else spec.delimiter
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quotechar='"',
                        strict=True)
    try:
        header = next(reader, None)
        if not header:
            raise _fail(path, "line", 1, "empty file (no header line)")
        width = len(header)
        columns: list[list[str | None]] = [[] for _ in range(width)]
        lines: list[int] = []
        end = reader.line_num
        for row in reader:
            start, end = end + 1, reader.line_num
            if not row:
                continue  # blank line
            if len(row) != width:
                raise _fail(path, "line", start, f"{len(row)} fields where the header has "
                            f"{width} (ragged row)")
            for col, v in zip(columns, row, strict=True):
                col.append(v if v != "" else None)
            lines.append(start)
    except csv.Error as e:
        raise _fail(path, "line", reader.line_num, f"malformed CSV: {e}") from None
    return _Input(path, _text_table(header, columns, lines), "line")


def _read_jsonl(path: Path, spec: IngestSpec) -> _Input:
    header: dict[str, None] = {}
    records: list[tuple[int, dict[str, Any]]] = []
    # split on \n only: str.splitlines() would also cut at U+2028, legal inside a JSON string
    for n, line in enumerate(_decode(path, spec.encoding).removeprefix("\ufeff")
                             .split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise _fail(path, "line", n, f"invalid JSON: {e.msg}") from None
        if not isinstance(obj, dict):
            raise _fail(path, "line", n, "each line must be one JSON object")
        header.update(dict.fromkeys(obj))
        records.append((n, obj))

    def text(v: Any) -> str | None:  # values become text and are typed like a CSV's
        if v is None:
            return None
        if isinstance(v, bool):
            return "true" if v else "false"
        return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)

    keys = list(header)
    columns = [[text(obj.get(k)) for _, obj in records] for k in keys]
    return _Input(path, _text_table(keys, columns, [n for n, _ in records]), "line")


def _read_parquet(path: Path) -> _Input:
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise IngestError(f"{path}: not a readable Parquet file: {e}") from None
    table = table.rename_columns(unique_names(table.column_names))
    table = table.append_column("__line", pa.array(range(1, table.num_rows + 1), pa.int64()))
    return _Input(path, table, "row")


def _read(path: Path, spec: IngestSpec) -> _Input:
    if not path.is_file():
        raise IngestError(f"input file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _read_parquet(path)
    if suffix in _JSONL_SUFFIXES:
        return _read_jsonl(path, spec)
    if suffix in _TEXT_SUFFIXES:
        return _read_csv(path, spec)
    raise IngestError(f"{path}: unsupported format {suffix!r} (CSV, Parquet or JSON lines; "
                      "export spreadsheets as CSV)")


# -- transforming ------------------------------------------------------------------------

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


def _build(con: duckdb.DuckDBPyConnection, inputs: list[_Input], ds: DatasetConfig,
           spec: IngestSpec, key: bytes | None) -> pa.Table:
    """Union the inputs, pseudonymise, generalise, type and validate; the output table."""
    tables = []
    for i, inp in enumerate(inputs):
        t = inp.table.append_column("__file", pa.array([i] * inp.table.num_rows, pa.int32()))
        con.register(f"__in{i}", t)
        tables.append(f"SELECT * FROM __in{i}")
    raw = con.sql(" UNION ALL BY NAME ".join(tables)).to_arrow_table()
    for i in range(len(inputs)):
        con.unregister(f"__in{i}")
    columns = [c for c in raw.column_names if not c.startswith("__")]
    classes = spec.classes()
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
        kind = classes[col]
        if kind == "dropped":
            continue
        rule = spec.quasi_identifiers.get(col, "keep")
        if kind == "identifier":
            _check_declared_type(col, "VARCHAR", ds)
            select.append(_quote(col))
        elif kind == "quasi-identifier" and rule != "keep":
            expr, typ = _generalise(col, rule)
            _check_declared_type(col, typ, ds)
            checks.append((col, expr, f"cannot be generalised by rule {rule!r}"))
            select.append(f"{expr} AS {_quote(col)}")
        elif col in ds.schema:
            want = ds.schema[col]
            if type_family(want) not in ("integer", "number", "text", "boolean", "date",
                                         "timestamp"):
                raise IngestError(f"schema: unsupported type {want} for column {col!r}")
            expr = _typed(col, want, col in text_cols)
            checks.append((col, expr, f"is not a valid {want}"))
            select.append(f"{expr} AS {_quote(col)}")
        elif col in text_cols:
            infer.append(col)
            select.append(col)  # placeholder, replaced below
        else:
            select.append(_quote(col))
    for col, expr, what in checks:
        bad = _first_bad(con, col, expr)
        if bad:
            inp = inputs[bad[0]]
            raise _fail(inp.path, inp.unit, bad[1], f"column {col!r} {what} "
                        f"(declared in the dataset's schema or classification)")
    if infer:
        inferred = dict(zip(infer, _infer_casts(con, "__src", infer), strict=True))
        _drain(con)
        select = [inferred.get(s, s) for s in select]
    try:
        out = con.sql(f"SELECT {', '.join(select)} FROM __src ORDER BY __file, __line"
                      ).to_arrow_table()
    finally:
        con.unregister("__src")
    return out


# -- files -------------------------------------------------------------------------------

def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_temp(target: Path, write: Callable[[BinaryIO], None]) -> Path:
    """Write next to ``target`` under a temporary name, fsynced; the caller renames it."""
    tmp = target.with_name(f".{target.stem}.{secrets.token_hex(6)}.tmp{target.suffix}")
    try:
        with tmp.open("xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _publish(tmp: Path, target: Path) -> None:
    os.replace(tmp, target)  # atomic on POSIX: readers see the old or the new file
    _fsync_dir(target.parent)


def atomic_write(target: Path, data: bytes) -> None:
    _publish(_write_temp(target, lambda f: f.write(data)), target)


def outputs(ds: DatasetConfig) -> tuple[Path, Path, Path]:
    """(Parquet, quality report, manifest) of an ingested dataset."""
    parquet = ds.source[0]
    return (parquet, parquet.with_name(parquet.stem + ".quality.json"),
            parquet.with_name(parquet.stem + ".manifest.json"))


@contextlib.contextmanager
def _locked(data_dir: Path, table: str) -> Iterator[None]:
    with (data_dir / f".{table}.lock").open("a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise IngestError("another ingest of this dataset is running") from None
        yield


# -- the proposal file -------------------------------------------------------------------

_ID_TOKENS = {"ine", "nir", "email", "mail", "courriel", "prenom", "firstname", "surname",
              "lastname", "telephone", "phone", "tel", "nom", "name"}
# Quasi-identifiers by a token of the column's name (``age_at_enrollment`` has ``age``),
# with the generalisation proposed: the usual ones of pupil records (birth dates, age,
# sex, nationality, postcode, school), a starting point the operator confirms.
_QI_TOKENS = {
    "year": {"naissance", "birth", "birthdate", "birthday", "dob"},
    "departement": {"postal", "postcode", "zip", "cp", "zipcode"},
    "band:5": {"age"},
    "keep": {"sex", "sexe", "gender", "genre", "nationality", "nacionality", "nationalite",
             "citizenship", "nation", "school", "ecole", "etablissement", "college", "lycee",
             "uai"},
}


def _suggest(col: str) -> tuple[str, str]:
    """A classification suggested by the name only: a starting point for the operator."""
    tokens = set(col.split("_"))
    if col in _ID_TOKENS or tokens & (_ID_TOKENS - {"nom", "name", "tel"}):
        return "identifier", ""
    for rule, names in _QI_TOKENS.items():
        if tokens & names:
            return "quasi-identifier", rule
    return "attribute", ""


def _toml(v: Any) -> str:
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # a JSON string is a TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml(x)}" for k, x in v.items()) + " }"
    return json.dumps(v)


def proposal_path(config: NodeConfig) -> Path:
    assert config.path is not None
    return config.path.with_name(config.path.stem + ".schema.toml")


def _write_proposal(config: NodeConfig, table: str, entry: dict[str, Any]) -> Path:
    path = proposal_path(config)
    try:
        tables = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        tables = {}
    tables[table] = entry
    lines = ["# Schema and classification proposed by `bulle node ingest` from the data it",
             "# read. Nothing here is applied: review it and copy what you accept into the",
             f"# dataset in {config.path.name if config.path else 'the config'}. "
             "This file is rewritten by every ingest."]
    for name in sorted(tables):
        t = tables[name]
        cls = t.get("classify", {})
        label = {"identifiers": "identifier, pseudonymised", "attributes": "attribute",
                 "drop": "dropped, not written"}
        classes = {c: label.get(k, k) for k, cols in cls.items() if isinstance(cols, list)
                   for c in cols}
        classes.update({c: f"quasi-identifier, {r}"
                        for c, r in cls.get("quasi_identifiers", {}).items()})
        raw = str(t.get("status", "")).startswith("refused")
        lines += ["", f"[{name}]", f"status = {_toml(t.get('status', ''))}",
                  f"proposed_at = {_toml(t.get('proposed_at', ''))}",
                  f"inputs = {_toml(t.get('inputs', []))}",
                  "# classified here by a guess from the name only: check these first",
                  f"guessed = {_toml(t.get('guessed', []))}", "",
                  f"[{name}.schema]  # " + ("types of the raw columns (nothing ingested yet)"
                                            if raw else "types after ingest: copy into the "
                                            "dataset's `schema`")]
        lines += [f"{c} = {_toml(typ)}  # {classes.get(c, '')}".rstrip(" #")
                  for c, typ in t.get("schema", {}).items()]
        lines += ["", f"[{name}.classify]  # copy into [dataset.classify] once reviewed"]
        lines += [f"{k} = {_toml(v)}" for k, v in cls.items()]
    atomic_write(path, ("\n".join(lines) + "\n").encode())
    return path


def _proposal(spec: IngestSpec, columns: dict[str, str], status: str) -> dict[str, Any]:
    classes = spec.classes()
    cls: dict[str, Any] = {"identifiers": [], "quasi_identifiers": {}, "attributes": [],
                           "drop": []}
    guessed = []
    for col in columns:
        kind, rule = classes.get(col, ""), spec.quasi_identifiers.get(col, "")
        if not kind:
            kind, rule = _suggest(col)
            guessed.append(col)
        if kind == "quasi-identifier":
            cls["quasi_identifiers"][col] = rule or "keep"
        else:
            cls[{"identifier": "identifiers", "attribute": "attributes",
                 "dropped": "drop"}[kind]].append(col)
    return {"status": status, "proposed_at": _iso(datetime.now(UTC).timestamp()),
            "inputs": [str(p) for p in spec.inputs], "guessed": guessed, "schema": columns,
            "classify": {k: v for k, v in cls.items() if v}}


# -- the ingest ----------------------------------------------------------------------------

@dataclass(frozen=True)
class IngestResult:
    table: str
    status: str  # "ingested" or "unchanged"
    rows: int
    output: Path
    score: int | None
    proposal: Path | None


def _input_hash(ds: DatasetConfig, spec: IngestSpec, digests: list[str], key_id: str) -> str:
    settings = {
        "format": FORMAT_VERSION, "inputs": digests, "key": key_id,
        "spec": {"encoding": spec.encoding, "delimiter": spec.delimiter,
                 "identifiers": spec.identifiers, "quasi_identifiers": spec.quasi_identifiers,
                 "attributes": spec.attributes, "drop": spec.drop,
                 "length": spec.pseudonymise.length if spec.pseudonymise else 0},
        # what the validation and the stored quality report depend on
        "schema": ds.schema, "filter": ds.filter, "tier": ds.tier, "unit": ds.privacy_unit,
        "max_rows_per_unit": ds.max_rows_per_unit, "bounds": ds.bounds,
        "public_domains": {k: [str(v) for v in vs] for k, vs in ds.public_domains.items()},
        "pivots": ds.onboarding.pivots if ds.onboarding else (),
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _unchanged(manifest_path: Path, parquet: Path, input_hash: str) -> dict[str, Any] | None:
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if (manifest.get("input_hash") == input_hash and parquet.is_file()
            and sha256_file(parquet) == manifest.get("output_sha256")):
        return manifest
    return None


def _raw_types(con: duckdb.DuckDBPyConnection, inputs: list[_Input]) -> dict[str, str]:
    """Inferred types of the raw columns, for a proposal written before any transformation."""
    out: dict[str, str] = {}
    for i, inp in enumerate(inputs):
        name = f"__raw{i}"
        con.register(name, inp.table)
        cols = [c for c in inp.table.column_names if not c.startswith("__")]
        text = [c for c in cols if pa.types.is_string(inp.table.schema.field(c).type)]
        sel = dict(zip(text, _infer_casts(con, name, text), strict=True)) if text else {}
        _drain(con)
        rel = con.sql(f"SELECT {', '.join(sel.get(c, _quote(c)) for c in cols)} FROM {name}")
        for c, t in zip(rel.columns, rel.types, strict=True):
            out.setdefault(c, str(t))
        con.unregister(name)
    return out


def ingest_dataset(config: NodeConfig, ds: DatasetConfig, *, force: bool = False
                   ) -> IngestResult:
    """Ingest one dataset (see the module docstring); raises IngestError on any problem."""
    where = f"dataset {ds.table!r}"
    spec = ds.onboarding.ingest if ds.onboarding else None
    if spec is None:
        raise IngestError(f"{where}: no [dataset.ingest] section: it is served from its "
                          "source as is")
    try:
        return _ingest(config, ds, spec, force)
    except IngestError as e:
        raise IngestError(f"{where}: {e}") from None


def _ingest(config: NodeConfig, ds: DatasetConfig, spec: IngestSpec, force: bool
            ) -> IngestResult:
    data_dir = config.data_dir
    if data_dir is None:
        raise IngestError("the node config has no data_dir (where ingest writes)")
    parquet, _, manifest_path = outputs(ds)
    if (len(ds.source) != 1 or parquet.suffix != ".parquet"
            or not parquet.resolve().is_relative_to(data_dir.resolve())):
        raise IngestError(f"source must be one .parquet file under data_dir ({data_dir}): "
                          "ingest writes it and the node serves it")
    if spec.identifiers:
        inside = [p for p in spec.inputs if p.resolve().is_relative_to(data_dir.resolve())]
        if inside:
            raise IngestError(f"raw input {inside[0]} holds direct identifiers and must not be "
                              "kept under data_dir")
    key = None
    key_id = ""
    if spec.identifiers:
        assert spec.pseudonymise is not None
        key = _load_key(spec.pseudonymise, data_dir, "pseudonymisation")
        key_id = key_fingerprint(key)
    data_dir.mkdir(parents=True, exist_ok=True)
    with _locked(data_dir, ds.table):
        for stale in data_dir.glob(f".{parquet.stem}.*.tmp*"):  # left by a killed ingest
            stale.unlink(missing_ok=True)
        missing = [p for p in spec.inputs if not p.is_file()]
        if missing:
            raise IngestError(f"input file not found: {missing[0]}")
        digests = [sha256_file(p) for p in spec.inputs]
        input_hash = _input_hash(ds, spec, digests, key_id)
        previous = None if force else _unchanged(manifest_path, parquet, input_hash)
        if previous is not None:
            return IngestResult(ds.table, "unchanged", int(previous.get("rows", 0)), parquet,
                                previous.get("score"), None)
        return _run(config, ds, spec, key, key_id, digests, input_hash)


def _run(config: NodeConfig, ds: DatasetConfig, spec: IngestSpec, key: bytes | None,
         key_id: str, digests: list[str], input_hash: str) -> IngestResult:
    parquet, quality_path, manifest_path = outputs(ds)
    scratch = Path(tempfile.mkdtemp(prefix="bulle-ingest-"))  # DuckDB spill: never data_dir
    con = duckdb.connect(":memory:", config={
        "threads": 1, "temp_directory": str(scratch), "memory_limit": config.engine.memory_limit,
        "autoinstall_known_extensions": False, "autoload_known_extensions": False})
    tmp: Path | None = None
    try:
        inputs = [_read(p, spec) for p in spec.inputs]
        try:
            table = _build(con, inputs, ds, spec, key)
        except _Unclassified:
            _write_proposal(config, ds.table,
                            _proposal(spec, _raw_types(con, inputs), "refused: classify"))
            raise
        table = table.replace_schema_metadata({"bulle.ingest": json.dumps(
            {"format": FORMAT_VERSION, "input_hash": input_hash})})
        # Uncompressed: then a byte scan (grep) of data_dir for a raw identifier is conclusive,
        # which compression would defeat; the node holds the table in memory anyway.
        tmp = _write_temp(parquet, lambda f: pq.write_table(table, f, compression="none"))
        # Validate by loading the file exactly as the node will (filter, declared columns).
        check = duckdb.connect(":memory:", config={"threads": 1,
                                                   "temp_directory": str(scratch)})
        try:
            load_dataset(check, replace(ds, source=(tmp,)))
            mtimes = [p.stat().st_mtime for p in spec.inputs]
            now = datetime.now(UTC).timestamp()
            freshness = {"source_modified_at": _iso(max(mtimes)), "ingested_at": _iso(now)}
            report = compute_quality(check, ds, freshness)
        except ConfigError as e:
            raise IngestError(str(e).replace(str(tmp), str(parquet))) from None
        finally:
            check.close()
        output_sha = sha256_file(tmp)
        manifest = {
            "format": FORMAT_VERSION, "table": ds.table, "input_hash": input_hash,
            "inputs": [{"path": str(p), "sha256": d, "bytes": p.stat().st_size,
                        "modified_at": _iso(p.stat().st_mtime)}
                       for p, d in zip(spec.inputs, digests, strict=True)],
            "key_id": key_id, "output": parquet.name, "output_sha256": output_sha,
            "rows": table.num_rows, "score": report["score"], **freshness,
        }
        # Data first, then its report, then the manifest that vouches for both: a crash in
        # between leaves a manifest that does not match, so the next ingest runs again.
        _publish(tmp, parquet)
        tmp = None
        atomic_write(quality_path, json.dumps(report, indent=2).encode())
        atomic_write(manifest_path, json.dumps(manifest, indent=2).encode())
        types = {c: str(t) for c, t in zip(table.column_names,
                                           _duck_types(con, table), strict=True)}
        proposal = _write_proposal(config, ds.table, _proposal(spec, types, "ingested"))
        return IngestResult(ds.table, "ingested", table.num_rows, parquet, report["score"],
                            proposal)
    except duckdb.Error as e:
        raise IngestError(f"cannot transform the inputs: {e}") from None
    except OSError as e:  # disk full, permissions: nothing was renamed
        raise IngestError(f"cannot write under {parquet.parent}: {e}") from None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        con.close()
        shutil.rmtree(scratch, ignore_errors=True)


def _duck_types(con: duckdb.DuckDBPyConnection, table: pa.Table) -> list[str]:
    con.register("__typed", table)
    try:
        return [str(t) for t in con.sql("SELECT * FROM __typed").types]
    finally:
        con.unregister("__typed")


def ingest_node(config: NodeConfig, table: str | None = None, *, force: bool = False
                ) -> list[IngestResult | IngestError]:
    """Ingest every dataset with an ``[dataset.ingest]`` section (or just ``table``).

    Each dataset is independent: one failing leaves the others' results (and its own
    previous version) in place. Returns a result or the error per dataset.
    """
    if table is not None:
        ds = config.dataset(table)
        if ds is None:
            raise IngestError(f"no dataset {table!r} in {config.path}")
        todo = [ds]
    else:
        todo = [d for d in config.datasets if d.onboarding and d.onboarding.ingest]
        if not todo:
            raise IngestError(f"{config.path}: no dataset has a [dataset.ingest] section")
    out: list[IngestResult | IngestError] = []
    for ds in todo:
        try:
            out.append(ingest_dataset(config, ds, force=force))
        except IngestError as e:
            out.append(e)
    return out
