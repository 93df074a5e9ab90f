"""The ethics board's dashboard, served by the coordinator (a hub service; login with hub
OAuth): pending projects to decide, ε spent against ε granted per project and per dataset
(server-side SVG: no CDN is reachable from the enclave), a timeline of releases, the audit
chain's status, CSV/JSON export. ``summary`` and ``export`` are also the JSON API's.
"""

from __future__ import annotations

import csv
import io
import json
import re
import secrets
from datetime import UTC, datetime
from html import escape
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from federation._errors import QueryError
from federation._hubauth import SCOPE_APPROVE, SCOPE_AUDIT, Caller, HubUnavailable
from federation._registry import RegistryError
from privacy import GrantError, verify_grant

if TYPE_CHECKING:
    from federation._coordinator import Coordinator

SESSION_COOKIE = "bulle-board-session"
STATE_COOKIE = "bulle-oauth-state"
RETURN_COOKIE = "bulle-oauth-return"  # the page to come back to after the hub's login
# Pages the OAuth callback may return to; a catalogue search comes back with its words.
_RETURN = re.compile(r"(board/|catalog/(\?q=[A-Za-z0-9%._~-]{0,600})?"
                     r"|indicators/([a-z0-9][a-z0-9-]{1,50}/)?)")
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
    releases, per_dataset = [], {}
    for e in audit.entries():
        eps = float(e.detail.get("epsilon") or 0.0)
        if e.action != "released":  # a query that failed after its charge still spent it
            for d in e.detail.get("datasets", []) if e.action in ("refused", "error") else ():
                per_dataset[(e.project, d)] = per_dataset.get((e.project, d), 0.0) + eps
            continue
        releases.append({"time": e.time, "project": e.project, "researcher": e.actor,
                         "tier": e.detail.get("tier", ""), "epsilon": eps,
                         "rows": e.detail.get("rows"), "nodes": e.detail.get("nodes", []),
                         "datasets": e.detail.get("datasets", []), "seq": e.seq,
                         # precision first (federation/_precision.py): the ±h asked for
                         "precision": e.detail.get("precision")})
        for d in e.detail.get("datasets", []):
            per_dataset[(e.project, d)] = per_dataset.get((e.project, d), 0.0) + eps
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
    return {"projects": projects, "datasets": datasets, "releases": releases,
            "chains": chains, "generated": datetime.now(UTC).isoformat(timespec="seconds")}


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
    "releases": ["seq", "time", "project", "researcher", "tier", "epsilon", "rows", "nodes",
                 "datasets", "precision"],
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
    if not rows:
        return f'<p class="empty" id="{plot_id}">Nothing granted yet.</p>'
    w, label_w, bar_w, row_h = 760, 290, 300, 30
    h = 34 + row_h * len(rows)
    out = [f'<svg id="{plot_id}" role="img" aria-label="{escape(title)}" width="{w}" '
           f'height="{h}" viewBox="0 0 {w} {h}" xmlns="http://www.w3.org/2000/svg" '
           'font-family="system-ui, sans-serif" font-size="13">',
           f'<text x="0" y="16" font-weight="600">{escape(title)}</text>']
    for i, (label, spent, granted) in enumerate(rows):
        y = 30 + i * row_h
        frac = min(spent / granted, 1.0) if granted else 0.0
        color = "#16a34a" if frac < 0.5 else "#d97706" if frac < 0.9 else "#dc2626"
        text = (f"{spent:.3g} / {granted:.3g} ε ({100 * spent / granted:.0f}%)" if granted
                else f"{spent:.3g} ε (no grant)")
        out += [
            f'<text x="0" y="{y + 15}">{escape(label[:40])}</text>',
            f'<rect x="{label_w}" y="{y + 2}" width="{bar_w}" height="18" rx="3" '
            'fill="#e5e7eb"/>',
            f'<rect class="spent" data-label="{escape(label)}" data-spent="{spent:.6g}" '
            f'data-granted="{granted or 0:.6g}" x="{label_w}" y="{y + 2}" '
            f'width="{bar_w * frac:.1f}" height="18" rx="3" fill="{color}"/>',
            f'<text x="{label_w + bar_w + 8}" y="{y + 15}">{escape(text)}</text>',
        ]
    return "".join(out) + "</svg>"


def svg_timeline(releases: list[dict[str, Any]], plot_id: str) -> str:
    """Cumulative ε per project over time; restricted/open releases as ticks on the axis."""
    if not releases:
        return f'<p class="empty" id="{plot_id}">No release yet.</p>'
    times = [datetime.fromisoformat(r["time"]).timestamp() for r in releases]
    t0, t1 = min(times), max(max(times), min(times) + 1)
    projects = sorted({r["project"] for r in releases})
    cum: dict[str, float] = {}
    series: dict[str, list[tuple[float, float]]] = {p: [(t0, 0.0)] for p in projects}
    for r, t in zip(releases, times, strict=True):
        cum[r["project"]] = cum.get(r["project"], 0.0) + r["epsilon"]
        series[r["project"]].append((t, cum[r["project"]]))
    top = max(max(cum.values(), default=0.0), 1e-9)
    w, h, left, right, top_px, bottom = 720, 240, 50, 150, 24, 200
    def x(t: float) -> float:
        return left + (t - t0) / (t1 - t0) * (w - left - right)

    def y(v: float) -> float:
        return bottom - v / top * (bottom - top_px) if top > 1e-9 else bottom

    out = [f'<svg id="{plot_id}" role="img" aria-label="releases over time" width="{w}" '
           f'height="{h}" viewBox="0 0 {w} {h}" xmlns="http://www.w3.org/2000/svg" '
           'font-family="system-ui, sans-serif" font-size="12">',
           f'<line x1="{left}" y1="{bottom}" x2="{w - right}" y2="{bottom}" stroke="#374151"/>',
           f'<line x1="{left}" y1="{top_px}" x2="{left}" y2="{bottom}" stroke="#374151"/>',
           f'<text x="4" y="{top_px + 4}">{top:.3g} ε</text>',
           f'<text x="4" y="{bottom}">0</text>',
           f'<text x="{left}" y="{bottom + 18}">{_hm(t0)}</text>',
           f'<text x="{w - right}" y="{bottom + 18}" text-anchor="end">{_hm(t1)}</text>',
           f'<text x="{left}" y="{bottom + 34}" fill="#6b7280">cumulative ε spent per project'
           ' (ticks: exact releases, no ε)</text>']
    for i, p in enumerate(projects):
        color = _PALETTE[i % len(_PALETTE)]
        pts = []
        for (ta, va), (tb, _) in zip(series[p], [*series[p][1:], (t1, 0.0)], strict=True):
            pts += [f"{x(ta):.1f},{y(va):.1f}", f"{x(tb):.1f},{y(va):.1f}"]
        out.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" '
                   f'points="{" ".join(pts)}"/>')
        out.append(f'<text x="{w - right + 8}" y="{top_px + 14 + 16 * i}" fill="{color}">'
                   f'{escape(p[:18])}</text>')
    for r, t in zip(releases, times, strict=True):
        if r["epsilon"] > 0:
            continue
        out.append(f'<line x1="{x(t):.1f}" y1="{bottom - 6}" x2="{x(t):.1f}" y2="{bottom}" '
                   'stroke="#9ca3af"/>')
    return "".join(out) + "</svg>"


def _hm(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%d %b %H:%M")


# ------------------------------------------------------------------------------ pages

_CSS = """
body{font-family:system-ui,sans-serif;margin:0;color:#111827;background:#f9fafb}
header{background:#1e3a8a;color:#fff;padding:12px 24px;display:flex;gap:16px;align-items:center}
header h1{font-size:18px;margin:0;flex:1} header a{color:#bfdbfe}
main{padding:16px 24px;max-width:1100px}
section{background:#fff;border:1px solid #e5e7eb;border-radius:8px;padding:12px 16px;
margin-bottom:16px}
h2{font-size:16px;margin:4px 0 12px}
table{border-collapse:collapse;font-size:13px;width:100%}
td,th{border-bottom:1px solid #e5e7eb;padding:4px 6px;text-align:left;vertical-align:top}
.card{border:1px solid #d1d5db;border-radius:6px;padding:10px;margin-bottom:10px}
.card h3{margin:0 0 6px;font-size:15px} .muted{color:#6b7280} .ok{color:#15803d}
.bad{color:#b91c1c} .msg{background:#fef3c7;padding:8px;border-radius:6px}
form.decide{display:grid;grid-template-columns:repeat(4,auto);gap:6px;align-items:end}
form.decide label{font-size:12px;display:flex;flex-direction:column}
form.decide textarea{grid-column:1/5} button{padding:5px 12px;border-radius:4px;
border:1px solid #1e3a8a;background:#1e3a8a;color:#fff;cursor:pointer}
button.refuse{background:#b91c1c;border-color:#b91c1c}
"""


def _page(who: Caller, data: dict[str, Any], csrf: str | None, msg: str) -> str:
    can_decide = who.can(SCOPE_APPROVE) and csrf is not None
    projects = data["projects"]
    pending = [p for p in projects if p["status"] == "pending"]
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>Bulle — "
             f"ethics board</title><style>{_CSS}</style></head><body><header><h1>Bulle · "
             f"ethics-board dashboard</h1><span>signed in as <b id='who'>{escape(who.name)}"
             "</b></span><a href='../catalog/'>catalogue</a><a href='logout'>log out</a>"
             "</header><main>"]
    if msg:
        parts.append(f"<p class='msg' id='msg'>{escape(msg)}</p>")
    parts.append(f"<section id='pending'><h2>Pending projects ({len(pending)})</h2>")
    if not pending:
        parts.append("<p class='empty muted'>No project waits for a decision.</p>")
    for p in pending:
        parts.append(
            f"<div class='card' data-project='{escape(p['name'])}'><h3>{escape(p['title'])} "
            f"<span class='muted'>({escape(p['name'])})</span></h3>"
            f"<p><b>Purpose:</b> {escape(p['purpose'])}</p><p><b>Datasets:</b> "
            f"{escape(', '.join(p['datasets']))} · <b>ε</b> {p['epsilon']:g} · <b>δ</b> "
            f"{p['delta']:g} · <b>duration</b> {p['duration_days']} days · <b>team</b> "
            f"{escape(', '.join(p['team']))} · submitted {escape(p['submitted_at'])} by "
            f"{escape(p['owner'])}</p>")
        if can_decide:
            n = escape(p["name"])
            parts.append(
                f"<form class='decide' method='post' action='decide'>"
                f"<input type='hidden' name='csrf' value='{csrf}'>"
                f"<input type='hidden' name='project' value='{n}'>"
                f"<label>ε<input name='epsilon' value='{p['epsilon']:g}' size='6'></label>"
                f"<label>δ<input name='delta' value='{p['delta']:g}' size='8'></label>"
                f"<label>days<input name='days' value='{p['duration_days']}' size='5'></label>"
                f"<label>datasets<input name='datasets' value='{escape(','.join(p['datasets']))}'"
                f" size='30'></label>"
                f"<textarea name='reason' rows='2' placeholder='reason (required to refuse; "
                f"recorded with any decision)'></textarea>"
                f"<button name='decision' value='approve' id='approve-{n}'>Approve</button>"
                f"<button name='decision' value='refuse' class='refuse' id='refuse-{n}'>"
                f"Refuse</button></form>")
        parts.append("</div>")
    parts.append("</section>")
    bars = [(p["name"], p["epsilon_spent"], p.get("granted_epsilon")) for p in projects
            if p.get("granted_epsilon") is not None]
    dsets = [(f"{d['project']} · {d['dataset']}", d["epsilon_spent"], d["epsilon_granted"])
             for d in data["datasets"]]
    parts.append("<section id='budgets'><h2>Privacy budgets: ε spent vs granted</h2>"
                 f"{svg_bars(bars, 'plot-projects', 'per project (global ledger)')}"
                 f"{svg_bars(dsets, 'plot-datasets', 'per project and sensitive dataset')}"
                 "</section>")
    rel = data["releases"]
    parts.append(f"<section id='timeline'><h2>Releases ({len(rel)})</h2>"
                 f"{svg_timeline(rel, 'plot-timeline')}<table><tr><th>time</th><th>project"
                 "</th><th>researcher</th><th>tier</th><th>ε (±precision asked)</th>"
                 "<th>rows</th><th>nodes</th></tr>")
    for r in rel[-15:][::-1]:
        asked = "" if r.get("precision") is None else f" (±{r['precision']:g})"
        parts.append(f"<tr><td>{escape(r['time'][:19])}</td><td>{escape(r['project'])}</td>"
                     f"<td>{escape(r['researcher'])}</td><td>{escape(r['tier'])}</td>"
                     f"<td>{r['epsilon']:.3g}{asked}</td><td>{r['rows']}</td>"
                     f"<td>{escape(', '.join(r['nodes']))}</td></tr>")
    parts.append("</table></section>")
    coordinator_chain = _chain(data["chains"]["coordinator"], "chain")
    parts.append(f"<section id='audit'><h2>Audit chains</h2><p>Coordinator: "
                 f"{coordinator_chain}</p><table><tr><th>node</th><th>status</th>"
                 "<th>chain</th></tr>")
    for nid, n in data["chains"]["nodes"].items():
        chain = ("<span class='muted'>not checked: the node did not answer</span>"
                 if n["ok"] is None else _chain(n))
        parts.append(f"<tr id='node-chain-{escape(nid)}'><td>{escape(nid)}</td>"
                     f"<td>{escape(n['status'])}</td><td>{chain}</td></tr>")
    parts.append("</table></section><section id='projects'><h2>All projects</h2><table><tr>"
                 "<th>project</th><th>status</th><th>ε granted</th><th>ε spent</th>"
                 "<th>expires</th><th>decided by</th><th>reason</th></tr>")
    for p in projects:
        g = p.get("granted_epsilon")
        parts.append(f"<tr><td>{escape(p['name'])}</td><td class='status'>"
                     f"{escape(p['status'])}</td><td>{'' if g is None else f'{g:g}'}</td>"
                     f"<td>{p['epsilon_spent']:.3g}</td>"
                     f"<td>{escape((p.get('expires_at') or '')[:10])}</td>"
                     f"<td>{escape(p.get('decided_by') or '')}</td>"
                     f"<td>{escape(p.get('reason') or '')}</td></tr>")
    links = " · ".join(f"<a href='export?format={f}&table={t}'>{t}.{f}</a>"
                       for t in ("projects", "budgets", "datasets", "releases")
                       for f in ("csv", "json"))
    parts.append(f"</table></section><section id='export'><h2>Export</h2><p>{links}</p>"
                 f"<p class='muted'>Generated {escape(data['generated'])}. Same data: "
                 "<code>bulle board export</code>.</p></section></main></body></html>")
    return "".join(parts)


def page_caller(coordinator: Coordinator, request: Request
                ) -> tuple[Caller | None, str | None]:
    """Who is looking at a page: a ``Authorization: Bearer`` header, else the hub session
    cookie; with the session id (for CSRF) when it came from the cookie."""
    from federation._api import bearer

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


def _chain(c: dict[str, Any], element_id: str = "") -> str:
    """A verified chain's state; ``element_id`` names the span (``-ok``/``-bad`` added)."""
    ident = (lambda suffix: f" id='{element_id}-{suffix}'") if element_id else (lambda _: "")
    if c["ok"]:
        return (f"<span class='ok'{ident('ok')}>✔ intact</span> — {c['entries']} entries, "
                f"head #{c['head_seq']} <code>{escape(c['head_hash'][:16])}…</code>")
    return (f"<span class='bad'{ident('bad')}>✘ broken at entry {c['first_bad_seq']}: "
            f"{escape(c['reason'])}</span>")


def forbidden(who: Caller, why: str) -> HTMLResponse:
    """A signed-in caller without the scopes a page needs."""
    return HTMLResponse(f"<!doctype html><title>Bulle</title><p>{escape(who.name)}: "
                        f"{escape(why)}.</p>", status_code=403)


def _forbidden_board(who: Caller) -> HTMLResponse:
    return forbidden(who, f"this page is for the ethics board ({SCOPE_APPROVE} or "
                          f"{SCOPE_AUDIT})")


def add_dashboard(app: FastAPI, coordinator: Coordinator) -> None:
    """The board's pages (/board/…), its decision form, logout and the hub login callback."""
    _add_board_pages(app, coordinator)
    _add_board_decide(app, coordinator)
    _add_session_routes(app, coordinator)


def _add_board_pages(app: FastAPI, coordinator: Coordinator) -> None:
    hub = coordinator.hub
    forbidden_board = _forbidden_board

    @app.get("/board")
    def board_root() -> RedirectResponse:
        return RedirectResponse("board/", status_code=302)

    @app.get("/board/")
    def board(request: Request, msg: str = "") -> Response:
        who, sid = page_caller(coordinator, request)
        if who is None:
            return login(coordinator, request)
        if not who.can(SCOPE_APPROVE, SCOPE_AUDIT):
            return forbidden_board(who)
        csrf = hub.csrf(sid) if hub is not None and sid else None
        return HTMLResponse(_page(who, summary(coordinator), csrf, msg[:300]))

    @app.get("/board/export")
    def board_export(request: Request, format: str = "json", table: str = "releases"
                     ) -> Response:
        who, _ = page_caller(coordinator, request)
        if who is None:
            return login(coordinator, request)
        if not who.can(SCOPE_APPROVE, SCOPE_AUDIT):
            return forbidden_board(who)
        if format not in ("json", "csv") or table not in _EXPORT_COLUMNS:
            return JSONResponse({"error": {"code": "bad_request",
                                           "message": "format: json|csv, table: "
                                           + "|".join(_EXPORT_COLUMNS)}}, 400)
        return export(coordinator, format, table)



def _optional_float(form: dict[str, str], key: str) -> float | None:
    return float(form[key]) if form.get(key) else None


def _decision_from_form(form: dict[str, str]) -> Any:
    """The board form's fields as the API's decision body (ValueError when invalid)."""
    from federation._api import DecisionIn

    datasets = [d.strip() for d in form["datasets"].split(",") if d.strip()] \
        if form.get("datasets") else None
    return DecisionIn(decision=form.get("decision", ""), reason=form.get("reason", ""),
                      epsilon=_optional_float(form, "epsilon"),
                      delta=_optional_float(form, "delta"),
                      days=_optional_float(form, "days"), datasets=datasets)


def _add_board_decide(app: FastAPI, coordinator: Coordinator) -> None:
    hub = coordinator.hub

    @app.post("/board/decide")
    async def board_decide(request: Request) -> Response:
        from federation._api import decide_project

        who, sid = page_caller(coordinator, request)
        if who is None:
            return login(coordinator, request)
        if not who.can(SCOPE_APPROVE):
            return _forbidden_board(who)
        form = {k: v[0] for k, v in parse_qs((await request.body()).decode()).items()}
        if hub is None or sid is None or not hub.check_csrf(sid, form.get("csrf", "")):
            return HTMLResponse("<p>Form expired: reload the page.</p>", status_code=403)
        name = form.get("project", "")
        try:
            p = decide_project(coordinator, who, name, _decision_from_form(form))
            msg = f"{name}: {p.effective_status}"
        except (RegistryError, ValueError) as e:
            msg = f"{name}: not decided: {str(e)[:200]}"
        return RedirectResponse(f"./?msg={quote(msg)}", status_code=303)


def _add_session_routes(app: FastAPI, coordinator: Coordinator) -> None:
    hub = coordinator.hub

    @app.get("/board/logout")
    def logout(request: Request) -> Response:
        if hub is not None:
            hub.end_session(request.cookies.get(SESSION_COOKIE))
        r = HTMLResponse("<!doctype html><title>Bulle</title><p>Logged out. "
                         "<a href='./'>Log in again</a></p>")
        r.delete_cookie(SESSION_COOKIE, path=hub.config.prefix + "/" if hub else "/")
        return r

    @app.get("/oauth_callback")
    def oauth_callback(request: Request, code: str = "", state: str = "") -> Response:
        if hub is None:
            return JSONResponse({"error": {"code": "not_found", "message": "no hub"}}, 404)
        expected = request.cookies.get(STATE_COOKIE)
        back = return_path(request.cookies.get(RETURN_COOKIE))
        if not code or not expected or not secrets.compare_digest(state, expected):
            return HTMLResponse(f"<p>Login state mismatch: <a href='{escape(back)}'>try again"
                                "</a></p>", status_code=400)
        try:
            token = hub.token_for_code(code)
        except HubUnavailable as e:
            raise QueryError("hub_unavailable", str(e), status=503) from None
        if token is None:
            return HTMLResponse("<p>The hub refused the login.</p>", status_code=403)
        r = RedirectResponse(back, status_code=302)
        r.set_cookie(SESSION_COOKIE, hub.new_session(token), max_age=8 * 3600, httponly=True,
                     samesite="lax", path=hub.config.prefix + "/")
        r.delete_cookie(STATE_COOKIE, path=hub.config.prefix + "/")
        r.delete_cookie(RETURN_COOKIE, path=hub.config.prefix + "/")
        return r
