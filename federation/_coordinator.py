"""The coordinator: parse → plan → fan out to nodes concurrently → merge → release.

The HTTP layer (``_api``) is a thin shell over :class:`Coordinator`.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid
from collections import OrderedDict
from concurrent import futures
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import dp_accounting as dpa
import grpc
import pyarrow as pa

from federation import _checks as checks
from federation import _dp_rules as dp_rules
from federation import _precision as precision_first
from federation._catalog import FederatedTable, federate
from federation._config import CoordinatorConfig, Researcher, hash_token
from federation._errors import QueryError, evaluation_failed
from federation._hubauth import CONFIG_TOKEN_SCOPES, Caller, HubAuth
from federation._merge import Released, merge
from federation._noderegistry import NodeRegistry
from federation._nodes import NodeClient, client_credentials, describe_rpc_error, rpc_outcome
from federation._planner import plan_event, plan_query
from federation._projects import Projects
from federation._receipts import Receipts
from federation._references import ReferenceSync
from federation._sql import parse
from federation.proto import bulle_pb2 as pb

log = logging.getLogger("bulle.coordinator")
KEEP_QUERIES = 1000
NODE_CHAIN = "node_chain_checked"  # coordinator audit action: a node's verified head


@dataclass
class QueryRecord:
    id: str
    researcher: str
    project: str
    sql_sha256: str
    epsilon: float | None = None  # requested ε for sensitive data (None: project default)
    precision: float | None = None  # asked ±h at 95% instead of an ε (federation/_precision)
    datasets: tuple[str, ...] = ()  # sensitive tables charged (per-dataset spend, audit)
    epsilon_charged: float = 0.0  # ε reserved on the project's ledger before the fan-out
    status: str = "running"  # running | done | failed
    submitted: float = field(default_factory=time.time)
    finished: float | None = None
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    exception: QueryError | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "status": self.status, "project": self.project,
                               "submitted": self.submitted, "finished": self.finished}
        if self.result is not None:
            out["result"] = self.result
        if self.error is not None:
            out["error"] = self.error
        return out


def _json_value(v: Any) -> Any:
    if isinstance(v, Decimal):
        return int(v) if v == v.to_integral_value() else float(v)
    if isinstance(v, float) and v != v:  # NaN is not JSON
        return None
    if hasattr(v, "isoformat"):
        return v.isoformat()
    return v


def released_to_json(r: Released, nodes: list[str], tier: str, elapsed: float) -> dict[str, Any]:
    table = r.table
    columns = [{"name": f.name, "type": _json_type(f.type)} for f in table.schema]
    rows = [[_json_value(v) for v in row.values()] for row in table.to_pylist()] \
        if table.num_columns else []
    out = {
        "columns": columns, "rows": rows, "suppressed": r.suppressed, "notes": r.notes,
        "nodes": nodes, "tier": tier, "suppressed_cells": r.suppressed_cells,
        "hidden_cells": r.hidden_cells, "elapsed_ms": round(elapsed * 1000, 3),
    }
    if r.noise_sd is not None:
        out.update(noise_sd=r.noise_sd, ci_low=r.ci_low, ci_high=r.ci_high)
    return out


def _json_type(t: pa.DataType) -> str:
    if pa.types.is_integer(t) or (pa.types.is_decimal(t) and t.scale == 0):
        return "integer"
    if pa.types.is_floating(t) or pa.types.is_decimal(t):
        return "number"
    if pa.types.is_boolean(t):
        return "boolean"
    return "string"


class Coordinator:
    def __init__(self, config: CoordinatorConfig) -> None:
        self.config = config
        creds = client_credentials(config)
        self._creds = creds
        self.config.state.mkdir(parents=True, exist_ok=True)
        # The nodes it routes to: the config's, changed by `bulle coordinator nodes`
        self.node_registry = NodeRegistry(config.database, config.nodes)
        self.clients: dict[str, NodeClient] = {}  # replaced whole, never changed in place
        self._nodes_version = -1
        self._nodes_lock = threading.Lock()
        self._sync_nodes()
        # Two pools: a query waits on its fan-out calls, so they must not share workers.
        self.pool = futures.ThreadPoolExecutor(max_workers=max(4, 4 * len(self.clients)),
                                               thread_name_prefix="bulle-fanout")
        self.query_pool = futures.ThreadPoolExecutor(max_workers=16,
                                                     thread_name_prefix="bulle-query")
        self._tokens = {r.token_sha256: r for r in config.researchers}
        self._catalog: dict[str, FederatedTable] = {}
        self._catalog_at = 0.0
        self._node_status: dict[str, str] = {}
        self._catalog_lock = threading.Lock()
        self._refreshing = False  # a background refresh is running
        self._chain_heads: dict[str, tuple[int, str]] | None = None  # node_chains()
        self._chains_lock = threading.Lock()
        self.references = ReferenceSync(self.clients, self.pool)
        self.projects = Projects(config)
        self.receipts = Receipts(config.state)  # signs every release (federation/_receipts)
        self._queries: OrderedDict[str, QueryRecord] = OrderedDict()
        self._queries_lock = threading.Lock()
        self.hub = HubAuth(config.hub) if config.hub else None
        from federation._indicators import Indicators

        # Standing indicators; their scheduler is started by `bulle coordinator serve`.
        self.indicators = Indicators(self)
        self._closed = threading.Event()
        threading.Thread(target=self._watch_nodes, name="bulle-nodes", daemon=True).start()

    # -- the node registry --------------------------------------------------------------
    def _sync_nodes(self) -> bool:
        """Take up the registry's changes (new clients, moved or removed nodes); whether
        anything changed."""
        with self._nodes_lock:
            version = self.node_registry.version()
            if version == self._nodes_version:
                return False
            wanted = {n.id: n for n in self.node_registry.active()}
            old = self.clients
            keep = {nid: c for nid, c in old.items()
                    if nid in wanted and c.address == wanted[nid].address}
            new = {nid: NodeClient(n, self._creds) for nid, n in wanted.items()
                   if nid not in keep}
            self.clients = {**keep, **new}
            if hasattr(self, "references"):
                self.references.clients = self.clients
            self._nodes_version = version
        for nid, c in old.items():
            if nid not in keep:
                c.close()  # a removed (or moved) node gets no plan any more
        if old or new:
            log.info("nodes: %s", ", ".join(sorted(self.clients)) or "none")
        return bool(old.keys() ^ self.clients.keys()) or bool(new)

    def _watch_nodes(self, every_s: float = 1.0) -> None:
        while not self._closed.wait(every_s):
            try:
                if self._sync_nodes() and self._catalog:
                    self.catalog(refresh=True)
            except Exception:
                log.exception("node registry sync failed")

    def close(self) -> None:
        self._closed.set()
        self.indicators.stop()
        if self.hub is not None:
            self.hub.close()
        self.query_pool.shutdown(wait=False, cancel_futures=True)
        self.pool.shutdown(wait=False, cancel_futures=True)
        for c in self.clients.values():
            c.close()

    # -- identity ---------------------------------------------------------------------
    def authenticate(self, token: str | None) -> Researcher | None:
        return self._tokens.get(hash_token(token)) if token else None

    def identify(self, token: str | None) -> Caller | None:
        """A config bearer token (a researcher) or a hub token (its owner and scopes)."""
        if not token:
            return None
        r = self.authenticate(token)
        if r is not None:
            return Caller(r.name, CONFIG_TOKEN_SCOPES, "config", r.projects)
        return self.hub.identify(token) if self.hub is not None else None

    def researcher_for(self, caller: Caller) -> Researcher:
        """The caller as a researcher: config projects plus active projects they are in."""
        config = next((r.projects for r in self.config.researchers if r.name == caller.name),
                      ())
        active = tuple(p.name for p in self.projects.registry.projects(member=caller.name)
                       if p.active)
        return Researcher(caller.name, "", tuple(dict.fromkeys((*caller.config_projects,
                                                                *config, *active))))

    # -- catalogue --------------------------------------------------------------------
    def catalog(self, refresh: bool = False) -> dict[str, FederatedTable]:
        """The federated catalogue. The first call and ``refresh=True`` ask every node and
        wait; afterwards a stale catalogue is served while a refresh runs in the
        background, so queries never wait for a slow node's catalogue or a table copy."""
        with self._catalog_lock:
            if refresh or not self._catalog:
                self._set_catalog(*self._build_catalog())
                return self._catalog
            stale = time.monotonic() - self._catalog_at > self.config.catalog_ttl_s
            if stale and not self._refreshing:
                self._refreshing = True
                self.pool.submit(self._refresh_in_background)
            return self._catalog

    def node_status(self) -> dict[str, str]:
        self.catalog()
        return dict(self._node_status)

    def node_chains(self) -> dict[str, dict[str, Any]]:
        """Each node verifies its own audit chain, against the head it showed last time.

        A head that moved is recorded in the coordinator's own chain, so a node that later
        rewrites or truncates what it had shown fails the next check, even after restarts.
        """
        audit = self.projects.audit
        with self._chains_lock:
            if self._chain_heads is None:  # read the record once, then kept up to date
                self._chain_heads = {}
                for e in audit.entries():
                    if e.action == NODE_CHAIN and e.detail.get("ok"):
                        self._chain_heads[e.detail["node"]] = (int(e.detail["head_seq"]),
                                                               e.detail["head_hash"])
            seen = dict(self._chain_heads)
        timeout = min(self.config.node_timeout_s, 10.0)
        calls = {nid: self.pool.submit(c.verify_audit, seen.get(nid), timeout)
                 for nid, c in self.clients.items()}
        out: dict[str, dict[str, Any]] = {}
        for nid, call in calls.items():
            try:
                r = call.result()
            except grpc.RpcError as e:
                out[nid] = {"status": describe_rpc_error(nid, e, timeout), "ok": None}
                continue
            report = {"node": nid, "ok": r.ok, "entries": r.entries, "reason": r.reason,
                      "first_bad_seq": r.first_bad_seq or None, "head_seq": r.head_seq,
                      "head_hash": r.head_hash}
            if not r.ok or seen.get(nid) != (r.head_seq, r.head_hash):
                audit.append("coordinator", "", NODE_CHAIN, report)
                if r.ok:
                    with self._chains_lock:
                        self._chain_heads[nid] = (r.head_seq, r.head_hash)
            out[nid] = {"status": "up", **report}
        return out

    def seen_chain_head(self, node: str) -> tuple[int, str] | None:
        """The head of ``node``'s chain the coordinator last recorded (None: none yet)."""
        with self._chains_lock:
            return (self._chain_heads or {}).get(node)

    def _refresh_in_background(self) -> None:
        try:
            built = self._build_catalog()
            with self._catalog_lock:
                self._set_catalog(*built)
        except Exception:  # the previous catalogue stays; the next call tries again
            log.exception("catalogue refresh failed")
        finally:
            self._refreshing = False

    def _build_catalog(self) -> tuple[dict[str, FederatedTable], dict[str, str]]:
        """Ask every node for its catalogue, sync reference tables, federate."""
        timeout = min(self.config.node_timeout_s, 10.0)
        calls = {nid: self.pool.submit(c.catalog, timeout) for nid, c in self.clients.items()}
        catalogs, status = {}, {}
        for nid, fut in calls.items():
            try:
                catalogs[nid] = fut.result()
                status[nid] = "up"
            except grpc.RpcError as e:
                status[nid] = describe_rpc_error(nid, e, timeout)
                log.warning("catalogue of node %s unavailable: %s", nid, status[nid])
        self.receipts.learn(catalogs)
        try:
            self.references.sync(catalogs, timeout)
        except Exception:  # copies are retried at the next refresh; the catalogue stands
            log.exception("reference table sync failed")
        return federate(catalogs), status

    def _set_catalog(self, catalog: dict[str, FederatedTable], status: dict[str, str]) -> None:
        self._catalog, self._node_status = catalog, status
        self._catalog_at = time.monotonic()

    def schema(self) -> dict[str, dict[str, str]]:
        return {name: t.columns for name, t in self.catalog().items()}

    # -- queries ----------------------------------------------------------------------
    def project_of(self, researcher: Researcher, project: str | None) -> str:
        if not researcher.projects:
            raise QueryError("forbidden", "you are not in any project yet: queries run under "
                             "a project approved by the ethics board (propose one with "
                             "hub.submit_project, or ask its lead to add you)", status=403)
        project = project or researcher.projects[0]
        if project not in researcher.projects:
            raise QueryError("forbidden", f"you are not a member of project {project!r}",
                             status=403)
        return project

    def submit(self, sql: str, researcher: Researcher, project: str | None = None,
               epsilon: float | None = None, precision: float | None = None) -> QueryRecord:
        """Start a query; the returned record's ``done`` event is set when it ends.

        ``precision`` (±h at 95%, sensitive tier) replaces ``epsilon``: the query runs at
        the ε :meth:`price` gives for it."""
        project = self.project_of(researcher, project)
        if epsilon is not None and not 0 < epsilon <= 10:
            raise QueryError("bad_request", "epsilon must be in (0, 10]")
        if precision is not None:
            if epsilon is not None:
                raise QueryError("bad_request", "give epsilon or precision, not both: the "
                                 "precision decides the ε")
            if not 0 < precision < float("inf"):
                raise QueryError("bad_request", "precision must be a positive number")
        record = QueryRecord(uuid.uuid4().hex, researcher.name, project,
                             hashlib.sha256(sql.encode()).hexdigest(), epsilon, precision)
        with self._queries_lock:
            self._queries[record.id] = record
            while len(self._queries) > KEEP_QUERIES:
                self._queries.popitem(last=False)
        self.query_pool.submit(self._run, record, sql)
        return record

    def get(self, query_id: str, researcher: Researcher) -> QueryRecord | None:
        with self._queries_lock:
            record = self._queries.get(query_id)
        # A researcher only ever sees their own queries.
        return record if record and record.researcher == researcher.name else None

    def run(self, sql: str, researcher: Researcher, project: str | None = None,
            epsilon: float | None = None, precision: float | None = None) -> dict[str, Any]:
        """Synchronous helper: the result JSON, or raises QueryError."""
        record = self.submit(sql, researcher, project, epsilon, precision)
        record.done.wait()
        if record.exception is not None:
            raise record.exception
        if record.error:
            raise QueryError(record.error["code"], record.error["message"], status=500)
        assert record.result is not None
        return record.result

    def _run(self, record: QueryRecord, sql: str) -> None:
        started = time.perf_counter()
        # the text too: the board lists what was asked, not only its hash
        entry: dict[str, Any] = {"query": record.id, "sql_sha256": record.sql_sha256,
                                 "sql": sql[:20_000]}
        if record.precision is not None:  # the board sees what precision was asked for
            entry["precision"] = record.precision
        decision, detail = "error", {}
        try:
            record.result = self.execute(sql, record)
            record.status = "done"
            decision = "released"
            detail = {"nodes": record.result["nodes"], "rows": len(record.result["rows"]),
                      "tier": record.result["tier"],
                      "epsilon": record.result.get("epsilon_spent", 0.0)}
            if record.datasets:
                detail["datasets"] = list(record.datasets)
        except QueryError as e:
            record.error = {**e.to_json(), "status": e.status}
            record.exception = e
            record.status = "failed"
            decision, detail = "refused", {"code": e.code, "message": e.message[:500]}
            if record.epsilon_charged:  # failed after the reservation: the charge stands
                detail.update(epsilon=record.epsilon_charged, datasets=list(record.datasets))
        except Exception:
            incident = uuid.uuid4().hex[:12]
            log.exception("query %s failed (incident %s)", record.id, incident)
            record.error = {"code": "internal", "status": 500,
                            "message": f"internal error (incident {incident})"}
            record.status = "failed"
            detail = {"incident": incident}
            if record.epsilon_charged:
                detail.update(epsilon=record.epsilon_charged, datasets=list(record.datasets))
        finally:
            try:
                self.projects.audit.append(record.researcher, record.project, decision, {
                    **entry, **detail,  # ms: the operators' latency metric
                    "ms": round((time.perf_counter() - started) * 1000, 2)})
            except Exception:  # the audit must not hide the answer; it is logged loudly
                log.exception("audit append failed for query %s", record.id)
            record.finished = time.time()
            log.info("query %s %s in %.1f ms", record.id, record.status,
                     (time.perf_counter() - started) * 1000)
            record.done.set()

    def price(self, sql: str, researcher: Researcher, project: str | None,
              precision: float) -> dict[str, Any]:
        """The ε a sensitive query needs for ±``precision`` at 95% on every released count
        and sum (federation/_precision.py): the query's static checks and its grant, then
        arithmetic on public figures. Nothing is charged, no node is sent anything."""
        project = self.project_of(researcher, project)
        catalog = self.catalog()
        query = parse(sql, {n: t.columns for n, t in catalog.items()},
                      {n: t.descriptions for n, t in catalog.items()})
        checked = checks.check(query, catalog)
        fp = plan_query(query)
        self._check_sensitive(query, checked.tables, checked.tier, catalog, project,
                              researcher.name)
        priced = precision_first.price(fp, catalog, checked.participants[0], precision,
                                       self.projects.config(project).nodes_disjoint)
        out = priced.to_json()
        budget = self.projects.budget(project)
        # what is left before composition (the charge's growth of the total is not ε)
        out.update(project=project, epsilon_remaining=budget.remaining)
        return out

    def _check_sensitive(self, query: Any, tables: list[FederatedTable], tier: str,
                         catalog: dict[str, FederatedTable], project: str,
                         researcher: str) -> tuple[Any, str]:
        """The grant covering a sensitive query, and the DP shape rules (free refusals)."""
        if tier != "sensitive":
            raise QueryError("not_allowed", "precision is chosen for differentially private "
                             "queries (sensitive tables); this query reads "
                             f"{tier} tables, whose noise does not depend on an ε")
        grant, token = self.projects.grant(project)
        # The caller may be a hub user absent from the config: the grant decides.
        self.projects.check(grant, Researcher(researcher, "", ()),
                            [t.name for t in tables if t.tier == "sensitive"])
        dp_rules.check(query, catalog)  # shape refusals the nodes would make, for free
        return grant, token

    def execute(self, sql: str, record: QueryRecord) -> dict[str, Any]:
        started = time.perf_counter()
        catalog = self.catalog()
        query = parse(sql, {n: t.columns for n, t in catalog.items()},
                      {n: t.descriptions for n, t in catalog.items()})
        checked = checks.check(query, catalog)  # static rules: a refusal costs nothing
        tables, tier = checked.tables, checked.tier
        nodes, excluded = checked.participants
        fp = plan_query(query)
        priced = None
        if record.precision is not None and tier != "sensitive":
            self._check_sensitive(query, tables, tier, catalog, record.project,
                                  record.researcher)  # refuses: precision is for DP
        plan = pb.Plan()
        plan.CopyFrom(fp.plan)
        plan.request_id, plan.project = record.id, record.project
        plan.researcher, plan.query_sha256 = record.researcher, record.sql_sha256
        dp = charged = None
        if tier == "sensitive":
            _, token = self._check_sensitive(query, tables, tier, catalog, record.project,
                                             record.researcher)
            record.datasets = tuple(t.name for t in tables if t.tier == "sensitive")
            if record.precision is not None:  # priced before anything is charged
                priced = precision_first.price(
                    fp, catalog, nodes, record.precision,
                    self.projects.config(record.project).nodes_disjoint)
                record.epsilon = priced.epsilon
            epsilon = record.epsilon or self.projects.config(record.project).default_epsilon
            plan.privacy.epsilon, plan.privacy.delta, plan.privacy.grant = epsilon, 0.0, token
            dp = epsilon
            # Reserved before any node sees the plan, and never refunded: a plan that fails
            # at a node keeps its charge (a free failure would be an oracle). Each node
            # releases an ε-DP view of its partition; a unit present at k nodes is seen k
            # times unless the board declared the nodes disjoint.
            k = 1 if self.projects.config(record.project).nodes_disjoint else len(nodes)
            event = dpa.ComposedDpEvent([plan_event(dp, len(fp.partials))] * k)
            charged = self.projects.charge(record.id, record.project, event, dp * k)
            record.epsilon_charged = dp * k
        parts = self._fan_out(plan, nodes)
        released = merge(fp, parts, self.config.max_rows)
        if charged is not None:
            intervals = (released.noise_sd, released.ci_low, released.ci_high) \
                if released.noise_sd is not None else None
            released.table = dp_rules.post_process(
                released.table, intervals, dp_rules.ranges(query, dp_rules.bounds_of(query,
                                                                                     catalog)))
        if excluded:
            released.notes.append(f"nodes {', '.join(excluded)} do not hold every joined table "
                                  "and did not take part")
        if priced is not None:
            released.notes.extend(priced.notes)
        out = released_to_json(released, nodes, tier, time.perf_counter() - started)
        if priced is not None:
            out["precision"] = priced.to_json()
        if charged is not None:
            # What this query was charged, and how much the project's composed total grew
            # (RDP composition: the growth is not the sum of the queries' ε).
            out["epsilon_spent"] = record.epsilon_charged
            out["budget"] = {"epsilon_spent": charged.spent_epsilon,
                             "epsilon_remaining": charged.remaining_epsilon,
                             "composed_epsilon_before": charged.spent_epsilon
                             - charged.needed_epsilon,
                             "composed_epsilon_after": charged.spent_epsilon}
            out["budget_split"] = (
                f"ε={dp:g} per node split equally over {len(fp.partials)} partial "
                f"aggregate(s) ({dp / len(fp.partials):.4g} each); groups share it by parallel "
                "composition (disjoint cells, bounded contributions)")
        # Last: signs the released values above, with the nodes' statements on their partials
        out["receipt"] = self.receipts.issue(
            record.id, record.project, record.sql_sha256, plan, tier, record.epsilon_charged,
            out, [result for result, _ in parts])
        return out

    def _fan_out(self, plan: pb.Plan, nodes: list[str]) -> list[tuple[pb.PartialResult, pa.Table]]:
        timeout = self.config.node_timeout_s
        rows = plan.HasField("rows")  # rows are streamed: no single 20 MB message

        def call(client: NodeClient) -> tuple[pb.PartialResult, bytes]:
            if rows:
                return client.execute_rows(plan, timeout)
            result = client.execute(plan, timeout)
            return result, result.arrow_ipc

        clients = self.clients
        calls = {nid: self.pool.submit(call, clients[nid]) for nid in nodes if nid in clients}
        parts = []
        refused: dict[str, str] = {}
        unreachable = {nid: "removed" for nid in nodes if nid not in clients}
        failed = False
        for nid, fut in calls.items():
            try:
                result, ipc = fut.result()
            except grpc.RpcError as e:
                outcome = rpc_outcome(e)
                if outcome == "refused":
                    refused[nid] = describe_rpc_error(nid, e, timeout)
                elif outcome == "unreachable":
                    unreachable[nid] = "unreachable"
                failed = failed or outcome == "failed"
                continue
            with pa.ipc.open_stream(ipc) as reader:
                parts.append((result, reader.read_all()))
        # No partial answer is ever presented as complete. Data-free outcomes first (a
        # static refusal, a node down), and they hide whether another node failed; a
        # failure or a deadline is one outcome that names no node and no cause.
        for code, found, status in (("node_refused", refused, 400),
                                    ("node_failed", unreachable, 502)):
            if found:
                detail = "; ".join(f"{n}: {why}" for n, why in sorted(found.items()))
                raise QueryError(code, f"query not answered: {detail}", status=status,
                                 nodes=found)
        if failed:
            raise evaluation_failed()
        return parts
