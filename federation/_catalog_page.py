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

from html import escape
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from federation._catalog import search_table
from federation._dashboard import forbidden, login, page_caller
from federation._hubauth import SCOPE_APPROVE, SCOPE_AUDIT, Caller
from federation._pages import css

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
_PAGE_CSS = """
form.search{display:flex;flex-wrap:wrap;align-items:center;gap:8px;margin:4px 0 8px}
form.search input{flex:1 1 180px;padding:5px 8px;
font-size:14px;border:1px solid #9ca3af;border-radius:4px}
.tier{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;color:#fff;
vertical-align:middle} .tier-open{background:#15803d} .tier-restricted{background:#92400e}
.tier-sensitive{background:#b91c1c}
.pivot{color:#1e3a8a;font-weight:600;white-space:nowrap} .ref{background:#ecfdf5;padding:6px;
border-radius:6px} .nogrant{background:#fef2f2;padding:6px;border-radius:6px}
ul.toc{columns:3;font-size:13px;padding-left:18px} code{font-size:12px}
table.columns code{overflow-wrap:anywhere} table.columns td:first-child{min-width:170px}
table.columns td:nth-child(3){min-width:180px}
table.columns td:nth-child(4){max-width:220px} section.table{overflow-x:auto}
"""


def _table_link(name: str) -> str:
    return f"<a href='#table-{escape(name)}'>{escape(name)}</a>"


def _domain(values: list[Any] | None) -> str:
    if not values:
        return ""
    shown = ", ".join(escape(str(v)) for v in values[:MAX_DOMAIN])
    more = len(values) - MAX_DOMAIN
    return shown + (f" <span class='muted'>… (+{more} more)</span>" if more > 0 else "")


def _completeness(table: dict[str, Any], column: str) -> str:
    pcts = [q["column_completeness_pct"][column] for q in (table.get("quality") or {}).values()
            if column in (q.get("column_completeness_pct") or {})]
    return f"{min(pcts):g}%" if pcts else ""


def _section(t: dict[str, Any], holders: dict[str, list[str]], where: list[str] | None
             ) -> str:
    name, tier = str(t["name"]), str(t.get("tier", ""))
    buckets = t.get("row_count_buckets") or {}
    nodes = ", ".join(f"<b>{escape(n)}</b>" + (f" <span class='muted'>({escape(str(b))} rows)"
                                                f"</span>" if (b := buckets.get(n)) else "")
                      for n in t.get("nodes", []))
    score = t.get("quality_score")
    out = [f"<section class='table' id='table-{escape(name)}' data-table='{escape(name)}'>"
           f"<h2>{escape(name)} <span class='tier tier-{escape(tier)}'>{escape(tier)}</span>"
           "</h2>",
           f"<p class='description'>{escape(str(t.get('description') or ''))}</p>",
           f"<p><span class='muted'>Tier:</span> {escape(TIER_NOTE.get(tier, tier))}"
           f" · <span class='muted'>published by</span> <span class='nodes'>{nodes}</span>"
           f" · <span class='muted'>quality</span> <span class='quality'>"
           f"{'—' if score is None else f'{score}/100'}</span></p>"]
    unit, min_count, round_to = t.get("privacy_unit"), t.get("min_count"), t.get("round_to")
    rules = [f"privacy unit <code>{escape(str(unit))}</code>" if unit else "",
             f"values resting on fewer than {min_count} units shown as &lt; {min_count}"
             if min_count else "",
             "perturbed by the cell key method" if (t.get("cell_key") or {}).get("perturbed")
             else "",
             "no MIN/MAX (the unit is a person)" if tier == "restricted"
             and t.get("unit_level") == "person" else "",
             f"counts rounded to {round_to}" if round_to and round_to > 1 else ""]
    if any(rules):
        out.append(f"<p class='muted'>{' · '.join(r for r in rules if r)}</p>")
    copies = [str(c) for c in t.get("copies") or []]
    if t.get("shared") or copies:
        at = ", ".join(escape(c) for c in copies)
        out.append("<p class='ref'>Reference table" + (
            f", copied to: <span class='copies'>{at}</span> — join it at any of these nodes"
            if copies else ", shared by its node: the coordinator copies it to the other "
            "nodes for joins") + ".</p>")
    if where is not None:
        out.append(f"<p class='muted matches'>matches: {escape(', '.join(where))}</p>")
    if t.get("granted") is False:
        out.append("<p class='nogrant'>Sensitive table: details need a grant in a project "
                   "(submit one naming it; the ethics board decides).</p></section>")
        return "".join(out)
    columns = t.get("columns") or []
    if not columns:
        return "".join([*out, "<p class='muted'>No column is common to every node.</p>"
                        "</section>"])
    domains = t.get("public_domains") or {}
    out.append("<table class='columns'><tr><th>column</th><th>type</th><th>description</th>"
               "<th>public domain</th><th>complete</th><th>pivot</th></tr>")
    for c in columns:
        col, kind = str(c["name"]), c.get("pivot")
        pivot = ""
        if kind:
            others = [n for n in holders.get(col, []) if n != name]
            pivot = (f"<span class='pivot' title='{escape(PIVOT_NOTE.get(kind, kind))}'>⇄ "
                     f"{escape(str(kind))}</span>")
            if others:
                pivot += (" <span class='joins'>with " + ", ".join(map(_table_link, others))
                          + "</span>")
        out.append(f"<tr data-column='{escape(col)}'><td><code>{escape(col)}</code></td>"
                   f"<td>{escape(str(c.get('type', '')))}</td>"
                   f"<td>{escape(str(c.get('description') or ''))}</td>"
                   f"<td>{_domain(domains.get(col))}</td><td>{_completeness(t, col)}</td>"
                   f"<td>{pivot}</td></tr>")
    out.append("</table></section>")
    return "".join(out)


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
        shown.append((t, where))
    board = ("<a href='../board/'>ethics-board dashboard</a>"
             if who.can(SCOPE_APPROVE, SCOPE_AUDIT) else "")
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><meta "
             "name='viewport' content='width=device-width, initial-scale=1'><title>Bulle — "
             f"catalogue</title><style>{css()}{_PAGE_CSS}</style></head><body><header><h1>"
             f"Bulle · data catalogue</h1><a href='../' id='nav-home'>home</a>{board}"
             f"<span>signed in as <b id='who'>{escape(who.name)}</b></span>"
             "<a href='../logout' id='logout'>log out</a></header><main>",
             "<section id='search'><form class='search' method='get' action='./'>"
             "<label for='q'>Search</label>"
             f"<input id='q' name='q' value='{escape(q)}' placeholder='keywords: table, column, "
             "description (accents and case ignored)'>"
             "<button>Search</button></form>"]
    if q.strip():
        parts.append(f"<p id='count'>{len(shown)} of {len(tables)} tables match "
                     f"<b>{escape(q)}</b> · <a href='./'>show all</a></p>")
    else:
        parts.append(f"<p id='count'>{len(tables)} tables</p>")
    if shown:
        parts.append("<ul class='toc'>" + "".join(
            f"<li>{_table_link(t['name'])} <span class='muted'>{escape(str(t['tier']))}"
            "</span></li>" for t, _ in shown) + "</ul>")
    parts.append("<p class='muted'>Pivot columns (⇄) identify a school, a school year, a "
                 "level or an area: tables sharing one can be related. In Python: "
                 "<code>hub.catalog(search=…)</code>, <code>hub.describe(table)</code>.</p>"
                 "</section><section id='nodes'><h2>Nodes</h2><table><tr><th>node</th>"
                 "<th>status</th></tr>")
    for nid, status in sorted(data.get("nodes", {}).items()):
        cls = "ok" if status == "up" else "bad"
        parts.append(f"<tr data-node='{escape(nid)}'><td>{escape(nid)}</td>"
                     f"<td class='{cls}'>{escape(str(status))}</td></tr>")
    parts.append("</table></section>")
    parts += [_section(t, holders, where) for t, where in shown]
    if not shown:
        parts.append("<section id='none'><p class='empty'>No table matches every word.</p>"
                     "</section>")
    parts.append("</main></body></html>")
    return "".join(parts)


def add_catalog_page(app: FastAPI, coordinator: Coordinator) -> None:
    @app.get("/catalog")
    def catalog_root() -> RedirectResponse:
        return RedirectResponse("catalog/", status_code=302)

    @app.get("/catalog/")
    def catalog_page(request: Request, q: str = "") -> Response:
        from federation._api import ENDPOINT_SCOPES, catalog_json

        q = q[:MAX_QUERY]
        who, _ = page_caller(coordinator, request)
        if who is None:
            back = f"catalog/?q={quote(q, safe='')}" if q.strip() else "catalog/"
            return login(coordinator, request, back)
        if not who.can(*ENDPOINT_SCOPES[ENDPOINT]):
            return forbidden(who, "The catalogue is for researchers, the ethics board and "
                                  "node operators.")
        return HTMLResponse(render(who, catalog_json(coordinator, who), q))
