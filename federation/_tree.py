"""The coordinator's query tree: immutable, hashable, compared structurally.

Parsing (``_sql``) builds it; planning (``_planner``) rewrites it into per-node partial
aggregates and a merge; each step can be tested alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from federation.proto import bulle_pb2 as pb


@dataclass(frozen=True)
class Col:
    table: str  # alias
    name: str


@dataclass(frozen=True)
class Lit:
    value: object  # None | bool | int | float | str


@dataclass(frozen=True)
class Call:
    op: str  # a name from federation.proto.ops.OPS, or "cast"
    args: tuple[Expr, ...]


@dataclass(frozen=True)
class Agg:
    func: str  # count | sum | avg | min | max | var_samp | var_pop | stddev_samp | stddev_pop
    arg: Expr | None  # None: COUNT(*)


Expr = Union[Col, Lit, Call, Agg]  # noqa: UP007 (recursive alias needs Union at runtime)


@dataclass(frozen=True)
class OutputRef:
    """An ORDER BY term naming an output column of the select list (by alias or position):
    ordered on the released value, never sent to a node as an expression."""

    name: str


@dataclass(frozen=True)
class TableRef:
    table: str
    alias: str


@dataclass(frozen=True)
class JoinClause:
    table: TableRef
    kind: str  # inner | left
    on: Expr


@dataclass(frozen=True)
class SelectItem:
    expr: Expr
    name: str


@dataclass(frozen=True)
class OrderItem:
    expr: Expr | OutputRef
    descending: bool


@dataclass(frozen=True)
class Query:
    items: tuple[SelectItem, ...]
    source: TableRef
    joins: tuple[JoinClause, ...] = ()
    where: Expr | None = None
    group_by: tuple[Expr, ...] = ()
    having: Expr | None = None
    order_by: tuple[OrderItem, ...] = ()
    limit: int | None = None

    @property
    def tables(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys([self.source.table, *(j.table.table for j in self.joins)]))

    @property
    def is_aggregate(self) -> bool:
        return bool(self.group_by) or any(contains_agg(i.expr) for i in self.items) \
            or self.having is not None


def contains_agg(e: Expr | None) -> bool:
    if isinstance(e, Agg):
        return True
    if isinstance(e, Call):
        return any(contains_agg(a) for a in e.args)
    return False


def walk(e: Expr | None):
    """Pre-order traversal."""
    if e is None:
        return
    yield e
    if isinstance(e, Call):
        for a in e.args:
            yield from walk(a)
    elif isinstance(e, Agg) and e.arg is not None:
        yield from walk(e.arg)


def to_proto(e: Expr) -> pb.Expr:
    """Tree → wire expression (aggregates never go on the wire as expressions)."""
    if isinstance(e, Col):
        return pb.Expr(column=pb.ColumnRef(table=e.table, name=e.name))
    if isinstance(e, Lit):
        v = e.value
        if v is None:
            return pb.Expr(literal=pb.Literal(is_null=True))
        if isinstance(v, bool):
            return pb.Expr(literal=pb.Literal(bool_value=v))
        if isinstance(v, int):
            return pb.Expr(literal=pb.Literal(int_value=v))
        if isinstance(v, float):
            return pb.Expr(literal=pb.Literal(float_value=v))
        return pb.Expr(literal=pb.Literal(string_value=str(v)))
    if isinstance(e, Call):
        return pb.Expr(call=pb.Call(op=e.op, args=[to_proto(a) for a in e.args]))
    raise TypeError("aggregates are planned, not sent as expressions")
