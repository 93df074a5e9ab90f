"""Expression operators allowed on the wire, and their compilation to DuckDB SQL.

An expression arrives as a tree of ``Expr`` messages. Its operators are looked up in
:data:`OPS`; the SQL that runs is built from this table with sqlglot's expression
builders (identifiers and literals are quoted by sqlglot), never from text on the wire.

Every compiled expression is total (DESIGN.md, "Total evaluation"): a value DuckDB cannot
compute becomes NULL instead of an error, since whether a query fails must not depend on
the data. Measured on DuckDB 2.0 (tests/test_total_evaluation.py keeps it true):

- can raise, so they run under ``TRY(...)``: ``+ - *``, unary minus and ``abs`` (integer
  and DECIMAL overflow), ``%`` (by zero; INT64_MIN % -1), ``round`` (integer overflow),
  ``substr`` (offsets beyond 2^32); casts compile to ``TRY_CAST``;
- never raise: ``/`` (IEEE: inf/nan), ``sqrt ln exp power`` (nan/inf), ``floor ceil``,
  ``lower upper trim length concat``, ``year month`` (NULL on ±infinity), ``like/ilike``
  (no ESCAPE clause: a pattern cannot be malformed), ``is null``;
- raise through DuckDB's implicit casts: comparisons, ``in``, ``between``, ``case``,
  ``coalesce``, ``least``, ``greatest``, ``nullif`` whose operands have different types
  (``varchar_col = 1`` casts the column, ``int_col = 'abc'`` the literal, row by row), and
  a non-boolean value where a condition is expected. With the columns' types (see
  :func:`column`) a string literal is cast once to the other side's type with TRY_CAST
  and same-typed operands need nothing; only what stays mixed or unknown gets a TRY.

TRY costs about 2.5 ms per million rows and per TRY, and hides a comparison from DuckDB's
filter pushdown, so it is placed once around each maximal chain of NULL-propagating
operators (the same result as one TRY per operator: a NULL anywhere gives NULL), and
never around a comparison that cannot fail. DuckDB refuses TRY around volatile functions,
aggregates and scalar subqueries; none is an operator here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from sqlglot import exp

from federation.proto import bulle_pb2 as pb

MAX_DEPTH = 32  # protobuf itself refuses about 50 levels of nested calls
MAX_NODES = 4000
CAST_TYPES = frozenset({"DOUBLE", "BIGINT", "VARCHAR", "BOOLEAN", "DATE"})
TYPE_META = "duck_type"  # meta key of a column's DuckDB type (set by :func:`column`)

# type families: operands of one family compare without a cast that can fail
NUM, STR, BOOL, DATE, TS, NULL = "num", "str", "bool", "date", "timestamp", "null"
_NUMERIC = {"TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT",
            "UINTEGER", "UBIGINT", "UHUGEINT", "FLOAT", "REAL", "DOUBLE", "DECIMAL", "NUMERIC"}
_FAMILIES = {"VARCHAR": STR, "TEXT": STR, "STRING": STR, "BOOLEAN": BOOL, "BOOL": BOOL,
             "DATE": DATE, "TIMESTAMP": TS}
_DEFAULT_TYPE = {NUM: "DOUBLE", BOOL: "BOOLEAN", DATE: "DATE", TS: "TIMESTAMP"}


class ExprError(ValueError):
    """An expression the contract does not allow. Messages never contain data values."""


def family(duck_type: str | None) -> str | None:
    """The family of a DuckDB type name (None: not one the operators reason about)."""
    if not duck_type:
        return None
    base = duck_type.upper().split("(")[0].strip()
    return NUM if base in _NUMERIC else _FAMILIES.get(base)


def column(table: str, name: str, duck_type: str | None = None) -> exp.Column:
    """A quoted column reference for a resolver to return; with its DuckDB type,
    comparisons on it compile without TRY when they cannot fail."""
    col = exp.Column(this=exp.to_identifier(name, quoted=True),
                     table=exp.to_identifier(table, quoted=True))
    if duck_type:
        col.meta[TYPE_META] = duck_type
    return col


@dataclass(frozen=True)
class _Typed:
    """A compiled operand and what is known of it."""

    sql: exp.Expression
    fam: str | None  # family, None when unknown
    duck: str | None = None  # exact DuckDB type when known (columns, casts)
    risky: bool = False  # DuckDB may raise on it: a TRY must enclose it
    literal: bool = False


def _try(e: exp.Expression) -> exp.Expression:
    return exp.Anonymous(this="TRY", expressions=[e])


def _closed(t: _Typed) -> exp.Expression:
    """The operand for a non-NULL-propagating operator: its failures caught here."""
    return _try(t.sql) if t.risky else t.sql


def _condition(t: _Typed) -> _Typed:
    """An operand used as a condition: DuckDB casts non-booleans to BOOLEAN row by row."""
    sql = _closed(t)
    if t.fam not in (BOOL, NULL):
        sql = exp.TryCast(this=sql, to=exp.DataType.build("BOOLEAN"))
    return _Typed(sql, BOOL)


def _unify(args: list[_Typed]) -> tuple[list[_Typed], str | None, bool]:
    """Operands DuckDB brings to one type: (operands, family, whether a cast may raise).

    One family: nothing to do. Strings beside one other family: DuckDB would cast them to
    it row by row (``varchar_col = 1``, ``int_col = 'abc'``); they are cast explicitly
    with TRY_CAST instead (folded to a constant for a literal). Anything else stays mixed.
    """
    fams = {a.fam for a in args if a.fam != NULL}
    if len(fams) == 1 and None not in fams:
        return args, fams.pop(), False
    if not fams:
        return args, NULL, False
    others = fams - {STR}
    if STR in fams and len(others) == 1 and (fam := next(iter(others))) in _DEFAULT_TYPE:
        typed = [a for a in args if a.fam == fam and a.duck]
        duck = next((a.duck for a in typed if not a.literal), None) or (
            "BIGINT" if typed and all(a.duck == "BIGINT" for a in typed) else None)
        to = _data_type(duck) or exp.DataType.build(_DEFAULT_TYPE[fam])
        return [_Typed(exp.TryCast(this=_closed(a), to=to.copy()), fam) if a.fam == STR
                else a for a in args], fam, False
    return args, None, True


def _numbers(args: list[_Typed], first: int, dates: bool) -> list[_Typed]:
    """A text literal where a number is expected: DuckDB casts it row by row ('abc' in
    ``power('abc', x)`` fails only on the rows that reach it); cast once, totally. A text
    column there is a type error DuckDB's binder reports before reading data. ``dates``
    (+ and -): only beside numbers, since DATE + '1 day' adds an interval."""
    if dates and any(a.fam not in (NUM, NULL, STR) for a in args):
        return args
    return [_Typed(exp.TryCast(this=a.sql, to=exp.DataType.build("DOUBLE")), NUM)
            if i >= first and a.fam == STR and a.literal else a for i, a in enumerate(args)]


def _data_type(duck: str | None) -> exp.DataType | None:
    if not duck:
        return None
    try:
        return exp.DataType.build(duck, dialect="duckdb")
    except Exception:  # a type sqlglot does not parse: the family's default type serves
        return None


Result = Callable[[list[_Typed]], str | None]


@dataclass(frozen=True)
class Op:
    min_args: int
    max_args: int | None  # None: variadic
    build: Callable[[list[exp.Expression]], exp.Expression]
    result: str | Result | None = None  # family of the result; a function of the operands
    fails: bool = False  # DuckDB raises on some values (overflow, out of range)
    strict: bool = True  # a NULL operand gives NULL: an enclosing TRY catches its failures
    unify: str = ""  # "all" | "values" (CASE): operands DuckDB casts to one type
    conditions: bool = False  # every operand is a condition (AND, OR, NOT)
    numbers: int = -1  # operands from this position on are numbers (-1: none)


def _arith(cls: type[exp.Expression], **kw: object) -> Op:
    return _binary(cls, numbers=0, **kw)


def _binary(cls: type[exp.Expression], **kw: object) -> Op:
    # sqlglot renders the tree as given: parenthesise operands so precedence is the tree's
    return Op(2, 2, lambda a: cls(this=exp.paren(a[0], copy=False),
                                  expression=exp.paren(a[1], copy=False)), **kw)  # type: ignore[arg-type]


def _fold(cls: type[exp.Expression]) -> Op:
    def build(args: list[exp.Expression]) -> exp.Expression:
        out = args[0]
        for arg in args[1:]:
            out = cls(this=exp.paren(out, copy=False), expression=exp.paren(arg, copy=False))
        return out

    return Op(2, None, build, BOOL, strict=False, conditions=True)


def _func(name: str, lo: int, hi: int | None, result: str | Result | None = None,
          **kw: object) -> Op:
    return Op(lo, hi, lambda a: exp.Anonymous(this=name, expressions=a), result,
              **kw)  # type: ignore[arg-type]


def _case(args: list[exp.Expression]) -> exp.Expression:
    # args: cond1, value1, cond2, value2, ..., [default]
    pairs, default = (args, None) if len(args) % 2 == 0 else (args[:-1], args[-1])
    ifs = [exp.If(this=pairs[i], true=pairs[i + 1]) for i in range(0, len(pairs), 2)]
    return exp.Case(ifs=ifs, default=default)


def _bucket(args: list[exp.Expression]) -> exp.Expression:
    # bucket(x, width) = floor(x / width) * width: numeric bins labelled by lower edge
    x, width = args
    lower = exp.Div(this=exp.paren(x), expression=exp.paren(width))
    return exp.Mul(this=exp.Anonymous(this="floor", expressions=[lower]),
                   expression=exp.paren(width.copy()))


def _shift(args: list[_Typed]) -> str | None:
    """+ and -: numbers give a number, DATE ± number a DATE, DATE - DATE a number."""
    fams = [a.fam for a in args]
    if all(f in (NUM, NULL) for f in fams):
        return NUM
    if DATE in fams and NUM in fams:
        return DATE
    return NUM if fams == [DATE, DATE] else None


def _compare(cls: type[exp.Expression]) -> Op:
    return _binary(cls, result=BOOL, unify="all")


OPS: dict[str, Op] = {
    "eq": _compare(exp.EQ),
    "neq": _compare(exp.NEQ),
    "lt": _compare(exp.LT),
    "lte": _compare(exp.LTE),
    "gt": _compare(exp.GT),
    "gte": _compare(exp.GTE),
    "and": _fold(exp.And),
    "or": _fold(exp.Or),
    "not": Op(1, 1, lambda a: exp.Not(this=exp.paren(a[0])), BOOL, conditions=True),
    "add": _arith(exp.Add, result=_shift, fails=True),
    "sub": _arith(exp.Sub, result=_shift, fails=True),
    "mul": _arith(exp.Mul, result=NUM, fails=True),
    "div": _arith(exp.Div, result=NUM),  # DuckDB 2.0: x / 0 is ±inf or nan, never an error
    "mod": _arith(exp.Mod, result=NUM, fails=True),
    "neg": Op(1, 1, lambda a: exp.Neg(this=exp.paren(a[0])), NUM, fails=True, numbers=0),
    "is_null": Op(1, 1, lambda a: exp.Is(this=exp.paren(a[0]), expression=exp.Null()), BOOL,
                  strict=False),
    # the list holds constants. Not treated as NULL-propagating: for a long list DuckDB's
    # in_clause optimizer evaluates the left operand outside any TRY around the IN
    "in": Op(2, None, lambda a: exp.In(this=exp.paren(a[0]), expressions=a[1:]), BOOL,
             strict=False, unify="all"),
    # 5 BETWEEN NULL AND 2 is false: not NULL-propagating
    "between": Op(3, 3, lambda a: exp.Between(this=exp.paren(a[0]), low=exp.paren(a[1]),
                                                high=exp.paren(a[2])), BOOL, strict=False,
                  unify="all"),
    "like": _binary(exp.Like, result=BOOL),
    "ilike": _binary(exp.ILike, result=BOOL),
    "case": Op(2, None, _case, strict=False, unify="values"),
    "bucket": Op(2, 2, _bucket, NUM, numbers=0),
    "coalesce": _func("coalesce", 1, None, strict=False, unify="all"),
    "abs": _func("abs", 1, 1, NUM, fails=True, numbers=0),
    "round": _func("round", 1, 2, NUM, fails=True, numbers=0),
    "floor": _func("floor", 1, 1, NUM, numbers=0),
    "ceil": _func("ceil", 1, 1, NUM, numbers=0),
    "sqrt": _func("sqrt", 1, 1, NUM, numbers=0),
    "ln": _func("ln", 1, 1, NUM, numbers=0),
    "exp": _func("exp", 1, 1, NUM, numbers=0),
    "power": _func("power", 2, 2, NUM, numbers=0),
    "least": _func("least", 1, None, strict=False, unify="all"),  # least(1, NULL) is 1
    "greatest": _func("greatest", 1, None, strict=False, unify="all"),
    "lower": _func("lower", 1, 1, STR),
    "upper": _func("upper", 1, 1, STR),
    "length": _func("length", 1, 1, NUM),
    "trim": _func("trim", 1, 1, STR),
    "substr": _func("substr", 2, 3, STR, fails=True, numbers=1),
    "concat": _func("concat", 1, None, STR, strict=False),  # concat skips NULLs
    "year": _func("year", 1, 1, NUM),
    "month": _func("month", 1, 1, NUM),
    "nullif": _func("nullif", 2, 2, strict=False, unify="all"),  # nullif(1, NULL) is 1
}


def literal_sql(lit: pb.Literal) -> exp.Expression:
    kind = lit.WhichOneof("value")
    if kind is None or kind == "is_null":
        return exp.Null()
    if kind == "bool_value":
        return exp.Boolean(this=lit.bool_value)
    if kind == "int_value":
        return exp.Literal.number(lit.int_value)
    if kind == "float_value":
        if not math.isfinite(lit.float_value):
            raise ExprError("non-finite numeric literals are not allowed")
        # DOUBLE, not DuckDB's DECIMAL for "1.5": a product of DECIMAL literals reaches
        # DECIMAL(38), and a SUM of such values can overflow (an error data decides)
        text = repr(lit.float_value)
        return exp.Literal.number(text if "e" in text else text + "e0")
    return exp.Literal.string(lit.string_value)


_LITERAL_FAMILY = {"bool_value": BOOL, "int_value": NUM, "float_value": NUM,
                   "string_value": STR}
_LITERAL_TYPE = {"int_value": "BIGINT", "float_value": "DOUBLE"}

ColumnResolver = Callable[[str, str], exp.Expression]


def to_sql(expr: pb.Expr, resolve: ColumnResolver, *, condition: bool = False
           ) -> exp.Expression:
    """Compile a wire expression into a total DuckDB expression.

    ``resolve(table, name)`` validates column references; columns built with
    :func:`column` and a type let comparisons skip TRY. ``condition``: the expression is
    a WHERE clause (a non-boolean value is cast to BOOLEAN, totally).
    """
    budget = [MAX_NODES]

    def walk(e: pb.Expr, depth: int) -> _Typed:
        budget[0] -= 1
        if depth > MAX_DEPTH or budget[0] < 0:
            raise ExprError("expression too deep or too large")
        kind = e.WhichOneof("kind")
        if kind == "column":
            col = resolve(e.column.table, e.column.name)
            duck = col.meta.get(TYPE_META) if col.meta else None
            return _Typed(col, family(duck), duck)
        if kind == "literal":
            value = e.literal.WhichOneof("value") or ""
            return _Typed(literal_sql(e.literal), _LITERAL_FAMILY.get(value, NULL),
                          _LITERAL_TYPE.get(value), literal=True)
        if kind != "call":
            raise ExprError("empty expression")
        name = e.call.op
        if name == "cast":
            if len(e.call.args) != 2 or e.call.args[1].literal.string_value not in CAST_TYPES:
                raise ExprError("cast takes a value and one of " + ", ".join(sorted(CAST_TYPES)))
            target = e.call.args[1].literal.string_value
            arg = walk(e.call.args[0], depth + 1)
            # TRY_CAST: a value that does not convert is NULL; it passes NULL through, so
            # a TRY around it still catches its operand's failures
            return _Typed(exp.TryCast(this=arg.sql, to=exp.DataType.build(target)),
                          family(target), target, arg.risky)
        op = OPS.get(name)
        if op is None:
            raise ExprError(f"operator {name[:40]!r} is not allowed")
        n = len(e.call.args)
        if n < op.min_args or (op.max_args is not None and n > op.max_args):
            raise ExprError(f"operator {name!r} got {n} arguments")
        args = [walk(a, depth + 1) for a in e.call.args]
        if name == "in" and any(a.WhichOneof("kind") != "literal" for a in e.call.args[1:]):
            raise ExprError("IN takes a list of constants")
        return apply(op, args)

    def apply(op: Op, args: list[_Typed]) -> _Typed:
        if op.conditions:
            args = [_condition(a) for a in args]
        elif op.build is _case:
            args = [_condition(a) if i % 2 == 0 and i < len(args) - len(args) % 2 else a
                    for i, a in enumerate(args)]
        if op.numbers >= 0:
            args = _numbers(args, op.numbers, dates=op.result is _shift)
        fam, mixed = op.result, False
        if op.unify:
            at = (range(len(args)) if op.unify == "all"
                  else [i for i in range(len(args)) if i % 2 or i == len(args) - 1])
            same, fam_u, mixed = _unify([args[i] for i in at])
            args = list(args)
            for i, t in zip(at, same, strict=True):
                args[i] = t
            fam = fam if isinstance(fam, str) else fam_u
        if callable(fam):
            fam = fam(args)
        fails = op.fails or mixed
        if mixed and op.build is OPS["in"].build:  # one TRY(x = c) per constant instead
            x = _closed(args[0])
            return _Typed(exp.or_(*(_try(exp.EQ(this=exp.paren(x.copy()), expression=c.sql))
                                    for c in args[1:])), BOOL)
        if op.strict:  # failures of the operands and of this operator share one TRY
            sql = op.build([a.sql for a in args])
            return _Typed(sql, fam, risky=fails or any(a.risky for a in args))
        sql = op.build([_closed(a) for a in args])
        return _Typed(sql, fam, risky=fails)

    out = walk(expr, 0)
    return _closed(_condition(out) if condition else out)
