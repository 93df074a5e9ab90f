"""A researcher's training request → the run's ``TrainSpec`` (``bulle_flower.spec``).

The request is checked against the federated catalogue and the project's grant, in this
order (each step a function, so that the first problem is the one reported): the model,
the table, the grant (``Trainer._spec``), δ, the view (joins, label, features, their
columns and domains), the nodes, the rounds and the budget. The feature layout comes from
public domains and declared bounds only, never from data. The spec type itself checks its
fields and limits when it is built; what it refuses is a ``bad_request`` here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from bulle_flower.spec import MODELS, SET_OPS, Feature, SpecError, TrainSpec
from federation._errors import QueryError
from privacy import per_node_target

ZOO = MODELS
# Per-model defaults (the researcher may override each).
DEFAULTS: dict[str, dict[str, Any]] = {  # tuned on OULAD traces, 2-3 nodes, ε 1-2
    "logreg": {"lr": 0.3, "batch_size": 128, "hidden": 1, "epochs": 2},
    "mlp": {"lr": 0.3, "batch_size": 128, "hidden": 32, "epochs": 2},
    "gru": {"lr": 0.3, "batch_size": 128, "hidden": 16, "epochs": 2},
}
_LABEL = re.compile(r"^\s*([a-z_][a-z0-9_]*)\s*(?:(>=|<=|!=|>|<|=)\s*(-?\d+(?:\.\d+)?))?\s*$")
_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


@dataclass(frozen=True)
class View:
    """The training view a request names, checked against the catalogue."""

    joins: tuple[tuple[str, str], ...]
    features: tuple[Feature, ...]
    label: tuple[str, str, Any]
    order_by: str


@dataclass(frozen=True)
class Budget:
    rounds: int
    epsilon_total: float  # the run's composed target: min(asked, what the project has left)
    delta: float


def parse_label(text: str) -> list[Any]:
    """``col`` (non-zero), ``col OP number``, ``col = 'value'``, ``col != 'value'``,
    ``col IN ('a', 'b')``, ``col NOT IN (…)`` → the spec's ``[column, op, value]`` (a
    categorical label as ``[column, "in" | "not in", [values…]]``)."""
    m = _LABEL.match(text or "")
    if m:
        col, op, value = m.groups()
        return [col, op, float(value)] if op else [col, "!=", 0.0]
    bad = QueryError("bad_request", "label must be a column, 'column OP number' with OP one "
                     "of >=, >, <=, <, =, != (e.g. 'score >= 40'), or compare a column with a "
                     "public domain to values: \"higher = 'yes'\", \"col IN ('a', 'b')\"")
    import sqlglot
    from sqlglot import exp

    try:
        tree = sqlglot.parse_one(text, dialect="duckdb")
    except sqlglot.errors.ParseError:
        raise bad from None
    negate = isinstance(tree, exp.Not)
    node = tree.this if negate else tree
    if isinstance(node, exp.In) and not node.args.get("query") and not node.args.get("unnest"):
        values, op = node.expressions, "not in" if negate else "in"
    elif isinstance(node, (exp.EQ, exp.NEQ)) and not negate:
        values, op = [node.expression], "in" if isinstance(node, exp.EQ) else "not in"
    else:
        raise bad
    col = node.this
    if not isinstance(col, exp.Column) or col.table or not _NAME.match(col.name) \
            or not values or not all(isinstance(v, exp.Literal) for v in values):
        raise bad
    return [col.name, op, [str(v.this) for v in values]]


def check_model(req: dict[str, Any]) -> str:
    model = req.get("model")
    if model not in ZOO:
        raise QueryError("bad_request", f"model must be one of {', '.join(ZOO)}")
    return str(model)


def training_table(catalog: dict[str, Any], req: dict[str, Any]) -> Any:
    """The catalogue entry of the table to train on (sensitive or restricted, with a unit)."""
    table = catalog.get(str(req.get("table")))
    if table is None:
        raise QueryError("unknown_table", f"table {req.get('table')!r} is not in the "
                         "catalogue", status=404)
    if table.tier == "open" or not table.privacy_unit:
        raise QueryError("not_allowed", "DP training runs on sensitive or restricted "
                         "tables with a privacy unit (one learner = one example); a "
                         "table whose rows are persons declares privacy_unit = \"row\"")
    return table


def request_delta(req: dict[str, Any], grant: Any) -> float:
    delta = float(req.get("delta") or grant.delta)
    if not 0 < delta <= grant.delta:
        raise QueryError("bad_request", f"delta must be in (0, {grant.delta:g}] (the grant)")
    return delta


def training_view(req: dict[str, Any], catalog: dict[str, Any], table: Any) -> View:
    """Joins, label, features and order of the request, their columns in the view."""
    joins, columns = _joins(req, catalog, table)
    label = parse_label(str(req.get("label", "")))
    order_by = str(req.get("order_by") or "")
    features = _features(req, catalog, table, columns)
    for c in [label[0], *([order_by] if order_by else [])]:
        if c not in columns or c == table.privacy_unit:
            raise QueryError("unknown_column", f"column {c!r} is not in the training view")
    col, op, value = label
    if op in SET_OPS:
        domain = [str(v) for v in catalog[columns[col]].public_domains.get(col, ())]
        if not domain:
            raise QueryError("not_allowed", f"a label comparing {col!r} to values needs a "
                             "public domain for it (declared by its nodes)")
        unknown = sorted(set(value) - set(domain))
        if unknown:
            raise QueryError("bad_request", f"{unknown[0]!r} is not in the public domain "
                             f"of {col!r} ({', '.join(domain)})")
        value = tuple(value)
    if req.get("model") == "gru" and not order_by:
        raise QueryError("bad_request", "the sequence model needs order_by (e.g. a date)")
    return View(joins, features, (col, op, value), order_by)


def _joins(req: dict[str, Any], catalog: dict[str, Any], table: Any
           ) -> tuple[tuple[tuple[str, str], ...], dict[str, str]]:
    """The open tables joined (``table:column``, the column guessed when only one is
    shared), and column → the table that holds it."""
    joins, columns = [], {c: table.name for c in table.columns}
    for name in req.get("join") or []:
        jt_name, _, col = str(name).partition(":")
        jt = catalog.get(jt_name)
        if jt is None or jt.tier != "open":
            raise QueryError("not_allowed", f"joins are only with open tables ({name!r})")
        shared = sorted(set(jt.columns) & set(table.columns) - {table.privacy_unit})
        col = col or (shared[0] if len(shared) == 1 else "")
        if col not in shared:
            raise QueryError("bad_request", f"say which column joins {jt_name}: "
                             f"'{jt_name}:<column>' with one of {', '.join(shared)}")
        joins.append((jt_name, col))
        for c in jt.columns:
            columns.setdefault(c, jt_name)
    return tuple(joins), columns


def _features(req: dict[str, Any], catalog: dict[str, Any], table: Any,
              columns: dict[str, str]) -> tuple[Feature, ...]:
    """Each feature's layout: the bounds the researcher gave, else the public domain, else
    the bounds every node declares."""
    features = []
    for f in req.get("features") or []:
        holder = columns.get(f)
        if holder is None or f == table.privacy_unit:
            raise QueryError("unknown_column", f"feature {f!r} is not a column of "
                             f"{table.name} or of the joined tables")
        domain = catalog[holder].public_domains.get(f)
        given = (req.get("bounds") or {}).get(f)
        try:
            if given is not None:
                features.append(Feature(f, "num", float(given[0]), float(given[1])))
            elif domain:
                features.append(Feature(f, "cat", values=tuple(str(v) for v in domain)))
            elif f in catalog[holder].bounds:  # declared at every node that publishes it
                lo, hi = catalog[holder].bounds[f]
                features.append(Feature(f, "num", float(lo), float(hi)))
            else:
                raise QueryError("bad_request", f"feature {f!r} has no declared bounds or "
                                 f"public domain: pass bounds={{'{f}': [low, high]}}")
        except SpecError as e:
            raise QueryError("bad_request", str(e)) from None
    if not features:
        raise QueryError("bad_request", "name at least one feature")
    return tuple(features)


def training_nodes(req: dict[str, Any], catalog: dict[str, Any], table: Any,
                   joins: tuple[tuple[str, str], ...], registered: set[str]) -> list[str]:
    """The nodes that hold the table (and every joined one), have a registered SuperNode
    and are among those the request names (default: all of them)."""
    holders = set(table.nodes)
    for jt, _ in joins:
        holders &= set(catalog[jt].nodes)
    nodes = sorted(holders & registered & set(req.get("nodes") or holders))
    if not nodes:
        raise QueryError("not_allowed", f"no training node holds {table.name}"
                         + (" and the joined tables" if joins else ""))
    return nodes


def run_budget(req: dict[str, Any], grant: Any, delta: float, left: float, project: str
               ) -> Budget:
    """Rounds and the run's target ε: within the grant and what the project has left."""
    rounds = int(req.get("rounds", 5))
    epsilon = float(req.get("epsilon", 0) or 0)
    if not 1 <= rounds <= 200 or not 0 < epsilon <= grant.epsilon:
        raise QueryError("bad_request", f"rounds in [1, 200] and epsilon in (0, "
                         f"{grant.epsilon:g}] (the grant) are required")
    if left <= 0:
        raise QueryError("budget_exhausted", f"the privacy budget of project {project!r} "
                         "is spent", status=403)
    return Budget(rounds, min(epsilon, left), delta)


def make_spec(req: dict[str, Any], *, job: str, project: str, researcher: str, grant: str,
              model: str, table: str, view: View, nodes: list[str], budget: Budget,
              round_timeout_s: float) -> TrainSpec:
    """The spec of the run (``SpecError`` → ``bad_request``: a value out of its limits)."""
    d = {**DEFAULTS[model], **{k: req[k] for k in ("lr", "batch_size", "hidden", "epochs")
                               if req.get(k) is not None}}
    nm = req.get("noise_multiplier")
    try:
        return TrainSpec(
            job=job, project=project, researcher=researcher, grant=grant, model=model,
            hidden=int(d["hidden"]), table=table, joins=view.joins, features=view.features,
            label=view.label, order_by=view.order_by, max_len=int(req.get("max_len") or 10),
            rounds=budget.rounds, epochs=int(d["epochs"]), batch_size=int(d["batch_size"]),
            lr=float(d["lr"]), max_grad_norm=float(req.get("max_grad_norm") or 1.0),
            # each node's target, so that the run composed over the nodes stays within it
            epsilon=per_node_target(budget.epsilon_total, len(nodes), budget.delta),
            epsilon_total=budget.epsilon_total, delta=budget.delta,
            noise_multiplier=None if nm is None else float(nm),
            eval_fraction=float(req.get("eval_fraction") or 0.2),
            eval_share=float(req.get("eval_share") or 0.2), bins=int(req.get("bins") or 4),
            nodes=tuple(nodes), min_nodes=int(req.get("min_nodes") or 1),
            round_timeout_s=float(req.get("round_timeout_s") or round_timeout_s),
            seed=int(req.get("seed") or 0))
    except SpecError as e:
        raise QueryError("bad_request", str(e)) from None
    except (TypeError, ValueError):
        raise QueryError("bad_request", "numeric training parameters must be numbers") \
            from None
