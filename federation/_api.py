"""HTTP JSON API of the coordinator (what the notebook SDK calls). Thin: it authenticates
and delegates to :class:`Coordinator`."""


from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from federation._config import Researcher
from federation._coordinator import Coordinator
from federation._errors import QueryError

API_VERSION = "v1"


class QueryIn(BaseModel):
    sql: str = Field(min_length=1, max_length=20_000)
    project: str | None = None
    epsilon: float | None = Field(default=None, gt=0, le=10,
                                  description="ε for sensitive data (default: the project's)")
    wait_s: float = Field(default=60.0, ge=0, le=600,
                          description="how long to wait for the result before answering 202")


def build_app(coordinator: Coordinator) -> FastAPI:
    app = FastAPI(title="Bulle coordinator", version="0.1.0")

    @app.exception_handler(QueryError)
    def _query_error(_: Request, e: QueryError) -> JSONResponse:
        return JSONResponse({"error": e.to_json()}, status_code=e.status)

    def researcher(authorization: Annotated[str | None, Header()] = None) -> Researcher:
        token = authorization.removeprefix("Bearer ").strip() if authorization else None
        who = coordinator.authenticate(token)
        if who is None:
            raise QueryError("unauthenticated", "missing or invalid token", status=401)
        return who

    Who = Annotated[Researcher, Depends(researcher)]

    @app.get(f"/{API_VERSION}/health")
    def health() -> dict[str, Any]:
        return {"status": "ok"}

    @app.get(f"/{API_VERSION}/catalog")
    def catalog(who: Who, refresh: bool = False) -> dict[str, Any]:
        tables = coordinator.catalog(refresh=refresh)
        return {"tables": [t.to_json() for t in tables.values()],
                "nodes": coordinator.node_status()}

    @app.post(f"/{API_VERSION}/queries")
    def submit(body: QueryIn, who: Who) -> JSONResponse:
        record = coordinator.submit(body.sql, who, body.project, body.epsilon)
        finished = record.done.wait(body.wait_s)
        if finished and record.error:
            return JSONResponse({"id": record.id, "status": "failed", "error": record.error},
                                status_code=int(record.error.get("status", 400)))
        return JSONResponse(record.to_json(), status_code=200 if finished else 202)

    @app.get(f"/{API_VERSION}/budget")
    def budget(who: Who, project: str | None = None, report: bool = False) -> dict[str, Any]:
        name = coordinator.project_of(who, project)
        b = coordinator.projects.budget(name)
        out = b.to_json()
        if report:  # the tighter PLD figure, slower: on request
            out["epsilon_spent_pld"] = coordinator.projects.report(name, b.delta)
        return out

    @app.get(f"/{API_VERSION}/queries/{{query_id}}")
    def status(query_id: str, who: Who, wait_s: float = 0.0) -> dict[str, Any]:
        record = coordinator.get(query_id, who)
        if record is None:
            raise QueryError("not_found", "no such query", status=404)
        record.done.wait(min(max(wait_s, 0.0), 600.0))
        return record.to_json()

    return app
