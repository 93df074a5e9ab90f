"""The node pages (``/operator/``, ``/operator/<node>``, ``/board/audit?node=<node>``) for
node operators (and the board): a node's status, its datasets with their quality reports,
the reference copies it holds, the recent plans it took part in and the refusals that name
it, its audit chain's verified head and its entries (``federation/_node_audit.py``). All of
it is what the coordinator already sees: metadata, coarsened quality reports and row-count
buckets, query texts and ε; nothing about one person.

An operator sees the nodes the coordinator's ``[operators]`` table gives their hub name
(others: 403) and lands on their node's page; the board (and admins) see every node.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response

from federation import _activity as activity
from federation import _pages as pages
from federation._access import login, page_caller, visible_nodes
from federation._hubauth import SCOPE_APPROVE, SCOPE_AUDIT, Caller
from federation._node_audit import node_audit_page

if TYPE_CHECKING:
    from federation._coordinator import Coordinator

RECENT = 50  # plans and refusals shown per node
_WHY = "The node pages are for node operators and the ethics board."
_NOT_YOURS = "This node's pages are for its own operators and the ethics board."


def node_audit(coordinator: Coordinator, who: Caller, node: str, before: int | None
               ) -> Response:
    """``board/audit?node=<node>``: a page of the node's entries, verified."""
    if node not in coordinator.node_status():
        return _no_node(who, "../")
    if node not in visible_nodes(coordinator, who):
        return pages.forbidden(who, _NOT_YOURS, "../")
    return pages.page("node_audit.html", who, root="../", title=f"audit of {node}",
                      **node_audit_page(coordinator, node, before))


def _no_node(who: Caller, root: str) -> Response:
    return pages.page("message.html", who, 404, root=root, title="nodes",
                      message="No node of that name.", link=f"{root}operator/",
                      link_text="All nodes")


def node_view(coordinator: Coordinator, node: str) -> dict[str, Any]:
    """What the page shows about ``node`` (its datasets, copies, plans, refusals, chain)."""
    tables = [t.to_json() for t in coordinator.catalog().values()]
    datasets = [{"name": t["name"], "tier": t["tier"], "description": t["description"],
                 "rows": (t["row_count_buckets"] or {}).get(node),
                 "quality": (t["quality"] or {}).get(node), "shared": t["shared"],
                 "copies": t["copies"]}
                for t in tables if node in t["nodes"]]
    copies = [t["name"] for t in tables if node in t["copies"] and node not in t["nodes"]]
    rows = activity.rows(coordinator)
    plans = [r for r in rows if node in r.nodes and r.decision == "released"]
    refusals = [r for r in rows if r.decision in ("refused", "failed")
                and (node in r.nodes or node in r.reason)]
    return {"node": node, "state": coordinator.node_status().get(node, "unknown"),
            "datasets": datasets, "copies": copies, "plans": plans[-RECENT:][::-1],
            "refusals": refusals[-RECENT:][::-1],
            "chain": coordinator.node_chains().get(node)}


def add_operator_pages(app: FastAPI, coordinator: Coordinator) -> None:

    @app.get("/operator")
    def operator_root() -> RedirectResponse:
        return RedirectResponse("operator/", status_code=302)

    @app.get("/operator/")
    def nodes(request: Request) -> Response:
        who, _ = page_caller(coordinator, request)
        if who is None:
            return login(coordinator, request, "operator/")
        if not who.can(SCOPE_APPROVE, SCOPE_AUDIT):
            return pages.forbidden(who, _WHY, "../")
        mine = visible_nodes(coordinator, who)
        if len(mine) == 1 and not who.can(SCOPE_APPROVE):  # an operator: their node
            return RedirectResponse(mine[0], status_code=302)
        status = coordinator.node_status()
        return pages.page("nodes.html", who, root="../", title="nodes",
                          nodes=[(n, status[n]) for n in mine])

    @app.get("/operator/{node}")
    def node_page(node: str, request: Request) -> Response:
        who, _ = page_caller(coordinator, request)
        if who is None:
            return login(coordinator, request, f"operator/{node}")
        if not who.can(SCOPE_APPROVE, SCOPE_AUDIT):
            return pages.forbidden(who, _WHY, "../")
        if node not in coordinator.node_status():
            return _no_node(who, "../")
        if node not in visible_nodes(coordinator, who):
            return pages.forbidden(who, _NOT_YOURS, "../")
        return pages.page("node.html", who, root="../", title=f"node {node}",
                          **node_view(coordinator, node))
