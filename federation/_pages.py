"""The coordinator's HTML pages: one autoescaping Jinja2 environment over
``federation/templates/``, the roles a caller's scopes give, the styled 403, and the Bulle
home at ``/services/bulle/`` (per role: the catalogue, the researcher's projects and budget,
the board, the node pages, the docs and the example notebooks).
"""

from __future__ import annotations

from contextlib import suppress
from functools import cache
from typing import TYPE_CHECKING, Any

import jinja2
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response

from federation._access import login, page_caller, visible_nodes
from federation._errors import QueryError
from federation._hubauth import SCOPE_APPROVE, SCOPE_AUDIT, SCOPE_QUERY, SCOPE_TRAIN, Caller

if TYPE_CHECKING:
    from federation._coordinator import Coordinator

EXAMPLES = "lab/tree/examples"  # where prepare_home puts the example notebooks


@cache
def environment() -> jinja2.Environment:
    """Autoescaping for every HTML and SVG template (``.css`` includes: not escaped)."""
    env = jinja2.Environment(loader=jinja2.PackageLoader("federation", "templates"),
                             autoescape=jinja2.select_autoescape(["html", "svg"]),
                             undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True)
    env.filters["eps"] = lambda v: "—" if v is None else f"{float(v):.4f}"
    env.filters["g"] = lambda v: "" if v is None else f"{float(v):g}"
    return env


def render(template: str, **context: Any) -> str:
    return environment().get_template(template).render(**context)


def css() -> str:
    """The shared style sheet (also inlined by pages still built without templates)."""
    return environment().loader.get_source(environment(), "style.css")[0]  # type: ignore[union-attr]


def roles(who: Caller) -> list[str]:
    """The roles a caller's scopes amount to (an admin holds them all); the node pages are
    open to whoever may read the audit (operators, the board, admins)."""
    out = []
    if who.can(SCOPE_QUERY, SCOPE_TRAIN):
        out.append("researcher")
    if who.can(SCOPE_APPROVE):
        out.append("board")
    if who.can(SCOPE_AUDIT):
        out.append("operator")
    return out


def page(template: str, who: Caller | None, status: int = 200, *, root: str,
         **context: Any) -> HTMLResponse:
    """``template`` for ``who``; ``root`` is the service root relative to the page."""
    return HTMLResponse(render(template, who=who, roles=roles(who) if who else [],
                               root=root, **context), status_code=status)


def forbidden(who: Caller | None, what: str, root: str) -> HTMLResponse:
    """A signed-in caller whose role does not open a page: what it is for, in words (no
    scope names), and where to go instead."""
    return page("forbidden.html", who, 403, root=root, title="not for your role", what=what)


def hub_url(coordinator: Coordinator, path: str) -> str | None:
    """An address on the hub (its public URL), or None without a hub."""
    hub = coordinator.hub
    if hub is None or not hub.config.public_url:
        return None
    return f"{hub.config.public_url.rstrip('/')}/{path.lstrip('/')}"


def _my_projects(coordinator: Coordinator, who: Caller) -> list[dict[str, Any]]:
    """The researcher's projects with their budget (the figures of ``hub.budget()``)."""
    out = []
    researcher = coordinator.researcher_for(who)
    pending = {p.name: p for p in coordinator.projects.registry.projects(member=who.name)}
    for name in dict.fromkeys([*researcher.projects, *pending]):
        row: dict[str, Any] = {"name": name, "status": "approved", "budget": None}
        if name in pending:
            row["status"] = pending[name].effective_status
        with suppress(QueryError):  # pending, refused or expired: no budget to show
            row["budget"] = coordinator.projects.budget(name).to_json()
        out.append(row)
    return out


def add_home(app: FastAPI, coordinator: Coordinator) -> None:
    """``GET /`` (``/services/bulle/`` behind the hub): the Bulle home."""
    @app.get("/")
    def home(request: Request) -> Response:
        who, _ = page_caller(coordinator, request)
        if who is None:
            return login(coordinator, request, "./")
        mine = _my_projects(coordinator, who) if who.can(SCOPE_QUERY) else []
        server = hub_url(coordinator, f"user/{who.name}/")
        return page("home.html", who, root="./", title="home", projects=mine,
                    lab=server and server + "lab", examples=server and server + EXAMPLES,
                    hub_home=hub_url(coordinator, "hub/home"),
                    hub_admin=hub_url(coordinator, "hub/admin"),
                    pending=len(coordinator.projects.registry.projects(status="pending"))
                    if who.can(SCOPE_APPROVE) else 0,
                    nodes=visible_nodes(coordinator, who))

    @app.get("/guide/")
    def guide(request: Request) -> Response:
        who, _ = page_caller(coordinator, request)
        if who is None:
            return login(coordinator, request, "./")
        return page("docs.html", who, root="../", title="documentation")
