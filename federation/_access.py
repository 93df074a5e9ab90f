"""Who may call what, shared by the JSON API (``_api``) and the HTML pages (``_dashboard``,
``_catalog_page``, ``_indicators_page``, ``_pages``, ``_operator_page``): the scopes of each
endpoint, the caller of a request (a bearer token, or the hub session cookie of a page), the
hub login redirect, the catalogue as a caller may see it and the board's decision on a
project. It imports none of those modules: they import it, not each other.
"""

from __future__ import annotations

import re
import secrets
from typing import TYPE_CHECKING, Any, Literal

from fastapi import Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from pydantic import BaseModel, Field

from federation._errors import QueryError
from federation._hubauth import (
    SCOPE_APPROVE,
    SCOPE_AUDIT,
    SCOPE_METRICS,
    SCOPE_OBSERVE,
    SCOPE_QUERY,
    SCOPE_TRAIN,
    Caller,
    HubUnavailable,
)
from federation._registry import RegistryError

if TYPE_CHECKING:
    from federation._coordinator import Coordinator

# Which scopes open which endpoint (any one of them); the dashboard pages use the same.
ENDPOINT_SCOPES: dict[str, tuple[str, ...]] = {
    "GET /v1/catalog": (SCOPE_QUERY, SCOPE_APPROVE, SCOPE_AUDIT),
    "POST /v1/queries": (SCOPE_QUERY,),
    "POST /v1/price": (SCOPE_QUERY,),
    "GET /v1/dummy/{table}": (SCOPE_QUERY,),
    "GET /v1/queries/{id}": (SCOPE_QUERY,),
    "GET /v1/budget": (SCOPE_QUERY,),
    "GET /v1/projects": (SCOPE_QUERY, SCOPE_APPROVE, SCOPE_AUDIT),
    "POST /v1/projects": (SCOPE_QUERY,),
    "GET /v1/projects/{name}": (SCOPE_QUERY, SCOPE_APPROVE, SCOPE_AUDIT),
    "POST /v1/projects/{name}/decision": (SCOPE_APPROVE,),
    "GET /v1/board/summary": (SCOPE_APPROVE, SCOPE_AUDIT),
    "GET /v1/board/export": (SCOPE_APPROVE, SCOPE_AUDIT),
    "GET /v1/audit": (SCOPE_AUDIT,),
    "GET /v1/audit/verify": (SCOPE_AUDIT,),
    "GET /v1/receipts/{id}": (SCOPE_APPROVE, SCOPE_AUDIT),  # the board looks a receipt up
    "/v1/trainings": (SCOPE_TRAIN,),  # DP training jobs (federation/_training.py)
    "GET /board/": (SCOPE_APPROVE, SCOPE_AUDIT),
    "GET /catalog/": (SCOPE_QUERY, SCOPE_APPROVE, SCOPE_AUDIT),  # the catalogue page
    "POST /board/decide": (SCOPE_APPROVE,),
    # standing indicators (federation/_indicators_page.py): researchers propose, observers
    # (and the board) read; a researcher's token sees only the indicators they proposed
    "POST /v1/indicators": (SCOPE_QUERY,),
    "GET /v1/indicators": (SCOPE_OBSERVE, SCOPE_APPROVE, SCOPE_AUDIT, SCOPE_QUERY),
    "GET /indicators/": (SCOPE_OBSERVE, SCOPE_APPROVE, SCOPE_AUDIT),
    "GET /metrics": (SCOPE_METRICS, SCOPE_AUDIT),  # Prometheus (federation/_metrics.py)
}


SESSION_COOKIE = "bulle-board-session"
STATE_COOKIE = "bulle-oauth-state"
RETURN_COOKIE = "bulle-oauth-return"  # the page to come back to after the hub's login
# Pages the OAuth callback may return to; a catalogue search comes back with its words.
_RETURN = re.compile(r"(\./|board/|board/audit(\?node=[a-z0-9][a-z0-9-]{0,62})?|"
                     r"operator/([a-z0-9][a-z0-9_-]{0,62})?|"
                     r"catalog/(\?q=[A-Za-z0-9%._~-]{0,600})?"
                     r"|indicators/([a-z0-9][a-z0-9-]{1,50}/)?)")
class DecisionIn(BaseModel):
    decision: Literal["approve", "amend", "refuse"]
    reason: str = Field(default="", max_length=5000)
    epsilon: float | None = Field(default=None, gt=0, le=100)
    delta: float | None = Field(default=None, gt=0, lt=1e-2)
    datasets: list[str] | None = None
    days: float | None = Field(default=None, gt=0, le=1825)
    grant: str | None = Field(default=None, max_length=20_000,
                              description="a grant the board signed elsewhere (production)")


def bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    return value.strip() if scheme.lower() in ("bearer", "token") else None


def caller_from(coordinator: Coordinator, token: str | None) -> Caller:
    try:
        who = coordinator.identify(token)
    except HubUnavailable as e:
        raise QueryError("hub_unavailable", str(e), status=503) from None
    if who is None:
        raise QueryError("unauthenticated", "missing or invalid token", status=401)
    return who


def require(who: Caller, endpoint: str) -> None:
    if not who.can(*ENDPOINT_SCOPES[endpoint]):
        raise QueryError("forbidden", f"your token lacks the scope for {endpoint} "
                         f"(one of {', '.join(ENDPOINT_SCOPES[endpoint])})", status=403)


def page_caller(coordinator: Coordinator, request: Request
                ) -> tuple[Caller | None, str | None]:
    """Who is looking at a page: a ``Authorization: Bearer`` header, else the hub session
    cookie; with the session id (for CSRF) when it came from the cookie."""
    hub = coordinator.hub
    sid = request.cookies.get(SESSION_COOKIE)
    token = bearer(request.headers.get("authorization"))
    if token is None and hub is not None:
        token = hub.session_token(sid)
    else:
        sid = None  # header auth: no cookie session, so no CSRF token either
    try:
        who = coordinator.identify(token)
    except HubUnavailable as e:
        raise QueryError("hub_unavailable", str(e), status=503) from None
    return who, sid if who is not None else None


def return_path(value: str | None) -> str:
    """Where the OAuth callback may send the browser back to: a page of ours (relative to
    the service prefix), never anything a request chose freely."""
    if value and _RETURN.fullmatch(value):
        return value
    # a catalogue search too long to carry back still returns to the catalogue
    return "catalog/" if value and value.startswith("catalog/") else "board/"


def login(coordinator: Coordinator, request: Request, back: str = "board/") -> Response:
    """Send a browser without a session to the hub's OAuth, to come back to ``back``."""
    hub = coordinator.hub
    if hub is None or not hub.config.public_url:
        return JSONResponse({"error": {"code": "unauthenticated",
                                       "message": "missing or invalid token"}}, 401)
    state = secrets.token_urlsafe(24)
    r = RedirectResponse(hub.authorize_url(state), status_code=302)
    for name, value in ((STATE_COOKIE, state), (RETURN_COOKIE, return_path(back))):
        r.set_cookie(name, value, max_age=600, httponly=True, samesite="lax",
                     path=hub.config.prefix + "/")
    return r


def decide_project(coordinator: Coordinator, who: Caller, name: str, body: DecisionIn) -> Any:
    if body.decision == "refuse":
        return coordinator.projects.refuse(name, who.name, body.reason)
    if body.datasets is not None:
        in_catalogue(coordinator, body.datasets)
    return coordinator.projects.approve(
        name, who.name, epsilon=body.epsilon, delta=body.delta, datasets=body.datasets,
        days=body.days, reason=body.reason, grant=body.grant)


def in_catalogue(coordinator: Coordinator, datasets: list[str]) -> None:
    unknown = sorted(set(datasets) - set(coordinator.catalog()))
    if unknown:
        raise RegistryError(f"not in the catalogue: {', '.join(unknown)}")


def catalog_json(coordinator: Coordinator, who: Caller, refresh: bool = False
                 ) -> dict[str, Any]:
    """The catalogue as ``who`` may see it (``GET /v1/catalog`` and the catalogue page)."""
    tables = coordinator.catalog(refresh=refresh)
    covered = None if who.can(SCOPE_APPROVE, SCOPE_AUDIT) else _covered(coordinator, who)
    out = []
    for t in tables.values():
        body = t.to_json()
        if covered is not None and t.tier == "sensitive" and t.name not in covered:
            # Listed so it can be requested in a project; its details need a grant.
            body.update(columns=[], row_count_buckets={}, public_domains={},
                        quality=None, quality_score=None, pivots={}, bounds={},
                        granted=False)
        out.append(body)
    return {"tables": out, "nodes": coordinator.node_status()}


def _covered(coordinator: Coordinator, who: Caller) -> set[str]:
    """Sensitive datasets the caller's current grants cover."""
    out: set[str] = set()
    for name in coordinator.researcher_for(who).projects:
        try:
            grant, _ = coordinator.projects.grant(name)
        except QueryError:
            continue
        if who.name in grant.researchers:
            out.update(grant.datasets)
    return out


def visible_nodes(coordinator: Coordinator, who: Caller) -> list[str]:
    """The nodes whose pages ``who`` may see: every node for the board, an operator's own."""
    nodes = sorted(coordinator.node_status())
    if who.can(SCOPE_APPROVE):
        return nodes
    if not who.can(SCOPE_AUDIT):
        return []
    mine = set(coordinator.config.operators.get(who.name, ()))
    return [n for n in nodes if n in mine]
