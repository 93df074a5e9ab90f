"""One error-code catalogue (federation/_errors.py): every code the API or the SDK raises
is in it, the SDK's hints and docs/errors.md are generated from it and current, and the SDK
reads its hints without loading coordinator code."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

from federation import ERROR_CODES, QueryError
from federation._errordocs import DOCS_FILE, HINTS_FILE, render_hints, render_markdown

ROOT = Path(__file__).resolve().parents[2]
RAISERS = {"QueryError", "BulleError"}
# Code arguments that are not literals: where the code comes from (a caught QueryError, a
# stored record of one, a training job's final status, an API error body). Their literal
# parts (defaults) are still checked; QueryError refuses an uncatalogued code at runtime.
DYNAMIC = {"code", "e.code", "record.error['code']", "s['status']",
           "error.get('code', 'http_error')", "err.get('code', 'internal')"}

METRIC_LABELS = {"ok", "other"}  # federation/_metrics.py: outcome labels beside the codes


def _name(func: ast.expr) -> str:
    return func.id if isinstance(func, ast.Name) else \
        func.attr if isinstance(func, ast.Attribute) else ""


def _strings(node: ast.AST | None) -> list[str]:
    """The string literals an expression can evaluate to (not keys it looks up)."""
    if isinstance(node, ast.Constant):
        return [node.value] if isinstance(node.value, str) and node.value else []
    if isinstance(node, ast.IfExp):
        return _strings(node.body) + _strings(node.orelse)
    if isinstance(node, ast.BoolOp):
        return [s for v in node.values for s in _strings(v)]
    if isinstance(node, ast.Dict):
        return [s for v in node.values for s in _strings(v)]
    if isinstance(node, ast.Call) and _name(node.func) == "get" and len(node.args) == 2:
        mapping = node.func.value if isinstance(node.func, ast.Attribute) else None
        return _strings(node.args[1]) + (_strings(mapping)
                                         if isinstance(mapping, ast.Dict) else [])
    if isinstance(node, ast.Call) and _name(node.func) == "str" and node.args:
        return _strings(node.args[0])
    return []


def _codes_in(tree: ast.AST) -> Iterator[tuple[str, int]]:
    """(code, line) of every error code written in a module: the first argument of a
    QueryError/BulleError, a ``"code"`` key of a dict, ``code=``/``error_code=`` keywords,
    a value assigned to ``code``, and ``for code, … in ((literal, …), …)``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _name(node.func) in RAISERS and node.args:
            arg = node.args[0]
            if not (isinstance(arg, ast.Constant) or ast.unparse(arg) in DYNAMIC):
                yield f"<not a literal: {ast.unparse(arg)}>", node.lineno
            yield from ((s, node.lineno) for s in _strings(arg))
        if isinstance(node, ast.Call):
            for kw in node.keywords:
                if kw.arg in ("code", "error_code"):
                    yield from ((s, node.lineno) for s in _strings(kw.value))
        if isinstance(node, ast.Dict):
            for k, v in zip(node.keys, node.values, strict=True):
                if isinstance(k, ast.Constant) and k.value == "code" and v is not None:
                    yield from ((s, node.lineno) for s in _strings(v))
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "code" for t in node.targets):
            yield from ((s, node.lineno) for s in _strings(node.value))
        if isinstance(node, ast.For) and isinstance(node.target, ast.Tuple):
            names = [getattr(e, "id", "") for e in node.target.elts]
            if "code" in names and isinstance(node.iter, (ast.Tuple, ast.List)):
                i = names.index("code")
                for row in node.iter.elts:
                    if isinstance(row, ast.Tuple) and isinstance(row.elts[i], ast.Constant):
                        yield row.elts[i].value, node.lineno


def _sources() -> Iterator[Path]:
    for package in ("federation", "enclave"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if not path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                yield path


def test_every_code_raised_in_the_source_is_catalogued() -> None:
    found: dict[str, list[str]] = {}
    for path in _sources():
        for code, line in _codes_in(ast.parse(path.read_text(encoding="utf-8"))):
            found.setdefault(code, []).append(f"{path.relative_to(ROOT)}:{line}")
    unknown = {c: where for c, where in found.items()
               if c not in ERROR_CODES and c not in METRIC_LABELS}
    assert unknown == {}, "add them to federation/_errors.py ERROR_CODES (or use one there)"
    assert {"not_allowed", "node_refused", "conflict", "interrupted", "http_error"} <= set(found)


def test_the_scanner_sees_codes_wherever_they_are_written() -> None:
    tree = ast.parse(
        "raise QueryError('a1', 'm')\n"
        "raise BulleError(err.get('code', 'a2'), 'm')\n"
        "x = {'code': 'a3', 'message': 'm'}\n"
        "code = {404: 'a4'}.get(s, 'a5')\n"
        "for code, found, status in (('a6', r, 400), ('a7', u, 502)): pass\n"
        "row.update(status='failed', error_code='a8')\n"
        "raise QueryError(make_code(), 'm')\n")
    codes = [c for c, _ in _codes_in(tree)]
    assert {f"a{i}" for i in range(1, 9)} <= set(codes)
    assert "<not a literal: make_code()>" in codes


def test_a_query_error_takes_its_status_from_the_catalogue() -> None:
    assert QueryError("not_found", "no such query").status == 404
    assert QueryError("budget_exhausted", "spent").status == 403
    assert QueryError("unknown_table", "no table", status=404).status == 404
    with pytest.raises(ValueError, match="uncatalogued error code 'oops'"):
        QueryError("oops", "m")
    assert all(e.meaning for e in ERROR_CODES.values())


def test_the_generated_hints_and_docs_are_current() -> None:
    assert HINTS_FILE.read_text(encoding="utf-8") == render_hints(), \
        "run python -m federation._errordocs"
    assert DOCS_FILE.read_text(encoding="utf-8") == render_markdown(), \
        "run python -m federation._errordocs"
    from enclave._error_hints import HINTS

    assert {c: e.hint for c, e in ERROR_CODES.items() if e.hint} == HINTS


def test_the_sdk_reads_its_hints_without_coordinator_code() -> None:
    hints = ast.parse(HINTS_FILE.read_text(encoding="utf-8"))
    assert not any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in ast.walk(hints))
    client = ast.parse((ROOT / "enclave" / "_client.py").read_text(encoding="utf-8"))
    imported = {n.module for n in ast.walk(client) if isinstance(n, ast.ImportFrom)} | {
        a.name for n in ast.walk(client) if isinstance(n, ast.Import) for a in n.names}
    assert not any(m and m.split(".")[0] == "federation" for m in imported)
