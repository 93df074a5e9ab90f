"""HTTP JSON API of the coordinator (what the notebook SDK calls). Thin: it authenticates
and delegates to :class:`Coordinator`.

Callers present a coordinator bearer token (a researcher from the config), a JupyterHub
token, or a request signed with the board's own key (``Bulle-Board``,
federation/_boardauth.py); every endpoint names the scopes that may call it
(:data:`ENDPOINT_SCOPES`): any one of them is enough. No token → 401; a token
without the scope → 403.
"""

import uuid
from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from federation._access import (
    ENDPOINT_SCOPES as ENDPOINT_SCOPES,  # the API's table of scopes: re-exported
)
from federation._access import (
    DecisionIn,
    bearer,
    caller_from,
    catalog_json,
    decide_project,
    in_catalogue,
    require,
)
from federation._boardauth import BoardKeyAuth, board_token
from federation._catalog_page import add_catalog_page
from federation._config import Researcher
from federation._coordinator import Coordinator
from federation._dashboard import add_dashboard, export, summary
from federation._dummy import DEFAULT_ROWS as DUMMY_ROWS
from federation._dummy import MAX_ROWS as DUMMY_MAX_ROWS
from federation._dummy import dummy_json, run_dummy
from federation._errors import QueryError
from federation._hubauth import (
    SCOPE_APPROVE,
    SCOPE_AUDIT,
    Caller,
)
from federation._indicators_page import add_indicators
from federation._metrics import add_metrics_route
from federation._operator_page import add_operator_pages
from federation._pages import add_home
from federation._registry import RegistryError
from federation._training import training_router

API_VERSION = "v1"
_V = f"/{API_VERSION}"
class QueryIn(BaseModel):
    sql: str = Field(min_length=1, max_length=20_000)
    project: str | None = None
    epsilon: float | None = Field(default=None, gt=0, le=10,
                                  description="ε for sensitive data (default: the project's)")
    precision: float | None = Field(
        default=None, gt=0, allow_inf_nan=False,
        description="instead of epsilon: ±h, the widest 95% noise interval wanted on each "
                    "released count and sum (sensitive data; POST /v1/price gives its ε)")
    dummy: bool = Field(default=False,
                        description="run on dummy partitions drawn from public metadata: "
                                    "the answer's shape, no ε spent, nothing sent to nodes")
    wait_s: float = Field(default=60.0, ge=0, le=600,
                          description="how long to wait for the result before answering 202")


class PriceIn(BaseModel):
    sql: str = Field(min_length=1, max_length=20_000)
    project: str | None = None
    precision: float = Field(gt=0, allow_inf_nan=False,
                             description="±h: the widest 95% noise interval wanted")


class ProjectIn(BaseModel):
    name: str = Field(min_length=2, max_length=63, description="a-z, 0-9 and '-'")
    title: str = Field(min_length=1, max_length=300)
    purpose: str = Field(min_length=1, max_length=5000,
                         description="the finalité: what the data is used for, and not")
    datasets: list[str] = Field(min_length=1, max_length=50)
    epsilon: float = Field(gt=0, le=100, description="total ε requested for the project")
    delta: float = Field(default=1e-6, gt=0, lt=1e-2)
    duration_days: int = Field(default=365, ge=1, le=1825)
    team: list[str] = Field(default_factory=list, max_length=50,
                            description="hub user names (the submitter is added)")


def build_app(coordinator: Coordinator) -> FastAPI:
    app = FastAPI(title="Bulle coordinator", version="0.1.0")
    hub = coordinator.config.hub
    _add_plumbing(app, hub.prefix if hub else None)

    board = BoardKeyAuth(coordinator)  # `bulle board --key`: the board's own signature

    async def caller(request: Request,
                     authorization: Annotated[str | None, Header()] = None) -> Caller:
        if (signed := board_token(authorization)) is not None:
            return await board.from_request(request, signed)
        return await run_in_threadpool(caller_from, coordinator, bearer(authorization))

    Who = Annotated[Caller, Depends(caller)]

    def as_researcher(who: Caller, endpoint: str) -> Researcher:
        require(who, endpoint)
        return coordinator.researcher_for(who)

    _add_query_routes(app, coordinator, Who, as_researcher)
    _add_project_routes(app, coordinator, Who)
    _add_board_routes(app, coordinator, Who)

    app.include_router(training_router(
        coordinator, lambda who: as_researcher(who, "/v1/trainings"), Who))
    add_dashboard(app, coordinator)
    add_catalog_page(app, coordinator)
    add_indicators(app, coordinator, Who)
    add_metrics_route(app, coordinator, Who, require)
    add_home(app, coordinator)
    add_operator_pages(app, coordinator)
    return app


class _HubPrefix:
    """The hub's proxy forwards /services/<name>/… unchanged: route it as if at the root.

    Plain ASGI: Starlette's ``BaseHTTPMiddleware`` (``@app.middleware``) runs every request
    through extra tasks and memory streams, ~1 CPU-ms each (issue 13, T0)."""

    def __init__(self, app: Any, prefix: str) -> None:
        self.app, self.prefix = app, prefix

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            path = scope["path"]
            if path == self.prefix or path.startswith(self.prefix + "/"):
                scope["root_path"] = self.prefix
        await self.app(scope, receive, send)


def _add_plumbing(app: FastAPI, prefix: str | None) -> None:
    """The hub prefix middleware and the JSON error handlers."""
    if prefix:
        app.add_middleware(_HubPrefix, prefix=prefix)

    @app.exception_handler(QueryError)
    def _query_error(_: Request, e: QueryError) -> JSONResponse:
        return JSONResponse({"error": e.to_json()}, status_code=e.status)

    @app.exception_handler(RegistryError)
    def _registry_error(_: Request, e: RegistryError) -> JSONResponse:
        code = {404: "not_found", 409: "conflict"}.get(e.status, "bad_request")
        return JSONResponse({"error": {"code": code, "message": str(e)}},
                            status_code=e.status)


def _add_query_routes(app: FastAPI, coordinator: Coordinator, Who: Any,
                      as_researcher: Callable[[Caller, str], Researcher]) -> None:
    """Health, catalogue, queries, dummy tables, prices and the budget."""
    @app.get(f"{_V}/health")
    def health() -> dict[str, Any]:
        return {"status": "ok"}

    @app.get(f"{_V}/catalog")
    def catalog(who: Who, refresh: bool = False) -> dict[str, Any]:
        require(who, "GET /v1/catalog")
        return catalog_json(coordinator, who, refresh)

    @app.post(f"{_V}/queries")
    def submit(body: QueryIn, who: Who) -> JSONResponse:
        researcher = as_researcher(who, "POST /v1/queries")
        if body.dummy:  # synchronous: no node, no ledger, no record
            result = run_dummy(coordinator, body.sql, researcher, body.project)
            return JSONResponse({"id": f"dummy-{uuid.uuid4().hex}", "status": "done",
                                 "result": result})
        record = coordinator.submit(body.sql, researcher, body.project, body.epsilon,
                                    body.precision)
        finished = record.done.wait(body.wait_s)
        if finished and record.error:
            return JSONResponse({"id": record.id, "status": "failed", "error": record.error},
                                status_code=int(record.error.get("status", 400)))
        return JSONResponse(record.to_json(), status_code=200 if finished else 202)

    @app.get(f"{_V}/dummy/{{table}}")
    def dummy(table: str, who: Who,
              rows: Annotated[int, Query(ge=0, le=DUMMY_MAX_ROWS)] = DUMMY_ROWS,
              seed: int = 0) -> dict[str, Any]:
        """A dummy table drawn from the catalogue's public metadata (federation/_dummy.py)."""
        require(who, "GET /v1/dummy/{table}")
        visible = {t["name"]: t for t in catalog_json(coordinator, who)["tables"]}
        if table not in visible:
            raise QueryError("unknown_table", f"table {table!r} is not in the catalogue",
                             status=404)
        if visible[table].get("granted") is False:
            raise QueryError("forbidden", f"{table!r} is sensitive: its columns, and so its "
                             "dummy data, are shown to the researchers of a project whose "
                             "grant covers it", status=403)
        return dummy_json(coordinator.catalog()[table], rows, seed)

    @app.post(f"{_V}/price")
    def price(body: PriceIn, who: Who) -> dict[str, Any]:
        """The ε a sensitive query needs for ±precision at 95%: free, nothing sent to nodes."""
        researcher = as_researcher(who, "POST /v1/price")
        return coordinator.price(body.sql, researcher, body.project, body.precision)

    @app.get(f"{_V}/budget")
    def budget(who: Who, project: str | None = None, report: bool = False) -> dict[str, Any]:
        researcher = as_researcher(who, "GET /v1/budget")
        name = coordinator.project_of(researcher, project)
        b = coordinator.projects.budget(name)
        out = b.to_json()
        if report:  # the tighter PLD figure, slower: on request
            out["epsilon_spent_pld"] = coordinator.projects.report(name, b.delta)
        return out

    @app.get(f"{_V}/queries/{{query_id}}")
    def status(query_id: str, who: Who, wait_s: float = 0.0) -> dict[str, Any]:
        researcher = as_researcher(who, "GET /v1/queries/{id}")
        record = coordinator.get(query_id, researcher)
        if record is None:  # not found, or someone else's: the same answer
            raise QueryError("not_found", "no such query", status=404)
        record.done.wait(min(max(wait_s, 0.0), 600.0))
        return record.to_json()


def _add_project_routes(app: FastAPI, coordinator: Coordinator, Who: Any) -> None:
    """Projects: list, submit, read, decide."""
    registry = coordinator.projects.registry

    @app.get(f"{_V}/projects")
    def projects(who: Who, status: str | None = None) -> dict[str, Any]:
        require(who, "GET /v1/projects")
        everyone = who.can(SCOPE_APPROVE, SCOPE_AUDIT)
        items = registry.projects(status=status, member=None if everyone else who.name)
        return {"projects": [p.to_json() for p in items]}

    @app.post(f"{_V}/projects", status_code=201)
    def submit_project(body: ProjectIn, who: Who) -> dict[str, Any]:
        require(who, "POST /v1/projects")
        if body.name in coordinator.projects.configs:
            raise RegistryError(f"a project named {body.name!r} exists", status=409)
        in_catalogue(coordinator, body.datasets)
        p = registry.submit(who.name, **body.model_dump())
        coordinator.projects.audit.append(who.name, p.name, "project_submitted",
                                          {"epsilon": p.epsilon, "datasets": list(p.datasets)})
        return p.to_json()

    @app.get(f"{_V}/projects/{{name}}")
    def project(name: str, who: Who) -> dict[str, Any]:
        require(who, "GET /v1/projects/{name}")
        p = registry.get(name)
        if not who.can(SCOPE_APPROVE, SCOPE_AUDIT) and (p is None or who.name not in p.team):
            raise QueryError("forbidden", f"you are not a member of project {name!r}",
                             status=403)
        if p is None:
            raise QueryError("not_found", f"no project {name!r}", status=404)
        return {**p.to_json(), "events": registry.events(name)}

    @app.post(f"{_V}/projects/{{name}}/decision")
    def decide(name: str, body: DecisionIn, who: Who) -> dict[str, Any]:
        require(who, "POST /v1/projects/{name}/decision")
        return decide_project(coordinator, who, name, body).to_json()


def _add_board_routes(app: FastAPI, coordinator: Coordinator, Who: Any) -> None:
    """The board's summary and export, and the audit log."""
    @app.get(f"{_V}/board/summary")
    def board_summary(who: Who) -> dict[str, Any]:
        require(who, "GET /v1/board/summary")
        return summary(coordinator)

    @app.get(f"{_V}/board/export")
    def board_export(who: Who, format: Literal["json", "csv"] = "json",
                     table: Literal["projects", "budgets", "datasets", "releases"] = "releases"
                     ) -> Response:
        require(who, "GET /v1/board/export")
        return export(coordinator, format, table)

    @app.get(f"{_V}/audit")
    def audit(who: Who, project: str | None = None, limit: int = 500) -> dict[str, Any]:
        require(who, "GET /v1/audit")
        entries = list(coordinator.projects.audit.entries(project))[-max(1, min(limit, 10_000)):]
        return {"entries": [e.__dict__ for e in entries]}

    @app.get(f"{_V}/audit/verify")
    def audit_verify(who: Who) -> dict[str, Any]:
        require(who, "GET /v1/audit/verify")
        return summary(coordinator, audit_only=True)

    @app.get(f"{_V}/receipts/{{key}}")
    def receipt(key: str, who: Who) -> dict[str, Any]:
        """A release receipt by query id or by the receipt's sha256."""
        require(who, "GET /v1/receipts/{id}")
        found = coordinator.receipts.find(key)
        if found is None:
            raise QueryError("not_found", "no receipt with this id or hash", status=404)
        return found

    @app.get(f"{_V}/keys")
    def keys() -> dict[str, Any]:
        """The public keys receipts are signed with: open to all (offline verification)."""
        coordinator.catalog()  # the nodes publish theirs in their catalogues
        return coordinator.receipts.keys()


