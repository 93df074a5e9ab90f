"""The data catalogue for researchers, served by the coordinator next to the ethics board's
dashboard (same hub OAuth login, same session): the nodes and their status; per table its
tier, the nodes publishing it with their row-count buckets, quality score, description,
reference copies for joins, and its data dictionary (type, description, public domain and
completeness of each column; pivot columns marked with the other tables that have them);
a keyword search (``?q=``, every word, case and accents ignored: ``search_table``).

Server-rendered HTML without script; the data is :func:`federation._api.catalog_json`,
what ``GET /v1/catalog`` gives the same caller (sensitive tables no grant of theirs covers
are listed without details).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from federation import _pages as pages
from federation._access import ENDPOINT_SCOPES, catalog_json, login, page_caller
from federation._catalog import search_table
from federation._dashboard import forbidden
from federation._hubauth import Caller

if TYPE_CHECKING:
    from federation._coordinator import Coordinator

ENDPOINT = "GET /catalog/"  # in ENDPOINT_SCOPES: the scopes of "GET /v1/catalog"
MAX_QUERY = 200  # characters of a search kept
MAX_DOMAIN = 12  # public-domain values shown before "… (+n more)"
TIER_NOTE = {
    "open": "rows may be read; joins with it are allowed",
    "restricted": "aggregates perturbed at the node by the cell key method (no ε cost)",
    "sensitive": "differentially-private aggregates, within a project's grant",
}
PIVOT_NOTE = {"school": "school (UAI)", "year": "school year", "level": "level / grade",
              "area": "area", "declared": "declared by the node"}
def _completeness(table: dict[str, Any], column: str) -> str:
    pcts = [q["column_completeness_pct"][column] for q in (table.get("quality") or {}).values()
            if column in (q.get("column_completeness_pct") or {})]
    return f"{min(pcts):g}%" if pcts else ""


def _rules(t: dict[str, Any]) -> list[str]:
    """The table's disclosure rules, in words."""
    tier, unit = str(t.get("tier", "")), t.get("privacy_unit")
    min_count, round_to = t.get("min_count"), t.get("round_to")
    rules = [f"privacy unit {unit}" if unit else "",
             f"values resting on fewer than {min_count} units shown as < {min_count}"
             if min_count else "",
             "perturbed by the cell key method" if (t.get("cell_key") or {}).get("perturbed")
             else "",
             "no MIN/MAX (the unit is a person)" if tier == "restricted"
             and t.get("unit_level") == "person" else "",
             f"counts rounded to {round_to}" if round_to and round_to > 1 else ""]
    return [r for r in rules if r]


def _view(t: dict[str, Any], holders: dict[str, list[str]], where: list[str] | None
          ) -> dict[str, Any]:
    """What the template shows of one table (plain values: the template escapes them)."""
    name, tier = str(t["name"]), str(t.get("tier", ""))
    buckets = t.get("row_count_buckets") or {}
    domains = t.get("public_domains") or {}
    columns = []
    for c in t.get("columns") or []:
        col, kind = str(c["name"]), c.get("pivot")
        values = [str(v) for v in domains.get(col) or []]
        columns.append({"name": col, "type": str(c.get("type", "")),
                        "description": str(c.get("description") or ""),
                        "domain": values[:MAX_DOMAIN], "more": len(values) - MAX_DOMAIN,
                        "complete": _completeness(t, col), "pivot": kind,
                        "pivot_note": PIVOT_NOTE.get(kind, kind) if kind else "",
                        "joins": [n for n in holders.get(col, []) if n != name] if kind else []})
    return {"name": name, "tier": tier, "tier_note": TIER_NOTE.get(tier, tier),
            "description": str(t.get("description") or ""),
            "nodes": [(n, buckets.get(n)) for n in t.get("nodes", [])],
            "score": t.get("quality_score"), "rules": _rules(t),
            "reference": bool(t.get("shared") or t.get("copies")),
            "copies": [str(c) for c in t.get("copies") or []], "where": where,
            "granted": t.get("granted"), "columns": columns}


def render(who: Caller, data: dict[str, Any], q: str) -> str:
    """The catalogue page for ``data`` (``catalog_json``), searched for ``q``."""
    tables = data["tables"]
    holders: dict[str, list[str]] = {}
    for t in tables:
        for c in t.get("columns") or []:
            holders.setdefault(c["name"], []).append(t["name"])
    shown = []
    for t in tables:
        where = search_table(t, q) if q.strip() else None
        if where is None and q.strip():
            continue
        shown.append(_view(t, holders, where))
    return pages.render("catalog.html", who=who, roles=pages.roles(who), root="../",
                        title="data catalogue", q=q, shown=shown, total=len(tables),
                        nodes=sorted((data.get("nodes") or {}).items()))


def add_catalog_page(app: FastAPI, coordinator: Coordinator) -> None:
    @app.get("/catalog")
    def catalog_root() -> RedirectResponse:
        return RedirectResponse("catalog/", status_code=302)

    @app.get("/catalog/")
    def catalog_page(request: Request, q: str = "") -> Response:
        q = q[:MAX_QUERY]
        who, _ = page_caller(coordinator, request)
        if who is None:
            back = f"catalog/?q={quote(q, safe='')}" if q.strip() else "catalog/"
            return login(coordinator, request, back)
        if not who.can(*ENDPOINT_SCOPES[ENDPOINT]):
            return forbidden(who, "The catalogue is for researchers, the ethics board and "
                                  "node operators.")
        return HTMLResponse(render(who, catalog_json(coordinator, who), q))
