"""Standing indicators on the web: the JSON API (propose, list, read) and the read-only
pages ``/indicators/`` and ``/indicators/<name>/`` for the ``observer`` role (and the
board), with the history chart (inline SVG: nothing loads from outside), the CSV download
and a slot per refresh for its signed receipt. HTML from an autoescaping Jinja2 template
(``templates/indicators.html``).

Observers see approved indicators (and expired ones, with their history); the board and
auditors see proposals too. A researcher's token may propose and read the indicators they
proposed through the API, never the pages (no observer role: a styled 403).
"""
# No ``from __future__ import annotations``: FastAPI reads the routes' ``Who`` annotation.

import csv
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape
from pydantic import BaseModel, Field

from federation import _pages as pages
from federation._access import ENDPOINT_SCOPES, login, page_caller, require
from federation._errors import QueryError
from federation._hubauth import SCOPE_APPROVE, SCOPE_AUDIT, Caller
from federation._indicators import Indicator, IndicatorSpec, Refresh

if TYPE_CHECKING:
    from federation._coordinator import Coordinator

PAGE = "GET /indicators/"
PUBLISHED = ("approved", "expired")  # what observers see
# Line colours: ≥ 3:1 against white (WCAG 1.4.11, graphics); text stays #111827/#374151.
PALETTE = ("#1d4ed8", "#be185d", "#047857", "#b45309", "#6d28d9", "#0e7490", "#b91c1c")
W, H, PAD_L, PAD_R, PAD_T, PAD_B = 720, 260, 76, 16, 16, 56
_env = Environment(loader=FileSystemLoader(Path(__file__).parent / "templates"),
                   autoescape=select_autoescape(default=True, default_for_string=True),
                   trim_blocks=True, lstrip_blocks=True)


class IndicatorIn(BaseModel):
    name: str = Field(min_length=2, max_length=51, description="a-z, 0-9 and '-'")
    title: str = Field(min_length=1, max_length=300)
    sql: str = Field(min_length=1, max_length=20_000)
    schedule: str = Field(description="hourly, daily, weekly, or seconds between refreshes")
    audience: str = Field(min_length=1, max_length=500,
                          description="who it is for (e.g. the State, the départements)")
    description: str = Field(default="", max_length=5000)
    epsilon: float | None = Field(default=None, gt=0, le=10,
                                  description="ε per refresh (sensitive tables only)")
    refreshes: int = Field(default=12, ge=1, le=10_000,
                           description="how many refreshes the ε budget asked should cover")
    epsilon_budget: float | None = Field(default=None, gt=0, le=100)
    value_column: str | None = Field(default=None, max_length=200)
    duration_days: int = Field(default=365, ge=1, le=1825)


# ------------------------------------------------------------------------------ data
def sees_all(who: Caller) -> bool:
    return who.can(SCOPE_APPROVE, SCOPE_AUDIT)


def visible(coordinator: "Coordinator", who: Caller) -> list[Indicator]:
    """The indicators ``who`` may read: all (board), published ones (observers), their own
    proposals (a researcher, through the API only)."""
    items = coordinator.indicators.indicators()
    if sees_all(who):
        return items
    if who.can(*ENDPOINT_SCOPES[PAGE]):
        return [i for i in items if i.status in PUBLISHED]
    return [i for i in items if i.proposer == who.name]


def series(ind: Indicator, history: list[Refresh]) -> tuple[list[str], list[dict[str, Any]]]:
    """(value column, one series per group): points (refresh index, value, 95% interval)."""
    out: dict[str, dict[str, Any]] = {}
    value = ind.value_column
    for i, r in enumerate(history):
        res = r.result
        if r.status != "released" or not res or not res.get("columns"):
            continue
        names = [c["name"] for c in res["columns"]]
        value = value if value in names else names[-1]
        vi = names.index(value)
        for ri, row in enumerate(res["rows"]):
            key = " · ".join(f"{names[j]} {v}" for j, v in enumerate(row) if j != vi) \
                or "all"
            lo, hi = (_cell(res.get("ci_low"), ri, vi), _cell(res.get("ci_high"), ri, vi))
            if isinstance(row[vi], (int, float)):
                out.setdefault(key, {"label": key, "points": []})["points"].append(
                    {"i": i, "value": row[vi], "lo": lo, "hi": hi})
    return [value or ""], list(out.values())


def _cell(matrix: list[list[Any]] | None, r: int, c: int) -> float | None:
    try:
        v = matrix[r][c] if matrix else None
    except (IndexError, TypeError):
        return None
    return v if isinstance(v, (int, float)) else None


def chart(ind: Indicator, history: list[Refresh]) -> dict[str, Any]:
    """Coordinates of the history chart (the template draws them): a line per series with
    its 95% intervals, and a red mark at every refresh that did not release."""
    _, lines = series(ind, history)
    n = max(len(history), 1)
    values = [v for s in lines for p in s["points"]
              for v in (p["value"], p["lo"], p["hi"]) if v is not None]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    if hi == lo:
        lo, hi = lo - 1, hi + 1
    pad = (hi - lo) * 0.08  # points off the frame's edges; no negative axis for counts
    lo, hi = (lo - pad if lo < 0 else max(lo - pad, 0.0)), hi + pad

    def x(i: int) -> float:
        return round(PAD_L + (W - PAD_L - PAD_R) * ((i + 0.5) / n), 1)

    def y(v: float) -> float:
        return round(PAD_T + (H - PAD_T - PAD_B) * (1 - (v - lo) / (hi - lo)), 1)

    for k, s in enumerate(lines):
        s["color"] = PALETTE[k % len(PALETTE)]
        for p in s["points"]:
            p.update(x=x(p["i"]), y=y(p["value"]),
                     ylo=y(p["lo"]) if p["lo"] is not None else None,
                     yhi=y(p["hi"]) if p["hi"] is not None else None)
        s["path"] = " ".join(f"{p['x']},{p['y']}" for p in s["points"])
    ticks = [{"y": y(lo + (hi - lo) * f), "label": _number(lo + (hi - lo) * f)}
             for f in (0, 0.25, 0.5, 0.75, 1)]
    marks = [{"x": x(i), "status": r.status, "label": f"{r.started_at} {r.status}",
              "code": r.error_code or ""} for i, r in enumerate(history)
             if r.status in ("refused", "failed")]
    every = max(1, len(history) // 6)  # at most ~6 dates on the axis
    dates = [{"x": x(i), "label": r.started_at[:16].replace("T", " ")}
             for i, r in enumerate(history) if i % every == 0]
    return {"w": W, "h": H, "left": PAD_L, "right": W - PAD_R, "top": PAD_T,
            "bottom": H - PAD_B, "lines": lines, "ticks": ticks, "marks": marks,
            "dates": dates, "empty": not history}


def _number(v: float) -> str:
    """An axis label that fits: thousands separated, few digits."""
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"


def history_csv(ind: Indicator, history: list[Refresh]) -> str:
    """One line per released cell row per refresh; a refresh that did not release is one
    line with its status and reason (shown, not dropped)."""
    columns: list[str] = next(([c["name"] for c in r.result["columns"]] for r in history
                               if r.result and r.result.get("columns")), [])
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["refreshed_at", "status", "query_id", "epsilon_charged", *columns,
                "ci_low", "ci_high", "error_code", "error_message"])
    value = series(ind, history)[0][0]
    vi = columns.index(value) if value in columns else len(columns) - 1
    for r in history:
        head = [r.started_at, r.status, r.query_id or "", r.epsilon_charged]
        if r.status != "released" or not r.result:
            w.writerow([*head, *([""] * len(columns)), "", "", r.error_code or "",
                        r.error_message or ""])
            continue
        for ri, row in enumerate(r.result.get("rows", [])):
            w.writerow([*head, *["" if v is None else v for v in row],
                        _blank(_cell(r.result.get("ci_low"), ri, vi)),
                        _blank(_cell(r.result.get("ci_high"), ri, vi)), "", ""])
    return buf.getvalue()


def _blank(v: Any) -> Any:
    return "" if v is None else v


# ------------------------------------------------------------------------------ pages
def render(template: str, status: int = 200, **context: Any) -> HTMLResponse:
    return HTMLResponse(_env.get_template(template).render(**context), status_code=status)


def _page(who: Caller, back: str, status: int = 200, **context: Any) -> HTMLResponse:
    """indicators.html in base.html's frame for ``who``, at ``back`` (its path under the
    service root: the links of the frame are relative to it)."""
    return render("indicators.html", status, who=who, roles=pages.roles(who),
                  root="../" * back.count("/"), **context)


def _gate(coordinator: "Coordinator", request: Request, back: str
          ) -> tuple[Caller | None, Response | None]:
    """The caller of a page, or the response to give instead (login, styled 403)."""
    who, _ = page_caller(coordinator, request)
    if who is None:
        return None, login(coordinator, request, back)
    if not who.can(*ENDPOINT_SCOPES[PAGE]):
        return None, _page(who, back, 403, page="forbidden", scopes=ENDPOINT_SCOPES[PAGE],
                           title="Not allowed")
    return who, None


def _one(coordinator: "Coordinator", who: Caller, name: str) -> Indicator:
    ind = next((i for i in visible(coordinator, who) if i.name == name), None)
    if ind is None:
        raise QueryError("not_found", f"no indicator {name!r}", status=404)
    return ind


def _detail(coordinator: "Coordinator", ind: Indicator) -> dict[str, Any]:
    history = coordinator.indicators.history(ind.name)
    latest = next((r for r in reversed(history) if r.status == "released"), None)
    return {"ind": ind, "history": history, "chart": chart(ind, history), "latest": latest,
            "last": history[-1] if history else None,
            "value": series(ind, history)[0][0]}


def add_indicators(app: FastAPI, coordinator: "Coordinator", Who: Any) -> None:
    """The API under /v1/indicators and the pages under /indicators/."""
    _add_api(app, coordinator, Who)
    _add_pages(app, coordinator)


def _add_api(app: FastAPI, coordinator: "Coordinator", Who: Any) -> None:
    @app.post("/v1/indicators", status_code=201)
    def propose(body: IndicatorIn, who: Who) -> dict[str, Any]:
        require(who, "POST /v1/indicators")
        ind = coordinator.indicators.propose(who.name, IndicatorSpec(**body.model_dump()))
        return ind.to_json()

    @app.get("/v1/indicators")
    def list_indicators(who: Who) -> dict[str, Any]:
        require(who, "GET /v1/indicators")
        out = []
        for ind in visible(coordinator, who):
            last = coordinator.indicators.history(ind.name, limit=1)
            out.append({**ind.to_json(), "last_refresh": last[0].to_json() if last else None})
        return {"indicators": out}

    @app.get("/v1/indicators/{name}")
    def one(name: str, who: Who) -> dict[str, Any]:
        require(who, "GET /v1/indicators")
        ind = _one(coordinator, who, name)
        return {**ind.to_json(), "history": [r.to_json() for r in
                                             coordinator.indicators.history(name)]}


def _add_pages(app: FastAPI, coordinator: "Coordinator") -> None:
    @app.get("/indicators")
    def root() -> RedirectResponse:
        return RedirectResponse("indicators/", status_code=302)

    @app.get("/indicators/")
    def index(request: Request) -> Response:
        who, refused = _gate(coordinator, request, "indicators/")
        if who is None:
            return refused  # type: ignore[return-value]
        items = [_detail(coordinator, i) for i in visible(coordinator, who)]
        return _page(who, "indicators/", page="index", items=items,
                     title="Standing indicators", board=sees_all(who))

    @app.get("/indicators/{name}/")
    def detail(name: str, request: Request) -> Response:
        who, refused = _gate(coordinator, request, f"indicators/{name}/")
        if who is None:
            return refused  # type: ignore[return-value]
        d = _detail(coordinator, _one(coordinator, who, name))
        return _page(who, f"indicators/{name}/", page="detail", title=d["ind"].title,
                     board=sees_all(who), **d)

    @app.get("/indicators/{name}/history.csv")
    def download(name: str, request: Request) -> Response:
        who, refused = _gate(coordinator, request, f"indicators/{name}/")
        if who is None:
            return refused  # type: ignore[return-value]
        ind = _one(coordinator, who, name)
        body = history_csv(ind, coordinator.indicators.history(name))
        return Response(body, media_type="text/csv; charset=utf-8", headers={
            "Content-Disposition": f'attachment; filename="indicator-{ind.name}.csv"'})

    @app.get("/indicators/{name}/receipts/{query_id}.json")
    def receipt(name: str, query_id: str, request: Request) -> Response:
        """The receipt stored with a refresh (the slot issue 17's receipts fill)."""
        who, refused = _gate(coordinator, request, f"indicators/{name}/")
        if who is None:
            return refused  # type: ignore[return-value]
        _one(coordinator, who, name)
        found = next((r for r in coordinator.indicators.history(name)
                      if r.query_id == query_id and r.receipt is not None), None)
        if found is None:
            return JSONResponse({"error": {"code": "not_found",
                                           "message": "no receipt for this refresh"}}, 404)
        return JSONResponse(found.receipt)
