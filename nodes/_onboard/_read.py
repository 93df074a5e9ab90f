"""Reading the raw inputs: CSV (sniffed separator, UTF-8/BOM, cp1252, latin-1), JSON
lines and Parquet, into Arrow tables with normalised column names and line numbers."""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from nodes._onboard._spec import IngestError, IngestSpec
from nodes._sources import unique_names

_TEXT_SUFFIXES = (".csv", ".txt", ".tsv")
_JSONL_SUFFIXES = (".jsonl", ".ndjson")
_UTF8_MULTIBYTE = re.compile(rb"[\xc2-\xdf][\x80-\xbf]|[\xe0-\xef][\x80-\xbf]{2}"
                             rb"|[\xf0-\xf4][\x80-\xbf]{3}")


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
