"""The ethics board's dashboard, served by the coordinator (a hub service; login with hub
OAuth): pending projects to decide, ε spent against ε granted per project and per dataset
(server-side SVG: no CDN is reachable from the enclave), a timeline of releases, the audit
chain's status, CSV/JSON export. ``summary`` and ``export`` are also the JSON API's.
"""

from __future__ import annotations

import csv
import io
import json
import secrets
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from markupsafe import Markup
from pydantic import ValidationError

from federation import _activity as activity
from federation import _pages as pages

# login, page_caller, return_path: also imported from here by _operator_page and tests
from federation._access import (
    RETURN_COOKIE,
    SESSION_COOKIE,
    STATE_COOKIE,
    DecisionIn,
    decide_project,
    login,
    page_caller,
    return_path,
)
from federation._errors import QueryError
from federation._hubauth import SCOPE_APPROVE, SCOPE_AUDIT, Caller, HubUnavailable
from federation._operator_page import node_audit
from federation._registry import RegistryError
from privacy import GrantError, verify_grant

if TYPE_CHECKING:
    from federation._coordinator import Coordinator

_PALETTE = ("#2563eb", "#db2777", "#059669", "#d97706", "#7c3aed", "#0891b2", "#dc2626")


# ------------------------------------------------------------------------------ data


def summary(coordinator: Coordinator, audit_only: bool = False) -> dict[str, Any]:
    """Everything the dashboard shows, as JSON."""
    audit = coordinator.projects.audit
    report = audit.verify()
    seq, head = audit.head()
    chains = {"coordinator": {"ok": report.ok, "entries": report.entries,
                              "first_bad_seq": report.first_bad_seq, "reason": report.reason,
                              "head_seq": seq, "head_hash": head},
              # each node verifies its own chain against the head it showed last time
              "nodes": coordinator.node_chains()}
    if audit_only:
        return {"chains": chains}
    projects = _projects(coordinator)
    releases = activity.rows(coordinator)
    # composed like the project's total (a failed query's charge included: it was spent)
    per_dataset = activity.composed_by_dataset(coordinator, releases)
    granted = {p["name"]: p for p in projects}
    datasets = []
    for p in projects:
        for d in p["granted_datasets"]:
            datasets.append({"project": p["name"], "dataset": d,
                             "epsilon_granted": p["granted_epsilon"],
                             "epsilon_spent": round(per_dataset.pop((p["name"], d), 0.0), 6)})
    for (proj, d), eps in sorted(per_dataset.items()):  # spent under grants since changed
        datasets.append({"project": proj, "dataset": d, "epsilon_spent": round(eps, 6),
                         "epsilon_granted": (granted.get(proj) or {}).get("granted_epsilon")})
    return {"projects": projects, "datasets": datasets,
            "releases": [r.to_json() for r in releases],
            "legend": activity.legend(projects, releases), "chains": chains,
            "generated": datetime.now(UTC).isoformat(timespec="seconds")}


def _projects(coordinator: Coordinator) -> list[dict[str, Any]]:
    """Registry projects and grant-file projects (config) with their spend."""
    out = []
    pj = coordinator.projects
    for name, token in sorted(pj.tokens.items()):
        row: dict[str, Any] = {"name": name, "title": name, "source": "config", "team": [],
                               "granted_datasets": [], "granted_epsilon": None,
                               "status": "approved", "purpose": "", "expires_at": None}
        try:
            g = verify_grant(token, pj.board_key or b"", datetime.now(UTC))
            row.update(title=g.purpose[:80], purpose=g.purpose, team=list(g.researchers),
                       granted_datasets=list(g.datasets), granted_epsilon=g.epsilon,
                       granted_delta=g.delta, expires_at=g.expires.isoformat())
        except (GrantError, ValueError) as e:
            row["status"] = f"grant invalid ({getattr(e, 'code', 'no key')})"
        out.append(row)
    for p in pj.registry.projects():
        out.append({**p.to_json(), "source": "registry"})
    for row in out:
        spent = pj.spend(row["name"])
        row["epsilon_spent"] = round(spent[0], 6) if spent else 0.0
    return out


_EXPORT_COLUMNS = {
    "projects": ["name", "title", "status", "source", "owner", "team", "purpose", "datasets",
                 "epsilon", "delta", "duration_days", "granted_datasets", "granted_epsilon",
                 "granted_delta", "epsilon_spent", "expires_at", "submitted_at",
                 "decided_at", "decided_by", "reason"],
    "budgets": ["name", "status", "granted_epsilon", "epsilon_spent", "expires_at"],
    "datasets": ["project", "dataset", "epsilon_granted", "epsilon_spent"],
    "releases": ["seq", "time", "project", "researcher", "kind", "decision", "id", "text",
                 "hash", "tier", "epsilon", "composed_before", "composed_after", "growth",
                 "rows", "nodes", "datasets", "precision", "reason"],
}


def export(coordinator: Coordinator, fmt: str, table: str) -> Response:
    data = summary(coordinator)
    rows = {"projects": data["projects"], "budgets": data["projects"],
            "datasets": data["datasets"], "releases": data["releases"]}[table]
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    if fmt == "json":
        body = json.dumps({table: rows, "chains": data["chains"],
                           "generated": data["generated"]}, indent=2, ensure_ascii=False)
        return Response(body, media_type="application/json", headers={
            "Content-Disposition": f'attachment; filename="bulle-{table}-{stamp}.json"'})
    cols = _EXPORT_COLUMNS[table]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(cols)
    for r in rows:
        w.writerow([";".join(map(str, v)) if isinstance(v, list) else
                    ("" if r.get(c) is None else v) for c in cols for v in [r.get(c)]])
    return Response(buf.getvalue(), media_type="text/csv; charset=utf-8", headers={
        "Content-Disposition": f'attachment; filename="bulle-{table}-{stamp}.csv"'})


# ------------------------------------------------------------------------------ plots


def svg_bars(rows: list[tuple[str, float, float | None]], plot_id: str, title: str) -> str:
    """Horizontal bars: each row's ε spent against its own grant (the track)."""
    bars = []
    for i, (label, spent, granted) in enumerate(rows):
        frac = min(spent / granted, 1.0) if granted else 0.0
        bars.append({"label": label, "spent": spent, "granted": granted, "frac": frac,
                     "y": 30 + i * 30,
                     "color": "#16a34a" if frac < 0.5 else "#d97706" if frac < 0.9
                     else "#dc2626",
                     "text": f"{spent:.3g} / {granted:.3g} ε ({100 * spent / granted:.0f}%)"
                     if granted else f"{spent:.3g} ε (no grant)"})
    return pages.render("bars.svg", rows=bars, plot_id=plot_id, title=title, w=760,
                        h=34 + 30 * len(rows), label_w=290, bar_w=300)


def svg_timeline(releases: list[dict[str, Any]], plot_id: str) -> str:
    """The composed ε per project over time; releases without ε as ticks on the axis."""
    if not releases:
        return pages.render("timeline.svg", series=[], plot_id=plot_id)
    times = [datetime.fromisoformat(r["time"]).timestamp() for r in releases]
    t0, t1 = min(times), max(max(times), min(times) + 1)
    projects = sorted({r["project"] for r in releases})
    cum: dict[str, float] = {}
    series: dict[str, list[tuple[float, float]]] = {p: [(t0, 0.0)] for p in projects}
    for r, t in zip(releases, times, strict=True):
        # the composed total after the charge where known (what hub.budget() says)
        after = r.get("composed_after")
        cum[r["project"]] = after if after is not None else \
            cum.get(r["project"], 0.0) + r["epsilon"]
        series[r["project"]].append((t, cum[r["project"]]))
    top = max(max(cum.values(), default=0.0), 1e-9)
    w, h, left, right, top_px, bottom = 720, 240, 50, 150, 24, 200

    def x(t: float) -> float:
        return left + (t - t0) / (t1 - t0) * (w - left - right)

    def y(v: float) -> float:
        return bottom - v / top * (bottom - top_px) if top > 1e-9 else bottom

    lines = []
    for i, p in enumerate(projects):
        pts = []
        for (ta, va), (tb, _) in zip(series[p], [*series[p][1:], (t1, 0.0)], strict=True):
            pts += [f"{x(ta):.1f},{y(va):.1f}", f"{x(tb):.1f},{y(va):.1f}"]
        lines.append({"project": p, "color": _PALETTE[i % len(_PALETTE)],
                      "points": " ".join(pts)})
    ticks = [x(t) for r, t in zip(releases, times, strict=True) if r["epsilon"] <= 0]
    return pages.render("timeline.svg", series=lines, ticks=ticks, plot_id=plot_id, top=top,
                        w=w, h=h, left=left, right=right, top_px=top_px, bottom=bottom,
                        start=_hm(t0), end=_hm(t1))


def _hm(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%d %b %H:%M")


# ------------------------------------------------------------------------------ pages

MAX_ROWS_SHOWN = 200  # the board lists the most recent; the exports have every row


def render_board(who: Caller, data: dict[str, Any], csrf: str | None, msg: str,
                 filters: dict[str, str] | None = None) -> str:
    """The board page for ``data`` (``summary``), its release list filtered by ``filters``."""
    filters = {k: v for k, v in (filters or {}).items() if k in activity.FILTERS}
    all_rows = [activity.Row(**{k: (tuple(v) if isinstance(v, list) else v)
                                for k, v in r.items() if k != "growth"})
                for r in data["releases"]]
    matching = activity.select(all_rows, filters)
    projects = data["projects"]
    bars = [(p["name"], p["epsilon_spent"], p.get("granted_epsilon")) for p in projects
            if p.get("granted_epsilon") is not None]
    dsets = [(f"{d['project']} · {d['dataset']}", d["epsilon_spent"], d["epsilon_granted"])
             for d in data["datasets"]]
    spends = [r for r in data["releases"] if r["decision"] == "released" or r["epsilon"]]
    return pages.render(
        "board.html", who=who, roles=pages.roles(who), root="../", title="ethics board",
        msg=msg, can_decide=who.can(SCOPE_APPROVE) and csrf is not None, csrf=csrf,
        pending=[p for p in projects if p["status"] == "pending"], legend=data["legend"],
        # the plots are rendered (and escaped) by their own templates
        plot_projects=Markup(svg_bars(bars, "plot-projects",
                                      "per project: composed total (hub.budget())")),
        plot_datasets=Markup(svg_bars(dsets, "plot-datasets",
                                      "per project and sensitive dataset: composed ε")),
        plot_timeline=Markup(svg_timeline(spends, "plot-timeline")),
        shown=matching[-MAX_ROWS_SHOWN:][::-1], total=len(all_rows),
        total_matching=len(matching), filters=filters, filter_names=activity.FILTERS,
        choices=activity.choices(all_rows), chains=data["chains"], projects=projects,
        export_tables=list(_EXPORT_COLUMNS), generated=data["generated"])


def forbidden(who: Caller, why: str, root: str = "../") -> HTMLResponse:
    """A signed-in caller without the role a page needs (a styled page, no scope names)."""
    return pages.forbidden(who, why, root)


def _forbidden_board(who: Caller) -> HTMLResponse:
    return forbidden(who, "The board's pages are for the ethics board and node operators.")


def add_dashboard(app: FastAPI, coordinator: Coordinator) -> None:
    """The board's pages (/board/…), its decision form, logout and the hub login callback."""
    _add_board_pages(app, coordinator)
    _add_board_decide(app, coordinator)
    _add_session_routes(app, coordinator)


def _board_caller(coordinator: Coordinator, request: Request, back: str
                  ) -> tuple[Caller | None, str | None, Response | None]:
    """The caller of a board page, or the response to give instead (login, 403)."""
    who, sid = page_caller(coordinator, request)
    if who is None:
        return None, None, login(coordinator, request, back)
    if not who.can(SCOPE_APPROVE, SCOPE_AUDIT):
        return who, sid, _forbidden_board(who)
    return who, sid, None


def _add_board_pages(app: FastAPI, coordinator: Coordinator) -> None:
    hub = coordinator.hub

    @app.get("/board")
    def board_root() -> RedirectResponse:
        return RedirectResponse("board/", status_code=302)

    @app.get("/board/")
    def board(request: Request, msg: str = "", project: str = "", researcher: str = "",
              tier: str = "", decision: str = "", kind: str = "") -> Response:
        who, sid, refused = _board_caller(coordinator, request, "board/")
        if refused is not None or who is None:
            return refused  # type: ignore[return-value]
        csrf = hub.csrf(sid) if hub is not None and sid else None
        filters = {"project": project, "researcher": researcher, "tier": tier,
                   "decision": decision, "kind": kind}
        return HTMLResponse(render_board(who, summary(coordinator), csrf, msg[:300],
                                         {k: v[:100] for k, v in filters.items()}))

    @app.get("/board/audit")
    def board_audit(request: Request, page: int = 1, project: str = "", action: str = "",
                    node: str = "", before: int | None = None) -> Response:
        # back to this node's chain after a login (return_path keeps only a valid node id)
        back = return_path(f"board/audit?node={node}") if node else "board/audit"
        who, _, refused = _board_caller(coordinator, request, back)
        if refused is not None or who is None:
            return refused  # type: ignore[return-value]
        if node:  # a node's own chain, a page of it fetched and verified
            return node_audit(coordinator, who, node[:64], before)
        data = activity.audit_page(coordinator, page, project[:100], action[:100])
        names = sorted({p["name"] for p in _projects(coordinator)})
        return pages.page("audit.html", who, root="../", title="audit", projects=names,
                          project=project, action=action, **data)

    @app.get("/board/export")
    def board_export(request: Request, format: str = "json", table: str = "releases"
                     ) -> Response:
        who, _, refused = _board_caller(coordinator, request, "board/")
        if refused is not None or who is None:
            return refused  # type: ignore[return-value]
        if format not in ("json", "csv") or table not in _EXPORT_COLUMNS:
            return JSONResponse({"error": {"code": "bad_request",
                                           "message": "format: json|csv, table: "
                                           + "|".join(_EXPORT_COLUMNS)}}, 400)
        return export(coordinator, format, table)


# The decision form's numbers: (field, label, what the API accepts), checked here first so
# that a person reads "ε must be a number" rather than a parser's message.
_NUMBERS = (("epsilon", "ε", "a number above 0 and at most 100"),
            ("delta", "δ", "a number above 0 and below 0.01"),
            ("days", "days", "a number of days above 0 and at most 1825"))


def _number(form: dict[str, str], key: str, label: str, accepted: str) -> float | None:
    raw = form.get(key, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{label} must be {accepted}, not {raw[:20]!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{label} must be {accepted}")
    return value


def _decision_from_form(form: dict[str, str]) -> Any:
    """The board form's fields as the API's decision body (ValueError, in words, when a
    field is not acceptable)."""
    numbers = {key: _number(form, key, label, accepted) for key, label, accepted in _NUMBERS}
    datasets = [d.strip() for d in form["datasets"].split(",") if d.strip()] \
        if form.get("datasets") else None
    try:
        return DecisionIn(decision=form.get("decision", ""), reason=form.get("reason", ""),
                          datasets=datasets, **numbers)
    except ValidationError as e:
        labels = {key: (label, accepted) for key, label, accepted in _NUMBERS}
        field = str(e.errors()[0]["loc"][0]) if e.errors() else ""
        if field in labels:
            raise ValueError(f"{labels[field][0]} must be {labels[field][1]}") from None
        raise ValueError(f"{field or 'the form'}: {e.errors()[0]['msg']}") from None


def _add_board_decide(app: FastAPI, coordinator: Coordinator) -> None:
    hub = coordinator.hub

    @app.post("/board/decide")
    async def board_decide(request: Request) -> Response:
        who, sid = page_caller(coordinator, request)
        if who is None:
            return login(coordinator, request)
        if not who.can(SCOPE_APPROVE):
            return forbidden(who, "Deciding projects is the ethics board's.")
        form = {k: v[0] for k, v in parse_qs((await request.body()).decode()).items()}
        if hub is None or sid is None or not hub.check_csrf(sid, form.get("csrf", "")):
            return pages.page("message.html", who, 403, root="../", title="form expired",
                              message="This form has expired.", link="./",
                              link_text="Reload the board")
        name = form.get("project", "")
        try:
            p = decide_project(coordinator, who, name, _decision_from_form(form))
            msg = f"{name}: {p.effective_status}"
        except (RegistryError, ValueError) as e:
            msg = f"{name}: not decided: {str(e)[:200]}"
        return RedirectResponse(f"./?msg={quote(msg)}", status_code=303)


def _add_session_routes(app: FastAPI, coordinator: Coordinator) -> None:
    hub = coordinator.hub

    @app.get("/logout")
    @app.get("/board/logout")
    def logout(request: Request) -> Response:
        """End the session here and at the hub (else the hub's login signs straight back)."""
        if hub is not None:
            hub.end_session(request.cookies.get(SESSION_COOKIE))
        at_hub = pages.hub_url(coordinator, "hub/logout")
        r: Response = RedirectResponse(at_hub, status_code=302) if at_hub else pages.page(
            "message.html", None, root="./", title="logged out", message="Logged out.",
            link="", link_text="")
        r.delete_cookie(SESSION_COOKIE, path=hub.config.prefix + "/" if hub else "/")
        return r

    @app.get("/oauth_callback")
    def oauth_callback(request: Request, code: str = "", state: str = "") -> Response:
        if hub is None:
            return JSONResponse({"error": {"code": "not_found", "message": "no hub"}}, 404)
        expected = request.cookies.get(STATE_COOKIE)
        back = return_path(request.cookies.get(RETURN_COOKIE))
        if not code or not expected or not secrets.compare_digest(state, expected):
            return pages.page("message.html", None, 400, root="./", title="login",
                              message="Login state mismatch.", link=back,
                              link_text="Try again")
        try:
            token = hub.token_for_code(code)
        except HubUnavailable as e:
            raise QueryError("hub_unavailable", str(e), status=503) from None
        if token is None:
            return pages.page("message.html", None, 403, root="./", title="login",
                              message="The hub refused the login.", link="", link_text="")
        r = RedirectResponse(back, status_code=302)
        r.set_cookie(SESSION_COOKIE, hub.new_session(token), max_age=8 * 3600, httponly=True,
                     samesite="lax", path=hub.config.prefix + "/")
        r.delete_cookie(STATE_COOKIE, path=hub.config.prefix + "/")
        r.delete_cookie(RETURN_COOKIE, path=hub.config.prefix + "/")
        return r
