"""SQL front end: researcher SQL → validated, bound query tree.

Conversion is an allow-list: every sqlglot node is mapped explicitly, anything else is
refused with a message saying what is not allowed and why. Nothing here executes SQL.
"""

from __future__ import annotations

import difflib
import logging
import re
from collections.abc import Callable, Iterable
from typing import Any

import sqlglot
from sqlglot import exp

from federation._errors import QueryError
from federation._tree import (
    Agg,
    Call,
    Col,
    Expr,
    JoinClause,
    Lit,
    OrderItem,
    OutputRef,
    Query,
    SelectItem,
    TableRef,
    contains_agg,
)

Schema = dict[str, dict[str, str]]  # table -> column -> type

_BINARY = {
    exp.EQ: "eq", exp.NEQ: "neq", exp.LT: "lt", exp.LTE: "lte", exp.GT: "gt", exp.GTE: "gte",
    exp.And: "and", exp.Or: "or", exp.Add: "add", exp.Sub: "sub", exp.Mul: "mul",
    exp.Div: "div", exp.Mod: "mod", exp.Like: "like", exp.ILike: "ilike", exp.DPipe: "concat",
}
# sqlglot function class -> (op, argument slots in order)
_FUNCS: dict[type[exp.Expression], tuple[str, tuple[str, ...]]] = {
    exp.Abs: ("abs", ("this",)), exp.Round: ("round", ("this", "decimals")),
    exp.Floor: ("floor", ("this",)), exp.Ceil: ("ceil", ("this",)),
    exp.Sqrt: ("sqrt", ("this",)), exp.Ln: ("ln", ("this",)), exp.Exp: ("exp", ("this",)),
    exp.Pow: ("power", ("this", "expression")), exp.Lower: ("lower", ("this",)),
    exp.Upper: ("upper", ("this",)), exp.Length: ("length", ("this",)),
    exp.Trim: ("trim", ("this",)), exp.Substring: ("substr", ("this", "start", "length")),
    exp.Coalesce: ("coalesce", ("this", "expressions")),
    exp.Least: ("least", ("this", "expressions")),
    exp.Greatest: ("greatest", ("this", "expressions")),
    exp.Year: ("year", ("this",)), exp.Month: ("month", ("this",)),
    exp.Nullif: ("nullif", ("this", "expression")), exp.Concat: ("concat", ("expressions",)),
}
_ANONYMOUS = {"bucket": "bucket", "nullif": "nullif", "ln": "ln"}
_AGGS: dict[type[exp.Expression], str] = {
    exp.Count: "count", exp.Sum: "sum", exp.Avg: "avg", exp.Min: "min", exp.Max: "max",
    exp.Variance: "var_samp", exp.VariancePop: "var_pop", exp.Stddev: "stddev_samp",
    exp.StddevSamp: "stddev_samp", exp.StddevPop: "stddev_pop",
}
_CASTS = {
    "DOUBLE": "DOUBLE", "FLOAT": "DOUBLE", "REAL": "DOUBLE", "DECIMAL": "DOUBLE",
    "BIGINT": "BIGINT", "INT": "BIGINT", "INTEGER": "BIGINT", "SMALLINT": "BIGINT",
    "TINYINT": "BIGINT", "VARCHAR": "VARCHAR", "TEXT": "VARCHAR", "CHAR": "VARCHAR",
    "BOOLEAN": "BOOLEAN", "DATE": "DATE",
}
_FORBIDDEN_FUNCS = ("read_", "glob", "parquet", "csv", "json", "file", "http", "attach",
                    "install", "load", "pragma", "current_setting", "getenv", "query")
MAX_SQL_CHARS = 20_000
logging.getLogger("sqlglot").setLevel(logging.ERROR)  # no parser chatter in our logs


def _refuse(message: str) -> QueryError:
    return QueryError("not_allowed", message)


def parse(sql: str, schema: Schema, descriptions: Schema | None = None) -> Query:
    """Parse, validate and bind ``sql`` against the federated catalogue ``schema``.

    ``descriptions`` (table → column → text) let an unknown column's message suggest the
    columns whose description names it ("grade" → g1, g2, g3), not only look-alike names.
    """
    if len(sql) > MAX_SQL_CHARS:
        raise _refuse(f"query text longer than {MAX_SQL_CHARS} characters")
    try:
        statements = [s for s in sqlglot.parse(sql, dialect="duckdb") if s is not None]
    except sqlglot.errors.ParseError as e:
        err = e.errors[0] if e.errors else {}
        desc = str(err.get("description") or "syntax error").split("\n")[0]
        desc = re.sub(r"Required keyword: '(\w+)' missing for <class '[\w.]*?(\w+)'>",
                      r"incomplete \2 expression (missing its \1)", desc)
        if err.get("highlight"):
            desc += f" near {str(err['highlight'])[:40]!r}"
        line, col = err.get("line"), err.get("col")
        where = f" at line {line}, column {col}" if line else ""
        raise QueryError("syntax_error", f"syntax error{where}: {desc}",
                         position=(line, col) if line else None) from None
    except sqlglot.errors.SqlglotError as e:
        raise QueryError("syntax_error", f"syntax error: {str(e).splitlines()[0]}") from None
    if len(statements) != 1:
        raise _refuse("send exactly one SELECT statement")
    return _Binder(schema, descriptions).query(statements[0])


_CLAUSES = (("distinct", "SELECT DISTINCT (use GROUP BY)"), ("qualify", "QUALIFY"),
            ("windows", "WINDOW clauses"), ("laterals", "LATERAL"), ("offset", "OFFSET"),
            ("into", "SELECT INTO"), ("locks", "locking clauses"))


def _check_statement(stmt: exp.Expression) -> None:
    """Refuse anything but one plain SELECT (no set operation, CTE, window, subquery…)."""
    if isinstance(stmt, (exp.Union, exp.Intersect, exp.Except)):
        raise _refuse("set operations (UNION, INTERSECT, EXCEPT) are not allowed: "
                      "they can return rows; combine aggregates in one query instead")
    if not isinstance(stmt, exp.Select):
        kind = stmt.key.upper() if hasattr(stmt, "key") else type(stmt).__name__
        if isinstance(stmt, exp.Command):
            kind = str(stmt.this).upper()
        raise _refuse(f"{kind} statements are not allowed: only one aggregate SELECT")
    if stmt.args.get("with_") or stmt.args.get("with"):
        raise _refuse("WITH (common table expressions) is not supported: write one SELECT")
    for key, what in _CLAUSES:
        if stmt.args.get(key):
            raise _refuse(f"{what} is not allowed")
    if stmt.find(exp.Window):
        raise _refuse("window functions are not allowed: they compute over rows")
    if any(isinstance(s, (exp.Subquery, exp.Select)) for s in stmt.find_all(exp.Query)
           if s is not stmt):
        raise _refuse("subqueries are not allowed: write one SELECT over catalogue tables")


class _Binder:
    def __init__(self, schema: Schema, descriptions: Schema | None = None) -> None:
        self.schema = schema
        self.descriptions = descriptions or {}
        self.scope: dict[str, str] = {}  # alias -> table

    # -- statement --------------------------------------------------------------------
    def query(self, stmt: exp.Expression) -> Query:
        _check_statement(stmt)
        from_ = stmt.args.get("from_") or stmt.args.get("from")
        if from_ is None:
            raise _refuse("a query must read a catalogue table (FROM is missing)")
        source = self.table(from_.this)
        joins = tuple(self.join(j) for j in stmt.args.get("joins") or [])
        where = self.expr(stmt.args["where"].this, allow_agg=False) \
            if stmt.args.get("where") else None
        items = self.select_items(stmt)
        group_by = self.group_by(stmt, items)
        having = self.expr(stmt.args["having"].this, allow_agg=True) \
            if stmt.args.get("having") else None
        order_by = self.order_by(stmt, items)
        limit = self.limit(stmt)
        q = Query(items, source, joins, where, group_by, having, order_by, limit)
        if q.is_aggregate:
            for item in items:
                self.check_grouped(item.expr, group_by, f"column {item.name!r}")
            for extra in ([having] if having else []) + [o.expr for o in order_by]:
                self.check_grouped(extra, group_by, "HAVING/ORDER BY")
        elif any(not isinstance(o.expr, OutputRef) for o in q.order_by):
            raise _refuse("ORDER BY of a row query must name a selected column")
        return q

    def table(self, node: exp.Expression) -> TableRef:
        if not isinstance(node, exp.Table) or not isinstance(node.this, exp.Identifier):
            raise _refuse("only catalogue tables can be read: table functions, files and "
                          "URLs are not allowed")
        if node.args.get("db") or node.args.get("catalog"):
            raise _refuse("schema-qualified names are not allowed: use catalogue table names")
        name = node.name
        if name not in self.schema:
            hint = difflib.get_close_matches(name.lower(), list(self.schema), n=1)
            suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
            raise QueryError("unknown_table", f"table {name!r} is not in the catalogue{suggestion}")
        alias = node.alias or name
        if alias in self.scope:
            raise _refuse(f"table alias {alias!r} is used twice")
        self.scope[alias] = name
        return TableRef(name, alias)

    def join(self, j: exp.Join) -> JoinClause:
        side = (j.args.get("side") or "").upper()
        kind = (j.args.get("kind") or "").upper()
        if kind in ("CROSS", "NATURAL", "SEMI", "ANTI", "ASOF", "POSITIONAL") or \
                side in ("RIGHT", "FULL"):
            raise _refuse(f"{(side or kind)} JOIN is not allowed: use INNER or LEFT JOIN ... ON")
        left_aliases = list(self.scope)
        ref = self.table(j.this)
        if j.args.get("using"):
            conds: list[Expr] = []
            for ident in j.args["using"]:
                name = ident.name
                owner = next((a for a in left_aliases
                              if name in self.schema[self.scope[a]]), None)
                if owner is None or name not in self.schema[ref.table]:
                    raise QueryError("unknown_column",
                                     f"USING column {name!r} is not in both tables")
                conds.append(Call("eq", (Col(owner, name), Col(ref.alias, name))))
            on: Expr = conds[0] if len(conds) == 1 else Call("and", tuple(conds))
        elif j.args.get("on") is not None:
            on = self.expr(j.args["on"], allow_agg=False)
        else:
            raise _refuse("a join needs ON or USING: cross joins are not allowed")
        return JoinClause(ref, "left" if side == "LEFT" else "inner", on)

    def select_items(self, stmt: exp.Select) -> tuple[SelectItem, ...]:
        items: list[SelectItem] = []
        for i, e in enumerate(stmt.expressions):
            if isinstance(e, exp.Star) or (isinstance(e, exp.Column) and
                                           isinstance(e.this, exp.Star)):
                tables = [e.table] if isinstance(e, exp.Column) and e.table else list(self.scope)
                for alias in tables:
                    if alias not in self.scope:
                        raise QueryError("unknown_table", f"unknown table alias {alias!r}")
                    for col in self.schema[self.scope[alias]]:
                        items.append(SelectItem(Col(alias, col), col))
                continue
            name = e.alias_or_name if isinstance(e, (exp.Alias, exp.Column)) else ""
            inner = e.this if isinstance(e, exp.Alias) else e
            tree = self.expr(inner, allow_agg=True)
            items.append(SelectItem(tree, name or _default_name(tree, i)))
        names = [it.name for it in items]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup:
            raise _refuse(f"output column {dup!r} appears twice: give each column an alias")
        return tuple(items)

    def group_by(self, stmt: exp.Select, items: tuple[SelectItem, ...]) -> tuple[Expr, ...]:
        group = stmt.args.get("group")
        if not group:
            return ()
        if group.args.get("all"):
            return tuple(i.expr for i in items if not contains_agg(i.expr))
        if group.args.get("grouping_sets") or group.args.get("cube") or group.args.get("rollup"):
            raise _refuse("GROUPING SETS, CUBE and ROLLUP are not supported")
        out = [self.item_ref(e, items, allow_agg=False) for e in group.expressions]
        if any(contains_agg(e) for e in out):
            raise _refuse("aggregates are not allowed in GROUP BY")
        return tuple(dict.fromkeys(out))

    def order_by(self, stmt: exp.Select, items: tuple[SelectItem, ...]) -> tuple[OrderItem, ...]:
        order = stmt.args.get("order")
        if not order:
            return ()
        out = []
        for o in order.expressions:
            tree = self.item_ref(o.this, items, allow_agg=True, as_name=True)
            out.append(OrderItem(tree, bool(o.args.get("desc"))))
        return tuple(out)

    def item_ref(self, e: exp.Expression, items: tuple[SelectItem, ...], *, allow_agg: bool,
                 as_name: bool = False) -> Expr | OutputRef:
        """GROUP BY / ORDER BY term: an ordinal, an output alias or an expression."""
        if isinstance(e, exp.Literal) and not e.is_string:
            pos = int(e.this)
            if not 1 <= pos <= len(items):
                raise _refuse(f"position {pos} is not in the select list")
            return OutputRef(items[pos - 1].name) if as_name else items[pos - 1].expr
        if isinstance(e, exp.Column) and not e.table:
            item = next((i for i in items if i.name == e.name), None)
            resolvable = any(e.name in self.schema[t] for t in self.scope.values())
            if item is not None and (as_name or not resolvable or item.expr != self._try(e)):
                return OutputRef(item.name) if as_name else item.expr
        tree = self.expr(e, allow_agg=allow_agg)
        if as_name:
            match = next((i for i in items if i.expr == tree), None)
            if match is not None:
                return OutputRef(match.name)
        return tree

    def _try(self, e: exp.Expression) -> Expr | None:
        try:
            return self.expr(e, allow_agg=False)
        except QueryError:
            return None

    def limit(self, stmt: exp.Select) -> int | None:
        lim = stmt.args.get("limit")
        if lim is None:
            return None
        value = lim.expression if lim.expression is not None else lim.this
        if not isinstance(value, exp.Literal) or value.is_string or not value.this.isdigit():
            raise _refuse("LIMIT takes a non-negative integer")
        return int(value.this)

    def check_grouped(self, e: Expr | OutputRef, group_by: tuple[Expr, ...], where: str
                      ) -> None:
        if e in group_by or isinstance(e, (Agg, Lit, OutputRef)):
            return
        if isinstance(e, Call):
            for a in e.args:
                self.check_grouped(a, group_by, where)
            return
        name = e.name if isinstance(e, Col) else "expression"
        raise _refuse(f"{where}: {name!r} must appear in GROUP BY or inside an aggregate "
                      "(row-level values are not released)")

    # -- expressions ------------------------------------------------------------------
    def column(self, c: exp.Column) -> Col:
        name = c.name
        if c.args.get("db") or c.args.get("catalog"):
            raise _refuse("qualified column names beyond table.column are not allowed")
        if c.table:
            if c.table not in self.scope:
                raise QueryError("unknown_table", f"unknown table or alias {c.table!r}")
            cols = self.schema[self.scope[c.table]]
            if name not in cols:
                raise QueryError("unknown_column", _unknown(
                    name, self.scope[c.table], cols, self._described([self.scope[c.table]])))
            return Col(c.table, name)
        owners = [a for a, t in self.scope.items() if name in self.schema[t]]
        if len(owners) > 1:
            raise QueryError("ambiguous_column",
                             f"column {name!r} is in several tables: write alias.{name}")
        if not owners:
            all_cols = {col: t for t in self.scope.values() for col in self.schema[t]}
            tables = ", ".join(dict.fromkeys(self.scope.values()))
            raise QueryError("unknown_column", _unknown(
                name, tables, all_cols, self._described(self.scope.values())))
        return Col(owners[0], name)

    def _described(self, tables: Iterable[str]) -> dict[str, str]:
        return {col: text for t in dict.fromkeys(tables)
                for col, text in self.descriptions.get(t, {}).items()}

    def expr(self, e: exp.Expression, *, allow_agg: bool) -> Expr:
        return self._expr(e, allow_agg, in_agg=False)

    def _expr(self, e: exp.Expression, allow_agg: bool, in_agg: bool) -> Expr:
        rec = lambda x: self._expr(x, allow_agg, in_agg)  # noqa: E731
        kind = type(e)
        if kind in _BINARY:
            return Call(_BINARY[kind], (rec(e.this), rec(e.expression)))
        if kind in _AGGS:
            return self.aggregate(e, allow_agg, in_agg)
        if kind in _FUNCS:
            return _function(e, rec)
        for classes, convert in _CONVERTERS:
            if isinstance(e, classes):
                return convert(self, e, rec)
        raise _refuse(f"{type(e).__name__} expressions are not allowed")

    def aggregate(self, e: exp.Expression, allow_agg: bool, in_agg: bool) -> Agg:
        func = _AGGS[type(e)]
        if not allow_agg:
            raise _refuse(f"aggregate {func.upper()} is not allowed here (WHERE, GROUP BY, "
                          "JOIN ON and aggregate arguments take row expressions)")
        if in_agg:
            raise _refuse("aggregates cannot be nested")
        arg = e.this
        if isinstance(arg, exp.Distinct):
            raise _refuse(f"{func.upper()}(DISTINCT …) is not mergeable across nodes: "
                          "a unit may appear at several nodes")
        if func == "count" and (arg is None or isinstance(arg, exp.Star)):
            return Agg("count", None)
        if arg is None or isinstance(arg, exp.Star):
            raise _refuse(f"{func.upper()} needs an argument")
        if e.args.get("expressions"):
            raise _refuse(f"{func.upper()} takes one argument")
        return Agg(func, self._expr(arg, allow_agg=True, in_agg=True))


# -- expression converters: one sqlglot node kind each, tried in order by ``_Binder._expr``
# (``rec`` converts a child with the same aggregate context)
Rec = Callable[[exp.Expression], Expr]


def _paren(b: _Binder, e: exp.Paren, rec: Rec) -> Expr:
    return rec(e.this)


def _column(b: _Binder, e: exp.Column, rec: Rec) -> Expr:
    if isinstance(e.this, exp.Star):
        raise _refuse("* is only allowed as SELECT * on open tables or in COUNT(*)")
    return b.column(e)


def _literal(b: _Binder, e: exp.Literal, rec: Rec) -> Expr:
    if e.is_string:
        return Lit(e.this)
    text = e.this
    try:
        return Lit(int(text)) if text.lstrip("-").isdigit() else Lit(float(text))
    except ValueError:
        raise _refuse("malformed number") from None


def _boolean(b: _Binder, e: exp.Boolean, rec: Rec) -> Expr:
    return Lit(bool(e.this))


def _null(b: _Binder, e: exp.Null, rec: Rec) -> Expr:
    return Lit(None)


def _not(b: _Binder, e: exp.Not, rec: Rec) -> Expr:
    return Call("not", (rec(e.this),))


def _neg(b: _Binder, e: exp.Neg, rec: Rec) -> Expr:
    inner = rec(e.this)
    if isinstance(inner, Lit) and isinstance(inner.value, (int, float)) \
            and not isinstance(inner.value, bool):
        return Lit(-inner.value)
    return Call("neg", (inner,))


def _is(b: _Binder, e: exp.Is, rec: Rec) -> Expr:
    if not isinstance(e.expression, exp.Null):
        raise _refuse("IS is only allowed with NULL")
    return Call("is_null", (rec(e.this),))


def _in(b: _Binder, e: exp.In, rec: Rec) -> Expr:
    if e.args.get("query") or e.args.get("unnest"):
        raise _refuse("subqueries are not allowed in IN: list constants")
    values = tuple(rec(v) for v in e.expressions)
    if not values or not all(isinstance(v, Lit) for v in values):
        raise _refuse("IN takes a list of constants")
    return Call("in", (rec(e.this), *values))


def _between(b: _Binder, e: exp.Between, rec: Rec) -> Expr:
    return Call("between", (rec(e.this), rec(e.args["low"]), rec(e.args["high"])))


def _case(b: _Binder, e: exp.Case, rec: Rec) -> Expr:
    subject = rec(e.this) if e.this is not None else None
    args: list[Expr] = []
    for branch in e.args.get("ifs") or []:
        cond = rec(branch.this)
        if subject is not None:
            cond = Call("eq", (subject, cond))
        args += [cond, rec(branch.args["true"])]
    if e.args.get("default") is not None:
        args.append(rec(e.args["default"]))
    return Call("case", tuple(args))


def _if(b: _Binder, e: exp.If, rec: Rec) -> Expr:
    args = [rec(e.this), rec(e.args["true"])]
    if e.args.get("false") is not None:
        args.append(rec(e.args["false"]))
    return Call("case", tuple(args))


def _cast(b: _Binder, e: exp.Cast, rec: Rec) -> Expr:
    target = e.to.this.name if hasattr(e.to.this, "name") else str(e.to.this)
    mapped = _CASTS.get(str(target).upper())
    if mapped is None:
        raise _refuse(f"CAST to {target} is not supported "
                      f"(use one of {', '.join(sorted(set(_CASTS.values())))})")
    return Call("cast", (rec(e.this), Lit(mapped)))


def _function(e: exp.Expression, rec: Rec) -> Expr:
    op, slots = _FUNCS[type(e)]
    args: list[Expr] = []
    for slot in slots:
        value = e.args.get(slot)
        if value is None:
            continue
        args.extend(rec(v) for v in (value if isinstance(value, list) else [value]))
    if isinstance(e, exp.Trim) and (e.args.get("expression") or e.args.get("position")):
        raise _refuse("TRIM takes one argument here")
    return Call(op, tuple(args))


def _anonymous(b: _Binder, e: exp.Anonymous, rec: Rec) -> Expr:
    name = str(e.this).lower()
    if name in _ANONYMOUS:
        return Call(_ANONYMOUS[name], tuple(rec(a) for a in e.expressions))
    raise _refuse(_function_message(name))


_QUANTILES = ("median", "quantile", "quantile_cont", "quantile_disc", "percentile_cont",
              "approx_quantile", "mode")


def _other_function(b: _Binder, e: exp.Func, rec: Rec) -> Expr:
    name = (e.sql_name() if hasattr(e, "sql_name") else e.key).lower()
    if name in _QUANTILES:
        raise _refuse(f"{name.upper()} is not mergeable across nodes as an exact "
                      "aggregate; DP quantiles come with the sensitive tier")
    raise _refuse(_function_message(name))


def _subquery(b: _Binder, e: exp.Expression, rec: Rec) -> Expr:
    raise _refuse("subqueries are not allowed")


def _parameter(b: _Binder, e: exp.Expression, rec: Rec) -> Expr:
    raise _refuse("parameters are not supported: inline constants")


# In order: the first whose classes match converts (exp.If, exp.Cast and exp.Anonymous
# are exp.Func subclasses, so they come before it).
_CONVERTERS: tuple[tuple[type[exp.Expression] | tuple[type[exp.Expression], ...],
                         Callable[[_Binder, Any, Rec], Expr]], ...] = (
    (exp.Paren, _paren), (exp.Column, _column), (exp.Literal, _literal),
    (exp.Boolean, _boolean), (exp.Null, _null), (exp.Not, _not), (exp.Neg, _neg),
    (exp.Is, _is), (exp.In, _in), (exp.Between, _between), (exp.Case, _case),
    (exp.If, _if), ((exp.Cast, exp.TryCast), _cast), (exp.Anonymous, _anonymous),
    (exp.Func, _other_function), ((exp.Subquery, exp.Select, exp.Exists), _subquery),
    ((exp.Placeholder, exp.Parameter), _parameter),
)


def _function_message(name: str) -> str:
    if any(name.startswith(p) or p in name for p in _FORBIDDEN_FUNCS):
        return f"function {name}() is not allowed: no file, network or system access"
    return f"function {name}() is not supported"


def _unknown(name: str, table: str, columns: object,
             descriptions: dict[str, str] | None = None) -> str:
    word = name.lower()
    described = [col for col, text in (descriptions or {}).items()
                 if len(word) >= 3 and col in columns  # type: ignore[operator]
                 and re.search(rf"\b{re.escape(word)}", text.lower())]
    if described:
        names = [repr(c) for c in described[:5]]
        listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
        whose = "its description mentions" if len(names) == 1 else "their descriptions mention"
        return f"column {name!r} is not in {table}; did you mean {listed}? ({whose} {name!r})"
    hint = difflib.get_close_matches(word, list(columns), n=1, cutoff=0.5)  # type: ignore[call-overload]
    suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
    return f"column {name!r} is not in {table}{suggestion}"


def _default_name(tree: Expr, i: int) -> str:
    if isinstance(tree, Col):
        return tree.name
    if isinstance(tree, Agg):
        arg = tree.arg.name if isinstance(tree.arg, Col) else ("*" if tree.arg is None else "")
        return f"{tree.func}_{arg}".rstrip("_").replace("*", "all") if arg else f"{tree.func}_{i}"
    return f"col{i}"
