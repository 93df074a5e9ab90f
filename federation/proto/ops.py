"""Expression operators allowed on the wire, and their compilation to DuckDB SQL.

An expression arrives as a tree of ``Expr`` messages. Its operators are looked up in
:data:`OPS`; the SQL that runs is built from this table with sqlglot's expression
builders (identifiers and literals are quoted by sqlglot), never from text on the wire.
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


class ExprError(ValueError):
    """An expression the contract does not allow. Messages never contain data values."""


@dataclass(frozen=True)
class Op:
    min_args: int
    max_args: int | None  # None: variadic
    build: Callable[[list[exp.Expression]], exp.Expression]


def _binary(cls: type[exp.Expression]) -> Op:
    # sqlglot renders the tree as given: parenthesise operands so precedence is the tree's
    return Op(2, 2, lambda a: cls(this=exp.paren(a[0], copy=False),
                                  expression=exp.paren(a[1], copy=False)))


def _fold(cls: type[exp.Expression]) -> Op:
    def build(args: list[exp.Expression]) -> exp.Expression:
        out = args[0]
        for arg in args[1:]:
            out = cls(this=exp.paren(out, copy=False), expression=exp.paren(arg, copy=False))
        return out

    return Op(2, None, build)


def _func(name: str, lo: int, hi: int | None) -> Op:
    return Op(lo, hi, lambda a: exp.Anonymous(this=name, expressions=a))


def _case(args: list[exp.Expression]) -> exp.Expression:
    # args: cond1, value1, cond2, value2, ..., [default]
    pairs, default = (args, None) if len(args) % 2 == 0 else (args[:-1], args[-1])
    ifs = [exp.If(this=pairs[i], true=pairs[i + 1]) for i in range(0, len(pairs), 2)]
    return exp.Case(ifs=ifs, default=default)


def _bucket(args: list[exp.Expression]) -> exp.Expression:
    # bucket(x, width) = floor(x / width) * width: numeric bins labelled by lower edge
    x, width = args
    lower = exp.Div(this=exp.paren(x), expression=width)
    return exp.Mul(this=exp.Anonymous(this="floor", expressions=[lower]), expression=width.copy())


OPS: dict[str, Op] = {
    "eq": _binary(exp.EQ),
    "neq": _binary(exp.NEQ),
    "lt": _binary(exp.LT),
    "lte": _binary(exp.LTE),
    "gt": _binary(exp.GT),
    "gte": _binary(exp.GTE),
    "and": _fold(exp.And),
    "or": _fold(exp.Or),
    "not": Op(1, 1, lambda a: exp.Not(this=exp.paren(a[0]))),
    "add": _binary(exp.Add),
    "sub": _binary(exp.Sub),
    "mul": _binary(exp.Mul),
    "div": _binary(exp.Div),
    "mod": _binary(exp.Mod),
    "neg": Op(1, 1, lambda a: exp.Neg(this=exp.paren(a[0]))),
    "is_null": Op(1, 1, lambda a: exp.Is(this=exp.paren(a[0]), expression=exp.Null())),
    "in": Op(2, None, lambda a: exp.In(this=exp.paren(a[0]), expressions=a[1:])),
    "between": Op(3, 3, lambda a: exp.Between(this=exp.paren(a[0]), low=exp.paren(a[1]),
                                                high=exp.paren(a[2]))),
    "like": _binary(exp.Like),
    "ilike": _binary(exp.ILike),
    "case": Op(2, None, _case),
    "bucket": Op(2, 2, _bucket),
    "coalesce": _func("coalesce", 1, None),
    "abs": _func("abs", 1, 1),
    "round": _func("round", 1, 2),
    "floor": _func("floor", 1, 1),
    "ceil": _func("ceil", 1, 1),
    "sqrt": _func("sqrt", 1, 1),
    "ln": _func("ln", 1, 1),
    "exp": _func("exp", 1, 1),
    "power": _func("power", 2, 2),
    "least": _func("least", 1, None),
    "greatest": _func("greatest", 1, None),
    "lower": _func("lower", 1, 1),
    "upper": _func("upper", 1, 1),
    "length": _func("length", 1, 1),
    "trim": _func("trim", 1, 1),
    "substr": _func("substr", 2, 3),
    "concat": _func("concat", 1, None),
    "year": _func("year", 1, 1),
    "month": _func("month", 1, 1),
    "nullif": _func("nullif", 2, 2),
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
        return exp.Literal.number(repr(lit.float_value))
    return exp.Literal.string(lit.string_value)


ColumnResolver = Callable[[str, str], exp.Expression]


def to_sql(expr: pb.Expr, resolve: ColumnResolver) -> exp.Expression:
    """Compile a wire expression; ``resolve(table, name)`` validates column references."""
    budget = [MAX_NODES]

    def walk(e: pb.Expr, depth: int) -> exp.Expression:
        budget[0] -= 1
        if depth > MAX_DEPTH or budget[0] < 0:
            raise ExprError("expression too deep or too large")
        kind = e.WhichOneof("kind")
        if kind == "column":
            return resolve(e.column.table, e.column.name)
        if kind == "literal":
            return literal_sql(e.literal)
        if kind != "call":
            raise ExprError("empty expression")
        name = e.call.op
        if name == "cast":
            if len(e.call.args) != 2 or e.call.args[1].literal.string_value not in CAST_TYPES:
                raise ExprError("cast takes a value and one of " + ", ".join(sorted(CAST_TYPES)))
            target = exp.DataType.build(e.call.args[1].literal.string_value)
            return exp.Cast(this=walk(e.call.args[0], depth + 1), to=target)
        op = OPS.get(name)
        if op is None:
            raise ExprError(f"operator {name[:40]!r} is not allowed")
        n = len(e.call.args)
        if n < op.min_args or (op.max_args is not None and n > op.max_args):
            raise ExprError(f"operator {name!r} got {n} arguments")
        args = [walk(a, depth + 1) for a in e.call.args]
        if name == "in" and any(a.WhichOneof("kind") != "literal" for a in e.call.args[1:]):
            raise ExprError("IN takes a list of constants")
        return op.build(args)

    return walk(expr, 0)

